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

/// Like [`run_merged`], and also returns everything the command printed, so
/// the caller can look for lines in it (`skipped:`) after echoing it live.
pub fn run_captured(cmd: xshell::Cmd<'_>) -> (Result<(), Error>, String) {
    use std::io::{BufRead, BufReader, Write};
    let shown = format!("{cmd}");
    println!("$ {shown}");
    let _ = std::io::stdout().flush();
    let spawned = std::io::pipe().and_then(|(reader, writer)| {
        let mut command = Command::from(cmd);
        command
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer);
        let child = command.spawn()?;
        // `command` still holds the pipe's write ends; drop them, or the
        // reader below would never see end of file.
        drop(command);
        Ok((child, reader))
    });
    let (mut child, reader) = match spawned {
        Ok(parts) => parts,
        Err(e) => {
            return (
                Err(format!("cannot run `{shown}`: {e}").into()),
                String::new(),
            )
        }
    };
    let mut captured = String::new();
    let mut out = std::io::stdout().lock();
    for line in BufReader::new(reader).split(b'\n') {
        let Ok(line) = line else { break };
        let line = String::from_utf8_lossy(&line);
        let _ = writeln!(out, "{line}");
        captured.push_str(&line);
        captured.push('\n');
    }
    drop(out);
    let result = match child.wait() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("`{shown}` failed: {status}").into()),
        Err(e) => Err(format!("cannot wait for `{shown}`: {e}").into()),
    };
    (result, captured)
}

/// Whether the nightly toolchain has rustup component `component`
/// (`miri`, `rust-src`), adding it when missing. `Some(reason)` when it
/// cannot be had here.
pub fn ensure_nightly_component(sh: &Shell, component: &str) -> Option<String> {
    if !has_nightly(sh) {
        return Some("no nightly toolchain (rustup toolchain install nightly)".into());
    }
    let installed = cmd!(sh, "rustup component list --installed --toolchain nightly")
        .quiet()
        .ignore_stderr()
        .read()
        .unwrap_or_default();
    if installed
        .lines()
        .any(|l| l.trim() == component || l.starts_with(&format!("{component}-")))
    {
        return None;
    }
    println!("xtask: nightly lacks {component}; running `rustup component add {component} --toolchain nightly`");
    match cmd!(sh, "rustup component add {component} --toolchain nightly").run() {
        Ok(()) => None,
        Err(e) => Some(format!(
            "`rustup component add {component} --toolchain nightly` failed ({e})"
        )),
    }
}
