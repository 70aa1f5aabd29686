//! Inputs on which a fuzz campaign found a real bug in the library, kept so
//! the bug cannot come back. Each file is replayed through its target; each
//! test says what the bug was.

use ramblock_fuzz::files_in;
use std::path::Path;

fn replay(target: &str, fuzz: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("regressions")
        .join(target);
    let files = files_in(&dir);
    for file in &files {
        println!("{}", file.display());
        fuzz(&std::fs::read(file).unwrap());
    }
    files.len()
}

/// `regressions/stream_decode/sync-pass-u32-max`: a valid header and table,
/// then a `Sync` record whose pass number is `u32::MAX`. The receiver
/// counted passes with `summary.passes.max(pass + 1)`
/// (then `ramblock-core/src/stream/receiver.rs`, the `Record::Sync` arm; now
/// `migrate/receiver/mod.rs`, `Session::on_sync`), which
/// overflows: a panic in debug builds ("attempt to add with overflow"), and
/// in release builds a pass count of 0. A malformed stream must be an error
/// or a clean end, never a panic; the model expects the count to saturate
/// (`pass.saturating_add(1)`). Found by `stream_decode` with
/// `cargo fuzz run -a` (debug assertions) in 15 seconds from the seeds;
/// fixed in core by commit 4b854c2 (the count saturates).
#[test]
fn stream_decode_regressions() {
    assert!(replay("stream_decode", ramblock_fuzz::stream_decode::fuzz) >= 1);
}

/// `regressions/postcopy_resume/reordered-new-stream-stale-ledger`: a
/// post-copy stream broken, resumed and ended (verified), then a new
/// stream on the same receiver whose table swaps `ram` and `huge`. The
/// receiver's ledger is indexed by table position and kept what the first
/// stream recorded, so position 0 vouched for `ram`'s pages under the name
/// `huge`: the ledger disagreed with memory ("huge ledger checksum"), and
/// an end record could have verified contents the blocks do not hold
/// (`Receiver::receive_into`, where the ledger is reserved). Found by
/// `postcopy_resume` in its first 10-minute run (about 86,000 inputs);
/// fixed in core: a new stream empties the ledger first (regression test
/// `a_new_stream_cannot_verify_with_the_previous_streams_ledger`).
#[test]
fn postcopy_resume_regressions() {
    assert!(replay("postcopy_resume", ramblock_fuzz::postcopy_resume::fuzz) >= 1);
}
