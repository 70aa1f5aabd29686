//! Memslots as KVM sees them: ids and ranges managed here, read-only
//! blocks, sub-ranges, logging switched per slot, growth and removal.
mod common;

use common::*;
use ramblock_core::addr::ByteLen;
use ramblock_core::flags::BlockFlags;
use ramblock_kvm::dirty::KvmDirtyLog;
use ramblock_kvm::guest::PageWriter;
use ramblock_kvm::memslot::{BlockRange, SlotId};
use ramblock_kvm::mode::{DirtyLogMode, DirtyLogRequest};
use ramblock_kvm::KvmError;

const MIB: u64 = 1 << 20;

#[test]
fn overlapping_ranges_and_bad_ranges_are_typed_errors() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "a", 2 * MIB, |s| s);
    let vm = vm(DirtyLogRequest::Auto);
    let view = list.read();
    let a = view.by_name("a").unwrap();
    let first = map(&vm, a, MIB, BlockRange::Whole).unwrap();
    let err = map(
        &vm,
        a,
        2 * MIB,
        BlockRange::Pages {
            first: 0,
            count: 16,
        },
    )
    .unwrap_err();
    assert!(matches!(err, KvmError::Overlap { other: 0, .. }), "{err}");
    assert!(err.to_string().contains("overlaps slot 0"), "{err}");
    let past = map(
        &vm,
        a,
        8 * MIB,
        BlockRange::Pages {
            first: 500,
            count: 13,
        },
    );
    assert!(matches!(past, Err(KvmError::Range { used: 512, .. })));
    let odd = map(
        &vm,
        a,
        8 * MIB + 1,
        BlockRange::Pages { first: 0, count: 1 },
    );
    assert!(matches!(odd, Err(KvmError::BadGpa { .. })));
    // Sub-ranges of one block at two places get the next free ids.
    let s1 = map(
        &vm,
        a,
        8 * MIB,
        BlockRange::Pages {
            first: 0,
            count: 16,
        },
    )
    .unwrap();
    assert_eq!((first, s1), (SlotId(0), SlotId(1)));
    vm.unmap(first).unwrap();
    assert!(matches!(vm.unmap(first), Err(KvmError::UnknownSlot(0))));
    let again = map(&vm, a, MIB, BlockRange::Whole).unwrap();
    assert_eq!(again, SlotId(0), "freed ids are reused");
    assert_eq!(vm.slots().len(), 2);
}

#[test]
fn a_read_only_block_is_a_read_only_slot_the_guest_cannot_write() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "boot", 128 << 10, |s| s);
    add(&list, "rom", MIB, |s| s.flags(BlockFlags::READ_ONLY));
    let vm = vm(DirtyLogRequest::Auto);
    if !vm.capabilities().readonly_mem {
        println!("skipped: host lacks KVM_CAP_READONLY_MEM");
        return;
    }
    let view = list.read();
    map(&vm, view.by_name("boot").unwrap(), 0, BlockRange::Whole).unwrap();
    let rom = map(&vm, view.by_name("rom").unwrap(), MIB, BlockRange::Whole).unwrap();
    drop(view);
    let info = vm.slots().into_iter().find(|s| s.id == rom).unwrap();
    assert!(info.read_only);
    vm.set_logging(rom, true).unwrap();
    assert!(
        !vm.slots()[rom.0 as usize].logging,
        "nothing to log in a read-only slot"
    );
    let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
    // KVM turns a write to a read-only slot into an MMIO exit.
    let err = guest.write_pages(&vm, &[MIB + 0x3000], 0x77).unwrap_err();
    assert!(err.to_string().contains("MmioWrite"), "{err}");
    assert_eq!(first_byte(&list, "rom", 3), 0, "the ROM is unchanged");
}

#[test]
fn a_sub_range_slot_reports_pages_at_their_place_in_the_block() {
    if !kvm_or_skip() {
        return;
    }
    let list = List::new();
    add(&list, "boot", 128 << 10, |s| s);
    add(&list, "ram", 4 * MIB, |s| s);
    let vm = vm(DirtyLogRequest::Mode(DirtyLogMode::Bitmap));
    let view = list.read();
    map(&vm, view.by_name("boot").unwrap(), 0, BlockRange::Whole).unwrap();
    // Pages 100..300 and 700..1024 of "ram", at unrelated guest addresses.
    let low = map(
        &vm,
        view.by_name("ram").unwrap(),
        2 * MIB,
        BlockRange::Pages {
            first: 100,
            count: 200,
        },
    )
    .unwrap();
    let high = map(
        &vm,
        view.by_name("ram").unwrap(),
        16 * MIB,
        BlockRange::Pages {
            first: 700,
            count: 324,
        },
    )
    .unwrap();
    drop(view);
    vm.set_logging(low, true).unwrap();
    vm.set_logging(high, true).unwrap();
    let mut log = KvmDirtyLog::new(&vm);
    let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
    guest
        .write_pages(
            &vm,
            &[2 * MIB, 2 * MIB + 199 * 4096, 16 * MIB + 5 * 4096],
            1,
        )
        .unwrap();
    assert_eq!(harvest(&list, "ram", &mut log), set(&[100, 299, 705]));
    assert_eq!(first_byte(&list, "ram", 705), 1);

    // Logging off for one slot: its writes are not reported, the other's are.
    vm.set_logging(low, false).unwrap();
    guest
        .write_pages(&vm, &[2 * MIB + 4096, 16 * MIB], 2)
        .unwrap();
    assert_eq!(harvest(&list, "ram", &mut log), set(&[700]));
    // On again, without re-creating anything.
    vm.set_logging(low, true).unwrap();
    guest.write_pages(&vm, &[2 * MIB + 8192], 3).unwrap();
    assert_eq!(harvest(&list, "ram", &mut log), set(&[102]));
    assert_eq!(
        first_byte(&list, "ram", 101),
        2,
        "the unlogged write still happened"
    );
}

#[test]
fn growing_a_block_grows_its_slot_and_removing_it_removes_the_slot() {
    if !kvm_or_skip() {
        return;
    }
    for mode in [
        DirtyLogMode::Bitmap,
        DirtyLogMode::ManualProtect,
        DirtyLogMode::Ring { entries: 4096 },
    ] {
        let vm = match ramblock_kvm::vm::VmBuilder::new()
            .dirty_log(DirtyLogRequest::Mode(mode))
            .build()
        {
            Ok(vm) => vm,
            Err(KvmError::ModeUnsupported { .. }) => continue,
            Err(e) => panic!("{e}"),
        };
        // Declared after the VM so the list (and its memory) outlives it... but
        // the list must also hold the VM as a listener: both live to the end.
        let list = List::new();
        list.add_listener(&vm).unwrap();
        add(&list, "boot", 128 << 10, |s| s);
        add(&list, "ram", MIB, |s| s.resizable(ByteLen(4 * MIB)));
        {
            let view = list.read();
            for (name, gpa) in [("boot", 0), ("ram", MIB)] {
                let slot = map(&vm, view.by_name(name).unwrap(), gpa, BlockRange::Whole).unwrap();
                vm.set_logging(slot, true).unwrap();
            }
        }
        let mut log = KvmDirtyLog::new(&vm);
        harvest(&list, "ram", &mut log);
        let mut guest = PageWriter::new(vm.create_vcpu(0).unwrap(), region(&list, "boot")).unwrap();
        guest.write_pages(&vm, &[MIB + 7 * 4096], 1).unwrap();
        list.resize("ram", ByteLen(3 * MIB)).unwrap();
        assert!(vm.take_listener_error().is_none());
        let slot = vm.slots().into_iter().find(|s| s.gpa == MIB).unwrap();
        assert_eq!(slot.len, 3 * MIB, "{mode}: the slot follows the block");
        // The resize marks the whole new length dirty; after sending it, the
        // guest can use the new pages and they are logged.
        let all = harvest(&list, "ram", &mut log);
        assert_eq!(all.len(), 768, "{mode}");
        guest.write_pages(&vm, &[MIB + 700 * 4096], 2).unwrap();
        assert_eq!(harvest(&list, "ram", &mut log), set(&[700]), "{mode}");
        assert_eq!(first_byte(&list, "ram", 700), 2);
        assert_eq!(
            first_byte(&list, "ram", 7),
            1,
            "{mode}: contents kept across the resize"
        );
        drop(guest);
        list.remove("ram").unwrap();
        assert!(vm.take_listener_error().is_none());
        assert_eq!(
            vm.slots().len(),
            1,
            "{mode}: the removed block's slot is gone"
        );
        list.remove("boot").unwrap();
        assert!(vm.slots().is_empty());
    }
}

/// `Vm::block_resized` is safe, and re-registers memory with KVM: it finds
/// the slots by RAM address, so a block of another list at the same
/// address must not get its memory (which nobody vouched for, and which may
/// be freed while the slot maps it) handed to KVM.
#[test]
fn a_resize_of_another_lists_block_at_the_same_address_is_refused() {
    if !kvm_or_skip() {
        return;
    }
    let mapped = List::new();
    let other = List::new();
    let at = add(&mapped, "ram", MIB, |s| s.resizable(ByteLen(4 * MIB)));
    assert_eq!(
        add(&other, "ram", 2 * MIB, |s| s.resizable(ByteLen(4 * MIB))),
        at,
        "both blocks are at the same RAM address"
    );
    let vm = vm(DirtyLogRequest::Auto);
    let slot = map(
        &vm,
        mapped.read().by_name("ram").unwrap(),
        MIB,
        BlockRange::Whole,
    )
    .unwrap();
    vm.set_logging(slot, true).unwrap();
    let err = vm
        .block_resized(other.read().by_name("ram").unwrap())
        .unwrap_err();
    assert!(
        matches!(err, KvmError::ForeignBlock { slot: 0, found_len, .. } if found_len == 2 * MIB),
        "{err}"
    );
    assert!(
        err.to_string().contains("pass the block that was mapped"),
        "{err}"
    );
    assert_eq!(vm.slots()[0].len, MIB, "the slot is unchanged");
    // The mapped block itself still resizes its slot.
    mapped.resize("ram", ByteLen(3 * MIB)).unwrap();
    vm.block_resized(mapped.read().by_name("ram").unwrap())
        .unwrap();
    assert_eq!(vm.slots()[0].len, 3 * MIB);
}
