//! Progress lines while a migration runs, and the closing summary (text or
//! JSON).

use ramblock_core::precopy::{MigrationStats, PassReport};
use std::fmt::Write as _;

/// Prints one line per pass on stderr.
pub fn pass_line(r: &PassReport) {
    // One write per line: stderr is unbuffered.
    let line = format!(
        "pass {:>2}: dirty {:>8} pages, sent {:>8} + {:>8} zero, {:>7.0} MiB/s, throttle {:>2}%, {:>8} left (~{} ms)",
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
    /// The error, if the migration failed.
    pub error: Option<String>,
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
        match (&self.verified, &self.mismatch) {
            (Some(true), _) => o.push_str("verified\n"),
            (Some(false), Some((block, page))) => {
                let _ = writeln!(o, "MISMATCH: first differing page is {page} of {block}");
            }
            _ => {}
        }
        o
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        let s = &self.stats;
        let esc = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
        let opt = |v: &Option<String>| {
            v.as_ref()
                .map_or("null".to_string(), |e| format!("\"{}\"", esc(e)))
        };
        format!(
            "{{\"role\":\"{}\",\"size\":{},\"backing\":\"{}\",\"mode\":\"{}\",\"total_ms\":{:.3},\"setup_ms\":{:.3},\"downtime_ms\":{:.3},\"bytes\":{},\"pages\":{},\"zero_pages\":{},\"passes\":{},\"dirty_rate\":{:.1},\"guest_progress\":{},\"verified\":{},\"mismatch\":{},\"error\":{}}}",
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
            self.verified.map_or("null".to_string(), |v| v.to_string()),
            opt(&self.mismatch.as_ref().map(|(b, p)| format!("{b} page {p}"))),
            opt(&self.error),
        )
    }
}
