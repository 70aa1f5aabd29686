//! [`Conn`]: one admitted migration connection, plain TCP, a UNIX stream
//! socket (two processes on one host) or TLS, with
//! the engine's byte traits on top ([`ConnReader`], [`ConnWriter`]).
//!
//! The listener reads a peer's first bytes to decide whether it is the
//! source; those bytes are kept in the connection (its prefix) and read
//! again first, so the receiver sees the stream from its first byte.

use crate::fd_stream::{FdReader, FdWriter};
use crate::zero_copy::{ZeroCopyError, ZeroCopyStats, ZeroCopyWriter};
use ramblock_core::region::HostRegion;
#[cfg(feature = "tls")]
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::io::{ByteRead, ByteWrite, ReadError};
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

#[cfg(feature = "tls")]
use super::tls::TlsStream;

/// What a connection runs over.
#[derive(Debug)]
enum Kind {
    Plain(TcpStream),
    Unix(UnixStream),
    #[cfg(feature = "tls")]
    Tls(TlsStream),
}

/// An admitted connection. Clones (`try_clone`) share the socket (and the
/// TLS session): one reader and one writer may use it from two threads.
#[derive(Debug)]
pub struct Conn {
    kind: Kind,
    /// Bytes read while admitting the peer, to be read again first.
    prefix: Vec<u8>,
    /// Page channels the stream header announced (0 unless admitted as a
    /// new migration's main stream).
    page_channels: u32,
}

impl Conn {
    /// A plain TCP connection.
    pub fn plain(stream: TcpStream) -> Conn {
        Conn {
            kind: Kind::Plain(stream),
            prefix: Vec::new(),
            page_channels: 0,
        }
    }

    /// A connection over a UNIX stream socket (two processes on one host).
    pub fn unix(stream: UnixStream) -> Conn {
        Conn {
            kind: Kind::Unix(stream),
            prefix: Vec::new(),
            page_channels: 0,
        }
    }

    #[cfg(feature = "tls")]
    pub(crate) fn tls(stream: TlsStream) -> Conn {
        Conn {
            kind: Kind::Tls(stream),
            prefix: Vec::new(),
            page_channels: 0,
        }
    }

    /// Puts bytes already read back in front of the stream.
    pub(crate) fn unread(&mut self, bytes: &[u8]) {
        self.prefix.splice(0..0, bytes.iter().copied());
    }

    /// How many page channels the source announced in its stream header,
    /// which the listener read when it admitted this connection
    /// ([`Listener::accept_migration`](super::Listener::accept_migration)):
    /// accept exactly that many
    /// ([`Listener::accept_page_channels`](super::Listener::accept_page_channels))
    /// and receive them beside this stream ([`crate::channels`]). At most
    /// [`MAX_PAGE_CHANNELS`](ramblock_core::stream::format::MAX_PAGE_CHANNELS)
    /// (the listener drops a source that announces more); 0 for a source
    /// without channels, and for any connection not admitted as a new
    /// migration's main stream.
    pub fn page_channels(&self) -> u32 {
        self.page_channels
    }

    /// Notes the page channels the admitted header announced.
    pub(crate) fn set_page_channels(&mut self, count: u32) {
        self.page_channels = count;
    }

    /// Another handle on the same connection (without the prefix, which
    /// stays with this one).
    pub fn try_clone(&self) -> io::Result<Conn> {
        let kind = match &self.kind {
            Kind::Plain(s) => Kind::Plain(s.try_clone()?),
            Kind::Unix(s) => Kind::Unix(s.try_clone()?),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => Kind::Tls(s.try_clone()),
        };
        Ok(Conn {
            kind,
            prefix: Vec::new(),
            page_channels: 0,
        })
    }

    /// The TCP socket underneath (`None` over a UNIX socket).
    pub fn tcp(&self) -> Option<&TcpStream> {
        match &self.kind {
            Kind::Plain(s) => Some(s),
            Kind::Unix(_) => None,
            #[cfg(feature = "tls")]
            Kind::Tls(s) => Some(s.tcp()),
        }
    }

    /// The socket underneath, TCP or UNIX, for socket options (buffer
    /// sizes).
    pub fn socket(&self) -> BorrowedFd<'_> {
        match &self.kind {
            Kind::Plain(s) => s.as_fd(),
            Kind::Unix(s) => s.as_fd(),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => s.tcp().as_fd(),
        }
    }

    /// Bytes written on the connection that the peer has not taken yet:
    /// the socket's send queue (`SIOCOUTQ`: on TCP not yet acknowledged, on
    /// a UNIX socket not yet read; over TLS the encrypted bytes, so a little
    /// more than the plaintext); 0 if the kernel cannot say.
    pub fn unsent_bytes(&self) -> u64 {
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one c_int, to a live local,
        // about a descriptor this connection keeps open.
        let r = unsafe { libc::ioctl(self.socket().as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        if r == 0 {
            queued.max(0) as u64
        } else {
            0
        }
    }

    /// Turns Nagle's delay off on TCP (a UNIX socket has none).
    pub fn set_nodelay(&self) -> io::Result<()> {
        self.tcp().map_or(Ok(()), |t| t.set_nodelay(true))
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        !matches!(self.kind, Kind::Plain(_) | Kind::Unix(_))
    }

    /// The peer's end-entity certificate (DER) on a TLS connection: the
    /// identity a resume must present again.
    pub fn peer_certificate(&self) -> Option<&[u8]> {
        match &self.kind {
            Kind::Plain(_) | Kind::Unix(_) => None,
            #[cfg(feature = "tls")]
            Kind::Tls(s) => s.peer_certificate(),
        }
    }

    /// On a TLS connection, the protocol version and cipher suite in use.
    #[cfg(feature = "tls")]
    pub fn tls_negotiated(&self) -> Option<(rustls::ProtocolVersion, rustls::CipherSuite)> {
        match &self.kind {
            Kind::Plain(_) | Kind::Unix(_) => None,
            Kind::Tls(s) => s.negotiated(),
        }
    }

    /// Shuts both directions down (every clone sees it).
    pub fn shutdown(&self) {
        let _ = match &self.kind {
            Kind::Unix(s) => s.shutdown(Shutdown::Both),
            _ => self.tcp().map_or(Ok(()), |t| t.shutdown(Shutdown::Both)),
        };
    }

    /// Sets the socket's read timeout (every clone shares it).
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.kind {
            Kind::Unix(s) => s.set_read_timeout(timeout),
            _ => self.tcp().map_or(Ok(()), |t| t.set_read_timeout(timeout)),
        }
    }

    /// Sets the socket's write timeout (every clone shares it): a write
    /// that could send nothing for this long fails with
    /// `ErrorKind::TimedOut` (a peer that stopped reading).
    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match &self.kind {
            Kind::Unix(s) => s.set_write_timeout(timeout),
            _ => self.tcp().map_or(Ok(()), |t| t.set_write_timeout(timeout)),
        }
    }

    /// Sets both timeouts from `timeouts` (an admitted connection's).
    pub(crate) fn set_timeouts(&self, timeouts: &super::Timeouts) -> io::Result<()> {
        self.set_read_timeout(timeouts.read)?;
        self.set_write_timeout(timeouts.write)
    }

    /// A reader of the stream for the receiver: pages are read straight
    /// into guest memory where the transport allows (plain TCP), and this
    /// connection's prefix is read first.
    pub fn reader(&mut self) -> io::Result<ConnReader> {
        let prefix = std::mem::take(&mut self.prefix);
        let inner = match &self.kind {
            Kind::Plain(s) => Inner::Plain(FdReader::new(s.try_clone()?)),
            Kind::Unix(s) => Inner::Unix(FdReader::new(s.try_clone()?)),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => Inner::Tls(IoStream(s.try_clone())),
        };
        Ok(ConnReader { prefix, inner })
    }

    /// A writer of the stream for the engine: on plain TCP, page runs go
    /// to the kernel straight from guest memory (`writev`); over TLS each
    /// run is copied out once and encrypted.
    pub fn writer(&self) -> io::Result<ConnWriter> {
        Ok(match &self.kind {
            Kind::Plain(s) => ConnWriter::Plain(FdWriter::new(s.try_clone()?)),
            Kind::Unix(s) => ConnWriter::Unix(FdWriter::new(s.try_clone()?)),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => ConnWriter::Tls(s.try_clone(), Vec::new()),
        })
    }

    /// A writer that sends page runs with `MSG_ZEROCOPY` (see
    /// [`crate::zero_copy`]): plain TCP only. Over a UNIX socket or TLS,
    /// [`ZeroCopyError::Unsupported`]; the caller asked for zero-copy, so
    /// it is told rather than given a copying writer.
    pub fn zero_copy_writer(&self) -> Result<ConnWriter, ZeroCopyError> {
        match &self.kind {
            Kind::Plain(s) => Ok(ConnWriter::ZeroCopy(ZeroCopyWriter::new(s.try_clone()?)?)),
            // What the kernel answers SO_ZEROCOPY on an AF_UNIX socket (the
            // zero_copy tests check it).
            Kind::Unix(_) => Err(ZeroCopyError::Unsupported(io::Error::from_raw_os_error(
                libc::EOPNOTSUPP,
            ))),
            #[cfg(feature = "tls")]
            Kind::Tls(_) => Err(ZeroCopyError::Unsupported(io::Error::new(
                io::ErrorKind::Unsupported,
                "TLS encrypts every page from a copy",
            ))),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.len());
            buf[..n].copy_from_slice(&self.prefix[..n]);
            self.prefix.drain(..n);
            return Ok(n);
        }
        let read = match &mut self.kind {
            Kind::Plain(s) => s.read(buf),
            Kind::Unix(s) => s.read(buf),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => s.read(buf),
        };
        read.map_err(crate::fd_stream::silent)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = match &mut self.kind {
            Kind::Plain(s) => s.write(buf),
            Kind::Unix(s) => s.write(buf),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => s.write(buf),
        };
        written.map_err(crate::fd_stream::stalled)
    }
    fn flush(&mut self) -> io::Result<()> {
        match &mut self.kind {
            Kind::Plain(s) => s.flush(),
            Kind::Unix(s) => s.flush(),
            #[cfg(feature = "tls")]
            Kind::Tls(s) => s.flush(),
        }
    }
}

#[derive(Debug)]
enum Inner {
    Plain(FdReader<TcpStream>),
    Unix(FdReader<UnixStream>),
    #[cfg(feature = "tls")]
    Tls(IoStream<TlsStream>),
}

/// The receiver's side of a [`Conn`] (the core's `ByteRead`).
#[derive(Debug)]
pub struct ConnReader {
    prefix: Vec<u8>,
    inner: Inner,
}

impl ByteRead for ConnReader {
    type Error = io::Error;

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<io::Error>> {
        let n = self.prefix.len().min(buf.len());
        buf[..n].copy_from_slice(&self.prefix[..n]);
        self.prefix.drain(..n);
        let rest = &mut buf[n..];
        if rest.is_empty() {
            return Ok(());
        }
        match &mut self.inner {
            Inner::Plain(r) => r.read_exact(rest),
            Inner::Unix(r) => r.read_exact(rest),
            #[cfg(feature = "tls")]
            Inner::Tls(r) => r.read_exact(rest),
        }
    }

    fn read_ready_into(&mut self, region: &HostRegion<'_>) -> Result<bool, ReadError<io::Error>> {
        // Bytes of the prefix come first: stage them with the rest.
        if !self.prefix.is_empty() {
            return Ok(false);
        }
        match &mut self.inner {
            Inner::Plain(r) => r.read_ready_into(region),
            Inner::Unix(r) => r.read_ready_into(region),
            #[cfg(feature = "tls")]
            Inner::Tls(_) => Ok(false),
        }
    }
}

/// The engine's side of a [`Conn`] (the core's `ByteWrite`).
#[derive(Debug)]
pub enum ConnWriter {
    /// Plain TCP: headers queued, page runs written from guest memory.
    Plain(FdWriter<TcpStream>),
    /// A UNIX stream socket, likewise.
    Unix(FdWriter<UnixStream>),
    /// TLS, with the buffer a page run is copied into for encryption.
    #[cfg(feature = "tls")]
    Tls(TlsStream, Vec<u8>),
    /// Plain TCP with `MSG_ZEROCOPY` page runs ([`Conn::zero_copy_writer`]).
    ZeroCopy(ZeroCopyWriter<TcpStream>),
}

impl ConnWriter {
    /// With a zero-copy writer: what it sent how, and whether the kernel
    /// copied after all.
    pub fn zero_copy_stats(&self) -> Option<ZeroCopyStats> {
        match self {
            ConnWriter::ZeroCopy(w) => Some(w.stats()),
            _ => None,
        }
    }

    /// With a zero-copy writer: switches zero-copy sends on or off
    /// ([`ZeroCopyWriter::set_zero_copy`]); other writers ignore it.
    pub fn set_zero_copy(&mut self, on: bool) {
        if let ConnWriter::ZeroCopy(w) = self {
            w.set_zero_copy(on);
        }
    }
}

impl ByteWrite for ConnWriter {
    type Error = io::Error;

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            ConnWriter::Plain(w) => w.write_all(buf),
            ConnWriter::Unix(w) => w.write_all(buf),
            #[cfg(feature = "tls")]
            ConnWriter::Tls(s, _) => s.send(buf),
            ConnWriter::ZeroCopy(w) => Ok(w.write_all(buf)?),
        }
    }

    fn write_region(&mut self, region: &HostRegion<'_>) -> io::Result<()> {
        match self {
            ConnWriter::Plain(w) => w.write_region(region),
            ConnWriter::Unix(w) => w.write_region(region),
            #[cfg(feature = "tls")]
            ConnWriter::Tls(s, stage) => {
                // Guest memory is never borrowed as a slice (the guest may
                // write it meanwhile), so it is copied out once; rustls
                // encrypts from this copy.
                stage.resize(region.len(), 0);
                region
                    .read(ramblock_core::addr::ByteLen::ZERO, stage)
                    .map_err(|e| io::Error::other(e.to_string()))?;
                s.send(stage)
            }
            ConnWriter::ZeroCopy(w) => Ok(w.write_region(region)?),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConnWriter::Plain(w) => ByteWrite::flush(w),
            ConnWriter::Unix(w) => ByteWrite::flush(w),
            #[cfg(feature = "tls")]
            ConnWriter::Tls(..) => Ok(()),
            ConnWriter::ZeroCopy(w) => Ok(ByteWrite::flush(w)?),
        }
    }
}
