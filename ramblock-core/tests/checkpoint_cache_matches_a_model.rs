//! The COLO checkpoint cache against a model: the RAM and the cache as
//! `Vec<u8>`, the marks as a `BTreeSet` of pages.
//!
//! Random sequences of write_page / mark_range / commit / abort / is_marked,
//! with pages and lengths in small ranges so they collide and often fall
//! just outside the cache. After every step the block's RAM equals the model
//! byte for byte (so only a commit changes it, and exactly by the marked
//! pages), the mark count agrees, and a commit copied nothing as a device
//! write (no dirty bits). Every refused call is the expected typed error and
//! changes nothing.

#[path = "../src/testing.rs"]
#[allow(dead_code)]
mod testing;

use ramblock_core::addr::{ByteLen, PageSize};
use ramblock_core::bitmap::{Owned, StorageTooSmall};
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::checkpoint::{mark_words_needed, CheckpointCache, CheckpointError, CommitStats};
use ramblock_core::dirty_log::DirtyClient;
use ramblock_core::host::HostMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use ramblock_core::region::HostRegion;
use std::collections::BTreeSet;
use testing::Rng;

type Mem = BufferMemory<Box<[u8]>>;
const PAGE: u64 = 4096;

fn memory(pages: u64, fill: impl Fn(usize) -> u8) -> Mem {
    let bytes: Vec<u8> = (0..(pages * PAGE) as usize).map(fill).collect();
    Mem::new(
        bytes.into_boxed_slice(),
        ByteLen(pages * PAGE),
        PageSize::SIZE_4K,
    )
    .unwrap()
}

/// Zeroed memory of `pages` pages, without a call per byte (which Miri
/// takes seconds over).
fn zeroed(pages: u64) -> Mem {
    let bytes = vec![0u8; (pages * PAGE) as usize];
    Mem::new(
        bytes.into_boxed_slice(),
        ByteLen(pages * PAGE),
        PageSize::SIZE_4K,
    )
    .unwrap()
}

fn contents(region: &HostRegion<'_>) -> Vec<u8> {
    let mut out = vec![0u8; region.len()];
    region.read(ByteLen::ZERO, &mut out).unwrap();
    out
}

/// Runs of consecutive pages in `marks`.
fn runs(marks: &BTreeSet<u64>) -> u64 {
    marks
        .iter()
        .filter(|&&p| p == 0 || !marks.contains(&(p - 1)))
        .count() as u64
}

fn run(seed: u64, pages: u64, steps: usize) {
    let mut rng = Rng::new(seed);
    let list: RamList<'_, Mem, Owned, 2> = RamList::new();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(pages * PAGE));
    let ram_mem = memory(pages, |i| (i % 251) as u8);
    list.add(
        spec.clone(),
        ram_mem,
        BlockBitmaps::for_spec(&spec).unwrap(),
    )
    .unwrap();
    // The cache may be longer than the block; only the block's length counts.
    let extra = rng.below(2);
    let cache_mem = memory(pages + extra, |i| (i % 241) as u8 ^ 0x5A);
    let mut model_cache = contents(&cache_mem.region());
    model_cache.truncate((pages * PAGE) as usize);
    let mut cache = CheckpointCache::allocate(cache_mem, ByteLen(pages * PAGE)).unwrap();
    assert_eq!(cache.pages(), pages);

    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    let mut model_ram = contents(&block.region());
    let mut marks = BTreeSet::new();

    for step in 0..steps {
        let ctx = format!("seed {seed}, {pages} pages, step {step}");
        match rng.below(9) {
            0..=3 => {
                let page = rng.below(pages + 3);
                let len = match rng.below(8) {
                    0 => [0, 4095, 4097, 8192][rng.below(4) as usize],
                    _ => PAGE as usize,
                };
                let tag = rng.next();
                let data: Vec<u8> = (0..len)
                    .map(|i| (tag as usize).wrapping_add(i * 7) as u8)
                    .collect();
                let got = cache.write_page(page, &data);
                if len != PAGE as usize {
                    let want = CheckpointError::WrongDataLength { len: len as u64 };
                    assert_eq!(got, Err(want), "{ctx}");
                } else if page >= pages {
                    let want = CheckpointError::PageOutOfRange {
                        page,
                        count: 1,
                        pages,
                    };
                    assert_eq!(got, Err(want), "{ctx}");
                } else {
                    assert_eq!(got, Ok(()), "{ctx}");
                    let at = (page * PAGE) as usize;
                    model_cache[at..at + PAGE as usize].copy_from_slice(&data);
                    marks.insert(page);
                }
            }
            4 => {
                let page = rng.below(pages + 2);
                let count = rng.below(10);
                let got = cache.mark_range(page, count);
                if page + count > pages {
                    let want = CheckpointError::PageOutOfRange { page, count, pages };
                    assert_eq!(got, Err(want), "{ctx}");
                } else {
                    let newly = (page..page + count).filter(|p| marks.insert(*p)).count();
                    assert_eq!(got, Ok(newly as u64), "{ctx}");
                }
            }
            5 | 6 => {
                let full = block.region();
                if rng.below(4) == 0 {
                    let short = rng.below(pages * PAGE) as usize;
                    let got = cache.commit(full.subregion(ByteLen::ZERO, short).unwrap());
                    let want = CheckpointError::RamTooShort {
                        ram_len: short as u64,
                        needed: pages * PAGE,
                    };
                    assert_eq!(got, Err(want), "{ctx}");
                } else {
                    let want = CommitStats {
                        pages: marks.len() as u64,
                        runs: runs(&marks),
                    };
                    assert_eq!(cache.commit(full), Ok(want), "{ctx}");
                    for page in std::mem::take(&mut marks) {
                        let at = (page * PAGE) as usize..((page + 1) * PAGE) as usize;
                        model_ram[at.clone()].copy_from_slice(&model_cache[at]);
                    }
                }
            }
            7 => {
                assert_eq!(cache.abort(), marks.len() as u64, "{ctx}");
                marks.clear();
            }
            _ => {
                let page = rng.below(pages + 2);
                let got = cache.is_marked(page);
                if page < pages {
                    assert_eq!(got, Ok(marks.contains(&page)), "{ctx}");
                } else {
                    let want = CheckpointError::PageOutOfRange {
                        page,
                        count: 1,
                        pages,
                    };
                    assert_eq!(got, Err(want), "{ctx}");
                }
            }
        }
        assert_eq!(cache.marked_count(), marks.len() as u64, "{ctx}");
        assert!(contents(&block.region()) == model_ram, "{ctx}: RAM differs");
        for client in DirtyClient::ALL {
            assert_eq!(block.dirty(client).count_ones(), 0, "{ctx}: no dirty marks");
        }
    }
    let cache_now = contents(&cache.cache().region());
    assert!(
        cache_now[..model_cache.len()] == model_cache[..],
        "cache differs"
    );
}

#[test]
fn random_checkpoints_match_the_model() {
    // Under Miri, which runs this thousands of times slower (and fills
    // memory a byte per call), small blocks and few steps: the word edges
    // of the marks (63, 64, 65 pages) are checked natively.
    if cfg!(miri) {
        for (seed, pages) in [(1, 1), (2, 3)] {
            run(seed, pages, 12);
        }
        return;
    }
    for (seed, pages) in [(1, 1), (2, 63), (3, 64), (4, 65), (5, 130)] {
        run(seed, pages, 1500);
    }
}

#[test]
fn construction_errors_are_typed_and_hand_everything_back() {
    let short = zeroed(2);
    let rejected = CheckpointCache::allocate(short, ByteLen(3 * PAGE)).unwrap_err();
    assert_eq!(
        rejected.error,
        CheckpointError::CacheTooShort {
            cache_len: 2 * PAGE,
            needed: 3 * PAGE
        }
    );
    assert_eq!(rejected.cache.used_len(), ByteLen(2 * PAGE));

    let rejected = CheckpointCache::allocate(zeroed(2), ByteLen(PAGE + 1)).unwrap_err();
    assert_eq!(
        rejected.error,
        CheckpointError::Unaligned {
            used_length: PAGE + 1
        }
    );

    assert_eq!(mark_words_needed(ByteLen(65 * PAGE)), 2);
    let mut words = [7u64; 1];
    let rejected =
        CheckpointCache::new(zeroed(65), &mut words[..], ByteLen(65 * PAGE)).unwrap_err();
    assert_eq!(
        rejected.error,
        CheckpointError::Storage(StorageTooSmall {
            needed: 2,
            given: 1
        })
    );
    assert_eq!(*rejected.marks, [7], "the words come back untouched");
    for e in [
        CheckpointError::CacheTooShort {
            cache_len: 2 * PAGE,
            needed: 3 * PAGE,
        },
        CheckpointError::RamTooShort {
            ram_len: PAGE,
            needed: 3 * PAGE,
        },
    ] {
        let text = e.to_string();
        assert!(text.contains("0x2000") || text.contains("0x1000"), "{text}");
        assert!(text.contains("0x3000"), "{text}");
    }
}

#[test]
fn works_over_caller_storage_without_an_allocator() {
    // What a firmware VMM does: static buffers for the cache, the marks and
    // the RAM.
    let mut cache_buf = [0u8; 4 * PAGE as usize];
    let mut ram_buf = [0xEEu8; 4 * PAGE as usize];
    let mut words = [!0u64; 1];
    {
        let cache_mem =
            BufferMemory::new(&mut cache_buf[..], ByteLen(4 * PAGE), PageSize::SIZE_4K).unwrap();
        let ram =
            BufferMemory::new(&mut ram_buf[..], ByteLen(4 * PAGE), PageSize::SIZE_4K).unwrap();
        let mut cache = CheckpointCache::new(cache_mem, &mut words[..], ByteLen(4 * PAGE)).unwrap();
        assert_eq!(cache.marked_count(), 0, "the caller's words are cleared");
        cache.write_page(3, &[3; PAGE as usize]).unwrap();
        cache.write_page(1, &[1; PAGE as usize]).unwrap();
        cache.write_page(0, &[9; PAGE as usize]).unwrap();
        assert_eq!(
            cache.commit(ram.region()),
            Ok(CommitStats { pages: 3, runs: 2 })
        );
        assert_eq!(cache.marked_count(), 0);
    }
    let pages: Vec<u8> = ram_buf.chunks(PAGE as usize).map(|p| p[0]).collect();
    assert_eq!(pages, [9, 1, 0xEE, 3]);
}
