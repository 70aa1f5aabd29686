//! Blocks as vm-memory guest memory (feature `vm-memory`): vm-memory's own
//! bitmap and region checks run over `BlockRegion` and `BlockBitmap`; writes
//! through every vm-memory API reach the migration bitmap exactly (against a
//! model of the pages written); `file_offset` names the memfd bytes the
//! region maps; every bad region or layout is a typed error.
//!
//! vm-memory 0.18 exports no conformance checks (its `bitmap::tests`
//! helpers are `#[cfg(test)] pub(crate)`), so `check_bitmap`,
//! `check_bytes` and `check_region` below are those helpers ported as they
//! are (vm-memory/src/bitmap/mod.rs: `test_bitmap`, `test_bytes`,
//! `test_guest_memory_region`), with the same assertions.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::dirty_log::{DirtyClient, DirtyClients, SoftwareOnly};
use ramblock_core::flags::BlockFlags;
use ramblock_core::{BlockBitmaps, BlockName, BlockSpec, RamList};
use ramblock_linux::guest_memory::{guest_ram, BlockRegion, GuestMemoryError};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::fmt::Debug;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
type List = RamList<'static, LinuxMemory, Owned, 8>;

fn add(list: &List, name: &str, mem: LinuxMemory, flags: BlockFlags) {
    let len = ramblock_core::host::HostMemory::used_len(&mem);
    let spec = BlockSpec::new(BlockName::new(name).unwrap(), len)
        .flags(mem.flags() | BlockFlags::MIGRATABLE | flags);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
}

fn memfd_list(len: u64) -> List {
    let list = List::new();
    let mem = MemoryBuilder::memfd(ByteLen(len))
        .shared(true)
        .build()
        .unwrap();
    add(&list, "pc.ram", mem, BlockFlags::empty());
    list
}

// --- vm-memory's checks, ported (see the module docs) ---

fn range_is_clean<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
    (start..start + len).all(|offset| !b.dirty_at(offset))
}

fn range_is_dirty<B: Bitmap>(b: &B, start: usize, len: usize) -> bool {
    (start..start + len).all(|offset| b.dirty_at(offset))
}

fn check_range<B: Bitmap>(b: &B, start: usize, len: usize, clean: bool) -> bool {
    if clean {
        range_is_clean(b, start, len)
    } else {
        range_is_dirty(b, start, len)
    }
}

/// vm-memory's `test_bitmap`: `b` covers at least 0x800 bytes.
fn check_bitmap<B: Bitmap>(b: &B) {
    let len = 0x800;
    let dirty_offset = 0x400;
    let dirty_len = 0x100;
    let s = b.slice_at(dirty_offset);
    assert!(range_is_clean(b, 0, len));
    assert!(range_is_clean(&s, 0, dirty_len));
    b.mark_dirty(dirty_offset, dirty_len);
    assert!(range_is_dirty(b, dirty_offset, dirty_len));
    assert!(range_is_dirty(&s, 0, dirty_len));
}

/// vm-memory's `test_bytes`.
fn check_bytes<F, G, M, A>(bytes: &M, check_range_fn: F, address_fn: G, step: usize)
where
    F: Fn(&M, usize, usize, bool) -> bool,
    G: Fn(usize) -> A,
    M: Bytes<A>,
    <M as Bytes<A>>::E: Debug,
{
    const BUF_SIZE: usize = 1024;
    let buf = vec![1u8; 1024];
    let mut dirty_offset = 0x1000;
    let val = 1u64;

    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    assert_eq!(
        bytes
            .write(buf.as_slice(), address_fn(dirty_offset))
            .unwrap(),
        BUF_SIZE
    );
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes
        .write_slice(buf.as_slice(), address_fn(dirty_offset))
        .unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes.write_obj(val, address_fn(dirty_offset)).unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));

    dirty_offset += step;
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, true));
    bytes
        .store(val, address_fn(dirty_offset), Ordering::Relaxed)
        .unwrap();
    assert!(check_range_fn(bytes, dirty_offset, BUF_SIZE, false));
}

/// vm-memory's `test_guest_memory_region`.
fn check_region<R: GuestMemoryRegion>(region: &R) {
    let dirty_addr = MemoryRegionAddress(0x0);
    let val = 123u64;
    let dirty_len = size_of_val(&val);
    let slice = region.get_slice(dirty_addr, dirty_len).unwrap();
    assert!(range_is_clean(&region.bitmap(), 0, region.len() as usize));
    assert!(range_is_clean(slice.bitmap(), 0, dirty_len));
    region.write_obj(val, dirty_addr).unwrap();
    assert!(range_is_dirty(
        &region.bitmap(),
        dirty_addr.0 as usize,
        dirty_len
    ));
    assert!(range_is_dirty(slice.bitmap(), 0, dirty_len));
    check_bytes(
        region,
        |r: &R, start: usize, len: usize, clean: bool| check_range(&r.bitmap(), start, len, clean),
        |offset| MemoryRegionAddress(offset as u64),
        0x1000,
    );
}

// --- the checks over ours ---

#[test]
fn vm_memorys_bitmap_and_region_checks_pass_over_block_regions() {
    // Each client alone and all together; a region over a middle range of
    // the block, so offsets relative to the region are what is checked.
    for clients in [
        DirtyClients::all(),
        DirtyClients::MIGRATION,
        DirtyClients::DISPLAY,
    ] {
        let list = memfd_list(4 * MIB);
        let view = list.read();
        let ram = view.by_name("pc.ram").unwrap();
        let at = ByteLen(MIB);
        let region =
            BlockRegion::with_clients(ram, GuestAddress(0x8000_0000), at, ByteLen(MIB), clients)
                .unwrap();
        check_region(&region);
        // vm-memory's bitmap check on a fresh page range of the region.
        check_bitmap(&region.bitmap().slice_at(0x10_0000 - 0x1000 * 2));
        // Every marked client saw the writes, and only those.
        for c in DirtyClient::ALL {
            let page = (MIB as usize) / PAGE;
            assert_eq!(ram.dirty(c).is_set(page).unwrap(), clients.has(c), "{c:?}");
            assert!(
                !ram.dirty(c).is_set(page - 1).unwrap(),
                "nothing before the region"
            );
        }
    }
    // vm-memory's checks over the collection too (its
    // `test_guest_memory_and_region` runs `test_bytes` on the memory).
    let list = memfd_list(4 * MIB);
    let view = list.read();
    let ram = view.by_name("pc.ram").unwrap();
    let region = BlockRegion::new(ram, GuestAddress(0x1_0000_0000)).unwrap();
    let guest = guest_ram(vec![region]).unwrap();
    check_bytes(
        &guest,
        |m, start, len, clean| {
            let gpa = GuestAddress(0x1_0000_0000 + start as u64);
            let (r, addr) = m.to_region_addr(gpa).unwrap();
            check_range(&r.bitmap(), addr.0 as usize, len, clean)
        },
        |offset| GuestAddress(0x1_0000_0000 + offset as u64),
        0x1000,
    );
}

/// A tiny deterministic generator, so the test needs no crate.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// The migration bitmap of `block` after a harvest, one bool per page.
fn harvest(block: &ramblock_core::RamBlock<LinuxMemory, Owned>) -> Vec<bool> {
    block.sync_dirty_log(&mut SoftwareOnly).unwrap();
    let m = block.migration();
    (0..block.used_pages())
        .map(|p| m.bitmap.is_set(p).unwrap())
        .collect()
}

#[test]
fn every_vm_memory_write_reaches_the_migration_bitmap_exactly() {
    // Two blocks, one split in two regions around a hole; writes of every
    // kind at random places and lengths (across page and region edges),
    // against a model of the pages each write touched.
    let list = List::new();
    let a = MemoryBuilder::memfd(ByteLen(2 * MIB))
        .shared(true)
        .build()
        .unwrap();
    let b = MemoryBuilder::anonymous(ByteLen(MIB)).build().unwrap();
    add(&list, "a", a, BlockFlags::empty());
    add(&list, "b", b, BlockFlags::empty());
    let view = list.read();
    let (ba, bb) = (view.by_name("a").unwrap(), view.by_name("b").unwrap());
    assert!(
        harvest(ba).iter().chain(&harvest(bb)).all(|&d| !d),
        "a new block starts clean"
    );
    let half = ByteLen(MIB);
    // gpa -> (block index, block offset): a[0..1M] at 0, a[1M..2M] at 16M, b at 32M.
    let layout = [(0u64, 0usize, 0u64), (16 * MIB, 0, MIB), (32 * MIB, 1, 0)];
    let guest = guest_ram(vec![
        BlockRegion::range(ba, GuestAddress(16 * MIB), half, half).unwrap(),
        BlockRegion::new(bb, GuestAddress(32 * MIB)).unwrap(),
        BlockRegion::range(ba, GuestAddress(0), ByteLen(0), half).unwrap(),
    ])
    .unwrap();
    let mut model = [vec![false; 512], vec![false; 256]];
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for i in 0..300 {
        let (gpa0, block, boff) = layout[rng.below(3) as usize];
        let len = match rng.below(3) {
            0 => 1 + rng.below(16),
            1 => 1 + rng.below(2 * PAGE as u64),
            _ => 1 + rng.below(20 * PAGE as u64),
        };
        let off = rng.below(MIB - len + 1) & !7;
        let gpa = GuestAddress(gpa0 + off);
        let data = vec![(i % 250) as u8 + 1; len as usize];
        let written = match rng.below(5) {
            0 => {
                guest.write_slice(&data, gpa).unwrap();
                len
            }
            1 => guest.write(&data, gpa).unwrap() as u64,
            2 if len >= 8 => {
                guest.write_obj(0x0101_0101_0101_0101u64, gpa).unwrap();
                8
            }
            3 if len >= 4 => {
                guest.store(7u32, gpa, Ordering::Release).unwrap();
                4
            }
            _ => {
                guest.get_slice(gpa, len as usize).unwrap().copy_from(&data);
                len
            }
        };
        let (first, last) = (
            (boff + off) as usize / PAGE,
            (boff + off + written - 1) as usize / PAGE,
        );
        model[block][first..=last].fill(true);
    }
    assert_eq!(harvest(ba), model[0], "block a");
    assert_eq!(harvest(bb), model[1], "block b");
    // Only the migration client is merged; the other clients were marked
    // just the same (as RamBlock::write marks them).
    for c in [DirtyClient::Display, DirtyClient::Code] {
        let got: Vec<bool> = (0..512).map(|p| ba.dirty(c).is_set(p).unwrap()).collect();
        assert_eq!(got, model[0], "{c:?}");
    }
}

#[test]
fn file_offset_names_the_memfd_bytes_the_region_maps() {
    let list = memfd_list(4 * MIB);
    let anon = MemoryBuilder::anonymous(ByteLen(MIB)).build().unwrap();
    add(&list, "anon", anon, BlockFlags::empty());
    let private = MemoryBuilder::memfd(ByteLen(MIB))
        .shared(false)
        .build()
        .unwrap();
    add(&list, "private", private, BlockFlags::empty());
    let view = list.read();
    let ram = view.by_name("pc.ram").unwrap();
    let region =
        BlockRegion::range(ram, GuestAddress(0x10_0000), ByteLen(MIB), ByteLen(2 * MIB)).unwrap();
    let fo = region
        .file_offset()
        .expect("a shared memfd has a file offset");
    assert_eq!(fo.start(), ram.memory().fd_offset() + MIB);
    region
        .write_slice(b"vhost", MemoryRegionAddress(0x3000))
        .unwrap();
    // What a vhost-user backend mapping the file at `start` would see.
    let mut seen = [0u8; 5];
    fo.file()
        .read_exact_at(&mut seen, fo.start() + 0x3000)
        .unwrap();
    assert_eq!(&seen, b"vhost");
    assert!(region.as_volatile_slice().is_ok());
    // Anonymous and private mappings have none (a backend would not see
    // this process's writes through the file).
    for name in ["anon", "private"] {
        let b = view.by_name(name).unwrap();
        assert!(
            BlockRegion::new(b, GuestAddress(0))
                .unwrap()
                .file_offset()
                .is_none(),
            "{name}"
        );
    }
}

#[test]
fn bad_regions_and_layouts_are_typed_errors() {
    let list = memfd_list(2 * MIB);
    let ro = MemoryBuilder::anonymous(ByteLen(MIB)).build().unwrap();
    add(&list, "rom", ro, BlockFlags::READ_ONLY);
    let view = list.read();
    let ram = view.by_name("pc.ram").unwrap();
    let range = |gpa: u64, off: u64, len: u64| {
        BlockRegion::range(ram, GuestAddress(gpa), ByteLen(off), ByteLen(len))
    };
    assert!(matches!(
        BlockRegion::new(view.by_name("rom").unwrap(), GuestAddress(0)),
        Err(GuestMemoryError::ReadOnly { .. })
    ));
    for (off, len) in [(0x800, 0x1000), (0, 0x1800)] {
        assert!(matches!(
            range(0, off, len),
            Err(GuestMemoryError::Unaligned { .. })
        ));
    }
    for (off, len) in [(0, 0), (MIB, 2 * MIB), (!0xfffu64, 0x2000)] {
        assert!(
            matches!(range(0, off, len), Err(GuestMemoryError::OutOfRange { .. })),
            "{off:#x}+{len:#x}"
        );
    }
    assert!(matches!(
        range(!0xfffu64, 0, 0x2000),
        Err(GuestMemoryError::GpaOverflow { .. })
    ));
    // The top page of the address space is fine.
    range(!0xfffu64, 0, 0x1000).unwrap();
    assert!(matches!(
        guest_ram(vec![
            range(0, 0, MIB).unwrap(),
            range(MIB - 0x1000, MIB, MIB).unwrap()
        ]),
        Err(GuestMemoryError::Collection(_))
    ));
    assert!(matches!(
        guest_ram::<LinuxMemory, Owned>(vec![]),
        Err(GuestMemoryError::Collection(_))
    ));
    // vm-memory refuses accesses past a region. A write that runs off the
    // end writes what fits first: those bytes changed, so their page is
    // marked, and nothing past the region is.
    let guest = guest_ram(vec![range(0, 0, MIB).unwrap()]).unwrap();
    assert!(guest.write_slice(&[1; 16], GuestAddress(MIB - 8)).is_err());
    assert!(guest.get_slice(GuestAddress(MIB), 1).is_err());
    let region = range(0, 0, MIB).unwrap();
    assert!(region.get_slice(MemoryRegionAddress(MIB - 8), 9).is_err());
    assert!(region.get_slice(MemoryRegionAddress(u64::MAX), 2).is_err());
    assert!(region.get_host_address(MemoryRegionAddress(MIB)).is_err());
    assert!(guest.num_regions() == 1);
    assert!(ram.dirty(DirtyClient::Migration).is_set(255).unwrap());
    assert!(!ram.dirty(DirtyClient::Migration).is_set(256).unwrap());
}
