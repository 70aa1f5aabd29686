//! Shared by the integration tests: a skip check, blocks over LinuxMemory,
//! and helpers that harvest and drain a block the way migration does.
#![allow(dead_code)]

use ramblock_core::addr::{ByteLen, RamAddr};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::dirty_log::DirtyLogSource;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::vm::{Vm, VmBuilder};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Once;

/// The list type every test uses.
pub type List<'l> = RamList<'l, LinuxMemory, Owned, 8>;

/// Whether `/dev/kvm` is usable; prints the one skip line when it is not.
pub fn kvm_or_skip() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            println!("skipped: no /dev/kvm ({e})");
            false
        }
    }
}

/// A VM in `request`'s mode; prints the host's capabilities once.
pub fn vm(request: DirtyLogRequest) -> Vm {
    let vm = VmBuilder::new()
        .dirty_log(request)
        .build()
        .expect("create VM");
    static PRINT: Once = Once::new();
    PRINT.call_once(|| println!("host KVM: {}", vm.capabilities()));
    vm
}

/// A ring-mode VM with the smallest ring this host accepts (so tests can
/// overflow it cheaply).
pub fn smallest_ring_vm() -> Option<Vm> {
    let mut entries = 64;
    while entries <= 65536 {
        let req = DirtyLogRequest::Mode(DirtyLogMode::Ring { entries });
        match VmBuilder::new().dirty_log(req).build() {
            Ok(vm) => return Some(vm),
            Err(ramblock_kvm::KvmError::RingSize { .. }) => entries *= 2,
            Err(e) => panic!("ring VM: {e}"),
        }
    }
    None
}

/// Adds a block of `len` bytes over anonymous memory.
pub fn add(
    list: &List<'_>,
    name: &str,
    len: u64,
    tweak: impl FnOnce(BlockSpec) -> BlockSpec,
) -> RamAddr {
    let spec = tweak(BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(len)));
    let mem = if spec.flags.contains(BlockFlags::READ_ONLY) {
        // Read-only memory needs a file behind it: a ROM image of zeros.
        let path = std::env::temp_dir().join(format!("ramblock-kvm-{}-{name}", std::process::id()));
        std::fs::write(&path, vec![0u8; len as usize]).unwrap();
        let mem = MemoryBuilder::file(&path, spec.used_length)
            .read_only(true)
            .build();
        let _ = std::fs::remove_file(&path);
        mem.expect("read-only file memory")
    } else {
        let mut mem = MemoryBuilder::anonymous(spec.used_length);
        if spec.max_length != spec.used_length {
            mem = mem.max_length(spec.max_length);
        }
        mem.build().expect("anonymous memory")
    };
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps)
        .map_err(|r| r.error)
        .expect("add block")
}

/// The host memory of block `name`, for as long as the list is borrowed.
pub fn region<'l>(list: &'l List<'_>, name: &str) -> HostRegion<'l> {
    let view = list.read();
    // SAFETY: the tests never remove or shrink a block of a list they keep,
    // and the region lives no longer than the borrow of the list ('l); the
    // read guard is dropped only so the tests can harvest and resize others.
    unsafe { view.by_name(name).unwrap().memory().region().detach() }
}

/// Maps `range` of `block` at `gpa`. Every test declares its list before
/// its VM (or makes the VM the list's listener), so a block's memory stays
/// mapped while any slot points at it.
pub fn map(
    vm: &Vm,
    block: &ramblock_core::block::RamBlock<LinuxMemory, Owned>,
    gpa: u64,
    range: ramblock_kvm::memslot::BlockRange,
) -> Result<ramblock_kvm::memslot::SlotId, ramblock_kvm::KvmError> {
    // SAFETY: see above: the block outlives the slot in every test.
    unsafe { vm.map_block(block, gpa, range) }
}

/// Harvests block `name` into its migration bitmap; returns the newly-dirty count.
pub fn sync<D: DirtyLogSource>(list: &List<'_>, name: &str, log: &mut D) -> u64
where
    D::Error: Debug,
{
    let view = list.read();
    let block = view.by_name(name).unwrap();
    block.sync_dirty_log(log).expect("harvest")
}

/// Sends everything dirty in block `name` the way migration does (clearing
/// each chunk in the hypervisor before its first page) and returns the pages.
pub fn drain<D: DirtyLogSource>(list: &List<'_>, name: &str, log: &mut D) -> BTreeSet<usize>
where
    D::Error: Debug,
{
    let view = list.read();
    let block = view.by_name(name).unwrap();
    let info = block.info();
    let mut state = block.migration();
    let mut sent = BTreeSet::new();
    let mut from = 0;
    while let Some(run) = state
        .next_dirty_run(from, 1 << 20, &info, log)
        .expect("clear")
    {
        from = run.end;
        sent.extend(run);
    }
    assert_eq!(state.bitmap.dirty_count(), 0, "drain leaves nothing dirty");
    sent
}

/// Harvest then drain: the pages dirtied since the last drain.
pub fn harvest<D: DirtyLogSource>(list: &List<'_>, name: &str, log: &mut D) -> BTreeSet<usize>
where
    D::Error: Debug,
{
    let newly = sync(list, name, log);
    let sent = drain(list, name, log);
    assert_eq!(newly, sent.len() as u64, "newly-dirty count of {name}");
    sent
}

/// The first byte of page `page` of block `name`.
pub fn first_byte(list: &List<'_>, name: &str, page: usize) -> u8 {
    let mut b = [0u8];
    region(list, name)
        .read(ByteLen::from_pages(page as u64), &mut b)
        .unwrap();
    b[0]
}

/// A set from a slice.
pub fn set(pages: &[usize]) -> BTreeSet<usize> {
    pages.iter().copied().collect()
}

/// `HostMemory` in scope for callers.
pub fn used(list: &List<'_>, name: &str) -> u64 {
    list.read().by_name(name).unwrap().memory().used_len().0
}

/// Two VMs, `a` and `b`, each with its own block of `len` bytes (`a.ram`,
/// `b.ram`) added to `list` and mapped whole at guest address 0: the source
/// and the destination of a move between VMs.
pub fn two_vms(list: &List<'_>, len: u64) -> (Vm, Vm) {
    add(list, "a.ram", len, |s| s);
    add(list, "b.ram", len, |s| s);
    let vm_a = vm(DirtyLogRequest::Auto);
    let vm_b = vm(DirtyLogRequest::Auto);
    {
        let view = list.read();
        let whole = ramblock_kvm::memslot::BlockRange::Whole;
        map(&vm_a, view.by_name("a.ram").unwrap(), 0, whole).unwrap();
        map(&vm_b, view.by_name("b.ram").unwrap(), 0, whole).unwrap();
    }
    (vm_a, vm_b)
}

/// Waits (at most 60 s) until `runner` has counted `n` heartbeats, failing
/// the test on a runner error.
pub fn wait_for_heartbeats(runner: &ramblock_kvm::runner::VcpuRunner, n: u64) {
    let start = std::time::Instant::now();
    while runner.heartbeats() < n {
        assert!(runner.error().is_none(), "{:?}", runner.error());
        assert!(
            start.elapsed() < std::time::Duration::from_secs(60),
            "no progress"
        );
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}
