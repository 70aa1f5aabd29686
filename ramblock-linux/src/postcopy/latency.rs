//! [`FaultLatency`]: the core's [`FaultWaits`] shared between the fault
//! thread and the receiver, timed with the monotonic clock.
//!
//! The statistics themselves (which pages wait, nearest-rank percentiles)
//! are pure and live in [`ramblock_core::migrate::fault_latency`]; this adds only
//! what needs the host: a clock reading and a lock.

use ramblock_core::migrate::fault_latency::FaultWaits;
pub use ramblock_core::migrate::fault_latency::LatencySummary;
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Page faults waiting for their page, and the waits of those served.
///
/// `Sync`: the fault thread and the receiver use it at once. Every call
/// holds one lock for a map operation (or a short loop), so it is cheap
/// next to the ioctls around it; [`FaultLatency::summary`] copies the
/// recorded waits out before sorting them. See [`FaultWaits`] for what
/// each call means.
pub struct FaultLatency {
    /// Nanoseconds since a fixed origin, never going backwards.
    clock: Box<dyn Fn() -> u64 + Send + Sync>,
    waits: Mutex<FaultWaits>,
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
            waits: Mutex::new(FaultWaits::new()),
        }
    }

    fn waits(&self) -> MutexGuard<'_, FaultWaits> {
        // Each update is one map or vector operation; a panic elsewhere
        // cannot leave the state half-changed.
        self.waits
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records a fault on page `key` ([`FaultWaits::fault`]): whether it
    /// is new, so one request is sent for each `true`.
    pub fn fault(&self, key: u64) -> bool {
        let now = (self.clock)();
        self.waits().fault(key, now)
    }

    /// Ends the wait on page `key` ([`FaultWaits::placed`]) and returns it,
    /// or `None` if the page was not waiting.
    pub fn placed(&self, key: u64) -> Option<Duration> {
        let now = (self.clock)();
        self.waits().placed(key, now).map(Duration::from_nanos)
    }

    /// [`FaultLatency::placed`] for the `pages` consecutive keys from
    /// `first_key`, under one lock; returns how many were waiting.
    pub fn placed_run(&self, first_key: u64, pages: u64) -> u64 {
        let now = (self.clock)();
        self.waits().placed_run(first_key, pages, now)
    }

    /// The pages still waiting, in key order: what to request again after
    /// the connection to the source is re-established.
    pub fn pending_keys(&self) -> Vec<u64> {
        self.waits().pending_keys().collect()
    }

    /// The recorded waits: count, exact nearest-rank percentiles, maximum
    /// and sum.
    pub fn summary(&self) -> LatencySummary {
        self.waits().summary()
    }
}

impl Default for FaultLatency {
    fn default() -> FaultLatency {
        FaultLatency::new()
    }
}

impl fmt::Debug for FaultLatency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waits = self.waits();
        f.debug_struct("FaultLatency")
            .field("pending", &waits.pending_len())
            .field("recorded", &waits.recorded())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    /// The clock is read at each call: the wait runs from the first
    /// fault's reading to the placement's.
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
        now.store(3_070, Ordering::SeqCst);
        assert_eq!(latency.placed_run(5, 2), 2, "pages 5 and 6");
        assert_eq!(latency.summary().total_wait_ns, 2_000 + 70 + 1_670);
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
