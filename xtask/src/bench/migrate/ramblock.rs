//! One `ramblock migrate --json` run: the same guest loop on ramblock's own
//! KVM VM, migrated to a destination in the same process over loopback TCP,
//! with its pages on the main stream or on page channels beside it.

use super::image::Variant;
use super::link::{Link, Shape};
use super::{Measured, Outcome, Prep, MIGRATION_TIMEOUT};
#[cfg(test)]
use crate::bench::ramblock_run::parse_summary;
use crate::bench::ramblock_run::{migrate_json, migrate_json_with, RunFailure, Summary};
use std::path::Path;
use std::time::Duration;

/// The most page channels `--ramblock channelsN` takes: more than the
/// bench's QEMU columns have (multifd 4) and than a small machine has
/// cores; `ramblock migrate` itself takes up to 64.
pub const MAX_CHANNELS: u32 = 16;

/// How ramblock sends: on its one stream, or with page channels beside it
/// (`ramblock migrate --channels N`, always given, 0 for the one stream).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Page channels beside the main stream; 0: pages on the main stream.
    pub channels: u32,
}

impl Config {
    /// Pages on the main stream, the default column.
    pub const STREAM: Config = Config { channels: 0 };

    /// Parses the name `--ramblock` takes: `stream`, or `channelsN` with N
    /// in 1..=[`MAX_CHANNELS`].
    pub fn parse(s: &str) -> Result<Config, String> {
        if s == "stream" {
            return Ok(Config::STREAM);
        }
        s.strip_prefix("channels")
            // Digits only: `u32::from_str` would also take `+4`.
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse::<u32>().ok())
            .filter(|n| (1..=MAX_CHANNELS).contains(n))
            .map(|channels| Config { channels })
            .ok_or_else(|| {
                format!(
                    "ramblock configuration {s:?}: use stream or channelsN with N in 1..={MAX_CHANNELS} (channels2, channels4)"
                )
            })
    }

    /// A column name for the table: `ramblock`, `ramblock ch 4`.
    pub fn name(self) -> String {
        match self.channels {
            0 => "ramblock".into(),
            n => format!("ramblock ch {n}"),
        }
    }
}

/// Runs `binary migrate` for a `size`-byte guest doing `variant`, sending
/// as `config` says.
///
/// The dirty-log mode is `manual` (bitmap plus `KVM_CLEAR_DIRTY_LOG`), the
/// one QEMU uses by default; the downtime limit is QEMU's, and there is no
/// bandwidth cap on either side. The destination preallocates or not as
/// `prep` says. On loopback the destination runs in the same process; over
/// a shaped link it is a second process (`--incoming`) in the
/// destination's namespace, and the source's summary counts only when the
/// destination's says it received and checked everything too. The page
/// channel count is always given (0 for the one stream, whatever the
/// program's default), to both processes alike.
pub fn migrate(
    binary: &Path,
    size: u64,
    variant: Variant,
    config: Config,
    prep: Prep,
    link: &Link,
) -> Outcome {
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
    // Always, 0 too: the program's default is the host's count, and the
    // `stream` column measures the one stream. In `args`, which both
    // processes of a shaped link get (the destination takes the count
    // from the source's header; given to it, it is a check).
    args.push(format!("--channels={}", config.channels));
    // Migration, warm-up and the byte-for-byte check all count against the
    // timeout here; QEMU's clock starts at `migrate`, so this is generous to
    // QEMU, never to ramblock.
    let timeout = MIGRATION_TIMEOUT + Duration::from_secs(30);
    let result = if link.shape() == Shape::Loopback {
        if prep == Prep::Lazy {
            args.push("--lazy-destination".into());
        }
        migrate_json(binary, &args, timeout)
    } else {
        two_processes(binary, &args, prep, link, timeout)
    };
    match result.and_then(|s| measured(&s).map_err(RunFailure::Failed)) {
        Ok(m) => Outcome::Done(m),
        Err(RunFailure::TimedOut) => Outcome::TimedOut,
        Err(RunFailure::Failed(e)) => Outcome::Failed(e),
    }
}

/// A destination process listening in its namespace and a source process
/// migrating to it; the source's summary.
fn two_processes(
    binary: &Path,
    args: &[String],
    prep: Prep,
    link: &Link,
    timeout: Duration,
) -> Result<Summary, RunFailure> {
    let endpoint = format!(
        "tcp:{}:{}",
        link.dest_addr(),
        47_000 + std::process::id() % 10_000
    );
    let mut dest_args = args.to_vec();
    dest_args.extend(["--incoming".to_string(), endpoint.clone()]);
    if prep == Prep::Lazy {
        dest_args.push("--lazy-destination".into());
    }
    let dest_command = link.dest_command(binary);
    // The destination preallocates before it listens; the source retries
    // its connection for 10 s meanwhile.
    let dest = std::thread::spawn(move || migrate_json_with(dest_command, &dest_args, timeout));
    let mut source_args = args.to_vec();
    source_args.extend(["--to".to_string(), endpoint]);
    let source = migrate_json_with(link.source_command(binary), &source_args, timeout);
    let dest = dest
        .join()
        .unwrap_or_else(|_| Err(RunFailure::Failed("destination thread panicked".into())));
    match (source, dest) {
        (Ok(s), Ok(_)) => Ok(s),
        (Err(e), _) => Err(e),
        (Ok(_), Err(RunFailure::Failed(e))) => {
            Err(RunFailure::Failed(format!("the destination failed: {e}")))
        }
        (Ok(_), Err(RunFailure::TimedOut)) => Err(RunFailure::TimedOut),
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
        pass0_bytes_per_s: s.float("pass0_mib_s").ok().map(|m| m * (1 << 20) as f64),
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

    #[test]
    fn configurations_parse() {
        assert_eq!(Config::parse("stream"), Ok(Config::STREAM));
        assert_eq!(Config::parse("channels4"), Ok(Config { channels: 4 }));
        assert_eq!(Config::parse("channels16"), Ok(Config { channels: 16 }));
        assert_eq!(Config::parse("channels1").unwrap().name(), "ramblock ch 1");
        assert_eq!(Config::STREAM.name(), "ramblock");
        for bad in [
            "channels0",
            "channels17",
            "channels",
            "channels+4",
            "channels 4",
            "ch4",
            "multifd4",
            "",
        ] {
            assert!(Config::parse(bad).is_err(), "{bad:?}");
        }
    }
}
