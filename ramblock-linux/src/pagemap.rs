//! Which pages of guest RAM were never touched, so read as zero:
//!
//! - private anonymous memory, from `/proc/self/pagemap`: a page neither
//!   present nor swapped has never been written (or was discarded since).
//!   One 8-byte entry per 4 KiB page; a 1 GiB range is 2 MiB of entries,
//!   read in chunks.
//! - a memfd mapped shared, from the file's holes (`lseek` with
//!   `SEEK_DATA`/`SEEK_HOLE`): a write through any mapping allocates the
//!   page in the file, so a hole was never written, whichever process maps
//!   it. This process's page tables would not do: another mapping may
//!   have written the page. Asking the file also saves the pages: reading
//!   a hole of a shared memfd through the mapping allocates a zeroed page.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;

/// Entry bit: the page is in RAM.
const PRESENT: u64 = 1 << 63;
/// Entry bit: the page is in swap.
const SWAPPED: u64 = 1 << 62;
/// Entries read per system call.
const CHUNK: usize = 16 << 10;

/// Calls `report(first, count)` for each run of pages in
/// `start .. start + pages * 4096` (a page-aligned address in this
/// process) that is neither present nor swapped. `Err` when the file
/// cannot be read (no /proc); nothing is reported then.
pub(crate) fn untouched_runs(
    start: usize,
    pages: u64,
    report: &mut dyn FnMut(u64, u64),
) -> std::io::Result<()> {
    let file = File::open("/proc/self/pagemap")?;
    let mut raw = vec![0u8; CHUNK * 8];
    let mut runs = Vec::new();
    let mut run: Option<(u64, u64)> = None;
    let mut page = 0u64;
    while page < pages {
        let n = (pages - page).min(CHUNK as u64) as usize;
        let at = ((start as u64 >> 12) + page) * 8;
        file.read_exact_at(&mut raw[..n * 8], at)?;
        for (i, entry) in raw[..n * 8].chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(entry.try_into().unwrap_or([0xff; 8]));
            let p = page + i as u64;
            if e & (PRESENT | SWAPPED) == 0 {
                run = match run {
                    Some((first, count)) if first + count == p => Some((first, count + 1)),
                    other => {
                        runs.extend(other);
                        Some((p, 1))
                    }
                };
            }
        }
        page += n as u64;
    }
    runs.extend(run);
    // Reported only once the whole range was read: a failed read reports
    // nothing.
    for (first, count) in runs {
        report(first, count);
    }
    Ok(())
}

/// Calls `report(first, count)` for each run of whole 4 KiB pages in
/// `offset .. offset + pages * 4096` of the file `fd` (`offset` page
/// aligned) that lies in a hole, with `first` counted from `offset`.
/// `Err` when the file cannot tell (a seek fails other than for "no more
/// data"); nothing is reported then. A file system without hole tracking
/// reports everything as data, so nothing as untouched.
pub(crate) fn hole_runs(
    fd: BorrowedFd<'_>,
    offset: u64,
    pages: u64,
    report: &mut dyn FnMut(u64, u64),
) -> std::io::Result<()> {
    const PAGE: u64 = 4096;
    let end = offset + pages * PAGE;
    let mut runs = Vec::new();
    let mut at = offset;
    while at < end {
        // The next data at or after `at`; none: a hole to the end.
        let data = seek(fd, at, libc::SEEK_DATA)?.unwrap_or(end).min(end);
        // Whole pages only: a hole's edges are page aligned on shmem, but
        // a page partly in a hole is not untouched.
        let (hole_start, hole_end) = (at.next_multiple_of(PAGE), data / PAGE * PAGE);
        if hole_start < hole_end {
            runs.push(((hole_start - offset) / PAGE, (hole_end - hole_start) / PAGE));
        }
        if data >= end {
            break;
        }
        // Every offset before the end of the file lies in data or a hole:
        // `data` is before it, so a hole follows (at the end at the latest).
        at = seek(fd, data, libc::SEEK_HOLE)?.unwrap_or(end);
    }
    for (first, count) in runs {
        report(first, count);
    }
    Ok(())
}

/// `lseek(fd, at, whence)`; `None` for `ENXIO` (no data at or after `at`,
/// or `at` past the end of the file).
fn seek(fd: BorrowedFd<'_>, at: u64, whence: i32) -> std::io::Result<Option<u64>> {
    let at =
        i64::try_from(at).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an open descriptor (borrowed for the call) touches
    // no memory.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), at, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_written_through_another_mapping_are_not_holes_and_the_rest_are() {
        const PAGES: u64 = 96;
        let fd = rustix::fs::memfd_create("holes", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, PAGES * 4096).unwrap();
        // A second, independent mapping writes; the holes must show it.
        let len = (PAGES * 4096) as usize;
        // SAFETY: a fresh shared mapping of the memfd, unmapped at the end.
        let base = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .unwrap() as *mut u8;
        let written = [3u64, 4, 40, 95];
        for page in written {
            // SAFETY: inside the mapping.
            unsafe { base.add(page as usize * 4096 + 17).write(1) };
        }
        let fd_ref = std::os::fd::AsFd::as_fd(&fd);
        let mut runs = Vec::new();
        hole_runs(fd_ref, 0, PAGES, &mut |f, c| runs.push((f, c))).unwrap();
        assert_eq!(runs, vec![(0, 3), (5, 35), (41, 54)]);
        // From an offset, counted from it; the range ends before the file.
        let mut runs = Vec::new();
        hole_runs(fd_ref, 4 * 4096, 40, &mut |f, c| runs.push((f, c))).unwrap();
        assert_eq!(runs, vec![(1, 35), (37, 3)]);
        // The model: every page outside the runs was written, every page
        // inside reads zero.
        let mut untouched = vec![false; PAGES as usize];
        hole_runs(fd_ref, 0, PAGES, &mut |f, c| {
            untouched[f as usize..(f + c) as usize].fill(true)
        })
        .unwrap();
        for page in 0..PAGES {
            assert_eq!(
                untouched[page as usize],
                !written.contains(&page),
                "page {page}"
            );
        }
        // SAFETY: the mapping made above, no longer used.
        unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
    }

    #[test]
    fn pages_written_are_not_untouched_and_the_rest_are() {
        let len = 64 * 4096;
        // SAFETY: a fresh private anonymous mapping, unmapped at the end.
        let base = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .unwrap() as *mut u8;
        for page in [3usize, 4, 40] {
            // SAFETY: inside the mapping.
            unsafe { base.add(page * 4096).write(1) };
        }
        let mut runs = Vec::new();
        untouched_runs(base as usize, 64, &mut |f, c| runs.push((f, c))).unwrap();
        // SAFETY: the mapping made above, no longer used.
        unsafe { rustix::mm::munmap(base.cast(), len) }.unwrap();
        assert_eq!(runs, vec![(0, 3), (5, 35), (41, 23)]);
    }
}
