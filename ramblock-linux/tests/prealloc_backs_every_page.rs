//! Preallocation faults in every page (checked in smaps' Rss), from one or
//! several threads, by MADV_POPULATE_WRITE or the touch fallback, at build
//! and for what growing adds later.

mod common;

use common::span_at;
use ramblock_core::addr::ByteLen;
use ramblock_core::host::HostMemory;
use ramblock_linux::prealloc::default_threads;
use ramblock_linux::{MemoryBuilder, Prealloc, PreallocMethod};
use std::num::NonZeroUsize;

const MIB: u64 = 1 << 20;

fn resident(mem: &impl HostMemory) -> u64 {
    span_at(mem.base().as_ptr() as usize).resident()
}

#[test]
fn default_thread_count_follows_cores_and_size() {
    let cores = std::thread::available_parallelism().unwrap().get();
    assert_eq!(default_threads(0).get(), 1);
    assert_eq!(default_threads(64 * MIB - 1).get(), 1);
    assert_eq!(default_threads(128 * MIB).get(), cores.min(2));
    assert_eq!(default_threads(1 << 40).get(), cores.min(16));
}

#[test]
fn every_method_and_thread_count_backs_every_page() {
    for method in [
        PreallocMethod::Auto,
        PreallocMethod::Populate,
        PreallocMethod::Touch,
    ] {
        for threads in [1, 2, 3] {
            let settings = Prealloc {
                threads: NonZeroUsize::new(threads),
                method,
            };
            for shared in [false, true] {
                let mem = MemoryBuilder::anonymous(ByteLen(24 * MIB))
                    .shared(shared)
                    .build()
                    .unwrap();
                assert_eq!(resident(&mem), 0, "nothing is backed before preallocation");
                mem.preallocate(settings).unwrap();
                assert_eq!(resident(&mem), 24 * MIB, "{settings:?} shared={shared}");
            }
        }
    }
}

#[test]
fn preallocation_keeps_existing_contents() {
    let mem = MemoryBuilder::memfd(ByteLen(8 * MIB)).build().unwrap();
    mem.region().write(ByteLen(5 * MIB), b"kept").unwrap();
    for method in [PreallocMethod::Populate, PreallocMethod::Touch] {
        mem.preallocate(Prealloc {
            threads: NonZeroUsize::new(2),
            method,
        })
        .unwrap();
        let mut got = [0u8; 4];
        mem.region().read(ByteLen(5 * MIB), &mut got).unwrap();
        assert_eq!(&got, b"kept");
    }
}

#[test]
fn growing_preallocated_memory_preallocates_the_new_part() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .max_length(ByteLen(12 * MIB))
        .prealloc_threads(2)
        .build()
        .unwrap();
    assert_eq!(resident(&mem), 4 * MIB);
    mem.set_used_len(ByteLen(12 * MIB)).unwrap();
    assert_eq!(resident(&mem), 12 * MIB);
}
