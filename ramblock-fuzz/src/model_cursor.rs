//! The byte cursor the receive models read their input with: shared by
//! `receive_model` and `stream_decode` so both models report a short input
//! the same way (the receiver's `Truncated` code).

/// The receiver's error code for `Truncated`.
pub(crate) const TRUNCATED: u32 = 20;

/// The bytes still to read.
pub(crate) struct Cursor<'a>(pub(crate) &'a [u8]);

impl<'a> Cursor<'a> {
    /// The next `n` bytes; too few left is `TRUNCATED` and empties the
    /// cursor, as the receiver stops reading there.
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], u32> {
        if n > self.0.len() {
            self.0 = &[];
            return Err(TRUNCATED);
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    /// The next little-endian `u32`.
    pub(crate) fn u32(&mut self) -> Result<u32, u32> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().unwrap_or([0; 4]),
        ))
    }

    /// The next little-endian `u64`.
    pub(crate) fn u64(&mut self) -> Result<u64, u32> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().unwrap_or([0; 8]),
        ))
    }
}
