//! `ramblock migrate --channels N`: a KVM guest running its increment loop
//! migrates with its pre-copy pages spread over page channels, in one
//! process and between two processes over TCP; the destination verifies
//! every block and its vCPU goes on with the source's loop. The
//! destination is not told the count: it accepts as many channels as the
//! source's header announces (by default, the library's count for this
//! host's CPUs); `--channels` given to it is a check.

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
    // No --channels here: the source's header says 2.
    let dest = Running::start(&["--incoming", &addr, "--size", "128M"]);
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
    assert_eq!(field(&sj, "page_channels"), "2", "{sj}");
    assert_eq!(field(&dj, "page_channels"), "2", "{dj}");
}

/// Neither side is given a count: the source opens the library's default
/// for this host and the destination accepts what it announces.
#[test]
fn two_processes_migrate_over_the_default_channels() {
    if !kvm_or_skip() {
        return;
    }
    let default = ramblock_linux::channels::default_channel_count().to_string();
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dest = Running::start(&["--incoming", &addr, "--size", "128M"]);
    let source = run(&[&["--to", &addr, "--size", "128M"][..], &PASSES].concat());
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
    assert_eq!(field(&sj, "page_channels"), default, "{sj}");
    assert_eq!(field(&dj, "page_channels"), default, "{dj}");
}

/// `--channels` given to the destination is a check: a source announcing
/// another count is refused with the receiver's typed error at its header,
/// no channel is accepted, and the source's guest runs on.
#[test]
fn a_destination_told_another_channel_count_refuses_the_source() {
    if !kvm_or_skip() {
        return;
    }
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dest = Running::start(&["--incoming", &addr, "--size", "64M", "--channels", "3"]);
    let source = run(&["--to", &addr, "--size", "64M", "--channels", "2"]);
    let dest = dest.finish();
    let (sj, _) = texts(&source);
    let (dj, _) = texts(&dest);
    assert!(!source.status.success(), "{sj}");
    assert!(!dest.status.success(), "{dj}");
    assert!(
        dj.contains("the source sends on 2 page channels, this destination accepted 3"),
        "{dj}"
    );
    assert!(sj.contains("still running"), "{sj}");
    // A source without channels writes on its main stream, which the
    // destination closed after its refusal: it reports the code.
    let addr = format!("tcp:127.0.0.1:{}", free_port());
    let dest = Running::start(&["--incoming", &addr, "--size", "64M", "--channels", "2"]);
    let source = run(&["--to", &addr, "--size", "64M", "--channels", "0"]);
    let dest = dest.finish();
    let (sj, _) = texts(&source);
    let (dj, _) = texts(&dest);
    assert!(!source.status.success(), "{sj}");
    assert!(
        dj.contains("the source sends on 0 page channels, this destination accepted 2"),
        "{dj}"
    );
    assert!(sj.contains("error code 38"), "the source heard why: {sj}");
    assert!(sj.contains("still running"), "{sj}");
}
