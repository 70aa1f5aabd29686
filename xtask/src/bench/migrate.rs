//! `cargo xtask bench migrate`: the migration benchmark, which arrives with
//! the migration stream. Until then it says so and exits with status 2.

use std::process::ExitCode;

/// Runs the migration benchmark.
pub fn run(_args: &[String]) -> ExitCode {
    eprintln!("xtask: `bench migrate` is not yet available");
    ExitCode::from(2)
}
