//! The wire format, version 2 (documented in `docs/stream-format.md`).
//!
//! Everything is little-endian. A stream is a [`Header`], one [`TableEntry`]
//! per migrated block, then [`Record`]s until an `End` record. Pages travel in
//! `Pages` records of at most [`MAX_RUN_PAGES`] consecutive pages of one
//! block; pages that are all zero travel as a count in `Zero` records.

use super::io::{ByteRead, ByteWrite, ReadError};
use super::resume_token::ResumeToken;
use crate::addr::TARGET_PAGE_SHIFT;

/// First bytes of every stream.
pub const MAGIC: [u8; 8] = *b"RAMBLOCK";
/// The version this code writes and reads: 2 added the handover
/// ([`ReturnMessage::Handover`]) a source waits for, which a version-1
/// destination never sends, and device-state sections in the `Postcopy`
/// record instead of one opaque blob.
pub const VERSION: u16 = 2;
/// Most pages in one `Pages` or `Zero` record.
pub const MAX_RUN_PAGES: u32 = 64;
/// Most page channels a migration may announce in its [`Header`]
/// ([`Header::channels`]): a source refuses to open more, a destination
/// refuses a header that announces more. Each channel is a connection and
/// a thread on both sides; measured gains end well below this
/// (BENCHMARKS.md, "Page channels").
pub const MAX_PAGE_CHANNELS: u32 = 64;
/// The receiver's acknowledgement after a good `End` record.
pub const ACK_OK: [u8; 4] = *b"RBOK";
/// The receiver's refusal, followed by a u32 error code.
pub const ACK_ERR: [u8; 4] = *b"RBER";
/// A post-copy page request on the return path (see [`PageRequest`]).
pub const REQUEST: [u8; 4] = *b"RBRQ";
/// The receiver's refusal of a device-state section: u32 index of the
/// section in the stream (from 0), u32 the VMM's code.
pub const ACK_SECTION: [u8; 4] = *b"RBSR";
/// Pre-copy handover, after [`ACK_OK`]: the destination's vCPUs run
/// (followed by a u32 `0`).
pub const RUNNING: [u8; 4] = *b"RBRN";
/// Pre-copy handover, after [`ACK_OK`]: the destination could not start
/// the guest (followed by the VMM's u32 code).
pub const NOT_RUNNING: [u8; 4] = *b"RBNR";
/// First bytes of a stream that resumes a broken post-copy migration: the
/// header and block table follow as in a new stream, then the receiver
/// answers with its received map and the records continue.
pub const RESUME_MAGIC: [u8; 8] = *b"RBRESUME";
/// The version of a resume header: 2, the header followed by the
/// destination's [`ResumeToken`] (version 1 carried none, and a reader of
/// it would take the token for the block table; it refuses version 2).
pub const RESUME_VERSION: u16 = 2;
/// The default bound on all `Section` records of one stream together,
/// headers included (`MigrationHost::device_state_limit` on the source,
/// `Receiver::with_device_state` on the destination): a VMM's device state
/// is kilobytes to a few megabytes, and both sides must agree before the
/// bytes cross the paused guest's downtime.
pub const DEFAULT_DEVICE_STATE_LIMIT: u64 = 16 << 20;

/// Record tags.
pub mod tag {
    /// A run of normal pages.
    pub const PAGES: u8 = 1;
    /// A run of zero pages, as a count.
    pub const ZERO: u8 = 2;
    /// End of a pass.
    pub const SYNC: u8 = 3;
    /// A block's used length changed.
    pub const RESIZE: u8 = 4;
    /// End of the stream, with checksums.
    pub const END: u8 = 5;
    /// Post-copy: pages the destination must drop (they will come again).
    pub const DISCARD: u8 = 6;
    /// Post-copy starts: the guest runs on the destination from now on.
    pub const POSTCOPY: u8 = 7;
    /// Pre-copy switch-over: one named device-state section.
    pub const SECTION: u8 = 8;
    /// Multi-channel pre-copy: everything sent before it, on every
    /// channel, lands before anything sent after it.
    pub const BARRIER: u8 = 9;
}

/// The stream header.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// log2 of the target page size.
    pub page_shift: u8,
    /// Blocks in the table that follows.
    pub block_count: u32,
    /// Page channels that carry this stream's pre-copy pages beside it
    /// (byte 11; 0: none, the pages come on this stream). A destination
    /// accepts exactly this many channels
    /// ([`crate::migrate::channels`]). A resume header carries none: its
    /// byte 11 is written 0 and not read.
    pub channels: u8,
}

/// One block-table entry. The name is passed separately (borrowed).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// The block's used length in bytes.
    pub used_length: u64,
    /// The host page size of the block on the source.
    pub page_size: u64,
    /// The source block's flags (bits of `BlockFlags`).
    pub flags: u32,
}

/// A record header; `Pages` is followed by `count * 4096` bytes, `End` by
/// one u64 checksum per table entry.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// `count` normal pages of block `block` from page `first`.
    Pages {
        /// Index in the block table.
        block: u32,
        /// First target page.
        first: u64,
        /// Pages that follow.
        count: u32,
    },
    /// `count` zero pages of block `block` from page `first`.
    Zero {
        /// Index in the block table.
        block: u32,
        /// First target page.
        first: u64,
        /// Pages.
        count: u32,
    },
    /// Pass `pass` ended with `remaining` pages still dirty.
    Sync {
        /// Pass number.
        pass: u32,
        /// Dirty pages left on the source.
        remaining: u64,
    },
    /// Block `block` now uses `used_length` bytes.
    Resize {
        /// Index in the block table.
        block: u32,
        /// The new used length.
        used_length: u64,
    },
    /// The end: `count` checksums follow (one per table entry).
    End {
        /// Checksums that follow.
        count: u32,
    },
    /// Post-copy: pages `first .. first + count` of block `block` changed on
    /// the source since they were sent; the destination drops them, and
    /// they are sent again (on request or in the background).
    Discard {
        /// Index in the block table.
        block: u32,
        /// First target page.
        first: u64,
        /// Pages (any number within the block).
        count: u32,
    },
    /// Post-copy starts: the source guest is paused for good, `sections`
    /// device-state sections follow, each as in a [`Record::Section`] (an
    /// encoded [`SectionHeader`](crate::section::SectionHeader), then its
    /// bytes), and the destination runs the guest, asking for missing
    /// pages with [`PageRequest`]s on the return path.
    Postcopy {
        /// Device-state sections that follow.
        sections: u32,
    },
    /// Pre-copy switch-over, after the final pass and before `End`: an
    /// encoded [`SectionHeader`](crate::section::SectionHeader)
    /// ([`SectionHeader::ENCODED_LEN`](crate::section::SectionHeader::ENCODED_LEN)
    /// bytes) follows, then the section's `len` bytes of state. The header
    /// is payload rather than fields here so the record stays `Copy` and
    /// the section encoding stays the one snapshots use.
    Section,
    /// Multi-channel pre-copy (docs/stream-format.md, "Page channels"):
    /// written on the main stream and on each of the `channels` page
    /// channels. Every page record before barrier `generation`, on any
    /// channel, is applied before any record after it on any channel, so a
    /// page sent again in a later pass on another channel lands last.
    Barrier {
        /// Counts up from 0 in each stream.
        generation: u32,
        /// Page channels beside the main stream.
        channels: u32,
    },
}

/// The first bytes of a page channel's connection
/// (`crate::migrate::channels`): magic [`CHANNEL_MAGIC`], version
/// [`CHANNEL_VERSION`], this channel's index and the channel count; records
/// follow. The main stream starts as always, with its [`Header`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct ChannelHello {
    /// This channel, from 0.
    pub index: u32,
    /// Page channels of the migration.
    pub count: u32,
}

/// Magic bytes of a [`ChannelHello`].
pub const CHANNEL_MAGIC: [u8; 8] = *b"RBCHANNL";
/// Version of the page-channel format.
pub const CHANNEL_VERSION: u16 = 1;

impl ChannelHello {
    /// Bytes on the wire.
    pub const LEN: usize = 18;

    /// Writes the hello.
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; Self::LEN];
        b[..8].copy_from_slice(&CHANNEL_MAGIC);
        b[8..10].copy_from_slice(&CHANNEL_VERSION.to_le_bytes());
        b[10..14].copy_from_slice(&self.index.to_le_bytes());
        b[14..18].copy_from_slice(&self.count.to_le_bytes());
        w.write_all(&b)
    }

    /// Reads a hello: `Ok(Err(why))` for wrong magic or version, or an
    /// index not below the count.
    pub fn read<R: ByteRead>(
        r: &mut R,
    ) -> Result<Result<ChannelHello, &'static str>, ReadError<R::Error>> {
        let b: [u8; Self::LEN] = read_array(r)?;
        if b[..8] != CHANNEL_MAGIC {
            return Ok(Err("not a page channel (wrong magic)"));
        }
        if u16::from_le_bytes([b[8], b[9]]) != CHANNEL_VERSION {
            return Ok(Err("unsupported page channel version"));
        }
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        let hello = ChannelHello {
            index: word(10),
            count: word(14),
        };
        if hello.index >= hello.count {
            return Ok(Err("channel index not below the channel count"));
        }
        Ok(Ok(hello))
    }
}

/// A post-copy page request, destination to source: the guest needs pages
/// `first .. first + count` of block `block` (a table index). The source
/// sends them before anything else it has left.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct PageRequest {
    /// Index in the block table.
    pub block: u32,
    /// First target page.
    pub first: u64,
    /// Pages.
    pub count: u32,
}

/// A message on the return path (destination to source).
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReturnMessage {
    /// The guest faulted on missing pages.
    Request(PageRequest),
    /// The receive ended: `Ok` after verified checksums, or the refusal's
    /// error code.
    Ack(Result<(), u32>),
    /// The receive ended with the VMM's refusal of a device-state section
    /// (`ReceiveError::SectionRefused`): which one and the VMM's code.
    SectionRefused {
        /// The section's position in the stream, from 0.
        index: u32,
        /// The VMM's own code.
        code: u32,
    },
    /// Pre-copy handover, after a good [`ReturnMessage::Ack`]: `Ok` once
    /// the destination's vCPUs run, or the VMM's code when it could not
    /// start them.
    Handover(Result<(), u32>),
}

impl PageRequest {
    /// Bytes on the wire.
    pub const LEN: usize = 20;

    /// Writes the request (not flushed).
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; Self::LEN];
        b[..4].copy_from_slice(&REQUEST);
        b[4..8].copy_from_slice(&self.block.to_le_bytes());
        b[8..16].copy_from_slice(&self.first.to_le_bytes());
        b[16..20].copy_from_slice(&self.count.to_le_bytes());
        w.write_all(&b)
    }
}

impl ReturnMessage {
    /// Reads one message; `Ok(Err(bytes))` when its first four bytes name
    /// no message.
    pub fn read<R: ByteRead>(r: &mut R) -> Result<Result<Self, [u8; 4]>, ReadError<R::Error>> {
        let magic: [u8; 4] = read_array(r)?;
        Ok(Ok(match magic {
            REQUEST => ReturnMessage::Request(PageRequest {
                block: read_u32(r)?,
                first: read_u64(r)?,
                count: read_u32(r)?,
            }),
            // "OK" carries a zero code; with any other it names no message.
            ACK_OK => match read_u32(r)? {
                0 => ReturnMessage::Ack(Ok(())),
                _ => return Ok(Err(ACK_OK)),
            },
            ACK_ERR => ReturnMessage::Ack(Err(read_u32(r)?)),
            ACK_SECTION => ReturnMessage::SectionRefused {
                index: read_u32(r)?,
                code: read_u32(r)?,
            },
            // "Running" carries a zero code, like "OK"; "not running" the
            // VMM's (zero included: it is still no success).
            RUNNING => match read_u32(r)? {
                0 => ReturnMessage::Handover(Ok(())),
                _ => return Ok(Err(RUNNING)),
            },
            NOT_RUNNING => ReturnMessage::Handover(Err(read_u32(r)?)),
            other => return Ok(Err(other)),
        }))
    }
}

/// Reads exactly `N` bytes.
pub(crate) fn read_array<R: ByteRead, const N: usize>(
    r: &mut R,
) -> Result<[u8; N], ReadError<R::Error>> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

pub(crate) fn read_u32<R: ByteRead>(r: &mut R) -> Result<u32, ReadError<R::Error>> {
    read_array(r).map(u32::from_le_bytes)
}

pub(crate) fn read_u64<R: ByteRead>(r: &mut R) -> Result<u64, ReadError<R::Error>> {
    read_array(r).map(u64::from_le_bytes)
}

impl Header {
    /// The header for `block_count` blocks in this version, without page
    /// channels.
    pub fn new(block_count: u32) -> Header {
        Header {
            version: VERSION,
            page_shift: TARGET_PAGE_SHIFT as u8,
            block_count,
            channels: 0,
        }
    }

    /// This header, announcing `channels` page channels.
    pub fn with_channels(self, channels: u8) -> Header {
        Header { channels, ..self }
    }

    /// Writes the header.
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10] = self.page_shift;
        b[11] = self.channels;
        b[12..16].copy_from_slice(&self.block_count.to_le_bytes());
        w.write_all(&b)
    }

    /// Writes the header of a stream resuming a broken post-copy migration:
    /// [`RESUME_MAGIC`], version [`RESUME_VERSION`] (whatever
    /// `self.version` says), no page channels (whatever `self.channels`
    /// says: post-copy has none), then the destination's `token`.
    pub fn write_resume<W: ByteWrite>(
        &self,
        token: &ResumeToken,
        w: &mut W,
    ) -> Result<(), W::Error> {
        let mut b = [0u8; 16 + ResumeToken::LEN];
        b[..8].copy_from_slice(&RESUME_MAGIC);
        b[8..10].copy_from_slice(&RESUME_VERSION.to_le_bytes());
        b[10] = self.page_shift;
        b[12..16].copy_from_slice(&self.block_count.to_le_bytes());
        b[16..].copy_from_slice(&token.0);
        w.write_all(&b)
    }

    /// Reads a header; `Ok(None)` if the magic is wrong.
    pub fn read<R: ByteRead>(r: &mut R) -> Result<Option<Header>, ReadError<R::Error>> {
        Ok(Self::read_either(r)?.and_then(|(h, resume)| (!resume).then_some(h)))
    }

    /// Reads a new stream's or a resumed stream's header; the flag says
    /// which (`true`: resumed). `Ok(None)` if the magic is neither. A
    /// resume header's token is not read (see [`ResumeToken::read`]), nor
    /// its reserved byte 11 (`channels` is 0).
    pub fn read_either<R: ByteRead>(
        r: &mut R,
    ) -> Result<Option<(Header, bool)>, ReadError<R::Error>> {
        let b: [u8; 16] = read_array(r)?;
        let resume = match &b[..8] {
            m if m == MAGIC => false,
            m if m == RESUME_MAGIC => true,
            _ => return Ok(None),
        };
        Ok(Some((
            Header {
                version: u16::from_le_bytes([b[8], b[9]]),
                page_shift: b[10],
                block_count: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
                channels: if resume { 0 } else { b[11] },
            },
            resume,
        )))
    }
}

impl TableEntry {
    /// Writes `name` (1..=255 bytes) and the entry.
    pub fn write<W: ByteWrite>(&self, name: &str, w: &mut W) -> Result<(), W::Error> {
        w.write_all(&[name.len() as u8])?;
        w.write_all(name.as_bytes())?;
        let mut b = [0u8; 20];
        b[..8].copy_from_slice(&self.used_length.to_le_bytes());
        b[8..16].copy_from_slice(&self.page_size.to_le_bytes());
        b[16..20].copy_from_slice(&self.flags.to_le_bytes());
        w.write_all(&b)
    }

    /// Reads the name into `name` (returning its length) and the entry.
    pub fn read<R: ByteRead>(
        r: &mut R,
        name: &mut [u8; 255],
    ) -> Result<(usize, TableEntry), ReadError<R::Error>> {
        let [len] = read_array(r)?;
        let len = usize::from(len);
        r.read_exact(&mut name[..len])?;
        let used_length = read_u64(r)?;
        let page_size = read_u64(r)?;
        let flags = read_u32(r)?;
        Ok((
            len,
            TableEntry {
                used_length,
                page_size,
                flags,
            },
        ))
    }
}

impl Record {
    /// The longest record header on the wire ([`Record::wire_len`]).
    pub const MAX_LEN: usize = 17;

    /// Bytes of this record's header on the wire (its payload not
    /// included): the one table of record lengths, which the writer and
    /// the sender's byte counts both use.
    pub const fn wire_len(&self) -> usize {
        match self {
            Record::Pages { .. } | Record::Zero { .. } | Record::Discard { .. } => 17,
            Record::Sync { .. } | Record::Resize { .. } => 13,
            Record::Barrier { .. } => 9,
            Record::End { .. } | Record::Postcopy { .. } => 5,
            Record::Section => 1,
        }
    }

    /// Writes the record header.
    pub fn write<W: ByteWrite>(&self, w: &mut W) -> Result<(), W::Error> {
        let mut b = [0u8; Self::MAX_LEN];
        match *self {
            Record::Pages {
                block,
                first,
                count,
            }
            | Record::Zero {
                block,
                first,
                count,
            } => {
                b[0] = if matches!(self, Record::Pages { .. }) {
                    tag::PAGES
                } else {
                    tag::ZERO
                };
                b[1..5].copy_from_slice(&block.to_le_bytes());
                b[5..13].copy_from_slice(&first.to_le_bytes());
                b[13..17].copy_from_slice(&count.to_le_bytes());
            }
            Record::Sync { pass, remaining } => {
                b[0] = tag::SYNC;
                b[1..5].copy_from_slice(&pass.to_le_bytes());
                b[5..13].copy_from_slice(&remaining.to_le_bytes());
            }
            Record::Resize { block, used_length } => {
                b[0] = tag::RESIZE;
                b[1..5].copy_from_slice(&block.to_le_bytes());
                b[5..13].copy_from_slice(&used_length.to_le_bytes());
            }
            Record::End { count } => {
                b[0] = tag::END;
                b[1..5].copy_from_slice(&count.to_le_bytes());
            }
            Record::Discard {
                block,
                first,
                count,
            } => {
                b[0] = tag::DISCARD;
                b[1..5].copy_from_slice(&block.to_le_bytes());
                b[5..13].copy_from_slice(&first.to_le_bytes());
                b[13..17].copy_from_slice(&count.to_le_bytes());
            }
            Record::Postcopy { sections } => {
                b[0] = tag::POSTCOPY;
                b[1..5].copy_from_slice(&sections.to_le_bytes());
            }
            Record::Section => b[0] = tag::SECTION,
            Record::Barrier {
                generation,
                channels,
            } => {
                b[0] = tag::BARRIER;
                b[1..5].copy_from_slice(&generation.to_le_bytes());
                b[5..9].copy_from_slice(&channels.to_le_bytes());
            }
        }
        w.write_all(&b[..self.wire_len()])
    }

    /// Reads a record header; `Ok(Err(tag))` for an unknown tag.
    pub fn read<R: ByteRead>(r: &mut R) -> Result<Result<Record, u8>, ReadError<R::Error>> {
        let [t] = read_array(r)?;
        Self::read_after_tag(t, r)
    }

    /// Reads the rest of a record header whose tag `t` was read already
    /// (a reader that must tell a stream ending between two records from
    /// one ending inside a record reads the tag on its own).
    pub fn read_after_tag<R: ByteRead>(
        t: u8,
        r: &mut R,
    ) -> Result<Result<Record, u8>, ReadError<R::Error>> {
        Ok(Ok(match t {
            tag::PAGES | tag::ZERO => {
                let (block, first, count) = (read_u32(r)?, read_u64(r)?, read_u32(r)?);
                if t == tag::PAGES {
                    Record::Pages {
                        block,
                        first,
                        count,
                    }
                } else {
                    Record::Zero {
                        block,
                        first,
                        count,
                    }
                }
            }
            tag::SYNC => Record::Sync {
                pass: read_u32(r)?,
                remaining: read_u64(r)?,
            },
            tag::RESIZE => Record::Resize {
                block: read_u32(r)?,
                used_length: read_u64(r)?,
            },
            tag::END => Record::End {
                count: read_u32(r)?,
            },
            tag::DISCARD => Record::Discard {
                block: read_u32(r)?,
                first: read_u64(r)?,
                count: read_u32(r)?,
            },
            tag::POSTCOPY => Record::Postcopy {
                sections: read_u32(r)?,
            },
            tag::SECTION => Record::Section,
            tag::BARRIER => Record::Barrier {
                generation: read_u32(r)?,
                channels: read_u32(r)?,
            },
            other => return Ok(Err(other)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::io::SliceReader;
    use super::*;
    extern crate std;
    use std::vec::Vec;

    #[test]
    fn records_round_trip() {
        let records = [
            Record::Pages {
                block: 1,
                first: u64::MAX,
                count: 64,
            },
            Record::Zero {
                block: 0,
                first: 5,
                count: 1,
            },
            Record::Sync {
                pass: 7,
                remaining: 99,
            },
            Record::Resize {
                block: 3,
                used_length: 1 << 30,
            },
            Record::End { count: 2 },
            Record::Discard {
                block: 0,
                first: 9,
                count: 1 << 20,
            },
            Record::Postcopy { sections: 300 },
            Record::Section,
            Record::Barrier {
                generation: 4,
                channels: 3,
            },
        ];
        let mut out = Vec::new();
        Header::new(3).write(&mut out).unwrap();
        TableEntry {
            used_length: 4096,
            page_size: 4096,
            flags: 5,
        }
        .write("pc.ram", &mut out)
        .unwrap();
        for r in &records {
            // The length table agrees with what the writer puts out.
            let mut one = Vec::new();
            r.write(&mut one).unwrap();
            assert_eq!(one.len(), r.wire_len());
            assert!(r.wire_len() <= Record::MAX_LEN);
            out.extend_from_slice(&one);
        }
        let mut r = SliceReader::new(&out);
        assert_eq!(Header::read(&mut r).unwrap(), Some(Header::new(3)));
        let mut name = [0u8; 255];
        let (len, e) = TableEntry::read(&mut r, &mut name).unwrap();
        assert_eq!(
            (&name[..len], e),
            (
                &b"pc.ram"[..],
                TableEntry {
                    used_length: 4096,
                    page_size: 4096,
                    flags: 5
                }
            )
        );
        for want in records {
            assert_eq!(Record::read(&mut r).unwrap(), Ok(want));
        }
        assert_eq!(Record::read(&mut SliceReader::new(&[10])).unwrap(), Err(10));
        let mut back = Vec::new();
        let req = PageRequest {
            block: 2,
            first: 77,
            count: 512,
        };
        req.write(&mut back).unwrap();
        back.extend_from_slice(b"RBER\x05\0\0\0RBOK\0\0\0\0RBSR\x02\0\0\0\x07\0\0\0");
        back.extend_from_slice(b"RBRN\0\0\0\0RBNR\x09\0\0\0RBRN\x01\0\0\0");
        back.extend_from_slice(b"RBOK\x01\0\0\0XXXX");
        let mut r = SliceReader::new(&back);
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::Request(req))
        );
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::Ack(Err(5)))
        );
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::Ack(Ok(())))
        );
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::SectionRefused { index: 2, code: 7 })
        );
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::Handover(Ok(())))
        );
        assert_eq!(
            ReturnMessage::read(&mut r).unwrap(),
            Ok(ReturnMessage::Handover(Err(9)))
        );
        // "Running" with a code is no success either.
        assert_eq!(ReturnMessage::read(&mut r).unwrap(), Err(*b"RBRN"));
        // "OK" with a code is no success.
        assert_eq!(ReturnMessage::read(&mut r).unwrap(), Err(*b"RBOK"));
        assert_eq!(ReturnMessage::read(&mut r).unwrap(), Err(*b"XXXX"));
        let mut resumed = Vec::new();
        let token = ResumeToken(*b"sixteen bytes ok");
        Header::new(1).write_resume(&token, &mut resumed).unwrap();
        assert_eq!(resumed.len(), 32);
        let mut r = SliceReader::new(&resumed);
        assert_eq!(
            Header::read_either(&mut r).unwrap(),
            Some((
                Header {
                    version: RESUME_VERSION,
                    ..Header::new(1)
                },
                true
            ))
        );
        assert_eq!(ResumeToken::read(&mut r).unwrap(), token);
        assert_eq!(Header::read(&mut SliceReader::new(&resumed)).unwrap(), None);
        assert_eq!(
            Record::read(&mut SliceReader::new(&[1, 0])),
            Err(ReadError::Eof)
        );
    }

    #[test]
    fn the_header_announces_page_channels_in_byte_11() {
        let mut plain = Vec::new();
        Header::new(2).write(&mut plain).unwrap();
        let mut announced = Vec::new();
        let header = Header::new(2).with_channels(4);
        header.write(&mut announced).unwrap();
        // Without channels the header is the one sent before byte 11 had a
        // meaning; with them only byte 11 differs.
        assert_eq!(plain[11], 0);
        assert_eq!(announced[11], 4);
        assert_eq!(
            (&plain[..11], &plain[12..]),
            (&announced[..11], &announced[12..])
        );
        let read = Header::read(&mut SliceReader::new(&announced)).unwrap();
        assert_eq!(read, Some(header));
        // A resume header carries none, whatever it was given, and its
        // byte 11 is not read.
        let mut resumed = Vec::new();
        header
            .write_resume(&ResumeToken::default(), &mut resumed)
            .unwrap();
        assert_eq!(resumed[11], 0);
        resumed[11] = 9;
        let (read, resume) = Header::read_either(&mut SliceReader::new(&resumed))
            .unwrap()
            .unwrap();
        assert!(resume);
        assert_eq!(read.channels, 0);
    }
}
