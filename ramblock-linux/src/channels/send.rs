//! The sending side: one thread per page channel taking runs from a shared
//! queue, so a channel whose runs hold more data pages than another's does
//! not hold the others back.

use super::shutdown_all;
use crate::transport::{Conn, ConnWriter};
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Storage;
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::migrate::channels::{
    write_run, ChannelFailure, ChannelFailureKind, PageChannels, RunCounts, RunError,
};
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{ChannelHello, Record};
use ramblock_core::stream::io::ByteWrite;
use std::collections::VecDeque;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard};

/// Runs queued per channel at most: enough that no channel idles while the
/// engine walks the bitmap, few enough that a barrier comes soon.
const QUEUE_PER_CHANNEL: usize = 8;

/// A run handed to the channels.
struct Job {
    block: u32,
    name: BlockName,
    first: u64,
    count: u32,
}

/// What the engine and the channel threads share.
struct State {
    jobs: VecDeque<Job>,
    /// The barrier being written, which channels still owe it, and how
    /// many took it and are writing it.
    barrier: Option<u32>,
    owed: Vec<bool>,
    writing_barrier: usize,
    /// Counts since the last barrier.
    sent: RunCounts,
    failed: Option<ChannelFailure>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    /// Channel threads wait here for a run, a barrier or the stop.
    work: Condvar,
    /// The engine waits here for room in the queue or a finished barrier.
    progress: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every holder leaves the state consistent between statements; a
        // panicking channel thread is reported by the scope's join.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The engine waits until `ready` holds, or a channel failed.
    fn wait_for(
        &self,
        ready: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'_, State>, ChannelFailure> {
        let mut st = self.lock();
        loop {
            if let Some(failure) = &st.failed {
                return Err(failure.clone());
            }
            if ready(&st) {
                return Ok(st);
            }
            st = self.progress.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn fail(&self, failure: ChannelFailure) {
        let mut st = self.lock();
        st.failed.get_or_insert(failure);
        self.work.notify_all();
        self.progress.notify_all();
    }
}

/// The engine's handle on the page channels: a [`PageChannels`] for
/// [`migrate_with_channels`](ramblock_core::migrate::migrate_with_channels).
pub struct ChannelSender<'s> {
    shared: &'s Shared,
    count: u32,
    /// Every channel's connection (those connected so far), for their send
    /// queues.
    conns: &'s Mutex<Vec<Conn>>,
}

impl std::fmt::Debug for ChannelSender<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChannelSender({} channels)", self.count)
    }
}

impl PageChannels for ChannelSender<'_> {
    fn count(&self) -> u32 {
        self.count
    }

    fn send(
        &mut self,
        block: u32,
        name: &BlockName,
        first: u64,
        count: u32,
    ) -> Result<(), ChannelFailure> {
        let cap = QUEUE_PER_CHANNEL * self.count as usize;
        let mut st = self.shared.wait_for(|st| st.jobs.len() < cap)?;
        st.jobs.push_back(Job {
            block,
            name: name.clone(),
            first,
            count,
        });
        self.shared.work.notify_one();
        Ok(())
    }

    fn barrier(&mut self, generation: u32) -> Result<RunCounts, ChannelFailure> {
        {
            let mut st = self.shared.lock();
            st.barrier = Some(generation);
            st.owed.iter_mut().for_each(|o| *o = true);
            self.shared.work.notify_all();
        }
        // Every channel wrote and flushed it: after this, nothing of the
        // pass is left on any channel's side.
        let mut st = self
            .shared
            .wait_for(|st| st.owed.iter().all(|o| !o) && st.writing_barrier == 0)?;
        st.barrier = None;
        Ok(std::mem::take(&mut st.sent))
    }

    fn close(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work.notify_all();
        // Each channel's last write was the barrier, flushed (see
        // `barrier`): the destination reads it, then the end of the
        // connection, and its receiver ends cleanly.
        shutdown_all(self.conns.lock().unwrap_or_else(|e| e.into_inner()).iter());
    }

    fn unsent_bytes(&self) -> u64 {
        let page = ramblock_core::addr::TARGET_PAGE_SIZE;
        let queued: u64 = (self.shared.lock().jobs.iter())
            .map(|job| u64::from(job.count) * page)
            .sum();
        let conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        queued + conns.iter().map(Conn::unsent_bytes).sum::<u64>()
    }
}

/// Runs `f` with page channels over `conns` (connected to the destination's
/// channel listener, in channel order): writes each channel's
/// [`ChannelHello`], starts a sending thread per channel, and hands `f` the
/// [`ChannelSender`] to migrate with. Each thread reads the runs it takes
/// from `list` itself, records them in `ledger` (the one the migration's
/// host returns, if any) and writes them on its own connection. When `f`
/// returns, the threads stop and every channel is shut down (after the
/// final barrier all they sent is on its way; after a failure a thread
/// blocked on a dead peer is released). A failed channel fails the
/// migration through the engine; `f`'s result is returned as it is.
///
/// Over TLS, use [`with_page_channels_connecting`]: a channel's
/// handshake waits for a destination that first waits for the main
/// stream's header, which `f` only sends.
pub fn with_page_channels<'l, M, S, const N: usize, T>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    conns: Vec<Conn>,
    f: impl FnOnce(&mut ChannelSender<'_>) -> T,
) -> io::Result<T>
where
    M: HostMemory,
    S: Storage,
    RamList<'l, M, S, N>: Sync,
{
    let count = channel_count(conns.len())?;
    let mut writers = Vec::with_capacity(conns.len());
    for (index, conn) in conns.iter().enumerate() {
        writers.push(Some(hello(conn, index, count)?));
    }
    run_channels(list, ledger, count, conns, writers, &|| unreachable!(), f)
}

/// [`with_page_channels`] with `count` channels that each connect on their
/// own thread (`connect`, say a [`Connector`](crate::transport::Connector)'s),
/// while `f` runs, then write their hello: the engine's header goes out
/// first, so a destination that accepts the main stream before the
/// channels, and a TLS handshake that needs the destination's answer,
/// never wait for each other. A channel that cannot connect fails the
/// migration like one whose connection breaks.
pub fn with_page_channels_connecting<'l, M, S, const N: usize, T>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    count: u32,
    connect: &(dyn Fn() -> io::Result<Conn> + Sync),
    f: impl FnOnce(&mut ChannelSender<'_>) -> T,
) -> io::Result<T>
where
    M: HostMemory,
    S: Storage,
    RamList<'l, M, S, N>: Sync,
{
    let count = channel_count(count as usize)?;
    let writers = (0..count).map(|_| None).collect();
    run_channels(list, ledger, count, Vec::new(), writers, connect, f)
}

/// The count of `len` channels: 1 at least.
fn channel_count(len: usize) -> io::Result<u32> {
    u32::try_from(len)
        .ok()
        .filter(|&c| c > 0)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no page channels"))
}

/// Writes channel `index`'s hello on `conn`; its writer.
fn hello(conn: &Conn, index: usize, count: u32) -> io::Result<ConnWriter> {
    let mut w = conn.writer()?;
    ChannelHello {
        index: index as u32,
        count,
    }
    .write(&mut w)?;
    w.flush()?;
    Ok(w)
}

/// The channel threads around `f`: channel `i` sends on `writers[i]`, or
/// (`None`) connects with `connect` first. Every connection, given or made,
/// is shut down when `f` returns.
#[allow(clippy::too_many_arguments)]
fn run_channels<'l, M, S, const N: usize, T>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    count: u32,
    conns: Vec<Conn>,
    writers: Vec<Option<ConnWriter>>,
    connect: &(dyn Fn() -> io::Result<Conn> + Sync),
    f: impl FnOnce(&mut ChannelSender<'_>) -> T,
) -> io::Result<T>
where
    M: HostMemory,
    S: Storage,
    RamList<'l, M, S, N>: Sync,
{
    let shared = Shared {
        state: Mutex::new(State {
            jobs: VecDeque::new(),
            barrier: None,
            owed: vec![false; writers.len()],
            writing_barrier: 0,
            sent: RunCounts::default(),
            failed: None,
            stop: false,
        }),
        work: Condvar::new(),
        progress: Condvar::new(),
    };
    // Connections made on the threads join the given ones, to be shut down.
    let conns = Mutex::new(conns);
    Ok(std::thread::scope(|scope| {
        for (index, w) in writers.into_iter().enumerate() {
            let (shared, conns) = (&shared, &conns);
            scope.spawn(move || {
                let w = match w {
                    Some(w) => w,
                    None => match connected(shared, conns, connect, index, count) {
                        Some(w) => w,
                        None => return,
                    },
                };
                channel_thread(list, ledger, shared, index, count, w)
            });
        }
        let result = f(&mut ChannelSender {
            shared: &shared,
            count,
            conns: &conns,
        });
        {
            let mut st = shared.lock();
            st.stop = true;
            shared.work.notify_all();
        }
        shutdown_all(conns.lock().unwrap_or_else(|e| e.into_inner()).iter());
        result
    }))
}

/// What a channel's connection error was: its write timeout passing (the
/// destination stopped reading: `EAGAIN`, or the transport's `TimedOut`
/// that says so, which carries no OS error) or the OS error, a kernel
/// `ETIMEDOUT` (the peer's host gone) among them.
fn failure_kind(e: &io::Error) -> ChannelFailureKind {
    match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::WouldBlock, _) | (io::ErrorKind::TimedOut, None) => {
            ChannelFailureKind::Stalled
        }
        (_, errno) => ChannelFailureKind::Io(errno.unwrap_or(0)),
    }
}

/// Channel `index` connects and says hello; its writer, or `None` when it
/// failed (the failure is recorded) or the channels stopped meanwhile.
fn connected(
    shared: &Shared,
    conns: &Mutex<Vec<Conn>>,
    connect: &(dyn Fn() -> io::Result<Conn> + Sync),
    index: usize,
    count: u32,
) -> Option<ConnWriter> {
    let failed = |e: io::Error| {
        shared.fail(ChannelFailure {
            channel: index as u32,
            what: failure_kind(&e),
        })
    };
    let conn = connect().map_err(failed).ok()?;
    {
        // Under the list's lock: the stop either comes first (then this
        // one is shut down here) or shuts it down with the others.
        let mut all = conns.lock().unwrap_or_else(|e| e.into_inner());
        if shared.lock().stop {
            conn.shutdown();
            return None;
        }
        all.push(conn.try_clone().map_err(failed).ok()?);
    }
    hello(&conn, index, count).map_err(failed).ok()
}

/// What a channel thread does next.
enum Task {
    Run(Box<Job>),
    Barrier(u32),
    Stop,
}

fn next_task(shared: &Shared, index: usize) -> Task {
    let mut st = shared.lock();
    loop {
        if st.stop || st.failed.is_some() {
            return Task::Stop;
        }
        if let Some(job) = st.jobs.pop_front() {
            shared.progress.notify_one();
            return Task::Run(Box::new(job));
        }
        // Only with the queue empty: every run handed before the barrier
        // goes out before it, on whichever channel took it.
        if let (Some(generation), true) = (st.barrier, st.owed[index]) {
            st.owed[index] = false;
            st.writing_barrier += 1;
            return Task::Barrier(generation);
        }
        st = shared.work.wait(st).unwrap_or_else(|e| e.into_inner());
    }
}

fn channel_thread<'l, M, S, const N: usize, W>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    shared: &Shared,
    index: usize,
    count: u32,
    mut out: W,
) where
    M: HostMemory,
    S: Storage,
    W: ByteWrite<Error = io::Error>,
{
    let failure = |what| ChannelFailure {
        channel: index as u32,
        what,
    };
    let io_failure = |e: io::Error| failure(failure_kind(&e));
    loop {
        let task = next_task(shared, index);
        let barrier = matches!(task, Task::Barrier(_));
        let sent = match task {
            Task::Stop => return,
            Task::Run(job) => send_job(list, ledger, &mut out, &job).map_err(|e| match e {
                SendError::Io(e) => io_failure(e),
                SendError::Gone => failure(ChannelFailureKind::BlockRemoved(job.block)),
                SendError::Outside => failure(ChannelFailureKind::OutsideBlock),
            }),
            Task::Barrier(generation) => {
                let record = Record::Barrier {
                    generation,
                    channels: count,
                };
                record
                    .write(&mut out)
                    .and_then(|()| out.flush())
                    .map(|()| RunCounts {
                        bytes: record.wire_len() as u64,
                        ..RunCounts::default()
                    })
                    .map_err(io_failure)
            }
        };
        match sent {
            Ok(sent) => {
                let mut st = shared.lock();
                st.sent.add(sent);
                if barrier {
                    st.writing_barrier -= 1;
                }
                shared.progress.notify_all();
            }
            Err(failure) => {
                shared.fail(failure);
                return;
            }
        }
    }
}

enum SendError {
    Io(io::Error),
    Gone,
    Outside,
}

/// Sends one run, reading it from the list under a shared lock of its own.
fn send_job<'l, M, S, const N: usize, W>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    out: &mut W,
    job: &Job,
) -> Result<RunCounts, SendError>
where
    M: HostMemory,
    S: Storage,
    W: ByteWrite<Error = io::Error>,
{
    let view = list.read();
    let block = view.by_name(job.name.as_str()).ok_or(SendError::Gone)?;
    let region = block.region();
    let run = region
        .subregion(
            ByteLen::from_pages(job.first),
            job.count as usize * ramblock_core::addr::TARGET_PAGE_SIZE as usize,
        )
        .map_err(|_| SendError::Outside)?;
    let mut shared_ledger = ledger;
    let ledger = shared_ledger.as_mut().map(|l| l as &mut dyn PageLedger);
    write_run(out, ledger, job.block, job.first, &run).map_err(|e| match e {
        RunError::Write(e) => SendError::Io(e),
        RunError::OutsideBlock(_) => SendError::Outside,
    })
}
