//! The block list against a naive model: a `BTreeMap` from offset to block.
//!
//! Random sequences of add / remove / resize / lookup with small sizes so
//! operations collide. After every step: no two blocks overlap, every offset
//! is 64-page aligned, the chosen offset is the model's best fit, lookups by
//! address, name and host pointer agree with the model, the version counter
//! moved exactly when the layout changed, resize marked exactly the new used
//! range dirty, and listeners heard exactly the model's events.
mod common;
use common::add_buffer_block;

#[path = "../src/testing.rs"]
#[allow(dead_code)]
mod testing;

use ramblock_core::addr::{ByteLen, PageSize, RamAddr, BLOCK_ALIGN};
use ramblock_core::bitmap::Owned;
use ramblock_core::block::{BlockBitmaps, BlockSpec, RamBlock};
use ramblock_core::dirty_log::DirtyClient;
use ramblock_core::flags::BlockFlags;
use ramblock_core::list::{AddError, RamList, ResizeError};
use ramblock_core::listener::RamListener;
use ramblock_core::name::BlockName;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::Mutex;
use testing::Rng;

use common::Mem;
type Block = RamBlock<Mem, Owned>;

#[derive(Clone, Debug, PartialEq)]
struct ModelBlock {
    name: String,
    used: u64,
    max: u64,
    resizable: bool,
    base: usize,
}

#[derive(Debug, PartialEq, Clone)]
enum Event {
    Added(String, u64),
    Removed(String),
    Resized(String, u64, u64),
}

#[derive(Default)]
struct Recorder(Mutex<Vec<Event>>);

impl RamListener<Mem, Owned> for Recorder {
    fn block_added(&self, b: &Block) {
        self.0
            .lock()
            .unwrap()
            .push(Event::Added(b.name().into(), b.offset().0));
    }
    fn block_removed(&self, b: &Block) {
        self.0.lock().unwrap().push(Event::Removed(b.name().into()));
    }
    fn block_resized(&self, b: &Block, old: ByteLen, new: ByteLen) {
        self.0
            .lock()
            .unwrap()
            .push(Event::Resized(b.name().into(), old.0, new.0));
    }
}

fn align_up(v: u64) -> u64 {
    v.div_ceil(BLOCK_ALIGN) * BLOCK_ALIGN
}

/// Best fit, computed the slow way: try every candidate start, check it
/// against every block.
fn model_best_fit(model: &BTreeMap<u64, ModelBlock>, size: u64) -> u64 {
    let candidates = std::iter::once(0).chain(model.iter().map(|(o, b)| align_up(o + b.max)));
    let mut best: Option<(u64, u64)> = None;
    for start in candidates {
        let overlaps = model
            .iter()
            .any(|(o, b)| start < o + b.max && *o < start + size);
        if overlaps {
            continue;
        }
        let gap_end = model
            .keys()
            .copied()
            .filter(|&o| o >= start)
            .min()
            .unwrap_or(u64::MAX);
        let gap = gap_end - start;
        if best.is_none_or(|(g, s)| gap < g || (gap == g && start < s)) {
            best = Some((gap, start));
        }
    }
    best.unwrap().1
}

const PAGE: u64 = 4096;

#[test]
fn random_operations_match_the_model() {
    // Fewer seeds under Miri, which runs this thousands of times slower.
    let seeds = if cfg!(miri) { 2 } else { 12 };
    for seed in 0..seeds {
        run(seed);
    }
}

fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    // Declared before the list, so it outlives the list's borrow of it (a
    // leaked 'static one would be a leak Miri reports).
    let recorder = Recorder::default();
    let list: RamList<'_, Mem, Owned, 16> = RamList::new();
    list.add_listener(&recorder).unwrap();
    let mut model: BTreeMap<u64, ModelBlock> = BTreeMap::new();
    let mut events = Vec::new();
    let mut version = list.version();

    let steps = if cfg!(miri) { 60 } else { 400 };
    for step in 0..steps {
        let ctx = format!("seed {seed} step {step}");
        match rng.below(10) {
            0..=3 => {
                // Sizes of 1..=200 pages collide with the 64-page alignment.
                let used = (1 + rng.below(200)) * PAGE;
                let resizable = rng.below(2) == 0;
                let max = if resizable {
                    used + rng.below(100) * PAGE
                } else {
                    used
                };
                let name = format!("blk{}", rng.below(24));
                let mut spec = BlockSpec::new(BlockName::new(&name).unwrap(), ByteLen(used));
                if resizable {
                    spec = spec.resizable(ByteLen(max));
                }
                let mem = Mem::new(
                    vec![0u8; max as usize].into_boxed_slice(),
                    ByteLen(used),
                    PageSize::SIZE_4K,
                )
                .unwrap();
                let base = ramblock_core::host::HostMemory::base(&mem).as_ptr() as usize;
                let bitmaps = BlockBitmaps::for_spec(&spec).unwrap();
                let dup = model.values().any(|b| b.name == name);
                match list.add(spec, mem, bitmaps) {
                    Ok(offset) => {
                        assert!(!dup, "{ctx}: duplicate accepted");
                        assert!(model.len() < 16);
                        assert_eq!(offset.0, model_best_fit(&model, max), "{ctx}: best fit");
                        model.insert(
                            offset.0,
                            ModelBlock {
                                name: name.clone(),
                                used,
                                max,
                                resizable,
                                base,
                            },
                        );
                        events.push(Event::Added(name, offset.0));
                        version += 1;
                    }
                    Err(rej) => {
                        if dup {
                            assert_eq!(rej.error, AddError::DuplicateName, "{ctx}");
                        } else {
                            assert_eq!(rej.error, AddError::ListFull { capacity: 16 }, "{ctx}");
                            assert_eq!(model.len(), 16);
                        }
                        // The memory came back intact.
                        assert_eq!(
                            ramblock_core::host::HostMemory::base(&rej.memory).as_ptr() as usize,
                            base
                        );
                    }
                }
            }
            4 | 5 => {
                let name = format!("blk{}", rng.below(24));
                let found = model.iter().find(|(_, b)| b.name == name).map(|(o, _)| *o);
                match (list.remove(&name), found) {
                    (Ok(block), Some(o)) => {
                        assert_eq!(block.offset().0, o, "{ctx}");
                        model.remove(&o);
                        events.push(Event::Removed(name));
                        version += 1;
                    }
                    (Err(_), None) => {}
                    (got, want) => panic!("{ctx}: remove {name}: {got:?} vs model {want:?}"),
                }
            }
            6 => {
                let name = format!("blk{}", rng.below(24));
                let new = (1 + rng.below(300)) * PAGE;
                let entry = model.iter_mut().find(|(_, b)| b.name == name);
                let got = list.resize(&name, ByteLen(new));
                match entry {
                    None => assert!(got.is_err(), "{ctx}"),
                    Some((_, b)) => {
                        if !b.resizable {
                            assert_eq!(got, Err(ResizeError::NotResizable), "{ctx}");
                        } else if new > b.max {
                            assert_eq!(
                                got,
                                Err(ResizeError::ExceedsMax {
                                    length: new,
                                    max: b.max
                                }),
                                "{ctx}"
                            );
                        } else if new == b.used {
                            assert_eq!(got, Ok(()), "{ctx}");
                        } else {
                            assert_eq!(got, Ok(()), "{ctx}");
                            events.push(Event::Resized(name.clone(), b.used, new));
                            b.used = new;
                            version += 1;
                            // Exactly the new used range is dirty, for every client.
                            let view = list.read();
                            let blk = view.by_name(&name).unwrap();
                            for c in DirtyClient::ALL {
                                let map = blk.dirty(c);
                                assert_eq!(map.count_ones(), new / PAGE, "{ctx}");
                                assert_eq!(
                                    map.find_next_clear(0),
                                    ((new / PAGE) < b.max / PAGE).then_some((new / PAGE) as usize)
                                );
                                map.clear_all();
                            }
                        }
                    }
                }
            }
            _ => {
                // Lookups by address (in and around blocks), name and host pointer.
                let view = list.read();
                let probe = rng.below(model.keys().last().map_or(1, |o| o + 2 * BLOCK_ALIGN));
                let want = model
                    .range(..=probe)
                    .next_back()
                    .filter(|(o, b)| probe < *o + b.max);
                match (view.block_at(RamAddr(probe)), want) {
                    (Some((b, off)), Some((o, m))) => {
                        assert_eq!((b.name(), off.0), (m.name.as_str(), probe - o), "{ctx}");
                        // A repeated lookup (the MRU path) agrees.
                        assert_eq!(view.block_at(RamAddr(probe)).unwrap().0.name(), m.name);
                        let host =
                            NonNull::new((m.base + (probe - o) as usize) as *mut u8).unwrap();
                        let (hb, hoff) = view.by_host_addr(host).unwrap();
                        assert_eq!((hb.name(), hoff.0), (m.name.as_str(), probe - o));
                    }
                    (None, None) => {}
                    (got, want) => panic!(
                        "{ctx}: block_at({probe:#x}) = {:?}, model {want:?}",
                        got.map(|g| g.0.name())
                    ),
                }
                for m in model.values() {
                    assert_eq!(
                        view.by_name(&m.name).map(|b| b.used_length().0),
                        Some(m.used)
                    );
                }
            }
        }
        // Invariants after every step.
        let view = list.read();
        let got: Vec<(u64, String, u64, u64)> = view
            .iter()
            .map(|b| {
                (
                    b.offset().0,
                    b.name().to_string(),
                    b.used_length().0,
                    b.max_length().0,
                )
            })
            .collect();
        let want: Vec<(u64, String, u64, u64)> = model
            .iter()
            .map(|(o, b)| (*o, b.name.clone(), b.used, b.max))
            .collect();
        assert_eq!(got, want, "{ctx}: layout");
        for w in got.windows(2) {
            assert!(w[0].0 + w[0].3 <= w[1].0, "{ctx}: overlap {w:?}");
        }
        assert!(
            got.iter().all(|b| b.0 % BLOCK_ALIGN == 0),
            "{ctx}: alignment"
        );
        assert_eq!(list.version(), version, "{ctx}: version");
        assert_eq!(
            *recorder.0.lock().unwrap(),
            events,
            "{ctx}: listener events"
        );
    }
}

#[test]
fn removal_then_add_reuses_the_gap() {
    let list: RamList<'_, Mem, Owned, 8> = RamList::new();
    let add = |name: &str, pages: u64| {
        let spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE));
        let mem = Mem::new(
            vec![0u8; (pages * PAGE) as usize].into_boxed_slice(),
            ByteLen(pages * PAGE),
            PageSize::SIZE_4K,
        )
        .unwrap();
        list.add(spec.clone(), mem, BlockBitmaps::for_spec(&spec).unwrap())
            .unwrap()
            .0
    };
    assert_eq!(add("a", 64), 0);
    assert_eq!(add("b", 128), BLOCK_ALIGN);
    assert_eq!(add("c", 10), 3 * BLOCK_ALIGN);
    list.remove("b").unwrap();
    // A small block goes into the smaller of the two gaps that fit: the 2-word
    // hole left by "b" (the open end after "c" is larger).
    assert_eq!(add("d", 64), BLOCK_ALIGN);
    assert_eq!(add("e", 64), 2 * BLOCK_ALIGN);
    list.remove("a").unwrap();
    // The start of the space is reused too.
    assert_eq!(add("f", 1), 0);
}

#[test]
fn late_listener_is_replayed_existing_blocks_in_offset_order() {
    let rec = Recorder::default();
    let list: RamList<'_, Mem, Owned, 8> = RamList::new();
    for (name, pages) in [("x", 70u64), ("y", 1), ("z", 64)] {
        let spec = BlockSpec::new(BlockName::new(name).unwrap(), ByteLen(pages * PAGE));
        add_buffer_block(&list, spec, 0);
    }
    list.remove("y").unwrap();
    let id = list.add_listener(&rec).unwrap();
    assert_eq!(
        *rec.0.lock().unwrap(),
        [
            Event::Added("x".into(), 0),
            Event::Added("z".into(), 3 * BLOCK_ALIGN)
        ]
    );
    assert!(list.remove_listener(id));
    list.remove("x").unwrap();
    assert_eq!(
        rec.0.lock().unwrap().len(),
        2,
        "an unregistered listener hears nothing"
    );
    let _ = BlockFlags::empty();
}
