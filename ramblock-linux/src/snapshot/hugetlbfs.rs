//! [`copy_to_hugetlbfs`]: a copy of a snapshot on hugetlbfs, so that its
//! hugepage blocks can be mapped ([`super::map_block`]) rather than read.
//!
//! hugetlbfs has no `write(2)`: a file there is filled through a shared
//! mapping. The copy maps the new file and reads the snapshot into the
//! mapping with `pread(2)`, so the kernel copies from the page cache
//! straight into the hugepages; its length is rounded up to the hugepage
//! size, as hugetlbfs requires (a reader accepts a file longer than its
//! data).

use super::error::SnapshotError;
use super::file::SnapshotFile;
use super::io::read_region_at;
use super::writer::create_file;
use crate::hugetlb::HUGETLBFS_MAGIC;
use ramblock_core::region::HostRegion;
use std::path::Path;

/// Copies `src` to `dst`, a new file on hugetlbfs, and opens the copy.
pub fn copy_to_hugetlbfs(src: &SnapshotFile, dst: &Path) -> Result<SnapshotFile, SnapshotError> {
    let file = create_file(dst, "the hugetlbfs directory must be writable")?;
    let stat = rustix::fs::fstatfs(&file).map_err(|e| {
        SnapshotError::io(
            "fstatfs",
            dst,
            e.into(),
            "the filesystem must support statfs",
        )
    })?;
    if stat.f_type as i64 != HUGETLBFS_MAGIC {
        return Err(SnapshotError::CannotMap {
            name: String::new(),
            path: dst.to_owned(),
            why: "the copy must be made on a hugetlbfs mount",
        });
    }
    let huge = stat.f_bsize as u64;
    let len = src.header().data_end.div_ceil(huge) * huge;
    file.set_len(len).map_err(|e| {
        SnapshotError::io(
            "ftruncate",
            dst,
            e,
            "hugetlbfs needs enough free hugepages for the copy; raise /proc/sys/vm/nr_hugepages",
        )
    })?;
    let map_len = usize::try_from(len).map_err(|_| SnapshotError::CannotMap {
        name: String::new(),
        path: dst.to_owned(),
        why: "the snapshot does not fit the address space",
    })?;
    // SAFETY: a new shared mapping of the file we just sized; no other
    // mapping is affected, and it is unmapped below before returning.
    let ptr = unsafe {
        rustix::mm::mmap(
            std::ptr::null_mut(),
            map_len,
            rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
            rustix::mm::MapFlags::SHARED,
            &file,
            0,
        )
    }
    .map_err(|e| {
        SnapshotError::io(
            "mmap",
            dst,
            e.into(),
            "hugetlbfs needs enough free hugepages for the copy; raise /proc/sys/vm/nr_hugepages",
        )
    })?;
    // SAFETY: the mapping is `map_len` readable and writable bytes, alive
    // until the munmap below, after the last use of the region; nothing
    // else refers to it.
    let region = unsafe {
        HostRegion::new(
            std::ptr::NonNull::new(ptr.cast()).expect("mmap never returns null"),
            map_len,
        )
    };
    let data_end = src.header().data_end as usize;
    let copied = region
        .subregion(ramblock_core::addr::ByteLen(0), data_end)
        .map_err(SnapshotError::from)
        .and_then(|r| {
            read_region_at(src.file(), &r, 0).map_err(|e| {
                SnapshotError::io("pread", src.path(), e, "the snapshot must be readable and hugepages free (a SIGBUS would say they ran out)")
            })
        });
    // SAFETY: unmaps exactly the mapping made above; the region is not used again.
    let unmapped = unsafe { rustix::mm::munmap(ptr, map_len) };
    copied?;
    unmapped.map_err(|e| SnapshotError::io("munmap", dst, e.into(), "this is a bug"))?;
    SnapshotFile::open(dst)
}
