//! Fuzz target `channel_receive`: see `ramblock_fuzz::channel_receive`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::channel_receive::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("channel_receive", ramblock_fuzz::channel_receive::fuzz);
}
