//! The sending side: the pre-copy engine over a TCP connection, with the
//! guest paused, resumed and throttled through [`Guest`].

use crate::link::{Breaks, Link};
use crate::memory::{ledger_for, GuestRam};
use crate::options::MigrateOptions;
use crate::report::{pass_line, PassProgress};
use crate::workload::Guest;
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::dirty_log::DirtyLogSource;
use ramblock_core::migrate::channels::PageChannels;
use ramblock_core::migrate::{
    migrate_with_channels, MigrationHost, MigrationStats, PassReport, PrecopyConfig, ReturnEvent,
    DEFAULT_HANDOVER_WAIT_NS,
};
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::received_map::{read_received_map, scratch_words};
use ramblock_core::stream::resume_token::ResumeToken;
use ramblock_linux::channels::with_page_channels_connecting;
use ramblock_linux::transport::{Conn, Connector};
use ramblock_linux::zero_copy::ZeroCopyStats;
use std::ops::Range;
use std::time::{Duration, Instant};

/// The engine's view of this process.
struct ProgramHost<'g> {
    ram: &'g GuestRam,
    guest: &'g mut dyn Guest,
    t0: Instant,
    quiet: bool,
    progress: PassProgress,
    /// Every page sent, so the end checksums cost nothing in the downtime
    /// (shared with the page channels' threads).
    ledger: &'g Ledger,
    link: Link,
    /// The guest's device state (the `cpu` section), as sent at the
    /// switch-over.
    state: &'g mut Vec<u8>,
    /// Pass 0's bytes per second.
    pass0_bandwidth: f64,
    /// Every pass's report, in order.
    passes: Vec<PassReport>,
    /// The `cpu` section's header.
    cpu: SectionHeader,
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
    fn unsent_bytes(&mut self) -> u64 {
        // The main stream's queue; the engine adds the page channels'.
        self.link.unsent_bytes()
    }
    fn ledger(&mut self) -> Option<&mut dyn PageLedger> {
        Some(&mut self.ledger)
    }
    fn pass_done(&mut self, report: &PassReport) {
        if report.pass == 0 {
            self.pass0_bandwidth = report.bandwidth;
        }
        self.passes.push(*report);
        if !self.quiet {
            pass_line(report);
        }
    }
    fn pass_progress(&mut self, so_far: &PassReport) {
        if !self.quiet {
            let now = self.now_ns();
            self.progress.update(so_far, now);
        }
    }
    fn device_section(&mut self, index: usize) -> Option<(SectionHeader, &[u8])> {
        // The switch-over (pre-copy, or the Postcopy record): the vCPU,
        // saved once (the engine asks more than once).
        if index != 0 {
            return None;
        }
        if self.state.is_empty() {
            *self.state = self.guest.save_state();
        }
        (!self.state.is_empty()).then(|| (self.cpu.clone(), self.state.as_slice()))
    }
    fn handover_wait_ns(&mut self) -> u64 {
        self.link.set_ack_timeout(HANDOVER_TIMEOUT);
        HANDOVER_TIMEOUT.as_nanos() as u64
    }
    fn return_message(&mut self, wait_ns: u64) -> ReturnEvent {
        self.link.next_event(Duration::from_nanos(wait_ns))
    }
    fn reconnect(&mut self) -> bool {
        self.link.reconnect()
    }
    fn received_map(&mut self, missing: &mut dyn FnMut(&str, Range<u64>)) -> bool {
        let Ok(stream) = self.link.stream() else {
            return false;
        };
        let mut runs = Vec::new();
        let read = {
            let view = self.ram.read();
            let mut scratch = vec![0u64; scratch_words(&view)];
            read_received_map(&mut IoStream(stream), &view, &mut scratch, |b, r| {
                runs.push((b.name().to_string(), r))
            })
        };
        match read {
            Ok(_) => {
                for (name, pages) in runs {
                    missing(&name, pages);
                }
                self.link.read_requests();
                true
            }
            Err(e) => {
                eprintln!("post-copy: bad received map from the destination: {e}");
                false
            }
        }
    }
    fn postcopy_started(&mut self) {
        self.link.postcopy_started();
    }
    fn resume_token(&mut self) -> Option<ResumeToken> {
        self.link.token()
    }
}

/// How long the source waits, after the destination verified the RAM, for
/// its word that the guest runs there (the library's default).
const HANDOVER_TIMEOUT: Duration = Duration::from_nanos(DEFAULT_HANDOVER_WAIT_NS);

/// The name of the vCPU's device-state section (`VcpuState::to_bytes`).
pub const CPU_SECTION: &str = "cpu";

/// The engine configuration the options ask for.
pub fn config(opts: &MigrateOptions) -> PrecopyConfig {
    PrecopyConfig {
        downtime_limit_ns: opts.downtime_ms * 1_000_000,
        max_passes: opts.max_passes.max(1),
        bandwidth_limit: (opts.bandwidth_mib > 0).then_some(opts.bandwidth_mib << 20),
        auto_converge: !opts.no_auto_converge,
        postcopy_after: opts.postcopy,
    }
}

/// What the source sent besides pages.
#[derive(Debug, Default)]
pub struct Sent {
    /// The engine's totals.
    pub stats: MigrationStats,
    /// The device state sent at the switch-over: the vCPU's `cpu`
    /// section, as a pre-copy `Section` record or in the `Postcopy` record
    /// (empty without a vCPU).
    pub device_state: Vec<u8>,
    /// Pass 0's throughput, bytes per second (0 if it never ended).
    pub pass0_bandwidth: f64,
    /// Every pass's report, in order (the final one included).
    pub passes: Vec<PassReport>,
    /// With `--zero-copy`: what the writer sent how (None without).
    pub zero_copy: Option<ZeroCopyStats>,
}

/// Migrates `ram` over `stream`, made by `connector`. On a pre-copy failure
/// the guest runs on (the engine resumed it); after post-copy started it
/// stays paused (it runs on the destination). The error says what
/// happened.
pub fn send<D: DirtyLogSource>(
    ram: &GuestRam,
    source: &mut D,
    guest: &mut dyn Guest,
    stream: Conn,
    connector: &Connector,
    opts: &MigrateOptions,
) -> Result<Sent, String> {
    let breaks = opts.break_postcopy.map(Breaks::new);
    let resume = opts.resume || breaks.is_some();
    let (link, mut out) = Link::new(
        stream,
        connector.clone(),
        resume,
        breaks,
        opts.zero_copy,
        opts.peer_timeout(),
    )?;
    let mut ack = link.ack_reader()?;
    let mut device_state = Vec::new();
    let ledger = ledger_for(ram);
    // `outgoing` resolved the count (the default where it was not given).
    let channels = opts.channels.unwrap_or(0);
    let mut host = ProgramHost {
        ram,
        guest,
        t0: Instant::now(),
        quiet: opts.json,
        progress: PassProgress::new(),
        ledger: &ledger,
        link,
        state: &mut device_state,
        pass0_bandwidth: 0.0,
        passes: Vec::new(),
        cpu: SectionHeader {
            name: SectionName::new(CPU_SECTION).map_err(|e| e.to_string())?,
            instance_id: 0,
            version: 1,
            len: 0,
        },
    };
    let mut buf = vec![0u8; 64 * 4096];
    let mut run = |channels: Option<&mut dyn PageChannels>| {
        let cfg = config(opts);
        migrate_with_channels(
            ram, source, &mut out, &mut ack, &mut host, cfg, &mut buf, channels,
        )
    };
    // Each channel connects on its own thread while the engine sends the
    // header: the destination accepts the main stream first, and over TLS
    // a channel's handshake waits for that.
    let connect = || connector.connect().map_err(std::io::Error::other);
    let result = if channels == 0 {
        run(None)
    } else {
        with_page_channels_connecting(ram, Some(&ledger), channels, &connect, |ch| run(Some(ch)))
            .map_err(|e| format!("cannot start the page channels: {e}"))?
    };
    let postcopy_began = host.link.postcopy_began();
    let pass0_bandwidth = host.pass0_bandwidth;
    let passes = std::mem::take(&mut host.passes);
    let zero_copy = host.link.zero_copy_stats();
    drop(host);
    result
        .map(|stats| Sent {
            stats,
            device_state,
            pass0_bandwidth,
            passes,
            zero_copy,
        })
        .map_err(|e| {
            // After the switch the engine leaves the guest paused, unless
            // the destination refused before it could have started it.
            let kept = postcopy_began && !e.refused_before_the_guest_started();
            match e.to_string() {
                // `MigrateError::PostcopyLost` says so itself.
                text if kept && !text.contains(GUEST_KEPT) => {
                    format!("{text}; post-copy had begun, so {GUEST_KEPT}")
                }
                text => text,
            }
        })
}

/// What a failure after the switch to post-copy says of the source guest
/// (as `MigrateError::PostcopyLost` does): it stays paused, never resumed.
pub const GUEST_KEPT: &str = "the source keeps the paused guest";
