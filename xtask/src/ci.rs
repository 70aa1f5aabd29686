//! `cargo xtask ci`: the one check CI runs.
//!
//! Every step runs even after an earlier one failed, so the closing table
//! shows the whole picture; the exit status is non-zero if any step failed.
//! A step that cannot run on this host (a rustup target that cannot be
//! installed, no nightly for fuzzing) prints one loud `skipped:` line and is
//! marked skipped rather than failed. A test that skipped itself (no KVM,
//! hugepages or userfaultfd here) is echoed as a `skipped:` line with its
//! name after the run and counted in the table's note column.

use crate::skips::{self, Skip};
use crate::{fuzz, sanitize, tools, Error};
use std::process::ExitCode;
use std::time::Instant;
use xshell::{cmd, Shell};

/// Targets with no `std` at all: the core must build for both, a 64-bit one
/// and a 32-bit microcontroller without 64-bit atomics.
const NO_STD_TARGETS: [&str; 2] = ["x86_64-unknown-none", "thumbv7em-none-eabihf"];

/// How a step ended, when it did not fail.
pub enum Outcome {
    /// It ran and passed.
    Passed,
    /// It ran and passed; the note goes in the summary table.
    PassedWithNote(String),
    /// It could not run here, for the reason given.
    Skipped(String),
}

enum Status {
    Ok,
    Failed,
    Skipped,
}

struct StepRecord {
    name: String,
    status: Status,
    seconds: f64,
    note: String,
}

/// Runs steps and remembers how each went.
#[derive(Default)]
struct Steps(Vec<StepRecord>);

impl Steps {
    fn run(&mut self, name: &str, step: impl FnOnce() -> Result<Outcome, Error>) {
        println!("\n==> {name}");
        let start = Instant::now();
        let (status, note) = match step() {
            Ok(Outcome::Passed) => (Status::Ok, String::new()),
            Ok(Outcome::PassedWithNote(note)) => (Status::Ok, note),
            Ok(Outcome::Skipped(reason)) => {
                println!("skipped: {name}: {reason}");
                (Status::Skipped, String::new())
            }
            Err(e) => {
                println!("FAILED: {name}: {e}");
                (Status::Failed, String::new())
            }
        };
        self.0.push(StepRecord {
            name: name.to_string(),
            status,
            seconds: start.elapsed().as_secs_f64(),
            note,
        });
    }

    fn skip(&mut self, name: &str, reason: &str) {
        self.run(name, || Ok(Outcome::Skipped(reason.to_string())));
    }

    fn any_failed(&self) -> bool {
        self.0.iter().any(|s| matches!(s.status, Status::Failed))
    }

    fn print_summary(&self, total: f64) {
        let width = self
            .0
            .iter()
            .map(|s| s.name.len())
            .max()
            .unwrap_or(4)
            .max(4);
        println!(
            "\n{:<width$}  {:<7}  {:>8}  note",
            "step", "status", "seconds"
        );
        println!("{:-<width$}  {:-<7}  {:->8}  ----", "", "", "");
        for s in &self.0 {
            let status = match s.status {
                Status::Ok => "ok",
                Status::Failed => "FAILED",
                Status::Skipped => "skipped",
            };
            let line = format!(
                "{:<width$}  {status:<7}  {:>8.1}  {}",
                s.name, s.seconds, s.note
            );
            println!("{}", line.trim_end());
        }
        println!("{:-<width$}  {:-<7}  {:->8}  ----", "", "", "");
        let verdict = if self.any_failed() { "FAILED" } else { "ok" };
        println!("{:<width$}  {verdict:<7}  {total:>8.1}", "total");
    }
}

/// Runs every CI step; see the module docs.
pub fn run(args: &[String]) -> Result<ExitCode, Error> {
    if let Some(extra) = args.first() {
        return Err(format!("`ci` takes no arguments, got `{extra}`").into());
    }
    let sh = crate::shell()?;
    let start = Instant::now();
    let mut steps = Steps::default();

    steps.run("fmt", || passed(cmd!(sh, "cargo fmt --all --check").run()));
    steps.run("clippy", || {
        passed(cmd!(sh, "cargo clippy --workspace --all-targets -- -D warnings").run())
    });
    steps.run("doctests", || {
        passed(tools::run_merged(cmd!(
            sh,
            "cargo test --workspace --doc --no-fail-fast"
        )))
    });
    steps.run("rustdoc", || {
        let _flags = sh.push_env("RUSTDOCFLAGS", "-D warnings");
        passed(cmd!(sh, "cargo doc --workspace --no-deps").run())
    });
    for target in NO_STD_TARGETS {
        let names = [
            format!("core for {target}"),
            format!("core for {target} +alloc"),
        ];
        match tools::ensure_target(&sh, target) {
            Ok(None) => {
                steps.run(&names[0], || {
                    passed(cmd!(sh, "cargo build -p ramblock-core --target {target}").run())
                });
                steps.run(&names[1], || {
                    passed(
                        cmd!(
                            sh,
                            "cargo build -p ramblock-core --target {target} --features alloc"
                        )
                        .run(),
                    )
                });
            }
            Ok(Some(reason)) => names.iter().for_each(|n| steps.skip(n, &reason)),
            Err(e) => names
                .iter()
                .for_each(|n| steps.skip(n, &format!("target check failed: {e}"))),
        }
    }
    steps.run("fuzz smoke", || fuzz::smoke(&sh));
    steps.run("miri (core)", || sanitize::miri(&sh));
    steps.run("asan (linux, kvm)", || sanitize::asan(&sh));
    // Last, so the end of the log is the test summary and, when one fails,
    // nextest's repeat of its output (see .config/nextest.toml).
    steps.run("tests", || tests(&sh));

    steps.print_summary(start.elapsed().as_secs_f64());
    Ok(if steps.any_failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// The workspace's tests: nextest when installed (faster, runs test binaries
/// in parallel), plain `cargo test` otherwise. Doctests run in their own step.
fn tests(sh: &Shell) -> Result<Outcome, Error> {
    let skips = if tools::has_cargo_subcommand(sh, "nextest") {
        nextest_with_skips(cmd!(
            sh,
            "cargo nextest run --profile ci --workspace --no-fail-fast"
        ))?
    } else {
        println!("xtask: cargo-nextest is not installed; using cargo test");
        cargo_test_with_skips(cmd!(
            sh,
            "cargo test --workspace --lib --bins --tests --no-fail-fast -- --show-output"
        ))?
    };
    skips::print(&skips);
    Ok(Outcome::PassedWithNote(skips::note(&skips)))
}

/// Runs a `cargo nextest run --profile ci` command, whose JUnit report
/// keeps passing tests' output, and returns the tests that printed
/// `skipped:`. When tests fail, the error names the skips too, so the count
/// is not lost.
pub fn nextest_with_skips(cmd: xshell::Cmd<'_>) -> Result<Vec<Skip>, Error> {
    // nextest's store is under the workspace root (its `[store] dir`,
    // target/nextest), whatever `--target-dir` says.
    let junit = crate::project_root().join("target/nextest/ci/junit.xml");
    // A report left by an earlier run must not be read as this run's.
    let _ = std::fs::remove_file(&junit);
    let result = tools::run_merged(cmd);
    let skips = skips::from_junit(&junit);
    match (result, skips) {
        (Ok(()), Ok(skips)) => Ok(skips),
        (Ok(()), Err(e)) => Err(e.into()),
        (Err(e), Ok(skips)) => {
            skips::print(&skips);
            Err(format!("{e} ({})", or_none(&skips::note(&skips))).into())
        }
        (Err(e), Err(_)) => Err(e),
    }
}

/// Runs a `cargo test ... -- --show-output` command (libtest prints passing
/// tests' output after each binary) and returns the tests that printed
/// `skipped:`.
pub fn cargo_test_with_skips(cmd: xshell::Cmd<'_>) -> Result<Vec<Skip>, Error> {
    let (result, log) = tools::run_captured(cmd);
    let skips = skips::from_libtest_log(&log);
    match result {
        Ok(()) => Ok(skips),
        Err(e) => {
            skips::print(&skips);
            Err(format!("{e} ({})", or_none(&skips::note(&skips))).into())
        }
    }
}

fn or_none(note: &str) -> &str {
    if note.is_empty() {
        "no test skipped"
    } else {
        note
    }
}

fn passed<E: Into<Error>>(result: Result<(), E>) -> Result<Outcome, Error> {
    result.map(|()| Outcome::Passed).map_err(Into::into)
}
