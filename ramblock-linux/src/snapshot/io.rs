//! Positioned reads and writes between a file and guest memory, with no
//! copy in user space: the kernel reads from (or writes to) the guest's
//! pages directly. The writer and the readers are built on these two; they
//! are public so a program can measure a plain loop of them as the
//! baseline a snapshot's save and restore are compared with.
#![allow(unsafe_code)]

use ramblock_core::region::HostRegion;
use std::io;
use std::os::fd::{AsFd, AsRawFd};

/// Writes all of `region` to `fd` at `offset` with `pwritev(2)`, retrying
/// short writes and `EINTR`.
pub fn write_region_at(fd: impl AsFd, region: &HostRegion<'_>, offset: u64) -> io::Result<()> {
    let fd = fd.as_fd().as_raw_fd();
    transfer_at(region, offset, io::ErrorKind::WriteZero, |iov, at| {
        // SAFETY: the iovec describes readable memory (the region's creator
        // keeps it mapped for the borrow); the kernel only reads it, and no
        // Rust reference to guest memory is formed.
        unsafe { libc::pwritev(fd, iov, 1, at) }
    })
}

/// Reads `region.len()` bytes of `fd` at `offset` into `region` with
/// `preadv(2)`, retrying short reads and `EINTR`; the file ending first is
/// `UnexpectedEof`, a read-only region `PermissionDenied`.
pub fn read_region_at(fd: impl AsFd, region: &HostRegion<'_>, offset: u64) -> io::Result<()> {
    if !region.is_writable() {
        return Err(io::ErrorKind::PermissionDenied.into());
    }
    let fd = fd.as_fd().as_raw_fd();
    transfer_at(region, offset, io::ErrorKind::UnexpectedEof, |iov, at| {
        // SAFETY: the iovec describes writable memory (checked above; the
        // region's creator keeps it mapped for the borrow). The kernel
        // writes guest memory, which Rust code reaches only through copies,
        // so no reference is invalidated.
        unsafe { libc::preadv(fd, iov, 1, at) }
    })
}

/// The loop both directions share: hands `call` one iovec for the rest of
/// `region` and the file offset it goes to, until the whole region is
/// moved; `EINTR` is retried, and a call that moves nothing fails with
/// `at_zero` (so a short file or a full disk cannot spin forever).
fn transfer_at(
    region: &HostRegion<'_>,
    offset: u64,
    at_zero: io::ErrorKind,
    mut call: impl FnMut(&libc::iovec, i64) -> isize,
) -> io::Result<()> {
    let mut done = 0usize;
    while done < region.len() {
        let iov = libc::iovec {
            // SAFETY: done < region.len(): inside the region.
            iov_base: unsafe { region.as_ptr().add(done) }.cast(),
            iov_len: region.len() - done,
        };
        let at = i64::try_from(offset + done as u64).map_err(|_| io::ErrorKind::InvalidInput)?;
        let n = call(&iov, at);
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(at_zero.into());
        }
        done += n as usize;
    }
    Ok(())
}

/// 16 random bytes from the kernel (`getrandom(2)`).
pub(crate) fn random_id() -> io::Result<[u8; 16]> {
    let mut id = [0u8; 16];
    let mut done = 0;
    while done < id.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `id`.
        let n = unsafe { libc::getrandom(id[done..].as_mut_ptr().cast(), id.len() - done, 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(id)
}
