//! `PostcopyDestination`, the library's post-copy destination, driven as
//! the core's receiver drives it (through `PostcopyTarget`), with this test
//! standing in for the source on the other end of the return path: a guest
//! thread started by the VMM's hook reads missing pages, each fault becomes
//! one page request, the answer is placed and wakes the guest, and a page
//! pushed ahead of any fault is read without one. After a connection break
//! the destination sends its received map and asks again for the page
//! still awaited. Misuse is a typed `PostcopyError`.

use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::flags::BlockFlags;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::migrate::PostcopyTarget;
use ramblock_core::name::BlockName;
use ramblock_core::stream::format::{PageRequest, ReturnMessage};
use ramblock_core::stream::io::IoStream;
use ramblock_core::stream::received_map::{read_received_map, scratch_words};
use ramblock_linux::postcopy::{PostcopyDestination, PostcopyError, StartGuest};
use ramblock_linux::transport::{read_first_return, FirstReturn};
use ramblock_linux::uffd::UffdError;
use ramblock_linux::{Error, LinuxMemory, MemoryBuilder};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

const PAGE: usize = 4096;
const PAGES: usize = 1024;
type Ram = RamList<'static, LinuxMemory, Owned, 4>;

/// A 4 MiB block, none of it touched, in a list that lives for the rest
/// of the test binary (a guest thread stuck on a fault of a failed test
/// must not find it unmapped).
fn guest_ram() -> &'static Ram {
    let len = ByteLen((PAGES * PAGE) as u64);
    let memory = MemoryBuilder::anonymous(len).build().unwrap();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), len)
        .flags(memory.flags() | BlockFlags::MIGRATABLE);
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    let ram: &'static Ram = Box::leak(Box::new(RamList::new()));
    ram.add(spec, memory, bitmaps).map_err(|r| r.error).unwrap();
    ram
}

fn pattern(page: u64) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u64 * 7 + page * 13) as u8)
        .collect()
}

/// The guest: reads `pages` in order through raw pointers (faulting on the
/// missing ones) and hands back what it read.
type GuestThread = JoinHandle<Vec<Vec<u8>>>;

fn reader_guest(
    base: usize,
    pages: Vec<u64>,
    state: Arc<Mutex<Vec<u8>>>,
) -> StartGuest<GuestThread> {
    Box::new(move || {
        // The hook ran (the device state went to the VMM's section sink).
        *state.lock().unwrap() = b"started".to_vec();
        let pages = pages.clone();
        Ok(std::thread::spawn(move || {
            pages
                .iter()
                .map(|&p| {
                    let mut copy = vec![0u8; PAGE];
                    // SAFETY: the page is inside the leaked block's used
                    // length; the copy goes to a separate buffer.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            (base + p as usize * PAGE) as *const u8,
                            copy.as_mut_ptr(),
                            PAGE,
                        )
                    };
                    copy
                })
                .collect()
        }))
    })
}

/// The next page request on the source's end of the return path.
fn next_request(source: &mut UnixStream) -> PageRequest {
    match ReturnMessage::read(&mut IoStream(source)) {
        Ok(Ok(ReturnMessage::Request(r))) => r,
        other => panic!("expected a page request, got {other:?}"),
    }
}

fn open(
    ram: &'static Ram,
    ret: UnixStream,
    start: StartGuest<GuestThread>,
) -> Option<PostcopyDestination<&'static Ram, UnixStream, GuestThread>> {
    match PostcopyDestination::new(ram, Arc::new(Mutex::new(ret)), start) {
        Ok(t) => Some(t),
        Err(PostcopyError::Userfault(e)) if e.is_unavailable() => {
            println!("skipped: {e}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn faults_become_requests_and_placements_wake_the_guest() {
    let ram = guest_ram();
    let base = ram
        .read()
        .by_name("pc.ram")
        .unwrap()
        .memory()
        .base()
        .as_ptr() as usize;
    let (dest_end, mut source) = UnixStream::pair().unwrap();
    source
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let state = Arc::new(Mutex::new(Vec::new()));
    let guest = reader_guest(base, vec![0, 5, 6, 100, 200], state.clone());
    let Some(mut target) = open(ram, dest_end, guest) else {
        return;
    };

    target.start(&["pc.ram"]).unwrap();
    // The resume token comes first, before any request, and is the one a
    // resume header must carry.
    let token = match read_first_return(&mut IoStream(&mut source)) {
        Ok(FirstReturn::Token(t)) => t,
        other => panic!("expected the resume token first, got {other:?}"),
    };
    assert_eq!(target.resume_token(), Some(token));
    assert_eq!(*state.lock().unwrap(), b"started");
    // Pushed before the guest gets there: read without a fault.
    target
        .place("pc.ram", ByteLen::from_pages(6), &pattern(6))
        .unwrap();

    // Pages 0, 5 and 100 fault in turn, each asked for once.
    for (page, zero) in [(0u64, false), (5, false), (100, true)] {
        let r = next_request(&mut source);
        assert_eq!(
            (r.block, r.first, r.count),
            (0, page, 1),
            "the request for page {page}"
        );
        if zero {
            target
                .place_zero("pc.ram", ByteLen::from_pages(page), ByteLen::from_pages(1))
                .unwrap();
        } else {
            target
                .place("pc.ram", ByteLen::from_pages(page), &pattern(page))
                .unwrap();
        }
    }
    // Page 200 is asked for, but the connection breaks before the answer.
    let r = next_request(&mut source);
    assert_eq!((r.block, r.first, r.count), (0, 200, 1));
    drop(source);

    // Resume: the map goes first, then the page still awaited.
    let (dest_end, mut source) = UnixStream::pair().unwrap();
    source
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    target.set_next_connection(dest_end);
    target.resumed().unwrap();
    let mut missing = Vec::new();
    {
        let view = ram.read();
        let mut scratch = vec![0u64; scratch_words(&view)];
        read_received_map(
            &mut IoStream(&mut source),
            &view,
            &mut scratch,
            |_, pages| missing.push(pages),
        )
        .unwrap();
    }
    let expected: Vec<_> = vec![1..5, 7..100, 101..PAGES as u64];
    assert_eq!(missing, expected, "pages 0, 5, 6 and 100 arrived");
    let r = next_request(&mut source);
    assert_eq!((r.block, r.first, r.count), (0, 200, 1), "asked again");
    target
        .place("pc.ram", ByteLen::from_pages(200), &pattern(200))
        .unwrap();

    // The guest read what was placed.
    let guest = target.guest().map(|g| g.thread().id());
    assert!(guest.is_some());
    target.stop_faults().unwrap();
    let latency = target.latency();
    assert_eq!(latency.faults, 4, "{latency:?}");
    assert!(latency.p50_ns <= latency.p99_ns && latency.p99_ns <= latency.max_ns);
    let read = target.finish().unwrap().join().unwrap();
    assert_eq!(read[0], pattern(0));
    assert_eq!(read[1], pattern(5));
    assert_eq!(read[2], pattern(6));
    assert_eq!(read[3], vec![0u8; PAGE]);
    assert_eq!(read[4], pattern(200));
    let view = ram.read();
    let received = view.by_name("pc.ram").unwrap().received();
    for page in [0, 5, 6, 100, 200] {
        assert_eq!(received.is_received(page), Ok(true), "page {page}");
    }
    assert_eq!(received.is_received(1), Ok(false));
}

#[test]
fn misuse_is_a_typed_postcopy_error() {
    let ram = guest_ram();
    let (dest_end, _source) = UnixStream::pair().unwrap();
    let state = Arc::new(Mutex::new(Vec::new()));
    let Some(mut target) = open(ram, dest_end, reader_guest(0, vec![], state.clone())) else {
        return;
    };
    let postcopy = |e: Error| match e {
        Error::Postcopy(e) => e,
        other => panic!("expected a post-copy error, got {other}"),
    };
    // Nothing registered before the switch.
    let e = postcopy(
        target
            .place("pc.ram", ByteLen::ZERO, &pattern(0))
            .unwrap_err(),
    );
    assert!(
        matches!(e, PostcopyError::NotRegistered { ref name } if name == "pc.ram"),
        "{e}"
    );

    target.start(&["pc.ram"]).unwrap();
    let e = postcopy(target.start(&["pc.ram"]).unwrap_err());
    assert!(matches!(e, PostcopyError::AlreadyStarted), "{e}");
    let e = postcopy(
        target
            .place("other", ByteLen::ZERO, &pattern(0))
            .unwrap_err(),
    );
    assert!(matches!(e, PostcopyError::NotRegistered { .. }), "{e}");
    // The block's own checks: an unaligned offset and a run past its end.
    let e = postcopy(
        target
            .place("pc.ram", ByteLen(100), &pattern(0))
            .unwrap_err(),
    );
    assert!(
        matches!(e, PostcopyError::Userfault(UffdError::Unaligned { .. })),
        "{e}"
    );
    let e = postcopy(
        target
            .place_zero(
                "pc.ram",
                ByteLen::from_usize(PAGES * PAGE),
                ByteLen::from_pages(1),
            )
            .unwrap_err(),
    );
    assert!(
        matches!(e, PostcopyError::Userfault(UffdError::OutOfRange { .. })),
        "{e}"
    );
    let e = postcopy(target.resumed().unwrap_err());
    assert!(matches!(e, PostcopyError::NoNextConnection), "{e}");
    assert!(e.to_string().contains("set_next_connection"), "{e}");
    target.stop_faults().unwrap();
    target.finish().unwrap().join().unwrap();

    // A table naming a block the destination lacks.
    let (dest_end, _source) = UnixStream::pair().unwrap();
    let Some(mut other) = open(guest_ram(), dest_end, reader_guest(0, vec![], state)) else {
        return;
    };
    let e = postcopy(other.start(&["pc.ram", "vga.vram"]).unwrap_err());
    assert!(
        matches!(e, PostcopyError::UnknownBlock { ref name } if name == "vga.vram"),
        "{e}"
    );
    assert!(other.finish().is_none(), "no guest was started");
}
