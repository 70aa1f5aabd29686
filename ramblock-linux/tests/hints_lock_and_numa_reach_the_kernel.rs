//! Hints, mlock and NUMA binding, checked in the kernel's VmFlags, Locked
//! and numa_maps rather than in our own bookkeeping.

mod common;

use common::span_at;
use ramblock_core::addr::ByteLen;
use ramblock_core::host::HostMemory;
use ramblock_linux::numa::online_nodes;
use ramblock_linux::{Error, Hint, LockMode, MemoryBuilder, NumaBinding, NumaPolicy};

const MIB: u64 = 1 << 20;

#[test]
fn hints_show_in_vm_flags() {
    let mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .hint(Hint::Mergeable)
        .hint(Hint::DontDump)
        .hint(Hint::DontFork)
        .hint(Hint::Hugepage)
        .build()
        .unwrap();
    let vma = span_at(mem.base().as_ptr() as usize);
    for (flag, hint) in [
        ("mg", "mergeable"),
        ("dd", "dont-dump"),
        ("dc", "dont-fork"),
        ("hg", "hugepage"),
    ] {
        assert!(vma.has_flag(flag), "{hint} must show as {flag}: {vma:?}");
    }
}

#[test]
fn mlock_pins_the_used_part_and_follows_resizes_and_discards() {
    let mut mem = MemoryBuilder::anonymous(ByteLen(2 * MIB))
        .max_length(ByteLen(4 * MIB))
        .mlock(LockMode::Now)
        .build()
        .unwrap();
    let base = mem.base().as_ptr() as usize;
    let vma = span_at(base);
    assert!(vma.has_flag("lo"), "{vma:?}");
    assert_eq!(
        vma.locked_kb << 10,
        2 * MIB,
        "every used page is locked in: {vma:?}"
    );
    mem.set_used_len(ByteLen(4 * MIB)).unwrap();
    assert_eq!(
        span_at(base).locked_kb << 10,
        4 * MIB,
        "the grown part is locked too"
    );
    mem.region().write(ByteLen(MIB), b"x").unwrap();
    mem.discard(ByteLen(MIB), ByteLen(MIB)).unwrap();
    assert!(mem.region().is_zero(ByteLen(MIB), MIB as usize).unwrap());
    assert_eq!(
        span_at(base).locked_kb << 10,
        4 * MIB,
        "still locked after a discard"
    );
    mem.set_used_len(ByteLen(2 * MIB)).unwrap();
    assert_eq!(span_at(base).locked_kb << 10, 2 * MIB);
    mem.unlock().unwrap();
    assert!(!span_at(base).has_flag("lo"));
}

#[test]
fn mlock_on_fault_locks_only_touched_pages() {
    let mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .mlock(LockMode::OnFault)
        .build()
        .unwrap();
    let base = mem.base().as_ptr() as usize;
    let vma = span_at(base);
    assert!(vma.has_flag("lf"), "{vma:?}");
    assert_eq!(vma.locked_kb, 0, "nothing touched yet: {vma:?}");
    mem.region().fill(ByteLen::ZERO, MIB as usize, 1).unwrap();
    assert_eq!(span_at(base).locked_kb << 10, MIB);
}

fn numa_policy_of(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap();
    maps.lines()
        .find(|l| l.starts_with(&format!("{addr:x} ")))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no numa_maps line at {addr:#x}"))
        .to_owned()
}

#[test]
fn numa_binding_reaches_the_kernel_or_says_the_host_has_one_node() {
    if !std::path::Path::new("/proc/self/numa_maps").exists() {
        return common::skip("the kernel has no NUMA support (/proc/self/numa_maps missing)");
    }
    let online = online_nodes();
    let node = *online.last().unwrap();
    let mem = MemoryBuilder::anonymous(ByteLen(4 * MIB))
        .numa(NumaBinding {
            nodes: vec![node],
            policy: NumaPolicy::Bind,
        })
        .prealloc_threads(1)
        .build()
        .unwrap();
    let base = mem.base().as_ptr() as usize;
    assert_eq!(numa_policy_of(base), format!("bind:{node}"));
    let interleaved = MemoryBuilder::anonymous(ByteLen(2 * MIB))
        .numa(NumaBinding {
            nodes: online.clone(),
            policy: NumaPolicy::Interleave,
        })
        .build()
        .unwrap();
    assert!(numa_policy_of(interleaved.base().as_ptr() as usize).starts_with("interleave:"));

    let missing = online.iter().max().unwrap() + 1;
    let err = MemoryBuilder::anonymous(ByteLen(2 * MIB))
        .numa(NumaBinding {
            nodes: vec![missing],
            policy: NumaPolicy::Bind,
        })
        .build()
        .unwrap_err();
    assert!(
        matches!(err, Error::NoSuchNumaNode { node, .. } if node == missing),
        "{err}"
    );
    if online.len() == 1 {
        assert!(err.to_string().contains("single-node host"), "{err}");
    }
}
