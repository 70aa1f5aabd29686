//! The pre-copy migration engine (the sending side).
//!
//! Pass 0 sends every page. Each later pass harvests the dirty log, then
//! sends what is dirty, clearing each clear-map chunk in the hypervisor just
//! before its first page goes out. After each pass the engine estimates the
//! dirty rate and the bandwidth; when the pages left could be sent within
//! the downtime limit (or the pass limit is reached) it pauses the guest,
//! runs a final sync and send, sends the VMM's device-state sections,
//! writes the end record with a checksum of every block, and waits for the
//! receiver's acknowledgement and then for the handover: the destination's
//! word that its vCPUs run. Only then does the migration succeed; a
//! refusal, an unknown answer or silence (bounded by
//! [`MigrationHost::handover_wait_ns`]) fails it and the guest resumes
//! here.
//!
//! Blocks added or removed during the migration fail it cleanly; a resize of
//! a resizable block is carried to the destination. On any failure the guest
//! is resumed and unthrottled: a failed migration never harms the source.
//! Switching the dirty log off afterwards is the caller's job, as switching
//! it on was.
//!
//! The switch to post-copy is in [`super::postcopy`], the throttle policy in
//! [`super::converge`].

use super::channels::PageChannels;
use super::config::PrecopyConfig;
use super::engine::{Engine, Slot, Window, PAGE};
use super::error::{Error, MigrateError};
use super::host::MigrationHost;
use super::stats::{MigrationStats, PassReport, PauseReport};
use crate::addr::TARGET_PAGE_SHIFT;
use crate::bitmap::Storage;
use crate::dirty_log::DirtyLogSource;
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::list::RamList;
use crate::stream::format::{Header, Record, ReturnMessage, MAX_PAGE_CHANNELS, MAX_RUN_PAGES};
use crate::stream::io::{ByteRead, ByteWrite};

/// Migrates every migratable block of `list` to the receiver at the other
/// end of `out`, reading its acknowledgement from `ack`. `buf` (one page at
/// least) bounds the records: a run has at most as many pages as it holds,
/// up to 64; pages themselves go out in place. In post-copy it holds the
/// device state. Dirty logging must be on before the call. When a write
/// fails during the live passes, the destination's answer is read first
/// (as long as the host bounds a handover wait,
/// [`MigrationHost::handover_wait_ns`]): a destination that refused the
/// stream and closed is reported as [`MigrateError::Refused`] with its
/// code, not as the failed write.
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
    migrate_with_channels(list, source, out, ack, host, cfg, buf, None)
}

/// [`migrate`] with page channels, when `channels` is given: pre-copy
/// pages go to them ([`crate::migrate::channels`]), everything else (and
/// all of post-copy) on `out`. A host ledger ([`MigrationHost::ledger`])
/// must be the one the channels record in (a shared
/// [`Ledger`](crate::checksum::Ledger)); a failed channel fails the
/// migration and the guest runs on here. The header announces the
/// channels' count ([`Header::channels`]), so the destination knows how
/// many to accept; more than [`MAX_PAGE_CHANNELS`] is refused
/// ([`MigrateError::TooManyChannels`]) before anything is sent. `None`,
/// or channels that count 0, is [`migrate`].
#[allow(clippy::too_many_arguments)]
pub fn migrate_with_channels<M, S, const N: usize, D, W, R, H>(
    list: &RamList<'_, M, S, N>,
    source: &mut D,
    out: &mut W,
    ack: &mut R,
    host: &mut H,
    cfg: PrecopyConfig,
    buf: &mut [u8],
    channels: Option<&mut dyn PageChannels>,
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
    // No channel at all is no channels: pages go on `out`.
    let channels = channels.filter(|c| c.count() > 0);
    if let Some(count) = channels.as_ref().map(|c| c.count()) {
        if count > MAX_PAGE_CHANNELS {
            return Err(MigrateError::TooManyChannels {
                count,
                max: MAX_PAGE_CHANNELS,
            });
        }
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
        sync_ns: 0,
        cost: None,
        pass_cost: None,
        window: Window::default(),
        run_pages: 0,
        sending_end_ns: 0,
        last_estimate_ns: 0,
        throttle: 0,
        channels: channels.map(|c| &mut *c as &mut dyn PageChannels),
        generation: 0,
        in_flight: 0,
        main_run_due_ns: 0,
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
        let postcopy = match self.precopy_passes(&mut stats) {
            // A destination that refused the stream (at its header, say)
            // stops reading and closes, so a write on the main stream
            // fails: its answer, if it came, says more. (Not after a page
            // channel failed: the destination may still wait on the main
            // stream for the next record, and the answer would wait for
            // it.)
            Err(e @ MigrateError::Write(_)) => return Err(self.refusal_or(ack, e)),
            passes => passes?,
        };
        if postcopy {
            self.postcopy(&mut stats, paused)?;
            stats.total_ns = self.host.now_ns() - start;
            self.host.set_throttle(0);
            return Ok(stats);
        }

        // Switch-over.
        let backlog_bytes = self.unsent_bytes();
        let pause_start = self.host.now_ns();
        self.host.pause_guest();
        *paused = true;
        let stopped = self.host.now_ns();
        self.sync()?;
        let harvested = self.host.now_ns();
        self.begin_pass(stats.passes, self.remaining());
        self.send_dirty()?;
        self.barrier()?;
        self.close_channels();
        self.write(Record::Sync {
            pass: stats.passes,
            remaining: 0,
        })?;
        let pages_sent = self.host.now_ns();
        let mut device_done = pages_sent;
        let sent = self
            .write_sections()
            .and_then(|()| self.write_end())
            .and_then(|()| {
                device_done = self.host.now_ns();
                self.out.flush().map_err(MigrateError::Write)
            });
        let flushed = self.host.now_ns();
        stats.pause = PauseReport {
            estimated_ns: self.last_estimate_ns,
            backlog_bytes,
            stop_ns: stopped.saturating_sub(pause_start),
            harvest_ns: harvested.saturating_sub(stopped),
            send_ns: pages_sent.saturating_sub(harvested),
            device_ns: device_done.saturating_sub(pages_sent),
            flush_ns: flushed.saturating_sub(device_done),
            ack_ns: 0,
            handover_ns: 0,
        };
        if let Err(e @ MigrateError::Write(_)) = sent {
            // A destination that refused a section stops reading and
            // closes: its answer, if it came, says more than the write.
            self.host.handover_wait_ns();
            return Err(match self.wait_ack(ack) {
                Err(refusal @ (MigrateError::Refused(_) | MigrateError::SectionRefused { .. })) => {
                    refusal
                }
                _ => e,
            });
        }
        sent?;
        let report = self.end_pass(0, 0, 0);
        stats.final_pages = report.pages_sent + report.zero_pages;
        stats.add(&report);
        self.wait_ack(ack)?;
        let acked = self.host.now_ns();
        stats.ram_downtime_ns = acked - pause_start;
        stats.pause.ack_ns = acked.saturating_sub(flushed);
        // Until the destination says its guest runs, this side keeps it:
        // a refusal, garbage or silence fails the migration and the guest
        // resumes here.
        self.wait_handover(ack)?;
        let now = self.host.now_ns();
        stats.pause.handover_ns = now.saturating_sub(acked);
        stats.downtime_ns = now - pause_start;
        stats.total_ns = now - start;
        self.host.set_throttle(0);
        Ok(stats)
    }

    /// The live passes, until the estimate fits (or the pass limit, with
    /// no downtime limit); `true` when post-copy is due instead.
    fn precopy_passes<E>(
        &mut self,
        stats: &mut MigrationStats,
    ) -> Result<bool, MigrateError<D::Error, W::Error, E>> {
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
            self.barrier()?;
            let newly = self.sync()?;
            let remaining = self.remaining();
            self.write(Record::Sync {
                pass: stats.passes,
                remaining,
            })?;
            let remaining_runs = self.remaining_runs();
            let report = self.end_pass(newly, remaining, remaining_runs);
            self.last_estimate_ns = report.estimated_ns;
            stats.add(&report);
            stats.dirty_rate = report.dirty_rate;
            dirty_found = remaining;
            if self.cfg.fits(report.estimated_ns) {
                break;
            }
            let limit = stats.passes >= self.cfg.max_passes;
            if let Some(after) = self.cfg.postcopy_after {
                postcopy = limit || stats.passes >= after;
            } else if limit && self.cfg.downtime_limit_ns == 0 {
                break;
            } else if limit {
                // The limit is a promise: rather than pause the guest for
                // longer, give up and leave it running here.
                return Err(MigrateError::DowntimeUnreachable {
                    estimated_ns: report.estimated_ns,
                    limit_ns: self.cfg.downtime_limit_ns,
                    passes: stats.passes,
                });
            }
            self.converge(&report);
        }
        Ok(postcopy)
    }

    /// `error`, or the destination's refusal if it sent one (waiting for
    /// it at most as long as for a handover).
    fn refusal_or<R: ByteRead>(&mut self, ack: &mut R, error: Error<D, W, R>) -> Error<D, W, R> {
        self.host.handover_wait_ns();
        match self.wait_ack(ack) {
            Err(refusal @ (MigrateError::Refused(_) | MigrateError::SectionRefused { .. })) => {
                refusal
            }
            _ => error,
        }
    }

    /// Reads the destination's answer to the `End` record.
    fn wait_ack<R: ByteRead>(&mut self, ack: &mut R) -> Result<(), Error<D, W, R>> {
        match ReturnMessage::read(ack).map_err(MigrateError::Ack)? {
            Ok(ReturnMessage::Ack(Ok(()))) => Ok(()),
            Ok(ReturnMessage::Ack(Err(code))) => Err(MigrateError::Refused(code)),
            Ok(ReturnMessage::SectionRefused { index, code }) => {
                Err(self.section_refused(index, code))
            }
            // Anything else ("OK" with a code, a request, a handover
            // before the acknowledgement) is not an answer this side
            // understands, so it is no success.
            Ok(_) | Err(_) => Err(MigrateError::BadAck),
        }
    }

    /// Waits, as long as the host allows, for the destination to say its
    /// guest runs.
    fn wait_handover<R: ByteRead>(&mut self, ack: &mut R) -> Result<(), Error<D, W, R>> {
        let since = self.host.now_ns();
        let timeout_ns = self.host.handover_wait_ns();
        match ReturnMessage::read(ack) {
            Ok(Ok(ReturnMessage::Handover(Ok(())))) => Ok(()),
            Ok(Ok(ReturnMessage::Handover(Err(code)))) => Err(MigrateError::NotRunning(code)),
            Ok(_) => Err(MigrateError::BadHandover),
            Err(error) => Err(MigrateError::NoHandover {
                error,
                waited_ns: self.host.now_ns().saturating_sub(since),
                timeout_ns,
            }),
        }
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
        // Bounded by MAX_PAGE_CHANNELS when the engine was made.
        let channels = self.channels.as_deref().map_or(0, |c| c.count() as u8);
        Header::new(self.table.len() as u32)
            .with_channels(channels)
            .write(self.out)
            .map_err(MigrateError::Write)?;
        self.write_table()?;
        if self.channels.is_some() {
            // A destination accepts the main stream before the channels,
            // which may fill and stall while the header waits in a queue.
            self.out.flush().map_err(MigrateError::Write)?;
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
                            pass.bytes += record.wire_len() as u64;
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

    /// Switch-over: sends the VMM's device-state sections (after the final
    /// pass, before `End`), once their total is known to fit the limit.
    fn write_sections<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let count = self.count_sections()?;
        for index in 0..count {
            self.write(Record::Section)?;
            self.write_section(index as usize)?;
        }
        Ok(())
    }

    /// Sends every dirty page of every block.
    fn send_dirty<E>(&mut self) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        self.send_dirty_from(|_| 0)
    }
}
