//! Device state at a pre-copy switch-over: named sections travel after the
//! final pass and before End, reach the destination VMM's sink byte for
//! byte, a refusal reaches the source as the error acknowledgement (and the
//! source guest resumes), and every malformed section is its own error.
mod common;
use common::{add_buffer_block, Mem};

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{
    send_ack, ReceiveError, ReceiveSummary, Receiver, SectionSink, BOUNCE_BYTES,
};
use ramblock_core::migrate::{migrate, MigrateError, MigrationHost, PrecopyConfig};
use ramblock_core::name::BlockName;
use ramblock_core::section::{SectionError, SectionHeader, SectionName, MAX_SECTION_LEN};
use ramblock_core::stream::format::{Header, Record, TableEntry, DEFAULT_DEVICE_STATE_LIMIT};
use ramblock_core::stream::io::{ByteWrite, IoStream, SliceReader};
use std::convert::Infallible;
use std::os::unix::net::UnixStream;
use std::time::Instant;

type List = RamList<'static, Mem, Owned, 4>;
const PAGE: u64 = 4096;

fn list(pages: u64, fill: u8) -> List {
    let list = List::new();
    let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(pages * PAGE));
    add_buffer_block(&list, spec, fill);
    list
}

fn header(name: &str, instance_id: u32, version: u32) -> SectionHeader {
    SectionHeader {
        name: SectionName::new(name).unwrap(),
        instance_id,
        version,
        len: 0,
    }
}

/// A source host with device sections and a count of resumes.
struct Host {
    t0: Instant,
    sections: Vec<(SectionHeader, Vec<u8>)>,
    limit: u64,
    paused: bool,
    resumed: u32,
}

impl Host {
    fn new(sections: Vec<(SectionHeader, Vec<u8>)>) -> Self {
        Host {
            t0: Instant::now(),
            sections,
            limit: DEFAULT_DEVICE_STATE_LIMIT,
            paused: false,
            resumed: 0,
        }
    }
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
        assert!(self.paused, "device state is read with the guest paused");
        self.sections
            .get(index)
            .map(|(h, b)| (h.clone(), b.as_slice()))
    }
    fn device_state_limit(&mut self) -> u64 {
        self.limit
    }
}

/// The destination VMM: collects sections, refusing one name if told to.
#[derive(Default)]
struct Sink {
    loaded: Vec<(SectionHeader, Vec<u8>)>,
    partial: Vec<u8>,
    refuse: Option<(&'static str, u32)>,
    refuse_in_load: bool,
}

impl SectionSink for Sink {
    fn load(&mut self, h: &SectionHeader, offset: u64, bytes: &[u8]) -> Result<(), u32> {
        assert_eq!(offset, self.partial.len() as u64, "pieces come in order");
        if self.refuse_in_load {
            if let Some((name, code)) = self.refuse.filter(|(n, _)| *n == h.name.as_str()) {
                let _ = name;
                return Err(code);
            }
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }
    fn done(&mut self, h: &SectionHeader) -> Result<(), u32> {
        let bytes = std::mem::take(&mut self.partial);
        if let Some((_, code)) = self.refuse.filter(|(n, _)| *n == h.name.as_str()) {
            return Err(code);
        }
        self.loaded.push((h.clone(), bytes));
        Ok(())
    }
}

type Rx = Result<ReceiveSummary, ReceiveError<std::io::Error, ramblock_core::buffer::BufferError>>;

/// Migrates `src` to `dst` over a socket pair with `host`'s sections.
fn run(src: &List, dst: &List, host: &mut Host, sink: &mut Sink) -> (Result<(), String>, Rx) {
    let (a, b) = UnixStream::pair().unwrap();
    std::thread::scope(|s| {
        let rx = s.spawn(|| {
            let mut bounce = vec![0u8; BOUNCE_BYTES];
            let mut rx = Receiver::new(&mut bounce)
                .unwrap()
                .with_device_state(sink, DEFAULT_DEVICE_STATE_LIMIT);
            let mut reader = IoStream(std::io::BufReader::new(b.try_clone().unwrap()));
            let result = rx.receive(dst, &mut reader, |_| {});
            let _ = send_ack(&mut IoStream(&b), &result);
            if result.is_err() {
                // As a destination does: a source still sending notices.
                let _ = b.shutdown(std::net::Shutdown::Both);
            }
            result
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
            src,
            &mut SoftwareOnly,
            &mut out,
            &mut ack,
            host,
            cfg,
            &mut buf,
        );
        drop((out, ack, a));
        (
            sent.map(|_| ()).map_err(|e| e.to_string()),
            rx.join().unwrap(),
        )
    })
}

#[test]
fn sections_reach_the_vmm_byte_for_byte_with_the_ram() {
    let src = list(16, 0x5A);
    let dst = list(16, 0);
    // Empty, larger than the receiver's bounce buffer (streamed in
    // pieces), and the vCPU's.
    let big: Vec<u8> = (0..BOUNCE_BYTES * 2 + 123)
        .map(|i| (i % 251) as u8)
        .collect();
    let sections = vec![
        (header("0000:00:01.0/empty", 0, 1), vec![]),
        (header("0000:00:02.0/vga", 3, 2), big),
        (header("cpu", 0, 4), b"registers".to_vec()),
    ];
    let mut host = Host::new(sections.clone());
    let mut sink = Sink::default();
    let (sent, rx) = run(&src, &dst, &mut host, &mut sink);
    sent.unwrap();
    assert_eq!(rx.unwrap().blocks, 1);
    let want: Vec<_> = sections
        .into_iter()
        .map(|(h, b)| {
            let len = b.len() as u64;
            (SectionHeader { len, ..h }, b)
        })
        .collect();
    assert_eq!(sink.loaded, want);
    assert_eq!(host.resumed, 0);
    let mut page = vec![0u8; PAGE as usize];
    dst.read()
        .by_name("ram")
        .unwrap()
        .read(ByteLen(15 * PAGE), &mut page)
        .unwrap();
    assert!(page.iter().all(|&b| b == 0x5A));
}

#[test]
fn a_refused_section_reaches_the_source_by_name_and_its_guest_resumes() {
    // Refused when complete, or at its first piece; a section larger than
    // the socket's buffers refused at its first piece also makes the
    // source's write fail, and the refusal must still be what it reports.
    for (in_load, cpu_len) in [(false, 10), (true, 10), (true, 8 << 20)] {
        let src = list(4, 1);
        let dst = list(4, 0);
        let mut host = Host::new(vec![
            (header("net", 0, 1), vec![1; 10]),
            (header("cpu", 0, 1), vec![2; cpu_len]),
        ]);
        let mut sink = Sink {
            refuse: Some(("cpu", 7)),
            refuse_in_load: in_load,
            ..Sink::default()
        };
        let (sent, rx) = run(&src, &dst, &mut host, &mut sink);
        let err = rx.unwrap_err();
        assert!(
            matches!(
                &err,
                ReceiveError::SectionRefused { index: 1, name, instance_id: 0, code: 7 } if name.as_str() == "cpu"
            ),
            "{err}"
        );
        assert_eq!(err.code(), 34);
        let sent = sent.unwrap_err();
        assert_eq!(
            sent,
            MigrateError::<Infallible, std::io::Error, std::io::Error>::SectionRefused {
                index: 1,
                name: SectionName::new("cpu").unwrap(),
                instance_id: 0,
                code: 7
            }
            .to_string()
        );
        assert_eq!(host.resumed, 1, "the source guest runs on");
        assert!(!host.paused);
    }
}

#[test]
fn device_state_over_the_source_limit_fails_before_it_is_sent() {
    let src = list(4, 1);
    let dst = list(4, 0);
    let mut host = Host::new(vec![(header("cpu", 0, 1), vec![2; 100])]);
    host.limit = SectionHeader::ENCODED_LEN as u64 + 99;
    let mut sink = Sink::default();
    let (sent, rx) = run(&src, &dst, &mut host, &mut sink);
    assert_eq!(
        sent.unwrap_err(),
        MigrateError::<Infallible, std::io::Error, std::io::Error>::DeviceStateTooLarge {
            total: SectionHeader::ENCODED_LEN as u64 + 100,
            limit: SectionHeader::ENCODED_LEN as u64 + 99,
        }
        .to_string()
    );
    assert!(rx.is_err());
    assert!(sink.loaded.is_empty());
    assert_eq!(host.resumed, 1);
}

/// A stream for a 4-page "ram" (all zero pages), then `tail`.
fn stream(tail: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut out = Vec::new();
    Header::new(1).write(&mut out).unwrap();
    TableEntry {
        used_length: 4 * PAGE,
        page_size: PAGE,
        flags: 0,
    }
    .write("ram", &mut out)
    .unwrap();
    Record::Zero {
        block: 0,
        first: 0,
        count: 4,
    }
    .write(&mut out)
    .unwrap();
    tail(&mut out);
    out
}

fn section(out: &mut Vec<u8>, h: &SectionHeader, body: &[u8]) {
    let mut raw = [0u8; SectionHeader::ENCODED_LEN];
    h.encode(&mut raw);
    Record::Section.write(out).unwrap();
    out.write_all(&raw).unwrap();
    out.write_all(body).unwrap();
}

fn receive(
    stream: &[u8],
    sink: Option<&mut Sink>,
    limit: u64,
) -> Result<ReceiveSummary, ReceiveError<Infallible, ramblock_core::buffer::BufferError>> {
    let dst = list(4, 0);
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut rx = Receiver::new(&mut bounce).unwrap();
    if let Some(sink) = sink {
        rx = rx.with_device_state(sink, limit);
    }
    rx.receive(&dst, &mut SliceReader::new(stream), |_| {})
}

#[test]
fn every_malformed_section_is_its_own_error() {
    let limit = DEFAULT_DEVICE_STATE_LIMIT;
    let cpu = SectionHeader {
        len: 10,
        ..header("cpu", 0, 1)
    };
    // An empty name.
    let s = stream(|o| {
        Record::Section.write(o).unwrap();
        o.write_all(&[0u8; SectionHeader::ENCODED_LEN]).unwrap();
    });
    assert_eq!(
        receive(&s, Some(&mut Sink::default()), limit),
        Err(ReceiveError::BadSection(SectionError::NameEmpty))
    );
    // A length over the section maximum.
    let s = stream(|o| {
        let mut raw = [0u8; SectionHeader::ENCODED_LEN];
        cpu.encode(&mut raw);
        raw[SectionHeader::ENCODED_LEN - 8..].copy_from_slice(&(MAX_SECTION_LEN + 1).to_le_bytes());
        Record::Section.write(o).unwrap();
        o.write_all(&raw).unwrap();
    });
    assert_eq!(
        receive(&s, Some(&mut Sink::default()), limit),
        Err(ReceiveError::BadSection(SectionError::TooLong {
            len: MAX_SECTION_LEN + 1
        }))
    );
    // Over the destination's limit (headers count), checked before any
    // byte of the body is read or loaded.
    let two = stream(|o| {
        section(o, &cpu, &[1; 10]);
        section(
            o,
            &SectionHeader {
                instance_id: 1,
                ..cpu.clone()
            },
            &[1; 10],
        );
    });
    let one = SectionHeader::ENCODED_LEN as u64 + 10;
    let mut sink = Sink::default();
    assert_eq!(
        receive(&two, Some(&mut sink), one * 2 - 1),
        Err(ReceiveError::DeviceStateOverLimit {
            total: one * 2,
            limit: one * 2 - 1
        })
    );
    assert_eq!(sink.loaded.len(), 1);
    // No sink.
    assert_eq!(
        receive(&two, None, limit),
        Err(ReceiveError::SectionsUnsupported)
    );
    // RAM after device state.
    let s = stream(|o| {
        section(o, &cpu, &[1; 10]);
        Record::Sync {
            pass: 1,
            remaining: 0,
        }
        .write(o)
        .unwrap();
    });
    assert!(matches!(
        receive(&s, Some(&mut Sink::default()), limit),
        Err(ReceiveError::OutOfPlace {
            record: "RAM or post-copy",
            ..
        })
    ));
    // A body cut short.
    let s = stream(|o| section(o, &cpu, &[1; 5]));
    assert_eq!(
        receive(&s, Some(&mut Sink::default()), limit),
        Err(ReceiveError::Truncated)
    );
    // A header cut short.
    let s = stream(|o| {
        Record::Section.write(o).unwrap();
        o.write_all(&[3, b'c', b'p']).unwrap();
    });
    assert_eq!(
        receive(&s, Some(&mut Sink::default()), limit),
        Err(ReceiveError::Truncated)
    );
    // Distinct codes for the refusal sent back.
    let codes = [
        ReceiveError::<(), ()>::BadSection(SectionError::NameEmpty).code(),
        ReceiveError::<(), ()>::DeviceStateOverLimit { total: 1, limit: 0 }.code(),
        ReceiveError::<(), ()>::SectionsUnsupported.code(),
        ReceiveError::<(), ()>::SectionRefused {
            index: 0,
            name: SectionName::new("cpu").unwrap(),
            instance_id: 0,
            code: 1,
        }
        .code(),
    ];
    assert_eq!(codes, [31, 32, 33, 34]);
}
