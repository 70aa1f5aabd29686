//! Page channels: pre-copy pages spread over several connections beside
//! the main stream, each with its own thread on both sides.
//!
//! One sending thread that checks every page for zeros, hashes it for the
//! ledger and hands it to the kernel is CPU-bound well below what a link
//! carries. With page channels the engine only walks the dirty bitmap and
//! hands runs ([`PageChannels::send`]) to channel threads, which do the
//! per-page work and write `Pages` and `Zero` records on their own
//! connections; the main stream keeps everything else (header, table,
//! `Sync`, `Resize`, sections, `End`, and all of post-copy, so a faulting
//! vCPU never waits behind bulk pages). The main stream's header announces
//! how many channels follow ([`Header::channels`](crate::stream::format::Header::channels)),
//! so the destination accepts exactly that many, and its receiver refuses
//! a header announcing another count than its gate's.
//!
//! Ordering: within one pass a page is sent once, so channels need no
//! order among themselves; between passes the engine sends a
//! [`Record::Barrier`] on every channel and on the main stream
//! ([`PageChannels::barrier`]), and the destination applies nothing after
//! a barrier on any channel until every channel and the main stream reached
//! it ([`ChannelGate::meet`]). A page sent again in a later pass, on
//! another channel, therefore lands last. Barriers also come before a
//! `Resize`, before the switch to post-copy, and after the final pass.
//! docs/stream-format.md ("Page channels") has the wire format.
//!
//! This module holds the two traits the host implements (threads and
//! sockets are the host's: `ramblock-linux`'s `channels` module), the run
//! writer both the engine and channel threads use, and the receiving loop
//! of one channel ([`receive_channel`]).

use crate::addr::{ByteLen, TARGET_PAGE_SIZE};
use crate::bitmap::Storage;
use crate::checksum::PageLedger;
use crate::host::HostMemory;
use crate::list::RamList;
use crate::name::BlockName;
use crate::region::{HostRegion, RegionError};
use crate::stream::format::{Record, MAX_RUN_PAGES};
use crate::stream::io::{ByteRead, ByteWrite, ReadError};
use core::fmt;

use super::receiver::{
    check_inside, check_run_length, pass_barrier, read_in_place, store_precopy_run, ReceiveError,
};

const PAGE: usize = TARGET_PAGE_SIZE as usize;

/// What a run of pages cost on the wire.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct RunCounts {
    /// Bytes written: record headers and page data.
    pub bytes: u64,
    /// Pages sent with their data.
    pub pages: u64,
    /// Pages sent as zero runs (a header each run).
    pub zero_pages: u64,
}

impl RunCounts {
    /// Adds `other` to these counts.
    pub fn add(&mut self, other: RunCounts) {
        self.bytes += other.bytes;
        self.pages += other.pages;
        self.zero_pages += other.zero_pages;
    }
}

/// Writes the pages of `run` (pages `first..` of table block `block`) to
/// `out`: zero pages as `Zero` counts, the rest as `Pages` records whose
/// data goes out in place ([`ByteWrite::write_region`]), each recorded in
/// `ledger` first. Records hold at most [`MAX_RUN_PAGES`] pages. A page the
/// guest changes meanwhile may go out torn; pre-copy sends it again (see
/// the engine's `send_run`).
pub fn write_run<W: ByteWrite>(
    out: &mut W,
    mut ledger: Option<&mut dyn PageLedger>,
    block: u32,
    first: u64,
    run: &HostRegion<'_>,
) -> Result<RunCounts, RunError<W::Error>> {
    let count = run.len() / PAGE;
    let is_zero = |i: usize| run.is_zero(ByteLen::from_pages(i as u64), PAGE) == Ok(true);
    let mut counts = RunCounts::default();
    let mut i = 0;
    while i < count {
        let zero = is_zero(i);
        let mut j = i + 1;
        while j < count && j - i < MAX_RUN_PAGES as usize && is_zero(j) == zero {
            j += 1;
        }
        let (at, n) = (first + i as u64, (j - i) as u32);
        // In range: i < j <= count.
        let pages = run
            .subregion(ByteLen::from_pages(i as u64), (j - i) * PAGE)
            .map_err(RunError::OutsideBlock)?;
        if let Some(ledger) = ledger.as_deref_mut() {
            if zero {
                ledger.record_zero(block as usize, at, u64::from(n));
            } else {
                ledger.record_region(block as usize, at, &pages);
            }
        }
        let record = if zero {
            Record::Zero {
                block,
                first: at,
                count: n,
            }
        } else {
            Record::Pages {
                block,
                first: at,
                count: n,
            }
        };
        record.write(out).map_err(RunError::Write)?;
        counts.bytes += record.wire_len() as u64;
        if zero {
            counts.zero_pages += u64::from(n);
        } else {
            out.write_region(&pages).map_err(RunError::Write)?;
            counts.bytes += u64::from(n) * PAGE as u64;
            counts.pages += u64::from(n);
        }
        i = j;
    }
    Ok(counts)
}

/// Why [`write_run`] stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunError<W> {
    /// The transport failed.
    Write(W),
    /// A piece of the run lay outside its region (a bug, refused).
    OutsideBlock(RegionError),
}

/// With page channels, the main stream would carry nothing for a whole
/// pass, and a destination that reads it with a timeout (a source that
/// says nothing for that long is gone) would take a long pass, say 16 GiB
/// over 1 Gbit/s, for a dead source. So a run goes on the main stream
/// instead of the channels at least this often: within one pass a page
/// is sent once, on whichever connection, so this changes no ordering.
pub const MAIN_STREAM_RUN_INTERVAL_NS: u64 = 250_000_000;

/// The sending side's page channels (implemented by the host, which owns
/// the threads and connections). Every method is called from the engine's
/// thread.
pub trait PageChannels {
    /// How many page channels there are (written in every barrier).
    fn count(&self) -> u32;
    /// Hands pages `first..first + count` of table block `block`, named
    /// `name`, to a channel, which reads them when it sends them (so a
    /// write after the engine cleared their dirty bits is logged again and
    /// sent in a later pass). May block while the channels are busy.
    fn send(
        &mut self,
        block: u32,
        name: &BlockName,
        first: u64,
        count: u32,
    ) -> Result<(), ChannelFailure>;
    /// Every channel finishes what it was handed, writes
    /// `Record::Barrier { generation, channels: self.count() }` and pushes
    /// its bytes out. Returns what the channels sent since the last
    /// barrier.
    fn barrier(&mut self, generation: u32) -> Result<RunCounts, ChannelFailure>;
    /// Bytes handed to the channels that the destination has not taken
    /// yet: runs still queued and what sits in the channels' socket send
    /// queues. The pause waits for them as for the main stream's
    /// ([`MigrationHost::unsent_bytes`](super::MigrationHost::unsent_bytes)),
    /// so the estimate of the pause counts both. The default, 0, suits
    /// channels that hold nothing back.
    fn unsent_bytes(&self) -> u64 {
        0
    }
    /// No page goes on the channels any more (the final pass was sent, or
    /// post-copy starts), right after a barrier every channel sent: close
    /// them, so the destination's channel receivers end at that barrier
    /// instead of waiting, idle, through what follows (the end and its
    /// verification, or post-copy), which can take longer than their read
    /// timeout. The default does nothing.
    fn close(&mut self) {}
}

/// A page channel failed; the migration fails with it and the guest keeps
/// running on the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelFailure {
    /// The channel, from 0.
    pub channel: u32,
    /// What failed.
    pub what: ChannelFailureKind,
}

/// What made a page channel fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelFailureKind {
    /// Its connection failed (the OS error number, 0 if none).
    Io(i32),
    /// The peer took none of its bytes for the connection's whole write
    /// timeout: the destination stopped reading.
    Stalled,
    /// A block it was to send (its table index) was removed from the list.
    BlockRemoved(u32),
    /// A run lay outside its block's memory (a bug, refused).
    OutsideBlock,
    /// Its thread is gone (it failed before, or was stopped).
    Gone,
}

impl fmt::Display for ChannelFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "page channel {}: ", self.channel)?;
        match &self.what {
            ChannelFailureKind::Io(0) => f.write_str("its connection failed"),
            ChannelFailureKind::Io(errno) => write!(f, "its connection failed (errno {errno})"),
            ChannelFailureKind::Stalled => f.write_str(
                "the destination took none of its bytes for the whole write timeout (it stopped reading)",
            ),
            ChannelFailureKind::BlockRemoved(index) => {
                write!(f, "block {index} of the table was removed while being sent")
            }
            ChannelFailureKind::OutsideBlock => f.write_str("a run lay outside its block"),
            ChannelFailureKind::Gone => f.write_str("its thread stopped"),
        }
    }
}

/// The receiving side's meeting point of the main stream and the page
/// channels (implemented by the host with its own locks; one per
/// migration).
pub trait ChannelGate: Sync {
    /// How many page channels this destination accepted.
    fn channels(&self) -> u32;
    /// The main stream read its block table: block `i` is `names[i]`.
    /// Called once, before the main stream's first barrier.
    fn publish_table(&self, names: &[BlockName]);
    /// The published table; a channel waits here until there is one.
    fn table(&self) -> Result<&[BlockName], GateClosed>;
    /// Returns once the main stream and every channel reached barrier
    /// `generation` (each calls this once per barrier).
    fn meet(&self, generation: u32) -> Result<(), GateClosed>;
    /// A party failed or left: every waiting and later [`meet`](Self::meet)
    /// and [`table`](Self::table) fails, so nobody waits for it forever.
    fn close(&self);
}

/// The gate was closed: a channel or the main stream failed or left.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct GateClosed;

impl fmt::Display for GateClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("another page channel or the main stream failed or closed")
    }
}

/// What one page channel received.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ChannelSummary {
    /// Pages with data.
    pub pages: u64,
    /// Zero pages.
    pub zero_pages: u64,
    /// Barriers passed.
    pub barriers: u32,
}

/// Receives one page channel into `list` until its source closes it at a
/// record boundary: `Pages` and `Zero` records checked against the table
/// the main stream published (index, run length, the block's used length)
/// and written like the main stream's, and `Barrier`s, at which it waits
/// for the others ([`ChannelGate::meet`]). Anything else on a channel, a
/// barrier out of order or naming another channel count, a run outside its
/// block, or a torn record is a [`ReceiveError`]; the caller then closes
/// the gate. `bounce` (one run at least: [`MAX_RUN_PAGES`] pages) stages a
/// payload the transport does not hold whole yet. `fresh`: as
/// `Receiver::with_fresh_destination`.
pub fn receive_channel<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
    list: &RamList<'_, M, S, N>,
    r: &mut R,
    gate: &dyn ChannelGate,
    mut ledger: Option<&mut dyn PageLedger>,
    fresh: bool,
    bounce: &mut [u8],
) -> Result<ChannelSummary, ReceiveError<R::Error, M::Error>> {
    let mut summary = ChannelSummary::default();
    let names = gate.table().map_err(|_| ReceiveError::ChannelFailed)?;
    loop {
        let mut tag = [0u8; 1];
        match r.read_exact(&mut tag) {
            Ok(()) => {}
            // The source closes a channel after the last barrier; what
            // came before is checked by the main stream's `End`.
            Err(ReadError::Eof) => return Ok(summary),
            Err(e) => return Err(e.into()),
        }
        let record = Record::read_after_tag(tag[0], r)?.map_err(ReceiveError::UnknownRecord)?;
        let (block, first, count, is_pages) = match record {
            Record::Pages {
                block,
                first,
                count,
            } => (block, first, count, true),
            Record::Zero {
                block,
                first,
                count,
            } => (block, first, count, false),
            Record::Barrier {
                generation,
                channels,
            } => {
                pass_barrier(Some(gate), generation, channels, &mut summary.barriers)?;
                continue;
            }
            _ => {
                return Err(ReceiveError::OutOfPlace {
                    record: super::receiver::record_name(&record),
                    why: "only pages, zero pages and barriers travel on a page channel",
                })
            }
        };
        // Checked in the main stream's order: index, length, bounds.
        let name = names
            .get(block as usize)
            .ok_or(ReceiveError::BadBlockIndex(block))?;
        check_run_length(count)?;
        let view = list.read();
        let dest = view
            .by_name(name.as_str())
            .ok_or_else(|| ReceiveError::UnknownBlock(name.clone()))?;
        check_inside(name, dest.used_pages() as u64, first, count)?;
        let data = if is_pages {
            let in_place = ledger.as_mut().map(|l| &mut **l as &mut dyn PageLedger);
            if read_in_place(r, dest, block, first, count, in_place)? {
                summary.pages += u64::from(count);
                continue;
            }
            let staged = bounce
                .get_mut(..count as usize * PAGE)
                .ok_or(ReceiveError::BadRunLength(count))?;
            r.read_exact(staged)?;
            Some(&*staged)
        } else {
            None
        };
        let ledger = ledger.as_mut().map(|l| &mut **l as &mut dyn PageLedger);
        store_precopy_run(dest, name, block, first, count, data, fresh, ledger)?;
        if is_pages {
            summary.pages += u64::from(count);
        } else {
            summary.zero_pages += u64::from(count);
        }
    }
}
