//! Copies to and from memory that other threads (vCPUs, devices, the
//! kernel) may access at the same time, as relaxed atomic accesses.
//!
//! A plain `memcpy` racing another thread's write is a data race, which
//! Rust leaves undefined however the hardware behaves (Miri reports it).
//! These copies make every access atomic, and of one size per memory:
//! Rust's model also leaves racing atomic accesses of different sizes to
//! the same bytes undefined, so a copy may not use bytes at its ends and
//! words in its middle. [`Granule::Word`] memory (word-aligned start and
//! length, which every mapping and page-sized buffer has) is always
//! accessed as whole naturally aligned `usize` words: a copy that starts or
//! ends inside a word loads the whole word, or merges its bytes into it
//! with a compare-exchange. Other memory is [`Granule::Byte`]: every access
//! is one `AtomicU8`. Relaxed word loads and stores compile to plain moves
//! on x86-64 and AArch64, so word memory copies at close to `memcpy` speed.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering::Relaxed};

const WORD: usize = core::mem::size_of::<usize>();

/// The one access size used for a piece of memory.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum Granule {
    /// Whole aligned words: the memory starts on a word and is whole words
    /// long, so the word around any of its bytes lies inside it.
    Word,
    /// Single bytes.
    Byte,
}

impl Granule {
    /// The granule of `len` bytes at `start`.
    pub(crate) fn of(start: *mut u8, len: usize) -> Granule {
        if (start as usize) % WORD == 0 && len % WORD == 0 {
            Granule::Word
        } else {
            Granule::Byte
        }
    }
}

/// The aligned word holding the byte at `at`.
///
/// # Safety
/// `at` lies in [`Granule::Word`] memory, so the whole word is inside it.
unsafe fn word_of<'m>(at: *mut u8) -> (&'m AtomicUsize, usize) {
    let skew = (at as usize) % WORD;
    // SAFETY: the word starts `skew` bytes before `at`, inside the same
    // word-granular memory; it is aligned by construction.
    let word = unsafe { AtomicUsize::from_ptr(at.sub(skew).cast::<usize>()) };
    (word, skew)
}

/// Splits `len` bytes at `at` into a head inside a word, whole words, and
/// a tail inside a word: returns (head bytes, whole words).
fn split(at: *mut u8, len: usize) -> (usize, usize) {
    let head = ((at as usize).wrapping_neg() % WORD).min(len);
    (head, (len - head) / WORD)
}

/// Loads the bytes of `out.len()` (< one word) at `at`, inside one word.
///
/// # Safety
/// As for [`load`].
unsafe fn load_partial(at: *mut u8, out: &mut [u8], granule: Granule) {
    if out.is_empty() {
        // `at` may be one past the memory: no word to touch.
        return;
    }
    match granule {
        Granule::Word => {
            // SAFETY: the caller's promise; `out` stays inside this word.
            let (word, skew) = unsafe { word_of(at) };
            out.copy_from_slice(&word.load(Relaxed).to_ne_bytes()[skew..skew + out.len()]);
        }
        Granule::Byte => {
            for (i, b) in out.iter_mut().enumerate() {
                // SAFETY: the caller's promise.
                *b = unsafe { AtomicU8::from_ptr(at.add(i)) }.load(Relaxed);
            }
        }
    }
}

/// Stores `data` (< one word) at `at`, inside one word.
///
/// # Safety
/// As for [`store`].
unsafe fn store_partial(at: *mut u8, data: &[u8], granule: Granule) {
    if data.is_empty() {
        // `at` may be one past the memory: no word to touch.
        return;
    }
    match granule {
        Granule::Word => {
            // SAFETY: the caller's promise; `data` stays inside this word.
            let (word, skew) = unsafe { word_of(at) };
            // Merge into whatever the other bytes hold now; a concurrent
            // write to them makes the exchange fail and retry.
            let _ = word.fetch_update(Relaxed, Relaxed, |old| {
                let mut bytes = old.to_ne_bytes();
                bytes[skew..skew + data.len()].copy_from_slice(data);
                Some(usize::from_ne_bytes(bytes))
            });
        }
        Granule::Byte => {
            for (i, &b) in data.iter().enumerate() {
                // SAFETY: the caller's promise.
                unsafe { AtomicU8::from_ptr(at.add(i)) }.store(b, Relaxed);
            }
        }
    }
}

/// Copies `dst.len()` bytes from `src` into `dst`.
///
/// # Safety
/// `src .. src + dst.len()` lies in memory of granule `granule` that is
/// valid for reads for the whole call, through a pointer that permits
/// shared mutation (from a mapping or a `&mut`, not from a `&`), and every
/// other access to that memory, if concurrent, is atomic with the same
/// granule or comes from outside Rust.
pub(crate) unsafe fn load(src: *mut u8, dst: &mut [u8], granule: Granule) {
    let (head, words) = split(src, dst.len());
    let body = head + words * WORD;
    if granule == Granule::Byte {
        // SAFETY: the caller's promise.
        return unsafe { load_partial(src, dst, Granule::Byte) };
    }
    // SAFETY: the head lies inside the word `src` is in.
    unsafe { load_partial(src, &mut dst[..head], granule) };
    for (w, out) in dst[head..body].chunks_exact_mut(WORD).enumerate() {
        // SAFETY: src + head is word-aligned, each word inside the range.
        let word = unsafe { AtomicUsize::from_ptr(src.add(head + w * WORD).cast::<usize>()) };
        out.copy_from_slice(&word.load(Relaxed).to_ne_bytes());
    }
    // SAFETY: the tail starts on a word and is shorter than one.
    unsafe { load_partial(src.wrapping_add(body), &mut dst[body..], granule) };
}

/// The 64 bytes at `src`, read as [`load`] reads them; word memory at a
/// word-aligned `src` (every page-aligned scan) takes eight word loads.
///
/// # Safety
/// As for [`load`], for `src .. src + 64`.
#[inline]
pub(crate) unsafe fn load_64(src: *mut u8, granule: Granule) -> [u8; 64] {
    const WORDS: usize = 64 / WORD;
    if granule == Granule::Byte || (src as usize) % WORD != 0 {
        let mut block = [0u8; 64];
        // SAFETY: the caller's promise, passed on.
        unsafe { load(src, &mut block, granule) };
        return block;
    }
    let mut words = [0usize; WORDS];
    for (i, word) in words.iter_mut().enumerate() {
        // SAFETY: `src` is word-aligned and the 64 bytes are readable.
        *word = unsafe { AtomicUsize::from_ptr(src.add(i * WORD).cast::<usize>()) }.load(Relaxed);
    }
    // SAFETY: `[usize; WORDS]` and `[u8; 64]` have the same size and every
    // bit pattern is a valid byte array.
    unsafe { core::mem::transmute::<[usize; WORDS], [u8; 64]>(words) }
}

/// Copies `data` to `dst`.
///
/// # Safety
/// As for [`load`], for writes to `dst .. dst + data.len()`.
pub(crate) unsafe fn store(dst: *mut u8, data: &[u8], granule: Granule) {
    let (head, words) = split(dst, data.len());
    let body = head + words * WORD;
    if granule == Granule::Byte {
        // SAFETY: the caller's promise.
        return unsafe { store_partial(dst, data, Granule::Byte) };
    }
    // SAFETY: the head lies inside the word `dst` is in.
    unsafe { store_partial(dst, &data[..head], granule) };
    for (w, chunk) in data[head..body].chunks_exact(WORD).enumerate() {
        let mut bytes = [0u8; WORD];
        bytes.copy_from_slice(chunk);
        // SAFETY: dst + head is word-aligned, each word inside the range.
        unsafe { AtomicUsize::from_ptr(dst.add(head + w * WORD).cast::<usize>()) }
            .store(usize::from_ne_bytes(bytes), Relaxed);
    }
    // SAFETY: the tail starts on a word and is shorter than one.
    unsafe { store_partial(dst.wrapping_add(body), &data[body..], granule) };
}

/// Sets `len` bytes at `dst` to `byte`.
///
/// # Safety
/// As for [`store`], for `dst .. dst + len`.
pub(crate) unsafe fn fill(dst: *mut u8, len: usize, byte: u8, granule: Granule) {
    let (head, words) = split(dst, len);
    let body = head + words * WORD;
    if granule == Granule::Byte {
        for i in 0..len {
            // SAFETY: the caller's promise.
            unsafe { AtomicU8::from_ptr(dst.add(i)) }.store(byte, Relaxed);
        }
        return;
    }
    let pattern = [byte; WORD];
    // SAFETY: the head lies inside the word `dst` is in.
    unsafe { store_partial(dst, &pattern[..head], granule) };
    for w in 0..words {
        // SAFETY: dst + head is word-aligned, each word inside the range.
        unsafe { AtomicUsize::from_ptr(dst.add(head + w * WORD).cast::<usize>()) }
            .store(usize::from_ne_bytes(pattern), Relaxed);
    }
    // SAFETY: the tail starts on a word and is shorter than one.
    unsafe { store_partial(dst.wrapping_add(body), &pattern[..len - body], granule) };
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec::Vec;

    /// Every alignment and length up to a few words, in both granules,
    /// copies exactly its bytes and touches nothing around them.
    #[test]
    fn copies_match_a_plain_copy_at_every_alignment() {
        let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) | 1).collect();
        // Every start and length natively; under Miri, which runs this
        // thousands of times slower, those at and around word edges.
        let (starts, lens): (Vec<usize>, Vec<usize>) = if cfg!(miri) {
            (
                [0, 1, 3, WORD - 1, WORD, WORD + 1].into(),
                [0, 1, 2, WORD - 1, WORD, WORD + 1, 2 * WORD, 4 * WORD - 1].into(),
            )
        } else {
            ((0..2 * WORD).collect(), (0..4 * WORD).collect())
        };
        for granule in [Granule::Word, Granule::Byte] {
            for &start in &starts {
                for &len in &lens {
                    // Word-aligned storage, so both granules can be tried.
                    let mut storage = [0usize; 64 / WORD];
                    let base = storage.as_mut_ptr().cast::<u8>();
                    assert_eq!(Granule::of(base, 64), Granule::Word);
                    // SAFETY: in bounds of `storage`, used by this thread only.
                    unsafe { store(base.add(start), &pattern[..len], granule) };
                    let mut expected = [0u8; 64];
                    expected[start..start + len].copy_from_slice(&pattern[..len]);
                    let now = |storage: &[usize]| -> Vec<u8> {
                        storage.iter().flat_map(|w| w.to_ne_bytes()).collect()
                    };
                    assert_eq!(
                        now(&storage),
                        expected,
                        "{granule:?} store at {start}+{len}"
                    );
                    let base = storage.as_mut_ptr().cast::<u8>();
                    let mut out = std::vec![0u8; len];
                    // SAFETY: as above.
                    unsafe { load(base.add(start), &mut out, granule) };
                    assert_eq!(out, &pattern[..len], "{granule:?} load at {start}+{len}");
                    // SAFETY: as above.
                    unsafe { fill(base.add(start), len, 0xAA, granule) };
                    expected[start..start + len].fill(0xAA);
                    assert_eq!(now(&storage), expected, "{granule:?} fill at {start}+{len}");
                }
            }
        }
    }
}
