//! A model of the receiving side once post-copy is in play, shared by the
//! [`crate::postcopy_receive`] and
//! [`crate::postcopy_resume`] targets.
//!
//! The destination is a fixed list whose memory starts filled with a guard
//! pattern (no page is zero):
//!
//! | block | used / max pages | host page | post-copy pages | flags |
//! |---|---|---|---|---|
//! | `ram` | 8 / 8 | 4 KiB | 8 | migratable |
//! | `huge` | 16 / 16 | 16 KiB (4 target pages) | 16 | migratable |
//! | `short` | 8 / 8 | 4 KiB | 4 | migratable |
//! | `grow` | 4 / 8 | 4 KiB | 4 | migratable, resizable |
//!
//! [`Model`] walks a stream's bytes the way `docs/stream-format.md`
//! describes (header, block table, records; Discard only just before
//! Postcopy; after the switch each page placed once, hugepages whole and in
//! order; a resumed table equal to the original) and predicts the outcome
//! (the summary, or the error's [`ReceiveError::code`]), what memory holds,
//! which pages are received, what the ledger vouches for and every
//! placement, and the device-state sections (pre-copy `Section` records
//! and those inside the `Postcopy` record, one bound over them all) the
//! VMM's sink got before each start. [`check_streams`] runs the real
//! [`Receiver`] (with a ledger, a section sink and a
//! hugepage buffer) over the same bytes into real blocks through a target
//! that places pages the way userfaultfd does: a page already present is
//! kept, and placing over one is a finding. Streams follow each other on
//! the same receiver, as a destination sees a broken post-copy resumed.

use crate::model_cursor::Cursor;
use crate::stream_roundtrip::{Mem, CAPACITY};
use crate::{holds, same, Mismatch};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::{BufferError, BufferMemory};
use ramblock_core::checksum::{finish_sum, page_digest, Checksum, Ledger};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::migrate::receiver::{
    ReceiveError, ReceiveSummary, Receiver, SectionSink, BOUNCE_BYTES,
};
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::name::BlockName;
use ramblock_core::section::SectionHeader;
use ramblock_core::stream::format::DEFAULT_DEVICE_STATE_LIMIT;
use ramblock_core::stream::format::{Header, Record, TableEntry};
use ramblock_core::stream::io::SliceReader;
use ramblock_core::stream::received_map::write_received_map;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

/// Bytes per target page.
pub const PAGE: usize = 4096;
/// The destination list.
pub type List = RamList<'static, Mem, Owned, CAPACITY>;

/// One destination block.
#[derive(Copy, Clone, Debug)]
pub struct Spec {
    /// Its name.
    pub name: &'static str,
    /// Used pages at the start.
    pub used: u64,
    /// Reserved pages.
    pub max: u64,
    /// Target pages per host page.
    pub per_host: u64,
    /// Post-copy length in pages.
    pub postcopy: u64,
    /// Flags.
    pub flags: BlockFlags,
}

/// The destination's blocks, in list (and table) order.
pub const LAYOUT: [Spec; 4] = [
    Spec {
        name: "ram",
        used: 8,
        max: 8,
        per_host: 1,
        postcopy: 8,
        flags: BlockFlags::MIGRATABLE,
    },
    Spec {
        name: "huge",
        used: 16,
        max: 16,
        per_host: 4,
        postcopy: 16,
        flags: BlockFlags::MIGRATABLE,
    },
    Spec {
        name: "short",
        used: 8,
        max: 8,
        per_host: 1,
        postcopy: 4,
        flags: BlockFlags::MIGRATABLE,
    },
    Spec {
        name: "grow",
        used: 4,
        max: 8,
        per_host: 1,
        postcopy: 4,
        flags: BlockFlags::MIGRATABLE.union(BlockFlags::RESIZABLE),
    },
];

/// Names a table entry may carry: the blocks', and one the destination
/// lacks.
pub const NAMES: [&str; 5] = ["ram", "huge", "short", "grow", "nope"];

/// Bytes of the largest host page (the hugepage assembly buffer).
const HUGE_BYTES: usize = 4 * PAGE;

/// The guard byte of page `page` of block `block` (never zero).
pub fn guard(block: usize, page: usize) -> u8 {
    crate::stream_roundtrip::guard(block, page)
}

/// The table entry of `LAYOUT[b]` as a source with the same block sends it.
pub fn entry_of(b: usize) -> TableEntry {
    let s = LAYOUT[b];
    TableEntry {
        used_length: s.used * PAGE as u64,
        page_size: s.per_host * PAGE as u64,
        flags: s.flags.bits(),
    }
}

/// Writes a stream header (new or resumed) and the table of every block
/// as the source has it.
pub fn good_table(out: &mut Vec<u8>, resume: bool) {
    let header = Header::new(LAYOUT.len() as u32);
    if resume {
        // The model's target issues no token, so any token resumes.
        let _ = header.write_resume(
            &ramblock_core::stream::resume_token::ResumeToken([7; 16]),
            out,
        );
    } else {
        let _ = header.write(out);
    }
    for (b, s) in LAYOUT.iter().enumerate() {
        let _ = entry_of(b).write(s.name, out);
    }
}

/// A placement the target was asked for: block, byte offset, bytes, zero.
pub type Placement = (usize, u64, u64, bool);

/// A hugepage being assembled: block, first page, pages arrived, bytes.
#[derive(Clone, Debug)]
struct Assembly {
    block: usize,
    first: u64,
    filled: u64,
    buf: Vec<u8>,
}

/// What the destination must hold, across the streams of one receiver.
#[derive(Clone, Debug)]
pub struct Model {
    /// Each block's whole reservation.
    pub memory: Vec<Vec<u8>>,
    /// Each block's used pages.
    pub used: Vec<u64>,
    /// Each block's received map (post-copy pages).
    pub received: Vec<Vec<bool>>,
    /// The ledger, by table index: page digests.
    pub ledger: Vec<BTreeMap<u64, u64>>,
    /// The blocks of the last table read, in table order.
    pub last_table: Vec<usize>,
    /// Post-copy started and has not ended.
    pub postcopy: bool,
    /// The table post-copy started with: block and entry.
    pub original: Vec<(usize, TableEntry)>,
    assembly: Option<Assembly>,
    /// The counters the receiver keeps (across a resume).
    pub summary: ReceiveSummary,
    /// Every placement, in order.
    pub placements: Vec<Placement>,
    /// Device state handed to the target at each start: the bodies of
    /// the sections loaded since the last start, in order.
    pub starts: Vec<Vec<u8>>,
    /// Section bodies the VMM's sink took since the last start.
    pub loaded: Vec<u8>,
    /// Section bytes of the stream in progress, headers included.
    pub state_bytes: u64,
    /// At each accepted resume: the pages missing (block, page), as the
    /// received map sent back must say.
    pub resumes: Vec<Vec<(usize, u64)>>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            memory: LAYOUT
                .iter()
                .enumerate()
                .map(|(b, s)| {
                    let mut m = vec![0u8; s.max as usize * PAGE];
                    for (p, page) in m.chunks_mut(PAGE).enumerate() {
                        page.fill(guard(b, p));
                    }
                    m
                })
                .collect(),
            used: LAYOUT.iter().map(|s| s.used).collect(),
            received: LAYOUT
                .iter()
                .map(|s| vec![false; s.postcopy as usize])
                .collect(),
            ledger: vec![BTreeMap::new(); CAPACITY],
            last_table: Vec::new(),
            postcopy: false,
            original: Vec::new(),
            assembly: None,
            summary: ReceiveSummary::default(),
            placements: Vec::new(),
            starts: Vec::new(),
            loaded: Vec::new(),
            state_bytes: 0,
            resumes: Vec::new(),
        }
    }
}

/// A table slot: block index, used pages and the entry as sent.
#[derive(Copy, Clone, Debug)]
struct Slot {
    block: usize,
    used_pages: u64,
    entry: TableEntry,
}

impl Model {
    /// The checksum of block `b`'s first `used` pages of memory, as a
    /// source holding the same bytes sends it.
    pub fn memory_checksum(&self, b: usize) -> u64 {
        let used = self.used[b] * PAGE as u64;
        let mut copy = self.memory[b].clone();
        let sum = match BufferMemory::new(&mut copy[..], ByteLen(used), PageSize::SIZE_4K) {
            Ok(mem) => Checksum::of_region(&mem.region(), used).unwrap_or(0),
            Err(_) => 0,
        };
        sum
    }

    /// What the ledger vouches for, for table index `b` and `pages` pages.
    pub fn ledger_checksum(&self, b: usize, pages: u64) -> u64 {
        let sum = self.ledger[b]
            .range(..pages)
            .fold(0u64, |a, (_, &d)| a.wrapping_add(d));
        finish_sum(sum, pages * PAGE as u64)
    }

    fn record(&mut self, b: usize, first: u64, data: &[u8]) {
        for (k, page) in data.chunks(PAGE).enumerate() {
            let p = first + k as u64;
            self.ledger[b].insert(p, page_digest(p, page));
        }
    }

    fn mark(&mut self, b: usize, first: u64, count: u64, received: bool) {
        let map = &mut self.received[b];
        for p in first..(first + count).min(map.len() as u64) {
            map[p as usize] = received;
        }
    }

    /// Receives one stream; the outcome is the summary or the error code.
    pub fn receive(&mut self, data: &[u8]) -> Result<ReceiveSummary, u32> {
        let mut r = Cursor(data);
        let (table, resumed) = self.read_table(&mut r)?;
        self.last_table = table.iter().map(|s| s.block).collect();
        if !resumed {
            // A new stream starts from an empty ledger.
            self.ledger.iter_mut().for_each(BTreeMap::clear);
        }
        if resumed {
            self.assembly = None;
            let missing = (0..LAYOUT.len())
                .flat_map(|b| {
                    let map = &self.received[b];
                    (0..map.len() as u64)
                        .filter(move |&p| !map[p as usize])
                        .map(move |p| (b, p))
                })
                .collect();
            self.resumes.push(missing);
        } else {
            self.summary = ReceiveSummary::default();
            self.state_bytes = 0;
            self.original = table.iter().map(|s| (s.block, s.entry)).collect();
        }
        let mut table = table;
        let mut discarding = false;
        loop {
            let tag = r.take(1)?[0];
            if tag == 8 {
                // A device-state section: out of place after a discard or
                // once post-copy started; otherwise loaded into the sink.
                if discarding || self.postcopy {
                    return Err(23);
                }
                self.section(&mut r)?;
                continue;
            }
            let fields = match tag {
                1 | 2 | 6 => (r.u32()?, r.u64()?, u64::from(r.u32()?)),
                3 | 4 => (r.u32()?, r.u64()?, 0),
                5 | 7 => (r.u32()?, 0, 0),
                9 => (r.u32()?, u64::from(r.u32()?), 0),
                _ => return Err(12),
            };
            // After a pre-copy section only sections and End may come.
            if !self.postcopy && self.state_bytes > 0 && tag != 5 {
                return Err(23);
            }
            if discarding && tag != 6 && tag != 7 {
                return Err(23);
            }
            discarding = tag == 6;
            match tag {
                1 | 2 => self.run(&mut r, &table, tag == 1, fields)?,
                3 => {
                    let pass = fields.0;
                    self.summary.passes = self.summary.passes.max(pass.saturating_add(1));
                }
                4 => {
                    if self.postcopy {
                        return Err(23);
                    }
                    let (index, used) = (fields.0, fields.1);
                    let slot = table.get_mut(index as usize).ok_or(13u32)?;
                    let s = LAYOUT[slot.block];
                    let ok = s.flags.contains(BlockFlags::RESIZABLE)
                        && used > 0
                        && used % (s.per_host * PAGE as u64) == 0
                        && used <= s.max * PAGE as u64;
                    if !ok {
                        return Err(17);
                    }
                    self.used[slot.block] = used / PAGE as u64;
                    slot.used_pages = used / PAGE as u64;
                    let pages = slot.used_pages;
                    self.ledger[index as usize].retain(|&p, _| p < pages);
                }
                6 => self.discard(&table, fields)?,
                // A barrier: this receiver has no page channels.
                9 if self.postcopy => return Err(23),
                9 => return Err(38),
                7 => {
                    if self.postcopy {
                        return Err(23);
                    }
                    // Its sections go the pre-copy sections' way, each
                    // counted against the same bound.
                    for _ in 0..fields.0 {
                        self.section(&mut r)?;
                    }
                    self.starts.push(std::mem::take(&mut self.loaded));
                    self.postcopy = true;
                    // No handover follows this stream's End.
                    self.summary.postcopy = true;
                }
                _ => {
                    let count = fields.0;
                    if count as usize != table.len() {
                        return Err(18);
                    }
                    for (i, slot) in table.iter().enumerate() {
                        let expected = r.u64()?;
                        if self.postcopy {
                            let pages = slot.used_pages.min(LAYOUT[slot.block].postcopy);
                            if self.received[slot.block][..pages as usize].contains(&false) {
                                return Err(29);
                            }
                        }
                        if self.ledger_checksum(i, slot.used_pages) != expected {
                            return Err(19);
                        }
                        self.summary.blocks += 1;
                    }
                    self.postcopy = false;
                    return Ok(self.summary);
                }
            }
        }
    }

    /// One section (after its tag, or inside the `Postcopy` record): the
    /// header, the bound over the stream's sections (checked before the
    /// body), and the body, which the sink gets in pieces of the bounce
    /// buffer's size as they arrive whole.
    fn section(&mut self, r: &mut Cursor<'_>) -> Result<(), u32> {
        let (.., len) = crate::stream_decode::section_header(r.take(272)?)?;
        let total = self.state_bytes.saturating_add(272).saturating_add(len);
        if total > DEFAULT_DEVICE_STATE_LIMIT {
            return Err(32);
        }
        self.state_bytes = total;
        let mut left = len as usize;
        while left > 0 {
            let n = left.min(BOUNCE_BYTES);
            self.loaded.extend_from_slice(r.take(n)?);
            left -= n;
        }
        Ok(())
    }

    /// Header and table; the slots and whether the stream resumes.
    fn read_table(&mut self, r: &mut Cursor<'_>) -> Result<(Vec<Slot>, bool), u32> {
        let header = r.take(16)?;
        let resumed = header[..8] == *b"RBRESUME";
        if header[..8] != *b"RAMBLOCK" && !resumed {
            return Err(1);
        }
        // A new stream is version 2 (the handover); a resume header has
        // its own version (2 too) and the destination's token after it;
        // the model's target issues none, so any passes.
        if u16::from_le_bytes([header[8], header[9]]) != 2 {
            return Err(2);
        }
        if header[10] != 12 {
            return Err(3);
        }
        // Byte 11: page channels that follow a new stream; this receiver
        // has none (ChannelCountMismatch). A resume header's is not read.
        if !resumed && header[11] != 0 {
            return Err(38);
        }
        if resumed {
            r.take(16)?;
        }
        if resumed != self.postcopy {
            return Err(23);
        }
        let count = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        if resumed && count as usize != self.original.len() {
            return Err(35);
        }
        if count as usize > CAPACITY {
            return Err(4);
        }
        let mut table: Vec<Slot> = Vec::new();
        for index in 0..count as usize {
            let len = usize::from(r.take(1)?[0]);
            let name = r.take(len)?;
            let entry = TableEntry {
                used_length: r.u64()?,
                page_size: r.u64()?,
                flags: r.u32()?,
            };
            let name = std::str::from_utf8(name)
                .ok()
                .filter(|n| BlockName::new(n).is_ok())
                .ok_or(5u32)?;
            if table.iter().any(|s| LAYOUT[s.block].name == name) {
                return Err(7);
            }
            let block = LAYOUT.iter().position(|s| s.name == name).ok_or(6u32)?;
            if resumed {
                let (kept_block, kept) = self.original[index];
                if kept_block != block
                    || kept.used_length != entry.used_length
                    || kept.page_size != entry.page_size
                    || kept.flags != entry.flags
                {
                    return Err(35);
                }
            }
            let s = LAYOUT[block];
            let page_bytes = s.per_host * PAGE as u64;
            if entry.page_size != page_bytes {
                return Err(9);
            }
            let used_now = self.used[block] * PAGE as u64;
            let resizable = s.flags.contains(BlockFlags::RESIZABLE);
            let fits = entry.used_length == used_now
                || (resizable
                    && entry.used_length <= s.max * PAGE as u64
                    && entry.used_length % page_bytes == 0
                    && entry.used_length > 0);
            if !fits {
                return Err(10);
            }
            self.used[block] = entry.used_length / PAGE as u64;
            table.push(Slot {
                block,
                used_pages: entry.used_length / PAGE as u64,
                entry,
            });
        }
        if table.len() < LAYOUT.len() {
            return Err(8);
        }
        Ok((table, resumed))
    }

    /// A `Pages` (`is_pages`) or `Zero` record.
    fn run(
        &mut self,
        r: &mut Cursor<'_>,
        table: &[Slot],
        is_pages: bool,
        (index, first, count): (u32, u64, u64),
    ) -> Result<(), u32> {
        let slot = *table.get(index as usize).ok_or(13u32)?;
        if count == 0 || count > 64 {
            return Err(14);
        }
        let end = first.checked_add(count).ok_or(15u32)?;
        if end > slot.used_pages {
            return Err(16);
        }
        let len = count as usize * PAGE;
        let data = if is_pages {
            r.take(len)?.to_vec()
        } else {
            vec![0u8; len]
        };
        let b = slot.block;
        if !self.postcopy {
            let at = first as usize * PAGE;
            self.memory[b][at..at + len].copy_from_slice(&data);
            self.record(index as usize, first, &data);
            self.mark(b, first, count, true);
        } else {
            let s = LAYOUT[b];
            if end > s.postcopy {
                return Err(26);
            }
            if (first..end).any(|p| self.received[b][p as usize]) {
                return Err(36);
            }
            if s.per_host == 1 {
                self.place(b, index as usize, first, &data, !is_pages);
            } else {
                self.assemble(b, index as usize, first, count, &data)?;
            }
        }
        if is_pages {
            self.summary.pages += count;
        } else {
            self.summary.zero_pages += count;
        }
        Ok(())
    }

    /// Places whole host pages (after the checks): memory, received map,
    /// ledger and the placement list.
    fn place(&mut self, b: usize, index: usize, first: u64, data: &[u8], zero: bool) {
        let at = first as usize * PAGE;
        self.memory[b][at..at + data.len()].copy_from_slice(data);
        let pages = (data.len() / PAGE) as u64;
        self.mark(b, first, pages, true);
        self.record(index, first, data);
        self.summary.postcopy_pages += pages;
        self.placements
            .push((b, at as u64, data.len() as u64, zero));
    }

    /// Adds a run to the hugepage being assembled.
    fn assemble(
        &mut self,
        b: usize,
        index: usize,
        first: u64,
        count: u64,
        data: &[u8],
    ) -> Result<(), u32> {
        let per = LAYOUT[b].per_host;
        let (mut page, mut done) = (first, 0u64);
        while done < count {
            let start = page - page % per;
            let mut at = match self.assembly.take() {
                Some(a) if a.block == b && a.first == start && start + a.filled == page => a,
                Some(_) if page == start => return Err(37),
                None if page == start => Assembly {
                    block: b,
                    first: start,
                    filled: 0,
                    buf: vec![0u8; per as usize * PAGE],
                },
                a => {
                    self.assembly = a;
                    return Err(27);
                }
            };
            let n = (count - done).min(per - at.filled);
            let from = done as usize * PAGE;
            let into = at.filled as usize * PAGE;
            at.buf[into..into + n as usize * PAGE]
                .copy_from_slice(&data[from..from + n as usize * PAGE]);
            at.filled += n;
            done += n;
            page += n;
            if at.filled == per {
                // Placed as data, zeros or not.
                let buf = std::mem::take(&mut at.buf);
                self.place(b, index, start, &buf, false);
            } else {
                self.assembly = Some(at);
            }
        }
        Ok(())
    }

    /// A `Discard` record.
    fn discard(
        &mut self,
        table: &[Slot],
        (index, first, count): (u32, u64, u64),
    ) -> Result<(), u32> {
        if self.postcopy {
            return Err(23);
        }
        let slot = *table.get(index as usize).ok_or(13u32)?;
        if count == 0 {
            return Err(14);
        }
        let end = first.checked_add(count).ok_or(15u32)?;
        if end > slot.used_pages {
            return Err(16);
        }
        let s = LAYOUT[slot.block];
        if end > s.postcopy {
            return Err(26);
        }
        if first % s.per_host != 0 || (end % s.per_host != 0 && end != slot.used_pages) {
            return Err(27);
        }
        let b = slot.block;
        self.memory[b][first as usize * PAGE..end as usize * PAGE].fill(0);
        self.mark(b, first, count, false);
        let zeros = vec![0u8; count as usize * PAGE];
        self.record(index as usize, first, &zeros);
        self.summary.discarded += count;
        Ok(())
    }
}

/// The record headers of the shared operation set, for encoders.
pub fn write_record(out: &mut Vec<u8>, record: Record) {
    let _ = record.write(out);
}

/// Builds a fresh destination list (guard-filled).
pub fn destination() -> Result<List, Mismatch> {
    let harness = |e: String| Mismatch {
        step: None,
        what: format!("harness: {e}"),
    };
    let list = List::new();
    for (b, s) in LAYOUT.iter().enumerate() {
        let mut buf = vec![0u8; s.max as usize * PAGE].into_boxed_slice();
        for (p, page) in buf.chunks_mut(PAGE).enumerate() {
            page.fill(guard(b, p));
        }
        let page_size =
            PageSize::new(s.per_host * PAGE as u64).map_err(|e| harness(e.to_string()))?;
        let used = ByteLen(s.used * PAGE as u64);
        let mem = BufferMemory::new(buf, used, page_size).map_err(|e| harness(e.to_string()))?;
        let mut spec = BlockSpec::new(
            BlockName::new(s.name).map_err(|e| harness(e.to_string()))?,
            used,
        )
        .postcopy_length(ByteLen(s.postcopy * PAGE as u64));
        spec.max_length = ByteLen(s.max * PAGE as u64);
        spec.flags = s.flags;
        let bitmaps = BlockBitmaps::for_spec(&spec).map_err(|e| harness(e.to_string()))?;
        list.add(spec, mem, bitmaps)
            .map_err(|e| harness(e.to_string()))?;
    }
    Ok(list)
}

/// A target that places pages the way userfaultfd does: a page already
/// present (received) stays as it is, and an attempt to place over one is
/// recorded as a finding. Each resume writes the received map, as the
/// destination sends it on the new return path.
struct UffdLike<'l> {
    list: &'l List,
    placements: Vec<Placement>,
    starts: Vec<Vec<u8>>,
    /// What the VMM's sink loaded since the last start.
    loaded: Loaded,
    maps: Vec<Vec<u8>>,
    over_present: Vec<(usize, u64)>,
}

impl UffdLike<'_> {
    fn put(&mut self, block: &str, offset: ByteLen, data: Option<&[u8]>, len: u64) {
        let view = self.list.read();
        let Some(b) = LAYOUT.iter().position(|s| s.name == block) else {
            return;
        };
        let Some(dest) = view.by_name(block) else {
            return;
        };
        self.placements.push((b, offset.0, len, data.is_none()));
        let received = dest.received();
        for k in 0..len / PAGE as u64 {
            let page = offset.0 / PAGE as u64 + k;
            if received.is_received(page as usize) == Ok(true) {
                self.over_present.push((b, page));
                continue;
            }
            let at = ByteLen(page * PAGE as u64);
            let _ = match data {
                Some(d) => dest.write(at, &d[k as usize * PAGE..][..PAGE]),
                None => dest.write(at, &[0u8; PAGE]),
            };
        }
    }
}

/// The destination VMM's sink: every section body, in order, until the
/// target starts the guest from them.
#[derive(Clone, Default)]
struct Loaded(Rc<RefCell<Vec<u8>>>);

impl SectionSink for Loaded {
    fn load(&mut self, _: &SectionHeader, _: u64, bytes: &[u8]) -> Result<(), u32> {
        self.0.borrow_mut().extend_from_slice(bytes);
        Ok(())
    }
    fn done(&mut self, _: &SectionHeader) -> Result<(), u32> {
        Ok(())
    }
}

impl PostcopyTarget for UffdLike<'_> {
    type Error = BufferError;
    fn start(&mut self, _table: &[&str]) -> Result<(), BufferError> {
        self.starts
            .push(std::mem::take(&mut *self.loaded.0.borrow_mut()));
        Ok(())
    }
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), BufferError> {
        self.put(block, offset, Some(data), data.len() as u64);
        Ok(())
    }
    fn place_zero(
        &mut self,
        block: &str,
        offset: ByteLen,
        len: ByteLen,
    ) -> Result<(), BufferError> {
        self.put(block, offset, None, len.0);
        Ok(())
    }
    fn resumed(&mut self) -> Result<(), BufferError> {
        let mut map = Vec::new();
        let _ = write_received_map(&mut map, &self.list.read());
        self.maps.push(map);
        Ok(())
    }
}

/// What the real receiver did over a sequence of streams.
#[derive(Debug)]
pub struct Real {
    /// Each stream's outcome (summary or error code).
    pub outcomes: Vec<Result<ReceiveSummary, u32>>,
    /// The received maps written at each resume.
    pub maps: Vec<Vec<u8>>,
}

/// Runs the real receiver over `streams` (one receiver, one ledger, one
/// target) and the model over the same bytes, and compares everything:
/// outcomes, placements, device states, memory, used lengths, received
/// maps, what the ledger vouches for. Returns the model and the real run.
pub fn check_streams(streams: &[Vec<u8>]) -> Result<(Model, Real), Mismatch> {
    let list = destination()?;
    let mut model = Model::default();
    let mut postcopy_after = Vec::new();
    let want: Vec<_> = streams
        .iter()
        .map(|s| {
            let outcome = model.receive(s);
            postcopy_after.push(model.postcopy);
            outcome
        })
        .collect();

    let mut ledger = Ledger::new();
    let mut huge = vec![0u8; HUGE_BYTES];
    let mut target = UffdLike {
        list: &list,
        placements: Vec::new(),
        starts: Vec::new(),
        loaded: Loaded::default(),
        maps: Vec::new(),
        over_present: Vec::new(),
    };
    let mut sink = target.loaded.clone();
    let mut real_errors = Vec::new();
    let outcomes = crate::stream_roundtrip::with_buffers(|_, bounce| {
        let mut rx = Receiver::new(&mut bounce[..BOUNCE_BYTES])
            .map_err(|e| Mismatch {
                step: None,
                what: format!("harness: {e}"),
            })?
            .with_ledger(&mut ledger)
            .with_device_state(&mut sink, DEFAULT_DEVICE_STATE_LIMIT)
            .with_hugepage_buffer(&mut huge);
        let mut outcomes = Vec::new();
        for (i, s) in streams.iter().enumerate() {
            let got = rx.receive_postcopy(&list, &mut SliceReader::new(s), &mut target, |_| {});
            if let Err(e) = &got {
                real_errors.push((i, e.to_string()));
            }
            outcomes.push(got.map_err(|e: ReceiveError<_, _>| e.code()));
            same(
                Some(i),
                "in post-copy after the stream",
                rx.in_postcopy(),
                postcopy_after[i],
            )?;
        }
        Ok::<_, Mismatch>(outcomes)
    })?;
    same(None, "outcomes (summary or error code)", &outcomes, &want).map_err(|mut m| {
        m.what.push_str(&format!(" (real errors: {real_errors:?})"));
        m
    })?;
    holds(
        None,
        target.over_present.is_empty(),
        format_args!("pages placed over present ones: {:?}", target.over_present),
    )?;
    same(None, "placements", &target.placements, &model.placements)?;
    same(
        None,
        "device states at start",
        &target.starts,
        &model.starts,
    )?;
    same(None, "resumes", target.maps.len(), model.resumes.len())?;
    let view = list.read();
    for (b, (dest, s)) in view.iter().zip(LAYOUT.iter()).enumerate() {
        same(None, "block order", dest.name(), s.name)?;
        same(
            None,
            format_args!("{} used pages", s.name),
            dest.used_pages() as u64,
            model.used[b],
        )?;
        let mut memory = vec![0u8; s.max as usize * PAGE];
        // SAFETY: the block reserves `max` pages of a boxed buffer that
        // lives as long as the list, and nothing writes it while the read
        // guard is held.
        unsafe {
            std::ptr::copy_nonoverlapping(
                dest.memory().base().as_ptr(),
                memory.as_mut_ptr(),
                memory.len(),
            );
        }
        holds(
            None,
            memory == model.memory[b],
            format_args!("{} memory differs from the model", s.name),
        )?;
        let received: Vec<bool> = (0..s.postcopy as usize)
            .map(|p| dest.received().is_received(p) == Ok(true))
            .collect();
        same(
            None,
            format_args!("{} received map", s.name),
            &received,
            &model.received[b],
        )?;
    }
    drop(view);
    // The ledger (by table position) vouches for what memory holds
    // wherever it vouches at all, and agrees with the model's.
    for (i, &b) in model.last_table.iter().enumerate() {
        for (&p, &d) in model.ledger[i].range(..model.used[b]) {
            let page = &model.memory[b][p as usize * PAGE..][..PAGE];
            same(
                None,
                format_args!("ledger digest of page {p} at table position {i}"),
                d,
                page_digest(p, page),
            )?;
        }
    }
    for i in 0..CAPACITY {
        let pages = LAYOUT.iter().map(|s| s.max).max().unwrap_or(0);
        same(
            None,
            format_args!("ledger checksum at table position {i}"),
            ramblock_core::checksum::PageLedger::checksum(&ledger, i, pages),
            model.ledger_checksum(i, pages),
        )?;
    }
    Ok((
        model,
        Real {
            outcomes,
            maps: target.maps,
        },
    ))
}
