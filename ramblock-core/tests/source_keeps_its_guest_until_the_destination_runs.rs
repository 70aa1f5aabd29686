//! The pre-copy handover: after the destination verified the RAM, the
//! source waits for its word that the guest runs there, and only then
//! succeeds. A refusal, garbage, a closed return path or silence (bounded
//! by the host's timeout) fails the migration with its own error, and the
//! source guest resumes where it was. The destination is the real
//! receiver; what its VMM answers after the acknowledgement is the model.
mod common;
use common::{add_buffer_block, Mem};

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{acknowledge, Receiver, SectionSink, BOUNCE_BYTES};
use ramblock_core::migrate::{migrate, MigrateError, MigrationHost, MigrationStats, PrecopyConfig};
use ramblock_core::name::BlockName;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::stream::format::DEFAULT_DEVICE_STATE_LIMIT;
use ramblock_core::stream::io::{IoStream, ReadError};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

type List = RamList<'static, Mem, Owned, 4>;
const PAGE: u64 = 4096;

fn list(pages: u64, fill: u8) -> List {
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(pages * PAGE));
    add_buffer_block(&list, spec, fill);
    list
}

/// What the destination's VMM does after the acknowledgement.
#[derive(Copy, Clone, Debug, PartialEq)]
enum Vmm {
    /// Starts its vCPUs (takes `START`), then confirms.
    Confirm,
    /// Cannot start them: refuses with code 5.
    Refuse,
    /// Answers bytes that are no handover.
    Garbage,
    /// Answers "running" with a non-zero code (no success).
    RunningWithCode,
    /// Closes the connection without a word.
    Close,
    /// Says nothing (until the source gives up).
    Silent,
}

/// How long the model VMM takes to start its vCPUs.
const START: Duration = Duration::from_millis(50);
/// The source's bound on the wait for the handover.
const WAIT: Duration = Duration::from_millis(200);

/// A source host with a `cpu` section, a count of pauses and resumes, and
/// its own end of the return path to put the handover timeout on.
struct Host {
    t0: Instant,
    cpu: SectionHeader,
    paused: bool,
    resumed: u32,
    ret: UnixStream,
    waits: u32,
}

impl MigrationHost for Host {
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
    fn sleep_ns(&mut self, _: u64) {}
    fn pause_guest(&mut self) {
        self.paused = true;
    }
    fn resume_guest(&mut self) {
        self.paused = false;
        self.resumed += 1;
    }
    fn set_throttle(&mut self, _: u8) {}
    fn device_section(&mut self, index: usize) -> Option<(SectionHeader, &[u8])> {
        (index == 0).then(|| (self.cpu.clone(), &b"registers"[..]))
    }
    fn handover_wait_ns(&mut self) -> u64 {
        self.waits += 1;
        self.ret.set_read_timeout(Some(WAIT)).unwrap();
        WAIT.as_nanos() as u64
    }
}

/// Keeps sections (the VMM "loads" the cpu at its start).
#[derive(Default)]
struct Sink(Vec<String>);

impl SectionSink for Sink {
    fn load(&mut self, _: &SectionHeader, _: u64, _: &[u8]) -> Result<(), u32> {
        Ok(())
    }
    fn done(&mut self, h: &SectionHeader) -> Result<(), u32> {
        self.0.push(h.name.as_str().to_string());
        Ok(())
    }
}

type Sent =
    Result<MigrationStats, MigrateError<core::convert::Infallible, std::io::Error, std::io::Error>>;

/// Migrates a 16-page block to a receiver whose VMM answers as `vmm`.
/// Returns what the source got, its host, and whether the receive and
/// its acknowledgement succeeded.
fn run(vmm: Vmm) -> (Sent, Host, bool) {
    let src = list(16, 0x5A);
    let dst = list(16, 0);
    let (a, b) = UnixStream::pair().unwrap();
    let mut host = Host {
        t0: Instant::now(),
        cpu: SectionHeader {
            name: SectionName::new("cpu").unwrap(),
            instance_id: 0,
            version: 1,
            len: 0,
        },
        paused: false,
        resumed: 0,
        ret: a.try_clone().unwrap(),
        waits: 0,
    };
    std::thread::scope(|s| {
        let dst = &dst;
        let rx = s.spawn(move || {
            let mut bounce = vec![0u8; BOUNCE_BYTES];
            let mut sink = Sink::default();
            let mut rx = Receiver::new(&mut bounce)
                .unwrap()
                .with_device_state(&mut sink, DEFAULT_DEVICE_STATE_LIMIT);
            let mut reader = IoStream(std::io::BufReader::new(b.try_clone().unwrap()));
            let result = rx.receive(dst, &mut reader, |_| {});
            let mut w = IoStream(b.try_clone().unwrap());
            let Ok(Some(handover)) = acknowledge(&mut w, &result) else {
                return false;
            };
            drop(rx);
            assert_eq!(sink.0, ["cpu"], "the device state is in before the start");
            let mut raw = b.try_clone().unwrap();
            match vmm {
                Vmm::Confirm => {
                    std::thread::sleep(START);
                    handover.confirm(&mut w).unwrap();
                }
                Vmm::Refuse => handover.refuse(&mut w, 5).unwrap(),
                Vmm::Garbage => {
                    drop(handover);
                    raw.write_all(b"RBOK\0\0\0\0").unwrap();
                }
                Vmm::RunningWithCode => {
                    drop(handover);
                    raw.write_all(b"RBRN\x01\0\0\0").unwrap();
                }
                Vmm::Close => {
                    drop(handover);
                    raw.shutdown(std::net::Shutdown::Both).unwrap();
                }
                Vmm::Silent => {
                    // Holds the handover until the source hangs up.
                    let _ = raw.read(&mut [0u8; 1]);
                    drop(handover);
                }
            }
            result.is_ok()
        });
        let mut out = IoStream(std::io::BufWriter::new(a.try_clone().unwrap()));
        let mut ack = IoStream(a.try_clone().unwrap());
        let mut buf = vec![0u8; 64 * 4096];
        let cfg = PrecopyConfig {
            downtime_limit_ns: 0,
            max_passes: 1,
            ..PrecopyConfig::default()
        };
        let sent = migrate(
            &src,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            &mut host,
            cfg,
            &mut buf,
        );
        drop((out, ack));
        a.shutdown(std::net::Shutdown::Both).unwrap();
        let received = rx.join().unwrap();
        (sent, host, received)
    })
}

#[test]
fn a_confirmed_handover_ends_the_migration_and_the_downtime() {
    let (sent, host, received) = run(Vmm::Confirm);
    assert!(received);
    let stats = sent.unwrap();
    assert_eq!(host.resumed, 0, "the guest belongs to the destination");
    assert!(host.paused);
    assert_eq!(host.waits, 1);
    // The downtime runs until the destination's vCPUs run, which took the
    // VMM at least START after the pause; the RAM part ends before.
    assert!(stats.downtime_ns >= START.as_nanos() as u64, "{stats:?}");
    assert!(stats.ram_downtime_ns <= stats.downtime_ns, "{stats:?}");
}

#[test]
fn every_failed_handover_is_its_own_error_and_the_guest_resumes() {
    for vmm in [
        Vmm::Refuse,
        Vmm::Garbage,
        Vmm::RunningWithCode,
        Vmm::Close,
        Vmm::Silent,
    ] {
        let (sent, host, received) = run(vmm);
        assert!(received, "{vmm:?}: the RAM was verified");
        let err = sent.unwrap_err();
        match (vmm, &err) {
            (Vmm::Refuse, MigrateError::NotRunning(5)) => {}
            (Vmm::Garbage | Vmm::RunningWithCode, MigrateError::BadHandover) => {}
            (
                Vmm::Close,
                MigrateError::NoHandover {
                    error: ReadError::Eof,
                    ..
                },
            ) => {}
            (
                Vmm::Silent,
                MigrateError::NoHandover {
                    error: ReadError::Io(e),
                    timeout_ns,
                    ..
                },
            ) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "{e}"
                );
                assert_eq!(*timeout_ns, WAIT.as_nanos() as u64);
            }
            _ => panic!("{vmm:?}: {err}"),
        }
        assert!(err.to_string().contains("runs on at the source"), "{err}");
        assert_eq!(host.resumed, 1, "{vmm:?}: the source guest runs on");
        assert!(!host.paused);
    }
}
