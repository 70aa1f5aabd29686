//! The destination's [`Listener`]: accepts connections until one is the
//! source, dropping every other peer with a log line.

use super::admission::{admit, Expect};
use super::conn::Conn;
use super::error::{PeerRefused, Refusal, TransportError};
#[cfg(feature = "tls")]
use super::tls::TlsConfig;
use crate::channels::IncomingChannel;
use ramblock_core::stream::format::{ChannelHello, MAX_PAGE_CHANNELS};
use ramblock_core::stream::resume_token::ResumeToken;
use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long peers get.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// From `accept` to a whole header (TLS handshake included): a peer
    /// that takes longer is dropped.
    pub handshake: Duration,
    /// The read timeout on the admitted connection (`None`: none): a
    /// source that stops sending for this long is a broken connection.
    pub read: Option<Duration>,
    /// The write timeout on the admitted connection (`None`: none): a
    /// source that takes none of this side's bytes (answers, page
    /// requests) for this long is a broken connection, not a wait for
    /// ever.
    pub write: Option<Duration>,
}

impl Default for Timeouts {
    /// 10 s to the header, 120 s between reads, 120 s for a write to
    /// move.
    fn default() -> Self {
        Timeouts {
            handshake: Duration::from_secs(10),
            read: Some(Duration::from_secs(120)),
            write: Some(Duration::from_secs(120)),
        }
    }
}

/// The VMM's log hook for dropped peers.
pub type PeerLog = Arc<dyn Fn(&PeerRefused) + Send + Sync>;

/// What a resumed connection must prove: the token issued when post-copy
/// started, and (over TLS) the source's certificate.
#[derive(Clone, Debug, Default)]
pub struct ResumeProof {
    /// The token the destination issued (`None`: none was, no check).
    pub token: Option<ResumeToken>,
    /// The source's end-entity certificate (DER) on the original
    /// connection (`None`: it was not TLS).
    pub identity: Option<Vec<u8>>,
}

impl ResumeProof {
    /// What a resume of the migration arriving on `original` must show.
    pub fn of(original: &Conn, token: Option<ResumeToken>) -> ResumeProof {
        ResumeProof {
            token,
            identity: original.peer_certificate().map(<[u8]>::to_vec),
        }
    }
}

/// What a [`Listener`] listens on.
#[derive(Debug)]
enum Socket {
    Tcp(TcpListener),
    /// A UNIX stream socket, and its path (removed on drop).
    Unix(UnixListener, std::path::PathBuf),
}

impl Drop for Socket {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// A destination's listening socket (see the [module](super)).
pub struct Listener {
    tcp: Socket,
    timeouts: Timeouts,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
    log: PeerLog,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("tcp", &self.tcp)
            .field("timeouts", &self.timeouts)
            .field("tls", &self.requires_tls())
            .finish_non_exhaustive()
    }
}

/// How often a listener with a deadline looks for a new connection.
const POLL: Duration = Duration::from_millis(10);

impl Listener {
    /// Listens on `addr` (`HOST:PORT`, or `unix:PATH` for a UNIX stream
    /// socket: a socket file left at `PATH` by an earlier run is replaced,
    /// any other file is an error).
    pub fn bind(addr: &str) -> Result<Listener, TransportError> {
        if let Some(path) = addr.strip_prefix("unix:") {
            let stale = std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
            if stale {
                let _ = std::fs::remove_file(path);
            }
            return UnixListener::bind(path)
                .map(|unix| Listener {
                    tcp: Socket::Unix(unix, path.into()),
                    timeouts: Timeouts::default(),
                    #[cfg(feature = "tls")]
                    tls: None,
                    log: Arc::new(|_| {}),
                })
                .map_err(|source| TransportError::Bind {
                    addr: addr.to_string(),
                    source,
                });
        }
        TcpListener::bind(addr)
            .map(Listener::from_tcp)
            .map_err(|source| TransportError::Bind {
                addr: addr.to_string(),
                source,
            })
    }

    /// A listener over a bound socket, with the default [`Timeouts`], no
    /// TLS and a log hook that drops the lines.
    pub fn from_tcp(tcp: TcpListener) -> Listener {
        Listener {
            tcp: Socket::Tcp(tcp),
            timeouts: Timeouts::default(),
            #[cfg(feature = "tls")]
            tls: None,
            log: Arc::new(|_| {}),
        }
    }

    /// Sets the timeouts.
    pub fn with_timeouts(mut self, timeouts: Timeouts) -> Listener {
        self.timeouts = timeouts;
        self
    }

    /// Sets the hook told about every dropped peer.
    pub fn with_log(mut self, log: impl Fn(&PeerRefused) + Send + Sync + 'static) -> Listener {
        self.log = Arc::new(log);
        self
    }

    /// Requires mutual TLS with `tls`: plaintext peers and peers without a
    /// certificate the CA signed are dropped.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: TlsConfig) -> Listener {
        self.tls = Some(tls);
        self
    }

    /// Whether peers must speak TLS.
    pub fn requires_tls(&self) -> bool {
        #[cfg(feature = "tls")]
        return self.tls.is_some();
        #[cfg(not(feature = "tls"))]
        false
    }

    /// The address it listens on (an error for a UNIX socket, which has
    /// a path instead).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.tcp {
            Socket::Tcp(t) => t.local_addr(),
            Socket::Unix(_, path) => Err(io::Error::other(format!(
                "a UNIX socket listener ({}) has no IP address",
                path.display()
            ))),
        }
    }

    /// The timeouts in force.
    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Waits for the source of a new migration (for ever, or at most
    /// `within`): the first peer that sends a valid stream header owns the
    /// migration; every other one is dropped and logged (so is one whose
    /// header announces more than
    /// [`MAX_PAGE_CHANNELS`](ramblock_core::stream::format::MAX_PAGE_CHANNELS)
    /// page channels). The connection says how many page channels its
    /// header announced ([`Conn::page_channels`]), for
    /// [`Listener::accept_page_channels`].
    pub fn accept_migration(&self, within: Option<Duration>) -> Result<Conn, TransportError> {
        let deadline = within.map(|w| Instant::now() + w);
        self.accept_until(&Expect::Migration, deadline, within)
    }

    /// Accepts the `count` page channels of a migration whose main stream
    /// was accepted ([`crate::channels`]), waiting at most `within` in all:
    /// `count` is what the main stream's header announced
    /// ([`Conn::page_channels`]). Each must send a [`ChannelHello`](ramblock_core::stream::format::ChannelHello)
    /// for `count` channels; a peer that does not, or repeats an index
    /// already taken, is dropped and logged like any other. Returns them in
    /// channel order, each with the reader its hello was read from (none at
    /// once for a `count` of 0). More than
    /// [`MAX_PAGE_CHANNELS`](ramblock_core::stream::format::MAX_PAGE_CHANNELS)
    /// is [`TransportError::TooManyChannels`].
    pub fn accept_page_channels(
        &self,
        count: u32,
        within: Duration,
    ) -> Result<Vec<IncomingChannel>, TransportError> {
        if count > MAX_PAGE_CHANNELS {
            return Err(TransportError::TooManyChannels {
                count,
                max: MAX_PAGE_CHANNELS,
            });
        }
        let deadline = Instant::now() + within;
        let mut slots: Vec<Option<IncomingChannel>> = (0..count).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut conn =
                self.accept_until(&Expect::Channel { count }, Some(deadline), Some(left))?;
            let mut reader = conn.reader().map_err(TransportError::Accept)?;
            // The hello was checked on admission and put back.
            let Ok(Ok(hello)) = ChannelHello::read(&mut reader) else {
                continue;
            };
            match slots.get_mut(hello.index as usize) {
                Some(slot @ None) => *slot = Some(IncomingChannel { conn, reader }),
                _ => (self.log)(&PeerRefused {
                    peer: "page channel".to_string(),
                    refusal: Refusal::BadChannel("repeats a channel index already taken"),
                }),
            }
        }
        Ok(slots.into_iter().flatten().collect())
    }

    /// Waits at most `within` for the source of a broken post-copy to
    /// come back with `proof`; every other peer is dropped and logged.
    pub fn accept_resume(
        &self,
        proof: &ResumeProof,
        within: Duration,
    ) -> Result<Conn, TransportError> {
        let expect = Expect::Resume {
            token: proof.token.as_ref(),
            identity: proof.identity.as_deref(),
        };
        self.accept_until(&expect, Some(Instant::now() + within), Some(within))
    }

    fn accept_until(
        &self,
        expect: &Expect<'_>,
        deadline: Option<Instant>,
        within: Option<Duration>,
    ) -> Result<Conn, TransportError> {
        match &self.tcp {
            Socket::Tcp(t) => t.set_nonblocking(deadline.is_some()),
            Socket::Unix(u, _) => u.set_nonblocking(deadline.is_some()),
        }
        .map_err(TransportError::Accept)?;
        loop {
            let accepted = match &self.tcp {
                Socket::Tcp(t) => t
                    .accept()
                    .map(|(s, peer)| (Stream::Tcp(s), peer.to_string())),
                Socket::Unix(u, _) => u
                    .accept()
                    .map(|(s, _)| (Stream::Unix(s), "unix peer".to_string())),
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    match deadline {
                        Some(d) if Instant::now() >= d => {
                            return Err(TransportError::Timeout(within.unwrap_or_default()))
                        }
                        _ => std::thread::sleep(POLL),
                    }
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // A peer that reset before it was accepted, or too many
                // descriptors for a moment: not this listener's end.
                Err(e) if is_transient(&e) => continue,
                Err(e) => return Err(TransportError::Accept(e)),
            };
            let mut handshake = Instant::now() + self.timeouts.handshake;
            if let Some(d) = deadline {
                handshake = handshake.min(d);
            }
            match self.admit(stream, expect, handshake) {
                Ok(conn) => return Ok(conn),
                Err(refusal) => (self.log)(&PeerRefused { peer, refusal }),
            }
        }
    }

    fn admit(
        &self,
        stream: Stream,
        expect: &Expect<'_>,
        deadline: Instant,
    ) -> Result<Conn, Refusal> {
        let stream = match stream {
            Stream::Tcp(s) => s,
            Stream::Unix(s) => {
                if self.requires_tls() {
                    return Err(Refusal::Io(io::Error::other(
                        "TLS runs over TCP only; a UNIX socket listener cannot require it",
                    )));
                }
                s.set_nonblocking(false).map_err(Refusal::Io)?;
                let mut conn = Conn::unix(s);
                admit(&mut conn, expect, deadline, self.timeouts.handshake)?;
                conn.set_timeouts(&self.timeouts).map_err(Refusal::Io)?;
                return Ok(conn);
            }
        };
        stream.set_nonblocking(false).map_err(Refusal::Io)?;
        let _ = stream.set_nodelay(true);
        #[cfg(feature = "tls")]
        let mut conn = match &self.tls {
            Some(tls) => Conn::tls(tls.accept(stream, deadline)?),
            None => Conn::plain(stream),
        };
        #[cfg(not(feature = "tls"))]
        let mut conn = Conn::plain(stream);
        admit(&mut conn, expect, deadline, self.timeouts.handshake)?;
        conn.set_timeouts(&self.timeouts).map_err(Refusal::Io)?;
        Ok(conn)
    }
}

/// An accepted socket.
enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Errors of `accept(2)` that concern one peer, not the listener.
fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ECONNABORTED | libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}
