//! `ramblock migrate --local` end to end, through the real binary: guest
//! RAM's fds pass over a UNIX socket, no page is copied, the destination's
//! vCPU resumes from the `cpu` section and continues the source guest's
//! loop over the same memory (checked page by page against the loop's
//! pattern). On memfd and hugetlb memfd memory, in one process and
//! between two; anonymous memory is refused with what to use instead.
//! Tests that need `/dev/kvm` print `skipped: no /dev/kvm`.

mod program;

use program::{field, run, texts, Running};
use ramblock_core::addr::PageSize;
use ramblock_linux::hugetlb::PoolReservation;

const SIZE: &str = "128M";

fn kvm_or_skip() -> bool {
    let kvm = std::path::Path::new("/dev/kvm").exists();
    if !kvm {
        println!("skipped: no /dev/kvm");
    }
    kvm
}

/// A successful local update: the guest ran on at the destination and
/// passed the check, no page crossed the socket, and the times are there.
fn assert_updated(o: &std::process::Output, what: &str) {
    let (json, err) = texts(o);
    assert!(o.status.success(), "{what}: {json}\n{err}");
    assert_eq!(field(&json, "local"), "true", "{what}: {json}");
    assert_eq!(field(&json, "destination_ran"), "true", "{what}: {json}");
    assert_eq!(field(&json, "verified"), "true", "{what}: {json}");
    assert_eq!(
        field(&json, "pages"),
        "0",
        "{what}: no page is copied: {json}"
    );
    let bytes: u64 = field(&json, "bytes").parse().unwrap();
    assert!(
        bytes < 64 << 10,
        "{what}: only the table and the vCPU move: {json}"
    );
    for key in ["downtime_ms", "dest_two_loops_ms", "prepare_ms"] {
        let ms: f64 = field(&json, key).parse().unwrap();
        assert!(ms > 0.0, "{what}: {key} in {json}");
    }
}

#[test]
fn a_local_update_on_memfd_resumes_the_guest_over_the_same_memory() {
    if !kvm_or_skip() {
        return;
    }
    for prefault in ["both", "none"] {
        let o = run(&[
            "--local",
            "--backing",
            "memfd",
            "--size",
            SIZE,
            "--prefault",
            prefault,
        ]);
        assert_updated(&o, &format!("memfd, prefault {prefault}"));
    }
}

#[test]
fn a_local_update_on_hugetlb_resumes_the_guest_over_the_same_memory() {
    if !kvm_or_skip() {
        return;
    }
    let _pool = match PoolReservation::reserve(PageSize::SIZE_2M, 64) {
        Ok(p) => p,
        Err(reason) => return println!("skipped: {reason}"),
    };
    let o = run(&["--local", "--backing", "hugetlb", "--size", SIZE]);
    assert_updated(&o, "hugetlb");
    let (json, _) = texts(&o);
    assert_eq!(field(&json, "backing"), "\"hugetlb memfd 2M\"", "{json}");
}

#[test]
fn anonymous_memory_cannot_be_updated_locally() {
    if !kvm_or_skip() {
        return;
    }
    let o = run(&["--local", "--backing", "anonymous", "--size", SIZE]);
    let (json, err) = texts(&o);
    assert!(!o.status.success(), "{json}");
    let error = field(&json, "error");
    assert!(
        error.contains("anonymous memory, which another process cannot map")
            && error.contains("--backing memfd"),
        "{json}\n{err}"
    );
}

#[test]
fn two_processes_update_over_a_unix_socket() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ramblock-local-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let addr = format!("unix:{}", dir.join("update.sock").display());
    let dest = Running::start(&["--local", "--incoming", &addr, "--size", SIZE]);
    let source = run(&[
        "--local",
        "--to",
        &addr,
        "--backing",
        "memfd",
        "--size",
        SIZE,
    ]);
    let dest = dest.finish();
    let _ = std::fs::remove_dir_all(&dir);
    let (sj, se) = texts(&source);
    let (dj, de) = texts(&dest);
    assert!(
        source.status.success(),
        "source: {sj}\n{se}\ndestination: {dj}\n{de}"
    );
    assert!(dest.status.success(), "destination: {dj}\n{de}");
    assert_eq!(field(&sj, "role"), "\"source\"");
    assert_eq!(field(&sj, "verified"), "true", "{sj}");
    assert_eq!(field(&dj, "role"), "\"destination\"");
    assert_eq!(field(&dj, "destination_ran"), "true", "{dj}");
    assert_eq!(field(&dj, "verified"), "true", "{dj}");
    let two: f64 = field(&dj, "dest_two_loops_ms").parse().unwrap();
    assert!(two > 0.0, "{dj}");
}

#[test]
fn a_local_update_needs_a_unix_address() {
    let o = run(&[
        "--local",
        "--to",
        "tcp:127.0.0.1:1",
        "--backing",
        "memfd",
        "--size",
        SIZE,
    ]);
    let (json, err) = texts(&o);
    assert!(!o.status.success(), "{json}");
    if std::path::Path::new("/dev/kvm").exists() {
        assert!(field(&json, "error").contains("unix:PATH"), "{json}\n{err}");
    }
}
