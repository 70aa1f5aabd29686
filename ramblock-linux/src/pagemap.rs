//! Which pages of private anonymous memory were never touched, from
//! `/proc/self/pagemap`: a page neither present nor swapped has never been
//! written (or was discarded since), so it reads as zero. One 8-byte entry
//! per 4 KiB page; a 1 GiB range is 2 MiB of entries, read in chunks.

use std::fs::File;
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

#[cfg(test)]
mod tests {
    use super::*;

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
