//! guest_memfd memory (`MemoryBuilder::guest_memfd`): options KVM's fixed
//! size and shared mapping rule out are typed errors before any system
//! call, the block flag is set, and userfaultfd (post-copy) refuses it with
//! an error that says to use pre-copy. A real guest_memfd comes from KVM
//! (ramblock-kvm's `Vm::create_guest_memfd`, tested there); the builder's
//! checks and the mapping are tried here on a memfd standing in for one.

use ramblock_core::addr::ByteLen;
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_linux::uffd::{RegisterMode, UffdError, Userfaultfd};
use ramblock_linux::{BackingKind, Error, MemoryBuilder, OptionsError};
use std::os::fd::OwnedFd;

const MIB: u64 = 1 << 20;

fn stand_in(len: u64) -> OwnedFd {
    let fd = rustix::fs::memfd_create("gmem-stand-in", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, len).unwrap();
    fd
}

#[test]
fn guest_memfd_options_kvm_rules_out_are_typed_errors() {
    let len = ByteLen(2 * MIB);
    type Tweak = fn(MemoryBuilder) -> MemoryBuilder;
    let cases: [(&str, Tweak); 5] = [
        ("max_length", |b| b.max_length(ByteLen(4 * MIB))),
        ("shared(false)", |b| b.shared(false)),
        ("no_reserve", |b| b.no_reserve(true)),
        ("transparent_hugepages", |b| b.transparent_hugepages(true)),
        ("offset", |b| b.offset(4096)),
    ];
    for (option, tweak) in cases {
        match tweak(MemoryBuilder::guest_memfd(stand_in(2 * MIB), len)).build() {
            Err(Error::Options(OptionsError::GuestMemfdOption { option: o })) => {
                assert_eq!(o, option)
            }
            other => panic!("{option}: {other:?}"),
        }
    }
}

#[test]
fn guest_memfd_memory_is_mapped_shared_with_its_flag_and_refused_by_userfaultfd() {
    let mem = MemoryBuilder::guest_memfd(stand_in(2 * MIB), ByteLen(2 * MIB))
        .build()
        .unwrap();
    assert_eq!(mem.kind(), BackingKind::GuestMemfd);
    assert!(mem
        .flags()
        .contains(BlockFlags::GUEST_MEMFD | BlockFlags::SHARED));
    assert!(mem.is_shared() && mem.fd().is_some());
    mem.region().write(ByteLen(0x1000), b"gmem").unwrap();
    let mut back = [0u8; 4];
    mem.region().read(ByteLen(0x1000), &mut back).unwrap();
    assert_eq!(&back, b"gmem");
    let uffd = match Userfaultfd::new() {
        Ok(u) => u,
        Err(e) => {
            println!("skipped: no userfaultfd ({e})");
            return;
        }
    };
    match uffd.register_memory(&mem, RegisterMode::MISSING) {
        Err(e @ UffdError::ModeUnsupported { backing, .. }) => {
            assert_eq!(backing, "guest_memfd");
            assert!(e.to_string().contains("pre-copy"), "{e}");
        }
        other => panic!("{:?}", other.map(|_| ())),
    }
}
