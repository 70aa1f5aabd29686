//! [`SnapshotChain`]: a diff snapshot with its parents back to a full one,
//! each link checked, and the newest file holding each page.

use super::error::SnapshotError;
use super::file::SnapshotFile;
use ramblock_core::snapshot::{BlockEntry, Kind};
use std::path::{Path, PathBuf};

/// The most files a chain may have (a full snapshot and 63 diffs).
pub const MAX_CHAIN: usize = 64;

/// The section in which a diff snapshot records its parent's path
/// (relative to the diff's directory when the parent is in it).
pub const PARENT_PATH_SECTION: &str = "ramblock.parent-path";

/// A chain of snapshot files, newest first, ending in a full snapshot.
#[derive(Debug)]
pub struct SnapshotChain {
    files: Vec<SnapshotFile>,
}

impl SnapshotChain {
    /// Opens the snapshot at `path` and, while it is a diff, the parent
    /// its [`PARENT_PATH_SECTION`] names.
    pub fn open(path: impl AsRef<Path>) -> Result<SnapshotChain, SnapshotError> {
        let path = path.as_ref();
        let mut files = vec![SnapshotFile::open(path)?];
        loop {
            let last = files.last().expect("not empty");
            if !last.is_diff() {
                break;
            }
            if files.len() >= MAX_CHAIN {
                return Err(SnapshotError::BadChain {
                    path: path.to_owned(),
                    len: files.len(),
                    max: MAX_CHAIN,
                });
            }
            let parent = parent_path(last)?;
            files.push(SnapshotFile::open(parent)?);
        }
        Self::from_files(files)
    }

    /// A chain of files given newest first; each diff's parent must be the
    /// next file, the last must be a full snapshot, and all must hold the
    /// same blocks.
    pub fn from_files(files: Vec<SnapshotFile>) -> Result<SnapshotChain, SnapshotError> {
        let Some(root) = files.last() else {
            return Err(SnapshotError::BadChain {
                path: PathBuf::new(),
                len: 0,
                max: MAX_CHAIN,
            });
        };
        if root.is_diff() || files.len() > MAX_CHAIN {
            return Err(SnapshotError::BadChain {
                path: files[0].path().to_owned(),
                len: files.len(),
                max: MAX_CHAIN,
            });
        }
        for pair in files.windows(2) {
            check_link(&pair[0], &pair[1])?;
        }
        Ok(SnapshotChain { files })
    }

    /// The files, newest first.
    pub fn files(&self) -> &[SnapshotFile] {
        &self.files
    }

    /// The newest file.
    pub fn newest(&self) -> &SnapshotFile {
        &self.files[0]
    }

    /// The blocks (the same in every file).
    pub fn blocks(&self) -> &[BlockEntry] {
        self.files[0].blocks()
    }

    /// The index (in [`SnapshotChain::files`]) of the newest file holding
    /// page `page` of block `block`; every page has one (the root holds all).
    pub fn owner(&self, block: usize, page: u64) -> usize {
        self.files
            .iter()
            .position(|f| f.holds(block, page))
            .unwrap_or(self.files.len() - 1)
    }
}

/// The parent path a diff records, resolved against its directory.
fn parent_path(file: &SnapshotFile) -> Result<PathBuf, SnapshotError> {
    let no = || SnapshotError::NoParentPath {
        path: file.path().to_owned(),
    };
    let bytes = file.section(PARENT_PATH_SECTION, 0).ok_or_else(no)?;
    let rel = std::str::from_utf8(bytes).map_err(|_| no())?;
    let rel = Path::new(rel);
    Ok(match file.path().parent() {
        Some(dir) if rel.is_relative() => dir.join(rel),
        _ => rel.to_owned(),
    })
}

/// Checks that `parent` is the file `child` was saved after.
fn check_link(child: &SnapshotFile, parent: &SnapshotFile) -> Result<(), SnapshotError> {
    let Kind::Diff(p) = child.header().kind else {
        return Err(SnapshotError::BadChain {
            path: child.path().to_owned(),
            len: 0,
            max: MAX_CHAIN,
        });
    };
    let (id, sum) = (parent.header().file_id, parent.header().meta_checksum);
    if p.id != id || p.checksum != sum {
        return Err(SnapshotError::WrongParent {
            path: child.path().to_owned(),
            parent: parent.path().to_owned(),
            expected_id: p.id,
            expected_checksum: p.checksum,
            found_id: id,
            found_checksum: sum,
        });
    }
    let describe = |b: &BlockEntry| {
        format!(
            "{:?} of {:#x} bytes in {} pages",
            b.name, b.used_length.0, b.page_size
        )
    };
    let (cb, pb) = (child.blocks(), parent.blocks());
    for i in 0..cb.len().max(pb.len()) {
        let (c, p) = (cb.get(i), pb.get(i));
        let same = matches!((c, p), (Some(c), Some(p)) if c.name == p.name && c.used_length == p.used_length && c.page_size == p.page_size);
        if !same {
            return Err(SnapshotError::ChainMismatch {
                path: child.path().to_owned(),
                index: i as u32,
                found: c.map_or("absent".into(), describe),
                expected: p.map_or("absent".into(), describe),
            });
        }
    }
    Ok(())
}
