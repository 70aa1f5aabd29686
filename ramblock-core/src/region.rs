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
    _memory: PhantomData<&'a [u8]>,
}

// SAFETY: a HostRegion is an address range borrowed from memory that may be
// shared between threads; all access is through raw copies whose validity the
// creator of the region guaranteed for `'a`.
unsafe impl Send for HostRegion<'_> {}
// SAFETY: as above; concurrent copies through raw pointers are the point.
unsafe impl Sync for HostRegion<'_> {}

/// An access outside a [`HostRegion`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct OutOfRegion {
    /// First byte asked for.
    pub offset: ByteLen,
    /// Bytes asked for.
    pub len: ByteLen,
    /// Size of the region.
    pub region_len: ByteLen,
}

impl fmt::Display for OutOfRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "access of {:#x} bytes at offset {:#x} is outside the {:#x}-byte region",
            self.len, self.offset, self.region_len
        )
    }
}

impl core::error::Error for OutOfRegion {}

impl fmt::Debug for HostRegion<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HostRegion({:p}, {:#x})", self.ptr, self.len)
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
    pub const unsafe fn new(ptr: NonNull<u8>, len: usize) -> HostRegion<'a> {
        HostRegion {
            ptr,
            len,
            _memory: PhantomData,
        }
    }

    /// The empty region: every access but a zero-length one is out of range.
    pub const EMPTY: HostRegion<'static> = HostRegion {
        ptr: NonNull::dangling(),
        len: 0,
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
    pub fn subregion(&self, offset: ByteLen, len: usize) -> Result<HostRegion<'a>, OutOfRegion> {
        let start = self.check(offset, len)?;
        // SAFETY: the sub-range lies inside this region, so the creator's
        // guarantee covers it; start <= self.len keeps the add in bounds.
        let ptr = unsafe { self.ptr.add(start) };
        Ok(HostRegion {
            ptr,
            len,
            _memory: PhantomData,
        })
    }

    fn check(&self, offset: ByteLen, len: usize) -> Result<usize, OutOfRegion> {
        let err = OutOfRegion {
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
    pub fn read(&self, offset: ByteLen, buf: &mut [u8]) -> Result<(), OutOfRegion> {
        let start = self.check(offset, buf.len())?;
        // SAFETY: the range was bounds-checked against the region, which the
        // creator guaranteed readable; `buf` is a distinct Rust buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(self.as_ptr().add(start), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` to `offset`.
    pub fn write(&self, offset: ByteLen, data: &[u8]) -> Result<(), OutOfRegion> {
        let start = self.check(offset, data.len())?;
        // SAFETY: bounds-checked; the creator guaranteed the region writable
        // for callers of `write`; `data` is a distinct Rust buffer.
        unsafe {
            core::ptr::copy_nonoverlapping(data.as_ptr(), self.as_ptr().add(start), data.len())
        };
        Ok(())
    }

    /// Fills `len` bytes at `offset` with `byte`.
    pub fn fill(&self, offset: ByteLen, len: usize, byte: u8) -> Result<(), OutOfRegion> {
        let start = self.check(offset, len)?;
        // SAFETY: bounds-checked and writable as for `write`.
        unsafe { core::ptr::write_bytes(self.as_ptr().add(start), byte, len) };
        Ok(())
    }

    /// Whether `len` bytes at `offset` are all zero. Reads the memory in
    /// place, so a zero check costs no copy.
    pub fn is_zero(&self, offset: ByteLen, len: usize) -> Result<bool, OutOfRegion> {
        self.scan(offset, len, |block| {
            block.iter().fold(0u8, |acc, &b| acc | b) == 0
        })
    }

    /// Hands `len` bytes at `offset` to `visit` 64 bytes at a time, in
    /// order, until `visit` returns `false`; returns whether it never did.
    /// A last block shorter than 64 bytes is padded with zeros.
    ///
    /// This is how the memory is read in place (checked for zeros, hashed)
    /// without a copy: each 64-byte block goes through the stack, which
    /// the optimiser turns into plain loads.
    pub fn scan(
        &self,
        offset: ByteLen,
        len: usize,
        mut visit: impl FnMut(&[u8; 64]) -> bool,
    ) -> Result<bool, OutOfRegion> {
        let start = self.check(offset, len)?;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(64);
            let block = if n == 64 {
                // SAFETY: start + at + 64 <= start + len, inside the checked
                // range; the same racy-by-design read as `read`. A fixed
                // size compiles to vector loads, not a `memcpy` call.
                unsafe {
                    core::ptr::read_unaligned(self.as_ptr().add(start + at).cast::<[u8; 64]>())
                }
            } else {
                let mut block = [0u8; 64];
                // SAFETY: as above, for the last n < 64 bytes.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        self.as_ptr().add(start + at),
                        block.as_mut_ptr(),
                        n,
                    )
                };
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
            Err(OutOfRegion {
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
}
