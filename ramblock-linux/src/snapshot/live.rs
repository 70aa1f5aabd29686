//! [`LiveSave`]: a snapshot of memory that writers keep writing, as it was
//! at one instant (copy-before-write over synchronous userfaultfd
//! write-protect, [`crate::live_copy`]).
//!
//! The caller pauses its guest, captures its state sections, and calls
//! [`LiveSave::start`]: the file is created and every block is
//! write-protected. That is the instant the file shows. The caller resumes
//! its guest and calls [`LiveSave::run`], which saves each block on a
//! thread of its own with a [`LiveCopy`]:
//! - a page not yet saved that a writer writes to stops the writer in a
//!   write-protect fault; the block's thread saves that page first (its
//!   old content, still protected), then un-protects it, which wakes the
//!   writer, whose write then proceeds;
//! - otherwise the thread saves the next unsaved run of pages in address
//!   order and un-protects it.
//!
//! One thread per block, so a writer faulting in one block does not wait
//! behind the copy of another. Pages go to the file exactly as [`save`]
//! writes them (the same layout, digests and zero-page holes: both write
//! through one helper, straight from guest memory with `pwritev(2)`); the
//! metadata is written last. The result is a full snapshot that
//! [`super::SnapshotFile`], [`super::restore_eager`] and the others read
//! like any other.
//!
//! What it cannot see is what write-protection cannot: writes through
//! another mapping of the same memory (a memfd mapped twice, a file's
//! other users), DMA into pinned pages and `O_DIRECT` reads into guest
//! memory change a page without a fault, so a page written that way
//! before it is saved holds the new content. KVM's writes go through the
//! memslot's userspace mapping and are seen. State that is not in these
//! blocks must be captured by the caller while its guest is paused.
//!
//! [`save`]: super::save

use super::error::SnapshotError;
use super::writer::{plan_for, Output, Plan, SaveOptions, SaveSection, SaveSummary, Shape, Totals};
use crate::live_copy::{LiveCopy, LiveCopyStats};
use crate::memory::LinuxMemory;
use ramblock_core::addr::PageSize;
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_core::snapshot::Kind;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

const PAGE: u64 = 4096;

/// One block to save live.
#[derive(Debug)]
pub struct LiveBlock<'a> {
    /// The block's name.
    pub name: BlockName,
    /// Its memory: anonymous, memfd or hugetlb (what [`LiveCopy`]
    /// supports); all of its used length is saved.
    pub memory: &'a LinuxMemory,
}

/// What a live save did.
#[derive(Clone, Debug)]
pub struct LiveSaveSummary {
    /// The file, as [`super::save`] reports it; its `elapsed` runs from
    /// [`LiveSave::start`] (the instant) to the metadata written.
    pub save: SaveSummary,
    /// Per block, what its copy did: faults, pages saved ahead of a
    /// writer, and each fault's service time (from reading the event to
    /// waking the writer: the part of the writer's stall this side
    /// controls, not the kernel's fault entry and wake-up around it).
    pub copies: Vec<LiveCopyStats>,
}

/// A live save in progress: the instant taken, the pages still to save;
/// see the module docs. Dropped without [`LiveSave::run`], it un-protects
/// the memory (waking any writer stopped in a fault) and leaves an
/// incomplete file that no reader accepts.
#[derive(Debug)]
pub struct LiveSave<'a> {
    out: Output<'a>,
    plan: Plan,
    names: Vec<BlockName>,
    page_sizes: Vec<PageSize>,
    copies: Vec<LiveCopy<'a>>,
    sections: &'a [SaveSection<'a>],
    sync: bool,
    started: Instant,
}

impl<'a> LiveSave<'a> {
    /// Creates the file at `path` (replacing one there) for `blocks` and
    /// `sections`, then write-protects every block: the instant the file
    /// shows. Writers may run again as soon as this returns; their writes
    /// to pages not yet saved stop until [`LiveSave::run`] saves them.
    ///
    /// Creating the file is part of the instant, so a caller whose writers
    /// are paused removes an old file at `path` beforehand (truncating a
    /// large one frees its blocks, which takes time).
    ///
    /// `options.direct` and `options.sync` apply as for [`super::save`];
    /// `options.threads` does not (one thread per block). A kernel without
    /// write-protection of unpopulated memory is
    /// [`SnapshotError::LiveCopy`] with
    /// [`crate::live_copy::LiveCopyError::KernelLacks`].
    pub fn start(
        path: &'a Path,
        blocks: &[LiveBlock<'a>],
        sections: &'a [SaveSection<'a>],
        options: SaveOptions,
    ) -> Result<LiveSave<'a>, SnapshotError> {
        let shapes: Vec<Shape<'_>> = blocks
            .iter()
            .map(|b| Shape {
                name: &b.name,
                len: b.memory.used_len().0,
                page_size: b.memory.page_size(),
            })
            .collect();
        let plan = plan_for(&shapes, sections)?;
        let out = Output::create(path, &plan, options.direct)?;
        // Protection last: the guest is stopped for as short as can be.
        let started = Instant::now();
        let copies = blocks
            .iter()
            .map(|b| {
                LiveCopy::start(b.memory).map_err(|error| SnapshotError::LiveCopy {
                    block: b.name.to_string(),
                    error,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LiveSave {
            out,
            plan,
            names: blocks.iter().map(|b| b.name.clone()).collect(),
            page_sizes: shapes.iter().map(|s| s.page_size).collect(),
            copies,
            sections,
            sync: options.sync,
            started,
        })
    }

    /// Saves every block as it was at [`LiveSave::start`], each on its own
    /// thread, serving writers' faults first, then writes the metadata.
    /// `progress` is called from those threads with the bytes of memory
    /// saved so far. When it returns, nothing is protected any more.
    pub fn run(self, progress: &(dyn Fn(u64) + Sync)) -> Result<LiveSaveSummary, SnapshotError> {
        let LiveSave {
            out,
            plan,
            names,
            page_sizes,
            copies,
            sections,
            sync,
            started,
        } = self;
        let digests: Vec<Vec<AtomicU64>> = copies
            .iter()
            .zip(&page_sizes)
            .map(|(c, p)| {
                let pages = c.pages() as u64 * p.bytes() / PAGE;
                (0..pages).map(|_| AtomicU64::new(0)).collect()
            })
            .collect();
        let totals: Vec<Totals> = copies.iter().map(|_| Totals::default()).collect();
        let done = AtomicU64::new(0);
        let copy_block = |i: usize, copy: LiveCopy<'a>| -> Result<LiveCopyStats, SnapshotError> {
            // The writer's own error, kept typed while the copy carries
            // only an io::Error back.
            let failed: Mutex<Option<SnapshotError>> = Mutex::new(None);
            let result = copy.run_regions(|offset, pages| {
                out.save_pages(
                    pages,
                    offset / PAGE,
                    plan.data_at[i],
                    None,
                    &digests[i],
                    &totals[i],
                )
                .map_err(|e| {
                    let msg = e.to_string();
                    *failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                    std::io::Error::other(msg)
                })?;
                let len = pages.len() as u64;
                progress(done.fetch_add(len, Ordering::Relaxed) + len);
                Ok(())
            });
            result.map_err(|error| {
                failed
                    .into_inner()
                    .unwrap_or_else(|p| p.into_inner())
                    .unwrap_or(SnapshotError::LiveCopy {
                        block: names[i].to_string(),
                        error,
                    })
            })
        };
        let copies = std::thread::scope(|s| {
            let handles: Vec<_> = copies
                .into_iter()
                .enumerate()
                .map(|(i, copy)| s.spawn(move || copy_block(i, copy)))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or(Err(SnapshotError::WorkerPanicked)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        let shapes: Vec<Shape<'_>> = names
            .iter()
            .zip(&page_sizes)
            .zip(&digests)
            .map(|((name, &page_size), d)| Shape {
                name,
                len: d.len() as u64 * PAGE,
                page_size,
            })
            .collect();
        let digest_tables: Vec<&[AtomicU64]> = digests.iter().map(|d| d.as_slice()).collect();
        let save = out.finish(
            &plan,
            Kind::Full,
            &shapes,
            &vec![None; shapes.len()],
            &digest_tables,
            &totals,
            sections,
            sync,
            started,
        )?;
        Ok(LiveSaveSummary { save, copies })
    }
}

/// [`LiveSave::start`] then [`LiveSave::run`]: a live save whose instant is
/// this call, for callers with nothing to resume in between (writers that
/// were never paused).
pub fn save_live(
    path: &Path,
    blocks: &[LiveBlock<'_>],
    sections: &[SaveSection<'_>],
    options: SaveOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<LiveSaveSummary, SnapshotError> {
    LiveSave::start(path, blocks, sections, options)?.run(progress)
}
