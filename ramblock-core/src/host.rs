//! The host-memory seam: what a block needs from the memory behind it.
//!
//! `ramblock-linux` implements [`HostMemory`] over mmap, memfd, hugetlb and
//! files; a firmware VMM implements it over its own static memory, and
//! [`crate::buffer::BufferMemory`] implements it over a plain buffer.
#![allow(unsafe_code)]

use crate::addr::{ByteLen, PageSize};
use crate::region::HostRegion;
use core::fmt;
use core::ptr::NonNull;

/// Host memory behind one block.
///
/// The memory is reserved once for `reserved_len` bytes and never moves;
/// only the first `used_len` bytes are accessible. Growing a resizable block
/// makes more of the reservation accessible, in place.
///
/// # Safety
/// Implementors guarantee that:
/// - [`HostMemory::base`] returns the same pointer for the object's lifetime;
/// - `base .. base + used_len()` stays mapped and readable (and writable,
///   unless [`HostMemory::read_only`] says otherwise) until the length shrinks or the object
///   is dropped;
/// - `reserved_len()` and `page_size()` never change, `used_len()` changes only
///   through [`HostMemory::set_used_len`], and `used_len() <= reserved_len()`.
pub unsafe trait HostMemory {
    /// What went wrong in the host (an errno, a message).
    type Error: fmt::Debug + fmt::Display;

    /// The first byte of the reservation.
    fn base(&self) -> NonNull<u8>;

    /// Bytes reserved: the most the block can ever use (`max_length`).
    fn reserved_len(&self) -> ByteLen;

    /// Bytes currently accessible (`used_length`).
    fn used_len(&self) -> ByteLen;

    /// The host page size backing the memory.
    fn page_size(&self) -> PageSize;

    /// Makes exactly the first `len` bytes accessible. `len` is a multiple of
    /// the page size and at most `reserved_len()`; callers check this.
    fn set_used_len(&mut self, len: ByteLen) -> Result<(), Self::Error>;

    /// Gives the pages in `offset .. offset + len` back to the host; they read
    /// as zero afterwards. Both are multiples of the page size.
    fn discard(&self, offset: ByteLen, len: ByteLen) -> Result<(), Self::Error>;

    /// Reports `report(first, count)`, in 4 KiB pages from the start of
    /// the memory, for the pages in `first .. first + pages` (inside the
    /// used length) that were never written since they were mapped or
    /// discarded, so read as zero, when the host can tell cheaply; returns
    /// `false` when it cannot (the default), having reported nothing. A
    /// migration's first pass sends such pages as zero without reading
    /// them; it must make sure writes from the moment of the call on are
    /// logged.
    fn untouched_runs(&self, first: u64, pages: u64, report: &mut dyn FnMut(u64, u64)) -> bool {
        let _ = (first, pages, report);
        false
    }

    /// Whether the memory is mapped read-only: its regions then refuse
    /// writes ([`crate::region::RegionError::ReadOnly`]) instead of
    /// faulting.
    fn read_only(&self) -> bool {
        false
    }

    /// Writes back `offset .. offset + len` to persistent backing, if any.
    fn sync(&self, offset: ByteLen, len: ByteLen) -> Result<(), Self::Error> {
        let _ = (offset, len);
        Ok(())
    }

    /// The accessible part of the memory as a bounds-checked region.
    ///
    /// The region borrows the memory, so it cannot outlive it or survive a
    /// shrink ([`HostMemory::set_used_len`] takes `&mut self`).
    fn region(&self) -> HostRegion<'_> {
        // A used length that does not fit the address space could not be mapped.
        let len = usize::try_from(self.used_len().0).unwrap_or(usize::MAX);
        // SAFETY: the trait's contract keeps `base .. base + used_len` mapped
        // while `self` is alive and not shrunk, and the region's lifetime is
        // the borrow of `self`, which rules out both; memory that is not
        // writable gets a region that refuses writes.
        unsafe {
            if self.read_only() {
                HostRegion::new_read_only(self.base(), len)
            } else {
                HostRegion::new(self.base(), len)
            }
        }
    }
}
