//! The post-copy received map on the wire: a destination's random received
//! pages, written and read back by a source whose blocks were added in
//! another order, report exactly the pages not received (the complement of
//! a `Vec<bool>` model, as maximal runs). Every malformed map is its own
//! typed error and reports nothing. The maps for the malformed cases are
//! built by an encoder written here from `docs/stream-format.md`, which must
//! agree byte for byte with the writer.
mod common;
use common::add_buffer_block;

#[path = "../src/testing.rs"]
#[allow(dead_code)]
mod testing;

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::stream::io::{ReadError, SliceReader};
use ramblock_core::stream::received_map::{
    read_received_map, scratch_words, write_received_map, ReceivedMapError, ReceivedMapSummary,
};
use std::convert::Infallible;
use std::ops::Range;
use testing::Rng;

use common::Mem;
type List = RamList<'static, Mem, Owned, 8>;
const PAGE: u64 = 4096;

/// A block: name, used pages, post-copy pages, migratable.
type Shape = (&'static str, u64, u64, bool);

/// Page counts around word boundaries; one block with a post-copy length
/// shorter than its used length; one block that is not migrated.
const BLOCKS: [Shape; 6] = [
    ("pc.ram", 200, 200, true),
    ("one", 1, 1, true),
    ("word", 64, 64, true),
    ("word+1", 65, 65, true),
    ("short-postcopy", 130, 70, true),
    ("rom", 3, 3, false),
];

fn add(list: &List, (name, pages, postcopy, migratable): Shape) {
    let mut spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE))
        .postcopy_length(ByteLen(postcopy * PAGE));
    if !migratable {
        spec = spec.flags(BlockFlags::empty());
    }
    add_buffer_block(list, spec, 0);
}

/// The source's view: the same blocks, added in reverse order (so the list
/// order, and the scratch layout, differ from the map's order).
fn source() -> List {
    let list = List::new();
    for shape in BLOCKS.iter().rev() {
        add(&list, *shape);
    }
    list
}

/// A destination with random received pages; returns its model (received
/// pages per migratable block, in the destination's list order).
fn destination(rng: &mut Rng) -> (List, Vec<(&'static str, Vec<bool>)>) {
    let list = List::new();
    let mut model = Vec::new();
    for shape in BLOCKS {
        add(&list, shape);
    }
    let view = list.read();
    for block in view.iter() {
        let pages = block.received().postcopy_pages();
        let mut received = vec![false; pages];
        // Mostly runs, sometimes everything or nothing.
        match rng.below(5) {
            0 => {}
            1 => {
                block.received().mark_received(0, pages).unwrap();
                received.fill(true);
            }
            _ => {
                for _ in 0..rng.below(12) {
                    let start = rng.below(pages as u64) as usize;
                    let count = (rng.below(20) as usize).min(pages - start);
                    block.received().mark_received(start, count).unwrap();
                    received[start..start + count].fill(true);
                }
            }
        }
        if block.flags().contains(BlockFlags::MIGRATABLE) {
            let name = BLOCKS.iter().find(|s| s.0 == block.name()).unwrap().0;
            model.push((name, received));
        }
    }
    drop(view);
    (list, model)
}

/// Maximal runs of `false` in `received`.
fn missing_runs(received: &[bool]) -> Vec<Range<u64>> {
    let mut runs = Vec::new();
    let mut i = 0;
    while i < received.len() {
        if received[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < received.len() && !received[i] {
            i += 1;
        }
        runs.push(start as u64..i as u64);
    }
    runs
}

type Reported = Vec<(String, Range<u64>)>;

/// Reads `map` on a fresh source; returns the result and what was reported.
fn read(
    map: &[u8],
) -> (
    Result<ReceivedMapSummary, ReceivedMapError<Infallible>>,
    Reported,
) {
    let list = source();
    let view = list.read();
    let mut scratch = vec![0u64; scratch_words(&view)];
    let mut reported = Vec::new();
    let result = read_received_map(&mut SliceReader::new(map), &view, &mut scratch, |b, r| {
        reported.push((b.name().to_string(), r))
    });
    (result, reported)
}

/// Reads `map`, expecting `want`; nothing may have been reported.
fn refused(map: &[u8], want: ReceivedMapError<Infallible>) {
    let (result, reported) = read(map);
    assert_eq!(result, Err(want));
    assert!(
        reported.is_empty(),
        "a refused map reported {reported:?} ({want:?})"
    );
}

/// One block of a map as the format describes it.
#[derive(Clone)]
struct Entry {
    name: Vec<u8>,
    pages: u64,
    words: Vec<u64>,
}

impl Entry {
    fn from_model(name: &str, received: &[bool]) -> Entry {
        let mut words = vec![0u64; received.len().div_ceil(64)];
        for (i, _) in received.iter().enumerate().filter(|(_, &r)| r) {
            words[i / 64] |= 1 << (i % 64);
        }
        Entry {
            name: name.as_bytes().to_vec(),
            pages: received.len() as u64,
            words,
        }
    }
}

/// The format, from the document: header, entries, end marker and total.
fn encode(version: u32, count: u32, entries: &[Entry], end: &[u8; 4], total: u64) -> Vec<u8> {
    let mut out = b"RBRM".to_vec();
    out.extend(version.to_le_bytes());
    out.extend(count.to_le_bytes());
    for e in entries {
        out.push(e.name.len() as u8);
        out.extend(&e.name);
        out.extend(e.pages.to_le_bytes());
        for w in &e.words {
            out.extend(w.to_le_bytes());
        }
    }
    out.extend(end);
    out.extend(total.to_le_bytes());
    out
}

fn total(entries: &[Entry]) -> u64 {
    entries
        .iter()
        .flat_map(|e| &e.words)
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

fn good(entries: &[Entry]) -> Vec<u8> {
    encode(1, entries.len() as u32, entries, b"RBRE", total(entries))
}

fn model_entries(model: &[(&str, Vec<bool>)]) -> Vec<Entry> {
    model.iter().map(|(n, r)| Entry::from_model(n, r)).collect()
}

#[test]
fn random_received_pages_come_back_as_exactly_the_missing_runs() {
    let mut rng = Rng::new(0x5EED);
    // Fewer rounds under Miri, which runs this thousands of times slower.
    let rounds = if cfg!(miri) { 5 } else { 200 };
    for round in 0..rounds {
        let (dest, model) = destination(&mut rng);
        let mut map = Vec::new();
        write_received_map(&mut map, &dest.read()).unwrap();
        assert_eq!(
            map,
            good(&model_entries(&model)),
            "round {round}: the writer follows the documented format"
        );

        let (result, reported) = read(&map);
        // The source reports in its own list order (reverse of BLOCKS).
        let mut want = Vec::new();
        for (name, received) in model.iter().rev() {
            for run in missing_runs(received) {
                want.push((name.to_string(), run));
            }
        }
        assert_eq!(reported, want, "round {round}");
        let received: u64 = model
            .iter()
            .map(|(_, r)| r.iter().filter(|&&b| b).count() as u64)
            .sum();
        let pages: u64 = model.iter().map(|(_, r)| r.len() as u64).sum();
        assert_eq!(
            result,
            Ok(ReceivedMapSummary {
                blocks: model.len() as u32,
                received,
                missing: pages - received,
                missing_runs: want.len() as u64,
            })
        );
    }
}

#[test]
fn entries_in_any_order_are_matched_by_name() {
    let mut rng = Rng::new(7);
    let (_, model) = destination(&mut rng);
    let mut entries = model_entries(&model);
    entries.rotate_left(2);
    let (result, reported) = read(&good(&entries));
    assert!(result.is_ok(), "{result:?}");
    let mut want = Vec::new();
    for (name, received) in model.iter().rev() {
        want.extend(
            missing_runs(received)
                .into_iter()
                .map(|r| (name.to_string(), r)),
        );
    }
    assert_eq!(reported, want);
}

#[test]
fn a_map_truncated_at_any_byte_is_a_read_error_and_reports_nothing() {
    let mut rng = Rng::new(3);
    let (dest, _) = destination(&mut rng);
    let mut map = Vec::new();
    write_received_map(&mut map, &dest.read()).unwrap();
    // Every cut natively; under Miri, which runs this thousands of times
    // slower, every 9th (all offsets within a word) and the last.
    let step = if cfg!(miri) { 9 } else { 1 };
    let cuts = (0..map.len()).step_by(step).chain([map.len() - 1]);
    for cut in cuts {
        refused(&map[..cut], ReceivedMapError::Read(ReadError::Eof));
    }
}

#[test]
fn each_malformed_map_is_its_own_error_and_reports_nothing() {
    let mut rng = Rng::new(11);
    let (_, model) = destination(&mut rng);
    let entries = model_entries(&model);
    let n = entries.len() as u32;
    let sum = total(&entries);

    let mut bad_magic = good(&entries);
    bad_magic[1] = b'X';
    refused(&bad_magic, ReceivedMapError::BadMagic { found: *b"RXRM" });

    refused(
        &encode(2, n, &entries, b"RBRE", sum),
        ReceivedMapError::UnsupportedVersion { found: 2 },
    );

    // One block too few, and one too many (the count is checked first).
    refused(
        &encode(1, n - 1, &entries[1..], b"RBRE", total(&entries[1..])),
        ReceivedMapError::BlockCountMismatch {
            map: n - 1,
            list: n,
        },
    );
    refused(
        &encode(1, n + 1, &entries, b"RBRE", sum),
        ReceivedMapError::BlockCountMismatch {
            map: n + 1,
            list: n,
        },
    );

    // A name this side does not have; the non-migratable "rom"; an empty name.
    for name in [&b"pc.rom"[..], b"rom", b""] {
        let mut unknown = entries.clone();
        unknown[2].name = name.to_vec();
        refused(&good(&unknown), ReceivedMapError::UnknownBlock { entry: 2 });
    }

    // The same block twice (and so another one missing).
    let mut twice = entries.clone();
    twice[3] = twice[0].clone();
    refused(&good(&twice), ReceivedMapError::DuplicateBlock { entry: 3 });

    // Page counts off by one either way; the used length instead of the
    // shorter post-copy length.
    for (entry, pages) in [(0usize, 199u64), (1, 2), (4, 130)] {
        let mut wrong = entries.clone();
        wrong[entry].pages = pages;
        wrong[entry].words.resize(pages.div_ceil(64) as usize, 0);
        refused(
            &good(&wrong),
            ReceivedMapError::PageCountMismatch {
                entry: entry as u32,
                map: pages,
                block: model[entry].1.len() as u64,
            },
        );
    }

    // A bit at the page count, and the last bit of the last word.
    for (entry, page) in [(0usize, 200u64), (3, 65), (3, 127), (1, 1), (4, 70)] {
        let mut stray = entries.clone();
        stray[entry].words[(page / 64) as usize] |= 1 << (page % 64);
        refused(
            &good(&stray),
            ReceivedMapError::BitPastEnd {
                entry: entry as u32,
                page,
            },
        );
    }

    refused(
        &encode(1, n, &entries, b"RBRX", sum),
        ReceivedMapError::BadEndMarker { found: *b"RBRX" },
    );

    // A flipped bit changes the count the words give; the declared total
    // catches it.
    let mut flipped = entries.clone();
    flipped[0].words[1] ^= 1 << 5;
    let counted = total(&flipped);
    refused(
        &encode(1, n, &flipped, b"RBRE", sum),
        ReceivedMapError::ReceivedCountMismatch {
            declared: sum,
            counted,
        },
    );
    refused(
        &encode(1, n, &entries, b"RBRE", sum + 1),
        ReceivedMapError::ReceivedCountMismatch {
            declared: sum + 1,
            counted: sum,
        },
    );
}

#[test]
fn scratch_too_small_is_refused_before_reading() {
    let mut rng = Rng::new(5);
    let (dest, _) = destination(&mut rng);
    let mut map = Vec::new();
    write_received_map(&mut map, &dest.read()).unwrap();
    let list = source();
    let view = list.read();
    let needed = scratch_words(&view);
    // 200 + 1 + 64 + 65 + 70 pages, each block word-aligned; "rom" is not
    // migrated.
    assert_eq!(needed, 4 + 1 + 1 + 2 + 2);
    let mut scratch = vec![0u64; needed - 1];
    let mut input = SliceReader::new(&map);
    let mut calls = 0;
    let result = read_received_map(&mut input, &view, &mut scratch, |_, _| calls += 1);
    assert_eq!(
        result,
        Err(ReceivedMapError::ScratchTooSmall {
            needed,
            given: needed - 1
        })
    );
    assert_eq!(calls, 0);
    assert_eq!(input.remaining(), map.len(), "nothing was read");
}
