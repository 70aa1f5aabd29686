//! Harvesting the dirty log of an 8 GiB memslot, each mode against the bare
//! `KVM_GET_DIRTY_LOG` ioctl into a plain buffer (`baseline`) and against
//! kvm-ioctls' `VmFd::get_dirty_log` (which allocates its bitmap per call).
//!
//! The 8 GiB block is anonymous `MAP_NORESERVE` memory, so it costs no RAM
//! until touched. Host writes are not logged by KVM, so dirty pages come
//! from a guest: a CPL 3 page writer stores to every 50th page of the
//! slot's first 4 GiB (what a 32-bit guest reaches), 1% of the slot.
//!
//! Figures (one criterion group each):
//! - `harvest_8g_clean`: nothing dirty. `bitmap`, `manual` and `ring` are
//!   each mode's `DirtyLogSource::harvest` merging into the block's
//!   migration bitmap; `bitmap_sync` is the block's whole
//!   `RamBlock::sync_dirty_log` (adds the core's merge of the VMM's own
//!   dirty bitmap).
//! - `harvest_8g_1pct`: 1% dirty, on the manual-protect VM, whose fetch does
//!   not re-protect, so every iteration sees the same 1% (a bitmap-mode
//!   fetch would clean the log, and re-dirtying 21k pages costs ~50 ms of
//!   write faults per iteration here, far longer than the harvest).
use criterion::{criterion_group, criterion_main, Criterion};
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec, RamBlock};
use ramblock_core::dirty_log::DirtyLogSource;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_kvm::dirty::bitmap::get_dirty_log;
use ramblock_kvm::dirty::{BitmapLog, KvmDirtyLog, ManualProtectLog, RingLog};
use ramblock_kvm::guest::PageWriter;
use ramblock_kvm::memslot::{BlockRange, SlotId};
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::hint::black_box;
use std::time::Duration;

const SLOT_GPA: u64 = 1 << 20;
const BIG: u64 = 8 << 30;

type List = RamList<'static, LinuxMemory, Owned, 4>;

fn add(list: &List, name: &str, len: u64) {
    let spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(len))
        .flags(BlockFlags::MIGRATABLE | BlockFlags::NO_RESERVE);
    let mem = MemoryBuilder::anonymous(ByteLen(len))
        .no_reserve(true)
        .build()
        .expect("no-reserve anonymous memory");
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
}

fn block<'a>(
    view: &'a ramblock_core::list::RamListView<'_, '_, LinuxMemory, Owned, 4>,
    name: &str,
) -> &'a RamBlock<LinuxMemory, Owned> {
    view.by_name(name).unwrap()
}

/// A VM in `mode` mapping "boot" at 0 and "big" at `SLOT_GPA`, logging on;
/// returns it with big's slot id, or None if the host lacks the mode.
fn vm_for(list: &List, mode: DirtyLogMode) -> Option<(Vm, SlotId)> {
    let vm = VmBuilder::new()
        .dirty_log(DirtyLogRequest::Mode(mode))
        .build()
        .ok()?;
    let view = list.read();
    let mut big = None;
    for (name, gpa) in [("boot", 0), ("big", SLOT_GPA)] {
        // SAFETY: the list is leaked ('static), so its memory outlives every slot.
        let slot = unsafe { vm.map_block(block(&view, name), gpa, BlockRange::Whole) }.unwrap();
        vm.set_logging(slot, true).unwrap();
        big = Some(slot);
    }
    Some((vm, big?))
}

/// Harvests and sends everything in "big" through `log`, leaving it clean.
fn drain(list: &List, log: &mut impl DirtyLogSource<Error = ramblock_kvm::KvmError>) {
    let view = list.read();
    let big = block(&view, "big");
    big.sync_dirty_log(log).unwrap();
    let info = big.info();
    let mut state = big.migration();
    let mut from = 0;
    while let Some(run) = state.next_dirty_run(from, usize::MAX, &info, log).unwrap() {
        from = run.end;
    }
}

fn harvest_only(list: &List, log: &mut impl DirtyLogSource<Error = ramblock_kvm::KvmError>) -> u64 {
    let view = list.read();
    let big = block(&view, "big");
    let info = big.info();
    let mut state = big.migration();
    state.bitmap.with_view(|v| log.harvest(&info, v)).unwrap()
}

fn bench(c: &mut Criterion) {
    if std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        println!("skipped: no /dev/kvm");
        return;
    }
    let list: &'static List = Box::leak(Box::new(List::new()));
    add(list, "boot", 256 << 10);
    add(list, "big", BIG);
    let slot_pages = BIG / 4096;
    let mut buf = vec![0u64; (slot_pages / 64) as usize];

    let (bitmap_vm, bitmap_slot) = vm_for(list, DirtyLogMode::Bitmap).expect("bitmap mode");
    let manual = vm_for(list, DirtyLogMode::ManualProtect);
    let ring = vm_for(list, DirtyLogMode::Ring { entries: 4096 });
    println!("host KVM: {}", bitmap_vm.capabilities());
    // SAFETY: the fd is only used below for KVM_GET_DIRTY_LOG of `big`'s
    // slot into buffers of BIG / 4096 bits, one per page of the slot.
    let bitmap_fd = unsafe { bitmap_vm.fd() };

    let mut g = c.benchmark_group("harvest_8g_clean");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    drain(list, &mut KvmDirtyLog::new(&bitmap_vm));
    g.bench_function("baseline", |b| {
        // SAFETY: `buf` holds one bit per page of the BIG-byte slot.
        b.iter(|| unsafe { get_dirty_log(bitmap_fd, bitmap_slot.0, black_box(&mut buf)) }.unwrap())
    });
    g.bench_function("kvm_ioctls_get_dirty_log", |b| {
        b.iter(|| {
            black_box(
                bitmap_fd
                    .get_dirty_log(bitmap_slot.0, BIG as usize)
                    .unwrap(),
            )
        })
    });
    let mut log = BitmapLog::new(&bitmap_vm).unwrap();
    g.bench_function("bitmap", |b| {
        b.iter(|| black_box(harvest_only(list, &mut log)))
    });
    g.bench_function("bitmap_sync", |b| {
        b.iter(|| black_box(block(&list.read(), "big").sync_dirty_log(&mut log).unwrap()))
    });
    if let Some((vm, _)) = &manual {
        let mut log = ManualProtectLog::new(vm).unwrap();
        drain(list, &mut log);
        g.bench_function("manual", |b| {
            b.iter(|| black_box(harvest_only(list, &mut log)))
        });
    }
    if let Some((vm, _)) = &ring {
        let mut log = RingLog::new(vm).unwrap();
        drain(list, &mut log);
        g.bench_function("ring", |b| {
            b.iter(|| black_box(harvest_only(list, &mut log)))
        });
    }
    g.finish();

    let Some((vm, slot)) = &manual else {
        println!("skipped harvest_8g_1pct: no manual-protect mode");
        return;
    };
    // 1% of the slot's pages, dirtied once by a CPL 3 guest; the
    // manual-protect log keeps them set until cleared, which we never do.
    let mut log = ManualProtectLog::new(vm).unwrap();
    drain(list, &mut log);
    let pages: Vec<u64> = (0..(1u64 << 32) - SLOT_GPA - (1 << 20))
        .step_by(50 * 4096)
        .map(|off| SLOT_GPA + off)
        .collect();
    // SAFETY: the bench never removes or shrinks the boot block, and the
    // list outlives the writer.
    let low = unsafe { block(&list.read(), "boot").memory().region().detach() };
    let mut writer = PageWriter::new(vm.create_vcpu(0).unwrap(), low).unwrap();
    writer.write_pages(vm, &pages, 1).unwrap();
    let newly = harvest_only(list, &mut log);
    println!("1% case: {} pages written, {newly} harvested", pages.len());
    // SAFETY: as for `bitmap_fd`: only dirty-log fetches of the BIG-byte
    // slot, into buffers sized for it.
    let fd = unsafe { vm.fd() };
    let mut g = c.benchmark_group("harvest_8g_1pct");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    g.bench_function("baseline", |b| {
        // SAFETY: `buf` holds one bit per page of the BIG-byte slot.
        b.iter(|| unsafe { get_dirty_log(fd, slot.0, black_box(&mut buf)) }.unwrap())
    });
    g.bench_function("kvm_ioctls_get_dirty_log", |b| {
        b.iter(|| black_box(fd.get_dirty_log(slot.0, BIG as usize).unwrap()))
    });
    g.bench_function("manual", |b| {
        b.iter(|| black_box(harvest_only(list, &mut log)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
