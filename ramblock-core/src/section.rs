//! Named state sections: a device's or vCPU's saved state as bytes, tagged
//! with a name, an instance id and a version, the way QEMU's vmstate
//! sections are (`idstr`, `instance_id`, `version_id`).
//!
//! A section's header has one fixed-size encoding ([`SectionHeader::ENCODED_LEN`]
//! bytes) so that a snapshot file can keep a table of them and a migration
//! stream can carry them between records; the bytes themselves follow
//! wherever the container puts them. Decoding trusts nothing: a name that is
//! empty, too long, not UTF-8, has a NUL or garbage after it, and a length
//! above [`MAX_SECTION_LEN`] are each their own [`SectionError`].
//!
//! ```
//! use ramblock_core::section::{SectionHeader, SectionName};
//!
//! let header = SectionHeader {
//!     name: SectionName::new("cpu").unwrap(),
//!     instance_id: 0,
//!     version: 1,
//!     len: 300,
//! };
//! let mut bytes = [0u8; SectionHeader::ENCODED_LEN];
//! header.encode(&mut bytes);
//! assert_eq!(SectionHeader::decode(&bytes), Ok(header));
//! ```

use core::fmt;

/// The longest section name in bytes (QEMU's `idstr` is 256 with its NUL).
pub const MAX_SECTION_NAME_LEN: usize = 255;

/// The largest section body: device state is kilobytes to a few megabytes
/// (a VGA's is the largest QEMU has); the bound keeps a reader's
/// allocation small whatever a file claims.
pub const MAX_SECTION_LEN: u64 = 64 << 20;

/// A validated section name: 1 to 255 bytes of UTF-8 without NUL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SectionName(heapless::String<MAX_SECTION_NAME_LEN>);

impl SectionName {
    /// Validates a name.
    pub fn new(name: &str) -> Result<SectionName, SectionError> {
        if name.is_empty() {
            return Err(SectionError::NameEmpty);
        }
        if name.len() > MAX_SECTION_NAME_LEN {
            return Err(SectionError::NameTooLong { len: name.len() });
        }
        if let Some(at) = name.bytes().position(|b| b == 0) {
            return Err(SectionError::NameNul { at });
        }
        let mut s = heapless::String::new();
        // Cannot fail: the length was checked above.
        let _ = s.push_str(name);
        Ok(SectionName(s))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for SectionName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What describes one section's bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SectionHeader {
    /// Who the state belongs to (`"cpu"`, `"0000:00:02.0/virtio-net"`).
    pub name: SectionName,
    /// Which of several devices of the same name (QEMU's `instance_id`).
    pub instance_id: u32,
    /// The version of the state's own encoding.
    pub version: u32,
    /// Bytes of state that follow.
    pub len: u64,
}

/// Why bytes are not a [`SectionHeader`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum SectionError {
    /// Fewer bytes than a header.
    Truncated {
        /// Bytes there are.
        len: usize,
    },
    /// The name's length byte is zero.
    NameEmpty,
    /// A name longer than [`MAX_SECTION_NAME_LEN`] bytes.
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// The name holds a NUL.
    NameNul {
        /// Where.
        at: usize,
    },
    /// The name is not UTF-8.
    NameUtf8 {
        /// Bytes of it that are valid.
        valid_up_to: usize,
    },
    /// A non-zero byte after the name in its fixed-size field.
    NamePadding {
        /// Offset of the byte in the field.
        at: usize,
    },
    /// The state is longer than [`MAX_SECTION_LEN`].
    TooLong {
        /// The length claimed.
        len: u64,
    },
}

impl fmt::Display for SectionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SectionError::Truncated { len } => write!(
                f,
                "section header is {len} bytes, shorter than its {} bytes",
                SectionHeader::ENCODED_LEN
            ),
            SectionError::NameEmpty => f.write_str("section name is empty"),
            SectionError::NameTooLong { len } => write!(
                f,
                "section name is {len} bytes; at most {MAX_SECTION_NAME_LEN} are allowed"
            ),
            SectionError::NameNul { at } => {
                write!(f, "section name holds a NUL byte at offset {at}")
            }
            SectionError::NameUtf8 { valid_up_to } => write!(
                f,
                "section name is not UTF-8 after its first {valid_up_to} bytes"
            ),
            SectionError::NamePadding { at } => write!(
                f,
                "section name field has a non-zero byte at offset {at} after the name"
            ),
            SectionError::TooLong { len } => write!(
                f,
                "section claims {len} bytes of state; at most {MAX_SECTION_LEN} are allowed"
            ),
        }
    }
}

impl core::error::Error for SectionError {}

impl SectionHeader {
    /// Bytes of an encoded header: the name field (a length byte and 255
    /// bytes, zero-padded), instance id, version, length, little-endian.
    pub const ENCODED_LEN: usize = 1 + MAX_SECTION_NAME_LEN + 4 + 4 + 8;

    /// Encodes the header.
    pub fn encode(&self, out: &mut [u8; Self::ENCODED_LEN]) {
        out.fill(0);
        let name = self.name.as_str().as_bytes();
        // At most 255 bytes (SectionName's invariant).
        out[0] = name.len() as u8;
        out[1..1 + name.len()].copy_from_slice(name);
        let at = 1 + MAX_SECTION_NAME_LEN;
        out[at..at + 4].copy_from_slice(&self.instance_id.to_le_bytes());
        out[at + 4..at + 8].copy_from_slice(&self.version.to_le_bytes());
        out[at + 8..at + 16].copy_from_slice(&self.len.to_le_bytes());
    }

    /// Decodes the first [`Self::ENCODED_LEN`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<SectionHeader, SectionError> {
        let Some(bytes) = bytes.get(..Self::ENCODED_LEN) else {
            return Err(SectionError::Truncated { len: bytes.len() });
        };
        let name = decode_name(&bytes[..1 + MAX_SECTION_NAME_LEN])?;
        let at = 1 + MAX_SECTION_NAME_LEN;
        let word =
            |o: usize| u32::from_le_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]);
        let instance_id = word(at);
        let version = word(at + 4);
        let len = u64::from(word(at + 8)) | (u64::from(word(at + 12)) << 32);
        if len > MAX_SECTION_LEN {
            return Err(SectionError::TooLong { len });
        }
        Ok(SectionHeader {
            name,
            instance_id,
            version,
            len,
        })
    }
}

/// Decodes a length-prefixed, zero-padded name field.
fn decode_name(field: &[u8]) -> Result<SectionName, SectionError> {
    let len = usize::from(field[0]);
    if len == 0 {
        return Err(SectionError::NameEmpty);
    }
    let raw = &field[1..1 + len];
    if let Some(at) = field[1 + len..].iter().position(|&b| b != 0) {
        return Err(SectionError::NamePadding { at: 1 + len + at });
    }
    let name = core::str::from_utf8(raw).map_err(|e| SectionError::NameUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    SectionName::new(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(h: &SectionHeader) -> [u8; SectionHeader::ENCODED_LEN] {
        let mut b = [0u8; SectionHeader::ENCODED_LEN];
        h.encode(&mut b);
        b
    }

    #[test]
    fn headers_round_trip_and_every_bad_field_is_its_own_error() {
        let h = SectionHeader {
            name: SectionName::new(&"n".repeat(255)).unwrap(),
            instance_id: u32::MAX,
            version: 7,
            len: MAX_SECTION_LEN,
        };
        let b = encoded(&h);
        assert_eq!(SectionHeader::decode(&b), Ok(h.clone()));
        assert_eq!(
            SectionHeader::decode(&b[..10]),
            Err(SectionError::Truncated { len: 10 })
        );
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(SectionHeader::decode(&bad), Err(SectionError::NameEmpty));
        let short = SectionHeader {
            name: SectionName::new("cpu").unwrap(),
            ..h.clone()
        };
        let mut bad = encoded(&short);
        bad[10] = 1;
        assert_eq!(
            SectionHeader::decode(&bad),
            Err(SectionError::NamePadding { at: 10 })
        );
        let mut bad = encoded(&short);
        bad[2] = 0;
        assert_eq!(
            SectionHeader::decode(&bad),
            Err(SectionError::NameNul { at: 1 })
        );
        let mut bad = encoded(&short);
        bad[1] = 0xFF;
        assert_eq!(
            SectionHeader::decode(&bad),
            Err(SectionError::NameUtf8 { valid_up_to: 0 })
        );
        let mut bad = encoded(&short);
        let at = 1 + MAX_SECTION_NAME_LEN + 8;
        bad[at..at + 8].copy_from_slice(&(MAX_SECTION_LEN + 1).to_le_bytes());
        assert_eq!(
            SectionHeader::decode(&bad),
            Err(SectionError::TooLong {
                len: MAX_SECTION_LEN + 1
            })
        );
        assert_eq!(
            SectionName::new(&"n".repeat(256)),
            Err(SectionError::NameTooLong { len: 256 })
        );
    }
}
