//! Snapshots of real memory round trip byte for byte: a full snapshot, two
//! diffs after it, the chain merged into one file, each restored eagerly,
//! lazily through userfaultfd and (4 KiB blocks) by mapping the file, and
//! compared with a copy of guest memory taken when each was saved; the
//! restored memory also matches the saved content checksum. For anonymous,
//! memfd and 2 MiB hugetlb backings.
mod common;

use common::{skip, HugepagePool, HugetlbfsMount, ScratchDir};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_core::section::SectionName;
use ramblock_linux::snapshot::{
    copy_to_hugetlbfs, map_block, merge, restore_eager, restore_lazy, verify_block, LazyOptions,
    RestoreTarget, SaveOptions, SaveSection, SnapshotChain, SnapshotError, SnapshotFile,
    Snapshotter, SnapshotterError,
};
use ramblock_linux::uffd::Userfaultfd;
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::path::Path;

type List<'l> = RamList<'l, LinuxMemory, Owned, 8>;

const PAGE: u64 = 4096;

fn copy(region: &HostRegion<'_>) -> Vec<u8> {
    let mut v = vec![0u8; region.len()];
    region.read(ByteLen(0), &mut v).unwrap();
    v
}

/// Writes pseudo-random bytes into `pages` pages from `first` (every
/// third page left zero) through the block, which marks them dirty.
fn scribble(list: &List<'_>, name: &str, first: u64, pages: u64, seed: u64) {
    let view = list.read();
    let block = view.by_name(name).unwrap();
    let mut x = seed | 1;
    let mut page = vec![0u8; PAGE as usize];
    for p in first..first + pages {
        if p % 3 == 2 {
            page.fill(0);
        } else {
            for b in page.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
        block.write(ByteLen(p * PAGE), &page).unwrap();
    }
}

fn save(
    snap: &mut Snapshotter,
    list: &List<'_>,
    path: &Path,
    diff: bool,
) -> Result<u64, SnapshotterError> {
    let view = list.read();
    let blocks: Vec<_> = ["ram", "rom"]
        .iter()
        .map(|n| view.by_name(n).unwrap())
        .collect();
    let state = [7u8; 100];
    let sections = [SaveSection {
        name: SectionName::new("cpu").unwrap(),
        instance_id: 0,
        version: 1,
        bytes: &state,
    }];
    let s = snap.save(
        path,
        &blocks,
        &mut SoftwareOnly,
        &sections,
        diff,
        SaveOptions::default(),
        &|_| {},
    )?;
    Ok(s.bytes_written)
}

fn memories(list: &List<'_>) -> Vec<Vec<u8>> {
    let view = list.read();
    ["ram", "rom"]
        .iter()
        .map(|n| copy(&view.by_name(n).unwrap().region()))
        .collect()
}

/// Restores `chain` three (or two) ways into memory from `make` and
/// compares with `expected`.
fn restore_all_ways(
    chain: &SnapshotChain,
    make: &dyn Fn(u64) -> LinuxMemory,
    ram_len: u64,
    expected: &[Vec<u8>],
    mappable: bool,
    what: &str,
) {
    let fresh = || {
        [
            make(ram_len),
            MemoryBuilder::anonymous(ByteLen(256 << 10))
                .build()
                .unwrap(),
        ]
    };
    let names = ["ram", "rom"];
    // Eager.
    let mems = fresh();
    let targets: Vec<_> = names
        .iter()
        .zip(&mems)
        .map(|(n, m)| RestoreTarget {
            name: n,
            region: m.region(),
            page_size: m.page_size(),
        })
        .collect();
    restore_eager(chain, &targets, 2, &|_| {}).unwrap();
    for ((n, m), want) in names.iter().zip(&mems).zip(expected) {
        assert!(
            copy(&m.region()) == *want,
            "{what}: eager restore of {n} differs"
        );
        verify_block(chain, n, &m.region()).unwrap();
    }
    // Lazy: a thread standing in for the vCPU reads pages from the end
    // while the prefetcher fills from the start.
    match Userfaultfd::new() {
        Err(e) if e.is_unavailable() => skip(&format!("lazy restore: {e}")),
        _ => {
            // With prefetching, and without (every page read faults).
            for prefetch in [true, false] {
                let mems = fresh();
                let targets: Vec<_> = names.iter().zip(&mems).map(|(n, m)| (*n, m)).collect();
                let ((), stats) = restore_lazy(chain, &targets, LazyOptions { prefetch }, |_| {
                    let r = mems[0].region();
                    let mut b = [0u8; 8];
                    for p in (0..r.len() as u64 / PAGE).rev().step_by(7) {
                        r.read(ByteLen(p * PAGE), &mut b).unwrap();
                    }
                })
                .unwrap();
                for ((n, m), want) in names.iter().zip(&mems).zip(expected) {
                    assert!(
                        copy(&m.region()) == *want,
                        "{what}: lazy restore of {n} (prefetch {prefetch}) differs"
                    );
                }
                if !prefetch {
                    // Every placement unit the reader touched faulted once.
                    let unit = mems[0].page_size().bytes().max(PAGE);
                    let touched: std::collections::BTreeSet<u64> = (0..ram_len / PAGE)
                        .rev()
                        .step_by(7)
                        .map(|p| p * PAGE / unit)
                        .collect();
                    assert_eq!(stats.faults, touched.len() as u64, "{what}");
                }
                println!("{what}: lazy restore (prefetch {prefetch}) {stats:?}");
            }
        }
    }
    // Mapped.
    if mappable {
        for (n, want) in names.iter().zip(expected) {
            let m = map_block(chain, n).unwrap();
            assert!(
                copy(&m.region()) == *want,
                "{what}: mapped restore of {n} differs"
            );
            // Copy on write: the file is not changed.
            m.region().write(ByteLen(0), b"scribble").unwrap();
        }
        let again = map_block(chain, "ram").unwrap();
        assert!(
            copy(&again.region()) == expected[0],
            "{what}: a write reached the file"
        );
    }
}

fn round_trip(
    tag: &str,
    make: &dyn Fn(u64) -> LinuxMemory,
    ram_len: u64,
    mappable: bool,
    hugetlbfs: Option<&Path>,
) {
    let dir = ScratchDir::new(tag);
    let list = List::new();
    for (name, mem) in [
        ("ram", make(ram_len)),
        (
            "rom",
            MemoryBuilder::anonymous(ByteLen(256 << 10))
                .build()
                .unwrap(),
        ),
    ] {
        let spec = BlockSpec::new(BlockName::new(name).unwrap(), mem.used_len());
        let bitmaps = BlockBitmaps::allocate(mem.used_len(), 18).unwrap();
        list.add(spec, mem, bitmaps).unwrap();
    }
    let pages = ram_len / PAGE;
    scribble(&list, "ram", 0, pages - 5, 1);
    scribble(&list, "rom", 0, 64, 2);
    let mut snap = Snapshotter::new();
    assert!(matches!(
        save(&mut snap, &list, &dir.path().join("early.diff"), true),
        Err(SnapshotterError::NoParent)
    ));
    let full = dir.path().join("full.snap");
    let full_bytes = save(&mut snap, &list, &full, false).unwrap();
    let m0 = memories(&list);
    // Diff 1: a few pages (some made zero, which must come back as zero).
    scribble(&list, "ram", 3, 10, 3);
    // A save that fails (no such directory) gives its pages back to the
    // dirty log: the next diff still has them.
    assert!(matches!(
        save(&mut snap, &list, &dir.path().join("no/such/dir.snap"), true),
        Err(SnapshotterError::Save(SnapshotError::Io { op: "open", .. }))
    ));
    let d1 = dir.path().join("d1.snap");
    let d1_bytes = save(&mut snap, &list, &d1, true).unwrap();
    assert!(d1_bytes <= 10 * PAGE && d1_bytes < full_bytes);
    let m1 = memories(&list);
    // Diff 2: other pages, and one block untouched.
    scribble(&list, "ram", pages / 2, 20, 4);
    scribble(&list, "rom", 60, 4, 5);
    let d2 = dir.path().join("d2.snap");
    save(&mut snap, &list, &d2, true).unwrap();
    let m2 = memories(&list);
    // A diff with nothing written since holds no page.
    let d3 = dir.path().join("d3.snap");
    assert_eq!(save(&mut snap, &list, &d3, true).unwrap(), 0);
    assert!(SnapshotFile::open(&d3)
        .unwrap()
        .blocks()
        .iter()
        .all(|b| b.held_pages == 0));

    for f in [&full, &d1, &d2, &d3] {
        SnapshotFile::open(f).unwrap().verify_data().unwrap();
    }
    let chain = SnapshotChain::open(&d3).unwrap();
    assert_eq!(chain.files().len(), 4);
    assert_eq!(
        SnapshotFile::open(&d2).unwrap().section("cpu", 0),
        Some(&[7u8; 100][..])
    );
    restore_all_ways(
        &SnapshotChain::open(&full).unwrap(),
        make,
        ram_len,
        &m0,
        mappable,
        &format!("{tag} full"),
    );
    restore_all_ways(
        &SnapshotChain::open(&d1).unwrap(),
        make,
        ram_len,
        &m1,
        mappable,
        &format!("{tag} diff 1"),
    );
    restore_all_ways(
        &chain,
        make,
        ram_len,
        &m2,
        mappable,
        &format!("{tag} diff 3"),
    );

    let merged = dir.path().join("merged.snap");
    merge(&chain, &merged).unwrap();
    let mf = SnapshotFile::open(&merged).unwrap();
    assert!(!mf.is_diff());
    mf.verify_data().unwrap();
    assert_eq!(mf.section("cpu", 0), Some(&[7u8; 100][..]));
    restore_all_ways(
        &SnapshotChain::open(&merged).unwrap(),
        make,
        ram_len,
        &m2,
        mappable,
        &format!("{tag} merged"),
    );
    if let Some(mount) = hugetlbfs {
        // Off hugetlbfs a hugepage block cannot be mapped; a copy on it can.
        assert!(matches!(
            map_block(&SnapshotChain::open(&merged).unwrap(), "ram"),
            Err(SnapshotError::CannotMap { .. })
        ));
        let on_huge = copy_to_hugetlbfs(&mf, &mount.join("merged.snap")).unwrap();
        let chain = SnapshotChain::from_files(vec![on_huge]).unwrap();
        let m = map_block(&chain, "ram").unwrap();
        assert_eq!(m.page_size(), PageSize::SIZE_2M);
        assert!(
            copy(&m.region()) == m2[0],
            "{tag}: mapped from hugetlbfs differs"
        );
        m.region().write(ByteLen(0), b"scribble").unwrap();
        drop(m);
        let again = map_block(&chain, "ram").unwrap();
        assert!(
            copy(&again.region()) == m2[0],
            "{tag}: a write reached the hugetlbfs file"
        );
    }
}

#[test]
fn anonymous_memory_round_trips() {
    round_trip(
        "anon",
        &|len| MemoryBuilder::anonymous(ByteLen(len)).build().unwrap(),
        4 << 20,
        true,
        None,
    );
}

#[test]
fn memfd_memory_round_trips() {
    round_trip(
        "memfd",
        &|len| MemoryBuilder::memfd(ByteLen(len)).build().unwrap(),
        4 << 20,
        true,
        None,
    );
}

#[test]
fn hugetlb_memory_round_trips() {
    if ramblock_linux::hugetlb::check_offered(PageSize::SIZE_2M).is_err() {
        return skip("no 2 MiB hugepages offered");
    }
    // Source, eager, lazy and mapped restores (2 pages each, at most 4
    // live), the copy on hugetlbfs (3) and a copied-on-write page.
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 16) {
        Ok(p) => p,
        Err(e) => return skip(&format!("cannot reserve 2 MiB hugepages: {e}")),
    };
    let mount = match HugetlbfsMount::mount(PageSize::SIZE_2M) {
        Ok(m) => m,
        Err(e) => return skip(&format!("cannot mount hugetlbfs: {e}")),
    };
    round_trip(
        "huge",
        &|len| {
            MemoryBuilder::hugetlb(ByteLen(len), PageSize::SIZE_2M)
                .build()
                .unwrap()
        },
        4 << 20,
        false,
        Some(&mount.dir),
    );
}

#[test]
fn o_direct_writes_the_same_file() {
    // O_DIRECT needs a filesystem that has it: the ordinary temporary
    // directory's usually does (tmpfs may not, which is a typed error).
    let dir = ScratchDir::new("direct");
    let mem = MemoryBuilder::anonymous(ByteLen(1 << 20)).build().unwrap();
    mem.region().fill(ByteLen(8192), 3 * 4096, 0x5A).unwrap();
    let digests: Vec<std::sync::atomic::AtomicU64> = (0..256)
        .map(|_| std::sync::atomic::AtomicU64::new(0))
        .collect();
    let block = || ramblock_linux::snapshot::SaveBlock {
        name: BlockName::new("ram").unwrap(),
        region: mem.region(),
        page_size: PageSize::SIZE_4K,
        pages: None,
        digests: &digests,
    };
    let plain = dir.path().join("plain.snap");
    let direct = dir.path().join("direct.snap");
    let kind = ramblock_core::snapshot::Kind::Full;
    ramblock_linux::snapshot::save(
        &plain,
        &[block()],
        &[],
        kind,
        SaveOptions::default(),
        &|_| {},
    )
    .unwrap();
    let options = SaveOptions {
        direct: true,
        ..SaveOptions::default()
    };
    match ramblock_linux::snapshot::save(&direct, &[block()], &[], kind, options, &|_| {}) {
        Err(SnapshotError::Io {
            op: "open(O_DIRECT)",
            ..
        }) => return skip("the temporary directory's filesystem has no O_DIRECT"),
        other => {
            other.unwrap();
        }
    }
    let (a, b) = (
        std::fs::read(&plain).unwrap(),
        std::fs::read(&direct).unwrap(),
    );
    // Equal but for the random file id and the checksum that covers it.
    assert_eq!(a.len(), b.len());
    let differ: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert!(
        differ
            .iter()
            .all(|&i| (16..32).contains(&i) || (80..88).contains(&i)),
        "{differ:?}"
    );
    SnapshotFile::open(&direct).unwrap().verify_data().unwrap();
}
