//! Request decoder and validator: any slot bytes, device limits and indirect pages (format in
//! `ring/tests/common/fuzz_input.rs`) must give the outcome the independent model predicts,
//! and never panic. Seeds: `ring/fuzz/corpus/parse/`, written by `cargo test -p ring`.
#![no_main]

#[path = "../../tests/common/mod.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| common::fuzz_input::check(data));
