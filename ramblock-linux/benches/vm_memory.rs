//! A virtio device's writes through vm-memory: ramblock blocks
//! (`guest_memory::GuestRam`, dirty marks in the block's word-atomic
//! bitmaps) against vm-memory's own `GuestMemoryMmap` with its
//! `AtomicBitmap` (the `baseline` of each group), in the same run.
//!
//! - `vm_memory_write_4k`: `write_slice` of a 4 KiB buffer at the next page
//!   of the first 1 MiB of a 64 MiB guest, as a block device's response lands. Target: at most
//!   1.1x the baseline. `ramblock` marks all three dirty clients, as
//!   `RamBlock::write` does; `ramblock_migration_only` marks the migration
//!   client alone (a KVM VMM with no display or TCG code caches).
//! - `vm_memory_mark_2m`: marking a 2 MiB write dirty, the bitmap call
//!   vm-memory makes after the copy (`Bitmap::mark_dirty` on the region's
//!   bitmap). Target: at least 20x faster than the baseline.
//!
//! `cargo bench -p ramblock-linux --bench vm_memory`, then
//! `cargo xtask bench` prints the ratios.

use criterion::{criterion_group, criterion_main, Criterion};
use ramblock_core::addr::ByteLen;
use ramblock_core::bitmap::Owned;
use ramblock_core::dirty_log::DirtyClients;
use ramblock_core::{BlockBitmaps, BlockName, BlockSpec, RamList};
use ramblock_linux::guest_memory::{guest_ram, BlockRegion};
use ramblock_linux::{LinuxMemory, MemoryBuilder};
use std::hint::black_box;
use std::time::Duration;
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

const LEN: u64 = 64 << 20;
const PAGES: u64 = LEN / 4096;
/// Pages the 4 KiB writes cycle through: 1 MiB, which stays in cache, so
/// the figure is the cost of the write path (lookup, copy, dirty marks)
/// rather than of DRAM traffic another process on the machine shares.
const WRITE_PAGES: u64 = 256;
const MARK: usize = 2 << 20;

type List = RamList<'static, LinuxMemory, Owned, 4>;

fn list() -> List {
    let list = List::new();
    let mem = MemoryBuilder::anonymous(ByteLen(LEN)).build().unwrap();
    let spec = BlockSpec::new(BlockName::new("pc.ram").unwrap(), ByteLen(LEN));
    let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
    list.add(spec, mem, bitmaps).map_err(|r| r.error).unwrap();
    list
}

fn bench(c: &mut Criterion) {
    let buf = vec![0x5au8; 4096];
    let mmap = GuestMemoryMmap::<AtomicBitmap>::from_ranges(&[(GuestAddress(0), LEN as usize)])
        .expect("GuestMemoryMmap");
    let list = list();
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();
    let all = guest_ram(vec![BlockRegion::new(block, GuestAddress(0)).unwrap()]).unwrap();
    let migration = guest_ram(vec![BlockRegion::with_clients(
        block,
        GuestAddress(0),
        ByteLen(0),
        ByteLen(LEN),
        DirtyClients::MIGRATION,
    )
    .unwrap()])
    .unwrap();
    // Fault every page in first, so no figure pays for page faults.
    for p in 0..PAGES {
        mmap.write_slice(&buf, GuestAddress(p * 4096)).unwrap();
        all.write_slice(&buf, GuestAddress(p * 4096)).unwrap();
    }

    let mut g = c.benchmark_group("vm_memory_write_4k");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let mut page = 0u64;
    let mut next = move || {
        page = (page + 1) % WRITE_PAGES;
        GuestAddress(page * 4096)
    };
    g.bench_function("baseline", |b| {
        b.iter(|| mmap.write_slice(black_box(&buf), next()).unwrap())
    });
    g.bench_function("ramblock", |b| {
        b.iter(|| all.write_slice(black_box(&buf), next()).unwrap())
    });
    g.bench_function("ramblock_migration_only", |b| {
        b.iter(|| migration.write_slice(black_box(&buf), next()).unwrap())
    });
    g.finish();

    let mut g = c.benchmark_group("vm_memory_mark_2m");
    g.warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2));
    let theirs = mmap.find_region(GuestAddress(0)).unwrap().bitmap();
    let ours = all.find_region(GuestAddress(0)).unwrap().bitmap();
    let mut at = 0usize;
    let mut next = move || {
        at = (at + MARK) % LEN as usize;
        at
    };
    g.bench_function("baseline", |b| {
        b.iter(|| theirs.mark_dirty(black_box(next()), MARK))
    });
    g.bench_function("ramblock", |b| {
        b.iter(|| ours.mark_dirty(black_box(next()), MARK))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
