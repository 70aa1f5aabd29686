//! One `ramblock migrate --json` run: the same guest loop on ramblock's own
//! KVM VM, migrated to a destination in the same process over loopback TCP.

use super::image::Variant;
use super::{Measured, Outcome, MIGRATION_TIMEOUT};
use serde_json::Value;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills the child on drop (timeouts and errors included).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `binary migrate` for a `size`-byte guest doing `variant`.
///
/// The dirty-log mode is `manual` (bitmap plus `KVM_CLEAR_DIRTY_LOG`), the
/// one QEMU uses by default; the downtime limit is QEMU's, and there is no
/// bandwidth cap on either side.
pub fn migrate(binary: &Path, size: u64, variant: Variant) -> Outcome {
    let workload = match variant {
        Variant::Increment => "increment",
        Variant::Idle => "idle",
    };
    let mut command = Command::new(binary);
    command
        .args([
            "migrate",
            "--json",
            "--dirty-log",
            "manual",
            "--workload",
            workload,
        ])
        .arg(format!("--size={}M", size >> 20))
        .arg(format!("--downtime-ms={}", super::qemu::DOWNTIME_LIMIT_MS))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return Outcome::Failed(format!("cannot run {}: {e}", binary.display())),
    };
    let mut guard = Guard(child);
    // Migration, warm-up and the byte-for-byte check all count against the
    // timeout here; QEMU's clock starts at `migrate`, so this is generous to
    // QEMU, never to ramblock.
    let deadline = Instant::now() + MIGRATION_TIMEOUT + Duration::from_secs(30);
    loop {
        match guard.0.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => return Outcome::TimedOut,
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Outcome::Failed(format!("waiting for ramblock failed: {e}")),
        }
    }
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = guard.0.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = guard.0.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    match parse(&stdout) {
        Ok(m) => Outcome::Done(m),
        Err(e) => Outcome::Failed(format!("{e}; stderr: {}", stderr.trim())),
    }
}

/// Reads the summary line `ramblock migrate --json` prints.
fn parse(stdout: &str) -> Result<Measured, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("ramblock printed no JSON summary: {stdout:?}"))?;
    let v: Value = serde_json::from_str(line).map_err(|e| format!("bad summary {line:?}: {e}"))?;
    if let Some(error) = v["error"].as_str() {
        return Err(format!("ramblock migration failed: {error}"));
    }
    let float = |k: &str| {
        v[k].as_f64()
            .ok_or_else(|| format!("summary has no {k}: {line}"))
    };
    let int = |k: &str| {
        v[k].as_u64()
            .ok_or_else(|| format!("summary has no {k}: {line}"))
    };
    Ok(Measured {
        total_ms: float("total_ms")?,
        downtime_ms: float("downtime_ms")?,
        setup_ms: float("setup_ms")?,
        bytes: int("bytes")?,
        pages: int("pages")?,
        zero_pages: int("zero_pages")?,
        passes: int("passes")?,
        mode: v["mode"].as_str().unwrap_or("?").to_string(),
        guest_passes: int("guest_progress")?,
        verified: v["verified"].as_bool() == Some(true),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_lines_parse_and_errors_surface() {
        let ok = r#"{"role":"local","size":1073741824,"backing":"anonymous","mode":"manual","total_ms":1483.5,"setup_ms":0.025,"downtime_ms":203.6,"bytes":1690729708,"pages":412749,"zero_pages":253,"passes":3,"dirty_rate":70037.1,"guest_progress":4,"verified":true,"mismatch":null,"error":null}"#;
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
