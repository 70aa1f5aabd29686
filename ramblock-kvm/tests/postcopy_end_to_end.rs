//! `ramblock migrate --postcopy` end to end, through the real binary: the
//! guest moves to the destination before all of its memory has, keeps
//! writing there, and its missing pages follow on demand.
//!
//! In one-process runs the program checks the destination byte for byte
//! against a model of what the resumed guest wrote; two processes compare
//! end checksums. Each run is bounded: a child still running after
//! [`program::LIMIT`] is killed and the test fails, so a post-copy that hangs
//! (a lost page request, a resume that never comes) shows as a failure
//! rather than a stuck suite.
//!
//! Tests that need a destination guest print `skipped: no /dev/kvm`; the
//! two-process and host-writer tests run either way.

mod common;
mod program;
use common::kvm_or_skip;
use program::{field, free_port, run, texts, Running};
use ramblock_core::addr::PageSize;
use ramblock_linux::hugetlb::PoolReservation;
use std::process::Output;

const SIZE: &str = "128M";
/// Target pages in [`SIZE`]: everything, when post-copy starts at once.
const ALL_PAGES: u64 = (128 << 20) / 4096;

/// One pre-copy pass, then post-copy: pre-copy never converges first, so
/// the pages the guest dirtied during that pass are left to post-copy.
const AFTER_ONE_PASS: [&str; 4] = ["--postcopy", "1", "--downtime-ms", "0"];

fn number(json: &str, key: &str) -> f64 {
    field(json, key)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number in {json}"))
}

/// Checks what every successful post-copy run shows: exit 0, no error,
/// post-copy ran, the destination verified, and every discarded page was
/// sent again (answering a request or in the background).
fn assert_postcopy_verified(o: &Output, what: &str) -> String {
    let (json, err) = texts(o);
    assert!(o.status.success(), "{what}: {json}\n{err}");
    assert_eq!(field(&json, "error"), "null", "{what}: {json}");
    assert_eq!(field(&json, "postcopy"), "true", "{what}: {json}");
    assert_eq!(field(&json, "verified"), "true", "{what}: {json}");
    let resent = number(&json, "requested_pages") + number(&json, "background_pages");
    assert!(
        resent >= number(&json, "discarded_pages"),
        "{what}: fewer pages sent in post-copy than were discarded: {json}"
    );
    json
}

/// After one pre-copy pass: the pages the guest dirtied during it are
/// discarded, and the guest, running on at the destination, is checked
/// against the model.
fn assert_migrated_after_one_pass(backing: &str) {
    let o = run(&[&["--size", SIZE, "--backing", backing][..], &AFTER_ONE_PASS].concat());
    let json = assert_postcopy_verified(&o, backing);
    assert!(
        number(&json, "discarded_pages") > 0.0,
        "{backing}: the guest dirtied nothing during the pre-copy pass: {json}"
    );
    // The pre-copy pass and the post-copy one.
    assert_eq!(field(&json, "passes"), "2", "{backing}: {json}");
}

#[test]
fn a_writing_guest_moves_in_postcopy_over_every_backing() {
    if !kvm_or_skip() {
        return;
    }
    assert_migrated_after_one_pass("anonymous");
    assert_migrated_after_one_pass("memfd");
    // Both sides' 128 MiB in 2 MiB pages, reserved for the test.
    match PoolReservation::reserve(PageSize::SIZE_2M, 2 * 64) {
        Ok(_pool) => assert_migrated_after_one_pass("hugetlb"),
        Err(e) => println!("skipped: hugetlb backing: {e}"),
    }
}

#[test]
fn postcopy_at_once_serves_the_destination_guests_faults() {
    if !kvm_or_skip() {
        return;
    }
    let o = run(&["--size", SIZE, "--postcopy", "0"]);
    let json = assert_postcopy_verified(&o, "--postcopy 0");
    assert_eq!(
        number(&json, "discarded_pages") as u64,
        ALL_PAGES,
        "with no pre-copy pass every page is left to post-copy: {json}"
    );
    assert!(
        number(&json, "faults") > 0.0,
        "the destination guest never waited for a page: {json}"
    );
    assert!(number(&json, "requests") > 0.0, "{json}");
    assert!(number(&json, "fault_p99_us") > 0.0, "{json}");
}

/// One run with the connection broken at seeded points during post-copy.
fn assert_survives_breaks(backing: &str, seed: u64) {
    let seed = seed.to_string();
    let what = format!("{backing}, --break-postcopy {seed}");
    let o = run(&[
        "--size",
        SIZE,
        "--backing",
        backing,
        "--postcopy",
        "0",
        "--break-postcopy",
        &seed,
    ]);
    let json = assert_postcopy_verified(&o, &what);
    assert!(
        number(&json, "resumes") >= 1.0,
        "{what}: the connection was never resumed: {json}"
    );
}

#[test]
fn postcopy_resumes_after_connection_breaks() {
    if !kvm_or_skip() {
        return;
    }
    for seed in 1..=4 {
        assert_survives_breaks("anonymous", seed);
    }
    assert_survives_breaks("memfd", 5);
}

/// A free loopback port (bound, then released for a child to take).

#[test]
fn two_processes_over_tcp_finish_in_postcopy_and_verify() {
    let port = free_port();
    let endpoint = format!("tcp:127.0.0.1:{port}");
    let dest = Running::start(&[
        "--incoming",
        &endpoint,
        "--size",
        SIZE,
        "--postcopy",
        "--resume",
    ]);
    let src = run(&[
        &["--to", &endpoint, "--size", SIZE, "--resume"][..],
        &AFTER_ONE_PASS,
    ]
    .concat());
    let dest = dest.finish();
    let ((s, s_err), (d, d_err)) = (texts(&src), texts(&dest));
    assert!(src.status.success(), "source: {s}\n{s_err}");
    assert!(dest.status.success(), "destination: {d}\n{d_err}");
    assert_eq!(field(&s, "role"), "\"source\"");
    assert_eq!(field(&d, "role"), "\"destination\"");
    assert_eq!(field(&s, "postcopy"), "true", "{s}");
    assert!(number(&s, "discarded_pages") > 0.0, "{s}");
    assert_eq!(
        field(&d, "verified"),
        "true",
        "the destination's checksums did not match: {d}"
    );
    assert_eq!(field(&s, "pages"), field(&d, "pages"), "{s}\n{d}");
}

/// Two processes with a 1 s peer timeout move a 64 MiB guest whose RAM
/// is a file full of data at 16 MiB/s (`--bandwidth-mib`), so every phase
/// of `phase` lasts seconds; `extra` are the source's other options.
/// Returns both summaries, checked to have verified in post-copy.
fn quiet_for_seconds(phase: &[&str], extra: &[&str]) -> (String, String) {
    let image = std::env::temp_dir().join(format!(
        "ramblock-quiet-{}-{}.img",
        std::process::id(),
        phase.join("")
    ));
    let bytes: Vec<u8> = (0..64u32 << 20)
        .map(|i| (i / 4096 + i % 251) as u8 | 1)
        .collect();
    std::fs::write(&image, bytes).unwrap();
    let endpoint = format!("tcp:127.0.0.1:{}", free_port());
    let both = [&["--size", "64M", "--peer-timeout-ms", "1000"][..], phase].concat();
    let dest = Running::start(&[&["--incoming", &endpoint][..], &both].concat());
    let backing = [
        "--backing",
        image.to_str().unwrap(),
        "--bandwidth-mib",
        "16",
    ];
    let src = run(&[&["--to", &endpoint][..], &both, &backing, extra].concat());
    let dest = dest.finish();
    let _ = std::fs::remove_file(&image);
    let ((s, s_err), (d, d_err)) = (texts(&src), texts(&dest));
    assert!(
        src.status.success(),
        "source: {s}\n{s_err}\ndestination: {d_err}"
    );
    assert!(dest.status.success(), "destination: {d}\n{d_err}");
    assert_eq!(field(&s, "postcopy"), "true", "{s}");
    assert!(number(&s, "total_ms") > 2000.0, "not seconds long: {s}");
    assert_eq!(field(&d, "verified"), "true", "{d}");
    (s, d)
}

#[test]
fn a_postcopy_with_no_faults_for_longer_than_the_peer_timeout_completes() {
    // Post-copy at once, the guest idle: its 64 MiB follow in the
    // background for about 4 s and the destination asks for nothing. Its
    // silence on the return path for four peer timeouts is no break.
    let (s, _) = quiet_for_seconds(&["--postcopy", "0"], &["--workload", "idle"]);
    assert_eq!(number(&s, "requests"), 0.0, "the idle guest faulted: {s}");
}

#[test]
fn page_channels_outlast_the_peer_timeout_in_a_long_pass_and_a_long_postcopy() {
    // One pre-copy pass on four page channels (about 4 s), then post-copy
    // of what the guest dirtied meanwhile (seconds more). The main stream
    // carries no page in the pass unless the source puts one there now
    // and then, and the channels carry nothing in post-copy unless the
    // source closes them at the switch: either silence outlasted the
    // destination's 1 s read timeout before.
    let (s, _) = quiet_for_seconds(
        &["--postcopy", "1"],
        &[
            "--downtime-ms",
            "0",
            "--workload",
            "random:20000",
            "--channels",
            "4",
        ],
    );
    assert_eq!(number(&s, "page_channels"), 4.0, "{s}");
    assert!(
        number(&s, "discarded_pages") > 1000.0,
        "post-copy was short: {s}"
    );
}

#[test]
fn a_destination_without_postcopy_refuses_the_switch_and_the_source_guest_runs_on() {
    // The destination was not given --postcopy: it refuses the first
    // discard with "post-copy unsupported", which it can only send before
    // it started any guest, so the source resumes its own (any other
    // failure after the switch would leave it paused).
    let endpoint = format!("tcp:127.0.0.1:{}", free_port());
    let dest = Running::start(&["--incoming", &endpoint, "--size", SIZE]);
    let src = run(&["--to", &endpoint, "--size", SIZE, "--postcopy", "0"]);
    let dest = dest.finish();
    let ((s, s_err), (d, d_err)) = (texts(&src), texts(&dest));
    assert!(!src.status.success(), "{s}\n{s_err}");
    assert!(!dest.status.success(), "{d}\n{d_err}");
    assert!(
        field(&d, "error").contains("not set up for"),
        "destination: {d}"
    );
    let error = field(&s, "error");
    assert!(error.contains("error code 24"), "{error}");
    assert!(
        error.contains("the source guest is still running"),
        "the source guest must run on: {error}"
    );
}

#[test]
fn without_kvm_a_host_writer_moves_in_postcopy() {
    // At once: no destination guest runs, so nothing faults and every page
    // goes in the background; the RAM is compared exactly.
    let at_once = ["--size", SIZE, "--no-kvm", "--workload", "random:20000"];
    let o = run(&[&at_once[..], &["--postcopy", "0"]].concat());
    let json = assert_postcopy_verified(&o, "--no-kvm --postcopy 0");
    assert_eq!(field(&json, "mode"), "\"software\"", "{json}");
    assert_eq!(number(&json, "discarded_pages") as u64, ALL_PAGES, "{json}");
    assert_eq!(number(&json, "faults"), 0.0, "{json}");
    assert_eq!(number(&json, "requests"), 0.0, "{json}");
    assert_eq!(
        number(&json, "background_pages") as u64,
        ALL_PAGES,
        "{json}"
    );
    // After one pass: the pages the writer dirtied meanwhile are discarded
    // and sent again.
    let o = run(&[&at_once[..], &AFTER_ONE_PASS].concat());
    let json = assert_postcopy_verified(&o, "--no-kvm --postcopy 1");
    assert!(number(&json, "guest_progress") > 0.0, "{json}");
    assert!(number(&json, "discarded_pages") > 0.0, "{json}");
}
