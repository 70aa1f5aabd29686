//! The receiving side: a thread per page channel running
//! [`receive_channel`], and the [`Gate`] where they and the main stream
//! meet at every barrier.

use super::shutdown_all;
use super::IncomingChannel;
use crate::transport::{Conn, ConnReader};
use ramblock_core::bitmap::Storage;
use ramblock_core::checksum::{Ledger, PageLedger};
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::migrate::channels::{receive_channel, ChannelGate, ChannelSummary, GateClosed};
use ramblock_core::migrate::receiver::BOUNCE_BYTES;
use ramblock_core::migrate::ReceiveError;
use ramblock_core::name::BlockName;
use std::io;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

/// The meeting point of the main stream and `channels` page channels (a
/// [`ChannelGate`] built on a mutex and a condition variable).
#[derive(Debug)]
pub struct Gate {
    channels: u32,
    table: OnceLock<Vec<BlockName>>,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Parties at the meeting in progress.
    arrived: u32,
    /// Meetings completed.
    completed: u32,
    closed: bool,
}

impl Gate {
    /// A gate for the main stream and `channels` page channels.
    pub fn new(channels: u32) -> Gate {
        Gate {
            channels,
            table: OnceLock::new(),
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        // Counters only: consistent after every statement.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait<'g>(&self, st: MutexGuard<'g, GateState>) -> MutexGuard<'g, GateState> {
        self.changed.wait(st).unwrap_or_else(|e| e.into_inner())
    }
}

impl ChannelGate for Gate {
    fn channels(&self) -> u32 {
        self.channels
    }

    fn publish_table(&self, names: &[BlockName]) {
        let _ = self.table.set(names.to_vec());
        let _st = self.lock();
        self.changed.notify_all();
    }

    fn table(&self) -> Result<&[BlockName], GateClosed> {
        let mut st = self.lock();
        loop {
            if let Some(table) = self.table.get() {
                return Ok(table);
            }
            if st.closed {
                return Err(GateClosed);
            }
            st = self.wait(st);
        }
    }

    fn meet(&self, generation: u32) -> Result<(), GateClosed> {
        let mut st = self.lock();
        // Each party checked its own barriers count up from 0 and waits
        // here for each meeting to complete, so all are at the same one.
        let _ = generation;
        let meeting = st.completed;
        st.arrived += 1;
        if st.arrived == self.channels + 1 {
            st.arrived = 0;
            st.completed += 1;
            self.changed.notify_all();
            return Ok(());
        }
        while st.completed == meeting {
            if st.closed {
                return Err(GateClosed);
            }
            st = self.wait(st);
        }
        Ok(())
    }

    fn close(&self) {
        let mut st = self.lock();
        st.closed = true;
        self.changed.notify_all();
    }
}

/// How the page channels of a receive ended.
#[derive(Debug)]
pub struct ChannelsReceived<H> {
    /// What each channel received, in channel order; a channel that
    /// failed is its error.
    pub channels: Vec<Result<ChannelSummary, ReceiveError<io::Error, H>>>,
}

impl<H> ChannelsReceived<H> {
    /// The first channel's error, if any failed.
    pub fn first_error(&self) -> Option<&ReceiveError<io::Error, H>> {
        self.channels.iter().find_map(|c| c.as_ref().err())
    }
}

/// Receives on `conns` (page channels whose [`ChannelHello`](ramblock_core::stream::format::ChannelHello)
/// was read, in channel order) beside the main stream, which `main` receives
/// with a [`Receiver`](ramblock_core::migrate::Receiver) given the gate it
/// is passed ([`Receiver::with_channels`](ramblock_core::migrate::Receiver::with_channels)).
/// Each channel thread writes its pages into `list` and records them in
/// `ledger` (the receiver's, if it has one). A channel that ends closes
/// the gate, so nobody waits for it at a barrier; one that fails also
/// calls `abort`, which must make `main`'s reads return (shut its
/// connection down). With no channels (a source that announced none)
/// `main` runs alone, with a gate of none, which the receiver accepts for
/// a header that announces none. When `main`
/// returns, the gate closes and the channels are shut down (after a
/// verified `End` nothing more may come on them), and their threads are
/// joined.
pub fn receive_page_channels<'l, M, S, const N: usize, T>(
    list: &RamList<'l, M, S, N>,
    ledger: Option<&Ledger>,
    fresh: bool,
    channels: Vec<IncomingChannel>,
    abort: &(dyn Fn() + Sync),
    main: impl FnOnce(&Gate) -> T,
) -> io::Result<(T, ChannelsReceived<M::Error>)>
where
    M: HostMemory,
    S: Storage,
    M::Error: Send,
    RamList<'l, M, S, N>: Sync,
{
    let count = u32::try_from(channels.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many page channels"))?;
    let (conns, readers): (Vec<Conn>, Vec<ConnReader>) =
        channels.into_iter().map(|c| (c.conn, c.reader)).unzip();
    let gate = Gate::new(count);
    let (result, channels) = std::thread::scope(|scope| {
        let threads: Vec<_> = readers
            .into_iter()
            .map(|mut r| {
                let gate = &gate;
                scope.spawn(move || {
                    let mut bounce = vec![0u8; BOUNCE_BYTES];
                    let mut ledger = ledger;
                    let ledger = ledger.as_mut().map(|l| l as &mut dyn PageLedger);
                    let result = receive_channel(list, &mut r, gate, ledger, fresh, &mut bounce);
                    // A channel that ended, well or not, meets nobody
                    // again: whoever waits for it must stop waiting.
                    gate.close();
                    if result.is_err() {
                        abort();
                    }
                    result
                })
            })
            .collect();
        let result = main(&gate);
        gate.close();
        shutdown_all(&conns);
        let channels = threads
            .into_iter()
            .map(|t| t.join().unwrap_or(Err(ReceiveError::ChannelFailed)))
            .collect();
        (result, channels)
    });
    Ok((result, ChannelsReceived { channels }))
}
