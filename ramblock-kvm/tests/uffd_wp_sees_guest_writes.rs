//! The uffd-wp dirty log (`ramblock_linux::dirty_log::UffdWpLog`) sees a
//! KVM guest's writes: KVM writes guest RAM through the memslot's
//! userspace mapping, so write-protecting it (and the MMU notifier that
//! zaps KVM's own mappings when it is) makes the guest's next write fault
//! in the host's page tables, where the kernel resolves it and records it.
//! KVM's own dirty log stays off: only the uffd-wp log is consulted.
//!
//! - On anonymous, memfd and hugetlb memory: the harvest is exactly the
//!   pages the guest wrote, merged with the VMM's writes through the block
//!   API; running code dirties nothing; a second harvest is empty.
//! - While the increment workload runs on a vCPU thread, repeated harvests
//!   copied to a shadow leave it equal to guest RAM after the vCPU pauses
//!   and a final harvest (nothing lost under a running guest).
mod common;

use common::*;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_kvm::guest::{PageWriter, Workload};
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::runner::VcpuRunner;
use ramblock_linux::dirty_log::{UffdWpLog, WpLogError};
use ramblock_linux::hugetlb::PoolReservation;
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

const A_GPA: u64 = 1 << 20;
const A_PAGES: usize = 1024;
const MIB: u64 = 1 << 20;

/// The log, or `None` after the one skip line.
fn log_or_skip() -> Option<UffdWpLog> {
    match UffdWpLog::new() {
        Ok(log) => Some(log),
        Err(e @ (WpLogError::KernelLacks { .. } | WpLogError::Scan(_))) => {
            println!("skipped: {e}");
            None
        }
        Err(WpLogError::Uffd(e)) if e.is_unavailable() => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("uffd-wp log: {e}"),
    }
}

/// Adds block `name` over `mem`.
fn add_memory(list: &List<'_>, name: &str, mem: LinuxMemory) {
    let spec = BlockSpec::new(BlockName::new(name).unwrap(), mem.used_len())
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps)
        .map_err(|r| r.error)
        .expect("add block");
}

/// Tracks block `name` in `log`.
fn track(list: &List<'_>, name: &str, log: &mut UffdWpLog) {
    let view = list.read();
    let block = view.by_name(name).unwrap();
    log.track(block.offset(), block.memory()).unwrap();
}

/// Every target page of the host pages holding `pages`.
fn expand(pages: &[usize], page_size: PageSize) -> BTreeSet<usize> {
    let per = (page_size.bytes() / 4096) as usize;
    pages
        .iter()
        .flat_map(|&p| (p / per * per)..(p / per * per + per))
        .collect()
}

/// The proof with a page-writing guest; see the module docs.
fn prove(mem: LinuxMemory) {
    if !kvm_or_skip() {
        return;
    }
    let Some(mut log) = log_or_skip() else { return };
    let page_size = mem.page_size();
    let pages = (mem.used_len().0 / 4096) as usize;
    let list = List::new();
    add(&list, "boot", 128 << 10, |s| s);
    add_memory(&list, "ram-a", mem);
    // KVM's own log stays off: bitmap mode, logging never switched on.
    let vm = vm(DirtyLogRequest::Mode(DirtyLogMode::Bitmap));
    for (name, gpa) in [("boot", 0), ("ram-a", A_GPA)] {
        let view = list.read();
        map(&vm, view.by_name(name).unwrap(), gpa, BlockRange::Whole).unwrap();
    }
    track(&list, "ram-a", &mut log);
    harvest(&list, "ram-a", &mut log);
    assert_eq!(harvest(&list, "ram-a", &mut log), set(&[]), "clean");

    let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
    let written = [0, 1, 63, 64, 200, 511, 512, pages - 1];
    let gpas: Vec<u64> = written.iter().map(|&p| A_GPA + p as u64 * 4096).collect();
    guest.write_pages(&vm, &gpas, 0x5a).unwrap();
    {
        let view = list.read();
        view.by_name("ram-a")
            .unwrap()
            .write(ByteLen(100 << 12), b"dma")
            .unwrap();
    }
    let mut want = expand(&written, page_size);
    want.extend(expand(&[100], page_size));
    assert_eq!(harvest(&list, "ram-a", &mut log), want);
    for p in written {
        assert_eq!(
            first_byte(&list, "ram-a", p),
            0x5a,
            "the guest wrote page {p}"
        );
    }
    assert_eq!(harvest(&list, "ram-a", &mut log), set(&[]), "idle");

    // The same pages again: KVM's mappings were re-protected too.
    guest.write_pages(&vm, &gpas[..3], 0x11).unwrap();
    assert_eq!(
        harvest(&list, "ram-a", &mut log),
        expand(&written[..3], page_size)
    );
    guest.write_pages(&vm, &[A_GPA + 300 * 4096], 0x12).unwrap();
    assert_eq!(harvest(&list, "ram-a", &mut log), expand(&[300], page_size));
    assert_eq!(harvest(&list, "ram-a", &mut log), set(&[]));
}

#[test]
fn uffd_wp_sees_a_guest_writing_anonymous_memory() {
    prove(
        MemoryBuilder::anonymous(ByteLen(A_PAGES as u64 * 4096))
            .build()
            .unwrap(),
    );
}

#[test]
fn uffd_wp_sees_a_guest_writing_memfd_memory() {
    prove(
        MemoryBuilder::memfd(ByteLen(A_PAGES as u64 * 4096))
            .name("ram-a")
            .build()
            .unwrap(),
    );
}

#[test]
fn uffd_wp_sees_a_guest_writing_hugetlb_memory() {
    let _pool = match PoolReservation::reserve(PageSize::SIZE_2M, 2) {
        Ok(p) => p,
        Err(reason) => return println!("skipped: {reason}"),
    };
    prove(
        MemoryBuilder::hugetlb(ByteLen(4 * MIB), PageSize::SIZE_2M)
            .build()
            .unwrap(),
    );
}

/// The running-guest proof; see the module docs.
fn running_guest_loses_nothing(mem: LinuxMemory) {
    if !kvm_or_skip() {
        return;
    }
    let Some(mut log) = log_or_skip() else { return };
    let len = mem.used_len().0 as usize;
    let list = List::new();
    add_memory(&list, "ram", mem);
    let vm = Arc::new(vm(DirtyLogRequest::Mode(DirtyLogMode::Bitmap)));
    {
        let view = list.read();
        map(&vm, view.by_name("ram").unwrap(), 0, BlockRange::Whole).unwrap();
    }
    let ram = region(&list, "ram");
    let work = Workload::for_ram(len as u64).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    work.load(&ram, &vcpu).unwrap();
    track(&list, "ram", &mut log);
    harvest(&list, "ram", &mut log);
    let mut shadow = vec![0u8; len];
    ram.read(ByteLen(0), &mut shadow).unwrap();

    let runner = VcpuRunner::spawn(vm.clone(), vcpu).unwrap();
    let copy = |pages: &BTreeSet<usize>, shadow: &mut [u8]| {
        for &p in pages {
            ram.read(
                ByteLen(p as u64 * 4096),
                &mut shadow[p * 4096..(p + 1) * 4096],
            )
            .unwrap();
        }
    };
    let (mut rounds, mut reported) = (0, 0);
    while rounds < 20 || runner.heartbeats() < 3 {
        let got = harvest(&list, "ram", &mut log);
        reported += got.len();
        copy(&got, &mut shadow);
        rounds += 1;
        std::thread::sleep(Duration::from_millis(2));
        assert!(runner.error().is_none(), "{:?}", runner.error());
        assert!(rounds < 100_000, "the guest made no progress");
    }
    runner.pause();
    let passes = runner.heartbeats();
    let got = harvest(&list, "ram", &mut log);
    copy(&got, &mut shadow);
    let mut now = vec![0u8; len];
    ram.read(ByteLen(0), &mut now).unwrap();
    let differ = now
        .chunks(4096)
        .zip(shadow.chunks(4096))
        .position(|(a, b)| a != b);
    assert_eq!(differ, None, "a page the guest wrote was never harvested");
    println!("{rounds} harvests, {reported} pages reported, {passes} guest passes");
    assert!(
        passes >= 3 && reported as u64 > work.pages(),
        "the guest ran across harvests"
    );
    let _ = runner.stop();
}

#[test]
fn uffd_wp_loses_nothing_while_a_guest_runs_on_anonymous_memory() {
    running_guest_loses_nothing(
        MemoryBuilder::anonymous(ByteLen(4 * MIB))
            .transparent_hugepages(true)
            .build()
            .unwrap(),
    );
}

#[test]
fn uffd_wp_loses_nothing_while_a_guest_runs_on_memfd_memory() {
    running_guest_loses_nothing(
        MemoryBuilder::memfd(ByteLen(4 * MIB))
            .name("ram")
            .build()
            .unwrap(),
    );
}
