//! What the host has: toolchains, rustup targets, cargo subcommands. Every
//! probe is quiet; the caller decides whether a missing tool is a failure or
//! a `skipped:` line.

use crate::Error;
use std::process::{Command, Stdio};
use xshell::{cmd, Shell};

/// Whether `cargo <subcommand> --version` runs (the subcommand is installed).
pub fn has_cargo_subcommand(sh: &Shell, subcommand: &str) -> bool {
    cmd!(sh, "cargo {subcommand} --version")
        .quiet()
        .ignore_stdout()
        .ignore_stderr()
        .run()
        .is_ok()
}

/// Whether rustup lists a nightly toolchain.
pub fn has_nightly(sh: &Shell) -> bool {
    cmd!(sh, "rustup toolchain list")
        .quiet()
        .ignore_stderr()
        .read()
        .map(|list| list.lines().any(|l| l.starts_with("nightly")))
        .unwrap_or(false)
}

/// Makes sure the active toolchain can build for `target`, installing it with
/// `rustup target add` when missing. `Ok(Some(reason))` means it cannot be
/// had here (no rustup, no network) and the caller should skip.
pub fn ensure_target(sh: &Shell, target: &str) -> Result<Option<String>, Error> {
    let installed = match cmd!(sh, "rustup target list --installed")
        .quiet()
        .ignore_stderr()
        .read()
    {
        Ok(list) => list,
        Err(e) => return Ok(Some(format!("cannot ask rustup for targets ({e})"))),
    };
    if installed.lines().any(|l| l.trim() == target) {
        return Ok(None);
    }
    println!("xtask: target {target} is missing; running `rustup target add {target}`");
    match cmd!(sh, "rustup target add {target}").run() {
        Ok(()) => Ok(None),
        Err(e) => Ok(Some(format!("`rustup target add {target}` failed ({e})"))),
    }
}

/// Runs `cmd` with its stderr sent to our stdout, so a test runner's closing
/// lines (nextest writes them to stderr) appear in the CI log's stdout.
pub fn run_merged(cmd: xshell::Cmd<'_>) -> Result<(), Error> {
    use std::io::Write;
    use std::os::fd::AsFd;
    let shown = format!("{cmd}");
    println!("$ {shown}");
    std::io::stdout().flush()?;
    let stdout = std::io::stdout().as_fd().try_clone_to_owned()?;
    let status = Command::from(cmd)
        .stdin(Stdio::null())
        .stderr(Stdio::from(stdout))
        .status()
        .map_err(|e| format!("cannot run `{shown}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("`{shown}` failed: {status}").into())
    }
}
