//! Every malformed snapshot file is refused with its own error: a valid
//! file is saved, one field is changed (and the metadata checksum made
//! right again, so the check behind it is what refuses the file), and
//! opening it must give exactly the expected `FormatError`.
mod common;

use common::ScratchDir;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use ramblock_core::name::{BlockName, NameError};
use ramblock_core::section::{SectionError, SectionName};
use ramblock_core::snapshot::{
    seal, FormatError, Kind, Parent, BLOCK_ENTRY_LEN, HEADER_LEN, MAGIC,
};
use ramblock_linux::snapshot::{
    save, SaveBlock, SaveOptions, SaveSection, SnapshotError, SnapshotFile,
};
use ramblock_linux::MemoryBuilder;
use std::path::Path;
use std::sync::atomic::AtomicU64;

const NB: usize = 2;
const BLOCK: [usize; NB] = [HEADER_LEN, HEADER_LEN + BLOCK_ENTRY_LEN];
const SECTION0: usize = HEADER_LEN + NB * BLOCK_ENTRY_LEN;
const SECTION1: usize = SECTION0 + 288;
/// Block field offsets inside an entry.
const USED: usize = 256;
const PAGE_SIZE: usize = 264;
const BITMAP: usize = 272;
const DATA: usize = 280;
const HELD: usize = 288;

/// A full (or diff) snapshot of two blocks ("ram", 67 pages, so its
/// bitmap has a tail; "rom", 3 pages) and two sections.
fn valid(dir: &Path, kind: Kind) -> Vec<u8> {
    let ram = MemoryBuilder::anonymous(ByteLen(67 * 4096))
        .build()
        .unwrap();
    let rom = MemoryBuilder::anonymous(ByteLen(3 * 4096)).build().unwrap();
    ram.region().fill(ByteLen(4096), 4096, 0xAA).unwrap();
    rom.region().fill(ByteLen(0), 100, 0x55).unwrap();
    let digests: Vec<Vec<AtomicU64>> = [67, 3]
        .iter()
        .map(|&n| (0..n).map(|_| AtomicU64::new(0)).collect())
        .collect();
    let pages = [u64::MAX, 0b101];
    let blocks = [
        SaveBlock {
            name: BlockName::new("ram").unwrap(),
            region: ram.region(),
            page_size: PageSize::SIZE_4K,
            pages: None,
            digests: &digests[0],
        },
        SaveBlock {
            name: BlockName::new("rom").unwrap(),
            region: rom.region(),
            page_size: PageSize::SIZE_4K,
            pages: matches!(kind, Kind::Diff(_)).then_some(&pages[1..]),
            digests: &digests[1],
        },
    ];
    let sections = [
        SaveSection {
            name: SectionName::new("cpu").unwrap(),
            instance_id: 0,
            version: 1,
            bytes: b"registers",
        },
        SaveSection {
            name: SectionName::new("cpu").unwrap(),
            instance_id: 1,
            version: 1,
            bytes: b"more registers",
        },
    ];
    let path = dir.join("valid.snap");
    save(
        &path,
        &blocks,
        &sections,
        kind,
        SaveOptions::default(),
        &|_| {},
    )
    .unwrap();
    std::fs::read(&path).unwrap()
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// Opens `bytes` as a file and returns the format error it gets, after
/// resealing its metadata if `reseal`.
fn refused(dir: &Path, mut bytes: Vec<u8>, reseal: bool) -> FormatError {
    if reseal && bytes.len() >= HEADER_LEN {
        let meta_len = (get64(&bytes, 64) as usize).min(bytes.len());
        if meta_len >= HEADER_LEN {
            seal(&mut bytes[..meta_len]);
        }
    }
    let path = dir.join("bad.snap");
    std::fs::write(&path, &bytes).unwrap();
    match SnapshotFile::open(&path) {
        Err(SnapshotError::Format { error, .. }) => error,
        other => panic!("expected a format error, got {other:?}"),
    }
}

#[test]
fn each_malformed_field_is_its_own_error() {
    let dir = ScratchDir::new("malformed");
    let d = dir.path();
    let good = valid(d, Kind::Full);
    assert!(SnapshotFile::open(d.join("valid.snap")).is_ok());
    let case = |patch: &dyn Fn(&mut Vec<u8>), reseal: bool| {
        let mut b = good.clone();
        patch(&mut b);
        refused(d, b, reseal)
    };
    let ram = BLOCK[0];
    let rom = BLOCK[1];

    assert_eq!(
        case(&|b| b.truncate(50), false),
        FormatError::Truncated {
            what: "header",
            len: 50,
            need: HEADER_LEN as u64
        }
    );
    assert_eq!(
        case(&|b| b[0] = b'X', true),
        FormatError::Magic {
            found: {
                let mut m = MAGIC;
                m[0] = b'X';
                m
            }
        }
    );
    assert_eq!(case(&|b| b[8] = 2, true), FormatError::Version { found: 2 });
    assert_eq!(case(&|b| b[12] = 7, true), FormatError::Kind { found: 7 });
    assert_eq!(case(&|b| b[40] = 1, true), FormatError::FullWithParent);
    assert_eq!(case(&|b| b[12] = 1, true), FormatError::DiffWithoutParent);
    assert_eq!(
        case(&|b| b[56..60].copy_from_slice(&257u32.to_le_bytes()), true),
        FormatError::TooManyBlocks { count: 257 }
    );
    assert_eq!(
        case(&|b| b[60..64].copy_from_slice(&1025u32.to_le_bytes()), true),
        FormatError::TooManySections { count: 1025 }
    );
    assert_eq!(
        case(&|b| put64(b, 64, 4097), true),
        FormatError::MetaLen {
            found: 4097,
            expected: 0
        }
    );
    assert_eq!(
        case(&|b| put64(b, 64, 1 << 30), true),
        FormatError::MetaLen {
            found: 1 << 30,
            expected: 0
        }
    );
    let file_len = good.len() as u64;
    assert_eq!(
        case(&|b| put64(b, 64, (file_len + 4096) & !4095), false),
        FormatError::FileTooShort {
            len: file_len,
            need: (file_len + 4096) & !4095
        }
    );
    assert_eq!(
        case(&|b| put64(b, 64, 8192), true),
        FormatError::MetaLen {
            found: 8192,
            expected: 4096
        }
    );
    assert_eq!(
        case(&|b| b[90] = 1, true),
        FormatError::Reserved { offset: 90 }
    );
    assert!(matches!(
        case(&|b| b[SECTION0 + 300 + 0x800] ^= 1, false),
        FormatError::MetaChecksum { .. }
    ));

    assert_eq!(
        case(&|b| b[ram] = 0, true),
        FormatError::BlockNamePadding { index: 0 }
    );
    assert_eq!(
        case(
            &|b| {
                b[ram] = 0;
                b[ram + 1..ram + 4].fill(0)
            },
            true
        ),
        FormatError::BlockName {
            index: 0,
            error: NameError::Empty
        }
    );
    assert_eq!(
        case(&|b| b[ram + 1] = 0xFF, true),
        FormatError::BlockNameUtf8 { index: 0 }
    );
    assert_eq!(
        case(&|b| b[ram + 2] = 0, true),
        FormatError::BlockName {
            index: 0,
            error: NameError::ContainsNul { at: 1 }
        }
    );
    assert_eq!(
        case(&|b| b[rom + 1..rom + 4].copy_from_slice(b"ram"), true),
        FormatError::DuplicateBlock { index: 1 }
    );
    assert_eq!(
        case(&|b| put64(b, ram + PAGE_SIZE, 3000), true),
        FormatError::PageSize {
            index: 0,
            found: 3000
        }
    );
    assert_eq!(
        case(&|b| put64(b, ram + PAGE_SIZE, 2 << 20), true),
        FormatError::UsedLength {
            index: 0,
            found: 67 * 4096
        }
    );
    assert_eq!(
        case(&|b| put64(b, ram + USED, 0), true),
        FormatError::UsedLength { index: 0, found: 0 }
    );
    assert_eq!(
        case(&|b| put64(b, ram + USED, (1 << 40) + 4096), true),
        FormatError::UsedLength {
            index: 0,
            found: (1 << 40) + 4096
        }
    );
    let bm = get64(&good, ram + BITMAP);
    assert_eq!(
        case(&|b| put64(b, ram + BITMAP, bm + 8), true),
        FormatError::BitmapOffset {
            index: 0,
            found: bm + 8,
            expected: bm
        }
    );
    // Bit 67 of ram's bitmap is past its 67 pages.
    assert_eq!(
        case(&|b| b[bm as usize + 8] |= 1 << 3, true),
        FormatError::BitmapTail { index: 0 }
    );
    assert_eq!(
        case(&|b| b[bm as usize] &= !2, true),
        FormatError::FullMissingPage { index: 0, page: 1 }
    );
    assert_eq!(
        case(&|b| put64(b, ram + HELD, 66), true),
        FormatError::HeldPages {
            index: 0,
            found: 66,
            counted: 67
        }
    );
    let data = get64(&good, rom + DATA);
    assert_eq!(
        case(&|b| put64(b, rom + DATA, data + 4096), true),
        FormatError::DataOffset {
            index: 1,
            found: data + 4096,
            expected: data
        }
    );
    let end = get64(&good, 72);
    assert_eq!(
        case(&|b| put64(b, 72, end + 4096), true),
        FormatError::DataEnd {
            found: end + 4096,
            expected: end
        }
    );
    assert_eq!(
        case(&|b| b.truncate(end as usize - 1), false),
        FormatError::FileTooShort {
            len: end - 1,
            need: end
        }
    );

    assert_eq!(
        case(
            &|b| {
                b[SECTION1] = 0;
                b[SECTION1 + 1..SECTION1 + 4].fill(0)
            },
            true
        ),
        FormatError::Section {
            index: 1,
            error: SectionError::NameEmpty
        }
    );
    assert_eq!(
        case(&|b| b[SECTION1 + 256] = 0, true),
        FormatError::DuplicateSection { index: 1 }
    );
    let s0 = get64(&good, SECTION0 + 272);
    assert_eq!(
        case(&|b| put64(b, SECTION0 + 272, s0 + 8), true),
        FormatError::SectionOffset {
            index: 0,
            found: s0 + 8,
            expected: s0
        }
    );
    assert_eq!(
        case(&|b| b[s0 as usize] ^= 1, true),
        FormatError::SectionChecksum { index: 0 }
    );
    assert_eq!(
        case(&|b| put64(b, SECTION0 + 264, (64 << 20) + 1), true),
        FormatError::Section {
            index: 0,
            error: SectionError::TooLong {
                len: (64 << 20) + 1
            }
        }
    );
}

#[test]
fn a_diff_names_its_parent_and_holds_only_its_pages() {
    let dir = ScratchDir::new("malformed-diff");
    let parent = Parent {
        id: [9; 16],
        checksum: 77,
    };
    let bytes = valid(dir.path(), Kind::Diff(parent));
    let f = SnapshotFile::open(dir.path().join("valid.snap")).unwrap();
    assert_eq!(f.header().kind, Kind::Diff(parent));
    assert_eq!(f.blocks()[1].held_pages, 2);
    assert!(f.holds(1, 0) && !f.holds(1, 1) && f.holds(1, 2));
    f.verify_data().unwrap();
    // A diff may lack pages, but its held count must match its bitmap.
    assert_eq!(
        refused(
            dir.path(),
            {
                let mut b = bytes.clone();
                put64(&mut b, BLOCK[1] + HELD, 3);
                b
            },
            true
        ),
        FormatError::HeldPages {
            index: 1,
            found: 3,
            counted: 2
        }
    );
    // Corrupt page data is found by verify_data, not by opening.
    let mut b = bytes;
    let data = get64(&b, BLOCK[0] + DATA) as usize;
    b[data + 4096] ^= 1;
    let path = dir.path().join("corrupt.snap");
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(
        SnapshotFile::open(&path).unwrap().verify_data(),
        Err(SnapshotError::DataChecksum { .. })
    ));
}
