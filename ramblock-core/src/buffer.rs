//! [`BufferMemory`]: host memory over a buffer the caller owns.
//!
//! This is what a firmware or unikernel VMM without an OS uses (a static
//! array), and what the core's own tests run on. Resizing only moves the
//! accessible limit; discarding zero-fills.
#![allow(unsafe_code)]

use crate::addr::{ByteLen, PageSize};
use crate::host::HostMemory;
use core::fmt;
use core::ptr::NonNull;

/// Host memory over a byte buffer (`&'static mut [u8]`, `Box<[u8]>`, ...).
pub struct BufferMemory<B> {
    // Kept only to own the storage; all access goes through `base`.
    _buf: B,
    base: NonNull<u8>,
    reserved: ByteLen,
    used: ByteLen,
    page_size: PageSize,
}

// SAFETY: the buffer is owned (or uniquely borrowed) by this value, and the raw
// pointer only aliases it; sending the value sends the buffer.
unsafe impl<B: Send> Send for BufferMemory<B> {}
// SAFETY: shared access only reads the pointer fields; guest-RAM accesses go
// through HostRegion, which is designed for concurrent use.
unsafe impl<B: Sync> Sync for BufferMemory<B> {}

impl<B> fmt::Debug for BufferMemory<B> {
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

impl<B: AsMut<[u8]>> BufferMemory<B> {
    /// Uses all of `buf` as the reservation, with the first `used` bytes
    /// accessible. The buffer's length is rounded down to whole pages.
    pub fn new(mut buf: B, used: ByteLen, page_size: PageSize) -> Result<Self, BufferError> {
        let slice = buf.as_mut();
        let reserved = ByteLen(slice.len() as u64 & !(page_size.bytes() - 1));
        let base = NonNull::new(slice.as_mut_ptr()).unwrap_or(NonNull::dangling());
        let mut mem = BufferMemory {
            _buf: buf,
            base,
            reserved,
            used: ByteLen::ZERO,
            page_size,
        };
        mem.check(ByteLen::ZERO, used)?;
        mem.used = used;
        Ok(mem)
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

// SAFETY: `base` points at the buffer, which this value owns and never moves
// (the buffer types used are references or boxes whose contents stay put);
// `used <= reserved <= buffer length` is kept by `check`.
unsafe impl<B: AsMut<[u8]>> HostMemory for BufferMemory<B> {
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
        // SAFETY: checked inside the reservation, which this value owns.
        unsafe { core::ptr::write_bytes(self.base.as_ptr().add(start), 0, len) };
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
        assert!(!r.is_zero(0, 4096).unwrap());
        assert!(r.is_zero(4096, 4096).unwrap());
    }
}
