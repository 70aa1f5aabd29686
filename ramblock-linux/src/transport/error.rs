//! What can go wrong on the transport: a peer the listener drops
//! ([`Refusal`], logged, the listener goes on waiting) and a failure of the
//! transport itself ([`TransportError`]).

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a listener dropped a peer. None of these ends the migration: the
/// listener logs it ([`PeerRefused`]) and waits for the next connection.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Nothing (or not enough) arrived within the handshake timeout.
    #[error("sent {got} of the {wanted} header bytes within {timeout:?}, then nothing")]
    Silent {
        /// Bytes that did arrive.
        got: usize,
        /// Bytes of the header asked for.
        wanted: usize,
        /// The handshake timeout.
        timeout: Duration,
    },
    /// Connected and closed without sending a byte (a port scan, a health
    /// check).
    #[error("connected and closed without sending anything")]
    ClosedAtOnce,
    /// Closed in the middle of the header.
    #[error("closed after {got} of the {wanted} header bytes")]
    ClosedEarly {
        /// Bytes that did arrive.
        got: usize,
        /// Bytes of the header asked for.
        wanted: usize,
    },
    /// The first bytes are no ramblock header.
    #[error("sent {found:02x?}, which is no ramblock stream header")]
    Garbage {
        /// The first eight bytes.
        found: [u8; 8],
    },
    /// A real header, but not the one awaited: a new stream while a
    /// post-copy waits to be resumed, or a resume with nothing to resume.
    #[error("sent a {found} header while waiting for a {wanted} header")]
    WrongHeader {
        /// What it sent.
        found: &'static str,
        /// What the listener waits for.
        wanted: &'static str,
    },
    /// A header of a version or target page size this build does not read.
    #[error("sent a header of version {version} with page shift {page_shift}, which this build does not read")]
    Unsupported {
        /// The header's version.
        version: u16,
        /// The header's log2 of the target page size.
        page_shift: u8,
    },
    /// A stream header that announces more page channels than a
    /// destination accepts.
    #[error("announced {announced} page channels, more than the {max} a destination accepts")]
    TooManyChannels {
        /// Channels the header announced.
        announced: u32,
        /// [`MAX_PAGE_CHANNELS`](ramblock_core::stream::format::MAX_PAGE_CHANNELS).
        max: u32,
    },
    /// A resume header whose token is not the one this destination issued.
    #[error("sent a resume header without the token this destination issued")]
    BadToken,
    /// Plaintext to a listener that requires TLS.
    #[error("spoke plaintext (first byte {first:#04x}) to a listener that requires TLS")]
    Plaintext {
        /// The first byte it sent.
        first: u8,
    },
    /// The TLS handshake stalled: nothing arrived within the handshake
    /// timeout.
    #[error("stalled the TLS handshake for {0:?}")]
    TlsSilent(Duration),
    /// Closed in the middle of the TLS handshake.
    #[error("closed during the TLS handshake")]
    ClosedInHandshake,
    /// The TLS handshake presented no client certificate.
    #[error("presented no client certificate")]
    NoCertificate,
    /// The client certificate is not signed by the configured CA (or is
    /// otherwise invalid).
    #[cfg(feature = "tls")]
    #[error("presented a certificate the CA does not vouch for: {0}")]
    UntrustedCertificate(rustls::CertificateError),
    /// The TLS handshake failed otherwise.
    #[cfg(feature = "tls")]
    #[error("TLS handshake failed: {0}")]
    Tls(rustls::Error),
    /// A resume from a peer authenticated as another identity than the
    /// source of this migration.
    #[error("authenticated as another certificate than the migration's source")]
    WrongIdentity,
    /// A page channel's hello that is malformed or names another
    /// channel count than this destination expects.
    #[error("sent a bad page channel hello: {0}")]
    BadChannel(&'static str),
    /// The connection failed while the listener looked at it.
    #[error("connection failed during the handshake: {0}")]
    Io(io::Error),
}

/// A peer a listener dropped, as its log hook sees it.
#[derive(Debug)]
pub struct PeerRefused {
    /// Where it came from (`HOST:PORT`, or `unix peer` on a UNIX socket).
    pub peer: String,
    /// Why it was dropped.
    pub refusal: Refusal,
}

impl std::fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "dropped peer {}: {}; still waiting for the source",
            self.peer, self.refusal
        )
    }
}

/// A failure of the transport itself.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The listening socket could not be set up.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// `accept(2)` failed.
    #[error("accept failed: {0}")]
    Accept(io::Error),
    /// More page channels asked for than a migration may have
    /// ([`MAX_PAGE_CHANNELS`](ramblock_core::stream::format::MAX_PAGE_CHANNELS)).
    #[error("{count} page channels asked for, at most {max} may be accepted")]
    TooManyChannels {
        /// Channels asked for.
        count: u32,
        /// The most there may be.
        max: u32,
    },
    /// No source resumed (or connected) in time.
    #[error("no source connected with a valid header within {0:?}")]
    Timeout(Duration),
    /// The source could not reach the destination.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// The destination's address.
        addr: String,
        /// Why.
        source: io::Error,
    },
    /// Setting up an accepted or connected socket failed.
    #[error("cannot set up the connection: {0}")]
    Socket(io::Error),
    /// A PEM file could not be read or holds nothing usable.
    #[error("cannot read the {what} from {}: {why}", path.display())]
    Pem {
        /// Certificate chain, private key or CA.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What was wrong.
        why: String,
    },
    /// rustls refused the configuration (a key that does not match the
    /// certificate, a CA that is no certificate, ...).
    #[cfg(feature = "tls")]
    #[error("TLS configuration: {0}")]
    TlsConfig(rustls::Error),
    /// The client-certificate verifier could not be built from the CA.
    #[cfg(feature = "tls")]
    #[error("TLS client verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// The destination's address names no host usable to check its
    /// certificate.
    #[error("{0:?} is no host name or IP address to check the destination's certificate against")]
    ServerName(String),
    /// The TLS handshake with the destination failed.
    #[cfg(feature = "tls")]
    #[error("TLS handshake with {addr} failed: {source}")]
    Handshake {
        /// The destination.
        addr: String,
        /// Why (an I/O error, or rustls's alert).
        source: io::Error,
    },
}
