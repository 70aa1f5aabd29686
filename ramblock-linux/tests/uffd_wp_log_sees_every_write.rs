//! The uffd-wp dirty log (`UffdWpLog`) against the kernel and a model, on
//! anonymous (with transparent hugepages), memfd and hugetlb memory:
//! - a harvest is exactly the pages host threads wrote (whole hugepages on
//!   hugetlb memory), merged with the VMM's own writes marked through the
//!   block API; reads dirty nothing; a second harvest with no writes is
//!   empty; a tiny output vector (many scans per harvest) loses nothing;
//! - while writer threads run, repeated harvests that copy what they
//!   report to a shadow leave the shadow equal to memory after a final
//!   harvest, and their union is exactly the pages written (a stress test).
//!
//! The same properties as the KVM modes' (ramblock-kvm's dirty_log_modes);
//! a KVM guest's writes are proven in ramblock-kvm's uffd_wp_sees_guest_writes.
mod common;

use common::{skip, HugepagePool};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_linux::dirty_log::{UffdWpLog, WpLogError};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

type List<'l> = RamList<'l, LinuxMemory, Owned, 4>;

const MIB: u64 = 1 << 20;
const TARGET: u64 = 4096;

/// The log, or `None` after the one skip line when the host lacks it.
fn log_or_skip() -> Option<UffdWpLog> {
    match UffdWpLog::new() {
        Ok(log) => Some(log),
        Err(e @ (WpLogError::KernelLacks { .. } | WpLogError::Scan(_))) => {
            skip(&e.to_string());
            None
        }
        Err(WpLogError::Uffd(e)) if e.is_unavailable() => {
            skip(&e.to_string());
            None
        }
        Err(e) => panic!("uffd-wp log: {e}"),
    }
}

/// A list holding `mem` as block "ram", tracked by `log`.
fn list_with<'l>(mem: LinuxMemory, log: &mut UffdWpLog) -> List<'l> {
    let len = mem.used_len();
    let spec = BlockSpec::new(BlockName::new("ram").unwrap(), len)
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    let list = List::new();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    {
        let view = list.read();
        let block = view.by_name("ram").unwrap();
        log.track(block.offset(), block.memory()).unwrap();
    }
    list
}

/// Harvests "ram" and sends (clears) everything dirty, as migration does;
/// returns the pages.
fn harvest(list: &List<'_>, log: &mut UffdWpLog) -> BTreeSet<usize> {
    let view = list.read();
    let block = view.by_name("ram").unwrap();
    let newly = block.sync_dirty_log(log).unwrap();
    let info = block.info();
    let mut state = block.migration();
    let mut sent = BTreeSet::new();
    let mut from = 0;
    while let Some(run) = state.next_dirty_run(from, 1 << 20, &info, log).unwrap() {
        from = run.end;
        sent.extend(run);
    }
    assert_eq!(newly, sent.len() as u64, "newly-dirty count");
    sent
}

/// Every target page of the host pages holding `pages`.
fn expand(pages: &[usize], page_size: PageSize) -> BTreeSet<usize> {
    let per = (page_size.bytes() / TARGET) as usize;
    pages
        .iter()
        .flat_map(|&p| (p / per * per)..(p / per * per + per))
        .collect()
}

/// The whole single-threaded proof on `mem`; see the module docs.
fn prove(mem: LinuxMemory, log: &mut UffdWpLog) {
    let page_size = mem.page_size();
    let pages = (mem.used_len().0 / TARGET) as usize;
    let list = list_with(mem, log);
    // Whatever the block starts with is sent first, as migration does.
    harvest(&list, log);
    assert_eq!(
        harvest(&list, log),
        BTreeSet::new(),
        "clean after a full send"
    );

    // Host threads write behind the block API's back (an emulator's vCPU
    // threads, a device model writing guest RAM directly).
    let written = [0, 1, 63, 64, 65, 200, pages / 2 + 7, pages - 1];
    {
        let view = list.read();
        let region = view.by_name("ram").unwrap().memory().region();
        std::thread::scope(|s| {
            for chunk in written.chunks(3) {
                let region = &region;
                s.spawn(move || {
                    for &p in chunk {
                        region
                            .write(ByteLen(p as u64 * TARGET + 8), &[0x5a])
                            .unwrap();
                    }
                });
            }
        });
    }
    assert_eq!(harvest(&list, log), expand(&written, page_size));
    assert_eq!(harvest(&list, log), BTreeSet::new(), "no writes: empty");

    // Reading every page dirties nothing.
    {
        let view = list.read();
        let region = view.by_name("ram").unwrap().memory().region();
        let mut buf = vec![0u8; TARGET as usize];
        for p in 0..pages {
            region.read(ByteLen(p as u64 * TARGET), &mut buf).unwrap();
        }
    }
    assert_eq!(harvest(&list, log), BTreeSet::new(), "reads dirty nothing");

    // The VMM's own writes (marked through the block) merge with the log's.
    {
        let view = list.read();
        let block = view.by_name("ram").unwrap();
        block.write(ByteLen(100 * TARGET), b"dma").unwrap();
        block
            .memory()
            .region()
            .write(ByteLen(3 * TARGET), b"raw")
            .unwrap();
    }
    let mut want = expand(&[100], page_size);
    want.extend(expand(&[3], page_size));
    assert_eq!(harvest(&list, log), want);

    // One region per scan: scattered pages take many scans, none is lost.
    log.set_scan_capacity(1);
    let scattered: Vec<usize> = (0..pages).step_by(pages / 37 + 1).collect();
    {
        let view = list.read();
        let region = view.by_name("ram").unwrap().memory().region();
        for &p in &scattered {
            region.write(ByteLen(p as u64 * TARGET), &[1]).unwrap();
        }
    }
    assert_eq!(harvest(&list, log), expand(&scattered, page_size));
    assert_eq!(harvest(&list, log), BTreeSet::new());
    log.set_scan_capacity(ramblock_linux::dirty_log::DEFAULT_SCAN_CAPACITY);

    // Untracked, the block is refused.
    let offset = list.read().by_name("ram").unwrap().offset();
    log.untrack(offset).unwrap();
    let view = list.read();
    let err = view
        .by_name("ram")
        .unwrap()
        .sync_dirty_log(log)
        .unwrap_err();
    assert!(matches!(err, WpLogError::NotTracked { .. }), "{err}");
}

/// Writers run while harvests copy what they report to a shadow; see the
/// module docs.
fn stress(mem: LinuxMemory, log: &mut UffdWpLog) {
    let page_size = mem.page_size();
    let len = mem.used_len().0 as usize;
    let pages = len / TARGET as usize;
    let list = list_with(mem, log);
    harvest(&list, log);
    // A small output vector: each harvest resumes from the kernel's walk
    // end several times while the writers run.
    log.set_scan_capacity(5);
    let mut shadow = vec![0u8; len];
    {
        let view = list.read();
        view.by_name("ram")
            .unwrap()
            .memory()
            .region()
            .read(ByteLen(0), &mut shadow)
            .unwrap();
    }
    // Each writer owns the pages p with p % WRITERS == id and records each
    // page it writes in the model; a page is recorded before its write, so
    // the model holds at least what memory changed.
    const WRITERS: usize = 2;
    let model: Vec<AtomicU64> = (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let mut union = BTreeSet::new();
    let (mut harvests, mut busy, mut reported) = (0, 0, 0);
    {
        let view = list.read();
        let region = view.by_name("ram").unwrap().memory().region();
        std::thread::scope(|s| {
            for id in 0..WRITERS {
                let (region, model, stop, done) = (&region, &model, &stop, &done);
                s.spawn(move || {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ id as u64;
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) || n < 1000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        // Stay in a quarter of the block, so pages are
                        // written again after being harvested.
                        let p =
                            ((x as usize % (pages / 4)) / WRITERS * WRITERS + id).min(pages - 1);
                        model[p / 64].fetch_or(1 << (p % 64), Ordering::Relaxed);
                        let at = ByteLen(p as u64 * TARGET + (x >> 52) % TARGET);
                        region
                            .write(at, &(n as u8).wrapping_add(1).to_le_bytes())
                            .unwrap();
                        n += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
            // Harvest until the writers have done plenty (they take a
            // moment to start), so harvests and writes interleave.
            while harvests < 50 || done.load(Ordering::Relaxed) < 200_000 {
                let got = harvest(&list, log);
                busy += usize::from(!got.is_empty());
                reported += got.len();
                copy_pages(&region, &got, &mut shadow);
                union.extend(got);
                harvests += 1;
                // Leave the writers the CPU (2 cores here) between
                // harvests, as a migration's sends would.
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            stop.store(true, Ordering::Relaxed);
        });
        // Writers stopped: the final harvest brings the shadow level.
        let got = harvest(&list, log);
        copy_pages(&region, &got, &mut shadow);
        union.extend(got);
        let mut now = vec![0u8; len];
        region.read(ByteLen(0), &mut now).unwrap();
        let differ = now
            .chunks(TARGET as usize)
            .zip(shadow.chunks(TARGET as usize))
            .position(|(a, b)| a != b);
        assert_eq!(differ, None, "a written page was never harvested");
    }
    let written: Vec<usize> = (0..pages)
        .filter(|&p| model[p / 64].load(Ordering::Relaxed) >> (p % 64) & 1 == 1)
        .collect();
    assert_eq!(
        union,
        expand(&written, page_size),
        "harvests == pages written"
    );
    assert_eq!(harvest(&list, log), BTreeSet::new());
    println!(
        "{harvests} harvests during the writes ({busy} found pages), {reported} pages reported, {} distinct",
        union.len()
    );
    // The writers overlapped the harvests: pages written again after a
    // harvest re-protected them were reported again.
    assert!(
        busy > 1 && reported > union.len(),
        "{busy} busy harvests, {reported} reported"
    );
}

fn copy_pages(
    region: &ramblock_core::region::HostRegion<'_>,
    pages: &BTreeSet<usize>,
    shadow: &mut [u8],
) {
    let t = TARGET as usize;
    for &p in pages {
        region
            .read(ByteLen((p * t) as u64), &mut shadow[p * t..(p + 1) * t])
            .unwrap();
    }
}

fn anonymous() -> LinuxMemory {
    MemoryBuilder::anonymous(ByteLen(8 * MIB))
        .transparent_hugepages(true)
        .build()
        .unwrap()
}

fn memfd() -> LinuxMemory {
    MemoryBuilder::memfd(ByteLen(8 * MIB))
        .name("ram")
        .build()
        .unwrap()
}

fn hugetlb() -> LinuxMemory {
    MemoryBuilder::hugetlb(ByteLen(8 * MIB), PageSize::SIZE_2M)
        .build()
        .unwrap()
}

#[test]
fn anonymous_harvest_is_exactly_what_was_written() {
    let Some(mut log) = log_or_skip() else { return };
    let mem = anonymous();
    // Populate it first, so transparent hugepages (if the host gives
    // them) are mapped whole before protection and split by the writes.
    mem.region()
        .write(ByteLen(0), &vec![7u8; (8 * MIB) as usize])
        .unwrap();
    prove(mem, &mut log);
}

#[test]
fn memfd_harvest_is_exactly_what_was_written() {
    let Some(mut log) = log_or_skip() else { return };
    prove(memfd(), &mut log);
}

#[test]
fn hugetlb_harvest_is_exactly_what_was_written() {
    let Some(mut log) = log_or_skip() else { return };
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    prove(hugetlb(), &mut log);
}

#[test]
fn anonymous_harvests_lose_nothing_while_writers_run() {
    let Some(mut log) = log_or_skip() else { return };
    stress(anonymous(), &mut log);
}

#[test]
fn memfd_harvests_lose_nothing_while_writers_run() {
    let Some(mut log) = log_or_skip() else { return };
    stress(memfd(), &mut log);
}

#[test]
fn hugetlb_harvests_lose_nothing_while_writers_run() {
    let Some(mut log) = log_or_skip() else { return };
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    stress(hugetlb(), &mut log);
}

#[test]
fn tracking_twice_or_read_only_memory_is_refused() {
    let Some(mut log) = log_or_skip() else { return };
    let mem = memfd();
    log.track(ramblock_core::addr::RamAddr(0), &mem).unwrap();
    let again = log
        .track(ramblock_core::addr::RamAddr(1 << 30), &mem)
        .unwrap_err();
    assert!(
        matches!(again, WpLogError::AlreadyTracked { .. }),
        "{again}"
    );
    let path = std::env::temp_dir().join(format!("ramblock-wp-ro-{}", std::process::id()));
    std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
    let ro = MemoryBuilder::file(&path, ByteLen(64 << 10))
        .read_only(true)
        .build();
    let _ = std::fs::remove_file(&path);
    let err = log
        .track(ramblock_core::addr::RamAddr(2 << 30), &ro.unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
}
