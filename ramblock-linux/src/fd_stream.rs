//! [`FdWriter`] and [`FdReader`]: a migration stream over a socket or pipe
//! that moves guest memory to and from the kernel in place.
//!
//! A pre-copy engine sends most of its bytes as runs of guest pages. Copying
//! each run into a user-space buffer before `write(2)` costs a pass over
//! memory per byte sent; on a loaded host that copy was the largest item
//! in the sending thread's profile. [`FdWriter`] queues the small record
//! headers and sends a header and the pages that follow it with one
//! `writev(2)` straight from guest memory, so the only copy left is the
//! kernel's into its socket buffer. ([`ZeroCopyWriter`](crate::zero_copy::ZeroCopyWriter)
//! removes that one too with `MSG_ZEROCOPY` on TCP; it is opt-in, as it
//! only pays when a NIC reads the pages itself.)
//!
//! On the receiving side, [`FdReader`] reads a `Pages` payload straight
//! into guest memory when the socket already holds all of it (`FIONREAD`),
//! so the read cannot stop short and leave a record half written; the
//! receiver stages the payload in its bounce buffer otherwise.
#![allow(unsafe_code)]

use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::io::{ByteRead, ByteWrite, ReadError};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd};

/// How many bytes of headers and small writes are queued before they are
/// sent on their own.
pub const QUEUE_BYTES: usize = 64 << 10;

/// A [`ByteWrite`] over a file descriptor (a `TcpStream`, a `UnixStream`,
/// a pipe) that queues small writes and sends guest memory without a copy.
///
/// A peer that went away is `EPIPE` (`ErrorKind::BrokenPipe`) in a Rust
/// program, which ignores `SIGPIPE`; a program that restores the signal's
/// default is killed instead, as with any `write(2)`.
#[derive(Debug)]
pub struct FdWriter<T: Write + AsFd> {
    inner: T,
    queued: Vec<u8>,
}

impl<T: Write + AsFd> FdWriter<T> {
    /// A writer over `inner` (blocking).
    pub fn new(inner: T) -> Self {
        FdWriter {
            inner,
            queued: Vec::with_capacity(QUEUE_BYTES),
        }
    }

    /// The descriptor written to.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes queued and not sent yet.
    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// Sends the queue and then `region` with as few `writev(2)` calls as
    /// the kernel allows, retrying short writes and `EINTR`.
    fn send_with(&mut self, region: &HostRegion<'_>) -> io::Result<()> {
        let (mut head, mut body) = (0usize, 0usize);
        while head < self.queued.len() || body < region.len() {
            let iov = [
                libc::iovec {
                    // SAFETY: head <= queued.len(), so the pointer stays
                    // inside (or one past) the queue's allocation.
                    iov_base: unsafe { self.queued.as_ptr().add(head) } as *mut libc::c_void,
                    iov_len: self.queued.len() - head,
                },
                libc::iovec {
                    // SAFETY: body <= region.len(), inside (or one past) the
                    // region, which its creator keeps mapped and readable.
                    iov_base: unsafe { region.as_ptr().add(body) } as *mut libc::c_void,
                    iov_len: region.len() - body,
                },
            ];
            // SAFETY: both iovecs describe readable memory that outlives the
            // call. The kernel only reads it; guest memory may change while
            // it does, which pre-copy tolerates (the page is dirty again and
            // sent again), and no Rust reference to it is formed.
            let n = unsafe { libc::writev(self.inner.as_fd().as_raw_fd(), iov.as_ptr(), 2) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(stalled(e));
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            let mut n = n as usize;
            let from_head = n.min(self.queued.len() - head);
            head += from_head;
            n -= from_head;
            body += n;
        }
        self.queued.clear();
        Ok(())
    }
}

/// `EAGAIN` from a blocking descriptor's write is its write timeout
/// (`SO_SNDTIMEO`) passing with no byte taken: the peer stopped reading.
pub(crate) fn stalled(e: io::Error) -> io::Error {
    timed_out(
        e,
        "the peer took no bytes for the connection's whole write timeout (it stopped reading)",
    )
}

/// `EAGAIN` from a blocking descriptor's read is its read timeout
/// (`SO_RCVTIMEO`) passing with no byte come: the peer went silent.
pub(crate) fn silent(e: io::Error) -> io::Error {
    timed_out(
        e,
        "the peer sent nothing for the connection's whole read timeout",
    )
}

/// `e` as `ErrorKind::TimedOut` saying `what`, if it is a timeout's
/// `EAGAIN`; any other error as it is.
fn timed_out(e: io::Error, what: &'static str) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, what)
    } else {
        e
    }
}

impl<T: Write + AsFd> ByteWrite for FdWriter<T> {
    type Error = io::Error;

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.queued.len() + buf.len() > QUEUE_BYTES {
            self.flush()?;
        }
        if buf.len() >= QUEUE_BYTES {
            return self.inner.write_all(buf).map_err(stalled);
        }
        self.queued.extend_from_slice(buf);
        Ok(())
    }

    fn write_region(&mut self, region: &HostRegion<'_>) -> io::Result<()> {
        self.send_with(region)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.queued.is_empty() {
            // Empty region: sends just the queue.
            self.send_with(&HostRegion::EMPTY)?;
        }
        self.inner.flush()
    }
}

/// Bytes an [`FdReader`] reads ahead for small reads (record headers). Kept
/// small so little of a payload lands here instead of in guest memory.
pub const READ_AHEAD: usize = 4 << 10;

/// A [`ByteRead`] over a file descriptor that reads payloads straight into
/// guest memory when they have fully arrived.
#[derive(Debug)]
pub struct FdReader<T: Read + AsFd> {
    inner: T,
    ahead: Box<[u8]>,
    pos: usize,
    filled: usize,
}

impl<T: Read + AsFd> FdReader<T> {
    /// A reader over `inner` (blocking).
    pub fn new(inner: T) -> Self {
        FdReader {
            inner,
            ahead: vec![0; READ_AHEAD].into_boxed_slice(),
            pos: 0,
            filled: 0,
        }
    }

    /// The descriptor read from.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    /// Bytes the kernel holds for this descriptor, or `None` if it cannot
    /// say (not a socket, pipe or terminal).
    fn queued_in_kernel(&self) -> Option<usize> {
        let mut queued: libc::c_int = 0;
        // SAFETY: FIONREAD stores one int through the pointer, which points
        // at a live local.
        let rc =
            unsafe { libc::ioctl(self.inner.as_fd().as_raw_fd(), libc::FIONREAD, &mut queued) };
        (rc == 0).then_some(queued.max(0) as usize)
    }
}

fn eof_or_io(e: io::Error) -> ReadError<io::Error> {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => ReadError::Eof,
        _ => ReadError::Io(silent(e)),
    }
}

impl<T: Read + AsFd> ByteRead for FdReader<T> {
    type Error = io::Error;

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<io::Error>> {
        let mut done = (self.filled - self.pos).min(buf.len());
        buf[..done].copy_from_slice(&self.ahead[self.pos..self.pos + done]);
        self.pos += done;
        while done < buf.len() {
            let want = buf.len() - done;
            if want >= self.ahead.len() {
                // Big reads skip the read-ahead.
                self.inner.read_exact(&mut buf[done..]).map_err(eof_or_io)?;
                return Ok(());
            }
            let n = match self.inner.read(&mut self.ahead) {
                Ok(0) => return Err(ReadError::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ReadError::Io(silent(e))),
            };
            let take = n.min(want);
            buf[done..done + take].copy_from_slice(&self.ahead[..take]);
            (self.pos, self.filled) = (take, n);
            done += take;
        }
        Ok(())
    }

    fn read_ready_into(&mut self, region: &HostRegion<'_>) -> Result<bool, ReadError<io::Error>> {
        let len = region.len();
        let ahead = (self.filled - self.pos).min(len);
        if ahead < len && self.queued_in_kernel().is_none_or(|q| q < len - ahead) {
            return Ok(false);
        }
        // In range: ahead <= len.
        let _ = region.write(ByteLen::ZERO, &self.ahead[self.pos..self.pos + ahead]);
        self.pos += ahead;
        let mut at = ahead;
        while at < len {
            // SAFETY: at < len keeps the destination inside the region,
            // which its creator keeps mapped and writable; the kernel writes
            // at most len - at bytes there and no Rust reference to guest
            // memory is formed.
            let n = unsafe {
                libc::read(
                    self.inner.as_fd().as_raw_fd(),
                    region.as_ptr().add(at).cast(),
                    len - at,
                )
            };
            match n {
                // The kernel said the bytes were queued; Linux does not
                // take queued bytes back, so these are not expected.
                0 => return Err(ReadError::Eof),
                n if n < 0 => {
                    let e = io::Error::last_os_error();
                    if e.kind() != io::ErrorKind::Interrupted {
                        return Err(ReadError::Io(silent(e)));
                    }
                }
                n => at += n as usize,
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn region_of(buf: &mut [u8]) -> HostRegion<'_> {
        HostRegion::from_mut_slice(buf)
    }

    /// Headers, regions larger than the socket buffer (so writev comes back
    /// short and resumes mid-iovec), big plain writes and a final flush
    /// arrive complete and in order.
    #[test]
    fn everything_arrives_in_order_across_short_writes() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let reader = thread::spawn(move || {
            // Starts late, so the first region's writev blocks and comes
            // back short once reading begins.
            let _ = wait.recv_timeout(std::time::Duration::from_millis(50));
            let mut got = Vec::new();
            b.read_to_end(&mut got).unwrap();
            got
        });
        let mut pages: Vec<u8> = (0..3 << 20).map(|i: u32| (i * 31 / 7) as u8).collect();
        let region = region_of(&mut pages);
        let mut expected = Vec::new();
        let mut w = FdWriter::new(a);
        for (k, len) in [(1u8, 17usize), (2, 5), (3, QUEUE_BYTES + 3), (4, 1)] {
            let header = vec![k; len];
            w.write_all(&header).unwrap();
            expected.extend_from_slice(&header);
            let part = region
                .subregion(
                    ByteLen::from_pages(k.into()),
                    (1 << 20) + usize::from(k) * 4096,
                )
                .unwrap();
            w.write_region(&part)
                .unwrap_or_else(|e| panic!("region {k}: {e}"));
            expected.extend_from_slice(&pages_of(&part));
            assert_eq!(w.queued(), 0, "a region send empties the queue");
        }
        w.write_all(b"tail").unwrap();
        expected.extend_from_slice(b"tail");
        assert_eq!(w.queued(), 4);
        w.flush().unwrap();
        assert_eq!(w.queued(), 0);
        drop(go);
        drop(w);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected, "the stream differs from what was written");
    }

    fn pages_of(r: &HostRegion<'_>) -> Vec<u8> {
        let mut v = vec![0; r.len()];
        r.read(ByteLen::ZERO, &mut v).unwrap();
        v
    }

    #[test]
    fn a_closed_peer_is_an_error_not_a_hang() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        let mut pages = vec![7u8; 1 << 20];
        let mut w = FdWriter::new(a);
        w.write_all(b"hdr").unwrap();
        let err = w.write_region(&region_of(&mut pages)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    /// A payload is read in place only once all of it has arrived; until
    /// then nothing is consumed and the bytes stay for a later read.
    #[test]
    fn payloads_are_read_in_place_only_when_whole() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let mut r = FdReader::new(b);
        let payload: Vec<u8> = (0..64 << 10).map(|i: u32| (i % 253) as u8).collect();
        let mut guest = vec![0xEEu8; 80 << 10];
        let region = region_of(&mut guest);
        let target = region.subregion(ByteLen(4096), payload.len()).unwrap();

        a.write_all(b"header-1").unwrap();
        a.write_all(&payload[..40 << 10]).unwrap();
        let mut header = [0u8; 8];
        r.read_exact(&mut header).unwrap();
        assert_eq!(&header, b"header-1");
        assert!(
            !r.read_ready_into(&target).unwrap(),
            "only part has arrived"
        );
        assert_eq!(
            pages_of(&region),
            vec![0xEE; 80 << 10],
            "nothing was written"
        );

        a.write_all(&payload[40 << 10..]).unwrap();
        a.write_all(b"header-2").unwrap();
        assert!(r.read_ready_into(&target).unwrap());
        let got = pages_of(&region);
        assert_eq!(&got[4096..4096 + payload.len()], &payload[..]);
        assert!(got[..4096]
            .iter()
            .chain(&got[4096 + payload.len()..])
            .all(|&x| x == 0xEE));
        r.read_exact(&mut header).unwrap();
        assert_eq!(&header, b"header-2", "the stream goes on after the payload");

        // A payload that never completes is not read in place, and a
        // read of it ends at the end of the stream.
        a.write_all(&payload[..100]).unwrap();
        drop(a);
        assert!(!r.read_ready_into(&target).unwrap());
        let mut rest = vec![0u8; 200];
        assert!(matches!(r.read_exact(&mut rest), Err(ReadError::Eof)));
    }

    /// Small reads through the read-ahead and big reads around it return
    /// the stream exactly.
    #[test]
    fn mixed_read_sizes_return_the_stream_in_order() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sender = {
            let data = data.clone();
            thread::spawn(move || a.write_all(&data).unwrap())
        };
        let mut r = FdReader::new(b);
        let mut got = Vec::new();
        for size in [1usize, 17, 4096, 5000, 70_000, 3, READ_AHEAD, 100_000]
            .iter()
            .cycle()
        {
            let n = (*size).min(data.len() - got.len());
            if n == 0 {
                break;
            }
            let mut buf = vec![0u8; n];
            r.read_exact(&mut buf).unwrap();
            got.extend_from_slice(&buf);
        }
        sender.join().unwrap();
        assert!(got == data);
    }
}
