//! Live migration: the sending engine (pre-copy, optionally ending in
//! post-copy) and the receiver, both speaking the wire format of
//! [`crate::stream`].
//!
//! The sending side is one engine in several files, one concept each:
//! - [`config`]: how a migration runs ([`PrecopyConfig`]);
//! - [`stats`]: what it reports ([`PassReport`], [`MigrationStats`],
//!   [`PauseReport`], [`PostcopyStats`]);
//! - [`host`]: what it needs from the VMM ([`MigrationHost`]);
//! - [`error`]: why it failed ([`MigrateError`]);
//! - [`precopy`]: the entry point [`migrate`] and the pass loop;
//! - [`postcopy`]: the switch to post-copy and the pages sent after it;
//! - [`converge`]: the auto-converge throttle ([`next_throttle`]).
//!
//! The state of a migration in progress and the sending steps both phases
//! share live in a private `engine` module, so pre-copy and post-copy each
//! depend on it and neither on the other's internals.
//!
//! The receiving side is [`receiver`]: [`Receiver`] checks every record
//! before it touches guest memory, and places pages through a
//! [`PostcopyTarget`] once post-copy starts.

pub mod channels;
pub mod config;
pub mod converge;
mod engine;
pub mod error;
pub mod fault_latency;
pub mod host;
pub mod postcopy;
pub mod precopy;
pub mod receiver;
pub mod stats;

pub use config::PrecopyConfig;
pub use converge::next_throttle;
pub use error::MigrateError;
pub use host::{MigrationHost, ReturnEvent, DEFAULT_HANDOVER_WAIT_NS};
pub use precopy::{migrate, migrate_with_channels};
pub use receiver::{
    acknowledge, send_ack, Handover, PostcopyTarget, ReceiveError, ReceiveEvent, ReceiveSummary,
    Receiver, BOUNCE_BYTES, POSTCOPY_UNSUPPORTED_CODE,
};
pub use stats::{MigrationStats, PassReport, PauseReport, PostcopyStats};
