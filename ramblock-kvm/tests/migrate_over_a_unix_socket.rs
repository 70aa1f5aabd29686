//! The ordinary (copying) migration between two `ramblock` processes over
//! a UNIX stream socket: `--incoming unix:PATH` and `--to unix:PATH`. Every
//! page crosses the socket and the destination checks the end checksums,
//! as over TCP; the listener removes its socket file afterwards.

mod program;

use program::{field, run, texts, Running};

#[test]
fn two_processes_migrate_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("ramblock-unix-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    let addr = format!("unix:{}", path.display());
    let dest = Running::start(&["--incoming", &addr, "--size", "128M"]);
    let source = run(&["--to", &addr, "--size", "128M"]);
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
    assert!(
        pages + zero >= 32768 - 256,
        "every page crossed the socket: {dj}"
    );
    assert!(!path.exists(), "the destination removed its socket file");
    let _ = std::fs::remove_dir_all(&dir);
}
