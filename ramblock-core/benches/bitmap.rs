//! Bitmap speed, each figure against a baseline measured in the same run.
//!
//! - "set ... dirty": `AtomicBitmap::set_range` (word stores) against
//!   vm-memory's `AtomicBitmap::set_addr_range` (one atomic OR per page).
//!   Here the baseline is the competitor to beat: target ratio <= 0.05.
//! - "merge 32 MiB log, ...": `MigrationBitmap::merge_log` of a 1 TiB guest's
//!   KVM log against a plain OR-and-popcount loop: target <= 1.3.
//! - "find dirty pages in 32 MiB bitmap ...": every dirty page through
//!   `dirty_pages` against a plain `trailing_zeros` word loop: target
//!   <= 1.2.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ramblock_core::bitmap::{alloc_atomic, alloc_plain, words_for, AtomicBitmap, MigrationBitmap};
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
/// Pages of a 1 GiB block.
const GIB_PAGES: usize = (1 << 30) / PAGE;
/// Pages covered by a 32 MiB bitmap: a 1 TiB guest.
const LOG_PAGES: usize = 32 * (1 << 20) * 8;

/// A small deterministic generator (xorshift64*), so every run measures the
/// same bit patterns.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The dirty patterns of the merge and scan figures, as log words.
#[derive(Copy, Clone)]
enum Pattern {
    Clean,
    /// 1% of pages, each anywhere.
    RandomPercent1,
    /// 1% of pages, in 2 MiB runs (512 pages, 8 words) at random places, as
    /// a guest dirtying whole huge pages does.
    ClusteredPercent1,
    /// Every page with probability 1/2.
    Half,
}

fn log_words(pattern: Pattern) -> Vec<u64> {
    let words = words_for(LOG_PAGES);
    // Every page written, so a clean log is real memory like the bitmap
    // it is compared with: `vec![0; n]` alone would leave it mapped to the
    // kernel's zero page, which a scan reads from the cache.
    let mut log = vec![!0u64; words];
    log.fill(0);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    match pattern {
        Pattern::Clean => {}
        Pattern::RandomPercent1 => {
            for _ in 0..LOG_PAGES / 100 {
                let page = rng.below(LOG_PAGES);
                log[page / 64] |= 1 << (page % 64);
            }
        }
        Pattern::ClusteredPercent1 => {
            const RUN_WORDS: usize = 8;
            for _ in 0..words / 100 / RUN_WORDS {
                let at = rng.below(words / RUN_WORDS) * RUN_WORDS;
                log[at..at + RUN_WORDS].fill(!0);
            }
        }
        Pattern::Half => log.iter_mut().for_each(|w| *w = rng.next()),
    }
    log
}

/// The baseline merge: OR each word in and count the newly set bits, plain
/// words, no atomics, no checks.
fn plain_merge(dst: &mut [u64], log: &[u64]) -> u64 {
    let mut newly = 0;
    for (d, &s) in dst.iter_mut().zip(log) {
        newly += u64::from((s & !*d).count_ones());
        *d |= s;
    }
    newly
}

/// The baseline scan: every set bit, word by word, with `trailing_zeros`.
/// Returns the number of pages and a checksum of their indices.
fn plain_scan(words: &[u64]) -> (u64, usize) {
    let (mut count, mut sum) = (0u64, 0usize);
    for (i, &word) in words.iter().enumerate() {
        let mut w = word;
        while w != 0 {
            let page = i * 64 + w.trailing_zeros() as usize;
            count += 1;
            sum = sum.wrapping_add(page);
            w &= w - 1;
        }
    }
    (count, sum)
}

/// The same walk through `dirty_pages`.
fn find_scan(map: &MigrationBitmap<Box<[u64]>>) -> (u64, usize) {
    let (mut count, mut sum) = (0u64, 0usize);
    for page in map.dirty_pages(0) {
        count += 1;
        sum = sum.wrapping_add(page);
    }
    (count, sum)
}

fn set_dirty(c: &mut Criterion) {
    // Setting bits that are already set does the same work as setting clear
    // ones (a store or an atomic OR either way), so the state needs no reset.
    for (figure, start, pages) in [
        // A 2 MiB huge page's worth of 4 KiB pages, 2 MiB aligned.
        ("set 512 pages dirty", 512usize, 512usize),
        ("set 1 GiB dirty", 0, GIB_PAGES),
    ] {
        let ours = AtomicBitmap::new(alloc_atomic(words_for(GIB_PAGES)), GIB_PAGES)
            .expect("storage is sized for the bitmap");
        let theirs = vm_memory::bitmap::AtomicBitmap::new(
            GIB_PAGES * PAGE,
            NonZeroUsize::new(PAGE).expect("page size is not zero"),
        );
        // Both set exactly the same pages (checked before timing, as a
        // criterion filter may skip the benchmarks).
        theirs.set_addr_range(start * PAGE, pages * PAGE);
        ours.set_range(start, pages).expect("in range");
        let edges = [
            start.checked_sub(1),
            Some(start),
            Some(start + pages - 1),
            Some(start + pages),
        ];
        for page in edges.into_iter().flatten().filter(|&p| p < GIB_PAGES) {
            assert_eq!(
                ours.is_set(page),
                Ok(theirs.is_bit_set(page)),
                "page {page}"
            );
        }
        assert_eq!(ours.count_ones(), pages as u64);

        let mut group = c.benchmark_group(figure);
        group.bench_function("baseline", |b| {
            b.iter(|| theirs.set_addr_range(black_box(start * PAGE), black_box(pages * PAGE)))
        });
        group.bench_function("ramblock", |b| {
            b.iter(|| ours.set_range(black_box(start), black_box(pages)))
        });
        group.finish();
    }
}

/// Times `op` on a fresh state from `reset` each iteration, with the reset
/// outside the timed part. A 32 MiB state cannot come from a per-iteration
/// allocation in `iter_batched`: fresh pages would be faulted in inside the
/// measurement. So one buffer is zeroed (already mapped) before each run.
fn time_with_reset<S>(
    iters: u64,
    state: &mut S,
    mut reset: impl FnMut(&mut S),
    mut op: impl FnMut(&mut S),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        reset(state);
        let start = Instant::now();
        op(state);
        total += start.elapsed();
    }
    total
}

fn merge(c: &mut Criterion) {
    let words = words_for(LOG_PAGES);
    for (figure, pattern) in [
        ("merge 32 MiB log, 0%", Pattern::Clean),
        ("merge 32 MiB log, 1% random", Pattern::RandomPercent1),
        ("merge 32 MiB log, 1% clustered", Pattern::ClusteredPercent1),
        ("merge 32 MiB log, 50%", Pattern::Half),
    ] {
        let log = log_words(pattern);
        let mut ours = MigrationBitmap::new(alloc_plain(words), LOG_PAGES)
            .expect("storage is sized for the bitmap");
        let mut plain = vec![0u64; words];
        // Same answer from both, on zeroed destinations.
        let want = plain_merge(&mut plain, &log);
        assert_eq!(ours.merge_log(0, &log, LOG_PAGES), Ok(want));

        let mut group = c.benchmark_group(figure);
        group.bench_function("baseline", |b| {
            b.iter_custom(|iters| {
                time_with_reset(
                    iters,
                    &mut plain,
                    // Plain stores, like `clear_range` below: a `fill(0)`
                    // becomes a memset whose non-temporal stores would leave
                    // the baseline's words out of cache and flatter ramblock.
                    |p| p.iter_mut().for_each(|w| *w = black_box(0)),
                    |p| {
                        black_box(plain_merge(black_box(p), black_box(&log)));
                    },
                )
            })
        });
        group.bench_function("ramblock", |b| {
            b.iter_custom(|iters| {
                time_with_reset(
                    iters,
                    &mut ours,
                    |m| {
                        m.clear_range(0, LOG_PAGES).expect("whole bitmap");
                    },
                    |m| {
                        black_box(black_box(m).merge_log(0, black_box(&log), LOG_PAGES))
                            .expect("log fits the bitmap");
                    },
                )
            })
        });
        group.finish();
    }
}

fn find(c: &mut Criterion) {
    let words = words_for(LOG_PAGES);
    for (figure, pattern) in [
        ("find dirty pages in 32 MiB bitmap, 0%", Pattern::Clean),
        (
            "find dirty pages in 32 MiB bitmap, 1%",
            Pattern::RandomPercent1,
        ),
    ] {
        let log = log_words(pattern);
        let mut map = MigrationBitmap::new(alloc_plain(words), LOG_PAGES)
            .expect("storage is sized for the bitmap");
        map.merge_log(0, &log, LOG_PAGES)
            .expect("log fits the bitmap");
        // Both walks find the same pages.
        assert_eq!(find_scan(&map), plain_scan(&log));

        let mut group = c.benchmark_group(figure);
        group.bench_function("baseline", |b| b.iter(|| plain_scan(black_box(&log))));
        group.bench_function("ramblock", |b| b.iter(|| find_scan(black_box(&map))));
        group.finish();
    }
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = set_dirty, merge, find
}
criterion_main!(benches);
