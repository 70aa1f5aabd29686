//! userfaultfd against the kernel: a thread faults on registered memory,
//! the fault is read as an event, a placement wakes the thread, and the
//! thread sees exactly what was placed. Anonymous, shared memfd (missing
//! and minor faults), 2 MiB hugetlb and write-protect.
//!
//! Every wait is bounded: events are read with a timeout and faulting
//! threads report through a channel read with one. The userfaultfd is
//! declared after the memory, so a failing test drops it first, which
//! wakes any thread still waiting; the memory then stays mapped
//! ([`KeptOnFailure`]), so that thread reads it instead of crashing the
//! test binary.

mod common;

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::flags::BlockFlags;
use ramblock_linux::hugetlb::PoolReservation;
use ramblock_linux::uffd::{
    Event, Features, Ioctls, Placed, RegisterMode, RegisteredBlock, UffdError, Userfaultfd,
};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::ops::Deref;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
const TIMEOUT: Duration = Duration::from_secs(10);

fn skip(reason: &str) {
    println!("skipped: {reason}");
}

/// Memory that is leaked rather than unmapped when the test fails: a
/// faulting thread may still be about to read it.
struct KeptOnFailure(Option<LinuxMemory>);

impl KeptOnFailure {
    fn build(builder: MemoryBuilder) -> KeptOnFailure {
        KeptOnFailure(Some(builder.build().expect("building the test memory")))
    }
}

impl Deref for KeptOnFailure {
    type Target = LinuxMemory;

    fn deref(&self) -> &LinuxMemory {
        self.0.as_ref().expect("taken only on drop")
    }
}

impl Drop for KeptOnFailure {
    fn drop(&mut self) {
        if thread::panicking() {
            std::mem::forget(self.0.take());
        }
    }
}

/// A userfaultfd, or `None` (after printing why) where the host has none.
fn open() -> Option<Userfaultfd> {
    match Userfaultfd::new() {
        Ok(uffd) => Some(uffd),
        Err(e) if e.is_unavailable() => {
            skip(&e.to_string());
            None
        }
        Err(e) => panic!("opening a userfaultfd: {e}"),
    }
}

/// `len` bytes that differ from page to page and are never all zero.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ ((i / PAGE) as u8) ^ seed | 1)
        .collect()
}

/// A thread that reads the byte at `touch` (faulting there if the page is
/// missing), then copies `len` bytes from `start` and sends them back.
fn reader(touch: usize, start: usize, len: usize) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: the test keeps the block mapped until it has heard back
        // from this thread (a failing test drops its userfaultfd first).
        let _ = unsafe { std::ptr::read_volatile(touch as *const u8) };
        let mut copy = vec![0u8; len];
        // SAFETY: as above; `copy` is a separate buffer of `len` bytes.
        unsafe { std::ptr::copy_nonoverlapping(start as *const u8, copy.as_mut_ptr(), len) };
        let _ = tx.send(copy);
    });
    rx
}

/// A thread that writes `value` at `addr` and reports when it is done.
fn writer(addr: usize, value: u8) -> Receiver<()> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        // SAFETY: as for `reader`.
        unsafe { std::ptr::write_volatile(addr as *mut u8, value) };
        let _ = tx.send(());
    });
    rx
}

/// Reads `len` bytes at `start` from another thread, within the timeout.
fn read_back(start: usize, len: usize) -> Vec<u8> {
    reader(start, start, len)
        .recv_timeout(TIMEOUT)
        .expect("reading placed memory blocked: the page is not there")
}

/// The next event, which must be a page fault: (addr, write, wp, minor).
fn next_fault(uffd: &Userfaultfd) -> (u64, bool, bool, bool) {
    match uffd.read_event(Some(TIMEOUT)).expect("read_event") {
        Some(Event::Pagefault {
            addr,
            write,
            write_protect,
            minor,
        }) => (addr, write, write_protect, minor),
        other => panic!("expected a page fault within {TIMEOUT:?}, got {other:?}"),
    }
}

/// Serves one read fault on page `page` of `block` with `data`, checking
/// the event and that the reader sees exactly `data`.
fn serve_read_fault(uffd: &Userfaultfd, block: &RegisteredBlock<'_>, page: usize, data: &[u8]) {
    let ps = block.page_size();
    let start = block.base() as usize + page * ps;
    // Touch a byte inside the page, not its first one: the event is
    // rounded down (to the host page, or the hugepage on hugetlb memory)
    // and offset_of rounds to the placement unit.
    let touch = start + ps / 2 + 123;
    let seen = reader(touch, start, ps);
    let (addr, write, wp, minor) = next_fault(uffd);
    let host_page = touch & !(PAGE - 1);
    assert!(
        addr as usize == host_page || addr as usize == start,
        "fault at {addr:#x}, touched {touch:#x}"
    );
    assert!(!write && !wp && !minor, "a plain read fault");
    assert_eq!(block.offset_of(addr), Some((page * ps) as u64));
    assert_eq!(
        block.place(uffd, (page * ps) as u64, data).unwrap(),
        Placed::Placed
    );
    let seen = seen
        .recv_timeout(TIMEOUT)
        .expect("the faulting thread was not woken by the placement");
    assert!(
        seen == data,
        "the faulting thread read other data than placed"
    );
}

#[test]
fn anonymous_faults_are_served_by_placing_pages() {
    let mem = KeptOnFailure::build(MemoryBuilder::anonymous(ByteLen(16 * PAGE as u64)));
    let Some(uffd) = open() else { return };
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    assert_eq!(block.page_size(), PAGE);
    assert_eq!(block.len(), 16 * PAGE);
    assert!(block.ioctls().contains(Ioctls::COPY | Ioctls::WAKE));
    assert!(block.supports_zeropage());
    assert_eq!(block.block_flags(), BlockFlags::UFFD_ZEROPAGE);
    let base = block.base() as usize;

    // No fault yet: the wait times out.
    let started = Instant::now();
    assert_eq!(
        uffd.read_event(Some(Duration::from_millis(50))).unwrap(),
        None
    );
    assert!(started.elapsed() >= Duration::from_millis(50));

    let data = pattern(PAGE, 7);
    serve_read_fault(&uffd, &block, 3, &data);

    // A second placement finds the page and leaves it alone.
    assert_eq!(
        block
            .place(&uffd, 3 * PAGE as u64, &pattern(PAGE, 9))
            .unwrap(),
        Placed::AlreadyPresent
    );
    assert!(read_back(base + 3 * PAGE, PAGE) == data);

    // Zeros go in as the shared zero page, and read as zeros. The kernel
    // counts the zero page in no one's Rss: only the copied page 3 is there.
    serve_read_fault(&uffd, &block, 5, &[0u8; PAGE]);
    assert_eq!(
        common::vma_at(base).rss_kb,
        4,
        "page 5 was copied, not mapped to the zero page"
    );

    // Bad placements are typed errors and place nothing.
    let misaligned = block.place(&uffd, (7 * PAGE + 0x800) as u64, &data);
    assert!(matches!(
        misaligned,
        Err(UffdError::Unaligned { value: 0x7800, .. })
    ));
    let past_end = block.place(&uffd, 16 * PAGE as u64, &data);
    assert!(matches!(
        past_end,
        Err(UffdError::OutOfRange {
            offset: 0x10000,
            block_len: 0x10000,
            ..
        })
    ));
    let overflow = block.place(&uffd, u64::MAX - (PAGE as u64 - 1), &data);
    assert!(matches!(overflow, Err(UffdError::OutOfRange { .. })));
    let short = block.place(&uffd, 7 * PAGE as u64, &data[..100]);
    assert!(matches!(
        short,
        Err(UffdError::WrongLength { len: 100, .. })
    ));
    // SAFETY: a slice of page 3, which is present; only used as a source.
    let inside = unsafe { std::slice::from_raw_parts((base + 3 * PAGE) as *const u8, PAGE) };
    assert!(matches!(
        block.place(&uffd, 9 * PAGE as u64, inside),
        Err(UffdError::SourceRegistered { .. })
    ));
    // Pages 7, 8 and 9 are still missing: placing them now places them.
    for page in [7, 8, 9] {
        assert_eq!(
            block
                .place(&uffd, (page * PAGE) as u64, &pattern(PAGE, page as u8))
                .unwrap(),
            Placed::Placed,
            "page {page} was written by a failed placement"
        );
    }

    // The raw ioctls check against the registration too.
    let elsewhere = vec![0u8; 2 * PAGE];
    // SAFETY: refused before any ioctl (not registered).
    let not_registered = unsafe { uffd.copy(elsewhere.as_ptr() as *mut u8, &data, true) };
    assert!(matches!(
        not_registered,
        Err(UffdError::NotRegistered { .. })
    ));
    // SAFETY: refused before any ioctl (misaligned).
    let odd = unsafe { uffd.copy((base + 10 * PAGE + 1) as *mut u8, &data, true) };
    assert!(matches!(
        odd,
        Err(UffdError::Unaligned {
            what: "address",
            ..
        })
    ));
    // A multi-page copy over a present page places the rest around it.
    let three = pattern(3 * PAGE, 3);
    // SAFETY: pages 9..12 of the registered block, guest RAM of this test.
    let placed = unsafe { uffd.copy((base + 9 * PAGE) as *mut u8, &three, true) }.unwrap();
    assert_eq!(placed, Placed::AlreadyPresent, "page 9 was present");
    assert!(read_back(base + 9 * PAGE, PAGE) == pattern(PAGE, 9));
    assert!(read_back(base + 10 * PAGE, 2 * PAGE) == three[PAGE..]);
    // SAFETY: pages 12..14, missing, of the registered block.
    let zeroed = unsafe { uffd.zeropage((base + 12 * PAGE) as *mut u8, 2 * PAGE, true) };
    assert_eq!(zeroed.unwrap(), Placed::Placed);
    assert_eq!(read_back(base + 12 * PAGE, 2 * PAGE), vec![0u8; 2 * PAGE]);
}

#[test]
fn unregistered_memory_faults_as_usual() {
    let mem = KeptOnFailure::build(MemoryBuilder::anonymous(ByteLen(4 * PAGE as u64)));
    let Some(uffd) = open() else { return };
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    block.unregister(&uffd).unwrap();
    assert_eq!(read_back(block.base() as usize, PAGE), vec![0u8; PAGE]);
    assert_eq!(
        uffd.read_event(Some(Duration::from_millis(20))).unwrap(),
        None
    );
    // Placing needs the registration back: the kernel refuses.
    let e = block
        .place(&uffd, PAGE as u64, &pattern(PAGE, 1))
        .unwrap_err();
    assert_eq!(e.errno(), Some(rustix::io::Errno::NOENT), "{e}");
    assert!(e.to_string().contains("no longer registered"), "{e}");
}

#[test]
fn shared_memfd_missing_faults_fill_the_page_cache() {
    let mem = KeptOnFailure::build(MemoryBuilder::memfd(ByteLen(8 * PAGE as u64)));
    let Some(uffd) = open() else { return };
    if !uffd.features().contains(Features::MISSING_SHMEM) {
        return skip("the kernel's userfaultfd lacks MISSING_SHMEM");
    }
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    assert_eq!(block.page_size(), PAGE);
    let data = pattern(PAGE, 0x42);
    serve_read_fault(&uffd, &block, 2, &data);
    // The kernel's view: the page is in the memfd, not just in our mapping.
    let mut from_fd = vec![0u8; PAGE];
    let fd = mem.fd().expect("a memfd has a descriptor");
    let n = rustix::io::pread(fd, &mut from_fd, mem.fd_offset() + 2 * PAGE as u64).unwrap();
    assert_eq!(n, PAGE);
    assert!(from_fd == data, "the memfd does not hold the placed page");
}

#[test]
fn shared_memfd_minor_faults_map_the_page_cache() {
    let mem = KeptOnFailure::build(MemoryBuilder::memfd(ByteLen(8 * PAGE as u64)));
    let Some(uffd) = open() else { return };
    if !uffd.features().contains(Features::MINOR_SHMEM) {
        return skip("the kernel's userfaultfd lacks MINOR_SHMEM");
    }
    let block = uffd
        .register_memory(&mem, RegisterMode::MISSING | RegisterMode::MINOR)
        .unwrap();
    assert!(block.ioctls().contains(Ioctls::CONTINUE));
    let base = block.base() as usize;

    // The contents arrive in the page cache through the file, as through a
    // second mapping; this mapping has not mapped the page yet.
    let data = pattern(PAGE, 0x99);
    let fd = mem.fd().expect("a memfd has a descriptor");
    let n = rustix::io::pwrite(fd, &data, mem.fd_offset() + 2 * PAGE as u64).unwrap();
    assert_eq!(n, PAGE);

    let seen = reader(base + 2 * PAGE + 8, base + 2 * PAGE, PAGE);
    let (addr, write, wp, minor) = next_fault(&uffd);
    assert_eq!(addr as usize, base + 2 * PAGE);
    assert!(minor && !write && !wp, "a minor read fault");
    // SAFETY: page 2 of the registered block, whose page cache is filled.
    let placed = unsafe { uffd.continue_minor((base + 2 * PAGE) as *mut u8, PAGE, true) };
    assert_eq!(placed.unwrap(), Placed::Placed);
    let seen = seen
        .recv_timeout(TIMEOUT)
        .expect("CONTINUE did not wake the reader");
    assert!(seen == data, "the reader does not see the page cache");
    // SAFETY: as above; the page is mapped now.
    let again = unsafe { uffd.continue_minor((base + 2 * PAGE) as *mut u8, PAGE, true) };
    assert_eq!(again.unwrap(), Placed::AlreadyPresent);

    // A page not in the page cache is a missing fault, served by copying.
    serve_read_fault(&uffd, &block, 5, &pattern(PAGE, 5));
}

#[test]
fn hugetlb_pages_are_placed_whole() {
    let _pool = match PoolReservation::reserve(PageSize::SIZE_2M, 2) {
        Ok(pool) => pool,
        Err(e) => return skip(&format!("no 2 MiB hugepages: {e}")),
    };
    let mem = KeptOnFailure::build(MemoryBuilder::hugetlb(
        ByteLen(2 * HUGE as u64),
        PageSize::SIZE_2M,
    ));
    let Some(uffd) = open() else { return };
    if !uffd.features().contains(Features::MISSING_HUGETLBFS) {
        return skip("the kernel's userfaultfd lacks MISSING_HUGETLBFS");
    }
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    assert_eq!(block.page_size(), HUGE);
    assert!(!block.supports_zeropage(), "hugetlb has no zero page");
    assert!(!block.block_flags().contains(BlockFlags::UFFD_ZEROPAGE));
    let base = block.base() as usize;

    // A fault anywhere in the hugepage is served by placing all of it.
    serve_read_fault(&uffd, &block, 1, &pattern(HUGE, 0x11));

    // Less than a hugepage is refused, naming the page size.
    let small = block.place(&uffd, 0, &pattern(PAGE, 1)).unwrap_err();
    assert!(matches!(small, UffdError::WrongLength { .. }));
    assert!(small.to_string().contains("2 MiB"), "{small}");
    // SAFETY: refused before any ioctl (a 4 KiB copy into hugetlb memory).
    let raw = unsafe { uffd.copy(block.base(), &pattern(PAGE, 1), true) }.unwrap_err();
    assert!(
        matches!(raw, UffdError::Unaligned { what: "length", .. }),
        "{raw}"
    );
    assert!(raw.to_string().contains("2 MiB"), "{raw}");
    // SAFETY: refused before any ioctl (not hugepage aligned).
    let raw = unsafe { uffd.copy((base + PAGE) as *mut u8, &pattern(HUGE, 1), true) };
    assert!(matches!(
        raw,
        Err(UffdError::Unaligned {
            what: "address",
            ..
        })
    ));
    // SAFETY: refused before any ioctl (no zero page on hugetlb).
    let zero = unsafe { uffd.zeropage(block.base(), HUGE, true) }.unwrap_err();
    assert!(matches!(zero, UffdError::ZeropageUnsupported { .. }));
    assert!(zero.to_string().contains("hugetlb"), "{zero}");

    // So a page of zeros is copied, and reads as zeros.
    assert_eq!(
        block.place(&uffd, 0, &vec![0u8; HUGE]).unwrap(),
        Placed::Placed
    );
    assert!(read_back(base, HUGE).iter().all(|&b| b == 0));
    assert_eq!(
        block.place(&uffd, 0, &vec![0u8; HUGE]).unwrap(),
        Placed::AlreadyPresent
    );

    // The raw registration finds the hugepage size itself (from smaps).
    block.unregister(&uffd).unwrap();
    // SAFETY: refused before the kernel sees it (not hugepage aligned).
    let e = unsafe { uffd.register((base + PAGE) as *mut u8, HUGE, RegisterMode::MISSING) }
        .unwrap_err();
    assert!(
        e.to_string().contains("2 MiB"),
        "misaligned for hugetlb: {e}"
    );
    // SAFETY: the block's memory, guest RAM of this test reached only
    // through copies, which outlives the descriptor's use of it.
    let ioctls = unsafe { uffd.register(block.base(), 2 * HUGE, RegisterMode::MISSING) }.unwrap();
    assert!(ioctls.contains(Ioctls::COPY) && !ioctls.contains(Ioctls::ZEROPAGE));
    // SAFETY: refused before any ioctl (a 4 KiB copy into hugetlb memory).
    let raw = unsafe { uffd.copy(block.base(), &pattern(PAGE, 1), true) }.unwrap_err();
    assert!(raw.to_string().contains("2 MiB"), "{raw}");
}

#[test]
fn write_protected_pages_fault_until_unprotected() {
    let mem = KeptOnFailure::build(MemoryBuilder::anonymous(ByteLen(4 * PAGE as u64)));
    let Some(uffd) = open() else { return };
    if !uffd.features().contains(Features::PAGEFAULT_FLAG_WP) {
        return skip("the kernel's userfaultfd lacks PAGEFAULT_FLAG_WP");
    }
    let block = uffd
        .register_memory(&mem, RegisterMode::MISSING | RegisterMode::WRITE_PROTECT)
        .unwrap();
    assert!(block.ioctls().contains(Ioctls::WRITEPROTECT));
    assert!(block.block_flags().contains(BlockFlags::UFFD_WRITE_PROTECT));
    let base = block.base() as usize;
    let page = base + PAGE;

    let data = pattern(PAGE, 0x33);
    assert_eq!(
        block.place(&uffd, PAGE as u64, &data).unwrap(),
        Placed::Placed
    );
    uffd.write_protect(page as *mut u8, PAGE, true, false)
        .unwrap();

    let done = writer(page + 10, 0xEE);
    let (addr, write, wp, minor) = next_fault(&uffd);
    assert_eq!(addr as usize, page);
    assert!(write && wp && !minor, "a write-protect fault");
    // The writer is held until the protection is lifted.
    assert_eq!(
        done.recv_timeout(Duration::from_millis(100)),
        Err(RecvTimeoutError::Timeout)
    );
    uffd.write_protect(page as *mut u8, PAGE, false, true)
        .unwrap();
    done.recv_timeout(TIMEOUT)
        .expect("lifting the protection did not wake the writer");

    let mut expected = data;
    expected[10] = 0xEE;
    assert!(read_back(page, PAGE) == expected, "the write did not land");
}
