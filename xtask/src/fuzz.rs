//! `cargo xtask fuzz TARGET [--seconds N]` and the CI fuzz smoke step.
//!
//! Fuzz targets live in `ramblock-fuzz/fuzz_targets/`, with
//! `ramblock-fuzz/Cargo.toml` as the cargo-fuzz manifest, so cargo-fuzz is
//! pointed there with `--fuzz-dir` (its default is a `fuzz/` directory).
//! cargo-fuzz needs a nightly toolchain (sanitizer flags are unstable).

use crate::ci::Outcome;
use crate::{tools, Error};
use std::path::PathBuf;
use std::process::ExitCode;
use xshell::{cmd, Shell};

/// Seconds per target in CI's smoke run: enough to shake out a crash on the
/// first inputs, short enough for every push.
const SMOKE_SECONDS: u32 = 20;

/// Default length of a `cargo xtask fuzz` run.
const DEFAULT_SECONDS: u32 = 60;

/// The fuzz crate's directory: its `fuzz_targets/` holds one file per target.
fn fuzz_dir() -> PathBuf {
    crate::project_root().join("ramblock-fuzz")
}

/// The targets, by file stem, sorted.
fn targets() -> Result<Vec<String>, Error> {
    let dir = fuzz_dir().join("fuzz_targets");
    let mut names = Vec::new();
    let entries = std::fs::read_dir(&dir)
        .map_err(|e| format!("no fuzz targets: cannot read {}: {e}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Where a smoke run's libFuzzer output goes: thousands of progress lines
/// that would push the test results out of the end of a CI log.
fn smoke_log(target: &str) -> PathBuf {
    crate::project_root()
        .join("target")
        .join(format!("fuzz-smoke-{target}.log"))
}

/// Runs one target for the smoke step with its output in [`smoke_log`]:
/// prints libFuzzer's closing line when it passes, the log's last lines when
/// it fails.
fn smoke_target(sh: &Shell, target: &str) -> Result<(), Error> {
    let log = smoke_log(target);
    let file =
        std::fs::File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let _cd = sh.push_dir(fuzz_dir());
    let status = std::process::Command::from(fuzz_command(sh, target, SMOKE_SECONDS)?)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .map_err(|e| format!("cannot run cargo fuzz: {e}"))?;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if status.success() {
        let done = lines.iter().rev().find(|l| l.starts_with("Done "));
        println!("fuzz {target}: {}", done.unwrap_or(&"done"));
        Ok(())
    } else {
        println!("fuzz {target}: last lines of {}:", log.display());
        for line in &lines[lines.len().saturating_sub(60)..] {
            println!("  {line}");
        }
        Err(format!("cargo fuzz run {target} failed: {status}").into())
    }
}

/// Runs one target for `seconds` from inside the fuzz crate.
fn run_target(sh: &Shell, target: &str, seconds: u32) -> Result<(), Error> {
    let _cd = sh.push_dir(fuzz_dir());
    fuzz_command(sh, target, seconds)?.run()?;
    Ok(())
}

/// The `cargo fuzz run` command for `target`, to run from the fuzz crate.
fn fuzz_command<'a>(sh: &'a Shell, target: &str, seconds: u32) -> Result<xshell::Cmd<'a>, Error> {
    let dir = fuzz_dir();
    let max_time = format!("-max_total_time={seconds}");
    // Start from the committed seeds (a generated corpus grows beside them):
    // without them a short run never gets past a stream's magic bytes.
    // Debug assertions (`-a`) turn silent overflows into crashes.
    let corpus = dir.join("corpus").join(target);
    let seeds = dir.join("seeds").join(target);
    sh.create_dir(&corpus)?;
    let seeds: Vec<_> = seeds.exists().then_some(seeds).into_iter().collect();
    Ok(cmd!(
        sh,
        "cargo +nightly fuzz run -a --fuzz-dir {dir} {target} {corpus} {seeds...} -- {max_time}"
    ))
}

/// `cargo xtask fuzz TARGET [--seconds N]`.
pub fn run(args: &[String]) -> Result<ExitCode, Error> {
    let mut target = None;
    let mut seconds = DEFAULT_SECONDS;
    let mut args = args.iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--seconds" => {
                let value = args.next().ok_or("`--seconds` needs a number")?;
                seconds = value
                    .parse()
                    .map_err(|_| format!("`--seconds {value}`: not a whole number of seconds"))?;
            }
            flag if flag.starts_with('-') => {
                return Err(
                    format!("unknown option `{flag}`; usage: fuzz TARGET [--seconds N]").into(),
                )
            }
            name if target.is_none() => target = Some(name.to_string()),
            extra => return Err(format!("unexpected argument `{extra}`").into()),
        }
    }
    let known = targets()?;
    let Some(target) = target else {
        return Err(format!("which target? known targets: {}", known.join(", ")).into());
    };
    if !known.contains(&target) {
        return Err(format!(
            "no fuzz target `{target}` in ramblock-fuzz/fuzz_targets; known: {}",
            known.join(", ")
        )
        .into());
    }
    let sh = crate::shell()?;
    if !tools::has_nightly(&sh) {
        return Err(
            "cargo-fuzz needs a nightly toolchain and rustup lists none; \
             install one with `rustup toolchain install nightly`"
                .into(),
        );
    }
    if !tools::has_cargo_subcommand(&sh, "fuzz") {
        println!("xtask: cargo-fuzz is missing; running `cargo install cargo-fuzz`");
        cmd!(sh, "cargo install cargo-fuzz --locked").run()?;
    }
    run_target(&sh, &target, seconds)?;
    Ok(ExitCode::SUCCESS)
}

/// CI's fuzz smoke step: every target for [`SMOKE_SECONDS`] when the targets,
/// a nightly toolchain and cargo-fuzz are all present; skipped otherwise.
pub fn smoke(sh: &Shell) -> Result<Outcome, Error> {
    if !fuzz_dir().join("fuzz_targets").is_dir() {
        return Ok(Outcome::Skipped(
            "ramblock-fuzz/fuzz_targets does not exist yet".into(),
        ));
    }
    if !tools::has_nightly(sh) {
        return Ok(Outcome::Skipped(
            "no nightly toolchain (rustup toolchain install nightly)".into(),
        ));
    }
    if !tools::has_cargo_subcommand(sh, "fuzz") {
        return Ok(Outcome::Skipped(
            "cargo-fuzz is not installed (cargo install cargo-fuzz)".into(),
        ));
    }
    let targets = targets()?;
    if targets.is_empty() {
        return Ok(Outcome::Skipped(
            "ramblock-fuzz/fuzz_targets holds no targets".into(),
        ));
    }
    // Run them all, then report every failure together.
    let failed: Vec<&String> = targets
        .iter()
        .filter(|t| match smoke_target(sh, t) {
            Ok(()) => false,
            Err(e) => {
                println!("fuzz target {t} failed: {e}");
                true
            }
        })
        .collect();
    if failed.is_empty() {
        Ok(Outcome::Passed)
    } else {
        Err(format!("fuzz targets failed: {failed:?}").into())
    }
}
