//! The post-copy part of the receiver (Discard, Postcopy, placement,
//! hugepage assembly) against [`crate::receive_model`].
//!
//! An input is one stream for the destination of
//! [`crate::receive_model::LAYOUT`]: a good header
//! and table, optionally every page sent once in pre-copy (so a verified
//! end is within reach), then an operation list encoded as records with
//! small indices, pages and counts, so records collide: discards, the
//! switch, runs placed twice, hugepage runs out of order, resizes, ends
//! with the ledger's, memory's or wrong checksums, unknown tags. The
//! stream may be cut anywhere. Every check of
//! [`check_streams`](crate::receive_model::check_streams) applies.

use crate::receive_model::{self, good_table, write_record, Model, LAYOUT, PAGE};
use crate::{Mismatch, Ops};
use arbitrary::Arbitrary;
use ramblock_core::migrate::receiver::ReceiveSummary;
use ramblock_core::section::{SectionHeader, SectionName};
use ramblock_core::stream::format::Record;

/// One record to encode.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    /// A `Pages` record; each page filled with `fill ^ page`.
    Pages {
        /// Table index (4 is past the table).
        block: u8,
        /// First page.
        first: u8,
        /// Pages (0 and 65 are out of range).
        count: u8,
        /// Content seed.
        fill: u8,
    },
    /// A `Zero` record.
    Zero {
        /// Table index.
        block: u8,
        /// First page.
        first: u8,
        /// Pages.
        count: u8,
    },
    /// A `Discard` record.
    Discard {
        /// Table index.
        block: u8,
        /// First page.
        first: u8,
        /// Pages.
        count: u8,
    },
    /// A `Postcopy` record with `state` bytes of device state (as
    /// sections).
    Postcopy {
        /// Device state bytes.
        state: u8,
    },
    /// A `Sync` record.
    Sync {
        /// Pass number.
        pass: u8,
    },
    /// A `Resize` record to `pages` pages.
    Resize {
        /// Table index.
        block: u8,
        /// New used pages.
        pages: u8,
    },
    /// An `End` record: checksums the ledger vouches for (0), of memory
    /// (1) or wrong (2); `short` announces one fewer.
    End {
        /// Which checksums.
        sums: u8,
        /// Announce a wrong count.
        short: bool,
    },
    /// A raw byte where a record tag belongs.
    Tag(u8),
}

/// A section (header and body) as a `Postcopy` record carries it.
fn section(out: &mut Vec<u8>, name: &str, body: &[u8]) {
    let Ok(name) = SectionName::new(name) else {
        return;
    };
    let header = SectionHeader {
        name,
        instance_id: 0,
        version: 1,
        len: body.len() as u64,
    };
    let mut raw = [0u8; SectionHeader::ENCODED_LEN];
    header.encode(&mut raw);
    out.extend_from_slice(&raw);
    out.extend_from_slice(body);
}

fn small(v: u8, n: u8) -> u64 {
    u64::from(v % n)
}

fn count(v: u8) -> u32 {
    match v {
        250.. => 65,
        _ => u32::from(v % 9),
    }
}

/// Appends `op` to `out`; `before` is the model's state before this stream
/// (an `End`'s checksums come from the model run over the stream so far).
pub fn encode(out: &mut Vec<u8>, op: &Op, before: &Model) {
    match *op {
        Op::Pages {
            block,
            first,
            count: c,
            fill,
        } => {
            let (first, n) = (small(first, 20), count(c));
            write_record(
                out,
                Record::Pages {
                    block: small(block, 5) as u32,
                    first,
                    count: n,
                },
            );
            for p in 0..u64::from(n) {
                out.extend(std::iter::repeat_n(fill ^ (first + p) as u8, PAGE));
            }
        }
        Op::Zero {
            block,
            first,
            count: c,
        } => write_record(
            out,
            Record::Zero {
                block: small(block, 5) as u32,
                first: small(first, 20),
                count: count(c),
            },
        ),
        Op::Discard {
            block,
            first,
            count: c,
        } => write_record(
            out,
            Record::Discard {
                block: small(block, 5) as u32,
                first: small(first, 20),
                count: count(c),
            },
        ),
        Op::Postcopy { state } => {
            // The state as the `cpu` section, a second (empty) `net`
            // section when it is odd, none when it is zero.
            let sections = u32::from(state > 0) + u32::from(state % 2 == 1);
            write_record(out, Record::Postcopy { sections });
            if state > 0 {
                section(
                    out,
                    "cpu",
                    &(0..state).map(|i| i ^ 0x5c).collect::<Vec<_>>(),
                );
            }
            if state % 2 == 1 {
                section(out, "net", &[]);
            }
        }
        Op::Sync { pass } => write_record(
            out,
            Record::Sync {
                pass: u32::from(pass),
                remaining: 0,
            },
        ),
        Op::Resize { block, pages } => write_record(
            out,
            Record::Resize {
                block: small(block, 5) as u32,
                used_length: small(pages, 10) * PAGE as u64,
            },
        ),
        Op::End { sums, short } => {
            let mut state = before.clone();
            // Ends with Truncated where the End starts: the state the End
            // is checked against.
            let _ = state.receive(out);
            let blocks = LAYOUT.len() as u32;
            write_record(
                out,
                Record::End {
                    count: blocks - u32::from(short),
                },
            );
            for b in 0..LAYOUT.len() {
                let sum = match sums % 3 {
                    0 => state.ledger_checksum(b, state.used[b]),
                    1 => state.memory_checksum(b),
                    _ => u64::from(sums),
                };
                out.extend_from_slice(&sum.to_le_bytes());
            }
        }
        Op::Tag(t) => out.push(t),
    }
}

/// Every page of every block once, as pass 0 sends it.
pub fn all_pages(out: &mut Vec<u8>, seed: u8) {
    for (b, s) in LAYOUT.iter().enumerate() {
        write_record(
            out,
            Record::Pages {
                block: b as u32,
                first: 0,
                count: s.used as u32,
            },
        );
        for p in 0..s.used {
            out.extend(std::iter::repeat_n(seed ^ (b as u8 * 32 + p as u8), PAGE));
        }
    }
}

/// One stream.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Send every page once before the operations.
    pub precopy: bool,
    /// Content seed of those pages.
    pub seed: u8,
    /// Cut the stream to this many bytes (modulo its length + 1).
    pub cut: Option<u32>,
    /// The records.
    pub ops: Ops<Op>,
}

/// The stream an input describes.
pub fn stream(input: &Input) -> Vec<u8> {
    let mut out = Vec::new();
    good_table(&mut out, false);
    if input.precopy {
        all_pages(&mut out, input.seed);
    }
    let before = Model::default();
    for op in input.ops.iter() {
        encode(&mut out, op, &before);
        if matches!(op, Op::End { .. }) {
            break; // a receive ends there
        }
    }
    if let Some(cut) = input.cut {
        out.truncate(cut as usize % (out.len() + 1));
    }
    out
}

/// Runs the stream through the real receiver and the model; returns the
/// outcome both agreed on.
pub fn check(input: &Input) -> Result<Result<ReceiveSummary, u32>, Mismatch> {
    let (_, real) = receive_model::check_streams(&[stream(input)])?;
    Ok(real.outcomes[0])
}

/// The fuzz entry point.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, |input: &Input| check(input).map(drop));
}
