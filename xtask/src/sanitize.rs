//! CI's two undefined-behaviour checks: Miri over the core's tests and
//! AddressSanitizer over the host crates' tests. Both need nightly.

use crate::ci::Outcome;
use crate::{skips, tools, Error};
use xshell::{cmd, Shell};

/// The host triple ASan builds for: `-Zsanitizer` needs an explicit
/// `--target`, so build scripts and proc macros are built without it.
const ASAN_TARGET: &str = "x86_64-unknown-linux-gnu";

/// ASan's own target directory, so its instrumented build neither
/// invalidates nor is invalidated by the ordinary one.
const ASAN_TARGET_DIR: &str = "target/asan";

/// Test binaries ASan leaves out, and why (printed in the step's output).
/// The end-to-end migrations run two 128 MiB guests each and are timed;
/// their memory handling is the library code the other binaries already
/// cover under ASan, and they run uninstrumented in the `tests` step.
const ASAN_EXCLUDED: [(&str, &str); 6] = [
    (
        "migrate_end_to_end",
        "end-to-end KVM migration of two 128 MiB guests; minutes under ASan",
    ),
    (
        "migrate_over_a_unix_socket",
        "end-to-end KVM migration of two 128 MiB guests; minutes under ASan",
    ),
    (
        "local_update_end_to_end",
        "end-to-end KVM local updates of 128 MiB guests; minutes under ASan",
    ),
    (
        "postcopy_end_to_end",
        "end-to-end KVM post-copy of two 128 MiB guests; minutes under ASan",
    ),
    (
        "resume_guest",
        "end-to-end KVM guest runs; timed, minutes under ASan",
    ),
    (
        "workload",
        "KVM guest workload runs; timed, minutes under ASan",
    ),
];

/// The core's integration test binaries Miri does not run yet, and why
/// (printed in the step's output). Miri interprets a 4 KiB page's checksum
/// in about a second, and these migrate hundreds of pages per test; they
/// need Miri-sized blocks first.
const MIRI_NOT_YET: [(&str, &str); 7] = [
    (
        "migration_stream_round_trip_and_faults",
        "migrates blocks of hundreds of pages with a writer thread; not yet sized for Miri",
    ),
    (
        "postcopy_round_trip_and_resume",
        "migrates 2048 pages (2 MiB hugepages) per test; not yet sized for Miri",
    ),
    (
        "receiver_refuses_bad_streams",
        "replays every prefix of whole streams; about 10 minutes under Miri, not yet sized",
    ),
    (
        "device_state_sections",
        "migrates over a Unix socket pair, which Miri cannot shut down (ENOTSOCK)",
    ),
    (
        "source_keeps_its_guest_until_the_destination_runs",
        "migrates over a Unix socket pair with read timeouts and shutdown, which Miri lacks",
    ),
    (
        "a_flooding_destination_cannot_stall_postcopy",
        "answers a flood of 300,000 page requests; over 10 minutes under Miri, not yet sized",
    ),
    (
        "downtime_limit_is_kept",
        "migrates blocks of 8 to 64 MiB for up to 30 passes per test; over 10 minutes under Miri",
    ),
];

/// `cargo +nightly miri test -p ramblock-core`: the core's unit,
/// integration (less [`MIRI_NOT_YET`]) and doc tests under Miri. Skipped
/// only when the `miri` or `rust-src` component cannot be installed.
pub fn miri(sh: &Shell) -> Result<Outcome, Error> {
    for component in ["miri", "rust-src"] {
        if let Some(reason) = tools::ensure_nightly_component(sh, component) {
            return Ok(Outcome::Skipped(reason));
        }
    }
    // Builds Miri's sysroot once (quietly after the first time), so its
    // output does not land in the middle of the tests'.
    cmd!(sh, "cargo +nightly miri setup").run()?;
    println!("xtask: left out of the Miri run (they run natively in the `tests` step):");
    for (binary, why) in MIRI_NOT_YET {
        println!("  {binary}: {why}");
    }
    let tests: Vec<String> = test_binaries(&["ramblock-core"])?
        .into_iter()
        .filter(|t| !MIRI_NOT_YET.iter().any(|(b, _)| b == t))
        .flat_map(|t| ["--test".to_string(), t])
        .collect();
    // Unit and integration tests, then doc tests (cargo runs `--doc` alone).
    let units = tools::run_merged(cmd!(
        sh,
        "cargo +nightly miri test -p ramblock-core --lib {tests...} --no-fail-fast"
    ));
    let docs = tools::run_merged(cmd!(
        sh,
        "cargo +nightly miri test -p ramblock-core --doc --no-fail-fast"
    ));
    units.and(docs)?;
    Ok(Outcome::PassedWithNote(format!(
        "{} core test binaries not yet run",
        MIRI_NOT_YET.len()
    )))
}

/// The `ramblock-linux` and `ramblock-kvm` tests built with
/// `-Zsanitizer=address`, less [`ASAN_EXCLUDED`]. Returns the skips the
/// tests printed, like the `tests` step.
pub fn asan(sh: &Shell) -> Result<Outcome, Error> {
    if !tools::has_nightly(sh) {
        return Ok(Outcome::Skipped(
            "no nightly toolchain (rustup toolchain install nightly)".into(),
        ));
    }
    println!("xtask: left out of the ASan run (they run in the `tests` step):");
    for (binary, why) in ASAN_EXCLUDED {
        println!("  {binary}: {why}");
    }
    let _flags = sh.push_env("RUSTFLAGS", "-Zsanitizer=address");
    // A leak is not what this step hunts: tests leak on purpose (a 'static
    // list for a fault thread; a failing test's memory, which a faulting
    // thread may still read), and LeakSanitizer would fail them for it.
    let _options = sh.push_env("ASAN_OPTIONS", "detect_leaks=0");
    let packages = ["-p", "ramblock-linux", "-p", "ramblock-kvm"];
    let common = ["--target", ASAN_TARGET, "--target-dir", ASAN_TARGET_DIR];
    if tools::has_cargo_subcommand(sh, "nextest") {
        let filter = ASAN_EXCLUDED
            .iter()
            .map(|(binary, _)| format!("binary({binary})"))
            .collect::<Vec<_>>()
            .join(" | ");
        let filter = format!("not ({filter})");
        crate::ci::nextest_with_skips(cmd!(
            sh,
            "cargo +nightly nextest run --profile ci {packages...} {common...} --no-fail-fast -E {filter}"
        ))
    } else {
        println!("xtask: cargo-nextest is not installed; using cargo test");
        let tests: Vec<String> = test_binaries(&["ramblock-linux", "ramblock-kvm"])?
            .into_iter()
            .filter(|t| !ASAN_EXCLUDED.iter().any(|(b, _)| b == t))
            .flat_map(|t| ["--test".to_string(), t])
            .collect();
        crate::ci::cargo_test_with_skips(cmd!(
            sh,
            "cargo +nightly test {packages...} {common...} --lib --bins {tests...} --no-fail-fast -- --show-output"
        ))
    }
    .map(|skips| {
        skips::print(&skips);
        Outcome::PassedWithNote(skips::note(&skips))
    })
}

/// The integration test binaries (`tests/*.rs` stems) of `crates`.
fn test_binaries(crates: &[&str]) -> Result<Vec<String>, Error> {
    let mut names = Vec::new();
    for krate in crates {
        let dir = crate::project_root().join(krate).join("tests");
        for entry in
            std::fs::read_dir(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?
        {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "rs") {
                if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                    names.push(stem.to_string());
                }
            }
        }
    }
    names.sort();
    Ok(names)
}
