//! The resume token: 128 random bits a post-copy destination issues when
//! the guest starts running on it, so that after a broken connection only
//! the source it was migrating from can resume the migration.
//!
//! The destination sends the token once on the return path ([`TOKEN`] then
//! the 16 bytes), before any page request; the source keeps it and puts it
//! in every resume header (`Header::write_resume`). A destination whose
//! [`PostcopyTarget`](crate::migrate::PostcopyTarget) issued a token
//! refuses a resume header carrying any other
//! ([`ReceiveError::BadResumeToken`](crate::migrate::ReceiveError::BadResumeToken)).
//! The core makes no randomness: the host crate draws the token from the
//! kernel.

use super::format::read_array;
use super::io::{ByteRead, ByteWrite, ReadError};
use core::fmt;

/// The return-path message that carries a [`ResumeToken`] (followed by its
/// 16 bytes).
pub const TOKEN: [u8; 4] = *b"RBTK";

/// A destination's resume token. Its `Debug` output does not show the
/// bytes, so a log line cannot leak it.
#[derive(Copy, Clone, Default, PartialEq, Eq)]
pub struct ResumeToken(pub [u8; ResumeToken::LEN]);

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResumeToken(..)")
    }
}

impl ResumeToken {
    /// Bytes of a token.
    pub const LEN: usize = 16;

    /// Compares in time independent of where the tokens differ, so a peer
    /// cannot guess a token byte by byte from how fast it is refused.
    pub fn matches(&self, other: &ResumeToken) -> bool {
        let diff = self
            .0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        // black_box keeps the fold from being cut short.
        core::hint::black_box(diff) == 0
    }

    /// Writes the return-path message: [`TOKEN`] and the 16 bytes (not
    /// flushed).
    pub fn write_message<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; 4 + Self::LEN];
        b[..4].copy_from_slice(&TOKEN);
        b[4..].copy_from_slice(&self.0);
        w.write_all(&b)
    }

    /// Reads the 16 bytes of a token (after its message's [`TOKEN`] magic,
    /// or after a resume header).
    pub fn read<R: ByteRead>(r: &mut R) -> Result<ResumeToken, ReadError<R::Error>> {
        read_array(r).map(ResumeToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::format::ReturnMessage;
    use crate::stream::io::SliceReader;
    extern crate std;
    use std::format;
    use std::vec::Vec;

    #[test]
    fn token_message_round_trips_and_compares() {
        let token = ResumeToken(*b"0123456789abcdef");
        let mut wire = Vec::new();
        token.write_message(&mut wire).unwrap();
        assert_eq!(&wire[..4], b"RBTK");
        let mut r = SliceReader::new(&wire);
        // The return path's reader names no message for it; the token
        // follows.
        assert_eq!(ReturnMessage::read(&mut r).unwrap(), Err(TOKEN));
        let back = ResumeToken::read(&mut r).unwrap();
        assert!(back.matches(&token));
        assert!(!back.matches(&ResumeToken::default()));
        let mut other = token;
        other.0[15] ^= 1;
        assert!(!other.matches(&token));
        assert_eq!(format!("{token:?}"), "ResumeToken(..)");
        assert_eq!(
            ResumeToken::read(&mut SliceReader::new(&[1, 2])),
            Err(ReadError::Eof)
        );
    }
}
