//! A harvest allocates nothing, in every mode: a counting global allocator
//! sees zero allocations across sync (fetch + merge) and the clears that
//! sending triggers. One test function, so no other test thread allocates
//! while the count is on.
mod common;

use common::*;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::PageWriter;
use ramblock_kvm::memslot::BlockRange;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::vm::VmBuilder;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
// SAFETY: forwards every call to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        // SAFETY: the caller upholds GlobalAlloc's contract, which is System's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds GlobalAlloc's contract, which is System's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(SeqCst) {
            ALLOCATIONS.fetch_add(1, SeqCst);
        }
        // SAFETY: the caller upholds GlobalAlloc's contract, which is System's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made by `f`.
fn allocations<R>(f: impl FnOnce() -> R) -> (usize, R) {
    ALLOCATIONS.store(0, SeqCst);
    COUNTING.store(true, SeqCst);
    let r = f();
    COUNTING.store(false, SeqCst);
    (ALLOCATIONS.load(SeqCst), r)
}

#[test]
fn harvesting_and_clearing_allocate_nothing_in_any_mode() {
    if !kvm_or_skip() {
        return;
    }
    let modes = [
        DirtyLogMode::Bitmap,
        DirtyLogMode::ManualProtect,
        DirtyLogMode::Ring { entries: 4096 },
    ];
    let mut proven = 0;
    for mode in modes {
        let list = List::new();
        add(&list, "boot", 128 << 10, |s| s);
        add(&list, "ram", 8 << 20, |s| s.clear_shift(6));
        let Ok(vm) = VmBuilder::new()
            .dirty_log(DirtyLogRequest::Mode(mode))
            .build()
        else {
            println!("{mode}: not offered here");
            continue;
        };
        {
            let view = list.read();
            for (name, gpa) in [("boot", 0), ("ram", 1 << 20)] {
                let slot = map(&vm, view.by_name(name).unwrap(), gpa, BlockRange::Whole).unwrap();
                vm.set_logging(slot, true).unwrap();
            }
        }
        let mut log = KvmDirtyLog::new(&vm);
        harvest(&list, "ram", &mut log);
        let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
        let gpas: Vec<u64> = (0..2048u64)
            .step_by(7)
            .map(|p| (1 << 20) + p * 4096)
            .collect();
        guest.write_pages(&vm, &gpas, 1).unwrap();
        let view = list.read();
        let block = view.by_name("ram").unwrap();
        block
            .write(ramblock_core::addr::ByteLen(5 << 12), b"dma")
            .unwrap();
        let info = block.info();
        let (n, newly) = allocations(|| block.sync_dirty_log(&mut log).unwrap());
        assert_eq!(newly, gpas.len() as u64 + 1, "{mode}");
        assert_eq!(n, 0, "{mode}: allocations during a harvest");
        let (n, sent) = allocations(|| {
            let mut state = block.migration();
            let (mut from, mut sent) = (0, 0);
            while let Some(run) = state.next_dirty_run(from, 64, &info, &mut log).unwrap() {
                sent += run.len();
                from = run.end;
            }
            sent
        });
        assert_eq!(sent, gpas.len() + 1);
        assert_eq!(n, 0, "{mode}: allocations while clearing and sending");
        let (n, newly) = allocations(|| block.sync_dirty_log(&mut log).unwrap());
        assert_eq!((n, newly), (0, 0), "{mode}: idle harvest");
        proven += 1;
    }
    assert!(proven >= 1);
}
