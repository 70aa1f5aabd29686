//! Bitmaps over 64-bit words, one bit per 4 KiB target page.
//!
//! - [`AtomicBitmap`]: a dirty client's bitmap; any thread may set bits.
//! - [`MigrationBitmap`]: what migration still has to send; owned by the one
//!   migration thread, plain words.
//! - [`ClearMap`]: one bit per chunk of `2^shift` pages whose dirty log must
//!   be cleared in the hypervisor before the chunk's first page is sent.
//! - [`ReceivedMap`]: which pages a post-copy destination has received.
//!
//! Storage comes from the caller (`&[AtomicWord]`, `&mut [u64]`) or, with the
//! `alloc` feature, is owned; see [`Storage`]. Ranges are `start` and `count`
//! in pages, and every range outside a bitmap is a [`BitRangeError`].
//!
//! Page indexes here are `usize` because they index slices of words; the
//! traits and wire records carry `u64` page numbers and byte offsets as
//! [`ByteLen`](crate::addr::ByteLen), converting at the edge (see
//! [`crate::addr`]).

mod atomic;
mod clear_map;
mod migration;
mod received;

pub use atomic::{AtomicBitmap, Runs};
pub use clear_map::{
    ClearMap, ClearMapNewError, ClearShiftError, DEFAULT_CLEAR_SHIFT, MAX_CLEAR_SHIFT,
    MIN_CLEAR_SHIFT,
};
pub use migration::{DirtyPages, MigrationBitmap};
pub use received::{ReceivedError, ReceivedMap};

use core::fmt;

/// The atomic word type of [`AtomicBitmap`]: `core`'s `AtomicU64` where the
/// target has 64-bit atomics, portable-atomic's elsewhere (32-bit Arm).
#[cfg(target_has_atomic = "64")]
pub use core::sync::atomic::AtomicU64 as AtomicWord;
/// The atomic word type of [`AtomicBitmap`]: `core`'s `AtomicU64` where the
/// target has 64-bit atomics, portable-atomic's elsewhere (32-bit Arm).
#[cfg(not(target_has_atomic = "64"))]
pub use portable_atomic::AtomicU64 as AtomicWord;

/// Bits per bitmap word.
pub const WORD_BITS: usize = 64;

/// How many words hold `bits` bits.
pub const fn words_for(bits: usize) -> usize {
    bits.div_ceil(WORD_BITS)
}

/// Where a block's bitmap words live.
pub trait Storage {
    /// Words shared between threads.
    type Atomic: AsRef<[AtomicWord]>;
    /// Words owned by one thread.
    type Plain: AsRef<[u64]> + AsMut<[u64]>;
}

/// Storage borrowed from the caller for `'a` (no allocator needed).
#[derive(Debug)]
pub struct Borrowed<'a>(core::marker::PhantomData<&'a mut ()>);

impl<'a> Storage for Borrowed<'a> {
    type Atomic = &'a [AtomicWord];
    type Plain = &'a mut [u64];
}

/// Storage allocated on the heap.
#[cfg(feature = "alloc")]
#[derive(Debug)]
pub struct Owned;

#[cfg(feature = "alloc")]
impl Storage for Owned {
    type Atomic = alloc::boxed::Box<[AtomicWord]>;
    type Plain = alloc::boxed::Box<[u64]>;
}

/// `count` zeroed atomic words on the heap.
#[cfg(feature = "alloc")]
pub fn alloc_atomic(count: usize) -> alloc::boxed::Box<[AtomicWord]> {
    (0..count).map(|_| AtomicWord::new(0)).collect()
}

/// `count` zeroed plain words on the heap.
#[cfg(feature = "alloc")]
pub fn alloc_plain(count: usize) -> alloc::boxed::Box<[u64]> {
    alloc::vec![0u64; count].into_boxed_slice()
}

/// A page range outside a bitmap, or a range whose end overflows.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BitRangeError {
    /// First page asked for.
    pub start: u64,
    /// Pages asked for.
    pub count: u64,
    /// Pages the bitmap covers.
    pub len: u64,
}

impl fmt::Display for BitRangeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "pages {}..+{} are outside the bitmap of {} pages",
            self.start, self.count, self.len
        )
    }
}

impl core::error::Error for BitRangeError {}

/// A caller-supplied storage slice that is too short for the bitmap.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct StorageTooSmall {
    /// Words needed.
    pub needed: usize,
    /// Words given.
    pub given: usize,
}

impl fmt::Display for StorageTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bitmap needs {} words, {} were given",
            self.needed, self.given
        )
    }
}

impl core::error::Error for StorageTooSmall {}

/// Checks `start..start + count` against `len` and returns the end.
fn check_range(start: usize, count: usize, len: usize) -> Result<usize, BitRangeError> {
    match start.checked_add(count) {
        Some(end) if end <= len => Ok(end),
        _ => Err(BitRangeError {
            start: start as u64,
            count: count as u64,
            len: len as u64,
        }),
    }
}

/// Calls `f(word_index, mask)` for each word touched by bits `start..end`,
/// with the mask of the bits inside the range: whole words are `!0`.
#[inline]
fn for_each_word_mask(start: usize, end: usize, mut f: impl FnMut(usize, u64)) {
    if start >= end {
        return;
    }
    let (first, last) = (start / WORD_BITS, (end - 1) / WORD_BITS);
    let head = !0u64 << (start % WORD_BITS);
    let tail = !0u64 >> (WORD_BITS - 1 - (end - 1) % WORD_BITS);
    if first == last {
        f(first, head & tail);
        return;
    }
    f(first, head);
    for w in first + 1..last {
        f(w, !0);
    }
    f(last, tail);
}

/// The mask of valid bits in the last word of a `len`-bit bitmap.
const fn last_word_mask(len: usize) -> u64 {
    match len % WORD_BITS {
        0 => !0,
        r => !0u64 >> (WORD_BITS - r),
    }
}

/// Finds the first word at or after `from` with a bit that differs from
/// `fill` (`0` to find a set bit, `!0` to find a clear bit). Clean stretches
/// are checked eight words per step (the OR vectorizes), so scanning a clean
/// bitmap runs at memory speed.
#[inline]
fn find_word(words: &[u64], from: usize, fill: u64) -> Option<usize> {
    const STRIDE: usize = 8;
    let mut base = from;
    let mut chunks = words.get(from..)?.chunks_exact(STRIDE);
    for chunk in &mut chunks {
        // No early exit inside a chunk: the OR of eight words vectorizes.
        if chunk.iter().fold(0, |acc, &w| acc | (w ^ fill)) != 0 {
            return chunk.iter().position(|&w| w != fill).map(|p| base + p);
        }
        base += STRIDE;
    }
    chunks
        .remainder()
        .iter()
        .position(|&w| w != fill)
        .map(|p| base + p)
}

/// The first bit at or after `from` (and below `len`) that is set in `words`
/// (`fill == 0`) or clear (`fill == !0`).
fn find_bit(words: &[u64], len: usize, from: usize, fill: u64) -> Option<usize> {
    if from >= len {
        return None;
    }
    let w = from / WORD_BITS;
    let first = (words[w] ^ fill) & (!0u64 << (from % WORD_BITS));
    let found = if first != 0 {
        w * WORD_BITS + first.trailing_zeros() as usize
    } else {
        let w = find_word(words, w + 1, fill)?;
        w * WORD_BITS + (words[w] ^ fill).trailing_zeros() as usize
    };
    (found < len).then_some(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn word_masks_cover_exactly_the_range() {
        // Every pair natively; under Miri, which runs this thousands of times
        // slower, the word edges and their neighbours, where a mask goes wrong.
        let points: Vec<usize> = if cfg!(miri) {
            [0, 1, 2, 63, 64, 65, 127, 128, 129, 191, 192, 199].into()
        } else {
            (0..200).collect()
        };
        for &start in &points {
            for end in points.iter().copied().filter(|&e| e >= start) {
                let mut bits = [0u64; 4];
                for_each_word_mask(start, end, |w, m| bits[w] |= m);
                let set: Vec<usize> = (0..256)
                    .filter(|&b| bits[b / 64] >> (b % 64) & 1 == 1)
                    .collect();
                assert_eq!(set, (start..end).collect::<Vec<_>>());
            }
        }
    }

    #[test]
    fn ranges_are_checked() {
        assert_eq!(check_range(10, 5, 15), Ok(15));
        assert!(check_range(10, 6, 15).is_err());
        assert!(check_range(usize::MAX, 2, 15).is_err());
    }
}
