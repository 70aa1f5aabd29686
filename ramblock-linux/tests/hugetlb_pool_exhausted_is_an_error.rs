//! An empty hugetlb pool gives `Error::HugetlbPoolExhausted`, naming the
//! pool and how to raise it, on every path: the mapping's reservation,
//! `MADV_POPULATE_WRITE` on a no-reserve mapping, and the touch fallback
//! (which must check the pool first, since a touch would SIGBUS).

mod common;

use common::{skip, HugepagePool};
use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_linux::{Error, MemoryBuilder, Prealloc, PreallocMethod};

const MIB: u64 = 1 << 20;

fn assert_exhausted(result: Result<ramblock_linux::LinuxMemory, Error>, errno: bool) {
    let err = result.expect_err("an empty pool must not back the memory");
    let text = err.to_string();
    match &err {
        Error::HugetlbPoolExhausted {
            page_size,
            needed,
            free,
            pool,
            errno: e,
        } => {
            assert_eq!(*page_size, PageSize::SIZE_2M);
            assert!(*needed >= 1 && *free < *needed, "{text}");
            assert!(pool.ends_with("hugepages-2048kB"), "{text}");
            assert_eq!(e.is_some(), errno, "{text}");
        }
        other => panic!("expected HugetlbPoolExhausted, got {other:?}: {text}"),
    }
    assert!(
        text.contains("nr_hugepages") && text.contains("2 MiB"),
        "{text}"
    );
}

#[test]
fn reserving_from_an_empty_pool_is_an_error() {
    let _pool = match HugepagePool::empty(PageSize::SIZE_2M) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    assert_exhausted(
        MemoryBuilder::hugetlb(ByteLen(4 * MIB), PageSize::SIZE_2M).build(),
        true,
    );
    assert_exhausted(
        MemoryBuilder::memfd(ByteLen(4 * MIB))
            .huge_pages(PageSize::SIZE_2M)
            .build(),
        true,
    );
}

#[test]
fn populating_a_no_reserve_mapping_from_an_empty_pool_is_an_error() {
    let _pool = match HugepagePool::empty(PageSize::SIZE_2M) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let built = MemoryBuilder::hugetlb(ByteLen(4 * MIB), PageSize::SIZE_2M)
        .no_reserve(true)
        .prealloc(Prealloc {
            threads: None,
            method: PreallocMethod::Populate,
        })
        .build();
    assert_exhausted(built, true);
}

#[test]
fn the_touch_fallback_checks_the_pool_instead_of_faulting() {
    let _pool = match HugepagePool::empty(PageSize::SIZE_2M) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    let built = MemoryBuilder::hugetlb(ByteLen(4 * MIB), PageSize::SIZE_2M)
        .no_reserve(true)
        .prealloc(Prealloc {
            threads: None,
            method: PreallocMethod::Touch,
        })
        .build();
    // Reaching this line at all means no SIGBUS.
    assert_exhausted(built, false);
}

#[test]
fn a_pool_with_pages_backs_the_same_request() {
    // The control: the same no-reserve request succeeds once the pool has
    // the pages, so the errors above come from the pool, not the request.
    let _pool = match HugepagePool::reserve(PageSize::SIZE_2M, 2) {
        Ok(p) => p,
        Err(reason) => return skip(&reason.to_string()),
    };
    for method in [PreallocMethod::Populate, PreallocMethod::Touch] {
        let mem = MemoryBuilder::hugetlb(ByteLen(4 * MIB), PageSize::SIZE_2M)
            .no_reserve(true)
            .prealloc(Prealloc {
                threads: None,
                method,
            })
            .build()
            .unwrap();
        let base = ramblock_core::host::HostMemory::base(&mem).as_ptr() as usize;
        assert_eq!(
            common::span_at(base).resident(),
            4 * MIB,
            "{method:?} backed every page"
        );
    }
}
