//! `cargo xtask bench migrate [--sizes 1G,4G] [--workloads idle,increment]
//! [--prep prealloc,lazy] [--ramblock stream,channels4] [--runs N]`:
//! ramblock's live migration side by side with QEMU's, on this machine.
//!
//! For every destination preparation (both preallocated before the clock
//! starts, or both populated as pages arrive), size and workload it
//! migrates the same guest loop `--runs` times with QEMU in each of its
//! sending configurations ([`qemu::Config::ALL`]: two `qemu-system-x86_64`
//! processes over loopback TCP, booting the Multiboot kernel of [`image`])
//! and with `ramblock migrate` in each of its configurations (`--ramblock`:
//! one stream, or page channels beside it), one after the other, never at once, and prints the
//! medians with the ratios of ramblock's best configuration to QEMU's best.
//! The method is described in `docs/bench-migrate.md`. Only run on demand:
//! `cargo xtask ci` does not call it.

pub(super) mod image;
pub(super) mod link;
pub(super) mod local;
pub(super) mod qemu;
pub(super) mod qmp;
mod ramblock;

use super::ramblock_run::build_ramblock;
use crate::bench::opt;
use image::Variant;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const USAGE: &str = "usage: cargo xtask bench migrate [--sizes 1G,4G] [--workloads idle,increment] [--prep prealloc,lazy] [--qemu stream,multifd2,multifd4,zero-copy] [--ramblock stream,channels2,channels4] [--link loopback,10gbit,1gbit] [--runs N]";

/// How both destinations are prepared, the same way on both sides.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Prep {
    /// Guest RAM populated before the migration's clock starts (QEMU
    /// `-mem-prealloc`; ramblock's default destination).
    Prealloc,
    /// Populated where each received page lands, inside the clock (QEMU's
    /// default; `ramblock migrate --lazy-destination`).
    Lazy,
}

impl Prep {
    fn name(self) -> &'static str {
        match self {
            Prep::Prealloc => "destinations preallocated",
            Prep::Lazy => "destinations populated lazily",
        }
    }
}

/// Who migrates a column's runs, and how.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Engine {
    /// Two `qemu-system-x86_64` processes in this configuration.
    Qemu(qemu::Config),
    /// `ramblock migrate` in this configuration.
    Ramblock(ramblock::Config),
}

impl Engine {
    /// The column's name in run lines and tables.
    fn name(self) -> String {
        match self {
            Engine::Qemu(c) => c.name(),
            Engine::Ramblock(c) => c.name(),
        }
    }
}

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
    /// The guest loop's passes per second just before the migration.
    pub rate_before: f64,
    /// The first pass's throughput (ramblock only).
    pub pass0_bytes_per_s: Option<f64>,
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

pub(super) struct Options {
    sizes: Vec<u64>,
    variants: Vec<Variant>,
    preps: Vec<Prep>,
    qemu: Vec<qemu::Config>,
    ramblock: Vec<ramblock::Config>,
    links: Vec<link::Shape>,
    runs: usize,
}

impl Options {
    /// The most connections that carry pages in any configuration compared
    /// (multifd channels or page channels), at least 1.
    fn most_streams(&self) -> u32 {
        let multifd = self.qemu.iter().filter_map(|c| c.multifd);
        let channels = self.ramblock.iter().map(|c| c.channels);
        multifd.chain(channels).max().unwrap_or(1).max(1)
    }
}

/// A comma-separated list of sizes, each as [`parse_size`] reads it.
pub(super) fn parse_sizes(list: &str) -> Result<Vec<u64>, String> {
    list.split(',').map(parse_size).collect()
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

pub(super) fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sizes: vec![1 << 30, 4 << 30],
        variants: vec![Variant::Idle, Variant::Increment],
        preps: vec![Prep::Prealloc, Prep::Lazy],
        qemu: qemu::Config::ALL.to_vec(),
        ramblock: vec![ramblock::Config::STREAM],
        links: vec![link::Shape::Loopback],
        runs: 3,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || opt::value(&mut args, arg, USAGE);
        match arg.as_str() {
            "--sizes" => o.sizes = parse_sizes(value()?)?,
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
            "--prep" => {
                o.preps = value()?
                    .split(',')
                    .map(|p| match p {
                        "prealloc" => Ok(Prep::Prealloc),
                        "lazy" => Ok(Prep::Lazy),
                        _ => Err(format!("preparation {p:?}: use prealloc or lazy")),
                    })
                    .collect::<Result<_, _>>()?
            }
            "--qemu" => {
                o.qemu = value()?
                    .split(',')
                    .map(|k| {
                        qemu::Config::ALL
                            .into_iter()
                            .find(|c| c.key() == k)
                            .ok_or_else(|| {
                                format!("QEMU configuration {k:?}: use stream, multifd2, multifd4 or zero-copy")
                            })
                    })
                    .collect::<Result<_, _>>()?
            }
            "--ramblock" => {
                o.ramblock = value()?
                    .split(',')
                    .map(ramblock::Config::parse)
                    .collect::<Result<_, _>>()?
            }
            "--link" => {
                o.links = value()?
                    .split(',')
                    .map(link::Shape::parse)
                    .collect::<Result<_, _>>()?
            }
            "--runs" => {
                o.runs = opt::runs(value()?, USAGE)?
            }
            other => return Err(format!("unexpected argument `{other}`; {USAGE}")),
        }
    }
    Ok(o)
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

pub(super) fn bench(options: &Options) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: both sides of this comparison need KVM".into());
    }
    ensure_installed(qemu::QEMU, "qemu-system-x86")?;
    ensure_installed("as", "binutils")?;
    ensure_installed("ld", "binutils")?;
    let binary = build_ramblock()?;
    let dir = crate::target_dir()
        .map_err(|e| e.to_string())?
        .join("bench-migrate");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let images: Vec<(Variant, PathBuf)> = options
        .variants
        .iter()
        .map(|&v| image::build(&dir, v).map(|p| (v, p)))
        .collect::<Result<_, _>>()?;
    let qemu_version = qemu::version()?;
    println!("{qemu_version}, KVM; ramblock {}", binary.display());

    let mut tables = Vec::new();
    let (mut runs, mut bad) = (0, 0);
    for &shape in &options.links {
        let link = link::Link::create(shape)?;
        // A few seconds' worth of bytes at the link's rate.
        let probe = match shape {
            link::Shape::Loopback => 4 << 30,
            link::Shape::Shaped { mbit } => (mbit << 20) / 8 * 3,
        };
        let ceiling = Ceiling::measure(&link, probe, options.most_streams())?;
        println!("{}: {}", shape.name(), ceiling.describe(probe));
        for &prep in &options.preps {
            for &size in &options.sizes {
                for (variant, image) in &images {
                    let label = format!(
                        "{} GiB {}, {}, {}",
                        size as f64 / (1u64 << 30) as f64,
                        name(*variant),
                        prep.name(),
                        shape.name()
                    );
                    let mut columns: Vec<(Engine, Vec<Outcome>)> = options
                        .qemu
                        .iter()
                        .map(|&c| Engine::Qemu(c))
                        .chain(options.ramblock.iter().map(|&c| Engine::Ramblock(c)))
                        .map(|engine| (engine, Vec::new()))
                        .collect();
                    // Interleaved: every configuration once per round, so a
                    // noisy moment of the shared machine hits all of them.
                    for n in 1..=options.runs {
                        for (engine, outcomes) in columns.iter_mut() {
                            let outcome = match *engine {
                                Engine::Qemu(config) => {
                                    qemu::migrate(&dir, image, size, *variant, config, prep, &link)
                                }
                                Engine::Ramblock(config) => {
                                    ramblock::migrate(&binary, size, *variant, config, prep, &link)
                                }
                            };
                            println!(
                                "{label} run {n}: {:<16} {}",
                                engine.name(),
                                describe(&outcome)
                            );
                            outcomes.push(outcome);
                        }
                    }
                    for (_, outcomes) in &columns {
                        runs += outcomes.len();
                        bad += outcomes.iter().filter(|o| !verified(o)).count();
                    }
                    tables.push(table(&label, &columns, &ceiling));
                }
            }
        }
    }
    println!();
    for t in tables {
        println!("{t}");
    }
    if bad > 0 {
        return Err(format!(
            "{bad} of {runs} runs did not complete verified (see the run lines above)"
        ));
    }
    Ok(())
}

/// Whether a run completed and was verified.
fn verified(o: &Outcome) -> bool {
    matches!(o, Outcome::Done(m) if m.verified)
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
            "total {:.0} ms, downtime {:.0} ms, setup {:.1} ms, {:.1} MiB, {} pages + {} zero, {} passes, guest looped {} times ({:.0}/s before), {} dirty log, {}",
            m.total_ms,
            m.downtime_ms,
            m.setup_ms,
            m.bytes as f64 / (1 << 20) as f64,
            m.pages,
            m.zero_pages,
            m.passes,
            m.guest_passes,
            m.rate_before,
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

/// Medians over the completed runs of one column.
struct Column {
    total_ms: Option<f64>,
    downtime_ms: Option<f64>,
    bytes: Option<f64>,
    rate_before: Option<f64>,
    rate_during: Option<f64>,
    pass0: Option<f64>,
    completed: usize,
    verified: usize,
    timed_out: usize,
    runs: usize,
}

impl Column {
    fn of(outcomes: &[Outcome]) -> Column {
        let done: Vec<&Measured> = outcomes
            .iter()
            .filter_map(|o| match o {
                Outcome::Done(m) => Some(m),
                _ => None,
            })
            .collect();
        let med = |f: fn(&Measured) -> f64| median(done.iter().map(|m| f(m)).collect());
        Column {
            total_ms: med(|m| m.total_ms),
            downtime_ms: med(|m| m.downtime_ms),
            bytes: med(|m| m.bytes as f64),
            rate_before: med(|m| m.rate_before),
            rate_during: med(|m| m.guest_passes as f64 / (m.total_ms / 1e3).max(1e-3)),
            pass0: median(done.iter().filter_map(|m| m.pass0_bytes_per_s).collect()),
            completed: done.len(),
            verified: done.iter().filter(|m| m.verified).count(),
            timed_out: outcomes
                .iter()
                .filter(|o| matches!(o, Outcome::TimedOut))
                .count(),
            runs: outcomes.len(),
        }
    }

    /// "verified/runs", with timeouts or failures.
    fn runs(&self) -> String {
        let mut text = format!("{}/{}", self.verified, self.runs);
        if self.timed_out > 0 {
            text += &format!(" ({} t/o)", self.timed_out);
        } else if self.completed < self.runs {
            text += &format!(" ({} failed)", self.runs - self.completed);
        }
        text
    }
}

/// One table: a column per configuration (QEMU's, then ramblock's), and
/// the ratios of ramblock's fastest configuration to QEMU's fastest (each
/// the least median total time on its side).
fn table(label: &str, columns: &[(Engine, Vec<Outcome>)], ceiling: &Ceiling) -> String {
    let stats: Vec<(Engine, String, Column)> = columns
        .iter()
        .map(|(engine, o)| (*engine, engine.name(), Column::of(o)))
        .collect();
    let cell = |v: Option<f64>, unit: f64, precision: usize| {
        v.map_or("-".to_string(), |v| format!("{:.*}", precision, v / unit))
    };
    let mut t = format!("{label} (medians of completed runs)\n{:<22}", "");
    for (_, name, _) in &stats {
        t += &format!(" {name:>16}");
    }
    t += "\n";
    type Row = (&'static str, fn(&Column) -> Option<f64>, f64, usize);
    let rows: [Row; 6] = [
        ("total time ms", |c| c.total_ms, 1.0, 0),
        ("downtime ms", |c| c.downtime_ms, 1.0, 0),
        ("MiB on wire", |c| c.bytes, (1 << 20) as f64, 1),
        // Not costs but the pressure: how fast each guest ran before and
        // while it migrated (a throttled guest dirties little).
        ("guest loops/s before", |c| c.rate_before, 1.0, 0),
        ("guest loops/s during", |c| c.rate_during, 1.0, 0),
        ("pass 0 MiB/s", |c| c.pass0, (1 << 20) as f64, 0),
    ];
    for (row, value, unit, precision) in rows {
        t += &format!("{row:<22}");
        for (_, _, c) in &stats {
            t += &format!(" {:>16}", cell(value(c), unit, precision));
        }
        t += "\n";
    }
    t += &format!("{:<22}", "verified");
    for (_, _, c) in &stats {
        t += &format!(" {:>16}", c.runs());
    }
    t += "\n";
    // Each side's fastest completed column (the first of equals).
    let fastest = |ramblock: bool| {
        stats
            .iter()
            .filter(|(engine, _, _)| matches!(engine, Engine::Ramblock(_)) == ramblock)
            .filter_map(|(_, name, c)| c.total_ms.map(|ms| (name, c, ms)))
            .min_by(|a, b| a.2.total_cmp(&b.2))
    };
    let all_verified = stats.iter().all(|(_, _, c)| c.verified == c.runs);
    let ours = fastest(true);
    let target = match (fastest(false), ours) {
        (Some((theirs, best, best_total)), Some((name, ours, total))) => {
            let best_downtime = best.downtime_ms.unwrap_or(f64::NAN);
            let downtime = ours.downtime_ms.unwrap_or(f64::NAN);
            format!(
                "{name} / {theirs} (each side's fastest): total {:.2}x, downtime {:.2}x\ntarget: total <= 0.6x {}, downtime <= 0.5x {}, every run verified {}",
                total / best_total,
                downtime / best_downtime,
                if total <= 0.6 * best_total { "met" } else { "NOT met" },
                if downtime <= 0.5 * best_downtime { "met" } else { "NOT met" },
                if all_verified { "yes" } else { "NO" },
            )
        }
        _ => "target: cannot be judged (a side has no completed run)".into(),
    };
    let pass0 = match ours.and_then(|(name, c, _)| c.pass0.map(|p| (name, p))) {
        Some((name, p)) => format!(
            "\n{name} pass 0: {:.2}x the raw TCP ceiling ({:.0} MiB/s); target >= 0.9x {}{}",
            p / ceiling.one,
            ceiling.one / MIB,
            if p >= 0.9 * ceiling.one {
                "met"
            } else {
                "NOT met"
            },
            match ceiling.many {
                Some((n, many)) => format!(
                    "; {:.2}x the {n}-stream ceiling ({:.0} MiB/s)",
                    p / many,
                    many / MIB
                ),
                None => String::new(),
            }
        ),
        None => String::new(),
    };
    // What the total-time target asks of the path: ramblock's bytes in 0.6x
    // QEMU's fastest total, against the most the path carried raw.
    let needed = match (fastest(false), ours) {
        (Some((_, _, best_total)), Some((name, c, _))) => c.bytes.map(|bytes| {
            let rate = bytes / (0.6 * best_total / 1e3);
            let (streams, raw) = ceiling.many.unwrap_or((1, ceiling.one));
            format!(
                "\n{name} in 0.6x that total: its {:.0} MiB at {:.0} MiB/s, {:.2}x the raw {streams}-stream TCP ceiling",
                bytes / MIB,
                rate / MIB,
                rate / raw
            )
        }),
        _ => None,
    };
    t + &target + &pass0 + &needed.unwrap_or_default() + "\n"
}

const MIB: f64 = (1 << 20) as f64;

/// The raw TCP ceilings of a link, measured in the same run as the
/// migrations: one stream, and as many streams as the most connections a
/// configuration opens (page channels or multifd channels), if more than one.
#[derive(Copy, Clone, Debug)]
struct Ceiling {
    one: f64,
    many: Option<(u32, f64)>,
}

impl Ceiling {
    fn measure(link: &link::Link, probe: u64, streams: u32) -> Result<Ceiling, String> {
        let one = link.tcp_ceiling(probe, 1)?;
        let many = if streams > 1 {
            Some((streams, link.tcp_ceiling(probe, streams)?))
        } else {
            None
        };
        Ok(Ceiling { one, many })
    }

    fn describe(&self, probe: u64) -> String {
        let mut text = format!(
            "raw TCP ceiling {:.0} MiB/s (one stream, {} MiB)",
            self.one / MIB,
            probe >> 20
        );
        if let Some((n, many)) = self.many {
            text += &format!(", {:.0} MiB/s over {n} streams", many / MIB);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_STREAM: Ceiling = Ceiling {
        one: 2e9,
        many: None,
    };

    #[test]
    fn options_parse() {
        let args = |s: &str| s.split_whitespace().map(String::from).collect::<Vec<_>>();
        let o = parse(&args(
            "--sizes 512M,2G --workloads increment --prep lazy --runs 5",
        ))
        .unwrap();
        assert_eq!(o.sizes, vec![512 << 20, 2 << 30]);
        assert_eq!(o.variants, vec![Variant::Increment]);
        assert_eq!(o.preps, vec![Prep::Lazy]);
        assert_eq!(o.runs, 5);
        let d = parse(&[]).unwrap();
        assert_eq!((d.sizes.len(), d.variants.len(), d.runs), (2, 2, 3));
        assert_eq!(d.preps, vec![Prep::Prealloc, Prep::Lazy]);
        assert!(parse(&args("--prep eager")).is_err());
        assert_eq!(
            parse(&args("--qemu zero-copy,stream")).unwrap().qemu.len(),
            2
        );
        assert!(parse(&args("--qemu multifd3")).is_err());
        assert_eq!(d.ramblock, vec![ramblock::Config::STREAM]);
        let r = parse(&args("--ramblock stream,channels2,channels4")).unwrap();
        assert_eq!(
            r.ramblock.iter().map(|c| c.channels).collect::<Vec<_>>(),
            vec![0, 2, 4]
        );
        assert_eq!(
            parse(&args("--ramblock channels16")).unwrap().ramblock,
            vec![ramblock::Config { channels: 16 }]
        );
        assert!(parse(&args("--ramblock channels0")).is_err());
        assert!(parse(&args("--ramblock channels17")).is_err());
        assert!(parse(&args("--ramblock stream,multifd4")).is_err());
        assert!(parse(&args("--ramblock")).is_err());
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
                guest_passes: 200,
                rate_before: 500.0,
                pass0_bytes_per_s: Some(1e9),
                verified: true,
            })
        };
        let qemu = |multifd| {
            Engine::Qemu(qemu::Config {
                multifd,
                zero_copy: false,
            })
        };
        let ours = |channels| Engine::Ramblock(ramblock::Config { channels });
        let columns = |ramblock: Vec<Outcome>| {
            vec![
                (qemu(None), vec![m(1000.0, 50.0), Outcome::TimedOut]),
                (qemu(Some(2)), vec![m(800.0, 100.0)]),
                (ours(0), ramblock),
            ]
        };
        // The fastest QEMU column (multifd 2, 800 ms) is the reference.
        let t = table("1 GiB idle", &columns(vec![m(400.0, 60.0)]), &ONE_STREAM);
        assert!(
            t.contains(
                "ramblock / QEMU multifd 2 (each side's fastest): total 0.50x, downtime 0.60x"
            ),
            "{t}"
        );
        assert!(t.contains("1/2 (1 t/o)"), "{t}");
        assert!(
            t.contains("total <= 0.6x met, downtime <= 0.5x NOT met, every run verified NO"),
            "{t}"
        );
        // 200 loops in 0.4 s.
        assert!(t.contains("500"), "{t}");
        assert!(
            t.contains("\nramblock pass 0: 0.50x the raw TCP ceiling"),
            "{t}"
        );
        // Several ramblock columns: its fastest (ch 4, median 300 ms) is
        // set against QEMU's fastest, the others are only shown, and the
        // pass-0 line is the fastest's (2e9 B/s against 1e9 B/s).
        let mut several = columns(vec![m(400.0, 60.0)]);
        several.push((ours(2), vec![Outcome::Failed("x".into())]));
        several.push((
            ours(4),
            vec![m(280.0, 20.0), m(320.0, 30.0)]
                .into_iter()
                .map(|o| match o {
                    Outcome::Done(mut m) => {
                        m.pass0_bytes_per_s = Some(2e9);
                        Outcome::Done(m)
                    }
                    o => o,
                })
                .collect(),
        ));
        let t = table("1 GiB idle", &several, &ONE_STREAM);
        assert!(
            t.contains(
                "ramblock ch 4 / QEMU multifd 2 (each side's fastest): total 0.38x, downtime 0.25x"
            ),
            "{t}"
        );
        assert!(
            t.contains("\nramblock ch 4 pass 0: 1.00x the raw TCP ceiling"),
            "{t}"
        );
        assert!(!t.contains("\nramblock pass 0"), "{t}");
        // The total-time target asks ramblock's 1024 MiB in 0.6 x 800 ms.
        assert!(
            t.contains("\nramblock ch 4 in 0.6x that total: its 1024 MiB at 2133 MiB/s, 1.12x the raw 1-stream TCP ceiling"),
            "{t}"
        );
        // With a 4-stream ceiling measured, both lines name it too.
        let four = Ceiling {
            one: 2e9,
            many: Some((4, 4e9)),
        };
        let t = table("1 GiB idle", &several, &four);
        assert!(
            t.contains("1.00x the raw TCP ceiling (1907 MiB/s); target >= 0.9x met; 0.50x the 4-stream ceiling (3815 MiB/s)"),
            "{t}"
        );
        assert!(
            t.contains("at 2133 MiB/s, 0.56x the raw 4-stream TCP ceiling"),
            "{t}"
        );
        assert!(t.contains("0/1 (1 failed)"), "{t}");
        assert!(t.contains("ramblock ch 2"), "{t}");
        // ramblock's fastest is chosen among ramblock's columns only, even
        // when every QEMU column is faster.
        let mut slow = columns(vec![m(2000.0, 60.0)]);
        slow.push((ours(4), vec![m(880.0, 50.0)]));
        let t = table("1 GiB idle", &slow, &ONE_STREAM);
        assert!(
            t.contains(
                "ramblock ch 4 / QEMU multifd 2 (each side's fastest): total 1.10x, downtime 0.50x"
            ),
            "{t}"
        );
        assert!(
            t.contains("total <= 0.6x NOT met, downtime <= 0.5x met"),
            "{t}"
        );
        let t = table(
            "1 GiB idle",
            &columns(vec![Outcome::Failed("x".into())]),
            &ONE_STREAM,
        );
        assert!(t.contains("cannot be judged"), "{t}");
    }
}
