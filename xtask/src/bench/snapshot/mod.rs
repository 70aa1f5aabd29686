//! `cargo xtask bench snapshot [--sizes 1G] [--dirs /dev/shm,/var/tmp] [--runs N] [--diff-after-ms MS]`:
//! `ramblock snapshot` measured against baselines taken in the same run.
//!
//! Per size and directory (tmpfs and disk by default), `--runs` times:
//! - save a guest that wrote all its memory, and a plain single-threaded
//!   `pwrite` loop of the same memory to the same directory (the hidden
//!   `--baseline` of `ramblock snapshot save`): throughput ratio;
//! - restore it eagerly (and a plain `pread` loop of the file into the
//!   same memory, `--baseline`), by mmap and lazily: restore time, time to
//!   the guest's first instruction and to its first completed loop, lazy
//!   faults and their p99 (the file is in the page cache: just written);
//! - save a parent and a diff after the guest ran `--diff-after-ms` more:
//!   the diff's size on disk and save time against the full snapshot's;
//! - save the running guest live (`--live --compare-paused`): its total
//!   time against a paused save of the same guest, the guest's loop rate
//!   before and during, and the per-fault service time p50/p99.
//!
//! - with `--qemu` (the default when QEMU 7.2 is installed or installable),
//!   QEMU saving the same guest with `migrate "exec:cat > FILE"` and loading
//!   it with `-incoming "exec:cat FILE"` ([`qemu`]), to the same directory.
//!
//! Medians are printed with the targets; a failed run makes the
//! command exit non-zero. Only run on demand.

mod qemu;

use super::migrate::{ensure_installed, image, median, parse_sizes};
use super::ramblock_run::{run_json, RunFailure, Summary};
use crate::bench::opt;
use std::path::{Path, PathBuf};
use std::time::Duration;

const USAGE: &str = "usage: cargo xtask bench snapshot [--sizes 1G,4G] [--dirs DIR,...] [--runs N] [--diff-after-ms MS] [--no-qemu]";
const TIMEOUT: Duration = Duration::from_secs(300);

pub(super) struct Options {
    sizes: Vec<u64>,
    dirs: Vec<PathBuf>,
    runs: usize,
    diff_after_ms: u64,
    qemu: bool,
}

pub(super) fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        sizes: vec![1 << 30],
        dirs: vec!["/dev/shm".into(), "/var/tmp".into()],
        runs: 3,
        diff_after_ms: 100,
        qemu: true,
    };
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        let mut value = || opt::value(&mut args, arg, USAGE);
        match arg.as_str() {
            "--sizes" => o.sizes = parse_sizes(value()?)?,
            "--dirs" => o.dirs = value()?.split(',').map(PathBuf::from).collect(),
            "--runs" => o.runs = opt::runs(value()?, USAGE)?,
            "--diff-after-ms" => {
                o.diff_after_ms = value()?
                    .parse()
                    .map_err(|_| format!("`--diff-after-ms` needs milliseconds; {USAGE}"))?
            }
            "--no-qemu" => o.qemu = false,
            other => return Err(format!("unexpected argument `{other}`; {USAGE}")),
        }
    }
    Ok(o)
}

/// One figure's values over the runs.
#[derive(Default)]
struct Series(Vec<(&'static str, Vec<f64>)>);

impl Series {
    fn push(&mut self, key: &'static str, v: f64) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, vs)) => vs.push(v),
            None => self.0.push((key, vec![v])),
        }
    }

    /// The value pushed last for `key`.
    fn last(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| v.last().copied())
            .unwrap_or(f64::NAN)
    }

    fn med(&self, key: &str) -> f64 {
        self.0
            .iter()
            .find(|(k, _)| *k == key)
            .and_then(|(_, v)| median(v.clone()))
            .unwrap_or(f64::NAN)
    }
}

fn ramblock(binary: &Path, args: &[String]) -> Result<Summary, String> {
    let s = run_json(std::process::Command::new(binary), args, TIMEOUT).map_err(|e| match e {
        RunFailure::TimedOut => "timed out".to_string(),
        RunFailure::Failed(e) => e,
    })?;
    if s.value["verified"].as_bool() != Some(true) {
        return Err(format!("not verified: {}", s.line));
    }
    Ok(s)
}

fn one_run(
    binary: &Path,
    dir: &Path,
    size: u64,
    diff_ms: u64,
    qemu_image: Option<&Path>,
    s: &mut Series,
) -> Result<(), String> {
    let file = dir.join(format!("ramblock-bench-{}.snap", std::process::id()));
    let f = file.to_string_lossy().into_owned();
    let size_arg = format!("--size={}M", size >> 20);
    let a = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let result = (|| {
        let save = ramblock(
            binary,
            &a(&["snapshot", "save", &f, &size_arg, "--baseline", "--json"]),
        )?;
        let mib = size as f64 / (1 << 20) as f64;
        s.push("save_ms", save.float("save_ms")?);
        s.push("save_mib_s", mib / save.float("save_ms")? * 1e3);
        s.push("baseline_pwrite_ms", save.float("baseline_pwrite_ms")?);
        s.push(
            "save_ratio",
            save.float("baseline_pwrite_ms")? / save.float("save_ms")?,
        );
        let eager = ramblock(
            binary,
            &a(&[
                "snapshot",
                "restore",
                &f,
                "--mode",
                "eager",
                "--baseline",
                "--json",
            ]),
        )?;
        s.push("eager_restore_ms", eager.float("restore_ms")?);
        s.push("baseline_read_ms", eager.float("baseline_read_ms")?);
        s.push(
            "eager_ratio",
            eager.float("baseline_read_ms")? / eager.float("restore_ms")?,
        );
        s.push("eager_first_ms", eager.float("first_instruction_ms")?);
        s.push("eager_loop_ms", eager.float("one_loop_ms")?);
        for (mode, first, lp) in [
            ("mmap", "mmap_first_ms", "mmap_loop_ms"),
            ("lazy", "lazy_first_ms", "lazy_loop_ms"),
        ] {
            let r = ramblock(
                binary,
                &a(&["snapshot", "restore", &f, "--mode", mode, "--json"]),
            )?;
            s.push(first, r.float("first_instruction_ms")?);
            s.push(lp, r.float("one_loop_ms")?);
            if mode == "lazy" {
                s.push("lazy_restore_ms", r.float("restore_ms")?);
                // Prefetching races the guest and leaves few faults: the
                // fault latency is measured without it.
                let r = ramblock(
                    binary,
                    &a(&[
                        "snapshot",
                        "restore",
                        &f,
                        "--mode",
                        "lazy",
                        "--no-prefetch",
                        "--json",
                    ]),
                )?;
                s.push("lazy_faults", r.float("faults")?);
                s.push("lazy_p50_us", r.float("fault_p50_us")?);
                s.push("lazy_p99_us", r.float("fault_p99_us")?);
                s.push("lazy_np_loop_ms", r.float("one_loop_ms")?);
            } else {
                s.push("mmap_restore_ms", r.float("restore_ms")?);
            }
        }
        // A new file, as for the first save: replacing the 1 GiB snapshot
        // would time freeing its blocks.
        let _ = std::fs::remove_file(&file);
        // `ramblock snapshot save FILE --size=.. EXTRA --json`.
        let save_with = |extra: &[&str]| {
            let mut args = a(&["snapshot", "save", &f, &size_arg]);
            args.extend(a(extra));
            args.push("--json".into());
            ramblock(binary, &args)
        };
        let diff = save_with(&["--diff", &format!("--diff-after-ms={diff_ms}")])?;
        let full_disk = std::fs::metadata(format!("{f}.base")).map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() * 512
        });
        let full_disk = full_disk.map_err(|e| e.to_string())? as f64;
        s.push(
            "diff_pages_pct",
            100.0 * diff.float("pages_held")? / (size / 4096) as f64,
        );
        s.push(
            "diff_size_pct",
            100.0 * diff.float("bytes_on_disk")? / full_disk,
        );
        s.push(
            "diff_time_pct",
            100.0 * diff.float("save_ms")? / diff.float("full_save_ms")?,
        );
        let _ = std::fs::remove_file(&file);
        let live = save_with(&["--live", "--compare-paused"])?;
        for (key, series) in [
            ("save_ms", "live_save_ms"),
            ("paused_save_ms", "live_paused_save_ms"),
            ("live_vs_paused", "live_vs_paused"),
            ("guest_paused_ms", "live_guest_paused_ms"),
            ("loops_per_s_before", "live_loops_before"),
            ("loops_per_s_during", "live_loops_during"),
            ("faults", "live_faults"),
            ("faulted_pages", "live_faulted_pages"),
            ("fault_service_p50_us", "live_p50_us"),
            ("fault_service_p99_us", "live_p99_us"),
        ] {
            s.push(series, live.float(key)?);
        }
        if let Some(image) = qemu_image {
            let run_dir = crate::target_dir()
                .map_err(|e| e.to_string())?
                .join("bench-snapshot/qemu-run");
            let vm_file = dir.join(format!("qemu-bench-{}.vm", std::process::id()));
            let q = qemu::save_and_load(&run_dir, image, size, &vm_file)?;
            s.push("qemu_save_ms", q.save_ms);
            s.push("qemu_load_ms", q.load_ms);
            s.push("qemu_file_mib", q.file_bytes as f64 / (1 << 20) as f64);
            s.push("qemu_save_ratio", s.last("save_ms") / q.save_ms);
            s.push("qemu_load_ratio", s.last("eager_first_ms") / q.load_ms);
            s.push("qemu_load_ratio_lazy", s.last("lazy_first_ms") / q.load_ms);
        }
        Ok(())
    })();
    for p in [file.clone(), PathBuf::from(format!("{f}.base"))] {
        let _ = std::fs::remove_file(p);
    }
    result
}

pub(super) fn bench(o: &Options) -> Result<usize, String> {
    if !Path::new("/dev/kvm").exists() {
        return Err("no /dev/kvm: the snapshots are of the KVM test guest".into());
    }
    let binary = super::ramblock_run::build_ramblock()?;
    let target = crate::target_dir().map_err(|e| e.to_string())?;
    let qemu_image = if o.qemu {
        ensure_installed(super::migrate::qemu::QEMU, "qemu-system-x86")?;
        ensure_installed("as", "binutils")?;
        ensure_installed("ld", "binutils")?;
        let dir = target.join("bench-snapshot");
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        println!("{}", super::migrate::qemu::version()?);
        Some(image::build(&dir, image::Variant::Increment)?)
    } else {
        None
    };
    let mut failed = 0;
    let mut tables = Vec::new();
    for &size in &o.sizes {
        for dir in &o.dirs {
            let label = format!(
                "{} GiB to {}",
                size as f64 / (1u64 << 30) as f64,
                dir.display()
            );
            let mut s = Series::default();
            for n in 1..=o.runs {
                match one_run(
                    &binary,
                    dir,
                    size,
                    o.diff_after_ms,
                    qemu_image.as_deref(),
                    &mut s,
                ) {
                    Ok(()) => println!("{label} run {n}: ok"),
                    Err(e) => {
                        println!("{label} run {n}: FAILED: {e}");
                        failed += 1;
                    }
                }
            }
            tables.push(table(&label, &s));
        }
    }
    println!();
    for t in tables {
        println!("{t}");
    }
    Ok(failed)
}

fn table(label: &str, s: &Series) -> String {
    let ok = |good: bool| if good { "met" } else { "MISSED" };
    let mut t = format!("### {label} (medians)\n\n| figure | value | target |\n|---|---|---|\n");
    let mut row = |name: &str, value: String, target: String| {
        t.push_str(&format!("| {name} | {value} | {target} |\n"));
    };
    let r = s.med("save_ratio");
    row(
        "save",
        format!(
            "{:.0} ms ({:.0} MiB/s); plain pwrite loop {:.0} ms; throughput ratio {r:.2}",
            s.med("save_ms"),
            s.med("save_mib_s"),
            s.med("baseline_pwrite_ms")
        ),
        format!(">= 0.9x: {}", ok(r >= 0.9)),
    );
    let r = s.med("eager_ratio");
    row(
        "eager restore",
        format!(
            "{:.0} ms; plain read loop {:.0} ms; throughput ratio {r:.2}",
            s.med("eager_restore_ms"),
            s.med("baseline_read_ms")
        ),
        format!(">= 0.9x: {}", ok(r >= 0.9)),
    );
    for (mode, first, lp) in [
        ("eager", "eager_first_ms", "eager_loop_ms"),
        ("mmap", "mmap_first_ms", "mmap_loop_ms"),
        ("lazy", "lazy_first_ms", "lazy_loop_ms"),
    ] {
        let f = s.med(first);
        let target = if mode == "eager" {
            "-".to_string()
        } else {
            format!("<= 5 ms: {}", ok(f <= 5.0))
        };
        row(
            &format!("{mode}: first instruction / one loop"),
            format!("{f:.1} ms / {:.0} ms", s.med(lp)),
            target,
        );
    }
    let p = s.med("lazy_p99_us");
    row(
        "lazy without prefetch: one loop",
        format!("{:.0} ms", s.med("lazy_np_loop_ms")),
        "-".into(),
    );
    row(
        "lazy without prefetch: faults, p50, p99",
        format!(
            "{:.0} faults, p50 {:.0} us, p99 {p:.0} us (with prefetch: all pages present after {:.0} ms)",
            s.med("lazy_faults"),
            s.med("lazy_p50_us"),
            s.med("lazy_restore_ms")
        ),
        format!("< 100 us: {}", ok(p < 100.0)),
    );
    if !s.med("qemu_save_ms").is_nan() {
        let (sr, lr, ll) = (
            s.med("qemu_save_ratio"),
            s.med("qemu_load_ratio"),
            s.med("qemu_load_ratio_lazy"),
        );
        row(
            "vs QEMU 7.2 save (exec:cat > FILE)",
            format!(
                "QEMU {:.0} ms ({:.0} MiB file); ramblock/QEMU {sr:.2}",
                s.med("qemu_save_ms"),
                s.med("qemu_file_mib")
            ),
            format!("<= 0.3x: {}", ok(sr <= 0.3)),
        );
        row(
            "vs QEMU 7.2 load (-incoming exec:cat FILE)",
            format!(
                "QEMU {:.0} ms to loaded; ramblock first instruction / QEMU: eager {lr:.3}, lazy {ll:.3}",
                s.med("qemu_load_ms")
            ),
            format!("<= 0.1x: eager {}, lazy {}", ok(lr <= 0.1), ok(ll <= 0.1)),
        );
    }
    row(
        "live save: total / paused save of the same guest",
        format!(
            "{:.0} ms / {:.0} ms: {:.2}x (guest paused {:.1} ms for the instant)",
            s.med("live_save_ms"),
            s.med("live_paused_save_ms"),
            s.med("live_vs_paused"),
            s.med("live_guest_paused_ms")
        ),
        "-".into(),
    );
    row(
        "live save: guest loops/s before / during",
        format!(
            "{:.1} / {:.2}",
            s.med("live_loops_before"),
            s.med("live_loops_during")
        ),
        "-".into(),
    );
    row(
        "live save: faults, pages saved ahead of the guest, service p50, p99",
        format!(
            "{:.0}, {:.0}, {:.1} us, {:.1} us",
            s.med("live_faults"),
            s.med("live_faulted_pages"),
            s.med("live_p50_us"),
            s.med("live_p99_us")
        ),
        "-".into(),
    );
    let (sz, tm) = (s.med("diff_size_pct"), s.med("diff_time_pct"));
    row(
        "diff",
        format!(
            "{:.2}% of pages: size {sz:.2}%, time {tm:.2}% of the full snapshot's",
            s.med("diff_pages_pct")
        ),
        format!("<= 2% at 1% of pages: {}", ok(sz <= 2.0 && tm <= 2.0)),
    );
    t
}
