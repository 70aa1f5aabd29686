//! The receiving side: one migration from a TCP connection into guest RAM,
//! acknowledged on the same connection.

use crate::memory::GuestRam;
use crate::source::STREAM_BUFFER;
use ramblock_core::checksum::Ledger;
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::receiver::{send_ack, ReceiveSummary, Receiver, BOUNCE_BYTES};
use std::io::BufReader;
use std::net::{Shutdown, TcpStream};

/// Receives one stream into `ram` and answers the source. On error the
/// connection is shut down, so a source still sending notices at once.
/// `fresh`: `ram` holds only zeros (new memory), so zero pages need no look.
pub fn receive(ram: &GuestRam, stream: TcpStream, fresh: bool) -> Result<ReceiveSummary, String> {
    let mut bounce = vec![0u8; BOUNCE_BYTES];
    // The end checksums come from what was received, page by page, so
    // verifying them adds nothing to the downtime.
    let mut ledger = Ledger::new();
    let mut receiver = Receiver::new(&mut bounce)
        .map_err(|e| e.to_string())?
        .with_ledger(&mut ledger);
    if fresh {
        receiver = receiver.with_fresh_destination();
    }
    let reader = stream
        .try_clone()
        .map_err(|e| format!("cannot clone the connection: {e}"))?;
    let mut input = IoStream(BufReader::with_capacity(STREAM_BUFFER, reader));
    let result = receiver.receive(ram, &mut input, |_| {});
    let acked = send_ack(&mut IoStream(&stream), &result);
    if result.is_err() {
        let _ = stream.shutdown(Shutdown::Both);
    }
    let summary = result.map_err(|e| format!("destination refused the stream: {e}"))?;
    acked.map_err(|e| format!("cannot acknowledge: {e}"))?;
    Ok(summary)
}
