//! Memory mapped read-only refuses writes with a typed error instead of
//! faulting: through its region, and through a block, which must be
//! flagged read-only to be added at all.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::{AddError, RamList};
use ramblock_core::name::BlockName;
use ramblock_core::region::RegionError;
use ramblock_core::AccessError;
use ramblock_linux::{LinuxMemory, MemoryBuilder};

const LEN: u64 = 2 << 20;

fn read_only_file(dir: &std::path::Path) -> LinuxMemory {
    let path = dir.join("rom.img");
    std::fs::write(&path, vec![0x5a; LEN as usize]).unwrap();
    MemoryBuilder::file(&path, ByteLen(LEN))
        .read_only(true)
        .build()
        .unwrap()
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ramblock-ro-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn a_read_only_mapping_refuses_writes_through_its_region() {
    let dir = temp_dir("region");
    let mem = read_only_file(&dir);
    assert!(mem.read_only());
    let region = mem.region();
    assert!(!region.is_writable());
    assert_eq!(
        region.write(ByteLen(0), b"boom"),
        Err(RegionError::ReadOnly {
            offset: ByteLen(0),
            len: ByteLen(4)
        })
    );
    assert!(matches!(
        region.fill(ByteLen(4096), 4096, 0),
        Err(RegionError::ReadOnly { .. })
    ));
    let mut b = [0u8; 4];
    region.read(ByteLen(0), &mut b).unwrap();
    assert_eq!(b, [0x5a; 4], "the file's bytes, unchanged");
    drop(mem);
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_read_only_mapping_joins_a_list_only_as_a_read_only_block() {
    let dir = temp_dir("block");
    let list: RamList<'_, LinuxMemory, Owned, 4> = RamList::new();
    let writable = BlockSpec::new(BlockName::new("rom").unwrap(), ByteLen(LEN));
    let bitmaps = BlockBitmaps::allocate(ByteLen(LEN), 18).unwrap();
    let refused = list
        .add(writable, read_only_file(&dir), bitmaps)
        .map_err(|r| r.error);
    assert_eq!(refused.err(), Some(AddError::MemoryReadOnly));

    let mem = read_only_file(&dir);
    let spec = BlockSpec::new(BlockName::new("rom").unwrap(), ByteLen(LEN)).flags(mem.flags());
    assert!(spec.flags.contains(BlockFlags::READ_ONLY));
    let bitmaps = BlockBitmaps::allocate(ByteLen(LEN), 18).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    let view = list.read();
    let rom = view.by_name("rom").unwrap();
    assert_eq!(rom.write(ByteLen(0), b"x"), Err(AccessError::ReadOnly));
    let mut b = [0u8; 1];
    rom.read(ByteLen(0), &mut b).unwrap();
    assert_eq!(b, [0x5a]);
    drop(view);
    drop(list);
    std::fs::remove_dir_all(dir).unwrap();
}
