//! The migration stream end to end without an OS-specific backend: a writer
//! thread keeps dirtying the source (through the block API, as device
//! emulation does) while the pre-copy engine sends to a receiver over a
//! socket pair. Plus the faults: a dropped connection, a refused stream, and
//! blocks appearing mid-migration leave the source guest running.
mod common;
use common::add_buffer_block;

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{send_ack, ReceiveError, Receiver, BOUNCE_BYTES};
use ramblock_core::migrate::{
    migrate, MigrateError, MigrationHost, MigrationStats, PassReport, PrecopyConfig,
};
use ramblock_core::name::BlockName;
use ramblock_core::stream::io::IoStream;
use std::convert::Infallible;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Mem;
type List = RamList<'static, Mem, Owned, 8>;
const PAGE: u64 = 4096;

fn add(list: &List, name: &str, pages: u64, max_pages: u64) {
    let mut spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE));
    if max_pages != pages {
        spec = spec.resizable(ByteLen(max_pages * PAGE));
    }
    add_buffer_block(list, spec, 0);
}

/// The "VM": a flag the writer honours, and what the engine asked of it.
#[derive(Default)]
struct Vm {
    paused: AtomicBool,
    paused_ack: AtomicBool,
    resumed: AtomicU32,
    throttle: AtomicU8,
}

struct Host<'a> {
    vm: Arc<Vm>,
    t0: Instant,
    passes: Vec<PassReport>,
    /// Runs after each pass (a hot-plug, a resize).
    hook: Option<Box<dyn FnMut(u32) + 'a>>,
}

impl Host<'_> {
    fn new(vm: &Arc<Vm>) -> Self {
        Host {
            vm: vm.clone(),
            t0: Instant::now(),
            passes: vec![],
            hook: None,
        }
    }
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
    fn set_throttle(&mut self, percent: u8) {
        self.vm.throttle.store(percent, Ordering::SeqCst);
    }
    fn pass_done(&mut self, r: &PassReport) {
        self.passes.push(*r);
        if let Some(hook) = &mut self.hook {
            hook(r.pass);
        }
    }
}

/// Writes an incrementing byte into pages of every block until paused (or
/// `stop`), like the guest workload.
fn writer(list: &List, vm: &Vm, stop: &AtomicBool) {
    let mut round = 0u64;
    while !stop.load(Ordering::SeqCst) {
        if vm.paused.load(Ordering::SeqCst) {
            vm.paused_ack.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        vm.paused_ack.store(false, Ordering::SeqCst);
        {
            let view = list.read();
            for block in view.iter() {
                // Dirty a moving window of pages in the lower half of the
                // block only: the upper half stays zero however long the
                // writer runs before pass 0 reads it.
                let pages = (block.used_pages() as u64 / 2).max(1);
                for k in 0..16 {
                    let page = (round * 7 + k * 13) % pages;
                    let byte = [(round % 251) as u8 + 1];
                    block
                        .write(ByteLen(page * PAGE + (k % 4096)), &byte)
                        .unwrap();
                }
            }
        }
        round += 1;
        std::thread::sleep(Duration::from_micros(100));
    }
}

fn snapshot(list: &List) -> Vec<(String, Vec<u8>)> {
    let view = list.read();
    view.iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length().0 as usize];
            b.read(ByteLen(0), &mut v).unwrap();
            (b.name().to_string(), v)
        })
        .collect()
}

/// Runs the sender over `sock` (buffered, as a real sender would be), with
/// the acknowledgement read from the same socket.
fn send(
    src: &List,
    sock: &UnixStream,
    host: &mut Host<'_>,
    cfg: PrecopyConfig,
) -> Result<MigrationStats, MigrateError<Infallible, std::io::Error, std::io::Error>> {
    let mut out = IoStream(std::io::BufWriter::new(sock.try_clone().unwrap()));
    let mut ack = IoStream(sock.try_clone().unwrap());
    let mut buf = vec![0u8; 64 * 4096];
    migrate(
        src,
        &mut SoftwareOnly,
        &mut out,
        &mut ack,
        host,
        cfg,
        &mut buf,
    )
}

fn receive_into(
    dest: &List,
    sock: UnixStream,
) -> Result<ramblock_core::migrate::receiver::ReceiveSummary, String> {
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut rx = Receiver::new(&mut bounce).unwrap();
    let mut reader = IoStream(std::io::BufReader::new(sock.try_clone().unwrap()));
    let result = rx.receive(dest, &mut reader, |_| {});
    let _ = send_ack(&mut IoStream(&sock), &result);
    result.map_err(|e| e.to_string())
}

#[test]
fn a_running_writer_is_migrated_byte_for_byte_including_a_resize() {
    let src: List = RamList::new();
    add(&src, "pc.ram", 1024, 1024);
    add(&src, "vram", 64, 256);
    let dst: List = RamList::new();
    add(&dst, "pc.ram", 1024, 1024);
    add(&dst, "vram", 64, 256);
    let vm = Arc::new(Vm::default());
    let stop = AtomicBool::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let (stats, passes, received) = std::thread::scope(|s| {
        s.spawn(|| writer(&src, &vm, &stop));
        let rx = s.spawn(|| receive_into(&dst, b));
        // Let the writer get going so pass 0 races with it.
        std::thread::sleep(Duration::from_millis(30));
        let mut host = Host::new(&vm);
        // Grow "vram" after pass 1, so the resize happens mid-migration.
        // Passes 0-2 also dirty a few pages themselves, so each of the live
        // passes 1-3 has work: on a loaded machine the writer thread may not
        // run at all during a short pass, and an empty dirty set rightly
        // switches over early.
        host.hook = Some(Box::new(|pass| {
            if pass == 1 {
                src.resize("vram", ByteLen(192 * PAGE)).unwrap();
            }
            if pass > 2 {
                return;
            }
            let view = src.read();
            let ram = view.by_name("pc.ram").unwrap();
            for k in 0..8u64 {
                let page = 512 + u64::from(pass) * 8 + k;
                ram.write(ByteLen(page * PAGE + 8), &[pass as u8 + 0x40])
                    .unwrap();
            }
        }));
        // Never converge early: run all passes, then switch over.
        let cfg = PrecopyConfig {
            downtime_limit_ns: 0,
            max_passes: 4,
            ..PrecopyConfig::default()
        };
        // Keep passes going long enough for the resize to happen mid-migration.
        let stats = send(&src, &a, &mut host, cfg).unwrap();
        let snap = snapshot(&src); // the guest is paused: this is the switch-over state
        stop.store(true, Ordering::SeqCst);
        let received = rx.join().unwrap().unwrap();
        ((stats, snap), host.passes, received)
    });
    let (stats, at_switch) = stats;
    assert_eq!(
        snapshot(&dst),
        at_switch,
        "destination equals the source at switch-over"
    );
    assert_eq!(
        passes.len(),
        5,
        "4 live passes and the final one: {passes:?}"
    );
    assert_eq!(
        dst.read().by_name("vram").unwrap().used_length(),
        ByteLen(192 * PAGE),
        "the resize reached the destination"
    );
    assert!(
        passes[1..4].iter().all(|p| p.pages_sent > 0),
        "the writer kept dirtying pages: {passes:?}"
    );
    assert_eq!(
        passes[0].pages_sent + passes[0].zero_pages,
        1024 + 64,
        "pass 0 sends every page"
    );
    assert!(
        stats.zero_pages > 0 && stats.bytes < (stats.pages + 1100) * PAGE,
        "zero pages travel as counts: {stats:?}"
    );
    assert_eq!(received.pages, stats.pages);
    assert_eq!(received.zero_pages, stats.zero_pages);
    assert_eq!(
        vm.resumed.load(Ordering::SeqCst),
        0,
        "a good migration leaves the source paused"
    );
}

#[test]
fn a_dropped_connection_stops_the_migration_and_the_guest_runs_on() {
    let src: List = RamList::new();
    add(&src, "pc.ram", 512, 512);
    let vm = Arc::new(Vm::default());
    let stop = AtomicBool::new(false);
    let (a, b) = UnixStream::pair().unwrap();
    let err = std::thread::scope(|s| {
        s.spawn(|| writer(&src, &vm, &stop));
        // The "destination" reads less than the header and table, then hangs
        // up: the stream is always longer than that, however little the
        // writer got to dirty.
        s.spawn(move || {
            let mut buf = vec![0u8; 32];
            let _ = std::io::Read::read_exact(&mut &b, &mut buf);
            drop(b);
        });
        let mut host = Host::new(&vm);
        let cfg = PrecopyConfig {
            auto_converge: true,
            ..PrecopyConfig::default()
        };
        let err = send(&src, &a, &mut host, cfg).unwrap_err();
        stop.store(true, Ordering::SeqCst);
        err
    });
    assert!(
        matches!(err, MigrateError::Write(_) | MigrateError::Ack(_)),
        "{err}"
    );
    assert!(!vm.paused.load(Ordering::SeqCst), "the source guest runs");
    assert_eq!(
        vm.throttle.load(Ordering::SeqCst),
        0,
        "and is not throttled"
    );
}

/// A destination that receives everything but answers "OK" with a
/// non-zero code has not said it succeeded: the source fails and resumes.
#[test]
fn an_ok_answer_with_a_code_is_no_success() {
    let src: List = RamList::new();
    add(&src, "pc.ram", 64, 64);
    let dst: List = RamList::new();
    add(&dst, "pc.ram", 64, 64);
    let vm = Arc::new(Vm::default());
    let (a, b) = UnixStream::pair().unwrap();
    vm.paused_ack.store(true, Ordering::SeqCst); // no writer thread here
    let err = std::thread::scope(|s| {
        s.spawn(|| {
            let mut bounce = vec![0u8; BOUNCE_BYTES];
            let mut rx = Receiver::new(&mut bounce).unwrap();
            let mut reader = IoStream(std::io::BufReader::new(b.try_clone().unwrap()));
            rx.receive(&dst, &mut reader, |_| {}).unwrap();
            std::io::Write::write_all(&mut &b, b"RBOK\x01\0\0\0").unwrap();
        });
        let mut host = Host::new(&vm);
        send(&src, &a, &mut host, PrecopyConfig::default()).unwrap_err()
    });
    assert!(matches!(err, MigrateError::BadAck), "{err}");
    assert!(!vm.paused.load(Ordering::SeqCst), "the source guest runs");
}

#[test]
fn a_destination_with_a_smaller_block_refuses_and_the_source_resumes() {
    let src: List = RamList::new();
    add(&src, "pc.ram", 512, 512);
    let dst: List = RamList::new();
    add(&dst, "pc.ram", 256, 256);
    let vm = Arc::new(Vm::default());
    let (a, b) = UnixStream::pair().unwrap();
    vm.paused_ack.store(true, Ordering::SeqCst); // no writer thread here
    let (err, rx) = std::thread::scope(|s| {
        let rx = s.spawn(|| receive_into(&dst, b));
        let mut host = Host::new(&vm);
        let err = send(&src, &a, &mut host, PrecopyConfig::default()).unwrap_err();
        (err, rx.join().unwrap())
    });
    let rx = rx.unwrap_err();
    assert!(
        rx.contains("\"pc.ram\": 0x200000 bytes on the source, the destination has 0x100000"),
        "{rx}"
    );
    // The receiver hung up after refusing: the source saw a write error or the refusal.
    assert!(
        matches!(
            err,
            MigrateError::Write(_) | MigrateError::Refused(10) | MigrateError::Ack(_)
        ),
        "{err}"
    );
    assert!(!vm.paused.load(Ordering::SeqCst));
}

#[test]
fn a_block_added_mid_migration_fails_it_cleanly() {
    let src: List = RamList::new();
    add(&src, "pc.ram", 512, 512);
    let dst: List = RamList::new();
    add(&dst, "pc.ram", 512, 512);
    let vm = Arc::new(Vm::default());
    let (a, b) = UnixStream::pair().unwrap();
    let err = std::thread::scope(|s| {
        s.spawn(|| receive_into(&dst, b));
        let mut host = Host::new(&vm);
        vm.paused_ack.store(true, Ordering::SeqCst); // no writer thread here
        host.hook = Some(Box::new(|pass| {
            if pass == 0 {
                add(&src, "hotplug", 4, 4);
                // Keep the engine from switching over at once.
                src.mark_dirty(
                    ramblock_core::addr::RamAddr(0),
                    ByteLen(512 * PAGE),
                    ramblock_core::dirty_log::DirtyClients::MIGRATION,
                )
                .unwrap();
            }
        }));
        let cfg = PrecopyConfig {
            downtime_limit_ns: 0,
            max_passes: 5,
            ..PrecopyConfig::default()
        };
        let err = send(&src, &a, &mut host, cfg).unwrap_err();
        a.shutdown(std::net::Shutdown::Both).unwrap();
        err
    });
    assert_eq!(
        err.to_string(),
        "block \"hotplug\" was added during the migration"
    );
    assert!(!vm.paused.load(Ordering::SeqCst));
    let _ = BlockFlags::MIGRATABLE;
    let _: Option<ReceiveError<(), ()>> = None;
}
