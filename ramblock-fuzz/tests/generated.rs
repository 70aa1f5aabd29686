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

/// The post-copy receiver against its model: every outcome code the model
/// can predict shows up, and clean ends too.
#[test]
fn postcopy_receiver_matches_its_model_on_generated_inputs() {
    use ramblock_fuzz::postcopy_receive;
    let mut codes = std::collections::BTreeSet::new();
    for (case, data) in generate::inputs(0x9057_C0B7, 1500, 300).enumerate() {
        let outcome = ramblock_fuzz::try_bytes(&data, |i: &postcopy_receive::Input| {
            postcopy_receive::check(i).map(|o| {
                codes.insert(o.err());
            })
        });
        if let Err(m) = outcome {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            panic!("case {case}: {m}\nbytes: {hex}");
        }
    }
    println!("outcomes seen: {codes:?}");
    assert!(codes.len() >= 10, "outcomes seen: {codes:?}");
}

#[test]
fn postcopy_resume_matches_its_model_on_generated_inputs() {
    use ramblock_fuzz::{postcopy_resume, receive_model};
    let (mut resumed, mut codes) = (0, std::collections::BTreeSet::new());
    generate::run(0x2E5_0BE, 300, 400, |data| {
        try_bytes(data, |i: &postcopy_resume::Input| {
            postcopy_resume::check(i)?;
            // Which paths the inputs took (the model agreed on them).
            let (model, real) = receive_model::check_streams(&postcopy_resume::streams(i))?;
            resumed += model.resumes.len();
            codes.extend(real.outcomes.iter().skip(1).map(|o| o.err()));
            Ok(())
        })
    })
    .unwrap();
    println!("resumes accepted: {resumed}; outcomes after the break: {codes:?}");
    assert!(resumed > 0, "no resume was accepted");
    assert!(
        codes.contains(&Some(35)),
        "no resumed table differed: {codes:?}"
    );
}

/// The engine's reading of the return path against its model: successes
/// (with and without resumes) and every kind of failure show up.
#[test]
fn return_path_matches_its_model_on_generated_inputs() {
    use ramblock_fuzz::return_path::{self, Outcome};
    let mut seen = std::collections::BTreeSet::new();
    for (case, data) in generate::inputs(0x2E7_0A7, 1500, 200).enumerate() {
        let outcome = ramblock_fuzz::try_bytes(&data, |i: &return_path::Input| {
            return_path::check(i).map(|o| {
                seen.insert(match o {
                    Outcome::Done(pc) if pc.resumes > 0 => "resumed",
                    Outcome::Done(_) => "done",
                    Outcome::BadRequest(_) => "bad request",
                    Outcome::BadAck => "bad ack",
                    Outcome::Refused(_) => "refused",
                    Outcome::Lost => "lost",
                });
            })
        });
        if let Err(m) = outcome {
            let hex: String = data.iter().map(|b| format!("{b:02x}")).collect();
            panic!("case {case}: {m}\nbytes: {hex}");
        }
    }
    println!("outcomes seen: {seen:?}");
    assert!(seen.len() >= 3, "outcomes seen: {seen:?}");
}

/// Hand-made return paths reach what random bytes rarely do: an
/// acknowledged migration (with and without a resume, and with a request
/// answered), a refusal after the end, and a map that does not read.
#[test]
fn return_path_model_reaches_success_and_refusal() {
    use ramblock_fuzz::return_path::{check, Connection, Input, Msg, Outcome};
    use ramblock_fuzz::Ops;
    let req = |block, first, count| Msg::Request {
        block,
        first,
        count,
    };
    let conn = |corrupt, msgs| Connection {
        ram_missing: 0b1010_0110,
        huge_missing: 0b0100,
        corrupt,
        msgs,
    };
    let run = |first, resumes| {
        check(&Input {
            first,
            resumes: Ops(resumes),
        })
        .unwrap()
    };
    // Each wait ends a batch of requests, and each batch is followed by a
    // background chunk; once nothing is left the end goes out and the ack
    // after the waits is read as the answer to it.
    let waits = |n: usize, then: Msg| {
        let mut v = vec![Msg::Wait; n];
        v.push(then);
        v
    };
    // Page 3 first, then the background from page 4 on in chunks of
    // BACKGROUND_CHUNK_PAGES (16): ram 4..20, ram 20..24, huge, ram 0..3
    // after wrapping around, nothing.
    let mut first = vec![req(0, 3, 1), req(0, 3, 1)];
    first.extend(waits(5, Msg::Ok));
    match run(first, vec![]) {
        Outcome::Done(pc) => {
            assert_eq!((pc.requests, pc.duplicate_requests, pc.resumes), (2, 1, 0));
            assert_eq!(pc.requested_pages, 1);
            assert_eq!(pc.requested_pages + pc.background_pages, 40);
        }
        other => panic!("{other:?}"),
    }
    match run(
        vec![req(1, 5, 1)],
        vec![
            conn(Some((3, false)), vec![]),
            conn(None, waits(8, Msg::Ok)),
        ],
    ) {
        Outcome::Done(pc) => {
            assert_eq!(pc.resumes, 1);
            // The hugepage asked for went whole; the map that does not
            // read made the engine reconnect; the good one named pages
            // still to send (hugepage 1, sent, is not among them).
            assert_eq!(pc.requested_pages, 4);
            assert_eq!(pc.requested_pages + pc.background_pages, 40);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(run(waits(6, Msg::Refused(5)), vec![]), Outcome::Refused(5));
    assert_eq!(run(vec![Msg::Ok], vec![]), Outcome::BadAck);
}
