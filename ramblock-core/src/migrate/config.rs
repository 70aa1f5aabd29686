//! How a migration runs: the one configuration both phases read.

/// How the migration runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PrecopyConfig {
    /// Longest acceptable pause of the guest, in nanoseconds. Zero means
    /// never switch over on the estimate, only after `max_passes` (a fixed
    /// number of passes, whatever the guest does).
    pub downtime_limit_ns: u64,
    /// Switch over after this many passes even if the estimate is too long.
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
