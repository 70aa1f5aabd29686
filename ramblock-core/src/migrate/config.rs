//! How a migration runs: the one configuration both phases read.

/// How the migration runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PrecopyConfig {
    /// Longest acceptable pause of the guest, in nanoseconds: the guest is
    /// paused only when the estimated pause fits (see [`Self::fits`]).
    /// Zero means never switch over on the estimate, only after
    /// `max_passes` (a fixed number of passes, whatever the guest does).
    pub downtime_limit_ns: u64,
    /// Passes before the migration gives up (`DowntimeUnreachable`, the
    /// guest runs on at the source) or, with `postcopy_after`, switches to
    /// post-copy, when no pass's estimate fit the downtime limit. With a
    /// zero downtime limit: switch over after this many passes.
    pub max_passes: u32,
    /// Bytes per second on the wire, if capped.
    pub bandwidth_limit: Option<u64>,
    /// Throttle the guest's vCPUs when it dirties more than half of what a
    /// pass sends ([`next_throttle`](super::next_throttle) says how much).
    pub auto_converge: bool,
    /// Switch to post-copy after this many pre-copy passes (or at the pass
    /// limit) instead of stopping the guest until everything is sent; a
    /// pre-copy that converges first still ends the usual way. `Some(0)`
    /// starts post-copy at once. See [`super::postcopy`].
    pub postcopy_after: Option<u32>,
}

impl PrecopyConfig {
    /// Share of the downtime limit kept for what a pass cannot measure
    /// before the switch-over: stopping the vCPUs, the end record, and the
    /// destination's last writes and acknowledgement.
    pub const SWITCH_OVER_RESERVE_PERCENT: u64 = 10;

    /// Whether a pause estimated at `estimated_ns` (a pass report's
    /// `estimated_ns`: harvest plus sending) keeps the downtime limit,
    /// with [`Self::SWITCH_OVER_RESERVE_PERCENT`] of it to spare.
    pub fn fits(&self, estimated_ns: u64) -> bool {
        let budget = self.downtime_limit_ns / 100 * (100 - Self::SWITCH_OVER_RESERVE_PERCENT);
        self.downtime_limit_ns > 0 && estimated_ns <= budget
    }
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            downtime_limit_ns: 300_000_000,
            max_passes: 30,
            bandwidth_limit: None,
            auto_converge: false,
            postcopy_after: None,
        }
    }
}
