//! [`merge`]: folds a chain into one full snapshot.
//!
//! The result holds, for every page, the newest chain file's copy of it;
//! its blocks' content checksums are the newest file's (the memory they
//! describe is the same), and as a full snapshot its data checksums equal
//! them. Pages move from file to file with `copy_file_range(2)` in the
//! kernel, and only the data segments of each run (`SEEK_DATA`/`SEEK_HOLE`),
//! so holes stay holes.

use super::chain::{SnapshotChain, PARENT_PATH_SECTION};
use super::error::SnapshotError;
use super::io::random_id;
use super::writer::{create_sized, Plan, SaveSection, SaveSummary};
use ramblock_core::section::SectionName;
use ramblock_core::snapshot::{BlockEntry, Kind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

const PAGE: u64 = 4096;

/// Writes `chain` as one full snapshot at `out`.
pub fn merge(chain: &SnapshotChain, out: &Path) -> Result<SaveSummary, SnapshotError> {
    let start = Instant::now();
    let newest = chain.newest();
    let names: Vec<SectionName> = newest
        .sections()
        .iter()
        .map(|s| s.header.name.clone())
        .collect();
    let sections: Vec<SaveSection<'_>> = newest
        .sections()
        .iter()
        .zip(names)
        .filter(|(s, _)| s.header.name.as_str() != PARENT_PATH_SECTION)
        .map(|(s, name)| SaveSection {
            name,
            instance_id: s.header.instance_id,
            version: s.header.version,
            bytes: newest
                .section(s.header.name.as_str(), s.header.instance_id)
                .unwrap_or_default(),
        })
        .collect();
    let blocks = chain.blocks();
    let plan = Plan::for_sections(
        &blocks
            .iter()
            .map(|b| (b.used_length, b.page_size))
            .collect::<Vec<_>>(),
        &sections,
    )?;
    let file = create_sized(
        out,
        plan.data_end,
        "the output's directory must be writable",
    )?;
    let mut written = 0u64;
    for (bi, b) in blocks.iter().enumerate() {
        let pages = b.pages();
        let mut page = 0;
        while page < pages {
            let owner = chain.owner(bi, page);
            let mut end = page + 1;
            while end < pages && chain.owner(bi, end) == owner {
                end += 1;
            }
            let src = &chain.files()[owner];
            let src_at = src.blocks()[bi].data_offset + page * PAGE;
            let dst_at = plan.data_at[bi] + page * PAGE;
            written +=
                copy_data(src.file(), src_at, &file, dst_at, (end - page) * PAGE).map_err(|e| {
                    SnapshotError::io(
                        "copy_file_range",
                        out,
                        e,
                        "the output's filesystem must have space",
                    )
                })?;
            page = end;
        }
    }
    let entries: Vec<BlockEntry> = blocks
        .iter()
        .enumerate()
        .map(|(i, b)| BlockEntry {
            bitmap_offset: plan.bitmap_at[i],
            data_offset: plan.data_at[i],
            held_pages: b.pages(),
            data_checksum: b.content_checksum,
            ..b.clone()
        })
        .collect();
    let file_id = random_id()
        .map_err(|e| SnapshotError::io("getrandom", out, e, "the kernel must offer randomness"))?;
    let (meta, meta_checksum) =
        plan.encode(Kind::Full, file_id, &entries, &sections, |_, _| u64::MAX);
    file.write_all_at(&meta, 0).map_err(|e| {
        SnapshotError::io("pwrite", out, e, "the output's filesystem must have space")
    })?;
    Ok(SaveSummary {
        path: out.to_owned(),
        file_id,
        meta_checksum,
        bytes_written: written,
        pages_held: entries.iter().map(|e| e.held_pages).sum(),
        zero_pages: 0,
        file_len: plan.data_end,
        content_checksums: entries.iter().map(|e| e.content_checksum).collect(),
        elapsed: start.elapsed(),
    })
}

/// Copies the data segments of `len` bytes at `src_at` of `src` to the
/// same place relative to `dst_at` in `dst`, leaving holes; returns the
/// bytes copied.
fn copy_data(
    src: &std::fs::File,
    src_at: u64,
    dst: &std::fs::File,
    dst_at: u64,
    len: u64,
) -> std::io::Result<u64> {
    let end = src_at + len;
    let mut at = src_at;
    let mut copied = 0;
    while at < end {
        let Some(data) = seek(src, at, libc::SEEK_DATA)? else {
            break;
        };
        if data >= end {
            break;
        }
        let hole = seek(src, data, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
        let mut from = data as i64;
        let mut to = (dst_at + (data - src_at)) as i64;
        let mut left = (hole - data) as usize;
        while left > 0 {
            // SAFETY: both offsets point at locals the call updates; the
            // descriptors are open files borrowed for the call.
            let n = unsafe {
                libc::copy_file_range(
                    src.as_raw_fd(),
                    &mut from,
                    dst.as_raw_fd(),
                    &mut to,
                    left,
                    0,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            left -= n as usize;
            copied += n as u64;
        }
        at = hole;
    }
    Ok(copied)
}

/// `lseek(fd, at, whence)`; `None` when there is no more data (`ENXIO`).
fn seek(file: &std::fs::File, at: u64, whence: i32) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an open descriptor touches no memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), at as i64, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}
