//! [`HostRegion`]: the one type that touches guest RAM through a raw pointer.
//!
//! Guest RAM is written concurrently by vCPUs and devices, so Rust references
//! to it would be unsound. Every access goes through a bounds-checked copy
//! here instead, the way vm-memory's `VolatileSlice` does it.
//!
//! Offsets into a region are [`ByteLen`], like every offset inside a block;
//! the lengths of copies (and of the region) are `usize` because they size
//! Rust slices and iovecs (see [`crate::addr`]).
#![allow(unsafe_code)]

use crate::addr::ByteLen;
use crate::atomic_copy::{self, Granule};
use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

/// A byte range of host memory that other agents (the guest) may access
/// concurrently, borrowed for `'a` from the memory it views.
///
/// The lifetime is what makes the view sound: a region obtained from
/// [`crate::host::HostMemory::region`] or [`crate::block::RamBlock::region`]
/// borrows that memory, so the compiler refuses to let it outlive the memory
/// or survive a shrink (which needs `&mut`). Code that really needs a region
/// with no borrow (a fault thread, an iovec, a memslot) builds one with the
/// `unsafe` [`HostRegion::new`] and takes on its contract.
///
/// A region cannot outlive the memory it came from:
///
/// ```compile_fail
/// use ramblock_core::{addr::{ByteLen, PageSize}, buffer::BufferMemory, host::HostMemory};
/// let r = {
///     let m = BufferMemory::new(vec![0u8; 4096], ByteLen(4096), PageSize::SIZE_4K).unwrap();
///     m.region()
/// };
/// r.write(ByteLen(0), b"x").unwrap();
/// ```
///
/// nor survive a shrink of it:
///
/// ```compile_fail
/// use ramblock_core::{addr::{ByteLen, PageSize}, buffer::BufferMemory, host::HostMemory};
/// let mut m = BufferMemory::new(vec![0u8; 8192], ByteLen(8192), PageSize::SIZE_4K).unwrap();
/// let r = m.region();
/// m.set_used_len(ByteLen(0)).unwrap();
/// r.write(ByteLen(4096), b"x").unwrap();
/// ```
///
/// The same borrow holds for a block's region:
///
/// ```compile_fail
/// use ramblock_core::{addr::{ByteLen, PageSize, RamAddr}, bitmap::Owned,
///     block::{BlockBitmaps, BlockSpec}, buffer::BufferMemory, list::RamList, name::BlockName};
/// let list: RamList<'_, BufferMemory<Vec<u8>>, Owned, 4> = RamList::new();
/// let memory = BufferMemory::new(vec![0u8; 4096], ByteLen(4096), PageSize::SIZE_4K).unwrap();
/// let spec = BlockSpec::new(BlockName::new("ram").unwrap(), ByteLen(4096));
/// list.add(spec, memory, BlockBitmaps::allocate(ByteLen(4096), 18).unwrap()).unwrap();
/// let r = list.read().by_name("ram").unwrap().region();
/// r.write(ByteLen(0), b"x").unwrap();
/// ```
#[derive(Copy, Clone)]
pub struct HostRegion<'a> {
    ptr: NonNull<u8>,
    len: usize,
    /// False for memory mapped read-only: `write` and `fill` refuse it
    /// rather than fault.
    writable: bool,
    /// The one access size for these bytes, fixed by the region the whole
    /// memory was first wrapped in and inherited by sub-regions, so every
    /// copy of the same bytes uses the same size (see `atomic_copy`).
    granule: Granule,
    _memory: PhantomData<&'a [u8]>,
}

// SAFETY: a HostRegion is an address range borrowed from memory that may be
// shared between threads; all access is through atomic copies
// (`atomic_copy`) whose validity the creator of the region guaranteed for
// `'a`, so concurrent use from several threads is no data race.
unsafe impl Send for HostRegion<'_> {}
// SAFETY: as above; concurrent atomic copies are the point.
unsafe impl Sync for HostRegion<'_> {}

/// An access a [`HostRegion`] refuses.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum RegionError {
    /// The bytes asked for are not all inside the region.
    OutOfRange {
        /// First byte asked for.
        offset: ByteLen,
        /// Bytes asked for.
        len: ByteLen,
        /// Size of the region.
        region_len: ByteLen,
    },
    /// A write into memory mapped read-only.
    ReadOnly {
        /// First byte the write would have changed.
        offset: ByteLen,
        /// Bytes it would have written.
        len: ByteLen,
    },
}

impl fmt::Display for RegionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            RegionError::OutOfRange {
                offset,
                len,
                region_len,
            } => write!(
                f,
                "access of {len:#x} bytes at offset {offset:#x} is outside the {region_len:#x}-byte region"
            ),
            RegionError::ReadOnly { offset, len } => write!(
                f,
                "write of {len:#x} bytes at offset {offset:#x} into read-only memory"
            ),
        }
    }
}

impl core::error::Error for RegionError {}

impl fmt::Debug for HostRegion<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mode = if self.writable { "" } else { ", read-only" };
        write!(f, "HostRegion({:p}, {:#x}{mode})", self.ptr, self.len)
    }
}

impl<'a> HostRegion<'a> {
    /// Wraps `len` bytes at `ptr` for the lifetime `'a` the caller chooses.
    ///
    /// # Safety
    /// `ptr..ptr + len` must stay mapped and readable for all of `'a` (which
    /// the caller picks: tie it to the owner of the memory where possible),
    /// and writable if [`HostRegion::write`] or [`HostRegion::fill`] is
    /// called. No Rust reference to those bytes may be used while the region
    /// writes them.
    pub unsafe fn new(ptr: NonNull<u8>, len: usize) -> HostRegion<'a> {
        HostRegion {
            ptr,
            len,
            writable: true,
            granule: Granule::of(ptr.as_ptr(), len),
            _memory: PhantomData,
        }
    }

    /// Wraps `len` bytes at `ptr` that may be mapped read-only: reads work,
    /// writes are refused with [`RegionError::ReadOnly`].
    ///
    /// # Safety
    /// As for [`HostRegion::new`], but the bytes need only be readable.
    pub unsafe fn new_read_only(ptr: NonNull<u8>, len: usize) -> HostRegion<'a> {
        HostRegion {
            ptr,
            len,
            writable: false,
            granule: Granule::of(ptr.as_ptr(), len),
            _memory: PhantomData,
        }
    }

    /// The same bytes, refusing writes.
    pub const fn read_only(self) -> HostRegion<'a> {
        HostRegion {
            writable: false,
            ..self
        }
    }

    /// Whether [`HostRegion::write`] and [`HostRegion::fill`] may change
    /// the bytes.
    pub const fn is_writable(&self) -> bool {
        self.writable
    }

    /// The empty region: every access but a zero-length one is out of range.
    pub const EMPTY: HostRegion<'static> = HostRegion {
        ptr: NonNull::dangling(),
        len: 0,
        writable: true,
        granule: Granule::Word,
        _memory: PhantomData,
    };

    /// A region over a byte buffer the caller owns, borrowing it mutably so
    /// nothing else can reach the bytes while the region lives.
    pub fn from_mut_slice(buf: &'a mut [u8]) -> HostRegion<'a> {
        let ptr = NonNull::new(buf.as_mut_ptr()).unwrap_or(NonNull::dangling());
        // SAFETY: the mutable borrow keeps `buf` alive, in place and unaliased
        // for `'a`.
        unsafe { HostRegion::new(ptr, buf.len()) }
    }

    /// The same bytes for a lifetime the caller picks, for code that must
    /// hold a region past the borrow it came from: a fault thread or a
    /// post-copy target placing pages for a whole migration, an iovec
    /// handed to the kernel.
    ///
    /// # Safety
    /// As for [`HostRegion::new`]: the bytes must stay mapped (the memory
    /// neither dropped nor shrunk below this region) for all of `'b`.
    pub const unsafe fn detach<'b>(self) -> HostRegion<'b> {
        HostRegion {
            ptr: self.ptr,
            len: self.len,
            writable: self.writable,
            granule: self.granule,
            _memory: PhantomData,
        }
    }

    /// The first byte.
    pub const fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// Length in bytes.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether the region is empty.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A sub-range of this region.
    pub fn subregion(&self, offset: ByteLen, len: usize) -> Result<HostRegion<'a>, RegionError> {
        let start = self.check(offset, len)?;
        // SAFETY: the sub-range lies inside this region, so the creator's
        // guarantee covers it; start <= self.len keeps the add in bounds.
        let ptr = unsafe { self.ptr.add(start) };
        Ok(HostRegion {
            ptr,
            len,
            writable: self.writable,
            granule: self.granule,
            _memory: PhantomData,
        })
    }

    /// Checks a write: inside the region, and the region writable.
    fn check_write(&self, offset: ByteLen, len: usize) -> Result<usize, RegionError> {
        let start = self.check(offset, len)?;
        if !self.writable {
            return Err(RegionError::ReadOnly {
                offset,
                len: ByteLen::from_usize(len),
            });
        }
        Ok(start)
    }

    fn check(&self, offset: ByteLen, len: usize) -> Result<usize, RegionError> {
        let err = RegionError::OutOfRange {
            offset,
            len: ByteLen::from_usize(len),
            region_len: ByteLen::from_usize(self.len),
        };
        let start = offset.to_usize().ok_or(err)?;
        match start.checked_add(len) {
            Some(end) if end <= self.len => Ok(start),
            _ => Err(err),
        }
    }

    /// Copies `buf.len()` bytes from `offset` into `buf`.
    pub fn read(&self, offset: ByteLen, buf: &mut [u8]) -> Result<(), RegionError> {
        let start = self.check(offset, buf.len())?;
        // SAFETY: the range was bounds-checked against the region, which the
        // creator guaranteed readable for 'a and reached only atomically or
        // from outside Rust; `buf` is a distinct Rust buffer.
        unsafe { atomic_copy::load(self.as_ptr().add(start), buf, self.granule) };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: ByteLen, data: &[u8]) -> Result<(), RegionError> {
        let start = self.check_write(offset, data.len())?;
        // SAFETY: bounds-checked; the creator guaranteed a region that is
        // not read-only writable for 'a; `data` is a distinct Rust buffer.
        unsafe { atomic_copy::store(self.as_ptr().add(start), data, self.granule) };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: ByteLen, len: usize, byte: u8) -> Result<(), RegionError> {
        let start = self.check_write(offset, len)?;
        // SAFETY: bounds-checked and writable as for `write`.
        unsafe { atomic_copy::fill(self.as_ptr().add(start), len, byte, self.granule) };
        Ok(())
    }

    /// Whether `len` bytes at `offset` are all zero. Reads the memory in
    /// place, so a zero check costs no copy.
    pub fn is_zero(&self, offset: ByteLen, len: usize) -> Result<bool, RegionError> {
        self.scan(offset, len, |block| {
            block.iter().fold(0u8, |acc, &b| acc | b) == 0
        })
    }

    /// Hands `len` bytes at `offset` to `visit` 64 bytes at a time, in
    /// order, until `visit` returns `false`; returns whether it never did.
    /// A last block shorter than 64 bytes is padded with zeros.
    ///
    /// This is how the memory is read in place (checked for zeros, hashed)
    /// without a copy into a buffer: each 64-byte block is loaded word by
    /// word onto the stack.
    pub fn scan(
        &self,
        offset: ByteLen,
        len: usize,
        mut visit: impl FnMut(&[u8; 64]) -> bool,
    ) -> Result<bool, RegionError> {
        let start = self.check(offset, len)?;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(64);
            let src = self.as_ptr().wrapping_add(start + at);
            let block = if n == 64 {
                // SAFETY: start + at + 64 <= start + len, inside the checked
                // range, read atomically as in `read`.
                unsafe { atomic_copy::load_64(src, self.granule) }
            } else {
                let mut block = [0u8; 64];
                // SAFETY: as above, for the last n < 64 bytes.
                unsafe { atomic_copy::load(src, &mut block[..n], self.granule) };
                block
            };
            if !visit(&block) {
                return Ok(false);
            }
            at += n;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accesses_are_bounds_checked() {
        let mut buf = [0u8; 64];
        let r = HostRegion::from_mut_slice(&mut buf);
        r.write(ByteLen(60), &[1, 2, 3, 4]).unwrap();
        assert_eq!(
            r.write(ByteLen(61), &[1, 2, 3, 4]),
            Err(RegionError::OutOfRange {
                offset: ByteLen(61),
                len: ByteLen(4),
                region_len: ByteLen(64)
            })
        );
        assert!(r.read(ByteLen(u64::MAX), &mut [0; 1]).is_err());
        let mut out = [0u8; 4];
        r.read(ByteLen(60), &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        assert!(r.is_zero(ByteLen(0), 60).unwrap());
        assert!(!r.is_zero(ByteLen(0), 61).unwrap());
        let sub = r.subregion(ByteLen(60), 4).unwrap();
        sub.read(ByteLen(0), &mut out).unwrap();
        assert_eq!(out, [1, 2, 3, 4]);
        assert!(r.subregion(ByteLen(61), 4).is_err());
        r.fill(ByteLen(0), 64, 0).unwrap();
        assert!(r.is_zero(ByteLen(0), 64).unwrap());
        // A scan sees the bytes in order, zero-padded, and stops when told.
        r.write(ByteLen(0), &[9; 3]).unwrap();
        let mut seen = std::vec::Vec::new();
        assert_eq!(
            r.subregion(ByteLen(0), 3)
                .unwrap()
                .scan(ByteLen(0), 3, |b| {
                    seen.push(*b);
                    true
                }),
            Ok(true)
        );
        let mut padded = [0u8; 64];
        padded[..3].fill(9);
        assert_eq!(seen, [padded]);
        let mut calls = 0;
        assert_eq!(
            r.scan(ByteLen(0), 64, |_| {
                calls += 1;
                false
            }),
            Ok(false)
        );
        assert_eq!(calls, 1);
        assert!(r.scan(ByteLen(1), 64, |_| true).is_err());
    }

    #[test]
    fn a_read_only_region_refuses_writes_and_still_reads() {
        let mut buf = [7u8; 64];
        let rw = HostRegion::from_mut_slice(&mut buf);
        let ro = rw.read_only();
        assert!(rw.is_writable() && !ro.is_writable());
        let refused = Err(RegionError::ReadOnly {
            offset: ByteLen(8),
            len: ByteLen(2),
        });
        assert_eq!(ro.write(ByteLen(8), &[1, 2]), refused);
        assert_eq!(ro.fill(ByteLen(8), 2, 0), refused);
        // A sub-region keeps the restriction; range errors still come first.
        let sub = ro.subregion(ByteLen(8), 8).unwrap();
        assert!(matches!(
            sub.write(ByteLen(0), &[1]),
            Err(RegionError::ReadOnly { .. })
        ));
        assert!(matches!(
            ro.write(ByteLen(64), &[1]),
            Err(RegionError::OutOfRange { .. })
        ));
        let mut out = [0u8; 2];
        ro.read(ByteLen(8), &mut out).unwrap();
        assert_eq!(out, [7, 7], "nothing was written");
    }

    /// Several threads copying into and out of one region at once, at
    /// overlapping offsets, is no data race: every access is atomic. (Under
    /// Miri this is the check; natively it shows each reader sees whole
    /// writes of aligned words.)
    #[test]
    fn concurrent_copies_through_one_region_are_not_data_races() {
        // Word-aligned storage, as every mapping is: accessed a word at a time.
        let mut words = [0u64; 32];
        // SAFETY: the bytes of `words`, borrowed mutably for as long as `buf`.
        let buf = unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), 256) };
        let r = HostRegion::from_mut_slice(buf);
        let rounds = if cfg!(miri) { 4 } else { 1000 };
        std::thread::scope(|s| {
            for t in 1..=3u8 {
                s.spawn(move || {
                    for _ in 0..rounds {
                        r.write(ByteLen(0), &[t; 64]).unwrap();
                        r.fill(ByteLen(64), 64, t).unwrap();
                        let mut word = [0u8; 8];
                        r.read(ByteLen(8), &mut word).unwrap();
                        // An aligned word is written whole by one thread.
                        assert!(word.iter().all(|&b| b == word[0]), "{word:?}");
                        assert!(r.scan(ByteLen(0), 256, |_| true).unwrap());
                    }
                });
            }
        });
        let mut bytes = [0u8; 128];
        r.read(ByteLen(0), &mut bytes).unwrap();
        assert!(bytes.iter().all(|&b| (1..=3).contains(&b)));
    }
}
