//! Snapshot files: a guest's RAM saved to a file, full or as a diff of the
//! pages written since the snapshot before, and restored eagerly, by
//! mapping the file, or lazily on fault.
//!
//! The layout is the core's [`ramblock_core::snapshot`] (see
//! `docs/snapshot-format.md`): a page's place in the file is computed, zero
//! pages are holes, hugepage blocks' data is aligned for mapping from
//! hugetlbfs.
//!
//! - [`save`] writes blocks from guest memory with `pwritev(2)` on several
//!   threads (optionally `O_DIRECT`); [`Snapshotter`] takes a full
//!   snapshot and then diffs over the dirty log; [`LiveSave`] saves memory
//!   that writers keep writing, as it was at one instant (copy-before-write).
//! - [`SnapshotFile`] opens one file and checks every field;
//!   [`SnapshotChain`] opens a diff with its parents, each link checked.
//! - [`restore_eager`], [`map_block`] and [`restore_lazy`] restore;
//!   [`verify_block`] checks restored memory against the saved checksum.
//! - [`merge`] folds a chain into one full snapshot; [`copy_to_hugetlbfs`]
//!   puts a copy on hugetlbfs so its hugepage blocks can be mapped.
#![allow(unsafe_code)]

mod chain;
mod error;
mod file;
mod hugetlbfs;
pub mod io;
mod lazy;
mod live;
mod merge;
mod restore;
mod snapshotter;
mod writer;

pub use chain::{SnapshotChain, MAX_CHAIN, PARENT_PATH_SECTION};
pub use error::SnapshotError;
pub use file::SnapshotFile;
pub use hugetlbfs::copy_to_hugetlbfs;
pub use lazy::{restore_lazy, LazyOptions, LazyProgress, LazyStats};
pub use live::{save_live, LiveBlock, LiveSave, LiveSaveSummary};
pub use merge::merge;
pub use restore::{map_block, restore_eager, verify_block, RestoreSummary, RestoreTarget};
pub use snapshotter::{take_dirty, Snapshotter, SnapshotterError};
pub use writer::{save, SaveBlock, SaveOptions, SaveSection, SaveSummary};
