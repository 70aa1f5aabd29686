//! Addresses, lengths and page sizes as newtypes that do not mix.
//!
//! A [`RamAddr`] is an offset in the one flat RAM address space shared by all
//! blocks; it is not a guest-physical address. Lengths are [`ByteLen`], page
//! counts are [`PageCount`]. Arithmetic that can overflow is `checked_*` and
//! returns `None` instead of wrapping.
//!
//! # Offsets and page indexes
//!
//! A byte offset inside a block or a region
//! ([`RamBlock::read`](crate::block::RamBlock::read),
//! [`HostRegion::read`](crate::region::HostRegion::read),
//! [`HostMemory::discard`](crate::host::HostMemory::discard),
//! [`PostcopyTarget::place`](crate::migrate::PostcopyTarget::place)) is a
//! [`ByteLen`] counted from the block's or region's first byte: the same
//! quantity as a length, so `offset + len` needs no conversion. Three
//! other representations remain, each for one reason:
//!
//! - a target page index in a trait or a wire record
//!   ([`HostMemory::untouched_runs`](crate::host::HostMemory::untouched_runs),
//!   a page request) is a `u64` page number ([`ByteLen::page_index`] and
//!   [`ByteLen::from_pages`] convert), because a block may hold more pages
//!   than a 32-bit `usize` counts;
//! - a page index into a bitmap is a `usize`, because it indexes a slice of
//!   words in this address space;
//! - the length of a copy through a `HostRegion` (and of the region itself)
//!   is a `usize`, because it sizes a Rust slice or an iovec.

use core::fmt;

/// log2 of the target page size: every bitmap has one bit per 4 KiB page.
pub const TARGET_PAGE_SHIFT: u32 = 12;
/// The target page size in bytes (4 KiB).
pub const TARGET_PAGE_SIZE: u64 = 1 << TARGET_PAGE_SHIFT;
/// Every block offset is aligned to this many target pages, so that each
/// block's bitmaps start on a 64-bit word of the global RAM bitmap.
pub const BLOCK_ALIGN_PAGES: u64 = 64;
/// [`BLOCK_ALIGN_PAGES`] in bytes (256 KiB).
pub const BLOCK_ALIGN: u64 = BLOCK_ALIGN_PAGES * TARGET_PAGE_SIZE;

/// An offset in the flat RAM address space shared by all blocks.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RamAddr(pub u64);

/// A byte count, or a byte offset from the start of a block or region.
///
/// Offsets and lengths share the type so that `offset + len` is checked
/// arithmetic on one quantity; see the [module docs](self) for where a page
/// index or a `usize` is used instead.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteLen(pub u64);

/// A number of target (4 KiB) pages.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageCount(pub u64);

impl RamAddr {
    /// `self + len`, or `None` on overflow.
    pub const fn checked_add(self, len: ByteLen) -> Option<RamAddr> {
        match self.0.checked_add(len.0) {
            Some(v) => Some(RamAddr(v)),
            None => None,
        }
    }

    /// The distance from `base` up to `self`, or `None` if `self < base`.
    pub const fn checked_offset_from(self, base: RamAddr) -> Option<ByteLen> {
        match self.0.checked_sub(base.0) {
            Some(v) => Some(ByteLen(v)),
            None => None,
        }
    }

    /// The index of the target page containing this address.
    pub const fn page_index(self) -> u64 {
        self.0 >> TARGET_PAGE_SHIFT
    }
}

impl ByteLen {
    /// Zero bytes.
    pub const ZERO: ByteLen = ByteLen(0);

    /// The length of an in-memory buffer (a slice's `len()`).
    pub const fn from_usize(n: usize) -> ByteLen {
        // Lossless: no supported target has pointers wider than 64 bits.
        ByteLen(n as u64)
    }

    /// The offset of target page `page` (or the length of `page` target
    /// pages). Saturates at `u64::MAX`, an offset no block contains, so an
    /// absurd page number fails the bounds check it reaches next instead of
    /// wrapping to a valid one.
    pub const fn from_pages(page: u64) -> ByteLen {
        ByteLen(page.saturating_mul(TARGET_PAGE_SIZE))
    }

    /// The index of the target page containing this offset.
    pub const fn page_index(self) -> u64 {
        self.0 >> TARGET_PAGE_SHIFT
    }

    /// The value as a `usize`, to index or size a buffer, or `None` if it
    /// does not fit this address space.
    pub const fn to_usize(self) -> Option<usize> {
        if self.0 <= usize::MAX as u64 {
            Some(self.0 as usize)
        } else {
            None
        }
    }

    /// `self + other`, or `None` on overflow.
    pub const fn checked_add(self, other: ByteLen) -> Option<ByteLen> {
        match self.0.checked_add(other.0) {
            Some(v) => Some(ByteLen(v)),
            None => None,
        }
    }

    /// `self - other`, or `None` if `other > self`.
    pub const fn checked_sub(self, other: ByteLen) -> Option<ByteLen> {
        match self.0.checked_sub(other.0) {
            Some(v) => Some(ByteLen(v)),
            None => None,
        }
    }

    /// Whether the length is a whole number of `page`s.
    pub const fn is_multiple_of(self, page: PageSize) -> bool {
        self.0 & (page.bytes() - 1) == 0
    }

    /// The number of target pages needed to cover this length (rounded up).
    pub const fn target_pages(self) -> PageCount {
        PageCount(self.0.div_ceil(TARGET_PAGE_SIZE))
    }

    /// Rounds up to a multiple of `align` (a power of two), or `None` on overflow.
    pub const fn checked_align_up(self, align: u64) -> Option<ByteLen> {
        match self.0.checked_add(align - 1) {
            Some(v) => Some(ByteLen(v & !(align - 1))),
            None => None,
        }
    }
}

impl PageCount {
    /// The length of this many target pages, or `None` on overflow.
    pub const fn checked_bytes(self) -> Option<ByteLen> {
        match self.0.checked_mul(TARGET_PAGE_SIZE) {
            Some(v) => Some(ByteLen(v)),
            None => None,
        }
    }
}

/// A host page size: a power of two from 4 KiB up to 1 GiB.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PageSize(u64);

/// A page size that is not a power of two between 4 KiB and 1 GiB.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct InvalidPageSize(pub u64);

impl fmt::Display for InvalidPageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "page size {:#x} is not a power of two between 4 KiB and 1 GiB",
            self.0
        )
    }
}

impl core::error::Error for InvalidPageSize {}

impl PageSize {
    /// 4 KiB, the target page size.
    pub const SIZE_4K: PageSize = PageSize(4 << 10);
    /// 2 MiB (x86 huge page).
    pub const SIZE_2M: PageSize = PageSize(2 << 20);
    /// 1 GiB (x86 gigantic page).
    pub const SIZE_1G: PageSize = PageSize(1 << 30);

    /// Validates a page size in bytes.
    pub const fn new(bytes: u64) -> Result<PageSize, InvalidPageSize> {
        if bytes.is_power_of_two() && bytes >= Self::SIZE_4K.0 && bytes <= Self::SIZE_1G.0 {
            Ok(PageSize(bytes))
        } else {
            Err(InvalidPageSize(bytes))
        }
    }

    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }

    /// The size as a [`ByteLen`].
    pub const fn len(self) -> ByteLen {
        ByteLen(self.0)
    }

    /// How many target pages one of these pages spans.
    pub const fn target_pages(self) -> u64 {
        self.0 >> TARGET_PAGE_SHIFT
    }
}

impl fmt::Display for ByteLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        human_size(self.0, f)
    }
}

/// Hexadecimal, as offsets appear in error messages (`{:#x}`).
impl fmt::LowerHex for ByteLen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::LowerHex::fmt(&self.0, f)
    }
}

impl fmt::Display for PageSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        human_size(self.0, f)
    }
}

impl fmt::Display for RamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Prints a byte count in the largest binary unit that divides it exactly.
fn human_size(bytes: u64, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    const UNITS: [(u64, &str); 4] = [
        (1 << 40, "TiB"),
        (1 << 30, "GiB"),
        (1 << 20, "MiB"),
        (1 << 10, "KiB"),
    ];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes % unit == 0 {
            return write!(f, "{} {}", bytes / unit, name);
        }
    }
    write!(f, "{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_are_validated() {
        assert_eq!(PageSize::new(4096), Ok(PageSize::SIZE_4K));
        assert_eq!(PageSize::new(1 << 21), Ok(PageSize::SIZE_2M));
        assert_eq!(PageSize::new(1 << 30), Ok(PageSize::SIZE_1G));
        for bad in [0, 1, 2048, 4097, 3 << 12, 1 << 31] {
            assert_eq!(PageSize::new(bad), Err(InvalidPageSize(bad)));
        }
    }

    #[test]
    fn checked_arithmetic_reports_overflow() {
        assert_eq!(RamAddr(u64::MAX).checked_add(ByteLen(1)), None);
        assert_eq!(RamAddr(5).checked_add(ByteLen(1)), Some(RamAddr(6)));
        assert_eq!(RamAddr(5).checked_offset_from(RamAddr(6)), None);
        assert_eq!(ByteLen(1).checked_sub(ByteLen(2)), None);
        assert_eq!(ByteLen(u64::MAX).checked_align_up(4096), None);
        assert_eq!(ByteLen(4097).checked_align_up(4096), Some(ByteLen(8192)));
        assert_eq!(PageCount(u64::MAX).checked_bytes(), None);
        assert_eq!(ByteLen(4097).target_pages(), PageCount(2));
        assert_eq!(ByteLen::from_pages(3), ByteLen(3 * TARGET_PAGE_SIZE));
        assert_eq!(ByteLen::from_pages(u64::MAX), ByteLen(u64::MAX));
        assert_eq!(ByteLen(3 * TARGET_PAGE_SIZE + 1).page_index(), 3);
        assert_eq!(ByteLen::from_usize(7), ByteLen(7));
        assert_eq!(ByteLen(7).to_usize(), Some(7));
        assert_eq!(std::format!("{:#x}", ByteLen(0x1000)), "0x1000");
    }
}
