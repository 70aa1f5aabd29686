//! A KVM guest snapshotted (a full snapshot, then a diff after it ran on,
//! with KVM's dirty log on between them) and restored eagerly, by mapping
//! the file and lazily through userfaultfd, resumes its vCPU from the
//! `cpu` section and continues its loop from where it stopped: checked
//! against the paused source the way a post-copy destination is
//! (`check_resumed_increment`).
mod common;

use common::*;
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockBitmaps;
use ramblock_core::block::BlockSpec;
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_core::section::SectionName;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::{check_resumed_increment, Workload};
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::runner::VcpuRunner;
use ramblock_kvm::vcpu_state::VcpuState;
use ramblock_linux::snapshot::{
    map_block, restore_eager, restore_lazy, LazyOptions, RestoreTarget, SaveOptions, SaveSection,
    SnapshotChain, Snapshotter,
};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::Arc;

const RAM: u64 = 8 << 20;

/// Runs a guest on `mem` from the snapshot's vCPU state until it has
/// made two passes, and checks it against the paused source.
fn resume_and_check(
    mem: LinuxMemory,
    state: &VcpuState,
    source: &ramblock_core::region::HostRegion<'_>,
    work: &Workload,
    what: &str,
) {
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(RAM));
    list.add(
        spec,
        mem,
        BlockBitmaps::<Owned>::allocate(ByteLen(RAM), 18).unwrap(),
    )
    .unwrap();
    run_on(&list, state, source, work, what);
}

fn run_on(
    list: &List<'_>,
    state: &VcpuState,
    source: &ramblock_core::region::HostRegion<'_>,
    work: &Workload,
    what: &str,
) {
    let vm_b = Arc::new(vm(DirtyLogRequest::Auto));
    map(
        &vm_b,
        list.read().by_name("pc.ram").unwrap(),
        0,
        BlockRange::Whole,
    )
    .unwrap();
    let vcpu = vm_b.create_vcpu(0).unwrap();
    vcpu.restore(state).unwrap();
    let next = work.next_page_index(state).unwrap();
    let runner = VcpuRunner::spawn(vm_b.clone(), vcpu).unwrap();
    wait_for_heartbeats(&runner, 2);
    runner.pause();
    let dest = region(list, "pc.ram");
    let delta = check_resumed_increment(source, &dest, work, next)
        .unwrap_or_else(|e| panic!("{what}: restored guest: {e}"));
    println!("{what}: resumed at page {next}, {delta:?}");
    let (_, err) = runner.stop();
    assert!(err.is_none(), "{what}: {err:?}");
}

#[test]
fn a_restored_guest_continues_its_loop_in_every_mode() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ramblock-snap-kvm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let list = List::new();
    add(&list, "pc.ram", RAM, |s| s);
    // The whole-bitmap log: every host has it, and a ring would need
    // reaping while the guest runs between the snapshots.
    let vm_a = Arc::new(vm(DirtyLogRequest::Mode(DirtyLogMode::Bitmap)));
    let offset = list.read().by_name("pc.ram").unwrap().offset();
    map(
        &vm_a,
        list.read().by_name("pc.ram").unwrap(),
        0,
        BlockRange::Whole,
    )
    .unwrap();
    // Logging stays on from the first snapshot on.
    vm_a.set_block_logging(offset, true).unwrap();
    let ram_a = region(&list, "pc.ram");
    let work = Workload::new(RAM).unwrap();
    let vcpu = vm_a.create_vcpu(0).unwrap();
    work.load(&ram_a, &vcpu).unwrap();
    let source = VcpuRunner::spawn(vm_a.clone(), vcpu).unwrap();

    let mut snap = Snapshotter::new();
    let mut log = KvmDirtyLog::new(&vm_a);
    let save =
        |snap: &mut Snapshotter, log: &mut KvmDirtyLog<'_>, path: &std::path::Path, diff: bool| {
            let state = source.snapshot().unwrap().to_bytes();
            let view = list.read();
            let block = view.by_name("pc.ram").unwrap();
            let sections = [SaveSection {
                name: SectionName::new("cpu").unwrap(),
                instance_id: 0,
                version: 1,
                bytes: &state,
            }];
            snap.save(
                path,
                &[block],
                log,
                &sections,
                diff,
                SaveOptions::default(),
                &|_| {},
            )
            .unwrap()
        };
    wait_for_heartbeats(&source, 2);
    source.pause();
    let full = save(&mut snap, &mut log, &dir.join("full.snap"), false);
    source.resume();
    wait_for_heartbeats(&source, source.heartbeats() + 2);
    source.pause();
    let diff_path = dir.join("diff.snap");
    let diff = save(&mut snap, &mut log, &diff_path, true);
    println!(
        "full {} bytes, diff {} bytes ({} pages held)",
        full.bytes_written, diff.bytes_written, diff.pages_held
    );
    // The guest wrote one byte in each page past 1 MiB, two passes over.
    assert!(diff.pages_held >= work.pages() && diff.pages_held < RAM / 4096);

    let chain = SnapshotChain::open(&diff_path).unwrap();
    let state = VcpuState::from_bytes(chain.newest().section("cpu", 0).unwrap()).unwrap();
    // The TSC kept counting while the guest was paused.
    assert_eq!(
        state.clone().comparable(),
        source.snapshot().unwrap().comparable()
    );

    // Eager.
    let mem = MemoryBuilder::anonymous(ByteLen(RAM)).build().unwrap();
    let target = RestoreTarget {
        name: "pc.ram",
        region: mem.region(),
        page_size: mem.page_size(),
    };
    restore_eager(&chain, &[target], 2, &|_| {}).unwrap();
    resume_and_check(mem, &state, &ram_a, &work, "eager");
    // Mapped.
    resume_and_check(
        map_block(&chain, "pc.ram").unwrap(),
        &state,
        &ram_a,
        &work,
        "mmap",
    );
    // Lazy: the guest runs while pages arrive.
    let list_b = List::new();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(RAM));
    let mem = MemoryBuilder::anonymous(ByteLen(RAM)).build().unwrap();
    list_b
        .add(
            spec,
            mem,
            BlockBitmaps::<Owned>::allocate(ByteLen(RAM), 18).unwrap(),
        )
        .unwrap();
    let view = list_b.read();
    let target = view.by_name("pc.ram").unwrap().memory();
    let ((), stats) = restore_lazy(
        &chain,
        &[("pc.ram", target)],
        LazyOptions::default(),
        |_| {
            run_on(&list_b, &state, &ram_a, &work, "lazy");
        },
    )
    .unwrap();
    println!("lazy: {stats:?}");
    assert!(stats.faults > 0 || stats.prefetched_pages == RAM / 4096);
    drop(view);

    let (_, err) = source.stop();
    assert!(err.is_none(), "{err:?}");
    let _ = std::fs::remove_dir_all(&dir);
}
