//! Page channels end to end over TCP loopback: a writer keeps changing the
//! source while four channels carry pre-copy pages beside the main stream;
//! the destination ends equal to the source at the switch-over, byte for
//! byte, in every pass's order. The destination learns how many channels
//! to accept from the main stream's header. A channel that dies fails the
//! migration and the source guest runs on; a malformed channel, a header
//! announcing another count than the destination's, or more channels than
//! allowed, is a typed error.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::channels::{receive_channel, ChannelFailureKind, ChannelGate};
use ramblock_core::migrate::receiver::{send_ack, ReceiveSummary, Receiver, BOUNCE_BYTES};
use ramblock_core::migrate::{
    migrate_with_channels, MigrateError, MigrationHost, MigrationStats, PassReport, PrecopyConfig,
    ReceiveError,
};
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{Header, Record, TableEntry, MAX_PAGE_CHANNELS};
use ramblock_core::stream::io::{IoStream, SliceReader};
use ramblock_linux::channels::{
    receive_page_channels, with_page_channels, with_page_channels_connecting, ChannelSender, Gate,
};
use ramblock_linux::transport::{Conn, Connector, Listener, TransportError};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

type List = RamList<'static, LinuxMemory, Owned, 4>;
const PAGE: u64 = 4096;
const CHANNELS: u32 = 4;

fn add(list: &List, name: &str, pages: u64) {
    let len = ByteLen(pages * PAGE);
    let mem = MemoryBuilder::anonymous(len).build().unwrap();
    let spec = BlockSpec::new(BlockName::new(name).unwrap(), len)
        .flags(mem.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::<Owned>::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
}

fn lists() -> (List, List) {
    let (src, dst) = (List::new(), List::new());
    for list in [&src, &dst] {
        add(list, "pc.ram", 8192);
        add(list, "vram", 1024);
    }
    // Some pages with data, most zero (pass 0 sends them as counts).
    let view = src.read();
    for block in view.iter() {
        for page in (0..block.used_pages() as u64).step_by(3) {
            let byte = [(page % 251) as u8 + 1; 16];
            block
                .write(ByteLen(page * PAGE + page % 4000), &byte)
                .unwrap();
        }
    }
    drop(view);
    (src, dst)
}

/// The guest: a flag the writer honours.
#[derive(Default)]
struct Vm {
    paused: AtomicBool,
    paused_ack: AtomicBool,
    resumed: AtomicU32,
}

struct Host<'a> {
    vm: &'a Vm,
    t0: Instant,
    ledger: &'a Ledger,
    passes: Vec<PassReport>,
}

impl MigrationHost for Host<'_> {
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }
    fn pause_guest(&mut self) {
        self.vm.paused.store(true, Ordering::SeqCst);
        while !self.vm.paused_ack.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
    }
    fn resume_guest(&mut self) {
        self.vm.paused.store(false, Ordering::SeqCst);
        self.vm.resumed.fetch_add(1, Ordering::SeqCst);
    }
    fn set_throttle(&mut self, _: u8) {}
    fn pass_done(&mut self, r: &PassReport) {
        self.passes.push(*r);
    }
    fn ledger(&mut self) -> Option<&mut dyn PageLedger> {
        Some(&mut self.ledger)
    }
}

/// Writes moving windows of pages of every block until paused or stopped.
fn writer(list: &List, vm: &Vm, stop: &AtomicBool) {
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if vm.paused.load(Ordering::SeqCst) {
            vm.paused_ack.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        vm.paused_ack.store(false, Ordering::SeqCst);
        let view = list.read();
        for block in view.iter() {
            let pages = block.used_pages() as u64;
            for k in 0..64 {
                let page = (round * 61 + k * 17) % pages;
                let byte = [(round % 250) as u8 + 1];
                block.write(ByteLen(page * PAGE + k * 8), &byte).unwrap();
            }
        }
        drop(view);
        round += 1;
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn contents(list: &List) -> Vec<(String, Vec<u8>)> {
    let view = list.read();
    view.iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length().0 as usize];
            b.read(ByteLen(0), &mut v).unwrap();
            (b.name().to_string(), v)
        })
        .collect()
}

type Sent =
    Result<MigrationStats, MigrateError<std::convert::Infallible, std::io::Error, std::io::Error>>;

/// The source: main stream and channels to `addr`, migrating `src`.
fn send(src: &List, vm: &Vm, addr: &str, cfg: PrecopyConfig) -> (Sent, Vec<PassReport>) {
    send_with(src, vm, &Connector::new(addr), cfg, false)
}

/// [`send`], the channels connected before the migration, or (`connecting`)
/// each on its thread while the engine sends the header.
fn send_with(
    src: &List,
    vm: &Vm,
    connector: &Connector,
    cfg: PrecopyConfig,
    connecting: bool,
) -> (Sent, Vec<PassReport>) {
    let main = connector.connect().unwrap();
    // The acknowledgement is waited for at most as long as a write.
    main.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let ledger = Ledger::new();
    let mut host = Host {
        vm,
        t0: Instant::now(),
        ledger: &ledger,
        passes: Vec::new(),
    };
    let mut out = main.writer().unwrap();
    let mut ack = main.try_clone().unwrap().reader().unwrap();
    let mut buf = vec![0u8; 64 * 4096];
    let mut migrate = |ch: &mut ChannelSender<'_>| {
        migrate_with_channels(
            src,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            &mut host,
            cfg,
            &mut buf,
            Some(ch),
        )
    };
    let sent = if connecting {
        let connect = || connector.connect().map_err(std::io::Error::other);
        with_page_channels_connecting(src, Some(&ledger), CHANNELS, &connect, |ch| migrate(ch))
    } else {
        let channels: Vec<Conn> = (0..CHANNELS)
            .map(|_| connector.connect().unwrap())
            .collect();
        with_page_channels(src, Some(&ledger), channels, |ch| migrate(ch))
    }
    .unwrap();
    main.shutdown();
    (sent, host.passes)
}

/// The destination: accepts the main stream and the channels, receives.
fn receive(
    dst: &List,
    listener: &Listener,
    kill_channel: Option<usize>,
) -> Result<ReceiveSummary, String> {
    let mut main = listener
        .accept_migration(Some(Duration::from_secs(10)))
        .unwrap();
    // Nobody tells this side the count: the source's header does.
    assert_eq!(main.page_channels(), CHANNELS, "the header announced them");
    let channels = listener
        .accept_page_channels(main.page_channels(), Duration::from_secs(10))
        .unwrap();
    if let Some(k) = kill_channel {
        // This channel dies before a byte of it is read.
        channels[k].conn.shutdown();
    }
    let ledger = Ledger::new();
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    // The reader first: it takes the header the listener put back.
    let mut input = main.reader().unwrap();
    let abort = || main.shutdown();
    let (result, chans) =
        receive_page_channels(dst, Some(&ledger), true, channels, &abort, |gate| {
            let mut shared = &ledger;
            let mut rx = Receiver::new(&mut bounce)
                .unwrap()
                .with_ledger(&mut shared)
                .with_channels(gate)
                .with_fresh_destination();
            rx.receive(dst, &mut input, |_| {})
        })
        .unwrap();
    let mut result = match (result, chans.first_error()) {
        (Err(ReceiveError::ChannelFailed), Some(e)) => Err(e.to_string()),
        (r, _) => r.map_err(|e| e.to_string()),
    };
    // The main stream's summary counts its own pages; add the channels'.
    if let Ok(summary) = &mut result {
        for channel in chans.channels.iter().flatten() {
            summary.pages += channel.pages;
            summary.zero_pages += channel.zero_pages;
        }
    }
    let _ = send_ack(
        &mut IoStream(main.try_clone().unwrap()),
        &result
            .clone()
            .map_err(|_| ReceiveError::<(), ()>::ChannelFailed),
    );
    result
}

#[test]
fn four_channels_carry_a_changing_guest_byte_for_byte() {
    // Channels connected first, and each connecting on its own thread.
    for connecting in [false, true] {
        four_channels_carry(connecting);
    }
}

fn four_channels_carry(connecting: bool) {
    let (src, dst) = lists();
    let listener = Listener::bind("127.0.0.1:0")
        .unwrap()
        .with_log(|p| eprintln!("refused: {}: {}", p.peer, p.refusal));
    let addr = listener.local_addr().unwrap().to_string();
    let vm = Vm::default();
    let stop = AtomicBool::new(false);
    let cfg = PrecopyConfig {
        downtime_limit_ns: 0,
        max_passes: 5,
        ..PrecopyConfig::default()
    };
    let (sent, passes, at_switch, received) = std::thread::scope(|s| {
        s.spawn(|| writer(&src, &vm, &stop));
        let rx = s.spawn(|| receive(&dst, &listener, None));
        let (sent, passes) = send_with(&src, &vm, &Connector::new(&addr), cfg, connecting);
        // The guest is paused: this is the switch-over state.
        let at_switch = contents(&src);
        stop.store(true, Ordering::SeqCst);
        (sent, passes, at_switch, rx.join().unwrap())
    });
    let stats =
        sent.unwrap_or_else(|e| panic!("the migration failed: {e}; destination: {received:?}"));
    let received = received.expect("the destination verified every block");
    assert!(
        contents(&dst) == at_switch,
        "destination equals the source at switch-over"
    );
    assert_eq!(passes.len(), 6, "5 live passes and the final one");
    assert!(
        passes[1..5].iter().any(|p| p.pages_sent > 0),
        "later passes sent pages again over the channels: {passes:?}"
    );
    assert_eq!(passes[0].pages_sent + passes[0].zero_pages, 8192 + 1024);
    assert_eq!(received.pages, stats.pages, "every data page counted once");
    assert_eq!(received.zero_pages, stats.zero_pages);
    assert_eq!(vm.resumed.load(Ordering::SeqCst), 0);
}

#[test]
fn a_dead_channel_fails_the_migration_and_the_guest_runs_on() {
    let (src, dst) = lists();
    let listener = Listener::bind("127.0.0.1:0")
        .unwrap()
        .with_log(|p| eprintln!("refused: {}: {}", p.peer, p.refusal));
    let addr = listener.local_addr().unwrap().to_string();
    let vm = Vm::default();
    let stop = AtomicBool::new(false);
    let (sent, received) = std::thread::scope(|s| {
        s.spawn(|| writer(&src, &vm, &stop));
        let rx = s.spawn(|| receive(&dst, &listener, Some(2)));
        let (sent, _) = send(&src, &vm, &addr, PrecopyConfig::default());
        stop.store(true, Ordering::SeqCst);
        (sent, rx.join().unwrap())
    });
    let error = sent.expect_err("a migration with a dead channel fails");
    assert!(
        matches!(
            error,
            MigrateError::Channel(_)
                | MigrateError::Write(_)
                | MigrateError::Ack(_)
                | MigrateError::Refused(_)
        ),
        "{error}"
    );
    assert!(received.is_err(), "the destination refused: {received:?}");
    assert!(
        !vm.paused.load(Ordering::SeqCst),
        "the source guest runs on ({error})"
    );
}

#[test]
fn a_destination_that_stops_reading_fails_the_migration_within_the_write_timeout() {
    // 96 MiB of pages that all carry data: more than the five connections'
    // socket buffers on both ends hold, so the sending threads block.
    let src = List::new();
    add(&src, "pc.ram", 24576);
    {
        let view = src.read();
        let block = view.by_name("pc.ram").unwrap();
        for page in 0..block.used_pages() as u64 {
            let bytes = [(page % 251) as u8 + 1; 64];
            block.write(ByteLen(page * PAGE), &bytes).unwrap();
        }
    }
    // A destination that accepts every connection and then reads nothing.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap().to_string();
    let held = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until && held.len() < 1 + CHANNELS as usize {
            match silent.accept() {
                Ok((conn, _)) => held.push(conn),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
        held
    });
    let timeout = Duration::from_millis(500);
    let connector = Connector::new(&addr).write_timeout(Some(timeout));
    let vm = Vm::default();
    let started = Instant::now();
    let (sent, _) = send_with(&src, &vm, &connector, PrecopyConfig::default(), false);
    let took = started.elapsed();
    let error = sent.expect_err("a destination that reads nothing cannot take a migration");
    let stalled = match &error {
        MigrateError::Channel(f) => f.what == ChannelFailureKind::Stalled,
        MigrateError::Write(e) => e.kind() == std::io::ErrorKind::TimedOut,
        _ => false,
    };
    assert!(stalled, "the write timeout said so: {error}");
    // Whatever was written before the socket filled, the migration ends
    // within a bounded time, not when the peer goes away.
    assert!(took < Duration::from_secs(30), "failed after {took:?}");
    assert!(
        !vm.paused.load(Ordering::SeqCst),
        "the source guest runs on"
    );
    assert_eq!(held.join().unwrap().len(), 1 + CHANNELS as usize);
}

/// A channel's records, read from memory against a published table.
fn receive_bytes(dst: &List, bytes: &[u8]) -> Result<(), String> {
    let gate = Gate::new(1);
    gate.publish_table(&[
        BlockName::new("pc.ram").unwrap(),
        BlockName::new("vram").unwrap(),
    ]);
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut r = SliceReader::new(bytes);
    receive_channel(dst, &mut r, &gate, None, false, &mut bounce)
        .map(|_| ())
        .map_err(|e| format!("{e:?}"))
}

fn record(r: Record) -> Vec<u8> {
    let mut v = Vec::new();
    r.write(&mut v).unwrap();
    v
}

#[test]
fn malformed_channels_are_typed_errors() {
    let (_, dst) = lists();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            record(Record::Sync {
                pass: 0,
                remaining: 0,
            }),
            "OutOfPlace",
        ),
        (record(Record::End { count: 2 }), "OutOfPlace"),
        (
            record(Record::Barrier {
                generation: 0,
                channels: 3,
            }),
            "ChannelCountMismatch",
        ),
        (
            record(Record::Barrier {
                generation: 1,
                channels: 1,
            }),
            "BarrierOutOfOrder",
        ),
        (
            record(Record::Zero {
                block: 2,
                first: 0,
                count: 1,
            }),
            "BadBlockIndex",
        ),
        (
            record(Record::Zero {
                block: 1,
                first: 1020,
                count: 8,
            }),
            "PastUsedLength",
        ),
        (
            record(Record::Zero {
                block: 0,
                first: 0,
                count: 65,
            }),
            "BadRunLength",
        ),
        (
            record(Record::Zero {
                block: 0,
                first: u64::MAX,
                count: 2,
            }),
            "LengthOverflow",
        ),
        (
            record(Record::Pages {
                block: 0,
                first: 0,
                count: 2,
            })[..10]
                .to_vec(),
            "Truncated",
        ),
        (
            [
                record(Record::Pages {
                    block: 0,
                    first: 0,
                    count: 2,
                }),
                vec![7; 4096],
            ]
            .concat(),
            "Truncated",
        ),
        (vec![0xEE], "UnknownRecord"),
    ];
    for (bytes, want) in cases {
        let before = contents(&dst);
        let got = receive_bytes(&dst, &bytes).expect_err(want);
        assert!(got.starts_with(want), "{want}: got {got}");
        assert!(contents(&dst) == before, "{want}: nothing written");
    }
    // A clean end at a record boundary, after good records, is no error,
    // and the good records were written.
    let good = [
        record(Record::Pages {
            block: 1,
            first: 5,
            count: 1,
        }),
        vec![0x5A; 4096],
    ]
    .concat();
    receive_bytes(&dst, &good).unwrap();
    let mut page = vec![0u8; 4096];
    dst.read()
        .by_name("vram")
        .unwrap()
        .read(ByteLen(5 * PAGE), &mut page)
        .unwrap();
    assert!(page.iter().all(|&b| b == 0x5A));
}

#[test]
fn a_destination_without_channels_refuses_a_barrier() {
    let (_, dst) = lists();
    let mut stream = Vec::new();
    stream_start(&mut stream, 0);
    stream.extend(record(Record::Barrier {
        generation: 0,
        channels: 2,
    }));
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut rx = Receiver::new(&mut bounce).unwrap();
    let got = rx.receive(&dst, &mut SliceReader::new(&stream), |_| {});
    assert!(
        matches!(
            got,
            Err(ReceiveError::ChannelCountMismatch {
                source: 2,
                destination: 0
            })
        ),
        "{got:?}"
    );
}

#[test]
fn the_listener_admits_only_well_formed_channels_in_order() {
    use ramblock_core::stream::format::ChannelHello;
    use std::io::Write;
    use std::sync::Mutex;
    let refused = std::sync::Arc::new(Mutex::new(Vec::new()));
    let log = refused.clone();
    let listener = Listener::bind("127.0.0.1:0")
        .unwrap()
        .with_log(move |p| log.lock().unwrap().push(p.refusal.to_string()));
    let addr = listener.local_addr().unwrap();
    let hello = |index: u32, count: u32| {
        let mut v = Vec::new();
        ChannelHello { index, count }.write(&mut v).unwrap();
        v
    };
    let peers: Vec<Vec<u8>> = vec![
        hello(1, 3),                              // another channel count
        b"RAMBLOCK header, not a hello".to_vec(), // a stream header, not a hello
        hello(1, 2),
        hello(1, 2), // index 1 again
        [hello(0, 2), b"tail".to_vec()].concat(),
    ];
    let mut held = Vec::new();
    for bytes in &peers {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(bytes).unwrap();
        held.push(s);
    }
    let mut channels = listener
        .accept_page_channels(2, Duration::from_secs(10))
        .unwrap();
    assert_eq!(channels.len(), 2);
    // Channel 0 is the one whose hello said 0: its reader goes on after it.
    let mut tail = [0u8; 4];
    ramblock_core::stream::io::ByteRead::read_exact(&mut channels[0].reader, &mut tail).unwrap();
    assert_eq!(&tail, b"tail");
    let refused = refused.lock().unwrap();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused[0].contains("channel count"), "{refused:?}");
    assert!(
        refused.iter().any(|r| r.contains("already taken")),
        "{refused:?}"
    );
}

/// The header (announcing `channels` page channels) and table of a stream
/// for the destination of [`lists`].
fn stream_start(stream: &mut Vec<u8>, channels: u8) {
    Header::new(2)
        .with_channels(channels)
        .write(stream)
        .unwrap();
    for (name, pages) in [("pc.ram", 8192u64), ("vram", 1024)] {
        TableEntry {
            used_length: pages * PAGE,
            page_size: PAGE,
            flags: BlockFlags::MIGRATABLE.bits(),
        }
        .write(name, stream)
        .unwrap();
    }
}

#[test]
fn a_header_announcing_another_channel_count_is_refused_before_the_table() {
    let (_, dst) = lists();
    // (announced, the destination's gate): every pair that differs.
    for (announced, gate) in [(3u8, Some(2u32)), (2, None), (0, Some(2)), (1, Some(0))] {
        let mut stream = Vec::new();
        stream_start(&mut stream, announced);
        let gate = gate.map(Gate::new);
        let mut bounce = vec![0u8; BOUNCE_BYTES];
        let mut rx = Receiver::new(&mut bounce).unwrap();
        if let Some(gate) = &gate {
            rx = rx.with_channels(gate);
        }
        let mut r = SliceReader::new(&stream);
        let got = rx.receive(&dst, &mut r, |_| {});
        let want = (
            u32::from(announced),
            gate.as_ref().map_or(0, |g| g.channels()),
        );
        assert!(
            matches!(
                got,
                Err(ReceiveError::ChannelCountMismatch { source, destination })
                    if (source, destination) == want
            ),
            "{want:?}: {got:?}"
        );
        assert_eq!(got.unwrap_err().code(), 38);
        // Refused at the header: the table was not read.
        assert_eq!(r.remaining(), stream.len() - 16, "{want:?}");
    }
    // The same count on both sides passes the header (and the stream,
    // with nothing sent on the channels, ends at its End record).
    let mut stream = Vec::new();
    stream_start(&mut stream, 2);
    let gate = Gate::new(2);
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut rx = Receiver::new(&mut bounce).unwrap().with_channels(&gate);
    let got = rx.receive(&dst, &mut SliceReader::new(&stream), |_| {});
    assert!(matches!(got, Err(ReceiveError::Truncated)), "{got:?}");
}

#[test]
fn more_channels_than_the_maximum_are_refused_on_both_sides() {
    use std::io::Write;
    use std::sync::{Arc, Mutex};
    // The listener drops a source announcing too many, and takes the next.
    let refused = Arc::new(Mutex::new(Vec::new()));
    let log = refused.clone();
    let listener = Listener::bind("127.0.0.1:0")
        .unwrap()
        .with_log(move |p| log.lock().unwrap().push(p.refusal.to_string()));
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    for announced in [MAX_PAGE_CHANNELS as u8 + 1, u8::MAX, 2] {
        let mut header = Vec::new();
        Header::new(2)
            .with_channels(announced)
            .write(&mut header)
            .unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(&header).unwrap();
        held.push(s);
    }
    let main = listener
        .accept_migration(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(main.page_channels(), 2);
    let refused = refused.lock().unwrap().clone();
    assert_eq!(refused.len(), 2, "{refused:?}");
    assert!(
        refused[0].contains("announced 65 page channels, more than the 64"),
        "{refused:?}"
    );
    // Asking the listener for too many is an error, not a wait.
    let got = listener.accept_page_channels(MAX_PAGE_CHANNELS + 1, Duration::from_secs(10));
    assert!(
        matches!(
            got,
            Err(TransportError::TooManyChannels { count: 65, max: 64 })
        ),
        "{got:?}"
    );
    // A source asked to open too many sends nothing.
    let (src, _) = lists();
    let vm = Vm::default();
    let ledger = Ledger::new();
    let mut host = Host {
        vm: &vm,
        t0: Instant::now(),
        ledger: &ledger,
        passes: Vec::new(),
    };
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 4096];
    let mut too_many = Many(MAX_PAGE_CHANNELS + 1);
    let got = migrate_with_channels(
        &src,
        &mut SoftwareOnly,
        &mut out,
        &mut SliceReader::new(&[]),
        &mut host,
        PrecopyConfig::default(),
        &mut buf,
        Some(&mut too_many),
    );
    assert!(
        matches!(
            got,
            Err(MigrateError::TooManyChannels { count: 65, max: 64 })
        ),
        "{got:?}"
    );
    assert!(out.is_empty(), "nothing was sent");
    assert_eq!(vm.resumed.load(Ordering::SeqCst), 0, "never paused");
}

/// Page channels that only count.
struct Many(u32);

impl ramblock_core::migrate::channels::PageChannels for Many {
    fn count(&self) -> u32 {
        self.0
    }
    fn send(
        &mut self,
        _: u32,
        _: &BlockName,
        _: u64,
        _: u32,
    ) -> Result<(), ramblock_core::migrate::channels::ChannelFailure> {
        unreachable!("refused before any run")
    }
    fn barrier(
        &mut self,
        _: u32,
    ) -> Result<
        ramblock_core::migrate::channels::RunCounts,
        ramblock_core::migrate::channels::ChannelFailure,
    > {
        unreachable!("refused before any barrier")
    }
}

/// A source without page channels to a destination that insists on some
/// (its gate's count) is refused at the header; the source's next write
/// fails, and it reports the destination's refusal (code 38) rather than
/// its broken connection, and its guest runs on.
#[test]
fn a_source_refused_at_its_header_reports_the_destinations_code() {
    let (src, dst) = lists();
    let listener = Listener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let vm = Vm::default();
    let stop = AtomicBool::new(false);
    let (sent, received) = std::thread::scope(|s| {
        s.spawn(|| writer(&src, &vm, &stop));
        let rx = s.spawn(move || {
            let mut main = listener
                .accept_migration(Some(Duration::from_secs(10)))
                .unwrap();
            let announced = main.page_channels();
            let gate = Gate::new(2);
            let mut bounce = vec![0u8; BOUNCE_BYTES];
            let mut rx = Receiver::new(&mut bounce).unwrap().with_channels(&gate);
            let got = rx.receive(&dst, &mut main.reader().unwrap(), |_| {});
            let _ = send_ack(&mut IoStream(main.try_clone().unwrap()), &got);
            main.shutdown();
            (announced, got.map_err(|e| e.code()))
        });
        let main = Connector::new(addr.as_str()).connect().unwrap();
        let ledger = Ledger::new();
        let mut host = Host {
            vm: &vm,
            t0: Instant::now(),
            ledger: &ledger,
            passes: Vec::new(),
        };
        let mut out = main.writer().unwrap();
        let mut ack = main.try_clone().unwrap().reader().unwrap();
        let mut buf = vec![0u8; 64 * 4096];
        let sent = migrate_with_channels(
            &src,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            &mut host,
            PrecopyConfig::default(),
            &mut buf,
            None,
        );
        stop.store(true, Ordering::SeqCst);
        (sent, rx.join().unwrap())
    });
    assert_eq!(received, (0, Err(38)));
    let error = sent.expect_err("refused");
    assert!(matches!(error, MigrateError::Refused(38)), "{error}");
    assert_eq!(vm.resumed.load(Ordering::SeqCst), 0, "never paused");
    assert!(
        !vm.paused.load(Ordering::SeqCst),
        "the source guest runs on"
    );
}

/// Bytes waiting in `fd`'s receive queue (`FIONREAD`): what the peer sent
/// that nobody read yet.
fn waiting_to_be_read(fd: &std::net::TcpStream) -> u64 {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int to a live local.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD");
    n.max(0) as u64
}

fn small_buffer(fd: &std::net::TcpStream, option: libc::c_int) {
    use std::os::fd::AsRawFd;
    let bytes: libc::c_int = 16 << 10;
    // SAFETY: setsockopt reads one c_int from a live local.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0, "setsockopt");
}

#[test]
fn the_channels_count_the_bytes_they_hold_back() {
    use ramblock_core::migrate::channels::PageChannels;
    use std::io::Read;
    // One channel to a peer that does not read yet, with small socket
    // buffers: the channel's thread blocks inside its first run of 64
    // pages and the other eight stay queued. What the channels say they
    // hold back, plus what waits unread at the peer, is what was handed to
    // them, less what the blocked thread has not written yet; once the peer
    // reads everything, nothing is held back.
    let list = List::new();
    add(&list, "pc.ram", 1024);
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    block
        .region()
        .fill(ByteLen::ZERO, 1024 * PAGE as usize, 0x5a)
        .unwrap();
    drop(view);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    small_buffer(&client, libc::SO_SNDBUF);
    let (peer, _) = listener.accept().unwrap();
    small_buffer(&peer, libc::SO_RCVBUF);
    let name = BlockName::new("pc.ram").unwrap();
    let (runs, run_pages) = (9u64, 64u32);
    let run_bytes = Record::Pages {
        block: 0,
        first: 0,
        count: run_pages,
    }
    .wire_len() as u64
        + u64::from(run_pages) * PAGE;
    let barrier_bytes = Record::Barrier {
        generation: 0,
        channels: 1,
    }
    .wire_len() as u64;
    let handed = ramblock_core::stream::format::ChannelHello::LEN as u64 + runs * run_bytes;
    // The peer reads only when told: until then nothing is read.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let mut peer_reader = peer.try_clone().unwrap();
    let read_all = std::thread::spawn(move || {
        let _ = wait.recv();
        let mut all = Vec::new();
        peer_reader.read_to_end(&mut all).map(|_| all.len() as u64)
    });
    let ledger = Ledger::new();
    let got = with_page_channels(&list, Some(&ledger), vec![Conn::plain(client)], |ch| {
        for k in 0..runs {
            ch.send(0, &name, k * u64::from(run_pages), run_pages)
                .unwrap();
        }
        // Settled: the blocked thread writes nothing more.
        let mut last = (u64::MAX, u64::MAX);
        let deadline = Instant::now() + Duration::from_secs(10);
        let held = loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = (ch.unsent_bytes(), waiting_to_be_read(&peer));
            if now == last || Instant::now() > deadline {
                break now;
            }
            last = now;
        };
        go.send(()).unwrap();
        // The peer reads everything: after the barrier every byte went out,
        // and once the peer has it all nothing is held back.
        ch.barrier(0).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ch.unsent_bytes() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        (held, ch.unsent_bytes())
    })
    .unwrap();
    // Checked here, not inside: a failed check there would leave the
    // channel's thread blocked on a peer that never reads.
    let (held, after) = got;
    let (unsent, unread) = held;
    assert!(
        unsent >= (runs - 1) * u64::from(run_pages) * PAGE,
        "the eight queued runs are held back: {unsent}"
    );
    assert!(
        unsent + unread <= handed,
        "nothing counted twice: {unsent} + {unread} > {handed}"
    );
    assert!(
        unsent + unread + run_bytes >= handed,
        "only the blocked run's unwritten part is missing: {unsent} + {unread} of {handed}"
    );
    assert_eq!(after, 0, "bytes still held back after the peer read all");
    assert_eq!(read_all.join().unwrap().unwrap(), handed + barrier_bytes);
}
