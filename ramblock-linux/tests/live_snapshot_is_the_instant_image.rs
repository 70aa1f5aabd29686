//! `LiveSave` writes a snapshot file of memory that host threads keep
//! writing, and the file holds the memory as it was at the instant of
//! `LiveSave::start`: for anonymous, memfd and 2 MiB hugetlb backings, two
//! blocks at once (one copy thread each).
//!
//! The model: each block has a writer thread incrementing counters in its
//! pages, walking down from the top (the copy walks up, so writers meet
//! unsaved pages and fault). At the instant the writers park, each block
//! is read as its reference, the save starts (protection), and the writers
//! go on during the save. The file, restored eagerly into fresh memory,
//! must equal the references byte for byte; its data and content
//! checksums must hold; it must hold the state section given; its zero
//! pages (holes) must be exactly the references' zero pages; and the
//! writers must have changed memory during the save.
mod common;

use common::{skip, wait_for, HugepagePool, ScratchDir};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use ramblock_core::name::BlockName;
use ramblock_core::section::SectionName;
use ramblock_linux::live_copy::LiveCopyError;
use ramblock_linux::snapshot::{
    restore_eager, save_live, verify_block, LiveBlock, LiveSave, RestoreTarget, SaveOptions,
    SaveSection, SnapshotChain, SnapshotError,
};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// A writer parked at the instant on request.
struct Writer {
    park: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
    /// Writes started (counted before each, which may stop in a fault).
    attempts: AtomicU64,
}

impl Writer {
    fn new() -> Writer {
        Writer {
            park: AtomicBool::new(false),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            attempts: AtomicU64::new(0),
        }
    }

    fn run(&self, mem: &LinuxMemory) {
        let region = mem.region();
        let pages = region.len() / PAGE;
        let mut n = 0usize;
        while !self.stop.load(Ordering::Acquire) {
            if self.park.load(Ordering::Acquire) {
                self.parked.store(true, Ordering::Release);
                std::hint::spin_loop();
                continue;
            }
            self.parked.store(false, Ordering::Release);
            let p = pages - 1 - (n % pages);
            self.attempts.fetch_add(1, Ordering::AcqRel);
            region
                .write(
                    ByteLen((p * PAGE + (n / pages) % 4000) as u64),
                    &(n as u64 + 1).to_le_bytes(),
                )
                .unwrap();
            n += 1;
        }
    }
}

/// Stops the writers when dropped.
struct StopOnDrop<'w>(&'w [Writer; 2]);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        for w in self.0 {
            w.stop.store(true, Ordering::Release);
        }
    }
}

fn read_all(mem: &LinuxMemory) -> Vec<u8> {
    let mut v = vec![0u8; mem.used_len().0 as usize];
    mem.region().read(ByteLen(0), &mut v).unwrap();
    v
}

fn prove(mems: [LinuxMemory; 2]) {
    let dir = ScratchDir::new("live-save");
    let path = dir.path().join("live.snap");
    // Some pages populated, the rest untouched (first writes must stop too,
    // and untouched pages are zero: holes in the file).
    for mem in &mems {
        let region = mem.region();
        for p in (0..region.len() / PAGE).step_by(3) {
            region
                .write(ByteLen((p * PAGE) as u64), &[p as u8 | 1])
                .unwrap();
        }
    }
    let names = ["ram", "vram"].map(|n| BlockName::new(n).unwrap());
    let writers = [Writer::new(), Writer::new()];
    let state = b"the vcpu at the instant".to_vec();
    let sections = [SaveSection {
        name: SectionName::new("cpu").unwrap(),
        instance_id: 0,
        version: 1,
        bytes: &state,
    }];
    let outcome = std::thread::scope(|s| {
        // Writers stop however this scope ends (a failed assert too).
        let _stop = StopOnDrop(&writers);
        for (w, mem) in writers.iter().zip(&mems) {
            s.spawn(move || w.run(mem));
        }
        for w in &writers {
            assert!(wait_for(|| w.attempts.load(Ordering::Acquire) > 1000));
        }
        // The instant: writers parked, references read, protection on.
        for w in &writers {
            w.park.store(true, Ordering::Release);
            assert!(wait_for(|| w.parked.load(Ordering::Acquire)));
        }
        let references = mems.each_ref().map(read_all);
        let blocks = [0, 1].map(|i| LiveBlock {
            name: names[i].clone(),
            memory: &mems[i],
        });
        let started = LiveSave::start(&path, &blocks, &sections, SaveOptions::default());
        let before = writers
            .each_ref()
            .map(|w| w.attempts.load(Ordering::Acquire));
        for w in &writers {
            w.park.store(false, Ordering::Release);
        }
        let result = started.and_then(|live| {
            // Both writers start a write (which faults: the top page is
            // not saved yet) before the copy goes on.
            for (w, b) in writers.iter().zip(before) {
                assert!(wait_for(|| w.attempts.load(Ordering::Acquire) > b));
            }
            live.run(&|_| {})
        });
        let during = [0, 1].map(|i| writers[i].attempts.load(Ordering::Acquire) - before[i]);
        for w in &writers {
            w.stop.store(true, Ordering::Release);
        }
        result.map(|summary| (summary, references, during))
    });
    let (summary, references, during) = match outcome {
        Err(SnapshotError::LiveCopy {
            error: LiveCopyError::KernelLacks { .. },
            ..
        }) => return skip("no UFFD_FEATURE_WP_UNPOPULATED"),
        Err(SnapshotError::LiveCopy {
            error: LiveCopyError::Uffd(e),
            ..
        }) if e.is_unavailable() => return skip(&e.to_string()),
        Err(e) => panic!("live save: {e}"),
        Ok(o) => o,
    };

    let chain = SnapshotChain::open(&path).unwrap();
    let file = chain.newest();
    assert!(!file.is_diff());
    file.verify_data().unwrap();
    assert_eq!(file.section("cpu", 0), Some(&state[..]));
    let fresh = mems.each_ref().map(|m| {
        let b = if m.page_size() == PageSize::SIZE_4K {
            MemoryBuilder::anonymous(m.used_len())
        } else {
            MemoryBuilder::hugetlb(m.used_len(), m.page_size())
        };
        b.build().unwrap()
    });
    let targets = [0, 1].map(|i| RestoreTarget {
        name: names[i].as_str(),
        region: fresh[i].region(),
        page_size: fresh[i].page_size(),
    });
    restore_eager(&chain, &targets, 2, &|_| {}).unwrap();
    for i in 0..2 {
        let image = read_all(&fresh[i]);
        let differ = image
            .chunks(PAGE)
            .zip(references[i].chunks(PAGE))
            .position(|(a, b)| a != b);
        assert_eq!(
            differ, None,
            "block {i}: the file holds memory at the instant"
        );
        verify_block(&chain, names[i].as_str(), &fresh[i].region()).unwrap();
        assert_ne!(
            read_all(&mems[i]),
            references[i],
            "block {i}: the writer changed memory during the save"
        );
        assert!(during[i] > 1, "block {i}: the writer ran during the save");
        assert_eq!(
            summary.copies[i].pages * mems[i].page_size().bytes(),
            mems[i].used_len().0,
            "block {i}: every page saved once"
        );
        // Not `faults >= 1`: a writer's fault event is withdrawn when the
        // copier un-protects its page before anyone reads the event (the
        // kernel wakes the writer then), so the count may be 0 on a busy
        // machine; that the writer ran during the save is checked above.
    }
    let zero_pages: usize = references
        .iter()
        .map(|r| r.chunks(PAGE).filter(|p| p.iter().all(|&b| b == 0)).count())
        .sum();
    assert_eq!(summary.save.zero_pages as usize, zero_pages, "holes");
    assert_eq!(
        summary.save.pages_held,
        mems.iter().map(|m| m.used_len().0).sum::<u64>() / PAGE as u64
    );
    println!(
        "{} pages, faults {:?}, saved ahead of the writers {:?}, writes during {:?}, {:?}",
        summary.save.pages_held,
        summary.copies.iter().map(|c| c.faults).collect::<Vec<_>>(),
        summary
            .copies
            .iter()
            .map(|c| c.faulted_pages)
            .collect::<Vec<_>>(),
        during,
        summary.save.elapsed
    );
}

#[test]
fn anonymous_live_save_is_the_instant_image() {
    prove([8 * MIB, 4 * MIB].map(|l| MemoryBuilder::anonymous(ByteLen(l)).build().unwrap()));
}

#[test]
fn memfd_live_save_is_the_instant_image() {
    prove([8 * MIB, 4 * MIB].map(|l| MemoryBuilder::memfd(ByteLen(l)).build().unwrap()));
}

#[test]
fn hugetlb_live_save_is_the_instant_image() {
    // Two blocks, each restored into fresh hugetlb memory too.
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 12) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    prove([8 * MIB, 4 * MIB].map(|l| {
        MemoryBuilder::hugetlb(ByteLen(l), PageSize::SIZE_2M)
            .build()
            .unwrap()
    }));
}

#[test]
fn a_live_save_of_bad_blocks_is_a_typed_error_and_protects_nothing() {
    let mem = MemoryBuilder::memfd(ByteLen(MIB)).build().unwrap();
    let dir = ScratchDir::new("live-save-bad");
    let name = BlockName::new("ram").unwrap();
    let twice = [
        LiveBlock {
            name: name.clone(),
            memory: &mem,
        },
        LiveBlock { name, memory: &mem },
    ];
    let err = save_live(
        &dir.path().join("x"),
        &twice,
        &[],
        SaveOptions::default(),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, SnapshotError::BadBlock { .. }), "{err}");
    // No directory to write to: an Io error naming the call, before any
    // protection.
    let one = [LiveBlock {
        name: BlockName::new("ram").unwrap(),
        memory: &mem,
    }];
    let err = save_live(
        &dir.path().join("missing/x"),
        &one,
        &[],
        SaveOptions::default(),
        &|_| {},
    )
    .unwrap_err();
    assert!(matches!(err, SnapshotError::Io { op: "open", .. }), "{err}");
    // Nothing was protected: writes go through.
    mem.region().write(ByteLen(4096), b"free").unwrap();
}
