//! Differential models of ramblock's structures, and the fuzz targets that
//! drive them.
//!
//! Every structure that indexes memory or parses input is run side by side
//! with a naive model, the way roaring-rs checks its bitmaps: an operation
//! sequence (an `#[derive(Arbitrary)]` enum, with values kept in small ranges
//! so operations collide) is applied to the real code and to the model,
//! every read is compared, and the whole state is compared at the end.
//!
//! | module | real code | model |
//! |---|---|---|
//! | [`bitmap`] | `AtomicBitmap`, `MigrationBitmap` | `Vec<bool>` |
//! | [`ram_list`] | `RamList` over `BufferMemory`, listeners | `BTreeMap` of blocks, best fit by brute force |
//! | [`clear_map`] | `ClearMap`, `ReceivedMap` | `Vec<bool>` per chunk / page |
//! | [`stream_decode`] | the stream `Receiver` fed arbitrary bytes | a byte-by-byte model receiver over guard-filled memory |
//! | [`stream_roundtrip`] | `migrate::migrate` then `Receiver` | the source's memory |
//! | [`snapshot_meta`] | the snapshot metadata parser `Meta::parse` | a naive reader written from the format document |
//! | [`postcopy_receive`] | `Receiver::receive_postcopy`: Discard, Postcopy, placement, hugepage assembly | [`receive_model`]: memory, received map, ledger, placements |
//! | [`postcopy_resume`] | resumed streams (header, table) and the received map read back by the source | [`receive_model`], and the missing pages it predicts |
//! | [`return_path`] | the source engine reading page requests, acks and received maps | a model of the engine's post-copy loop |
//!
//! Each module has `check(&Input) -> Result<(), Mismatch>` (the model run)
//! and `fuzz(&[u8])` (bytes to input, check, panic with a reproducer: the
//! input's `Debug` is the operation list). The cargo-fuzz targets in
//! `fuzz_targets/` are one call to `fuzz`; `cargo test` replays the
//! committed seeds and a fixed-seed stream of generated inputs through the
//! same functions (see [`generate`]).
//!
//! ```
//! // Any bytes are a valid input: they decode to an operation sequence.
//! ramblock_fuzz::bitmap::fuzz(b"\x05\x40\x01\x02\x03\x04");
//! ```
//!
//! # Proving the harness is live
//! Built with `--cfg ramblock_fuzz_wrong_model` the bitmap model has a
//! deliberate bug (see [`bitmap`]); the fuzzer must find it within its smoke
//! time, and a unit test checks that the fixed-seed generator finds it too:
//!
//! ```text
//! cd ramblock-fuzz
//! RUSTFLAGS="--cfg ramblock_fuzz_wrong_model" cargo +nightly fuzz run \
//!     --target-dir /tmp/fuzz-wrong bitmap /tmp/empty-corpus -- -max_total_time=20
//! ```
//!
//! (from an empty corpus it stopped after about 34,000 executions, some 4
//! seconds, with "mismatch in the final state: atomic bitmap words").
//!
//! # Running the fuzzer
//! `cargo xtask fuzz <target> [--seconds N]`, or by hand from this
//! directory: `cargo +nightly fuzz run -a <target> corpus/<target>
//! seeds/<target>` (`-a` keeps debug assertions, so an arithmetic overflow
//! is a crash rather than a silent wrap; the seed directory starts the
//! stream targets past the header). Without `--cfg fuzzing` each target
//! binary replays files: `cargo run -p ramblock-fuzz --bin stream_decode --
//! regressions/stream_decode`.
#![deny(missing_docs)]

pub mod bitmap;
pub mod channel_receive;
pub mod clear_map;
pub mod generate;
mod model_cursor;
pub mod postcopy_receive;
pub mod postcopy_resume;
pub mod ram_list;
pub mod receive_model;
pub mod return_path;
pub mod snapshot_meta;
pub mod stream_decode;
pub mod stream_roundtrip;

use arbitrary::{Arbitrary, Unstructured};
use std::fmt;
use std::path::Path;

/// A difference between the real code and its model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    /// The operation index where it showed (`None`: in the final comparison).
    pub step: Option<usize>,
    /// What differed, with both values.
    pub what: String,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.step {
            Some(s) => write!(f, "mismatch at operation {s}: {}", self.what),
            None => write!(f, "mismatch in the final state: {}", self.what),
        }
    }
}

impl std::error::Error for Mismatch {}

/// Compares a real value with the model's; on a difference returns a
/// [`Mismatch`] naming `what` and both values.
pub fn same<T: PartialEq + fmt::Debug>(
    step: Option<usize>,
    what: impl fmt::Display,
    real: T,
    model: T,
) -> Result<(), Mismatch> {
    if real == model {
        Ok(())
    } else {
        Err(Mismatch {
            step,
            what: format!("{what}: real {real:?}, model {model:?}"),
        })
    }
}

/// Fails with `what` unless `ok`.
pub fn holds(step: Option<usize>, ok: bool, what: impl fmt::Display) -> Result<(), Mismatch> {
    if ok {
        Ok(())
    } else {
        Err(Mismatch {
            step,
            what: what.to_string(),
        })
    }
}

/// An operation list that, as the last field of an input, takes operations
/// until the bytes run out (rather than `Vec`'s one continuation flag per
/// element, which gives random bytes an average of one operation).
#[derive(Clone, PartialEq, Eq)]
pub struct Ops<T>(pub Vec<T>);

impl<T: fmt::Debug> fmt::Debug for Ops<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.0).finish()
    }
}

impl<T> std::ops::Deref for Ops<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<'a, T: Arbitrary<'a>> Arbitrary<'a> for Ops<T> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Vec::arbitrary(u).map(Ops)
    }

    fn arbitrary_take_rest(mut u: Unstructured<'a>) -> arbitrary::Result<Self> {
        let mut ops = Vec::new();
        while !u.is_empty() {
            match T::arbitrary(&mut u) {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        Ok(Ops(ops))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (0, None)
    }
}

/// Decodes `data` into an `I` (as libFuzzer's typed targets do: the whole
/// buffer, `arbitrary_take_rest`) and checks it; panics with the mismatch
/// and the input's `Debug` (the reproducer) if the model disagrees.
pub fn run_bytes<'a, I: Arbitrary<'a> + fmt::Debug>(
    data: &'a [u8],
    check: impl FnOnce(&I) -> Result<(), Mismatch>,
) {
    let Ok(input) = I::arbitrary_take_rest(Unstructured::new(data)) else {
        return;
    };
    if let Err(m) = check(&input) {
        panic!("{m}\nreproducer: {input:#?}");
    }
}

/// Like [`run_bytes`], but returns the mismatch instead of panicking (for
/// tests that expect one).
pub fn try_bytes<'a, I: Arbitrary<'a>>(
    data: &'a [u8],
    check: impl FnOnce(&I) -> Result<(), Mismatch>,
) -> Result<(), Mismatch> {
    match I::arbitrary_take_rest(Unstructured::new(data)) {
        Ok(input) => check(&input),
        Err(_) => Ok(()),
    }
}

/// Every file in `dir`, sorted by name (a missing directory is empty).
pub fn files_in(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The replayer the fuzz-target binaries become without `--cfg fuzzing`:
/// runs `fuzz` over every file (or every file in every directory) named on
/// the command line, printing each name first.
pub fn replay_files(target: &str, fuzz: fn(&[u8])) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.is_empty() {
        eprintln!("usage: {target} FILE_OR_DIR...  (replays inputs through the {target} model)");
        std::process::exit(2);
    }
    for arg in args {
        let path = Path::new(&arg);
        let files = if path.is_dir() {
            files_in(path)
        } else {
            vec![path.to_path_buf()]
        };
        for file in files {
            match std::fs::read(&file) {
                Ok(data) => {
                    println!("{}: {} bytes", file.display(), data.len());
                    fuzz(&data);
                }
                Err(e) => {
                    eprintln!("{}: cannot read: {e}", file.display());
                    std::process::exit(1);
                }
            }
        }
    }
    println!("{target}: every input matched the model");
}
