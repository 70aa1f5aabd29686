//! The receiving side: trusts nothing.
//!
//! Every record is checked against the block it names before a byte of guest
//! memory is written; a `Pages` record's payload is read completely into a
//! bounce buffer first, or straight into guest memory when the transport
//! already holds all of it, so a truncated or refused record writes nothing. On
//! any error the pages of the records accepted before it stay written and
//! nothing else is touched; calling [`Receiver::receive`] again starts a new
//! receive from a fresh stream.
//!
//! [`Receiver`] reads the header and block table, then hands each record to
//! its own handler (a private `Session`'s `on_pages`, `on_zero`, `on_sync`,
//! `on_resize`, `on_discard`, `on_postcopy` and `on_end`). Every failure is
//! a [`ReceiveError`] ([`error`]); once post-copy starts, pages are placed
//! through a [`PostcopyTarget`] ([`placement`]).

pub mod error;
pub mod handover;
pub mod placement;
mod resume;
pub mod sections;

pub use error::{ReceiveError, POSTCOPY_UNSUPPORTED_CODE};
pub use handover::{acknowledge, send_ack, Handover};
pub use placement::PostcopyTarget;
pub use sections::SectionSink;

use super::channels::ChannelGate;
use crate::addr::{ByteLen, TARGET_PAGE_SHIFT, TARGET_PAGE_SIZE};
use crate::bitmap::Storage;
use crate::block::RamBlock;
use crate::checksum::{Checksum, PageLedger};
use crate::flags::BlockFlags;
use crate::host::HostMemory;
use crate::list::{RamList, ResizeError};
use crate::name::BlockName;
use crate::region::{HostRegion, RegionError};
use crate::stream::format::{
    read_u64, Header, Record, TableEntry, DEFAULT_DEVICE_STATE_LIMIT, MAX_RUN_PAGES,
    RESUME_VERSION, VERSION,
};
use crate::stream::io::{ByteRead, ReadError};
use crate::stream::resume_token::ResumeToken;
use core::fmt;
use placement::Assembly;
use resume::ResumeTable;

/// What a completed receive did.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Normal pages written.
    pub pages: u64,
    /// Zero pages received.
    pub zero_pages: u64,
    /// Pages dropped at the switch to post-copy.
    pub discarded: u64,
    /// Pages placed after the guest started here (post-copy).
    pub postcopy_pages: u64,
    /// Sync markers seen (passes).
    pub passes: u32,
    /// Blocks verified by checksum.
    pub blocks: u32,
    /// The guest started here at the `Postcopy` record: no handover
    /// follows the acknowledgement ([`acknowledge`]).
    pub postcopy: bool,
}

/// Progress the receiver reports while it runs.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum ReceiveEvent {
    /// The source finished pass `pass` with `remaining` pages dirty.
    Sync {
        /// Pass number.
        pass: u32,
        /// Pages still dirty on the source.
        remaining: u64,
    },
    /// The last data arrived; checksums are being verified.
    Verifying,
    /// Post-copy started: the guest runs here now.
    PostcopyStarted,
    /// A resumed stream's table matched and the received map went back.
    Resumed,
}

/// A table slot: the block's name and its used length in pages, with the
/// entry as the source sent it and the block's RAM address here (what a
/// resumed stream's table must repeat).
struct Slot {
    name: BlockName,
    used_pages: u64,
    entry: TableEntry,
    addr: u64,
}

/// How a block's checksum is computed: [`Checksum::of_region`], or a
/// parallel computation of the same value.
pub type ChecksumFn = fn(&HostRegion<'_>, u64) -> Result<u64, RegionError>;

/// Receives migration streams into a destination's blocks.
#[derive(Debug)]
pub struct Receiver<'b> {
    bounce: &'b mut [u8],
    checksum: ChecksumFn,
    ledger: Option<&'b mut dyn PageLedger>,
    fresh: bool,
    assembly: Assembly<'b>,
    /// Post-copy has started: the guest runs here, pages are placed.
    postcopy: bool,
    /// The block table of the stream post-copy started in: a resumed
    /// stream must send the same one.
    original: ResumeTable,
    /// Counters of the receive in progress (kept across a resume).
    summary: ReceiveSummary,
    /// Where device-state sections go ([`Receiver::with_device_state`]).
    sections: Option<&'b mut dyn SectionSink>,
    /// Bound on the stream's sections, headers included.
    state_limit: u64,
    /// Section bytes (headers included) of the receive in progress; not
    /// zero once a section arrived, after which only sections and `End`
    /// may follow.
    state_bytes: u64,
    /// Sections of the receive in progress so far (the next one's index).
    state_sections: u32,
    /// Where the main stream meets the page channels
    /// ([`Receiver::with_channels`]).
    gate: Option<&'b dyn ChannelGate>,
    /// Barriers the stream in progress passed (the next one's generation).
    barriers: u32,
}

impl fmt::Debug for dyn ChannelGate + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChannelGate({} channels)", self.channels())
    }
}

impl fmt::Debug for dyn SectionSink + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SectionSink")
    }
}

impl fmt::Debug for dyn PageLedger + '_ {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PageLedger")
    }
}

/// The bounce buffer is smaller than one maximal record.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub struct BounceTooSmall {
    /// Bytes needed.
    pub needed: usize,
}

impl fmt::Display for BounceTooSmall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the receive buffer must hold at least {} bytes",
            self.needed
        )
    }
}

impl core::error::Error for BounceTooSmall {}

/// Bytes of the largest `Pages` payload.
pub const BOUNCE_BYTES: usize = MAX_RUN_PAGES as usize * TARGET_PAGE_SIZE as usize;

type Result2<T, R, M> = Result<T, ReceiveError<<R as ByteRead>::Error, <M as HostMemory>::Error>>;

impl<'b> Receiver<'b> {
    /// A receiver staging each record in `bounce` (at least [`BOUNCE_BYTES`]).
    pub fn new(bounce: &'b mut [u8]) -> Result<Self, BounceTooSmall> {
        if bounce.len() < BOUNCE_BYTES {
            return Err(BounceTooSmall {
                needed: BOUNCE_BYTES,
            });
        }
        Ok(Receiver {
            bounce,
            checksum: Checksum::of_region,
            ledger: None,
            fresh: false,
            assembly: Assembly::default(),
            postcopy: false,
            original: ResumeTable::default(),
            summary: ReceiveSummary::default(),
            sections: None,
            state_limit: DEFAULT_DEVICE_STATE_LIMIT,
            state_bytes: 0,
            state_sections: 0,
            gate: None,
            barriers: 0,
        })
    }

    /// Gives post-copy a buffer to assemble hugepages in: a hugepage is
    /// placed whole, once all of its target pages arrived. It must hold the
    /// largest host page of any block received in post-copy.
    pub fn with_hugepage_buffer(mut self, buffer: &'b mut [u8]) -> Self {
        self.assembly = Assembly::new(buffer);
        self
    }

    /// Whether post-copy has started (the guest runs here): a receive that
    /// failed on its transport then waits to be resumed with
    /// [`Receiver::receive_postcopy`] on a new connection.
    pub fn in_postcopy(&self) -> bool {
        self.postcopy
    }

    /// Says the destination's blocks held only zeros before anything was
    /// received into them (freshly allocated memory, received maps empty).
    /// A zero page then needs no look at memory unless the block's received
    /// map says something was written there: on a preallocated destination
    /// that saves reading the whole RAM during the first pass.
    pub fn with_fresh_destination(mut self) -> Self {
        self.fresh = true;
        self
    }

    /// Records every page written in `ledger` and verifies the end
    /// checksums from it: nothing is read back from memory while the source
    /// guest is paused. Each new stream empties it first (a resumed one
    /// keeps it), since it is indexed by table position.
    pub fn with_ledger(mut self, ledger: &'b mut dyn PageLedger) -> Self {
        self.ledger = Some(ledger);
        self
    }

    /// Hands the device-state sections a pre-copy source sends at its
    /// switch-over to `sink`, accepting at most `limit` bytes of them per
    /// stream, headers included ([`DEFAULT_DEVICE_STATE_LIMIT`] is the
    /// source's default). Without a sink a stream with sections is refused
    /// ([`ReceiveError::SectionsUnsupported`]).
    pub fn with_device_state(mut self, sink: &'b mut dyn SectionSink, limit: u64) -> Self {
        self.sections = Some(sink);
        self.state_limit = limit;
        self
    }

    /// Receives pre-copy pages on page channels beside this stream
    /// ([`crate::migrate::channels`]): the host runs
    /// [`receive_channel`](crate::migrate::channels::receive_channel) on
    /// each, this receiver publishes the block table to `gate` and meets
    /// the channels there at every `Barrier`. A ledger given with
    /// [`Receiver::with_ledger`] must be the one the channels record in (a
    /// shared [`Ledger`](crate::checksum::Ledger)). A new stream's header
    /// must announce as many channels as the gate has
    /// ([`Header::channels`]), and one without a gate none; otherwise, and
    /// for a barrier naming another count, it is refused
    /// ([`ReceiveError::ChannelCountMismatch`]).
    pub fn with_channels(mut self, gate: &'b dyn ChannelGate) -> Self {
        self.gate = Some(gate);
        self
    }

    /// Verifies end checksums with `checksum`, which must compute the same
    /// value as [`Checksum::of_region`] (say, over chunks in parallel).
    pub fn with_checksum(mut self, checksum: ChecksumFn) -> Self {
        self.checksum = checksum;
        self
    }

    /// Receives one whole stream from `r` into the blocks of `list`,
    /// reporting progress to `events`, and verifies the end checksums. A
    /// source that switches to post-copy is refused
    /// ([`ReceiveError::PostcopyUnsupported`]); see
    /// [`Receiver::receive_postcopy`].
    pub fn receive<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        &mut self,
        list: &RamList<'_, M, S, N>,
        r: &mut R,
        events: impl FnMut(ReceiveEvent),
    ) -> Result2<ReceiveSummary, R, M> {
        self.receive_into(list, r, None, events)
    }

    /// Like [`Receiver::receive`], for a destination that can take over the
    /// guest in post-copy: `target` registers the blocks, starts the guest
    /// and places pages. After a transport error during post-copy
    /// ([`Receiver::in_postcopy`]), call this again with the next
    /// connection: it must carry a resumed stream, and the receive goes on
    /// where it stopped.
    pub fn receive_postcopy<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        &mut self,
        list: &RamList<'_, M, S, N>,
        r: &mut R,
        target: &mut dyn PostcopyTarget<Error = M::Error>,
        events: impl FnMut(ReceiveEvent),
    ) -> Result2<ReceiveSummary, R, M> {
        self.receive_into(list, r, Some(target), events)
    }

    fn receive_into<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        &mut self,
        list: &RamList<'_, M, S, N>,
        r: &mut R,
        mut target: Option<&mut dyn PostcopyTarget<Error = M::Error>>,
        mut events: impl FnMut(ReceiveEvent),
    ) -> Result2<ReceiveSummary, R, M> {
        let token = target.as_deref().and_then(|t| t.resume_token());
        let waiting = self.postcopy.then_some(&self.original);
        let channels = self.gate.map_or(0, |g| g.channels());
        let (table, resumed) = Self::read_table(list, r, token, waiting, channels)?;
        if let Some(ledger) = self.ledger.as_deref_mut() {
            if !resumed {
                // The ledger is indexed by table position: what an earlier
                // stream recorded may belong to another block in this
                // stream's table, and would vouch for pages this stream
                // never sent. A new stream starts from an empty ledger
                // (its first pass records every page anyway).
                for index in 0..N {
                    ledger.truncate(index, 0);
                }
            }
            for (index, slot) in table.iter().enumerate() {
                ledger.reserve(index, slot.used_pages);
            }
        }
        // read_table let a resumed stream through only to a post-copy
        // waiting for one, and a new stream only when none waits.
        if resumed {
            // A hugepage half assembled when the connection broke was
            // not placed, so the received map asks for all of it again.
            self.assembly.abandon();
            if let Some(t) = target.as_deref_mut() {
                t.resumed().map_err(ReceiveError::Host)?;
            }
            events(ReceiveEvent::Resumed);
        } else {
            self.summary = ReceiveSummary::default();
            self.state_bytes = 0;
            self.state_sections = 0;
            self.barriers = 0;
            if let Some(gate) = self.gate {
                let names: heapless::Vec<BlockName, N> =
                    table.iter().map(|s| s.name.clone()).collect();
                gate.publish_table(&names);
            }
            self.original
                .remember(table.iter().map(|s| (s.addr, s.entry)));
        }
        let mut session = Session {
            rx: self,
            list,
            r,
            // Shortens the target's object lifetime to the session's.
            target: target.map(|t| t as &mut dyn PostcopyTarget<Error = M::Error>),
            table,
            events,
        };
        // Set by a `Discard`: only discards and the `Postcopy` record may
        // follow, as the source sends them at the switch.
        let mut discarding = false;
        loop {
            let record = Record::read(&mut *session.r)?.map_err(ReceiveError::UnknownRecord)?;
            if !session.rx.postcopy
                && session.rx.state_bytes > 0
                && !matches!(record, Record::Section | Record::End { .. })
            {
                return Err(ReceiveError::OutOfPlace {
                    record: "RAM or post-copy",
                    why: "only device-state sections and End may follow a section",
                });
            }
            let is_switch = matches!(record, Record::Discard { .. } | Record::Postcopy { .. });
            if discarding && !is_switch {
                return Err(ReceiveError::OutOfPlace {
                    record: record_name(&record),
                    why: "only discards and the post-copy record may follow a discard",
                });
            }
            discarding = matches!(record, Record::Discard { .. });
            match record {
                Record::Pages {
                    block,
                    first,
                    count,
                } => session.on_pages(block, first, count)?,
                Record::Zero {
                    block,
                    first,
                    count,
                } => session.on_zero(block, first, count)?,
                Record::Sync { pass, remaining } => session.on_sync(pass, remaining),
                Record::Resize { block, used_length } => session.on_resize(block, used_length)?,
                Record::Discard {
                    block,
                    first,
                    count,
                } => session.on_discard(block, first, count)?,
                Record::Postcopy { sections } => session.on_postcopy(sections)?,
                Record::Section => session.on_section()?,
                Record::Barrier {
                    generation,
                    channels,
                } => session.on_barrier(generation, channels)?,
                Record::End { count } => return session.on_end(count),
            }
        }
    }

    /// Pre-copy: writes a run into guest memory (its data, for `Pages`,
    /// in the bounce buffer).
    fn write_run<E, M: HostMemory, S: Storage>(
        &mut self,
        dest: &RamBlock<M, S>,
        slot: &Slot,
        block: u32,
        first: u64,
        count: u32,
        is_pages: bool,
    ) -> Result<(), ReceiveError<E, M::Error>> {
        let len = count as usize * TARGET_PAGE_SIZE as usize;
        let data = is_pages.then_some(&self.bounce[..len]);
        let ledger = self
            .ledger
            .as_mut()
            .map(|l| &mut **l as &mut dyn PageLedger);
        store_precopy_run(
            dest, &slot.name, block, first, count, data, self.fresh, ledger,
        )?;
        if is_pages {
            self.summary.pages += u64::from(count);
        } else {
            self.summary.zero_pages += u64::from(count);
        }
        Ok(())
    }

    /// Reads a pre-copy `Pages` payload straight into guest memory when the
    /// transport already holds all of it ([`read_in_place`]); `false` when
    /// it does not, and the caller stages it.
    fn read_in_place<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        &mut self,
        list: &RamList<'_, M, S, N>,
        slot: &Slot,
        block: u32,
        first: u64,
        count: u32,
        r: &mut R,
    ) -> Result2<bool, R, M> {
        let view = list.read();
        let Some(dest) = view.by_name(slot.name.as_str()) else {
            return Ok(false);
        };
        let ledger = self
            .ledger
            .as_mut()
            .map(|l| &mut **l as &mut dyn PageLedger);
        if !read_in_place(r, dest, block, first, count, ledger)? {
            return Ok(false);
        }
        self.summary.pages += u64::from(count);
        Ok(true)
    }

    /// Post-copy: places a run through `target` (hugepages once whole),
    /// marking what was placed received.
    #[allow(clippy::too_many_arguments)]
    fn place_run<E, M: HostMemory, S: Storage>(
        &mut self,
        target: &mut dyn PostcopyTarget<Error = M::Error>,
        dest: &RamBlock<M, S>,
        slot: &Slot,
        block: u32,
        first: u64,
        count: u32,
        is_pages: bool,
    ) -> Result<(), ReceiveError<E, M::Error>> {
        Self::check_postcopy_run(dest, slot, first, count)?;
        // A page is placed once: userfaultfd keeps a present page as it is
        // (and the guest may have written to it since), so a second copy
        // would be recorded in the ledger but not in memory.
        let received = dest.received();
        if let Some(page) = (first..first + u64::from(count))
            .find(|&p| received.is_received(p as usize) == Ok(true))
        {
            return Err(ReceiveError::AlreadyPlaced {
                name: slot.name.clone(),
                page,
            });
        }
        let len = count as usize * TARGET_PAGE_SIZE as usize;
        let data = is_pages.then_some(&self.bounce[..len]);
        let page_size = dest.page_size().bytes();
        let placed_pages = &mut self.summary.postcopy_pages;
        let mut placed = |first: u64, data: Option<&[u8]>, pages: u64| {
            let offset = ByteLen::from_pages(first);
            match data {
                Some(d) => target.place(slot.name.as_str(), offset, d),
                None => target.place_zero(slot.name.as_str(), offset, ByteLen::from_pages(pages)),
            }
            .map_err(ReceiveError::Host)?;
            // In range: check_postcopy_run kept the run inside the map.
            let _ = dest
                .received()
                .mark_received(first as usize, pages as usize);
            *placed_pages += pages;
            if let Some(ledger) = self.ledger.as_deref_mut() {
                match data {
                    Some(d) => ledger.record(block as usize, first, d),
                    None => ledger.record_zero(block as usize, first, pages),
                }
            }
            Ok(())
        };
        if page_size <= TARGET_PAGE_SIZE {
            placed(first, data, u64::from(count))?;
        } else {
            self.assembly.add(
                block,
                &slot.name,
                page_size,
                first,
                count,
                data,
                &mut placed,
            )?;
        }
        if is_pages {
            self.summary.pages += u64::from(count);
        } else {
            self.summary.zero_pages += u64::from(count);
        }
        Ok(())
    }

    /// Checks the end record's checksums (and, after post-copy, that every
    /// page arrived).
    fn verify_end<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        &mut self,
        list: &RamList<'_, M, S, N>,
        table: &[Slot],
        r: &mut R,
    ) -> Result2<(), R, M> {
        for (index, slot) in table.iter().enumerate() {
            let expected = read_u64(r)?;
            let view = list.read();
            let dest = view
                .by_name(slot.name.as_str())
                .ok_or_else(|| ReceiveError::UnknownBlock(slot.name.clone()))?;
            if self.postcopy {
                let received = dest.received();
                let pages = slot.used_pages.min(received.postcopy_pages() as u64);
                if let Some(page) = received
                    .find_next_missing(0)
                    .map(|p| p as u64)
                    .filter(|&p| p < pages)
                {
                    return Err(ReceiveError::MissingAtEnd {
                        name: slot.name.clone(),
                        page,
                    });
                }
            }
            let found = match self.ledger.as_deref() {
                Some(ledger) => ledger.checksum(index, slot.used_pages),
                None => (self.checksum)(&dest.region(), dest.used_length().0).map_err(|_| {
                    ReceiveError::SizeMismatch {
                        name: slot.name.clone(),
                        source: slot.used_pages << TARGET_PAGE_SHIFT,
                        destination: dest.used_length().0,
                    }
                })?,
            };
            if found != expected {
                return Err(ReceiveError::ChecksumMismatch {
                    name: slot.name.clone(),
                    expected,
                    found,
                });
            }
            self.summary.blocks += 1;
        }
        Ok(())
    }

    /// Reads the header and block table and matches every entry against the
    /// destination's blocks, resizing resizable ones to the source's length.
    /// Reads the header and the block table. A resume header's token is
    /// checked against `token` (the one the target issued) before the
    /// table is looked at, so a peer without it changes nothing.
    /// `waiting`: the table of a post-copy waiting to be resumed, which a
    /// resumed stream must repeat exactly (and only a resumed stream may
    /// come then). `channels`: the page channels this receive has (its
    /// gate's), which a new stream's header must announce.
    fn read_table<R: ByteRead, M: HostMemory, S: Storage, const N: usize>(
        list: &RamList<'_, M, S, N>,
        r: &mut R,
        token: Option<ResumeToken>,
        waiting: Option<&ResumeTable>,
        channels: u32,
    ) -> Result2<(heapless::Vec<Slot, N>, bool), R, M> {
        let (header, resumed) = Header::read_either(r)?.ok_or(ReceiveError::BadMagic)?;
        let version = if resumed { RESUME_VERSION } else { VERSION };
        if header.version != version {
            return Err(ReceiveError::UnsupportedVersion(header.version));
        }
        if u32::from(header.page_shift) != TARGET_PAGE_SHIFT {
            return Err(ReceiveError::TargetPageSizeMismatch(header.page_shift));
        }
        // Before anything is resized: a source whose pages travel on
        // channels this receive does not read (or that sends none where it
        // waits for some) would leave pages unwritten, or wait for ever.
        // A resumed stream carries none (post-copy has no channels).
        if !resumed && u32::from(header.channels) != channels {
            return Err(ReceiveError::ChannelCountMismatch {
                source: header.channels.into(),
                destination: channels,
            });
        }
        if resumed {
            let carried = ResumeToken::read(r)?;
            if token.is_some_and(|t| !t.matches(&carried)) {
                return Err(ReceiveError::BadResumeToken);
            }
        }
        let original = match (resumed, waiting) {
            (false, None) => None,
            (true, Some(original)) => Some(original),
            (false, Some(_)) => {
                return Err(ReceiveError::OutOfPlace {
                    record: "stream header",
                    why: "a new stream cannot start while a post-copy waits to be resumed",
                })
            }
            (true, None) => {
                return Err(ReceiveError::OutOfPlace {
                    record: "resume header",
                    why: "no post-copy migration is waiting to be resumed",
                })
            }
        };
        if let Some(original) = original {
            original.check_count(header.block_count)?;
        }
        if header.block_count as usize > N {
            return Err(ReceiveError::TooManyBlocks {
                count: header.block_count,
            });
        }
        let mut table: heapless::Vec<Slot, N> = heapless::Vec::new();
        let mut raw = [0u8; 255];
        for index in 0..header.block_count {
            let (len, entry) = TableEntry::read(r, &mut raw)?;
            let name = core::str::from_utf8(&raw[..len])
                .ok()
                .and_then(|n| BlockName::new(n).ok())
                .ok_or(ReceiveError::BadBlockName)?;
            if table.iter().any(|s| s.name == name) {
                return Err(ReceiveError::DuplicateBlock(name));
            }
            let (resize_to, addr) = {
                let view = list.read();
                let dest = view
                    .by_name(name.as_str())
                    .ok_or_else(|| ReceiveError::UnknownBlock(name.clone()))?;
                let addr = dest.offset().0;
                // Before anything is resized: a resumed table changes
                // nothing.
                if let Some(original) = original {
                    original.check_entry(index, addr, &entry)?;
                }
                if dest.flags().contains(BlockFlags::READ_ONLY) {
                    return Err(ReceiveError::ReadOnlyBlock(name));
                }
                if entry.page_size != dest.page_size().bytes() {
                    return Err(ReceiveError::PageSizeMismatch {
                        name,
                        source: entry.page_size,
                        destination: dest.page_size().bytes(),
                    });
                }
                let resizable = dest.flags().contains(BlockFlags::RESIZABLE);
                let fits = entry.used_length == dest.used_length().0
                    || (resizable
                        && entry.used_length <= dest.max_length().0
                        && entry.used_length % dest.page_size().bytes() == 0
                        && entry.used_length > 0);
                if !fits {
                    let destination = if resizable {
                        dest.max_length().0
                    } else {
                        dest.used_length().0
                    };
                    return Err(ReceiveError::SizeMismatch {
                        name,
                        source: entry.used_length,
                        destination,
                    });
                }
                let resize_to =
                    (entry.used_length != dest.used_length().0).then_some(entry.used_length);
                (resize_to, addr)
            };
            if let Some(length) = resize_to {
                list.resize(name.as_str(), ByteLen(length))
                    .map_err(|e| match e {
                        ResizeError::Host(h) => ReceiveError::Host(h),
                        _ => ReceiveError::ResizeRefused {
                            name: name.clone(),
                            length,
                        },
                    })?;
            }
            let used_pages = entry.used_length >> TARGET_PAGE_SHIFT;
            // Cannot overflow: block_count <= N was checked.
            let _ = table.push(Slot {
                name,
                used_pages,
                entry,
                addr,
            });
        }
        let view = list.read();
        if let Some(missing) = view.iter().find(|b| {
            b.flags().contains(BlockFlags::MIGRATABLE)
                && !table.iter().any(|s| s.name.as_str() == b.name())
        }) {
            return Err(ReceiveError::MissingBlock(
                BlockName::new(missing.name())
                    .unwrap_or_else(|_| unreachable!("names in the list are valid")),
            ));
        }
        Ok((table, resumed))
    }

    /// Checks a run record against the table: index, length, bounds.
    fn check_run<E, H>(
        table: &[Slot],
        block: u32,
        first: u64,
        count: u32,
    ) -> Result<&Slot, ReceiveError<E, H>> {
        // The index is checked before the length, as the format lists them.
        if block as usize >= table.len() {
            return Err(ReceiveError::BadBlockIndex(block));
        }
        check_run_length(count)?;
        Self::check_span(table, block, first, count)
    }

    /// Checks a span of pages against the table: index, bounds.
    fn check_span<E, H>(
        table: &[Slot],
        block: u32,
        first: u64,
        count: u32,
    ) -> Result<&Slot, ReceiveError<E, H>> {
        let slot = table
            .get(block as usize)
            .ok_or(ReceiveError::BadBlockIndex(block))?;
        check_inside(&slot.name, slot.used_pages, first, count)?;
        Ok(slot)
    }
}

/// A run record's length: 1..=[`MAX_RUN_PAGES`] pages (the main stream's
/// and every page channel's runs).
pub(crate) fn check_run_length<E, H>(count: u32) -> Result<(), ReceiveError<E, H>> {
    if count == 0 || count > MAX_RUN_PAGES {
        return Err(ReceiveError::BadRunLength(count));
    }
    Ok(())
}

/// Pages `first..first + count` (at least one) lie inside the used length
/// of block `name`, `used_pages` pages, without overflow.
pub(crate) fn check_inside<E, H>(
    name: &BlockName,
    used_pages: u64,
    first: u64,
    count: u32,
) -> Result<(), ReceiveError<E, H>> {
    if count == 0 {
        return Err(ReceiveError::BadRunLength(count));
    }
    let end = first
        .checked_add(u64::from(count))
        .ok_or(ReceiveError::LengthOverflow)?;
    if end > used_pages {
        return Err(ReceiveError::PastUsedLength {
            name: name.clone(),
            first,
            count,
            used_pages,
        });
    }
    Ok(())
}

/// A `Barrier` record of `generation` naming `channels` page channels:
/// checks it against `gate` (`None`: this receive has no page channels)
/// and `passed`, the barriers passed so far on this stream or channel,
/// waits at the gate for every other party, and counts it. The main
/// stream and every page channel pass their barriers through here.
pub(crate) fn pass_barrier<E, H>(
    gate: Option<&dyn ChannelGate>,
    generation: u32,
    channels: u32,
    passed: &mut u32,
) -> Result<(), ReceiveError<E, H>> {
    let destination = gate.map_or(0, |g| g.channels());
    let Some(gate) = gate.filter(|_| channels == destination) else {
        return Err(ReceiveError::ChannelCountMismatch {
            source: channels,
            destination,
        });
    };
    if generation != *passed {
        return Err(ReceiveError::BarrierOutOfOrder {
            generation,
            expected: *passed,
        });
    }
    gate.meet(generation)
        .map_err(|_| ReceiveError::ChannelFailed)?;
    *passed += 1;
    Ok(())
}

/// Pre-copy: reads a `Pages` payload (pages `first..first + count` of
/// `dest`, table block `block`, already checked) straight into guest
/// memory when the transport already holds all of it
/// ([`ByteRead::read_ready_into`]), saving the copy through a bounce
/// buffer, then records the pages in `ledger` and marks them received.
/// `false` when the transport does not hold it whole (or the run is not
/// inside the block): nothing was read, and the caller stages it. The
/// main stream and every page channel read in place through here.
pub(crate) fn read_in_place<R: ByteRead, M: HostMemory, S: Storage>(
    r: &mut R,
    dest: &RamBlock<M, S>,
    block: u32,
    first: u64,
    count: u32,
    ledger: Option<&mut dyn PageLedger>,
) -> Result<bool, ReadError<R::Error>> {
    let len = count as usize * TARGET_PAGE_SIZE as usize;
    let Ok(pages) = dest.region().subregion(ByteLen::from_pages(first), len) else {
        return Ok(false);
    };
    if !r.read_ready_into(&pages)? {
        return Ok(false);
    }
    if let Some(ledger) = ledger {
        ledger.record_region(block as usize, first, &pages);
    }
    mark_received(dest, first, count);
    Ok(true)
}

/// Pre-copy: writes pages `first..first + count` of `dest` (table block
/// `block`, named `name`): `data` for a `Pages` record, zeros for a `Zero`
/// one (skipping pages a fresh destination never wrote), records them in
/// `ledger` and marks them received. The main stream and every page
/// channel write runs through here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn store_precopy_run<E, M: HostMemory, S: Storage>(
    dest: &RamBlock<M, S>,
    name: &BlockName,
    block: u32,
    first: u64,
    count: u32,
    data: Option<&[u8]>,
    fresh: bool,
    ledger: Option<&mut dyn PageLedger>,
) -> Result<(), ReceiveError<E, M::Error>> {
    let start = ByteLen::from_pages(first);
    let region = dest.region();
    let oob = |_| ReceiveError::PastUsedLength {
        name: name.clone(),
        first,
        count,
        used_pages: dest.used_pages() as u64,
    };
    let received = dest.received();
    if let Some(data) = data {
        region.write(start, data).map_err(oob)?;
        if let Some(ledger) = ledger {
            ledger.record(block as usize, first, data);
        }
    } else {
        // Only write pages that are not zero already: a fresh
        // destination page then stays untouched (unallocated).
        for page in 0..u64::from(count) {
            let at = ByteLen::from_pages(first + page);
            let index = (first + page) as usize;
            let untouched = fresh && received.is_received(index) == Ok(false);
            if !untouched && !region.is_zero(at, TARGET_PAGE_SIZE as usize).map_err(oob)? {
                region.fill(at, TARGET_PAGE_SIZE as usize, 0).map_err(oob)?;
            }
        }
        if let Some(ledger) = ledger {
            ledger.record_zero(block as usize, first, u64::from(count));
        }
    }
    mark_received(dest, first, count);
    Ok(())
}

/// Every page written is recorded as received (pages past a block's
/// post-copy length just go unrecorded: they have no bit).
pub(crate) fn mark_received<M: HostMemory, S: Storage>(
    dest: &RamBlock<M, S>,
    first: u64,
    count: u32,
) {
    let received = dest.received();
    let end = (first + u64::from(count)).min(received.postcopy_pages() as u64);
    if first < end {
        let _ = received.mark_received(first as usize, (end - first) as usize);
    }
}

impl Receiver<'_> {
    /// Checks a post-copy run or discard (already inside the used length)
    /// against the block's post-copy length, and discards against its host
    /// pages.
    fn check_postcopy_run<E, M: HostMemory, S: Storage>(
        dest: &RamBlock<M, S>,
        slot: &Slot,
        first: u64,
        count: u32,
    ) -> Result<(), ReceiveError<E, M::Error>> {
        let postcopy_pages = dest.received().postcopy_pages() as u64;
        // No overflow: check_span bounded first + count by the used length.
        if first + u64::from(count) > postcopy_pages {
            return Err(ReceiveError::PastPostcopyLength {
                name: slot.name.clone(),
                first,
                count,
                postcopy_pages,
            });
        }
        Ok(())
    }
}

/// One receive in progress: the stream, the destination list, the table
/// the stream's blocks were matched to, and one handler per record kind.
struct Session<'s, 'b, 'l, R, M: HostMemory, S: Storage, const N: usize, F> {
    rx: &'s mut Receiver<'b>,
    list: &'s RamList<'l, M, S, N>,
    r: &'s mut R,
    target: Option<&'s mut dyn PostcopyTarget<Error = M::Error>>,
    table: heapless::Vec<Slot, N>,
    events: F,
}

impl<R: ByteRead, M: HostMemory, S: Storage, const N: usize, F: FnMut(ReceiveEvent)>
    Session<'_, '_, '_, R, M, S, N, F>
{
    /// `Pages`: a run of pages. Before post-copy the payload goes straight
    /// into guest memory when the transport already holds all of it;
    /// otherwise it is staged whole in the bounce buffer first, so a
    /// truncated record writes nothing.
    fn on_pages(&mut self, block: u32, first: u64, count: u32) -> Result2<(), R, M> {
        let slot = Receiver::check_run(&self.table, block, first, count)?;
        if !self.rx.postcopy
            && self
                .rx
                .read_in_place(self.list, slot, block, first, count, &mut *self.r)?
        {
            return Ok(());
        }
        let len = count as usize * TARGET_PAGE_SIZE as usize;
        self.r.read_exact(&mut self.rx.bounce[..len])?;
        self.store_run(block, first, count, true)
    }

    /// `Zero`: a run of zero pages, as a count.
    fn on_zero(&mut self, block: u32, first: u64, count: u32) -> Result2<(), R, M> {
        Receiver::check_run::<R::Error, M::Error>(&self.table, block, first, count)?;
        self.store_run(block, first, count, false)
    }

    /// Writes (pre-copy) or places (post-copy) a run `check_run` accepted,
    /// its data (for `Pages`) in the bounce buffer.
    fn store_run(
        &mut self,
        block: u32,
        first: u64,
        count: u32,
        is_pages: bool,
    ) -> Result2<(), R, M> {
        let slot = self
            .table
            .get(block as usize)
            .ok_or(ReceiveError::BadBlockIndex(block))?;
        let view = self.list.read();
        // Checked against the list when the table was read; the block
        // cannot have left a list being migrated into.
        let Some(dest) = view.by_name(slot.name.as_str()) else {
            return Err(ReceiveError::UnknownBlock(slot.name.clone()));
        };
        if self.rx.postcopy {
            let target = self
                .target
                .as_deref_mut()
                .ok_or(ReceiveError::PostcopyUnsupported)?;
            self.rx
                .place_run(target, dest, slot, block, first, count, is_pages)
        } else {
            self.rx.write_run(dest, slot, block, first, count, is_pages)
        }
    }

    /// `Sync`: the source finished a pass.
    fn on_sync(&mut self, pass: u32, remaining: u64) {
        // A hostile pass number must not overflow the count.
        self.rx.summary.passes = self.rx.summary.passes.max(pass.saturating_add(1));
        (self.events)(ReceiveEvent::Sync { pass, remaining });
    }

    /// `Resize`: a resizable block's used length changed on the source.
    fn on_resize(&mut self, block: u32, used_length: u64) -> Result2<(), R, M> {
        if self.rx.postcopy {
            return Err(ReceiveError::OutOfPlace {
                record: "resize",
                why: "the source guest is paused during post-copy",
            });
        }
        let slot = self
            .table
            .get_mut(block as usize)
            .ok_or(ReceiveError::BadBlockIndex(block))?;
        self.list
            .resize(slot.name.as_str(), ByteLen(used_length))
            .map_err(|e| match e {
                ResizeError::Host(h) => ReceiveError::Host(h),
                _ => ReceiveError::ResizeRefused {
                    name: slot.name.clone(),
                    length: used_length,
                },
            })?;
        slot.used_pages = used_length >> TARGET_PAGE_SHIFT;
        if let Some(ledger) = self.rx.ledger.as_deref_mut() {
            ledger.truncate(block as usize, slot.used_pages);
        }
        Ok(())
    }

    /// `Discard`, just before post-copy: pages the source will send again
    /// are dropped and marked missing, in whole host pages.
    fn on_discard(&mut self, block: u32, first: u64, count: u32) -> Result2<(), R, M> {
        if self.rx.postcopy {
            return Err(ReceiveError::OutOfPlace {
                record: "discard",
                why: "post-copy has started",
            });
        }
        if self.target.is_none() {
            // A discard only comes just before post-copy, which this
            // receive does not do; said as such, so the source knows this
            // side never started the guest (`POSTCOPY_UNSUPPORTED_CODE`).
            return Err(ReceiveError::PostcopyUnsupported);
        }
        let slot = Receiver::check_span(&self.table, block, first, count)?;
        let view = self.list.read();
        let dest = view
            .by_name(slot.name.as_str())
            .ok_or_else(|| ReceiveError::UnknownBlock(slot.name.clone()))?;
        Receiver::check_postcopy_run(dest, slot, first, count)?;
        let per_page = dest.page_size().bytes() >> TARGET_PAGE_SHIFT;
        let end = first + u64::from(count);
        if first % per_page != 0 || (end % per_page != 0 && end != slot.used_pages) {
            return Err(ReceiveError::NotWholeHostPages {
                name: slot.name.clone(),
                first,
                page_size: dest.page_size().bytes(),
            });
        }
        let (start, len) = (
            first << TARGET_PAGE_SHIFT,
            u64::from(count) << TARGET_PAGE_SHIFT,
        );
        dest.memory()
            .discard(ByteLen(start), ByteLen(len))
            .map_err(ReceiveError::Host)?;
        // In range: check_postcopy_run kept it inside the map.
        let _ = dest.received().mark_missing(first as usize, count as usize);
        // The pages read as zero now: the ledger must vouch for that, not
        // for what arrived before, or a stream that discards pages and
        // never sends them again would verify with wrong memory. (A page
        // placed later in post-copy is recorded again then.)
        if let Some(ledger) = self.rx.ledger.as_deref_mut() {
            ledger.record_zero(block as usize, first, u64::from(count));
        }
        self.rx.summary.discarded += u64::from(count);
        Ok(())
    }

    /// `Postcopy`: the guest moves here. Hands its device-state sections
    /// to the VMM's sink (as pre-copy's `Section` records go), checks that
    /// every hugepage block can be assembled, and starts the guest through
    /// the target.
    fn on_postcopy(&mut self, sections: u32) -> Result2<(), R, M> {
        if self.rx.postcopy {
            return Err(ReceiveError::OutOfPlace {
                record: "post-copy",
                why: "post-copy has started already",
            });
        }
        if self.target.is_none() {
            return Err(ReceiveError::PostcopyUnsupported);
        }
        // Bounded by the device-state limit: each section, empty or not,
        // counts its header against it.
        for _ in 0..sections {
            self.read_section()?;
        }
        let target = self
            .target
            .as_deref_mut()
            .ok_or(ReceiveError::PostcopyUnsupported)?;
        for slot in &self.table {
            if let Some(dest) = self.list.read().by_name(slot.name.as_str()) {
                self.rx
                    .assembly
                    .check(&slot.name, dest.page_size().bytes())?;
            }
        }
        // A post-copy can only be resumed with its table remembered.
        if !self.rx.original.holds(self.table.len()) {
            return Err(ReceiveError::TooManyBlocks {
                count: self.table.len() as u32,
            });
        }
        let names: heapless::Vec<&str, N> = self.table.iter().map(|s| s.name.as_str()).collect();
        target.start(&names).map_err(ReceiveError::Host)?;
        self.rx.postcopy = true;
        self.rx.summary.postcopy = true;
        (self.events)(ReceiveEvent::PostcopyStarted);
        Ok(())
    }

    /// `Barrier`: waits until every page channel applied what came before
    /// its own barrier of this generation.
    fn on_barrier(&mut self, generation: u32, channels: u32) -> Result2<(), R, M> {
        if self.rx.postcopy {
            return Err(ReceiveError::OutOfPlace {
                record: "barrier",
                why: "page channels carry pre-copy pages only",
            });
        }
        pass_barrier(self.rx.gate, generation, channels, &mut self.rx.barriers)
    }

    /// `End`: verifies every block's checksum (and, after post-copy, that
    /// every page arrived); the receive is complete.
    fn on_end(&mut self, count: u32) -> Result2<ReceiveSummary, R, M> {
        if count as usize != self.table.len() {
            return Err(ReceiveError::EndCountMismatch {
                count,
                blocks: self.table.len() as u32,
            });
        }
        (self.events)(ReceiveEvent::Verifying);
        self.rx.verify_end(self.list, &self.table, &mut *self.r)?;
        self.rx.postcopy = false;
        Ok(self.rx.summary)
    }
}

/// A record kind's name, for [`ReceiveError::OutOfPlace`].
pub(crate) fn record_name(record: &Record) -> &'static str {
    match record {
        Record::Pages { .. } => "pages",
        Record::Zero { .. } => "zero",
        Record::Sync { .. } => "sync",
        Record::Resize { .. } => "resize",
        Record::End { .. } => "end",
        Record::Discard { .. } => "discard",
        Record::Postcopy { .. } => "post-copy",
        Record::Section => "section",
        Record::Barrier { .. } => "barrier",
    }
}
