//! `LiveCopy` (copy-before-write over synchronous userfaultfd
//! write-protect) saves memory as it was at the instant protection began,
//! while a writer keeps writing, on anonymous, memfd and hugetlb memory.
//!
//! The writer increments a counter in pages, walking down from the top of
//! the block (the copy's background walks up, so the writer meets unsaved
//! pages and faults). It parks at the instant: the test reads the
//! reference image then, starts the copy, and lets the writer go on. The
//! saved image must equal the reference byte for byte, the writer must
//! have changed memory during the copy, and at least one page must have
//! been saved because the writer faulted on it.
mod common;

use common::{skip, wait_for, HugepagePool};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use ramblock_linux::live_copy::{LiveCopy, LiveCopyError};
use ramblock_linux::uffd::UffdError;
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MIB: u64 = 1 << 20;

fn prove(mem: LinuxMemory) {
    let len = mem.used_len().0 as usize;
    let page = mem.page_size().bytes() as usize;
    let region = mem.region();
    // Some pages populated, the rest untouched (first writes must stop too).
    for p in (0..len / 4096).step_by(3) {
        region
            .write(ByteLen(p as u64 * 4096), &[p as u8 | 1])
            .unwrap();
    }
    let (park, parked, stop) = (
        AtomicBool::new(false),
        AtomicBool::new(false),
        AtomicBool::new(false),
    );
    // Writes started (counted before each write, which may stop in a fault).
    let attempts = AtomicU64::new(0);
    let mut reference = vec![0u8; len];
    let mut image = vec![0u8; len];
    let result = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let mut n = 0u64;
            let pages = len / 4096;
            while !stop.load(Ordering::Acquire) {
                if park.load(Ordering::Acquire) {
                    parked.store(true, Ordering::Release);
                    std::hint::spin_loop();
                    continue;
                }
                parked.store(false, Ordering::Release);
                // Down from the top, several bytes per page.
                let p = pages - 1 - (n as usize % pages);
                attempts.fetch_add(1, Ordering::AcqRel);
                region
                    .write(
                        ByteLen((p * 4096 + (n as usize / pages) % 4000) as u64),
                        &n.to_le_bytes(),
                    )
                    .unwrap();
                n += 1;
            }
            n
        });
        assert!(
            wait_for(|| attempts.load(Ordering::Acquire) > 1000),
            "the writer runs"
        );
        // The instant: the writer parks, the reference is read, the copy starts.
        park.store(true, Ordering::Release);
        assert!(wait_for(|| parked.load(Ordering::Acquire)));
        region.read(ByteLen(0), &mut reference).unwrap();
        let copy = LiveCopy::start(&mem);
        let before = attempts.load(Ordering::Acquire);
        park.store(false, Ordering::Release);
        let copy = match copy {
            Ok(c) => c,
            Err(e) => {
                stop.store(true, Ordering::Release);
                writer.join().unwrap();
                return Err(e);
            }
        };
        let mut first = true;
        let stats = copy.run(|offset, data| {
            if first {
                // Let the writer start (and fault) before the copy goes on.
                first = false;
                assert!(wait_for(|| attempts.load(Ordering::Acquire) > before));
            }
            image[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            Ok(())
        });
        stop.store(true, Ordering::Release);
        let writes = writer.join().unwrap();
        Ok((stats, writes, attempts.load(Ordering::Acquire) - before))
    });
    let (stats, writes, during) = match result {
        Err(LiveCopyError::KernelLacks { .. }) => return skip("no UFFD_FEATURE_WP_UNPOPULATED"),
        Err(LiveCopyError::Uffd(e)) if e.is_unavailable() => return skip(&e.to_string()),
        Err(e) => panic!("live copy: {e}"),
        Ok((stats, writes, during)) => (stats.unwrap(), writes, during),
    };
    let differ = image
        .chunks(4096)
        .zip(reference.chunks(4096))
        .position(|(a, b)| a != b);
    assert_eq!(
        differ, None,
        "the image is memory at the instant the copy began"
    );
    let mut now = vec![0u8; len];
    region.read(ByteLen(0), &mut now).unwrap();
    assert_ne!(now, reference, "the writer changed memory during the copy");
    assert_eq!(stats.pages as usize, len / page, "every page saved once");
    assert!(stats.faulted_pages >= 1, "{stats:?}");
    let mut service = stats.fault_service_ns.clone();
    service.sort_unstable();
    println!(
        "{} pages ({} page size), {} faults, {} saved ahead of the writer, service p50 {} ns, {} writes ({during} during the copy), {:?}",
        stats.pages,
        page,
        stats.faults,
        stats.faulted_pages,
        service.get(service.len() / 2).copied().unwrap_or(0),
        writes,
        stats.elapsed
    );
}

#[test]
fn anonymous_live_copy_is_the_instant_image() {
    prove(MemoryBuilder::anonymous(ByteLen(8 * MIB)).build().unwrap());
}

#[test]
fn anonymous_thp_live_copy_is_the_instant_image() {
    // Transparent hugepages populated before the instant: protected whole,
    // split by the first fault or un-protection of one 4 KiB page.
    let mem = MemoryBuilder::anonymous(ByteLen(8 * MIB))
        .transparent_hugepages(true)
        .build()
        .unwrap();
    mem.region()
        .write(ByteLen(0), &vec![0x33; (8 * MIB) as usize])
        .unwrap();
    prove(mem);
}

#[test]
fn memfd_live_copy_is_the_instant_image() {
    prove(
        MemoryBuilder::memfd(ByteLen(8 * MIB))
            .name("ram")
            .build()
            .unwrap(),
    );
}

#[test]
fn hugetlb_live_copy_is_the_instant_image() {
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 4) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    prove(
        MemoryBuilder::hugetlb(ByteLen(8 * MIB), PageSize::SIZE_2M)
            .build()
            .unwrap(),
    );
}

#[test]
fn a_failing_save_stops_the_copy_and_releases_the_writers() {
    let mem = MemoryBuilder::memfd(ByteLen(MIB)).build().unwrap();
    let copy = match LiveCopy::start(&mem) {
        Ok(c) => c,
        Err(
            LiveCopyError::Uffd(UffdError::NotPermitted { .. }) | LiveCopyError::KernelLacks { .. },
        ) => return skip("no synchronous uffd write-protect"),
        Err(e) => panic!("{e}"),
    };
    let err = copy
        .run(|_, _| Err(std::io::Error::other("disk full")))
        .unwrap_err();
    assert!(err.to_string().contains("disk full"), "{err}");
    // The copy is gone, and with it the protection: writes go through.
    mem.region().write(ByteLen(4096), b"free").unwrap();
}
