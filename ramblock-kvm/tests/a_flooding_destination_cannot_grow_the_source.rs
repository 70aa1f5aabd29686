//! Through the real binary: a peer on the destination's side of the
//! connection asks for the whole block at once, then floods the source with
//! page requests (duplicates and valid ones) and, for a while, reads
//! nothing the source sends. The real migration still completes and
//! verifies, and the source's memory stays bounded: its return-path queue
//! is bounded (the flood waits in the kernel's socket buffers) and the
//! engine sends background pages between batches of requests.
//!
//! The peer is a proxy in front of a real `ramblock migrate --incoming`:
//! it passes the stream and the destination's own return-path messages
//! through whole, and adds its flood between them.

mod program;
use program::{field, free_port, texts, Running};
use ramblock_core::stream::format::PageRequest;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const SIZE: &str = "64M";
const PAGES: u64 = (64 << 20) / 4096;
/// Stream bytes passed on before the proxy stops reading the source.
const STALL_AFTER: u64 = 8 << 20;
/// How long it then reads nothing while it floods.
const STALL: Duration = Duration::from_secs(3);
/// Most the source's resident memory may grow while it is flooded. Without
/// the bound its request queue grew by tens of MiB in the stall (43 MiB
/// here); with it, by a few KiB.
const MAX_GROWTH_KIB: u64 = 16 << 10;

/// A process's resident memory in KiB (None once it is gone).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn request(block: u32, first: u64, count: u32) -> [u8; 20] {
    let mut b = Vec::new();
    PageRequest {
        block,
        first,
        count,
    }
    .write(&mut b)
    .unwrap();
    b.try_into().unwrap()
}

/// What the proxy saw.
#[derive(Default)]
struct Proxy {
    /// The stall began (the sampler takes its baseline then).
    stalled: AtomicBool,
    /// Flood requests written to the source.
    flood: AtomicU64,
}

/// Passes the source's stream on, stalling once after [`STALL_AFTER`]
/// bytes.
fn forward(mut from: TcpStream, mut to: TcpStream, proxy: &Proxy) {
    let mut buf = vec![0u8; 64 << 10];
    let mut passed = 0u64;
    let mut stalled = false;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        passed += n as u64;
        if !stalled && passed >= STALL_AFTER {
            stalled = true;
            proxy.stalled.store(true, SeqCst);
            std::thread::sleep(STALL);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Reads the destination's return-path messages whole (tag, then 16 bytes
/// for a request or the resume token, 4 otherwise) and hands them to the
/// writer.
fn back(mut from: TcpStream, tx: mpsc::Sender<Vec<u8>>) {
    loop {
        let mut tag = [0u8; 4];
        if from.read_exact(&mut tag).is_err() {
            return;
        }
        let mut msg = tag.to_vec();
        msg.resize(
            if &tag == b"RBRQ" || &tag == b"RBTK" {
                20
            } else {
                8
            },
            0,
        );
        if from.read_exact(&mut msg[4..]).is_err() || tx.send(msg).is_err() {
            return;
        }
    }
}

/// Writes to the source: the destination's first message (its resume
/// token, which the source waits for at the switch), the whole-block
/// request, then the destination's own messages as they come and, between
/// them, batches of flood.
fn flood(mut to: TcpStream, rx: mpsc::Receiver<Vec<u8>>, proxy: &Proxy) {
    let Ok(token) = rx.recv() else {
        return;
    };
    if to.write_all(&token).is_err() || to.write_all(&request(0, 0, PAGES as u32)).is_err() {
        return;
    }
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut batch = Vec::with_capacity(64 * 20);
    loop {
        loop {
            match rx.try_recv() {
                Ok(msg) => {
                    if to.write_all(&msg).is_err() {
                        return;
                    }
                }
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => return,
            }
        }
        batch.clear();
        for i in 0..64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let first = if i % 4 == 0 { rng % PAGES } else { 0 };
            batch.extend_from_slice(&request(0, first, 1));
        }
        if to.write_all(&batch).is_err() {
            return;
        }
        proxy.flood.fetch_add(64, SeqCst);
    }
}

#[test]
fn a_flooding_destination_neither_stops_the_migration_nor_grows_the_source() {
    let dest_port = free_port();
    let dest_at = format!("tcp:127.0.0.1:{dest_port}");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_at = format!("tcp:{}", listener.local_addr().unwrap());
    let dest = Running::start(&["--incoming", &dest_at, "--size", SIZE, "--postcopy"]);
    let src = Running::start(&[
        "--to",
        &proxy_at,
        "--size",
        SIZE,
        "--postcopy",
        "0",
        "--downtime-ms",
        "0",
        // The proxy passes one connection: the main stream.
        "--channels",
        "0",
    ]);
    let pid = src.id();
    let proxy = Arc::new(Proxy::default());
    let (source_conn, _) = listener.accept().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let dest_conn = loop {
        match TcpStream::connect(("127.0.0.1", dest_port)) {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("destination not listening: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    let (tx, rx) = mpsc::channel();
    let threads = [
        {
            let (f, t, p) = (
                source_conn.try_clone().unwrap(),
                dest_conn.try_clone().unwrap(),
                proxy.clone(),
            );
            std::thread::spawn(move || forward(f, t, &p))
        },
        {
            let f = dest_conn.try_clone().unwrap();
            std::thread::spawn(move || back(f, tx))
        },
        {
            let (t, p) = (source_conn.try_clone().unwrap(), proxy.clone());
            std::thread::spawn(move || flood(t, rx, &p))
        },
    ];
    // Sample the source's resident memory until it exits (a zombie has
    // none).
    let (mut baseline, mut peak) = (None, 0u64);
    while let Some(kib) = rss_kib(pid) {
        if proxy.stalled.load(SeqCst) && baseline.is_none() {
            baseline = Some(kib);
        }
        peak = peak.max(kib);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (so, d_o) = (src.finish(), dest.finish());
    let (src_ok, dest_ok) = (so.status.success(), d_o.status.success());
    let ((s, s_err), (d, d_err)) = (texts(&so), texts(&d_o));
    let _ = source_conn.shutdown(Shutdown::Both);
    let _ = dest_conn.shutdown(Shutdown::Both);
    for t in threads {
        t.join().unwrap();
    }
    let flood = proxy.flood.load(SeqCst);
    let baseline = baseline.expect("the proxy stalled while the source ran");
    println!(
        "flood: {flood} requests; source RSS {baseline} KiB at the stall, peak {peak} KiB; source: {s}"
    );
    assert!(src_ok, "source: {s}\n{s_err}");
    assert!(dest_ok, "destination: {d}\n{d_err}");
    assert_eq!(field(&s, "postcopy"), "true", "{s}");
    assert_eq!(field(&d, "verified"), "true", "{d}");
    assert!(flood >= 10_000, "the flood was no flood: {flood} requests");
    assert!(
        peak <= baseline + MAX_GROWTH_KIB,
        "the source grew from {baseline} KiB to {peak} KiB while flooded"
    );
}
