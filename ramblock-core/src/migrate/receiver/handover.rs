//! How a receive ends on the wire: the acknowledgement of the `End`
//! record, then, after a pre-copy, the handover.
//!
//! Until the destination says its guest runs, the source keeps everything:
//! its guest stays paused, and a refusal, a failure or silence makes it
//! resume the guest where it stopped. So after a good pre-copy receive the
//! destination's VMM gets a [`Handover`]: it loads the device state its
//! [`SectionSink`](super::SectionSink) took, starts its vCPUs, and then
//! [confirms](Handover::confirm) (or [refuses](Handover::refuse) with its
//! own code). A post-copy receive has no handover: the guest started here
//! at the `Postcopy` record already.
//!
//! The source cannot know whether a confirmation it never received was
//! sent: if it gives up waiting (its timeout), it resumes its guest. A
//! VMM whose confirmation could not be written (the connection broke)
//! should therefore stop the guest it started, and one that cannot start
//! its vCPUs in time should refuse rather than confirm late.

use super::{ReceiveError, ReceiveSummary};
use crate::stream::format::{ACK_ERR, ACK_OK, ACK_SECTION, NOT_RUNNING, RUNNING};
use crate::stream::io::ByteWrite;

/// The destination's last word after a good pre-copy receive: its guest
/// runs ([`confirm`](Self::confirm)), or it could not start it
/// ([`refuse`](Self::refuse)). The source's guest stays paused until one
/// of them arrives, and resumes on a refusal or after its timeout.
#[must_use = "the source keeps its guest paused until the handover is confirmed or refused"]
#[derive(Debug)]
pub struct Handover(());

impl Handover {
    /// The destination's vCPUs run: the source's guest is the
    /// destination's now. Call it once they do, not before.
    pub fn confirm<W: ByteWrite>(self, w: &mut W) -> Result<(), W::Error> {
        Self::send(w, RUNNING, 0)
    }

    /// The destination could not load the device state or start its
    /// vCPUs (`code` is the VMM's own); the source resumes its guest.
    pub fn refuse<W: ByteWrite>(self, w: &mut W, code: u32) -> Result<(), W::Error> {
        Self::send(w, NOT_RUNNING, code)
    }

    fn send<W: ByteWrite>(w: &mut W, magic: [u8; 4], code: u32) -> Result<(), W::Error> {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&magic);
        b[4..].copy_from_slice(&code.to_le_bytes());
        w.write_all(&b)?;
        w.flush()
    }
}

/// Tells the source how the receive ended: [`ACK_OK`]; [`ACK_SECTION`]
/// with the section's index and the VMM's code when the VMM refused a
/// device-state section; or [`ACK_ERR`] and the error's code. After a good
/// pre-copy receive, returns the [`Handover`] the VMM must confirm once
/// its guest runs.
pub fn acknowledge<W: ByteWrite, E, H>(
    w: &mut W,
    result: &Result<ReceiveSummary, ReceiveError<E, H>>,
) -> Result<Option<Handover>, W::Error> {
    match result {
        Ok(summary) => {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&ACK_OK);
            w.write_all(&b)?;
            w.flush()?;
            Ok((!summary.postcopy).then_some(Handover(())))
        }
        Err(ReceiveError::SectionRefused { index, code, .. }) => {
            let mut b = [0u8; 12];
            b[..4].copy_from_slice(&ACK_SECTION);
            b[4..8].copy_from_slice(&index.to_le_bytes());
            b[8..].copy_from_slice(&code.to_le_bytes());
            w.write_all(&b)?;
            w.flush().map(|()| None)
        }
        Err(e) => {
            let mut b = [0u8; 8];
            b[..4].copy_from_slice(&ACK_ERR);
            b[4..].copy_from_slice(&e.code().to_le_bytes());
            w.write_all(&b)?;
            w.flush().map(|()| None)
        }
    }
}

/// [`acknowledge`], confirming the handover at once: for a destination
/// with no vCPUs to start (a copy of RAM only), whose guest is as ready as
/// it will be when the checksums matched.
pub fn send_ack<W: ByteWrite, E, H>(
    w: &mut W,
    result: &Result<ReceiveSummary, ReceiveError<E, H>>,
) -> Result<(), W::Error> {
    match acknowledge(w, result)? {
        Some(handover) => handover.confirm(w),
        None => Ok(()),
    }
}
