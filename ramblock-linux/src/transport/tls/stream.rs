//! [`TlsStream`]: a rustls session over a TCP socket, shared by a reading
//! and a writing thread.
//!
//! The destination reads the stream while its fault thread writes page
//! requests; the source writes pages while a thread reads the return
//! path. One rustls session carries both directions, so it sits behind a
//! lock, but no thread holds that lock while it waits on the socket: a
//! reader takes ciphertext off the socket first and then decrypts under
//! the lock, and a writer encrypts under the lock into its own buffer and
//! sends it after. Readers are serialised among themselves, and so are
//! writers, which keeps the records of each direction in order.

use super::super::error::Refusal;
use rustls::Connection;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

/// Ciphertext read from the socket at a time (four full TLS records).
const RAW_CHUNK: usize = 4 * (16 << 10) + 4 * 256;

/// The TLS record type of a handshake message (a ClientHello starts so).
const HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug)]
struct Session {
    conn: Connection,
    /// Ciphertext read but not taken by rustls yet (its plaintext buffer
    /// was full).
    pending: Vec<u8>,
    /// The peer closed the TCP connection.
    eof: bool,
}

#[derive(Debug)]
struct Shared {
    socket: TcpStream,
    session: Mutex<Session>,
    /// Held by the reading thread while it waits on the socket.
    read: Mutex<Vec<u8>>,
    /// Held by a writer while its records go out; holds them.
    write: Mutex<Vec<u8>>,
    peer: Option<Vec<u8>>,
    /// The protocol version and cipher suite negotiated.
    negotiated: Option<(rustls::ProtocolVersion, rustls::CipherSuite)>,
}

/// A TLS connection after its handshake, shared by a reading and a
/// writing thread: one rustls session behind a lock that no thread holds
/// while it waits on the socket (a reader takes ciphertext off the socket
/// first and decrypts under the lock; a writer encrypts under the lock
/// into its own buffer and sends it after). Clones share the session.
#[derive(Debug)]
pub struct TlsStream {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing a panicking holder leaves half done can break the session
    // more than rustls itself reports on the next call.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn invalid(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

impl Session {
    /// Hands pending ciphertext to rustls as far as it takes it.
    fn feed(&mut self) -> io::Result<()> {
        let mut rest = &self.pending[..];
        while !rest.is_empty() {
            match self.conn.read_tls(&mut rest) {
                Ok(0) | Err(_) => break, // plaintext buffer full: read it first
                Ok(_) => {}
            }
            self.conn.process_new_packets().map_err(invalid)?;
        }
        let used = self.pending.len() - rest.len();
        self.pending.drain(..used);
        Ok(())
    }
}

impl TlsStream {
    /// Another handle on the same session.
    pub fn try_clone(&self) -> TlsStream {
        TlsStream {
            shared: self.shared.clone(),
        }
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        &self.shared.socket
    }

    /// The peer's end-entity certificate (DER).
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        self.shared.peer.as_deref()
    }

    /// The protocol version and cipher suite the handshake settled on.
    pub fn negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        self.shared.negotiated
    }

    /// Encrypts `buf` and sends it.
    pub fn send(&self, buf: &[u8]) -> io::Result<()> {
        let mut out = lock(&self.shared.write);
        {
            let mut s = lock(&self.shared.session);
            s.conn.writer().write_all(buf)?;
            while s.conn.wants_write() {
                s.conn.write_tls(&mut *out)?;
            }
        }
        let sent = (&self.shared.socket)
            .write_all(&out)
            .map_err(crate::fd_stream::stalled);
        out.clear();
        sent
    }
}

impl Read for TlsStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut raw = lock(&self.shared.read);
        raw.resize(RAW_CHUNK, 0);
        loop {
            {
                let mut s = lock(&self.shared.session);
                match s.conn.reader().read(buf) {
                    Ok(n) => return Ok(n),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
                if s.eof {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                if !s.pending.is_empty() {
                    let before = s.pending.len();
                    s.feed()?;
                    if s.pending.len() < before {
                        continue;
                    }
                }
            }
            // Wait for ciphertext without the session lock, so the other
            // direction goes on meanwhile.
            let n = (&self.shared.socket)
                .read(&mut raw)
                .map_err(crate::fd_stream::silent)?;
            let mut s = lock(&self.shared.session);
            if n == 0 {
                s.eof = true;
                // Tells rustls the peer is gone (close_notify or not).
                let _ = s.conn.read_tls(&mut io::empty());
                s.conn.process_new_packets().map_err(invalid)?;
                continue;
            }
            if s.pending.is_empty() {
                // The usual case: rustls takes the bytes straight from the
                // read buffer; only what it cannot take yet is kept.
                let mut rest = &raw[..n];
                while !rest.is_empty() {
                    match s.conn.read_tls(&mut rest) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    s.conn.process_new_packets().map_err(invalid)?;
                }
                s.pending.extend_from_slice(rest);
            } else {
                s.pending.extend_from_slice(&raw[..n]);
                s.feed()?;
            }
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send(buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Why a handshake failed.
#[derive(Debug)]
pub(crate) enum HandshakeError {
    /// The peer is refused (the destination's view).
    Refused(Refusal),
    /// The socket failed.
    Io(io::Error),
}

impl From<io::Error> for HandshakeError {
    fn from(e: io::Error) -> Self {
        HandshakeError::Io(e)
    }
}

/// What rustls's verdict on the peer means for the listener.
fn refusal(e: rustls::Error) -> Refusal {
    match e {
        rustls::Error::NoCertificatesPresented => Refusal::NoCertificate,
        rustls::Error::InvalidCertificate(c) => Refusal::UntrustedCertificate(c),
        e => Refusal::Tls(e),
    }
}

/// Runs the handshake of `conn` over `socket` until `deadline`. `server`:
/// the first byte must open a TLS handshake record, or the peer spoke
/// plaintext.
pub(crate) fn handshake(
    socket: TcpStream,
    mut conn: Connection,
    deadline: Instant,
    server: bool,
) -> Result<TlsStream, HandshakeError> {
    let timeout = deadline.saturating_duration_since(Instant::now());
    let mut raw = vec![0u8; RAW_CHUNK];
    let mut seen = 0usize;
    let mut pending = Vec::new();
    while conn.is_handshaking() {
        while conn.wants_write() {
            conn.write_tls(&mut &socket)?;
        }
        if !conn.is_handshaking() {
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Refused(Refusal::TlsSilent(timeout)));
        }
        socket.set_read_timeout(Some(left))?;
        let n = match (&socket).read(&mut raw) {
            Ok(0) if seen == 0 => return Err(HandshakeError::Refused(Refusal::ClosedAtOnce)),
            Ok(0) => return Err(HandshakeError::Refused(Refusal::ClosedInHandshake)),
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(HandshakeError::Refused(Refusal::TlsSilent(timeout)))
            }
            Err(e) => return Err(e.into()),
        };
        if server && seen == 0 && raw[0] != HANDSHAKE_RECORD {
            return Err(HandshakeError::Refused(Refusal::Plaintext {
                first: raw[0],
            }));
        }
        seen += n;
        let mut rest = &raw[..n];
        while !rest.is_empty() {
            if conn.read_tls(&mut rest).is_err() {
                // rustls's plaintext buffer is full of early application
                // data: the stream reads the rest.
                pending.extend_from_slice(rest);
                break;
            }
            if let Err(e) = conn.process_new_packets() {
                // Tell the peer why (an alert), then drop it.
                let _ = conn.write_tls(&mut &socket);
                return Err(HandshakeError::Refused(refusal(e)));
            }
        }
    }
    while conn.wants_write() {
        conn.write_tls(&mut &socket)?;
    }
    // Pages are encrypted as they come: no cap on what waits to be sent.
    conn.set_buffer_limit(None);
    let peer = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec());
    let negotiated = conn
        .protocol_version()
        .zip(conn.negotiated_cipher_suite().map(|s| s.suite()));
    Ok(TlsStream {
        shared: Arc::new(Shared {
            socket,
            session: Mutex::new(Session {
                conn,
                pending,
                eof: false,
            }),
            read: Mutex::new(Vec::new()),
            write: Mutex::new(Vec::new()),
            peer,
            negotiated,
        }),
    })
}
