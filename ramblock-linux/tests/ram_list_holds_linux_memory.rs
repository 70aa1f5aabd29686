//! `LinuxMemory` as the host memory of blocks in the core's `RamList`:
//! added with owned bitmaps, written through the block, resized in place
//! through the list, found by host address.

use ramblock_core::addr::{ByteLen, RamAddr};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::dirty_log::DirtyClient;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_linux::{LinuxMemory, MemoryBuilder};

const MIB: u64 = 1 << 20;

#[test]
fn a_resizable_memfd_block_grows_in_place_in_the_list() {
    let mem = MemoryBuilder::memfd(ByteLen(4 * MIB))
        .max_length(ByteLen(16 * MIB))
        .name("pc.ram")
        .build()
        .unwrap();
    let base = mem.base();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(4 * MIB))
        .resizable(ByteLen(16 * MIB))
        .flags(mem.flags() | ramblock_core::flags::BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::<Owned>::for_spec(&spec).unwrap();
    let list: RamList<'_, LinuxMemory, Owned, 4> = RamList::new();
    let offset = list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    assert_eq!(offset, RamAddr(0));

    {
        let view = list.read();
        let (block, at) = view.block_at(RamAddr(0x2000)).unwrap();
        block.write(at, b"vcpu").unwrap();
        assert!(block.dirty(DirtyClient::Migration).is_set(2).unwrap());
        let (found, off) = view.by_host_addr(base).unwrap();
        assert_eq!((found.name(), off), ("pc.ram", ByteLen(0)));
    }

    list.resize("pc.ram", ByteLen(16 * MIB)).unwrap();
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    assert_eq!(block.memory().base(), base, "the block did not move");
    block.write(ByteLen(15 * MIB), b"top").unwrap();
    let mut got = [0u8; 4];
    block.read(ByteLen(0x2000), &mut got).unwrap();
    assert_eq!(&got, b"vcpu");
    // The kernel shares the pages through the memfd: read them back there.
    let fd = block.memory().fd().unwrap();
    let mut via_fd = [0u8; 3];
    rustix::io::pread(fd, &mut via_fd, 15 * MIB).unwrap();
    assert_eq!(&via_fd, b"top");
}
