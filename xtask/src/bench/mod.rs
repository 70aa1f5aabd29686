//! `cargo xtask bench`: runs criterion benches, then prints each figure's
//! ratio to its baseline.
//!
//! The naming protocol the table relies on: each figure is one criterion
//! group holding exactly one function named `baseline` and one or more
//! others; each other function is reported as median(it) / median(baseline).
//! See [`report`] for where the numbers are read from.

mod downtime;
pub(crate) mod migrate;
mod opt;
mod postcopy;
mod ramblock_run;
mod report;
mod snapshot;
mod tls;

use crate::Error;
use std::process::ExitCode;
use std::time::SystemTime;
use xshell::cmd;

const USAGE: &str = "usage: bench [--report-only] [-p CRATE | CRATE] [FILTER]";

/// `cargo xtask bench [--report-only] [-p CRATE | CRATE] [FILTER]`,
/// and `cargo xtask bench migrate|postcopy|downtime|tls|snapshot ...`.
/// Without a crate every workspace crate is benched; a filter is handed to
/// criterion (a substring of the benchmark id).
pub fn run(args: &[String]) -> Result<ExitCode, Error> {
    if args.first().is_some_and(|a| a == "migrate") && args.iter().any(|a| a == "--local") {
        return Ok(task(
            "migrate --local",
            &args[1..],
            migrate::local::parse,
            migrate::local::bench,
        ));
    }
    if args.first().is_some_and(|a| a == "migrate") {
        return Ok(task("migrate", &args[1..], migrate::parse, migrate::bench));
    }
    if args.first().is_some_and(|a| a == "postcopy") {
        return Ok(task(
            "postcopy",
            &args[1..],
            postcopy::parse,
            postcopy::bench,
        ));
    }
    if args.first().is_some_and(|a| a == "downtime") {
        return Ok(task(
            "downtime",
            &args[1..],
            downtime::parse,
            downtime::bench,
        ));
    }
    // The two ends of `bench migrate`'s raw TCP ceiling, run inside the
    // source's and destination's network namespaces.
    match args {
        [cmd, addr, streams] if cmd == "tcp-sink" => {
            let streams = streams
                .parse()
                .map_err(|_| format!("tcp-sink: bad stream count {streams:?}"))?;
            return migrate::link::tcp_sink(addr, streams)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into);
        }
        [cmd, addr, bytes, streams] if cmd == "tcp-send" => {
            let bytes = bytes
                .parse()
                .map_err(|_| format!("tcp-send: bad byte count {bytes:?}"))?;
            let streams = streams
                .parse()
                .map_err(|_| format!("tcp-send: bad stream count {streams:?}"))?;
            return migrate::link::tcp_send(addr, bytes, streams)
                .map(|()| ExitCode::SUCCESS)
                .map_err(Into::into);
        }
        _ => {}
    }
    if args.first().is_some_and(|a| a == "tls") {
        return Ok(task("tls", &args[1..], tls::parse, tls::bench));
    }
    if args.first().is_some_and(|a| a == "snapshot") {
        return Ok(task(
            "snapshot",
            &args[1..],
            snapshot::parse,
            |o| match snapshot::bench(o)? {
                0 => Ok(()),
                failed => Err(format!("{failed} run(s) failed")),
            },
        ));
    }
    let mut report_only = false;
    let mut package: Option<String> = None;
    let mut filter: Option<String> = None;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--report-only" => report_only = true,
            "-p" | "--package" if package.is_none() => {
                package = Some(args.next().ok_or("`-p` needs a crate name")?.clone())
            }
            flag if flag.starts_with('-') => {
                return Err(format!("unknown or repeated option `{flag}`; {USAGE}").into())
            }
            name if package.is_none() && filter.is_none() && is_workspace_crate(name) => {
                package = Some(name.to_string())
            }
            text if filter.is_none() => filter = Some(text.to_string()),
            extra => return Err(format!("unexpected argument `{extra}`; {USAGE}").into()),
        }
    }

    let criterion_dir = report::criterion_dir()?;
    if report_only {
        report::print(&criterion_dir, None)?;
        return Ok(ExitCode::SUCCESS);
    }
    let started = SystemTime::now();
    let sh = crate::shell()?;
    let which = match &package {
        Some(p) => vec!["-p".to_string(), p.clone()],
        None => vec!["--workspace".to_string()],
    };
    let filter: Vec<String> = filter.into_iter().flat_map(|f| ["--".into(), f]).collect();
    let status = cmd!(sh, "cargo bench {which...} {filter...}").run();
    // Print what did get measured even when a bench failed part-way.
    report::print(&criterion_dir, Some(started))?;
    status?;
    Ok(ExitCode::SUCCESS)
}

/// One of the benches above: its options parsed by `parse` (a usage error
/// exits 2), then run by `bench` (an error, failed runs included, exits 1).
fn task<O>(
    name: &str,
    args: &[String],
    parse: impl Fn(&[String]) -> Result<O, String>,
    bench: impl Fn(&O) -> Result<(), String>,
) -> ExitCode {
    let options = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xtask: bench {name}: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: bench {name}: {e}");
            ExitCode::FAILURE
        }
    }
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
