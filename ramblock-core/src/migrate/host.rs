//! What the sending engine needs from its surroundings: a clock, the
//! guest's vCPUs, and (for post-copy) the return path.

use super::stats::PassReport;
use crate::checksum::{Checksum, PageLedger};
use crate::region::HostRegion;
use crate::section::SectionHeader;
use crate::stream::format::{ReturnMessage, DEFAULT_DEVICE_STATE_LIMIT};
use crate::stream::resume_token::ResumeToken;
use core::ops::Range;

/// What the engine needs from its surroundings.
pub trait MigrationHost {
    /// A monotonic clock in nanoseconds.
    fn now_ns(&mut self) -> u64;
    /// Sleeps (bandwidth cap).
    fn sleep_ns(&mut self, ns: u64);
    /// Stops the guest's vCPUs and waits until they are stopped.
    fn pause_guest(&mut self);
    /// Lets the vCPUs run again (only after a failed switch-over).
    fn resume_guest(&mut self);
    /// Makes the vCPUs sleep `percent` of the time (auto-converge).
    fn set_throttle(&mut self, percent: u8);
    /// Called after each pass.
    fn pass_done(&mut self, report: &PassReport) {
        let _ = report;
    }
    /// Called inside a pass every 16 MiB of dirty pages sent, with the
    /// pass's counters so far (`duration_ns` and `bandwidth` up to now), so
    /// a long pass (a 4 GiB pass over 1 Gbit/s takes 35 s) can show
    /// progress. Keep it cheap: it runs on the sending thread.
    fn pass_progress(&mut self, so_far: &PassReport) {
        let _ = so_far;
    }
    /// Bytes written to the output that have not reached the destination
    /// yet: what sits in this side's socket send queue (and any buffer in
    /// front of it). A switch-over waits for them before its own pages
    /// arrive, so the estimate of the pause counts them. The default, 0,
    /// suits outputs that hold nothing back.
    fn unsent_bytes(&mut self) -> u64 {
        0
    }
    /// A ledger to record every page sent in, so the end record's checksums
    /// come from it instead of a pass over memory while the guest is
    /// paused. Without one (the default), [`checksum`](Self::checksum) reads
    /// the blocks at switch-over.
    fn ledger(&mut self) -> Option<&mut dyn PageLedger> {
        None
    }
    /// The checksum of a block's contents at switch-over when there is no
    /// ledger; override to compute it in parallel.
    fn checksum(&mut self, region: &HostRegion<'_>, len: u64) -> u64 {
        Checksum::of_region(region, len).unwrap_or(0)
    }
    /// The VMM's device-state section number `index` (0, 1, 2, ... until
    /// `None`), as a header and its bytes; the engine sends it with the
    /// header's `len` set to the bytes' length: at a pre-copy switch-over
    /// as `Section` records after the final RAM pass and before `End`, at
    /// a switch to post-copy inside the `Postcopy` record. Called with the
    /// guest paused, twice per section (once to check the total against
    /// [`device_state_limit`](Self::device_state_limit), once to send),
    /// and again to name a section the destination refused, so return the
    /// same thing each time. The default has none.
    fn device_section(&mut self, index: usize) -> Option<(SectionHeader, &[u8])> {
        let _ = index;
        None
    }
    /// The most bytes all device-state sections may take together,
    /// headers included; over it the switch-over fails before anything is
    /// sent and the guest resumes (`MigrateError::DeviceStateTooLarge`).
    fn device_state_limit(&mut self) -> u64 {
        DEFAULT_DEVICE_STATE_LIMIT
    }
    /// Pre-copy handover: called once the destination acknowledged the
    /// `End` record, just before the engine waits on the acknowledgement
    /// reader for its word that the guest runs there. Returns the longest
    /// wait in nanoseconds, which the host must enforce on that reader (a
    /// socket read timeout, say): the engine makes no system call and
    /// cannot interrupt a read. A read that fails, timed out or not, fails
    /// the migration and the guest resumes here. Also called before the
    /// engine reads the answer of a destination that broke off the stream
    /// at the switch-over (a refused section), which may never come. The
    /// default is [`DEFAULT_HANDOVER_WAIT_NS`].
    fn handover_wait_ns(&mut self) -> u64 {
        DEFAULT_HANDOVER_WAIT_NS
    }
    /// Post-copy: the next message from the destination's return path,
    /// waiting at most `wait_ns` for one (0: just look). Hosts that never
    /// run post-copy keep the default, which says the path is closed.
    fn return_message(&mut self, wait_ns: u64) -> ReturnEvent {
        let _ = wait_ns;
        ReturnEvent::Closed
    }
    /// Post-copy: the connection broke; connect again (the engine then
    /// sends the resume header on the same output). `false` gives up.
    fn reconnect(&mut self) -> bool {
        false
    }
    /// Post-copy, after a reconnect: reads the destination's received map
    /// (`crate::stream::received_map`) from the new return path and calls
    /// `missing(block, pages)` for every run of pages it lacks. `false` if
    /// the map could not be read (the engine reconnects again). Call
    /// `missing` while holding no lock of the list: it takes one.
    fn received_map(&mut self, missing: &mut dyn FnMut(&str, Range<u64>)) -> bool {
        let _ = missing;
        false
    }
    /// Post-copy started: the guest now runs on the destination.
    fn postcopy_started(&mut self) {}
    /// Post-copy: the token the destination issued on the return path
    /// when the guest started there ([`ResumeToken`]), which every resume
    /// header carries. `None` (the default) sends an all-zero token, which
    /// a destination that issued one refuses.
    fn resume_token(&mut self) -> Option<ResumeToken> {
        None
    }
}

/// How long a source waits by default for the destination to say its
/// guest runs, after the RAM was verified: loading device state and
/// starting vCPUs takes milliseconds, so 10 s is only ever a dead peer.
pub const DEFAULT_HANDOVER_WAIT_NS: u64 = 10_000_000_000;

/// What [`MigrationHost::return_message`] found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReturnEvent {
    /// No message yet.
    Nothing,
    /// A message.
    Message(ReturnMessage),
    /// The return path is closed or failed (the connection broke).
    Closed,
}
