//! The post-copy destination: guest RAM registered with userfaultfd, a
//! fault thread turning the guest's faults into page requests on the
//! return path, and pages placed as they arrive.
//!
//! [`PostcopyDestination`] is the core's
//! [`PostcopyTarget`] over a block list of [`LinuxMemory`]: hand it to
//! [`Receiver::receive_postcopy`](ramblock_core::migrate::receiver::Receiver::receive_postcopy).
//! When the source switches to post-copy it
//! 1. issues a [`ResumeToken`] (128 random bits) and sends it first on the
//!    return path: after a break, only a stream carrying it resumes
//!    ([`PostcopyTarget::resume_token`]);
//! 2. registers every block of the stream's table for missing-page faults
//!    on its own [`Userfaultfd`];
//! 3. starts a fault thread, which reads each fault, asks the source for
//!    the host page holding it with a [`PageRequest`] on the return path (once per page, however many vCPUs wait on it), and
//!    times the wait ([`FaultLatency`]);
//! 4. calls the VMM's [`StartGuest`] hook, which starts the vCPUs from
//!    the device state its section sink took from the `Postcopy` record; what the hook returns (a guest handle) is
//!    handed back by [`PostcopyDestination::finish`].
//!
//! Pages placed ([`PostcopyTarget::place`]) wake the vCPUs waiting on
//! them, are marked in the block's received map and end their waits.
//! After a broken connection the VMM accepts a new one, passes it to
//! [`PostcopyDestination::set_next_connection`] and receives again; the
//! destination then sends the received map and asks again for every page
//! still awaited.
//!
//! The return path is any `Write` (a `TcpStream`, a `UnixStream`), shared
//! with the fault thread behind a [`ReturnPath`] lock; the receiver's
//! final acknowledgement goes through the same lock. Socket tuning (a small
//! receive buffer during post-copy, so a faulting vCPU does not wait
//! behind queued background pages) is the VMM's: do it in the
//! [`StartGuest`] hook and before [`PostcopyDestination::set_next_connection`].
//!
//! ```no_run
//! use ramblock_core::addr::ByteLen;
//! use ramblock_core::bitmap::Owned;
//! use ramblock_core::block::{BlockBitmaps, BlockSpec};
//! use ramblock_core::list::RamList;
//! use ramblock_core::name::BlockName;
//! use ramblock_core::migrate::receiver::{send_ack, Receiver, BOUNCE_BYTES};
//! use ramblock_core::stream::io::IoStream;
//! use ramblock_linux::fd_stream::FdReader;
//! use ramblock_linux::postcopy::{PostcopyDestination, StartGuest};
//! use ramblock_linux::MemoryBuilder;
//! use std::net::TcpListener;
//! use std::sync::{Arc, Mutex};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // Guest RAM, not preallocated: pages still missing must stay missing.
//! let ram: &'static RamList<'static, _, Owned, 8> = Box::leak(Box::new(RamList::new()));
//! let len = ByteLen(64 << 20);
//! let memory = MemoryBuilder::anonymous(len).build()?;
//! let spec = BlockSpec::new(BlockName::new("pc.ram")?, len).flags(memory.flags());
//! let bitmaps = BlockBitmaps::for_spec(&spec)?;
//! ram.add(spec, memory, bitmaps)?;
//!
//! let (conn, _) = TcpListener::bind("127.0.0.1:4444")?.accept()?;
//! let ret = Arc::new(Mutex::new(conn.try_clone()?));
//! // The VMM's own: run the vCPUs from the state its section sink loaded.
//! let start: StartGuest<()> = Box::new(|| Ok(()));
//! let mut target = PostcopyDestination::new(ram, ret.clone(), start)?;
//! let mut bounce = vec![0u8; BOUNCE_BYTES];
//! let mut receiver = Receiver::new(&mut bounce)?;
//! let result = receiver.receive_postcopy(ram, &mut FdReader::new(conn), &mut target, |_| {});
//! send_ack(&mut IoStream(&mut *ret.lock().unwrap()), &result)?;
//! println!("fault waits: {:?}", target.latency());
//! let _guest = target.finish();
//! # Ok(())
//! # }
//! ```

mod error;
pub mod latency;

pub use error::PostcopyError;
pub use latency::{FaultLatency, LatencySummary};

use crate::error::Error;
use crate::memory::LinuxMemory;
use crate::transport::token::issue_token;
use crate::uffd::{Event, Features, RegisterMode, UffdError, Userfaultfd};
use ramblock_core::addr::{ByteLen, TARGET_PAGE_SHIFT};
use ramblock_core::bitmap::Storage;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::stream::format::PageRequest;
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::received_map::write_received_map;
use ramblock_core::stream::resume_token::ResumeToken;
use std::fmt;
use std::io::Write;
use std::ops::Deref;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// The return path to the source: the connection the destination answers
/// on, shared by the fault thread (page requests), the destination
/// (received map, requests again after a resume) and the VMM (the final
/// acknowledgement). A resume replaces the connection inside.
pub type ReturnPath<W> = Arc<Mutex<W>>;

/// The VMM's hook that starts the guest once post-copy has begun, from the
/// device state the `Postcopy` record carried (its sections went to the
/// VMM's `SectionSink` just before); it returns whatever handle the VMM
/// keeps for the running guest.
pub type StartGuest<G> =
    Box<dyn FnMut() -> Result<G, Box<dyn std::error::Error + Send + Sync>> + Send>;

/// How long the fault thread waits for a fault before it looks at its stop
/// flag again.
const FAULT_POLL: Duration = Duration::from_millis(50);

/// Bits of a latency key below the block's table index: a page index in a
/// block (2^48 target pages is 1 EiB).
const KEY_PAGE_BITS: u32 = 48;

/// The latency key of target page `page` of table block `table_index`.
fn key(table_index: u32, page: u64) -> u64 {
    u64::from(table_index) << KEY_PAGE_BITS | page
}

/// A block registered for post-copy: what the stream calls it and where
/// its registration is, for the fault thread to map a fault address to a
/// page (no access to the memory is made through it).
#[derive(Clone, Debug)]
struct Span {
    name: String,
    table_index: u32,
    base: u64,
    len: u64,
    page_size: u64,
}

impl Span {
    /// Target pages per host page.
    fn per_page(&self) -> u64 {
        (self.page_size >> TARGET_PAGE_SHIFT).max(1)
    }
}

/// A post-copy destination over the blocks of `ram` (a `&'static` or
/// `Arc` of a [`RamList`] of [`LinuxMemory`]), answering on a
/// [`ReturnPath`] over `W`, starting a guest whose handle is a `G`.
/// See the [module](self) for what it does and when.
pub struct PostcopyDestination<L, W, G> {
    ram: L,
    uffd: Arc<Userfaultfd>,
    spans: Vec<Span>,
    latency: Arc<FaultLatency>,
    ret: ReturnPath<W>,
    next_connection: Option<W>,
    start_guest: StartGuest<G>,
    guest: Option<G>,
    /// Issued when post-copy starts; a resume must carry it.
    token: Option<ResumeToken>,
    stop: Arc<AtomicBool>,
    fault_thread: Option<JoinHandle<Result<(), UffdError>>>,
}

impl<L, W, G> fmt::Debug for PostcopyDestination<L, W, G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostcopyDestination")
            .field("uffd", &self.uffd)
            .field("spans", &self.spans)
            .field("latency", &self.latency)
            .field("started", &self.fault_thread.is_some())
            .field("guest", &self.guest.is_some())
            .finish_non_exhaustive()
    }
}

impl<L, S, const N: usize, W, G> PostcopyDestination<L, W, G>
where
    L: Deref<Target = RamList<'static, LinuxMemory, S, N>> + Clone + Send + 'static,
    S: Storage + 'static,
    W: Write + Send + 'static,
{
    /// A destination for the blocks of `ram`, answering on `ret`, starting
    /// the guest with `start_guest`. Opens its userfaultfd now, with the
    /// features missing faults on memfd and hugetlb memory need where the
    /// host offers them, so a host without userfaultfd fails here, before
    /// the migration starts.
    pub fn new(
        ram: L,
        ret: ReturnPath<W>,
        start_guest: StartGuest<G>,
    ) -> Result<Self, PostcopyError> {
        // These features are asked for when the descriptor is opened; what
        // the host offers is learned on a first one.
        let offered = Userfaultfd::new()?.offered_features();
        let wanted = offered & (Features::MISSING_SHMEM | Features::MISSING_HUGETLBFS);
        let uffd = Userfaultfd::with_features(wanted)?;
        Ok(PostcopyDestination {
            ram,
            uffd: Arc::new(uffd),
            spans: Vec::new(),
            latency: Arc::new(FaultLatency::new()),
            ret,
            next_connection: None,
            start_guest,
            guest: None,
            token: None,
            stop: Arc::new(AtomicBool::new(false)),
            fault_thread: None,
        })
    }

    /// The fault waits so far.
    pub fn latency(&self) -> LatencySummary {
        self.latency.summary()
    }

    /// The connection the next (resumed) stream's answers go on; set it
    /// before receiving the resumed stream.
    pub fn set_next_connection(&mut self, conn: W) {
        self.next_connection = Some(conn);
    }

    /// The guest the [`StartGuest`] hook started, while post-copy runs.
    pub fn guest(&mut self) -> Option<&mut G> {
        self.guest.as_mut()
    }

    /// Stops serving faults (a vCPU still faulting then waits for ever:
    /// call this once every page has arrived, or to give up) and reports
    /// how the fault thread ended. Calling it again returns `Ok`.
    pub fn stop_faults(&mut self) -> Result<(), PostcopyError> {
        self.stop.store(true, Ordering::Release);
        match self.fault_thread.take().map(JoinHandle::join) {
            None => Ok(()),
            Some(Ok(result)) => result.map_err(PostcopyError::from),
            Some(Err(_)) => Err(PostcopyError::FaultThreadPanicked),
        }
    }

    /// Stops serving faults and hands over the running guest. Call
    /// [`PostcopyDestination::stop_faults`] first to see whether the fault
    /// thread failed.
    pub fn finish(mut self) -> Option<G> {
        let _ = self.stop_faults();
        self.guest.take()
    }

    fn span(&self, name: &str) -> Result<&Span, PostcopyError> {
        self.spans
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| PostcopyError::NotRegistered {
                name: name.to_string(),
            })
    }

    /// Places a run into block `name` with `place`, marks its pages
    /// received and ends their faults' waits. The block list stays read
    /// locked throughout, so the block cannot be resized or removed while
    /// its memory is borrowed; marking before ending the waits closes the
    /// race with the fault thread (see [`ramblock_core::migrate::fault_latency`]).
    fn place_with(
        &self,
        name: &str,
        offset: u64,
        len: u64,
        place: impl FnOnce(&crate::uffd::RegisteredBlock<'_>) -> Result<(), UffdError>,
    ) -> Result<(), PostcopyError> {
        let span = self.span(name)?;
        let changed = || PostcopyError::BlockChanged {
            name: name.to_string(),
        };
        let view = self.ram.read();
        let block = view.by_name(name).ok_or_else(changed)?;
        let memory = block.memory();
        if memory.base().as_ptr() as u64 != span.base || memory.used_len().0 < span.len {
            return Err(changed());
        }
        let registered = self.uffd.registered(memory).ok_or_else(changed)?;
        place(&registered)?;
        let (first, pages) = (offset >> TARGET_PAGE_SHIFT, len >> TARGET_PAGE_SHIFT);
        // In range: the placement checked the run against the block.
        let _ = block
            .received()
            .mark_received(first as usize, pages as usize);
        drop(view);
        self.latency.placed_run(key(span.table_index, first), pages);
        Ok(())
    }

    fn return_path(&self) -> MutexGuard<'_, W> {
        // A writer that panicked mid-write leaves a torn message, which the
        // source refuses; the lock itself holds no state to repair.
        self.ret.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_postcopy(&mut self, table: &[&str]) -> Result<(), PostcopyError> {
        if self.fault_thread.is_some() {
            return Err(PostcopyError::AlreadyStarted);
        }
        // The token goes first on the return path, before the fault thread
        // can ask for a page: the source reads it before anything else. A
        // failed write means the connection broke; the source then has no
        // token and cannot resume, which is as far as it would get anyway.
        let token = issue_token().map_err(PostcopyError::Token)?;
        {
            let mut ret = self.return_path();
            let mut out = IoStream(&mut *ret);
            let _ = token.write_message(&mut out).and_then(|()| out.0.flush());
        }
        self.token = Some(token);
        let mut spans = Vec::with_capacity(table.len());
        {
            let view = self.ram.read();
            for (index, name) in table.iter().enumerate() {
                let block = view
                    .by_name(name)
                    .ok_or_else(|| PostcopyError::UnknownBlock {
                        name: name.to_string(),
                    })?;
                let reg = self
                    .uffd
                    .register_memory(block.memory(), RegisterMode::MISSING)?;
                spans.push(Span {
                    name: name.to_string(),
                    // A table has far fewer than 2^32 blocks.
                    table_index: index as u32,
                    base: reg.base() as u64,
                    len: reg.len() as u64,
                    page_size: reg.page_size() as u64,
                });
            }
        }
        self.spans = spans.clone();
        let (uffd, latency, ret, stop, ram) = (
            self.uffd.clone(),
            self.latency.clone(),
            self.ret.clone(),
            self.stop.clone(),
            self.ram.clone(),
        );
        let serve = move || {
            FaultThread {
                uffd: &uffd,
                spans: &spans,
                latency: &latency,
                ret: &ret,
                stop: &stop,
            }
            .serve(&ram)
        };
        self.fault_thread = Some(
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(serve)
                .map_err(PostcopyError::FaultThread)?,
        );
        self.guest = Some((self.start_guest)().map_err(PostcopyError::StartGuest)?);
        Ok(())
    }

    fn resume(&mut self) -> Result<(), PostcopyError> {
        let conn = self
            .next_connection
            .take()
            .ok_or(PostcopyError::NoNextConnection)?;
        let mut ret = self.return_path();
        *ret = conn;
        // The map first, then the requests still waiting: the source reads
        // them in that order.
        let mut out = IoStream(&mut *ret);
        {
            let view = self.ram.read();
            write_received_map(&mut out, &view).map_err(|source| PostcopyError::ReturnPath {
                what: "sending the received map",
                source,
            })?;
        }
        let again = |source| PostcopyError::ReturnPath {
            what: "asking again for pages",
            source,
        };
        for k in self.latency.pending_keys() {
            let index = (k >> KEY_PAGE_BITS) as u32;
            let Some(span) = self.spans.iter().find(|s| s.table_index == index) else {
                continue;
            };
            let per_page = span.per_page();
            let page = k & ((1 << KEY_PAGE_BITS) - 1);
            // Hugepages: one request per hugepage, not per target page.
            if page % per_page != 0 {
                continue;
            }
            let request = PageRequest {
                block: index,
                first: page,
                // A host page is at most 1 GiB: 2^18 target pages.
                count: per_page as u32,
            };
            request.write(&mut out).map_err(again)?;
        }
        out.0.flush().map_err(again)
    }
}

/// What the fault thread works with.
struct FaultThread<'a, W> {
    uffd: &'a Userfaultfd,
    spans: &'a [Span],
    latency: &'a FaultLatency,
    ret: &'a ReturnPath<W>,
    stop: &'a AtomicBool,
}

impl<W: Write> FaultThread<'_, W> {
    /// Reads the guest's faults and asks the source for each missing host
    /// page once, until told to stop; a failure to read faults ends it.
    fn serve<S: Storage, const N: usize>(
        &self,
        ram: &RamList<'static, LinuxMemory, S, N>,
    ) -> Result<(), UffdError> {
        while !self.stop.load(Ordering::Acquire) {
            let Some(event) = self.uffd.read_event(Some(FAULT_POLL))? else {
                continue;
            };
            let Event::Pagefault { addr, .. } = event else {
                continue;
            };
            let Some(span) = self
                .spans
                .iter()
                .find(|s| addr >= s.base && addr - s.base < s.len)
            else {
                continue;
            };
            let offset = (addr - span.base) & !(span.page_size - 1);
            let first = offset >> TARGET_PAGE_SHIFT;
            let k = key(span.table_index, first);
            if !self.latency.fault(k) {
                continue; // asked already
            }
            let received = ram
                .read()
                .by_name(&span.name)
                .is_some_and(|b| b.received().is_received(first as usize) == Ok(true));
            if received {
                // Placed while the fault was being read: nothing to ask for.
                self.latency.placed(k);
                continue;
            }
            let request = PageRequest {
                block: span.table_index,
                first,
                count: span.per_page() as u32,
            };
            let mut conn = self.ret.lock().unwrap_or_else(|e| e.into_inner());
            // A broken connection: the request is sent again on resume.
            let _ = request.write(&mut IoStream(&mut *conn));
        }
        Ok(())
    }
}

impl<L, W, G> Drop for PostcopyDestination<L, W, G> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(thread) = self.fault_thread.take() {
            let _ = thread.join();
        }
    }
}

impl<L, S, const N: usize, W, G> PostcopyTarget for PostcopyDestination<L, W, G>
where
    L: Deref<Target = RamList<'static, LinuxMemory, S, N>> + Clone + Send + 'static,
    S: Storage + 'static,
    W: Write + Send + 'static,
{
    // The core's receiver reports a target's errors as the memory's.
    type Error = Error;

    fn start(&mut self, table: &[&str]) -> Result<(), Error> {
        Ok(self.start_postcopy(table)?)
    }

    // UffdBlock speaks the kernel's u64 offsets; the ByteLen is unwrapped
    // here, at the edge of the core's types.
    fn place(&mut self, block: &str, offset: ByteLen, data: &[u8]) -> Result<(), Error> {
        let uffd = &*self.uffd;
        let offset = offset.0;
        Ok(self.place_with(block, offset, data.len() as u64, |reg| {
            reg.place_run(uffd, offset, data).map(drop)
        })?)
    }

    fn place_zero(&mut self, block: &str, offset: ByteLen, len: ByteLen) -> Result<(), Error> {
        let uffd = &*self.uffd;
        let (offset, len) = (offset.0, len.0);
        Ok(self.place_with(block, offset, len, |reg| {
            reg.zero_run(uffd, offset, len).map(drop)
        })?)
    }

    fn resumed(&mut self) -> Result<(), Error> {
        Ok(self.resume()?)
    }

    fn resume_token(&self) -> Option<ResumeToken> {
        self.token
    }
}
