//! `cargo xtask bench migrate --local [--runs N] [--size 4G]
//! [--backings memfd,hugetlb] [--no-qemu]`: a local live update (the VMM
//! process replaced on the same host, guest RAM handed over, no page
//! copied), ramblock against QEMU.
//!
//! ramblock: `ramblock migrate --local --backing B --size S --json` (its
//! destination in a thread of the same process; RAM fds over a UNIX socket
//! pair; the destination prefaults before the switch-over). QEMU 7.2: two
//! `qemu-system-x86_64` sharing one `memory-backend-file,share=on` on
//! /dev/shm, the `x-ignore-shared` capability on both, migrating over a
//! UNIX socket, the same increment guest as `bench migrate`. Per run:
//! total time and downtime (QEMU's own `query-migrate` figures for QEMU),
//! and the time from the switch-over until the destination guest
//! completes two loops of its RAM (QEMU: from the first moment its
//! destination is seen running, polled over QMP; ramblock: from the
//! source's pause, so QEMU's figure is the more generous). The runs
//! alternate between the sides; the table has medians and ratios.

use super::image::{self, Variant};
use super::qemu::{common_args, spawn, with_log_tails, Children, QEMU};
use super::qmp::Qmp;
use super::{ensure_installed, median};
use crate::bench::opt;
use crate::bench::ramblock_run::{build_ramblock, migrate_json, RunFailure};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: cargo xtask bench migrate --local [--runs N] [--size 4G] [--backings memfd,hugetlb] [--no-qemu]";

/// How long one run may take (warm-up of a 4 GiB guest included).
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

pub(in crate::bench) struct Options {
    runs: usize,
    size: u64,
    backings: Vec<String>,
    qemu: bool,
}

pub(in crate::bench) fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        runs: 10,
        size: 4 << 30,
        backings: vec!["memfd".into(), "hugetlb".into()],
        qemu: true,
    };
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--local" => {}
            "--runs" => o.runs = opt::runs(opt::value(&mut it, arg, USAGE)?, USAGE)?,
            "--size" => o.size = super::parse_size(opt::value(&mut it, arg, USAGE)?)?,
            "--backings" => {
                o.backings = opt::value(&mut it, arg, USAGE)?
                    .split(',')
                    .map(String::from)
                    .collect();
                if let Some(b) = o.backings.iter().find(|b| *b != "memfd" && *b != "hugetlb") {
                    return Err(format!("backing {b:?}: use memfd or hugetlb; {USAGE}"));
                }
            }
            "--no-qemu" => o.qemu = false,
            other => return Err(format!("unexpected argument `{other}`; {USAGE}")),
        }
    }
    Ok(o)
}

/// One run's figures.
#[derive(Clone, Debug, Default)]
struct Run {
    total_ms: f64,
    downtime_ms: f64,
    two_loops_ms: f64,
    prepare_ms: f64,
    verified: bool,
}

pub(in crate::bench) fn bench(o: &Options) -> Result<(), String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: both sides of this comparison need KVM".into());
    }
    let binary = build_ramblock()?;
    let dir = crate::target_dir()
        .map_err(|e| e.to_string())?
        .join("bench-migrate-local");
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let image = if o.qemu {
        ensure_installed(QEMU, "qemu-system-x86")?;
        ensure_installed("as", "binutils")?;
        ensure_installed("ld", "binutils")?;
        println!("{}, KVM", super::qemu::version()?);
        Some(image::build(&dir, Variant::Increment)?)
    } else {
        None
    };
    let gib = o.size as f64 / (1u64 << 30) as f64;
    let mut columns: Vec<(String, Vec<Result<Run, String>>)> = o
        .backings
        .iter()
        .map(|b| (format!("ramblock {b}"), Vec::new()))
        .collect();
    if image.is_some() {
        columns.push(("QEMU shm x-ignore-shared".into(), Vec::new()));
    }
    for n in 1..=o.runs {
        for (i, (name, runs)) in columns.iter_mut().enumerate() {
            let run = match (o.backings.get(i), &image) {
                (Some(backing), _) => ramblock(&binary, o.size, backing),
                (None, Some(image)) => qemu(&dir, image, o.size),
                (None, None) => continue,
            };
            match &run {
                Ok(r) => println!(
                    "{gib} GiB run {n}: {name:<26} total {:.1} ms, downtime {:.2} ms, two loops {:.1} ms, prepare {:.0} ms, {}",
                    r.total_ms,
                    r.downtime_ms,
                    r.two_loops_ms,
                    r.prepare_ms,
                    if r.verified { "verified" } else { "NOT VERIFIED" }
                ),
                Err(e) => println!("{gib} GiB run {n}: {name:<26} FAILED: {e}"),
            }
            runs.push(run);
        }
    }
    println!();
    println!("{}", table(gib, &columns));
    let bad: usize = columns
        .iter()
        .map(|(_, runs)| {
            runs.iter()
                .filter(|r| !matches!(r, Ok(r) if r.verified))
                .count()
        })
        .sum();
    if bad > 0 {
        return Err(format!("{bad} run(s) failed or did not verify"));
    }
    Ok(())
}

/// The Markdown table of medians, with ratios to QEMU's column (the last).
fn table(gib: f64, columns: &[(String, Vec<Result<Run, String>>)]) -> String {
    let med = |runs: &[Result<Run, String>], f: fn(&Run) -> f64| {
        median(runs.iter().filter_map(|r| r.as_ref().ok()).map(f).collect())
    };
    let qemu = columns
        .iter()
        .find(|(n, _)| n.starts_with("QEMU"))
        .map(|(_, runs)| runs);
    let mut t = format!(
        "{gib} GiB increment guest, local update, medians of {} runs\n\n| | total ms | downtime ms | two loops ms | prepare ms | verified | total / QEMU | downtime / QEMU | two loops / QEMU |\n|---|---|---|---|---|---|---|---|---|\n",
        columns.first().map_or(0, |c| c.1.len())
    );
    for (name, runs) in columns {
        let ok = runs
            .iter()
            .filter(|r| matches!(r, Ok(r) if r.verified))
            .count();
        let figures: Vec<Option<f64>> = [
            (|r: &Run| r.total_ms) as fn(&Run) -> f64,
            |r| r.downtime_ms,
            |r| r.two_loops_ms,
        ]
        .iter()
        .map(|f| med(runs, *f))
        .collect();
        let ratio = |i: usize, f: fn(&Run) -> f64| match (figures[i], qemu.and_then(|q| med(q, f)))
        {
            (Some(a), Some(b)) if b > 0.0 && !name.starts_with("QEMU") => format!("{:.3}x", a / b),
            _ => "-".into(),
        };
        let cell =
            |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        t.push_str(&format!(
            "| {name} | {} | {} | {} | {} | {ok}/{} | {} | {} | {} |\n",
            cell(figures[0], 1),
            cell(figures[1], 2),
            cell(figures[2], 1),
            cell(med(runs, |r| r.prepare_ms), 0),
            runs.len(),
            ratio(0, |r| r.total_ms),
            ratio(1, |r| r.downtime_ms),
            ratio(2, |r| r.two_loops_ms),
        ));
    }
    t
}

/// One `ramblock migrate --local` run.
fn ramblock(binary: &Path, size: u64, backing: &str) -> Result<Run, String> {
    let args = [
        "--local".to_string(),
        "--backing".to_string(),
        backing.to_string(),
        format!("--size={}M", size >> 20),
    ];
    let _pool = match backing {
        "hugetlb" => Some(HugePool::reserve(size >> 21)?),
        _ => None,
    };
    let s = migrate_json(binary, &args, RUN_TIMEOUT).map_err(|e| match e {
        RunFailure::TimedOut => format!("timed out after {RUN_TIMEOUT:?}"),
        RunFailure::Failed(e) => e,
    })?;
    Ok(Run {
        total_ms: s.float("total_ms")?,
        downtime_ms: s.float("downtime_ms")?,
        two_loops_ms: s.float("dest_two_loops_ms")?,
        prepare_ms: s.float("prepare_ms")?,
        verified: s.flag("verified")? && s.flag("destination_ran")?,
    })
}

/// 2 MiB hugepages added to the pool for a run, given back after it.
struct HugePool(u64);

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePool {
    fn reserve(pages: u64) -> Result<HugePool, String> {
        let read = || -> Result<u64, String> {
            std::fs::read_to_string(NR_HUGEPAGES)
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?
                .trim()
                .parse()
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))
        };
        let original = read()?;
        let pool = HugePool(original);
        for attempt in 0..2 {
            if attempt > 0 {
                // Free memory in fragments (a busy build machine) holds no
                // 2 MiB runs: compact it once, then ask again.
                let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
            }
            std::fs::write(NR_HUGEPAGES, (original + pages).to_string())
                .map_err(|e| format!("{NR_HUGEPAGES}: {e}"))?;
            if read()? >= original + pages {
                break;
            }
        }
        if read()? < original + pages {
            return Err(format!(
                "only {} of {} 2 MiB hugepages could be reserved",
                read()? - original,
                pages
            ));
        }
        Ok(pool)
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.0.to_string());
    }
}

/// One QEMU local migration: two QEMUs sharing guest RAM on /dev/shm.
fn qemu(dir: &Path, image: &Path, size: u64) -> Result<Run, String> {
    let run_dir = dir.join("qemu-run");
    let _ = std::fs::remove_dir_all(&run_dir);
    std::fs::create_dir_all(&run_dir)
        .map_err(|e| format!("cannot create {}: {e}", run_dir.display()))?;
    let shm = format!("/dev/shm/ramblock-bench-local-{}", std::process::id());
    let _ = std::fs::remove_file(&shm);
    let result = qemu_run(&run_dir, image, size, &shm)
        .map_err(|e| with_log_tails(&e, &run_dir, &["source", "destination"]));
    let _ = std::fs::remove_file(&shm);
    result
}

fn qemu_run(run_dir: &Path, image: &Path, size: u64, shm: &str) -> Result<Run, String> {
    let sockets = ["source", "destination"].map(|s| run_dir.join(format!("{s}.qmp")));
    let migration = run_dir.join("migration.sock");
    let args = |socket: &Path| {
        let mut a = common_args(image, size, socket);
        a.extend([
            "-object".to_string(),
            format!(
                "memory-backend-file,id=ram0,size={}M,mem-path={shm},share=on",
                size >> 20
            ),
            "-machine".to_string(),
            "memory-backend=ram0".to_string(),
        ]);
        a
    };
    let mut children = Children(Vec::new());
    children.0.push(spawn(
        std::process::Command::new(QEMU),
        &args(&sockets[0]),
        &run_dir.join("source.log"),
    )?);
    let deadline = Instant::now() + Duration::from_secs(30 + 15 * (size >> 30));
    let mut source = Qmp::connect(&sockets[0], "source", deadline)?;
    super::qemu::warm_up(&mut source, Variant::Increment)?;
    // The destination starts once the source's guest runs: it maps the
    // same file, and waits for the migration.
    let mut dest_args = args(&sockets[1]);
    dest_args.extend(["-incoming", "defer"].map(String::from));
    children.0.push(spawn(
        std::process::Command::new(QEMU),
        &dest_args,
        &run_dir.join("destination.log"),
    )?);
    let mut dest = Qmp::connect(&sockets[1], "destination", deadline)?;
    let caps = json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] });
    source.execute("migrate-set-capabilities", caps.clone())?;
    dest.execute("migrate-set-capabilities", caps)?;
    let uri = format!("unix:{}", migration.display());
    dest.execute("migrate-incoming", json!({ "uri": uri }))?;
    source.execute("migrate", json!({ "uri": uri }))?;
    // The destination runs at the end of the migration (no -S).
    let limit = Instant::now() + Duration::from_secs(30);
    while dest.status()? != "running" {
        if Instant::now() >= limit {
            return Err("the destination QEMU did not start running within 30 s".into());
        }
    }
    let running = Instant::now();
    let start = dest.read_words(image::PASS_COUNT, 1)?[0];
    let limit = running + Duration::from_secs(60);
    let two_loops_ms = loop {
        let now = dest.read_words(image::PASS_COUNT, 1)?[0];
        if now >= start + 2 {
            break running.elapsed().as_secs_f64() * 1e3;
        }
        if Instant::now() >= limit {
            return Err(format!(
                "the destination guest completed {} loops in 60 s",
                now - start
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let info = source.execute("query-migrate", json!({}))?;
    if info["status"] != "completed" {
        return Err(format!("QEMU migration did not complete: {info}"));
    }
    let num = |key: &str| {
        info[key]
            .as_f64()
            .ok_or_else(|| format!("query-migrate has no {key}: {info}"))
    };
    Ok(Run {
        total_ms: num("total-time")?,
        downtime_ms: num("downtime")?,
        two_loops_ms,
        prepare_ms: 0.0,
        verified: source.status()? == "postmigrate",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_parse() {
        let o = parse(&args("--local")).unwrap();
        assert_eq!((o.runs, o.size, o.qemu), (10, 4 << 30, true));
        assert_eq!(o.backings, ["memfd", "hugetlb"]);
        let o = parse(&args(
            "--local --runs 3 --size 1G --backings hugetlb --no-qemu",
        ))
        .unwrap();
        assert_eq!((o.runs, o.size, o.qemu), (3, 1 << 30, false));
        assert_eq!(o.backings, ["hugetlb"]);
        assert!(parse(&args("--backings anonymous")).is_err());
        assert!(parse(&args("--runs 0")).is_err());
        assert!(parse(&args("--frobnicate")).is_err());
    }

    #[test]
    fn the_table_has_medians_and_ratios_to_qemu() {
        let run = |total_ms, downtime_ms, two_loops_ms| {
            Ok(Run {
                total_ms,
                downtime_ms,
                two_loops_ms,
                prepare_ms: 1.0,
                verified: true,
            })
        };
        let columns = vec![
            (
                "ramblock memfd".to_string(),
                vec![run(10.0, 1.0, 50.0), run(30.0, 3.0, 70.0), Err("x".into())],
            ),
            (
                "QEMU shm x-ignore-shared".to_string(),
                vec![
                    run(20.0, 4.0, 5000.0),
                    run(20.0, 4.0, 5000.0),
                    run(20.0, 4.0, 5000.0),
                ],
            ),
        ];
        let t = table(4.0, &columns);
        assert!(
            t.contains(
                "| ramblock memfd | 20.0 | 2.00 | 60.0 | 1 | 2/3 | 1.000x | 0.500x | 0.012x |"
            ),
            "{t}"
        );
        assert!(
            t.contains("| QEMU shm x-ignore-shared | 20.0 | 4.00 | 5000.0 | 1 | 3/3 | - | - | - |"),
            "{t}"
        );
    }
}
