//! The stream receiver fed arbitrary bytes, against a model receiver.
//!
//! The destination is a fixed list whose memory starts filled with a guard
//! pattern (no page is zero):
//!
//! | block | used / max pages | flags |
//! |---|---|---|
//! | `pc.ram` | 16 / 16 | migratable |
//! | `vga` | 8 / 32 | migratable, resizable |
//! | `extra` | 4 / 4 | (not migratable: optional in the table) |
//! | `rom` | 2 / 2 | read-only |
//!
//! The model walks the same bytes the way `docs/stream-format.md` and the
//! receiver's module docs describe (header, block table matched against the
//! destination, then records checked against the block they name) and
//! predicts the outcome: a clean end with its summary, or the error (by
//! [`ReceiveError::code`]). Then:
//! - the real receiver must not panic, and must end in the predicted way;
//! - every page that differs from its guard must belong to a record the
//!   model accepted (nothing outside the accepted records is written);
//! - every block's whole reservation must equal the model's bytes, and its
//!   used length the model's (resizes from the table and from records);
//! - the device-state sections the real receiver handed its sink (a model
//!   VMM that refuses any section named `refuse`, with a limit of
//!   [`STATE_LIMIT`] bytes) must be the ones the model accepted.

use crate::model_cursor::Cursor;
use crate::stream_roundtrip::{self, PageFill, Step};
use crate::{holds, same, Mismatch};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::checksum::Checksum;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::migrate::receiver::{ReceiveError, ReceiveSummary, Receiver, SectionSink};
use ramblock_core::section::SectionHeader;
use ramblock_core::stream::io::SliceReader;
use std::collections::BTreeSet;

const PAGE: usize = 4096;

/// The destination's bound on device-state sections (headers included):
/// small, so inputs reach it.
pub const STATE_LIMIT: u64 = 1024;
/// The code the model VMM refuses a section named `refuse` with.
const REFUSED: u32 = 9;

/// A section as the VMM got it: name, instance id, version, bytes.
type Loaded = (String, u32, u32, Vec<u8>);

/// The real receiver's sink: collects sections, refuses `refuse`.
#[derive(Default)]
struct Vmm {
    loaded: Vec<Loaded>,
    partial: Vec<u8>,
}

impl SectionSink for Vmm {
    fn load(&mut self, _: &SectionHeader, offset: u64, bytes: &[u8]) -> Result<(), u32> {
        // Pieces come in order; a gap would show as different bytes.
        if offset != self.partial.len() as u64 {
            return Err(u32::MAX);
        }
        self.partial.extend_from_slice(bytes);
        Ok(())
    }
    fn done(&mut self, h: &SectionHeader) -> Result<(), u32> {
        let bytes = std::mem::take(&mut self.partial);
        if h.name.as_str() == "refuse" {
            return Err(REFUSED);
        }
        self.loaded
            .push((h.name.to_string(), h.instance_id, h.version, bytes));
        Ok(())
    }
}

/// The destination's blocks: name, used pages, max pages, flags.
pub const LAYOUT: [(&str, u64, u64, BlockFlags); 4] = [
    ("pc.ram", 16, 16, BlockFlags::MIGRATABLE),
    (
        "vga",
        8,
        32,
        BlockFlags::MIGRATABLE.union(BlockFlags::RESIZABLE),
    ),
    ("extra", 4, 4, BlockFlags::empty()),
    ("rom", 2, 2, BlockFlags::READ_ONLY),
];

/// The model of one destination block.
#[derive(Clone, Debug)]
struct Block {
    name: &'static str,
    used: u64,
    max: u64,
    flags: BlockFlags,
    memory: Vec<u8>,
}

/// The model's error: the receiver's error code.
type Code = u32;

/// The guard byte of page `page` of block `block` (never zero).
fn guard(block: usize, page: usize) -> u8 {
    stream_roundtrip::guard(block, page)
}

fn fresh_blocks() -> Vec<Block> {
    LAYOUT
        .iter()
        .enumerate()
        .map(|(i, &(name, used, max, flags))| {
            let mut memory = vec![0u8; max as usize * PAGE];
            for (p, bytes) in memory.chunks_mut(PAGE).enumerate() {
                bytes.fill(guard(i, p));
            }
            Block {
                name,
                used: used * PAGE as u64,
                max: max * PAGE as u64,
                flags,
                memory,
            }
        })
        .collect()
}

/// A table slot: block index in [`LAYOUT`] and used pages.
struct Slot {
    block: usize,
    used_pages: u64,
}

/// The checksum the source sends for a block whose first `used` bytes are
/// `memory`: core's definition (`Checksum::of_region`), computed over the
/// model's bytes.
fn checksum(memory: &mut [u8], used: u64) -> u64 {
    match BufferMemory::new(memory, ByteLen(used), PageSize::SIZE_4K) {
        Ok(mem) => Checksum::of_region(&mem.region(), used).unwrap_or(0),
        Err(_) => 0,
    }
}

/// The model receiver. Returns the outcome, and records in `touched` the
/// (block, page) pairs of every accepted run record.
fn model_receive(
    data: &[u8],
    blocks: &mut [Block],
    touched: &mut BTreeSet<(usize, u64)>,
    loaded: &mut Vec<Loaded>,
) -> Result<ReceiveSummary, Code> {
    let mut r = Cursor(data);
    let header = r.take(16)?;
    // A resume header is read like a new one, then refused: nothing waits
    // to be resumed here.
    let resume = header[..8] == *b"RBRESUME";
    if header[..8] != *b"RAMBLOCK" && !resume {
        return Err(1);
    }
    let version = u16::from_le_bytes([header[8], header[9]]);
    // A new stream is version 2 (the handover); a resume header is its
    // own version 2: it carries the destination's token.
    if version != 2 {
        return Err(2);
    }
    if header[10] != 12 {
        return Err(3);
    }
    // Byte 11: page channels that follow a new stream; this receiver has
    // none (ChannelCountMismatch). A resume header's byte 11 is not read.
    if !resume && header[11] != 0 {
        return Err(38);
    }
    let count = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
    if count as usize > LAYOUT.len() {
        return Err(4);
    }
    if resume {
        // The token: nothing issued one here, so any is read and kept.
        r.take(16)?;
    }
    let mut table: Vec<Slot> = Vec::new();
    for _ in 0..count {
        let len = usize::from(r.take(1)?[0]);
        let name = r.take(len)?;
        let used = r.u64()?;
        let page_size = r.u64()?;
        let _flags = r.u32()?;
        let name = match std::str::from_utf8(name) {
            Ok(n) if !n.is_empty() && !n.contains('\0') => n,
            _ => return Err(5),
        };
        if table.iter().any(|s| blocks[s.block].name == name) {
            return Err(7);
        }
        let Some(at) = blocks.iter().position(|b| b.name == name) else {
            return Err(6);
        };
        let b = &mut blocks[at];
        if b.flags.contains(BlockFlags::READ_ONLY) {
            return Err(11);
        }
        if page_size != PAGE as u64 {
            return Err(9);
        }
        let resizable = b.flags.contains(BlockFlags::RESIZABLE);
        let fits =
            used == b.used || (resizable && used <= b.max && used % PAGE as u64 == 0 && used > 0);
        if !fits {
            return Err(10);
        }
        b.used = used;
        table.push(Slot {
            block: at,
            used_pages: used / PAGE as u64,
        });
    }
    // Blocks are laid out in LAYOUT order, so this is offset order too.
    if blocks.iter().enumerate().any(|(i, b)| {
        b.flags.contains(BlockFlags::MIGRATABLE) && !table.iter().any(|s| s.block == i)
    }) {
        return Err(8);
    }
    if resume {
        return Err(23);
    }
    let mut summary = ReceiveSummary::default();
    // Section bytes so far, headers included; after a section only
    // sections and End may come (the fixed fields are read first).
    let mut state: u64 = 0;
    let after_state = |state: u64| if state > 0 { Err(23u32) } else { Ok(()) };
    loop {
        let tag = r.take(1)?[0];
        match tag {
            1 | 2 => {
                let (index, first, count) = (r.u32()?, r.u64()?, r.u32()?);
                after_state(state)?;
                let slot = table.get(index as usize).ok_or(13u32)?;
                if count == 0 || count > 64 {
                    return Err(14);
                }
                let end = first.checked_add(u64::from(count)).ok_or(15u32)?;
                if end > slot.used_pages {
                    return Err(16);
                }
                let bytes = count as usize * PAGE;
                let at = first as usize * PAGE;
                let mem = &mut blocks[slot.block].memory;
                if tag == 1 {
                    let payload = r.take(bytes)?;
                    mem[at..at + bytes].copy_from_slice(payload);
                    summary.pages += u64::from(count);
                } else {
                    mem[at..at + bytes].fill(0);
                    summary.zero_pages += u64::from(count);
                }
                touched.extend((first..end).map(|p| (slot.block, p)));
            }
            3 => {
                let pass = r.u32()?;
                let _remaining = r.u64()?;
                after_state(state)?;
                // Passes seen: the highest pass number plus one (saturating:
                // a pass number of u32::MAX must not bring the receiver down).
                summary.passes = summary.passes.max(pass.saturating_add(1));
            }
            4 => {
                let (index, used) = (r.u32()?, r.u64()?);
                after_state(state)?;
                let slot = table.get_mut(index as usize).ok_or(13u32)?;
                let b = &mut blocks[slot.block];
                let ok = b.flags.contains(BlockFlags::RESIZABLE)
                    && used > 0
                    && used % PAGE as u64 == 0
                    && used <= b.max;
                if !ok {
                    return Err(17);
                }
                b.used = used;
                slot.used_pages = used / PAGE as u64;
            }
            5 => {
                let count = r.u32()?;
                if count as usize != table.len() {
                    return Err(18);
                }
                for slot in &table {
                    let expected = r.u64()?;
                    let b = &mut blocks[slot.block];
                    if checksum(&mut b.memory, b.used) != expected {
                        return Err(19);
                    }
                    summary.blocks += 1;
                }
                return Ok(summary);
            }
            6 => {
                // Discard: read whole, then refused: a plain receive does
                // not do post-copy, and a discard only comes just before
                // it (nothing is discarded).
                r.u32()?;
                r.u64()?;
                r.u32()?;
                return Err(24);
            }
            7 => {
                // Post-copy: this destination (plain `receive`) refuses it
                // at the record, before its sections.
                r.u32()?;
                after_state(state)?;
                return Err(24);
            }
            8 => {
                // Section: a 272-byte header (length byte, 255-byte
                // zero-padded name, instance u32, version u32, len u64),
                // then `len` bytes; see docs/stream-format.md.
                let (name, instance, version, len) = section_header(r.take(272)?)?;
                let total = state.saturating_add(272).saturating_add(len);
                if total > STATE_LIMIT {
                    return Err(32);
                }
                state = total;
                let body = r.take(len as usize)?;
                if name == "refuse" {
                    return Err(34);
                }
                loaded.push((name.to_string(), instance, version, body.to_vec()));
            }
            9 => {
                // Barrier: read whole, then refused: this destination has
                // no page channels.
                r.u32()?;
                r.u32()?;
                after_state(state)?;
                return Err(38);
            }
            _ => return Err(12),
        }
    }
}

/// A section record's 272-byte header as the format document describes it
/// (length byte, 255-byte zero-padded name, instance u32, version u32, len
/// u64): name, instance, version and body length, or code 31
/// (`BadSection`).
pub fn section_header(h: &[u8]) -> Result<(&str, u32, u32, u64), u32> {
    let name_len = usize::from(h[0]);
    let name = &h[1..1 + name_len];
    let padded = h[1 + name_len..256].iter().all(|&b| b == 0);
    let name = match std::str::from_utf8(name) {
        Ok(n) if name_len > 0 && padded && !n.contains('\0') => n,
        _ => return Err(31),
    };
    let word = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let (instance, version) = (word(256), word(260));
    let len = u64::from(word(264)) | u64::from(word(268)) << 32;
    if len > 64 << 20 {
        return Err(31);
    }
    Ok((name, instance, version, len))
}

/// How a receive ended: its summary, or the error's code.
pub type Outcome = Result<ReceiveSummary, u32>;

/// Feeds `data` to the real receiver and to the model; compares outcome,
/// used lengths and every byte of every block. Returns the outcome both
/// agreed on.
pub fn check(data: &[u8]) -> Result<Outcome, Mismatch> {
    let list = stream_roundtrip::List::new();
    for (i, &(name, used, max, flags)) in LAYOUT.iter().enumerate() {
        stream_roundtrip::add_block(&list, name, used, max, flags, |p| guard(i, p)).map_err(
            |e| Mismatch {
                step: None,
                what: format!("harness: {e}"),
            },
        )?;
    }
    let mut model = fresh_blocks();
    let mut touched = BTreeSet::new();
    let mut want_loaded = Vec::new();
    let want = model_receive(data, &mut model, &mut touched, &mut want_loaded);

    let mut vmm = Vmm::default();
    let real = stream_roundtrip::with_buffers(|_, bounce| {
        let mut receiver = Receiver::new(bounce)
            .map_err(|e| Mismatch {
                step: None,
                what: format!("harness: {e}"),
            })?
            .with_device_state(&mut vmm, STATE_LIMIT);
        Ok(receiver.receive(&list, &mut SliceReader::new(data), |_| {}))
    })?;
    let real_code = real.as_ref().map_err(ReceiveError::code);
    same(
        None,
        "outcome (summary, or error code)",
        real_code.copied(),
        want,
    )
    .map_err(|mut m| {
        if let Err(e) = &real {
            m.what.push_str(&format!(" (real error: {e})"));
        }
        m
    })?;

    same(
        None,
        "device-state sections loaded",
        &vmm.loaded,
        &want_loaded,
    )?;
    let view = list.read();
    let fresh = fresh_blocks();
    for ((i, b), (m, f)) in view.iter().enumerate().zip(model.iter().zip(&fresh)) {
        same(None, "block order", b.name(), m.name)?;
        same(
            None,
            format_args!("{} used length", m.name),
            b.used_length(),
            ByteLen(m.used),
        )?;
        let real_mem = reservation(b);
        for (page, (now, before)) in real_mem.chunks(PAGE).zip(f.memory.chunks(PAGE)).enumerate() {
            if now != before {
                holds(
                    None,
                    touched.contains(&(i, page as u64)),
                    format_args!(
                        "{} page {page} changed but no accepted record names it",
                        m.name
                    ),
                )?;
            }
        }
        holds(
            None,
            real_mem == m.memory,
            format_args!("{} memory differs from the model", m.name),
        )?;
    }
    Ok(want)
}

/// A block's whole reservation (past the used length too), read from its
/// host memory.
fn reservation(
    b: &ramblock_core::block::RamBlock<stream_roundtrip::Mem, ramblock_core::bitmap::Owned>,
) -> Vec<u8> {
    let len = b.max_length().0 as usize;
    let mut out = vec![0u8; len];
    // SAFETY: the memory reserves `max_length` bytes of a boxed buffer that
    // lives as long as the block (BufferMemory never unmaps anything), and
    // nothing writes it while the list's read guard is held here.
    unsafe {
        std::ptr::copy_nonoverlapping(b.memory().base().as_ptr(), out.as_mut_ptr(), len);
    }
    out
}

/// A valid stream for the destination layout, made by the real sender from
/// a source of `pc.ram` and `vga` (at `1 + vga_pages % 32` used pages)
/// holding `pages`, with `script` run between passes (three at most).
pub fn valid_stream(
    vga_pages: u64,
    pages: &[(u8, u8, PageFill)],
    script: &[Step],
) -> Result<Vec<u8>, String> {
    let list = stream_roundtrip::List::new();
    let resizable = BlockFlags::MIGRATABLE | BlockFlags::RESIZABLE;
    stream_roundtrip::add_block(&list, "pc.ram", 16, 16, BlockFlags::MIGRATABLE, |_| 0)?;
    stream_roundtrip::add_block(&list, "vga", 1 + vga_pages % 32, 32, resizable, |_| 0)?;
    for &(block, page, fill) in pages {
        stream_roundtrip::write_page(&list, usize::from(block), usize::from(page), fill);
    }
    stream_roundtrip::send(&list, 3, script).map(|(bytes, _)| bytes)
}

/// `stream` (from [`valid_stream`], whose table has two blocks) with
/// `sections` (name, instance id, version, bytes) inserted before its End
/// record, as a source sends device state at its switch-over.
pub fn with_sections(mut stream: Vec<u8>, sections: &[(&str, u32, u32, Vec<u8>)]) -> Vec<u8> {
    // End: tag, count, one u64 checksum per table entry.
    let end = stream.len() - (1 + 4 + 2 * 8);
    let mut records = Vec::new();
    for (name, instance_id, version, bytes) in sections {
        let Ok(name) = ramblock_core::section::SectionName::new(name) else {
            continue;
        };
        let header = SectionHeader {
            name,
            instance_id: *instance_id,
            version: *version,
            len: bytes.len() as u64,
        };
        let mut raw = [0u8; SectionHeader::ENCODED_LEN];
        header.encode(&mut raw);
        records.push(8u8);
        records.extend_from_slice(&raw);
        records.extend_from_slice(bytes);
    }
    stream.splice(end..end, records);
    stream
}

/// The fuzz entry point: the bytes are the stream. Panics with the bytes'
/// length and the mismatch on a difference.
pub fn fuzz(data: &[u8]) {
    if let Err(m) = check(data) {
        panic!("{m}\nreproducer: the {}-byte input itself", data.len());
    }
}
