//! Replays every committed seed (`seeds/<target>/*`) through its target's
//! model, exactly as the fuzzer would run it.

use ramblock_fuzz::{
    bitmap, channel_receive, clear_map, files_in, postcopy_receive, postcopy_resume, ram_list,
    return_path, snapshot_meta, stream_decode, stream_roundtrip,
};
use std::path::Path;

fn replay(target: &str, fuzz: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let files = files_in(&dir);
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    for file in files {
        let data = std::fs::read(&file).unwrap();
        println!("{}", file.display());
        fuzz(&data);
    }
}

#[test]
fn bitmap_seeds() {
    replay("bitmap", bitmap::fuzz);
}

#[test]
fn channel_receive_seeds() {
    replay("channel_receive", channel_receive::fuzz);
}

#[test]
fn clear_map_seeds() {
    replay("clear_map", clear_map::fuzz);
}

#[test]
fn ram_list_seeds() {
    replay("ram_list", ram_list::fuzz);
}

#[test]
fn stream_decode_seeds() {
    replay("stream_decode", stream_decode::fuzz);
}

#[test]
fn stream_decode_seeds_named_valid_are_accepted() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/stream_decode");
    for file in files_in(&dir) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("valid-") {
            let outcome = stream_decode::check(&std::fs::read(&file).unwrap()).unwrap();
            assert!(outcome.is_ok(), "{name}: {outcome:?}");
        }
    }
}

/// A valid stream whose header announces page channels (byte 11) is
/// refused by a receiver without any: `ChannelCountMismatch`, code 38.
#[test]
fn stream_decode_seeds_announcing_channels_are_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds/stream_decode");
    let mut seen = 0;
    for file in files_in(&dir) {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("channels-announced") {
            let outcome = stream_decode::check(&std::fs::read(&file).unwrap()).unwrap();
            assert_eq!(outcome.map(|_| ()), Err(38), "{name}");
            seen += 1;
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn stream_roundtrip_seeds() {
    replay("stream_roundtrip", stream_roundtrip::fuzz);
}

#[test]
fn snapshot_meta_seeds() {
    replay("snapshot_meta", snapshot_meta::fuzz);
}

#[test]
fn postcopy_receive_seeds() {
    replay("postcopy_receive", postcopy_receive::fuzz);
}

#[test]
fn postcopy_resume_seeds() {
    replay("postcopy_resume", postcopy_resume::fuzz);
}

#[test]
fn return_path_seeds() {
    replay("return_path", return_path::fuzz);
}
