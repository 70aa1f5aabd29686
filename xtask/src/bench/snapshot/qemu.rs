//! QEMU 7.2 saving the same guest to a file and loading it back:
//! `migrate "exec:cat > FILE"` from a paused guest, then a new QEMU with
//! `-incoming "exec:cat FILE"`, the way QEMU users snapshot to a file.
//!
//! The guest is prepared as `ramblock snapshot save` prepares its own: it
//! runs until one full pass of its increment loop is done, then is paused
//! (`stop`); QEMU's bandwidth cap is lifted. Save time is QEMU's own
//! `total-time`; load time is from starting the loading QEMU to its
//! `query-migrate` saying `completed` (polled every 5 ms), so it includes
//! QEMU's start-up, as ramblock's first-instruction time includes creating
//! its VM.

use super::super::migrate::image::Variant;
use super::super::migrate::qemu::{
    common_args, spawn, warm_up, with_log_tails, Children, MAX_BANDWIDTH, QEMU,
};
use super::super::migrate::qmp::Qmp;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// What one QEMU save and load measured.
pub struct QemuFigures {
    pub save_ms: f64,
    pub load_ms: f64,
    pub file_bytes: u64,
}

/// Saves a `size`-byte increment guest to `file` and loads it back.
pub fn save_and_load(
    run_dir: &Path,
    image: &Path,
    size: u64,
    file: &Path,
) -> Result<QemuFigures, String> {
    let _ = std::fs::remove_dir_all(run_dir);
    std::fs::create_dir_all(run_dir).map_err(|e| format!("{}: {e}", run_dir.display()))?;
    let result = run(run_dir, image, size, file);
    let _ = std::fs::remove_file(file);
    result.map_err(|e| with_log_tails(&e, run_dir, &["save", "load"]))
}

fn wait_completed(q: &mut Qmp, deadline: Instant) -> Result<serde_json::Value, String> {
    loop {
        let info = q.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => return Ok(info),
            "failed" => {
                return Err(format!(
                    "QEMU migration failed: {}",
                    info["error-desc"].as_str().unwrap_or("no description")
                ))
            }
            _ if Instant::now() >= deadline => return Err("QEMU migration timed out".into()),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    }
}

fn run(run_dir: &Path, image: &Path, size: u64, file: &Path) -> Result<QemuFigures, String> {
    let socket = run_dir.join("save.qmp");
    let mut children = Children(vec![spawn(
        Command::new(QEMU),
        &common_args(image, size, &socket),
        &run_dir.join("save.log"),
    )?]);
    let mut q = Qmp::connect(
        &socket,
        "saving QEMU",
        Instant::now() + Duration::from_secs(30),
    )?;
    warm_up(&mut q, Variant::Increment)?;
    q.execute("stop", json!({}))?;
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": MAX_BANDWIDTH }),
    )?;
    q.execute(
        "migrate",
        json!({ "uri": format!("exec:cat > {}", file.display()) }),
    )?;
    let info = wait_completed(&mut q, Instant::now() + Duration::from_secs(300))?;
    let save_ms = info["total-time"]
        .as_f64()
        .ok_or_else(|| format!("no total-time: {info}"))?;
    drop(q);
    drop(children);
    let file_bytes = std::fs::metadata(file).map_err(|e| e.to_string())?.len();

    let socket = run_dir.join("load.qmp");
    let mut args = common_args(image, size, &socket);
    args.extend([
        "-S".to_string(),
        "-incoming".to_string(),
        format!("exec:cat {}", file.display()),
    ]);
    let t = Instant::now();
    children = Children(vec![spawn(
        Command::new(QEMU),
        &args,
        &run_dir.join("load.log"),
    )?]);
    let mut q = Qmp::connect(
        &socket,
        "loading QEMU",
        Instant::now() + Duration::from_secs(30),
    )?;
    wait_completed(&mut q, Instant::now() + Duration::from_secs(300))?;
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(children);
    Ok(QemuFigures {
        save_ms,
        load_ms,
        file_bytes,
    })
}
