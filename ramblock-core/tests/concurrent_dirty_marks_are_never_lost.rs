//! Stress tests of the concurrency contract, bounded in time:
//! - two threads set dirty ranges while a third harvests them into the
//!   migration bitmap: every bit set is harvested exactly once;
//! - readers look blocks up and mark pages dirty while another thread adds
//!   and removes blocks: every mark lands in the right block.
mod common;
use common::add_buffer_block;

use ramblock_core::addr::{ByteLen, RamAddr};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::BlockSpec;
use ramblock_core::dirty_log::{DirtyClient, DirtyClients, SoftwareOnly};
use ramblock_core::list::RamList;
use ramblock_core::name::BlockName;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::Mem;
const PAGE: u64 = 4096;
const RUN_FOR: Duration = Duration::from_millis(400);
/// Rounds each thread runs at least under Miri, whose clock advances with
/// the code it interprets, thousands of times slower: in `RUN_FOR` it
/// would not do the work the tests check was done. Natively the threads
/// run thousands of rounds in `RUN_FOR`.
const MIRI_MIN_ROUNDS: u64 = 12;

/// Whether a thread that ran `rounds` must go on under Miri regardless of
/// the clock.
fn miri_wants_more(rounds: u64) -> bool {
    cfg!(miri) && rounds < MIRI_MIN_ROUNDS
}

fn add(list: &RamList<'_, Mem, Owned, 8>, name: &str, pages: u64) -> RamAddr {
    let spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE));
    add_buffer_block(list, spec, 0)
}

#[test]
fn two_setters_and_a_harvester_lose_no_bit() {
    // Fewer pages under Miri, so its minimum rounds cover half of them.
    const PAGES: usize = if cfg!(miri) { 256 } else { 4096 };
    let list: RamList<'_, Mem, Owned, 8> = RamList::new();
    add(&list, "pc.ram", PAGES as u64);
    let stop = AtomicBool::new(false);
    let view = list.read();
    let block = view.by_name("pc.ram").unwrap();

    let (set_by, harvested) = std::thread::scope(|s| {
        let setters: Vec<_> = (0..2u64)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    // Each setter records what it set in its own model.
                    let mut model = vec![false; PAGES];
                    let mut x = 0x1234_5678 + t;
                    let deadline = Instant::now() + RUN_FOR;
                    let mut rounds = 0;
                    while Instant::now() < deadline || miri_wants_more(rounds) {
                        rounds += 1;
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let start = (x % PAGES as u64) as usize;
                        let count = ((x >> 20) % 130).min((PAGES - start) as u64) as usize;
                        block
                            .mark_dirty(
                                ByteLen(start as u64 * PAGE),
                                ByteLen(count as u64 * PAGE),
                                DirtyClients::MIGRATION,
                            )
                            .unwrap();
                        model[start..start + count].fill(true);
                    }
                    stop.store(true, Ordering::Release);
                    model
                })
            })
            .collect();
        let harvester = s.spawn(|| {
            // Harvest and "send" (take) pages while the setters run; count
            // every page taken.
            let mut taken = vec![0u32; PAGES];
            let mut take_all = || {
                block.sync_dirty_log(&mut SoftwareOnly).unwrap();
                let mut st = block.migration();
                let mut from = 0;
                while let Some(p) = st.bitmap.find_next_dirty(from) {
                    st.bitmap.take(p).unwrap();
                    taken[p] += 1;
                    from = p + 1;
                }
            };
            while !stop.load(Ordering::Acquire) {
                take_all();
            }
            taken
        });
        let models: Vec<Vec<bool>> = setters.into_iter().map(|h| h.join().unwrap()).collect();
        let mut taken = harvester.join().unwrap();
        // A final harvest after every setter stopped picks up the rest.
        block.sync_dirty_log(&mut SoftwareOnly).unwrap();
        let st = block.migration();
        for (p, t) in taken.iter_mut().enumerate() {
            *t += u32::from(st.bitmap.is_set(p).unwrap());
        }
        let set_by: Vec<bool> = (0..PAGES).map(|p| models[0][p] || models[1][p]).collect();
        (set_by, taken)
    });
    for p in 0..PAGES {
        assert_eq!(
            harvested[p] > 0,
            set_by[p],
            "page {p}: set {} harvested {} times",
            set_by[p],
            harvested[p]
        );
    }
    assert!(
        set_by.iter().filter(|&&b| b).count() > PAGES / 2,
        "the stress test did real work"
    );
    assert_eq!(block.dirty(DirtyClient::Migration).count_ones(), 0);
}

#[test]
fn lookups_and_marks_proceed_while_blocks_come_and_go() {
    let list: RamList<'_, Mem, Owned, 8> = RamList::new();
    let ram = add(&list, "pc.ram", 256);
    let stop = AtomicBool::new(false);
    let churned = std::thread::scope(|s| {
        let churner = s.spawn(|| {
            let mut rounds = 0u64;
            let deadline = Instant::now() + RUN_FOR;
            while Instant::now() < deadline || miri_wants_more(rounds) {
                add(&list, "hotplug", 1 + rounds % 100);
                let _ = list.remove("hotplug").unwrap();
                rounds += 1;
            }
            stop.store(true, Ordering::Release);
            rounds
        });
        let readers: Vec<_> = (0..2u64)
            .map(|t| {
                let (list, stop) = (&list, &stop);
                s.spawn(move || {
                    let mut page = t;
                    // Under Miri, at least once over every page (see
                    // MIRI_MIN_ROUNDS).
                    let min_page = if cfg!(miri) { 256 } else { 0 };
                    while !stop.load(Ordering::Acquire) || page < min_page {
                        let addr = RamAddr(ram.0 + (page % 256) * PAGE);
                        list.mark_dirty(addr, ByteLen(1), DirtyClients::DISPLAY)
                            .unwrap();
                        assert_eq!(list.read().block_at(addr).unwrap().0.name(), "pc.ram");
                        page += 2;
                    }
                })
            })
            .collect();
        readers.into_iter().for_each(|r| r.join().unwrap());
        churner.join().unwrap()
    });
    assert!(churned > 10, "the churner ran ({churned} rounds)");
    assert_eq!(list.version(), 2 * churned + 1);
    let view = list.read();
    assert_eq!(
        view.by_name("pc.ram")
            .unwrap()
            .dirty(DirtyClient::Display)
            .count_ones(),
        256
    );
}
