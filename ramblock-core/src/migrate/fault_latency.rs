//! Post-copy fault latency: how long faulting pages wait for the source,
//! and which ones still wait. Pure statistics beside
//! [`PostcopyStats`](crate::migrate::stats::PostcopyStats): the caller reads the
//! clock and passes nanoseconds in, so nothing here makes a system call.
//!
//! [`LatencySummary`] (count, nearest-rank p50/p99, maximum, total) needs
//! no allocator: [`LatencySummary::from_sorted`] summarises any sorted
//! slice of waits. `FaultWaits` (feature `alloc`) is the bookkeeping a
//! post-copy destination keeps:
//!
//! - the fault thread calls `FaultWaits::fault` for each page fault it
//!   reads; only the first fault on a page starts its wait and asks for a
//!   request to be sent (a vCPU retrying, or several vCPUs touching the
//!   same page, add nothing);
//! - the receiver calls `FaultWaits::placed` (or
//!   `FaultWaits::placed_run`) once it has placed pages, which ends
//!   their waits and records how long each took;
//! - after a reconnect, `FaultWaits::pending_keys` names the pages to
//!   request again.
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
//! keys for `FaultWaits::placed_run`.
//!
//! ```
//! # #[cfg(feature = "alloc")] {
//! use ramblock_core::migrate::fault_latency::FaultWaits;
//!
//! let mut waits = FaultWaits::new();
//! assert!(waits.fault(7, 1_000), "first fault on page 7: send a request");
//! assert!(!waits.fault(7, 1_200), "a repeat: the request is on its way");
//! assert_eq!(waits.placed(7, 4_000), Some(3_000));
//! assert_eq!(waits.summary().p99_ns, 3_000);
//! # }
//! ```

#[cfg(feature = "alloc")]
use alloc::{collections::BTreeMap, vec::Vec};

/// Recorded fault waits, in nanoseconds; all zero when none was.
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

impl LatencySummary {
    /// The summary of `sorted` waits (ascending; an unsorted slice gives
    /// meaningless percentiles, never a panic).
    pub fn from_sorted(sorted: &[u64]) -> LatencySummary {
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
}

/// The `percent`th percentile of non-empty `sorted` by nearest rank: the
/// value at rank `ceil(percent / 100 * n)` (1-based).
fn nearest_rank(sorted: &[u64], percent: usize) -> u64 {
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// Page faults waiting for their page, and the waits of those served.
///
/// Methods take the clock reading (`now_ns`: nanoseconds since any fixed
/// origin) from the caller; a host adapter wraps this in a lock and a
/// monotonic clock to share it between the fault thread and the receiver.
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultWaits {
    /// Key -> clock reading at its first fault. Ordered, so a run of keys
    /// is one range and the pending keys come out sorted.
    pending: BTreeMap<u64, u64>,
    /// The wait of every fault ended, in the order ended.
    waits: Vec<u64>,
}

#[cfg(feature = "alloc")]
impl FaultWaits {
    /// No fault seen yet.
    pub const fn new() -> FaultWaits {
        FaultWaits {
            pending: BTreeMap::new(),
            waits: Vec::new(),
        }
    }

    /// Records a fault on page `key` at `now_ns`. Returns whether it is
    /// new, that is whether the page was not already waiting: send one
    /// request for each `true`. A repeated fault keeps the first one's time.
    pub fn fault(&mut self, key: u64, now_ns: u64) -> bool {
        match self.pending.entry(key) {
            alloc::collections::btree_map::Entry::Occupied(_) => false,
            alloc::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(now_ns);
                true
            }
        }
    }

    /// Ends the wait on page `key` at `now_ns` now that it is placed, and
    /// records it. Returns the wait in nanoseconds, or `None` if the page
    /// was not waiting (placed ahead of any fault, or ended already).
    pub fn placed(&mut self, key: u64, now_ns: u64) -> Option<u64> {
        let since = self.pending.remove(&key)?;
        // A fault read just before the caller read its clock can carry a
        // later reading from another thread: count that as no wait.
        let wait = now_ns.saturating_sub(since);
        self.waits.push(wait);
        Some(wait)
    }

    /// [`FaultWaits::placed`] for the `pages` consecutive keys from
    /// `first_key`; returns how many were waiting. Keys past `u64::MAX`
    /// are not wrapped to zero.
    pub fn placed_run(&mut self, first_key: u64, pages: u64, now_ns: u64) -> u64 {
        let end = first_key.saturating_add(pages);
        let before = self.waits.len();
        // Only the waiting keys inside the run are visited, however long
        // the run or the pending set.
        while let Some((&key, &since)) = self.pending.range(first_key..end).next() {
            self.pending.remove(&key);
            self.waits.push(now_ns.saturating_sub(since));
        }
        (self.waits.len() - before) as u64
    }

    /// The pages still waiting, in key order: what to request again after
    /// the connection to the source is re-established.
    pub fn pending_keys(&self) -> impl Iterator<Item = u64> + '_ {
        self.pending.keys().copied()
    }

    /// How many pages still wait.
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }

    /// How many waits were recorded.
    pub fn recorded(&self) -> usize {
        self.waits.len()
    }

    /// The recorded waits: count, exact nearest-rank percentiles, maximum
    /// and sum (sorts a copy of them).
    pub fn summary(&self) -> LatencySummary {
        let mut waits = self.waits.clone();
        waits.sort_unstable();
        LatencySummary::from_sorted(&waits)
    }
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::collections::BTreeMap;
    use alloc::vec::Vec;

    fn pending(waits: &FaultWaits) -> Vec<u64> {
        waits.pending_keys().collect()
    }

    #[test]
    fn an_empty_tracker_summarizes_to_zeros() {
        let mut waits = FaultWaits::new();
        assert_eq!(waits.summary(), LatencySummary::default());
        assert_eq!(waits.placed(7, 0), None);
        assert_eq!(waits.placed_run(0, 100, 0), 0);
        assert!(pending(&waits).is_empty());
        assert_eq!(waits.summary().faults, 0);
        assert_eq!(LatencySummary::from_sorted(&[]), LatencySummary::default());
    }

    #[test]
    fn the_first_fault_on_a_page_starts_its_wait() {
        let mut waits = FaultWaits::new();
        assert!(waits.fault(5, 1_000), "first fault on page 5 is new");
        assert!(!waits.fault(5, 1_400), "a second fault on page 5 is not");
        assert!(waits.fault(6, 1_400));
        assert_eq!(pending(&waits), [5, 6]);
        // Measured from the first fault, not the repeat.
        assert_eq!(waits.placed(5, 3_000), Some(2_000));
        assert_eq!(waits.placed(5, 3_000), None, "ended already");
        assert_eq!(pending(&waits), [6]);
        // Placed ahead of any fault: nothing recorded.
        assert_eq!(waits.placed(9, 3_000), None);
        assert_eq!(
            waits.summary(),
            LatencySummary {
                faults: 1,
                p50_ns: 2_000,
                p99_ns: 2_000,
                max_ns: 2_000,
                total_wait_ns: 2_000,
            }
        );
        // A page discarded again can fault again.
        assert!(waits.fault(5, 3_000));
    }

    #[test]
    fn percentiles_are_exact_nearest_ranks() {
        let mut waits = FaultWaits::new();
        // Waits of 1..=100 µs, ended in a scrambled order.
        for page in 0..100u64 {
            assert!(waits.fault(page, 1_000_000 - page * 1_000));
        }
        // Page p faulted at 1 ms - p µs, so at 1 ms + 1 µs it has waited
        // (p + 1) µs.
        for page in (0..100u64).map(|i| (i * 37) % 100) {
            assert_eq!(waits.placed(page, 1_001_000), Some((page + 1) * 1_000));
        }
        assert_eq!(
            waits.summary(),
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
        let mut waits = FaultWaits::new();
        // Another thread's later clock reading, applied as if earlier.
        waits.fault(1, 600);
        assert_eq!(waits.placed(1, 500), Some(0));
    }

    #[test]
    fn placing_a_run_ends_only_the_waits_inside_it() {
        for waiting in [&[3u64, 4, 9][..], &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10][..]] {
            let mut waits = FaultWaits::new();
            for &key in waiting {
                waits.fault(key, 0);
            }
            // Keys 3 ..= 8: a short run against a long pending list, or
            // the other way round.
            let inside = waiting.iter().filter(|&&k| (3..9).contains(&k)).count();
            assert_eq!(waits.placed_run(3, 6, 70), inside as u64, "{waiting:?}");
            let left: Vec<u64> = waiting
                .iter()
                .copied()
                .filter(|k| !(3..9).contains(k))
                .collect();
            assert_eq!(pending(&waits), left);
            let summary = waits.summary();
            assert_eq!(summary.faults, inside as u64);
            assert_eq!(summary.total_wait_ns, 70 * inside as u64);
        }
        // A run reaching past the last key neither overflows nor wraps.
        let mut waits = FaultWaits::new();
        waits.fault(u64::MAX - 1, 0);
        waits.fault(0, 0);
        assert_eq!(waits.placed_run(u64::MAX - 2, 10, 0), 1);
        assert_eq!(pending(&waits), [0]);
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
        // Fewer rounds under Miri, which runs this hundreds of times slower.
        let rounds = if cfg!(miri) { 5 } else { 50 };
        for _round in 0..rounds {
            let mut waits = FaultWaits::new();
            let mut model: BTreeMap<u64, u64> = BTreeMap::new();
            let mut ended: Vec<u64> = Vec::new();
            let mut clock = 0u64;
            for _ in 0..200 {
                clock += next() % 1_000;
                let key = next() % 8;
                match next() % 3 {
                    0 => {
                        let new = !model.contains_key(&key);
                        model.entry(key).or_insert(clock);
                        assert_eq!(waits.fault(key, clock), new);
                    }
                    1 => {
                        let expected = model.remove(&key).map(|since| clock - since);
                        ended.extend(expected);
                        assert_eq!(waits.placed(key, clock), expected);
                    }
                    _ => {
                        let pages = next() % 4;
                        let inside: Vec<u64> =
                            model.range(key..key + pages).map(|(&k, _)| k).collect();
                        for k in &inside {
                            ended.push(clock - model.remove(k).unwrap());
                        }
                        assert_eq!(waits.placed_run(key, pages, clock), inside.len() as u64);
                    }
                }
                assert_eq!(pending(&waits), model.keys().copied().collect::<Vec<_>>());
            }
            let mut sorted = ended.clone();
            sorted.sort_unstable();
            let summary = waits.summary();
            assert_eq!(summary.faults, ended.len() as u64);
            assert_eq!(summary.total_wait_ns, ended.iter().sum::<u64>());
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
}
