//! The destination's side of post-copy: guest RAM registered with
//! userfaultfd, a fault thread turning the guest's faults into page
//! requests on the return path, pages placed as they arrive, and the guest
//! started from the source's device state.

use crate::link::{set_receive_buffer, POSTCOPY_SOCKET_BUFFER};
use crate::memory::GuestRam;
use crate::workload::Guest;
use ramblock_core::addr::TARGET_PAGE_SHIFT;
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::stream::format::PageRequest;
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::received_map::write_received_map;
use ramblock_linux::uffd::latency::{FaultLatency, LatencySummary};
use ramblock_linux::uffd::{Event, Features, RegisterMode, RegisteredBlock, Userfaultfd};
use ramblock_linux::Error;
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Starts the guest from the source's device state.
pub type StartGuest = Box<dyn FnMut(&[u8]) -> Result<Box<dyn Guest>, String> + Send>;

/// A registered block: where it is, and what a request calls it.
#[derive(Copy, Clone, Debug)]
struct Span {
    base: u64,
    len: u64,
    page_size: u64,
    /// Index in the stream's block table.
    table_index: u32,
}

/// The return path to the source, replaced when a connection is resumed.
pub type ReturnPath = Arc<Mutex<TcpStream>>;

/// What the destination does during post-copy.
pub struct Target {
    ram: &'static GuestRam,
    uffd: Arc<Userfaultfd>,
    blocks: Vec<(String, RegisteredBlock, u32)>,
    latency: Arc<FaultLatency>,
    ret: ReturnPath,
    /// The next connection, set before a resumed receive.
    pub next_connection: Option<TcpStream>,
    start_guest: StartGuest,
    guest: Option<Box<dyn Guest>>,
    stop: Arc<AtomicBool>,
    fault_thread: Option<JoinHandle<()>>,
}

impl Target {
    /// A target for `ram`, answering on `ret`.
    pub fn new(
        ram: &'static GuestRam,
        ret: ReturnPath,
        start_guest: StartGuest,
    ) -> Result<Target, String> {
        // Missing faults on memfd and hugetlb memory need features asked
        // for when the descriptor is opened; ask for those the host offers.
        let offered = Userfaultfd::new()
            .map_err(|e| e.to_string())?
            .offered_features();
        let wanted = offered & (Features::MISSING_SHMEM | Features::MISSING_HUGETLBFS);
        let uffd = Userfaultfd::with_features(wanted).map_err(|e| e.to_string())?;
        Ok(Target {
            ram,
            uffd: Arc::new(uffd),
            blocks: Vec::new(),
            latency: Arc::new(FaultLatency::new()),
            ret,
            next_connection: None,
            start_guest,
            guest: None,
            stop: Arc::new(AtomicBool::new(false)),
            fault_thread: None,
        })
    }

    /// The fault waits so far.
    pub fn latency(&self) -> LatencySummary {
        self.latency.summary()
    }

    /// Stops serving faults and hands over the running guest.
    pub fn finish(mut self) -> Option<Box<dyn Guest>> {
        self.stop_faults();
        self.guest.take()
    }

    fn stop_faults(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.fault_thread.take() {
            let _ = t.join();
        }
    }

    fn block(&self, name: &str) -> Result<&(String, RegisteredBlock, u32), Error> {
        self.blocks
            .iter()
            .find(|b| b.0 == name)
            .ok_or_else(|| Error::Postcopy(format!("block {name:?} is not registered")))
    }

    /// Marks pages received and ends their faults' waits. Marking first
    /// closes the race with the fault thread (see `FaultLatency`).
    fn placed(&self, name: &str, table_index: u32, offset: u64, len: u64) {
        let (first, pages) = (offset >> TARGET_PAGE_SHIFT, len >> TARGET_PAGE_SHIFT);
        if let Some(b) = self.ram.read().by_name(name) {
            let _ = b.received().mark_received(first as usize, pages as usize);
        }
        self.latency.placed_run(key(table_index, first), pages);
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        self.stop_faults();
    }
}

/// The latency key of a page.
fn key(table_index: u32, page: u64) -> u64 {
    u64::from(table_index) << 48 | page
}

impl PostcopyTarget for Target {
    type Error = Error;

    fn start(&mut self, state: &[u8], table: &[&str]) -> Result<(), Error> {
        // Pages queue in the receive buffer too; a faulting vCPU waits
        // behind them.
        set_receive_buffer(
            &self.ret.lock().unwrap_or_else(|e| e.into_inner()),
            POSTCOPY_SOCKET_BUFFER,
        );
        let mut spans = Vec::new();
        {
            let view = self.ram.read();
            for (index, name) in table.iter().enumerate() {
                let block = view
                    .by_name(name)
                    .ok_or_else(|| Error::Postcopy(format!("no block {name:?}")))?;
                let reg = self
                    .uffd
                    .register_memory(block.memory(), RegisterMode::MISSING)?;
                spans.push(Span {
                    base: reg.base() as u64,
                    len: reg.len() as u64,
                    page_size: reg.page_size() as u64,
                    table_index: index as u32,
                });
                self.blocks.push((name.to_string(), reg, index as u32));
            }
        }
        let (uffd, latency, ret, stop, ram) = (
            self.uffd.clone(),
            self.latency.clone(),
            self.ret.clone(),
            self.stop.clone(),
            self.ram,
        );
        let names: Vec<String> = table.iter().map(|n| n.to_string()).collect();
        self.fault_thread = Some(
            std::thread::Builder::new()
                .name("uffd-faults".into())
                .spawn(move || serve_faults(&uffd, &spans, &names, &latency, &ret, &stop, ram))
                .map_err(|e| Error::Postcopy(format!("cannot start the fault thread: {e}")))?,
        );
        self.guest = Some((self.start_guest)(state).map_err(Error::Postcopy)?);
        Ok(())
    }

    fn place(&mut self, block: &str, offset: u64, data: &[u8]) -> Result<(), Error> {
        let (name, reg, index) = self.block(block)?;
        reg.place_run(&self.uffd, offset, data)?;
        let (name, index) = (name.clone(), *index);
        self.placed(&name, index, offset, data.len() as u64);
        Ok(())
    }

    fn place_zero(&mut self, block: &str, offset: u64, len: u64) -> Result<(), Error> {
        let (name, reg, index) = self.block(block)?;
        reg.zero_run(&self.uffd, offset, len)?;
        let (name, index) = (name.clone(), *index);
        self.placed(&name, index, offset, len);
        Ok(())
    }

    fn resumed(&mut self) -> Result<(), Error> {
        let conn = self
            .next_connection
            .take()
            .ok_or_else(|| Error::Postcopy("resumed without a new connection".into()))?;
        let mut ret = self.ret.lock().unwrap_or_else(|e| e.into_inner());
        set_receive_buffer(&conn, POSTCOPY_SOCKET_BUFFER);
        *ret = conn;
        // The map first, then the requests still waiting: the source reads
        // them in that order.
        let view = self.ram.read();
        let mut out = IoStream(&mut *ret);
        write_received_map(&mut out, &view)
            .map_err(|e| Error::Postcopy(format!("cannot send the received map: {e}")))?;
        drop(view);
        for k in self.latency.pending_keys() {
            let index = (k >> 48) as u32;
            let Some((_, reg, _)) = self.blocks.iter().find(|b| b.2 == index) else {
                continue;
            };
            let per_page = (reg.page_size() as u64 >> TARGET_PAGE_SHIFT).max(1);
            let page = k & ((1 << 48) - 1);
            let first = page - page % per_page;
            // Hugepages: one request per hugepage, not per target page.
            if first != page && per_page > 1 {
                continue;
            }
            let req = PageRequest {
                block: index,
                first,
                count: per_page as u32,
            };
            req.write(&mut out)
                .map_err(|e| Error::Postcopy(format!("cannot re-send requests: {e}")))?;
        }
        let _ = out.0.flush();
        Ok(())
    }
}

/// Reads the guest's faults and asks the source for each missing host page
/// once, until `stop`.
fn serve_faults(
    uffd: &Userfaultfd,
    spans: &[Span],
    names: &[String],
    latency: &FaultLatency,
    ret: &ReturnPath,
    stop: &AtomicBool,
    ram: &GuestRam,
) {
    while !stop.load(Ordering::Acquire) {
        let event = match uffd.read_event(Some(Duration::from_millis(50))) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                eprintln!("post-copy: reading faults failed: {e}");
                return;
            }
        };
        let Event::Pagefault { addr, .. } = event else {
            continue;
        };
        let Some(span) = spans
            .iter()
            .find(|s| addr >= s.base && addr < s.base + s.len)
        else {
            continue;
        };
        let offset = (addr - span.base) & !(span.page_size - 1);
        let first = offset >> TARGET_PAGE_SHIFT;
        let count = (span.page_size >> TARGET_PAGE_SHIFT).max(1);
        let k = key(span.table_index, first);
        if !latency.fault(k) {
            continue; // asked already
        }
        let name = &names[span.table_index as usize];
        let received = ram
            .read()
            .by_name(name)
            .is_some_and(|b| b.received().is_received(first as usize) == Ok(true));
        if received {
            // Placed while the fault was being read: nothing to ask for.
            latency.placed(k);
            continue;
        }
        let req = PageRequest {
            block: span.table_index,
            first,
            count: count as u32,
        };
        let mut conn = ret.lock().unwrap_or_else(|e| e.into_inner());
        // A broken connection: the request is sent again on resume.
        let _ = req.write(&mut IoStream(&mut *conn));
    }
}
