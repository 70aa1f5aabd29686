//! `LiveCopy` with several writer threads faulting at once, while its
//! fault thread and background copier both save pages: the image must be
//! the model (memory read at the instant, with every writer parked), each
//! page must reach `save` exactly once, and `save` must never see a page
//! other than as it was at the instant.
//!
//! Four writers share the block: writer `w` increments a counter in every
//! page `p` with `p % 4 == w`, walking up from a start of its own, so
//! they fault on different pages at the same time, ahead of and behind
//! the copier, and sometimes on a page the copier has claimed.
mod common;

use common::{skip, wait_for};
use ramblock_core::addr::ByteLen;
use ramblock_core::host::HostMemory;
use ramblock_linux::live_copy::{LiveCopy, LiveCopyError, LiveCopyStats};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;

const MIB: u64 = 1 << 20;
const WRITERS: usize = 4;
const PAGE: usize = 4096;

struct Writer {
    park: AtomicBool,
    parked: AtomicBool,
    stop: AtomicBool,
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

    fn run(&self, w: usize, mem: &LinuxMemory) -> u64 {
        let region = mem.region();
        let mine = mem.used_len().0 as usize / PAGE / WRITERS;
        let mut n = 0u64;
        while !self.stop.load(Ordering::Acquire) {
            if self.park.load(Ordering::Acquire) {
                self.parked.store(true, Ordering::Release);
                std::hint::spin_loop();
                continue;
            }
            self.parked.store(false, Ordering::Release);
            // Each writer starts a different quarter of its pages along.
            let i = (n as usize + w * mine / WRITERS) % mine;
            let page = i * WRITERS + w;
            self.attempts.fetch_add(1, Ordering::AcqRel);
            region
                .write(ByteLen((page * PAGE + 8 * w) as u64), &n.to_le_bytes())
                .unwrap();
            n += 1;
        }
        n
    }
}

/// What one copy under the writers left: the image, the model, how often
/// each page was saved, and the stats.
struct Outcome {
    image: Vec<u8>,
    model: Vec<u8>,
    times: Vec<u8>,
    stats: LiveCopyStats,
}

/// Copies `mem` live under the writers, with `run_regions` (`save` called
/// from both threads at once) or `run`; returns the image, the model, how
/// often each page was saved, and the stats.
fn copy_under_writers(mem: &LinuxMemory, regions: bool) -> Result<Outcome, LiveCopyError> {
    let len = mem.used_len().0 as usize;
    let region = mem.region();
    // Some pages populated, the rest untouched (first writes must stop too).
    for p in (0..len / PAGE).step_by(3) {
        region
            .write(ByteLen((p * PAGE) as u64), &[p as u8 | 1])
            .unwrap();
    }
    let writers: [Writer; WRITERS] = std::array::from_fn(|_| Writer::new());
    let image = Mutex::new(vec![0u8; len]);
    let times_saved: Vec<AtomicU8> = (0..len / PAGE).map(|_| AtomicU8::new(0)).collect();
    let mut model = vec![0u8; len];
    let record = |offset: u64, data: &[u8]| {
        let offset = offset as usize;
        for t in &times_saved[offset / PAGE..(offset + data.len()) / PAGE] {
            t.fetch_add(1, Ordering::Relaxed);
        }
        image.lock().unwrap()[offset..offset + data.len()].copy_from_slice(data);
    };
    let stats = std::thread::scope(|s| {
        for (w, writer) in writers.iter().enumerate() {
            s.spawn(move || writer.run(w, mem));
        }
        for w in &writers {
            assert!(wait_for(|| w.attempts.load(Ordering::Acquire) > 1000));
        }
        // The instant: every writer parked, the model read, protection on.
        for w in &writers {
            w.park.store(true, Ordering::Release);
        }
        for w in &writers {
            assert!(wait_for(|| w.parked.load(Ordering::Acquire)));
        }
        region.read(ByteLen(0), &mut model).unwrap();
        let copy = LiveCopy::start(mem);
        let before: Vec<u64> = writers
            .iter()
            .map(|w| w.attempts.load(Ordering::Acquire))
            .collect();
        for w in &writers {
            w.park.store(false, Ordering::Release);
        }
        let stats = copy.and_then(|copy| {
            // Every writer starts a write (and faults) before the copy runs.
            for (w, b) in writers.iter().zip(&before) {
                assert!(wait_for(|| w.attempts.load(Ordering::Acquire) > *b));
            }
            if regions {
                copy.run_regions(|offset, pages| {
                    let mut data = vec![0u8; pages.len()];
                    pages
                        .read(ByteLen(0), &mut data)
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    record(offset, &data);
                    Ok(())
                })
            } else {
                copy.run(|offset, data| {
                    record(offset, data);
                    Ok(())
                })
            }
        });
        for w in &writers {
            w.stop.store(true, Ordering::Release);
        }
        stats
    })?;
    let times = times_saved
        .iter()
        .map(|t| t.load(Ordering::Relaxed))
        .collect();
    Ok(Outcome {
        image: image.into_inner().unwrap(),
        model,
        times,
        stats,
    })
}

fn prove(mem: LinuxMemory, regions: bool) {
    let Outcome {
        image,
        model,
        times,
        stats,
    } = match copy_under_writers(&mem, regions) {
        Err(LiveCopyError::KernelLacks { .. }) => return skip("no UFFD_FEATURE_WP_UNPOPULATED"),
        Err(LiveCopyError::Uffd(e)) if e.is_unavailable() => return skip(&e.to_string()),
        Err(e) => panic!("live copy: {e}"),
        Ok(r) => r,
    };
    let wrong: Vec<(usize, u8)> = times
        .iter()
        .enumerate()
        .filter(|(_, &t)| t != 1)
        .map(|(p, &t)| (p, t))
        .take(8)
        .collect();
    assert_eq!(
        wrong,
        [],
        "(page, times saved): every page saved exactly once"
    );
    let differ = image
        .chunks(PAGE)
        .zip(model.chunks(PAGE))
        .position(|(a, b)| a != b);
    assert_eq!(differ, None, "the image is memory at the instant");
    let mut now = vec![0u8; image.len()];
    mem.region().read(ByteLen(0), &mut now).unwrap();
    assert_ne!(now, model, "the writers changed memory during the copy");
    assert_eq!(stats.pages as usize, image.len() / PAGE, "{stats:?}");
    assert_eq!(stats.fault_service_ns.len() as u64, stats.faults);
    assert!(stats.faulted_pages <= stats.faults, "{stats:?}");
    println!(
        "{} pages, {} faults, {} saved for a writer, {:?}",
        stats.pages, stats.faults, stats.faulted_pages, stats.elapsed
    );
}

#[test]
fn anonymous_copy_with_save_on_two_threads_is_the_instant_image() {
    for _ in 0..4 {
        prove(
            MemoryBuilder::anonymous(ByteLen(16 * MIB)).build().unwrap(),
            true,
        );
    }
}

#[test]
fn memfd_copy_with_save_on_two_threads_is_the_instant_image() {
    for _ in 0..4 {
        prove(
            MemoryBuilder::memfd(ByteLen(16 * MIB)).build().unwrap(),
            true,
        );
    }
}

#[test]
fn anonymous_copy_with_a_locked_save_is_the_instant_image() {
    for _ in 0..2 {
        prove(
            MemoryBuilder::anonymous(ByteLen(16 * MIB)).build().unwrap(),
            false,
        );
    }
}
