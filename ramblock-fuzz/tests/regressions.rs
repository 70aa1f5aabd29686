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
