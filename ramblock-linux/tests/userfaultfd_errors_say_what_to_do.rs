//! userfaultfd requests that cannot work are typed errors, found before
//! the kernel is asked where possible, and their messages say what to do.

use ramblock_core::addr::ByteLen;
use ramblock_linux::uffd::{Features, RegisterMode, UffdError, Userfaultfd};
use ramblock_linux::MemoryBuilder;
use rustix::io::Errno;

/// A userfaultfd, or `None` (after printing why) where the host has none.
fn open() -> Option<Userfaultfd> {
    match Userfaultfd::new() {
        Ok(uffd) => Some(uffd),
        Err(e) if e.is_unavailable() => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("opening a userfaultfd: {e}"),
    }
}

#[test]
fn the_permission_error_names_the_fixes() {
    let e = UffdError::NotPermitted { errno: Errno::PERM };
    let text = e.to_string();
    for fix in [
        "root",
        "vm.unprivileged_userfaultfd=1",
        "sysctl",
        "/dev/userfaultfd",
    ] {
        assert!(text.contains(fix), "{text:?} does not mention {fix}");
    }
    assert_eq!(e.errno(), Some(Errno::PERM));
    assert!(e.is_unavailable());

    let e = UffdError::NoKernelSupport {
        errno: Errno::NOSYS,
    };
    assert!(e.to_string().contains("CONFIG_USERFAULTFD"), "{e}");
    assert!(e.is_unavailable());
}

#[test]
fn minor_faults_on_private_memory_are_refused() {
    let Some(uffd) = open() else { return };
    let anon = MemoryBuilder::anonymous(ByteLen(1 << 20)).build().unwrap();
    let e = uffd
        .register_memory(&anon, RegisterMode::MINOR)
        .unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::ModeUnsupported {
                backing: "private anonymous",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("memfd"), "says what to use: {e}");

    let private_memfd = MemoryBuilder::memfd(ByteLen(1 << 20))
        .shared(false)
        .build()
        .unwrap();
    let e = uffd
        .register_memory(&private_memfd, RegisterMode::MINOR)
        .unwrap_err();
    assert!(matches!(e, UffdError::ModeUnsupported { .. }), "{e}");
    assert!(e.to_string().contains("shared mapping"), "{e}");

    // Nothing was registered: a shared memfd registers fine afterwards,
    // and the private one takes MISSING.
    uffd.register_memory(&private_memfd, RegisterMode::MISSING)
        .unwrap();
}

#[test]
fn registrations_need_a_mode_and_whole_pages() {
    let Some(uffd) = open() else { return };
    let mem = MemoryBuilder::anonymous(ByteLen(1 << 20)).build().unwrap();
    let e = uffd
        .register_memory(&mem, RegisterMode::empty())
        .unwrap_err();
    assert!(matches!(e, UffdError::ModeUnsupported { .. }), "{e}");

    let base = ramblock_core::host::HostMemory::base(&mem).as_ptr();
    // SAFETY: `mem` is guest RAM of this test, never referenced; it is
    // refused before the kernel sees it (misaligned).
    let e =
        unsafe { uffd.register(base.wrapping_add(100), 4096, RegisterMode::MISSING) }.unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::Unaligned {
                what: "address",
                ..
            }
        ),
        "{e}"
    );
    // SAFETY: as above; refused (empty).
    let e = unsafe { uffd.register(base, 0, RegisterMode::MISSING) }.unwrap_err();
    assert!(matches!(e, UffdError::EmptyRange { .. }), "{e}");
    // The raw registration works on the same memory, and reports its ioctls.
    // SAFETY: `mem`'s used part, which this test reaches only through
    // copies, outlives the descriptor's use of it.
    let ioctls = unsafe { uffd.register(base, 1 << 20, RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(ramblock_linux::uffd::Ioctls::COPY));
    // A second userfaultfd cannot take the same range: the kernel says
    // EBUSY, kept in the error with a hint.
    let Some(other) = open() else { return };
    // SAFETY: as above.
    let e = unsafe { other.register(base, 1 << 20, RegisterMode::MISSING) }.unwrap_err();
    assert_eq!(e.errno(), Some(Errno::BUSY), "{e}");
    assert!(e.to_string().contains("another userfaultfd"), "{e}");
}

#[test]
fn fork_events_and_unknown_features_are_refused() {
    let Some(uffd) = open() else { return };
    let e = Userfaultfd::with_features(Features::EVENT_FORK).unwrap_err();
    assert!(matches!(e, UffdError::FeatureRefused { .. }), "{e}");
    // Features are what was asked for, within what is offered.
    assert!(uffd.offered_features().contains(uffd.features()));
    assert!(!uffd.features().contains(Features::SIGBUS));
    assert!(!uffd.features().contains(Features::EVENT_UNMAP));
    if uffd.offered_features().contains(Features::EVENT_REMOVE) {
        let with_events = Userfaultfd::with_features(Features::EVENT_REMOVE).unwrap();
        assert!(with_events.features().contains(Features::EVENT_REMOVE));
    }
}
