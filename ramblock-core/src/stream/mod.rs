//! The migration stream: its wire format, the byte-stream traits it runs
//! over, and the receiving side. The sending side is [`crate::precopy`].
//!
//! The format is documented in `docs/stream-format.md`.

pub mod format;
pub mod io;
pub mod placement;
pub mod received_map;
pub mod receiver;
