//! `cargo xtask`: the project's tasks, one module each.
//!
//! - `cargo xtask ci`: everything CI checks (format, lints, tests, docs,
//!   `no_std` builds, a fuzz smoke run, Miri over the core's tests and
//!   AddressSanitizer over the host crates'), with a summary table at the end.
//! - `cargo xtask bench [--report-only] [-p CRATE | CRATE] [FILTER]`: criterion
//!   benches and the table of ratios against each figure's baseline.
//! - `cargo xtask fuzz TARGET [--seconds N]`: one cargo-fuzz target.

mod bench;
mod ci;
mod fuzz;
mod sanitize;
mod skips;
mod tools;

use std::path::PathBuf;
use std::process::ExitCode;

/// Errors of a task: a failed command or unreadable file, already explained.
pub type Error = Box<dyn std::error::Error>;

const USAGE: &str = "\
usage: cargo xtask <task>

tasks:
  ci                                  format, clippy, tests, docs, no_std builds, fuzz smoke,
                                      Miri (core), AddressSanitizer (linux, kvm)
  bench [--report-only] [-p CRATE | CRATE] [FILTER]
                                      run criterion benches and print ratios to baselines
  bench migrate [--sizes 1G,4G] [--workloads idle,increment] [--prep prealloc,lazy]
        [--qemu stream,multifd2,multifd4,zero-copy] [--ramblock stream,channels2,channels4]
        [--link loopback,10gbit,1gbit] [--runs N]
                                      ramblock vs QEMU live migration
  bench downtime [--runs 20] [--limit-ms 300] [-- ARGS...]
                                      does ramblock migrate keep its downtime limit
  bench postcopy [--runs N] [--size 1G]
                                      post-copy fault latency and guest stall vs pre-copy
  fuzz TARGET [--seconds N]           run one cargo-fuzz target (default 60 s)";

/// The workspace root: xtask lives one level below it.
pub fn project_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// The directory cargo builds into, as `cargo metadata` reports it: it
/// follows `CARGO_TARGET_DIR`, `build.target-dir` in a cargo config and
/// the workspace's default alike, so a binary cargo just built is found
/// wherever that is.
pub fn target_dir() -> Result<PathBuf, Error> {
    let output = std::process::Command::new(cargo())
        .current_dir(project_root())
        .args(["metadata", "--format-version", "1", "--no-deps"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run cargo metadata: {e}"))?;
    if !output.status.success() {
        return Err(format!("cargo metadata failed ({})", output.status).into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("cargo metadata printed no JSON: {e}"))?;
    metadata["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| "cargo metadata reports no target_directory".into())
}

/// The cargo that runs xtask (`CARGO`), or the one on `PATH`.
pub fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// A shell whose working directory is the workspace root.
pub fn shell() -> Result<xshell::Shell, Error> {
    let sh = xshell::Shell::new()?;
    sh.change_dir(project_root());
    Ok(sh)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("ci") => ci::run(rest),
        Some("bench") => bench::run(rest),
        Some("fuzz") => fuzz::run(rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => {
            eprintln!("xtask: unknown task `{other}`\n\n{USAGE}");
            Ok(ExitCode::from(2))
        }
        None => {
            eprintln!("{USAGE}");
            Ok(ExitCode::from(2))
        }
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: {e}");
        ExitCode::FAILURE
    })
}
