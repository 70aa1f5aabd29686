//! [`FdWriter`]: a migration stream writer over a socket or pipe that hands
//! guest memory to the kernel in place.
//!
//! A pre-copy engine sends most of its bytes as runs of guest pages. Copying
//! each run into a user-space buffer before `write(2)` costs a pass over
//! memory per byte sent; on a loaded host that copy was the largest item
//! in the sending thread's profile. [`FdWriter`] queues the small record
//! headers and sends a header and the pages that follow it with one
//! `writev(2)` straight from guest memory, so the only copy left is the
//! kernel's into its socket buffer.
#![allow(unsafe_code)]

use ramblock_core::region::HostRegion;
use ramblock_core::stream::io::ByteWrite;
use std::io::{self, Write};
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
    fn send_with(&mut self, region: &HostRegion) -> io::Result<()> {
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
                return Err(e);
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

impl<T: Write + AsFd> ByteWrite for FdWriter<T> {
    type Error = io::Error;

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        if self.queued.len() + buf.len() > QUEUE_BYTES {
            self.flush()?;
        }
        if buf.len() >= QUEUE_BYTES {
            return self.inner.write_all(buf);
        }
        self.queued.extend_from_slice(buf);
        Ok(())
    }

    fn write_region(&mut self, region: &HostRegion) -> io::Result<()> {
        self.send_with(region)
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.queued.is_empty() {
            // Empty region: sends just the queue.
            // SAFETY: a dangling, zero-length region is never dereferenced.
            let empty = unsafe { HostRegion::new(core::ptr::NonNull::dangling(), 0) };
            self.send_with(&empty)?;
        }
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn region_of(buf: &mut [u8]) -> HostRegion {
        // SAFETY: the test keeps `buf` alive and unused while the region is.
        unsafe {
            HostRegion::new(
                core::ptr::NonNull::new(buf.as_mut_ptr()).unwrap(),
                buf.len(),
            )
        }
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
                .subregion(u64::from(k) * 4096, (1 << 20) + usize::from(k) * 4096)
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

    fn pages_of(r: &HostRegion) -> Vec<u8> {
        let mut v = vec![0; r.len()];
        r.read(0, &mut v).unwrap();
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
}
