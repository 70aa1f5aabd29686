//! guest_memfd blocks: memory from `KVM_CREATE_GUEST_MEMFD` (mmap and
//! init-shared flags), mapped by the VMM and given to KVM through
//! `KVM_SET_USER_MEMORY_REGION2` with the fd. A host without it gets an
//! error naming the missing capability and the Linux release that brings
//! it; a host with it runs the test guest on it. KVM cannot dirty-log a
//! guest_memfd memslot (it refuses `KVM_MEM_LOG_DIRTY_PAGES` with
//! `KVM_MEM_GUEST_MEMFD`), so in each dirty-log mode a logging guest_memfd
//! slot reports every page at every harvest: no write is missed, and the
//! block's neighbours are still logged page by page.
mod common;

use common::*;
use ramblock_core::addr::ByteLen;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::name::BlockName;
use ramblock_kvm::caps::Capabilities;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::PageWriter;
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::KvmError;
use ramblock_linux::MemoryBuilder;

const GMEM_GPA: u64 = 1 << 20;
const GMEM_PAGES: u64 = 512;

fn caps(user_memory2: bool, guest_memfd: bool, flags: u64) -> Capabilities {
    Capabilities {
        manual_protect_flags: 0,
        dirty_ring_max_bytes: 0,
        dirty_ring_acq_rel_max_bytes: 0,
        user_memory2,
        readonly_mem: true,
        memslots: 32,
        guest_memfd,
        guest_memfd_flags: flags,
    }
}

#[test]
fn each_missing_capability_is_named_with_its_kernel() {
    assert_eq!(caps(true, true, 3).guest_memfd_missing(), None);
    assert_eq!(caps(true, true, 7).guest_memfd_missing(), None);
    for (c, cap, kernel) in [
        (caps(false, true, 3), "KVM_CAP_USER_MEMORY2", "Linux 6.8"),
        (
            caps(true, false, 0),
            "KVM_CAP_GUEST_MEMFD ",
            "Linux 6.18 built with CONFIG_KVM_GUEST_MEMFD",
        ),
        (
            caps(true, true, 0),
            "KVM_CAP_GUEST_MEMFD_FLAGS",
            "Linux 6.18",
        ),
        (
            caps(true, true, 1),
            "GUEST_MEMFD_FLAG_INIT_SHARED",
            "Linux 6.18",
        ),
    ] {
        let (named, since) = c.guest_memfd_missing().expect("something is missing");
        assert!(
            named.starts_with(cap.trim()) || named.contains(cap.trim()),
            "{named}"
        );
        assert_eq!(since, kernel);
    }
}

#[test]
fn this_host_creates_a_guest_memfd_or_names_what_it_lacks() {
    if !kvm_or_skip() {
        return;
    }
    let vm = vm(DirtyLogRequest::Auto);
    match (
        vm.capabilities().guest_memfd_missing(),
        vm.create_guest_memfd(2 << 20),
    ) {
        (Some((capability, kernel)), Err(e @ KvmError::GuestMemfdUnsupported { .. })) => {
            let msg = e.to_string();
            assert!(msg.contains(capability) && msg.contains(kernel), "{msg}");
            println!("this host lacks guest_memfd: {msg}");
        }
        (None, Ok(_fd)) => {}
        (missing, got) => panic!("capabilities say {missing:?}, creation gave {got:?}"),
    }
}

/// The guest on a guest_memfd block, harvested by one mode.
fn prove_mode(request: DirtyLogRequest) {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "boot", 128 << 10, |s| s);
    let vm = vm(request);
    let fd = match vm.create_guest_memfd(GMEM_PAGES << 12) {
        Ok(fd) => fd,
        Err(e @ KvmError::GuestMemfdUnsupported { .. }) => {
            println!("skipped: {e}");
            return;
        }
        Err(e) => panic!("{e}"),
    };
    let len = ByteLen(GMEM_PAGES << 12);
    let mem = MemoryBuilder::guest_memfd(fd, len).build().unwrap();
    let spec = BlockSpec::new(BlockName::new("gmem").unwrap(), len)
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    assert!(spec.flags.contains(BlockFlags::GUEST_MEMFD));
    list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap())
        .map_err(|r| r.error)
        .unwrap();
    {
        let view = list.read();
        let boot = map(&vm, view.by_name("boot").unwrap(), 0, BlockRange::Whole).unwrap();
        vm.set_logging(boot, true).unwrap();
        let gmem = view.by_name("gmem").unwrap();
        assert!(matches!(
            map(&vm, gmem, GMEM_GPA, BlockRange::Whole),
            Err(KvmError::NotGuestMemfd { .. })
        ));
        // SAFETY: the list is declared before the VM, so the block outlives
        // the slot.
        let slot = unsafe { vm.map_guest_memfd_block(gmem, GMEM_GPA, BlockRange::Whole) }.unwrap();
        vm.set_logging(slot, true).unwrap();
    }
    let mut log = KvmDirtyLog::new(&vm);
    let every: Vec<usize> = (0..GMEM_PAGES as usize).collect();
    harvest(&list, "gmem", &mut log);
    harvest(&list, "boot", &mut log);
    // Nothing written, yet every page: KVM keeps no log to say otherwise.
    assert_eq!(harvest(&list, "gmem", &mut log), set(&every));
    let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
    let pages = [0usize, 63, 64, 300, GMEM_PAGES as usize - 1];
    let gpas: Vec<u64> = pages
        .iter()
        .map(|&p| GMEM_GPA + (p as u64) * 4096)
        .collect();
    guest.write_pages(&vm, &gpas, 0x6b).unwrap();
    list.read()
        .by_name("gmem")
        .unwrap()
        .write(ByteLen(100 << 12), b"dma")
        .unwrap();
    assert_eq!(harvest(&list, "gmem", &mut log), set(&every));
    // The slot beside it is logged by KVM, page by page: not all of its
    // 32 pages come back (the guest wrote none of them).
    let boot = harvest(&list, "boot", &mut log);
    assert!(boot.len() < 32, "{boot:?}");
    for p in pages {
        assert_eq!(
            first_byte(&list, "gmem", p),
            0x6b,
            "the guest wrote page {p} through the guest_memfd"
        );
    }
    assert_eq!(harvest(&list, "gmem", &mut log), set(&every));
}

#[test]
fn bitmap_mode_harvests_every_page_of_a_guest_memfd_block() {
    prove_mode(DirtyLogRequest::Mode(DirtyLogMode::Bitmap));
}

#[test]
fn manual_protect_mode_harvests_every_page_of_a_guest_memfd_block() {
    if kvm_or_skip() && !vm(DirtyLogRequest::Auto).capabilities().manual_protect() {
        println!("skipped: host lacks KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        return;
    }
    prove_mode(DirtyLogRequest::Mode(DirtyLogMode::ManualProtect));
}

#[test]
fn ring_mode_harvests_every_page_of_a_guest_memfd_block() {
    if kvm_or_skip() && !vm(DirtyLogRequest::Auto).capabilities().dirty_ring() {
        println!("skipped: host lacks KVM_CAP_DIRTY_LOG_RING");
        return;
    }
    prove_mode(DirtyLogRequest::Mode(DirtyLogMode::Ring { entries: 4096 }));
}

/// `ramblock migrate --backing guest-memfd`: pre-copy verifies where the
/// host has guest_memfd; post-copy is refused before anything starts
/// (userfaultfd cannot place its pages); elsewhere the program fails
/// naming the missing capability.
#[test]
fn the_program_migrates_guest_memfd_ram_or_names_what_is_missing() {
    if !kvm_or_skip() {
        return;
    }
    let run = |extra: &[&str]| {
        let mut args = vec!["migrate", "--backing", "guest-memfd", "--size", "64M"];
        args.extend_from_slice(extra);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_ramblock"))
            .args(&args)
            .output()
            .expect("run ramblock");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, text) = run(&["--workload", "increment", "--max-passes", "3"]);
    match vm(DirtyLogRequest::Auto)
        .capabilities()
        .guest_memfd_missing()
    {
        Some((capability, kernel)) => {
            assert!(!ok, "{text}");
            assert!(text.contains(capability) && text.contains(kernel), "{text}");
            println!("skipped: guest_memfd migration ({capability} missing; the error names it)");
        }
        None => {
            assert!(ok && text.contains("verified"), "{text}");
            let (ok, text) = run(&["--postcopy"]);
            assert!(!ok && text.contains("pre-copy"), "{text}");
        }
    }
}
