//! Local live update: hand guest RAM to a new VMM process on the same host
//! without copying a page.
//!
//! The old process sends its block table over a UNIX stream socket, and
//! with it each block's file descriptor (`SCM_RIGHTS`): a memfd, a hugetlb
//! memfd or a shared file. The new process maps the same files `MAP_SHARED`
//! ([`ReceivedBlock::map`]), so both see the same pages; then only device
//! state moves ([`send_state`], [`receive_state`], the core's named
//! sections) and, for a VMM that keeps logging across the update, the
//! blocks' dirty bitmaps ([`send_dirty`], [`receive_dirty`]). Private anonymous memory has no fd another process could map
//! and is refused ([`LocalUpdateError::NotShareable`]).
//!
//! What does *not* travel: KVM's VM and vCPU fds. KVM binds a VM to the
//! address space (`mm`) of the process that created it; every VM or vCPU
//! ioctl from another process fails with `EIO` (`KVM_RUN`, `KVM_GET_REGS`,
//! `KVM_SET_USER_MEMORY_REGION` alike; measured on this host, see
//! docs/local-update.md). The new process builds its own VM and memslots
//! over the received memory.
//!
//! # Wire format
//! Every message is a 24-byte frame header, little-endian: the magic
//! `RBLOCAL1`, a type byte, a zero byte, the version (1, `u16`), a count
//! (`u32`) and the body's length (`u64`), then the body:
//!
//! | type | count | body | fds |
//! |---|---|---|---|
//! | 1 table | blocks (at most [`MAX_BLOCKS`]) | one entry per block | one per block, in order, with the frame's first byte |
//! | 2 state | sections | per section: its encoded `SectionHeader`, then its bytes | none |
//! | 3 ready | 0 | none | none |
//! | 4 running | 0 | none | none |
//! | 5 refused | a code | a UTF-8 reason (at most [`MAX_REASON`] bytes) | none |
//! | 6 dirty | entries | per block and client: its dirty bitmap's words ([`send_dirty`]) | none |
//!
//! A table entry: name length (`u8`, 1..=255), the name (UTF-8), backing
//! kind (`u8`: 1 memfd, 2 hugetlb memfd, 3 file, 4 file on hugetlbfs), page
//! size as a shift (`u8`), block flags (`u32`), RAM offset, used length,
//! max length and offset in the file (`u64` each).
//!
//! Nothing read is trusted: lengths are bounded before anything is
//! allocated, the number of fds must equal the number of blocks, and every
//! breach is its own [`LocalUpdateError`]; fds of a refused message are
//! closed.
#![allow(unsafe_code)]

use crate::memory::{BackingKind, LinuxMemory};
use crate::MemoryBuilder;
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::section::{SectionError, SectionHeader};
use rustix::fd::{BorrowedFd, OwnedFd};
use rustix::io::Errno;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;

mod dirty;
pub use dirty::{receive_dirty, send_dirty, DirtyBitmapError, DirtyMerged, MAX_DIRTY_ENTRIES};

/// The frame magic.
pub const MAGIC: [u8; 8] = *b"RBLOCAL1";
/// The wire format's version.
pub const VERSION: u16 = 1;
/// Blocks a table may hold (a VM has a handful; `SCM_MAX_FD` is 253).
pub const MAX_BLOCKS: usize = 64;
/// Bytes of a refusal's reason, at most.
pub const MAX_REASON: usize = 1024;
/// Sections a state message may hold.
pub const MAX_SECTIONS: u32 = 1024;
/// Bytes of a frame header.
pub const FRAME_LEN: usize = 24;
/// Fixed bytes of a table entry besides its name.
const ENTRY_FIXED: usize = 1 + 1 + 1 + 4 + 4 * 8;
/// Bytes of a table's body, at most.
pub const MAX_TABLE_BYTES: usize = MAX_BLOCKS * (ENTRY_FIXED + 255);

const TABLE: u8 = 1;
const STATE: u8 = 2;
const READY: u8 = 3;
const RUNNING: u8 = 4;
const REFUSED: u8 = 5;

/// What went wrong in a local update.
#[derive(Debug, thiserror::Error)]
pub enum LocalUpdateError {
    /// A block whose memory no other process can map.
    #[error("block {block:?} is {backing} memory, which another process cannot map: back guest RAM with a memfd (`--backing memfd`, or hugetlb memfd) or a shared file")]
    NotShareable {
        /// The block.
        block: String,
        /// What backs it.
        backing: &'static str,
    },
    /// More blocks than a table may hold.
    #[error("{count} blocks; a local update moves at most {MAX_BLOCKS}")]
    TooManyBlocks {
        /// Blocks asked for (or claimed by the peer).
        count: u64,
    },
    /// The socket failed.
    #[error("{what}: {errno}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// What the kernel said.
        errno: Errno,
    },
    /// Nothing arrived within the socket's read timeout.
    #[error("{what}: the peer sent nothing within the timeout")]
    TimedOut {
        /// What was awaited.
        what: &'static str,
    },
    /// The peer closed the socket before a whole message.
    #[error("{what}: the peer closed the connection after {got} of {expected} bytes")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes read.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Not a local-update frame.
    #[error("not a ramblock local-update message (magic {0:02x?}); is the peer a ramblock --local source?")]
    BadMagic([u8; 8]),
    /// A version this side does not speak.
    #[error("local-update version {0}; this side speaks {VERSION}")]
    BadVersion(u16),
    /// A frame of another type than expected.
    #[error("expected a {expected} message, got type {got}")]
    UnexpectedMessage {
        /// What was expected.
        expected: &'static str,
        /// The type byte received.
        got: u8,
    },
    /// A body longer than allowed.
    #[error("{what} of {len} bytes; at most {max} are allowed")]
    TooLong {
        /// Which body.
        what: &'static str,
        /// Its claimed length.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// More fds arrived than the receiver has room for (the kernel
    /// truncated the control message and closed the rest).
    #[error("the peer sent more file descriptors than a table may hold ({MAX_BLOCKS})")]
    TooManyFds,
    /// The number of fds does not match the table.
    #[error("the table lists {blocks} blocks but {fds} file descriptors came with it")]
    FdCount {
        /// Blocks in the table.
        blocks: usize,
        /// Fds received.
        fds: usize,
    },
    /// A malformed table entry.
    #[error("block table entry {index}: {why}")]
    BadEntry {
        /// Which entry.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A malformed device-state section.
    #[error("device-state section {index}: {error}")]
    BadSection {
        /// Which section.
        index: u32,
        /// What is wrong.
        error: SectionError,
    },
    /// A malformed dirty-bitmap entry.
    #[error("dirty-bitmap entry {index}: {error}")]
    BadDirty {
        /// Which entry.
        index: u32,
        /// What is wrong.
        error: DirtyBitmapError,
    },
    /// Bytes left over after the last entry or section.
    #[error("{what}: {extra} bytes after the last item")]
    TrailingBytes {
        /// Which body.
        what: &'static str,
        /// How many.
        extra: usize,
    },
    /// The peer refused (the destination could not load the state, say).
    #[error("the peer refused with code {code}: {reason}")]
    Refused {
        /// Its code.
        code: u32,
        /// Its reason.
        reason: String,
    },
    /// Mapping a received block failed.
    #[error("mapping block {block:?}: {error}")]
    Map {
        /// The block.
        block: String,
        /// Why.
        error: crate::Error,
    },
}

/// One block as the table describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedBlock {
    /// The block's name (1..=255 bytes of UTF-8).
    pub name: String,
    /// Its offset in the RAM address space.
    pub ram_offset: u64,
    /// Its used length.
    pub used: ByteLen,
    /// Its max length.
    pub max: ByteLen,
    /// Its page size.
    pub page_size: PageSize,
    /// What backs it: [`BackingKind::Memfd`] or [`BackingKind::File`].
    pub kind: BackingKind,
    /// Where the memory starts in the file.
    pub fd_offset: u64,
    /// The block's flags.
    pub flags: BlockFlags,
}

impl SharedBlock {
    /// Describes a block for the table: an error for memory another process
    /// cannot map (anonymous, private, caller memory, guest_memfd).
    pub fn describe(
        name: &str,
        ram_offset: u64,
        flags: BlockFlags,
        memory: &LinuxMemory,
    ) -> Result<SharedBlock, LocalUpdateError> {
        let shareable = matches!(
            memory.kind(),
            BackingKind::Memfd(_) | BackingKind::File { .. }
        ) && memory.is_shared()
            && memory.fd().is_some();
        if !shareable {
            let backing = match memory.kind() {
                BackingKind::File { .. } | BackingKind::Memfd(_) => "privately mapped",
                k => k.name(),
            };
            return Err(LocalUpdateError::NotShareable {
                block: name.to_string(),
                backing,
            });
        }
        Ok(SharedBlock {
            name: name.to_string(),
            ram_offset,
            used: memory.used_len(),
            max: memory.reserved_len(),
            page_size: memory.page_size(),
            kind: memory.kind(),
            fd_offset: memory.fd_offset(),
            flags,
        })
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let name = self.name.as_bytes();
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.push(match self.kind {
            BackingKind::Memfd(None) => 1,
            BackingKind::Memfd(Some(_)) => 2,
            BackingKind::File { hugetlbfs: false } => 3,
            _ => 4,
        });
        out.push(self.page_size.bytes().trailing_zeros() as u8);
        out.extend_from_slice(&self.flags.bits().to_le_bytes());
        for v in [self.ram_offset, self.used.0, self.max.0, self.fd_offset] {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// Decodes one entry from the front of `body`, returning it and the
    /// bytes it took.
    fn decode(index: usize, body: &[u8]) -> Result<(SharedBlock, usize), LocalUpdateError> {
        let bad = |why: String| LocalUpdateError::BadEntry { index, why };
        let Some(&name_len) = body.first() else {
            return Err(bad("missing".into()));
        };
        let name_len = usize::from(name_len);
        if name_len == 0 {
            return Err(bad("empty block name".into()));
        }
        let len = 1 + name_len + ENTRY_FIXED - 1;
        let Some(entry) = body.get(..len) else {
            return Err(bad(format!(
                "{} bytes left, the entry needs {len}",
                body.len()
            )));
        };
        let name = std::str::from_utf8(&entry[1..1 + name_len])
            .map_err(|e| bad(format!("block name is not UTF-8: {e}")))?;
        if name.contains('\0') {
            return Err(bad("block name holds a NUL".into()));
        }
        let rest = &entry[1 + name_len..];
        let page_shift = u32::from(rest[1]);
        let page_size = 1u64
            .checked_shl(page_shift)
            .and_then(|b| PageSize::new(b).ok())
            .ok_or_else(|| bad(format!("page size 2^{page_shift} is not a page size")))?;
        let kind = match rest[0] {
            1 => BackingKind::Memfd(None),
            2 => BackingKind::Memfd(Some(page_size)),
            3 => BackingKind::File { hugetlbfs: false },
            4 => BackingKind::File { hugetlbfs: true },
            k => return Err(bad(format!("unknown backing kind {k}"))),
        };
        let flags_bits = u32::from_le_bytes([rest[2], rest[3], rest[4], rest[5]]);
        let flags = BlockFlags::from_bits(flags_bits)
            .ok_or_else(|| bad(format!("unknown block flags {flags_bits:#x}")))?;
        let word = |i: usize| {
            let at = 6 + 8 * i;
            u64::from_le_bytes(rest[at..at + 8].try_into().unwrap_or([0; 8]))
        };
        let (ram_offset, used, max, fd_offset) = (word(0), word(1), word(2), word(3));
        if used == 0 || used > max {
            return Err(bad(format!(
                "used length {used:#x} must be non-zero and at most the max length {max:#x}"
            )));
        }
        for (what, v) in [
            ("used length", used),
            ("max length", max),
            ("file offset", fd_offset),
        ] {
            if !ByteLen(v).is_multiple_of(page_size) {
                return Err(bad(format!(
                    "{what} {v:#x} is not a multiple of {page_size}"
                )));
            }
        }
        if fd_offset.checked_add(max).is_none() || usize::try_from(max).is_err() {
            return Err(bad(format!(
                "file offset {fd_offset:#x} + max length {max:#x} overflows"
            )));
        }
        Ok((
            SharedBlock {
                name: name.to_string(),
                ram_offset,
                used: ByteLen(used),
                max: ByteLen(max),
                page_size,
                kind,
                fd_offset,
                flags,
            },
            len,
        ))
    }
}

/// A block received from the old process: its table entry and its fd.
#[derive(Debug)]
pub struct ReceivedBlock {
    /// What the sender said about it.
    pub block: SharedBlock,
    /// The memfd or file.
    pub fd: OwnedFd,
}

impl ReceivedBlock {
    /// Maps the block's memory `MAP_SHARED` as a [`LinuxMemory`] of the
    /// same kind, length and page size; `populate` also faults its pages
    /// into this process's page tables now (`MADV_POPULATE_WRITE`, which
    /// only maps pages the file already holds, so it writes nothing), so
    /// the guest's first touches here cost no host fault.
    pub fn map(self, populate: bool) -> Result<LinuxMemory, LocalUpdateError> {
        let b = &self.block;
        let mut builder = MemoryBuilder::shared_fd(self.fd, b.kind, b.used)
            .max_length(b.max)
            .offset(b.fd_offset)
            .name(&b.name);
        if populate {
            builder = builder.prealloc(crate::Prealloc::default());
        }
        let memory = builder.build().map_err(|error| LocalUpdateError::Map {
            block: b.name.clone(),
            error,
        })?;
        if memory.page_size() != b.page_size {
            return Err(LocalUpdateError::Map {
                block: b.name.clone(),
                error: crate::Error::SharedFdKind {
                    claimed: b.kind,
                    page_size: memory.page_size(),
                    hugetlbfs: memory.hugetlb_page_size().is_some(),
                },
            });
        }
        Ok(memory)
    }
}

fn io(what: &'static str) -> impl Fn(Errno) -> LocalUpdateError {
    move |errno| match errno {
        Errno::AGAIN => LocalUpdateError::TimedOut { what },
        errno => LocalUpdateError::Io { what, errno },
    }
}

fn frame(kind: u8, count: u32, body_len: usize) -> [u8; FRAME_LEN] {
    let mut f = [0u8; FRAME_LEN];
    f[..8].copy_from_slice(&MAGIC);
    f[8] = kind;
    f[10..12].copy_from_slice(&VERSION.to_le_bytes());
    f[12..16].copy_from_slice(&count.to_le_bytes());
    f[16..24].copy_from_slice(&(body_len as u64).to_le_bytes());
    f
}

/// Sends `head` and `body`, with `fds` attached to the first byte.
fn send_all(
    sock: &UnixStream,
    head: &[u8],
    body: &[u8],
    fds: &[BorrowedFd<'_>],
    what: &'static str,
) -> Result<(), LocalUpdateError> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_BLOCKS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(LocalUpdateError::TooManyBlocks {
            count: fds.len() as u64,
        });
    }
    let whole = [head, body].concat();
    let mut at = 0;
    while at < whole.len() {
        let n = if at == 0 {
            rustix::net::sendmsg(
                sock,
                &[IoSlice::new(&whole)],
                &mut control,
                SendFlags::NOSIGNAL,
            )
        } else {
            rustix::net::send(sock, &whole[at..], SendFlags::NOSIGNAL)
        };
        match n {
            Ok(n) => at += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(io(what)(e)),
        }
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes, collecting fds that come with them
/// into `fds` (at most [`MAX_BLOCKS`]).
fn recv_exact(
    sock: &UnixStream,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
    what: &'static str,
) -> Result<(), LocalUpdateError> {
    let mut at = 0;
    while at < buf.len() {
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_BLOCKS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = rustix::net::recvmsg(
            sock,
            &mut [IoSliceMut::new(&mut buf[at..])],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        );
        let msg = match got {
            Ok(m) => m,
            Err(Errno::INTR) => continue,
            Err(e) => return Err(io(what)(e)),
        };
        for message in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = message {
                fds.extend(received);
            }
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) || fds.len() > MAX_BLOCKS {
            return Err(LocalUpdateError::TooManyFds);
        }
        if msg.bytes == 0 {
            return Err(LocalUpdateError::Truncated {
                what,
                got: at,
                expected: buf.len(),
            });
        }
        at += msg.bytes;
    }
    Ok(())
}

/// Reads a frame header: its type, count and body length.
fn read_frame(
    sock: &UnixStream,
    fds: &mut Vec<OwnedFd>,
    what: &'static str,
) -> Result<(u8, u32, u64), LocalUpdateError> {
    let mut f = [0u8; FRAME_LEN];
    recv_exact(sock, &mut f, fds, what)?;
    let magic: [u8; 8] = f[..8].try_into().unwrap_or_default();
    if magic != MAGIC {
        return Err(LocalUpdateError::BadMagic(magic));
    }
    let version = u16::from_le_bytes([f[10], f[11]]);
    if version != VERSION {
        return Err(LocalUpdateError::BadVersion(version));
    }
    let count = u32::from_le_bytes(f[12..16].try_into().unwrap_or_default());
    let len = u64::from_le_bytes(f[16..24].try_into().unwrap_or_default());
    Ok((f[8], count, len))
}

/// Sends the block table for `blocks` (each with the memory it describes)
/// with one fd per block. Returns the bytes of the table.
pub fn send_table(
    sock: &UnixStream,
    blocks: &[(SharedBlock, &LinuxMemory)],
) -> Result<usize, LocalUpdateError> {
    if blocks.len() > MAX_BLOCKS {
        return Err(LocalUpdateError::TooManyBlocks {
            count: blocks.len() as u64,
        });
    }
    let mut body = Vec::new();
    let mut fds = Vec::with_capacity(blocks.len());
    for (block, memory) in blocks {
        let fd = memory.fd().ok_or_else(|| LocalUpdateError::NotShareable {
            block: block.name.clone(),
            backing: memory.kind().name(),
        })?;
        block.encode(&mut body);
        fds.push(fd);
    }
    let head = frame(TABLE, blocks.len() as u32, body.len());
    send_all(sock, &head, &body, &fds, "sending the block table")?;
    Ok(FRAME_LEN + body.len())
}

/// Receives a block table and its fds. The caller sets the socket's read
/// timeout.
pub fn receive_table(sock: &UnixStream) -> Result<Vec<ReceivedBlock>, LocalUpdateError> {
    let what = "receiving the block table";
    let mut fds = Vec::new();
    let (kind, count, len) = read_frame(sock, &mut fds, what)?;
    if kind != TABLE {
        return Err(LocalUpdateError::UnexpectedMessage {
            expected: "block table",
            got: kind,
        });
    }
    if count as usize > MAX_BLOCKS {
        return Err(LocalUpdateError::TooManyBlocks {
            count: u64::from(count),
        });
    }
    let max = (count as usize * (ENTRY_FIXED + 255)) as u64;
    if len > max {
        return Err(LocalUpdateError::TooLong {
            what: "block table",
            len,
            max,
        });
    }
    let mut body = vec![0u8; len as usize];
    recv_exact(sock, &mut body, &mut fds, what)?;
    if fds.len() != count as usize {
        return Err(LocalUpdateError::FdCount {
            blocks: count as usize,
            fds: fds.len(),
        });
    }
    let mut blocks = Vec::with_capacity(fds.len());
    let mut at = 0;
    for (index, fd) in fds.into_iter().enumerate() {
        let (block, used) = SharedBlock::decode(index, &body[at..])?;
        at += used;
        if blocks
            .iter()
            .any(|b: &ReceivedBlock| b.block.name == block.name)
        {
            return Err(LocalUpdateError::BadEntry {
                index,
                why: format!("block {:?} is listed twice", block.name),
            });
        }
        blocks.push(ReceivedBlock { block, fd });
    }
    if at != body.len() {
        return Err(LocalUpdateError::TrailingBytes {
            what: "block table",
            extra: body.len() - at,
        });
    }
    Ok(blocks)
}

/// Sends device-state sections (the core's [`SectionHeader`]s, each
/// followed by its bytes; a header's `len` is set from its bytes).
pub fn send_state(
    sock: &UnixStream,
    sections: &[(SectionHeader, &[u8])],
) -> Result<(), LocalUpdateError> {
    let mut body = Vec::new();
    for (header, bytes) in sections {
        let mut h = header.clone();
        h.len = bytes.len() as u64;
        let mut encoded = [0u8; SectionHeader::ENCODED_LEN];
        h.encode(&mut encoded);
        body.extend_from_slice(&encoded);
        body.extend_from_slice(bytes);
    }
    let head = frame(STATE, sections.len() as u32, body.len());
    send_all(sock, &head, &body, &[], "sending device state")
}

/// Receives device-state sections, at most `limit` bytes of state in all.
pub fn receive_state(
    sock: &UnixStream,
    limit: u64,
) -> Result<Vec<(SectionHeader, Vec<u8>)>, LocalUpdateError> {
    let what = "receiving device state";
    let mut fds = Vec::new();
    let (kind, count, len) = read_frame(sock, &mut fds, what)?;
    expect_no_fds(&fds)?;
    if kind == REFUSED {
        return Err(read_refusal(sock, count, len)?);
    }
    if kind != STATE {
        return Err(LocalUpdateError::UnexpectedMessage {
            expected: "device state",
            got: kind,
        });
    }
    if count > MAX_SECTIONS {
        return Err(LocalUpdateError::TooLong {
            what: "device-state section count",
            len: u64::from(count),
            max: u64::from(MAX_SECTIONS),
        });
    }
    let max = limit.saturating_add(u64::from(count) * SectionHeader::ENCODED_LEN as u64);
    if len > max {
        return Err(LocalUpdateError::TooLong {
            what: "device state",
            len,
            max,
        });
    }
    let mut body = vec![0u8; len as usize];
    recv_exact(sock, &mut body, &mut fds, what)?;
    expect_no_fds(&fds)?;
    let mut sections = Vec::new();
    let mut at = 0;
    for index in 0..count {
        let header = SectionHeader::decode(&body[at..])
            .map_err(|error| LocalUpdateError::BadSection { index, error })?;
        at += SectionHeader::ENCODED_LEN;
        let end = usize::try_from(header.len)
            .ok()
            .and_then(|n| at.checked_add(n))
            .filter(|&end| end <= body.len())
            .ok_or(LocalUpdateError::BadSection {
                index,
                error: SectionError::Truncated {
                    len: body.len() - at,
                },
            })?;
        sections.push((header, body[at..end].to_vec()));
        at = end;
    }
    if at != body.len() {
        return Err(LocalUpdateError::TrailingBytes {
            what: "device state",
            extra: body.len() - at,
        });
    }
    Ok(sections)
}

fn expect_no_fds(fds: &[OwnedFd]) -> Result<(), LocalUpdateError> {
    if fds.is_empty() {
        Ok(())
    } else {
        Err(LocalUpdateError::FdCount {
            blocks: 0,
            fds: fds.len(),
        })
    }
}

fn read_refusal(
    sock: &UnixStream,
    code: u32,
    len: u64,
) -> Result<LocalUpdateError, LocalUpdateError> {
    if len > MAX_REASON as u64 {
        return Err(LocalUpdateError::TooLong {
            what: "refusal reason",
            len,
            max: MAX_REASON as u64,
        });
    }
    let mut reason = vec![0u8; len as usize];
    let mut fds = Vec::new();
    recv_exact(sock, &mut reason, &mut fds, "receiving a refusal")?;
    Ok(LocalUpdateError::Refused {
        code,
        reason: String::from_utf8_lossy(&reason).into_owned(),
    })
}

/// A short answer between the two sides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// The destination mapped the memory and is ready for the switch-over.
    Ready,
    /// The destination's guest runs.
    Running,
    /// The peer refused, with a code and a reason (cut to
    /// [`MAX_REASON`] bytes).
    Refused(u32, String),
}

/// Sends `reply`.
pub fn send_reply(sock: &UnixStream, reply: &Reply) -> Result<(), LocalUpdateError> {
    let (kind, count, body) = match reply {
        Reply::Ready => (READY, 0, &[][..]),
        Reply::Running => (RUNNING, 0, &[][..]),
        Reply::Refused(code, reason) => {
            let mut end = reason.len().min(MAX_REASON);
            while !reason.is_char_boundary(end) {
                end -= 1;
            }
            (REFUSED, *code, &reason.as_bytes()[..end])
        }
    };
    send_all(
        sock,
        &frame(kind, count, body.len()),
        body,
        &[],
        "sending a reply",
    )
}

/// Receives `expected` ([`Reply::Ready`] or [`Reply::Running`]); a
/// refusal is [`LocalUpdateError::Refused`].
pub fn receive_reply(sock: &UnixStream, expected: &Reply) -> Result<(), LocalUpdateError> {
    let what = "waiting for the peer's answer";
    let mut fds = Vec::new();
    let (kind, count, len) = read_frame(sock, &mut fds, what)?;
    expect_no_fds(&fds)?;
    if kind == REFUSED {
        return Err(read_refusal(sock, count, len)?);
    }
    let want = match expected {
        Reply::Ready => READY,
        Reply::Running => RUNNING,
        Reply::Refused(..) => REFUSED,
    };
    if kind != want || len != 0 {
        return Err(LocalUpdateError::UnexpectedMessage {
            expected: match expected {
                Reply::Ready => "ready",
                _ => "running",
            },
            got: kind,
        });
    }
    Ok(())
}

/// The table entries of every block in `view`, each with its memory, for
/// [`send_table`]: an error naming the first block another process
/// cannot map.
pub fn describe_list<'v, S: ramblock_core::bitmap::Storage, const N: usize>(
    view: &'v ramblock_core::list::RamListView<'_, '_, LinuxMemory, S, N>,
) -> Result<Vec<(SharedBlock, &'v LinuxMemory)>, LocalUpdateError> {
    view.iter()
        .map(|b| {
            SharedBlock::describe(b.name(), b.offset().0, b.flags(), b.memory())
                .map(|s| (s, b.memory()))
        })
        .collect()
}
