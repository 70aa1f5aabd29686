//! `RamList` over `BufferMemory` against a `BTreeMap` model.
//!
//! Blocks are added with arbitrary small sizes, flags, names, clear shifts,
//! post-copy lengths and host memory that fits or does not; removed;
//! resized; looked up by RAM address (twice, so the most-recently-used
//! shortcut is taken), by name and by host address; marked dirty and
//! written through the list. Listeners come and go and their event logs are
//! compared after every operation.
//!
//! The model keeps blocks in a `BTreeMap` by offset and decides placement by
//! brute force over every candidate start (the address-space start and every
//! block's end rounded up to 64 pages): among the candidates where the block
//! fits before the next block (or the address limit), the one with the
//! smallest gap wins, ties to the lowest address (the rule in the module
//! docs of `ramblock_core::list`). After every operation the version
//! counter is compared; at the end the layout (no overlap, 64-page
//! alignment, under the limit), every dirty bitmap word, the received maps'
//! lengths and the memory of every block are compared.

use crate::{holds, same, Mismatch};
use arbitrary::Arbitrary;
use ramblock_core::addr::{ByteLen, PageSize, RamAddr, BLOCK_ALIGN};
use ramblock_core::bitmap::{words_for, BitRangeError, Owned, DEFAULT_CLEAR_SHIFT, WORD_BITS};
use ramblock_core::block::{AccessError, BlockBitmaps, BlockSpec, RamBlock};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::dirty_log::{DirtyClient, DirtyClients};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::{AddError, DirtyError, ListenerId, RamList, ResizeError, MAX_LISTENERS};
use ramblock_core::listener::RamListener;
use ramblock_core::name::BlockName;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Mutex;

/// The list's capacity: small, so `ListFull` happens.
pub const CAPACITY: usize = 5;
/// Block names (more than the capacity, and a long device-prefixed one).
pub const NAMES: [&str; 7] = ["pc.ram", "vga.vram", "0000:00:02.0/rom", "a", "b", "c", "d"];
const PAGE: u64 = 4096;
/// Listener objects a case can register (each possibly several times).
const RECORDERS: usize = 3;

type Mem = BufferMemory<Box<[u8]>>;
type List<'l> = RamList<'l, Mem, Owned, CAPACITY>;

/// How the host memory handed to `add` relates to the spec.
#[derive(Arbitrary, Copy, Clone, Debug, PartialEq, Eq)]
pub enum MemShape {
    /// Reserves the max length, with the used length accessible.
    Exact,
    /// Reserves one page less than the max length.
    TooSmall,
    /// Has a different used length accessible.
    UsedMismatch,
}

/// One operation. Names are indices into [`NAMES`].
#[derive(Arbitrary, Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    Add {
        name: u8,
        used_pages: u8,
        /// Max length in pages, used only when `grow` is set (else max = used).
        max_pages: u8,
        /// Adds half a page to the used length (an unaligned length).
        half_page: bool,
        grow: bool,
        /// `BlockFlags` bits (truncated to the known flags).
        flags: u16,
        /// Below 200: shift `6 + v % 26`; otherwise used raw (invalid).
        clear_shift: u8,
        postcopy_pages: Option<u8>,
        memory: MemShape,
    },
    Remove {
        name: u8,
    },
    Resize {
        name: u8,
        pages: u8,
        half_page: bool,
    },
    /// Address in 512-byte units.
    BlockAt {
        addr: u16,
    },
    ByName {
        name: u8,
    },
    /// A host pointer `offset` bytes into the `block`-th block's memory.
    ByHostAddr {
        block: u8,
        offset: u32,
    },
    /// Address in 512-byte units, length in 16-byte units, client bits.
    MarkDirty {
        addr: u16,
        len: u16,
        clients: u8,
    },
    /// Writes `len * 37` bytes of `byte` at the address (512-byte units).
    Write {
        addr: u16,
        len: u8,
        byte: u8,
    },
    AddListener {
        which: u8,
    },
    RemoveListener {
        which: u8,
    },
}

/// A whole case.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Address limit: 0 = none, 1 = 2 MiB, 2 = 3 MiB + 3 pages, 3 = 1 MiB.
    pub limit: u8,
    /// The operations.
    pub ops: crate::Ops<Op>,
}

/// What a listener heard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `block_added(name)` at `offset`.
    Added(String, u64),
    /// `block_removed(name)`.
    Removed(String),
    /// `block_resized(name, old, new)`.
    Resized(String, u64, u64),
}

/// A listener that records what it hears.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    fn take(&self) -> Vec<Event> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn push(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }
}

impl RamListener<Mem, Owned> for Recorder {
    fn block_added(&self, block: &RamBlock<Mem, Owned>) {
        self.push(Event::Added(block.name().into(), block.offset().0));
    }

    fn block_removed(&self, block: &RamBlock<Mem, Owned>) {
        self.push(Event::Removed(block.name().into()));
    }

    fn block_resized(&self, block: &RamBlock<Mem, Owned>, old: ByteLen, new: ByteLen) {
        self.push(Event::Resized(block.name().into(), old.0, new.0));
    }
}

/// The model of one block.
#[derive(Clone, Debug)]
struct Model {
    name: &'static str,
    offset: u64,
    used: u64,
    max: u64,
    flags: BlockFlags,
    postcopy: u64,
    base: usize,
    /// One `Vec<bool>` per dirty client, over `max` pages.
    dirty: [Vec<bool>; 3],
    memory: Vec<u8>,
}

impl Model {
    fn end(&self) -> u64 {
        self.offset + self.max
    }
}

fn limit_of(v: u8) -> u64 {
    match v % 4 {
        0 => u64::MAX,
        1 => 2 << 20,
        2 => (3 << 20) + 3 * PAGE,
        _ => 1 << 20,
    }
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    Some(v.checked_add(a - 1)? / a * a)
}

/// Brute-force best fit over the candidate starts; see the module docs.
fn model_best_fit(blocks: &BTreeMap<u64, Model>, size: u64, limit: u64) -> Option<u64> {
    let candidates = std::iter::once(Some(0)).chain(blocks.values().map(|b| {
        b.offset
            .checked_add(b.max)
            .and_then(|e| align_up(e, BLOCK_ALIGN))
    }));
    let mut best: Option<(u64, u64)> = None;
    for start in candidates.flatten() {
        let gap_end = blocks
            .values()
            .map(|b| b.offset)
            .filter(|&o| o >= start)
            .min()
            .unwrap_or(limit);
        if start > gap_end {
            continue;
        }
        let Some(end) = start.checked_add(size) else {
            continue;
        };
        let overlaps = blocks.values().any(|b| start < b.end() && b.offset < end);
        if end > gap_end || overlaps {
            continue;
        }
        let gap = gap_end - start;
        if best.is_none_or(|(g, o)| (gap, start) < (g, o)) {
            best = Some((gap, start));
        }
    }
    best.map(|(_, start)| start)
}

/// The byte a fresh block's page is filled with (distinct per block and page).
fn fill_byte(name: usize, page: usize) -> u8 {
    (name * 31 + page * 7 + 1) as u8
}

fn bits_words(bits: &[bool]) -> Vec<u64> {
    let mut w = vec![0u64; words_for(bits.len())];
    for (i, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
        w[i / WORD_BITS] |= 1 << (i % WORD_BITS);
    }
    w
}

/// The model block holding RAM address `addr`, and the offset in it.
fn model_at(blocks: &BTreeMap<u64, Model>, addr: u64) -> Option<(&Model, u64)> {
    blocks
        .values()
        .find(|b| b.offset <= addr && addr < b.end())
        .map(|b| (b, addr - b.offset))
}

fn model_by_name<'m>(blocks: &'m mut BTreeMap<u64, Model>, name: &str) -> Option<&'m mut Model> {
    blocks.values_mut().find(|b| b.name == name)
}

struct Listeners {
    /// Per recorder: its registered ids, oldest first, and ids removed.
    ids: [Vec<ListenerId>; RECORDERS],
    stale: [Vec<ListenerId>; RECORDERS],
    expected: [Vec<Event>; RECORDERS],
}

impl Listeners {
    fn tell(&mut self, event: impl Fn() -> Event) {
        // Each registration hears the event once, in registration order
        // (events go to one log per recorder, so order within it is enough).
        for r in 0..RECORDERS {
            for _ in 0..self.ids[r].len() {
                self.expected[r].push(event());
            }
        }
    }

    fn active(&self) -> usize {
        self.ids.iter().map(Vec::len).sum()
    }
}

/// Runs `input` against a real list and the model.
pub fn check(input: &Input) -> Result<(), Mismatch> {
    let recorders: [Recorder; RECORDERS] = Default::default();
    let limit = limit_of(input.limit);
    let list: List<'_> = RamList::with_address_limit(limit);
    let mut blocks: BTreeMap<u64, Model> = BTreeMap::new();
    let mut version = 0u64;
    let mut ls = Listeners {
        ids: Default::default(),
        stale: Default::default(),
        expected: Default::default(),
    };

    for (step, op) in input.ops.iter().enumerate() {
        let s = Some(step);
        match *op {
            Op::Add {
                name,
                used_pages,
                max_pages,
                half_page,
                grow,
                flags,
                clear_shift,
                postcopy_pages,
                memory,
            } => {
                let name_idx = usize::from(name) % NAMES.len();
                let name = NAMES[name_idx];
                let used = u64::from(used_pages) * PAGE + if half_page { PAGE / 2 } else { 0 };
                let max = if grow {
                    u64::from(max_pages) * PAGE
                } else {
                    used
                };
                let flags = BlockFlags::from_bits_truncate(u32::from(flags));
                let shift = if clear_shift < 200 {
                    6 + clear_shift % 26
                } else {
                    clear_shift
                };
                let postcopy = postcopy_pages.map(|p| u64::from(p) * PAGE);
                let full = align_up(max, PAGE).unwrap_or(max);
                let reserved = match memory {
                    MemShape::TooSmall => full.saturating_sub(PAGE),
                    _ => full,
                };
                let aligned_used = (used / PAGE * PAGE).min(reserved);
                let mem_used = match memory {
                    MemShape::UsedMismatch if aligned_used >= PAGE => aligned_used - PAGE,
                    MemShape::UsedMismatch => PAGE.min(reserved),
                    _ => aligned_used,
                };
                let mut buf = vec![0u8; reserved as usize].into_boxed_slice();
                for (page, bytes) in buf.chunks_mut(PAGE as usize).enumerate() {
                    bytes.fill(fill_byte(name_idx, page));
                }
                let initial = buf.to_vec();
                let mem =
                    BufferMemory::new(buf, ByteLen(mem_used), PageSize::SIZE_4K).map_err(|e| {
                        Mismatch {
                            step: s,
                            what: format!("harness: BufferMemory::new: {e}"),
                        }
                    })?;
                let base = mem.base().as_ptr() as usize;
                let bitmaps = BlockBitmaps::allocate(ByteLen(max), shift)
                    .or_else(|_| BlockBitmaps::allocate(ByteLen(max), DEFAULT_CLEAR_SHIFT))
                    .map_err(|e| Mismatch {
                        step: s,
                        what: format!("harness: BlockBitmaps::allocate: {e}"),
                    })?;
                let mut spec = BlockSpec::new(
                    BlockName::new(name).map_err(|e| Mismatch {
                        step: s,
                        what: format!("harness: name: {e}"),
                    })?,
                    ByteLen(used),
                )
                .flags(flags)
                .clear_shift(shift);
                spec.max_length = ByteLen(max);
                spec.postcopy_length = postcopy.map(ByteLen);

                let want: Result<u64, AddError> = (|| {
                    flags.validate().map_err(AddError::Flags)?;
                    if used == 0 {
                        return Err(AddError::ZeroLength);
                    }
                    for length in [used, max] {
                        if length % PAGE != 0 {
                            return Err(AddError::Unaligned {
                                length,
                                page_size: PAGE,
                            });
                        }
                    }
                    if used > max {
                        return Err(AddError::UsedExceedsMax { used, max });
                    }
                    if used != max && !flags.contains(BlockFlags::RESIZABLE) {
                        return Err(AddError::MaxLengthNeedsResizable { used, max });
                    }
                    if let Some(pc) = postcopy.filter(|&pc| pc > max) {
                        return Err(AddError::PostcopyTooLong { postcopy: pc, max });
                    }
                    if reserved < max {
                        return Err(AddError::MemoryTooSmall { reserved, max });
                    }
                    if mem_used != used {
                        return Err(AddError::MemoryUsedMismatch {
                            memory: mem_used,
                            block: used,
                        });
                    }
                    if blocks.values().any(|b| b.name == name) {
                        return Err(AddError::DuplicateName);
                    }
                    if blocks.len() == CAPACITY {
                        return Err(AddError::ListFull { capacity: CAPACITY });
                    }
                    let offset =
                        model_best_fit(&blocks, max, limit).ok_or(AddError::AddressSpaceFull)?;
                    if !(6..=31).contains(&shift) {
                        return Err(AddError::ClearShift(shift));
                    }
                    Ok(offset)
                })();
                let real = list.add(spec, mem, bitmaps);
                same(
                    s,
                    format_args!("add({name:?}, used {used:#x}, max {max:#x})"),
                    real.as_ref().map(|o| o.0).map_err(|r| r.error),
                    want,
                )?;
                if let Ok(offset) = want {
                    let pages = (max / PAGE) as usize;
                    let mut dirty: [Vec<bool>; 3] = Default::default();
                    dirty.iter_mut().for_each(|d| *d = vec![false; pages]);
                    blocks.insert(
                        offset,
                        Model {
                            name,
                            offset,
                            used,
                            max,
                            flags,
                            postcopy: postcopy.unwrap_or(used),
                            base,
                            dirty,
                            memory: initial,
                        },
                    );
                    version += 1;
                    ls.tell(|| Event::Added(name.into(), offset));
                }
            }
            Op::Remove { name } => {
                let name = NAMES[usize::from(name) % NAMES.len()];
                let real = list
                    .remove(name)
                    .map(|b| (b.name().to_string(), b.offset().0));
                let found = blocks.values().find(|b| b.name == name).map(|b| b.offset);
                let want = match found {
                    Some(offset) => {
                        blocks.remove(&offset);
                        version += 1;
                        ls.tell(|| Event::Removed(name.into()));
                        Ok((name.to_string(), offset))
                    }
                    None => Err(ramblock_core::list::UnknownBlock),
                };
                same(s, format_args!("remove({name:?})"), real, want)?;
            }
            Op::Resize {
                name,
                pages,
                half_page,
            } => {
                let name = NAMES[usize::from(name) % NAMES.len()];
                let new = u64::from(pages) * PAGE + if half_page { PAGE / 2 } else { 0 };
                let real = list.resize(name, ByteLen(new));
                let want = match model_by_name(&mut blocks, name) {
                    None => Err(ResizeError::UnknownBlock),
                    Some(b) if !b.flags.contains(BlockFlags::RESIZABLE) => {
                        Err(ResizeError::NotResizable)
                    }
                    Some(_) if new == 0 => Err(ResizeError::ZeroLength),
                    Some(_) if new % PAGE != 0 => Err(ResizeError::Unaligned {
                        length: new,
                        page_size: PAGE,
                    }),
                    Some(b) if new > b.max => Err(ResizeError::ExceedsMax {
                        length: new,
                        max: b.max,
                    }),
                    Some(b) if new == b.used => Ok(()),
                    Some(b) => {
                        let old = b.used;
                        b.used = new;
                        let used_pages = (new / PAGE) as usize;
                        for d in &mut b.dirty {
                            d[..used_pages].fill(true);
                            d[used_pages..].fill(false);
                        }
                        version += 1;
                        ls.tell(|| Event::Resized(name.into(), old, new));
                        Ok(())
                    }
                };
                same(s, format_args!("resize({name:?}, {new:#x})"), real, want)?;
            }
            Op::BlockAt { addr } => {
                let addr = u64::from(addr) * 512;
                let want = model_at(&blocks, addr).map(|(b, off)| (b.name.to_string(), off));
                let view = list.read();
                for round in ["first", "second (most recently used)"] {
                    let real = view
                        .block_at(RamAddr(addr))
                        .map(|(b, off)| (b.name().to_string(), off.0));
                    same(
                        s,
                        format_args!("block_at({addr:#x}), {round} lookup"),
                        real,
                        want.clone(),
                    )?;
                }
                for b in view.iter() {
                    let inside = b.offset().0 <= addr && addr < b.offset().0 + b.max_length().0;
                    same(
                        s,
                        format_args!("{}.contains({addr:#x})", b.name()),
                        b.contains(RamAddr(addr)),
                        inside,
                    )?;
                }
            }
            Op::ByName { name } => {
                let name = NAMES[usize::from(name) % NAMES.len()];
                let view = list.read();
                let real = view.by_name(name).map(|b| b.offset().0);
                let want = blocks.values().find(|b| b.name == name).map(|b| b.offset);
                same(s, format_args!("by_name({name:?})"), real, want)?;
            }
            Op::ByHostAddr { block, offset } => {
                let local = 0u8;
                let p = match blocks
                    .values()
                    .nth(usize::from(block) % blocks.len().max(1))
                {
                    Some(b) => b
                        .base
                        .wrapping_add(offset as usize % (b.max as usize + 8192)),
                    None => &local as *const u8 as usize,
                };
                let want = blocks
                    .values()
                    .find(|b| p >= b.base && ((p - b.base) as u64) < b.max)
                    .map(|b| (b.name.to_string(), (p - b.base) as u64));
                let Some(ptr) = NonNull::new(p as *mut u8) else {
                    continue;
                };
                let view = list.read();
                let real = view
                    .by_host_addr(ptr)
                    .map(|(b, off)| (b.name().to_string(), off.0));
                same(s, format_args!("by_host_addr({p:#x})"), real, want)?;
            }
            Op::MarkDirty { addr, len, clients } => {
                let addr = u64::from(addr) * 512;
                let len = u64::from(len) * 16;
                let clients = DirtyClients::from_bits_truncate(clients);
                let want = match blocks
                    .values_mut()
                    .find(|b| b.offset <= addr && addr < b.end())
                {
                    None => Err(DirtyError::UnknownAddress(RamAddr(addr))),
                    Some(b) => {
                        let off = addr - b.offset;
                        if off + len > b.used {
                            Err(DirtyError::Access(AccessError::OutOfRange {
                                offset: ByteLen(off),
                                len: ByteLen(len),
                                used_length: ByteLen(b.used),
                            }))
                        } else {
                            if len > 0 {
                                let (first, last) = (off / PAGE, (off + len - 1) / PAGE);
                                for c in DirtyClient::ALL {
                                    if clients.has(c) {
                                        b.dirty[c as usize][first as usize..=last as usize]
                                            .fill(true);
                                    }
                                }
                            }
                            Ok(())
                        }
                    }
                };
                same(
                    s,
                    format_args!("mark_dirty({addr:#x}, {len:#x}, {clients:?})"),
                    list.mark_dirty(RamAddr(addr), ByteLen(len), clients),
                    want,
                )?;
            }
            Op::Write { addr, len, byte } => {
                let addr = u64::from(addr) * 512;
                let len = u64::from(len) * 37;
                let data = vec![byte; len as usize];
                let view = list.read();
                let real = view
                    .block_at(RamAddr(addr))
                    .map(|(b, off)| b.write(off, &data));
                let want = blocks
                    .values_mut()
                    .find(|b| b.offset <= addr && addr < b.end())
                    .map(|b| {
                        let off = addr - b.offset;
                        if b.flags.contains(BlockFlags::READ_ONLY) {
                            Err(AccessError::ReadOnly)
                        } else if off + len > b.used {
                            Err(AccessError::OutOfRange {
                                offset: ByteLen(off),
                                len: ByteLen(len),
                                used_length: ByteLen(b.used),
                            })
                        } else {
                            b.memory[off as usize..(off + len) as usize].fill(byte);
                            if len > 0 {
                                let (first, last) = (off / PAGE, (off + len - 1) / PAGE);
                                for d in &mut b.dirty {
                                    d[first as usize..=last as usize].fill(true);
                                }
                            }
                            Ok(())
                        }
                    });
                same(s, format_args!("write({addr:#x}, {len} bytes)"), real, want)?;
            }
            Op::AddListener { which } => {
                let r = usize::from(which) % RECORDERS;
                let real = list.add_listener(&recorders[r]);
                if ls.active() == MAX_LISTENERS {
                    holds(
                        s,
                        real.is_err(),
                        "add_listener past MAX_LISTENERS succeeded",
                    )?;
                } else {
                    match real {
                        Ok(id) => ls.ids[r].push(id),
                        Err(e) => return same(s, "add_listener", Err(e), Ok(())),
                    }
                    for b in blocks.values() {
                        ls.expected[r].push(Event::Added(b.name.into(), b.offset));
                    }
                }
            }
            Op::RemoveListener { which } => {
                let r = usize::from(which) % RECORDERS;
                if let Some(id) = ls.ids[r].pop() {
                    holds(
                        s,
                        list.remove_listener(id),
                        "remove_listener(live id) = false",
                    )?;
                    ls.stale[r].push(id);
                } else if let Some(&id) = ls.stale[r].last() {
                    holds(
                        s,
                        !list.remove_listener(id),
                        "remove_listener(stale id) = true",
                    )?;
                }
            }
        }
        same(s, "version", list.version(), version)?;
        for (r, rec) in recorders.iter().enumerate() {
            same(
                s,
                format_args!("events heard by listener {r}"),
                rec.take(),
                std::mem::take(&mut ls.expected[r]),
            )?;
        }
    }
    final_state(&list, &blocks, limit)
}

fn final_state(list: &List<'_>, blocks: &BTreeMap<u64, Model>, limit: u64) -> Result<(), Mismatch> {
    let view = list.read();
    let real: Vec<_> = view
        .iter()
        .map(|b| {
            (
                b.name().to_string(),
                b.offset().0,
                b.used_length().0,
                b.max_length().0,
                b.flags(),
                b.postcopy_length().0,
            )
        })
        .collect();
    let want: Vec<_> = blocks
        .values()
        .map(|b| {
            (
                b.name.to_string(),
                b.offset,
                b.used,
                b.max,
                b.flags,
                b.postcopy,
            )
        })
        .collect();
    same(
        None,
        "blocks (name, offset, used, max, flags, postcopy)",
        real,
        want,
    )?;
    let mut prev_end = 0;
    for b in view.iter() {
        let (off, end) = (b.offset().0, b.offset().0 + b.max_length().0);
        holds(
            None,
            off % BLOCK_ALIGN == 0,
            format_args!("{} at {off:#x} is not 64-page aligned", b.name()),
        )?;
        holds(
            None,
            off >= prev_end,
            format_args!("{} at {off:#x} overlaps the block before", b.name()),
        )?;
        holds(
            None,
            end <= limit,
            format_args!("{} ends at {end:#x}, past the limit {limit:#x}", b.name()),
        )?;
        prev_end = end;
    }
    for (b, m) in view.iter().zip(blocks.values()) {
        for c in DirtyClient::ALL {
            let real: Vec<u64> = b.dirty(c).words().iter().map(|w| w.load(Relaxed)).collect();
            same(
                None,
                format_args!("{} dirty bitmap of {c:?}", m.name),
                real,
                bits_words(&m.dirty[c as usize]),
            )?;
        }
        same(
            None,
            format_args!("{} received map length", m.name),
            b.received().postcopy_pages() as u64,
            m.postcopy / PAGE,
        )?;
        let past = b
            .dirty(DirtyClient::Migration)
            .is_set((m.max / PAGE) as usize);
        same(
            None,
            format_args!("{} dirty bit past max", m.name),
            past,
            Err(BitRangeError {
                start: m.max / PAGE,
                count: 1,
                len: m.max / PAGE,
            }),
        )?;
        let mut mem = vec![0u8; m.used as usize];
        b.read(ByteLen(0), &mut mem).map_err(|e| Mismatch {
            step: None,
            what: format!("{}: reading the used length failed: {e}", m.name),
        })?;
        holds(
            None,
            mem == m.memory[..m.used as usize],
            format_args!("{} memory differs from the model", m.name),
        )?;
    }
    Ok(())
}

/// The fuzz entry point; panics with a reproducer on a mismatch.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, check);
}
