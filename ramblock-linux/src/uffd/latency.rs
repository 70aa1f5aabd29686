//! [`FaultLatency`]: how long faulting pages wait for the source during
//! post-copy, and which ones still wait.
//!
//! The fault thread calls [`FaultLatency::fault`] for each page fault it
//! reads; only the first fault on a page starts its clock and asks for a
//! request to be sent (a vCPU retrying, or several vCPUs touching the same
//! page, add nothing). The receiver calls [`FaultLatency::placed`] (or
//! [`FaultLatency::placed_run`]) once it has placed pages, which ends their
//! waits and records how long each took. After a reconnect,
//! [`FaultLatency::pending_keys`] names the pages to request again.
//!
//! A page can be placed while its fault is being read (the receiver was
//! already sending it), leaving a fault that nothing will end. The fault
//! thread closes that race by calling `fault` first and then checking
//! whether the page was received (a bitmap the receiver sets after placing
//! and before calling `placed`): if it was, it calls `placed` itself and
//! sends no request.
//!
//! Keys are the caller's: one per page, such as
//! `block_index << 48 | page_index`, so that a run's pages have consecutive
//! keys for [`FaultLatency::placed_run`].

use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Page faults waiting for their page, and the waits of those served.
///
/// `Sync`: the fault thread and the receiver use it at once. Every call
/// holds one lock for a hash-map operation (or a short loop), so it is
/// cheap next to the ioctls around it; [`FaultLatency::summary`] copies
/// the recorded waits out before sorting them.
pub struct FaultLatency {
    /// Nanoseconds since a fixed origin, never going backwards.
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Key -> clock reading at its first fault.
    pending: HashMap<u64, u64>,
    /// The wait of every fault ended, in nanoseconds, in the order ended.
    waits: Vec<u64>,
}

/// The waits [`FaultLatency`] recorded, in nanoseconds; all zero when
/// none was.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct LatencySummary {
    /// Faults whose page was placed (still-pending ones are not counted).
    pub faults: u64,
    /// The median wait (nearest rank: the smallest wait that at least
    /// half of the waits do not exceed).
    pub p50_ns: u64,
    /// The 99th percentile wait (nearest rank).
    pub p99_ns: u64,
    /// The longest wait.
    pub max_ns: u64,
    /// All waits added up: the time vCPUs spent stopped on missing pages
    /// (a lower bound when several vCPUs wait on one page).
    pub total_wait_ns: u64,
}

impl FaultLatency {
    /// A tracker timing waits with the monotonic clock.
    pub fn new() -> FaultLatency {
        let origin = Instant::now();
        FaultLatency::with_clock(move || {
            u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
        })
    }

    /// A tracker timing waits with `clock`, which returns nanoseconds since
    /// any fixed origin and never goes backwards (tests drive it by hand).
    pub fn with_clock(clock: impl Fn() -> u64 + Send + Sync + 'static) -> FaultLatency {
        FaultLatency {
            clock: Box::new(clock),
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Each update is one map or vector operation; a panic elsewhere
        // cannot leave the state half-changed.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a fault on page `key`. Returns whether it is new, that is
    /// whether the page was not already waiting: send one request for
    /// each `true`. A repeated fault keeps the first one's time.
    pub fn fault(&self, key: u64) -> bool {
        let now = (self.clock)();
        let mut state = self.state();
        match state.pending.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(now);
                true
            }
        }
    }

    /// Ends the wait on page `key` now that it is placed, and records it.
    /// Returns the wait, or `None` if the page was not waiting (placed
    /// ahead of any fault, or ended already).
    pub fn placed(&self, key: u64) -> Option<Duration> {
        let now = (self.clock)();
        let mut state = self.state();
        let since = state.pending.remove(&key)?;
        // A fault read just before the clock was read here can carry a
        // later reading from another thread: count that as no wait.
        let wait = now.saturating_sub(since);
        state.waits.push(wait);
        Some(Duration::from_nanos(wait))
    }

    /// [`FaultLatency::placed`] for the `pages` consecutive keys from
    /// `first_key`, under one lock; returns how many were waiting.
    pub fn placed_run(&self, first_key: u64, pages: u64) -> u64 {
        let now = (self.clock)();
        let mut state = self.state();
        let State { pending, waits } = &mut *state;
        let end = first_key.saturating_add(pages);
        let before = waits.len();
        // Walk whichever is shorter: the run, or the waiting pages.
        if pages <= pending.len() as u64 {
            for key in first_key..end {
                if let Some(since) = pending.remove(&key) {
                    waits.push(now.saturating_sub(since));
                }
            }
        } else {
            pending.retain(|&key, &mut since| {
                let in_run = (first_key..end).contains(&key);
                if in_run {
                    waits.push(now.saturating_sub(since));
                }
                !in_run
            });
        }
        (waits.len() - before) as u64
    }

    /// The pages still waiting, in key order: what to request again after
    /// the connection to the source is re-established.
    pub fn pending_keys(&self) -> Vec<u64> {
        let mut keys: Vec<u64> = self.state().pending.keys().copied().collect();
        keys.sort_unstable();
        keys
    }

    /// The recorded waits: count, exact nearest-rank percentiles, maximum
    /// and sum.
    pub fn summary(&self) -> LatencySummary {
        let mut waits = self.state().waits.clone();
        waits.sort_unstable();
        summarize(&waits)
    }
}

/// The summary of `sorted` waits (ascending).
fn summarize(sorted: &[u64]) -> LatencySummary {
    let Some(&max_ns) = sorted.last() else {
        return LatencySummary::default();
    };
    LatencySummary {
        faults: sorted.len() as u64,
        p50_ns: nearest_rank(sorted, 50),
        p99_ns: nearest_rank(sorted, 99),
        max_ns,
        total_wait_ns: sorted.iter().fold(0u64, |sum, &w| sum.saturating_add(w)),
    }
}

/// The `percent`th percentile of non-empty `sorted` by nearest rank: the
/// value at rank `ceil(percent / 100 * n)` (1-based).
fn nearest_rank(sorted: &[u64], percent: usize) -> u64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

impl Default for FaultLatency {
    fn default() -> FaultLatency {
        FaultLatency::new()
    }
}

impl fmt::Debug for FaultLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state();
        f.debug_struct("FaultLatency")
            .field("pending", &state.pending.len())
            .field("recorded", &state.waits.len())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A tracker and the hand-set clock it reads.
    fn with_hand_clock() -> (FaultLatency, Arc<AtomicU64>) {
        let now = Arc::new(AtomicU64::new(0));
        let clock = Arc::clone(&now);
        (
            FaultLatency::with_clock(move || clock.load(Ordering::SeqCst)),
            now,
        )
    }

    #[test]
    fn an_empty_tracker_summarizes_to_zeros() {
        let (latency, _) = with_hand_clock();
        assert_eq!(latency.summary(), LatencySummary::default());
        assert_eq!(latency.placed(7), None);
        assert_eq!(latency.placed_run(0, 100), 0);
        assert!(latency.pending_keys().is_empty());
        assert_eq!(latency.summary().faults, 0);
    }

    #[test]
    fn the_first_fault_on_a_page_starts_its_wait() {
        let (latency, now) = with_hand_clock();
        now.store(1_000, Ordering::SeqCst);
        assert!(latency.fault(5), "first fault on page 5 is new");
        now.store(1_400, Ordering::SeqCst);
        assert!(!latency.fault(5), "a second fault on page 5 is not");
        assert!(latency.fault(6));
        assert_eq!(latency.pending_keys(), [5, 6]);
        now.store(3_000, Ordering::SeqCst);
        // Measured from the first fault, not the repeat.
        assert_eq!(latency.placed(5), Some(Duration::from_nanos(2_000)));
        assert_eq!(latency.placed(5), None, "ended already");
        assert_eq!(latency.pending_keys(), [6]);
        // Placed ahead of any fault: nothing recorded.
        assert_eq!(latency.placed(9), None);
        assert_eq!(
            latency.summary(),
            LatencySummary {
                faults: 1,
                p50_ns: 2_000,
                p99_ns: 2_000,
                max_ns: 2_000,
                total_wait_ns: 2_000,
            }
        );
        // A page discarded again can fault again.
        assert!(latency.fault(5));
    }

    #[test]
    fn percentiles_are_exact_nearest_ranks() {
        let (latency, now) = with_hand_clock();
        // Waits of 1..=100 µs, ended in a scrambled order.
        for page in 0..100u64 {
            now.store(1_000_000 - page * 1_000, Ordering::SeqCst);
            assert!(latency.fault(page));
        }
        // Page p faulted at 1 ms - p µs, so at 1 ms + 1 µs it has waited
        // (p + 1) µs.
        now.store(1_001_000, Ordering::SeqCst);
        for page in (0..100u64).map(|i| (i * 37) % 100) {
            assert_eq!(
                latency.placed(page),
                Some(Duration::from_nanos((page + 1) * 1_000))
            );
        }
        assert_eq!(
            latency.summary(),
            LatencySummary {
                faults: 100,
                p50_ns: 50_000,
                p99_ns: 99_000,
                max_ns: 100_000,
                total_wait_ns: 5_050_000,
            }
        );
    }

    #[test]
    fn small_samples_take_the_nearest_rank() {
        assert_eq!(nearest_rank(&[10], 50), 10);
        assert_eq!(nearest_rank(&[10], 99), 10);
        assert_eq!(nearest_rank(&[10, 20], 50), 10);
        assert_eq!(nearest_rank(&[10, 20], 99), 20);
        assert_eq!(nearest_rank(&[10, 20, 30], 50), 20);
        // 99 % of 101 waits is 99.99: rank 100, not the maximum.
        let waits: Vec<u64> = (1..=101).collect();
        assert_eq!(nearest_rank(&waits, 99), 100);
        assert_eq!(nearest_rank(&waits, 50), 51);
    }

    #[test]
    fn a_placement_read_before_its_fault_counts_no_wait() {
        let (latency, now) = with_hand_clock();
        now.store(500, Ordering::SeqCst);
        latency.fault(1);
        // Another thread's later clock reading, applied as if earlier.
        let state_since = latency.state().pending[&1];
        latency.state().pending.insert(1, state_since + 100);
        assert_eq!(latency.placed(1), Some(Duration::ZERO));
    }

    #[test]
    fn placing_a_run_ends_only_the_waits_inside_it() {
        for waiting in [&[3u64, 4, 9][..], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10][..]] {
            let (latency, now) = with_hand_clock();
            for &key in waiting {
                latency.fault(key);
            }
            now.store(70, Ordering::SeqCst);
            // Keys 3 ..= 8: a short run (walked) against a long pending
            // list, or the other way round.
            let inside = waiting.iter().filter(|&&k| (3..9).contains(&k)).count();
            assert_eq!(latency.placed_run(3, 6), inside as u64, "{waiting:?}");
            let left: Vec<u64> = waiting
                .iter()
                .copied()
                .filter(|k| !(3..9).contains(k))
                .collect();
            assert_eq!(latency.pending_keys(), left);
            let summary = latency.summary();
            assert_eq!(summary.faults, inside as u64);
            assert_eq!(summary.total_wait_ns, 70 * inside as u64);
        }
        // A run reaching past the last key neither overflows nor wraps.
        let (latency, _) = with_hand_clock();
        latency.fault(u64::MAX - 1);
        latency.fault(0);
        assert_eq!(latency.placed_run(u64::MAX - 2, 10), 1);
        assert_eq!(latency.pending_keys(), [0]);
    }

    /// Random fault/placed/placed_run sequences over a few keys against a
    /// naive model (a map of first-fault times and a list of waits).
    #[test]
    fn random_operations_match_a_model() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _round in 0..50 {
            let (latency, now) = with_hand_clock();
            let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
            let mut waits: Vec<u64> = Vec::new();
            let mut clock = 0u64;
            for _ in 0..200 {
                clock += next() % 1_000;
                now.store(clock, Ordering::SeqCst);
                let key = next() % 8;
                match next() % 3 {
                    0 => {
                        let new = !pending.contains_key(&key);
                        pending.entry(key).or_insert(clock);
                        assert_eq!(latency.fault(key), new);
                    }
                    1 => {
                        let expected = pending.remove(&key).map(|since| clock - since);
                        waits.extend(expected);
                        assert_eq!(latency.placed(key), expected.map(Duration::from_nanos));
                    }
                    _ => {
                        let pages = next() % 4;
                        let ended: Vec<u64> =
                            pending.range(key..key + pages).map(|(&k, _)| k).collect();
                        for k in &ended {
                            waits.push(clock - pending.remove(k).unwrap());
                        }
                        assert_eq!(latency.placed_run(key, pages), ended.len() as u64);
                    }
                }
                assert_eq!(
                    latency.pending_keys(),
                    pending.keys().copied().collect::<Vec<_>>()
                );
            }
            let mut sorted = waits.clone();
            sorted.sort_unstable();
            let summary = latency.summary();
            assert_eq!(summary.faults, waits.len() as u64);
            assert_eq!(summary.total_wait_ns, waits.iter().sum::<u64>());
            assert_eq!(summary.max_ns, sorted.last().copied().unwrap_or(0));
            if !sorted.is_empty() {
                // Nearest rank, from its definition: the smallest wait
                // that at least p % of the waits do not exceed.
                for (p, got) in [(50, summary.p50_ns), (99, summary.p99_ns)] {
                    let want = *sorted
                        .iter()
                        .find(|&&w| {
                            100 * sorted.iter().filter(|&&x| x <= w).count() >= p * sorted.len()
                        })
                        .unwrap();
                    assert_eq!(got, want, "p{p} of {sorted:?}");
                }
            }
        }
    }

    #[test]
    fn the_fault_and_receiver_threads_can_share_it() {
        let latency = Arc::new(FaultLatency::new());
        let faulting = {
            let latency = Arc::clone(&latency);
            std::thread::spawn(move || (0..10_000u64).filter(|&k| latency.fault(k)).count())
        };
        let new = faulting.join().unwrap();
        let receiving = {
            let latency = Arc::clone(&latency);
            std::thread::spawn(move || (0..10_000u64).filter_map(|k| latency.placed(k)).count())
        };
        // A second fault thread racing the receiver on the same keys.
        let refaulting = {
            let latency = Arc::clone(&latency);
            std::thread::spawn(move || (0..10_000u64).filter(|&k| latency.fault(k)).count())
        };
        let ended = receiving.join().unwrap();
        let refaulted = refaulting.join().unwrap();
        assert_eq!(new, 10_000);
        assert_eq!(ended, 10_000, "every first fault was ended once");
        // A key faulted again after its placement is pending again.
        assert_eq!(latency.pending_keys().len(), refaulted);
        assert_eq!(latency.summary().faults, 10_000);
    }
}
