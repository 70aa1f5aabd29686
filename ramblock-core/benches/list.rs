//! Finding a page's block among 64 blocks with `RamList::read().block_at`,
//! against a plain linear scan over `(start, end)` ranges.
//!
//! - "repeated hit": the same block every time, so the most-recently-used
//!   shortcut answers (target: a few nanoseconds, lock included).
//! - "alternating blocks": two blocks in turn, so the shortcut always misses
//!   and the binary search runs.

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use ramblock_core::addr::{ByteLen, PageSize, RamAddr};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec};
use ramblock_core::buffer::BufferMemory;
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use std::time::Duration;

const BLOCKS: usize = 64;
/// Small blocks: the lookup does not depend on their size, only their number.
const BLOCK_LEN: u64 = 256 << 10;

type List = RamList<'static, BufferMemory<Box<[u8]>>, Owned, BLOCKS>;

fn build() -> (List, Vec<(u64, u64)>) {
    let list = List::new();
    for i in 0..BLOCKS {
        let name = BlockName::new(&format!("block{i}")).expect("valid name");
        let spec = BlockSpec::new(name, ByteLen(BLOCK_LEN));
        let bitmaps = BlockBitmaps::for_spec(&spec).expect("default clear shift");
        let buffer = vec![0u8; BLOCK_LEN as usize].into_boxed_slice();
        let memory = BufferMemory::new(buffer, ByteLen(BLOCK_LEN), PageSize::SIZE_4K)
            .expect("buffer is page-aligned in length");
        list.add(spec, memory, bitmaps).expect("room for 64 blocks");
    }
    let ranges = list
        .read()
        .iter()
        .map(|b| (b.offset().0, b.offset().0 + b.max_length().0))
        .collect();
    (list, ranges)
}

/// The baseline: index of the range holding `addr`, scanning from the start.
fn linear(ranges: &[(u64, u64)], addr: u64) -> Option<usize> {
    ranges.iter().position(|&(s, e)| s <= addr && addr < e)
}

/// A page in the middle of block `i`.
fn addr_in(ranges: &[(u64, u64)], i: usize) -> u64 {
    ranges[i].0 + BLOCK_LEN / 2
}

fn lookup(c: &mut Criterion) {
    let (list, ranges) = build();
    let lookup = |addr: u64| {
        list.read()
            .block_at(RamAddr(addr))
            .map(|(_, offset)| offset.0)
    };
    // Both agree on every block.
    for i in 0..BLOCKS {
        let addr = addr_in(&ranges, i);
        assert_eq!(linear(&ranges, addr), Some(i));
        assert_eq!(lookup(addr), Some(BLOCK_LEN / 2));
    }

    // The block halfway down the list, so the linear scan is not flattered.
    let hit = addr_in(&ranges, BLOCKS / 2);
    let mut group = c.benchmark_group("find block of a page among 64, repeated hit");
    group.bench_function("baseline", |b| {
        b.iter(|| linear(black_box(&ranges), black_box(hit)))
    });
    group.bench_function("ramblock", |b| b.iter(|| lookup(black_box(hit))));
    group.finish();

    let pair = [
        addr_in(&ranges, BLOCKS / 4),
        addr_in(&ranges, 3 * BLOCKS / 4),
    ];
    let mut group = c.benchmark_group("find block of a page among 64, alternating blocks");
    group.bench_function("baseline", |b| {
        let mut turn = 0;
        b.iter(|| {
            turn ^= 1;
            linear(black_box(&ranges), black_box(pair[turn]))
        })
    });
    group.bench_function("ramblock", |b| {
        let mut turn = 0;
        b.iter(|| {
            turn ^= 1;
            lookup(black_box(pair[turn]))
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = lookup
}
criterion_main!(benches);
