//! Runs every model over a few thousand inputs from a fixed-seed generator,
//! through the same byte-to-input decoding the fuzz targets use, so plain
//! `cargo test` exercises the models without a fuzzer.

use ramblock_fuzz::{bitmap, clear_map, generate, try_bytes};

#[test]
fn bitmap_model_agrees_on_generated_inputs() {
    generate::run(0xB17_3A9, 12000, 600, |data| try_bytes(data, bitmap::check)).unwrap();
}

#[test]
fn clear_and_received_maps_agree_on_generated_inputs() {
    generate::run(0xC1EA2, 12000, 400, |data| {
        try_bytes(data, clear_map::check)
    })
    .unwrap();
}

#[test]
fn ram_list_model_agrees_on_generated_inputs() {
    use ramblock_fuzz::ram_list;
    generate::run(0x5A11_1157, 8000, 500, |data| {
        try_bytes(data, ram_list::check)
    })
    .unwrap();
}

#[test]
fn migration_round_trips_on_generated_inputs() {
    use ramblock_fuzz::stream_roundtrip;
    generate::run(0x2017_7219, 600, 400, |data| {
        try_bytes(data, stream_roundtrip::check)
    })
    .unwrap();
}

/// Valid streams from the real sender, then mutated: flipped, overwritten,
/// cut, spliced. Each goes through the model receiver.
#[test]
fn receiver_matches_its_model_on_mutated_streams() {
    use arbitrary::{Arbitrary, Unstructured};
    use ramblock_fuzz::stream_decode;
    use ramblock_fuzz::stream_roundtrip::{PageFill, Step};
    let mut rng = generate::Rng::new(0xDEC0DE);
    let mut codes = std::collections::BTreeSet::new();
    for case in 0..800 {
        let n = 64 + rng.below(200);
        let raw = rng.bytes(n);
        let mut u = Unstructured::new(&raw);
        let pages = Vec::<(u8, u8, PageFill)>::arbitrary(&mut u).unwrap_or_default();
        let script = Vec::<Step>::arbitrary(&mut u).unwrap_or_default();
        let mut stream =
            stream_decode::valid_stream(rng.next_u64(), &pages, &script).expect("sender");
        if case % 8 == 0 {
            // Unmutated: must be received cleanly.
            let outcome = stream_decode::check(&stream).unwrap();
            assert!(
                outcome.is_ok(),
                "case {case}: valid stream refused: {outcome:?}"
            );
            continue;
        }
        for _ in 0..1 + rng.below(3) {
            let at = rng.below(stream.len());
            match rng.below(6) {
                0 => stream[at] ^= 1 << rng.below(8),
                1 => stream[at] = [0, 0xff, 1, 0x40, 0x41][rng.below(5)],
                2 => stream.truncate(at),
                3 => {
                    let n = rng.below(32).min(stream.len() - at);
                    stream.drain(at..at + n);
                }
                4 => {
                    let n = rng.below(24);
                    let junk = rng.bytes(n);
                    stream.splice(at..at, junk);
                }
                _ => {
                    // A record-sized field set to an extreme.
                    let end = (at + 8).min(stream.len());
                    stream[at..end].fill(0xff);
                }
            }
            if stream.is_empty() {
                break;
            }
        }
        match stream_decode::check(&stream) {
            Ok(outcome) => codes.insert(outcome.err()),
            Err(m) => {
                let hex: String = stream.iter().map(|b| format!("{b:02x}")).collect();
                panic!("case {case}: {m}\nstream: {hex}");
            }
        };
    }
    // The mutations reach deep: many different refusals, and clean ends.
    assert!(codes.len() >= 8, "outcomes seen: {codes:?}");
}

/// Device-state sections before End (accepted, over the limit, refused by
/// the VMM), then mutated: the receiver still matches its model, and the
/// section outcomes are all reached.
#[test]
fn receiver_matches_its_model_on_streams_with_sections() {
    use ramblock_fuzz::stream_decode;
    let mut rng = generate::Rng::new(0x5EC7);
    let mut codes = std::collections::BTreeSet::new();
    for case in 0..300 {
        let stream = stream_decode::valid_stream(rng.next_u64(), &[], &[]).expect("sender");
        let sections: Vec<_> = (0..rng.below(4))
            .map(|_| {
                let name = ["cpu", "refuse", "0000:00:02.0/vga"][rng.below(3)];
                let len = rng.below(300);
                (name, rng.below(3) as u32, 1, rng.bytes(len))
            })
            .collect();
        let mut stream = stream_decode::with_sections(stream, &sections);
        if case % 4 != 0 {
            // Mutate inside the sections (or just before End).
            let tail = stream.len().saturating_sub(21);
            let start = tail.saturating_sub(sections.iter().map(|s| 273 + s.3.len()).sum());
            let at = start + rng.below(tail - start + 1);
            match rng.below(4) {
                0 if at < stream.len() => stream[at] ^= 1 << rng.below(8),
                1 => stream.truncate(at),
                2 if at < stream.len() => stream[at] = [0, 0xff, 8, 5][rng.below(4)],
                _ => {
                    let n = rng.below(8);
                    let junk = rng.bytes(n);
                    stream.splice(at..at, junk);
                }
            }
        }
        match stream_decode::check(&stream) {
            Ok(outcome) => codes.insert(outcome.err()),
            Err(m) => {
                let hex: String = stream.iter().map(|b| format!("{b:02x}")).collect();
                panic!("case {case}: {m}\nstream: {hex}");
            }
        };
    }
    for want in [None, Some(31), Some(32), Some(34)] {
        assert!(
            codes.contains(&want),
            "outcome {want:?} never reached: {codes:?}"
        );
    }
}
