//! `cargo xtask bench`: runs criterion benches, then prints each figure's
//! ratio to its baseline.
//!
//! The naming protocol the table relies on: each figure is one criterion
//! group holding exactly one function named `baseline` and one or more
//! others; each other function is reported as median(it) / median(baseline).
//! See [`report`] for where the numbers are read from.

mod migrate;
mod report;

use crate::Error;
use std::process::ExitCode;
use std::time::SystemTime;
use xshell::cmd;

const USAGE: &str = "usage: bench [--report-only] [-p CRATE | CRATE | FILTER]";

/// What to bench.
enum Selection {
    /// Every crate in the workspace.
    Workspace,
    /// One workspace crate.
    Package(String),
    /// Benchmarks whose id matches a criterion filter, in every crate.
    Filter(String),
}

/// `cargo xtask bench [--report-only] [-p CRATE | CRATE | FILTER]` and
/// `cargo xtask bench migrate ...`.
pub fn run(args: &[String]) -> Result<ExitCode, Error> {
    if args.first().is_some_and(|a| a == "migrate") {
        return Ok(migrate::run(&args[1..]));
    }
    let mut report_only = false;
    let mut selection = Selection::Workspace;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let chosen = match arg.as_str() {
            "--report-only" => {
                report_only = true;
                continue;
            }
            "-p" | "--package" => {
                Selection::Package(args.next().ok_or("`-p` needs a crate name")?.clone())
            }
            flag if flag.starts_with('-') => {
                return Err(format!("unknown option `{flag}`; {USAGE}").into())
            }
            name if is_workspace_crate(name) => Selection::Package(name.to_string()),
            filter => Selection::Filter(filter.to_string()),
        };
        if !matches!(selection, Selection::Workspace) {
            return Err("give at most one crate or filter".into());
        }
        selection = chosen;
    }

    let criterion_dir = report::criterion_dir();
    if report_only {
        report::print(&criterion_dir, None)?;
        return Ok(ExitCode::SUCCESS);
    }
    let started = SystemTime::now();
    let sh = crate::shell()?;
    let status = match &selection {
        Selection::Workspace => cmd!(sh, "cargo bench --workspace").run(),
        Selection::Package(p) => cmd!(sh, "cargo bench -p {p}").run(),
        Selection::Filter(f) => cmd!(sh, "cargo bench --workspace -- {f}").run(),
    };
    // Print what did get measured even when a bench failed part-way.
    report::print(&criterion_dir, Some(started))?;
    status?;
    Ok(ExitCode::SUCCESS)
}

/// Whether `name` is a crate directory of the workspace (members are named
/// after their directories).
fn is_workspace_crate(name: &str) -> bool {
    !name.contains('/')
        && crate::project_root()
            .join(name)
            .join("Cargo.toml")
            .is_file()
}
