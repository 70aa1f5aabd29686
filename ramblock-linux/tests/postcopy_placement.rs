//! Post-copy placement against the kernel, as a destination does it: memory
//! filled by pre-copy has its stale ranges discarded
//! (`HostMemory::discard`) and is registered for missing faults; a thread
//! standing in for a vCPU reads every page while this thread serves its
//! faults with `place_run` and `zero_run`, timing them with
//! `FaultLatency`. Afterwards every page must hold what a model says:
//! discarded pages what was placed, the others the pre-copy pattern; and
//! exactly the discarded pages must have faulted, once each, so a page
//! that kept its contents never faults and a discarded one never reads
//! stale data.
//!
//! Anonymous memory with transparent hugepages (discarding parts of a
//! hugepage, a whole one, and a run across two), a shared memfd, and a
//! 2 MiB hugetlb memfd; each with the discard made before registering and
//! after it. Also: `MADV_DONTNEED` alone does not make a shared page
//! missing (the page cache still has it), and bad runs are typed errors
//! that place nothing.
//!
//! Every wait is bounded. The userfaultfd is declared after the memory, so
//! a failing test drops it first, which wakes a reader still waiting; the
//! memory is then leaked ([`KeptOnFailure`]) so that reader does not
//! crash the test binary.

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::host::HostMemory;
use ramblock_linux::hugetlb::PoolReservation;
use ramblock_linux::postcopy::FaultLatency;
use ramblock_linux::uffd::{Event, Features, Placed, RegisterMode, UffdError, Userfaultfd};
use ramblock_linux::{LinuxMemory, MemoryBuilder, Prealloc};
use std::ops::Deref;
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

const PAGE: usize = 4096;
const HUGE: usize = 2 << 20;
/// How long the whole read of a block may take, faults served included.
const DEADLINE: Duration = Duration::from_secs(60);

fn skip(reason: &str) {
    println!("skipped: {reason}");
}

/// Memory that is leaked rather than unmapped when the test fails: a
/// faulting thread may still be about to read it.
struct KeptOnFailure(Option<LinuxMemory>);

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

/// A userfaultfd with `feature` enabled, or `None` after saying why not.
fn open(feature: Features) -> Option<Userfaultfd> {
    match Userfaultfd::new() {
        Ok(uffd) if uffd.features().contains(feature) => Some(uffd),
        Ok(_) => {
            skip(&format!("the kernel's userfaultfd lacks {feature}"));
            None
        }
        Err(e) if e.is_unavailable() => {
            skip(&e.to_string());
            None
        }
        Err(e) => panic!("opening a userfaultfd: {e}"),
    }
}

/// `len` bytes that differ from page to page (and from `seed` to seed)
/// and are never zero.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u8).wrapping_mul(31) ^ ((i / PAGE) as u8) ^ ((i / PAGE / 256) as u8) ^ seed) | 1
        })
        .collect()
}

/// How the destination gets a discarded range's pages back.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Serve {
    /// One page per fault (`place_run` of one page): every page faults.
    Page,
    /// The whole range on its first fault (`place_run`), around one page
    /// that was placed with other contents beforehand (at this offset
    /// into the range, never the first page): the copy meets `EEXIST` part
    /// way and must keep that page and place the rest.
    Run { placed_before: Option<usize> },
    /// The whole range on its first fault, as zeros (`zero_run`).
    Zero,
    /// Pushed by the source before the vCPU gets there (`place_run`
    /// before the reader starts): never faults.
    Pushed,
}

/// A discarded range: `start .. start + len` bytes of the block.
#[derive(Copy, Clone, Debug)]
struct Discard {
    start: usize,
    len: usize,
    serve: Serve,
}

impl Discard {
    fn range(&self) -> std::ops::Range<usize> {
        self.start..self.start + self.len
    }

    /// The faults the vCPU's in-order read takes here, in block pages.
    fn expected_faults(&self, page: usize) -> usize {
        match self.serve {
            Serve::Page => self.len / page,
            Serve::Run { .. } | Serve::Zero => 1,
            Serve::Pushed => 0,
        }
    }
}

/// When the stale ranges are discarded relative to registering.
#[derive(Copy, Clone, Debug)]
enum Order {
    /// Discard, then register (what QEMU does).
    DiscardThenRegister,
    /// Register, then discard: no moment in which an unregistered hole
    /// exists (which khugepaged could fill with zeros on THP memory).
    RegisterThenDiscard,
}

/// The kernel's view of a block's mapping, from `/proc/self/smaps`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
struct Residency {
    /// Rss plus hugetlb pages (which smaps keeps out of Rss), in bytes.
    resident: u64,
    /// Bytes mapped by transparent hugepages (PMD-mapped).
    anon_huge: u64,
}

/// The residency of the mappings overlapping `start .. start + len`.
fn residency(start: usize, len: usize) -> Residency {
    let smaps = std::fs::read_to_string("/proc/self/smaps").expect("reading /proc/self/smaps");
    let (end, mut overlapping, mut sum) = (start + len, false, Residency::default());
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) {
                overlapping = a < end && start < b;
                continue;
            }
        }
        let kb = words
            .next()
            .and_then(|w| w.parse::<u64>().ok())
            .unwrap_or(0);
        if overlapping {
            match first {
                "Rss:" | "Shared_Hugetlb:" | "Private_Hugetlb:" => sum.resident += kb << 10,
                "AnonHugePages:" => sum.anon_huge += kb << 10,
                _ => {}
            }
        }
    }
    sum
}

/// A thread that reads the block page by page, in order (faulting on each
/// missing page), and sends back what it read.
fn read_every_page(base: usize, len: usize) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut copy = vec![0u8; len];
        for at in (0..len).step_by(PAGE) {
            // SAFETY: the test keeps the block mapped until it has heard
            // back from this thread (a failing test leaks it); `copy` is
            // a separate buffer of `len` bytes.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    (base + at) as *const u8,
                    copy.as_mut_ptr().add(at),
                    PAGE,
                )
            };
        }
        let _ = tx.send(copy);
    });
    rx
}

/// The destination's state as the test believes it: which block pages
/// are present and what every byte should read.
struct Model {
    page: usize,
    present: Vec<bool>,
    contents: Vec<u8>,
}

impl Model {
    /// What a placement of `data` (or zeros) over `start ..` must find and
    /// leave: `Placed` if every page was missing, else `AlreadyPresent`,
    /// with only the missing pages taking the new contents.
    fn place(&mut self, start: usize, len: usize, data: Option<&[u8]>) -> Placed {
        let mut placed = Placed::Placed;
        for at in (start..start + len).step_by(self.page) {
            let i = at / self.page;
            if self.present[i] {
                placed = Placed::AlreadyPresent;
                continue;
            }
            self.present[i] = true;
            let new = &mut self.contents[at..at + self.page];
            match data {
                Some(data) => new.copy_from_slice(&data[at - start..at - start + self.page]),
                None => new.fill(0),
            }
        }
        placed
    }
}

/// Runs the post-copy scenario on `mem` (filled, then `discards` made
/// missing in `order`) and checks contents, fault count and latencies.
fn serve_postcopy(mem: &LinuxMemory, uffd: &Userfaultfd, discards: &[Discard], order: Order) {
    let page = mem.page_size().bytes() as usize;
    let len = mem.used_len().0 as usize;
    let base = mem.base().as_ptr() as usize;
    let case = format!("{} memory, {order:?}", mem.kind().name());

    // Pre-copy: every page holds the pattern.
    let original = pattern(len, 0x5a);
    mem.region()
        .write(ByteLen::ZERO, &original)
        .expect("writing the pre-copy pattern");
    let before = residency(base, len);
    assert_eq!(
        before.resident, len as u64,
        "{case}: preallocated and written: {before:?}"
    );
    // What the source will send for the discarded ranges.
    let fresh = pattern(len, 0xc3);

    let discard = |discards: &[Discard]| {
        for d in discards {
            mem.discard(ByteLen(d.start as u64), ByteLen(d.len as u64))
                .unwrap_or_else(|e| panic!("{case}: discarding {d:?}: {e}"));
        }
    };
    let block = match order {
        Order::DiscardThenRegister => {
            discard(discards);
            uffd.register_memory(mem, RegisterMode::MISSING).unwrap()
        }
        Order::RegisterThenDiscard => {
            let block = uffd.register_memory(mem, RegisterMode::MISSING).unwrap();
            discard(discards);
            block
        }
    };
    assert_eq!(block.page_size(), page);
    // The kernel's view: exactly the discarded bytes left the mapping (a
    // discard inside a transparent hugepage split it, not dropped it).
    let discarded: usize = discards.iter().map(|d| d.len).sum();
    let after = residency(base, len);
    assert_eq!(
        after.resident,
        (len - discarded) as u64,
        "{case}: after discarding {discarded:#x} bytes: {after:?}"
    );

    let mut model = Model {
        page,
        present: vec![true; len / page],
        contents: original,
    };
    for d in discards {
        model.present[d.start / page..(d.start + d.len) / page].fill(false);
    }
    let latency = FaultLatency::new();
    let key = |offset: usize| (offset / page) as u64;

    // Placements made before the vCPU runs: pushed ranges, and the pages
    // that runs will meet part way.
    for d in discards {
        match d.serve {
            Serve::Pushed => {
                let want = model.place(d.start, d.len, Some(&fresh[d.range()]));
                assert_eq!(
                    block
                        .place_run(uffd, d.start as u64, &fresh[d.range()])
                        .unwrap(),
                    want
                );
                assert_eq!(want, Placed::Placed);
            }
            Serve::Run {
                placed_before: Some(into),
            } => {
                assert!(into > 0 && into < d.len && into % page == 0, "{d:?}");
                let at = d.start + into;
                let other = pattern(page, 0x77);
                assert_eq!(model.place(at, page, Some(&other)), Placed::Placed);
                assert_eq!(
                    block.place_run(uffd, at as u64, &other).unwrap(),
                    Placed::Placed
                );
            }
            _ => {}
        }
    }

    // The vCPU reads everything; this thread serves its faults.
    let reader = read_every_page(base, len);
    let started = Instant::now();
    let (mut events, mut new_faults) = (0usize, 0usize);
    let seen = loop {
        if let Ok(seen) = reader.try_recv() {
            break seen;
        }
        assert!(
            started.elapsed() < DEADLINE,
            "{case}: the reader did not finish within {DEADLINE:?} ({events} faults served)"
        );
        let addr = match uffd.read_event(Some(Duration::from_millis(20))).unwrap() {
            None => continue,
            Some(Event::Pagefault { addr, .. }) => addr,
            Some(other) => panic!("{case}: unexpected event {other:?}"),
        };
        events += 1;
        let offset = block
            .offset_of(addr)
            .unwrap_or_else(|| panic!("{case}: fault at {addr:#x} outside the block"))
            as usize;
        let d = discards
            .iter()
            .find(|d| d.range().contains(&offset))
            .unwrap_or_else(|| {
                panic!("{case}: page at {offset:#x} kept its contents, yet faulted")
            });
        assert!(
            !model.present[offset / page],
            "{case}: page at {offset:#x} was placed, yet faulted"
        );
        if !latency.fault(key(offset)) {
            continue;
        }
        new_faults += 1;
        let (start, n, result) = match d.serve {
            Serve::Page => {
                let want = model.place(offset, page, Some(&fresh[offset..offset + page]));
                let got = block.place_run(uffd, offset as u64, &fresh[offset..offset + page]);
                (offset, page, (want, got))
            }
            Serve::Run { .. } => {
                let want = model.place(d.start, d.len, Some(&fresh[d.range()]));
                let got = block.place_run(uffd, d.start as u64, &fresh[d.range()]);
                (d.start, d.len, (want, got))
            }
            Serve::Zero => {
                let want = model.place(d.start, d.len, None);
                (
                    d.start,
                    d.len,
                    (want, block.zero_run(uffd, d.start as u64, d.len as u64)),
                )
            }
            Serve::Pushed => panic!("{case}: pushed range {d:?} faulted at {offset:#x}"),
        };
        let (want, got) = result;
        assert_eq!(
            got.unwrap(),
            want,
            "{case}: placing {n:#x} bytes at {start:#x} for {d:?}"
        );
        assert_eq!(
            latency.placed_run(key(start), (n / page) as u64),
            1,
            "{case}"
        );
    };

    // Contents: discarded pages hold what was placed, the rest pre-copy's.
    for at in (0..len).step_by(PAGE) {
        if seen[at..at + PAGE] != model.contents[at..at + PAGE] {
            let d = discards.iter().find(|d| d.range().contains(&at));
            panic!("{case}: the page at {at:#x} reads other data than expected (in {d:?})");
        }
    }
    // Faults: exactly the discarded pages read while missing, once each.
    let expected: usize = discards.iter().map(|d| d.expected_faults(page)).sum();
    assert_eq!(new_faults, expected, "{case}: faults, in {page}-byte pages");
    assert_eq!(events, expected, "{case}: a page faulted more than once");
    assert!(
        model.present.iter().all(|&p| p),
        "{case}: the model left a page missing"
    );
    assert!(latency.pending_keys().is_empty(), "{case}");
    let summary = latency.summary();
    assert_eq!(summary.faults, expected as u64, "{case}: {summary:?}");
    assert!(
        0 < summary.p50_ns
            && summary.p50_ns <= summary.p99_ns
            && summary.p99_ns <= summary.max_ns
            && summary.max_ns <= summary.total_wait_ns,
        "{case}: {summary:?}"
    );
    // Nothing may fault any more.
    assert_eq!(
        uffd.read_event(Some(Duration::from_millis(20))).unwrap(),
        None
    );
    block.unregister(uffd).unwrap();
}

/// The ranges a 4 KiB-page block of 8 MiB (four 2 MiB hugepages' worth)
/// has discarded: parts of the first hugepage, all of the second, a run
/// across the third and fourth, and a zero run and a pushed run inside
/// the fourth.
fn small_page_discards() -> Vec<Discard> {
    let at = |huge: usize, page: usize| huge * HUGE + page * PAGE;
    vec![
        Discard {
            start: at(0, 5),
            len: PAGE,
            serve: Serve::Page,
        },
        Discard {
            start: at(0, 10),
            len: 3 * PAGE,
            serve: Serve::Run {
                placed_before: Some(PAGE),
            },
        },
        Discard {
            start: at(0, 100),
            len: 4 * PAGE,
            serve: Serve::Zero,
        },
        Discard {
            start: at(1, 0),
            len: HUGE,
            serve: Serve::Page,
        },
        Discard {
            start: at(2, 507),
            len: 10 * PAGE,
            serve: Serve::Run {
                placed_before: None,
            },
        },
        Discard {
            start: at(3, 64),
            len: 64 * PAGE,
            serve: Serve::Zero,
        },
        Discard {
            start: at(3, 200),
            len: 10 * PAGE,
            serve: Serve::Pushed,
        },
    ]
}

fn prealloc() -> Prealloc {
    Prealloc::default()
}

#[test]
fn anonymous_thp_memory_faults_exactly_on_discarded_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.contains("[never]") || thp.is_empty() {
        return skip(&format!("transparent hugepages are off ({})", thp.trim()));
    }
    for order in [Order::DiscardThenRegister, Order::RegisterThenDiscard] {
        let mem = KeptOnFailure(Some(
            MemoryBuilder::anonymous(ByteLen(4 * HUGE as u64))
                .transparent_hugepages(true)
                .prealloc(prealloc())
                .build()
                .unwrap(),
        ));
        let Some(uffd) = open(Features::empty()) else {
            return;
        };
        let base = mem.base().as_ptr() as usize;
        // Without hugepages the scenario would not test what it says.
        let huge = residency(base, 4 * HUGE).anon_huge;
        if huge == 0 {
            return skip("no transparent hugepage formed (memory too fragmented?)");
        }
        serve_postcopy(&mem, &uffd, &small_page_discards(), order);
        // The zero runs map the shared zero page, which is not resident.
        let zeros = (4 + 64) * PAGE as u64;
        assert_eq!(residency(base, 4 * HUGE).resident, 4 * HUGE as u64 - zeros);
    }
}

#[test]
fn shared_memfd_faults_exactly_on_discarded_pages() {
    for order in [Order::DiscardThenRegister, Order::RegisterThenDiscard] {
        let mem = KeptOnFailure(Some(
            MemoryBuilder::memfd(ByteLen(4 * HUGE as u64))
                .prealloc(prealloc())
                .build()
                .unwrap(),
        ));
        let Some(uffd) = open(Features::MISSING_SHMEM) else {
            return;
        };
        serve_postcopy(&mem, &uffd, &small_page_discards(), order);
        // The kernel's view: the placed pages are in the memfd.
        let fd = mem.fd().expect("a memfd has a descriptor");
        let mut page = vec![0u8; PAGE];
        let at = HUGE + 7 * PAGE;
        assert_eq!(
            rustix::io::pread(fd, &mut page, mem.fd_offset() + at as u64).unwrap(),
            PAGE
        );
        assert!(
            page == pattern(4 * HUGE, 0xc3)[at..at + PAGE],
            "the memfd misses a placed page"
        );
    }
}

#[test]
fn hugetlb_memfd_faults_exactly_on_discarded_hugepages() {
    const PAGES: usize = 8;
    let _pool = match PoolReservation::reserve(PageSize::SIZE_2M, PAGES as u64) {
        Ok(pool) => pool,
        Err(e) => return skip(&format!("no {PAGES} free 2 MiB hugepages: {e}")),
    };
    let discards = [
        Discard {
            start: HUGE,
            len: HUGE,
            serve: Serve::Page,
        },
        // Hugepage 4 is placed first, so the run copies 3, meets EEXIST,
        // steps over 4 and copies 5.
        Discard {
            start: 3 * HUGE,
            len: 3 * HUGE,
            serve: Serve::Run {
                placed_before: Some(HUGE),
            },
        },
        Discard {
            start: 6 * HUGE,
            len: HUGE,
            serve: Serve::Zero,
        },
        Discard {
            start: 7 * HUGE,
            len: HUGE,
            serve: Serve::Pushed,
        },
    ];
    for order in [Order::DiscardThenRegister, Order::RegisterThenDiscard] {
        let mem = KeptOnFailure(Some(
            MemoryBuilder::memfd(ByteLen((PAGES * HUGE) as u64))
                .huge_pages(PageSize::SIZE_2M)
                .prealloc(prealloc())
                .build()
                .unwrap(),
        ));
        let Some(uffd) = open(Features::MISSING_HUGETLBFS) else {
            return;
        };
        assert!(mem.is_shared());
        serve_postcopy(&mem, &uffd, &discards, order);
    }

    // Runs must be whole hugepages: typed errors, nothing placed.
    let mem = KeptOnFailure(Some(
        MemoryBuilder::memfd(ByteLen(2 * HUGE as u64))
            .huge_pages(PageSize::SIZE_2M)
            .build()
            .unwrap(),
    ));
    let Some(uffd) = open(Features::MISSING_HUGETLBFS) else {
        return;
    };
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    let small = block.place_run(&uffd, 0, &pattern(PAGE, 1)).unwrap_err();
    assert!(
        matches!(
            small,
            UffdError::Unaligned {
                what: "run length",
                value: 0x1000,
                ..
            }
        ),
        "{small}"
    );
    assert!(small.to_string().contains("2 MiB"), "{small}");
    let small = block.zero_run(&uffd, HUGE as u64, PAGE as u64).unwrap_err();
    assert!(
        matches!(
            small,
            UffdError::Unaligned {
                what: "run length",
                ..
            }
        ),
        "{small}"
    );
    let inside = block.zero_run(&uffd, PAGE as u64, HUGE as u64).unwrap_err();
    assert!(
        matches!(
            inside,
            UffdError::Unaligned {
                what: "block offset",
                ..
            }
        ),
        "{inside}"
    );
    // Both hugepages are still missing: zero runs place them, from the
    // one zero mapping, and they read as zeros.
    assert_eq!(
        block.zero_run(&uffd, 0, 2 * HUGE as u64).unwrap(),
        Placed::Placed
    );
    assert_eq!(
        block.zero_run(&uffd, HUGE as u64, HUGE as u64).unwrap(),
        Placed::AlreadyPresent
    );
    let seen = read_every_page(block.base() as usize, 2 * HUGE)
        .recv_timeout(Duration::from_secs(10))
        .expect("zero-filled hugepages are present");
    assert!(seen.iter().all(|&b| b == 0));
}

/// Regression: `zero_run` on hugetlb memory copies from a mapping of
/// zeros, and the kernel reads a copy's source with page faults disabled.
/// A source page never touched sends it down a slow path that first
/// copies into a temporary hugepage, which fails (ENOMEM) when the pool
/// holds only the block's own pages, as a destination's sized pool does.
/// The zero mapping is touched when made, so no spare hugepage is needed.
#[test]
fn hugetlb_zero_runs_need_no_spare_hugepage() {
    let pool = match PoolReservation::reserve(PageSize::SIZE_2M, 1) {
        Ok(pool) => pool,
        Err(e) => return skip(&format!("no free 2 MiB hugepage: {e}")),
    };
    // Mapping the memfd reserves its one hugepage (nothing is allocated).
    let mem = KeptOnFailure(Some(
        MemoryBuilder::memfd(ByteLen(HUGE as u64))
            .huge_pages(PageSize::SIZE_2M)
            .build()
            .unwrap(),
    ));
    drop(pool);
    // Shrink the pool to what is in use or reserved: the block's page only.
    let _pool = match PoolReservation::empty(PageSize::SIZE_2M) {
        Ok(pool) => pool,
        Err(e) => return skip(&format!("cannot shrink the 2 MiB pool: {e}")),
    };
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let field = |name: &str| -> u64 {
        let line = meminfo.lines().find(|l| l.starts_with(name)).unwrap();
        line[name.len()..].trim().parse().unwrap()
    };
    assert_eq!(
        field("HugePages_Free:"),
        field("HugePages_Rsvd:"),
        "every free hugepage is reserved: there is no spare one"
    );
    let Some(uffd) = open(Features::MISSING_HUGETLBFS) else {
        return;
    };
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    assert_eq!(
        block.zero_run(&uffd, 0, HUGE as u64).unwrap(),
        Placed::Placed
    );
    let seen = read_every_page(block.base() as usize, HUGE)
        .recv_timeout(Duration::from_secs(10))
        .expect("the zero-filled hugepage is present");
    assert!(seen.iter().all(|&b| b == 0));
}

/// `MADV_DONTNEED` only drops this mapping's view of a shared page; the
/// page cache keeps it, so a missing-mode registration never sees a fault
/// and the stale contents come back. Shared memory must be discarded by
/// punching a hole (which `HostMemory::discard` does).
#[test]
fn dontneed_alone_leaves_shared_pages_stale() {
    let mem = KeptOnFailure(Some(
        MemoryBuilder::memfd(ByteLen(4 * PAGE as u64))
            .prealloc(prealloc())
            .build()
            .unwrap(),
    ));
    let Some(uffd) = open(Features::MISSING_SHMEM) else {
        return;
    };
    let stale = pattern(4 * PAGE, 0x21);
    mem.region().write(ByteLen::ZERO, &stale).unwrap();
    let base = mem.base().as_ptr() as usize;
    // SAFETY: the page is this test's memory; its contents may go.
    unsafe {
        rustix::mm::madvise(
            (base + PAGE) as *mut _,
            PAGE,
            rustix::mm::Advice::LinuxDontNeed,
        )
    }
    .unwrap();
    assert_eq!(
        residency(base, 4 * PAGE).resident,
        3 * PAGE as u64,
        "unmapped here"
    );
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    let seen = read_every_page(base, 4 * PAGE);
    assert_eq!(
        uffd.read_event(Some(Duration::from_millis(200))).unwrap(),
        None,
        "no fault"
    );
    let seen = seen
        .recv_timeout(Duration::from_secs(10))
        .expect("no fault to wait on");
    assert!(seen == stale, "the page cache gave the stale page back");
    // Placing there finds the page present.
    assert_eq!(
        block
            .place_run(&uffd, PAGE as u64, &pattern(PAGE, 1))
            .unwrap(),
        Placed::AlreadyPresent
    );
}

#[test]
fn bad_runs_are_typed_errors_and_place_nothing() {
    let mem = KeptOnFailure(Some(
        MemoryBuilder::anonymous(ByteLen(16 * PAGE as u64))
            .build()
            .unwrap(),
    ));
    let Some(uffd) = open(Features::empty()) else {
        return;
    };
    let block = uffd.register_memory(&mem, RegisterMode::MISSING).unwrap();
    let data = pattern(4 * PAGE, 9);

    let e = block.place_run(&uffd, 0x800, &data).unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::Unaligned {
                what: "block offset",
                value: 0x800,
                ..
            }
        ),
        "{e}"
    );
    let e = block.place_run(&uffd, 0, &data[..PAGE + 1]).unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::Unaligned {
                what: "run length",
                value: 0x1001,
                ..
            }
        ),
        "{e}"
    );
    let e = block.place_run(&uffd, 0, &[]).unwrap_err();
    assert!(
        matches!(e, UffdError::EmptyRange { op: "place_run" }),
        "{e}"
    );
    // A run that starts inside the block but ends past it.
    let e = block.place_run(&uffd, 14 * PAGE as u64, &data).unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::OutOfRange {
                offset: 0xe000,
                len: 0x4000,
                block_len: 0x10000
            }
        ),
        "{e}"
    );
    let e = block
        .place_run(&uffd, 16 * PAGE as u64, &data[..PAGE])
        .unwrap_err();
    assert!(matches!(e, UffdError::OutOfRange { .. }), "{e}");
    let e = block
        .place_run(&uffd, u64::MAX - (PAGE as u64 - 1), &data[..PAGE])
        .unwrap_err();
    assert!(matches!(e, UffdError::OutOfRange { .. }), "{e}");
    assert!(
        e.to_string().contains("outside the registered block"),
        "{e}"
    );
    // SAFETY: only used as a source, which is refused (it is registered).
    let inside = unsafe { std::slice::from_raw_parts(block.base().add(8 * PAGE), PAGE) };
    let e = block.place_run(&uffd, 0, inside).unwrap_err();
    assert!(matches!(e, UffdError::SourceRegistered { .. }), "{e}");

    let e = block.zero_run(&uffd, 0x800, PAGE as u64).unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::Unaligned {
                what: "block offset",
                ..
            }
        ),
        "{e}"
    );
    let e = block.zero_run(&uffd, 0, 0x1800).unwrap_err();
    assert!(
        matches!(
            e,
            UffdError::Unaligned {
                what: "run length",
                ..
            }
        ),
        "{e}"
    );
    let e = block.zero_run(&uffd, 0, 0).unwrap_err();
    assert!(matches!(e, UffdError::EmptyRange { op: "zero_run" }), "{e}");
    let e = block
        .zero_run(&uffd, 8 * PAGE as u64, u64::MAX - PAGE as u64 + 1)
        .unwrap_err();
    assert!(matches!(e, UffdError::OutOfRange { .. }), "{e}");

    // Every page is still missing: one run over all of them places them
    // all, which it would not if a refused run had written any.
    let all = pattern(16 * PAGE, 3);
    assert_eq!(block.place_run(&uffd, 0, &all).unwrap(), Placed::Placed);
    let seen = read_every_page(block.base() as usize, 16 * PAGE)
        .recv_timeout(Duration::from_secs(10))
        .expect("placed pages are present");
    assert!(seen == all);
    // And a second run over them finds every page there and keeps it.
    assert_eq!(
        block.place_run(&uffd, 0, &data).unwrap(),
        Placed::AlreadyPresent
    );
    assert_eq!(
        block.zero_run(&uffd, 0, 4 * PAGE as u64).unwrap(),
        Placed::AlreadyPresent
    );
    let seen = read_every_page(block.base() as usize, 16 * PAGE)
        .recv_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(seen == all, "a run over present pages changed them");
}
