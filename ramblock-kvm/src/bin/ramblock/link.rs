//! The source's connection to the destination, as post-copy needs it: a
//! writer the engine keeps while the connection under it can be replaced
//! (resume), the destination's resume token, a thread reading page
//! requests off the return path, and, for tests, seeded connection breaks.
//! Connecting, TLS and the token's wire format are the library's
//! (`ramblock_linux::transport`).

use ramblock_core::migrate::ReturnEvent;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::format::ReturnMessage;
use ramblock_core::stream::io::{ByteWrite, IoStream};
use ramblock_core::stream::resume_token::ResumeToken;
use ramblock_linux::transport::{read_first_return, Conn, ConnWriter, Connector, FirstReturn};
use ramblock_linux::zero_copy::ZeroCopyStats;
use std::cell::RefCell;
use std::collections::HashSet;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::rc::Rc;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The kernel's send buffer during post-copy: pages already sent wait in
/// it, and a vCPU faulting on one of them waits with them, so it is kept
/// to what loopback drains in well under a millisecond.
pub const POSTCOPY_SOCKET_BUFFER: usize = 256 << 10;

/// How long a resuming side keeps trying to reconnect.
pub const RESUME_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the source waits, after the switch to post-copy, for the
/// destination's resume token (the first thing it sends back).
const TOKEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Return-path events waiting for the engine at most. The reader stops
/// reading the socket while the queue is full, so a destination that
/// floods requests fills the kernel's socket buffers, not this process;
/// the engine takes a batch of requests between background chunks, so
/// this only has to cover a burst of faults.
pub const REQUEST_QUEUE: usize = 256;

/// A page request as a key: block, first page, count.
type RequestKey = (u32, u64, u32);

/// The requests in the queue, so the reader can drop one equal to a
/// request already waiting (a vCPU that faults again, or a flood of the
/// same request, costs nothing). At most [`REQUEST_QUEUE`] + 1 entries.
#[derive(Clone, Default)]
struct Queued(Arc<Mutex<HashSet<RequestKey>>>);

impl Queued {
    fn lock(&self) -> MutexGuard<'_, HashSet<RequestKey>> {
        // The set holds no invariant a panicking holder could break.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(event: &ReturnEvent) -> Option<RequestKey> {
        match event {
            ReturnEvent::Message(ReturnMessage::Request(r)) => Some((r.block, r.first, r.count)),
            _ => None,
        }
    }
}

/// The engine's end of the return-path queue.
struct Events {
    rx: Receiver<ReturnEvent>,
    queued: Queued,
}

/// The connection in use, shared by the engine's writer and the host.
struct Current {
    stream: Conn,
    /// Sends page runs (straight from guest memory on plain TCP).
    writer: ConnWriter,
    /// Bytes written since post-copy started on this connection.
    postcopy_bytes: u64,
    /// Break the connection when `postcopy_bytes` passes this.
    break_at: Option<u64>,
    postcopy: bool,
}

impl Current {
    /// Post-copy runs on this connection: small send buffer, byte count
    /// for the next test break.
    fn enter_postcopy(&mut self, breaks: Option<&mut Breaks>) {
        set_send_buffer(self.stream.socket(), POSTCOPY_SOCKET_BUFFER);
        // The engine flushes after each urgent page, and a zero-copy flush
        // waits for the peer's acknowledgement: pages go by copy from now.
        self.writer.set_zero_copy(false);
        self.postcopy = true;
        self.break_at = breaks.and_then(Breaks::next);
    }
}

/// The engine's output: writes to whatever connection is current.
pub struct LinkWriter(Rc<RefCell<Current>>);

impl LinkWriter {
    /// Counts `bytes` about to be written in post-copy and breaks the
    /// connection when a test's break point is passed.
    fn account(c: &mut Current, bytes: usize) {
        if c.postcopy {
            c.postcopy_bytes += bytes as u64;
            if c.break_at.is_some_and(|at| c.postcopy_bytes >= at) {
                // A test's injected break: both directions go down, as
                // when a cable is pulled.
                c.stream.shutdown();
            }
        }
    }
}

impl ByteWrite for LinkWriter {
    type Error = std::io::Error;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), std::io::Error> {
        let mut c = self.0.borrow_mut();
        Self::account(&mut c, buf.len());
        c.writer.write_all(buf)
    }
    fn write_region(&mut self, region: &HostRegion<'_>) -> Result<(), std::io::Error> {
        let mut c = self.0.borrow_mut();
        Self::account(&mut c, region.len());
        c.writer.write_region(region)
    }
    fn flush(&mut self) -> Result<(), std::io::Error> {
        ByteWrite::flush(&mut self.0.borrow_mut().writer)
    }
}

/// Seeded break points for `--break-postcopy`.
pub struct Breaks {
    state: u64,
    left: u32,
}

impl Breaks {
    /// Up to three breaks from `seed`.
    pub fn new(seed: u64) -> Breaks {
        Breaks {
            state: seed ^ 0x9E37_79B9_7F4A_7C15,
            left: 3,
        }
    }

    /// Bytes into the next post-copy connection at which to break it, if
    /// any break is left: between 64 KiB and 32 MiB.
    fn next(&mut self) -> Option<u64> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        Some((64 << 10) + self.state % (32 << 20))
    }
}

/// The host's side of the connection.
pub struct Link {
    connector: Connector,
    current: Rc<RefCell<Current>>,
    events: Option<Events>,
    /// When the engine started waiting for the acknowledgement on this
    /// connection (it is the only caller that waits).
    ack_since: Option<Instant>,
    breaks: Option<Breaks>,
    resume: bool,
    /// How long the destination may send nothing on the return path
    /// before the connection counts as dead (`--peer-timeout-ms`).
    peer_timeout: Duration,
    /// The destination's resume token, once post-copy started.
    token: Option<ResumeToken>,
}

impl Link {
    /// Wraps a connection made by `connector`. `resume`: reconnect after
    /// a post-copy break. `zero_copy`: send pages with `MSG_ZEROCOPY`
    /// (plain TCP only; post-copy and a resumed connection send by copy).
    /// `peer_timeout`: the read timeout on the return path (the connector
    /// sets the write timeout).
    pub fn new(
        stream: Conn,
        connector: Connector,
        resume: bool,
        breaks: Option<Breaks>,
        zero_copy: bool,
        peer_timeout: Duration,
    ) -> Result<(Link, LinkWriter), String> {
        let current = Rc::new(RefCell::new(current(stream, zero_copy, peer_timeout)?));
        let writer = LinkWriter(current.clone());
        Ok((
            Link {
                connector,
                current,
                events: None,
                ack_since: None,
                breaks,
                resume,
                peer_timeout,
                token: None,
            },
            writer,
        ))
    }

    /// A reader for the pre-copy acknowledgement (the same connection).
    pub fn ack_reader(&self) -> Result<IoStream<Conn>, String> {
        let s = self.current.borrow().stream.try_clone();
        s.map(IoStream)
            .map_err(|e| format!("cannot clone the connection: {e}"))
    }

    /// Bytes written on the connection that the peer has not taken yet:
    /// the socket's send queue (`SIOCOUTQ`; 0 if the kernel cannot say).
    pub fn unsent_bytes(&self) -> u64 {
        self.current.borrow().stream.unsent_bytes()
    }

    /// Bounds the next reads of the acknowledgement (the handover wait).
    pub fn set_ack_timeout(&self, wait: Duration) {
        let _ = self.current.borrow().stream.set_read_timeout(Some(wait));
    }

    /// Post-copy started: take the destination's resume token (the first
    /// message back, before any page request; waiting here for it means a
    /// break can never come before the source holds it), then read the
    /// return path on a thread, and arm the next test break.
    pub fn postcopy_started(&mut self) {
        let stream = self.current.borrow().stream.try_clone();
        let Ok(mut stream) = stream else {
            return;
        };
        let mut first = None;
        let _ = stream.set_read_timeout(Some(TOKEN_TIMEOUT));
        match read_first_return(&mut IoStream(&mut stream)) {
            Ok(FirstReturn::Token(t)) => self.token = Some(t),
            // A destination that issues no token: the message is the
            // first event.
            Ok(FirstReturn::Message(m)) => first = Some(ReturnEvent::Message(m)),
            Ok(FirstReturn::Unknown(_)) | Err(_) => first = Some(ReturnEvent::Closed),
        }
        self.current
            .borrow_mut()
            .enter_postcopy(self.breaks.as_mut());
        self.events = Some(match first {
            Some(ReturnEvent::Closed) => closed_events(),
            _ => spawn_reader(stream, first),
        });
    }

    /// Whether post-copy began: the guest may have run on the destination
    /// since, so this side must never resume it.
    pub fn postcopy_began(&self) -> bool {
        self.current.borrow().postcopy
    }

    /// With `--zero-copy`: what the current connection's writer sent how.
    pub fn zero_copy_stats(&self) -> Option<ZeroCopyStats> {
        self.current.borrow().writer.zero_copy_stats()
    }

    /// The destination's resume token (post-copy).
    pub fn token(&self) -> Option<ResumeToken> {
        self.token
    }

    /// The next return-path event, waiting up to `wait`.
    pub fn next_event(&mut self, wait: Duration) -> ReturnEvent {
        if !wait.is_zero() {
            // Waiting for the acknowledgement: a destination that keeps
            // sending requests instead is never silent, so the read timeout
            // never fires; the wait as a whole is bounded the same.
            let since = *self.ack_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.peer_timeout {
                eprintln!(
                    "post-copy: no acknowledgement within {:?}",
                    self.peer_timeout
                );
                return ReturnEvent::Closed;
            }
        }
        let Some(Events { rx, queued }) = &self.events else {
            return ReturnEvent::Closed;
        };
        let got = if wait.is_zero() {
            rx.try_recv().map_err(|e| e == TryRecvError::Disconnected)
        } else {
            rx.recv_timeout(wait)
                .map_err(|e| e == RecvTimeoutError::Disconnected)
        };
        match got {
            Ok(event) => {
                if let Some(key) = Queued::key(&event) {
                    queued.lock().remove(&key);
                }
                event
            }
            Err(false) => ReturnEvent::Nothing,
            Err(true) => ReturnEvent::Closed,
        }
    }

    /// Connects again after a break (when resuming is on), retrying for
    /// [`RESUME_TIMEOUT`].
    pub fn reconnect(&mut self) -> bool {
        self.events = None;
        self.ack_since = None;
        if !self.resume {
            return false;
        }
        self.current.borrow().stream.shutdown();
        let deadline = Instant::now() + RESUME_TIMEOUT;
        let stream = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.connector.clone().retry_for(left).connect() {
                Ok(s) => break s,
                // A TLS handshake that failed (say, the destination was
                // busy with another peer past its timeout): try again.
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => {
                    eprintln!("post-copy: cannot reconnect: {e}");
                    return false;
                }
            }
        };
        match current(stream, false, self.peer_timeout) {
            Ok(mut c) => {
                c.enter_postcopy(self.breaks.as_mut());
                *self.current.borrow_mut() = c;
                eprintln!(
                    "post-copy: connection broke; reconnected to {}",
                    self.connector.addr()
                );
                true
            }
            Err(e) => {
                eprintln!("post-copy: {e}");
                false
            }
        }
    }

    /// The current connection, for reading the received map.
    pub fn stream(&self) -> Result<Conn, String> {
        self.current
            .borrow()
            .stream
            .try_clone()
            .map_err(|e| format!("cannot clone the connection: {e}"))
    }

    /// Starts reading page requests on the current connection.
    pub fn read_requests(&mut self) {
        self.events = self.stream().ok().map(|s| spawn_reader(s, None));
    }
}

/// Caps the kernel's send buffer of `stream` (best effort: a failure only
/// costs latency).
pub fn set_send_buffer(stream: BorrowedFd<'_>, bytes: usize) {
    set_buffer(stream, libc::SO_SNDBUF, bytes);
}

/// Caps the kernel's receive buffer of `stream`, likewise.
pub fn set_receive_buffer(stream: BorrowedFd<'_>, bytes: usize) {
    set_buffer(stream, libc::SO_RCVBUF, bytes);
}

fn set_buffer(stream: BorrowedFd<'_>, option: libc::c_int, bytes: usize) {
    let value = bytes as libc::c_int;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a live local,
    // on a descriptor `stream` keeps open.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A connection set up for migration: no Nagle delay (a page request or
/// an urgent page must not wait), a timeout on reads, and a writer that
/// sends pages with `MSG_ZEROCOPY` if `zero_copy`.
fn current(stream: Conn, zero_copy: bool, peer_timeout: Duration) -> Result<Current, String> {
    let _ = stream.set_nodelay();
    stream
        .set_read_timeout(Some(peer_timeout))
        .map_err(|e| format!("cannot set a timeout on the connection: {e}"))?;
    let writer = if zero_copy {
        stream
            .zero_copy_writer()
            .map_err(|e| format!("--zero-copy: {e}"))?
    } else {
        stream
            .writer()
            .map_err(|e| format!("cannot clone the connection: {e}"))?
    };
    Ok(Current {
        stream,
        writer,
        postcopy_bytes: 0,
        break_at: None,
        postcopy: false,
    })
}

/// An event queue that says the return path is closed.
fn closed_events() -> Events {
    let (tx, rx) = mpsc::sync_channel(1);
    let _ = tx.send(ReturnEvent::Closed);
    Events {
        rx,
        queued: Queued::default(),
    }
}

/// Reads return-path messages into a bounded queue until the connection
/// ends, after `first` (one read already), dropping a request equal to one
/// already queued. Each message is read into a fixed frame: a peer's
/// message allocates nothing.
///
/// The reader waits without a read timeout: in post-copy a destination
/// whose guest faults on nothing sends nothing for as long as the
/// background pages take, which is no sign of a dead peer. A dead one is
/// found by the write timeout on those pages, and the wait for the
/// acknowledgement at the end is bounded by [`Link::next_event`].
fn spawn_reader(stream: Conn, first: Option<ReturnEvent>) -> Events {
    let _ = stream.set_read_timeout(None);
    let (tx, rx) = mpsc::sync_channel(REQUEST_QUEUE);
    let queued = Queued::default();
    let seen = queued.clone();
    if let Some(event) = first {
        if let Some(key) = Queued::key(&event) {
            seen.lock().insert(key);
        }
        let _ = tx.send(event);
    }
    std::thread::spawn(move || {
        let mut input = IoStream(stream);
        loop {
            let event = match ReturnMessage::read(&mut input) {
                Ok(Ok(m)) => ReturnEvent::Message(m),
                Ok(Err(_)) | Err(_) => ReturnEvent::Closed,
            };
            if let Some(key) = Queued::key(&event) {
                if !seen.lock().insert(key) {
                    continue; // the same request waits already
                }
            }
            let closed = event == ReturnEvent::Closed;
            // Blocks while the queue is full: the flood waits in the socket.
            if tx.send(event).is_err() || closed {
                return;
            }
        }
    });
    Events { rx, queued }
}
