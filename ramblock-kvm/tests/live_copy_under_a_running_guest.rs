//! `ramblock_linux::live_copy::LiveCopy` under a KVM guest: the increment
//! loop runs on a vCPU thread, is paused for the instant (its RAM read as
//! the reference), and resumed as soon as guest RAM is write-protected
//! (synchronous uffd-wp). Its writes stop in faults on the vCPU thread
//! until the copier saves their pages; the saved image must equal the
//! reference byte for byte, at least one page must have been saved ahead
//! of the guest, and the guest must go on running after the copy.
mod common;

use common::*;
use ramblock_core::addr::ByteLen;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_kvm::guest::Workload;
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::runner::VcpuRunner;
use ramblock_linux::live_copy::{LiveCopy, LiveCopyError};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Waits (bounded) until `cond`.
fn wait_for(cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    true
}

fn prove(mem: LinuxMemory) {
    if !kvm_or_skip() {
        return;
    }
    let len = mem.used_len().0 as usize;
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("ram").unwrap(), mem.used_len())
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    let vm = Arc::new(vm(DirtyLogRequest::Mode(DirtyLogMode::Bitmap)));
    let view = list.read();
    let block = view.by_name("ram").unwrap();
    map(&vm, block, 0, BlockRange::Whole).unwrap();
    let ram = block.region();
    let work = Workload::for_ram(len as u64).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    work.load(&ram, &vcpu).unwrap();
    let runner = VcpuRunner::spawn(vm.clone(), vcpu).unwrap();
    assert!(wait_for(|| runner.heartbeats() >= 2), "the guest runs");

    // The instant: paused guest, reference read, memory protected.
    runner.pause();
    let mut reference = vec![0u8; len];
    ram.read(ByteLen(0), &mut reference).unwrap();
    let copy = match LiveCopy::start(block.memory()) {
        Ok(c) => c,
        Err(e @ LiveCopyError::KernelLacks { .. }) => {
            let _ = runner.stop();
            return println!("skipped: {e}");
        }
        Err(LiveCopyError::Uffd(e)) if e.is_unavailable() => {
            let _ = runner.stop();
            return println!("skipped: {e}");
        }
        Err(e) => panic!("live copy: {e}"),
    };
    let passes_at_instant = runner.heartbeats();
    runner.resume();
    // The guest's next write stops in a fault on the vCPU thread.
    assert!(
        wait_for(|| copy.fault_pending()),
        "the guest faults on protected RAM"
    );
    let mut image = vec![0u8; len];
    let stats = copy
        .run(|offset, data| {
            image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        })
        .unwrap();
    let differ = image
        .chunks(4096)
        .zip(reference.chunks(4096))
        .position(|(a, b)| a != b);
    assert_eq!(differ, None, "the image is guest RAM at the instant");
    assert!(stats.faulted_pages >= 1, "{stats:?}");
    // The guest goes on after the copy.
    assert!(
        wait_for(|| runner.heartbeats() >= passes_at_instant + 2),
        "the guest runs after the copy"
    );
    assert!(runner.error().is_none(), "{:?}", runner.error());
    runner.pause();
    let mut now = vec![0u8; len];
    ram.read(ByteLen(0), &mut now).unwrap();
    assert_ne!(now, reference, "the guest wrote during and after the copy");
    let mut service = stats.fault_service_ns.clone();
    service.sort_unstable();
    println!(
        "{} pages, {} faults, {} saved ahead of the guest, service p50 {} ns p99 {} ns, copy {:?}",
        stats.pages,
        stats.faults,
        stats.faulted_pages,
        service[service.len() / 2],
        service[service.len() * 99 / 100],
        stats.elapsed
    );
    let _ = runner.stop();
}

#[test]
fn a_live_copy_of_anonymous_guest_ram_is_the_instant_image() {
    prove(MemoryBuilder::anonymous(ByteLen(8 * MIB)).build().unwrap());
}

#[test]
fn a_live_copy_of_memfd_guest_ram_is_the_instant_image() {
    prove(
        MemoryBuilder::memfd(ByteLen(8 * MIB))
            .name("ram")
            .build()
            .unwrap(),
    );
}
