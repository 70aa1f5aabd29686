//! The resume token on the host: drawn from the kernel on the
//! destination, picked off the return path on the source.

use ramblock_core::stream::format::ReturnMessage;
use ramblock_core::stream::io::{ByteRead, ReadError};
use ramblock_core::stream::resume_token::{ResumeToken, TOKEN};
use std::io;

/// 128 bits from `getrandom(2)` (the kernel's CSPRNG; it blocks only until
/// the pool is first seeded at boot).
pub fn issue_token() -> io::Result<ResumeToken> {
    let mut token = ResumeToken::default();
    let mut filled = 0;
    while filled < token.0.len() {
        let rest = &mut token.0[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(token)
}

/// The first message on the return path after the switch to post-copy.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum FirstReturn {
    /// The destination's resume token (what a ramblock destination sends
    /// first).
    Token(ResumeToken),
    /// Another message: a destination that issued no token.
    Message(ReturnMessage),
    /// Four bytes that name no message.
    Unknown([u8; 4]),
}

/// Reads the first message of the return path after the switch.
pub fn read_first_return<R: ByteRead>(r: &mut R) -> Result<FirstReturn, ReadError<R::Error>> {
    Ok(match ReturnMessage::read(r)? {
        Ok(m) => FirstReturn::Message(m),
        Err(TOKEN) => FirstReturn::Token(ResumeToken::read(r)?),
        Err(other) => FirstReturn::Unknown(other),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ramblock_core::stream::format::PageRequest;
    use ramblock_core::stream::io::SliceReader;

    #[test]
    fn tokens_differ_and_the_first_return_message_is_told_apart() {
        let (a, b) = (issue_token().unwrap(), issue_token().unwrap());
        assert!(!a.matches(&b), "two draws of 128 bits collided");
        let mut wire = Vec::new();
        a.write_message(&mut wire).unwrap();
        let request = PageRequest {
            block: 0,
            first: 1,
            count: 1,
        };
        request.write(&mut wire).unwrap();
        wire.extend_from_slice(b"XXXX");
        let mut r = SliceReader::new(&wire);
        assert_eq!(read_first_return(&mut r).unwrap(), FirstReturn::Token(a));
        assert_eq!(
            read_first_return(&mut r).unwrap(),
            FirstReturn::Message(ReturnMessage::Request(request))
        );
        assert_eq!(
            read_first_return(&mut r).unwrap(),
            FirstReturn::Unknown(*b"XXXX")
        );
    }
}
