//! The transport's listener against every peer that is not the source: a
//! garbage, silent, scanning (connect-and-close) or hijacking peer is
//! dropped with a typed refusal through the log hook, and the real source
//! that connects after them still gets the migration, its first bytes
//! intact. With TLS, plaintext peers and peers without a certificate from
//! the CA are refused too, and a resume must come from the same
//! certificate.

use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::format::{Header, TableEntry};
use ramblock_core::stream::io::{ByteRead, ByteWrite};
use ramblock_core::stream::resume_token::ResumeToken;
use ramblock_linux::transport::tls::TlsConfig;
use ramblock_linux::transport::{
    Conn, ConnWriter, Connector, Listener, PeerRefused, ResumeProof, Timeouts,
};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::io::Write;
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// A CA of the tests' own.
fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for 127.0.0.1 and localhost signed by `ca`, and its key.
fn leaf(
    ca: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, name);
    let cert = params.signed_by(&key, ca).unwrap();
    (
        cert.der().clone(),
        PrivatePkcs8KeyDer::from(key.serialize_der()).into(),
    )
}

/// A side presenting a certificate `name` from `issuer`, trusting `trust`.
fn side(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    name: &str,
    trust: &CertifiedIssuer<'static, KeyPair>,
) -> TlsConfig {
    let (cert, key) = leaf(issuer, name);
    TlsConfig::new(vec![cert], key, vec![trust.der().clone()]).unwrap()
}

/// The first bytes of a real source's stream: header and a table entry.
fn stream_start() -> Vec<u8> {
    let mut out = Vec::new();
    Header::new(1).write(&mut out).unwrap();
    TableEntry {
        used_length: 4096,
        page_size: 4096,
        flags: 0,
    }
    .write("pc.ram", &mut out)
    .unwrap();
    out
}

fn resume_start(token: &ResumeToken) -> Vec<u8> {
    let mut out = Vec::new();
    Header::new(1).write_resume(token, &mut out).unwrap();
    out
}

type Log = Arc<Mutex<Vec<String>>>;

/// A listener on 127.0.0.1 logging into the returned vector (each
/// refusal as its `Debug`): with a short handshake timeout for plain TCP
/// (the silent peers' tests), a generous one for TLS (a handshake on a
/// loaded machine must not pass for silence).
fn listener(tls: Option<TlsConfig>) -> (Listener, Log) {
    let handshake = if tls.is_some() {
        Duration::from_secs(10)
    } else {
        Duration::from_millis(300)
    };
    let log: Log = Arc::default();
    let sink = log.clone();
    let mut l = Listener::bind("127.0.0.1:0")
        .unwrap()
        .with_timeouts(Timeouts {
            handshake,
            read: Some(Duration::from_secs(5)),
            write: Some(Duration::from_secs(5)),
        })
        .with_log(move |dropped: &PeerRefused| {
            // The line a VMM would print names the peer and the reason.
            let line = dropped.to_string();
            assert!(line.contains("127.0.0.1") && line.contains("still waiting"));
            sink.lock().unwrap().push(format!("{:?}", dropped.refusal));
        });
    if let Some(tls) = tls {
        l = l.with_tls(tls);
    }
    (l, log)
}

/// Reads what the admitted connection carries: its first `n` bytes.
fn first_bytes(mut conn: Conn, n: usize) -> Vec<u8> {
    let mut reader = conn.reader().unwrap();
    let mut buf = vec![0u8; n];
    reader.read_exact(&mut buf).unwrap();
    buf
}

fn accept_in_thread(l: Listener) -> JoinHandle<(Listener, Conn)> {
    std::thread::spawn(move || {
        let conn = l.accept_migration(Some(Duration::from_secs(20))).unwrap();
        (l, conn)
    })
}

fn refusals(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

fn kinds(log: &Log) -> Vec<String> {
    refusals(log)
        .iter()
        .map(|r| r.split([' ', '(', '{']).next().unwrap().to_string())
        .collect()
}

#[test]
fn garbage_silent_and_scanning_peers_are_dropped_and_the_source_still_connects() {
    let (l, log) = listener(None);
    let addr = l.local_addr().unwrap();
    // The peers connect before the source, so the listener meets them
    // first (it takes connections in the order they arrived).
    let mut garbage = TcpStream::connect(addr).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let silent = TcpStream::connect(addr).unwrap();
    drop(TcpStream::connect(addr).unwrap()); // a port scan
    let mut half = TcpStream::connect(addr).unwrap();
    half.write_all(b"RAMB").unwrap();
    drop(half);
    let mut resume = TcpStream::connect(addr).unwrap();
    resume
        .write_all(&resume_start(&ResumeToken::default()))
        .unwrap();
    let mut source = TcpStream::connect(addr).unwrap();
    let start = stream_start();
    source.write_all(&start).unwrap();
    let (_l, conn) = accept_in_thread(l).join().unwrap();
    assert_eq!(
        first_bytes(conn, start.len()),
        start,
        "the source's bytes are intact"
    );
    assert_eq!(
        kinds(&log),
        [
            "Garbage",
            "Silent",
            "ClosedAtOnce",
            "ClosedEarly",
            "WrongHeader"
        ]
    );
    let r = refusals(&log);
    assert!(r[0].contains("found: [71, 69, 84, 32"), "{}", r[0]); // "GET "
    assert!(r[1].contains("got: 0, wanted: 16"), "{}", r[1]);
    assert!(r[3].contains("got: 4, wanted: 16"), "{}", r[3]);
    assert!(
        r[4].contains("found: \"resume\", wanted: \"stream\""),
        "{}",
        r[4]
    );
    drop(silent);
}

#[test]
fn a_header_of_another_version_is_refused() {
    let (l, log) = listener(None);
    let addr = l.local_addr().unwrap();
    let mut old = TcpStream::connect(addr).unwrap();
    let mut header = stream_start();
    header[8] = 9; // version 9
    old.write_all(&header).unwrap();
    let mut source = TcpStream::connect(addr).unwrap();
    source.write_all(&stream_start()).unwrap();
    let (_l, _conn) = accept_in_thread(l).join().unwrap();
    assert_eq!(
        refusals(&log),
        ["Unsupported { version: 9, page_shift: 12 }"]
    );
}

#[test]
fn a_resume_needs_the_issued_token_and_a_timeout_ends_the_wait() {
    let (l, log) = listener(None);
    let addr = l.local_addr().unwrap();
    let token = ResumeToken(*b"issued to source");
    let proof = ResumeProof {
        token: Some(token),
        identity: None,
    };
    // A hijacker with a guessed token, one with a new stream's header, one
    // that says nothing; then the source.
    let mut guess = TcpStream::connect(addr).unwrap();
    guess
        .write_all(&resume_start(&ResumeToken(*b"guessed token!!!")))
        .unwrap();
    let mut fresh = TcpStream::connect(addr).unwrap();
    fresh.write_all(&stream_start()).unwrap();
    let silent = TcpStream::connect(addr).unwrap();
    let mut source = TcpStream::connect(addr).unwrap();
    let start = resume_start(&token);
    source.write_all(&start).unwrap();
    let conn = l.accept_resume(&proof, Duration::from_secs(20)).unwrap();
    assert_eq!(first_bytes(conn, start.len()), start);
    assert_eq!(kinds(&log), ["BadToken", "WrongHeader", "Silent"]);
    drop(silent);
    // Nobody else comes: the wait ends with a typed timeout.
    let err = l
        .accept_resume(&proof, Duration::from_millis(200))
        .unwrap_err();
    assert!(
        matches!(err, ramblock_linux::transport::TransportError::Timeout(_)),
        "{err}"
    );
}

#[test]
fn tls_listener_refuses_plaintext_strangers_and_clients_without_certificates() {
    let pki = ca("ramblock test CA");
    let other = ca("someone else's CA");
    let dest = side(&pki, "destination", &pki);
    let source_tls = side(&pki, "source", &pki);
    // Signed by another CA, but trusting ours (so the client goes ahead).
    let stranger = side(&other, "stranger", &pki);
    let (l, log) = listener(Some(dest));
    let addr = l.local_addr().unwrap();
    let accepting = accept_in_thread(l);

    // Plaintext, with a real header.
    let mut plain = TcpStream::connect(addr).unwrap();
    plain.write_all(&stream_start()).unwrap();
    // A certificate from another CA: the handshake fails (the client
    // learns of it on its first read or write).
    let stranger_conn = Connector::new(addr.to_string())
        .with_tls(stranger)
        .connect();
    if let Ok(c) = stranger_conn {
        let mut w = c.writer().unwrap();
        let _ = w.write_all(&stream_start());
    }
    // No client certificate at all.
    {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.der().clone()).unwrap();
        let config = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
        let _ = tls.write_all(&stream_start());
        let _ = tls.flush();
    }
    // TLS 1.2 only, with a valid certificate: refused (TLS 1.3 only).
    {
        let (cert, key) = leaf(&pki, "old client");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.der().clone()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS12])
                .with_root_certificates(roots)
                .with_client_auth_cert(vec![cert], key)
                .unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, TcpStream::connect(addr).unwrap());
        let _ = tls.write_all(&stream_start());
        let _ = tls.flush();
    }
    // The source.
    let conn = Connector::new(addr.to_string())
        .with_tls(source_tls)
        .connect()
        .unwrap();
    let start = stream_start();
    let mut w = conn.writer().unwrap();
    w.write_all(&start).unwrap();
    let (_l, admitted) = accepting.join().unwrap();
    assert!(admitted.is_tls());
    assert!(admitted.peer_certificate().is_some());
    assert_eq!(
        admitted.tls_negotiated(),
        Some((
            rustls::ProtocolVersion::TLSv1_3,
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        ))
    );
    assert_eq!(first_bytes(admitted, start.len()), start);
    assert_eq!(
        kinds(&log),
        ["Plaintext", "UntrustedCertificate", "NoCertificate", "Tls"]
    );
    assert!(
        refusals(&log)[3].contains("Tls12NotOfferedOrEnabled"),
        "{:?}",
        refusals(&log)
    );
    assert!(
        refusals(&log)[1].contains("UnknownIssuer"),
        "{:?}",
        refusals(&log)
    );
    drop(plain);
}

#[test]
fn a_tls_resume_must_come_from_the_same_certificate() {
    let pki = ca("ramblock test CA");
    let dest = side(&pki, "destination", &pki);
    let source_tls = side(&pki, "source", &pki);
    // Valid, from the same CA, but another host.
    let other_host = side(&pki, "another host", &pki);
    let (l, log) = listener(Some(dest));
    let addr = l.local_addr().unwrap();
    let accepting = accept_in_thread(l);
    let connector = Connector::new(addr.to_string()).with_tls(source_tls);
    let first = connector.connect().unwrap();
    first.writer().unwrap().write_all(&stream_start()).unwrap();
    let (l, original) = accepting.join().unwrap();
    let token = ResumeToken(*b"issued to source");
    let proof = ResumeProof::of(&original, Some(token));
    assert!(proof.identity.is_some());

    let resuming = std::thread::spawn(move || {
        l.accept_resume(&proof, Duration::from_secs(20))
            .map(|c| (l, c))
    });
    // Another certificate with the right token: refused.
    let impostor = Connector::new(addr.to_string())
        .with_tls(other_host)
        .connect()
        .unwrap();
    let _ = impostor.writer().unwrap().write_all(&resume_start(&token));
    // The source again: admitted. It writes only once the impostor has
    // been dealt with, so the order is the one the log asserts.
    while log.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let again = connector.connect().unwrap();
    let start = resume_start(&token);
    again.writer().unwrap().write_all(&start).unwrap();
    let (_l, admitted) = resuming.join().unwrap().unwrap();
    assert_eq!(first_bytes(admitted, start.len()), start);
    assert_eq!(kinds(&log), ["WrongIdentity"]);
}

#[test]
fn pages_round_trip_over_tls_from_guest_memory() {
    let pki = ca("ramblock test CA");
    let (l, _log) = listener(Some(side(&pki, "destination", &pki)));
    let addr = l.local_addr().unwrap();
    let accepting = accept_in_thread(l);
    let mut source = Connector::new(addr.to_string())
        .with_tls(side(&pki, "source", &pki))
        .connect()
        .unwrap();
    // 1 MiB of "guest memory", sent as the engine sends page runs.
    let mut memory: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let expected = memory.clone();
    let region = HostRegion::from_mut_slice(&mut memory);
    let mut w = source.writer().unwrap();
    w.write_all(&stream_start()).unwrap();
    for run in 0..4 {
        let part = region
            .subregion(ByteLen(run * (256 << 10)), 256 << 10)
            .unwrap();
        w.write_region(&part).unwrap();
    }
    ByteWrite::flush(&mut w).unwrap();
    let (_l, mut conn) = accepting.join().unwrap();
    let mut r = conn.reader().unwrap();
    let mut head = vec![0u8; stream_start().len()];
    r.read_exact(&mut head).unwrap();
    let mut got = vec![0u8; expected.len()];
    r.read_exact(&mut got).unwrap();
    assert!(got == expected, "the pages arrived changed");
    // The return path, the other way over the same session.
    let mut back = conn.try_clone().unwrap();
    back.write_all(b"RBOK\0\0\0\0").unwrap();
    let mut ack = [0u8; 8];
    source.reader().unwrap().read_exact(&mut ack).unwrap();
    assert_eq!(&ack, b"RBOK\0\0\0\0");
}

#[test]
fn pem_files_load_and_missing_ones_say_which() {
    let pki = ca("ramblock test CA");
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &pki).unwrap();
    let dir = std::env::temp_dir().join(format!("ramblock-pem-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (c, k, a) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("ca.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    std::fs::write(&a, pki.pem()).unwrap();
    assert!(TlsConfig::from_pem_files(&c, &k, &a).is_ok());
    // The key given as the CA: no certificate in it.
    let err = TlsConfig::from_pem_files(&c, &k, &k).unwrap_err();
    assert!(err.to_string().contains("CA certificate"), "{err}");
    let err = TlsConfig::from_pem_files(&dir.join("none.pem"), &k, &a).unwrap_err();
    assert!(err.to_string().contains("certificate chain"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_unix_socket_listener_admits_only_the_source_and_carries_the_stream() {
    let dir = std::env::temp_dir().join(format!("ramblock-unix-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("migrate.sock");
    // A socket file left by an earlier run does not stop the bind.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let addr = format!("unix:{}", path.display());
    let log: Log = Arc::default();
    let sink = log.clone();
    let l = Listener::bind(&addr)
        .unwrap()
        .with_timeouts(Timeouts {
            handshake: Duration::from_millis(300),
            read: Some(Duration::from_secs(5)),
            write: Some(Duration::from_secs(5)),
        })
        .with_log(move |dropped: &PeerRefused| {
            assert!(dropped.to_string().contains("unix peer"));
            sink.lock().unwrap().push(format!("{:?}", dropped.refusal));
        });
    assert!(
        l.local_addr().is_err(),
        "a UNIX listener has a path, not an IP address"
    );
    let mut garbage = std::os::unix::net::UnixStream::connect(&path).unwrap();
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut source = Connector::new(addr.clone()).connect().unwrap();
    assert!(source.tcp().is_none() && !source.is_tls());
    let start = stream_start();
    source.write_all(&start).unwrap();
    let (l, conn) = accept_in_thread(l).join().unwrap();
    // Pages move between guest memory and the socket in place, as on TCP.
    let mut writer = source.writer().unwrap();
    let mut page = vec![0x5au8; 4096];
    let region = HostRegion::from_mut_slice(&mut page);
    writer.write_region(&region).unwrap();
    ByteWrite::flush(&mut writer).unwrap();
    let got = first_bytes(conn, start.len() + 4096);
    assert_eq!(
        &got[..start.len()],
        &start[..],
        "the source's bytes are intact"
    );
    assert!(got[start.len()..].iter().all(|&b| b == 0x5a));
    assert_eq!(kinds(&log), ["Garbage"]);
    drop(l);
    assert!(!path.exists(), "the listener removes its socket file");
    let e = Connector::new(addr)
        .retry_for(Duration::from_millis(100))
        .connect()
        .unwrap_err();
    assert!(e.to_string().contains("migrate.sock"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Writes 64 MiB in page runs with `w` until it fails; the error, and how
/// long it took to come.
fn write_until_it_fails(mut w: ConnWriter) -> (std::io::Error, Duration) {
    let mut memory = vec![7u8; 64 << 20];
    let region = HostRegion::from_mut_slice(&mut memory);
    let started = std::time::Instant::now();
    let error = w
        .write_region(&region)
        .and_then(|()| ByteWrite::flush(&mut w))
        .expect_err("64 MiB fit in the socket buffers of a peer that reads nothing");
    (error, started.elapsed())
}

#[test]
fn a_peer_that_stops_reading_or_sending_is_a_timeout_on_both_ends() {
    let pki = ca("ramblock test CA");
    let quiet = Duration::from_millis(300);
    for tls in [false, true] {
        let timeouts = Timeouts {
            handshake: Duration::from_secs(10),
            read: Some(quiet),
            write: Some(quiet),
        };
        let mut l = Listener::bind("127.0.0.1:0")
            .unwrap()
            .with_timeouts(timeouts);
        let mut connector =
            Connector::new(l.local_addr().unwrap().to_string()).write_timeout(Some(quiet));
        if tls {
            l = l.with_tls(side(&pki, "destination", &pki));
            connector = connector.with_tls(side(&pki, "source", &pki));
        }
        // The source's writes to a destination that reads nothing.
        let accepting = accept_in_thread(l);
        let source = connector.connect().unwrap();
        let mut start = source.writer().unwrap();
        start.write_all(&stream_start()).unwrap();
        ByteWrite::flush(&mut start).unwrap();
        let (l, destination) = accepting.join().unwrap();
        let (error, took) = write_until_it_fails(source.writer().unwrap());
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "tls {tls}: {error}"
        );
        assert!(error.to_string().contains("stopped reading"), "{error}");
        assert!(
            took < Duration::from_secs(20),
            "tls {tls}: failed after {took:?}"
        );
        if !tls {
            // A zero-copy writer waits no longer than the socket's own
            // write timeout either (its stall timeout is that, not 120 s).
            let (error, took) = write_until_it_fails(source.zero_copy_writer().unwrap());
            assert_eq!(error.kind(), std::io::ErrorKind::TimedOut, "{error}");
            assert!(
                took < Duration::from_secs(20),
                "zero copy failed after {took:?}"
            );
        }
        drop((source, destination));
        // The destination's writes to a source that reads nothing, and
        // its reads from a source that sends nothing more.
        let accepting = accept_in_thread(l);
        let source = connector.connect().unwrap();
        let mut start = source.writer().unwrap();
        start.write_all(&stream_start()).unwrap();
        ByteWrite::flush(&mut start).unwrap();
        let (_l, mut destination) = accepting.join().unwrap();
        let mut r = destination.reader().unwrap();
        let mut head = vec![0u8; stream_start().len()];
        r.read_exact(&mut head).unwrap();
        let silence = r.read_exact(&mut [0u8; 1]).expect_err("nothing was sent");
        assert!(
            silence.to_string().contains("sent nothing"),
            "tls {tls}: {silence}"
        );
        let (error, took) = write_until_it_fails(destination.writer().unwrap());
        assert_eq!(
            error.kind(),
            std::io::ErrorKind::TimedOut,
            "tls {tls}: {error}"
        );
        assert!(
            took < Duration::from_secs(20),
            "tls {tls}: failed after {took:?}"
        );
    }
}
