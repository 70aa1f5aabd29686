//! Mutual TLS 1.3 for the migration transport (feature `tls`).
//!
//! Both sides are configured alike ([`TlsConfig`]): a certificate chain
//! and private key to present, and the CA the peer's certificate must be
//! signed by. The destination requires a client certificate; the source
//! checks the destination's certificate and that it names the host it
//! dialled (a DNS name or an IP address in its subject alternative
//! names). Only TLS 1.3 with AES-GCM suites is offered (AES-NI makes
//! them the fastest suites on x86), and no session tickets are issued: a
//! migration connection is never resumed at the TLS level (a post-copy
//! resume is a new, fully authenticated handshake).

mod stream;

pub use stream::TlsStream;

use super::error::{Refusal, TransportError};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{CipherSuite, ClientConfig, ClientConnection, RootCertStore, ServerConfig};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// One side's TLS credentials and trust: what it presents and whom it
/// believes. Cheap to clone.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

/// rustls's default provider (aws-lc-rs) with only the TLS 1.3 AES-GCM
/// suites, AES-128 first: it takes 10 rounds a block to AES-256's 14, and
/// every page of guest RAM goes through it.
fn aes_gcm_provider() -> CryptoProvider {
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    provider.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            CipherSuite::TLS13_AES_128_GCM_SHA256 | CipherSuite::TLS13_AES_256_GCM_SHA384
        )
    });
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    provider
}

fn pem_error(what: &'static str, path: &Path, why: impl ToString) -> TransportError {
    TransportError::Pem {
        what,
        path: path.to_path_buf(),
        why: why.to_string(),
    }
}

/// Every certificate in a PEM file; at least one.
fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TransportError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(what, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(what, path, e))?;
    if certs.is_empty() {
        return Err(pem_error(what, path, "no CERTIFICATE block in the file"));
    }
    Ok(certs)
}

impl TlsConfig {
    /// Reads the certificate chain (leaf first), its private key and the
    /// CA certificate(s) from PEM files.
    pub fn from_pem_files(cert: &Path, key: &Path, ca: &Path) -> Result<TlsConfig, TransportError> {
        let chain = certificates("certificate chain", cert)?;
        let key =
            PrivateKeyDer::from_pem_file(key).map_err(|e| pem_error("private key", key, e))?;
        let ca = certificates("CA certificate", ca)?;
        TlsConfig::new(chain, key, ca)
    }

    /// The same from DER: `chain` leaf first, `key` its private key, `ca`
    /// the certificates a peer's chain must lead to.
    pub fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        ca: Vec<CertificateDer<'static>>,
    ) -> Result<TlsConfig, TransportError> {
        let provider = Arc::new(aes_gcm_provider());
        let mut roots = RootCertStore::empty();
        for c in ca {
            roots.add(c).map_err(TransportError::TlsConfig)?;
        }
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(TransportError::Verifier)?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::TlsConfig)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(TransportError::TlsConfig)?;
        // A resumed TLS session would skip the client certificate: never.
        server.send_tls13_tickets = 0;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TransportError::TlsConfig)?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(TransportError::TlsConfig)?;
        client.resumption = rustls::client::Resumption::disabled();
        Ok(TlsConfig {
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The destination's handshake on an accepted socket, within
    /// `deadline`: a plaintext peer, a peer without a certificate or with
    /// one the CA did not sign is refused.
    pub(crate) fn accept(
        &self,
        socket: TcpStream,
        deadline: Instant,
    ) -> Result<TlsStream, Refusal> {
        let conn = rustls::ServerConnection::new(self.server.clone()).map_err(Refusal::Tls)?;
        stream::handshake(socket, conn.into(), deadline, true).map_err(|e| match e {
            stream::HandshakeError::Refused(r) => r,
            stream::HandshakeError::Io(e) => Refusal::Io(e),
        })
    }

    /// The source's handshake with the destination at `host` (the name
    /// its certificate must carry), within `deadline`.
    pub(crate) fn connect(
        &self,
        socket: TcpStream,
        host: &str,
        addr: &str,
        deadline: Instant,
    ) -> Result<TlsStream, TransportError> {
        let name = ServerName::try_from(host.to_string())
            .map_err(|_| TransportError::ServerName(host.to_string()))?;
        let handshake_error = |source: std::io::Error| TransportError::Handshake {
            addr: addr.to_string(),
            source,
        };
        let conn = ClientConnection::new(self.client.clone(), name)
            .map_err(|e| handshake_error(std::io::Error::other(e)))?;
        stream::handshake(socket, conn.into(), deadline, false).map_err(|e| {
            handshake_error(match e {
                stream::HandshakeError::Refused(r) => std::io::Error::other(r.to_string()),
                stream::HandshakeError::Io(e) => e,
            })
        })
    }
}
