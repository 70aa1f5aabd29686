//! Fuzz target `stream_roundtrip`: see `ramblock_fuzz::stream_roundtrip`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::stream_roundtrip::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("stream_roundtrip", ramblock_fuzz::stream_roundtrip::fuzz);
}
