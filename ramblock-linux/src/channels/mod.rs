//! Page channels over the transport's connections: pre-copy pages spread
//! over several connections beside the main stream
//! ([`ramblock_core::migrate::channels`] has the design and the ordering
//! rules; docs/stream-format.md the wire format).
//!
//! The source connects the main stream, then `count` more connections
//! (`Connector::connect` each) and migrates inside [`with_page_channels`],
//! which writes each channel's hello, runs a sending thread per channel and
//! hands the engine a [`ChannelSender`] for
//! [`migrate_with_channels`](ramblock_core::migrate::migrate_with_channels);
//! or it lets each channel's thread connect while the engine sends the
//! header ([`with_page_channels_connecting`], needed over TLS, whose
//! handshake the destination answers only after the header).
//! The destination accepts the main stream, whose header announces how
//! many channels follow ([`Conn::page_channels`](crate::transport::Conn::page_channels)),
//! then exactly that many
//! ([`Listener::accept_page_channels`](crate::transport::Listener::accept_page_channels)),
//! and receives inside [`receive_page_channels`], which runs a receiving
//! thread per channel and hands the main stream's receiver the [`Gate`]
//! they meet at (the receiver refuses a header announcing another count
//! than the gate's). Both sides must share one [`Ledger`](ramblock_core::checksum::Ledger)
//! between the main stream and the channels, if they keep one. How many
//! channels a source opens is its own choice; [`default_channel_count`] is
//! the measured default.
//!
//! ```no_run
//! use ramblock_linux::transport::Listener;
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = Listener::bind("127.0.0.1:4444")?;
//! let main = listener.accept_migration(None)?;
//! // As many as the source announced: none for a source without channels.
//! let channels = listener.accept_page_channels(main.page_channels(), Duration::from_secs(30))?;
//! // receive_page_channels(&list, Some(&ledger), fresh, channels, &abort, |gate| {
//! //     receiver.with_channels(gate).receive(&list, &mut main.reader()?, |_| {})
//! // })
//! # let _ = channels;
//! # Ok(())
//! # }
//! ```
//!
//! Channels are admitted like the main stream: by their first bytes (a
//! [`ChannelHello`](ramblock_core::stream::format::ChannelHello) for the
//! expected count), and over TLS by the peer's certificate. A channel from
//! another peer could only write pages the `End` record's checksums then
//! refuse, before the guest runs here.

mod receive;
mod send;

pub use receive::{receive_page_channels, ChannelsReceived, Gate};
pub use send::{with_page_channels, with_page_channels_connecting, ChannelSender};

use crate::transport::{Conn, ConnReader};
use ramblock_core::stream::format::MAX_PAGE_CHANNELS;

/// Most page channels [`default_channel_count`] picks: past this the
/// channels' threads only compete with each other and the guest.
pub const DEFAULT_CHANNELS_CAP: u32 = 8;

/// How many page channels a source opens unless told otherwise:
/// [`channels_for_cpus`] of the CPUs this process may run on
/// ([`std::thread::available_parallelism`]); 0 (pages on the main stream)
/// when that is unknown.
pub fn default_channel_count() -> u32 {
    std::thread::available_parallelism().map_or(0, |n| channels_for_cpus(n.get()))
}

/// The default policy for `cpus` CPUs: two channels per CPU, at most
/// [`DEFAULT_CHANNELS_CAP`]. A channel's thread spends much of its time
/// waiting for its socket, so two per CPU keep the CPUs busy: on a
/// 2-CPU host 4 channels beat 2, which beat the one stream
/// (BENCHMARKS.md, "Page channels on a quiet machine").
pub fn channels_for_cpus(cpus: usize) -> u32 {
    let cpus = u32::try_from(cpus).unwrap_or(u32::MAX);
    cpus.saturating_mul(2)
        .min(DEFAULT_CHANNELS_CAP)
        .min(MAX_PAGE_CHANNELS)
}

/// An accepted page channel: its connection, and the reader its hello was
/// read from (which may hold bytes read ahead).
#[derive(Debug)]
pub struct IncomingChannel {
    /// The connection (to shut it down).
    pub conn: Conn,
    /// Where the channel's records are read from.
    pub reader: ConnReader,
}

/// Shuts every connection down, both ways: a thread blocked on one
/// returns, and the peer sees the end.
fn shutdown_all<'c>(conns: impl IntoIterator<Item = &'c Conn>) {
    for conn in conns {
        conn.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_channels_per_cpu_up_to_the_cap() {
        assert_eq!(channels_for_cpus(0), 0);
        assert_eq!(channels_for_cpus(1), 2);
        assert_eq!(channels_for_cpus(2), 4);
        assert_eq!(channels_for_cpus(3), 6);
        assert_eq!(channels_for_cpus(4), DEFAULT_CHANNELS_CAP);
        assert_eq!(channels_for_cpus(usize::MAX), DEFAULT_CHANNELS_CAP);
        assert!(default_channel_count() <= DEFAULT_CHANNELS_CAP);
    }
}
