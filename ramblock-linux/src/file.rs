//! File-backed memory: a file (or an unlinked temporary file in a
//! directory), on any filesystem including hugetlbfs and DAX.
//!
//! The page size comes from the filesystem: hugetlbfs reports its hugepage
//! size as the block size in `fstatfs`; everything else uses the host page.
//! A file smaller than `offset + max_length` is extended; a larger one is
//! left alone (the rest of it may belong to something else).

use crate::error::Error;
use crate::hugetlb::HUGETLBFS_MAGIC;
use crate::mmap::host_page_size;
use ramblock_core::addr::PageSize;
use rustix::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// An open backing file.
#[derive(Debug)]
pub(crate) struct Backing {
    pub fd: OwnedFd,
    /// The path given (the directory, for a temporary file).
    pub path: PathBuf,
    pub page_size: PageSize,
    pub hugetlbfs: bool,
}

fn file_err(call: &'static str, path: &Path, e: std::io::Error, hint: &'static str) -> Error {
    Error::File {
        call,
        path: path.to_owned(),
        errno: rustix::io::Errno::from_io_error(&e).unwrap_or(rustix::io::Errno::IO),
        hint,
    }
}

/// Opens `path`: the file itself, or a new unlinked file if it is a
/// directory. `read_only_fd` opens an existing file `O_RDONLY`.
pub(crate) fn open(path: &Path, read_only_fd: bool, name: &str) -> Result<Backing, Error> {
    let is_dir = path.is_dir();
    let file = if is_dir {
        create_temporary(path, name)?
    } else {
        std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only_fd)
            .create(!read_only_fd)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                file_err(
                    "open",
                    path,
                    e,
                    "the file must exist (or its directory be writable) and be readable, and writable unless read_only_fd",
                )
            })?
    };
    inspect(OwnedFd::from(file), path)
}

/// The page size and filesystem of an open file (`path` names it in
/// errors).
pub(crate) fn inspect(fd: OwnedFd, path: &Path) -> Result<Backing, Error> {
    let stat = rustix::fs::fstatfs(&fd).map_err(|e| Error::File {
        call: "fstatfs",
        path: path.to_owned(),
        errno: e,
        hint: "the filesystem must support statfs",
    })?;
    let hugetlbfs = stat.f_type as i64 == HUGETLBFS_MAGIC;
    let page_size = if hugetlbfs {
        PageSize::new(stat.f_bsize as u64).map_err(|_| Error::File {
            call: "fstatfs",
            path: path.to_owned(),
            errno: rustix::io::Errno::INVAL,
            hint: "hugetlbfs reported a block size that is not a page size; check the mount's pagesize= option",
        })?
    } else {
        host_page_size()
    };
    Ok(Backing {
        fd,
        path: path.to_owned(),
        page_size,
        hugetlbfs,
    })
}

/// Creates a uniquely named file in `dir` and unlinks it at once, so it
/// vanishes with the last mapping.
fn create_temporary(dir: &Path, name: &str) -> Result<std::fs::File, Error> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    for _ in 0..16 {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("ramblock-{safe}-{}-{n}", std::process::id()));
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path).map_err(|e| {
                    file_err(
                        "unlink",
                        &path,
                        e,
                        "the directory must allow removing files",
                    )
                })?;
                return Ok(file);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(file_err(
                    "open(O_CREAT|O_EXCL)",
                    dir,
                    e,
                    "the directory must be writable and on a filesystem that can hold the memory",
                ))
            }
        }
    }
    Err(Error::File {
        call: "open(O_CREAT|O_EXCL)",
        path: dir.to_owned(),
        errno: rustix::io::Errno::EXIST,
        hint: "could not find a free temporary name; clean out stale ramblock-* files",
    })
}

/// Extends the file to `needed` bytes if it is shorter; a longer file is
/// left alone.
pub(crate) fn ensure_size(backing: &Backing, needed: u64, read_only_fd: bool) -> Result<(), Error> {
    let stat = rustix::fs::fstat(&backing.fd).map_err(|e| Error::File {
        call: "fstat",
        path: backing.path.clone(),
        errno: e,
        hint: "the file must be stat-able",
    })?;
    let size = stat.st_size as u64;
    if size >= needed {
        return Ok(());
    }
    if read_only_fd {
        return Err(Error::FileTooSmall {
            path: backing.path.clone(),
            size,
            needed,
        });
    }
    rustix::fs::ftruncate(&backing.fd, needed).map_err(|e| Error::File {
        call: "ftruncate",
        path: backing.path.clone(),
        errno: e,
        hint: "the filesystem must have room (for hugetlbfs, the mount's size= limit) and the length must be whole pages",
    })
}
