//! Declares the cfgs this crate reads, so `unexpected_cfgs` stays quiet:
//! `fuzzing` (set by cargo-fuzz) and `ramblock_fuzz_wrong_model` (set by
//! hand to prove the harness catches a wrong model).

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fuzzing)");
    println!("cargo::rustc-check-cfg=cfg(ramblock_fuzz_wrong_model)");
}
