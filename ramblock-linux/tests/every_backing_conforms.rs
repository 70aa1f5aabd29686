//! The conformance suite (`common::check_host_memory`) run for every
//! backing, each checked against the kernel's view in `/proc/self/smaps`.

mod common;

use common::{check_host_memory, vma_at, Expect};
use ramblock_core::addr::ByteLen;
use ramblock_core::host::HostMemory;
use ramblock_linux::{BackingKind, MemoryBuilder};

const MIB: u64 = 1 << 20;

fn private() -> Expect {
    Expect {
        shared: false,
        writable: true,
        tail_released: true,
    }
}

fn shared() -> Expect {
    Expect {
        shared: true,
        writable: true,
        tail_released: true,
    }
}

#[test]
fn anonymous_private_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::Anonymous);
    assert_eq!(
        mem.base().as_ptr() as u64 % (2 * MIB),
        0,
        "reservation must be 2 MiB aligned"
    );
    check_host_memory(&mut mem, private());
}

#[test]
fn anonymous_shared_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(8 * MIB))
        .shared(true)
        .build()
        .unwrap();
    check_host_memory(&mut mem, shared());
}

#[test]
fn anonymous_no_reserve_conforms() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(2 * MIB))
        .max_length(ByteLen(6 * MIB))
        .no_reserve(true)
        .build()
        .unwrap();
    assert!(
        vma_at(mem.base().as_ptr() as usize).has_flag("nr"),
        "MAP_NORESERVE shows as nr"
    );
    check_host_memory(&mut mem, private());
}

#[test]
fn guard_page_follows_the_reservation() {
    let mem = MemoryBuilder::anonymous(ByteLen(2 * MIB)).build().unwrap();
    let end = mem.base().as_ptr() as usize + (2 * MIB) as usize;
    let guard = vma_at(end);
    assert!(
        guard.perms.starts_with("---"),
        "guard {guard:?} must be inaccessible"
    );
}
