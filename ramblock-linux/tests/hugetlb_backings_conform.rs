//! The conformance suite on hugetlb memory: anonymous `MAP_HUGETLB`, hugetlb
//! memfds and files on a hugetlbfs mounted for the test, with 2 MiB and
//! 1 GiB pages. Each test reserves its hugepages and restores the pool.

mod common;

use common::{check_host_memory, skip, vma_at, Expect, HugepagePool, HugetlbfsMount};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use ramblock_linux::{BackingKind, MemoryBuilder};

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

fn expect(shared: bool) -> Expect {
    Expect {
        shared,
        writable: true,
        tail_released: true,
    }
}

#[test]
fn hugetlb_2m_anonymous_conforms() {
    let pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mut mem = MemoryBuilder::hugetlb(ByteLen(6 * MIB), PageSize::SIZE_2M)
        .max_length(ByteLen(8 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::Hugetlb(PageSize::SIZE_2M));
    assert_eq!(mem.page_size(), PageSize::SIZE_2M);
    check_host_memory(&mut mem, expect(false));
    drop(mem);
    drop(pool);
}

#[test]
fn hugetlb_2m_shared_anonymous_conforms() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mut mem = MemoryBuilder::hugetlb(ByteLen(6 * MIB), PageSize::SIZE_2M)
        .max_length(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    check_host_memory(&mut mem, expect(true));
}

#[test]
fn hugetlb_1g_anonymous_conforms() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_1G, 1) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mut mem = MemoryBuilder::hugetlb(ByteLen(GIB), PageSize::SIZE_1G)
        .build()
        .unwrap();
    assert_eq!(
        mem.base().as_ptr() as u64 % GIB,
        0,
        "aligned to the 1 GiB page"
    );
    check_host_memory(&mut mem, expect(false));
}

#[test]
fn hugetlb_2m_memfd_conforms() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mut mem = MemoryBuilder::memfd(ByteLen(6 * MIB))
        .huge_pages(PageSize::SIZE_2M)
        .max_length(ByteLen(8 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::Memfd(Some(PageSize::SIZE_2M)));
    let seals = rustix::fs::fcntl_get_seals(mem.fd().unwrap()).unwrap();
    assert!(seals.contains(rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK));
    check_host_memory(&mut mem, expect(true));
}

#[test]
fn hugetlb_1g_memfd_conforms() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_1G, 1) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mut mem = MemoryBuilder::memfd(ByteLen(GIB))
        .huge_pages(PageSize::SIZE_1G)
        .build()
        .unwrap();
    check_host_memory(&mut mem, expect(true));
}

#[test]
fn hugetlbfs_file_conforms_with_the_filesystem_page_size() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let mount = match HugetlbfsMount::mount(PageSize::SIZE_2M) {
        Ok(m) => m,
        Err(reason) => return skip(&reason.to_string()),
    };
    // A named file on hugetlbfs.
    let path = mount.dir.join("guest-ram");
    let mut mem = MemoryBuilder::file(&path, ByteLen(6 * MIB))
        .max_length(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::File { hugetlbfs: true });
    assert_eq!(mem.page_size(), PageSize::SIZE_2M, "page size from fstatfs");
    assert_eq!(vma_at(mem.base().as_ptr() as usize).kernel_page_kb, 2048);
    check_host_memory(
        &mut mem,
        Expect {
            shared: true,
            writable: true,
            tail_released: false,
        },
    );
    // Offsets and lengths must be whole hugepages.
    let err = MemoryBuilder::file(&path, ByteLen(2 * MIB))
        .offset(4096)
        .shared(true)
        .build();
    assert!(
        matches!(
            err,
            Err(ramblock_linux::Error::Options(
                ramblock_linux::OptionsError::Unaligned { .. }
            ))
        ),
        "{err:?}"
    );
    drop(mem);
    // The file keeps its hugepages until it is removed.
    std::fs::remove_file(&path).unwrap();
    // An unlinked temporary in the mount.
    let mut tmp = MemoryBuilder::file(&mount.dir, ByteLen(4 * MIB))
        .shared(true)
        .build()
        .unwrap();
    check_host_memory(&mut tmp, expect(true));
}
