//! `cargo xtask ci`: the one check CI runs.
//!
//! Every step runs even after an earlier one failed, so the closing table
//! shows the whole picture; the exit status is non-zero if any step failed.
//! A step that cannot run on this host (a rustup target that cannot be
//! installed, no nightly for fuzzing) prints one loud `skipped:` line and is
//! marked skipped rather than failed.

use crate::{fuzz, tools, Error};
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
}

/// Runs steps and remembers how each went.
#[derive(Default)]
struct Steps(Vec<StepRecord>);

impl Steps {
    fn run(&mut self, name: &str, step: impl FnOnce() -> Result<Outcome, Error>) {
        println!("\n==> {name}");
        let start = Instant::now();
        let status = match step() {
            Ok(Outcome::Passed) => Status::Ok,
            Ok(Outcome::Skipped(reason)) => {
                println!("skipped: {name}: {reason}");
                Status::Skipped
            }
            Err(e) => {
                println!("FAILED: {name}: {e}");
                Status::Failed
            }
        };
        self.0.push(StepRecord {
            name: name.to_string(),
            status,
            seconds: start.elapsed().as_secs_f64(),
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
        println!("\n{:<width$}  {:<7}  {:>8}", "step", "status", "seconds");
        println!("{:-<width$}  {:-<7}  {:->8}", "", "", "");
        for s in &self.0 {
            let status = match s.status {
                Status::Ok => "ok",
                Status::Failed => "FAILED",
                Status::Skipped => "skipped",
            };
            println!("{:<width$}  {status:<7}  {:>8.1}", s.name, s.seconds);
        }
        println!("{:-<width$}  {:-<7}  {:->8}", "", "", "");
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
    if tools::has_cargo_subcommand(sh, "nextest") {
        passed(tools::run_merged(cmd!(
            sh,
            "cargo nextest run --workspace --no-fail-fast"
        )))
    } else {
        println!("xtask: cargo-nextest is not installed; using cargo test");
        passed(tools::run_merged(cmd!(
            sh,
            "cargo test --workspace --lib --bins --tests --no-fail-fast"
        )))
    }
}

fn passed<E: Into<Error>>(result: Result<(), E>) -> Result<Outcome, Error> {
    result.map(|()| Outcome::Passed).map_err(Into::into)
}
