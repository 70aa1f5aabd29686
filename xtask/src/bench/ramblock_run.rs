//! One `ramblock migrate --json` process, as both benches run it: killed if
//! it outlives its deadline, its pipes drained while it runs, and the JSON
//! summary line it prints last read back.

use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Builds the release `ramblock` program (with its `cli` feature) and
/// returns its path under cargo's real target directory.
pub fn build_ramblock() -> Result<PathBuf, String> {
    let status = Command::new(crate::cargo())
        .current_dir(crate::project_root())
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
    let binary = crate::target_dir()
        .map_err(|e| e.to_string())?
        .join("release/ramblock");
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!(
            "cargo built ramblock but {} does not exist",
            binary.display()
        ))
    }
}

/// Why a run has no summary.
#[derive(Debug)]
pub enum RunFailure {
    /// Still running at the deadline (and killed).
    TimedOut,
    /// It could not start, or printed no good summary, or says it failed.
    Failed(String),
}

/// The summary line, parsed, with the line itself for error messages.
pub struct Summary {
    pub value: Value,
    pub line: String,
}

impl Summary {
    /// A number the summary must have.
    pub fn float(&self, key: &str) -> Result<f64, String> {
        self.value[key]
            .as_f64()
            .ok_or_else(|| format!("summary has no {key}: {}", self.line))
    }

    /// A count the summary must have.
    pub fn int(&self, key: &str) -> Result<u64, String> {
        self.value[key]
            .as_u64()
            .ok_or_else(|| format!("summary has no {key}: {}", self.line))
    }

    /// A flag the summary must have.
    pub fn flag(&self, key: &str) -> Result<bool, String> {
        self.value[key]
            .as_bool()
            .ok_or_else(|| format!("summary has no {key}: {}", self.line))
    }
}

/// Kills the child on drop (timeouts and errors included).
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads a pipe to its end on a thread, so a chatty child never blocks on a
/// full pipe while it is polled for exit.
fn drain(pipe: Option<impl Read + Send + 'static>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `binary migrate --json ARGS...`, waiting at most `timeout`, and
/// returns its summary (stderr is added to any failure).
pub fn migrate_json(
    binary: &Path,
    args: &[String],
    timeout: Duration,
) -> Result<Summary, RunFailure> {
    let mut all = vec!["migrate".to_string(), "--json".to_string()];
    all.extend_from_slice(args);
    run_json(Command::new(binary), &all, timeout)
}

/// [`migrate_json`] with the ramblock program started by `command` (e.g.
/// inside a network namespace).
pub fn migrate_json_with(
    command: Command,
    args: &[String],
    timeout: Duration,
) -> Result<Summary, RunFailure> {
    let mut all = vec!["migrate".to_string(), "--json".to_string()];
    all.extend_from_slice(args);
    run_json(command, &all, timeout)
}

/// Runs `command ARGS...` (a ramblock command that prints a JSON summary
/// last), waiting at most `timeout`, and returns its summary.
pub fn run_json(
    mut command: Command,
    args: &[String],
    timeout: Duration,
) -> Result<Summary, RunFailure> {
    let child = command
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| RunFailure::Failed(format!("cannot run {command:?}: {e}")))?;
    let mut guard = Guard(child);
    let stdout = drain(guard.0.stdout.take());
    let stderr = drain(guard.0.stderr.take());
    let deadline = Instant::now() + timeout;
    loop {
        match guard.0.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() >= deadline => return Err(RunFailure::TimedOut),
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => {
                return Err(RunFailure::Failed(format!(
                    "waiting for ramblock failed: {e}"
                )))
            }
        }
    }
    let stdout = stdout.join().unwrap_or_default();
    let stderr = stderr.join().unwrap_or_default();
    parse_summary(&stdout)
        .map_err(|e| RunFailure::Failed(format!("{e}; stderr: {}", stderr.trim())))
}

/// Reads the summary line `ramblock migrate --json` prints last; a summary
/// that carries an error is one.
pub fn parse_summary(stdout: &str) -> Result<Summary, String> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .ok_or_else(|| format!("ramblock printed no JSON summary: {stdout:?}"))?;
    let value: Value =
        serde_json::from_str(line).map_err(|e| format!("bad summary {line:?}: {e}"))?;
    if let Some(error) = value["error"].as_str() {
        return Err(format!("ramblock migration failed: {error}"));
    }
    Ok(Summary {
        value,
        line: line.to_string(),
    })
}
