//! What a [`Userfaultfd`] reports ([`Event`]) and what a placement found
//! ([`Placed`]).

use super::sys;
#[cfg(doc)]
use super::{Features, Userfaultfd};

/// One message read from a [`Userfaultfd`].
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A thread faulted on registered memory and sleeps until the page is
    /// placed (or write-protection lifted) and it is woken.
    Pagefault {
        /// The faulting address, rounded down to its page (the hugepage on
        /// hugetlb memory) unless [`Features::EXACT_ADDRESS`] was asked for.
        addr: u64,
        /// The access was a write.
        write: bool,
        /// The fault is a write to a write-protected page.
        write_protect: bool,
        /// The fault is a minor fault: the page is in the page cache.
        minor: bool,
    },
    /// `start .. end` was discarded (`MADV_DONTNEED`/`MADV_REMOVE`); only
    /// with [`Features::EVENT_REMOVE`].
    Remove {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// `start .. end` was unmapped; only with [`Features::EVENT_UNMAP`].
    Unmap {
        /// Start address.
        start: u64,
        /// End address (exclusive).
        end: u64,
    },
    /// Another event (`UFFD_EVENT_*` number), such as a remap.
    Other(u8),
}

impl Event {
    pub(crate) fn decode(msg: &[u8; sys::MSG_SIZE]) -> Event {
        let arg0 = sys::msg_u64(msg, sys::MSG_ARG0);
        let arg1 = sys::msg_u64(msg, sys::MSG_ARG1);
        match msg[sys::MSG_EVENT] {
            sys::EVENT_PAGEFAULT => Event::Pagefault {
                addr: arg1,
                write: arg0 & sys::PAGEFAULT_FLAG_WRITE != 0,
                write_protect: arg0 & sys::PAGEFAULT_FLAG_WP != 0,
                minor: arg0 & sys::PAGEFAULT_FLAG_MINOR != 0,
            },
            sys::EVENT_REMOVE => Event::Remove {
                start: arg0,
                end: arg1,
            },
            sys::EVENT_UNMAP => Event::Unmap {
                start: arg0,
                end: arg1,
            },
            other => Event::Other(other),
        }
    }
}

/// What a placement found.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// Every page was placed by this call.
    Placed,
    /// Some or all pages were there already (`EEXIST`) and were left as
    /// they were; the others were placed. Waiters were still woken when
    /// asked to, so a racing placement is harmless.
    AlreadyPresent,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode_field_by_field() {
        let mut msg = [0u8; sys::MSG_SIZE];
        msg[0] = sys::EVENT_PAGEFAULT;
        msg[8..16]
            .copy_from_slice(&(sys::PAGEFAULT_FLAG_WRITE | sys::PAGEFAULT_FLAG_WP).to_ne_bytes());
        msg[16..24].copy_from_slice(&0x7f00_1234_5000u64.to_ne_bytes());
        assert_eq!(
            Event::decode(&msg),
            Event::Pagefault {
                addr: 0x7f00_1234_5000,
                write: true,
                write_protect: true,
                minor: false
            }
        );
        msg[0] = sys::EVENT_REMOVE;
        msg[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        msg[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            Event::decode(&msg),
            Event::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        msg[0] = sys::EVENT_UNMAP;
        assert_eq!(
            Event::decode(&msg),
            Event::Unmap {
                start: 0x1000,
                end: 0x3000
            }
        );
        msg[0] = 0x14;
        assert_eq!(Event::decode(&msg), Event::Other(0x14));
    }
}
