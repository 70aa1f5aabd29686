//! Fuzz target `snapshot_meta`: see `ramblock_fuzz::snapshot_meta`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::snapshot_meta::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("snapshot_meta", ramblock_fuzz::snapshot_meta::fuzz);
}
