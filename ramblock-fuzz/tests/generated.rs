//! Runs every model over a few thousand inputs from a fixed-seed generator,
//! through the same byte-to-input decoding the fuzz targets use, so plain
//! `cargo test` exercises the models without a fuzzer.

use ramblock_fuzz::{bitmap, clear_map, generate, try_bytes};

#[test]
fn bitmap_model_agrees_on_generated_inputs() {
    generate::run(0xB17_3A9, 4000, 600, |data| try_bytes(data, bitmap::check)).unwrap();
}

#[test]
fn clear_and_received_maps_agree_on_generated_inputs() {
    generate::run(0xC1EA2, 4000, 400, |data| try_bytes(data, clear_map::check)).unwrap();
}

#[test]
fn ram_list_model_agrees_on_generated_inputs() {
    use ramblock_fuzz::ram_list;
    generate::run(0x5A11_1157, 3000, 500, |data| {
        try_bytes(data, ram_list::check)
    })
    .unwrap();
}
