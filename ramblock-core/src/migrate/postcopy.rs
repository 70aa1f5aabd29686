//! Post-copy: the guest moves to the destination before all of its memory
//! has, and pages follow on demand.
//!
//! When [`PrecopyConfig::postcopy_after`](super::PrecopyConfig)
//! says so, the engine ends pre-copy by pausing the guest, harvesting the
//! dirty log once more and sending:
//! 1. `Discard` records naming every page still dirty (in whole host pages
//!    for hugepage blocks: a hugepage is placed whole, so it is sent whole);
//! 2. a `Postcopy` record carrying the VMM's device-state sections
//!    ([`MigrationHost::device_section`], checked against the same bounds
//!    as at a pre-copy switch-over before the first discard). From here
//!    the guest belongs to the destination: the source never resumes it.
//!
//! Then it sends every page still dirty, answering the destination's page
//! requests ([`MigrationHost::return_message`]) before anything else and
//! moving its background cursor to just past each request (guests tend to
//! touch memory in order). With nothing left it writes the end record and
//! waits for the acknowledgement.
//!
//! **Small background chunks.** The engine looks at the return path only
//! between writes, and a write of background pages blocks while the
//! socket is full, so a request that arrives meanwhile waits until the
//! whole chunk is in the socket. A chunk is therefore small:
//! [`BACKGROUND_CHUNK_PAGES`] target pages (or one host page, if larger).
//!
//! **A flooding destination.** Requests come first, but never all of them:
//! after at most [`REQUESTS_PER_BACKGROUND`] requests the engine sends one
//! background chunk before it looks at the return path again, so a
//! destination that asks without pause slows the migration down but cannot
//! stop it. A request
//! whose pages were all sent already costs a look at the dirty bitmap: no
//! write, no flush, no move of the background cursor. The engine keeps no
//! queue of its own; the host's return path decides how many requests wait
//! (the program's is bounded).
//!
//! **Recovery.** If the connection breaks, nothing is lost: the source's
//! bitmaps and ledger stay as they are, [`MigrationHost::reconnect`] gets a
//! new connection, the engine sends a resume header and the block table,
//! and the destination's received map ([`MigrationHost::received_map`])
//! marks every page it lacks dirty again, including pages that were in
//! flight when the connection broke.

use super::engine::{Engine, PAGE};
use super::error::MigrateError;
use super::host::{MigrationHost, ReturnEvent};
use super::stats::{MigrationStats, PostcopyStats};
use crate::addr::TARGET_PAGE_SHIFT;
use crate::bitmap::Storage;
use crate::dirty_log::DirtyLogSource;
use crate::host::HostMemory;
use crate::stream::format::{Header, PageRequest, Record, ReturnMessage, MAX_RUN_PAGES};
use crate::stream::io::ByteWrite;

/// How long one wait for the destination's acknowledgement lasts before
/// the engine looks again (the host decides when a silent path is dead).
const ACK_POLL_NS: u64 = 100_000_000;

/// Requests answered at most between two background chunks: enough that a
/// burst of faults is served before anything else, few enough that a flood
/// of requests cannot starve the background (each chunk is at least
/// [`BACKGROUND_CHUNK_PAGES`] pages, so background pages make up at least a
/// share of roughly one in this many runs sent).
pub const REQUESTS_PER_BACKGROUND: usize = 32;

/// Target pages per background chunk (a hugepage block's chunk is one
/// host page): the engine looks for page requests after each chunk. A
/// request arriving while a chunk is written waits until the chunk is in
/// the socket: at the ~1 GiB/s of a loopback post-copy stream, about
/// 60 µs for 64 KiB. With chunks of [`MAX_RUN_PAGES`] (256 KiB) that wait
/// was the largest share of a fault's latency (BENCHMARKS.md, post-copy).
/// Smaller chunks cost a record header (a few bytes) and a return-path
/// look per chunk.
pub const BACKGROUND_CHUNK_PAGES: usize = 16;

/// Pages `start..end` of table block `index` (`(index, start, end)`).
type Span = (usize, usize, usize);

/// Why a post-copy step stopped.
enum Stop<E> {
    /// The connection broke: resume.
    Broken,
    /// Anything else: the migration fails.
    Fatal(E),
}

/// A post-copy step's result, with the engine's error types.
type StepResult<T, D, W, E> = Result<T, Stop<MigrateError<D, W, E>>>;

/// Turns a write failure into a broken connection and keeps other errors.
fn broken_on_write<D, W, R>(e: MigrateError<D, W, R>) -> Stop<MigrateError<D, W, R>> {
    match e {
        MigrateError::Write(_) => Stop::Broken,
        other => Stop::Fatal(other),
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
    /// Runs post-copy from the end of pre-copy to the acknowledged end.
    /// `paused` goes back to false once the guest belongs to the
    /// destination, so a failure afterwards does not resume it here.
    pub(crate) fn postcopy<E>(
        &mut self,
        stats: &mut MigrationStats,
        paused: &mut bool,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        let pause_start = self.host.now_ns();
        self.host.pause_guest();
        *paused = true;
        self.sync()?;
        self.begin_pass(stats.passes, self.remaining());
        // Pages dirty at or past a block's post-copy length go now, the
        // pre-copy way: after the switch the destination places only pages
        // inside it (and refuses the rest with `PastPostcopyLength`).
        self.send_dirty_from(|b| (b.postcopy_length().0 >> TARGET_PAGE_SHIFT) as usize)?;
        // Everything the page channels carry lands before the discards;
        // from here on pages go on the main stream only, where requests
        // come first.
        self.barrier()?;
        self.close_channels();
        self.whole_host_pages();
        // Checked before the first discard: a failure here leaves the
        // destination with nothing to undo, and the guest resumes.
        let sections = self.count_sections()?;
        let mut pc = PostcopyStats {
            discarded: self.write_discards::<E>()?,
            ..PostcopyStats::default()
        };
        self.write(Record::Postcopy { sections })?;
        for index in 0..sections {
            self.write_section(index as usize)?;
        }
        self.out.flush().map_err(MigrateError::Write)?;
        // The destination runs the guest now; never resume it here.
        *paused = false;
        stats.downtime_ns = self.host.now_ns() - pause_start;
        stats.ram_downtime_ns = stats.downtime_ns;
        self.host.postcopy_started();
        let mut cursor = (0, 0);
        loop {
            match self.postcopy_send::<E>(&mut cursor, &mut pc) {
                Ok(()) => break,
                Err(Stop::Fatal(e)) if e.refused_before_the_guest_started() => {
                    // The guest is still this side's: it resumes here.
                    *paused = true;
                    return Err(e);
                }
                Err(Stop::Fatal(e)) => return Err(e),
                Err(Stop::Broken) => {
                    self.resume::<E>(&mut pc)?;
                    cursor = (0, 0);
                }
            }
        }
        let report = self.end_pass(0, 0, 0);
        stats.final_pages = report.pages_sent + report.zero_pages;
        stats.add(&report);
        stats.postcopy = Some(pc);
        Ok(())
    }

    /// Sends what is left, requests first, then the end record, and waits
    /// for the acknowledgement.
    fn postcopy_send<E>(
        &mut self,
        cursor: &mut (usize, usize),
        pc: &mut PostcopyStats,
    ) -> StepResult<(), D::Error, W::Error, E> {
        loop {
            self.answer_requests::<E>(cursor, pc)?;
            let Some((index, page)) = self.next_background(*cursor) else {
                break;
            };
            let per_page = self.pages_per_host_page(index);
            let start = page - page % per_page;
            let end = start + per_page.max(BACKGROUND_CHUNK_PAGES);
            self.send_range::<E>(index, start, end, &mut pc.background_pages)?;
            *cursor = (index, end);
        }
        self.write_end().map_err(broken_on_write)?;
        self.out.flush().map_err(|_| Stop::Broken)?;
        loop {
            match self.host.return_message(ACK_POLL_NS) {
                ReturnEvent::Nothing => {}
                // Everything is on its way: late requests need no answer.
                ReturnEvent::Message(ReturnMessage::Request(_)) => pc.requests += 1,
                ReturnEvent::Message(ReturnMessage::Ack(Ok(()))) => return Ok(()),
                ReturnEvent::Message(ReturnMessage::Ack(Err(code))) => {
                    return Err(Stop::Fatal(MigrateError::Refused(code)))
                }
                ReturnEvent::Message(ReturnMessage::SectionRefused { index, code }) => {
                    return Err(Stop::Fatal(self.section_refused(index, code)))
                }
                // The guest started at the Postcopy record: no handover.
                ReturnEvent::Message(ReturnMessage::Handover(_)) => {
                    return Err(Stop::Fatal(MigrateError::BadAck))
                }
                ReturnEvent::Closed => return Err(Stop::Broken),
            }
        }
    }

    /// Sends the pages of the requests waiting on the return path, at most
    /// [`REQUESTS_PER_BACKGROUND`] of them (the caller sends a background
    /// chunk before it calls again). A request for pages that were all
    /// sent already is counted and dropped: it writes nothing and leaves
    /// the cursor where it is.
    fn answer_requests<E>(
        &mut self,
        cursor: &mut (usize, usize),
        pc: &mut PostcopyStats,
    ) -> StepResult<(), D::Error, W::Error, E> {
        let mut answered = false;
        for _ in 0..REQUESTS_PER_BACKGROUND {
            match self.host.return_message(0) {
                ReturnEvent::Nothing => break,
                ReturnEvent::Message(ReturnMessage::Request(r)) => {
                    pc.requests += 1;
                    let (index, start, end) = self.request_range::<E>(r).map_err(Stop::Fatal)?;
                    if !self.any_dirty(index, start, end) {
                        pc.duplicate_requests += 1;
                        continue;
                    }
                    self.send_range::<E>(index, start, end, &mut pc.requested_pages)?;
                    *cursor = (index, end);
                    answered = true;
                }
                ReturnEvent::Message(ReturnMessage::SectionRefused { index, code }) => {
                    return Err(Stop::Fatal(self.section_refused(index, code)))
                }
                // A refusal: the destination stops here, and its code
                // says whether it ever started the guest.
                ReturnEvent::Message(ReturnMessage::Ack(Err(code))) => {
                    return Err(Stop::Fatal(MigrateError::Refused(code)))
                }
                ReturnEvent::Message(ReturnMessage::Ack(_) | ReturnMessage::Handover(_)) => {
                    return Err(Stop::Fatal(MigrateError::BadAck))
                }
                ReturnEvent::Closed => return Err(Stop::Broken),
            }
        }
        if answered {
            // A vCPU is waiting for these pages: do not let them sit in a
            // buffer behind background pages.
            self.out.flush().map_err(|_| Stop::Broken)?;
        }
        Ok(())
    }

    /// Whether any page in `start..end` of table block `index` is still to
    /// be sent.
    fn any_dirty(&self, index: usize, start: usize, end: usize) -> bool {
        let view = self.list.read();
        view.by_name(self.table[index].name.as_str())
            .is_some_and(|b| {
                b.migration()
                    .bitmap
                    .find_next_dirty(start)
                    .is_some_and(|p| p < end)
            })
    }

    /// The pages a request covers, widened to whole host pages and checked
    /// against the table.
    fn request_range<E>(
        &self,
        r: PageRequest,
    ) -> Result<Span, MigrateError<D::Error, W::Error, E>> {
        let index = r.block as usize;
        let used = match self.table.get(index) {
            Some(slot) => (slot.used_length >> TARGET_PAGE_SHIFT) as usize,
            None => return Err(MigrateError::BadRequest(r)),
        };
        let first = usize::try_from(r.first).map_err(|_| MigrateError::BadRequest(r))?;
        let end = first
            .checked_add(r.count as usize)
            .filter(|&e| r.count > 0 && e <= used)
            .ok_or(MigrateError::BadRequest(r))?;
        let per_page = self.pages_per_host_page(index);
        let start = first - first % per_page;
        let end = end.div_ceil(per_page).saturating_mul(per_page).min(used);
        Ok((index, start, end))
    }

    /// Target pages per host page of table block `index`.
    fn pages_per_host_page(&self, index: usize) -> usize {
        let view = self.list.read();
        view.by_name(self.table[index].name.as_str())
            .map_or(1, |b| {
                (b.page_size().bytes() >> TARGET_PAGE_SHIFT).max(1) as usize
            })
    }

    /// The first dirty page at or after `cursor`, wrapping around once.
    fn next_background(&self, cursor: (usize, usize)) -> Option<(usize, usize)> {
        let view = self.list.read();
        let count = self.table.len();
        (0..=count).find_map(|step| {
            let index = (cursor.0 + step) % count.max(1);
            let from = if step == 0 { cursor.1 } else { 0 };
            let block = view.by_name(self.table.get(index)?.name.as_str())?;
            let used = block.used_pages();
            let found = block
                .migration()
                .bitmap
                .find_next_dirty(from)
                .filter(|&p| p < used);
            found.map(|p| (index, p))
        })
    }

    /// Sends every dirty page of table block `index` in `start..end`,
    /// adding each run sent to `sent` (also when a later run fails).
    fn send_range<E>(
        &mut self,
        index: usize,
        start: usize,
        end: usize,
        sent: &mut u64,
    ) -> StepResult<(), D::Error, W::Error, E> {
        let max_run = (self.buf.len() / PAGE).min(MAX_RUN_PAGES as usize);
        let mut from = start;
        loop {
            let view = self.list.read();
            let Some(block) = view.by_name(self.table[index].name.as_str()) else {
                let name = self.table[index].name.clone();
                return Err(Stop::Fatal(MigrateError::BlockRemoved(name)));
            };
            let end = end.min(block.used_pages());
            let info = block.info();
            let region = block.region();
            let mut state = block.migration();
            let Some(first) = state.bitmap.find_next_dirty(from).filter(|&p| p < end) else {
                return Ok(());
            };
            let run = state
                .next_dirty_run(first, max_run.min(end - first), &info, self.source)
                .map_err(|e| Stop::Fatal(MigrateError::DirtyLog(e)))?;
            drop(state);
            let Some(run) = run else { return Ok(()) };
            let count = run.end - run.start;
            self.send_run::<E>(index as u32, &region, run.start, count)
                .map_err(broken_on_write)?;
            *sent += count as u64;
            from = run.end;
        }
    }

    /// Widens the dirty set of hugepage blocks to whole host pages: the
    /// destination places a hugepage whole, so it must get all of it.
    fn whole_host_pages(&self) {
        let view = self.list.read();
        for slot in &self.table {
            let Some(block) = view.by_name(slot.name.as_str()) else {
                continue;
            };
            let per_page = (block.page_size().bytes() >> TARGET_PAGE_SHIFT).max(1) as usize;
            if per_page <= 1 {
                continue;
            }
            let used = block.used_pages();
            let mut state = block.migration();
            let mut from = 0;
            while let Some(p) = state.bitmap.find_next_dirty(from).filter(|&p| p < used) {
                let start = p - p % per_page;
                let count = per_page.min(used - start);
                let _ = state.bitmap.set_range(start, count);
                from = start + per_page;
            }
        }
    }

    /// Names every dirty page in `Discard` records; returns how many.
    fn write_discards<E>(&mut self) -> Result<u64, MigrateError<D::Error, W::Error, E>> {
        let mut total = 0;
        for index in 0..self.table.len() {
            let mut from = 0;
            loop {
                let run = {
                    let view = self.list.read();
                    let Some(block) = view.by_name(self.table[index].name.as_str()) else {
                        return Err(MigrateError::BlockRemoved(self.table[index].name.clone()));
                    };
                    let used = block.used_pages();
                    let state = block.migration();
                    state
                        .bitmap
                        .find_next_dirty(from)
                        .filter(|&p| p < used)
                        .map(|start| {
                            let clean = state.bitmap.find_next_clean(start).unwrap_or(used);
                            let end = clean.min(used).min(start + u32::MAX as usize);
                            start..end
                        })
                };
                let Some(run) = run else { break };
                self.write(Record::Discard {
                    block: index as u32,
                    first: run.start as u64,
                    count: (run.end - run.start) as u32,
                })?;
                total += (run.end - run.start) as u64;
                from = run.end;
            }
        }
        Ok(total)
    }

    /// After a broken connection: reconnects, sends the resume header and
    /// table, and marks dirty every page the destination lacks.
    fn resume<E>(
        &mut self,
        pc: &mut PostcopyStats,
    ) -> Result<(), MigrateError<D::Error, W::Error, E>> {
        loop {
            if !self.host.reconnect() {
                return Err(MigrateError::PostcopyLost);
            }
            let header = Header::new(self.table.len() as u32);
            let token = self.host.resume_token().unwrap_or_default();
            let sent = header
                .write_resume(&token, self.out)
                .map_err(MigrateError::Write)
                .and_then(|()| self.write_table::<E>())
                .and_then(|()| self.out.flush().map_err(MigrateError::Write));
            if sent.is_err() {
                continue;
            }
            let list = self.list;
            let marked = self.host.received_map(&mut |name, pages| {
                let view = list.read();
                if let Some(block) = view.by_name(name) {
                    let used = block.used_pages() as u64;
                    let (start, end) = (pages.start.min(used), pages.end.min(used));
                    let mut state = block.migration();
                    let _ = state
                        .bitmap
                        .set_range(start as usize, (end - start) as usize);
                }
            });
            if marked {
                self.whole_host_pages();
                pc.resumes += 1;
                return Ok(());
            }
        }
    }
}
