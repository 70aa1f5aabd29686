//! `cargo xtask bench postcopy [--runs N] [--size 1G]`: post-copy's fault
//! latency on loopback, and the guest's stall against pure pre-copy.
//!
//! It runs `ramblock migrate --json` (source and destination in one process,
//! loopback TCP, the default `increment` guest) `--runs` times in each of
//! three [`MODES`], taking the modes in turn within each round so a slow
//! spell of the shared machine hits all of them alike. It prints the medians
//! as a Markdown table, with each post-copy mode's guest stall as a ratio to
//! pre-copy's from the same run, and fails if any run did not verify. The
//! method is described in `docs/bench-postcopy.md`. Only run on demand:
//! `cargo xtask ci` does not call it.

use super::migrate::{median, parse_size};
use super::ramblock_run::{build_ramblock, migrate_json, RunFailure, Summary};
use crate::bench::opt;
use std::path::Path;
use std::time::Duration;

const USAGE: &str = "usage: cargo xtask bench postcopy [--runs N] [--size 1G]";

/// The longest one `ramblock migrate` (warm-up, migration and the final
/// byte-for-byte check) may take before it is reported as timed out.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The p99 fault latency the issue asks post-copy to stay under.
const P99_TARGET_US: f64 = 1000.0;

/// One way of migrating the same guest.
struct Mode {
    /// Its column heading.
    name: &'static str,
    /// What it adds to `ramblock migrate --json --size=...`.
    args: &'static [&'static str],
}

/// The baseline first: the table's ratios are against column 0.
const MODES: [Mode; 3] = [
    Mode {
        name: "pre-copy",
        args: &[],
    },
    // Without `--downtime-ms 0` pre-copy may converge before its first pass
    // ends and never switch; 0 forces the switch after the pass.
    Mode {
        name: "post-copy after 1 pass",
        args: &["--postcopy", "1", "--downtime-ms", "0"],
    },
    Mode {
        name: "post-copy at once",
        args: &["--postcopy", "0"],
    },
];

#[derive(Debug)]
pub(super) struct Options {
    runs: usize,
    size: u64,
}

pub(super) fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        runs: 5,
        size: 1 << 30,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || opt::value(&mut args, arg, USAGE);
        match arg.as_str() {
            "--runs" => o.runs = opt::runs(value()?, USAGE)?,
            "--size" => o.size = parse_size(value()?)?,
            other => return Err(format!("unexpected argument `{other}`; {USAGE}")),
        }
    }
    Ok(o)
}

pub(super) fn bench(options: &Options) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: the guest runs under KVM on both sides".into());
    }
    let binary = build_ramblock()?;
    let label = format!(
        "{} GiB increment",
        options.size as f64 / (1u64 << 30) as f64
    );

    let mut outcomes: Vec<Vec<Outcome>> = MODES.iter().map(|_| Vec::new()).collect();
    for n in 1..=options.runs {
        for (mode, runs) in MODES.iter().zip(&mut outcomes) {
            let outcome = migrate(&binary, options.size, mode.args);
            println!(
                "{label} run {n}/{}: {:<22} {}",
                options.runs,
                mode.name,
                describe(&outcome)
            );
            runs.push(outcome);
        }
    }
    println!("\n{}", table(&label, &outcomes));
    let total = outcomes.iter().map(Vec::len).sum::<usize>();
    let verified = outcomes
        .iter()
        .flatten()
        .filter(|o| matches!(o, Ok(r) if r.verified));
    let unverified = total - verified.count();
    if unverified > 0 {
        return Err(format!(
            "{unverified} of {total} runs did not complete verified (see the run lines above)"
        ));
    }
    Ok(())
}

/// What one `ramblock migrate --json` reported.
#[derive(Clone, Debug)]
struct Run {
    /// Whether it switched to post-copy.
    postcopy: bool,
    total_ms: f64,
    downtime_ms: f64,
    /// Downtime plus the destination vCPU's fault waits.
    guest_stall_ms: f64,
    faults: u64,
    fault_p50_us: f64,
    fault_p99_us: f64,
    fault_max_us: f64,
    /// The destination was checked equal to the source.
    verified: bool,
}

/// A run's figures, or why there are none.
type Outcome = Result<Run, String>;

/// Runs `binary migrate --json --size=SIZE ARGS...` once.
fn migrate(binary: &Path, size: u64, args: &[&str]) -> Outcome {
    let args: Vec<String> = std::iter::once(format!("--size={}M", size >> 20))
        .chain(args.iter().map(|a| a.to_string()))
        .collect();
    match migrate_json(binary, &args, RUN_TIMEOUT) {
        Ok(summary) => run_of(&summary),
        Err(RunFailure::TimedOut) => Err(format!("timed out after {} s", RUN_TIMEOUT.as_secs())),
        Err(RunFailure::Failed(e)) => Err(e),
    }
}

/// The figures of a summary line.
fn run_of(s: &Summary) -> Outcome {
    Ok(Run {
        postcopy: s.flag("postcopy")?,
        total_ms: s.float("total_ms")?,
        downtime_ms: s.float("downtime_ms")?,
        guest_stall_ms: s.float("guest_stall_ms")?,
        faults: s.int("faults")?,
        fault_p50_us: s.float("fault_p50_us")?,
        fault_p99_us: s.float("fault_p99_us")?,
        fault_max_us: s.float("fault_max_us")?,
        verified: s.value["verified"].as_bool() == Some(true),
    })
}

/// Reads the summary line `ramblock migrate --json` prints last.
#[cfg(test)]
fn parse_summary(stdout: &str) -> Outcome {
    run_of(&super::ramblock_run::parse_summary(stdout)?)
}

fn describe(o: &Outcome) -> String {
    match o {
        Ok(r) => format!(
            "total {:.0} ms, downtime {:.1} ms, stall {:.1} ms, {} faults (p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs), {}{}",
            r.total_ms,
            r.downtime_ms,
            r.guest_stall_ms,
            r.faults,
            r.fault_p50_us,
            r.fault_p99_us,
            r.fault_max_us,
            if r.postcopy { "post-copy, " } else { "" },
            if r.verified { "verified" } else { "NOT VERIFIED" },
        ),
        Err(e) => format!("FAILED: {e}"),
    }
}

/// One mode's column: medians over its completed runs; the fault figures
/// only over the runs that went post-copy (a pre-copy run has no faults).
struct Column {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    guest_stall_ms: Option<f64>,
    faults: Option<f64>,
    fault_p50_us: Option<f64>,
    fault_p99_us: Option<f64>,
    worst_p99_us: Option<f64>,
    worst_max_us: Option<f64>,
    postcopy: usize,
    verified: usize,
    runs: usize,
}

impl Column {
    fn of(outcomes: &[Outcome]) -> Column {
        let done: Vec<&Run> = outcomes.iter().filter_map(|o| o.as_ref().ok()).collect();
        let switched: Vec<&Run> = done.iter().copied().filter(|r| r.postcopy).collect();
        let med = |runs: &[&Run], f: fn(&Run) -> f64| median(runs.iter().map(|r| f(r)).collect());
        let worst = |f: fn(&Run) -> f64| switched.iter().map(|r| f(r)).reduce(f64::max);
        Column {
            total_ms: med(&done, |r| r.total_ms),
            downtime_ms: med(&done, |r| r.downtime_ms),
            guest_stall_ms: med(&done, |r| r.guest_stall_ms),
            faults: med(&switched, |r| r.faults as f64),
            fault_p50_us: med(&switched, |r| r.fault_p50_us),
            fault_p99_us: med(&switched, |r| r.fault_p99_us),
            worst_p99_us: worst(|r| r.fault_p99_us),
            worst_max_us: worst(|r| r.fault_max_us),
            postcopy: switched.len(),
            verified: done.iter().filter(|r| r.verified).count(),
            runs: outcomes.len(),
        }
    }
}

/// The Markdown table of [`MODES`] side by side, `outcomes[i]` being mode
/// `i`'s runs, and a line on the p99 target.
fn table(label: &str, outcomes: &[Vec<Outcome>]) -> String {
    let columns: Vec<Column> = outcomes.iter().map(|o| Column::of(o)).collect();
    let cell = |v: Option<f64>, precision: usize| {
        v.map_or("-".to_string(), |v| format!("{v:.precision$}"))
    };
    let mut t = format!(
        "{label}, medians of {} runs per mode\n\n| figure |",
        columns.first().map_or(0, |c| c.runs)
    );
    for mode in MODES.iter().take(columns.len()) {
        t += &format!(" {} |", mode.name);
    }
    t += &format!("\n|---|{}\n", "---:|".repeat(columns.len()));
    let mut row = |name: &str, cells: Vec<String>| {
        t += &format!("| {name} | {} |\n", cells.join(" | "));
    };
    let figure = |f: fn(&Column) -> Option<f64>, precision: usize| {
        columns.iter().map(|c| cell(f(c), precision)).collect()
    };
    row("total ms", figure(|c| c.total_ms, 0));
    row("downtime ms", figure(|c| c.downtime_ms, 1));
    row("guest stall ms", figure(|c| c.guest_stall_ms, 1));
    let baseline = columns.first().and_then(|c| c.guest_stall_ms);
    let ratios = columns.iter().map(|c| match (c.guest_stall_ms, baseline) {
        (Some(s), Some(b)) if b > 0.0 => format!("{:.2}x", s / b),
        _ => "-".to_string(),
    });
    row("stall / pre-copy", ratios.collect());
    row("faults", figure(|c| c.faults, 0));
    row("fault p50 µs", figure(|c| c.fault_p50_us, 0));
    row("fault p99 µs", figure(|c| c.fault_p99_us, 0));
    row("fault p99 µs, worst run", figure(|c| c.worst_p99_us, 0));
    row("fault max µs, worst run", figure(|c| c.worst_max_us, 0));
    row(
        "went post-copy",
        columns
            .iter()
            .map(|c| format!("{}/{}", c.postcopy, c.runs))
            .collect(),
    );
    row(
        "verified",
        columns
            .iter()
            .map(|c| format!("{}/{}", c.verified, c.runs))
            .collect(),
    );
    let verdicts: Vec<String> = MODES
        .iter()
        .zip(&columns)
        .filter_map(|(mode, c)| {
            let (p99, worst) = (c.fault_p99_us?, c.worst_p99_us?);
            let met = |us: f64| if us < P99_TARGET_US { "met" } else { "NOT met" };
            Some(format!(
                "{}: median {p99:.0} µs {}, worst run {worst:.0} µs {}",
                mode.name,
                met(p99),
                met(worst)
            ))
        })
        .collect();
    t += "\ntarget: fault p99 < 1 ms — ";
    t += &if verdicts.is_empty() {
        "cannot be judged (no run went post-copy)".to_string()
    } else {
        verdicts.join("; ")
    };
    t + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&args("--runs 3 --size 512M")).unwrap();
        assert_eq!((o.runs, o.size), (3, 512 << 20));
        let d = parse(&[]).unwrap();
        assert_eq!((d.runs, d.size), (5, 1 << 30));
        assert!(parse(&args("--runs 0")).is_err());
        assert!(parse(&args("--runs")).is_err());
        assert!(parse(&args("--size 1T")).is_err());
        assert!(parse(&args("--size 32M")).is_err());
        assert!(parse(&args("--size 99999999999G")).is_err());
        assert!(parse(&args("--sizes 1G")).is_err());
    }

    #[test]
    fn summary_lines_parse_and_errors_surface() {
        let ok = r#"{"role":"local","size":1073741824,"backing":"anonymous","mode":"manual","total_ms":1053.040,"setup_ms":0.024,"downtime_ms":0.185,"bytes":1072775748,"pages":261891,"zero_pages":253,"passes":1,"dirty_rate":0.0,"guest_progress":0,"verified":true,"mismatch":null,"error":null,"postcopy":true,"discarded_pages":262144,"requests":1170,"requested_pages":2,"background_pages":262142,"resumes":0,"faults":1170,"fault_p50_us":180.8,"fault_p99_us":560.5,"fault_max_us":1955.5,"guest_stall_ms":242.061}"#;
        let r = parse_summary(&format!("noise\n{ok}\n")).unwrap();
        assert!(r.postcopy && r.verified);
        assert_eq!(r.faults, 1170);
        assert_eq!(
            (r.fault_p50_us, r.fault_p99_us, r.fault_max_us),
            (180.8, 560.5, 1955.5)
        );
        assert_eq!(
            (r.total_ms, r.downtime_ms, r.guest_stall_ms),
            (1053.04, 0.185, 242.061)
        );
        let failed = ok.replace(r#""error":null"#, r#""error":"connection reset""#);
        assert!(parse_summary(&failed)
            .unwrap_err()
            .contains("connection reset"));
        let mismatch = ok.replace(r#""verified":true"#, r#""verified":false"#);
        assert!(!parse_summary(&mismatch).unwrap().verified);
        // A binary from before post-copy: the bench must say so, not report zeros.
        let old = &ok[..ok.find(r#","postcopy""#).unwrap()];
        assert!(parse_summary(&format!("{old}}}"))
            .unwrap_err()
            .contains("postcopy"));
        assert!(parse_summary("").is_err());
    }

    fn run(postcopy: bool, stall: f64, p99: f64) -> Outcome {
        Ok(Run {
            postcopy,
            total_ms: 1000.0,
            downtime_ms: if postcopy { 1.0 } else { stall },
            guest_stall_ms: stall,
            faults: if postcopy { 1000 } else { 0 },
            fault_p50_us: if postcopy { 200.0 } else { 0.0 },
            fault_p99_us: p99,
            fault_max_us: p99 * 2.0,
            verified: true,
        })
    }

    #[test]
    fn medians_ratios_worst_runs_and_the_target() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let outcomes = vec![
            vec![
                run(false, 100.0, 0.0),
                run(false, 300.0, 0.0),
                run(false, 200.0, 0.0),
            ],
            vec![
                run(true, 300.0, 500.0),
                run(true, 400.0, 1500.0),
                run(true, 500.0, 600.0),
            ],
            vec![
                run(true, 50.0, 700.0),
                Err("timed out".into()),
                // Pre-copy converged: counts for total and stall, not faults.
                run(false, 90.0, 0.0),
            ],
        ];
        let t = table("1 GiB increment", &outcomes);
        // Stall medians 200, 400 and 70 ms: ratios against pre-copy's.
        assert!(
            t.contains("| stall / pre-copy | 1.00x | 2.00x | 0.35x |"),
            "{t}"
        );
        assert!(t.contains("| fault p99 µs | - | 600 | 700 |"), "{t}");
        assert!(
            t.contains("| fault p99 µs, worst run | - | 1500 | 700 |"),
            "{t}"
        );
        assert!(
            t.contains("| fault max µs, worst run | - | 3000 | 1400 |"),
            "{t}"
        );
        assert!(t.contains("| went post-copy | 0/3 | 3/3 | 1/3 |"), "{t}");
        assert!(t.contains("| verified | 3/3 | 3/3 | 2/3 |"), "{t}");
        assert!(
            t.contains(
                "post-copy after 1 pass: median 600 µs met, worst run 1500 µs NOT met; \
                 post-copy at once: median 700 µs met, worst run 700 µs met"
            ),
            "{t}"
        );
        let none = table("x", &[vec![run(false, 1.0, 0.0)]]);
        assert!(none.contains("cannot be judged"), "{none}");
    }
}
