//! `ZeroCopyWriter` over TCP loopback: the stream arrives exactly as a
//! model of it, across short sends and the outstanding bound; a flush
//! returns only after the kernel completed every send; the kernel's
//! "copied after all" reports are counted; a UNIX socket is refused.

use ramblock_core::addr::ByteLen;
use ramblock_core::region::HostRegion;
use ramblock_core::stream::io::ByteWrite;
use ramblock_linux::fd_stream::QUEUE_BYTES;
use ramblock_linux::zero_copy::{ZeroCopyError, ZeroCopyWriter};
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

fn set_buffer(s: &impl AsFd, option: libc::c_int, bytes: libc::c_int) {
    // SAFETY: setsockopt reads one c_int from a live local.
    let rc = unsafe {
        libc::setsockopt(
            s.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", io::Error::last_os_error());
}

/// A connected loopback pair: (sender, receiver).
fn tcp_pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (b, _) = l.accept().unwrap();
    (a, b)
}

/// Xorshift, so the operation mix is the same every run.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Reads everything on a thread once `go` fires (or is dropped, or
/// `at_most` passed), in uneven chunks with pauses, so the sender meets a
/// full socket.
fn slow_reader(
    mut b: TcpStream,
    go: mpsc::Receiver<()>,
    at_most: Option<Duration>,
) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let _ = match at_most {
            Some(t) => go.recv_timeout(t).map_err(|_| mpsc::RecvError),
            None => go.recv(),
        };
        let mut rng = Rng(0x5EED);
        let mut got = Vec::new();
        let mut buf = vec![0u8; 200_000];
        loop {
            let want = 1 + rng.below(buf.len() as u64) as usize;
            match b.read(&mut buf[..want]) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("read: {e}"),
            }
            if rng.below(8) == 0 {
                thread::sleep(Duration::from_micros(200));
            }
        }
    })
}

fn bytes_of(r: &HostRegion<'_>) -> Vec<u8> {
    let mut v = vec![0; r.len()];
    r.read(ByteLen::ZERO, &mut v).unwrap();
    v
}

/// Headers of every size, big plain writes, regions above and below the
/// zero-copy minimum, and flushes, through a non-blocking socket with
/// small buffers (so sends come back short and `EAGAIN`) and a bound of 3
/// outstanding sends: the receiver gets exactly the model's bytes.
#[test]
fn mixed_headers_and_pages_arrive_intact_and_in_order() {
    let (a, b) = tcp_pair();
    set_buffer(&a, libc::SO_SNDBUF, 64 << 10);
    set_buffer(&b, libc::SO_RCVBUF, 64 << 10);
    a.set_nonblocking(true).unwrap();
    // The first sends meet a socket nobody reads for a while.
    let (_go, wait) = mpsc::channel::<()>();
    let reader = slow_reader(b, wait, Some(Duration::from_millis(100)));

    let mut guest: Vec<u8> = (0..8u32 << 20).map(|i| (i * 131 / 7) as u8).collect();
    let ram = HostRegion::from_mut_slice(&mut guest);
    let mut model = Vec::new();
    let mut w = ZeroCopyWriter::new(a)
        .unwrap()
        .with_max_outstanding(3)
        .with_min_len(16 << 10)
        .with_stall_timeout(Duration::from_secs(20));
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut zero_copy_regions = 0u64;
    for step in 0..300u32 {
        match rng.below(10) {
            0..=4 => {
                let header: Vec<u8> = (0..1 + rng.below(300)).map(|_| rng.next() as u8).collect();
                w.write_all(&header).unwrap();
                model.extend_from_slice(&header);
            }
            5 => {
                let big = vec![step as u8; QUEUE_BYTES + rng.below(5000) as usize];
                w.write_all(&big).unwrap();
                model.extend_from_slice(&big);
            }
            6..=8 => {
                let len = match rng.below(3) {
                    0 => 1 + rng.below(16 << 10) as usize, // under the minimum
                    1 => 4096 * (4 + rng.below(60) as usize),
                    _ => 4096 * (256 + rng.below(512) as usize),
                };
                let at = rng.below((ram.len() - len) as u64);
                let part = ram.subregion(ByteLen(at), len).unwrap();
                if len >= 16 << 10 {
                    zero_copy_regions += 1;
                }
                w.write_region(&part)
                    .unwrap_or_else(|e| panic!("step {step}: {e}"));
                model.extend_from_slice(&bytes_of(&part));
                assert!(w.outstanding() <= 3, "the bound holds");
            }
            _ => {
                w.flush().unwrap();
                assert_eq!(w.outstanding(), 0, "a flush leaves nothing outstanding");
            }
        }
    }
    w.flush().unwrap();
    let stats = w.stats();
    assert_eq!(w.outstanding(), 0);
    assert_eq!(stats.completed_sends, stats.zero_copy_sends);
    assert!(zero_copy_regions > 20, "the mix sends regions zero-copy");
    assert!(
        stats.zero_copy_sends > zero_copy_regions,
        "some sends came back short ({} sends for {zero_copy_regions} regions)",
        stats.zero_copy_sends
    );
    assert!(
        stats.plain_bytes > 0,
        "small regions and headers went by copy"
    );
    assert_eq!(
        stats.zero_copy_bytes + stats.plain_bytes,
        model.len() as u64,
        "every byte was sent once, one way or the other"
    );
    drop(w);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), model.len());
    assert!(got == model, "the stream differs from the model");
}

/// A flush does not return while the kernel still holds a send: with the
/// receiver not reading and its buffer full, the data cannot be delivered,
/// so the flush must still be waiting; once the receiver reads, it returns
/// with every send completed and nothing left in the error queue.
#[test]
fn flush_waits_for_every_completion() {
    let (a, b) = tcp_pair();
    set_buffer(&a, libc::SO_SNDBUF, 4 << 20);
    set_buffer(&b, libc::SO_RCVBUF, 64 << 10);
    let (go, wait) = mpsc::channel();
    let reader = slow_reader(b, wait, None);
    let (done_tx, done_rx) = mpsc::channel();
    let sender = thread::spawn(move || {
        let mut guest = vec![0xA5u8; 2 << 20];
        let ram = HostRegion::from_mut_slice(&mut guest);
        let mut w = ZeroCopyWriter::new(a).unwrap();
        w.write_all(b"header").unwrap();
        w.write_region(&ram).unwrap();
        assert!(w.outstanding() > 0, "the send is not complete yet");
        w.flush().unwrap();
        done_tx.send(()).unwrap();
        let out = w.outstanding();
        let stats = w.stats();
        (out, stats, w)
    });
    // The flush returning here would be a bug; too short a wait can only
    // make this check miss one, never fail a correct writer.
    assert_eq!(
        done_rx.recv_timeout(Duration::from_millis(300)),
        Err(mpsc::RecvTimeoutError::Timeout),
        "flush returned while the receiver held up the data"
    );
    go.send(()).unwrap();
    done_rx.recv().unwrap();
    let (out, stats, w) = sender.join().unwrap();
    assert_eq!(out, 0);
    assert_eq!(stats.completed_sends, stats.zero_copy_sends);
    assert!(stats.zero_copy_sends >= 1);
    assert_eq!(stats.zero_copy_bytes, 6 + (2 << 20));
    // The kernel's view: no completion is left to read.
    let mut msg: libc::msghdr = unsafe_zeroed_msghdr();
    // SAFETY: no iovecs, no control buffer: the kernel writes nothing.
    let rc = unsafe {
        libc::recvmsg(
            w.get_ref().as_raw_fd(),
            &mut msg,
            libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
        )
    };
    assert_eq!(rc, -1);
    assert_eq!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::EAGAIN)
    );
    drop(w);
    let got = reader.join().unwrap();
    assert_eq!(got.len(), 6 + (2 << 20));
    assert_eq!(&got[..6], b"header");
    assert!(got[6..].iter().all(|&x| x == 0xA5));
}

fn unsafe_zeroed_msghdr() -> libc::msghdr {
    // SAFETY: an all-zero msghdr is valid (no name, iovecs or control).
    unsafe { std::mem::zeroed() }
}

/// The kernel says whether it copied after all: over loopback the receiver
/// is local, so it must copy the pinned pages when it queues them to the
/// receiving socket, and reports every send as copied.
#[test]
fn copies_on_loopback_are_counted() {
    let (a, b) = tcp_pair();
    let (go, wait) = mpsc::channel();
    let reader = slow_reader(b, wait, None);
    drop(go);
    let mut guest = vec![1u8; 4 << 20];
    let ram = HostRegion::from_mut_slice(&mut guest);
    let mut w = ZeroCopyWriter::new(a).unwrap();
    for i in 0..16 {
        w.write_all(&[i as u8; 9]).unwrap();
        w.write_region(&ram.subregion(ByteLen(i * (256 << 10)), 256 << 10).unwrap())
            .unwrap();
    }
    w.flush().unwrap();
    let s = w.stats();
    eprintln!("loopback: {s:?}");
    assert_eq!(s.completed_sends, s.zero_copy_sends);
    assert_eq!(
        s.copied_sends, s.completed_sends,
        "loopback delivers to a local socket, which copies every send"
    );
    assert_eq!(s.copied_bytes, s.zero_copy_bytes);
    drop(w);
    assert_eq!(reader.join().unwrap().len(), 16 * (9 + (256 << 10)));
}

/// A UNIX socket takes no zero-copy sends: the writer refuses it with an
/// error that says so and what to use instead.
#[test]
fn a_unix_socket_is_refused_clearly() {
    let (a, _b) = UnixStream::pair().unwrap();
    let e = ZeroCopyWriter::new(a).unwrap_err();
    assert!(matches!(e, ZeroCopyError::Unsupported(_)), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("only TCP"), "{text}");
    assert_eq!(io::Error::from(e).kind(), io::ErrorKind::Unsupported);
}

/// A peer that went away is EPIPE from the writer (never SIGPIPE), and the
/// writer's drop does not hang on sends the kernel dropped.
#[test]
fn a_closed_peer_is_an_error_not_a_hang() {
    let (a, b) = tcp_pair();
    drop(b);
    let mut guest = vec![7u8; 4 << 20];
    let ram = HostRegion::from_mut_slice(&mut guest);
    let mut w = ZeroCopyWriter::new(a)
        .unwrap()
        .with_stall_timeout(Duration::from_secs(20));
    let mut result = Ok(());
    for _ in 0..64 {
        result = w.write_region(&ram).and_then(|()| w.flush());
        if result.is_err() {
            break;
        }
    }
    let e = io::Error::from(result.unwrap_err());
    assert!(
        matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "{e}"
    );
    drop(w);
}
