//! Why a migration failed, for both phases of the sending side.

use super::channels::ChannelFailure;
use crate::dirty_log::DirtyLogSource;
use crate::name::BlockName;
use crate::region::RegionError;
use crate::section::SectionName;
use crate::stream::format::PageRequest;
use crate::stream::io::{ByteRead, ByteWrite, ReadError};
use core::fmt;

/// Why a migration failed. The source guest is running again.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrateError<D, W, R> {
    /// The buffer passed in holds less than one page.
    BufferTooSmall,
    /// The hypervisor's dirty log failed.
    DirtyLog(D),
    /// Writing the stream failed (connection closed?).
    Write(W),
    /// Reading the receiver's acknowledgement failed.
    Ack(ReadError<R>),
    /// The receiver refused the stream with this error code
    /// (`ReceiveError::code`).
    Refused(u32),
    /// The receiver answered something that is not an acknowledgement.
    BadAck,
    /// The host's device-state sections changed between the engine's two
    /// looks at them (the host must answer the same both times); nothing
    /// more was sent and the guest resumed.
    DeviceStateChanged,
    /// The destination's VMM refused a device-state section.
    SectionRefused {
        /// The section's position in the stream, from 0.
        index: u32,
        /// Its name, as the source sent it.
        name: SectionName,
        /// Its instance id.
        instance_id: u32,
        /// The VMM's own code.
        code: u32,
    },
    /// The destination verified the RAM but could not start the guest
    /// (the VMM's own code): the handover was refused.
    NotRunning(u32),
    /// The destination verified the RAM but did not say whether its guest
    /// runs: the return path failed or stayed silent past the host's
    /// timeout ([`MigrationHost::handover_wait_ns`](super::MigrationHost::handover_wait_ns)).
    NoHandover {
        /// Why the read failed (a timeout is the transport's error).
        error: ReadError<R>,
        /// How long the engine waited.
        waited_ns: u64,
        /// The host's bound on the wait.
        timeout_ns: u64,
    },
    /// After its acknowledgement the destination answered something that
    /// is not a handover.
    BadHandover,
    /// A block was removed during the migration.
    BlockRemoved(BlockName),
    /// A migratable block was added during the migration.
    BlockAdded(BlockName),
    /// Post-copy: the destination asked for pages that do not exist.
    BadRequest(PageRequest),
    /// Post-copy: the connection broke and could not be resumed. The
    /// guest's memory is split between the two sides: the source keeps its
    /// paused guest and every page, so a new attempt can still finish.
    PostcopyLost,
    /// A dirty run reached outside its block's memory: the dirty bitmap
    /// and the block's length disagree (a bug, refused rather than read).
    RunOutsideBlock(RegionError),
    /// No pass's estimated pause fit the downtime limit within the pass
    /// limit; the guest was never paused and runs on at the source.
    DowntimeUnreachable {
        /// The last pass's estimate of the pause.
        estimated_ns: u64,
        /// The configured limit.
        limit_ns: u64,
        /// Passes run.
        passes: u32,
    },
    /// A page channel failed ([`crate::migrate::channels`]).
    Channel(ChannelFailure),
    /// More page channels than a stream header can announce to a
    /// destination ([`MAX_PAGE_CHANNELS`](crate::stream::format::MAX_PAGE_CHANNELS));
    /// nothing was sent.
    TooManyChannels {
        /// The channels given.
        count: u32,
        /// The most a migration may use.
        max: u32,
    },
    /// The VMM's device-state sections exceed
    /// [`MigrationHost::device_state_limit`](super::MigrationHost::device_state_limit)
    /// together, or one exceeds [`MAX_SECTION_LEN`](crate::section::MAX_SECTION_LEN)
    /// (then `total` is its length and `limit` that bound); nothing of them
    /// was sent and the guest resumed at the source.
    DeviceStateTooLarge {
        /// Bytes of all sections, headers included.
        total: u64,
        /// The limit.
        limit: u64,
    },
}

impl<D, W, R> MigrateError<D, W, R> {
    /// Whether the destination refused before it could have started the
    /// guest, though the source had switched to post-copy: it refused the
    /// `Postcopy` record's device state (the only place sections come in
    /// post-copy), or it does no post-copy at all
    /// ([`POSTCOPY_UNSUPPORTED_CODE`](super::POSTCOPY_UNSUPPORTED_CODE)).
    /// The engine then resumes the source's guest, as in pre-copy; any
    /// other failure after the switch leaves it paused.
    pub fn refused_before_the_guest_started(&self) -> bool {
        matches!(
            self,
            MigrateError::SectionRefused { .. }
                | MigrateError::Refused(super::POSTCOPY_UNSUPPORTED_CODE)
        )
    }
}

impl<D: fmt::Display, W: fmt::Display, R: fmt::Display> fmt::Display for MigrateError<D, W, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrateError::BufferTooSmall => {
                f.write_str("the send buffer must hold at least one 4 KiB page")
            }
            MigrateError::DirtyLog(e) => write!(f, "dirty log failed: {e}"),
            MigrateError::Write(e) => write!(f, "sending failed: {e}"),
            MigrateError::Channel(e) => write!(f, "sending failed: {e}"),
            MigrateError::TooManyChannels { count, max } => write!(
                f,
                "{count} page channels asked for, at most {max} can be announced to a destination"
            ),
            MigrateError::Ack(e) => write!(f, "no acknowledgement from the destination: {e}"),
            MigrateError::Refused(code) => {
                write!(f, "the destination refused the stream (error code {code})")
            }
            MigrateError::BadAck => f.write_str(
                "the destination answered with something that is not an acknowledgement",
            ),
            MigrateError::SectionRefused {
                index,
                name,
                instance_id,
                code,
            } => write!(
                f,
                "the destination refused device-state section {name:?} instance {instance_id} \
                 (section {index} of the stream, the destination VMM's code {code}); \
                 the guest runs on at the source"
            ),
            MigrateError::DeviceStateChanged => f.write_str(
                "the VMM's device-state sections changed while they were sent (it must \
                 return the same ones while the guest is paused); the guest runs on at the source",
            ),
            MigrateError::NotRunning(code) => write!(
                f,
                "the destination could not start the guest (its code {code}); \
                 the guest runs on at the source"
            ),
            MigrateError::NoHandover {
                error,
                waited_ns,
                timeout_ns,
            } => write!(
                f,
                "the destination never said its guest runs ({error}, after {} ms, \
                 timeout {} ms); the guest runs on at the source",
                waited_ns / 1_000_000,
                timeout_ns / 1_000_000
            ),
            MigrateError::BadHandover => f.write_str(
                "the destination answered something that is not a handover after its \
                 acknowledgement; the guest runs on at the source",
            ),
            MigrateError::BlockRemoved(n) => {
                write!(f, "block {n:?} was removed during the migration")
            }
            MigrateError::BlockAdded(n) => write!(f, "block {n:?} was added during the migration"),
            MigrateError::BadRequest(r) => write!(
                f,
                "the destination asked for pages {}..+{} of block index {}, which do not exist",
                r.first, r.count, r.block
            ),
            MigrateError::PostcopyLost => f.write_str(
                "the post-copy connection broke and could not be resumed; the source keeps \
                 the paused guest and all its pages",
            ),
            MigrateError::RunOutsideBlock(e) => {
                write!(f, "a dirty run reached outside its block: {e}")
            }
            MigrateError::DowntimeUnreachable {
                estimated_ns,
                limit_ns,
                passes,
            } => write!(
                f,
                "after {passes} passes the pause would still take about {} ms, over the {} ms \
                 downtime limit; the guest runs on at the source (allow more passes, a longer \
                 limit, throttling or post-copy)",
                estimated_ns / 1_000_000,
                limit_ns / 1_000_000
            ),
            MigrateError::DeviceStateTooLarge { total, limit } => write!(
                f,
                "device state takes {total} bytes, over the {limit}-byte limit; the guest runs on at the source"
            ),
        }
    }
}

impl<D: fmt::Debug + fmt::Display, W: fmt::Debug + fmt::Display, R: fmt::Debug + fmt::Display>
    core::error::Error for MigrateError<D, W, R>
{
}

/// [`MigrateError`] with the error types of the engine's dirty-log source,
/// output and acknowledgement reader.
pub(crate) type Error<D, W, R> =
    MigrateError<<D as DirtyLogSource>::Error, <W as ByteWrite>::Error, <R as ByteRead>::Error>;
