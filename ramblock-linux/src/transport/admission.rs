//! Whether an accepted peer is the source: its first bytes must be the
//! header the listener waits for, within the handshake timeout.

use super::conn::Conn;
use super::error::Refusal;
use ramblock_core::addr::TARGET_PAGE_SHIFT;
use ramblock_core::stream::format::{
    ChannelHello, Header, MAX_PAGE_CHANNELS, RESUME_VERSION, VERSION,
};
use ramblock_core::stream::io::SliceReader;
use ramblock_core::stream::resume_token::ResumeToken;
use std::io::{self, Read};
use std::time::{Duration, Instant};

/// What the listener waits for.
#[derive(Clone, Debug)]
pub(crate) enum Expect<'a> {
    /// A new migration: a stream header.
    Migration,
    /// The source of a broken post-copy: a resume header with `token`
    /// (when one was issued), over a TLS session authenticated as
    /// `identity` (when the migration ran over TLS).
    Resume {
        token: Option<&'a ResumeToken>,
        identity: Option<&'a [u8]>,
    },
    /// One of `count` page channels: a [`ChannelHello`].
    Channel { count: u32 },
}

/// Fills `buf` from `conn` before `deadline`.
fn read_before(
    conn: &mut Conn,
    buf: &mut [u8],
    deadline: Instant,
    timeout: Duration,
    already: usize,
) -> Result<(), Refusal> {
    let wanted = already + buf.len();
    let mut got = 0;
    while got < buf.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let silent = Refusal::Silent {
            got: already + got,
            wanted,
            timeout,
        };
        if left.is_zero() {
            return Err(silent);
        }
        conn.set_read_timeout(Some(left)).map_err(Refusal::Io)?;
        match conn.read(&mut buf[got..]) {
            Ok(0) if already + got == 0 => return Err(Refusal::ClosedAtOnce),
            Ok(0) => {
                return Err(Refusal::ClosedEarly {
                    got: already + got,
                    wanted,
                })
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(silent)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof && already + got == 0 => {
                return Err(Refusal::ClosedAtOnce)
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return Err(Refusal::ClosedEarly {
                    got: already + got,
                    wanted,
                })
            }
            Err(e) => return Err(Refusal::Io(e)),
        }
    }
    Ok(())
}

/// Reads and checks the peer's header (and a resume's token); on success
/// the bytes are put back for the receiver, and the page channels the
/// header announced are noted on `conn` ([`Conn::page_channels`]).
pub(crate) fn admit(
    conn: &mut Conn,
    expect: &Expect<'_>,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), Refusal> {
    if let Expect::Resume {
        identity: Some(id), ..
    } = expect
    {
        if conn.peer_certificate() != Some(*id) {
            return Err(Refusal::WrongIdentity);
        }
    }
    if let Expect::Channel { count } = expect {
        let mut hello = [0u8; ChannelHello::LEN];
        read_before(conn, &mut hello, deadline, timeout, 0)?;
        return match ChannelHello::read(&mut SliceReader::new(&hello)) {
            Ok(Ok(h)) if h.count == *count => {
                conn.unread(&hello);
                Ok(())
            }
            Ok(Ok(_)) => Err(Refusal::BadChannel(
                "names another channel count than this destination expects",
            )),
            Ok(Err(why)) => Err(Refusal::BadChannel(why)),
            Err(_) => Err(Refusal::BadChannel("truncated")),
        };
    }
    let mut head = [0u8; 16 + ResumeToken::LEN];
    read_before(conn, &mut head[..16], deadline, timeout, 0)?;
    let parsed = Header::read_either(&mut SliceReader::new(&head[..16]));
    let Ok(Some((header, resumed))) = parsed else {
        let mut found = [0u8; 8];
        found.copy_from_slice(&head[..8]);
        return Err(Refusal::Garbage { found });
    };
    let name = |resume: bool| if resume { "resume" } else { "stream" };
    let wants_resume = matches!(expect, Expect::Resume { .. });
    if resumed != wants_resume {
        return Err(Refusal::WrongHeader {
            found: name(resumed),
            wanted: name(wants_resume),
        });
    }
    let version = if resumed { RESUME_VERSION } else { VERSION };
    if header.version != version || u32::from(header.page_shift) != TARGET_PAGE_SHIFT {
        return Err(Refusal::Unsupported {
            version: header.version,
            page_shift: header.page_shift,
        });
    }
    if u32::from(header.channels) > MAX_PAGE_CHANNELS {
        return Err(Refusal::TooManyChannels {
            announced: header.channels.into(),
            max: MAX_PAGE_CHANNELS,
        });
    }
    let mut len = 16;
    if let Expect::Resume { token, .. } = expect {
        read_before(conn, &mut head[16..], deadline, timeout, 16)?;
        len = head.len();
        let mut carried = ResumeToken::default();
        carried.0.copy_from_slice(&head[16..]);
        if token.is_some_and(|t| !t.matches(&carried)) {
            return Err(Refusal::BadToken);
        }
    }
    conn.unread(&head[..len]);
    conn.set_page_channels(header.channels.into());
    Ok(())
}
