//! `AtomicBitmap` and `MigrationBitmap` against `Vec<bool>`.
//!
//! One atomic bitmap (a dirty client's) and one migration bitmap, of
//! independent small lengths, take operations in any order; the atomic one is
//! also the source of `merge_atomic`, so the merge's length check and its
//! "source is left clear" rule are exercised. Indices are taken modulo a
//! little more than the length, so out-of-range calls (which must be errors
//! naming the range) are frequent too.
//!
//! The deliberately wrong model (`--cfg ramblock_fuzz_wrong_model`, or
//! `Variant::Wrong` in this crate's tests) forgets to clear the last bit
//! of a `test_and_clear_range` of two or more bits.

use crate::{holds, same, Mismatch};
use arbitrary::Arbitrary;
use ramblock_core::bitmap::{
    alloc_atomic, alloc_plain, words_for, AtomicBitmap, BitRangeError, MigrationBitmap, WORD_BITS,
};
use std::ops::Range;
use std::sync::atomic::Ordering::Relaxed;

/// One operation. `A*` operations act on the atomic bitmap, `M*` on the
/// migration bitmap.
#[derive(Arbitrary, Clone, Debug)]
#[allow(missing_docs)]
pub enum Op {
    ASet {
        start: u16,
        count: u16,
    },
    AClear {
        start: u16,
        count: u16,
    },
    AClearAll,
    AIsSet {
        bit: u16,
    },
    AAnyInRange {
        start: u16,
        count: u16,
    },
    ATestAndClear {
        start: u16,
        count: u16,
    },
    ACountOnes,
    AFindNextSet {
        from: u16,
    },
    AFindNextClear {
        from: u16,
    },
    ARuns {
        from: u16,
    },
    MSet {
        start: u16,
        count: u16,
    },
    MClear {
        start: u16,
        count: u16,
    },
    MTake {
        bit: u16,
    },
    MSetAll,
    MIsSet {
        bit: u16,
    },
    MFindNextDirty {
        from: u16,
    },
    MFindNextClean {
        from: u16,
    },
    /// `merge_log(first, log, log_bits)`; `log_bits` is taken modulo a
    /// little more than the log's bits.
    MMergeLog {
        first: u16,
        log: Vec<u64>,
        log_bits: u16,
    },
    /// `merge_atomic` from the atomic bitmap.
    MMergeAtomic,
}

/// A whole case: the two lengths and the operations.
#[derive(Arbitrary, Clone, Debug)]
pub struct Input {
    /// Atomic bitmap length, modulo 300.
    pub atomic_len: u16,
    /// Migration bitmap length, modulo 300.
    pub migration_len: u16,
    /// Extra words past the needed ones in the caller's storage (0..=2):
    /// they must never be touched.
    pub spare_words: u8,
    /// The operations.
    pub ops: crate::Ops<Op>,
}

/// Which model to run.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Variant {
    /// The faithful model.
    Faithful,
    /// The deliberately wrong model (see the module docs).
    #[cfg(any(test, ramblock_fuzz_wrong_model))]
    Wrong,
}

impl Variant {
    /// The variant the fuzz target runs: `Wrong` only when built with
    /// `--cfg ramblock_fuzz_wrong_model`.
    pub fn for_fuzzing() -> Variant {
        #[cfg(ramblock_fuzz_wrong_model)]
        return Variant::Wrong;
        #[cfg(not(ramblock_fuzz_wrong_model))]
        return Variant::Faithful;
    }

    fn is_wrong(self) -> bool {
        #[cfg(any(test, ramblock_fuzz_wrong_model))]
        return self == Variant::Wrong;
        #[cfg(not(any(test, ramblock_fuzz_wrong_model)))]
        return false;
    }
}

/// Maps a raw index into `0..len + 70`: mostly inside, sometimes past.
fn idx(v: u16, len: usize) -> usize {
    usize::from(v) % (len + 70)
}

fn range_ok(start: usize, count: usize, len: usize) -> Result<usize, BitRangeError> {
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(end),
        _ => Err(BitRangeError {
            start: start as u64,
            count: count as u64,
            len: len as u64,
        }),
    }
}

fn model_find(bits: &[bool], from: usize, want: bool) -> Option<usize> {
    (from..bits.len()).find(|&i| bits[i] == want)
}

fn model_runs(bits: &[bool], from: usize) -> Vec<Range<usize>> {
    let mut runs = Vec::new();
    let mut i = from;
    while i < bits.len() {
        if bits[i] {
            let start = i;
            while i < bits.len() && bits[i] {
                i += 1;
            }
            runs.push(start..i);
        } else {
            i += 1;
        }
    }
    runs
}

/// The words a `Vec<bool>` model stands for (bits past the end clear).
fn model_words(bits: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; words_for(bits.len())];
    for (i, _) in bits.iter().enumerate().filter(|(_, &b)| b) {
        words[i / WORD_BITS] |= 1 << (i % WORD_BITS);
    }
    words
}

/// Runs the faithful model; see [`check_variant`].
pub fn check(input: &Input) -> Result<(), Mismatch> {
    check_variant(input, Variant::Faithful)
}

/// Runs `input` against the real bitmaps and the `variant` model.
pub fn check_variant(input: &Input, variant: Variant) -> Result<(), Mismatch> {
    let alen = usize::from(input.atomic_len) % 300;
    let mlen = usize::from(input.migration_len) % 300;
    let spare = usize::from(input.spare_words % 3);
    let awords = alloc_atomic(words_for(alen) + spare);
    let mut mwords = alloc_plain(words_for(mlen) + spare);
    // Garbage in the caller's storage must be wiped by `new`.
    awords.iter().for_each(|w| w.store(!0, Relaxed));
    mwords.fill(!0);
    let a = AtomicBitmap::new(&awords[..], alen).map_err(|e| Mismatch {
        step: None,
        what: format!("AtomicBitmap::new refused enough storage: {e}"),
    })?;
    let mut m = MigrationBitmap::new(&mut mwords[..], mlen).map_err(|e| Mismatch {
        step: None,
        what: format!("MigrationBitmap::new refused enough storage: {e}"),
    })?;
    let mut am = vec![false; alen];
    let mut mm = vec![false; mlen];

    for (step, op) in input.ops.iter().enumerate() {
        let s = Some(step);
        match *op {
            Op::ASet { start, count } => {
                let (start, count) = (idx(start, alen), idx(count, alen));
                let want = range_ok(start, count, alen).map(|end| am[start..end].fill(true));
                same(
                    s,
                    "AtomicBitmap::set_range",
                    a.set_range(start, count),
                    want,
                )?;
            }
            Op::AClear { start, count } => {
                let (start, count) = (idx(start, alen), idx(count, alen));
                let want = range_ok(start, count, alen).map(|end| am[start..end].fill(false));
                same(
                    s,
                    "AtomicBitmap::clear_range",
                    a.clear_range(start, count),
                    want,
                )?;
            }
            Op::AClearAll => {
                a.clear_all();
                am.fill(false);
            }
            Op::AIsSet { bit } => {
                let bit = idx(bit, alen);
                let want = range_ok(bit, 1, alen).map(|_| am[bit]);
                same(
                    s,
                    format_args!("AtomicBitmap::is_set({bit})"),
                    a.is_set(bit),
                    want,
                )?;
            }
            Op::AAnyInRange { start, count } => {
                let (start, count) = (idx(start, alen), idx(count, alen));
                let want = range_ok(start, count, alen).map(|end| am[start..end].contains(&true));
                same(
                    s,
                    format_args!("AtomicBitmap::any_in_range({start}, {count})"),
                    a.any_in_range(start, count),
                    want,
                )?;
            }
            Op::ATestAndClear { start, count } => {
                let (start, count) = (idx(start, alen), idx(count, alen));
                let want = range_ok(start, count, alen).map(|end| {
                    let taken = am[start..end].iter().filter(|&&b| b).count() as u64;
                    let last = end.checked_sub(1).map(|l| am[l]);
                    am[start..end].fill(false);
                    if variant.is_wrong() && count >= 2 {
                        // The planted bug: the last bit of the range survives.
                        am[end - 1] = last == Some(true);
                    }
                    taken
                });
                same(
                    s,
                    format_args!("AtomicBitmap::test_and_clear_range({start}, {count})"),
                    a.test_and_clear_range(start, count),
                    want,
                )?;
            }
            Op::ACountOnes => {
                let want = am.iter().filter(|&&b| b).count() as u64;
                same(s, "AtomicBitmap::count_ones", a.count_ones(), want)?;
            }
            Op::AFindNextSet { from } => {
                let from = idx(from, alen);
                same(
                    s,
                    format_args!("AtomicBitmap::find_next_set({from})"),
                    a.find_next_set(from),
                    model_find(&am, from, true),
                )?;
            }
            Op::AFindNextClear { from } => {
                let from = idx(from, alen);
                same(
                    s,
                    format_args!("AtomicBitmap::find_next_clear({from})"),
                    a.find_next_clear(from),
                    model_find(&am, from, false),
                )?;
            }
            Op::ARuns { from } => {
                let from = idx(from, alen);
                same(
                    s,
                    format_args!("AtomicBitmap::runs({from})"),
                    a.runs(from).collect::<Vec<_>>(),
                    model_runs(&am, from),
                )?;
            }
            Op::MSet { start, count } => {
                let (start, count) = (idx(start, mlen), idx(count, mlen));
                let want = range_ok(start, count, mlen).map(|end| {
                    let newly = mm[start..end].iter().filter(|&&b| !b).count() as u64;
                    mm[start..end].fill(true);
                    newly
                });
                same(
                    s,
                    "MigrationBitmap::set_range",
                    m.set_range(start, count),
                    want,
                )?;
            }
            Op::MClear { start, count } => {
                let (start, count) = (idx(start, mlen), idx(count, mlen));
                let want = range_ok(start, count, mlen).map(|end| {
                    let was = mm[start..end].iter().filter(|&&b| b).count() as u64;
                    mm[start..end].fill(false);
                    was
                });
                same(
                    s,
                    "MigrationBitmap::clear_range",
                    m.clear_range(start, count),
                    want,
                )?;
            }
            Op::MTake { bit } => {
                let bit = idx(bit, mlen);
                let want = range_ok(bit, 1, mlen).map(|_| std::mem::replace(&mut mm[bit], false));
                same(
                    s,
                    format_args!("MigrationBitmap::take({bit})"),
                    m.take(bit),
                    want,
                )?;
            }
            Op::MSetAll => {
                m.set_all();
                mm.fill(true);
            }
            Op::MIsSet { bit } => {
                let bit = idx(bit, mlen);
                let want = range_ok(bit, 1, mlen).map(|_| mm[bit]);
                same(
                    s,
                    format_args!("MigrationBitmap::is_set({bit})"),
                    m.is_set(bit),
                    want,
                )?;
            }
            Op::MFindNextDirty { from } => {
                let from = idx(from, mlen);
                same(
                    s,
                    format_args!("MigrationBitmap::find_next_dirty({from})"),
                    m.find_next_dirty(from),
                    model_find(&mm, from, true),
                )?;
            }
            Op::MFindNextClean { from } => {
                let from = idx(from, mlen);
                same(
                    s,
                    format_args!("MigrationBitmap::find_next_clean({from})"),
                    m.find_next_clean(from),
                    model_find(&mm, from, false),
                )?;
            }
            Op::MMergeLog {
                first,
                ref log,
                log_bits,
            } => {
                let log = &log[..log.len().min(8)];
                let first = idx(first, mlen);
                let log_bits = usize::from(log_bits) % (log.len() * WORD_BITS + 70);
                let want = range_ok(first, log_bits, mlen).and_then(|_| {
                    if log_bits > log.len() * WORD_BITS {
                        return Err(BitRangeError {
                            start: 0,
                            count: log_bits as u64,
                            len: (log.len() * WORD_BITS) as u64,
                        });
                    }
                    let mut newly = 0;
                    for i in 0..log_bits {
                        let bit = u64::from_le(log[i / WORD_BITS]) >> (i % WORD_BITS) & 1 == 1;
                        if bit && !mm[first + i] {
                            mm[first + i] = true;
                            newly += 1;
                        }
                    }
                    Ok(newly)
                });
                same(
                    s,
                    format_args!("MigrationBitmap::merge_log({first}, {log_bits} bits)"),
                    m.merge_log(first, log, log_bits),
                    want,
                )?;
            }
            Op::MMergeAtomic => {
                let want = range_ok(0, alen, mlen).map(|_| {
                    let mut newly = 0;
                    for (i, bit) in am.iter_mut().enumerate() {
                        if std::mem::take(bit) && !mm[i] {
                            mm[i] = true;
                            newly += 1;
                        }
                    }
                    newly
                });
                same(s, "MigrationBitmap::merge_atomic", m.merge_atomic(&a), want)?;
            }
        }
        let dirty = mm.iter().filter(|&&b| b).count() as u64;
        same(s, "MigrationBitmap::dirty_count", m.dirty_count(), dirty)?;
    }

    // The whole state, word for word: bits past the length must be clear.
    let real_a: Vec<u64> = a.words().iter().map(|w| w.load(Relaxed)).collect();
    same(None, "atomic bitmap words", real_a, model_words(&am))?;
    same(
        None,
        "migration bitmap words",
        m.words().to_vec(),
        model_words(&mm),
    )?;
    same(None, "atomic len", a.len(), alen)?;
    same(None, "migration len", m.len(), mlen)?;
    // Storage past the bitmaps is the caller's: it must still hold garbage.
    let a_spare = awords[words_for(alen)..]
        .iter()
        .all(|w| w.load(Relaxed) == !0);
    holds(None, a_spare, "AtomicBitmap wrote past its words")?;
    let m_spare = mwords[words_for(mlen)..].iter().all(|&w| w == !0);
    holds(None, m_spare, "MigrationBitmap wrote past its words")?;
    Ok(())
}

/// The fuzz entry point: bytes to [`Input`], then [`check_variant`] with
/// [`Variant::for_fuzzing`]; panics with a reproducer on a mismatch.
pub fn fuzz(data: &[u8]) {
    crate::run_bytes(data, |input: &Input| {
        check_variant(input, Variant::for_fuzzing())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate, try_bytes};

    /// The harness is live: the planted bug in the wrong model is found by
    /// the same generator `cargo test` runs, while the faithful model passes
    /// every one of those inputs.
    #[test]
    fn the_wrong_model_is_caught() {
        let inputs: Vec<Vec<u8>> = generate::inputs(0xB17_3A9, 4000, 600).collect();
        let caught = inputs
            .iter()
            .position(|d| try_bytes(d, |i: &Input| check_variant(i, Variant::Wrong)).is_err());
        assert!(
            caught.is_some(),
            "4000 inputs never exposed the wrong model"
        );
        for d in &inputs {
            try_bytes(d, check).unwrap();
        }
    }
}
