//! `cargo xtask bench migrate [--sizes 1G,4G] [--workloads idle,increment] [--runs N]`:
//! ramblock's live migration side by side with QEMU's, on this machine.
//!
//! For every (size, workload) it migrates the same guest loop `--runs`
//! times with QEMU (two `qemu-system-x86_64` processes over loopback TCP,
//! booting the Multiboot kernel of [`image`]) and with `ramblock migrate`,
//! one after the other, never at once, and prints the medians of total
//! time, downtime and bytes with the ratios ramblock/QEMU. The method is
//! described in `docs/bench-migrate.md`. Only run on demand: `cargo xtask
//! ci` does not call it.

pub(super) mod image;
pub(super) mod qemu;
pub(super) mod qmp;
mod ramblock;

use image::Variant;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::Duration;

const USAGE: &str =
    "usage: cargo xtask bench migrate [--sizes 1G,4G] [--workloads idle,increment] [--runs N]";

/// The longest one migration may take before it is reported as timed out.
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// What one migration reported.
#[derive(Clone, Debug)]
pub struct Measured {
    /// From the start of the migration to its completion.
    pub total_ms: f64,
    /// How long the guest was paused.
    pub downtime_ms: f64,
    /// Time before the first page was sent.
    pub setup_ms: f64,
    /// Bytes on the wire.
    pub bytes: u64,
    /// Pages sent with their contents.
    pub pages: u64,
    /// Zero pages (sent as a marker).
    pub zero_pages: u64,
    /// Passes over the dirty log (QEMU: dirty-sync-count).
    pub passes: u64,
    /// The dirty-log mode in use.
    pub mode: String,
    /// Full passes the guest loop completed while it migrated (on the
    /// source, until it was paused): how hard the guest pushed back.
    pub guest_passes: u64,
    /// Whether the destination was checked equal to the source and runs.
    pub verified: bool,
}

/// How one migration ended.
#[derive(Clone, Debug)]
pub enum Outcome {
    /// It completed; its figures.
    Done(Measured),
    /// It was still going after [`MIGRATION_TIMEOUT`].
    TimedOut,
    /// It failed, for this reason.
    Failed(String),
}

struct Options {
    sizes: Vec<u64>,
    variants: Vec<Variant>,
    runs: usize,
}

/// Parses `512M` or `4G` (binary units, at least 64 MiB).
pub(super) fn parse_size(s: &str) -> Result<u64, String> {
    let (num, shift) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('M') => (&s[..s.len() - 1], 20),
        Some('G') => (&s[..s.len() - 1], 30),
        _ => return Err(format!("size {s:?}: write it as 512M or 4G")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: write it as 512M or 4G"))?;
    match n.checked_shl(shift).filter(|v| v >> shift == n) {
        Some(bytes) if bytes >= 64 << 20 => Ok(bytes),
        Some(_) => Err(format!("size {s:?}: at least 64M")),
        None => Err(format!("size {s:?} is too large")),
    }
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sizes: vec![1 << 30, 4 << 30],
        variants: vec![Variant::Idle, Variant::Increment],
        runs: 3,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("`{arg}` needs a value; {USAGE}"))
        };
        match arg.as_str() {
            "--sizes" => {
                o.sizes = value()?
                    .split(',')
                    .map(parse_size)
                    .collect::<Result<_, _>>()?
            }
            "--workloads" => {
                o.variants = value()?
                    .split(',')
                    .map(|w| match w {
                        "idle" => Ok(Variant::Idle),
                        "increment" => Ok(Variant::Increment),
                        _ => Err(format!("workload {w:?}: use idle or increment")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--runs" => {
                o.runs = value()?
                    .parse()
                    .ok()
                    .filter(|&n| n > 0)
                    .ok_or_else(|| format!("`--runs` needs a positive count; {USAGE}"))?
            }
            other => return Err(format!("unexpected argument `{other}`; {USAGE}")),
        }
    }
    Ok(o)
}

/// Runs the migration benchmark.
pub fn run(args: &[String]) -> ExitCode {
    let options = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("xtask: {e}");
            return ExitCode::from(2);
        }
    };
    match bench(&options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: bench migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether `program` is found on `PATH`.
fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
}

/// Installs Debian packages when the program they bring is missing.
pub(super) fn ensure_installed(program: &str, package: &str) -> Result<(), String> {
    if on_path(program) {
        return Ok(());
    }
    println!("{program} is missing: installing Debian's {package}");
    for args in [
        &["update"][..],
        &["install", "-y", "--no-install-recommends", package][..],
    ] {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map_err(|e| format!("cannot run apt-get: {e}; install {package} by hand"))?;
        if !status.success() {
            return Err(format!(
                "apt-get {} failed ({status}); install {package} by hand",
                args.join(" ")
            ));
        }
    }
    if on_path(program) {
        Ok(())
    } else {
        Err(format!(
            "{package} is installed but {program} is not on PATH"
        ))
    }
}

fn bench(options: &Options) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: both sides of this comparison need KVM".into());
    }
    ensure_installed(qemu::QEMU, "qemu-system-x86")?;
    ensure_installed("as", "binutils")?;
    ensure_installed("ld", "binutils")?;
    let root = crate::project_root();
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(&root)
        .args([
            "build",
            "--release",
            "-p",
            "ramblock-kvm",
            "--bin",
            "ramblock",
            "--features",
            "cli",
        ])
        .status()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building ramblock failed ({status})"));
    }
    let binary = root.join("target/release/ramblock");
    let dir = root.join("target/bench-migrate");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let images: Vec<(Variant, PathBuf)> = options
        .variants
        .iter()
        .map(|&v| image::build(&dir, v).map(|p| (v, p)))
        .collect::<Result<_, _>>()?;
    let qemu_version = qemu::version()?;
    println!("{qemu_version}, KVM; ramblock {}", binary.display());

    let mut tables = Vec::new();
    for &size in &options.sizes {
        for (variant, image) in &images {
            let label = format!(
                "{} GiB {}",
                size as f64 / (1u64 << 30) as f64,
                name(*variant)
            );
            let (mut q, mut r) = (Vec::new(), Vec::new());
            for n in 1..=options.runs {
                let outcome = qemu::migrate(&dir, image, size, *variant);
                println!("{label} run {n}: QEMU     {}", describe(&outcome));
                q.push(outcome);
                let outcome = ramblock::migrate(&binary, size, *variant);
                println!("{label} run {n}: ramblock {}", describe(&outcome));
                r.push(outcome);
            }
            tables.push(table(&label, &q, &r));
        }
    }
    println!();
    for t in tables {
        println!("{t}");
    }
    Ok(())
}

fn name(v: Variant) -> &'static str {
    match v {
        Variant::Idle => "idle",
        Variant::Increment => "increment",
    }
}

fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Done(m) => format!(
            "total {:.0} ms, downtime {:.0} ms, setup {:.1} ms, {:.1} MiB, {} pages + {} zero, {} passes, guest looped {} times, {} dirty log, {}",
            m.total_ms,
            m.downtime_ms,
            m.setup_ms,
            m.bytes as f64 / (1 << 20) as f64,
            m.pages,
            m.zero_pages,
            m.passes,
            m.guest_passes,
            m.mode,
            if m.verified { "verified" } else { "NOT VERIFIED" },
        ),
        Outcome::TimedOut => format!("TIMED OUT after {} s", MIGRATION_TIMEOUT.as_secs()),
        Outcome::Failed(e) => format!("FAILED: {e}"),
    }
}

/// The median of `values` (the mean of the middle two for an even count).
pub(super) fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// Medians over the completed runs of one side.
struct Side {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    bytes: Option<f64>,
    guest_passes: Option<f64>,
    completed: usize,
    verified: usize,
    timed_out: usize,
    runs: usize,
}

impl Side {
    fn of(outcomes: &[Outcome]) -> Side {
        let done: Vec<&Measured> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Done(m) => Some(m),
                _ => None,
            })
            .collect();
        let med = |f: fn(&Measured) -> f64| median(done.iter().map(|m| f(m)).collect());
        Side {
            total_ms: med(|m| m.total_ms),
            downtime_ms: med(|m| m.downtime_ms),
            bytes: med(|m| m.bytes as f64),
            guest_passes: med(|m| m.guest_passes as f64),
            completed: done.len(),
            verified: done.iter().filter(|m| m.verified).count(),
            timed_out: outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::TimedOut))
                .count(),
            runs: outcomes.len(),
        }
    }
}

fn table(label: &str, qemu: &[Outcome], ramblock: &[Outcome]) -> String {
    let (q, r) = (Side::of(qemu), Side::of(ramblock));
    let cell = |v: Option<f64>, unit: f64, precision: usize| {
        v.map_or("-".to_string(), |v| format!("{:.*}", precision, v / unit))
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}x", a / b),
        _ => "-".to_string(),
    };
    let mut t = format!(
        "{label} (medians of completed runs)\n{:<16} {:>12} {:>12} {:>15}\n",
        "", "QEMU", "ramblock", "ramblock/QEMU"
    );
    let rows = [
        ("total time ms", q.total_ms, r.total_ms, 1.0, 0),
        ("downtime ms", q.downtime_ms, r.downtime_ms, 1.0, 0),
        ("MiB on wire", q.bytes, r.bytes, (1 << 20) as f64, 1),
        // Not a cost but the pressure: how far each guest got while it
        // migrated (a guest that barely runs dirties little).
        ("guest loops", q.guest_passes, r.guest_passes, 1.0, 0),
    ];
    for (row, a, b, unit, precision) in rows {
        t += &format!(
            "{row:<16} {:>12} {:>12} {:>15}\n",
            cell(a, unit, precision),
            cell(b, unit, precision),
            ratio(b, a)
        );
    }
    let runs = |s: &Side| {
        let mut text = format!("{}/{}", s.verified, s.runs);
        if s.timed_out > 0 {
            text += &format!(" ({} t/o)", s.timed_out);
        } else if s.completed < s.runs {
            text += &format!(" ({} failed)", s.runs - s.completed);
        }
        text
    };
    t += &format!("{:<16} {:>12} {:>12}\n", "verified", runs(&q), runs(&r));
    let target = match (q.total_ms, r.total_ms, q.downtime_ms, r.downtime_ms) {
        (Some(qt), Some(rt), Some(qd), Some(rd)) => format!(
            "target: total <= 0.5x QEMU {}, downtime <= QEMU {}, verified on every run {}",
            if rt <= 0.5 * qt { "met" } else { "NOT met" },
            if rd <= qd { "met" } else { "NOT met" },
            if q.verified == q.runs && r.verified == r.runs {
                "both"
            } else {
                "NOT both"
            },
        ),
        _ => "target: cannot be judged (a side has no completed run)".into(),
    };
    t + &target + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&args("--sizes 512M,2G --workloads increment --runs 5")).unwrap();
        assert_eq!(o.sizes, vec![512 << 20, 2 << 30]);
        assert_eq!(o.variants, vec![Variant::Increment]);
        assert_eq!(o.runs, 5);
        let d = parse(&[]).unwrap();
        assert_eq!((d.sizes.len(), d.variants.len(), d.runs), (2, 2, 3));
        assert!(parse(&args("--runs 0")).is_err());
        assert!(parse(&args("--sizes 1T")).is_err());
        assert!(parse(&args("--workloads busy")).is_err());
        assert!(parse(&args("--sizes")).is_err());
    }

    #[test]
    fn medians_and_the_table() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
        let m = |total_ms, downtime_ms| {
            Outcome::Done(Measured {
                total_ms,
                downtime_ms,
                setup_ms: 0.0,
                bytes: 1 << 30,
                pages: 0,
                zero_pages: 0,
                passes: 1,
                mode: "manual".into(),
                guest_passes: 0,
                verified: true,
            })
        };
        let t = table(
            "1 GiB idle",
            &[m(1000.0, 50.0), Outcome::TimedOut],
            &[m(400.0, 60.0)],
        );
        assert!(t.contains("0.40x"), "{t}");
        assert!(t.contains("1.20x"), "{t}");
        assert!(t.contains("1/2 (1 t/o)"), "{t}");
        assert!(
            t.contains("total <= 0.5x QEMU met, downtime <= QEMU NOT met"),
            "{t}"
        );
    }
}
