//! The state of a migration in progress and the sending steps both phases
//! share: writing records and the block table, pass accounting, harvesting
//! the dirty log, noticing layout changes, and sending dirty runs.

use super::channels::{
    write_run, ChannelFailure, ChannelFailureKind, PageChannels, RunCounts, RunError,
    MAIN_STREAM_RUN_INTERVAL_NS,
};
use super::config::PrecopyConfig;
use super::error::MigrateError;
use super::host::MigrationHost;
use super::stats::PassReport;
use crate::addr::{ByteLen, TARGET_PAGE_SHIFT, TARGET_PAGE_SIZE};
use crate::bitmap::Storage;
use crate::block::RamBlock;
use crate::dirty_log::DirtyLogSource;
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::list::RamList;
use crate::name::BlockName;
use crate::region::HostRegion;
use crate::section::{SectionHeader, MAX_SECTION_LEN};
use crate::stream::format::{Record, TableEntry, MAX_RUN_PAGES};
use crate::stream::io::ByteWrite;

/// Bytes per target page, as a `usize` for slicing and run lengths.
pub(super) const PAGE: usize = TARGET_PAGE_SIZE as usize;
/// Pages sent under one shared lock of the list, so writers are not held
/// back for a whole pass.
const PAGES_PER_LOCK: usize = 4096;

/// A block being migrated: its name and the used length last sent.
pub(super) struct Slot {
    pub(super) name: BlockName,
    pub(super) used_length: u64,
}

/// The migration in progress.
pub(super) struct Engine<'a, 'l, M, S: Storage, const N: usize, D, W, H> {
    pub(super) list: &'a RamList<'l, M, S, N>,
    pub(super) source: &'a mut D,
    pub(super) out: &'a mut W,
    pub(super) host: &'a mut H,
    pub(super) cfg: PrecopyConfig,
    pub(super) buf: &'a mut [u8],
    pub(super) table: heapless::Vec<Slot, N>,
    pub(super) version: u64,
    /// Counters of the pass in progress.
    pub(super) pass: PassReport,
    pub(super) pass_start: u64,
    /// How long the pass's harvest of the dirty log took: the pause pays
    /// for one more.
    pub(super) sync_ns: u64,
    /// What sending cost in the slowest window of the last pass that sent
    /// enough to measure it ([`RATE_SAMPLE_BYTES`]).
    pub(super) cost: Option<SendCost>,
    /// The slowest window of the pass in progress so far.
    pub(super) pass_cost: Option<SendCost>,
    /// Where the window being measured began.
    pub(super) window: Window,
    /// Pages handed to [`Self::send_run`] in the pass in progress.
    pub(super) run_pages: u64,
    /// When the pass's sending ended: its harvest began.
    pub(super) sending_end_ns: u64,
    /// The last live pass's estimate of the pause.
    pub(super) last_estimate_ns: u64,
    pub(super) throttle: u8,
    /// Page channels to hand runs to, until post-copy starts; `None`
    /// sends them inline on `out`.
    pub(super) channels: Option<&'a mut dyn PageChannels>,
    /// The next barrier's generation.
    pub(super) generation: u32,
    /// Bytes handed to the channels since their last barrier (counted by
    /// the channels at the barrier; an estimate until then).
    pub(super) in_flight: u64,
    /// With channels: when the next run goes on the main stream instead
    /// ([`MAIN_STREAM_RUN_INTERVAL_NS`](super::channels::MAIN_STREAM_RUN_INTERVAL_NS)).
    pub(super) main_run_due_ns: u64,
}

/// A pass that sends less than this (a few pages, or zero pages only,
/// which cost a header each) says little about the link's rate: the
/// estimate then uses the last pass that sent more. Also the least a
/// pass's last, partial window must hold to count.
const RATE_SAMPLE_BYTES: u64 = 8 << 20;

/// A pass's sending is measured in windows of this many bytes, and the
/// estimate of the pause uses the slowest: a shared machine's rate swings
/// by a third and more between windows, and a pause of a few hundred
/// milliseconds may well fall on a slow stretch, so the average of a
/// long pass promises too much.
const RATE_WINDOW_BYTES: u64 = 16 << 20;

/// Runs this short on average (pages per run) show what a run costs on
/// its own, its record and its write; a window of longer runs says only
/// what bytes cost.
const SHORT_RUN_PAGES: u64 = 2;

/// Where a measuring window began: the time and the pass's counters then.
#[derive(Copy, Clone, Debug, Default)]
pub(super) struct Window {
    start_ns: u64,
    bytes: u64,
    runs: u64,
    pages: u64,
}

/// What sending cost, as measured in a window.
#[derive(Copy, Clone, Debug, PartialEq)]
pub(super) struct SendCost {
    /// Nanoseconds per byte handed to the output.
    ns_per_byte: f64,
    /// Nanoseconds per run, from windows of short runs only
    /// ([`SHORT_RUN_PAGES`]): a sparse dirty set costs more per byte than
    /// a dense one, and the pause sends the sparsest set of all.
    ns_per_run: Option<f64>,
}

impl SendCost {
    /// The slower of two costs, part by part.
    fn max(self, other: SendCost) -> SendCost {
        SendCost {
            ns_per_byte: self.ns_per_byte.max(other.ns_per_byte),
            ns_per_run: match (self.ns_per_run, other.ns_per_run) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            },
        }
    }

    /// Sending `bytes` in `runs` runs, after `backlog` bytes written
    /// before that have not left yet, in nanoseconds.
    fn send_ns(&self, bytes: u64, runs: u64, backlog: u64) -> f64 {
        let by_bytes = bytes as f64 * self.ns_per_byte;
        let by_runs = self.ns_per_run.map_or(0.0, |ns| runs as f64 * ns);
        backlog as f64 * self.ns_per_byte + by_bytes.max(by_runs)
    }
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
    /// Writes a record's header, counting its bytes in the pass.
    pub(super) fn write<E>(
        &mut self,
        record: Record,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        record.write(self.out).map_err(MigrateError::Write)?;
        self.pass.bytes += record.wire_len() as u64;
        Ok(())
    }

    /// Writes the block table (after a new or a resumed stream's header).
    pub(super) fn write_table<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
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

    pub(super) fn begin_pass(&mut self, pass: u32, dirty_found: u64) {
        self.pass = PassReport {
            pass,
            dirty_found,
            throttle: self.throttle,
            ..PassReport::default()
        };
        self.pass_start = self.host.now_ns();
        self.pass_cost = None;
        self.run_pages = 0;
        self.window = Window {
            start_ns: self.pass_start,
            ..Window::default()
        };
    }

    /// Ends the measuring window at `now` if it holds `at_least` bytes:
    /// its cost joins the pass's slowest, and the next window starts.
    fn close_window(&mut self, now: u64, at_least: u64) {
        let w = self.window;
        let bytes = (self.pass.bytes + self.in_flight).saturating_sub(w.bytes);
        if bytes < at_least.max(1) {
            return;
        }
        let ns = now.saturating_sub(w.start_ns).max(1) as f64;
        let runs = self.pass.runs - w.runs;
        let pages = self.run_pages - w.pages;
        let cost = SendCost {
            ns_per_byte: ns / bytes as f64,
            ns_per_run: (runs > 0 && pages <= SHORT_RUN_PAGES * runs).then(|| ns / runs as f64),
        };
        self.pass_cost = Some(self.pass_cost.map_or(cost, |c| c.max(cost)));
        self.window = Window {
            start_ns: now,
            bytes: self.pass.bytes + self.in_flight,
            runs: self.pass.runs,
            pages: self.run_pages,
        };
    }

    /// Closes the pass's report. The estimate of the pause is what the
    /// switch-over would cost now: one more harvest (as long as this
    /// pass's), then the bytes written before it that have not left yet
    /// ([`MigrationHost::unsent_bytes`]), then the `remaining` pages in
    /// their `remaining_runs` runs, at the cost of this pass's slowest
    /// window ([`RATE_WINDOW_BYTES`]; per byte, or per run when that is
    /// more: see [`SendCost`]), its harvest not counted. A pass that sent
    /// too little to tell keeps the last pass's cost.
    pub(super) fn end_pass(
        &mut self,
        newly: u64,
        remaining: u64,
        remaining_runs: u64,
    ) -> PassReport {
        let mut r = self.pass;
        let now = self.host.now_ns();
        r.duration_ns = (now - self.pass_start).max(1);
        let secs = r.duration_ns as f64 / 1e9;
        r.bandwidth = r.bytes as f64 / secs;
        r.dirty_rate = newly as f64 / secs;
        r.remaining = remaining;
        r.remaining_runs = remaining_runs;
        // The last window ends where sending did, before the harvest.
        let sending_end = if self.sending_end_ns >= self.pass_start {
            self.sending_end_ns
        } else {
            now
        };
        self.close_window(sending_end, RATE_SAMPLE_BYTES);
        if let Some(cost) = self.pass_cost {
            r.slowest_bandwidth = 1e9 / cost.ns_per_byte;
            self.cost = Some(cost);
        }
        let cost = *self.cost.get_or_insert_with(|| {
            // Nothing measured yet: the whole pass, however little it
            // sent.
            let sending_ns = r.duration_ns.saturating_sub(self.sync_ns).max(1);
            SendCost {
                ns_per_byte: if r.bytes > 0 {
                    sending_ns as f64 / r.bytes as f64
                } else {
                    f64::INFINITY
                },
                ns_per_run: None,
            }
        });
        r.unsent_bytes = self.unsent_bytes();
        r.estimated_ns = if remaining == 0 {
            0
        } else {
            let send_ns = cost.send_ns(remaining * PAGE as u64, remaining_runs, r.unsent_bytes);
            // Saturating: an unmeasurable rate is an endless pause.
            self.sync_ns
                .saturating_add(send_ns.min(u64::MAX as f64) as u64)
        };
        self.host.pass_done(&r);
        r
    }

    /// Bytes written that the destination has not taken yet, on the main
    /// stream and on the page channels: a pause waits for all of them.
    pub(super) fn unsent_bytes(&mut self) -> u64 {
        let channels = self.channels.as_deref().map_or(0, |c| c.unsent_bytes());
        self.host.unsent_bytes().saturating_add(channels)
    }

    /// Tells the host how far the pass in progress is.
    fn report_progress(&mut self) {
        let mut so_far = self.pass;
        so_far.bytes += self.in_flight;
        so_far.duration_ns = (self.host.now_ns() - self.pass_start).max(1);
        so_far.bandwidth = so_far.bytes as f64 / (so_far.duration_ns as f64 / 1e9);
        self.host.pass_progress(&so_far);
    }

    /// Harvests every block's dirty log; returns the newly dirty count.
    pub(super) fn sync<E>(&mut self) -> Result<u64, MigrateError<D::Error, W::Error, E>> {
        let started = self.host.now_ns();
        self.sending_end_ns = started;
        let newly = self.harvest()?;
        self.sync_ns = self.host.now_ns().saturating_sub(started);
        Ok(newly)
    }

    fn harvest<E>(&mut self) -> Result<u64, MigrateError<D::Error, W::Error, E>> {
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

    /// The runs the dirty pages left form, over all blocks.
    pub(super) fn remaining_runs(&self) -> u64 {
        let view = self.list.read();
        self.table
            .iter()
            .filter_map(|s| view.by_name(s.name.as_str()))
            .map(|b| b.migration().bitmap.dirty_runs())
            .sum()
    }

    pub(super) fn remaining(&self) -> u64 {
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
        if !resized.is_empty() {
            // Pages sent before the resize land before it.
            self.barrier()?;
        }
        for (block, used_length) in resized {
            self.write(Record::Resize { block, used_length })?;
        }
        Ok(())
    }

    /// Sends every dirty page of every block from page `first_page(block)`
    /// on.
    pub(super) fn send_dirty_from<E>(
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
                // Between two lock holds: the host may look at the list.
                drop(state);
                drop(view);
                self.report_progress();
            }
        }
        Ok(())
    }

    /// Sends `count` pages from `first`, zero pages as counts, inline
    /// ([`write_run`]) or through a page channel. The pages are read in
    /// place: checked for zeros, hashed for the ledger and handed to the
    /// writer without a copy. A page the guest changes meanwhile may go out
    /// torn, but it is dirty again (its clear-map chunk was cleared before
    /// this), so a later pass, at the latest the one with the guest paused,
    /// sends it again and records its final digest.
    pub(super) fn send_run<E>(
        &mut self,
        block: u32,
        region: &HostRegion<'_>,
        first: usize,
        count: usize,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        // In range: next_dirty_run keeps runs inside the used length, which
        // the region covers; a run that is not is a bug, refused below.
        let run = region
            .subregion(ByteLen::from_pages(first as u64), count * PAGE)
            .map_err(MigrateError::RunOutsideBlock)?;
        self.pass.runs += 1;
        self.run_pages += count as u64;
        let on_main = self.channels.is_some() && {
            let now = self.host.now_ns();
            let due = now >= self.main_run_due_ns;
            if due {
                self.main_run_due_ns = now + MAIN_STREAM_RUN_INTERVAL_NS;
            }
            due
        };
        if let Some(channels) = self.channels.as_deref_mut().filter(|_| !on_main) {
            let name = &self.table[block as usize].name;
            let sent = channels.send(block, name, first as u64, count as u32);
            sent.map_err(|e| self.channel_failed(e))?;
            self.in_flight += (count * PAGE) as u64;
        } else {
            let sent = write_run(
                &mut *self.out,
                self.host.ledger(),
                block,
                first as u64,
                &run,
            )
            .map_err(|e| match e {
                RunError::Write(e) => MigrateError::Write(e),
                RunError::OutsideBlock(e) => MigrateError::RunOutsideBlock(e),
            })?;
            self.count_sent(sent);
            if on_main {
                // A run of zero pages is a short record that would wait in
                // the writer's queue: the point is that bytes move now.
                self.out.flush().map_err(MigrateError::Write)?;
            }
        }
        self.throttle_bandwidth();
        if self.pass.bytes + self.in_flight >= self.window.bytes + RATE_WINDOW_BYTES {
            let now = self.host.now_ns();
            self.close_window(now, RATE_WINDOW_BYTES);
        }
        Ok(())
    }

    /// A channel's failure as the migration's error: a removed block by
    /// its name, as without channels.
    fn channel_failed<E>(&self, failure: ChannelFailure) -> MigrateError<D::Error, W::Error, E> {
        match failure.what {
            ChannelFailureKind::BlockRemoved(index) => match self.table.get(index as usize) {
                Some(slot) => MigrateError::BlockRemoved(slot.name.clone()),
                None => MigrateError::Channel(failure),
            },
            _ => MigrateError::Channel(failure),
        }
    }

    fn count_sent(&mut self, sent: RunCounts) {
        self.pass.bytes += sent.bytes;
        self.pass.pages_sent += sent.pages;
        self.pass.zero_pages += sent.zero_pages;
    }

    /// No page goes on the channels any more: they are closed, so the
    /// destination's channel receivers end at the barrier just sent
    /// instead of waiting, idle, through what follows (post-copy, or the
    /// device state, `End` and its verification), which may outlast their
    /// read timeout.
    pub(super) fn close_channels(&mut self) {
        if let Some(channels) = self.channels.take() {
            channels.close();
        }
    }

    /// With page channels: every channel sends what it was handed and a
    /// barrier, then the main stream sends its own, so the destination
    /// applies all of it before anything that follows (the next pass, a
    /// resize, the end). Without channels there is nothing to order.
    pub(super) fn barrier<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let Some(channels) = self.channels.as_deref_mut() else {
            return Ok(());
        };
        let generation = self.generation;
        let sent = channels.barrier(generation);
        let count = channels.count();
        let sent = sent.map_err(|e| self.channel_failed(e))?;
        self.in_flight = 0;
        self.count_sent(sent);
        self.generation += 1;
        self.write(Record::Barrier {
            generation,
            channels: count,
        })?;
        // The destination's channels wait at this barrier for the main
        // stream: it must not sit in a queue here while the channels fill.
        self.out.flush().map_err(MigrateError::Write)
    }

    /// Sleeps as needed to keep the pass under the bandwidth cap.
    fn throttle_bandwidth(&mut self) {
        if let Some(limit) = self.cfg.bandwidth_limit.filter(|&l| l > 0) {
            let due = ((self.pass.bytes + self.in_flight) as u128 * 1_000_000_000
                / u128::from(limit)) as u64;
            let elapsed = self.host.now_ns() - self.pass_start;
            if due > elapsed {
                self.host.sleep_ns(due - elapsed);
            }
        }
    }

    /// Checks the VMM's device-state sections against the format's bound
    /// on one and the host's on all; returns how many there are. Called
    /// with the guest paused, before anything of the switch is sent, so a
    /// failure leaves the destination with nothing to undo.
    pub(super) fn count_sections<E>(&mut self) -> Result<u32, MigrateError<D::Error, W::Error, E>> {
        let header_len = SectionHeader::ENCODED_LEN as u64;
        let mut total = 0u64;
        let mut index = 0u32;
        while let Some((_, bytes)) = self.host.device_section(index as usize) {
            // One section past the format's own bound would be refused by
            // every receiver: fail here, before the guest's state leaves.
            if bytes.len() as u64 > MAX_SECTION_LEN {
                return Err(MigrateError::DeviceStateTooLarge {
                    total: bytes.len() as u64,
                    limit: MAX_SECTION_LEN,
                });
            }
            total = total
                .saturating_add(header_len)
                .saturating_add(bytes.len() as u64);
            index = index.saturating_add(1);
        }
        let limit = self.host.device_state_limit();
        if total > limit {
            return Err(MigrateError::DeviceStateTooLarge { total, limit });
        }
        Ok(index)
    }

    /// Writes section `index`'s header (its `len` set to its bytes) and
    /// bytes: after a `Section` record's tag, or inside the `Postcopy`
    /// record.
    pub(super) fn write_section<E>(
        &mut self,
        index: usize,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let Some((mut header, bytes)) = self.host.device_section(index) else {
            // The host said it had this section a moment ago.
            return Err(MigrateError::DeviceStateChanged);
        };
        header.len = bytes.len() as u64;
        let mut raw = [0u8; SectionHeader::ENCODED_LEN];
        header.encode(&mut raw);
        let out = &mut *self.out;
        out.write_all(&raw).map_err(MigrateError::Write)?;
        out.write_all(bytes).map_err(MigrateError::Write)?;
        self.pass.bytes += raw.len() as u64 + header.len;
        Ok(())
    }

    /// The error for the destination's refusal of the device-state
    /// section at `index` (its position in the stream), named by the
    /// host's own header for it; an index the host never sent is no
    /// answer this side understands.
    pub(super) fn section_refused<E>(
        &mut self,
        index: u32,
        code: u32,
    ) -> MigrateError<D::Error, W::Error, E> {
        match self.host.device_section(index as usize) {
            Some((header, _)) => MigrateError::SectionRefused {
                index,
                name: header.name,
                instance_id: header.instance_id,
                code,
            },
            None => MigrateError::BadAck,
        }
    }

    /// The end record: one checksum per block, in table order.
    pub(super) fn write_end<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
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
