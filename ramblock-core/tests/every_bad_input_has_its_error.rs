//! One test per error variant of the list and block APIs: each bad input is
//! refused with its own typed error, and leaves the list unchanged.
#![allow(unsafe_code)]

use ramblock_core::addr::{ByteLen, PageSize, RamAddr, BLOCK_ALIGN};
use ramblock_core::bitmap::{alloc_atomic, alloc_plain, Owned, StorageTooSmall};
use ramblock_core::block::{AccessError, BlockBitmaps, BlockSpec};
use ramblock_core::buffer::{BufferError, BufferMemory};
use ramblock_core::dirty_log::DirtyClients;
use ramblock_core::flags::{BlockFlags, FlagsError};
use ramblock_core::host::HostMemory;
use ramblock_core::list::{
    AddError, DirtyError, ListenersFull, RamList, ResizeError, UnknownBlock, MAX_LISTENERS,
};
use ramblock_core::listener::RamListener;
use ramblock_core::name::BlockName;
use std::cell::Cell;
use std::ptr::NonNull;

const PAGE: u64 = 4096;

/// Buffer memory whose next resize can be made to fail, as a host can.
struct Flaky {
    inner: BufferMemory<Box<[u8]>>,
    fail_next_resize: Cell<bool>,
}

// SAFETY: every method forwards to BufferMemory, which upholds the contract;
// a refused resize changes nothing.
unsafe impl HostMemory for Flaky {
    type Error = BufferError;
    fn base(&self) -> NonNull<u8> {
        self.inner.base()
    }
    fn reserved_len(&self) -> ByteLen {
        self.inner.reserved_len()
    }
    fn used_len(&self) -> ByteLen {
        self.inner.used_len()
    }
    fn page_size(&self) -> PageSize {
        self.inner.page_size()
    }
    fn set_used_len(&mut self, len: ByteLen) -> Result<(), BufferError> {
        if self.fail_next_resize.take() {
            return Err(BufferError::TooLong {
                asked: len.0,
                available: 0,
            });
        }
        self.inner.set_used_len(len)
    }
    fn discard(&self, offset: ByteLen, len: ByteLen) -> Result<(), BufferError> {
        self.inner.discard(offset, len)
    }
}

fn mem(reserved: u64, used: u64, page: PageSize) -> Flaky {
    let inner = BufferMemory::new(
        vec![0u8; reserved as usize].into_boxed_slice(),
        ByteLen(used),
        page,
    )
    .unwrap();
    Flaky {
        inner,
        fail_next_resize: Cell::new(false),
    }
}

fn spec(name: &str, pages: u64) -> BlockSpec {
    BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE))
}

type List = RamList<'static, Flaky, Owned, 4>;

fn add_err(list: &List, spec: BlockSpec, memory: Flaky) -> AddError {
    let bitmaps = BlockBitmaps::allocate(spec.max_length, spec.clear_shift)
        .unwrap_or_else(|_| BlockBitmaps::allocate(spec.max_length, 18).unwrap());
    let version = list.version();
    let err = list.add(spec, memory, bitmaps).unwrap_err().error;
    assert_eq!(list.version(), version, "a refused add changes nothing");
    err
}

#[test]
fn add_refuses_contradictory_flags() {
    let list = List::new();
    let s = spec("a", 4).flags(BlockFlags::PMEM);
    assert_eq!(
        add_err(&list, s, mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K)),
        AddError::Flags(FlagsError::PmemNotShared)
    );
}

#[test]
fn add_refuses_a_duplicate_name() {
    let list = List::new();
    let s = spec("a", 4);
    list.add(
        s.clone(),
        mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    assert_eq!(
        add_err(&list, s, mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K)),
        AddError::DuplicateName
    );
}

#[test]
fn add_refuses_zero_length() {
    let list = List::new();
    assert_eq!(
        add_err(&list, spec("a", 0), mem(PAGE, 0, PageSize::SIZE_4K)),
        AddError::ZeroLength
    );
}

#[test]
fn add_refuses_lengths_not_multiple_of_the_host_page() {
    let list = List::new();
    let two_m = PageSize::SIZE_2M.bytes();
    let err = add_err(&list, spec("a", 4), mem(two_m, 0, PageSize::SIZE_2M));
    assert_eq!(
        err,
        AddError::Unaligned {
            length: 4 * PAGE,
            page_size: two_m
        }
    );
}

#[test]
fn add_refuses_used_past_max() {
    let list = List::new();
    let s = spec("a", 8).resizable(ByteLen(4 * PAGE));
    assert_eq!(
        add_err(&list, s, mem(8 * PAGE, 8 * PAGE, PageSize::SIZE_4K)),
        AddError::UsedExceedsMax {
            used: 8 * PAGE,
            max: 4 * PAGE
        }
    );
}

#[test]
fn add_refuses_slack_on_a_fixed_block() {
    let list = List::new();
    let mut s = spec("a", 4);
    s.max_length = ByteLen(8 * PAGE);
    let err = add_err(&list, s, mem(8 * PAGE, 4 * PAGE, PageSize::SIZE_4K));
    assert_eq!(
        err,
        AddError::MaxLengthNeedsResizable {
            used: 4 * PAGE,
            max: 8 * PAGE
        }
    );
}

#[test]
fn add_refuses_postcopy_length_past_max() {
    let list = List::new();
    let s = spec("a", 4).postcopy_length(ByteLen(5 * PAGE));
    assert_eq!(
        add_err(&list, s, mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K)),
        AddError::PostcopyTooLong {
            postcopy: 5 * PAGE,
            max: 4 * PAGE
        }
    );
}

#[test]
fn add_refuses_memory_smaller_than_max() {
    let list = List::new();
    let s = spec("a", 4).resizable(ByteLen(8 * PAGE));
    assert_eq!(
        add_err(&list, s, mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K)),
        AddError::MemoryTooSmall {
            reserved: 4 * PAGE,
            max: 8 * PAGE
        }
    );
}

#[test]
fn add_refuses_memory_with_another_used_length() {
    let list = List::new();
    assert_eq!(
        add_err(
            &list,
            spec("a", 4),
            mem(4 * PAGE, 2 * PAGE, PageSize::SIZE_4K)
        ),
        AddError::MemoryUsedMismatch {
            memory: 2 * PAGE,
            block: 4 * PAGE
        }
    );
}

#[test]
fn add_refuses_a_clear_shift_out_of_range() {
    let list = List::new();
    let s = spec("a", 4).clear_shift(40);
    assert_eq!(
        add_err(&list, s, mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K)),
        AddError::ClearShift(40)
    );
}

#[test]
fn add_refuses_short_bitmap_storage() {
    let list = List::new();
    let s = spec("a", 65);
    let bitmaps = BlockBitmaps::<Owned> {
        dirty: [alloc_atomic(2), alloc_atomic(2), alloc_atomic(1)],
        migration: alloc_plain(2),
        clear: alloc_plain(1),
        received: alloc_atomic(2),
    };
    let rej = list
        .add(s, mem(65 * PAGE, 65 * PAGE, PageSize::SIZE_4K), bitmaps)
        .unwrap_err();
    assert_eq!(
        rej.error,
        AddError::Storage(StorageTooSmall {
            needed: 2,
            given: 1
        })
    );
    assert_eq!(rej.bitmaps.dirty[2].len(), 1, "the storage comes back");
}

#[test]
fn add_refuses_when_no_gap_fits() {
    let list = List::with_address_limit(2 * BLOCK_ALIGN);
    let s = spec("a", 64);
    list.add(
        s.clone(),
        mem(64 * PAGE, 64 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    assert_eq!(
        add_err(
            &list,
            spec("b", 65),
            mem(65 * PAGE, 65 * PAGE, PageSize::SIZE_4K)
        ),
        AddError::AddressSpaceFull
    );
}

#[test]
fn add_refuses_past_capacity_and_hands_the_memory_back() {
    let list = List::new();
    for i in 0..4 {
        let s = spec(&format!("b{i}"), 1);
        list.add(
            s.clone(),
            mem(PAGE, PAGE, PageSize::SIZE_4K),
            BlockBitmaps::for_spec(&s).unwrap(),
        )
        .unwrap();
    }
    let m = mem(PAGE, PAGE, PageSize::SIZE_4K);
    let base = m.base();
    let s = spec("b4", 1);
    let rej = list
        .add(s.clone(), m, BlockBitmaps::for_spec(&s).unwrap())
        .unwrap_err();
    assert_eq!(rej.error, AddError::ListFull { capacity: 4 });
    assert_eq!(rej.memory.base(), base);
}

fn resizable_list() -> List {
    let list = List::new();
    let s = spec("r", 4).resizable(ByteLen(8 * PAGE));
    list.add(
        s.clone(),
        mem(8 * PAGE, 4 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    let s = spec("fixed", 4);
    list.add(
        s.clone(),
        mem(4 * PAGE, 4 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    list
}

fn resize_err(list: &List, name: &str, len: u64) -> ResizeError<BufferError> {
    let version = list.version();
    let before = list.read().by_name(name).map(|b| b.used_length());
    let err = list.resize(name, ByteLen(len)).unwrap_err();
    assert_eq!(list.version(), version);
    assert_eq!(
        list.read().by_name(name).map(|b| b.used_length()),
        before,
        "a refused resize changes nothing"
    );
    err
}

#[test]
fn resize_refuses_an_unknown_block() {
    assert_eq!(
        resize_err(&resizable_list(), "nope", PAGE),
        ResizeError::UnknownBlock
    );
}

#[test]
fn resize_refuses_a_fixed_block() {
    assert_eq!(
        resize_err(&resizable_list(), "fixed", 2 * PAGE),
        ResizeError::NotResizable
    );
}

#[test]
fn resize_refuses_zero() {
    assert_eq!(
        resize_err(&resizable_list(), "r", 0),
        ResizeError::ZeroLength
    );
}

#[test]
fn resize_refuses_unaligned_lengths() {
    assert_eq!(
        resize_err(&resizable_list(), "r", PAGE + 1),
        ResizeError::Unaligned {
            length: PAGE + 1,
            page_size: PAGE
        }
    );
}

#[test]
fn resize_refuses_growth_past_max_length() {
    assert_eq!(
        resize_err(&resizable_list(), "r", 9 * PAGE),
        ResizeError::ExceedsMax {
            length: 9 * PAGE,
            max: 8 * PAGE
        }
    );
}

#[test]
fn resize_reports_a_host_failure_and_keeps_the_block() {
    let list = List::new();
    let s = spec("r", 4).resizable(ByteLen(8 * PAGE));
    let m = mem(8 * PAGE, 4 * PAGE, PageSize::SIZE_4K);
    m.fail_next_resize.set(true);
    list.add(s.clone(), m, BlockBitmaps::for_spec(&s).unwrap())
        .unwrap();
    let err = resize_err(&list, "r", 6 * PAGE);
    assert_eq!(
        err,
        ResizeError::Host(BufferError::TooLong {
            asked: 6 * PAGE,
            available: 0
        })
    );
    assert_eq!(
        list.read()
            .by_name("r")
            .unwrap()
            .dirty(ramblock_core::dirty_log::DirtyClient::Display)
            .count_ones(),
        0
    );
    list.resize("r", ByteLen(6 * PAGE)).unwrap();
}

#[test]
fn remove_refuses_an_unknown_block() {
    let list = resizable_list();
    assert_eq!(list.remove("nope").unwrap_err(), UnknownBlock);
    assert_eq!(list.read().len(), 2);
}

#[test]
fn marking_dirty_outside_blocks_is_an_error() {
    let list = resizable_list();
    let fixed_at = list.read().by_name("fixed").unwrap().offset();
    assert_eq!(
        list.mark_dirty(RamAddr(u64::MAX - 10), ByteLen(1), DirtyClients::all()),
        Err(DirtyError::UnknownAddress(RamAddr(u64::MAX - 10)))
    );
    // "r" reserves 8 pages but uses 4: its tail is inside the block but not usable.
    assert_eq!(
        list.mark_dirty(RamAddr(3 * PAGE), ByteLen(PAGE + 1), DirtyClients::all()),
        Err(DirtyError::Access(AccessError::OutOfRange {
            offset: ByteLen(3 * PAGE),
            len: ByteLen(PAGE + 1),
            used_length: ByteLen(4 * PAGE)
        }))
    );
    assert_eq!(
        list.mark_dirty(
            RamAddr(fixed_at.0 + PAGE),
            ByteLen(u64::MAX),
            DirtyClients::all()
        ),
        Err(DirtyError::Access(AccessError::OutOfRange {
            offset: ByteLen(PAGE),
            len: ByteLen(u64::MAX),
            used_length: ByteLen(4 * PAGE)
        }))
    );
    for b in list.read().iter() {
        assert_eq!(
            b.dirty(ramblock_core::dirty_log::DirtyClient::Migration)
                .count_ones(),
            0,
            "nothing was marked"
        );
    }
}

#[test]
fn block_access_outside_used_length_or_to_read_only_is_an_error() {
    let list = List::new();
    let s = spec("rom", 2).flags(BlockFlags::READ_ONLY);
    list.add(
        s.clone(),
        mem(2 * PAGE, 2 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    let s = spec("ram", 2);
    list.add(
        s.clone(),
        mem(2 * PAGE, 2 * PAGE, PageSize::SIZE_4K),
        BlockBitmaps::for_spec(&s).unwrap(),
    )
    .unwrap();
    let view = list.read();
    assert_eq!(
        view.by_name("rom").unwrap().write(ByteLen(0), b"x"),
        Err(AccessError::ReadOnly)
    );
    let ram = view.by_name("ram").unwrap();
    let oob = AccessError::OutOfRange {
        offset: ByteLen(2 * PAGE - 1),
        len: ByteLen(2),
        used_length: ByteLen(2 * PAGE),
    };
    assert_eq!(ram.write(ByteLen(2 * PAGE - 1), b"xy"), Err(oob));
    assert_eq!(ram.read(ByteLen(2 * PAGE - 1), &mut [0; 2]), Err(oob));
    let mut byte = [1u8];
    ram.read(ByteLen(2 * PAGE - 1), &mut byte).unwrap();
    assert_eq!(byte, [0], "no write landed");
}

struct Silent;
impl RamListener<Flaky, Owned> for Silent {}

#[test]
fn listeners_past_capacity_are_refused() {
    let list = List::new();
    static SILENT: Silent = Silent;
    for _ in 0..MAX_LISTENERS {
        list.add_listener(&SILENT).unwrap();
    }
    assert_eq!(list.add_listener(&SILENT), Err(ListenersFull));
}

#[test]
fn every_error_explains_itself() {
    let msgs = [
        AddError::MemoryTooSmall {
            reserved: 1,
            max: 2,
        }
        .to_string(),
        ResizeError::<BufferError>::ExceedsMax { length: 3, max: 2 }.to_string(),
        DirtyError::UnknownAddress(RamAddr(5)).to_string(),
        AccessError::ReadOnly.to_string(),
    ];
    assert!(
        msgs[0].contains("reserves 0x1 bytes, the block needs 0x2"),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].contains("exceeds the block's max length 0x2"),
        "{}",
        msgs[1]
    );
    assert!(msgs[2].contains("0x5"), "{}", msgs[2]);
    assert!(msgs[3].contains("read-only"));
}
