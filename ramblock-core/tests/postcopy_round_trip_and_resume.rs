//! Post-copy end to end without an OS backend. The source runs the engine
//! over a socket pair with a "guest" writer; the destination receives into
//! blocks over buffers (one with 4 KiB pages, one with 2 MiB pages) through
//! a `PostcopyTarget` that copies placed pages in and checks that every
//! placement is whole host pages and never lands on a page already there.
//! A destination "vCPU" thread touches every page in a seeded order, asking
//! for the missing ones on the return path, and compares each page it sees
//! with the source's memory at the switch. Every run is checked against that
//! snapshot (the model), byte for byte.
//!
//! Also: connections broken at seeded points during post-copy and resumed,
//! hand-built bad streams on the receiving side (each its own typed error,
//! nothing placed outside the record), and bad page requests on the sending
//! side (the source guest is never resumed once post-copy started).
mod common;
use common::{add_buffer_block, add_buffer_block_with_page_size, Mem};

#[path = "../src/testing.rs"]
#[allow(dead_code)]
mod testing;
use testing::Rng;

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::buffer::BufferError;
use ramblock_core::checksum::{Checksum, Ledger};
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{
    send_ack, ReceiveError, ReceiveEvent, ReceiveSummary, Receiver, SectionSink, BOUNCE_BYTES,
};
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::migrate::{
    migrate, MigrateError, MigrationHost, MigrationStats, PrecopyConfig, ReturnEvent,
};
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::stream::format::{
    Header, PageRequest, Record, ReturnMessage, TableEntry, DEFAULT_DEVICE_STATE_LIMIT,
};
use ramblock_core::stream::io::{ByteWrite, IoStream, SliceReader};
use ramblock_core::stream::received_map::{read_received_map, scratch_words, write_received_map};
use ramblock_core::stream::resume_token::ResumeToken;
use std::collections::VecDeque;
use std::convert::Infallible;
use std::io::{BufReader, Write};
use std::net::Shutdown;
use std::ops::Range;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

type List = RamList<'static, Mem, Owned, 8>;
/// Every block's used bytes, in list (= block table) order.
type Snapshot = Vec<(String, Vec<u8>)>;
/// What a target's `start` got: the device state and the table's names.
type Started = (Vec<u8>, Vec<String>);

/// The destination VMM's device-state sink: the `cpu` section's bytes,
/// shared with the target that starts the guest from them.
#[derive(Clone, Default)]
struct CpuSink(Arc<Mutex<Vec<u8>>>);

impl CpuSink {
    /// The state the sink took since the last call.
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

impl SectionSink for CpuSink {
    fn load(&mut self, h: &SectionHeader, _: u64, bytes: &[u8]) -> Result<(), u32> {
        if h.name.as_str() != "cpu" {
            return Err(1);
        }
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(())
    }
    fn done(&mut self, _: &SectionHeader) -> Result<(), u32> {
        Ok(())
    }
}

/// The vCPU's section header for `len` bytes of state.
fn cpu_header(len: u64) -> SectionHeader {
    SectionHeader {
        name: SectionName::new("cpu").unwrap(),
        instance_id: 0,
        version: 1,
        len,
    }
}

/// A `Postcopy` record carrying `state` as the `cpu` section (no section
/// when it is empty).
fn postcopy(out: &mut Vec<u8>, state: &[u8]) {
    let sections = u32::from(!state.is_empty());
    record(out, Record::Postcopy { sections });
    if !state.is_empty() {
        let mut raw = [0u8; SectionHeader::ENCODED_LEN];
        cpu_header(state.len() as u64).encode(&mut raw);
        out.extend_from_slice(&raw);
        out.extend_from_slice(state);
    }
}
type Migrated = Result<MigrationStats, MigrateError<Infallible, std::io::Error, std::io::Error>>;

const PAGE: u64 = 4096;
const HUGE: u64 = 2 << 20;
const PER_HUGE: u64 = HUGE / PAGE;
/// "pc.ram": 4 KiB pages.
const RAM_PAGES: u64 = 512;
/// "hugeram": 2 MiB pages.
const HUGEPAGES: u64 = 3;
const TOTAL_PAGES: u64 = RAM_PAGES + HUGEPAGES * PER_HUGE;
/// What a destination block holds before anything arrives: any page the
/// migration forgets shows.
const GARBAGE: u8 = 0xEE;
/// Pages of "pc.ram" the source host dirties after pass 0 (plus one page in
/// hugepage 0 of "hugeram"), so post-copy always has pages to discard.
const DIRTIED_AFTER_PASS_0: [u64; 4] = [7, 8, 9, 300];
/// "pc.ram"'s post-copy length in the scenarios that shorten it: page 300,
/// dirtied after pass 0, lies past it.
const RAM_POSTCOPY_PAGES: u64 = 256;
const HUGE_PAGE_DIRTIED_AFTER_PASS_0: u64 = 10;
/// How long a vCPU waits for a page before the run counts as hung.
const GUEST_DEADLINE: Duration = Duration::from_secs(8);
/// How long the destination waits for a new connection after a break.
const RECONNECT_WAIT: Duration = Duration::from_secs(5);
const MAX_RECONNECTS: u32 = 8;

// ---------------------------------------------------------------------------
// The blocks and their contents

/// Adds "pc.ram" and "hugeram" (in that order) over buffers full of `fill`;
/// with `short_postcopy`, only the first [`RAM_POSTCOPY_PAGES`] pages of
/// "pc.ram" are post-copied.
fn add_blocks(list: &List, fill: u8, short_postcopy: bool) {
    let name = |n| BlockName::new(n).unwrap();
    let mut ram = BlockSpec::new(name("pc.ram"), ByteLen(RAM_PAGES * PAGE));
    if short_postcopy {
        ram = ram.postcopy_length(ByteLen(RAM_POSTCOPY_PAGES * PAGE));
    }
    add_buffer_block(list, ram, fill);
    add_buffer_block_with_page_size(
        list,
        BlockSpec::new(name("hugeram"), ByteLen(HUGEPAGES * HUGE)),
        fill,
        PageSize::SIZE_2M,
    );
}

/// Whether the source starts with page `page` of table block `block` all
/// zero: every fifth page of "pc.ram", all of hugepage 1 and the second half
/// of hugepage 2 of "hugeram" (so post-copy also places zero runs, whole and
/// mixed into a hugepage).
fn zero_at_start(block: usize, page: u64) -> bool {
    match block {
        0 => page % 5 == 3,
        _ => page / PER_HUGE == 1 || (page / PER_HUGE == 2 && page % PER_HUGE >= PER_HUGE / 2),
    }
}

/// Fills the source: every page distinct (its block, index and the seed up
/// front, a page-specific byte after), except the zero pages.
fn fill_source(list: &List, seed: u64) {
    let view = list.read();
    for (b, block) in view.iter().enumerate() {
        let mut page_bytes = vec![0u8; PAGE as usize];
        for page in 0..block.used_pages() as u64 {
            if zero_at_start(b, page) {
                continue;
            }
            page_bytes.fill(((page * 31 + b as u64 * 7 + seed) % 255) as u8 + 1);
            let tag = seed ^ ((b as u64) << 48) ^ (page << 8) ^ 0xA5;
            page_bytes[..8].copy_from_slice(&tag.to_le_bytes());
            block
                .region()
                .write(ByteLen::from_pages(page), &page_bytes)
                .unwrap();
        }
    }
}

fn snapshot(list: &List) -> Snapshot {
    let view = list.read();
    view.iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length().0 as usize];
            b.read(ByteLen(0), &mut v).unwrap();
            (b.name().to_string(), v)
        })
        .collect()
}

/// The first page where two snapshots differ, for a readable failure.
fn first_difference(a: &Snapshot, b: &Snapshot) -> Option<(String, u64)> {
    for ((name, x), (_, y)) in a.iter().zip(b) {
        if let Some(page) = x
            .chunks(PAGE as usize)
            .zip(y.chunks(PAGE as usize))
            .position(|(p, q)| p != q)
        {
            return Some((name.clone(), page as u64));
        }
    }
    (a.len() != b.len()).then(|| ("<block count>".to_string(), 0))
}

// ---------------------------------------------------------------------------
// The source side

/// The source guest: a flag its writer honours.
#[derive(Default)]
struct Vm {
    paused: AtomicBool,
    paused_ack: AtomicBool,
    stop: AtomicBool,
}

/// The source guest's workload: while not paused, writes non-zero bytes into
/// random pages of every block (through the block API, which marks them
/// dirty). Always acknowledges a pause, even when it writes nothing.
fn source_guest(list: &List, vm: &Vm, dirty: bool, seed: u64) {
    let mut rng = Rng::new(seed ^ 0x5752_4954);
    let mut round = 1u8;
    while !vm.stop.load(SeqCst) {
        if vm.paused.load(SeqCst) {
            vm.paused_ack.store(true, SeqCst);
            std::thread::sleep(Duration::from_micros(50));
            continue;
        }
        if dirty {
            let view = list.read();
            for block in view.iter() {
                for _ in 0..4 {
                    let page = rng.below(block.used_pages() as u64);
                    let at = page * PAGE + 8 * rng.below(PAGE / 8);
                    block.write(ByteLen(at), &[round | 1; 8]).unwrap();
                }
            }
            round = round.wrapping_add(2);
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The source's connection as the engine's output sees it: replaced on a
/// reconnect, and broken on purpose after planned numbers of post-copy
/// bytes.
#[derive(Default)]
struct Link {
    stream: Option<UnixStream>,
    /// Bumped by each reconnect.
    generation: u64,
    /// Counting post-copy bytes (from the switch to a break, and from a
    /// resume's received map to the next break).
    armed: bool,
    /// Post-copy bytes written so far, over all connections.
    sent: u64,
    /// Where to break, in post-copy bytes, ascending.
    breaks: VecDeque<u64>,
    /// Breaks done.
    broke: u32,
}

fn broken_pipe() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::BrokenPipe,
        "the test broke the connection",
    )
}

/// A buffered writer over the current `Link` (as a sender's `BufWriter`
/// would be). Bytes buffered for a connection that broke are dropped, as the
/// kernel would drop them.
struct SourceOut {
    link: Arc<Mutex<Link>>,
    buf: Vec<u8>,
    generation: u64,
}

impl SourceOut {
    fn push(link: &Link, buf: &mut Vec<u8>) -> std::io::Result<()> {
        let stream = link.stream.as_ref().ok_or_else(broken_pipe)?;
        let result = (&*stream).write_all(buf);
        buf.clear();
        result
    }
}

impl ByteWrite for SourceOut {
    type Error = std::io::Error;

    fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let mut link = self.link.lock().unwrap();
        if link.generation != self.generation {
            self.buf.clear();
            self.generation = link.generation;
        }
        if link.armed {
            let end = link.sent + data.len() as u64;
            if let Some(at) = link.breaks.front().copied().filter(|&at| end > at) {
                // Deliver exactly the bytes before the break, then cut.
                self.buf
                    .extend_from_slice(&data[..(at - link.sent) as usize]);
                if let Some(stream) = link.stream.take() {
                    let _ = (&stream).write_all(&self.buf);
                    let _ = stream.shutdown(Shutdown::Both);
                }
                self.buf.clear();
                link.sent = at;
                link.breaks.pop_front();
                link.armed = false;
                link.broke += 1;
                return Err(broken_pipe());
            }
            link.sent = end;
        }
        if link.stream.is_none() {
            return Err(broken_pipe());
        }
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 64 << 10 {
            Self::push(&link, &mut self.buf)?;
        }
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let link = self.link.lock().unwrap();
        if link.generation != self.generation {
            self.buf.clear();
            self.generation = link.generation;
        }
        Self::push(&link, &mut self.buf)
    }
}

/// Reads return-path messages of connection `generation` into `tx` until
/// the connection ends (then `Closed`).
fn read_return_path(generation: u64, stream: UnixStream, tx: mpsc::Sender<(u64, ReturnEvent)>) {
    std::thread::spawn(move || {
        let mut input = IoStream(BufReader::new(stream));
        loop {
            let event = match ReturnMessage::read(&mut input) {
                Ok(Ok(message)) => ReturnEvent::Message(message),
                // EOF, a transport error or bytes that are no message.
                _ => ReturnEvent::Closed,
            };
            if tx.send((generation, event)).is_err() || event == ReturnEvent::Closed {
                return;
            }
        }
    });
}

/// The source VMM: pause and resume, device state, the return path, and
/// reconnecting after a break.
struct Source<'a> {
    list: &'a List,
    vm: &'a Vm,
    sc: &'a Scenario,
    t0: Instant,
    /// What the engine asked of the VMM, in order.
    events: Vec<&'static str>,
    link: Arc<Mutex<Link>>,
    generation: u64,
    returns: mpsc::Receiver<(u64, ReturnEvent)>,
    returns_tx: mpsc::Sender<(u64, ReturnEvent)>,
    /// Return events taken early (see `postcopy_started`).
    early: VecDeque<ReturnEvent>,
    /// Hands new connections to the destination.
    to_dest: mpsc::Sender<UnixStream>,
    /// A new connection whose received map has not been read yet.
    resuming: Option<UnixStream>,
    reconnects: u32,
    postcopy: bool,
    device_state: &'a [u8],
    at_switch: &'a OnceLock<Snapshot>,
}

impl MigrationHost for Source<'_> {
    fn now_ns(&mut self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn sleep_ns(&mut self, ns: u64) {
        std::thread::sleep(Duration::from_nanos(ns));
    }

    fn pause_guest(&mut self) {
        self.events.push("pause");
        self.vm.paused_ack.store(false, SeqCst);
        self.vm.paused.store(true, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.vm.paused_ack.load(SeqCst) {
            assert!(Instant::now() < deadline, "the source guest never paused");
            std::thread::yield_now();
        }
    }

    fn resume_guest(&mut self) {
        self.events.push("resume");
        self.vm.paused.store(false, SeqCst);
    }

    fn set_throttle(&mut self, _: u8) {}

    fn pass_done(&mut self, report: &ramblock_core::migrate::PassReport) {
        // Dirty a few pages after pass 0, so post-copy has something to
        // discard whatever the writer thread got to do. (Also called once
        // post-copy ends; the guest is paused for good by then.)
        if report.pass != 0 || self.postcopy || !self.sc.dirty_after_pass_0 {
            return;
        }
        let view = self.list.read();
        let ram = view.by_name("pc.ram").unwrap();
        for page in DIRTIED_AFTER_PASS_0 {
            ram.write(ByteLen(page * PAGE + 16), &[0x5A; 8]).unwrap();
        }
        let huge = view.by_name("hugeram").unwrap();
        huge.write(
            ByteLen(HUGE_PAGE_DIRTIED_AFTER_PASS_0 * PAGE + 16),
            &[0x5B; 8],
        )
        .unwrap();
    }

    fn device_section(&mut self, index: usize) -> Option<(SectionHeader, &[u8])> {
        if !self.events.contains(&"device_state") {
            self.events.push("device_state");
            // The guest is paused for good: this is the memory the
            // destination must end up with.
            let _ = self.at_switch.set(snapshot(self.list));
        }
        (index == 0 && !self.device_state.is_empty()).then(|| (cpu_header(0), self.device_state))
    }

    fn return_message(&mut self, wait_ns: u64) -> ReturnEvent {
        if let Some(event) = self.early.pop_front() {
            return event;
        }
        let deadline = Instant::now() + Duration::from_nanos(wait_ns);
        loop {
            let got = if wait_ns == 0 {
                self.returns.try_recv().ok()
            } else {
                self.returns
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .ok()
            };
            match got {
                None => return ReturnEvent::Nothing,
                Some((generation, event)) if generation == self.generation => return event,
                // A connection that broke earlier.
                Some(_) => {}
            }
        }
    }

    fn reconnect(&mut self) -> bool {
        self.events.push("reconnect");
        self.reconnects += 1;
        if self.reconnects > MAX_RECONNECTS {
            return false;
        }
        let (mine, theirs) = UnixStream::pair().unwrap();
        self.generation += 1;
        {
            let mut link = self.link.lock().unwrap();
            if let Some(old) = link.stream.replace(mine.try_clone().unwrap()) {
                let _ = old.shutdown(Shutdown::Both);
            }
            link.generation = self.generation;
            link.armed = false;
        }
        self.early.clear();
        if self.to_dest.send(theirs).is_err() {
            return false;
        }
        self.resuming = Some(mine);
        true
    }

    fn received_map(&mut self, missing: &mut dyn FnMut(&str, Range<u64>)) -> bool {
        let Some(conn) = self.resuming.take() else {
            return false;
        };
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut runs = Vec::new();
        let read = {
            let view = self.list.read();
            let mut scratch = vec![0u64; scratch_words(&view)];
            // Unbuffered: the page requests that follow the map belong to
            // the return-path reader.
            read_received_map(&mut IoStream(&conn), &view, &mut scratch, |block, pages| {
                runs.push((block.name().to_string(), pages))
            })
        };
        if read.is_err() {
            return false;
        }
        conn.set_read_timeout(None).unwrap();
        read_return_path(self.generation, conn, self.returns_tx.clone());
        // The list view is released: `missing` takes its own.
        for (name, pages) in runs {
            missing(&name, pages);
        }
        self.link.lock().unwrap().armed = true;
        true
    }

    fn postcopy_started(&mut self) {
        self.events.push("postcopy");
        self.postcopy = true;
        self.link.lock().unwrap().armed = true;
        if self.sc.wait_first_request {
            // A vCPU faults at once on the destination: take its first
            // request before the engine sends anything in the background, so
            // that the engine's request counters do not depend on the
            // scheduler.
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok((generation, event)) = self
                .returns
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                if generation == self.generation {
                    self.early.push_back(event);
                    break;
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The destination side

/// What the destination's threads share.
#[derive(Default)]
struct DestShared {
    /// The return path: the vCPU's requests, the resume's received map and
    /// the final acknowledgement all go through this lock.
    ret: Mutex<Option<UnixStream>>,
    /// Requests the vCPU still waits on (asked again after a resume).
    awaited: Mutex<Vec<PageRequest>>,
    /// The receive is over.
    done: AtomicBool,
}

struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, SeqCst);
    }
}

#[derive(Debug, Default)]
struct TargetReport {
    starts: u32,
    resumes: u32,
    placed_pages: u64,
    violations: Vec<String>,
}

/// The destination VMM's placement: copies pages into the block (where
/// `UFFDIO_COPY` would place them) and checks each placement against a model
/// of the pages present.
struct GuestTarget<'a> {
    list: &'a List,
    shared: &'a DestShared,
    /// Per block, in list order: name, memory, host page size.
    regions: Vec<(String, HostRegion<'a>, u64)>,
    /// Per block: pages present (received before the switch and not
    /// discarded, or placed since).
    present: Vec<Vec<bool>>,
    /// The connection a resume will come on.
    pending: Option<UnixStream>,
    /// Starts the vCPU with the device state and the table's block names.
    start: Option<mpsc::Sender<Started>>,
    /// Where the device state arrived.
    cpu: CpuSink,
    report: TargetReport,
}

impl<'a> GuestTarget<'a> {
    fn new(list: &'a List, shared: &'a DestShared, start: mpsc::Sender<Started>) -> Self {
        let regions = list
            .read()
            .iter()
            .map(|b| {
                // SAFETY: `list` outlives the target ('a) and no block is
                // removed or shrunk while a migration places pages into it.
                let region = unsafe { b.region().detach() };
                (b.name().to_string(), region, b.page_size().bytes())
            })
            .collect();
        GuestTarget {
            list,
            shared,
            regions,
            present: Vec::new(),
            pending: None,
            start: Some(start),
            cpu: CpuSink::default(),
            report: TargetReport::default(),
        }
    }

    fn violation(&mut self, what: String) {
        if self.report.violations.len() < 16 {
            self.report.violations.push(what);
        }
    }

    /// Checks a placement of `len` bytes at `offset` of `block` and marks
    /// its pages present; returns the block's memory.
    fn claim(&mut self, block: &str, offset: u64, len: u64) -> Option<HostRegion<'_>> {
        let Some(i) = self.regions.iter().position(|(n, ..)| n == block) else {
            self.violation(format!("placement into unknown block {block:?}"));
            return None;
        };
        let page_size = self.regions[i].2;
        if self.present.is_empty() {
            self.violation(format!("placement into {block:?} before the start"));
            return None;
        }
        if len == 0 || offset % page_size != 0 || len % page_size != 0 {
            self.violation(format!(
                "placement of {len:#x} bytes at {offset:#x} of {block:?} is not whole {page_size:#x}-byte pages"
            ));
        }
        for page in offset / PAGE..(offset + len).div_ceil(PAGE) {
            match self.present[i].get_mut(page as usize) {
                Some(p) if *p => self.violation(format!(
                    "page {page} of {block:?} placed over a present page"
                )),
                Some(p) => *p = true,
                None => self.violation(format!("page {page} of {block:?} is past the block")),
            }
        }
        self.report.placed_pages += len / PAGE;
        Some(self.regions[i].1)
    }
}

impl PostcopyTarget for GuestTarget<'_> {
    type Error = BufferError;

    fn start(&mut self, table: &[&str]) -> Result<(), BufferError> {
        self.report.starts += 1;
        let state = self.cpu.take();
        let view = self.list.read();
        self.present = view
            .iter()
            .map(|b| {
                (0..b.used_pages())
                    .map(|p| b.received().is_received(p).unwrap_or(false))
                    .collect()
            })
            .collect();
        if let Some(start) = self.start.take() {
            let table = table.iter().map(|n| n.to_string()).collect();
            let _ = start.send((state, table));
        }
        Ok(())
    }

    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), BufferError> {
        if let Some(region) = self.claim(block, offset.0, data.len() as u64) {
            region.write(offset, data).unwrap();
        }
        Ok(())
    }

    fn place_zero(
        &mut self,
        block: &str,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<(), BufferError> {
        if let Some(region) = self.claim(block, offset.0, len.0) {
            region.fill(offset, len.0 as usize, 0).unwrap();
        }
        Ok(())
    }

    fn resumed(&mut self) -> Result<(), BufferError> {
        self.report.resumes += 1;
        let Some(conn) = self.pending.take() else {
            self.violation("a resume with no new connection".to_string());
            return Ok(());
        };
        // Under the return-path lock, so no request can slip in before the
        // map on the new connection.
        let mut ret = self.shared.ret.lock().unwrap();
        let conn = &*ret.insert(conn);
        // Write errors mean this connection broke too: the next resume
        // sends everything again.
        let _ = write_received_map(&mut IoStream(conn), &self.list.read());
        for request in self.shared.awaited.lock().unwrap().iter() {
            let _ = request.write(&mut IoStream(conn));
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct GuestReport {
    state: Option<Vec<u8>>,
    requests: u64,
    touched: u64,
    failures: Vec<String>,
}

fn ask(shared: &DestShared, request: PageRequest) {
    if let Some(conn) = shared.ret.lock().unwrap().as_ref() {
        // Fails on a broken connection; the resume asks again.
        let _ = request.write(&mut IoStream(conn));
    }
}

/// The destination vCPU: once started, touches the pages of `order`
/// (`(block name, page)`), asking for each missing one (by the block's index
/// in the table `start` named) and waiting for it, and compares what it sees
/// with the source at the switch. `first` is sent before anything else.
fn dest_guest(
    list: &List,
    shared: &DestShared,
    started: mpsc::Receiver<Started>,
    order: &[(&str, u64)],
    first: Option<PageRequest>,
    at_switch: &OnceLock<Snapshot>,
) -> GuestReport {
    let mut report = GuestReport::default();
    let (state, table) = loop {
        match started.recv_timeout(Duration::from_millis(10)) {
            Ok(started) => break started,
            Err(mpsc::RecvTimeoutError::Timeout) if !shared.done.load(SeqCst) => {}
            _ => return report,
        }
    };
    report.state = Some(state);
    if let Some(request) = first {
        ask(shared, request);
        report.requests += 1;
    }
    let Some(snap) = at_switch.get() else {
        report.failures.push("started before the switch".into());
        return report;
    };
    let deadline = Instant::now() + GUEST_DEADLINE;
    let mut seen = vec![0u8; PAGE as usize];
    for &(name, page) in order {
        let (Some(block), Some((_, at_switch))) = (
            table.iter().position(|n| n == name),
            snap.iter().find(|(n, _)| n == name),
        ) else {
            report
                .failures
                .push(format!("{name:?} is not in {table:?}"));
            return report;
        };
        let block = block as u32;
        let received = || {
            let view = list.read();
            let b = view.by_name(name).unwrap();
            // Past the post-copy length no page is tracked: those came
            // before the switch, as in pre-copy.
            b.received().is_received(page as usize).unwrap_or(true)
        };
        if !received() {
            let request = PageRequest {
                block,
                first: page,
                count: 1,
            };
            shared.awaited.lock().unwrap().push(request);
            ask(shared, request);
            report.requests += 1;
            while !received() {
                if shared.done.load(SeqCst) || Instant::now() > deadline {
                    if received() {
                        break;
                    }
                    report
                        .failures
                        .push(format!("page {page} of {name:?} never arrived"));
                    return report;
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            shared.awaited.lock().unwrap().retain(|r| *r != request);
        }
        let view = list.read();
        let b = view.by_name(name).unwrap();
        b.read(ByteLen(page * PAGE), &mut seen).unwrap();
        let want = &at_switch[(page * PAGE) as usize..][..PAGE as usize];
        if seen != want && report.failures.len() < 16 {
            report.failures.push(format!(
                "page {page} of {name:?} is received but differs from the source's at the switch"
            ));
        }
        report.touched += 1;
    }
    report
}

#[derive(Debug)]
struct DestReport {
    result: Result<ReceiveSummary, String>,
    events: Vec<ReceiveEvent>,
    /// Codes of the errors that ended each connection before the last.
    broken: Vec<u32>,
}

/// The destination VMM's receive loop: receives into `list`, and after a
/// transport error in post-copy takes the next connection and resumes.
fn destination(
    list: &List,
    shared: &DestShared,
    first: UnixStream,
    conns: mpsc::Receiver<UnixStream>,
    target: &mut GuestTarget<'_>,
) -> DestReport {
    let _done = SetOnDrop(&shared.done);
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut huge = vec![0u8; HUGE as usize];
    let mut ledger = Ledger::new();
    let mut sink = target.cpu.clone();
    let mut rx = Receiver::new(&mut bounce)
        .unwrap()
        .with_ledger(&mut ledger)
        .with_device_state(&mut sink, DEFAULT_DEVICE_STATE_LIMIT)
        .with_hugepage_buffer(&mut huge);
    *shared.ret.lock().unwrap() = Some(first.try_clone().unwrap());
    let mut conn = first;
    let mut events = Vec::new();
    let mut broken = Vec::new();
    loop {
        let mut input = IoStream(BufReader::new(conn.try_clone().unwrap()));
        let result = rx.receive_postcopy(list, &mut input, target, |e| events.push(e));
        match result {
            Err(e) if rx.in_postcopy() => {
                broken.push(e.code());
                let Ok(next) = conns.recv_timeout(RECONNECT_WAIT) else {
                    return DestReport {
                        result: Err(format!("no new connection after: {e}")),
                        events,
                        broken,
                    };
                };
                target.pending = Some(next.try_clone().unwrap());
                conn = next;
            }
            result => {
                if let Some(ret) = shared.ret.lock().unwrap().as_ref() {
                    let _ = send_ack(&mut IoStream(ret), &result);
                }
                return DestReport {
                    result: result.map_err(|e| e.to_string()),
                    events,
                    broken,
                };
            }
        }
    }
}

// ---------------------------------------------------------------------------
// A whole migration

/// One post-copy migration to run.
#[derive(Clone, Debug, Default)]
struct Scenario {
    seed: u64,
    postcopy_after: u32,
    /// Post-copy bytes after which the connection breaks (ascending).
    breaks: Vec<u64>,
    /// The source guest writes while it runs.
    writer: bool,
    /// The source host dirties fixed pages after pass 0.
    dirty_after_pass_0: bool,
    /// The source takes the vCPU's first request before sending anything in
    /// post-copy.
    wait_first_request: bool,
    /// The vCPU's first request (instead of its first fault).
    first_request: Option<PageRequest>,
    /// "pc.ram" is post-copied only up to [`RAM_POSTCOPY_PAGES`].
    short_postcopy: bool,
}

#[derive(Debug)]
struct Outcome {
    migrated: Migrated,
    at_switch: Snapshot,
    source_after: Snapshot,
    dest_ram: Snapshot,
    dest: DestReport,
    guest: GuestReport,
    target: TargetReport,
    source_events: Vec<&'static str>,
    broke: u32,
    device_state: Vec<u8>,
}

fn seeded_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len).map(|_| rng.next() as u8).collect()
}

/// The vCPU's order: every page once, shuffled.
fn touch_order(seed: u64) -> Vec<(&'static str, u64)> {
    let mut order: Vec<(&str, u64)> = (0..RAM_PAGES)
        .map(|p| ("pc.ram", p))
        .chain((0..HUGEPAGES * PER_HUGE).map(|p| ("hugeram", p)))
        .collect();
    let mut rng = Rng::new(seed ^ 0x0bde);
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

fn run(sc: &Scenario) -> Outcome {
    let src = List::new();
    add_blocks(&src, 0, sc.short_postcopy);
    fill_source(&src, sc.seed);
    let dst = List::new();
    add_blocks(&dst, GARBAGE, sc.short_postcopy);
    let vm = Vm::default();
    let at_switch = OnceLock::new();
    let shared = DestShared::default();
    let device_state = seeded_bytes(sc.seed, 3000 + (sc.seed % 1000) as usize);
    let order = touch_order(sc.seed);
    let link = Arc::new(Mutex::new(Link {
        breaks: sc.breaks.iter().copied().collect(),
        ..Link::default()
    }));
    let (a, b) = UnixStream::pair().unwrap();
    let (src_ref, dst_ref, vm_ref, shared_ref) = (&src, &dst, &vm, &shared);
    let (at_switch_ref, order_ref) = (&at_switch, &order);
    let (migrated, source_events, dest, guest, target) = std::thread::scope(|s| {
        s.spawn(move || source_guest(src_ref, vm_ref, sc.writer, sc.seed));
        let (start_tx, start_rx) = mpsc::channel();
        let guest = s.spawn(move || {
            dest_guest(
                dst_ref,
                shared_ref,
                start_rx,
                order_ref,
                sc.first_request,
                at_switch_ref,
            )
        });
        let (conn_tx, conn_rx) = mpsc::channel();
        let dest = s.spawn(move || {
            let mut target = GuestTarget::new(dst_ref, shared_ref, start_tx);
            let report = destination(dst_ref, shared_ref, b, conn_rx, &mut target);
            (report, target.report)
        });
        // Let the writer get going so pass 0 races with it.
        std::thread::sleep(Duration::from_millis(5));
        let (returns_tx, returns) = mpsc::channel();
        read_return_path(0, a.try_clone().unwrap(), returns_tx.clone());
        link.lock().unwrap().stream = Some(a);
        let mut host = Source {
            list: &src,
            vm: &vm,
            sc,
            t0: Instant::now(),
            events: Vec::new(),
            link: link.clone(),
            generation: 0,
            returns,
            returns_tx,
            early: VecDeque::new(),
            to_dest: conn_tx,
            resuming: None,
            reconnects: 0,
            postcopy: false,
            device_state: &device_state,
            at_switch: &at_switch,
        };
        let mut out = SourceOut {
            link: link.clone(),
            buf: Vec::new(),
            generation: 0,
        };
        let cfg = PrecopyConfig {
            downtime_limit_ns: 0,
            max_passes: 10,
            postcopy_after: Some(sc.postcopy_after),
            ..PrecopyConfig::default()
        };
        let mut buf = vec![0u8; 64 * PAGE as usize];
        let migrated = migrate(
            &src,
            &mut SoftwareOnly,
            &mut out,
            &mut IoStream(std::io::empty()),
            &mut host,
            cfg,
            &mut buf,
        );
        // Whatever happened, let every thread finish: stop the writer, hang
        // up (the destination sees the end of its stream) and drop the host
        // (no new connection will come).
        vm.stop.store(true, SeqCst);
        if let Some(stream) = link.lock().unwrap().stream.take() {
            let _ = stream.shutdown(Shutdown::Both);
        }
        let events = std::mem::take(&mut host.events);
        drop(host);
        let (dest, target) = dest.join().unwrap();
        let guest = guest.join().unwrap();
        (migrated, events, dest, guest, target)
    });
    let broke = link.lock().unwrap().broke;
    Outcome {
        migrated,
        at_switch: at_switch.get().cloned().unwrap_or_default(),
        source_after: snapshot(&src),
        dest_ram: snapshot(&dst),
        dest,
        guest,
        target,
        source_events,
        broke,
        device_state,
    }
}

/// What every good post-copy run shows: the destination equals the source
/// at the switch byte for byte, the source did not change after it, the
/// vCPU saw the right bytes in every page, placements were whole host pages
/// never over present ones, the device state arrived intact, and the source
/// guest was never resumed.
fn assert_migrated(o: &Outcome) -> (MigrationStats, ReceiveSummary) {
    let stats = match &o.migrated {
        Ok(stats) => *stats,
        Err(e) => panic!(
            "migration failed: {e}\ndestination: {:?}\nguest: {:?}",
            o.dest, o.guest
        ),
    };
    let summary = o.dest.result.clone().expect("the destination verified");
    assert_eq!(o.at_switch.len(), 2, "the switch snapshot was taken");
    assert_eq!(
        first_difference(&o.dest_ram, &o.at_switch),
        None,
        "destination RAM equals the source's at the switch"
    );
    assert_eq!(
        first_difference(&o.source_after, &o.at_switch),
        None,
        "the source did not change after the switch"
    );
    assert_eq!(o.guest.failures, Vec::<String>::new(), "the vCPU's view");
    assert_eq!(o.guest.touched, TOTAL_PAGES, "the vCPU touched every page");
    assert_eq!(o.target.violations, Vec::<String>::new(), "placements");
    assert_eq!(o.target.starts, 1);
    assert_eq!(o.guest.state.as_deref(), Some(&o.device_state[..]));
    assert!(
        !o.source_events.contains(&"resume"),
        "the source guest is never resumed: {:?}",
        o.source_events
    );
    let pc = stats.postcopy.expect("the migration ended in post-copy");
    assert_eq!(pc.discarded, summary.discarded, "{pc:?} {summary:?}");
    // Every discarded page, and nothing else, was placed (exactly once: the
    // target checks that no placement lands on a present page).
    assert_eq!(o.target.placed_pages, summary.discarded, "{summary:?}");
    if pc.resumes == 0 {
        assert_eq!(summary.postcopy_pages, o.target.placed_pages, "{summary:?}");
    } else {
        // The receiver also counts pages of a hugepage left half assembled
        // by a break (never placed; they come again after the resume).
        assert!(
            summary.postcopy_pages >= o.target.placed_pages,
            "{summary:?}"
        );
    }
    (stats, summary)
}

// ---------------------------------------------------------------------------
// 1-3: round trips

#[test]
fn postcopy_after_a_pass_moves_a_running_guest_byte_for_byte() {
    let o = run(&Scenario {
        seed: 1,
        postcopy_after: 1,
        writer: true,
        dirty_after_pass_0: true,
        wait_first_request: true,
        ..Scenario::default()
    });
    let (stats, summary) = assert_migrated(&o);
    let pc = stats.postcopy.unwrap();
    assert!(pc.requests > 0, "{pc:?}");
    assert!(pc.requested_pages > 0, "{pc:?}");
    assert!(pc.background_pages > 0, "{pc:?}");
    // At least the pages dirtied after pass 0, hugepage 0 whole.
    let dirtied = DIRTIED_AFTER_PASS_0.len() as u64 + PER_HUGE;
    assert!(pc.discarded >= dirtied, "{pc:?}");
    // With no break, post-copy sends exactly the discarded pages, once.
    assert_eq!(
        pc.requested_pages + pc.background_pages,
        pc.discarded,
        "{pc:?}"
    );
    assert_eq!(summary.postcopy_pages, pc.discarded, "{summary:?}");
    assert_eq!(pc.resumes, 0);
    assert_eq!(summary.passes, 1, "one pre-copy pass: {summary:?}");
    assert_eq!(
        o.source_events,
        ["pause", "device_state", "postcopy"],
        "paused once, for good"
    );
    assert!(
        o.dest.events.contains(&ReceiveEvent::PostcopyStarted)
            && !o.dest.events.contains(&ReceiveEvent::Resumed),
        "{:?}",
        o.dest.events
    );
}

/// Pages dirty past a block's post-copy length at the switch go before it,
/// the pre-copy way: the destination would refuse them in post-copy.
#[test]
fn pages_past_the_postcopy_length_are_sent_before_the_switch() {
    let o = run(&Scenario {
        seed: 5,
        postcopy_after: 1,
        dirty_after_pass_0: true,
        short_postcopy: true,
        ..Scenario::default()
    });
    let (stats, summary) = assert_migrated(&o);
    let pc = stats.postcopy.unwrap();
    // Page 300 of pc.ram was dirty at the switch but is past the length:
    // not discarded, so exactly the pages inside it moved in post-copy.
    assert_eq!(
        pc.requested_pages + pc.background_pages,
        pc.discarded,
        "{pc:?}"
    );
    assert_eq!(summary.postcopy_pages, pc.discarded, "{summary:?}");
    let dirtied_inside = (DIRTIED_AFTER_PASS_0.len() - 1) as u64 + PER_HUGE;
    assert!(pc.discarded >= dirtied_inside, "{pc:?}");
}

#[test]
fn postcopy_from_the_start_sends_every_page_after_the_switch() {
    let o = run(&Scenario {
        seed: 2,
        postcopy_after: 0,
        writer: true,
        wait_first_request: true,
        ..Scenario::default()
    });
    let (stats, summary) = assert_migrated(&o);
    let pc = stats.postcopy.unwrap();
    assert_eq!(pc.discarded, TOTAL_PAGES, "everything is discarded: {pc:?}");
    assert_eq!(summary.passes, 0, "no pre-copy pass: {summary:?}");
    assert_eq!(summary.postcopy_pages, TOTAL_PAGES, "{summary:?}");
    assert_eq!(
        summary.pages + summary.zero_pages,
        TOTAL_PAGES,
        "every page arrived once: {summary:?}"
    );
    assert!(summary.zero_pages > 0, "zero runs were placed too");
    assert_eq!(pc.requested_pages + pc.background_pages, TOTAL_PAGES);
    assert!(
        pc.requests > 0 && pc.requested_pages > 0 && pc.background_pages > 0,
        "{pc:?}"
    );
}

/// Pages that are never all zero on the source, whatever its writer does
/// (writes are never all zero).
fn nonzero_at_start() -> u64 {
    (0..RAM_PAGES).filter(|&p| !zero_at_start(0, p)).count() as u64
        + (0..HUGEPAGES * PER_HUGE)
            .filter(|&p| !zero_at_start(1, p))
            .count() as u64
}

#[test]
fn a_broken_postcopy_connection_resumes_and_still_verifies() {
    for seed in 1..=4u64 {
        let mut rng = Rng::new(seed * 0x9e37);
        let postcopy_after = (seed % 2) as u32;
        // A lower bound of the post-copy bytes of any run (page payloads
        // alone), so every break happens: after 0 passes every non-zero
        // page, after 1 pass at least the pages dirtied after pass 0, with
        // hugepage 0 (non-zero) whole.
        let floor = if postcopy_after == 0 {
            nonzero_at_start() * PAGE
        } else {
            (DIRTIED_AFTER_PASS_0.len() as u64 + PER_HUGE) * PAGE
        };
        let mut breaks: Vec<u64> = (0..1 + rng.below(3))
            .map(|_| 1 + rng.below(floor - 1))
            .collect();
        breaks.sort_unstable();
        breaks.dedup();
        let sc = Scenario {
            seed,
            postcopy_after,
            breaks: breaks.clone(),
            writer: true,
            dirty_after_pass_0: true,
            ..Scenario::default()
        };
        let o = run(&sc);
        let context = format!("seed {seed}, breaks {breaks:?}");
        let (stats, summary) = assert_migrated(&o);
        let pc = stats.postcopy.unwrap();
        let n = breaks.len() as u32;
        assert_eq!(o.broke, n, "{context}: every break happened");
        assert_eq!(pc.resumes, n, "{context}: {pc:?}");
        assert_eq!(o.target.resumes, n, "{context}");
        assert_eq!(
            o.dest
                .events
                .iter()
                .filter(|e| **e == ReceiveEvent::Resumed)
                .count() as u32,
            n,
            "{context}"
        );
        let truncated = ReceiveError::<(), ()>::Truncated.code();
        assert_eq!(
            o.dest.broken,
            vec![truncated; breaks.len()],
            "{context}: each break ended a connection mid-stream"
        );
        // Every discarded page was sent at least once, but the engine's
        // counters miss the pages of the range a break interrupted
        // (postcopy.rs `send_range` drops its count on a write error): at
        // most one range, one hugepage, per break.
        assert!(
            pc.requested_pages + pc.background_pages + u64::from(n) * PER_HUGE >= pc.discarded,
            "{context}: {pc:?}"
        );
        assert!(summary.postcopy_pages >= pc.discarded, "{context}");
    }
}

// ---------------------------------------------------------------------------
// 4: bad input on the receiving side

const GUARD: u8 = 0xA5;
const BAD_RAM: u32 = 0;
const BAD_HUGE: u32 = 1;
const BAD_SHORT: u32 = 2;
/// "short" has 16 used pages but a post-copy length of 8.
const SHORT_POSTCOPY: u64 = 8;

/// A destination for hand-built streams, full of a guard byte: "ram" (16
/// pages), "huge" (two 2 MiB pages) and "short" (16 pages, post-copy length
/// 8), in that (table) order.
fn bad_dest() -> List {
    let list = List::new();
    let name = |n| BlockName::new(n).unwrap();
    add_buffer_block(
        &list,
        BlockSpec::new(name("ram"), ByteLen(16 * PAGE)),
        GUARD,
    );
    add_buffer_block_with_page_size(
        &list,
        BlockSpec::new(name("huge"), ByteLen(2 * HUGE)),
        GUARD,
        PageSize::SIZE_2M,
    );
    add_buffer_block(
        &list,
        BlockSpec::new(name("short"), ByteLen(16 * PAGE))
            .postcopy_length(ByteLen(SHORT_POSTCOPY * PAGE)),
        GUARD,
    );
    let names: Vec<String> = list.read().iter().map(|b| b.name().to_string()).collect();
    assert_eq!(names, ["ram", "huge", "short"], "table order");
    list
}

fn table_names() -> Vec<String> {
    ["ram", "huge", "short"].map(String::from).to_vec()
}

/// The token [`Recorder`] issues; `table` puts it in resume headers.
const TOKEN: ResumeToken = ResumeToken(*b"recorder's token");

fn table(out: &mut Vec<u8>, resume: bool) {
    table_with_token(out, resume, &TOKEN);
}

fn table_with_token(out: &mut Vec<u8>, resume: bool, token: &ResumeToken) {
    let header = Header::new(3);
    if resume {
        header.write_resume(token, out).unwrap();
    } else {
        header.write(out).unwrap();
    }
    for (name, len, page_size) in [
        ("ram", 16 * PAGE, PAGE),
        ("huge", 2 * HUGE, HUGE),
        ("short", 16 * PAGE, PAGE),
    ] {
        TableEntry {
            used_length: len,
            page_size,
            flags: 0,
        }
        .write(name, out)
        .unwrap();
    }
}

fn record(out: &mut Vec<u8>, r: Record) {
    r.write(out).unwrap();
}

/// A `Pages` record of `count` pages, page `p` filled with `fill(p)`.
fn pages(out: &mut Vec<u8>, block: u32, first: u64, count: u32, fill: impl Fn(u64) -> u8) {
    record(
        out,
        Record::Pages {
            block,
            first,
            count,
        },
    );
    for p in first..first + u64::from(count) {
        out.extend(std::iter::repeat_n(fill(p), PAGE as usize));
    }
}

/// Pre-copy: every page of every block, in runs of at most 64 pages that
/// stay on one side of "short"'s post-copy length.
fn all_pages(out: &mut Vec<u8>, fill: impl Fn(u32, u64) -> u8) {
    for (block, used) in [(BAD_RAM, 16), (BAD_HUGE, 2 * PER_HUGE), (BAD_SHORT, 16)] {
        let mut first = 0;
        while first < used {
            let mut end = (first + 64).min(used);
            if block == BAD_SHORT && first < SHORT_POSTCOPY {
                end = SHORT_POSTCOPY;
            }
            pages(out, block, first, (end - first) as u32, |p| fill(block, p));
            first = end;
        }
    }
}

/// A target that copies placed pages in and records what it was asked.
#[derive(Default)]
struct Recorder<'a> {
    regions: Vec<(String, HostRegion<'a>)>,
    starts: Vec<Started>,
    cpu: CpuSink,
    placed: Vec<(String, u64, u64)>,
    resumes: u32,
    /// The token a resume header must carry.
    token: Option<ResumeToken>,
}

impl<'a> Recorder<'a> {
    fn new(list: &'a List) -> Self {
        Recorder {
            regions: list
                .read()
                .iter()
                // SAFETY: `list` outlives the recorder ('a) and no block is
                // removed or shrunk while it places pages.
                .map(|b| (b.name().to_string(), unsafe { b.region().detach() }))
                .collect(),
            token: Some(TOKEN),
            ..Recorder::default()
        }
    }

    fn region(&self, block: &str) -> HostRegion<'a> {
        self.regions.iter().find(|(n, _)| n == block).unwrap().1
    }
}

impl PostcopyTarget for Recorder<'_> {
    type Error = BufferError;
    fn start(&mut self, table: &[&str]) -> Result<(), BufferError> {
        let table = table.iter().map(|n| n.to_string()).collect();
        self.starts.push((self.cpu.take(), table));
        Ok(())
    }
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), BufferError> {
        self.placed
            .push((block.to_string(), offset.0, data.len() as u64));
        self.region(block).write(offset, data).unwrap();
        Ok(())
    }
    fn place_zero(
        &mut self,
        block: &str,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<(), BufferError> {
        self.placed.push((block.to_string(), offset.0, len.0));
        self.region(block).fill(offset, len.0 as usize, 0).unwrap();
        Ok(())
    }
    fn resumed(&mut self) -> Result<(), BufferError> {
        self.resumes += 1;
        Ok(())
    }
    fn resume_token(&self) -> Option<ResumeToken> {
        self.token
    }
}

type BadResult = Result<ReceiveSummary, ReceiveError<Infallible, BufferError>>;

/// Receives `streams` one after the other with one receiver (post-copy
/// capable unless `plain`, with a hugepage buffer of `huge_buf` bytes).
fn receive_streams<'l>(
    list: &'l List,
    streams: &[&[u8]],
    plain: bool,
    huge_buf: usize,
) -> (Vec<BadResult>, Recorder<'l>, bool) {
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    let mut huge = vec![0u8; huge_buf];
    let mut target = Recorder::new(list);
    let mut sink = target.cpu.clone();
    let mut rx = Receiver::new(&mut bounce)
        .unwrap()
        .with_device_state(&mut sink, DEFAULT_DEVICE_STATE_LIMIT)
        .with_hugepage_buffer(&mut huge);
    let results = streams
        .iter()
        .map(|s| {
            let mut input = SliceReader::new(s);
            if plain {
                rx.receive(list, &mut input, |_| {})
            } else {
                rx.receive_postcopy(list, &mut input, &mut target, |_| {})
            }
        })
        .collect();
    (results, target, rx.in_postcopy())
}

fn receive_one<'l>(list: &'l List, stream: &[u8]) -> (BadResult, Recorder<'l>, bool) {
    let (mut results, target, in_postcopy) = receive_streams(list, &[stream], false, HUGE as usize);
    (results.remove(0), target, in_postcopy)
}

/// Pages (block name, page) that no longer hold the guard byte.
fn touched_pages(list: &List) -> Vec<(String, u64)> {
    let view = list.read();
    let mut touched = Vec::new();
    let mut buf = vec![0u8; PAGE as usize];
    for b in view.iter() {
        for p in 0..b.used_pages() as u64 {
            b.read(ByteLen(p * PAGE), &mut buf).unwrap();
            if buf.iter().any(|&x| x != GUARD) {
                touched.push((b.name().to_string(), p));
            }
        }
    }
    touched
}

fn bn(name: &str) -> BlockName {
    BlockName::new(name).unwrap()
}

/// The checksums a source holding `list`'s blocks with contents `fill`
/// would send, computed over a model list.
fn checksums(fill: impl Fn(u32, u64) -> u8) -> Vec<u8> {
    let model = bad_dest();
    let view = model.read();
    let mut out = Vec::new();
    for (i, b) in view.iter().enumerate() {
        for p in 0..b.used_pages() as u64 {
            b.region()
                .fill(ByteLen::from_pages(p), PAGE as usize, fill(i as u32, p))
                .unwrap();
        }
        let sum = Checksum::of_region(&b.region(), b.used_length().0).unwrap();
        out.extend_from_slice(&sum.to_le_bytes());
    }
    out
}

fn content(block: u32, page: u64) -> u8 {
    (block as u8 * 40 + page as u8 % 37) + 1
}

/// The harness itself: a good hand-built post-copy stream (pre-copy pages,
/// discards, the largest device state, pages placed after the switch, the
/// end) is accepted, and places exactly the discarded pages.
#[test]
fn a_hand_built_postcopy_stream_is_accepted() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    all_pages(&mut s, |_, _| 0x11);
    record(
        &mut s,
        Record::Discard {
            block: BAD_RAM,
            first: 3,
            count: 2,
        },
    );
    record(
        &mut s,
        Record::Discard {
            block: BAD_HUGE,
            first: PER_HUGE,
            count: PER_HUGE as u32,
        },
    );
    // Larger than the receiver's buffer: the sink gets it in pieces.
    let state = seeded_bytes(7, BOUNCE_BYTES + 4097);
    postcopy(&mut s, &state);
    pages(&mut s, BAD_RAM, 3, 2, |p| content(BAD_RAM, p));
    // Hugepage 1 in three runs, one of them zero.
    pages(&mut s, BAD_HUGE, PER_HUGE, 64, |p| content(BAD_HUGE, p));
    record(
        &mut s,
        Record::Zero {
            block: BAD_HUGE,
            first: PER_HUGE + 64,
            count: 64,
        },
    );
    for first in (PER_HUGE + 128..2 * PER_HUGE).step_by(64) {
        pages(&mut s, BAD_HUGE, first, 64, |p| content(BAD_HUGE, p));
    }
    record(&mut s, Record::End { count: 3 });
    let expected = |block: u32, page: u64| match (block, page) {
        (BAD_RAM, 3..=4) => content(block, page),
        (BAD_HUGE, p) if (PER_HUGE + 64..PER_HUGE + 128).contains(&p) => 0,
        (BAD_HUGE, p) if p >= PER_HUGE => content(block, page),
        _ => 0x11,
    };
    s.extend_from_slice(&checksums(expected));
    let (result, target, in_postcopy) = receive_one(&list, &s);
    let summary = result.unwrap();
    assert_eq!(summary.discarded, 2 + PER_HUGE);
    assert_eq!(summary.postcopy_pages, 2 + PER_HUGE);
    assert_eq!(target.starts, vec![(state, table_names())]);
    assert_eq!(
        target.placed,
        vec![
            ("ram".to_string(), 3 * PAGE, 2 * PAGE),
            ("huge".to_string(), HUGE, HUGE),
        ],
        "4 KiB pages as they come, the hugepage once whole"
    );
    assert!(!in_postcopy, "the end closes post-copy");
}

#[test]
fn a_discard_after_postcopy_started_is_out_of_place() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    record(&mut s, Record::Postcopy { sections: 0 });
    record(
        &mut s,
        Record::Discard {
            block: BAD_RAM,
            first: 0,
            count: 1,
        },
    );
    let (result, target, in_postcopy) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::OutOfPlace {
            record: "discard",
            why: "post-copy has started",
        }
    );
    assert_eq!(target.starts.len(), 1);
    assert!(in_postcopy);
    assert_eq!(touched_pages(&list), vec![], "nothing was discarded");
}

#[test]
fn a_second_postcopy_record_is_out_of_place() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    postcopy(&mut s, b"ab");
    postcopy(&mut s, b"cd");
    let (result, target, _) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::OutOfPlace {
            record: "post-copy",
            why: "post-copy has started already",
        }
    );
    assert_eq!(
        target.starts,
        vec![(b"ab".to_vec(), table_names())],
        "the guest started once"
    );
    assert!(target.placed.is_empty());
}

#[test]
fn too_much_device_state_is_refused_before_the_guest_starts() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    // The same bound as pre-copy's sections, checked at the header.
    record(&mut s, Record::Postcopy { sections: 1 });
    let mut raw = [0u8; SectionHeader::ENCODED_LEN];
    cpu_header(DEFAULT_DEVICE_STATE_LIMIT).encode(&mut raw);
    s.extend_from_slice(&raw);
    let (result, target, in_postcopy) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::DeviceStateOverLimit {
            total: DEFAULT_DEVICE_STATE_LIMIT + SectionHeader::ENCODED_LEN as u64,
            limit: DEFAULT_DEVICE_STATE_LIMIT,
        }
    );
    assert!(target.starts.is_empty());
    assert!(!in_postcopy);
}

#[test]
fn a_refused_section_in_the_postcopy_record_starts_no_guest() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    // The cpu section is taken, the second one (no such device) refused.
    record(&mut s, Record::Postcopy { sections: 2 });
    let mut raw = [0u8; SectionHeader::ENCODED_LEN];
    cpu_header(4).encode(&mut raw);
    s.extend_from_slice(&raw);
    s.extend_from_slice(b"regs");
    SectionHeader {
        name: SectionName::new("net").unwrap(),
        ..cpu_header(1)
    }
    .encode(&mut raw);
    s.extend_from_slice(&raw);
    s.push(7);
    let (result, target, in_postcopy) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::SectionRefused {
            index: 1,
            name: SectionName::new("net").unwrap(),
            instance_id: 0,
            code: 1,
        }
    );
    assert!(target.starts.is_empty(), "the guest never started here");
    assert!(!in_postcopy);
}

#[test]
fn a_plain_receive_refuses_postcopy() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    postcopy(&mut s, b"regs");
    let (mut results, target, in_postcopy) = receive_streams(&list, &[&s], true, HUGE as usize);
    assert_eq!(
        results.remove(0).unwrap_err(),
        ReceiveError::PostcopyUnsupported
    );
    assert!(target.starts.is_empty());
    assert!(!in_postcopy);
}

#[test]
fn resume_headers_need_a_postcopy_waiting_and_new_streams_need_none() {
    let list = bad_dest();
    let mut resume = vec![];
    table(&mut resume, true);
    // Nothing to resume.
    let (result, target, _) = receive_one(&list, &resume);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::OutOfPlace {
            record: "resume header",
            why: "no post-copy migration is waiting to be resumed",
        }
    );
    assert_eq!(target.resumes, 0);
    // A post-copy that broke: a new stream is refused, a resumed one goes on.
    let mut broken = vec![];
    table(&mut broken, false);
    record(&mut broken, Record::Postcopy { sections: 0 });
    let mut fresh = vec![];
    table(&mut fresh, false);
    let (results, target, in_postcopy) =
        receive_streams(&list, &[&broken, &fresh, &resume], false, HUGE as usize);
    assert_eq!(results[0], Err(ReceiveError::Truncated));
    assert_eq!(
        results[1],
        Err(ReceiveError::OutOfPlace {
            record: "stream header",
            why: "a new stream cannot start while a post-copy waits to be resumed",
        })
    );
    assert_eq!(
        results[2],
        Err(ReceiveError::Truncated),
        "resumed, then cut"
    );
    assert_eq!(target.resumes, 1);
    assert!(in_postcopy);
}

#[test]
fn a_resume_without_the_issued_token_is_refused_before_its_table() {
    let list = bad_dest();
    let mut broken = vec![];
    table(&mut broken, false);
    record(&mut broken, Record::Postcopy { sections: 0 });
    // A hijacker: the right header and table, another token.
    let mut wrong = vec![];
    table_with_token(&mut wrong, true, &ResumeToken(*b"a guessed token!"));
    // One that stops inside the token.
    let mut cut = vec![];
    table(&mut cut, true);
    cut.truncate(16 + 5);
    // A resume header of version 1 (no token) is a version this build no
    // longer reads for a resume.
    let mut old = vec![];
    Header::new(3).write(&mut old).unwrap();
    old[..8].copy_from_slice(b"RBRESUME");
    old[8..10].copy_from_slice(&1u16.to_le_bytes());
    let mut resume = vec![];
    table(&mut resume, true);
    let (results, target, in_postcopy) = receive_streams(
        &list,
        &[&broken, &wrong, &cut, &old, &resume],
        false,
        HUGE as usize,
    );
    assert_eq!(results[0], Err(ReceiveError::Truncated));
    assert_eq!(results[1], Err(ReceiveError::BadResumeToken));
    assert_eq!(results[2], Err(ReceiveError::Truncated));
    assert_eq!(results[3], Err(ReceiveError::UnsupportedVersion(1)));
    assert_eq!(
        results[4],
        Err(ReceiveError::Truncated),
        "the real source resumed, then was cut"
    );
    assert_eq!(target.resumes, 1, "only the real source resumed");
    assert!(in_postcopy, "the refused peers ended nothing");
}

#[test]
fn a_hugepage_discard_must_cover_whole_hugepages() {
    for (first, count) in [
        (0, 1),
        (1, PER_HUGE as u32 - 1),
        (PER_HUGE, PER_HUGE as u32 - 1),
    ] {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        record(
            &mut s,
            Record::Discard {
                block: BAD_HUGE,
                first,
                count,
            },
        );
        let (result, _, _) = receive_one(&list, &s);
        assert_eq!(
            result.unwrap_err(),
            ReceiveError::NotWholeHostPages {
                name: bn("huge"),
                first,
                page_size: HUGE,
            },
            "discard {first}..+{count}"
        );
        assert_eq!(touched_pages(&list), vec![], "nothing was discarded");
    }
}

#[test]
fn a_hugepage_run_must_start_or_continue_a_hugepage() {
    /// Runs sent before (first page, count), then the bad run's first page
    /// and count.
    type Case = (&'static [(u64, u32)], u64, u32);
    let cases: [Case; 4] = [
        (&[], 3, 1),
        (&[], PER_HUGE + 5, 2),
        (&[(0, 64)], 65, 1),
        (&[(0, 64)], PER_HUGE + 64, 1),
    ];
    for (before, first, count) in cases {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        all_pages(&mut s, |_, _| GUARD);
        record(
            &mut s,
            Record::Discard {
                block: BAD_HUGE,
                first: 0,
                count: 2 * PER_HUGE as u32,
            },
        );
        record(&mut s, Record::Postcopy { sections: 0 });
        for &(f, c) in before {
            pages(&mut s, BAD_HUGE, f, c, |_| 0x77);
        }
        pages(&mut s, BAD_HUGE, first, count, |_| 0x77);
        let (result, target, _) = receive_one(&list, &s);
        assert_eq!(
            result.unwrap_err(),
            ReceiveError::NotWholeHostPages {
                name: bn("huge"),
                first,
                page_size: HUGE,
            },
            "{before:?} then {first}..+{count}"
        );
        assert!(target.placed.is_empty(), "no hugepage was placed");
        // The discard zeroed "huge"; nothing else was written.
        let touched = touched_pages(&list);
        assert!(
            touched.iter().all(|(n, _)| n == "huge") && touched.len() as u64 == 2 * PER_HUGE,
            "{:?}",
            &touched[..touched.len().min(4)]
        );
        let view = list.read();
        assert!(view
            .by_name("huge")
            .unwrap()
            .region()
            .is_zero(ByteLen::ZERO, (2 * HUGE) as usize)
            .unwrap());
    }
}

#[test]
fn an_end_with_pages_still_missing_is_refused() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    all_pages(&mut s, |_, _| 0x22);
    record(
        &mut s,
        Record::Discard {
            block: BAD_RAM,
            first: 2,
            count: 1,
        },
    );
    record(&mut s, Record::Postcopy { sections: 0 });
    record(&mut s, Record::End { count: 3 });
    s.extend_from_slice(&checksums(|_, _| 0x22));
    let (result, target, _) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::MissingAtEnd {
            name: bn("ram"),
            page: 2,
        }
    );
    assert!(target.placed.is_empty());
}

#[test]
fn postcopy_records_past_the_postcopy_length_are_refused() {
    // A post-copy run.
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    record(&mut s, Record::Postcopy { sections: 0 });
    pages(&mut s, BAD_SHORT, 6, 4, |_| 0x33);
    let (result, target, _) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::PastPostcopyLength {
            name: bn("short"),
            first: 6,
            count: 4,
            postcopy_pages: SHORT_POSTCOPY,
        }
    );
    assert!(target.placed.is_empty());
    assert_eq!(touched_pages(&list), vec![]);
    // A discard.
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    record(
        &mut s,
        Record::Discard {
            block: BAD_SHORT,
            first: SHORT_POSTCOPY,
            count: 1,
        },
    );
    let (result, _, _) = receive_one(&list, &s);
    assert_eq!(
        result.unwrap_err(),
        ReceiveError::PastPostcopyLength {
            name: bn("short"),
            first: SHORT_POSTCOPY,
            count: 1,
            postcopy_pages: SHORT_POSTCOPY,
        }
    );
    assert_eq!(touched_pages(&list), vec![], "nothing was discarded");
}

/// A pre-copy run that crosses a block's post-copy length must still count
/// its pages below that length as received. Failed before the fix: the
/// receiver's `write_run` called `received.mark_received(first, count)` for
/// the whole run, which the received map refuses as a whole (the run ends
/// past the post-copy length), so pages 0..8 of "short" stayed "missing" and
/// the end reported `MissingAtEnd`.
#[test]
fn a_precopy_run_across_the_postcopy_length_counts_as_received() {
    let list = bad_dest();
    let mut s = vec![];
    table(&mut s, false);
    pages(&mut s, BAD_RAM, 0, 16, |_| 0x44);
    for first in (0..2 * PER_HUGE).step_by(64) {
        pages(&mut s, BAD_HUGE, first, 64, |_| 0x44);
    }
    // One run over all of "short", as the engine's pass 0 sends it.
    pages(&mut s, BAD_SHORT, 0, 16, |_| 0x44);
    record(&mut s, Record::Postcopy { sections: 0 });
    record(&mut s, Record::End { count: 3 });
    s.extend_from_slice(&checksums(|_, _| 0x44));
    let (result, _, _) = receive_one(&list, &s);
    assert_eq!(result.map(|r| r.blocks), Ok(3));
}

#[test]
fn a_hugepage_block_needs_a_large_enough_assembly_buffer() {
    for buffer in [0, HUGE as usize / 2] {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        record(&mut s, Record::Postcopy { sections: 0 });
        let (mut results, target, in_postcopy) = receive_streams(&list, &[&s], false, buffer);
        assert_eq!(
            results.remove(0).unwrap_err(),
            ReceiveError::HugepageBufferTooSmall {
                name: bn("huge"),
                page_size: HUGE,
                buffer: buffer as u64,
            }
        );
        assert!(target.starts.is_empty(), "the guest did not start");
        assert!(!in_postcopy);
    }
}

/// The attack: a `Discard` in a stream that never switched to post-copy
/// zeroed pages the end checksum (or a ledger) vouched for. Discards come
/// only just before the `Postcopy` record: anything else after one is out
/// of place.
#[test]
fn a_discard_not_followed_by_postcopy_is_out_of_place() {
    for (next, name) in [
        (Record::End { count: 3 }, "end"),
        (
            Record::Zero {
                block: BAD_RAM,
                first: 3,
                count: 1,
            },
            "zero",
        ),
        (
            Record::Sync {
                pass: 1,
                remaining: 0,
            },
            "sync",
        ),
    ] {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        record(
            &mut s,
            Record::Discard {
                block: BAD_RAM,
                first: 3,
                count: 1,
            },
        );
        record(&mut s, next);
        s.extend_from_slice(&checksums(|_, _| GUARD));
        let (result, target, in_postcopy) = receive_one(&list, &s);
        assert_eq!(
            result.unwrap_err(),
            ReceiveError::OutOfPlace {
                record: name,
                why: "only discards and the post-copy record may follow a discard",
            },
            "{next:?}"
        );
        assert!(target.starts.is_empty() && !in_postcopy);
    }
}

/// The attack: after the switch, a `Pages` record for a page already
/// present was recorded in the ledger while userfaultfd kept the old page,
/// so the receive verified memory it did not hold. A page is placed once;
/// a second record for it is refused (re-placing it would also undo what
/// the guest, running here, wrote to it since).
#[test]
fn a_page_placed_twice_after_the_switch_is_refused() {
    // (page placed after the switch first, then the record that repeats a
    // present page): a page placed in post-copy, and a page that arrived
    // in pre-copy and was never discarded.
    for (again, is_zero) in [(3, false), (3, true), (5, false)] {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        all_pages(&mut s, |_, _| 0x11);
        record(
            &mut s,
            Record::Discard {
                block: BAD_RAM,
                first: 3,
                count: 1,
            },
        );
        record(&mut s, Record::Postcopy { sections: 0 });
        pages(&mut s, BAD_RAM, 3, 1, |_| 0x22);
        if is_zero {
            record(
                &mut s,
                Record::Zero {
                    block: BAD_RAM,
                    first: again,
                    count: 1,
                },
            );
        } else {
            pages(&mut s, BAD_RAM, again, 1, |_| 0x33);
        }
        let (result, target, _) = receive_one(&list, &s);
        assert_eq!(
            result.unwrap_err(),
            ReceiveError::AlreadyPlaced {
                name: bn("ram"),
                page: again,
            },
            "page {again}, zero: {is_zero}"
        );
        assert_eq!(
            target.placed,
            vec![("ram".to_string(), 3 * PAGE, PAGE)],
            "placed once"
        );
        let mut page = vec![0u8; PAGE as usize];
        let view = list.read();
        view.by_name("ram")
            .unwrap()
            .read(ByteLen(again * PAGE), &mut page)
            .unwrap();
        let want = if again == 3 { 0x22 } else { 0x11 };
        assert!(
            page.iter().all(|&b| b == want),
            "memory kept the first copy"
        );
    }
}

/// A table entry for `table_of`: name, used length, page size, flags.
type Entry = (&'static str, u64, u64, u32);

fn table_of(out: &mut Vec<u8>, resume: bool, entries: &[Entry]) {
    let header = Header::new(entries.len() as u32);
    if resume {
        header.write_resume(&TOKEN, out).unwrap();
    } else {
        header.write(out).unwrap();
    }
    for &(name, used_length, page_size, flags) in entries {
        TableEntry {
            used_length,
            page_size,
            flags,
        }
        .write(name, out)
        .unwrap();
    }
}

/// The attack: a resumed table was matched by name only, so it could
/// reorder the table under the ledger, resize a resizable block during
/// post-copy or add a block userfaultfd never registered. It must repeat
/// the original exactly; each difference is refused before anything
/// changes, and the post-copy still waits for a good resume.
#[test]
fn a_resumed_table_that_differs_from_the_original_is_refused() {
    let list = bad_dest();
    // A resizable block, so the attack's resize has something to resize.
    add_buffer_block(
        &list,
        BlockSpec::new(bn("grow"), ByteLen(8 * PAGE)).resizable(ByteLen(16 * PAGE)),
        GUARD,
    );
    let flags = BlockFlags::MIGRATABLE.bits();
    let original: [Entry; 4] = [
        ("ram", 16 * PAGE, PAGE, flags),
        ("huge", 2 * HUGE, HUGE, flags),
        ("short", 16 * PAGE, PAGE, flags),
        ("grow", 8 * PAGE, PAGE, flags | BlockFlags::RESIZABLE.bits()),
    ];
    let mut broken = vec![];
    table_of(&mut broken, false, &original);
    record(&mut broken, Record::Postcopy { sections: 0 });
    let mut resumes = vec![broken];
    let mut expected = vec![Err(ReceiveError::Truncated)];
    let mut bad = |entries: Vec<Entry>, index: u32, what: &'static str| {
        let mut s = vec![];
        table_of(&mut s, true, &entries);
        resumes.push(s);
        expected.push(Err(ReceiveError::ResumeTableMismatch { index, what }));
    };
    // Reordered.
    bad(
        vec![original[1], original[0], original[2], original[3]],
        0,
        "block",
    );
    // A resizable block resized.
    let mut grown = original;
    grown[3].1 = 16 * PAGE;
    bad(grown.to_vec(), 3, "used length");
    // Another page size (the destination's matches, so only the original
    // tells).
    let mut paged = original;
    paged[0].2 = HUGE;
    bad(paged.to_vec(), 0, "page size");
    // Other flags.
    let mut flagged = original;
    flagged[2].3 = 0;
    bad(flagged.to_vec(), 2, "flags");
    // A block left out, a block added.
    bad(original[..3].to_vec(), 3, "block count");
    let mut more = original.to_vec();
    more.push(("extra", PAGE, PAGE, 0));
    bad(more, 4, "block count");
    // The original itself resumes.
    let mut good = vec![];
    table_of(&mut good, true, &original);
    resumes.push(good);
    expected.push(Err(ReceiveError::Truncated));
    let streams: Vec<&[u8]> = resumes.iter().map(|s| s.as_slice()).collect();
    let (results, target, in_postcopy) = receive_streams(&list, &streams, false, HUGE as usize);
    assert_eq!(results, expected);
    assert_eq!(target.resumes, 1, "only the original resumed");
    assert!(in_postcopy, "the post-copy still waits");
    let view = list.read();
    assert_eq!(
        view.by_name("grow").unwrap().used_length(),
        ByteLen(8 * PAGE),
        "nothing was resized"
    );
}

/// The attack: a post-copy run that started a new hugepage silently
/// dropped the one half assembled, whose pages were then never placed.
#[test]
fn a_hugepage_left_half_assembled_is_refused() {
    // Runs: the first half of hugepage 0, then hugepage 1 of the same
    // block, or a run that starts hugepage 0 again.
    for (next, first_next) in [(PER_HUGE, 64u32), (0, 64)] {
        let list = bad_dest();
        let mut s = vec![];
        table(&mut s, false);
        all_pages(&mut s, |_, _| GUARD);
        record(
            &mut s,
            Record::Discard {
                block: BAD_HUGE,
                first: 0,
                count: 2 * PER_HUGE as u32,
            },
        );
        record(&mut s, Record::Postcopy { sections: 0 });
        pages(&mut s, BAD_HUGE, 0, 64, |_| 0x77);
        pages(&mut s, BAD_HUGE, next, first_next, |_| 0x78);
        let (result, target, _) = receive_one(&list, &s);
        assert_eq!(
            result.unwrap_err(),
            ReceiveError::HugepageIncomplete {
                name: bn("huge"),
                first: 0,
                arrived: 64,
            },
            "then {next}..+{first_next}"
        );
        assert!(target.placed.is_empty(), "no hugepage was placed");
    }
}

// ---------------------------------------------------------------------------
// 5: bad requests on the sending side

#[test]
fn a_bad_page_request_ends_the_migration_and_the_source_stays_paused() {
    // The table is "pc.ram" (0), "hugeram" (1).
    let bad = [
        // Block indices past the table.
        PageRequest {
            block: 2,
            first: 0,
            count: 1,
        },
        PageRequest {
            block: u32::MAX,
            first: 0,
            count: 1,
        },
        // Pages past the used length: across its end, at it, overflowing.
        PageRequest {
            block: 0,
            first: RAM_PAGES - 1,
            count: 2,
        },
        PageRequest {
            block: 1,
            first: HUGEPAGES * PER_HUGE,
            count: 1,
        },
        PageRequest {
            block: 0,
            first: u64::MAX,
            count: 1,
        },
        PageRequest {
            block: 0,
            first: 0,
            count: 0,
        },
    ];
    for (i, request) in bad.into_iter().enumerate() {
        let o = run(&Scenario {
            seed: 10 + i as u64,
            postcopy_after: 1,
            writer: true,
            dirty_after_pass_0: true,
            wait_first_request: true,
            first_request: Some(request),
            ..Scenario::default()
        });
        match &o.migrated {
            Err(MigrateError::BadRequest(r)) => assert_eq!(*r, request),
            other => panic!("{request:?}: expected BadRequest, got {other:?}"),
        }
        assert_eq!(
            o.source_events,
            ["pause", "device_state", "postcopy"],
            "{request:?}: paused, never resumed after the post-copy record"
        );
        assert_eq!(o.target.starts, 1, "the destination took the guest");
        assert!(o.dest.result.is_err(), "{:?}", o.dest.result);
        assert_eq!(
            first_difference(&o.source_after, &o.at_switch),
            None,
            "the paused source kept its memory"
        );
    }
}
