//! The sending side: the pre-copy engine over a TCP connection, with the
//! guest paused, resumed and throttled through [`Guest`].

use crate::memory::GuestRam;
use crate::options::MigrateOptions;
use crate::report::pass_line;
use crate::workload::Guest;
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::dirty_log::DirtyLogSource;
use ramblock_core::precopy::{migrate, MigrationHost, MigrationStats, PassReport, PrecopyConfig};
use ramblock_core::stream::io::IoStream;
use std::io::BufWriter;
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Socket buffering: smaller than a 64-page record, so record payloads go
/// straight between the socket and the page buffer, and only the small
/// record headers are coalesced.
pub const STREAM_BUFFER: usize = 64 << 10;

/// How long the source waits for the destination's acknowledgement after
/// the end record (verifying checksums takes well under a second per GiB).
const ACK_TIMEOUT: Duration = Duration::from_secs(120);

/// The engine's view of this process.
struct ProgramHost<'g> {
    guest: &'g mut dyn Guest,
    t0: Instant,
    quiet: bool,
    /// Every page sent, so the end checksums cost nothing in the downtime.
    ledger: Ledger,
}

impl MigrationHost for ProgramHost<'_> {
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }
    fn pause_guest(&mut self) {
        self.guest.pause();
    }
    fn resume_guest(&mut self) {
        self.guest.resume();
    }
    fn set_throttle(&mut self, percent: u8) {
        self.guest.set_throttle(percent);
    }
    fn ledger(&mut self) -> Option<&mut dyn PageLedger> {
        Some(&mut self.ledger)
    }
    fn pass_done(&mut self, report: &PassReport) {
        if !self.quiet {
            pass_line(report);
        }
    }
}

/// The engine configuration the options ask for.
pub fn config(opts: &MigrateOptions) -> PrecopyConfig {
    PrecopyConfig {
        downtime_limit_ns: opts.downtime_ms * 1_000_000,
        max_passes: opts.max_passes.max(1),
        bandwidth_limit: (opts.bandwidth_mib > 0).then_some(opts.bandwidth_mib << 20),
        auto_converge: !opts.no_auto_converge,
        postcopy_after: None,
    }
}

/// Migrates `ram` over `stream`. On failure the guest runs on (the engine
/// resumed it) and the error says what happened.
pub fn send<D: DirtyLogSource>(
    ram: &GuestRam,
    source: &mut D,
    guest: &mut dyn Guest,
    stream: TcpStream,
    opts: &MigrateOptions,
) -> Result<MigrationStats, String> {
    let writer = stream
        .try_clone()
        .map_err(|e| format!("cannot clone the connection: {e}"))?;
    let mut out = IoStream(BufWriter::with_capacity(STREAM_BUFFER, writer));
    // A destination that goes silent must not hang the source forever.
    stream
        .set_read_timeout(Some(ACK_TIMEOUT))
        .map_err(|e| format!("cannot set a timeout on the connection: {e}"))?;
    let mut ack = IoStream(stream);
    let mut host = ProgramHost {
        guest,
        t0: Instant::now(),
        quiet: opts.json,
        ledger: Ledger::new(),
    };
    let mut buf = vec![0u8; 64 * 4096];
    migrate(
        ram,
        source,
        &mut out,
        &mut ack,
        &mut host,
        config(opts),
        &mut buf,
    )
    .map_err(|e| e.to_string())
}
