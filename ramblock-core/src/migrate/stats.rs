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
    /// Estimated time to send `remaining`, in nanoseconds.
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
