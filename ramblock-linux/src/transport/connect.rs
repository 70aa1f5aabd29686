//! The source's side: [`Connector`] reaches the destination (retrying
//! while it starts) and, with TLS, authenticates both ways.

use super::conn::Conn;
use super::error::TransportError;
#[cfg(feature = "tls")]
use super::tls::TlsConfig;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// How the source connects (see the [module](super)).
#[derive(Clone, Debug)]
pub struct Connector {
    addr: String,
    retry_for: Duration,
    handshake: Duration,
    write_timeout: Option<Duration>,
    #[cfg(feature = "tls")]
    tls: Option<TlsConfig>,
}

impl Connector {
    /// Connects to `addr` (`HOST:PORT`, or `unix:PATH` for a UNIX stream
    /// socket), retrying for 10 s; a TLS handshake gets 10 s, and a write
    /// the destination takes nothing of for 120 s fails.
    pub fn new(addr: impl Into<String>) -> Connector {
        Connector {
            addr: addr.into(),
            retry_for: Duration::from_secs(10),
            handshake: Duration::from_secs(10),
            write_timeout: Some(Duration::from_secs(120)),
            #[cfg(feature = "tls")]
            tls: None,
        }
    }

    /// How long to retry a refused connection.
    pub fn retry_for(mut self, retry_for: Duration) -> Connector {
        self.retry_for = retry_for;
        self
    }

    /// How long the TLS handshake may take.
    pub fn handshake_timeout(mut self, handshake: Duration) -> Connector {
        self.handshake = handshake;
        self
    }

    /// The write timeout on every connection made (`None`: none): a
    /// destination that stops reading for this long fails the write with
    /// `ErrorKind::TimedOut`, so the migration fails and the source guest
    /// runs on instead of waiting for ever behind a full socket.
    pub fn write_timeout(mut self, timeout: Option<Duration>) -> Connector {
        self.write_timeout = timeout;
        self
    }

    /// Speaks mutual TLS with `tls`; the destination's certificate must
    /// name the host of the address.
    #[cfg(feature = "tls")]
    pub fn with_tls(mut self, tls: TlsConfig) -> Connector {
        self.tls = Some(tls);
        self
    }

    /// The destination's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The host part of the address, as the destination's certificate
    /// must name it.
    pub fn host(&self) -> Result<&str, TransportError> {
        let host = self
            .addr
            .rsplit_once(':')
            .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
            .filter(|h| !h.is_empty());
        host.ok_or_else(|| TransportError::ServerName(self.addr.clone()))
    }

    /// Connects (and authenticates, with TLS), with the write timeout set.
    pub fn connect(&self) -> Result<Conn, TransportError> {
        let conn = self.connect_socket()?;
        conn.set_write_timeout(self.write_timeout)
            .map_err(TransportError::Socket)?;
        Ok(conn)
    }

    fn connect_socket(&self) -> Result<Conn, TransportError> {
        let deadline = Instant::now() + self.retry_for;
        if let Some(path) = self.addr.strip_prefix("unix:") {
            #[cfg(feature = "tls")]
            if self.tls.is_some() {
                return Err(TransportError::Connect {
                    addr: self.addr.clone(),
                    source: std::io::Error::other(
                        "TLS runs over TCP only; a UNIX socket stays on this host, so drop the TLS options",
                    ),
                });
            }
            return loop {
                match std::os::unix::net::UnixStream::connect(path) {
                    Ok(s) => break Ok(Conn::unix(s)),
                    Err(_) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(50))
                    }
                    Err(source) => {
                        break Err(TransportError::Connect {
                            addr: self.addr.clone(),
                            source,
                        })
                    }
                }
            };
        }
        let stream = loop {
            match TcpStream::connect(&self.addr) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(source) => {
                    return Err(TransportError::Connect {
                        addr: self.addr.clone(),
                        source,
                    })
                }
            }
        };
        let _ = stream.set_nodelay(true);
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.tls {
            let host = self.host()?;
            let deadline = Instant::now() + self.handshake;
            let tls = tls.connect(stream, host, &self.addr, deadline)?;
            // The handshake left its deadline as the read timeout.
            tls.tcp()
                .set_read_timeout(None)
                .map_err(TransportError::Socket)?;
            return Ok(Conn::tls(tls));
        }
        Ok(Conn::plain(stream))
    }
}
