//! Eager and mapped restore, and checking restored memory.
//!
//! - [`restore_eager`] reads every page into memory the caller prepared
//!   (preallocated, so reading does not also fault pages in), several
//!   threads each taking 4 MiB chunks; a page comes from the newest file of
//!   the chain holding it, runs of pages from one file in one `preadv(2)`.
//! - [`map_block`] maps the root file's data for a block `MAP_PRIVATE` as
//!   new memory: nothing is read up front, the page cache serves faults,
//!   and writes are copied on write. A diff's pages are then read over the
//!   mapping (they become private copies). A hugepage block needs its root
//!   file on a hugetlbfs of the same page size.

use super::chain::SnapshotChain;
use super::error::SnapshotError;
use super::file::SnapshotFile;
use crate::{LinuxMemory, MemoryBuilder};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::checksum::Checksum;
use ramblock_core::host::HostMemory;
use ramblock_core::region::HostRegion;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
const CHUNK_PAGES: u64 = 1024;

/// Memory to restore one block into.
#[derive(Copy, Clone, Debug)]
pub struct RestoreTarget<'a> {
    /// The block's name in the snapshot.
    pub name: &'a str,
    /// Its memory, exactly the block's used length.
    pub region: HostRegion<'a>,
    /// The memory's page size (must equal the block's).
    pub page_size: PageSize,
}

/// What an eager restore did.
#[derive(Copy, Clone, Debug)]
pub struct RestoreSummary {
    /// Bytes read from files.
    pub bytes_read: u64,
    /// How long it took.
    pub elapsed: Duration,
}

/// The block index in `chain` of each target, after checking that the
/// targets are exactly the chain's blocks and fit them.
pub(crate) fn match_targets(
    chain: &SnapshotChain,
    targets: &[(&str, u64, PageSize)],
) -> Result<Vec<usize>, SnapshotError> {
    let blocks = chain.blocks();
    for b in blocks {
        if !targets.iter().any(|t| t.0 == b.name.as_str()) {
            return Err(SnapshotError::MissingBlock {
                name: b.name.to_string(),
                side: "targets",
            });
        }
    }
    targets
        .iter()
        .map(|&(name, len, page)| {
            let i = snapshot_block(chain.newest(), name)?;
            let b = &blocks[i];
            if b.used_length.0 != len || b.page_size != page {
                return Err(SnapshotError::TargetSize {
                    name: name.to_owned(),
                    snapshot_len: b.used_length.0,
                    snapshot_page: b.page_size.bytes(),
                    target_len: len,
                    target_page: page.bytes(),
                });
            }
            Ok(i)
        })
        .collect()
}

/// Reads pages `first..end` of block `block` into `region` (which holds
/// the whole block), each from the newest file holding it. Returns bytes read.
pub(crate) fn fill_range(
    chain: &SnapshotChain,
    block: usize,
    region: &HostRegion<'_>,
    first: u64,
    end: u64,
) -> Result<u64, SnapshotError> {
    let mut page = first;
    while page < end {
        let owner = chain.owner(block, page);
        let mut run_end = page + 1;
        while run_end < end && chain.owner(block, run_end) == owner {
            run_end += 1;
        }
        let sub = region.subregion(ByteLen(page * PAGE), ((run_end - page) * PAGE) as usize)?;
        chain.files()[owner].read_pages(block, page, &sub)?;
        page = run_end;
    }
    Ok((end - first) * PAGE)
}

/// Restores every block of `chain` into `targets` (one per block) with
/// `threads` threads; `progress` gets the bytes done so far.
pub fn restore_eager(
    chain: &SnapshotChain,
    targets: &[RestoreTarget<'_>],
    threads: usize,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<RestoreSummary, SnapshotError> {
    let start = Instant::now();
    let index = match_targets(
        chain,
        &targets
            .iter()
            .map(|t| (t.name, t.region.len() as u64, t.page_size))
            .collect::<Vec<_>>(),
    )?;
    let chunks: Vec<(usize, u64)> = targets
        .iter()
        .enumerate()
        .flat_map(|(t, target)| {
            let pages = target.region.len() as u64 / PAGE;
            (0..pages.div_ceil(CHUNK_PAGES)).map(move |c| (t, c * CHUNK_PAGES))
        })
        .collect();
    let next = AtomicUsize::new(0);
    let read = AtomicU64::new(0);
    let worker = || -> Result<(), SnapshotError> {
        while let Some(&(t, first)) = chunks.get(next.fetch_add(1, Ordering::Relaxed)) {
            let region = &targets[t].region;
            let end = (first + CHUNK_PAGES).min(region.len() as u64 / PAGE);
            let n = fill_range(chain, index[t], region, first, end)?;
            progress(read.fetch_add(n, Ordering::Relaxed) + n);
        }
        Ok(())
    };
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads.max(1).min(chunks.len().max(1)))
            .map(|_| s.spawn(worker))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or(Err(SnapshotError::WorkerPanicked)))
            .collect::<Result<Vec<()>, _>>()
    })?;
    Ok(RestoreSummary {
        bytes_read: read.load(Ordering::Relaxed),
        elapsed: start.elapsed(),
    })
}

/// Maps block `name` of `chain` as new private memory (see the module docs).
pub fn map_block(chain: &SnapshotChain, name: &str) -> Result<LinuxMemory, SnapshotError> {
    let root = chain.files().last().expect("a chain is not empty");
    let block = snapshot_block(root, name)?;
    let entry = &root.blocks()[block];
    let mem = MemoryBuilder::file(root.path(), entry.used_length)
        .offset(entry.data_offset)
        .shared(false)
        .read_only_fd(true)
        .name(name)
        .build()?;
    if mem.page_size() != entry.page_size {
        return Err(SnapshotError::CannotMap {
            name: name.to_owned(),
            path: root.path().to_owned(),
            why: if entry.page_size.bytes() > PAGE {
                "a hugepage block maps only from a file on hugetlbfs of its page size"
            } else {
                "a 4 KiB block does not map from hugetlbfs"
            },
        });
    }
    if chain.files().len() > 1 {
        let region = mem.region();
        let pages = entry.pages();
        let mut page = 0;
        while page < pages {
            let owner = chain.owner(block, page);
            if owner == chain.files().len() - 1 {
                page += 1;
                continue;
            }
            let mut end = page + 1;
            while end < pages && chain.owner(block, end) == owner {
                end += 1;
            }
            let sub = region.subregion(ByteLen(page * PAGE), ((end - page) * PAGE) as usize)?;
            chain.files()[owner].read_pages(block, page, &sub)?;
            page = end;
        }
    }
    Ok(mem)
}

/// Checks that `region`, restored from `chain`'s block `name`, has the
/// block's content checksum (that of the guest's memory when saved).
pub fn verify_block(
    chain: &SnapshotChain,
    name: &str,
    region: &HostRegion<'_>,
) -> Result<(), SnapshotError> {
    let i = snapshot_block(chain.newest(), name)?;
    let b = &chain.blocks()[i];
    let computed = Checksum::of_region(region, b.used_length.0)?;
    if computed != b.content_checksum {
        return Err(SnapshotError::ContentChecksum {
            block: name.to_owned(),
            expected: b.content_checksum,
            computed,
        });
    }
    Ok(())
}

/// The index of block `name` in `file`'s table, or the typed error naming
/// the snapshot as the side that lacks it.
fn snapshot_block(file: &SnapshotFile, name: &str) -> Result<usize, SnapshotError> {
    file.find_block(name)
        .ok_or_else(|| SnapshotError::MissingBlock {
            name: name.to_owned(),
            side: "snapshot",
        })
}
