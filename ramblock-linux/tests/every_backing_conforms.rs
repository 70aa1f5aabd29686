//! The conformance suite (`common::check_host_memory`) run for every
//! backing, each checked against the kernel's view in `/proc/self/smaps`.

mod common;

use common::{check_host_memory, vma_at, Expect};
use ramblock_core::addr::ByteLen;
use ramblock_core::host::HostMemory;
use ramblock_linux::{BackingKind, MemoryBuilder};

const MIB: u64 = 1 << 20;

fn private() -> Expect {
    Expect {
        shared: false,
        writable: true,
        tail_released: true,
    }
}

fn shared() -> Expect {
    Expect {
        shared: true,
        writable: true,
        tail_released: true,
    }
}

#[test]
fn anonymous_private_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::Anonymous);
    assert_eq!(
        mem.base().as_ptr() as u64 % (2 * MIB),
        0,
        "reservation must be 2 MiB aligned"
    );
    check_host_memory(&mut mem, private());
}

#[test]
fn anonymous_shared_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    check_host_memory(&mut mem, shared());
}

#[test]
fn anonymous_no_reserve_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(2 * MIB))
        .max_length(ByteLen(6 * MIB))
        .no_reserve(true)
        .build()
        .unwrap();
    assert!(
        vma_at(mem.base().as_ptr() as usize).has_flag("nr"),
        "MAP_NORESERVE shows as nr"
    );
    check_host_memory(&mut mem, private());
}

#[test]
fn guard_page_follows_the_reservation() {
    let mem = MemoryBuilder::anonymous(ByteLen(2 * MIB)).build().unwrap();
    let end = mem.base().as_ptr() as usize + (2 * MIB) as usize;
    let guard = vma_at(end);
    assert!(
        guard.perms.starts_with("---"),
        "guard {guard:?} must be inaccessible"
    );
}

#[test]
fn anonymous_thp_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .transparent_hugepages(true)
        .build()
        .unwrap();
    assert!(
        vma_at(mem.base().as_ptr() as usize).has_flag("hg"),
        "MADV_HUGEPAGE shows as hg"
    );
    check_host_memory(&mut mem, private());
}

#[test]
fn memfd_conforms_and_is_sealed() {
    let mut mem = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .name("conformance.memfd")
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::Memfd(None));
    let fd = mem.fd().expect("a memfd has a descriptor");
    let seals = rustix::fs::fcntl_get_seals(fd).unwrap();
    assert!(seals.contains(rustix::fs::SealFlags::GROW | rustix::fs::SealFlags::SHRINK));
    assert_eq!(
        rustix::fs::fstat(fd).unwrap().st_size as u64,
        8 * MIB,
        "sized to max_length"
    );
    assert!(
        rustix::fs::ftruncate(fd, 16 * MIB).is_err(),
        "grow seal must hold"
    );
    assert!(
        rustix::fs::ftruncate(fd, MIB).is_err(),
        "shrink seal must hold"
    );
    assert!(vma_at(mem.base().as_ptr() as usize)
        .path
        .contains("conformance.memfd"));
    check_host_memory(&mut mem, shared());
}

#[test]
fn private_memfd_conforms() {
    let mut mem = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .shared(false)
        .build()
        .unwrap();
    check_host_memory(&mut mem, private());
}

#[test]
fn shared_file_conforms_and_keeps_data_in_the_file() {
    let dir = common::ScratchDir::new("file-shared");
    let path = dir.path().join("ram");
    let mut mem = MemoryBuilder::file(&path, ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        8 * MIB,
        "extended to max_length"
    );
    check_host_memory(
        &mut mem,
        Expect {
            shared: true,
            writable: true,
            tail_released: false,
        },
    );
    mem.region().write(ByteLen::ZERO, b"persist").unwrap();
    mem.sync(ByteLen(0), ByteLen(4096)).unwrap();
    drop(mem);
    let data = std::fs::read(&path).unwrap();
    assert_eq!(&data[..7], b"persist");
}

#[test]
fn private_file_conforms_without_touching_the_file_until_discard() {
    let dir = common::ScratchDir::new("file-private");
    let path = dir.path().join("ram");
    std::fs::write(&path, vec![0x11u8; (16 * MIB) as usize]).unwrap();
    let mut mem = MemoryBuilder::file(&path, ByteLen(4 * MIB))
        .offset(4 * MIB)
        .max_length(ByteLen(8 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.fd_offset(), 4 * MIB);
    let mut first = [0u8; 4];
    mem.region().read(ByteLen::ZERO, &mut first).unwrap();
    assert_eq!(first, [0x11; 4], "the mapping starts at the offset");
    check_host_memory(
        &mut mem,
        Expect {
            shared: false,
            writable: true,
            tail_released: false,
        },
    );
    drop(mem);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        16 * MIB,
        "a larger file is left alone"
    );
}

#[test]
fn file_in_a_directory_is_an_unlinked_temporary() {
    let dir = common::ScratchDir::new("file-dir");
    let mut mem = MemoryBuilder::file(dir.path(), ByteLen(4 * MIB))
        .shared(true)
        .name("pc.ram")
        .build()
        .unwrap();
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the file is unlinked"
    );
    assert!(vma_at(mem.base().as_ptr() as usize)
        .path
        .ends_with("(deleted)"));
    assert!(!mem
        .flags()
        .contains(ramblock_core::flags::BlockFlags::NAMED_FILE));
    check_host_memory(&mut mem, shared());
}

#[test]
fn read_only_file_conforms_and_refuses_discard() {
    let dir = common::ScratchDir::new("file-ro");
    let path = dir.path().join("rom");
    std::fs::write(&path, vec![0x5au8; (2 * MIB) as usize]).unwrap();
    let mut mem = MemoryBuilder::file(&path, ByteLen(2 * MIB))
        .shared(true)
        .read_only(true)
        .read_only_fd(true)
        .build()
        .unwrap();
    check_host_memory(
        &mut mem,
        Expect {
            shared: true,
            writable: false,
            tail_released: false,
        },
    );
    let mut b = [0u8; 2];
    mem.region().read(ByteLen(MIB), &mut b).unwrap();
    assert_eq!(b, [0x5a; 2]);
    let err = mem.discard(ByteLen(0), ByteLen(4096)).unwrap_err();
    assert!(
        matches!(err, ramblock_linux::Error::ReadOnly { .. }),
        "{err}"
    );
}

#[test]
fn caller_memory_conforms_and_is_never_unmapped() {
    let len = 4 * MIB as usize;
    // A PROT_NONE page on each side keeps the kernel from merging the
    // caller's mapping with a neighbour, so smaps shows exactly it.
    // SAFETY: a fresh anonymous mapping that only this test uses.
    let outer = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            len + 2 * 4096,
            rustix::mm::ProtFlags::empty(),
            rustix::mm::MapFlags::PRIVATE,
        )
    }
    .unwrap();
    let ptr = outer
        .cast::<u8>()
        .wrapping_add(4096)
        .cast::<std::ffi::c_void>();
    // SAFETY: the middle of the mapping made above.
    unsafe {
        rustix::mm::mprotect(
            ptr,
            len,
            rustix::mm::MprotectFlags::READ | rustix::mm::MprotectFlags::WRITE,
        )
    }
    .unwrap();
    let nn = std::ptr::NonNull::new(ptr.cast::<u8>()).unwrap();
    // SAFETY: the mapping stays until the munmap at the end, after `mem` is gone.
    let builder = unsafe {
        MemoryBuilder::caller(
            nn,
            ByteLen(len as u64),
            ramblock_core::addr::PageSize::SIZE_4K,
        )
    };
    let mut mem = builder.build().unwrap();
    assert_eq!(mem.base(), nn);
    check_host_memory(&mut mem, private());
    assert!(
        mem.set_used_len(ByteLen(MIB)).is_err(),
        "caller memory cannot shrink"
    );
    drop(mem);
    // Still mapped and ours after the drop.
    let vma = vma_at(ptr as usize);
    assert!(vma.perms.starts_with("rw"), "{vma:?}");
    // SAFETY: the mapping made above; nothing uses it any more.
    unsafe { rustix::mm::munmap(outer, len + 2 * 4096) }.unwrap();
}

/// The pages `untouched_runs` reports for `mem`'s first `pages` pages
/// after writing one byte in each of `written`, or `None` if the memory
/// cannot tell.
fn untouched_after_writes(mem: &impl HostMemory, pages: u64, written: &[u64]) -> Option<Vec<bool>> {
    for &page in written {
        // SAFETY: inside the used length of the memory, which is mapped
        // writable; nothing else accesses it meanwhile.
        unsafe {
            mem.base()
                .as_ptr()
                .add((page * 4096 + 9) as usize)
                .write_volatile(7)
        };
    }
    let mut untouched = vec![false; pages as usize];
    let told = mem.untouched_runs(0, pages, &mut |first, count| {
        untouched[first as usize..(first + count) as usize].fill(true)
    });
    told.then_some(untouched)
}

#[test]
fn untouched_pages_are_the_never_written_ones_where_the_memory_can_tell() {
    const PAGES: u64 = 4 * MIB / 4096;
    let written = [0u64, 1, 300, 301, 302, PAGES - 1];
    let model: Vec<bool> = (0..PAGES).map(|p| !written.contains(&p)).collect();
    // Private anonymous memory (page tables) and a shared memfd (its
    // file's holes) can tell.
    let anonymous = MemoryBuilder::anonymous(ByteLen(4 * MIB)).build().unwrap();
    assert_eq!(
        untouched_after_writes(&anonymous, PAGES, &written),
        Some(model.clone())
    );
    let memfd = MemoryBuilder::memfd(ByteLen(4 * MIB)).build().unwrap();
    assert_eq!(
        untouched_after_writes(&memfd, PAGES, &written),
        Some(model.clone())
    );
    // A discarded page is untouched again (the memfd's hole is punched).
    memfd.discard(ByteLen(300 * 4096), ByteLen(4096)).unwrap();
    let mut after_discard = model.clone();
    after_discard[300] = true;
    assert_eq!(
        untouched_after_writes(&memfd, PAGES, &[]),
        Some(after_discard)
    );
    // Memory that other mappings may write without a trace in the file or
    // this process's page tables cannot tell.
    let shared_anonymous = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .shared(true)
        .build()
        .unwrap();
    assert_eq!(
        untouched_after_writes(&shared_anonymous, PAGES, &written),
        None
    );
    let private_memfd = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .shared(false)
        .build()
        .unwrap();
    assert_eq!(
        untouched_after_writes(&private_memfd, PAGES, &written),
        None
    );
}
