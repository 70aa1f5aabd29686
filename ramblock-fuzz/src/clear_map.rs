//! `ClearMap` and `ReceivedMap` against `Vec<bool>` models.
//!
//! The clear map's model is one `bool` per chunk of `2^shift` pages: marking
//! a page range marks every chunk it overlaps, and test-and-clear hands back
//! the chunk's pages clamped to the block. Shifts outside `6..=31` and
//! storage one word short must be refused by `new`. The received map's model
//! is one `bool` per page up to the post-copy length; a page at or past that
//! length is an error naming the first page that does not fit.

use crate::{holds, same, Mismatch};
use arbitrary::Arbitrary;
use ramblock_core::bitmap::{
    alloc_atomic, alloc_plain, words_for, ClearMap, ClearMapNewError, ClearShiftError,
    ReceivedError, ReceivedMap, StorageTooSmall, MAX_CLEAR_SHIFT, MIN_CLEAR_SHIFT, WORD_BITS,
};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;

/// One operation.
#[derive(Arbitrary, Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    Mark { start: u16, count: u16 },
    IsMarked { page: u16 },
    TestAndClear { page: u16 },
    MarkReceived { page: u16, count: u16 },
    IsReceived { page: u16 },
    ReceivedCount,
    FindNextMissing { from: u16 },
    Reset,
}

/// A whole case.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Pages of the block, modulo 1200.
    pub pages: u16,
    /// Chunk shift: `6 + shift % 5` unless `raw_shift` is set.
    pub shift: u8,
    /// Use `shift` as given (mostly out of range), to check `new`'s refusal.
    pub raw_shift: bool,
    /// Give the clear map one word too few (when it needs any).
    pub short_storage: bool,
    /// The received map's post-copy length in pages, modulo 400.
    pub postcopy_pages: u16,
    /// The operations.
    pub ops: crate::Ops<Op>,
}

fn idx(v: u16, len: usize) -> usize {
    usize::from(v) % (len + 70)
}

fn model_chunks(pages: usize, shift: u8) -> usize {
    if pages == 0 {
        0
    } else {
        (pages - 1) / (1usize << shift) + 1
    }
}

/// Runs `input` against the real maps and the models.
pub fn check(input: &Input) -> Result<(), Mismatch> {
    check_clear_map(input)?;
    check_received(input)
}

fn check_clear_map(input: &Input) -> Result<(), Mismatch> {
    let pages = usize::from(input.pages) % 1200;
    let shift = if input.raw_shift {
        input.shift
    } else {
        MIN_CLEAR_SHIFT + input.shift % 5
    };
    let shift_ok = (MIN_CLEAR_SHIFT..=MAX_CLEAR_SHIFT).contains(&shift);
    let needed = if shift_ok {
        words_for(model_chunks(pages, shift))
    } else {
        0
    };
    same(
        None,
        format_args!("ClearMap::words_needed({pages}, {shift})"),
        ClearMap::<&mut [u64]>::words_needed(pages, shift),
        if shift_ok {
            Ok(needed)
        } else {
            Err(ClearShiftError(shift))
        },
    )?;
    let given = if input.short_storage && needed > 0 {
        needed - 1
    } else {
        needed + 1
    };
    let mut words = alloc_plain(given);
    words.fill(!0);
    let made = ClearMap::new(&mut words[..], pages, shift);
    let want_err = if !shift_ok {
        Some(ClearMapNewError::Shift(ClearShiftError(shift)))
    } else if given < needed {
        Some(ClearMapNewError::Storage(StorageTooSmall { needed, given }))
    } else {
        None
    };
    let mut map = match made {
        Ok(map) => {
            same(None, "ClearMap::new error", None, want_err)?;
            map
        }
        // A refused map: the refusal must be the expected one, and that is all.
        Err(e) => return same(None, "ClearMap::new error", Some(e), want_err),
    };
    same(None, "ClearMap::shift", map.shift(), shift)?;
    same(None, "ClearMap::pages", map.pages(), pages)?;
    let chunk_pages = 1usize << shift;
    let mut model = vec![false; model_chunks(pages, shift)];
    let in_range = |start: usize, count: usize| start.checked_add(count).filter(|&e| e <= pages);
    let range_err = |start: usize, count: usize| ramblock_core::bitmap::BitRangeError {
        start: start as u64,
        count: count as u64,
        len: pages as u64,
    };
    for (step, op) in input.ops.iter().enumerate() {
        let s = Some(step);
        match *op {
            Op::Mark { start, count } => {
                let (start, count) = (idx(start, pages), idx(count, pages));
                let want = match in_range(start, count) {
                    Some(end) => {
                        for page in start..end {
                            model[page / chunk_pages] = true;
                        }
                        Ok(())
                    }
                    None => Err(range_err(start, count)),
                };
                same(
                    s,
                    format_args!("ClearMap::mark_range({start}, {count})"),
                    map.mark_range(start, count),
                    want,
                )?;
            }
            Op::IsMarked { page } => {
                let page = idx(page, pages);
                let want = match in_range(page, 1) {
                    Some(_) => Ok(model[page / chunk_pages]),
                    None => Err(range_err(page, 1)),
                };
                same(
                    s,
                    format_args!("ClearMap::is_marked({page})"),
                    map.is_marked(page),
                    want,
                )?;
            }
            Op::TestAndClear { page } => {
                let page = idx(page, pages);
                let want: Result<Option<Range<usize>>, _> = match in_range(page, 1) {
                    Some(_) => {
                        let chunk = page / chunk_pages;
                        Ok(std::mem::take(&mut model[chunk])
                            .then(|| chunk * chunk_pages..((chunk + 1) * chunk_pages).min(pages)))
                    }
                    None => Err(range_err(page, 1)),
                };
                same(
                    s,
                    format_args!("ClearMap::test_and_clear_chunk_of({page})"),
                    map.test_and_clear_chunk_of(page),
                    want,
                )?;
            }
            _ => {}
        }
    }
    // Every chunk, through the public reads, then the raw words.
    for (chunk, &marked) in model.iter().enumerate() {
        let page = chunk * chunk_pages;
        same(
            None,
            format_args!("chunk {chunk} marked"),
            map.is_marked(page),
            Ok(marked),
        )?;
    }
    let mut want_words = vec![0u64; needed];
    for (c, _) in model.iter().enumerate().filter(|(_, &m)| m) {
        want_words[c / WORD_BITS] |= 1 << (c % WORD_BITS);
    }
    same(None, "clear map words", &words[..needed], &want_words[..])?;
    holds(
        None,
        words[needed..].iter().all(|&w| w == !0),
        "ClearMap wrote past its words",
    )
}

fn check_received(input: &Input) -> Result<(), Mismatch> {
    let pc = usize::from(input.postcopy_pages) % 400;
    same(
        None,
        "ReceivedMap::words_needed",
        ReceivedMap::<&[ramblock_core::bitmap::AtomicWord]>::words_needed(pc),
        words_for(pc),
    )?;
    let words = alloc_atomic(words_for(pc) + 1);
    words.iter().for_each(|w| w.store(!0, Relaxed));
    let map = ReceivedMap::new(&words[..], pc).map_err(|e| Mismatch {
        step: None,
        what: format!("ReceivedMap::new refused enough storage: {e}"),
    })?;
    same(None, "postcopy_pages", map.postcopy_pages(), pc)?;
    let mut model = vec![false; pc];
    let fits = |page: usize, count: usize| -> Result<usize, ReceivedError> {
        match page.checked_add(count) {
            Some(end) if end <= pc => Ok(end),
            _ => Err(ReceivedError {
                page: page.max(pc) as u64,
                postcopy_pages: pc as u64,
            }),
        }
    };
    for (step, op) in input.ops.iter().enumerate() {
        let s = Some(step);
        match *op {
            Op::MarkReceived { page, count } => {
                let (page, count) = (idx(page, pc), idx(count, pc));
                let want = fits(page, count).map(|end| model[page..end].fill(true));
                same(
                    s,
                    format_args!("ReceivedMap::mark_received({page}, {count})"),
                    map.mark_received(page, count),
                    want,
                )?;
            }
            Op::IsReceived { page } => {
                let page = idx(page, pc);
                let want = fits(page, 1).map(|_| model[page]);
                same(
                    s,
                    format_args!("ReceivedMap::is_received({page})"),
                    map.is_received(page),
                    want,
                )?;
            }
            Op::ReceivedCount => {
                let want = model.iter().filter(|&&b| b).count() as u64;
                same(s, "ReceivedMap::received_count", map.received_count(), want)?;
            }
            Op::FindNextMissing { from } => {
                let from = idx(from, pc);
                let want = (from..pc).find(|&p| !model[p]);
                same(
                    s,
                    format_args!("ReceivedMap::find_next_missing({from})"),
                    map.find_next_missing(from),
                    want,
                )?;
            }
            Op::Reset => {
                map.reset();
                model.fill(false);
            }
            _ => {}
        }
    }
    // The words a resuming destination sends back: exactly the model.
    let mut want_words = vec![0u64; words_for(pc)];
    for (p, _) in model.iter().enumerate().filter(|(_, &r)| r) {
        want_words[p / WORD_BITS] |= 1 << (p % WORD_BITS);
    }
    let real: Vec<u64> = map
        .bitmap()
        .words()
        .iter()
        .map(|w| w.load(Relaxed))
        .collect();
    same(None, "received map words", real, want_words)?;
    holds(
        None,
        words[words_for(pc)..].iter().all(|w| w.load(Relaxed) == !0),
        "ReceivedMap wrote past its words",
    )
}

/// The fuzz entry point; panics with a reproducer on a mismatch.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, check);
}
