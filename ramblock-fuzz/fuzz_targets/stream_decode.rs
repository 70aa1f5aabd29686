//! Fuzz target `stream_decode`: see `ramblock_fuzz::stream_decode`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::stream_decode::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("stream_decode", ramblock_fuzz::stream_decode::fuzz);
}
