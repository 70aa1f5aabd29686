//! Lazy restore: guest memory is registered with userfaultfd (missing
//! mode) and filled from the snapshot as the guest touches it.
//!
//! A fault thread serves each fault with the faulting page (a hugepage on
//! hugetlb memory), read from the newest file of the chain holding each of
//! its 4 KiB pages; a prefetch thread meanwhile places every other page in
//! order, 256 KiB (or one hugepage) at a time, and records what it placed
//! in each block's received map, which the fault thread records in too.
//! The caller's closure runs the guest while both work; when it returns
//! and the prefetch thread is done, every page is present and the memory
//! is unregistered, so it is ordinary memory again.

use super::chain::SnapshotChain;
use super::error::SnapshotError;
use super::restore::match_targets;
use crate::uffd::{Event, Placed, RegisterMode, RegisteredBlock, Userfaultfd};
use crate::LinuxMemory;
use ramblock_core::bitmap::{alloc_atomic, ReceivedMap};
use ramblock_core::host::HostMemory;
use ramblock_core::AtomicWord;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const PAGE: u64 = 4096;
/// Pages the prefetch thread places at once on 4 KiB memory.
const PREFETCH_PAGES: u64 = 64;

/// How a lazy restore runs.
#[derive(Copy, Clone, Debug)]
pub struct LazyOptions {
    /// Prefetch in the background while the closure runs (the default).
    /// Without it every page the guest touches faults, and the rest is
    /// placed after the closure returns: what a measurement of fault
    /// latency wants.
    pub prefetch: bool,
}

impl Default for LazyOptions {
    fn default() -> Self {
        LazyOptions { prefetch: true }
    }
}

/// What a lazy restore did.
#[derive(Clone, Debug, Default)]
pub struct LazyStats {
    /// Faults served.
    pub faults: u64,
    /// Median time from reading a fault to its page placed.
    pub fault_p50: Duration,
    /// 99th percentile of the same.
    pub fault_p99: Duration,
    /// Pages (4 KiB) the prefetch thread placed.
    pub prefetched_pages: u64,
    /// From registering to every page present.
    pub elapsed: Duration,
}

/// What the guest-running closure can look at.
#[derive(Debug)]
pub struct LazyProgress<'a> {
    faults: &'a AtomicU64,
    received: &'a [ReceivedMap<Box<[AtomicWord]>>],
}

impl LazyProgress<'_> {
    /// Faults served so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }

    /// Pages present so far, over all blocks.
    pub fn received_pages(&self) -> u64 {
        self.received.iter().map(|r| r.received_count()).sum()
    }
}

struct Block<'m> {
    reg: RegisteredBlock<'m>,
    index: usize,
    received: usize,
}

/// Restores `chain` lazily into `targets` (block name and memory, freshly
/// mapped and never touched, so every page is missing: a page already
/// present keeps its contents), runs `run` while pages arrive, and returns
/// its result once every page is present.
pub fn restore_lazy<R>(
    chain: &SnapshotChain,
    targets: &[(&str, &LinuxMemory)],
    options: LazyOptions,
    run: impl FnOnce(&LazyProgress<'_>) -> R,
) -> Result<(R, LazyStats), SnapshotError> {
    let start = Instant::now();
    let index = match_targets(
        chain,
        &targets
            .iter()
            .map(|(n, m)| (*n, m.used_len().0, m.page_size()))
            .collect::<Vec<_>>(),
    )?;
    let uffd = Userfaultfd::new()?;
    let mut blocks = Vec::with_capacity(targets.len());
    let received: Vec<_> = targets
        .iter()
        .map(|(_, m)| {
            let pages = (m.used_len().0 / PAGE) as usize;
            ReceivedMap::new(alloc_atomic(pages.div_ceil(64)), pages).expect("sized for the block")
        })
        .collect();
    for (t, (_, mem)) in targets.iter().enumerate() {
        let reg = uffd.register_memory(mem, RegisterMode::MISSING)?;
        blocks.push(Block {
            reg,
            index: index[t],
            received: t,
        });
    }
    let faults = AtomicU64::new(0);
    let prefetched = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let latencies = Mutex::new(Vec::<u32>::new());
    let failure = Mutex::new(None::<SnapshotError>);
    let fail = |e: SnapshotError| {
        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    };

    // Places the unit of `b` at `offset` (whole placement pages) from the chain.
    let place = |b: &Block<'_>,
                 offset: u64,
                 len: u64,
                 buf: &mut Vec<u8>|
     -> Result<Placed, SnapshotError> {
        buf.resize(len as usize, 0);
        let first = offset / PAGE;
        let end = first + len / PAGE;
        let mut page = first;
        while page < end {
            let owner = chain.owner(b.index, page);
            let mut run_end = page + 1;
            while run_end < end && chain.owner(b.index, run_end) == owner {
                run_end += 1;
            }
            let file = &chain.files()[owner];
            let at = file.blocks()[b.index].data_offset + page * PAGE;
            let dst =
                &mut buf[((page - first) * PAGE) as usize..((run_end - first) * PAGE) as usize];
            file.file().read_exact_at(dst, at).map_err(|e| {
                SnapshotError::io("pread", file.path(), e, "the snapshot must be readable")
            })?;
            page = run_end;
        }
        let placed = if b.reg.supports_zeropage() && buf.iter().all(|&x| x == 0) {
            b.reg.zero_run(&uffd, offset, len)?
        } else {
            b.reg.place_run(&uffd, offset, buf)?
        };
        let _ = received[b.received].mark_received(first as usize, (end - first) as usize);
        Ok(placed)
    };

    let result = std::thread::scope(|s| {
        let fault_thread = s.spawn(|| {
            let mut buf = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let event = match uffd.read_event(Some(Duration::from_millis(5))) {
                    Ok(Some(e)) => e,
                    Ok(None) => continue,
                    Err(e) => return fail(e.into()),
                };
                let t0 = Instant::now();
                let Event::Pagefault { addr, .. } = event else {
                    continue;
                };
                let Some((b, offset)) = blocks
                    .iter()
                    .find_map(|b| b.reg.offset_of(addr).map(|o| (b, o)))
                else {
                    continue;
                };
                if let Err(e) = place(b, offset, b.reg.page_size() as u64, &mut buf) {
                    return fail(e);
                }
                faults.fetch_add(1, Ordering::Relaxed);
                let us = t0.elapsed().as_micros().min(u32::MAX as u128) as u32;
                latencies.lock().unwrap_or_else(|p| p.into_inner()).push(us);
            }
        });
        let prefetch_all = || {
            let mut buf = Vec::new();
            for b in &blocks {
                let unit = (b.reg.page_size() as u64).max(PREFETCH_PAGES * PAGE);
                let len = b.reg.len() as u64;
                let map = &received[b.received];
                let mut offset = 0;
                while offset < len {
                    let n = unit.min(len - offset);
                    let first = (offset / PAGE) as usize;
                    let missing = (first..first + (n / PAGE) as usize)
                        .any(|p| !map.is_received(p).unwrap_or(true));
                    if missing {
                        match place(b, offset, n, &mut buf) {
                            Ok(_) => {
                                prefetched.fetch_add(n / PAGE, Ordering::Relaxed);
                            }
                            Err(e) => return fail(e),
                        }
                    }
                    offset += n;
                }
            }
        };
        let prefetch = options.prefetch.then(|| s.spawn(prefetch_all));
        let progress = LazyProgress {
            faults: &faults,
            received: &received,
        };
        // A panicking closure still lets the threads finish and stop.
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&progress)));
        match prefetch {
            Some(thread) => {
                let _ = thread.join();
            }
            // Without prefetching, whatever the guest did not touch is
            // placed now, so the memory is whole when this returns.
            None => prefetch_all(),
        }
        stop.store(true, Ordering::Release);
        let _ = fault_thread.join();
        r
    });
    let result = result.unwrap_or_else(|p| std::panic::resume_unwind(p));
    for b in &blocks {
        b.reg.unregister(&uffd)?;
    }
    if let Some(e) = failure.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut lat = latencies.into_inner().unwrap_or_else(|p| p.into_inner());
    lat.sort_unstable();
    let pct = |p: usize| {
        lat.get((lat.len() * p / 100).min(lat.len().saturating_sub(1)))
            .map_or(Duration::ZERO, |&us| Duration::from_micros(us.into()))
    };
    Ok((
        result,
        LazyStats {
            faults: faults.load(Ordering::Relaxed),
            fault_p50: pct(50),
            fault_p99: pct(99),
            prefetched_pages: prefetched.load(Ordering::Relaxed),
            elapsed: start.elapsed(),
        },
    ))
}
