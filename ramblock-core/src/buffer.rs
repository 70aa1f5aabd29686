//! [`BufferMemory`]: host memory over a buffer the caller owns.
//!
//! This is what a firmware or unikernel VMM without an OS uses (a static
//! array), and what the core's own tests run on. Resizing only moves the
//! accessible limit; discarding zero-fills.
#![allow(unsafe_code)]

use crate::addr::{ByteLen, PageSize};
use crate::atomic_copy::{self, Granule};
use crate::host::HostMemory;
use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

/// Storage whose bytes stay at one address while the value holding them
/// moves: a borrowed slice or array, a `Box<[u8]>`, a `Vec<u8>`.
///
/// [`BufferMemory`] takes its storage apart into a raw pointer and a length
/// when it is built and puts it back together when it is dropped, so the
/// pointer it hands out never goes through a reference that a move could
/// invalidate. An inline array is refused, because its bytes move with it:
///
/// ```compile_fail
/// use ramblock_core::{addr::{ByteLen, PageSize}, buffer::BufferMemory};
/// let m = BufferMemory::new([0u8; 4096], ByteLen(4096), PageSize::SIZE_4K);
/// ```
///
/// # Safety
/// [`StableBuffer::into_raw_parts`] returns a pointer to `len` bytes that
/// stay valid for reads and writes, at that address, and reachable by no
/// one else until [`StableBuffer::from_raw_parts`] rebuilds the value from
/// exactly those parts.
pub unsafe trait StableBuffer: Sized {
    /// Gives up the storage as a pointer to its first byte and its length.
    fn into_raw_parts(self) -> (NonNull<u8>, usize);

    /// Rebuilds the storage from what [`StableBuffer::into_raw_parts`]
    /// returned.
    ///
    /// # Safety
    /// `ptr` and `len` come from one call of `into_raw_parts` on a value of
    /// this type, and are used for this only once.
    unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> Self;
}

/// A pointer to a slice's first byte that is never null (dangling when empty).
fn slice_start(slice: &mut [u8]) -> NonNull<u8> {
    NonNull::new(slice.as_mut_ptr()).unwrap_or(NonNull::dangling())
}

// SAFETY: the referent lives, unaliased, for the reference's lifetime; rebuilding it
// from its own parts restores it as it was.
unsafe impl StableBuffer for &mut [u8] {
    fn into_raw_parts(self) -> (NonNull<u8>, usize) {
        (slice_start(self), self.len())
    }

    unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> Self {
        // SAFETY: the caller passes back the parts of a `&mut [u8]` of this lifetime.
        unsafe { core::slice::from_raw_parts_mut(ptr.as_ptr(), len) }
    }
}

// SAFETY: as for a slice; the array's length is fixed by its type.
unsafe impl<const N: usize> StableBuffer for &mut [u8; N] {
    fn into_raw_parts(self) -> (NonNull<u8>, usize) {
        (slice_start(self), N)
    }

    unsafe fn from_raw_parts(ptr: NonNull<u8>, _len: usize) -> Self {
        // SAFETY: the caller passes back the pointer of a `&mut [u8; N]` of this lifetime.
        unsafe { &mut *ptr.as_ptr().cast::<[u8; N]>() }
    }
}

// SAFETY: `Box::into_raw` hands over the allocation, which stays put until
// `Box::from_raw` takes it back.
#[cfg(feature = "alloc")]
unsafe impl StableBuffer for alloc::boxed::Box<[u8]> {
    fn into_raw_parts(self) -> (NonNull<u8>, usize) {
        let len = self.len();
        let raw = alloc::boxed::Box::into_raw(self);
        let ptr = NonNull::new(raw.cast::<u8>()).unwrap_or(NonNull::dangling());
        (ptr, len)
    }

    unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> Self {
        let raw = core::ptr::slice_from_raw_parts_mut(ptr.as_ptr(), len);
        // SAFETY: the caller passes back what `Box::into_raw` returned.
        unsafe { alloc::boxed::Box::from_raw(raw) }
    }
}

// SAFETY: as for `Box<[u8]>`, which the vector becomes (dropping any spare
// capacity, so the length is all that is needed to rebuild it).
#[cfg(feature = "alloc")]
unsafe impl StableBuffer for alloc::vec::Vec<u8> {
    fn into_raw_parts(self) -> (NonNull<u8>, usize) {
        self.into_boxed_slice().into_raw_parts()
    }

    unsafe fn from_raw_parts(ptr: NonNull<u8>, len: usize) -> Self {
        // SAFETY: the parts are those of the boxed slice made above.
        unsafe { <alloc::boxed::Box<[u8]> as StableBuffer>::from_raw_parts(ptr, len) }.into_vec()
    }
}

/// Host memory over a byte buffer whose address stays put (see
/// [`StableBuffer`]): `&mut [u8]`, `&'static mut [u8; N]`, `Box<[u8]>`,
/// `Vec<u8>`.
pub struct BufferMemory<B: StableBuffer> {
    // The storage, taken apart so that no reference to it is alive while
    // regions write through `base`; rebuilt by `Drop`.
    base: NonNull<u8>,
    buffer_len: usize,
    reserved: ByteLen,
    used: ByteLen,
    page_size: PageSize,
    _storage: PhantomData<B>,
}

// SAFETY: the value owns (or uniquely borrows) the storage behind `base`;
// sending the value sends the storage, so it is as sendable as `B`.
unsafe impl<B: StableBuffer + Send> Send for BufferMemory<B> {}
// SAFETY: shared access only reads the pointer fields; guest-RAM accesses go
// through HostRegion, which is designed for concurrent use.
unsafe impl<B: StableBuffer + Sync> Sync for BufferMemory<B> {}

impl<B: StableBuffer> Drop for BufferMemory<B> {
    fn drop(&mut self) {
        // SAFETY: `base` and `buffer_len` are the parts `new` took from a `B`,
        // and this is the only place that gives them back.
        drop(unsafe { B::from_raw_parts(self.base, self.buffer_len) });
    }
}

impl<B: StableBuffer> fmt::Debug for BufferMemory<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferMemory")
            .field("base", &self.base)
            .field("reserved", &self.reserved)
            .field("used", &self.used)
            .field("page_size", &self.page_size)
            .finish()
    }
}

/// A bad request to [`BufferMemory`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BufferError {
    /// A length or offset is not a multiple of the page size.
    Unaligned {
        /// The value.
        value: u64,
        /// The page size.
        page_size: u64,
    },
    /// A length past the end of the buffer.
    TooLong {
        /// What was asked for.
        asked: u64,
        /// What the buffer holds.
        available: u64,
    },
}

impl fmt::Display for BufferError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            BufferError::Unaligned { value, page_size } => {
                write!(
                    f,
                    "{value:#x} is not a multiple of the {page_size:#x}-byte page size"
                )
            }
            BufferError::TooLong { asked, available } => {
                write!(
                    f,
                    "{asked:#x} bytes asked for, the buffer holds {available:#x}"
                )
            }
        }
    }
}

impl core::error::Error for BufferError {}

impl<B: StableBuffer> BufferMemory<B> {
    /// Uses all of `buf` as the reservation, with the first `used` bytes
    /// accessible. The buffer's length is rounded down to whole pages.
    pub fn new(buf: B, used: ByteLen, page_size: PageSize) -> Result<Self, BufferError> {
        let (base, buffer_len) = buf.into_raw_parts();
        let reserved = ByteLen(buffer_len as u64 & !(page_size.bytes() - 1));
        let mut mem = BufferMemory {
            base,
            buffer_len,
            reserved,
            used: ByteLen::ZERO,
            page_size,
            _storage: PhantomData,
        };
        // On error `mem` is dropped, which hands the storage back and frees it.
        mem.check(ByteLen::ZERO, used)?;
        mem.used = used;
        Ok(mem)
    }

    /// Gives the storage back.
    pub fn into_inner(self) -> B {
        let this = core::mem::ManuallyDrop::new(self);
        // SAFETY: the parts `new` took from a `B`; `ManuallyDrop` keeps
        // `Drop` from rebuilding them a second time.
        unsafe { B::from_raw_parts(this.base, this.buffer_len) }
    }

    fn check(&self, offset: ByteLen, len: ByteLen) -> Result<(), BufferError> {
        for value in [offset.0, len.0] {
            if value % self.page_size.bytes() != 0 {
                return Err(BufferError::Unaligned {
                    value,
                    page_size: self.page_size.bytes(),
                });
            }
        }
        match offset.checked_add(len) {
            Some(end) if end <= self.reserved => Ok(()),
            _ => Err(BufferError::TooLong {
                asked: offset.0.saturating_add(len.0),
                available: self.reserved.0,
            }),
        }
    }
}

// SAFETY: `base` points at the storage, which this value owns and which
// stays put (`StableBuffer`); `used <= reserved <= buffer length` is kept by
// `check`.
unsafe impl<B: StableBuffer> HostMemory for BufferMemory<B> {
    type Error = BufferError;

    fn base(&self) -> NonNull<u8> {
        self.base
    }

    fn reserved_len(&self) -> ByteLen {
        self.reserved
    }

    fn used_len(&self) -> ByteLen {
        self.used
    }

    fn page_size(&self) -> PageSize {
        self.page_size
    }

    fn set_used_len(&mut self, len: ByteLen) -> Result<(), BufferError> {
        self.check(ByteLen::ZERO, len)?;
        self.used = len;
        Ok(())
    }

    fn discard(&self, offset: ByteLen, len: ByteLen) -> Result<(), BufferError> {
        self.check(offset, len)?;
        let (start, len) = (offset.0 as usize, len.0 as usize);
        // SAFETY: checked inside the reservation, which this value owns;
        // regions may read it concurrently, so the zeroing is atomic too,
        // with the granule its regions use (the same start, whole pages).
        unsafe {
            let granule = Granule::of(self.base.as_ptr(), self.reserved.0 as usize);
            atomic_copy::fill(self.base.as_ptr().add(start), len, 0, granule)
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    extern crate std;
    use std::vec;

    #[test]
    fn buffer_memory_checks_and_discards() {
        let mem = BufferMemory::new(
            vec![7u8; 5 * 4096].into_boxed_slice(),
            ByteLen(8192),
            PageSize::SIZE_4K,
        );
        let mut mem = mem.unwrap();
        assert_eq!(mem.reserved_len(), ByteLen(4 * 4096 + 4096));
        assert_eq!(
            mem.set_used_len(ByteLen(100)),
            Err(BufferError::Unaligned {
                value: 100,
                page_size: 4096
            })
        );
        assert_eq!(
            mem.set_used_len(ByteLen(6 * 4096)),
            Err(BufferError::TooLong {
                asked: 6 * 4096,
                available: 5 * 4096
            })
        );
        mem.discard(ByteLen(4096), ByteLen(4096)).unwrap();
        let r = mem.region();
        assert!(!r.is_zero(ByteLen(0), 4096).unwrap());
        assert!(r.is_zero(ByteLen(4096), 4096).unwrap());
        let back = mem.into_inner();
        assert_eq!(back.len(), 5 * 4096);
        assert_eq!((back[0], back[4096], back[8192]), (7, 0, 7));
    }

    /// Every kind of storage keeps its bytes where the memory's regions
    /// point, however the memory value moves (Miri checks the pointers).
    #[test]
    fn every_storage_kind_survives_moves() {
        fn exercise<B: StableBuffer>(buf: B) -> B {
            let mem = BufferMemory::new(buf, ByteLen(4096), PageSize::SIZE_4K).unwrap();
            let moved = [mem];
            let [mem] = moved;
            mem.region().write(ByteLen(10), b"moved").unwrap();
            let boxed = std::boxed::Box::new(mem);
            boxed.region().write(ByteLen(20), b"boxed").unwrap();
            let mut out = [0u8; 5];
            boxed.region().read(ByteLen(10), &mut out).unwrap();
            assert_eq!(&out, b"moved");
            boxed.into_inner()
        }
        let v = exercise(vec![0u8; 4096]);
        assert_eq!((&v[10..15], &v[20..25]), (&b"moved"[..], &b"boxed"[..]));
        let b = exercise(vec![0u8; 4096].into_boxed_slice());
        assert_eq!(&b[10..15], b"moved");
        let mut array = [0u8; 4096];
        exercise(&mut array);
        assert_eq!(&array[20..25], b"boxed");
        let mut slice = vec![0u8; 4096];
        exercise(&mut slice[..]);
        assert_eq!(&slice[10..15], b"moved");
        // A failed `new` hands the storage back to be freed, not leaked
        // (Miri's leak check sees it).
        assert!(BufferMemory::new(vec![0u8; 4096], ByteLen(8192), PageSize::SIZE_4K).is_err());
    }
}
