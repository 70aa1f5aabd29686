//! Device state: at a pre-copy switch-over `Section` records, each a
//! [`SectionHeader`] and its bytes, handed to the VMM through a
//! [`SectionSink`] after the final RAM pass and before `End`; at a switch
//! to post-copy the same sections inside the `Postcopy` record, through
//! the same sink and bound, before the guest starts.
//!
//! The body is streamed to the sink in pieces of at most the bounce
//! buffer's size, so the core allocates nothing whatever a section claims;
//! all sections of one stream together, headers included, are bounded by
//! the receiver's device-state limit. A refusal by the VMM is a
//! [`ReceiveError::SectionRefused`], which reaches the source as an `RBSR`
//! acknowledgement naming the section by its position: the source then
//! resumes its guest.

use super::{ReceiveError, ReceiveEvent, Result2, Session};
use crate::bitmap::Storage;
use crate::host::HostMemory;
use crate::section::SectionHeader;
use crate::stream::io::ByteRead;

/// Where the destination's VMM loads device state.
pub trait SectionSink {
    /// Bytes `offset .. offset + bytes.len()` of the section `header`
    /// names, in order (a section of zero bytes gets no call). `Err(code)`
    /// refuses the section with the VMM's own error code.
    fn load(&mut self, header: &SectionHeader, offset: u64, bytes: &[u8]) -> Result<(), u32>;

    /// The whole section arrived; `Err(code)` refuses it (say, it does not
    /// parse, or no device has that name and instance).
    fn done(&mut self, header: &SectionHeader) -> Result<(), u32>;
}

impl<R: ByteRead, M: HostMemory, S: Storage, const N: usize, F: FnMut(ReceiveEvent)>
    Session<'_, '_, '_, R, M, S, N, F>
{
    /// `Section`: reads the header, checks the bound, and streams the
    /// body to the VMM's sink.
    pub(super) fn on_section(&mut self) -> Result2<(), R, M> {
        if self.rx.postcopy {
            return Err(ReceiveError::OutOfPlace {
                record: "section",
                why: "device state travels at a pre-copy switch-over, not after post-copy started",
            });
        }
        self.read_section()
    }

    /// One section, as a `Section` record or inside the `Postcopy` record
    /// carries it: the header, the bound, and the body to the sink.
    pub(super) fn read_section(&mut self) -> Result2<(), R, M> {
        let mut raw = [0u8; SectionHeader::ENCODED_LEN];
        self.r.read_exact(&mut raw)?;
        let header = SectionHeader::decode(&raw).map_err(ReceiveError::BadSection)?;
        let limit = self.rx.state_limit;
        // Header bytes count too, so the bound also limits how many
        // (empty) sections a peer can send.
        let total = self
            .rx
            .state_bytes
            .saturating_add(SectionHeader::ENCODED_LEN as u64)
            .saturating_add(header.len);
        if total > limit {
            return Err(ReceiveError::DeviceStateOverLimit { total, limit });
        }
        self.rx.state_bytes = total;
        let sink = self
            .rx
            .sections
            .as_deref_mut()
            .ok_or(ReceiveError::SectionsUnsupported)?;
        let index = self.rx.state_sections;
        self.rx.state_sections = index.saturating_add(1);
        let refused = |code| ReceiveError::SectionRefused {
            index,
            name: header.name.clone(),
            instance_id: header.instance_id,
            code,
        };
        let mut offset = 0u64;
        while offset < header.len {
            let n = (header.len - offset).min(self.rx.bounce.len() as u64) as usize;
            let chunk = &mut self.rx.bounce[..n];
            self.r.read_exact(chunk)?;
            sink.load(&header, offset, chunk).map_err(refused)?;
            offset += n as u64;
        }
        sink.done(&header).map_err(refused)
    }
}
