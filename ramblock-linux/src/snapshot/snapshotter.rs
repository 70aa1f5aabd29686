//! [`Snapshotter`]: full and diff snapshots of a paused guest's blocks,
//! with dirty logging left on between them.
//!
//! Each save first harvests the dirty log into each block's migration
//! bitmap and takes every dirty bit (clearing the harvested chunks in the
//! hypervisor), which ends one interval and starts the next: a diff holds
//! exactly the pages written since the snapshot before it. The snapshotter
//! keeps every page's digest from the saves before, so a diff's content
//! checksum (of the whole block) costs only the pages it saves.

use super::chain::PARENT_PATH_SECTION;
use super::error::SnapshotError;
use super::writer::{save, SaveBlock, SaveOptions, SaveSection, SaveSummary};
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Storage;
use ramblock_core::block::RamBlock;
use ramblock_core::dirty_log::{DirtyClients, DirtyLogSource};
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_core::section::SectionName;
use ramblock_core::snapshot::{Kind, Parent};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;

/// Takes a full snapshot and then diffs of the same blocks.
#[derive(Debug, Default)]
pub struct Snapshotter {
    last: Option<(PathBuf, Parent)>,
    digests: Vec<(BlockName, ByteLen, Box<[AtomicU64]>)>,
}

/// A snapshot the snapshotter could not take.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotterError {
    /// Saving failed.
    #[error(transparent)]
    Save(#[from] SnapshotError),
    /// The hypervisor's dirty log failed.
    #[error("harvesting the dirty log of block {block:?}: {message}")]
    DirtyLog {
        /// The block.
        block: String,
        /// The source's error.
        message: String,
    },
    /// A diff was asked for before a full snapshot, or of other blocks.
    #[error("a diff snapshot needs a full snapshot of the same blocks (names and lengths) taken before it by this snapshotter")]
    NoParent,
}

/// Harvests `block`'s dirty log and takes every dirty bit: the pages
/// written since the last call, one bit per page.
pub fn take_dirty<M: HostMemory, S: Storage, D: DirtyLogSource>(
    block: &RamBlock<M, S>,
    source: &mut D,
) -> Result<Vec<u64>, SnapshotterError> {
    let err = |e: D::Error| SnapshotterError::DirtyLog {
        block: block.name().to_string(),
        message: e.to_string(),
    };
    block.sync_dirty_log(source).map_err(err)?;
    let info = block.info();
    let mut words = vec![0u64; block.used_pages().div_ceil(64)];
    let mut state = block.migration();
    let mut from = 0;
    while let Some(run) = state
        .next_dirty_run(from, usize::MAX, &info, source)
        .map_err(err)?
    {
        for p in run.clone() {
            words[p / 64] |= 1 << (p % 64);
        }
        from = run.end;
    }
    Ok(words)
}

impl Snapshotter {
    /// A snapshotter with no snapshot yet.
    pub fn new() -> Snapshotter {
        Snapshotter::default()
    }

    /// The last file saved, and what a diff after it names.
    pub fn last(&self) -> Option<(&Path, Parent)> {
        self.last.as_ref().map(|(p, parent)| (p.as_path(), *parent))
    }

    /// Saves `blocks` of a paused guest to `path`: every page, or with
    /// `diff` the pages written since the last save (which it names as
    /// its parent, recording its path). Either way a new dirty interval
    /// starts.
    // The arguments are the save's inputs, none optional; a struct of them
    // would only be built to be taken apart here.
    #[allow(clippy::too_many_arguments)]
    pub fn save<M: HostMemory, S: Storage, D: DirtyLogSource>(
        &mut self,
        path: &Path,
        blocks: &[&RamBlock<M, S>],
        source: &mut D,
        sections: &[SaveSection<'_>],
        diff: bool,
        options: SaveOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<SaveSummary, SnapshotterError> {
        let dirty = blocks
            .iter()
            .map(|b| take_dirty(b, source))
            .collect::<Result<Vec<_>, _>>()?;
        let result = self.save_taken(path, blocks, &dirty, sections, diff, options, progress);
        if result.is_err() {
            // The pages taken from the dirty log were not saved: give them
            // back, so the next snapshot of this interval still has them.
            for (b, words) in blocks.iter().zip(&dirty) {
                for (w, &word) in words.iter().enumerate() {
                    for bit in (0..64).filter(|bit| word & (1 << bit) != 0) {
                        let page = (w * 64 + bit) as u64;
                        let _ = b.mark_dirty(
                            ByteLen::from_pages(page),
                            ByteLen::from_pages(1),
                            DirtyClients::MIGRATION,
                        );
                    }
                }
            }
        }
        result
    }

    /// [`Snapshotter::save`] once the dirty pages are taken.
    #[allow(clippy::too_many_arguments)]
    fn save_taken<M: HostMemory, S: Storage>(
        &mut self,
        path: &Path,
        blocks: &[&RamBlock<M, S>],
        dirty: &[Vec<u64>],
        sections: &[SaveSection<'_>],
        diff: bool,
        options: SaveOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<SaveSummary, SnapshotterError> {
        // A full snapshot starts a new digest table, kept only if it saves.
        let mut fresh = Vec::new();
        let kind = if diff {
            let parent = self.last.as_ref().ok_or(SnapshotterError::NoParent)?.1;
            let same = self.digests.len() == blocks.len()
                && self
                    .digests
                    .iter()
                    .zip(blocks)
                    .all(|((n, l, _), b)| n.as_str() == b.name() && *l == b.used_length());
            if !same {
                return Err(SnapshotterError::NoParent);
            }
            Kind::Diff(parent)
        } else {
            fresh = blocks
                .iter()
                .map(|b| {
                    let name = BlockName::new(b.name()).expect("a block's name is valid");
                    let pages = b.used_pages();
                    (
                        name,
                        b.used_length(),
                        (0..pages).map(|_| AtomicU64::new(0)).collect(),
                    )
                })
                .collect();
            Kind::Full
        };
        let digests = if diff { &self.digests } else { &fresh };
        let regions: Vec<_> = blocks.iter().map(|b| b.region()).collect();
        let save_blocks: Vec<SaveBlock<'_>> = blocks
            .iter()
            .zip(&regions)
            .zip(digests)
            .zip(dirty)
            .map(|(((b, region), (name, _, digests)), dirty)| SaveBlock {
                name: name.clone(),
                region: *region,
                page_size: b.page_size(),
                pages: diff.then_some(&dirty[..]),
                digests,
            })
            .collect();
        let parent_rel = self.last.as_ref().map(|(p, _)| relative_to(p, path));
        let mut all_sections: Vec<SaveSection<'_>> = Vec::with_capacity(sections.len() + 1);
        all_sections.extend(sections.iter().map(|s| SaveSection {
            name: s.name.clone(),
            ..*s
        }));
        if let (true, Some(rel)) = (diff, parent_rel.as_deref()) {
            all_sections.push(SaveSection {
                name: SectionName::new(PARENT_PATH_SECTION).expect("valid name"),
                instance_id: 0,
                version: 1,
                bytes: rel.as_bytes(),
            });
        }
        let summary = save(path, &save_blocks, &all_sections, kind, options, progress)?;
        drop(save_blocks);
        if !diff {
            self.digests = fresh;
        }
        self.last = Some((
            path.to_owned(),
            Parent {
                id: summary.file_id,
                checksum: summary.meta_checksum,
            },
        ));
        Ok(summary)
    }
}

/// `parent` as a path relative to `child`'s directory when it is in the
/// same directory, else as given.
pub(crate) fn relative_to(parent: &Path, child: &Path) -> String {
    let same_dir = parent.parent() == child.parent();
    match (same_dir, parent.file_name()) {
        (true, Some(name)) => name.to_string_lossy().into_owned(),
        _ => std::fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_owned())
            .to_string_lossy()
            .into_owned(),
    }
}
