//! Fuzz target `return_path`: see `ramblock_fuzz::return_path`. Without `--cfg fuzzing`
//! this builds as a replayer of input files given on the command line.
#![cfg_attr(fuzzing, no_main)]

#[cfg(fuzzing)]
libfuzzer_sys::fuzz_target!(|data: &[u8]| ramblock_fuzz::return_path::fuzz(data));

#[cfg(not(fuzzing))]
fn main() {
    ramblock_fuzz::replay_files("return_path", ramblock_fuzz::return_path::fuzz);
}
