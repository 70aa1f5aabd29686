//! Progress lines while a migration runs, and the closing summary (text or
//! JSON).

use ramblock_core::migrate::{MigrationStats, PassReport};
use ramblock_linux::postcopy::LatencySummary;
use ramblock_linux::zero_copy::ZeroCopyStats;
use std::fmt::Write as _;
use std::io::IsTerminal;

/// Prints one line per pass on stderr (over the progress line, if any).
pub fn pass_line(r: &PassReport) {
    // One write per line: stderr is unbuffered.
    let line = format!(
        "{}pass {:>2}: dirty {:>8} pages, sent {:>8} + {:>8} zero, {:>7.0} MiB/s, throttle {:>2}%, {:>8} left (~{} ms)",
        if std::io::stderr().is_terminal() { "\r\x1b[K" } else { "" },
        r.pass,
        r.dirty_found,
        r.pages_sent,
        r.zero_pages,
        r.bandwidth / (1 << 20) as f64,
        r.throttle,
        r.remaining,
        r.estimated_ns / 1_000_000,
    );
    eprintln!("{line}");
}

/// Updates a progress line inside a long pass, on a terminal only (a log
/// keeps one line per pass), at most ten times a second.
pub struct PassProgress {
    terminal: bool,
    last_ns: u64,
}

impl PassProgress {
    pub fn new() -> PassProgress {
        PassProgress {
            terminal: std::io::stderr().is_terminal(),
            last_ns: 0,
        }
    }

    /// Shows `so_far` (a pass in progress) if a tenth of a second passed.
    pub fn update(&mut self, so_far: &PassReport, now_ns: u64) {
        if !self.terminal || now_ns < self.last_ns + 100_000_000 {
            return;
        }
        self.last_ns = now_ns;
        eprint!(
            "\r\x1b[Kpass {:>2}: {:>8} of {:>8} dirty pages sent, {:>7.0} MiB/s, {:.1} s",
            so_far.pass,
            so_far.pages_sent + so_far.zero_pages,
            so_far.dirty_found,
            so_far.bandwidth / (1 << 20) as f64,
            so_far.duration_ns as f64 / 1e9,
        );
    }
}

/// Everything the summary reports.
#[derive(Debug, Default)]
pub struct Summary {
    /// `source`, `destination` or `local`.
    pub role: &'static str,
    /// Guest RAM bytes.
    pub size: u64,
    /// Backing name.
    pub backing: String,
    /// Dirty-log mode (or "software" without KVM).
    pub mode: String,
    /// Engine totals (source side).
    pub stats: MigrationStats,
    /// Verification: Some(true) verified, Some(false) mismatch, None not checked.
    pub verified: Option<bool>,
    /// The first mismatching page, if any.
    pub mismatch: Option<(String, u64)>,
    /// Source guest progress during the migration (loop passes / pages).
    pub guest_progress: u64,
    /// Source guest progress per second just before the migration.
    pub guest_rate_before: f64,
    /// Pass 0's throughput in bytes per second (source side).
    pub pass0_bandwidth: f64,
    /// Every pass's report (source side), the final one included.
    pub passes: Vec<PassReport>,
    /// The error, if the migration failed.
    pub error: Option<String>,
    /// Post-copy: how long faulting pages waited (destination side).
    pub fault_latency: Option<LatencySummary>,
    /// Post-copy: connections resumed after a break (destination side).
    pub resumes: u32,
    /// Post-copy: the destination guest's progress (loop passes).
    pub destination_progress: Option<u64>,
    /// Pre-copy with a vCPU: whether the destination's vCPU, started from
    /// the shipped `cpu` section, continued the source's loop (None: not
    /// checked).
    pub destination_ran: Option<bool>,
    /// Pre-copy with a vCPU: the RAM-only downtime (source pause to the
    /// destination's acknowledgement); `stats.downtime_ns` then runs to
    /// the destination vCPU running.
    pub ram_downtime_ns: Option<u64>,
    /// `--local`: a local update (fds passed, no page copied).
    pub local: bool,
    /// `--local`: table sent to the destination ready (mapping, memslot,
    /// prefault), while the source guest runs.
    pub prepare_ns: Option<u64>,
    /// `--local`: of which the destination's prefault.
    pub prefault_ns: Option<u64>,
    /// `--local`: the source's switch-over (its pause) to the destination
    /// guest running.
    pub switchover_ns: Option<u64>,
    /// `--local`: the switch-over to the destination guest completing two
    /// loops.
    pub dest_two_loops_ns: Option<u64>,
    /// `--zero-copy`: what the source's writer sent how, and how much the
    /// kernel copied after all.
    pub zero_copy: Option<ZeroCopyStats>,
    /// Page channels beside the main stream: opened (source) or accepted
    /// as the source's header announced (destination).
    pub page_channels: Option<u32>,
}

impl Summary {
    /// Human-readable lines.
    pub fn text(&self) -> String {
        let s = &self.stats;
        let mut o = String::new();
        let ms = |ns: u64| ns as f64 / 1e6;
        let _ = writeln!(
            o,
            "{} migration of {} MiB ({} backing, {} dirty log)",
            self.role,
            self.size >> 20,
            self.backing,
            self.mode
        );
        if let Some(e) = &self.error {
            let _ = writeln!(o, "FAILED: {e}");
        }
        let _ = writeln!(o, "total time      {:>10.1} ms", ms(s.total_ns));
        let _ = writeln!(o, "setup time      {:>10.3} ms", ms(s.setup_ns));
        let _ = writeln!(o, "downtime        {:>10.1} ms", ms(s.downtime_ns));
        if let Some(ns) = self.ram_downtime_ns {
            let _ = writeln!(o, "  RAM only      {:>10.1} ms", ms(ns));
        }
        if let Some(ran) = self.destination_ran {
            let _ = writeln!(o, "dest. ran       {ran:>10}");
        }
        for (what, ns) in [
            ("prepare", self.prepare_ns),
            ("  prefault", self.prefault_ns),
            ("switch-over", self.switchover_ns),
            ("dest. 2 loops", self.dest_two_loops_ns),
        ] {
            if let Some(ns) = ns {
                let _ = writeln!(o, "{what:<16}{:>10.1} ms", ms(ns));
            }
        }
        let _ = writeln!(
            o,
            "bytes on wire   {:>10} ({:.1} MiB)",
            s.bytes,
            s.bytes as f64 / (1 << 20) as f64
        );
        let _ = writeln!(o, "normal pages    {:>10}", s.pages);
        let _ = writeln!(o, "zero pages      {:>10}", s.zero_pages);
        let _ = writeln!(o, "passes          {:>10}", s.passes);
        let _ = writeln!(o, "dirty rate      {:>10.0} pages/s", s.dirty_rate);
        let _ = writeln!(o, "guest progress  {:>10}", self.guest_progress);
        let _ = writeln!(
            o,
            "guest rate    {:>8.0}/s (before: {:.0}/s)",
            self.guest_rate_during(),
            self.guest_rate_before
        );
        if let Some(pc) = &s.postcopy {
            let _ = writeln!(
                o,
                "post-copy       {:>10} pages discarded, {} requests",
                pc.discarded, pc.requests
            );
            let _ = writeln!(o, "requested pages {:>10}", pc.requested_pages);
            let _ = writeln!(o, "background pages{:>10}", pc.background_pages);
            let _ = writeln!(o, "resumes         {:>10}", pc.resumes);
        }
        if let Some(l) = &self.fault_latency {
            let us = |ns: u64| ns as f64 / 1e3;
            let _ = writeln!(
                o,
                "fault latency   {:>10.0} us p50, {:.0} us p99, {:.0} us max ({} faults)",
                us(l.p50_ns),
                us(l.p99_ns),
                us(l.max_ns),
                l.faults
            );
            let _ = writeln!(
                o,
                "guest stall     {:>10.1} ms (downtime + fault waits)",
                ms(self.stall_ns())
            );
        }
        if let Some(p) = self.destination_progress {
            let _ = writeln!(o, "dest. progress  {p:>10}");
        }
        if let Some(z) = &self.zero_copy {
            let _ = writeln!(
                o,
                "zero-copy       {:>10} sends, {} MiB; kernel copied {} sends ({} MiB) after all",
                z.zero_copy_sends,
                z.zero_copy_bytes >> 20,
                z.copied_sends,
                z.copied_bytes >> 20
            );
        }
        match (&self.verified, &self.mismatch) {
            (Some(true), _) => o.push_str("verified\n"),
            (Some(false), Some((block, page))) => {
                let _ = writeln!(o, "MISMATCH: first differing page is {page} of {block}");
            }
            _ => {}
        }
        o
    }

    /// How long the guest could not run: the downtime, plus in post-copy
    /// the time its vCPU waited for faulting pages.
    pub fn stall_ns(&self) -> u64 {
        self.stats.downtime_ns + self.fault_latency.map_or(0, |l| l.total_wait_ns)
    }

    /// Source guest progress per second during the migration (while it
    /// ran on the source, the pause included).
    pub fn guest_rate_during(&self) -> f64 {
        match self.stats.total_ns {
            0 => 0.0,
            ns => self.guest_progress as f64 / (ns as f64 / 1e9),
        }
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let s = &self.stats;
        let pc = s.postcopy.unwrap_or_default();
        let l = self.fault_latency.unwrap_or_default();
        let postcopy = format!(
            ",\"postcopy\":{},\"discarded_pages\":{},\"requests\":{},\"requested_pages\":{},\"background_pages\":{},\"resumes\":{},\"faults\":{},\"fault_p50_us\":{:.1},\"fault_p99_us\":{:.1},\"fault_max_us\":{:.1},\"guest_stall_ms\":{:.3}",
            s.postcopy.is_some(),
            pc.discarded,
            pc.requests,
            pc.requested_pages,
            pc.background_pages,
            pc.resumes.max(self.resumes),
            l.faults,
            l.p50_ns as f64 / 1e3,
            l.p99_ns as f64 / 1e3,
            l.max_ns as f64 / 1e3,
            self.stall_ns() as f64 / 1e6,
        );
        let mut postcopy = postcopy;
        if let Some(ns) = self.ram_downtime_ns {
            postcopy.push_str(&format!(",\"ram_downtime_ms\":{:.3}", ns as f64 / 1e6));
        }
        if let Some(ran) = self.destination_ran {
            postcopy.push_str(&format!(",\"destination_ran\":{ran}"));
        }
        if self.local {
            postcopy.push_str(",\"local\":true");
        }
        for (key, ns) in [
            ("prepare_ms", self.prepare_ns),
            ("prefault_ms", self.prefault_ns),
            ("switchover_ms", self.switchover_ns),
            ("dest_two_loops_ms", self.dest_two_loops_ns),
        ] {
            if let Some(ns) = ns {
                postcopy.push_str(&format!(",\"{key}\":{:.3}", ns as f64 / 1e6));
            }
        }
        if s.postcopy.is_none() && s.downtime_ns > 0 && !self.local {
            postcopy.push_str(&pause_json(s));
        }
        if !self.passes.is_empty() {
            let passes: Vec<String> = self.passes.iter().map(pass_json).collect();
            postcopy.push_str(&format!(",\"pass_reports\":[{}]", passes.join(",")));
        }
        if let Some(n) = self.page_channels {
            postcopy.push_str(&format!(",\"page_channels\":{n}"));
        }
        if let Some(z) = &self.zero_copy {
            postcopy.push_str(&format!(
                ",\"zero_copy\":{{\"sends\":{},\"bytes\":{},\"completed_sends\":{},\"copied_sends\":{},\"copied_bytes\":{},\"plain_bytes\":{},\"no_buffer_waits\":{}}}",
                z.zero_copy_sends,
                z.zero_copy_bytes,
                z.completed_sends,
                z.copied_sends,
                z.copied_bytes,
                z.plain_bytes,
                z.no_buffer_waits
            ));
        }
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        let opt = |v: &Option<String>| {
            v.as_ref()
                .map_or("null".to_string(), |e| format!("\"{}\"", esc(e)))
        };
        format!(
            "{{\"role\":\"{}\",\"size\":{},\"backing\":\"{}\",\"mode\":\"{}\",\"total_ms\":{:.3},\"setup_ms\":{:.3},\"downtime_ms\":{:.3},\"bytes\":{},\"pages\":{},\"zero_pages\":{},\"passes\":{},\"dirty_rate\":{:.1},\"guest_progress\":{},\"guest_rate_before\":{:.1},\"guest_rate_during\":{:.1},\"pass0_mib_s\":{:.1},\"verified\":{},\"mismatch\":{},\"error\":{}{}}}",
            self.role,
            self.size,
            esc(&self.backing),
            self.mode,
            s.total_ns as f64 / 1e6,
            s.setup_ns as f64 / 1e6,
            s.downtime_ns as f64 / 1e6,
            s.bytes,
            s.pages,
            s.zero_pages,
            s.passes,
            s.dirty_rate,
            self.guest_progress,
            self.guest_rate_before,
            self.guest_rate_during(),
            self.pass0_bandwidth / (1 << 20) as f64,
            self.verified.map_or("null".to_string(), |v| v.to_string()),
            opt(&self.mismatch.as_ref().map(|(b, p)| format!("{b} page {p}"))),
            opt(&self.error),
            postcopy,
        )
    }
}

/// The switch-over's pause, part by part, as JSON members (ms).
fn pause_json(s: &MigrationStats) -> String {
    let p = &s.pause;
    let ms = |ns: u64| ns as f64 / 1e6;
    format!(
        ",\"pause\":{{\"estimated_ms\":{:.3},\"backlog_bytes\":{},\"stop_ms\":{:.3},\"harvest_ms\":{:.3},\"send_ms\":{:.3},\"device_ms\":{:.3},\"flush_ms\":{:.3},\"ack_ms\":{:.3},\"handover_ms\":{:.3},\"final_pages\":{}}}",
        ms(p.estimated_ns),
        p.backlog_bytes,
        ms(p.stop_ns),
        ms(p.harvest_ns),
        ms(p.send_ns),
        ms(p.device_ns),
        ms(p.flush_ns),
        ms(p.ack_ns),
        ms(p.handover_ns),
        s.final_pages,
    )
}

/// One pass's report as a JSON object.
fn pass_json(r: &PassReport) -> String {
    format!(
        "{{\"pass\":{},\"dirty_found\":{},\"pages\":{},\"zero_pages\":{},\"bytes\":{},\"duration_ms\":{:.3},\"mib_s\":{:.1},\"dirty_rate\":{:.1},\"remaining\":{},\"remaining_runs\":{},\"runs\":{},\"slowest_mib_s\":{:.1},\"unsent_bytes\":{},\"estimated_ms\":{:.3},\"throttle\":{}}}",
        r.pass,
        r.dirty_found,
        r.pages_sent,
        r.zero_pages,
        r.bytes,
        r.duration_ns as f64 / 1e6,
        r.bandwidth / (1 << 20) as f64,
        r.dirty_rate,
        r.remaining,
        r.remaining_runs,
        r.runs,
        r.slowest_bandwidth / (1 << 20) as f64,
        r.unsent_bytes,
        r.estimated_ns as f64 / 1e6,
        r.throttle,
    )
}
