//! Writes the seed inputs committed under `ramblock-fuzz/seeds/`:
//! `cargo run -p ramblock-fuzz --example write_seeds`.
//!
//! - `stream_decode`: valid streams made by the real sender (zero pages,
//!   patterned pages, a resize between passes), so the fuzzer starts past
//!   the header and the block table;
//! - the operation targets: inputs from the fixed-seed generator that decode
//!   to long operation lists;
//! - the post-copy targets (`postcopy_receive`, `postcopy_resume`,
//!   `return_path`): generated inputs, one for each different outcome their
//!   model predicts (clean ends, resumes and each refusal), so the fuzzer
//!   starts from every path the generator reaches.
//!
//! Inputs the fuzzer found interesting (minimized corpus entries) are added
//! by hand next to these, named `corpus-*`.

use ramblock_fuzz::generate::{self, Rng};
use ramblock_fuzz::stream_roundtrip::{Action, PageFill, Step};
use ramblock_fuzz::{postcopy_receive, postcopy_resume, return_path, stream_decode, try_bytes};
use std::collections::BTreeSet;
use std::path::Path;

/// A seed stream: file name, `vga` size, page contents, script.
type StreamCase<'a> = (&'a str, u64, &'a [(u8, u8, PageFill)], &'a [Step]);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
    let decode = root.join("stream_decode");
    std::fs::create_dir_all(&decode)?;
    let pages = [
        (0, 0, PageFill::Byte(0x11)),
        (0, 3, PageFill::Zero),
        (0, 15, PageFill::Sparse { at: 4095, byte: 1 }),
        (1, 2, PageFill::Pattern(0xdead_beef)),
        (1, 7, PageFill::Byte(0xff)),
    ];
    let grow = Step {
        pass: 0,
        action: Action::Resize {
            block: 1,
            pages: 20,
        },
    };
    let write = Step {
        pass: 1,
        action: Action::Write {
            block: 0,
            page: 9,
            fill: PageFill::Pattern(7),
        },
    };
    let cases: [StreamCase<'_>; 4] = [
        ("valid-empty", 7, &[], &[]),
        ("valid-pages", 7, &pages, &[]),
        ("valid-resize", 3, &pages[..2], &[grow]),
        ("valid-passes", 31, &pages, &[grow, write]),
    ];
    for (name, vga, pages, script) in cases {
        let stream = stream_decode::valid_stream(vga, pages, script)?;
        std::fs::write(decode.join(name), stream)?;
    }
    for (target, seed, len) in [
        ("bitmap", 1u64, 400usize),
        ("clear_map", 2, 300),
        ("ram_list", 3, 400),
        ("stream_roundtrip", 4, 300),
    ] {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let mut rng = Rng::new(seed);
        for i in 0..4 {
            std::fs::write(dir.join(format!("gen-{i}")), rng.bytes(len))?;
        }
    }
    // snapshot_meta: a valid metadata, resealed or not, and one cut short.
    let snap = root.join("snapshot_meta");
    std::fs::create_dir_all(&snap)?;
    let valid = ramblock_fuzz::snapshot_meta::valid_input();
    std::fs::write(snap.join("valid-full"), &valid)?;
    let mut unsealed = valid.clone();
    unsealed[0] = 0;
    std::fs::write(snap.join("valid-unsealed"), &unsealed)?;
    std::fs::write(snap.join("truncated"), &valid[..valid.len() / 2])?;

    // One input per outcome: the model's outcome, summarised as a string.
    type Outcome = fn(&[u8]) -> Option<String>;
    let post: [(&str, u64, usize, Outcome); 3] = [
        ("postcopy_receive", 5, 300, |data| {
            let mut key = None;
            let _ = try_bytes(data, |i: &postcopy_receive::Input| {
                postcopy_receive::check(i).map(|o| key = Some(format!("{:?}", o.err())))
            });
            key
        }),
        ("postcopy_resume", 6, 400, |data| {
            let mut key = None;
            let _ = try_bytes(data, |i: &postcopy_resume::Input| {
                let streams = postcopy_resume::streams(i);
                let (model, real) = ramblock_fuzz::receive_model::check_streams(&streams)?;
                let codes: Vec<_> = real.outcomes.iter().map(|o| o.err()).collect();
                key = Some(format!("{} {codes:?}", model.resumes.len()));
                Ok(())
            });
            key
        }),
        ("return_path", 7, 200, |data| {
            let mut key = None;
            let _ = try_bytes(data, |i: &return_path::Input| {
                return_path::check(i).map(|o| {
                    key = Some(match o {
                        return_path::Outcome::Done(pc) => format!("done {}", pc.resumes),
                        other => format!("{other:?}").chars().take(8).collect(),
                    })
                })
            });
            key
        }),
    ];
    for (target, seed, len, outcome) in post {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir)?;
        let mut seen = BTreeSet::new();
        for data in generate::inputs(seed, 20_000, len) {
            if seen.len() >= 12 {
                break;
            }
            if let Some(key) = outcome(&data) {
                if seen.insert(key) {
                    std::fs::write(dir.join(format!("gen-{}", seen.len() - 1)), &data)?;
                }
            }
        }
        println!("{target}: {} seeds", seen.len());
    }
    println!("seeds written under {}", root.display());
    Ok(())
}
