//! [`SnapshotError`]: what saving, reading, merging or restoring a snapshot
//! can fail on.

use crate::uffd::UffdError;
use ramblock_core::region::RegionError;
use ramblock_core::snapshot::FormatError;
use std::io;
use std::path::PathBuf;

/// A snapshot operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A system call on a snapshot file failed.
    #[error("{op} {path}: {source}; {hint}")]
    Io {
        /// The call (`open`, `pread`, `pwritev`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error, with its errno.
        source: io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// The file's metadata is malformed.
    #[error("{path}: {error}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: FormatError,
    },
    /// A diff snapshot's parent is not the file it names.
    #[error("{path} names parent id {expected_id:02x?} with checksum {expected_checksum:#018x}, but {parent:?} is id {found_id:02x?} with checksum {found_checksum:#018x}; give the file it was saved after")]
    WrongParent {
        /// The diff snapshot.
        path: PathBuf,
        /// The file offered as its parent.
        parent: PathBuf,
        /// The parent id the diff names.
        expected_id: [u8; 16],
        /// The parent checksum the diff names.
        expected_checksum: u64,
        /// The offered file's id.
        found_id: [u8; 16],
        /// The offered file's metadata checksum.
        found_checksum: u64,
    },
    /// A diff snapshot does not record where its parent is, and none was given.
    #[error("{path} is a diff snapshot that does not record its parent's path; open the chain with its files listed")]
    NoParentPath {
        /// The diff snapshot.
        path: PathBuf,
    },
    /// A chain has no full snapshot at its root, or is longer than allowed.
    #[error("snapshot chain ending at {path} is {len} files long or has no full snapshot at its root; at most {max} files")]
    BadChain {
        /// The newest file.
        path: PathBuf,
        /// Files followed.
        len: usize,
        /// The most allowed.
        max: usize,
    },
    /// Two files of a chain describe a block differently.
    #[error("{path}: block {index} is {found}, its parent has {expected}; a diff must be saved from the same blocks as its parent")]
    ChainMismatch {
        /// The file that differs.
        path: PathBuf,
        /// The block's index.
        index: u32,
        /// What this file says.
        found: String,
        /// What the parent says.
        expected: String,
    },
    /// A block's data does not match its checksum.
    #[error("{path}: block {block:?}'s data checksum is {computed:#018x}, the file says {found:#018x}; the file is corrupt")]
    DataChecksum {
        /// The file.
        path: PathBuf,
        /// The block.
        block: String,
        /// The checksum in the file.
        found: u64,
        /// The checksum of its data.
        computed: u64,
    },
    /// Restored memory does not match the block's saved content checksum.
    #[error("restored block {block:?} has checksum {computed:#018x}, the snapshot says {expected:#018x}")]
    ContentChecksum {
        /// The block.
        block: String,
        /// The content checksum in the snapshot.
        expected: u64,
        /// The checksum of the restored memory.
        computed: u64,
    },
    /// A block to save or restore is not in the snapshot, or not among the targets.
    #[error("block {name:?} is not in the {side}; save and restore the same blocks")]
    MissingBlock {
        /// The block.
        name: String,
        /// Where it is missing (`snapshot`, `targets`).
        side: &'static str,
    },
    /// The memory to restore into does not fit the block.
    #[error("block {name:?} is {snapshot_len:#x} bytes with {snapshot_page:#x}-byte pages in the snapshot, the target is {target_len:#x} bytes with {target_page:#x}-byte pages; make them equal")]
    TargetSize {
        /// The block.
        name: String,
        /// Its used length in the snapshot.
        snapshot_len: u64,
        /// Its page size in the snapshot.
        snapshot_page: u64,
        /// The target's length.
        target_len: u64,
        /// The target's page size.
        target_page: u64,
    },
    /// A block to save is not usable (bitmap or digest table too small,
    /// length not whole pages, two blocks of one name).
    #[error("block {name:?} cannot be saved: {why}")]
    BadBlock {
        /// The block.
        name: String,
        /// Why.
        why: &'static str,
    },
    /// Too many blocks or sections, or an invalid section.
    #[error("snapshot layout: {0}")]
    Layout(FormatError),
    /// Memory could not be accessed.
    #[error("guest memory: {0}")]
    Region(#[from] RegionError),
    /// Building the memory for an mmap restore failed.
    #[error("mapping the snapshot: {0}")]
    Memory(#[from] crate::Error),
    /// userfaultfd failed in a lazy restore.
    #[error("lazy restore: {0}")]
    Uffd(#[from] UffdError),
    /// A mapping cannot be made for this block (its file is not on the
    /// block's kind of filesystem, or its data is not page aligned).
    #[error("block {name:?} cannot be mapped from {path}: {why}")]
    CannotMap {
        /// The block.
        name: String,
        /// The file.
        path: PathBuf,
        /// Why.
        why: &'static str,
    },
    /// A live save's copy of a block failed (the kernel lacks what it
    /// needs, userfaultfd failed, or an unexpected fault arrived).
    #[error("live copy of block {block:?}: {error}")]
    LiveCopy {
        /// The block.
        block: String,
        /// What failed.
        error: crate::live_copy::LiveCopyError,
    },
    /// A worker thread panicked (a bug).
    #[error("a snapshot worker thread panicked")]
    WorkerPanicked,
}

impl SnapshotError {
    pub(crate) fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
        source: io::Error,
        hint: &'static str,
    ) -> SnapshotError {
        SnapshotError::Io {
            op,
            path: path.into(),
            source,
            hint,
        }
    }
}
