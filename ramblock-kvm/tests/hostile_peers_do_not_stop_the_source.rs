//! `ramblock migrate` between two processes over 127.0.0.1 while other
//! peers try their luck on the destination's port: one that sends
//! garbage, one that says nothing, a port scan (connect and close), and
//! hijackers that send a resume header without the token the destination
//! issued. Each is dropped with a line on the destination's stderr, and
//! the real source still completes and verifies. With TLS, a plaintext
//! peer and a peer whose certificate another CA signed are refused, and
//! the source's page channels (each a TLS session) are accepted. In
//! post-copy, token-less hijackers wait in the listener's queue when the
//! connection breaks, and the real source still resumes.
//!
//! Without /dev/kvm the program moves a host writer's RAM instead, so
//! these run either way. Each child is killed after [`LIMIT`].

mod program;
use program::{field, free_port, texts, Running, LIMIT};
use ramblock_core::stream::format::{Header, TableEntry};
use ramblock_core::stream::resume_token::ResumeToken;
use ramblock_linux::transport::tls::TlsConfig;
use ramblock_linux::transport::Connector;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE: &str = "64M";

/// Connects to `addr`, retrying while the destination starts.
fn connect(addr: &str) -> TcpStream {
    let deadline = Instant::now() + LIMIT;
    loop {
        match TcpStream::connect(addr) {
            Ok(s) => return s,
            Err(e) if Instant::now() >= deadline => panic!("{addr}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// A resume header with a guessed (all-zero) token and a table that
/// matches the program's guest RAM block.
fn tokenless_resume() -> Vec<u8> {
    let mut out = Vec::new();
    Header::new(1)
        .write_resume(&ResumeToken::default(), &mut out)
        .unwrap();
    TableEntry {
        used_length: 64 << 20,
        page_size: 4096,
        flags: 0,
    }
    .write("pc.ram", &mut out)
    .unwrap();
    out
}

/// Asserts both sides succeeded and verified; returns the destination's
/// summary and stderr.
fn assert_completed(src: Running, dest: Running) -> (String, String) {
    let (so, d_o) = (src.finish(), dest.finish());
    let ((s, s_err), (d, d_err)) = (texts(&so), texts(&d_o));
    assert!(
        so.status.success(),
        "source: {s}\n{s_err}\ndestination: {d_err}"
    );
    assert!(d_o.status.success(), "destination: {d}\n{d_err}");
    assert_eq!(field(&s, "verified"), "true", "{s}");
    assert_eq!(field(&d, "verified"), "true", "{d}");
    (d, d_err)
}

fn dropped_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| l.contains("dropped peer"))
        .collect()
}

#[test]
fn garbage_silent_scanning_and_hijacking_peers_do_not_stop_the_source() {
    let addr = format!("127.0.0.1:{}", free_port());
    let endpoint = format!("tcp:{addr}");
    let dest = Running::start(&[
        "--incoming",
        &endpoint,
        "--size",
        SIZE,
        // Long enough that the peers that do write are never taken for
        // silent on a loaded machine; the silent one costs this once.
        "--handshake-timeout-ms",
        "1000",
    ]);
    // Every peer is in the listener's queue before the source connects.
    let mut garbage = connect(&addr);
    garbage.write_all(b"\x16\x03\x01 not a migration").unwrap();
    let silent = connect(&addr);
    drop(connect(&addr));
    let mut hijacker = connect(&addr);
    hijacker.write_all(&tokenless_resume()).unwrap();
    let src = Running::start(&["--to", &endpoint, "--size", SIZE]);
    let (_, d_err) = assert_completed(src, dest);
    let dropped = dropped_lines(&d_err);
    assert_eq!(dropped.len(), 4, "{d_err}");
    assert!(dropped[0].contains("no ramblock stream header"), "{d_err}");
    assert!(
        dropped[1].contains("sent 0 of the 16 header bytes"),
        "{d_err}"
    );
    assert!(dropped[2].contains("connected and closed"), "{d_err}");
    assert!(
        dropped[3].contains("resume header while waiting for a stream header"),
        "{d_err}"
    );
    drop((garbage, silent, hijacker));
}

/// A destination that accepts every connection and then, with `drain`,
/// reads all it is sent and never answers, or without, reads nothing.
fn mute_destination(drain: bool) -> (String, Arc<AtomicBool>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("tcp:{}", listener.local_addr().unwrap());
    let done = Arc::new(AtomicBool::new(false));
    let stop = done.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let Ok((mut conn, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            };
            conn.set_nonblocking(false).unwrap();
            if drain {
                std::thread::spawn(move || std::io::copy(&mut conn, &mut std::io::sink()));
            } else {
                held.push(conn);
            }
        }
    });
    (endpoint, done)
}

#[test]
fn a_destination_that_stops_reading_or_never_answers_fails_the_source_in_time() {
    for (drain, says) in [
        (false, "stopped reading"),
        (true, "sent nothing for the connection's whole read timeout"),
    ] {
        let (endpoint, done) = mute_destination(drain);
        let started = Instant::now();
        let out = Running::start(&[
            "--to",
            &endpoint,
            "--size",
            "256M",
            "--peer-timeout-ms",
            "1000",
        ])
        .finish();
        let took = started.elapsed();
        done.store(true, Ordering::SeqCst);
        let (s, s_err) = texts(&out);
        assert!(!out.status.success(), "{s}\n{s_err}");
        let error = field(&s, "error");
        assert!(error.contains(says), "drain {drain}: {error}");
        assert!(
            error.contains("the source guest is still running"),
            "{error}"
        );
        // Well inside LIMIT (which kills the child): the timeout ended it.
        assert!(
            took < Duration::from_secs(45),
            "drain {drain}: took {took:?}"
        );
    }
}

#[test]
fn a_destination_mute_after_the_switch_to_postcopy_leaves_the_source_guest_paused() {
    // Post-copy at once: the guest may run only on the destination from
    // the switch on, so a destination that never answers (no resume token)
    // loses the migration and the source keeps its guest paused.
    let (endpoint, done) = mute_destination(true);
    let out = Running::start(&["--to", &endpoint, "--size", "64M", "--postcopy", "0"]).finish();
    done.store(true, Ordering::SeqCst);
    let (s, s_err) = texts(&out);
    assert!(!out.status.success(), "{s}\n{s_err}");
    let error = field(&s, "error");
    assert!(error.contains("could not be resumed"), "{error}");
    assert!(error.contains("keeps the paused guest"), "{error}");
    assert!(
        !error.contains("guest was resumed")
            && !error.contains("still running")
            && !error.contains("made no progress"),
        "the source guest must stay paused: {error}"
    );
}

/// A CA and PEM files for it in a fresh directory.
struct Pki {
    dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("ramblock-pki-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Pki { dir, ca }
    }

    fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// Writes `name`.pem and `name`.key: a certificate for 127.0.0.1.
    fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_args<'a>(cert: &'a Path, key: &'a Path, ca: &'a Path) -> [&'a str; 6] {
    [
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-ca",
        ca.to_str().unwrap(),
    ]
}

#[test]
fn over_tls_only_a_peer_with_a_certificate_from_the_ca_gets_in() {
    let pki = Pki::new("ramblock-test-ca");
    let other = Pki::new("another-ca");
    let (dest_cert, dest_key) = pki.leaf("destination");
    let (src_cert, src_key) = pki.leaf("source");
    let (bad_cert, bad_key) = other.leaf("stranger");
    let addr = format!("127.0.0.1:{}", free_port());
    let endpoint = format!("tcp:{addr}");
    let ca = pki.ca();
    let dest = Running::start(
        &[
            &["--incoming", &endpoint, "--size", SIZE][..],
            &tls_args(&dest_cert, &dest_key, &ca),
        ]
        .concat(),
    );
    // Plaintext with a valid stream header.
    let mut plain = connect(&addr);
    let mut header = Vec::new();
    Header::new(1).write(&mut header).unwrap();
    plain.write_all(&header).unwrap();
    // A certificate signed by another CA (it trusts ours, so it goes
    // through with its side of the handshake).
    let stranger = TlsConfig::from_pem_files(&bad_cert, &bad_key, &ca).unwrap();
    if let Ok(c) = Connector::new(addr.clone()).with_tls(stranger).connect() {
        use ramblock_core::stream::io::ByteWrite;
        let _ = c.writer().unwrap().write_all(&header);
    }
    let src = Running::start(
        &[
            &["--to", &endpoint, "--size", SIZE][..],
            &tls_args(&src_cert, &src_key, &ca),
        ]
        .concat(),
    );
    let (d, d_err) = assert_completed(src, dest);
    // The source's default page channels, each its own TLS session from
    // the same source, came in too.
    let channels = ramblock_linux::channels::default_channel_count().to_string();
    assert_eq!(field(&d, "page_channels"), channels, "{d}");
    let dropped = dropped_lines(&d_err);
    assert_eq!(dropped.len(), 2, "{d_err}");
    assert!(dropped[0].contains("spoke plaintext"), "{d_err}");
    assert!(
        dropped[1].contains("certificate the CA does not vouch for"),
        "{d_err}"
    );
    drop(plain);
}

#[test]
fn a_postcopy_resume_goes_to_the_source_not_to_tokenless_hijackers() {
    let addr = format!("127.0.0.1:{}", free_port());
    let endpoint = format!("tcp:{addr}");
    let dest = Running::start(&[
        "--incoming",
        &endpoint,
        "--size",
        SIZE,
        "--postcopy",
        "--resume",
        "--handshake-timeout-ms",
        "300",
    ]);
    // The source connects first; it breaks its connection three times
    // during post-copy and resumes.
    let src = Running::start(&[
        "--to",
        &endpoint,
        "--size",
        SIZE,
        "--postcopy",
        "1",
        "--downtime-ms",
        "0",
        "--break-postcopy",
        "11",
    ]);
    // Hijackers keep arriving while the migration runs: they queue up
    // behind the source's connection, so each break finds some waiting
    // ahead of the source's reconnect. (Those that come before the source
    // are dropped as resume headers to a new migration.)
    let stop = Arc::new(AtomicBool::new(false));
    let hijackers = {
        let (stop, addr) = (stop.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut open = Vec::new();
            while !stop.load(Ordering::Relaxed) && open.len() < 100 {
                if let Ok(mut s) = TcpStream::connect(&addr) {
                    let _ = s.write_all(&tokenless_resume());
                    open.push(s);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            open.len()
        })
    };
    let (d, d_err) = assert_completed(src, dest);
    stop.store(true, Ordering::Relaxed);
    assert!(hijackers.join().unwrap() > 0);
    assert_ne!(
        field(&d, "resumes"),
        "0",
        "the source never resumed: {d}\n{d_err}"
    );
    assert!(
        d_err.contains("resume header without the token this destination issued"),
        "no hijacker was met at a resume: {d_err}"
    );
}
