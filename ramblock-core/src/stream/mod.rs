//! The migration stream on the wire: its format, the byte-stream traits it
//! runs over, the received map the destination sends back for post-copy
//! recovery, and the token that lets only the same source resume. The engines that write and read it are in
//! [`crate::migrate`](mod@crate::migrate).
//!
//! The format is documented in `docs/stream-format.md`.

pub mod format;
pub mod io;
pub mod received_map;
pub mod resume_token;
