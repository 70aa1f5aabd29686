//! Minimal byte-stream traits, so the stream code runs without `std`.
//!
//! [`ByteRead`] and [`ByteWrite`] are the two calls the migration stream
//! needs. [`SliceReader`] reads from memory (tests, fuzzing, firmware);
//! with the `std` feature, `IoStream` adapts any `std::io::Read`/`Write`.

use crate::addr::ByteLen;
use crate::region::HostRegion;
use core::fmt;

/// Why a read could not complete.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReadError<E> {
    /// The stream ended before the bytes asked for.
    Eof,
    /// The underlying transport failed.
    Io(E),
}

impl<E: fmt::Display> fmt::Display for ReadError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadError::Eof => f.write_str("the stream ended early"),
            ReadError::Io(e) => write!(f, "read failed: {e}"),
        }
    }
}

/// A source of bytes.
pub trait ByteRead {
    /// The transport's error.
    type Error: fmt::Debug + fmt::Display;

    /// Fills `buf` completely, or fails.
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<Self::Error>>;

    /// Reads the next `region.len()` bytes straight into `region` (guest
    /// memory) and returns `true`, but only if the transport already holds
    /// all of them, so the read cannot stop short; otherwise reads nothing
    /// and returns `false` (the default). A receiver then skips its bounce
    /// buffer without ever leaving a record half written.
    fn read_ready_into(&mut self, region: &HostRegion<'_>) -> Result<bool, ReadError<Self::Error>> {
        let _ = region;
        Ok(false)
    }
}

/// A sink of bytes.
pub trait ByteWrite {
    /// The transport's error.
    type Error: fmt::Debug + fmt::Display;

    /// Writes all of `buf`, or fails.
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error>;

    /// Writes all of `region`: guest memory the guest may be changing while
    /// it is sent (pre-copy sends again whatever changes). The default
    /// copies it out a page at a time; a transport that can hand the memory
    /// to the kernel in place (`writev` on a socket) overrides this and
    /// saves the copy.
    fn write_region(&mut self, region: &HostRegion<'_>) -> Result<(), Self::Error> {
        let mut page = [0u8; 4096];
        let mut at = 0;
        while at < region.len() {
            let n = (region.len() - at).min(page.len());
            // In range: at + n <= region.len().
            let _ = region.read(ByteLen::from_usize(at), &mut page[..n]);
            self.write_all(&page[..n])?;
            at += n;
        }
        Ok(())
    }

    /// Pushes buffered bytes out.
    fn flush(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl<T: ByteRead + ?Sized> ByteRead for &mut T {
    type Error = T::Error;
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<T::Error>> {
        (**self).read_exact(buf)
    }
    fn read_ready_into(&mut self, region: &HostRegion<'_>) -> Result<bool, ReadError<T::Error>> {
        (**self).read_ready_into(region)
    }
}

impl<T: ByteWrite + ?Sized> ByteWrite for &mut T {
    type Error = T::Error;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), T::Error> {
        (**self).write_all(buf)
    }
    fn write_region(&mut self, region: &HostRegion<'_>) -> Result<(), T::Error> {
        (**self).write_region(region)
    }
    fn flush(&mut self) -> Result<(), T::Error> {
        (**self).flush()
    }
}

/// Reads from a byte slice.
#[derive(Debug)]
pub struct SliceReader<'a> {
    data: &'a [u8],
}

impl<'a> SliceReader<'a> {
    /// Reads `data` from its start.
    pub fn new(data: &'a [u8]) -> Self {
        SliceReader { data }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.data.len()
    }
}

impl ByteRead for SliceReader<'_> {
    type Error = core::convert::Infallible;
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<Self::Error>> {
        if buf.len() > self.data.len() {
            self.data = &[];
            return Err(ReadError::Eof);
        }
        let (head, tail) = self.data.split_at(buf.len());
        buf.copy_from_slice(head);
        self.data = tail;
        Ok(())
    }

    /// Everything is in memory: ready whenever enough bytes remain.
    fn read_ready_into(&mut self, region: &HostRegion<'_>) -> Result<bool, ReadError<Self::Error>> {
        if region.len() > self.data.len() {
            return Ok(false);
        }
        let (head, tail) = self.data.split_at(region.len());
        // In range: `head` is exactly the region's length.
        let _ = region.write(ByteLen::ZERO, head);
        self.data = tail;
        Ok(true)
    }
}

/// Appends to a `Vec<u8>`.
#[cfg(feature = "alloc")]
impl ByteWrite for alloc::vec::Vec<u8> {
    type Error = core::convert::Infallible;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), Self::Error> {
        self.extend_from_slice(buf);
        Ok(())
    }
}

/// Adapts a `std::io` reader or writer.
#[cfg(feature = "std")]
#[derive(Debug)]
pub struct IoStream<T>(pub T);

#[cfg(feature = "std")]
impl<T: std::io::Read> ByteRead for IoStream<T> {
    type Error = std::io::Error;
    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ReadError<std::io::Error>> {
        self.0.read_exact(buf).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => ReadError::Eof,
            _ => ReadError::Io(e),
        })
    }
}

#[cfg(feature = "std")]
impl<T: std::io::Write> ByteWrite for IoStream<T> {
    type Error = std::io::Error;
    fn write_all(&mut self, buf: &[u8]) -> Result<(), std::io::Error> {
        self.0.write_all(buf)
    }
    fn flush(&mut self) -> Result<(), std::io::Error> {
        self.0.flush()
    }
}
