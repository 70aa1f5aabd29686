//! The downtime limit is a promise: the pre-copy engine pauses the guest
//! only when its estimate of the pause (one more harvest, the bytes still
//! queued for the destination, and sending what is left at the slowest
//! cost the last pass saw) fits the limit with the switch-over reserve to
//! spare, and gives up with the guest running rather than pause it for
//! longer.
//!
//! Time here is a model clock: sending advances it by a cost per byte (and
//! per write), a harvest by a fixed cost, and a modelled guest dirties a
//! fixed set of pages after each live pass. So every figure is exact and
//! the tests check the engine's arithmetic, not the machine's speed.
mod common;
use common::{add_buffer_block, Mem};

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::{MigrationBitmap, Owned};
use ramblock_core::block::BlockSpec;
use ramblock_core::dirty_log::{BlockInfo, DirtyLogSource};
use ramblock_core::list::RamList;
use ramblock_core::migrate::channels::{
    ChannelFailure, PageChannels, RunCounts, MAIN_STREAM_RUN_INTERVAL_NS,
};
use ramblock_core::migrate::{
    migrate_with_channels, MigrateError, MigrationHost, MigrationStats, PassReport, PrecopyConfig,
};
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::format::{ACK_OK, RUNNING};
use ramblock_core::stream::io::{ByteWrite, SliceReader};
use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;

type List = RamList<'static, Mem, Owned, 4>;
const PAGE: u64 = 4096;
const PAGES: u64 = 2048;
const MS: u64 = 1_000_000;
const MIB: u64 = 1 << 20;

/// The wire: every byte costs `ns_per_byte` of model time (`slow_ns_per_byte`
/// in every other 16 MiB of the stream's first `slow_until` bytes, when
/// set: a link whose rate swings), every write call `ns_per_write`. Bytes `backlog` left queued
/// before the pause go out ahead of the paused guest's first byte.
struct Wire {
    clock: Rc<Cell<u64>>,
    ns_per_byte: u64,
    slow_ns_per_byte: Option<u64>,
    slow_until: u64,
    ns_per_write: u64,
    written: u64,
    backlog: Rc<Cell<u64>>,
    paused: Rc<Cell<bool>>,
    /// The model time of every page run written (a region).
    runs_at: Vec<u64>,
    /// Page runs written and not flushed yet (a flush empties it).
    unflushed_runs: u64,
    /// The most runs that ever waited for a flush.
    most_unflushed_runs: u64,
}

impl Wire {
    fn spend(&mut self, bytes: usize) {
        let mut ns = self.ns_per_write;
        if self.paused.get() {
            ns += self.backlog.replace(0) * self.ns_per_byte;
        }
        let per_byte = match self.slow_ns_per_byte {
            Some(slow)
                if self.written < self.slow_until && (self.written / (16 * MIB)) % 2 == 1 =>
            {
                slow
            }
            _ => self.ns_per_byte,
        };
        ns += bytes as u64 * per_byte;
        self.written += bytes as u64;
        self.clock.set(self.clock.get() + ns);
    }
}

impl ByteWrite for Wire {
    type Error = Infallible;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Infallible> {
        self.spend(buf.len());
        Ok(())
    }
    fn write_region(&mut self, region: &HostRegion<'_>) -> Result<(), Infallible> {
        self.runs_at.push(self.clock.get());
        self.unflushed_runs += 1;
        self.most_unflushed_runs = self.most_unflushed_runs.max(self.unflushed_runs);
        self.spend(region.len());
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Infallible> {
        self.unflushed_runs = 0;
        Ok(())
    }
}

/// What the modelled guest dirties between two harvests while it runs:
/// `pages` pages in runs of `run_len`, run `k` starting at page
/// `k * stride` (plus the harvest's number, modulo the block).
#[derive(Copy, Clone)]
struct Shape {
    pages: u64,
    run_len: u64,
    stride: u64,
}

/// The hypervisor's log of a guest that dirties `shapes[i]` before the
/// harvest ending pass `i` (the last shape for every later pass) while it
/// runs; every harvest costs `harvest_ns`.
struct ModelLog {
    clock: Rc<Cell<u64>>,
    harvest_ns: u64,
    shapes: Vec<Shape>,
    block_pages: u64,
    paused: Rc<Cell<bool>>,
    harvests: u64,
}

impl DirtyLogSource for ModelLog {
    type Error = Infallible;
    fn needs_clear(&self) -> bool {
        false
    }
    fn harvest(
        &mut self,
        _: &BlockInfo<'_>,
        into: &mut MigrationBitmap<&mut [u64]>,
    ) -> Result<u64, Infallible> {
        self.clock.set(self.clock.get() + self.harvest_ns);
        self.harvests += 1;
        // The setup's harvest only resets the log; a paused guest writes
        // nothing.
        if self.harvests == 1 || self.paused.get() {
            return Ok(0);
        }
        let index = (self.harvests as usize - 2).min(self.shapes.len() - 1);
        let shape = self.shapes[index];
        let mut newly = 0;
        for k in 0..shape.pages / shape.run_len {
            let first = (k * shape.stride + self.harvests) % self.block_pages;
            let len = shape.run_len.min(self.block_pages - first);
            newly += into.set_range(first as usize, len as usize).unwrap();
        }
        Ok(newly)
    }
    fn clear(&mut self, _: &BlockInfo<'_>, _: usize, _: usize) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The VMM: the model clock, the guest's pause switch, and the bytes the
/// host says are still queued for the destination.
struct Host {
    clock: Rc<Cell<u64>>,
    paused: Rc<Cell<bool>>,
    paused_at: Option<u64>,
    backlog: Rc<Cell<u64>>,
    reports: Vec<PassReport>,
}

impl MigrationHost for Host {
    fn now_ns(&mut self) -> u64 {
        self.clock.get()
    }
    fn sleep_ns(&mut self, ns: u64) {
        self.clock.set(self.clock.get() + ns);
    }
    fn pause_guest(&mut self) {
        self.paused.set(true);
        self.paused_at = Some(self.clock.get());
    }
    fn resume_guest(&mut self) {
        self.paused.set(false);
    }
    fn set_throttle(&mut self, _: u8) {}
    fn unsent_bytes(&mut self) -> u64 {
        self.backlog.get()
    }
    fn pass_done(&mut self, report: &PassReport) {
        self.reports.push(*report);
    }
}

/// One modelled page channel: a run costs its bytes at the wire's rate on
/// the same clock, and it always holds `held_back` bytes not yet taken.
struct Channels {
    clock: Rc<Cell<u64>>,
    ns_per_byte: u64,
    held_back: u64,
    sent: RunCounts,
    pages: u64,
    /// Whether the engine closed them (after the final pass's barrier).
    closed: bool,
}

impl PageChannels for Channels {
    fn count(&self) -> u32 {
        1
    }
    fn send(&mut self, _: u32, _: &BlockName, _: u64, count: u32) -> Result<(), ChannelFailure> {
        let bytes = u64::from(count) * PAGE;
        self.clock.set(self.clock.get() + bytes * self.ns_per_byte);
        self.pages += u64::from(count);
        self.sent.add(RunCounts {
            bytes,
            pages: u64::from(count),
            zero_pages: 0,
        });
        Ok(())
    }
    fn barrier(&mut self, _: u32) -> Result<RunCounts, ChannelFailure> {
        Ok(std::mem::take(&mut self.sent))
    }
    fn unsent_bytes(&self) -> u64 {
        self.held_back
    }
    fn close(&mut self) {
        self.closed = true;
    }
}

struct Run {
    result: Result<MigrationStats, String>,
    host: Host,
    /// When the main stream carried a page run.
    main_runs_at: Vec<u64>,
    /// The most page runs the main stream held before a flush.
    most_unflushed_runs: u64,
    /// Pages the page channels carried.
    channel_pages: u64,
    /// Whether the engine closed the page channels.
    channels_closed: bool,
}

/// A modelled migration; [`Model::new`] is the plain case.
#[derive(Clone)]
struct Model {
    block_pages: u64,
    ns_per_byte: u64,
    slow_ns_per_byte: Option<u64>,
    slow_until: u64,
    ns_per_write: u64,
    harvest_ns: u64,
    backlog: u64,
    /// With page channels: the bytes they hold back (else no channels).
    channel_backlog: Option<u64>,
    shapes: Vec<Shape>,
}

impl Model {
    /// A 2048-page block: sending costs `ns_per_byte`, each harvest
    /// `harvest_ns`, the guest dirties `dirty_per_pass` single pages per
    /// pass, seven pages apart.
    fn new(ns_per_byte: u64, harvest_ns: u64, dirty_per_pass: u64) -> Model {
        Model {
            block_pages: PAGES,
            ns_per_byte,
            slow_ns_per_byte: None,
            slow_until: u64::MAX,
            ns_per_write: 0,
            harvest_ns,
            backlog: 0,
            channel_backlog: None,
            shapes: vec![Shape {
                pages: dirty_per_pass,
                run_len: 1,
                stride: 7,
            }],
        }
    }

    fn run(&self, cfg: PrecopyConfig) -> Run {
        let list: &'static List = Box::leak(Box::new(RamList::new()));
        let spec = BlockSpec::new(
            BlockName::new("ram").unwrap(),
            ByteLen(self.block_pages * PAGE),
        )
        .flags(ramblock_core::flags::BlockFlags::MIGRATABLE);
        // Non-zero pages, so each one is sent with its bytes.
        add_buffer_block(list, spec, 0x5a);
        let clock = Rc::new(Cell::new(0));
        let paused = Rc::new(Cell::new(false));
        let backlog = Rc::new(Cell::new(self.backlog));
        let mut wire = Wire {
            clock: clock.clone(),
            ns_per_byte: self.ns_per_byte,
            slow_ns_per_byte: self.slow_ns_per_byte,
            slow_until: self.slow_until,
            ns_per_write: self.ns_per_write,
            written: 0,
            backlog: backlog.clone(),
            paused: paused.clone(),
            runs_at: Vec::new(),
            unflushed_runs: 0,
            most_unflushed_runs: 0,
        };
        let mut source = ModelLog {
            clock: clock.clone(),
            harvest_ns: self.harvest_ns,
            shapes: self.shapes.clone(),
            block_pages: self.block_pages,
            paused: paused.clone(),
            harvests: 0,
        };
        let mut host = Host {
            clock,
            paused,
            paused_at: None,
            backlog,
            reports: Vec::new(),
        };
        // The acknowledgement, then the handover: the destination runs.
        let mut ack_bytes = [0u8; 16];
        ack_bytes[..4].copy_from_slice(&ACK_OK);
        ack_bytes[8..12].copy_from_slice(&RUNNING);
        let mut ack = SliceReader::new(&ack_bytes);
        let mut buf = vec![0u8; 64 * PAGE as usize];
        let mut channels = self.channel_backlog.map(|held_back| Channels {
            clock: host.clock.clone(),
            ns_per_byte: self.ns_per_byte,
            held_back,
            sent: RunCounts::default(),
            pages: 0,
            closed: false,
        });
        let result = migrate_with_channels(
            list,
            &mut source,
            &mut wire,
            &mut ack,
            &mut host,
            cfg,
            &mut buf,
            channels.as_mut().map(|c| c as &mut dyn PageChannels),
        )
        .map_err(|e| e.to_string());
        Run {
            result,
            host,
            main_runs_at: wire.runs_at,
            most_unflushed_runs: wire.most_unflushed_runs,
            channel_pages: channels.as_ref().map_or(0, |c| c.pages),
            channels_closed: channels.is_some_and(|c| c.closed),
        }
    }
}

/// Migrates a 2048-page block: sending costs `ns_per_byte`, each harvest
/// `harvest_ns`, the guest dirties `dirty_per_pass` pages per pass.
fn run(ns_per_byte: u64, harvest_ns: u64, dirty_per_pass: u64, cfg: PrecopyConfig) -> Run {
    Model::new(ns_per_byte, harvest_ns, dirty_per_pass).run(cfg)
}

/// The migration gave up after `passes` passes without pausing the guest.
fn gave_up_with_the_guest_running(r: &Run, passes: u32) {
    let after = format!("after {passes} passes");
    assert!(
        matches!(&r.result, Err(e) if e.contains(&after)),
        "{:?}",
        r.result
    );
    assert_eq!(r.host.paused_at, None, "the guest was paused");
}

fn limit(ms: u64, max_passes: u32) -> PrecopyConfig {
    PrecopyConfig {
        downtime_limit_ns: ms * MS,
        max_passes,
        ..PrecopyConfig::default()
    }
}

#[test]
fn the_estimate_is_one_more_harvest_plus_sending_what_is_left() {
    // 1 ns per byte: a page costs about 4.1 µs; a harvest 5 ms.
    let r = run(1, 5 * MS, 100, limit(300, 30));
    let first = r.host.reports[0];
    assert_eq!(first.remaining, 100);
    let send_ns = first.duration_ns - 5 * MS;
    let rate = first.bytes as f64 / send_ns as f64;
    let expected = 5 * MS + (100.0 * PAGE as f64 / rate) as u64;
    assert!(
        first.estimated_ns.abs_diff(expected) <= 1,
        "{} vs {expected}",
        first.estimated_ns
    );
    r.result.unwrap();
}

#[test]
fn a_slow_harvest_alone_keeps_the_guest_from_pausing() {
    // Sending what is left takes well under a millisecond, but the pause
    // would also pay a 280 ms harvest: over 90% of the 300 ms limit.
    let r = run(1, 280 * MS, 10, limit(300, 5));
    let err = r.result.unwrap_err();
    assert!(err.contains("after 5 passes"), "{err}");
    assert!(err.contains("300 ms downtime limit"), "{err}");
    assert_eq!(r.host.paused_at, None, "the guest was paused");
    assert_eq!(r.host.reports.len(), 5);
    // The same migration with the harvest at 250 ms fits and keeps it.
    let r = run(1, 250 * MS, 10, limit(300, 5));
    let stats = r.result.unwrap();
    assert!(stats.downtime_ns <= 300 * MS, "{}", stats.downtime_ns);
}

#[test]
fn the_pause_keeps_the_limit_it_was_estimated_against() {
    // 64 ns per byte (about 61 MiB/s): a page takes 262 µs. A guest
    // dirtying 1080 pages per pass (283 ms of sending) would have fit an
    // estimate of sending alone against the whole 300 ms, but not one
    // that adds the 1 ms harvest and keeps the reserve (270 ms)...
    let r = run(64, MS, 1080, limit(300, 4));
    gave_up_with_the_guest_running(&r, 4);
    // ...and one dirtying 900 pages (about 236 ms) fits: the pause the
    // engine then takes stays inside the limit.
    let r = run(64, MS, 900, limit(300, 4));
    let stats = r.result.unwrap();
    let last = r.host.reports[r.host.reports.len() - 2];
    assert!(last.estimated_ns <= 270 * MS, "{}", last.estimated_ns);
    assert!(stats.downtime_ns <= 300 * MS, "{}", stats.downtime_ns);
    assert!(stats.downtime_ns >= last.estimated_ns, "{stats:?}");
}

#[test]
fn a_zero_limit_still_switches_over_after_the_pass_limit() {
    let r = run(64, MS, 1080, limit(0, 3));
    let stats = r.result.unwrap();
    assert_eq!(stats.passes, 4, "three live passes and the final one");
    assert!(r.host.paused_at.is_some());
}

#[test]
fn giving_up_is_a_typed_error() {
    let e: MigrateError<Infallible, Infallible, Infallible> = MigrateError::DowntimeUnreachable {
        estimated_ns: 412 * MS,
        limit_ns: 300 * MS,
        passes: 30,
    };
    let text = e.to_string();
    assert!(text.contains("412 ms"), "{text}");
    assert!(text.contains("runs on at the source"), "{text}");
}

#[test]
fn bytes_still_queued_at_the_pause_count_in_the_estimate() {
    // 64 ns per byte: 900 dirty pages take about 236 ms to send, which
    // fits 270 ms. But 300 pages' worth of bytes written before the pause
    // still wait in the host's queues, and go out first: 79 ms more, over
    // the whole 300 ms limit. The engine must not pause for that.
    let mut model = Model::new(64, MS, 900);
    model.backlog = 300 * PAGE;
    let r = model.run(limit(300, 4));
    gave_up_with_the_guest_running(&r, 4);
    let report = r.host.reports[1];
    assert_eq!(report.unsent_bytes, 300 * PAGE);
    // Harvest, then the queued bytes, then the pages (with their
    // headers), at pass 0's cost per byte.
    let pass0 = r.host.reports[0];
    let ns_per_byte = (pass0.duration_ns - MS) as f64 / pass0.bytes as f64;
    let floor = MS as f64 + (300.0 + 900.0) * PAGE as f64 * ns_per_byte;
    assert!(report.estimated_ns as f64 >= floor * 0.999, "{report:?}");
    assert!(report.estimated_ns > 300 * MS, "{report:?}");
    // With 100 pages queued (26 ms) it fits, and the pause, queue
    // included, keeps the limit.
    model.backlog = 100 * PAGE;
    let r = model.run(limit(300, 4));
    let stats = r.result.unwrap();
    assert!(stats.downtime_ns <= 300 * MS, "{stats:?}");
    assert!(
        stats.downtime_ns >= stats.pause.estimated_ns / 100 * 97,
        "{stats:?}"
    );
    assert_eq!(stats.pause.backlog_bytes, 100 * PAGE);
    // The parts follow each other and make up the pause; the sending
    // (queue and harvest apart) is nearly all of it in this model.
    let p = stats.pause;
    let parts =
        p.stop_ns + p.harvest_ns + p.send_ns + p.device_ns + p.flush_ns + p.ack_ns + p.handover_ns;
    assert_eq!(parts, stats.downtime_ns, "{p:?}");
    assert_eq!(p.harvest_ns, MS, "{p:?}");
    assert!(p.send_ns >= (100 + 900) * PAGE * 64, "{p:?}");
}

#[test]
fn bytes_the_page_channels_hold_back_count_in_the_estimate() {
    // As above, with the pages on a page channel that still holds 300
    // pages' worth when each pass ends: the pause would wait for them, so
    // the guest is not paused; with 100 pages held back it fits.
    let mut model = Model::new(64, MS, 900);
    model.channel_backlog = Some(300 * PAGE);
    let r = model.run(limit(300, 4));
    gave_up_with_the_guest_running(&r, 4);
    let report = r.host.reports[1];
    assert_eq!(report.unsent_bytes, 300 * PAGE);
    assert!(report.estimated_ns > 300 * MS, "{report:?}");
    // The main stream's queue and the channels' add up.
    model.backlog = 50 * PAGE;
    model.channel_backlog = Some(50 * PAGE);
    let r = model.run(limit(300, 4));
    // After the final pass's barrier nothing more goes on the channels:
    // closed, so the destination's receivers do not wait, idle, through
    // the end's verification.
    assert!(r.channels_closed);
    let stats = r.result.unwrap();
    assert_eq!(stats.pause.backlog_bytes, 100 * PAGE);
    assert!(stats.downtime_ns <= 300 * MS, "{stats:?}");
}

#[test]
fn the_estimate_uses_the_slowest_stretch_of_the_pass() {
    // A 64 MiB block over a link that sends every other 16 MiB at a third
    // of its speed (16 and 48 ns per byte, 32 on average). Pass 0 sees
    // both; the estimate must assume the pause falls on a slow stretch.
    let mut model = Model::new(16, MS, 1000);
    model.block_pages = 16384;
    model.slow_ns_per_byte = Some(48);
    let r = model.run(limit(180, 3));
    let pass0 = r.host.reports[0];
    let slow = 1e9 / 48.0;
    assert!(
        pass0.slowest_bandwidth <= slow * 1.05 && pass0.slowest_bandwidth >= slow * 0.95,
        "{pass0:?}"
    );
    assert!(pass0.bandwidth >= slow * 1.3, "{pass0:?}");
    // 1000 pages: 131 ms at the average rate would fit 162 ms, but 197 ms
    // at the slow one does not: the guest keeps running.
    assert!(
        pass0.estimated_ns >= 1000 * PAGE * 48 * 95 / 100,
        "{pass0:?}"
    );
    gave_up_with_the_guest_running(&r, 3);
    // 700 pages (138 ms even when slow) fit: the engine switches over
    // within the limit.
    model.shapes[0].pages = 700;
    let r = model.run(limit(180, 3));
    let stats = r.result.unwrap();
    assert!(stats.downtime_ns <= 180 * MS, "{stats:?}");
}

#[test]
fn a_sparse_set_is_estimated_at_what_its_runs_cost() {
    // Each write costs 20 µs besides 1 ns per byte, and a run of pages is
    // two writes (its record, its pages). Pass 1 sends 4096 pages in
    // pairs; then the guest dirties 5000 single pages, apart, per pass.
    // Per byte, the pairs cost about 5.9 ns, and 5000 singles would take
    // 120 ms; each single costs 44 µs, though: 220 ms. The estimate after
    // pass 1 must not take the pairs' cost per byte for the singles.
    // Pass 0 runs into slow stretches (48 ns per byte), so the pairs do
    // not fit after it; the link is fast (1 ns per byte) from then on.
    let mut model = Model::new(1, MS, 0);
    model.block_pages = 16384;
    model.ns_per_write = 20_000;
    model.slow_ns_per_byte = Some(48);
    model.slow_until = 64 * MIB;
    model.shapes = vec![
        Shape {
            pages: 4096,
            run_len: 2,
            stride: 6,
        },
        Shape {
            pages: 5000,
            run_len: 1,
            stride: 3,
        },
    ];
    // Pass 1's estimate, with a 200 ms limit (180 ms budget): the guest
    // keeps running.
    let r = model.run(limit(200, 2));
    let pass1 = r.host.reports[1];
    assert_eq!((pass1.remaining, pass1.remaining_runs), (5000, 5000));
    assert_eq!(pass1.runs, 2048);
    assert!(pass1.estimated_ns >= 5000 * 44_000, "{pass1:?}");
    gave_up_with_the_guest_running(&r, 2);
    // With 300 ms (270 ms budget) it fits, and the pause keeps the limit.
    let r = model.run(limit(300, 2));
    let stats = r.result.unwrap();
    assert!(stats.downtime_ns <= 300 * MS, "{stats:?}");
    assert!(stats.downtime_ns >= 5000 * 44_000, "{stats:?}");
}

#[test]
fn with_page_channels_the_main_stream_carries_a_run_at_least_every_quarter_second() {
    // A 256 MiB pass at 20 ns per byte: about 5.4 s of model time on the
    // channels. A destination reading the main stream with a timeout must
    // see it move all along, so a run goes there at least every
    // MAIN_STREAM_RUN_INTERVAL_NS; the channels still carry nearly all.
    let mut model = Model::new(20, MS, 0);
    model.block_pages = 65536;
    model.channel_backlog = Some(0);
    let r = model.run(limit(300, 1));
    let pass0 = r.host.reports[0];
    assert!(pass0.duration_ns > 5_000 * MS, "{pass0:?}");
    // The pass began after the setup's harvest (1 ms) and the header.
    let first = *r
        .main_runs_at
        .first()
        .expect("the main stream carried no run");
    assert!(
        first < 2 * MS,
        "the pass's first run goes on the main stream"
    );
    let pass0_end = first + pass0.duration_ns;
    let runs: Vec<u64> = r
        .main_runs_at
        .iter()
        .copied()
        .filter(|&t| t < pass0_end)
        .collect();
    let longest_run_ns = 64 * PAGE * 20 * 4; // far more than any one run
    for gap in runs.windows(2).map(|w| w[1] - w[0]) {
        assert!(
            gap <= MAIN_STREAM_RUN_INTERVAL_NS + longest_run_ns,
            "the main stream was quiet for {gap} ns: {runs:?}"
        );
    }
    assert!(
        pass0_end - runs[runs.len() - 1] <= MAIN_STREAM_RUN_INTERVAL_NS + longest_run_ns,
        "quiet at the end of the pass: {runs:?}"
    );
    let on_main = pass0.pages_sent - r.channel_pages;
    assert_eq!(
        on_main,
        runs.len() as u64 * 64,
        "runs of 64 pages: {runs:?}"
    );
    assert!(r.channel_pages > 65536 * 97 / 100, "{}", r.channel_pages);
    // Each is flushed at once: a run of zero pages is a short record that
    // would otherwise wait in a writer's queue.
    assert_eq!(r.most_unflushed_runs, 1);
}
