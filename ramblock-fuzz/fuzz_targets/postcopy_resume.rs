//! Fuzz target `postcopy_resume`: see `ramblock_fuzz::postcopy_resume`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::postcopy_resume::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("postcopy_resume", ramblock_fuzz::postcopy_resume::fuzz);
}
