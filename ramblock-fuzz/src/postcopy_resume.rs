//! The resume path against [`crate::receive_model`]: the
//! resume header and block table on the destination, and the received map
//! it sends back, read by the source.
//!
//! An input is a first stream that reaches post-copy (every page sent,
//! some discarded, the switch, some operations) and breaks, then streams
//! that try to resume it: a resume or a new header, the original table or
//! one with entries reordered, renamed, resized, with other page sizes or
//! flags, left out or added, then operations (as in
//! [`crate::postcopy_receive`]) and a cut. Every check of
//! [`check_streams`](crate::receive_model::check_streams) applies; and
//! each received map the destination sent back is read by the source's
//! reader over a list of the same blocks: it must report exactly the pages
//! the model says are missing, and with one bit flipped or cut short it
//! must be refused with nothing reported.

use crate::postcopy_receive::{all_pages, encode, Op};
use crate::receive_model::{self, entry_of, good_table, write_record, Model, LAYOUT, NAMES, PAGE};
use crate::{holds, same, Mismatch, Ops};
use arbitrary::Arbitrary;
use ramblock_core::stream::format::{Header, Record, TableEntry};
use ramblock_core::stream::io::SliceReader;
use ramblock_core::stream::received_map::{read_received_map, scratch_words};

/// A table entry of a resumed stream.
#[derive(Arbitrary, Clone, Debug)]
pub struct EntrySpec {
    /// The name: `NAMES[name % 5]`.
    pub name: u8,
    /// Used pages: the block's (0) or `pages % 10`.
    pub pages: Option<u8>,
    /// Page size: the block's, or `4 KiB << (shift % 4)`.
    pub shift: Option<u8>,
    /// Flags: the block's, or these bits.
    pub flags: Option<u8>,
}

/// The table a resuming stream sends.
#[derive(Arbitrary, Clone, Debug)]
pub enum TableSpec {
    /// The original.
    Same,
    /// The original with entries `a` and `b` swapped.
    Swap(u8, u8),
    /// Any entries.
    Entries(Vec<EntrySpec>),
}

/// A stream after the break.
#[derive(Arbitrary, Clone, Debug)]
pub struct Attempt {
    /// A new stream's header instead of a resume header.
    pub new_header: bool,
    /// Its table.
    pub table: TableSpec,
    /// Its records.
    pub ops: Vec<Op>,
    /// Cut to this many bytes (modulo length + 1).
    pub cut: Option<u32>,
}

/// The whole input.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Pages discarded before the switch: bit `i` of one unit each (the
    /// pages of `ram`, the hugepages of `huge`, the post-copy pages of
    /// `short` and `grow`).
    pub discard: u32,
    /// Records of the first stream after the switch (then it breaks).
    pub first: Vec<Op>,
    /// A bit to flip in each received map read back (bit index modulo
    /// the map's bits), or cut it there instead.
    pub flip: Option<(u16, bool)>,
    /// The streams that follow.
    pub attempts: Ops<Attempt>,
}

/// Discard units: (block, first page, pages).
const UNITS: [(u32, u64, u32); 20] = [
    (0, 0, 1),
    (0, 1, 1),
    (0, 2, 1),
    (0, 3, 1),
    (0, 4, 1),
    (0, 5, 1),
    (0, 6, 1),
    (0, 7, 1),
    (1, 0, 4),
    (1, 4, 4),
    (1, 8, 4),
    (1, 12, 4),
    (2, 0, 1),
    (2, 1, 1),
    (2, 2, 1),
    (2, 3, 1),
    (3, 0, 1),
    (3, 1, 1),
    (3, 2, 1),
    (3, 3, 1),
];

fn table(out: &mut Vec<u8>, new_header: bool, spec: &TableSpec) {
    let entries: Vec<(&str, TableEntry)> = match spec {
        TableSpec::Same => (0..LAYOUT.len())
            .map(|b| (LAYOUT[b].name, entry_of(b)))
            .collect(),
        TableSpec::Swap(a, b) => {
            let mut e: Vec<_> = (0..LAYOUT.len())
                .map(|b| (LAYOUT[b].name, entry_of(b)))
                .collect();
            e.swap(
                usize::from(*a) % LAYOUT.len(),
                usize::from(*b) % LAYOUT.len(),
            );
            e
        }
        TableSpec::Entries(list) => list
            .iter()
            .take(6)
            .map(|s| {
                let i = usize::from(s.name) % NAMES.len();
                let mut e = entry_of(i.min(LAYOUT.len() - 1));
                if let Some(p) = s.pages {
                    e.used_length = u64::from(p % 10) * PAGE as u64;
                }
                if let Some(shift) = s.shift {
                    e.page_size = (PAGE as u64) << (shift % 4);
                }
                if let Some(f) = s.flags {
                    e.flags = u32::from(f);
                }
                (NAMES[i], e)
            })
            .collect(),
    };
    let header = Header::new(entries.len() as u32);
    let _ = if new_header {
        header.write(out)
    } else {
        header.write_resume(
            &ramblock_core::stream::resume_token::ResumeToken([7; 16]),
            out,
        )
    };
    for (name, e) in entries {
        let _ = e.write(name, out);
    }
}

/// The streams an input describes.
pub fn streams(input: &Input) -> Vec<Vec<u8>> {
    let mut model = Model::default();
    let mut first = Vec::new();
    good_table(&mut first, false);
    all_pages(&mut first, 0x40);
    for (i, &(block, page, count)) in UNITS.iter().enumerate() {
        if input.discard >> i & 1 == 1 {
            write_record(
                &mut first,
                Record::Discard {
                    block,
                    first: page,
                    count,
                },
            );
        }
    }
    write_record(&mut first, Record::Postcopy { sections: 0 });
    for op in input.first.iter().take(16) {
        if matches!(op, Op::End { .. }) {
            continue; // the first stream breaks
        }
        encode(&mut first, op, &model);
    }
    let _ = model.receive(&first);
    let mut out = vec![first];
    for attempt in input.attempts.iter().take(3) {
        let mut s = Vec::new();
        table(&mut s, attempt.new_header, &attempt.table);
        for op in attempt.ops.iter().take(16) {
            encode(&mut s, op, &model);
            if matches!(op, Op::End { .. }) {
                break;
            }
        }
        if let Some(cut) = attempt.cut {
            s.truncate(cut as usize % (s.len() + 1));
        }
        let _ = model.receive(&s);
        out.push(s);
    }
    out
}

/// Runs the streams and reads back every received map.
pub fn check(input: &Input) -> Result<(), Mismatch> {
    let (model, real) = receive_model::check_streams(&streams(input))?;
    // The source: the same blocks (its received maps are not used).
    let source = receive_model::destination()?;
    let view = source.read();
    let mut scratch = vec![0u64; scratch_words(&view)];
    for (i, (map, missing)) in real.maps.iter().zip(&model.resumes).enumerate() {
        let mut reported = Vec::new();
        let got = read_received_map(&mut SliceReader::new(map), &view, &mut scratch, |b, r| {
            let index = LAYOUT.iter().position(|s| s.name == b.name()).unwrap_or(99);
            reported.extend(r.map(|p| (index, p)));
        });
        holds(
            Some(i),
            got.is_ok(),
            format_args!("the source refused a good received map: {got:?}"),
        )?;
        same(Some(i), "missing pages the map reports", &reported, missing)?;
        if let Some((bit, cut)) = input.flip {
            let bits = map.len() * 8;
            let at = usize::from(bit) % bits;
            let mut bad = map.clone();
            if cut {
                bad.truncate(at / 8);
            } else {
                bad[at / 8] ^= 1 << (at % 8);
            }
            let mut reported = 0;
            let got =
                read_received_map(&mut SliceReader::new(&bad), &view, &mut scratch, |_, _| {
                    reported += 1
                });
            holds(
                Some(i),
                got.is_err() && reported == 0,
                format_args!(
                    "a received map {} at bit {at} was accepted ({got:?}, {reported} runs reported)",
                    if cut { "cut" } else { "flipped" }
                ),
            )?;
        }
    }
    Ok(())
}

/// The fuzz entry point.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, check);
}
