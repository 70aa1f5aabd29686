//! The convergence policy: how hard auto-converge throttles a guest that
//! dirties memory faster than a pass sends it.

use super::engine::{Engine, PAGE};
use super::host::MigrationHost;
use super::stats::PassReport;
use crate::bitmap::Storage;
use crate::dirty_log::DirtyLogSource;
use crate::host::HostMemory;
use crate::stream::io::ByteWrite;

impl<
        M: HostMemory,
        S: Storage,
        const N: usize,
        D: DirtyLogSource,
        W: ByteWrite,
        H: MigrationHost,
    > Engine<'_, '_, M, S, N, D, W, H>
{
    /// Auto-converge: when the guest dirtied more than half of what the pass
    /// sent, slow its vCPUs ([`next_throttle`]).
    pub(super) fn converge(&mut self, r: &PassReport) {
        if !self.cfg.auto_converge {
            return;
        }
        let dirtied_bytes = r.dirty_rate * (r.duration_ns as f64 / 1e9) * PAGE as f64;
        if let Some(throttle) = next_throttle(self.throttle, r.bytes as f64, dirtied_bytes) {
            self.throttle = throttle;
            self.host.set_throttle(throttle);
        }
    }
}

/// Auto-converge's throttle (percent of the time the vCPUs sleep) after a
/// pass that sent `sent` bytes while the guest, throttled at `current`,
/// dirtied `dirtied` bytes; `None` while it dirties at most half of what is
/// sent (QEMU's trigger).
///
/// Otherwise the vCPUs' running share is scaled by `sent / 4 ÷ dirtied`, so
/// that at the rate just measured the guest would dirty a quarter of what a
/// pass sends and each pass leaves at most a quarter of the last: a guest
/// dirtying as fast as the link sends is throttled 75% at once, for the one
/// or two short passes left, instead of climbing QEMU's fixed steps pass by
/// pass while it re-dirties everything. The steps stay a floor (20% the
/// first time, then 10 points more each time), and 99% the ceiling.
pub fn next_throttle(current: u8, sent: f64, dirtied: f64) -> Option<u8> {
    if dirtied <= sent / 2.0 {
        return None;
    }
    let floor = if current == 0 {
        20
    } else {
        current.saturating_add(10)
    };
    let running = f64::from(100 - current.min(99));
    // dirtied > 0 here, so the division is finite.
    let wanted = (100.0 - running * (sent / 4.0) / dirtied).clamp(0.0, 99.0);
    // Rounded up (`f64::ceil` is not in `core`); the cast truncates.
    let mut proportional = wanted as u8;
    if f64::from(proportional) < wanted {
        proportional += 1;
    }
    Some(floor.max(proportional).min(99))
}

#[cfg(test)]
mod tests {
    use super::next_throttle;

    #[test]
    fn the_throttle_scales_the_running_share_to_a_quarter_of_what_is_sent() {
        const MIB: f64 = 1048576.0;
        // At most half dirtied: no throttle, whatever the current one.
        assert_eq!(next_throttle(0, 100.0 * MIB, 50.0 * MIB), None);
        assert_eq!(next_throttle(40, 100.0 * MIB, 10.0 * MIB), None);
        // A guest dirtying as fast as the link sends: a quarter of its
        // running time.
        assert_eq!(next_throttle(0, 100.0 * MIB, 100.0 * MIB), Some(75));
        // 60% dirtied: 100% running * 25/60 = 41.7% running, so 59%.
        assert_eq!(next_throttle(0, 100.0 * MIB, 60.0 * MIB), Some(59));
        // Already at 50% and still dirtying 80%: 50% running * 25/80 =
        // 15.6% running, so 85%.
        assert_eq!(next_throttle(50, 100.0 * MIB, 80.0 * MIB), Some(85));
        // Just over half at 20%: 80% running * 25/51 = 39.2% running, so
        // 61%, above QEMU's step to 30%.
        assert_eq!(next_throttle(20, 100.0 * MIB, 51.0 * MIB), Some(61));
        // High up, the step is the floor: at 85%, 15% running * 25/51 =
        // 7.4% running would be 93%, the step makes it 95%.
        assert_eq!(next_throttle(85, 100.0 * MIB, 51.0 * MIB), Some(95));
        // Barely over half at 90%: the step, capped at 99.
        assert_eq!(next_throttle(90, 100.0 * MIB, 51.0 * MIB), Some(99));
        // Never past 99%, nothing sent included.
        assert_eq!(next_throttle(0, 1.0 * MIB, 1000.0 * MIB), Some(99));
        assert_eq!(next_throttle(95, 100.0 * MIB, 100.0 * MIB), Some(99));
        assert_eq!(next_throttle(99, 0.0, 1.0), Some(99));
        assert_eq!(next_throttle(0, 0.0, 1.0), Some(99));
    }
}
