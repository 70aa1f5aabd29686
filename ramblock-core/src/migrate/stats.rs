//! What a migration reports: per pass, in total, and for post-copy.

/// What happened in one pass.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct PassReport {
    /// Pass number (0 sends everything).
    pub pass: u32,
    /// Pages found dirty at the start of the pass (all pages for pass 0).
    pub dirty_found: u64,
    /// Normal pages sent.
    pub pages_sent: u64,
    /// Zero pages sent (as counts).
    pub zero_pages: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Duration in nanoseconds.
    pub duration_ns: u64,
    /// Pages dirtied per second during the pass.
    pub dirty_rate: f64,
    /// Bytes per second achieved.
    pub bandwidth: f64,
    /// Pages dirty after the pass's sync.
    pub remaining: u64,
    /// Runs of consecutive pages `remaining` forms (each costs a record
    /// and a write of its own).
    pub remaining_runs: u64,
    /// Runs of pages sent (each a record, zero runs included).
    pub runs: u64,
    /// Bytes per second in the pass's slowest window of 16 MiB, which the
    /// estimate uses (0 when the pass sent too little to measure).
    pub slowest_bandwidth: f64,
    /// Bytes written that had not reached the destination when the pass
    /// ended, on the main stream
    /// ([`MigrationHost::unsent_bytes`](super::MigrationHost::unsent_bytes))
    /// and the page channels
    /// ([`PageChannels::unsent_bytes`](super::channels::PageChannels::unsent_bytes)).
    pub unsent_bytes: u64,
    /// Estimated pause if the switch-over came now, in nanoseconds: one
    /// more harvest, then `unsent_bytes`, then `remaining` pages in
    /// `remaining_runs` runs, at the slowest window's cost.
    pub estimated_ns: u64,
    /// vCPU throttle in percent during the pass.
    pub throttle: u8,
}

/// The totals of a finished migration.
#[derive(Copy, Clone, Debug, Default, PartialEq)]
pub struct MigrationStats {
    /// Start to acknowledged end, ns.
    pub total_ns: u64,
    /// Building the bitmaps and sending the table, ns.
    pub setup_ns: u64,
    /// Guest paused until the destination said it runs the guest (the
    /// handover; post-copy: until the `Postcopy` record was sent), ns.
    pub downtime_ns: u64,
    /// Guest paused until the destination acknowledged the RAM (its
    /// checksums), ns: the part of the downtime before device state is
    /// loaded and vCPUs start (post-copy: as `downtime_ns`).
    pub ram_downtime_ns: u64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Normal pages sent.
    pub pages: u64,
    /// Zero pages sent.
    pub zero_pages: u64,
    /// Passes, including the final one.
    pub passes: u32,
    /// Dirty rate of the last live pass, pages per second.
    pub dirty_rate: f64,
    /// Pages sent while the guest was paused (for post-copy: pages sent
    /// after the guest moved to the destination).
    pub final_pages: u64,
    /// What post-copy did, when the migration ended in post-copy.
    pub postcopy: Option<PostcopyStats>,
    /// Where a pre-copy switch-over's pause went (all zero after
    /// post-copy).
    pub pause: PauseReport,
}

/// Where the pause of a pre-copy switch-over went, part by part, next to
/// the estimate it was decided on: when the downtime overshoots, the part
/// that grew says why. The parts follow each other and add up to
/// [`MigrationStats::downtime_ns`].
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PauseReport {
    /// The estimate the switch-over was decided on (the last live pass's
    /// [`PassReport::estimated_ns`]), ns.
    pub estimated_ns: u64,
    /// Bytes written before the pause that had not reached the
    /// destination when it began, on the main stream
    /// ([`MigrationHost::unsent_bytes`]) and the page channels
    /// ([`PageChannels::unsent_bytes`]); the pause waits for them before
    /// its own.
    ///
    /// [`MigrationHost::unsent_bytes`]: super::MigrationHost::unsent_bytes
    /// [`PageChannels::unsent_bytes`]: super::channels::PageChannels::unsent_bytes
    pub backlog_bytes: u64,
    /// Stopping the vCPUs, ns.
    pub stop_ns: u64,
    /// The final harvest of the dirty log, ns.
    pub harvest_ns: u64,
    /// Sending the pages found dirty (through the page channels' barrier),
    /// ns.
    pub send_ns: u64,
    /// Writing the device state and the end record, ns.
    pub device_ns: u64,
    /// Flushing the stream to the destination, ns.
    pub flush_ns: u64,
    /// Waiting for the destination's acknowledgement of the RAM, ns.
    pub ack_ns: u64,
    /// Waiting for the destination's word that its guest runs, ns.
    pub handover_ns: u64,
}

/// What post-copy did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct PostcopyStats {
    /// Pages the destination was told to drop at the switch.
    pub discarded: u64,
    /// Page requests received.
    pub requests: u64,
    /// Requests for pages all sent already (dropped at the cost of a look
    /// at the dirty bitmap).
    pub duplicate_requests: u64,
    /// Pages sent in answer to requests.
    pub requested_pages: u64,
    /// Pages sent in the background.
    pub background_pages: u64,
    /// Times the connection broke and was resumed.
    pub resumes: u32,
}

impl MigrationStats {
    pub(super) fn add(&mut self, r: &PassReport) {
        self.passes += 1;
        self.bytes += r.bytes;
        self.pages += r.pages_sent;
        self.zero_pages += r.zero_pages;
    }
}
