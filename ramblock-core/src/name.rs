//! Block names: unique, at most 255 bytes of UTF-8, no NUL.
//!
//! VMMs prefix a device path (`0000:00:02.0/vga.vram`), see
//! [`BlockName::with_prefix`]. Names are stored inline, so a lookup by name
//! never allocates.

use core::fmt;

/// The longest block name in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// A validated block name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BlockName(heapless::String<MAX_NAME_LEN>);

/// Why a name was refused.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The name is empty.
    Empty,
    /// The name is longer than [`MAX_NAME_LEN`] bytes.
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a NUL byte.
    ContainsNul {
        /// Byte offset of the first NUL.
        at: usize,
    },
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Empty => f.write_str("block name is empty"),
            NameError::TooLong { len } => {
                write!(
                    f,
                    "block name is {len} bytes; at most {MAX_NAME_LEN} are allowed"
                )
            }
            NameError::ContainsNul { at } => {
                write!(f, "block name contains a NUL byte at offset {at}")
            }
        }
    }
}

impl core::error::Error for NameError {}

impl BlockName {
    /// Validates a name.
    pub fn new(name: &str) -> Result<BlockName, NameError> {
        Self::from_parts(&[name])
    }

    /// Builds `"<prefix>/<name>"`, the QEMU convention for names owned by a
    /// device (`prefix` is the device path). An empty prefix gives `name`.
    pub fn with_prefix(prefix: &str, name: &str) -> Result<BlockName, NameError> {
        if prefix.is_empty() {
            Self::new(name)
        } else {
            Self::from_parts(&[prefix, "/", name])
        }
    }

    fn from_parts(parts: &[&str]) -> Result<BlockName, NameError> {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len == 0 {
            return Err(NameError::Empty);
        }
        if len > MAX_NAME_LEN {
            return Err(NameError::TooLong { len });
        }
        let mut s = heapless::String::new();
        for part in parts {
            if let Some(pos) = part.bytes().position(|b| b == 0) {
                return Err(NameError::ContainsNul { at: s.len() + pos });
            }
            // Cannot fail: the total length was checked above.
            let _ = s.push_str(part);
        }
        Ok(BlockName(s))
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for BlockName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        assert_eq!(BlockName::new("pc.ram").unwrap().as_str(), "pc.ram");
        assert_eq!(BlockName::new(""), Err(NameError::Empty));
        let long = "x".repeat(256);
        assert_eq!(BlockName::new(&long), Err(NameError::TooLong { len: 256 }));
        assert!(BlockName::new(&long[..255]).is_ok());
        assert_eq!(
            BlockName::new("a\0b"),
            Err(NameError::ContainsNul { at: 1 })
        );
    }

    #[test]
    fn prefix_helper_joins_with_slash() {
        let n = BlockName::with_prefix("0000:00:02.0", "vga.vram").unwrap();
        assert_eq!(n.as_str(), "0000:00:02.0/vga.vram");
        assert_eq!(
            BlockName::with_prefix("", "pc.ram").unwrap().as_str(),
            "pc.ram"
        );
        assert_eq!(
            BlockName::with_prefix("dev\0", "x"),
            Err(NameError::ContainsNul { at: 3 })
        );
        assert_eq!(
            BlockName::with_prefix(&"p".repeat(250), "abcdef"),
            Err(NameError::TooLong { len: 257 })
        );
    }
}
