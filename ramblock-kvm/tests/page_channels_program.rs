//! `ramblock migrate --channels N`: a KVM guest running its increment loop
//! migrates with its pre-copy pages spread over page channels, in one
//! process and between two processes over TCP; the destination verifies
//! every block and its vCPU goes on with the source's loop.

mod program;

use program::{field, free_port, run, texts, Running};

fn kvm_or_skip() -> bool {
    let present = std::path::Path::new("/dev/kvm").exists();
    if !present {
        println!("skipped: no /dev/kvm");
    }
    present
}

/// Three live passes, so later passes send pages again over the channels.
const PASSES: [&str; 4] = ["--downtime-ms", "0", "--max-passes", "3"];

#[test]
fn one_process_migrates_over_three_channels() {
    if !kvm_or_skip() {
        return;
    }
    let o = run(&[&["--size", "256M", "--channels", "3"][..], &PASSES].concat());
    let (json, err) = texts(&o);
    assert!(o.status.success(), "{json}\n{err}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    assert_eq!(field(&json, "destination_ran"), "true", "{json}");
    assert_eq!(field(&json, "passes"), "4", "{json}");
}

#[test]
fn two_processes_migrate_over_two_channels() {
    if !kvm_or_skip() {
        return;
    }
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dest = Running::start(&["--incoming", &addr, "--size", "128M", "--channels", "2"]);
    let source = run(&[
        &["--to", &addr, "--size", "128M", "--channels", "2"][..],
        &PASSES,
    ]
    .concat());
    let dest = dest.finish();
    let (sj, se) = texts(&source);
    let (dj, de) = texts(&dest);
    assert!(
        source.status.success(),
        "source: {sj}\n{se}\ndestination: {dj}\n{de}"
    );
    assert!(dest.status.success(), "destination: {dj}\n{de}");
    assert_eq!(field(&sj, "verified"), "true", "{sj}");
    assert_eq!(field(&dj, "verified"), "true", "{dj}");
    let pages: u64 = field(&dj, "pages").parse().unwrap();
    let zero: u64 = field(&dj, "zero_pages").parse().unwrap();
    assert!(pages + zero >= 32768 - 256, "every page arrived: {dj}");
}
