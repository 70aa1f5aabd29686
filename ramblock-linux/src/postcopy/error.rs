//! [`PostcopyError`]: what went wrong on a post-copy destination outside
//! the memory itself, with the errno kept where a system call failed.

use crate::uffd::UffdError;
use rustix::io::Errno;

/// Everything that can go wrong on a post-copy destination
/// ([`PostcopyDestination`](super::PostcopyDestination)).
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// Registering a block or placing pages failed.
    #[error("userfaultfd: {0}")]
    Userfault(#[from] UffdError),
    /// The stream's block table names a block the destination lacks.
    #[error(
        "the source's block table names {name:?}, which the destination's block list does not \
         hold: add the same blocks on both sides"
    )]
    UnknownBlock {
        /// The block's name.
        name: String,
    },
    /// Pages arrived for a block post-copy did not register.
    #[error(
        "pages arrived for block {name:?}, which post-copy did not register: the source sends \
         only blocks of the table it started post-copy with"
    )]
    NotRegistered {
        /// The block's name.
        name: String,
    },
    /// A registered block was removed, replaced or shrunk during post-copy.
    #[error(
        "block {name:?} was removed, replaced or shrunk during post-copy: leave the block list \
         alone until the migration ends"
    )]
    BlockChanged {
        /// The block's name.
        name: String,
    },
    /// `start` was called a second time.
    #[error("post-copy was started twice: a resumed stream calls `resumed`, not `start`")]
    AlreadyStarted,
    /// The fault thread could not be started.
    #[error("cannot start the userfaultfd fault thread: {0}; raise the thread limit (ulimit -u)")]
    FaultThread(std::io::Error),
    /// The fault thread panicked.
    #[error("the userfaultfd fault thread panicked: faults were no longer served")]
    FaultThreadPanicked,
    /// The VMM's hook could not start the guest.
    #[error("starting the guest from the source's device state failed: {0}")]
    StartGuest(Box<dyn std::error::Error + Send + Sync>),
    /// A resumed stream arrived, but no connection to answer on.
    #[error(
        "a resumed stream arrived without its return path: hand the new connection over with \
         `set_next_connection` before receiving the resumed stream"
    )]
    NoNextConnection,
    /// The kernel gave no random bytes for the resume token.
    #[error("cannot draw the post-copy resume token from getrandom(2): {0}")]
    Token(std::io::Error),
    /// Writing to the return path failed.
    #[error("{what} on the return path failed: {source}")]
    ReturnPath {
        /// What was being sent.
        what: &'static str,
        /// The I/O error.
        source: std::io::Error,
    },
}

impl PostcopyError {
    /// The errno behind the error, if a system call failed.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            PostcopyError::Userfault(e) => e.errno(),
            PostcopyError::FaultThread(e)
            | PostcopyError::Token(e)
            | PostcopyError::ReturnPath { source: e, .. } => Errno::from_io_error(e),
            _ => None,
        }
    }
}
