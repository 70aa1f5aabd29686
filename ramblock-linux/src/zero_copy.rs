//! [`ZeroCopyWriter`]: a migration stream over a TCP socket that hands guest
//! pages to the kernel with `MSG_ZEROCOPY`, so not even the kernel copies
//! them, and tracks the kernel's completions.
//!
//! [`FdWriter`](crate::fd_stream::FdWriter) leaves one copy per byte: the
//! kernel's, into its socket buffer. With `SO_ZEROCOPY` set on a TCP socket,
//! `sendmsg(MSG_ZEROCOPY)` pins the pages instead and the NIC reads them in
//! place. The price: the kernel still references the memory after
//! `sendmsg` returns, until the data is acknowledged, and says so later
//! through the socket's error queue (`recvmsg(MSG_ERRQUEUE)`, one
//! `sock_extended_err` with `SO_EE_ORIGIN_ZEROCOPY` per range of sends).
//! Pinning also costs: per send an allocation charged to
//! `net.core.optmem_max`, and the pinned pages to `RLIMIT_MEMLOCK` without
//! `CAP_IPC_LOCK`. The kernel's documentation puts the break-even around
//! 10 KiB per send, and on loopback or a veth pair the receiver is local,
//! so the kernel copies anyway and reports it (`SO_EE_CODE_ZEROCOPY_COPIED`,
//! counted in [`ZeroCopyStats::copied_sends`]). This writer is therefore
//! opt-in; measure with the program's `--zero-copy` before turning it on
//! (BENCHMARKS.md, "Zero-copy sends").
//!
//! What it guarantees:
//! - The stream is byte for byte what a plain writer sends, in order:
//!   record headers are queued as in `FdWriter` and go out in the same
//!   `sendmsg` as the pages after them, from a queue buffer that is kept
//!   (not reused) until the kernel has completed that send; regions shorter
//!   than [`ZeroCopyWriter::with_min_len`] are sent by copy (`writev`).
//! - At most [`ZeroCopyWriter::with_max_outstanding`] sends are
//!   uncompleted at any time; past that the writer waits for completions.
//! - [`ByteWrite::flush`] and `Drop` return only when the kernel has
//!   completed every send (or the stall timeout passed, an error), so the
//!   caller may then unmap or reuse the memory it sent.
//!
//! What it does not: guest memory sent before a flush may still change
//! while the kernel references it, and the peer then receives the newer
//! bytes (possibly a mix within a page). Pre-copy tolerates that, as it
//! tolerates the guest writing during a `writev`: a page written after it
//! was sent is dirty again and sent again, and the final pass runs with the
//! guest paused and ends with a flush. The kernel pins the pages, so memory
//! unmapped too early cannot fault or corrupt this process; it could only
//! put other bytes on the wire, which is why memory must outlive the flush.
//!
//! Only TCP (and UDP) sockets take `SO_ZEROCOPY`: over a UNIX socket
//! [`ZeroCopyWriter::new`] fails with [`ZeroCopyError::Unsupported`]
//! (no silent fallback: the caller asked for zero-copy and should know it
//! cannot have it; `FdWriter` is the writer for such sockets).
#![allow(unsafe_code)]

use crate::fd_stream::QUEUE_BYTES;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::io::ByteWrite;
use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::time::{Duration, Instant};

/// `SO_ZEROCOPY` (linux/asm-generic/socket.h; SPARC numbers it 0x3e).
/// The libc crate does not export it.
#[cfg(not(any(target_arch = "sparc", target_arch = "sparc64")))]
const SO_ZEROCOPY: libc::c_int = 60;
#[cfg(any(target_arch = "sparc", target_arch = "sparc64"))]
const SO_ZEROCOPY: libc::c_int = 0x3e;
/// `SO_EE_ORIGIN_ZEROCOPY` (linux/errqueue.h).
const SO_EE_ORIGIN_ZEROCOPY: u8 = 5;
/// `SO_EE_CODE_ZEROCOPY_COPIED` (linux/errqueue.h): the kernel copied the
/// data of these sends after all.
const SO_EE_CODE_ZEROCOPY_COPIED: u8 = 1;

/// Regions shorter than this go by copy by default: below about 10 KiB the
/// kernel's pinning and the completion cost more than the copy saves
/// (Documentation/networking/msg_zerocopy.rst).
pub const DEFAULT_MIN_LEN: usize = 16 << 10;

/// Uncompleted sends allowed by default. The memory the kernel pins is
/// bounded anyway: pinned pages count against the socket's send buffer as
/// copied ones do. What this bounds is the bookkeeping (one entry per send
/// here, one notification per range in the kernel, charged to
/// `net.core.optmem_max`; `ENOBUFS` from that limit makes the writer wait
/// for completions and retry). Set high enough not to throttle a full send
/// buffer of 256 KiB runs: with 64, pass 0 over loopback measured 0.66x
/// plain `writev`, with 1024 and 4096 0.87x and 0.95x (a noisy machine;
/// BENCHMARKS.md, "Zero-copy sends").
pub const DEFAULT_MAX_OUTSTANDING: usize = 1024;

/// How long the writer waits for the kernel (completions, or room in a
/// non-blocking socket) before it gives up, by default: a peer that stops
/// acknowledging stalls every send behind it.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(120);

/// Spare queue buffers kept for reuse.
const SPARE_BUFFERS: usize = 8;

/// What went wrong with a zero-copy send.
#[derive(Debug, thiserror::Error)]
pub enum ZeroCopyError {
    /// The socket refused `SO_ZEROCOPY`.
    #[error(
        "this socket does not take zero-copy sends (setsockopt SO_ZEROCOPY: {0}): \
         only TCP sockets do (not UNIX sockets or TLS); send without zero-copy"
    )]
    Unsupported(#[source] io::Error),
    /// `ENOBUFS` with no send outstanding: waiting frees nothing.
    #[error(
        "the kernel refused to pin memory for a zero-copy send with none outstanding (ENOBUFS): \
         raise net.core.optmem_max, or RLIMIT_MEMLOCK (ulimit -l) for a process without \
         CAP_IPC_LOCK, or send without zero-copy"
    )]
    NoBuffers,
    /// The kernel completed nothing (or the socket took nothing) for the
    /// stall timeout.
    #[error(
        "{outstanding} zero-copy sends still uncompleted after {waited:?}: the peer stopped \
         acknowledging data"
    )]
    Stalled {
        /// Sends the kernel had not completed.
        outstanding: usize,
        /// How long the writer waited.
        waited: Duration,
    },
    /// Reading the socket's error queue failed.
    #[error("cannot read the socket's error queue (zero-copy completions): {0}")]
    ErrorQueue(#[source] io::Error),
    /// A send failed (`EPIPE` for a peer that went away, and the like).
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl From<ZeroCopyError> for io::Error {
    /// Keeps a send's own error as it is (its kind, its errno); the others
    /// become errors of their kind carrying the message.
    fn from(e: ZeroCopyError) -> io::Error {
        let kind = match &e {
            ZeroCopyError::Io(_) => None,
            ZeroCopyError::Unsupported(_) => Some(io::ErrorKind::Unsupported),
            ZeroCopyError::NoBuffers => Some(io::ErrorKind::OutOfMemory),
            ZeroCopyError::Stalled { .. } => Some(io::ErrorKind::TimedOut),
            ZeroCopyError::ErrorQueue(_) => Some(io::ErrorKind::Other),
        };
        match (e, kind) {
            (ZeroCopyError::Io(e), _) => e,
            (e, kind) => io::Error::new(kind.unwrap_or(io::ErrorKind::Other), e),
        }
    }
}

/// What the writer sent and how: whether zero-copy actually happened.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ZeroCopyStats {
    /// `sendmsg(MSG_ZEROCOPY)` calls that took bytes (each one id in the
    /// kernel's count; a short send is one).
    pub zero_copy_sends: u64,
    /// Bytes handed over by those sends (headers riding along included).
    pub zero_copy_bytes: u64,
    /// Sends the kernel reported complete.
    pub completed_sends: u64,
    /// Of those, sends whose data the kernel copied after all
    /// (`SO_EE_CODE_ZEROCOPY_COPIED`: a local receiver on loopback or veth,
    /// a device without scatter-gather).
    pub copied_sends: u64,
    /// Bytes of the sends reported copied.
    pub copied_bytes: u64,
    /// Bytes sent by copy on purpose: headers flushed on their own, big
    /// plain writes, regions under the minimum length, and everything while
    /// zero-copy is switched off.
    pub plain_bytes: u64,
    /// Times a send hit `ENOBUFS` and waited for completions to retry.
    pub no_buffer_waits: u64,
}

/// One send the kernel may still reference.
#[derive(Debug)]
struct Pending {
    done: bool,
    bytes: usize,
    /// The queue buffer whose bytes (headers) this send, or one before it,
    /// carried: kept until this send completes.
    buffer: Option<Vec<u8>>,
}

/// A [`ByteWrite`] over a TCP socket that sends guest pages with
/// `MSG_ZEROCOPY` (see the [module](self) documentation).
///
/// The socket should not have carried zero-copy sends before: the kernel
/// numbers them per socket from 0, and this writer counts from there.
#[derive(Debug)]
pub struct ZeroCopyWriter<T: Write + AsFd> {
    inner: T,
    queued: Vec<u8>,
    /// Sends not yet retired, oldest first; the first has kernel id `low`.
    pending: VecDeque<Pending>,
    low: u32,
    /// Entries of `pending` not reported complete.
    undone: usize,
    spare: Vec<Vec<u8>>,
    enabled: bool,
    min_len: usize,
    max_outstanding: usize,
    stall_timeout: Duration,
    /// How long a send on the socket blocks before `EAGAIN`: its send
    /// timeout (`SO_SNDTIMEO`) if it blocks, 0 if it does not, read when
    /// the writer is made. That much of a stall has passed by the time a
    /// send says `EAGAIN`.
    socket_wait: Duration,
    stats: ZeroCopyStats,
}

/// How long a send on `fd` blocks before it says `EAGAIN`: its
/// `SO_SNDTIMEO` on a blocking socket, 0 on a non-blocking one or if
/// the kernel cannot say.
fn send_blocks_for(fd: RawFd) -> Duration {
    // SAFETY: F_GETFL takes no argument and touches no memory.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 || flags & libc::O_NONBLOCK != 0 {
        return Duration::ZERO;
    }
    let mut tv = libc::timeval {
        tv_sec: 0,
        tv_usec: 0,
    };
    let mut len = std::mem::size_of::<libc::timeval>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes to a live local
    // timeval and updates `len`, a live local too.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            (&mut tv as *mut libc::timeval).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Duration::ZERO;
    }
    Duration::from_secs(tv.tv_sec.max(0) as u64) + Duration::from_micros(tv.tv_usec.max(0) as u64)
}

impl<T: Write + AsFd> ZeroCopyWriter<T> {
    /// A writer over `inner`, with `SO_ZEROCOPY` switched on for it.
    /// [`ZeroCopyError::Unsupported`] for a socket that does not take it
    /// (a UNIX socket, a pipe, a kernel before 4.14).
    pub fn new(inner: T) -> Result<Self, ZeroCopyError> {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt reads size_of::<c_int>() bytes from a live
        // local, on a descriptor `inner` keeps open.
        let rc = unsafe {
            libc::setsockopt(
                inner.as_fd().as_raw_fd(),
                libc::SOL_SOCKET,
                SO_ZEROCOPY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(ZeroCopyError::Unsupported(io::Error::last_os_error()));
        }
        let socket_wait = send_blocks_for(inner.as_fd().as_raw_fd());
        Ok(ZeroCopyWriter {
            inner,
            queued: Vec::new(),
            pending: VecDeque::new(),
            low: 0,
            undone: 0,
            spare: Vec::new(),
            enabled: true,
            min_len: DEFAULT_MIN_LEN,
            max_outstanding: DEFAULT_MAX_OUTSTANDING,
            stall_timeout: if socket_wait.is_zero() {
                DEFAULT_STALL_TIMEOUT
            } else {
                socket_wait
            },
            socket_wait,
            stats: ZeroCopyStats::default(),
        })
    }

    /// Regions shorter than `bytes` are sent by copy (default
    /// [`DEFAULT_MIN_LEN`]).
    pub fn with_min_len(mut self, bytes: usize) -> Self {
        self.min_len = bytes;
        self
    }

    /// At most `sends` uncompleted sends (at least 1; default
    /// [`DEFAULT_MAX_OUTSTANDING`]).
    pub fn with_max_outstanding(mut self, sends: usize) -> Self {
        self.max_outstanding = sends.max(1);
        self
    }

    /// How long to wait for the kernel before failing with
    /// [`ZeroCopyError::Stalled`] (default: the socket's send timeout
    /// (`SO_SNDTIMEO`) when it has one, else [`DEFAULT_STALL_TIMEOUT`]).
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Switches zero-copy sends on or off; off, regions go by copy as in
    /// `FdWriter` (sends still outstanding are waited for as usual). For a
    /// phase where latency matters more than copies (post-copy, where a
    /// flush after each urgent page would wait for the peer's
    /// acknowledgement).
    pub fn set_zero_copy(&mut self, on: bool) {
        self.enabled = on;
    }

    /// The descriptor written to.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes queued and not sent yet.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Sends the kernel has not reported complete yet.
    pub fn outstanding(&self) -> usize {
        self.undone
    }

    /// What was sent how so far.
    pub fn stats(&self) -> ZeroCopyStats {
        self.stats
    }

    fn fd(&self) -> RawFd {
        self.inner.as_fd().as_raw_fd()
    }

    /// Sends the queue and then the `len` bytes at `data`; with
    /// `zero_copy`, as `MSG_ZEROCOPY` sends, each recorded as pending.
    /// Retries short sends, `EINTR`, `EAGAIN` (after waiting for room) and
    /// `ENOBUFS` (after waiting for completions).
    ///
    /// # Safety
    /// `data..data + len` must be readable for the call (a region's bytes,
    /// which its creator keeps mapped, or a slice's). With `zero_copy` the
    /// kernel reads them later too, from pages it pinned (so nothing can
    /// fault); they should stay unchanged until the next flush or be sent
    /// again (the module's contract), but that is correctness of the
    /// stream, not memory safety.
    unsafe fn send_with(
        &mut self,
        data: *const u8,
        len: usize,
        zero_copy: bool,
    ) -> Result<(), ZeroCopyError> {
        let (mut head, mut body) = (0usize, 0usize);
        // MSG_NOSIGNAL: a peer that went away is EPIPE, never SIGPIPE.
        let flags = libc::MSG_NOSIGNAL | if zero_copy { libc::MSG_ZEROCOPY } else { 0 };
        // When the socket first had no room, for the stall timeout.
        let mut full_since = None;
        while head < self.queued.len() || body < len {
            if zero_copy {
                self.reap_for_room()?;
            }
            let mut iov = [
                libc::iovec {
                    // SAFETY: head <= queued.len(), so the pointer stays
                    // inside (or one past) the queue's allocation.
                    iov_base: unsafe { self.queued.as_ptr().add(head) } as *mut libc::c_void,
                    iov_len: self.queued.len() - head,
                },
                libc::iovec {
                    // SAFETY: body <= len, inside (or one past) the bytes
                    // at `data`, readable for this call (see above).
                    iov_base: unsafe { data.add(body) } as *mut libc::c_void,
                    iov_len: len - body,
                },
            ];
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len();
            // SAFETY: the iovecs describe readable memory: the queue, which
            // is kept until the send completes (below), and the caller's
            // bytes, readable for this call; a zero-copy send reads them
            // later too, but the kernel pins the pages for that, so memory
            // released meanwhile cannot fault (the module's contract keeps
            // it unchanged). The kernel only reads it; the guest may change
            // it meanwhile, which pre-copy tolerates, and no Rust reference
            // to it is formed.
            let n = unsafe { libc::sendmsg(self.fd(), &msg, flags) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::EAGAIN) => {
                        // A non-blocking socket (or one with a send
                        // timeout) that is full: wait for room. A blocking
                        // one waited its send timeout already.
                        let since = *full_since.get_or_insert_with(|| {
                            let now = Instant::now();
                            now.checked_sub(self.socket_wait).unwrap_or(now)
                        });
                        self.wait_since(libc::POLLOUT, since)?;
                        continue;
                    }
                    Some(libc::ENOBUFS) if zero_copy => {
                        if self.undone == 0 {
                            return Err(ZeroCopyError::NoBuffers);
                        }
                        self.stats.no_buffer_waits += 1;
                        self.reap_until(self.undone - 1)?;
                        continue;
                    }
                    _ => return Err(e.into()),
                }
            }
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::WriteZero).into());
            }
            full_since = None;
            let mut n = n as usize;
            if zero_copy {
                self.pending.push_back(Pending {
                    done: false,
                    bytes: n,
                    buffer: None,
                });
                self.undone += 1;
                self.stats.zero_copy_sends += 1;
                self.stats.zero_copy_bytes += n as u64;
            } else {
                self.stats.plain_bytes += n as u64;
            }
            let from_head = n.min(self.queued.len() - head);
            head += from_head;
            n -= from_head;
            body += n;
        }
        if zero_copy && !self.queued.is_empty() {
            // The kernel may still read the queue's bytes: the buffer goes
            // with the last send (retired only after every earlier one),
            // and the queue starts on another.
            let fresh = self.spare.pop().unwrap_or_default();
            let used = std::mem::replace(&mut self.queued, fresh);
            if let Some(last) = self.pending.back_mut() {
                last.buffer = Some(used);
            }
        }
        self.queued.clear();
        Ok(())
    }

    /// Before a zero-copy send: reads completions already queued once half
    /// the allowance is used, and waits for them at the bound.
    fn reap_for_room(&mut self) -> Result<(), ZeroCopyError> {
        if self.undone >= self.max_outstanding / 2 {
            self.drain()?;
        }
        if self.undone >= self.max_outstanding {
            self.reap_until(self.max_outstanding - 1)?;
        }
        Ok(())
    }

    /// Waits until at most `left` sends are uncompleted.
    fn reap_until(&mut self, left: usize) -> Result<(), ZeroCopyError> {
        let start = Instant::now();
        let mut before = None;
        loop {
            self.drain()?;
            if self.undone <= left {
                return Ok(());
            }
            if before == Some(self.undone) {
                // The last wait woke without a completion (a socket error
                // or hang-up is reported at once and forever): pause
                // rather than spin.
                std::thread::sleep(Duration::from_millis(1));
            }
            before = Some(self.undone);
            // POLLERR (always reported) says the error queue holds something.
            self.wait_since(0, start)?;
        }
    }

    /// Waits once for `events` (or POLLERR/POLLHUP), at most 100 ms; an
    /// error once the stall timeout counted from `start` has passed.
    fn wait_since(&mut self, events: libc::c_short, start: Instant) -> Result<(), ZeroCopyError> {
        let left = self.stall_timeout.saturating_sub(start.elapsed());
        if left.is_zero() {
            return Err(ZeroCopyError::Stalled {
                outstanding: self.undone,
                waited: start.elapsed(),
            });
        }
        let mut pfd = libc::pollfd {
            fd: self.fd(),
            events,
            revents: 0,
        };
        // At most 100 ms per poll, so the caller looks again (a completion
        // may have come in between its last look and this poll).
        let ms = left.as_millis().min(100) as libc::c_int;
        // SAFETY: poll reads and writes one pollfd, a live local.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e.into());
            }
        }
        Ok(())
    }

    /// Reads every completion the error queue holds now.
    fn drain(&mut self) -> Result<(), ZeroCopyError> {
        // Room for one cmsghdr with a sock_extended_err and the offender's
        // address (none for zero-copy notifications, but the kernel may
        // append one), aligned for cmsghdr.
        let mut control = [0u64; 16];
        loop {
            // SAFETY: an all-zero msghdr is valid; the control buffer below
            // is a live local of the length given.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = std::mem::size_of_val(&control);
            // SAFETY: the kernel writes at most msg_controllen bytes of
            // control data into `control` and no payload (no iovecs).
            let rc = unsafe {
                libc::recvmsg(self.fd(), &mut msg, libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT)
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(libc::EAGAIN) => Ok(()),
                    Some(libc::EINTR) => continue,
                    _ => Err(ZeroCopyError::ErrorQueue(e)),
                };
            }
            // SAFETY: msg's control fields describe `control`, which the
            // kernel filled; CMSG_FIRSTHDR/NXTHDR stay inside
            // msg_controllen.
            let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
            while !cmsg.is_null() {
                // SAFETY: non-null cmsg points at a header inside `control`.
                let hdr = unsafe { &*cmsg };
                let ours = (hdr.cmsg_level == libc::SOL_IP && hdr.cmsg_type == libc::IP_RECVERR)
                    || (hdr.cmsg_level == libc::SOL_IPV6 && hdr.cmsg_type == libc::IPV6_RECVERR);
                // SAFETY: CMSG_LEN of a constant size is arithmetic only.
                let need = unsafe {
                    libc::CMSG_LEN(std::mem::size_of::<libc::sock_extended_err>() as u32)
                } as usize;
                if ours && hdr.cmsg_len >= need {
                    // SAFETY: cmsg_len covers a sock_extended_err after the
                    // header, inside `control`; read unaligned to be safe.
                    let err = unsafe {
                        std::ptr::read_unaligned(
                            libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>(),
                        )
                    };
                    if err.ee_errno == 0 && err.ee_origin == SO_EE_ORIGIN_ZEROCOPY {
                        let copied = err.ee_code & SO_EE_CODE_ZEROCOPY_COPIED != 0;
                        self.complete(err.ee_info, err.ee_data, copied);
                    }
                }
                // SAFETY: as for CMSG_FIRSTHDR.
                cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
            }
        }
    }

    /// The kernel completed sends `lo..=hi` (ids wrap at 2^32).
    fn complete(&mut self, lo: u32, hi: u32, copied: bool) {
        let span = hi.wrapping_sub(lo);
        for (i, p) in self.pending.iter_mut().enumerate() {
            let id = self.low.wrapping_add(i as u32);
            if !p.done && id.wrapping_sub(lo) <= span {
                p.done = true;
                self.undone -= 1;
                self.stats.completed_sends += 1;
                if copied {
                    self.stats.copied_sends += 1;
                    self.stats.copied_bytes += p.bytes as u64;
                }
            }
        }
        while self.pending.front().is_some_and(|p| p.done) {
            if let Some(Pending {
                buffer: Some(mut b),
                ..
            }) = self.pending.pop_front()
            {
                if self.spare.len() < SPARE_BUFFERS {
                    b.clear();
                    self.spare.push(b);
                }
            }
            self.low = self.low.wrapping_add(1);
        }
    }

    /// Sends the queue (by copy) and waits for every completion.
    fn flush_all(&mut self) -> Result<(), ZeroCopyError> {
        if !self.queued.is_empty() {
            // SAFETY: zero bytes: nothing past the queue is read.
            unsafe { self.send_with(std::ptr::NonNull::dangling().as_ptr(), 0, false) }?;
        }
        self.inner.flush()?;
        self.reap_until(0)
    }
}

impl<T: Write + AsFd> ByteWrite for ZeroCopyWriter<T> {
    type Error = ZeroCopyError;

    fn write_all(&mut self, buf: &[u8]) -> Result<(), ZeroCopyError> {
        if self.queued.len() + buf.len() > QUEUE_BYTES {
            // Sent by copy with the queue, in one writev: the slice's
            // borrow ends with this call.
            // SAFETY: `buf` is readable for this call, and without
            // zero-copy the kernel is done with it when the call returns.
            return unsafe { self.send_with(buf.as_ptr(), buf.len(), false) };
        }
        self.queued.extend_from_slice(buf);
        Ok(())
    }

    fn write_region(&mut self, region: &HostRegion<'_>) -> Result<(), ZeroCopyError> {
        let zero_copy = self.enabled && region.len() >= self.min_len;
        // SAFETY: a region's creator keeps its bytes mapped and readable
        // for the region's lifetime, which covers this call.
        unsafe { self.send_with(region.as_ptr(), region.len(), zero_copy) }
    }

    /// Sends what is queued and returns once the kernel completed every
    /// zero-copy send: the memory sent may be reused afterwards.
    fn flush(&mut self) -> Result<(), ZeroCopyError> {
        self.flush_all()
    }
}

impl<T: Write + AsFd> Drop for ZeroCopyWriter<T> {
    /// Waits for the kernel's completions (up to the stall timeout), so
    /// memory sent is not reused while the kernel may still read it.
    fn drop(&mut self) {
        let _ = self.reap_until(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    /// The bookkeeping against a model: sends numbered across the 2^32
    /// wrap, completed in coalesced ranges out of order (and once again,
    /// as a malformed report would): each send counts once, sends retire
    /// only in order, and a queue buffer is released only with its send.
    #[test]
    fn completions_out_of_order_and_across_the_wrap() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut w = ZeroCopyWriter::new(a).unwrap();
        w.low = u32::MAX - 2; // ids MAX-2, MAX-1, MAX, 0, 1, 2
        for i in 0..6 {
            w.pending.push_back(Pending {
                done: false,
                bytes: 100 + i,
                buffer: (i == 1).then(|| vec![1u8; 10]),
            });
        }
        w.undone = 6;
        // Sends 0..=2 (ids MAX, 0, 1 are the 3rd to 5th) first: nothing
        // retires, the front is still out.
        w.complete(u32::MAX, 1, true);
        assert_eq!((w.undone, w.pending.len(), w.low), (3, 6, u32::MAX - 2));
        // Again, overlapping: counted once.
        w.complete(u32::MAX - 1, 1, true);
        assert_eq!(w.undone, 2);
        assert_eq!(w.pending.len(), 6, "the front (MAX-2) still holds all");
        assert!(w.spare.is_empty(), "the header buffer is still referenced");
        w.complete(u32::MAX - 2, u32::MAX - 2, false);
        assert_eq!((w.undone, w.pending.len(), w.low), (1, 1, 2));
        assert_eq!(w.spare.len(), 1, "the header buffer came back");
        assert!(w.spare[0].is_empty());
        // A report for ids long retired or never sent changes nothing.
        w.complete(10, 20, true);
        assert_eq!(w.undone, 1);
        w.complete(2, 2, false);
        assert_eq!((w.undone, w.pending.len(), w.low), (0, 0, 3));
        let s = w.stats();
        assert_eq!(s.completed_sends, 6);
        // Copied: MAX-1, MAX, 0, 1 (the second report added MAX-1).
        assert_eq!(s.copied_sends, 4);
        assert_eq!(s.copied_bytes, 101 + 102 + 103 + 104);
    }
}
