//! Preallocating 1 GiB: `LinuxMemory` (reserve, map, protect, populate from
//! N threads, unmap) against a raw `mmap` + `MADV_POPULATE_WRITE` (+ unmap)
//! split over the same number of threads, for 4 KiB pages, THP and 2 MiB
//! hugetlb, with 1 and 2 threads. One criterion group per figure, each with
//! a `baseline` function. Target: within 1.1x of the baseline.
//!
//! The hugetlb figures reserve 512 pages of 2 MiB for themselves and put the
//! pool back afterwards; they print `skipped: <reason>` if that fails.
#![allow(unsafe_code)]

use criterion::{criterion_group, criterion_main, Criterion};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_linux::{hugetlb, MemoryBuilder, Prealloc, PreallocMethod};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use std::num::NonZeroUsize;
use std::time::Duration;

const GIB: usize = 1 << 30;

#[derive(Copy, Clone)]
enum Kind {
    Anon4k,
    Thp,
    Hugetlb2m,
}

/// The baseline: what a VMM would write by hand.
fn raw_prealloc(kind: Kind, threads: usize) {
    let mut flags = MapFlags::PRIVATE;
    if let Kind::Hugetlb2m = kind {
        flags |= MapFlags::HUGETLB | MapFlags::HUGE_2MB;
    }
    // SAFETY: a fresh private mapping used only here and unmapped below.
    let ptr = unsafe {
        rustix::mm::mmap_anonymous(
            std::ptr::null_mut(),
            GIB,
            ProtFlags::READ | ProtFlags::WRITE,
            flags,
        )
    }
    .expect("mmap");
    if let Kind::Thp = kind {
        // SAFETY: advice on the mapping made above.
        unsafe { rustix::mm::madvise(ptr, GIB, Advice::LinuxHugepage) }.expect("madvise");
    }
    let chunk = GIB / threads;
    let start = ptr as usize;
    std::thread::scope(|s| {
        for i in 0..threads {
            s.spawn(move || {
                let at = (start + i * chunk) as *mut std::ffi::c_void;
                // SAFETY: each thread populates its own part of the mapping.
                unsafe { rustix::mm::madvise(at, chunk, Advice::LinuxPopulateWrite) }
                    .expect("populate");
            });
        }
    });
    // SAFETY: the mapping made above; nothing refers to it any more.
    unsafe { rustix::mm::munmap(ptr, GIB) }.expect("munmap");
}

fn ours(kind: Kind, threads: usize) {
    let len = ByteLen(GIB as u64);
    let builder = match kind {
        Kind::Anon4k => MemoryBuilder::anonymous(len),
        Kind::Thp => MemoryBuilder::anonymous(len).transparent_hugepages(true),
        Kind::Hugetlb2m => MemoryBuilder::hugetlb(len, PageSize::SIZE_2M),
    };
    let mem = builder
        .prealloc(Prealloc {
            threads: NonZeroUsize::new(threads),
            method: PreallocMethod::Populate,
        })
        .build()
        .expect("build");
    drop(mem);
}

/// Holds 512 extra 2 MiB pages while alive (under the host-state lock the
/// tests use), then restores the pool.
struct Pool {
    original: u64,
    _lock: std::fs::File,
}

impl Pool {
    fn reserve() -> Result<Pool, String> {
        let lock = std::fs::File::create("/tmp/ramblock-host-state.lock")
            .map_err(|e| format!("lock file: {e}"))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("flock: {e}"))?;
        let page = PageSize::SIZE_2M;
        let need = (GIB as u64) / page.bytes();
        let original = hugetlb::total_pages(page);
        let free = hugetlb::unreserved_free_pages(page);
        let file = hugetlb::pool_dir(page).join("nr_hugepages");
        let pool = Pool {
            original,
            _lock: lock,
        };
        if free < need {
            std::fs::write(&file, (original + need - free).to_string())
                .map_err(|e| format!("cannot write {file:?} (need root): {e}"))?;
        }
        let got = hugetlb::unreserved_free_pages(page);
        if got < need {
            return Err(format!(
                "only {got} free 2 MiB hugepages after raising the pool, {need} needed"
            ));
        }
        Ok(pool)
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let file = hugetlb::pool_dir(PageSize::SIZE_2M).join("nr_hugepages");
        let _ = std::fs::write(file, self.original.to_string());
    }
}

fn bench(c: &mut Criterion) {
    let figures = [
        (Kind::Anon4k, "anon_4k"),
        (Kind::Thp, "thp"),
        (Kind::Hugetlb2m, "hugetlb_2m"),
    ];
    for (kind, name) in figures {
        let _pool = match kind {
            Kind::Hugetlb2m => match Pool::reserve() {
                Ok(p) => Some(p),
                Err(reason) => {
                    println!("skipped: hugetlb_2m figures: {reason}");
                    continue;
                }
            },
            _ => None,
        };
        for threads in [1usize, 2] {
            let mut g = c.benchmark_group(format!("prealloc_1g_{name}_{threads}t"));
            g.sample_size(10)
                .warm_up_time(Duration::from_millis(500))
                .measurement_time(Duration::from_secs(3));
            g.bench_function("baseline", |b| b.iter(|| raw_prealloc(kind, threads)));
            g.bench_function("linux_memory", |b| b.iter(|| ours(kind, threads)));
            g.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
