//! Page channels over the transport's connections: pre-copy pages spread
//! over several connections beside the main stream
//! ([`ramblock_core::migrate::channels`] has the design and the ordering
//! rules; docs/stream-format.md the wire format).
//!
//! The source connects the main stream, then `count` more connections
//! (`Connector::connect` each) and migrates inside [`with_page_channels`],
//! which writes each channel's hello, runs a sending thread per channel and
//! hands the engine a [`ChannelSender`] for
//! [`migrate_with_channels`](ramblock_core::migrate::migrate_with_channels).
//! The destination accepts the main stream, then the channels
//! ([`Listener::accept_page_channels`](crate::transport::Listener::accept_page_channels)),
//! and receives inside [`receive_page_channels`], which runs a receiving
//! thread per channel and hands the main stream's receiver the [`Gate`]
//! they meet at. Both sides must share one [`Ledger`](ramblock_core::checksum::Ledger)
//! between the main stream and the channels, if they keep one.
//!
//! Channels are admitted like the main stream: by their first bytes (a
//! [`ChannelHello`](ramblock_core::stream::format::ChannelHello) for the
//! expected count), and over TLS by the peer's certificate. A channel from
//! another peer could only write pages the `End` record's checksums then
//! refuse, before the guest runs here.

mod receive;
mod send;

pub use receive::{receive_page_channels, ChannelsReceived, Gate};
pub use send::{with_page_channels, ChannelSender};

use crate::transport::{Conn, ConnReader};

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
