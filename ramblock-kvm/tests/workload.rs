//! The CPL 3 migration workload on a runner thread: it makes progress
//! (heartbeats), pauses with every write visible, dirties exactly its pages
//! each pass, and keeps running under a throttle.
mod common;

use common::*;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::{Workload, WORKLOAD_FIRST};
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::DirtyLogRequest;
use ramblock_kvm::runner::VcpuRunner;
use std::sync::Arc;
use std::time::Duration;

const RAM: u64 = 8 << 20;

#[test]
fn the_workload_runs_pauses_and_dirties_exactly_its_pages() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "pc.ram", RAM, |s| s);
    let vm = Arc::new(vm(DirtyLogRequest::Auto));
    {
        let view = list.read();
        let slot = map(&vm, view.by_name("pc.ram").unwrap(), 0, BlockRange::Whole).unwrap();
        vm.set_logging(slot, true).unwrap();
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    let work = Workload::new(RAM).unwrap();
    work.load(&region(&list, "pc.ram"), &vcpu).unwrap();
    let runner = VcpuRunner::spawn(vm.clone(), vcpu).unwrap();
    wait_for_heartbeats(&runner, 2);
    runner.pause();
    assert!(runner.is_paused());

    // Paused: every page holds the pass count, or one more if the current
    // pass got to it, and those come first.
    let h = runner.heartbeats();
    let first = (WORKLOAD_FIRST / 4096) as usize;
    let bytes: Vec<u8> = (first..(RAM / 4096) as usize)
        .map(|p| first_byte(&list, "pc.ram", p))
        .collect();
    let ahead = bytes.iter().take_while(|&&b| b == (h + 1) as u8).count();
    assert!(
        bytes[ahead..].iter().all(|&b| b == h as u8),
        "pass {h}: {ahead} pages ahead, then {:?}",
        &bytes[ahead..ahead + 4]
    );
    // Still paused: the bytes do not move.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(first_byte(&list, "pc.ram", first + ahead), h as u8);

    let mut log = KvmDirtyLog::new(&vm);
    harvest(&list, "pc.ram", &mut log);
    assert_eq!(
        harvest(&list, "pc.ram", &mut log),
        set(&[]),
        "paused guest dirties nothing"
    );
    runner.resume();
    wait_for_heartbeats(&runner, h + 2);
    runner.set_throttle(0.5);
    wait_for_heartbeats(&runner, h + 3);
    runner.pause();
    // A full pass ran since the harvest: exactly the workload's pages.
    let want: Vec<usize> = (first..(RAM / 4096) as usize).collect();
    assert_eq!(harvest(&list, "pc.ram", &mut log), set(&want));
    let (vcpu, err) = runner.stop();
    assert!(err.is_none(), "{err:?}");
    assert!(vcpu.is_some());
}
