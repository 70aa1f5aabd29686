//! `ramblock migrate --zero-copy`: pages go with `MSG_ZEROCOPY`, the
//! destination verifies every page as without it, and the summary reports
//! the sends and how many the kernel copied after all (all of them on
//! loopback, whose receiver is local). Post-copy after zero-copy pre-copy
//! works (it sends by copy), and a UNIX socket is refused with an error
//! that says why while the source guest runs on.
//!
//! A host writer stands in for the guest (`--no-kvm`), so these run
//! without /dev/kvm.

mod program;

use program::{field, run, texts, Running};

const WRITER: [&str; 4] = ["--no-kvm", "--workload", "increment", "--size"];

#[test]
fn zero_copy_migration_verifies_and_reports_copies() {
    let o = run(&[
        &WRITER[..],
        &[
            "128M",
            "--zero-copy",
            "--downtime-ms",
            "0",
            "--max-passes",
            "3",
        ],
    ]
    .concat());
    let (json, err) = texts(&o);
    assert!(o.status.success(), "{json}\n{err}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    let sends: u64 = field(&json, "sends").parse().unwrap();
    let completed: u64 = field(&json, "completed_sends").parse().unwrap();
    let copied: u64 = field(&json, "copied_sends").parse().unwrap();
    let bytes: u64 = field(&json, "bytes").parse().unwrap();
    let zero_copy_bytes: u64 = json
        .split("\"zero_copy\":")
        .nth(1)
        .map(|z| field(z, "bytes").parse().unwrap())
        .unwrap();
    assert!(sends > 0, "pages went zero-copy: {json}");
    assert_eq!(completed, sends, "every send completed: {json}");
    assert_eq!(copied, sends, "loopback copies every send: {json}");
    assert!(
        zero_copy_bytes > bytes / 2,
        "most of the stream went zero-copy: {json}"
    );
}

#[test]
fn postcopy_after_zero_copy_precopy_verifies() {
    let o = run(&[
        &WRITER[..],
        &[
            "64M",
            "--zero-copy",
            "--postcopy",
            "1",
            "--downtime-ms",
            "0",
        ],
    ]
    .concat());
    let (json, err) = texts(&o);
    assert!(o.status.success(), "{json}\n{err}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    assert_eq!(field(&json, "postcopy"), "true", "{json}");
    assert!(field(&json, "sends").parse::<u64>().unwrap() > 0, "{json}");
}

#[test]
fn a_unix_socket_is_refused_and_the_source_runs_on() {
    let dir = std::env::temp_dir().join(format!("ramblock-zc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("m.sock").display());
    // Dropped (killed) at the end: it waits for a source that never comes.
    let _dest = Running::start(&["--incoming", &addr, "--size", "64M", "--no-kvm"]);
    let mut o = None;
    for _ in 0..100 {
        let out = run(&[&WRITER[..], &["64M", "--zero-copy", "--to", &addr]].concat());
        let (json, _) = texts(&out);
        if !json.contains("cannot connect") {
            o = Some(out);
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let o = o.expect("the destination listens");
    let (json, err) = texts(&o);
    assert!(!o.status.success(), "{json}");
    let error = field(&json, "error");
    assert!(error.contains("--zero-copy"), "{json}\n{err}");
    assert!(error.contains("only TCP"), "{json}");
    assert!(error.contains("still running"), "{json}");
    let _ = std::fs::remove_dir_all(&dir);
}
