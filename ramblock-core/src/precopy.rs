//! The pre-copy migration engine (the sending side).
//!
//! Pass 0 sends every page. Each later pass harvests the dirty log, then
//! sends what is dirty, clearing each clear-map chunk in the hypervisor just
//! before its first page goes out. After each pass the engine estimates the
//! dirty rate and the bandwidth; when the pages left could be sent within
//! the downtime limit (or the pass limit is reached) it pauses the guest,
//! runs a final sync and send, writes the end record with a checksum of
//! every block, and waits for the receiver's acknowledgement.
//!
//! Blocks added or removed during the migration fail it cleanly; a resize of
//! a resizable block is carried to the destination. On any failure the guest
//! is resumed and unthrottled: a failed migration never harms the source.
//! Switching the dirty log off afterwards is the caller's job, as switching
//! it on was.

use crate::addr::{TARGET_PAGE_SHIFT, TARGET_PAGE_SIZE};
use crate::bitmap::Storage;
use crate::block::RamBlock;
use crate::checksum::{Checksum, PageLedger};
use crate::dirty_log::DirtyLogSource;
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::list::RamList;
use crate::name::BlockName;
use crate::postcopy::PostcopyStats;
use crate::region::{HostRegion, OutOfRegion};
use crate::stream::format::{
    read_array, Header, PageRequest, Record, ReturnMessage, TableEntry, ACK_ERR, ACK_OK,
    MAX_RUN_PAGES,
};
use crate::stream::io::{ByteRead, ByteWrite, ReadError};
use core::fmt;
use core::ops::Range;

pub(crate) const PAGE: usize = TARGET_PAGE_SIZE as usize;
/// Pages sent under one shared lock of the list, so writers are not held
/// back for a whole pass.
const PAGES_PER_LOCK: usize = 4096;

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
    /// pass sends ([`next_throttle`] says how much).
    pub auto_converge: bool,
    /// Switch to post-copy after this many pre-copy passes (or at the pass
    /// limit) instead of stopping the guest until everything is sent; a
    /// pre-copy that converges first still ends the usual way. `Some(0)`
    /// starts post-copy at once. See [`crate::postcopy`].
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
    /// Guest paused until the destination acknowledged, ns.
    pub downtime_ns: u64,
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
    /// Post-copy: writes the VMM's device state (vCPU registers and the
    /// like, opaque to ramblock) into `buf` and returns its length (at most
    /// `buf.len()` and [`MAX_DEVICE_STATE`](crate::stream::format::MAX_DEVICE_STATE)).
    /// Called with the guest paused.
    fn device_state(&mut self, buf: &mut [u8]) -> usize {
        let _ = buf;
        0
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
}

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

/// Why a migration failed. The source guest is running again.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrateError<D, W, R> {
    /// The buffer passed in holds less than one page.
    BufferTooSmall,
    /// The hypervisor's dirty log failed.
    DirtyLog(D),
    /// Writing the stream failed (connection closed?).
    Write(W),
    /// Reading the receiver's acknowledgement failed.
    Ack(ReadError<R>),
    /// The receiver refused the stream with this error code
    /// (`ReceiveError::code`).
    Refused(u32),
    /// The receiver answered something that is not an acknowledgement.
    BadAck,
    /// A block was removed during the migration.
    BlockRemoved(BlockName),
    /// A migratable block was added during the migration.
    BlockAdded(BlockName),
    /// Post-copy: the destination asked for pages that do not exist.
    BadRequest(PageRequest),
    /// Post-copy: the connection broke and could not be resumed. The
    /// guest's memory is split between the two sides: the source keeps its
    /// paused guest and every page, so a new attempt can still finish.
    PostcopyLost,
    /// A dirty run reached outside its block's memory: the dirty bitmap
    /// and the block's length disagree (a bug, refused rather than read).
    RunOutsideBlock(OutOfRegion),
}

impl<D: fmt::Display, W: fmt::Display, R: fmt::Display> fmt::Display for MigrateError<D, W, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::BufferTooSmall => {
                f.write_str("the send buffer must hold at least one 4 KiB page")
            }
            MigrateError::DirtyLog(e) => write!(f, "dirty log failed: {e}"),
            MigrateError::Write(e) => write!(f, "sending failed: {e}"),
            MigrateError::Ack(e) => write!(f, "no acknowledgement from the destination: {e}"),
            MigrateError::Refused(code) => {
                write!(f, "the destination refused the stream (error code {code})")
            }
            MigrateError::BadAck => f.write_str(
                "the destination answered with something that is not an acknowledgement",
            ),
            MigrateError::BlockRemoved(n) => {
                write!(f, "block {n:?} was removed during the migration")
            }
            MigrateError::BlockAdded(n) => write!(f, "block {n:?} was added during the migration"),
            MigrateError::BadRequest(r) => write!(
                f,
                "the destination asked for pages {}..+{} of block index {}, which do not exist",
                r.first, r.count, r.block
            ),
            MigrateError::PostcopyLost => f.write_str(
                "the post-copy connection broke and could not be resumed; the source keeps \
                 the paused guest and all its pages",
            ),
            MigrateError::RunOutsideBlock(e) => {
                write!(f, "a dirty run reached outside its block: {e}")
            }
        }
    }
}

impl<D: fmt::Debug + fmt::Display, W: fmt::Debug + fmt::Display, R: fmt::Debug + fmt::Display>
    core::error::Error for MigrateError<D, W, R>
{
}

pub(crate) type Error<D, W, R> =
    MigrateError<<D as DirtyLogSource>::Error, <W as ByteWrite>::Error, <R as ByteRead>::Error>;

/// A block being migrated: its name and the used length last sent.
pub(crate) struct Slot {
    pub(crate) name: BlockName,
    pub(crate) used_length: u64,
}

/// The migration in progress.
pub(crate) struct Engine<'a, 'l, M, S: Storage, const N: usize, D, W, H> {
    pub(crate) list: &'a RamList<'l, M, S, N>,
    pub(crate) source: &'a mut D,
    pub(crate) out: &'a mut W,
    pub(crate) host: &'a mut H,
    pub(crate) cfg: PrecopyConfig,
    pub(crate) buf: &'a mut [u8],
    pub(crate) table: heapless::Vec<Slot, N>,
    pub(crate) version: u64,
    /// Counters of the pass in progress.
    pub(crate) pass: PassReport,
    pub(crate) pass_start: u64,
    pub(crate) throttle: u8,
}

/// Migrates every migratable block of `list` to the receiver at the other
/// end of `out`, reading its acknowledgement from `ack`. `buf` (one page at
/// least) bounds the records: a run has at most as many pages as it holds,
/// up to 64; pages themselves go out in place. In post-copy it holds the
/// device state. Dirty logging must be on before the call.
#[allow(clippy::too_many_arguments)]
pub fn migrate<M, S, const N: usize, D, W, R, H>(
    list: &RamList<'_, M, S, N>,
    source: &mut D,
    out: &mut W,
    ack: &mut R,
    host: &mut H,
    cfg: PrecopyConfig,
    buf: &mut [u8],
) -> Result<MigrationStats, Error<D, W, R>>
where
    M: HostMemory,
    S: Storage,
    D: DirtyLogSource,
    W: ByteWrite,
    R: ByteRead,
    H: MigrationHost,
{
    if buf.len() < PAGE {
        return Err(MigrateError::BufferTooSmall);
    }
    let mut engine = Engine {
        list,
        source,
        out,
        host,
        cfg,
        buf,
        table: heapless::Vec::new(),
        version: 0,
        pass: PassReport::default(),
        pass_start: 0,
        throttle: 0,
    };
    let mut paused = false;
    let result = engine.run(ack, &mut paused);
    if result.is_err() {
        // Never harm the source: let the guest run at full speed again.
        engine.host.set_throttle(0);
        if paused {
            engine.host.resume_guest();
        }
    }
    result
}

impl<
        M: HostMemory,
        S: Storage,
        const N: usize,
        D: DirtyLogSource,
        W: ByteWrite,
        H: MigrationHost,
    > Engine<'_, '_, M, S, N, D, W, H>
{
    fn run<R: ByteRead>(
        &mut self,
        ack: &mut R,
        paused: &mut bool,
    ) -> Result<MigrationStats, Error<D, W, R>> {
        let mut stats = MigrationStats::default();
        let start = self.host.now_ns();
        self.setup()?;
        stats.setup_ns = self.host.now_ns() - start;
        let mut dirty_found: u64 = self
            .table
            .iter()
            .map(|s| s.used_length >> TARGET_PAGE_SHIFT)
            .sum();
        let mut postcopy = self.cfg.postcopy_after == Some(0);
        while !postcopy {
            self.begin_pass(stats.passes, dirty_found);
            if stats.passes == 0 {
                self.send_untouched()?;
            }
            self.send_dirty()?;
            let newly = self.sync()?;
            let remaining = self.remaining();
            self.write(Record::Sync {
                pass: stats.passes,
                remaining,
            })?;
            let report = self.end_pass(newly, remaining);
            stats.add(&report);
            stats.dirty_rate = report.dirty_rate;
            dirty_found = remaining;
            let fits =
                self.cfg.downtime_limit_ns > 0 && report.estimated_ns <= self.cfg.downtime_limit_ns;
            if fits {
                break;
            }
            let limit = stats.passes >= self.cfg.max_passes;
            if let Some(after) = self.cfg.postcopy_after {
                postcopy = limit || stats.passes >= after;
            } else if limit {
                break;
            }
            self.converge(&report);
        }
        if postcopy {
            self.postcopy(&mut stats, paused)?;
            stats.total_ns = self.host.now_ns() - start;
            self.host.set_throttle(0);
            return Ok(stats);
        }

        // Switch-over.
        let pause_start = self.host.now_ns();
        self.host.pause_guest();
        *paused = true;
        self.sync()?;
        self.begin_pass(stats.passes, self.remaining());
        self.send_dirty()?;
        self.write(Record::Sync {
            pass: stats.passes,
            remaining: 0,
        })?;
        self.write_end()?;
        self.out.flush().map_err(MigrateError::Write)?;
        let report = self.end_pass(0, 0);
        stats.final_pages = report.pages_sent + report.zero_pages;
        stats.add(&report);
        let answer: [u8; 8] = read_array(ack).map_err(MigrateError::Ack)?;
        let now = self.host.now_ns();
        match (
            &answer[..4],
            u32::from_le_bytes([answer[4], answer[5], answer[6], answer[7]]),
        ) {
            (a, _) if a == ACK_OK => {}
            (a, code) if a == ACK_ERR => return Err(MigrateError::Refused(code)),
            _ => return Err(MigrateError::BadAck),
        }
        stats.downtime_ns = now - pause_start;
        stats.total_ns = now - start;
        self.host.set_throttle(0);
        Ok(stats)
    }

    pub(crate) fn write<E>(
        &mut self,
        record: Record,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        record.write(self.out).map_err(MigrateError::Write)?;
        self.pass.bytes += record_len(&record);
        Ok(())
    }

    /// Builds the table, marks every used page dirty, resets the log, and
    /// sends the header and table.
    fn setup<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        {
            let view = self.list.read();
            self.version = self.list.version();
            for block in view
                .iter()
                .filter(|b| b.flags().contains(BlockFlags::MIGRATABLE))
            {
                let mut st = block.migration();
                let len = st.bitmap.len();
                let _ = st.bitmap.clear_range(0, len);
                let _ = st.bitmap.set_range(0, block.used_pages());
                drop(st);
                block
                    .sync_dirty_log(self.source)
                    .map_err(MigrateError::DirtyLog)?;
                // Room for every block: the table has the list's capacity.
                let _ = self.table.push(Slot {
                    name: block.name.clone(),
                    used_length: block.used_length().0,
                });
            }
        }
        Header::new(self.table.len() as u32)
            .write(self.out)
            .map_err(MigrateError::Write)?;
        self.write_table()
    }

    /// Writes the block table (after a new or a resumed stream's header).
    pub(crate) fn write_table<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let view = self.list.read();
        for slot in &self.table {
            let Some(block) = view.by_name(slot.name.as_str()) else {
                return Err(MigrateError::BlockRemoved(slot.name.clone()));
            };
            let entry = TableEntry {
                used_length: slot.used_length,
                page_size: block.page_size().bytes(),
                flags: block.flags().bits(),
            };
            entry
                .write(slot.name.as_str(), self.out)
                .map_err(MigrateError::Write)?;
        }
        if let Some(ledger) = self.host.ledger() {
            for (index, slot) in self.table.iter().enumerate() {
                ledger.reserve(index, slot.used_length >> TARGET_PAGE_SHIFT);
            }
        }
        Ok(())
    }

    pub(crate) fn begin_pass(&mut self, pass: u32, dirty_found: u64) {
        self.pass = PassReport {
            pass,
            dirty_found,
            throttle: self.throttle,
            ..PassReport::default()
        };
        self.pass_start = self.host.now_ns();
    }

    pub(crate) fn end_pass(&mut self, newly: u64, remaining: u64) -> PassReport {
        let mut r = self.pass;
        r.duration_ns = (self.host.now_ns() - self.pass_start).max(1);
        let secs = r.duration_ns as f64 / 1e9;
        r.bandwidth = r.bytes as f64 / secs;
        r.dirty_rate = newly as f64 / secs;
        r.remaining = remaining;
        r.estimated_ns = if remaining == 0 {
            0
        } else if r.bandwidth > 0.0 {
            (remaining as f64 * PAGE as f64 / r.bandwidth * 1e9) as u64
        } else {
            u64::MAX
        };
        self.host.pass_done(&r);
        r
    }

    /// Auto-converge: when the guest dirtied more than half of what the pass
    /// sent, slow its vCPUs ([`next_throttle`]).
    fn converge(&mut self, r: &PassReport) {
        if !self.cfg.auto_converge {
            return;
        }
        let dirtied_bytes = r.dirty_rate * (r.duration_ns as f64 / 1e9) * PAGE as f64;
        if let Some(throttle) = next_throttle(self.throttle, r.bytes as f64, dirtied_bytes) {
            self.throttle = throttle;
            self.host.set_throttle(throttle);
        }
    }

    /// Harvests every block's dirty log; returns the newly dirty count.
    pub(crate) fn sync<E>(&mut self) -> Result<u64, MigrateError<D::Error, W::Error, E>> {
        self.reconcile()?;
        let view = self.list.read();
        let mut newly = 0;
        for slot in &self.table {
            if let Some(block) = view.by_name(slot.name.as_str()) {
                newly += block
                    .sync_dirty_log(self.source)
                    .map_err(MigrateError::DirtyLog)?;
            }
        }
        Ok(newly)
    }

    pub(crate) fn remaining(&self) -> u64 {
        let view = self.list.read();
        self.table
            .iter()
            .filter_map(|s| view.by_name(s.name.as_str()))
            .map(|b| b.migration().bitmap.dirty_count())
            .sum()
    }

    /// Notices layout changes through the version counter: a resize is sent
    /// on, anything else fails the migration.
    fn reconcile<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        if self.list.version() == self.version {
            return Ok(());
        }
        let mut resized: heapless::Vec<(u32, u64), N> = heapless::Vec::new();
        {
            let view = self.list.read();
            self.version = self.list.version();
            for (i, slot) in self.table.iter_mut().enumerate() {
                let Some(block) = view.by_name(slot.name.as_str()) else {
                    return Err(MigrateError::BlockRemoved(slot.name.clone()));
                };
                if block.used_length().0 != slot.used_length {
                    slot.used_length = block.used_length().0;
                    block.migration().forget_past(block.used_pages());
                    if let Some(ledger) = self.host.ledger() {
                        ledger.truncate(i, block.used_pages() as u64);
                    }
                    let _ = resized.push((i as u32, slot.used_length));
                }
            }
            if let Some(added) = view.iter().find(|b| {
                b.flags().contains(BlockFlags::MIGRATABLE)
                    && !self.table.iter().any(|s| s.name.as_str() == b.name())
            }) {
                return Err(MigrateError::BlockAdded(added.name.clone()));
            }
        }
        for (block, used_length) in resized {
            self.write(Record::Resize { block, used_length })?;
        }
        Ok(())
    }

    /// Pass 0: sends the pages the host memory says were never written as
    /// zero runs without reading them (a fresh guest's RAM is mostly such
    /// pages). Each clear-map chunk is cleared in the hypervisor first, so
    /// a write after the host's look is logged, and one before it shows.
    fn send_untouched<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        for index in 0..self.table.len() {
            let view = self.list.read();
            let Some(block) = view.by_name(self.table[index].name.as_str()) else {
                continue;
            };
            let info = block.info();
            let used = block.used_pages();
            let mut state = block.migration();
            let chunk_pages = 1usize << state.clear_map.shift().min(40);
            let (out, host, pass, source) = (
                &mut *self.out,
                &mut *self.host,
                &mut self.pass,
                &mut *self.source,
            );
            let mut chunk = 0;
            while chunk < used {
                let end = chunk.saturating_add(chunk_pages).min(used);
                if let Ok(Some(c)) = state.clear_map.test_and_clear_chunk_of(chunk) {
                    let c_end = c.end.min(used);
                    if c.start < c_end {
                        source
                            .clear(&info, c.start, c_end - c.start)
                            .map_err(MigrateError::DirtyLog)?;
                    }
                }
                let mut failed = None;
                block.memory().untouched_runs(
                    chunk as u64,
                    (end - chunk) as u64,
                    &mut |first, count| {
                        let mut p = first;
                        while p < first + count && failed.is_none() {
                            let n = (first + count - p).min(u64::from(MAX_RUN_PAGES));
                            // Only pages still to send (all of them in pass 0).
                            if state.bitmap.clear_range(p as usize, n as usize) != Ok(n) {
                                let _ = state.bitmap.set_range(p as usize, n as usize);
                                p += n;
                                continue;
                            }
                            let record = Record::Zero {
                                block: index as u32,
                                first: p,
                                count: n as u32,
                            };
                            if let Err(e) = record.write(out) {
                                failed = Some(e);
                                return;
                            }
                            pass.bytes += record_len(&record);
                            pass.zero_pages += n;
                            if let Some(ledger) = host.ledger() {
                                ledger.record_zero(index, p, n);
                            }
                            p += n;
                        }
                    },
                );
                if let Some(e) = failed {
                    return Err(MigrateError::Write(e));
                }
                chunk = end;
            }
        }
        Ok(())
    }

    /// Sends every dirty page of every block.
    fn send_dirty<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        self.send_dirty_from(|_| 0)
    }

    /// Sends every dirty page of every block from page `first_page(block)`
    /// on.
    pub(crate) fn send_dirty_from<E>(
        &mut self,
        first_page: impl Fn(&RamBlock<M, S>) -> usize,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let max_run = (self.buf.len() / PAGE).min(MAX_RUN_PAGES as usize);
        for index in 0..self.table.len() {
            let mut next = None;
            loop {
                self.reconcile()?;
                let view = self.list.read();
                let Some(block) = view.by_name(self.table[index].name.as_str()) else {
                    return Err(MigrateError::BlockRemoved(self.table[index].name.clone()));
                };
                let mut from = next.unwrap_or_else(|| first_page(block));
                let info = block.info();
                let region = block.region();
                let mut state = block.migration();
                let mut sent = 0;
                while sent < PAGES_PER_LOCK {
                    let run = state
                        .next_dirty_run(from, max_run, &info, self.source)
                        .map_err(MigrateError::DirtyLog)?;
                    let Some(run) = run else { break };
                    self.send_run(index as u32, &region, run.start, run.end - run.start)?;
                    sent += run.end - run.start;
                    from = run.end;
                }
                if sent < PAGES_PER_LOCK {
                    break; // the block has no dirty page left
                }
                next = Some(from);
            }
        }
        Ok(())
    }

    /// Sends `count` pages from `first`, zero pages as counts. The pages
    /// are read in place: checked for zeros, hashed for the ledger and
    /// handed to the writer without a copy. A page the guest changes
    /// meanwhile may go out torn, but it is dirty again (its clear-map chunk
    /// was cleared before this), so a later pass, at the latest the one
    /// with the guest paused, sends it again and records its final digest.
    pub(crate) fn send_run<E>(
        &mut self,
        block: u32,
        region: &HostRegion<'_>,
        first: usize,
        count: usize,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        // In range: next_dirty_run keeps runs inside the used length, which
        // the region covers; a run that is not is a bug, refused below.
        let run = region
            .subregion((first * PAGE) as u64, count * PAGE)
            .map_err(MigrateError::RunOutsideBlock)?;
        let is_zero = |i: usize| run.is_zero((i * PAGE) as u64, PAGE) == Ok(true);
        let mut i = 0;
        while i < count {
            let zero = is_zero(i);
            let mut j = i + 1;
            while j < count && is_zero(j) == zero {
                j += 1;
            }
            let (first, n) = ((first + i) as u64, (j - i) as u32);
            // In range: i < j <= count.
            let pages = run
                .subregion((i * PAGE) as u64, (j - i) * PAGE)
                .map_err(MigrateError::RunOutsideBlock)?;
            if let Some(ledger) = self.host.ledger() {
                if zero {
                    ledger.record_zero(block as usize, first, u64::from(n));
                } else {
                    ledger.record_region(block as usize, first, &pages);
                }
            }
            if zero {
                self.write(Record::Zero {
                    block,
                    first,
                    count: n,
                })?;
                self.pass.zero_pages += u64::from(n);
            } else {
                self.write(Record::Pages {
                    block,
                    first,
                    count: n,
                })?;
                self.out.write_region(&pages).map_err(MigrateError::Write)?;
                self.pass.bytes += (j - i) as u64 * PAGE as u64;
                self.pass.pages_sent += u64::from(n);
            }
            i = j;
        }
        self.throttle_bandwidth();
        Ok(())
    }

    /// Sleeps as needed to keep the pass under the bandwidth cap.
    fn throttle_bandwidth(&mut self) {
        if let Some(limit) = self.cfg.bandwidth_limit.filter(|&l| l > 0) {
            let due = (self.pass.bytes as u128 * 1_000_000_000 / u128::from(limit)) as u64;
            let elapsed = self.host.now_ns() - self.pass_start;
            if due > elapsed {
                self.host.sleep_ns(due - elapsed);
            }
        }
    }

    /// The end record: one checksum per block, in table order.
    pub(crate) fn write_end<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        self.write(Record::End {
            count: self.table.len() as u32,
        })?;
        let view = self.list.read();
        for (index, slot) in self.table.iter().enumerate() {
            let Some(block) = view.by_name(slot.name.as_str()) else {
                return Err(MigrateError::BlockRemoved(slot.name.clone()));
            };
            let pages = block.used_pages() as u64;
            let sum = match self.host.ledger() {
                Some(ledger) => ledger.checksum(index, pages),
                None => self.host.checksum(&block.region(), block.used_length().0),
            };
            self.out
                .write_all(&sum.to_le_bytes())
                .map_err(MigrateError::Write)?;
            self.pass.bytes += 8;
        }
        Ok(())
    }
}

impl MigrationStats {
    pub(crate) fn add(&mut self, r: &PassReport) {
        self.passes += 1;
        self.bytes += r.bytes;
        self.pages += r.pages_sent;
        self.zero_pages += r.zero_pages;
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

/// Bytes of a record's header on the wire.
pub(crate) fn record_len(r: &Record) -> u64 {
    match r {
        Record::Pages { .. } | Record::Zero { .. } => 17,
        Record::Sync { .. } | Record::Resize { .. } => 13,
        Record::End { .. } | Record::Postcopy { .. } => 5,
        Record::Discard { .. } => 17,
    }
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
