//! The migration transport: who may be the source, and how the stream
//! travels between the two hosts.
//!
//! A destination listens with a [`Listener`]. It accepts connections until
//! one sends a valid stream header within the handshake timeout
//! ([`Timeouts`]): that connection owns the migration. A peer that sends
//! garbage, nothing, or connects and closes (a port scan) is dropped with
//! a [`PeerRefused`] line through the VMM's log hook, and the listener
//! goes on waiting. After a broken post-copy connection it waits the same
//! way for the source to resume ([`Listener::accept_resume`]): only a
//! peer whose resume header carries the token the destination issued when
//! post-copy started ([`ResumeProof`]; `docs/stream-format.md`), and over
//! TLS the same certificate as the original source, takes over.
//!
//! Addresses are `HOST:PORT` (TCP) or `unix:PATH`: a UNIX stream socket
//! for two processes on one host, admitted the same way (TLS is TCP only;
//! a local update that passes guest RAM's fds instead of its pages is
//! [`crate::local_update`]).
//!
//! A source connects with a [`Connector`]. Both give a [`Conn`], which
//! hands the engine the core's byte traits: [`ConnReader`] and
//! [`ConnWriter`] (plain TCP and UNIX sockets move pages between guest
//! memory and the kernel in place, see [`crate::fd_stream`]).
//!
//! With the `tls` feature, `tls::TlsConfig` adds mutual TLS 1.3
//! (rustls, AES-GCM): each side presents a certificate and checks the
//! peer's against the CA it was given; a TLS listener drops plaintext
//! peers and peers without a certificate the CA signed.
//!
//! ```no_run
//! use ramblock_linux::transport::{Listener, Timeouts};
//! use std::time::Duration;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let listener = Listener::bind("127.0.0.1:4444")?
//!     .with_timeouts(Timeouts { handshake: Duration::from_secs(5), ..Timeouts::default() })
//!     .with_log(|dropped| eprintln!("{dropped}"));
//! let mut conn = listener.accept_migration(None)?;
//! let _stream = conn.reader()?; // hand it to the core's Receiver
//! # Ok(())
//! # }
//! ```

mod admission;
mod conn;
mod connect;
pub mod error;
mod listener;
#[cfg(feature = "tls")]
pub mod tls;
pub mod token;

pub use conn::{Conn, ConnReader, ConnWriter};
pub use connect::Connector;
pub use error::{PeerRefused, Refusal, TransportError};
pub use listener::{Listener, PeerLog, ResumeProof, Timeouts};
pub use token::{issue_token, read_first_return, FirstReturn};
