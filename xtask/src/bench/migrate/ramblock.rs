//! One `ramblock migrate --json` run: the same guest loop on ramblock's own
//! KVM VM, migrated to a destination in the same process over loopback TCP.

use super::image::Variant;
use super::{Measured, Outcome, Prep, MIGRATION_TIMEOUT};
#[cfg(test)]
use crate::bench::ramblock_run::parse_summary;
use crate::bench::ramblock_run::{migrate_json, RunFailure, Summary};
use std::path::Path;
use std::time::Duration;

/// Runs `binary migrate` for a `size`-byte guest doing `variant`.
///
/// The dirty-log mode is `manual` (bitmap plus `KVM_CLEAR_DIRTY_LOG`), the
/// one QEMU uses by default; the downtime limit is QEMU's, and there is no
/// bandwidth cap on either side. The destination preallocates or not as
/// `prep` says.
pub fn migrate(binary: &Path, size: u64, variant: Variant, prep: Prep) -> Outcome {
    let workload = match variant {
        Variant::Increment => "increment",
        Variant::Idle => "idle",
    };
    let mut args = vec![
        "--dirty-log".to_string(),
        "manual".to_string(),
        "--workload".to_string(),
        workload.to_string(),
        format!("--size={}M", size >> 20),
        format!("--downtime-ms={}", super::qemu::DOWNTIME_LIMIT_MS),
    ];
    if prep == Prep::Lazy {
        args.push("--lazy-destination".into());
    }
    // Migration, warm-up and the byte-for-byte check all count against the
    // timeout here; QEMU's clock starts at `migrate`, so this is generous to
    // QEMU, never to ramblock.
    let timeout = MIGRATION_TIMEOUT + Duration::from_secs(30);
    match migrate_json(binary, &args, timeout)
        .and_then(|s| measured(&s).map_err(RunFailure::Failed))
    {
        Ok(m) => Outcome::Done(m),
        Err(RunFailure::TimedOut) => Outcome::TimedOut,
        Err(RunFailure::Failed(e)) => Outcome::Failed(e),
    }
}

/// The figures of a summary line.
fn measured(s: &Summary) -> Result<Measured, String> {
    Ok(Measured {
        total_ms: s.float("total_ms")?,
        downtime_ms: s.float("downtime_ms")?,
        setup_ms: s.float("setup_ms")?,
        bytes: s.int("bytes")?,
        pages: s.int("pages")?,
        zero_pages: s.int("zero_pages")?,
        passes: s.int("passes")?,
        mode: s.value["mode"].as_str().unwrap_or("?").to_string(),
        guest_passes: s.int("guest_progress")?,
        rate_before: s.float("guest_rate_before")?,
        verified: s.value["verified"].as_bool() == Some(true),
    })
}

/// Reads the summary line `ramblock migrate --json` prints.
#[cfg(test)]
fn parse(stdout: &str) -> Result<Measured, String> {
    measured(&parse_summary(stdout)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse_and_errors_surface() {
        let ok = r#"{"role":"local","size":1073741824,"backing":"anonymous","mode":"manual","total_ms":1483.5,"setup_ms":0.025,"downtime_ms":203.6,"bytes":1690729708,"pages":412749,"zero_pages":253,"passes":3,"dirty_rate":70037.1,"guest_progress":4,"guest_rate_before":512.0,"guest_rate_during":2.7,"verified":true,"mismatch":null,"error":null}"#;
        let m = parse(&format!("noise\n{ok}\n")).unwrap();
        assert_eq!(
            (m.bytes, m.pages, m.zero_pages, m.passes),
            (1690729708, 412749, 253, 3)
        );
        assert!(m.verified && m.mode == "manual" && m.total_ms == 1483.5);
        let failed = ok.replace(r#""error":null"#, r#""error":"connection reset""#);
        assert!(parse(&failed).unwrap_err().contains("connection reset"));
        assert!(parse("").is_err());
    }
}
