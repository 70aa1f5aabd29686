//! One QEMU migration: a source and a destination `qemu-system-x86_64` on
//! this machine, migrating over loopback TCP, driven over QMP.
//!
//! Both QEMUs are children held by [`Children`], which kills them when
//! dropped, whatever path the run leaves by.

use super::image::{self, Variant};
use super::link::{Link, Shape};
use super::qmp::Qmp;
use super::{Measured, Outcome, Prep, MIGRATION_TIMEOUT};
use serde_json::{json, Value};
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// QEMU's binary.
pub const QEMU: &str = "qemu-system-x86_64";
/// The downtime limit both sides get, in milliseconds.
pub const DOWNTIME_LIMIT_MS: u64 = 300;
/// QEMU's bandwidth cap (its default is 128 MiB/s): 100 GiB/s, i.e. none.
pub(crate) const MAX_BANDWIDTH: u64 = 100 << 30;
/// Boot, plus the first full pass of the increment guest over its RAM.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(90);
/// How much guest memory one `pmemsave` chunk compares at a time.
const COMPARE_CHUNK: u64 = 256 << 20;

/// How long the guest's loop rate is measured before the migration.
const RATE_WINDOW: Duration = Duration::from_millis(500);

/// One way QEMU can send: one stream, or multifd with channels and
/// optionally zero-copy sends.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Multifd channels; `None`: QEMU's single migration stream.
    pub multifd: Option<u32>,
    /// `zero-copy-send` (multifd only; locks guest memory on the source).
    pub zero_copy: bool,
}

impl Config {
    /// The configurations the bench compares: one stream, multifd with 2
    /// and 4 channels, and multifd with 2 channels and zero-copy sends.
    pub const ALL: [Config; 4] = [
        Config {
            multifd: None,
            zero_copy: false,
        },
        Config {
            multifd: Some(2),
            zero_copy: false,
        },
        Config {
            multifd: Some(4),
            zero_copy: false,
        },
        Config {
            multifd: Some(2),
            zero_copy: true,
        },
    ];

    /// The name `--qemu` takes: stream, multifd2, multifd4, zero-copy.
    pub fn key(self) -> String {
        match (self.multifd, self.zero_copy) {
            (None, _) => "stream".into(),
            (Some(_), true) => "zero-copy".into(),
            (Some(n), false) => format!("multifd{n}"),
        }
    }

    /// A column name for the table.
    pub fn name(self) -> String {
        match (self.multifd, self.zero_copy) {
            (None, _) => "QEMU 1 stream".into(),
            (Some(n), false) => format!("QEMU multifd {n}"),
            (Some(n), true) => format!("QEMU mfd {n} zc"),
        }
    }

    /// The capabilities a side sets before the migration (in QEMU 7.2
    /// zero-copy sending is a capability of the source). Over a shaped
    /// link QEMU auto-converges, as ramblock does by default: neither
    /// converges there unaided.
    fn capabilities(self, source: bool, shaped: bool) -> Value {
        let mut caps = vec![
            json!({ "capability": "multifd", "state": self.multifd.is_some() }),
            json!({ "capability": "auto-converge", "state": shaped }),
        ];
        if source && self.zero_copy {
            caps.push(json!({ "capability": "zero-copy-send", "state": true }));
        }
        json!({ "capabilities": caps })
    }
}

/// QEMU processes killed (and reaped) on drop.
pub(crate) struct Children(pub(crate) Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The version line QEMU prints, e.g. "QEMU emulator version 7.2.22 (...)".
pub fn version() -> Result<String, String> {
    let out = Command::new(QEMU)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {QEMU}: {e}"))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or("QEMU (unknown version)")
        .to_string())
}

/// A loopback port nobody listens on right now.
fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no loopback port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| e.to_string())
}

pub(crate) fn spawn(mut command: Command, args: &[String], log: &Path) -> Result<Child, String> {
    let out = File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = out.try_clone().map_err(|e| e.to_string())?;
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {QEMU}: {e}"))
}

/// The last lines QEMU wrote, to explain a failure.
pub(crate) fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

/// `e` followed by the tail of each of `sides`' logs (`<side>.log` in
/// `run_dir`), which say why QEMU failed.
pub(crate) fn with_log_tails(e: &str, run_dir: &Path, sides: &[&str]) -> String {
    let logs = sides
        .iter()
        .map(|side| {
            let tail = log_tail(&run_dir.join(format!("{side}.log")));
            format!("{side} log: {tail}")
        })
        .collect::<Vec<_>>()
        .join("; ");
    format!("{e} ({logs})")
}

/// The QEMU arguments every bench guest shares: KVM, `size` bytes of
/// memory, the bench kernel `image`, no devices, and QMP on `socket`.
pub(crate) fn common_args(image: &Path, size: u64, socket: &Path) -> Vec<String> {
    [
        "-enable-kvm",
        "-m",
        &format!("{}M", size >> 20),
        "-kernel",
        &image.display().to_string(),
        "-nographic",
        "-nodefaults",
        "-qmp",
        &format!("unix:{},server=on,wait=off", socket.display()),
    ]
    .map(String::from)
    .to_vec()
}

/// Migrates a `size`-byte guest running `variant` from one QEMU to
/// another, verifies the destination, and returns QEMU's own figures.
pub fn migrate(
    dir: &Path,
    image: &Path,
    size: u64,
    variant: Variant,
    config: Config,
    prep: Prep,
    link: &Link,
) -> Outcome {
    let run_dir = dir.join("qemu-run");
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Err(e) = std::fs::create_dir_all(&run_dir) {
        return Outcome::Failed(format!("cannot create {}: {e}", run_dir.display()));
    }
    let result = run(&run_dir, image, size, variant, config, prep, link);
    match result {
        Ok(outcome) => outcome,
        Err(e) => Outcome::Failed(with_log_tails(&e, &run_dir, &["source", "destination"])),
    }
}

fn run(
    run_dir: &Path,
    image: &Path,
    size: u64,
    variant: Variant,
    config: Config,
    prep: Prep,
    link: &Link,
) -> Result<Outcome, String> {
    let port = free_port()?;
    let sockets: [PathBuf; 2] = ["source", "destination"].map(|s| run_dir.join(format!("{s}.qmp")));
    let common = |socket: &Path| common_args(image, size, socket);
    let mut children = Children(Vec::new());
    let mut source_args = common(&sockets[0]);
    if config.zero_copy {
        // Zero-copy sends need the guest's memory locked.
        source_args.extend(["-overcommit", "mem-lock=on"].map(String::from));
    }
    children.0.push(spawn(
        link.source_command(QEMU),
        &source_args,
        &run_dir.join("source.log"),
    )?);
    // -S: the destination stays paused after the migration, so its memory
    // can be compared with the (paused) source's before it runs on.
    // `defer`: multifd must be set on the destination before it listens.
    let mut dest_args = common(&sockets[1]);
    dest_args.extend(["-S", "-incoming", "defer"].map(String::from));
    if prep == Prep::Prealloc {
        // Populated before it listens, like ramblock's preallocated
        // destination: received pages pay no first-touch fault.
        dest_args.push("-mem-prealloc".into());
    }
    children.0.push(spawn(
        link.dest_command(QEMU),
        &dest_args,
        &run_dir.join("destination.log"),
    )?);

    // Preallocating a 4 GiB destination takes seconds before QMP answers.
    let deadline = Instant::now() + Duration::from_secs(30 + 15 * (size >> 30));
    let mut source = Qmp::connect(&sockets[0], "source", deadline)?;
    let mut dest = Qmp::connect(&sockets[1], "destination", deadline)?;
    let regions = warm_up(&mut source, variant)?;

    for (qmp, is_source) in [(&mut source, true), (&mut dest, false)] {
        qmp.execute(
            "migrate-set-capabilities",
            config.capabilities(is_source, link.shape() != Shape::Loopback),
        )?;
        if let Some(channels) = config.multifd {
            qmp.execute(
                "migrate-set-parameters",
                json!({ "multifd-channels": channels }),
            )?;
        }
    }
    dest.execute(
        "migrate-incoming",
        json!({ "uri": format!("tcp:{}:{port}", link.dest_addr()) }),
    )?;
    source.execute(
        "migrate-set-parameters",
        json!({ "downtime-limit": DOWNTIME_LIMIT_MS, "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    // Make sure the cap really is lifted: QEMU's default of 128 MiB/s would
    // decide the result on its own.
    let params = source.execute("query-migrate-parameters", json!({}))?;
    if params["max-bandwidth"].as_u64() != Some(MAX_BANDWIDTH)
        || params["downtime-limit"].as_u64() != Some(DOWNTIME_LIMIT_MS)
        || config
            .multifd
            .is_some_and(|n| params["multifd-channels"].as_u64() != Some(u64::from(n)))
    {
        return Err(format!(
            "QEMU did not take the migration parameters: {params}"
        ));
    }
    let rate_before = loop_rate(&mut source)?;
    let caps = source.execute("query-migrate-capabilities", json!({}))?;
    let state = |name: &str| {
        caps.as_array()
            .into_iter()
            .flatten()
            .find(|c| c["capability"] == name)
            .and_then(|c| c["state"].as_bool())
    };
    if state("multifd") != Some(config.multifd.is_some())
        || (config.zero_copy && state("zero-copy-send") != Some(true))
    {
        return Err(format!("QEMU did not take the capabilities: {caps}"));
    }
    let passes_before = source.read_words(image::PASS_COUNT, 1)?[0];
    source.execute(
        "migrate",
        json!({ "uri": format!("tcp:{}:{port}", link.dest_addr()) }),
    )?;
    let deadline = Instant::now() + MIGRATION_TIMEOUT;
    let info = loop {
        let info = source.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => break info,
            "failed" => {
                let why = info["error-desc"].as_str().unwrap_or("no description");
                return Ok(Outcome::Failed(format!("QEMU migration failed: {why}")));
            }
            _ if Instant::now() >= deadline => {
                let _ = source.execute("migrate_cancel", json!({}));
                return Ok(Outcome::TimedOut);
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    };
    let mut measured = figures(&info)?;
    // The source is paused at completion: its counter is final.
    measured.guest_passes = source.read_words(image::PASS_COUNT, 1)?[0] - passes_before;
    measured.rate_before = rate_before;
    measured.verified = verify(&mut source, &mut dest, &regions, variant, run_dir)?;
    Ok(Outcome::Done(measured))
}

/// Waits until the guest runs its workload: the region table is filled (the
/// CPL 0 setup is done) and, for the increment guest, one full pass over
/// its RAM is complete (as `ramblock migrate` waits for one). Returns the
/// table as [start, end) pairs.
pub(crate) fn warm_up(source: &mut Qmp, variant: Variant) -> Result<Vec<(u64, u64)>, String> {
    let deadline = Instant::now() + WARM_UP_TIMEOUT;
    loop {
        let words = source.read_words(image::REGIONS, image::REGION_SLOTS * 2)?;
        let regions: Vec<(u64, u64)> = words
            .chunks(2)
            .map(|p| (p[0], p[1]))
            .take_while(|&(_, end)| end != 0)
            .collect();
        let passes = source.read_words(image::PASS_COUNT, 1)?[0];
        let ready = !regions.is_empty() && (variant == Variant::Idle || passes >= 1);
        if ready {
            if variant == Variant::Idle {
                std::thread::sleep(Duration::from_millis(200));
            }
            return Ok(regions);
        }
        if Instant::now() >= deadline {
            let status = source.status()?;
            return Err(format!(
                "the guest did not start its workload within {WARM_UP_TIMEOUT:?} (status {status}, {} regions, {passes} passes)",
                regions.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's loop passes per second over [`RATE_WINDOW`].
fn loop_rate(source: &mut Qmp) -> Result<f64, String> {
    let (before, started) = (source.read_words(image::PASS_COUNT, 1)?[0], Instant::now());
    std::thread::sleep(RATE_WINDOW);
    let after = source.read_words(image::PASS_COUNT, 1)?[0];
    Ok((after - before) as f64 / started.elapsed().as_secs_f64())
}

/// QEMU's figures from a completed `query-migrate`.
fn figures(info: &Value) -> Result<Measured, String> {
    let num = |pointer: &str| {
        info.pointer(pointer)
            .and_then(Value::as_u64)
            .ok_or_else(|| format!("query-migrate has no {pointer}: {info}"))
    };
    // QEMU 7.2 with multifd once answered a completed migration with a
    // total time of 0 ms (seen 2026-12-04): no measurement, so the run
    // counts as failed rather than pulling the column's median down.
    if num("/total-time")? == 0 {
        return Err(format!(
            "query-migrate reports a total time of 0 ms for a completed migration: {info}"
        ));
    }
    Ok(Measured {
        total_ms: num("/total-time")? as f64,
        downtime_ms: num("/downtime")? as f64,
        setup_ms: num("/setup-time")? as f64,
        bytes: num("/ram/transferred")?,
        pages: num("/ram/normal")?,
        zero_pages: num("/ram/duplicate")?,
        passes: num("/ram/dirty-sync-count")?,
        mode: "bitmap + KVM_CLEAR_DIRTY_LOG (QEMU default)".into(),
        guest_passes: 0,
        rate_before: 0.0,
        // QEMU reports no per-pass throughput.
        pass0_bytes_per_s: None,
        verified: false,
    })
}

/// The destination is paused by `-S` and the source is stopped after
/// completion: the low 640 KiB (code, tables) and every range the guest
/// writes must be equal byte for byte. Then the destination is resumed and
/// must run (and, for the increment guest, make progress).
fn verify(
    source: &mut Qmp,
    dest: &mut Qmp,
    regions: &[(u64, u64)],
    variant: Variant,
    run_dir: &Path,
) -> Result<bool, String> {
    let src_status = source.status()?;
    if src_status != "postmigrate" {
        return Err(format!(
            "after completion the source is {src_status}, not postmigrate"
        ));
    }
    let ranges = std::iter::once((0, 0xA0000)).chain(regions.iter().copied());
    for (start, end) in ranges {
        let mut at = start;
        while at < end {
            let len = COMPARE_CHUNK.min(end - at);
            if !same_memory(source, dest, at, len, run_dir)? {
                eprintln!(
                    "  QEMU verification: memory differs in {at:#x}..{:#x}",
                    at + len
                );
                return Ok(false);
            }
            at += len;
        }
    }
    dest.execute("cont", json!({}))?;
    let status = dest.status()?;
    if status != "running" {
        eprintln!("  QEMU verification: destination is {status} after cont");
        return Ok(false);
    }
    if variant == Variant::Increment {
        let before = dest.read_words(image::PASS_COUNT, 1)?[0];
        let deadline = Instant::now() + Duration::from_secs(10);
        while dest.read_words(image::PASS_COUNT, 1)?[0] == before {
            if Instant::now() >= deadline {
                eprintln!("  QEMU verification: destination guest made no progress in 10 s");
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(true)
}

/// Saves `len` bytes at `gpa` from both QEMUs (`pmemsave`) and compares them.
fn same_memory(
    source: &mut Qmp,
    dest: &mut Qmp,
    gpa: u64,
    len: u64,
    run_dir: &Path,
) -> Result<bool, String> {
    let mut saved = Vec::new();
    for (qmp, name) in [(source, "source.mem"), (dest, "destination.mem")] {
        let path = run_dir.join(name);
        qmp.execute(
            "pmemsave",
            json!({ "val": gpa, "size": len, "filename": path.display().to_string() }),
        )?;
        saved.push(
            std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?,
        );
        let _ = std::fs::remove_file(&path);
    }
    if saved[0].len() as u64 != len {
        return Err(format!(
            "pmemsave wrote {} bytes, asked for {len}",
            saved[0].len()
        ));
    }
    Ok(saved[0] == saved[1])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_total_time_of_zero_is_no_measurement() {
        let info = |total: u64| {
            json!({
                "total-time": total, "downtime": 5, "setup-time": 1,
                "ram": { "transferred": 10, "normal": 2, "duplicate": 1, "dirty-sync-count": 3 }
            })
        };
        assert_eq!(figures(&info(120)).unwrap().total_ms, 120.0);
        assert!(figures(&info(0))
            .unwrap_err()
            .contains("total time of 0 ms"));
    }
}
