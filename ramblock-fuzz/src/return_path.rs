//! The source's reading of the return path (page requests, acks, received
//! maps) against a model of the engine's post-copy loop.
//!
//! The source has two blocks: `ram` (24 pages of 4 KiB) and `huge` (16
//! target pages in 16 KiB host pages). The real engine ([`migrate`]) starts
//! post-copy at once, so every page is discarded and sent after the switch.
//! Its host reads the return path from bytes, with the real parsers: each
//! connection is messages ([`ReturnMessage::read`]: requests valid and
//! not, `RBOK`, `RBOK` with a code, `RBER`, the pre-copy end's `RBSR`,
//! `RBRN` and `RBNR`, garbage, torn messages) with
//! pauses between them (nothing to read just then); a connection's end is
//! a broken connection, and the next one, if any, is a resume that starts
//! with a received map ([`read_received_map`]) written from a set of
//! missing pages, possibly with one bit flipped or cut short.
//!
//! The model walks the same messages the way the engine's documentation
//! says (`ramblock_core::migrate::postcopy`): at most
//! [`REQUESTS_PER_BACKGROUND`] requests between background chunks, a
//! request for pages all sent already is dropped, a bad request or an ack
//! before the end fails the migration, after the end requests are counted
//! until the ack; a broken connection resumes with the pages the map says
//! are missing, a map that does not read makes the engine reconnect. It
//! predicts the outcome and, on success, every counter of
//! [`PostcopyStats`]; when the migration succeeded on its first connection,
//! the stream it wrote is received by the real receiver and must leave the
//! destination equal to the source.

use crate::receive_model::PAGE;
use crate::stream_roundtrip::{Mem, CAPACITY};
use crate::{holds, same, Mismatch, Ops};
use arbitrary::Arbitrary;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::{BufferError, BufferMemory};
use ramblock_core::dirty_log::SoftwareOnly;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::migrate::postcopy::{BACKGROUND_CHUNK_PAGES, REQUESTS_PER_BACKGROUND};
use ramblock_core::migrate::{
    migrate, MigrateError, MigrationHost, PostcopyStats, PostcopyTarget, PrecopyConfig, Receiver,
    ReturnEvent,
};
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{
    PageRequest, ReturnMessage, ACK_ERR, ACK_OK, ACK_SECTION, NOT_RUNNING, RUNNING,
};
use ramblock_core::stream::io::{ByteWrite, SliceReader};
use ramblock_core::stream::received_map::{read_received_map, scratch_words, write_received_map};
use std::cell::RefCell;
use std::convert::Infallible;
use std::ops::Range;
use std::rc::Rc;

type List = RamList<'static, Mem, Owned, CAPACITY>;

/// The source's blocks: name, pages, target pages per host page.
const BLOCKS: [(&str, u64, u64); 2] = [("ram", 24, 1), ("huge", 16, 4)];

/// One message on the return path.
#[derive(Arbitrary, Clone, Debug)]
pub enum Msg {
    /// A page request: block `block % 3` (2 is past the table), first page
    /// `first % 30` (255: `u64::MAX`), `count % 6` pages (255: the block).
    Request {
        /// Block index seed.
        block: u8,
        /// First page seed.
        first: u8,
        /// Count seed.
        count: u8,
    },
    /// `RBOK` with code 0.
    Ok,
    /// `RBOK` with a code (0 is an `Ok`; any other names no message).
    OkWithCode(u8),
    /// `RBER` with a code.
    Refused(u8),
    /// Four bytes that name no message (the connection is dropped).
    Garbage(u8),
    /// The first `1 + n % 19` bytes of a request, then the connection ends.
    Torn(u8),
    /// Nothing to read just now.
    Wait,
    /// `RBSR`: a section refusal (index, code), which a post-copy never
    /// has: no answer the engine takes.
    SectionRefused(u8),
    /// The pre-copy handover (`RBRN` 0 for 0, else `RBNR` and the code),
    /// which a post-copy never has: no answer the engine takes.
    Handover(u8),
}

/// A resumed connection: the received map it starts with, then messages.
#[derive(Arbitrary, Clone, Debug)]
pub struct Connection {
    /// Missing pages of `ram` (bit per page).
    pub ram_missing: u32,
    /// Missing pages of `huge` (bit per target page).
    pub huge_missing: u16,
    /// Flip this bit of the map (modulo its bits), or cut it there.
    pub corrupt: Option<(u16, bool)>,
    /// Messages after the map.
    pub msgs: Vec<Msg>,
}

/// The whole input.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Messages on the first connection.
    pub first: Vec<Msg>,
    /// Connections after each break (at most three are used).
    pub resumes: Ops<Connection>,
}

/// What a message is once read.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Event {
    Request(PageRequest),
    AckOk,
    AckErr(u32),
    /// The connection ends here (garbage, a torn message, or its end).
    Closed,
    /// A message of the pre-copy end (`RBSR`, `RBRN`, `RBNR`).
    PrecopyOnly,
    Nothing,
}

impl Msg {
    fn request(block: u8, first: u8, count: u8) -> PageRequest {
        let block = u32::from(block % 3);
        let pages = BLOCKS.get(block as usize).map_or(8, |b| b.1);
        PageRequest {
            block,
            first: if first == 255 {
                u64::MAX
            } else {
                u64::from(first % 30)
            },
            count: if count == 255 {
                pages as u32
            } else {
                u32::from(count % 6)
            },
        }
    }

    /// The bytes and what the model reads in them.
    fn encode(&self, out: &mut Vec<u8>) -> Event {
        match *self {
            Msg::Request {
                block,
                first,
                count,
            } => {
                let r = Msg::request(block, first, count);
                let _ = r.write(out);
                Event::Request(r)
            }
            Msg::Ok => {
                out.extend_from_slice(&ACK_OK);
                out.extend_from_slice(&0u32.to_le_bytes());
                Event::AckOk
            }
            Msg::OkWithCode(c) => {
                out.extend_from_slice(&ACK_OK);
                out.extend_from_slice(&u32::from(c).to_le_bytes());
                if c == 0 {
                    Event::AckOk
                } else {
                    Event::Closed
                }
            }
            Msg::Refused(c) => {
                out.extend_from_slice(&ACK_ERR);
                out.extend_from_slice(&u32::from(c).to_le_bytes());
                Event::AckErr(u32::from(c))
            }
            Msg::Garbage(b) => {
                out.extend_from_slice(&[b'X', b'X', b, b]);
                Event::Closed
            }
            Msg::Torn(n) => {
                let mut whole = Vec::new();
                let _ = Msg::request(n, n, n).write(&mut whole);
                out.extend_from_slice(&whole[..1 + usize::from(n % 19)]);
                Event::Closed
            }
            Msg::Wait => Event::Nothing,
            Msg::SectionRefused(c) => {
                out.extend_from_slice(&ACK_SECTION);
                out.extend_from_slice(&u32::from(c % 3).to_le_bytes());
                out.extend_from_slice(&u32::from(c).to_le_bytes());
                Event::PrecopyOnly
            }
            Msg::Handover(c) => {
                out.extend_from_slice(if c == 0 { &RUNNING } else { &NOT_RUNNING });
                out.extend_from_slice(&u32::from(c).to_le_bytes());
                Event::PrecopyOnly
            }
        }
    }
}

/// A connection's bytes, split where the host has nothing to read.
#[derive(Clone, Debug, Default)]
struct Wire {
    map: Option<Vec<u8>>,
    items: Vec<Option<Vec<u8>>>,
    at: usize,
    pos: usize,
    dead: bool,
}

impl Wire {
    /// Encodes `msgs`; returns the wire and the events the model reads.
    fn new(map: Option<Vec<u8>>, msgs: &[Msg]) -> (Wire, Vec<Event>) {
        let mut wire = Wire {
            map,
            ..Wire::default()
        };
        let mut events = Vec::new();
        let mut bytes = Vec::new();
        for m in msgs.iter().take(64) {
            if matches!(m, Msg::Wait) {
                wire.items.push(Some(std::mem::take(&mut bytes)));
                wire.items.push(None);
                events.push(Event::Nothing);
                continue;
            }
            let e = m.encode(&mut bytes);
            events.push(e);
            if e == Event::Closed {
                break;
            }
        }
        wire.items.push(Some(bytes));
        (wire, events)
    }

    fn next(&mut self) -> ReturnEvent {
        if self.dead {
            return ReturnEvent::Closed;
        }
        loop {
            let Some(item) = self.items.get(self.at) else {
                self.dead = true;
                return ReturnEvent::Closed;
            };
            let Some(bytes) = item else {
                self.at += 1;
                return ReturnEvent::Nothing;
            };
            if self.pos == bytes.len() {
                self.at += 1;
                self.pos = 0;
                continue;
            }
            let mut r = SliceReader::new(&bytes[self.pos..]);
            let got = ReturnMessage::read(&mut r);
            self.pos = bytes.len() - r.remaining();
            return match got {
                Ok(Ok(m)) => ReturnEvent::Message(m),
                _ => {
                    self.dead = true;
                    ReturnEvent::Closed
                }
            };
        }
    }
}

/// The engine's output, one stream per connection.
#[derive(Clone, Default)]
struct Out(Rc<RefCell<Vec<Vec<u8>>>>);

impl ByteWrite for Out {
    type Error = Infallible;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Infallible> {
        if let Some(last) = self.0.borrow_mut().last_mut() {
            last.extend_from_slice(buf);
        }
        Ok(())
    }
    fn flush(&mut self) -> Result<(), Infallible> {
        Ok(())
    }
}

/// The source's host: a fake clock and the connections' wires.
struct Host<'l> {
    list: &'l List,
    clock: u64,
    wires: Vec<Wire>,
    at: usize,
    out: Out,
}

impl MigrationHost for Host<'_> {
    fn now_ns(&mut self) -> u64 {
        self.clock += 1_000;
        self.clock
    }
    fn sleep_ns(&mut self, ns: u64) {
        self.clock += ns;
    }
    fn pause_guest(&mut self) {}
    fn resume_guest(&mut self) {}
    fn set_throttle(&mut self, _: u8) {}
    fn return_message(&mut self, _wait_ns: u64) -> ReturnEvent {
        match self.wires.get_mut(self.at) {
            Some(w) => w.next(),
            None => ReturnEvent::Closed,
        }
    }
    fn reconnect(&mut self) -> bool {
        if self.at + 1 >= self.wires.len() {
            return false;
        }
        self.at += 1;
        self.out.0.borrow_mut().push(Vec::new());
        true
    }
    fn received_map(&mut self, missing: &mut dyn FnMut(&str, Range<u64>)) -> bool {
        let Some(map) = self.wires.get(self.at).and_then(|w| w.map.clone()) else {
            return false;
        };
        let mut runs = Vec::new();
        let read = {
            let view = self.list.read();
            let mut scratch = vec![0u64; scratch_words(&view)];
            read_received_map(&mut SliceReader::new(&map), &view, &mut scratch, |b, r| {
                runs.push((b.name().to_string(), r))
            })
        };
        if read.is_err() {
            return false;
        }
        for (name, r) in runs {
            missing(&name, r);
        }
        true
    }
}

/// A list of the source's blocks, page `p` of block `b` holding
/// `content(b, p)` (zero pages included).
fn list(content: impl Fn(usize, u64) -> u8) -> Result<List, Mismatch> {
    let harness = |e: String| Mismatch {
        step: None,
        what: format!("harness: {e}"),
    };
    let list = List::new();
    for (b, &(name, pages, per)) in BLOCKS.iter().enumerate() {
        let mut buf = vec![0u8; pages as usize * PAGE].into_boxed_slice();
        for (p, page) in buf.chunks_mut(PAGE).enumerate() {
            page.fill(content(b, p as u64));
        }
        let size = PageSize::new(per * PAGE as u64).map_err(|e| harness(e.to_string()))?;
        let len = ByteLen(pages * PAGE as u64);
        let mem = BufferMemory::new(buf, len, size).map_err(|e| harness(e.to_string()))?;
        let spec = BlockSpec::new(
            BlockName::new(name).map_err(|e| harness(e.to_string()))?,
            len,
        )
        .flags(BlockFlags::MIGRATABLE);
        let bitmaps = BlockBitmaps::for_spec(&spec).map_err(|e| harness(e.to_string()))?;
        list.add(spec, mem, bitmaps)
            .map_err(|e| harness(e.to_string()))?;
    }
    Ok(list)
}

/// The source's content: every fifth page zero.
fn content(b: usize, p: u64) -> u8 {
    if p % 5 == 2 {
        0
    } else {
        (b as u8 * 64 + p as u8) | 1
    }
}

/// The received map a destination missing these pages sends.
fn map_bytes(c: &Connection) -> Result<(Vec<u8>, Vec<Vec<bool>>), Mismatch> {
    let dest = list(|_, _| 0)?;
    let missing: Vec<Vec<bool>> = vec![
        (0..24).map(|p| c.ram_missing >> p & 1 == 1).collect(),
        (0..16).map(|p| c.huge_missing >> p & 1 == 1).collect(),
    ];
    let view = dest.read();
    for (b, block) in view.iter().enumerate() {
        for (p, &m) in missing[b].iter().enumerate() {
            if !m {
                let _ = block.received().mark_received(p, 1);
            }
        }
    }
    let mut out = Vec::new();
    let _ = write_received_map(&mut out, &view);
    if let Some((bit, cut)) = c.corrupt {
        let at = usize::from(bit) % (out.len() * 8);
        if cut {
            out.truncate(at / 8);
        } else {
            out[at / 8] ^= 1 << (at % 8);
        }
    }
    Ok((out, missing))
}

/// How the model says the migration ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged, with these counters.
    Done(PostcopyStats),
    /// A request for pages that do not exist.
    BadRequest(PageRequest),
    /// An ack before the end.
    BadAck,
    /// `RBER` with this code after the end.
    Refused(u32),
    /// No connection left to resume on.
    Lost,
}

/// A resume the model can take: the events after the map, and the missing
/// pages (`None`: the map does not read).
type Resume = (Vec<Event>, Option<Vec<Vec<bool>>>);

/// The model of the engine's post-copy loop.
struct Engine {
    dirty: Vec<Vec<bool>>,
    cursor: (usize, usize),
    pc: PostcopyStats,
    events: Vec<Event>,
    next: usize,
}

enum Stop {
    Broken,
    Fatal(Outcome),
}

impl Engine {
    fn event(&mut self) -> Event {
        let e = self.events.get(self.next).copied().unwrap_or(Event::Closed);
        if e != Event::Closed {
            self.next += 1;
        }
        e
    }

    fn per(b: usize) -> usize {
        BLOCKS[b].2 as usize
    }

    fn used(b: usize) -> usize {
        BLOCKS[b].1 as usize
    }

    fn send(&mut self, b: usize, start: usize, end: usize) -> u64 {
        let end = end.min(Self::used(b));
        let mut n = 0;
        for p in start..end {
            if std::mem::take(&mut self.dirty[b][p]) {
                n += 1;
            }
        }
        n
    }

    fn answer(&mut self) -> Result<(), Stop> {
        for _ in 0..REQUESTS_PER_BACKGROUND {
            match self.event() {
                Event::Nothing => break,
                Event::Request(r) => {
                    self.pc.requests += 1;
                    let bad = Stop::Fatal(Outcome::BadRequest(r));
                    let b = r.block as usize;
                    if b >= BLOCKS.len() {
                        return Err(bad);
                    }
                    let first = r.first as usize;
                    let Some(end) = first
                        .checked_add(r.count as usize)
                        .filter(|&e| r.count > 0 && e <= Self::used(b))
                    else {
                        return Err(bad);
                    };
                    let per = Self::per(b);
                    let start = first - first % per;
                    let end = (end.div_ceil(per) * per).min(Self::used(b));
                    if !self.dirty[b][start..end].contains(&true) {
                        self.pc.duplicate_requests += 1;
                        continue;
                    }
                    self.pc.requested_pages += self.send(b, start, end);
                    self.cursor = (b, end);
                }
                // A refusal says why (and whether the destination ever
                // started the guest); anything else is no answer here.
                Event::AckErr(c) => return Err(Stop::Fatal(Outcome::Refused(c))),
                Event::AckOk | Event::PrecopyOnly => return Err(Stop::Fatal(Outcome::BadAck)),
                Event::Closed => return Err(Stop::Broken),
            }
        }
        Ok(())
    }

    fn background(&self) -> Option<(usize, usize)> {
        let count = BLOCKS.len();
        (0..=count).find_map(|step| {
            let b = (self.cursor.0 + step) % count;
            let from = if step == 0 { self.cursor.1 } else { 0 };
            (from..Self::used(b))
                .find(|&p| self.dirty[b][p])
                .map(|p| (b, p))
        })
    }

    /// One connection's sending; `Ok` once acknowledged.
    fn connection(&mut self) -> Result<(), Stop> {
        loop {
            self.answer()?;
            let Some((b, page)) = self.background() else {
                break;
            };
            let per = Self::per(b);
            let start = page - page % per;
            let end = start + per.max(BACKGROUND_CHUNK_PAGES);
            self.pc.background_pages += self.send(b, start, end);
            self.cursor = (b, end);
        }
        loop {
            match self.event() {
                Event::Nothing => {}
                Event::Request(_) => self.pc.requests += 1,
                Event::AckOk => return Ok(()),
                Event::AckErr(c) => return Err(Stop::Fatal(Outcome::Refused(c))),
                // The source has no device-state section to name, and a
                // post-copy no handover.
                Event::PrecopyOnly => return Err(Stop::Fatal(Outcome::BadAck)),
                Event::Closed => return Err(Stop::Broken),
            }
        }
    }

    fn run(first: Vec<Event>, resumes: Vec<Resume>) -> Outcome {
        let mut e = Engine {
            dirty: BLOCKS.iter().map(|b| vec![true; b.1 as usize]).collect(),
            cursor: (0, 0),
            pc: PostcopyStats {
                discarded: BLOCKS.iter().map(|b| b.1).sum(),
                ..PostcopyStats::default()
            },
            events: first,
            next: 0,
        };
        let mut resumes = resumes.into_iter();
        loop {
            match e.connection() {
                Ok(()) => return Outcome::Done(e.pc),
                Err(Stop::Fatal(o)) => return o,
                Err(Stop::Broken) => loop {
                    let Some((events, missing)) = resumes.next() else {
                        return Outcome::Lost;
                    };
                    let Some(missing) = missing else { continue };
                    for (b, m) in missing.iter().enumerate() {
                        for (p, &gone) in m.iter().enumerate() {
                            if gone {
                                let per = Self::per(b);
                                let start = p - p % per;
                                for q in start..(start + per).min(Self::used(b)) {
                                    e.dirty[b][q] = true;
                                }
                            }
                        }
                    }
                    e.pc.resumes += 1;
                    e.events = events;
                    e.next = 0;
                    e.cursor = (0, 0);
                    break;
                },
            }
        }
    }
}

/// A target that copies placed pages into the destination's blocks.
struct Copy<'l>(&'l List);

impl PostcopyTarget for Copy<'_> {
    type Error = BufferError;
    fn start(&mut self, _: &[&str]) -> Result<(), BufferError> {
        Ok(())
    }
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), BufferError> {
        let view = self.0.read();
        if let Some(b) = view.by_name(block) {
            b.region()
                .write(offset, data)
                .map_err(|_| BufferError::TooLong {
                    asked: offset.0,
                    available: 0,
                })?;
        }
        Ok(())
    }
    fn place_zero(
        &mut self,
        block: &str,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<(), BufferError> {
        let view = self.0.read();
        if let Some(b) = view.by_name(block) {
            b.region()
                .fill(offset, len.0 as usize, 0)
                .map_err(|_| BufferError::TooLong {
                    asked: offset.0,
                    available: 0,
                })?;
        }
        Ok(())
    }
    fn resumed(&mut self) -> Result<(), BufferError> {
        Ok(())
    }
}

fn memory(list: &List) -> Vec<Vec<u8>> {
    let view = list.read();
    view.iter()
        .map(|b| {
            let mut v = vec![0u8; b.used_length().0 as usize];
            let _ = b.read(ByteLen::ZERO, &mut v);
            v
        })
        .collect()
}

/// Runs the engine over the input's return path and the model over the
/// same messages; compares the outcome and, on success, the counters.
pub fn check(input: &Input) -> Result<Outcome, Mismatch> {
    let source = list(content)?;
    let (wire, first_events) = Wire::new(None, &input.first);
    let mut wires = vec![wire];
    let mut resumes = Vec::new();
    for c in input.resumes.iter().take(3) {
        let (map, missing) = map_bytes(c)?;
        let (wire, events) = Wire::new(Some(map), &c.msgs);
        wires.push(wire);
        resumes.push((events, c.corrupt.is_none().then_some(missing)));
    }
    let want = Engine::run(first_events, resumes);

    let out = Out::default();
    out.0.borrow_mut().push(Vec::new());
    let mut host = Host {
        list: &source,
        clock: 0,
        wires,
        at: 0,
        out: out.clone(),
    };
    let cfg = PrecopyConfig {
        downtime_limit_ns: 0,
        postcopy_after: Some(0),
        ..PrecopyConfig::default()
    };
    let real = crate::stream_roundtrip::with_buffers(|send, _| {
        migrate(
            &source,
            &mut SoftwareOnly,
            &mut out.clone(),
            &mut SliceReader::new(&[]),
            &mut host,
            cfg,
            send,
        )
    });
    let got = match real {
        Ok(stats) => match stats.postcopy {
            Some(pc) => Outcome::Done(pc),
            None => {
                return Err(Mismatch {
                    step: None,
                    what: "the migration did not go to post-copy".into(),
                })
            }
        },
        Err(MigrateError::BadRequest(r)) => Outcome::BadRequest(r),
        Err(MigrateError::BadAck) => Outcome::BadAck,
        Err(MigrateError::Refused(c)) => Outcome::Refused(c),
        Err(MigrateError::PostcopyLost) => Outcome::Lost,
        Err(e) => {
            return Err(Mismatch {
                step: None,
                what: format!("unexpected engine error: {e:?}"),
            })
        }
    };
    same(None, "outcome", &got, &want)?;

    // A migration acknowledged on its first connection wrote one whole
    // stream: the real receiver takes it and ends equal to the source.
    if let Outcome::Done(pc) = &got {
        if pc.resumes == 0 {
            let stream = out.0.borrow()[0].clone();
            let dest = list(|_, _| 0xEE)?;
            let mut huge = vec![0u8; 4 * PAGE];
            let received = crate::stream_roundtrip::with_buffers(|_, bounce| {
                let mut rx = Receiver::new(bounce)
                    .map_err(|e| Mismatch {
                        step: None,
                        what: format!("harness: {e}"),
                    })?
                    .with_hugepage_buffer(&mut huge);
                Ok::<_, Mismatch>(rx.receive_postcopy(
                    &dest,
                    &mut SliceReader::new(&stream),
                    &mut Copy(&dest),
                    |_| {},
                ))
            })?;
            holds(
                None,
                received.is_ok(),
                format_args!("the stream the engine wrote was refused: {received:?}"),
            )?;
            holds(
                None,
                memory(&dest) == memory(&source),
                "the destination differs from the source",
            )?;
        }
    }
    Ok(want)
}

/// The fuzz entry point.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, |input: &Input| check(input).map(drop));
}
