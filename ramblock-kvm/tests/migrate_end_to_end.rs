//! `ramblock migrate` end to end, through the real binary: a guest that keeps
//! writing is migrated in every dirty-log mode and over every backing, and
//! the destination is checked byte for byte (local runs) or by its end
//! checksums and its own vCPU continuing the source's loop (two
//! processes). Faults (a connection closed mid-pass, a
//! corrupted record, a destination with a smaller block, a destination VMM
//! that refuses the vCPU's device-state section) fail the migration with
//! an error that says what happened, and the source guest runs on.
//!
//! Tests that need `/dev/kvm` print `skipped: no /dev/kvm`; the fault tests
//! run either way (without KVM a host thread is the writer).

use ramblock_core::addr::PageSize;
use ramblock_core::section::SectionHeader;
use ramblock_core::stream::format::{Header, Record, TableEntry};
use ramblock_core::stream::io::{ByteRead, ByteWrite, IoStream};
use ramblock_linux::hugetlb::PoolReservation;
use std::io::Read;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

const SIZE: &str = "128M";

fn has_kvm() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

fn kvm_or_skip() -> bool {
    if !has_kvm() {
        println!("skipped: no /dev/kvm");
    }
    has_kvm()
}

fn ramblock() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ramblock"));
    c.arg("migrate").arg("--json");
    c
}

/// Runs `ramblock migrate --json ARGS` to the end.
fn run(args: &[&str]) -> Output {
    ramblock().args(args).output().expect("run ramblock")
}

/// The value of `key` in the one-line JSON summary (numbers, strings,
/// booleans and null, unquoted).
fn field(json: &str, key: &str) -> String {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("no {key} in {json}"));
    let rest = &json[at + key.len() + 3..];
    if let Some(s) = rest.strip_prefix('"') {
        // Up to the first unescaped quote, unescaping \" and \\.
        let mut out = String::new();
        let mut chars = s.chars();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => out.extend(chars.next()),
                c => out.push(c),
            }
        }
        out
    } else {
        rest[..rest.find([',', '}']).unwrap()].to_string()
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Checks a successful local migration of a writing guest: verified byte
/// for byte, several passes, and more pages sent than the guest has (the
/// guest kept dirtying pages that had to be sent again).
fn assert_migrated(o: &Output, what: &str) {
    let json = stdout(o);
    assert!(
        o.status.success(),
        "{what}: {json}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(field(&json, "verified"), "true", "{what}: {json}");
    // The vCPU went as the pre-copy `cpu` section and the destination's
    // guest continued the source's loop.
    assert_eq!(field(&json, "destination_ran"), "true", "{what}: {json}");
    assert!(
        field(&json, "ram_downtime_ms").parse::<f64>().is_ok(),
        "{what}: {json}"
    );
    assert_eq!(field(&json, "passes"), "4", "{what}: {json}");
    let sent: u64 = field(&json, "pages").parse::<u64>().unwrap()
        + field(&json, "zero_pages").parse::<u64>().unwrap();
    assert!(
        sent > (128 << 20) / 4096,
        "{what}: the guest dirtied nothing during the migration: {json}"
    );
}

/// Never converge early: three live passes, then switch over, so the guest
/// writes throughout.
const PASSES: [&str; 4] = ["--downtime-ms", "0", "--max-passes", "3"];

#[test]
fn every_dirty_log_mode_migrates_a_writing_guest() {
    if !kvm_or_skip() {
        return;
    }
    for mode in ["bitmap", "manual", "ring"] {
        let o = run(&[&["--size", SIZE, "--dirty-log", mode][..], &PASSES].concat());
        assert_migrated(&o, mode);
        assert!(
            field(&stdout(&o), "mode").starts_with(mode),
            "{}",
            stdout(&o)
        );
    }
}

#[test]
fn every_backing_migrates_a_writing_guest() {
    if !kvm_or_skip() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ramblock-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for backing in ["anonymous", "memfd", dir.to_str().unwrap()] {
        let o = run(&[&["--size", SIZE, "--backing", backing][..], &PASSES].concat());
        assert_migrated(&o, backing);
    }
    std::fs::remove_dir_all(&dir).unwrap();
    // Hugetlb: both sides' 128 MiB in 2 MiB pages, reserved for the test.
    match PoolReservation::reserve(PageSize::SIZE_2M, 2 * 64) {
        Ok(_pool) => {
            let o = run(&[&["--size", SIZE, "--backing", "hugetlb"][..], &PASSES].concat());
            assert_migrated(&o, "hugetlb");
        }
        Err(e) => println!("skipped: hugetlb backing: {e}"),
    }
}

#[test]
fn without_kvm_a_host_writer_is_migrated() {
    let o = run(&[
        "--size",
        SIZE,
        "--no-kvm",
        "--workload",
        "random:20000",
        "--downtime-ms",
        "0",
        "--max-passes",
        "3",
    ]);
    let json = stdout(&o);
    assert!(o.status.success(), "{json}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    assert_eq!(field(&json, "mode"), "software");
    assert!(
        field(&json, "guest_progress").parse::<u64>().unwrap() > 0,
        "{json}"
    );
}

/// `--dirty-log uffd-wp`: with KVM the vCPU's writes, without it a host
/// writer's raw writes (which bypass the block API, so nothing but the
/// write-protect tracker sees them) are migrated and verified.
#[test]
fn uffd_wp_migrates_a_writing_guest_with_and_without_kvm() {
    if let Err(e) = ramblock_linux::dirty_log::UffdWpLog::new() {
        println!("skipped: {e}");
        return;
    }
    let no_kvm = [
        "--no-kvm",
        "--workload",
        "random:20000",
        "--downtime-ms",
        "0",
        "--max-passes",
        "3",
    ];
    let o = run(&[&["--size", SIZE, "--dirty-log", "uffd-wp"][..], &no_kvm].concat());
    let json = stdout(&o);
    assert!(o.status.success(), "{json}");
    assert_eq!(field(&json, "verified"), "true", "{json}");
    assert_eq!(field(&json, "mode"), "uffd-wp");
    assert!(
        field(&json, "guest_progress").parse::<u64>().unwrap() > 0,
        "{json}"
    );
    if !kvm_or_skip() {
        return;
    }
    for backing in ["anonymous", "memfd"] {
        let o = run(&[
            &[
                "--size",
                SIZE,
                "--dirty-log",
                "uffd-wp",
                "--backing",
                backing,
            ][..],
            &PASSES,
        ]
        .concat());
        assert_migrated(&o, backing);
        assert_eq!(field(&stdout(&o), "mode"), "uffd-wp");
    }
}

/// A free loopback port (bound, then released for a child to take).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn destination(port: u16, size: &str) -> Child {
    ramblock()
        .args([
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
            "--size",
            size,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination")
}

fn source(port: u16, size: &str) -> Output {
    run(&["--to", &format!("tcp:127.0.0.1:{port}"), "--size", size])
}

/// A source on its one stream, for a peer that takes one connection.
fn source_one_stream(port: u16, size: &str) -> Output {
    run(&[
        "--to",
        &format!("tcp:127.0.0.1:{port}"),
        "--size",
        size,
        "--channels",
        "0",
    ])
}

#[test]
fn two_processes_over_tcp_migrate_and_verify() {
    let port = free_port();
    let dest = destination(port, SIZE);
    let src = source(port, SIZE);
    let dest = dest.wait_with_output().unwrap();
    let (s, d) = (stdout(&src), stdout(&dest));
    assert!(src.status.success(), "source: {s}");
    assert!(dest.status.success(), "destination: {d}");
    assert_eq!(field(&s, "role"), "source");
    assert_eq!(field(&d, "role"), "destination");
    assert_eq!(
        field(&d, "verified"),
        "true",
        "the destination's checksums matched: {d}"
    );
    assert_eq!(field(&s, "pages"), field(&d, "pages"), "{s}\n{d}");
    if has_kvm() {
        // The destination process ran the vCPU from the shipped `cpu`
        // section before it confirmed the handover, and it went on with
        // the source's loop; the source's downtime ran until then.
        assert_eq!(field(&d, "destination_ran"), "true", "{d}");
        let ram: f64 = field(&s, "ram_downtime_ms").parse().unwrap();
        let all: f64 = field(&s, "downtime_ms").parse().unwrap();
        assert!(ram <= all, "{s}");
    }
}

#[test]
fn a_connection_closed_mid_pass_leaves_the_source_running() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A destination that takes 4 MiB of the stream and hangs up.
    let hangup = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 4 << 20];
        conn.read_exact(&mut buf).unwrap();
        conn.shutdown(Shutdown::Both).unwrap();
    });
    let o = source_one_stream(port, SIZE);
    hangup.join().unwrap();
    let json = stdout(&o);
    assert!(!o.status.success(), "{json}");
    let error = field(&json, "error");
    assert!(
        error.contains("sending failed") || error.contains("no acknowledgement"),
        "{error}"
    );
    assert!(
        error.ends_with("the source guest is still running"),
        "{error}"
    );
}

/// Forwards a migration stream record by record, flipping one bit in the
/// first page of every run of pages, so the corruption survives any resend.
fn corrupt_every_page_run(from: TcpStream, to: TcpStream) {
    let mut r = IoStream(std::io::BufReader::new(from));
    let mut w = IoStream(std::io::BufWriter::new(to));
    let Ok(Some(header)) = Header::read(&mut r) else {
        return;
    };
    header.write(&mut w).unwrap();
    let mut name = [0u8; 255];
    for _ in 0..header.block_count {
        let (len, entry) = TableEntry::read(&mut r, &mut name).unwrap();
        entry
            .write(std::str::from_utf8(&name[..len]).unwrap(), &mut w)
            .unwrap();
    }
    let mut page = vec![0u8; 64 * 4096];
    while let Ok(Ok(record)) = Record::read(&mut r) {
        if record.write(&mut w).is_err() {
            return;
        }
        let payload = match record {
            Record::Pages { count, .. } => count as usize * 4096,
            Record::End { count } => count as usize * 8,
            Record::Section => {
                // The device state (the vCPU): its header, then its bytes.
                let mut raw = [0u8; SectionHeader::ENCODED_LEN];
                if r.read_exact(&mut raw).is_err() || w.write_all(&raw).is_err() {
                    return;
                }
                let len = SectionHeader::decode(&raw).unwrap().len as usize;
                page.resize(page.len().max(len), 0);
                len
            }
            _ => 0,
        };
        if r.read_exact(&mut page[..payload]).is_err() {
            return;
        }
        if matches!(record, Record::Pages { .. }) {
            page[100] ^= 0x40;
        }
        if w.write_all(&page[..payload])
            .and_then(|_| w.flush())
            .is_err()
        {
            return;
        }
    }
}

#[test]
fn a_corrupted_record_is_refused_and_the_source_runs_on() {
    let dest_port = free_port();
    let dest = destination(dest_port, SIZE);
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_port = proxy.local_addr().unwrap().port();
    let relay = std::thread::spawn(move || {
        let (from_source, _) = proxy.accept().unwrap();
        let to_dest = loop {
            match TcpStream::connect(("127.0.0.1", dest_port)) {
                Ok(c) => break c,
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // The acknowledgement flows back untouched.
        let (mut back_from, mut back_to) = (
            to_dest.try_clone().unwrap(),
            from_source.try_clone().unwrap(),
        );
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
            let _ = back_to.shutdown(Shutdown::Both);
        });
        corrupt_every_page_run(from_source, to_dest.try_clone().unwrap());
        let _ = to_dest.shutdown(Shutdown::Write);
        let _ = back.join();
    });
    let o = source_one_stream(proxy_port, SIZE);
    let dest = dest.wait_with_output().unwrap();
    relay.join().unwrap();
    let (s, d) = (stdout(&o), stdout(&dest));
    assert!(!o.status.success(), "source: {s}");
    assert!(!dest.status.success(), "destination: {d}");
    let refusal = field(&d, "error");
    assert!(
        refusal.starts_with(
            "destination refused the stream: block \"pc.ram\" differs from the source"
        ),
        "{refusal}"
    );
    let error = field(&s, "error");
    assert!(
        error.starts_with("the destination refused the stream (error code 19)"),
        "{error}"
    );
    assert!(
        error.ends_with("the source guest is still running"),
        "{error}"
    );
}

#[test]
fn a_destination_with_a_smaller_block_is_refused() {
    let port = free_port();
    let dest = destination(port, "64M");
    let o = source(port, SIZE);
    let dest = dest.wait_with_output().unwrap();
    let (s, d) = (stdout(&o), stdout(&dest));
    assert!(!o.status.success(), "{s}");
    assert!(
        field(&d, "error")
            .contains("\"pc.ram\": 0x8000000 bytes on the source, the destination has 0x4000000"),
        "{d}"
    );
    assert!(
        field(&s, "error").ends_with("the source guest is still running"),
        "{s}"
    );
}

/// The destination's VMM refuses the vCPU's `cpu` section (the hidden
/// `--refuse-section`), in one process (pre-copy and post-copy) and in
/// two: the source names the
/// section in its error, exits non-zero, and its guest's loop goes on (the
/// program waits for the guest's progress after the failure before it says
/// "still running"). No device state, no section: this needs a vCPU.
#[test]
fn a_refused_cpu_section_leaves_the_source_guest_running() {
    if !kvm_or_skip() {
        return;
    }
    let named = "the destination refused device-state section \"cpu\" instance 0";
    // Pre-copy, and post-copy, whose Postcopy record carries the same
    // section: refused before the destination starts the guest, so the
    // source keeps it.
    for postcopy in [&[][..], &["--postcopy", "0"]] {
        let local = run(&[&["--size", "64M", "--refuse-section", "cpu"][..], postcopy].concat());
        let json = stdout(&local);
        assert!(!local.status.success(), "{json}");
        let error = field(&json, "error");
        assert!(error.starts_with(named), "{error}");
        assert!(
            error.ends_with("the source guest is still running"),
            "{error}"
        );
        assert_eq!(field(&json, "verified"), "null", "{json}");
    }

    let port = free_port();
    let dest = ramblock()
        .args([
            "--incoming",
            &format!("tcp:127.0.0.1:{port}"),
            "--size",
            "64M",
            "--refuse-section",
            "cpu",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the destination");
    let src = source(port, "64M");
    let dest = dest.wait_with_output().unwrap();
    let (s, d) = (stdout(&src), stdout(&dest));
    assert!(!src.status.success(), "source: {s}");
    assert!(!dest.status.success(), "destination: {d}");
    assert!(
        field(&d, "error").contains("the VMM refused device-state section 0 (\"cpu\""),
        "{d}"
    );
    let error = field(&s, "error");
    assert!(error.starts_with(named), "{error}");
    assert!(
        error.ends_with("the source guest is still running"),
        "{error}"
    );
}
