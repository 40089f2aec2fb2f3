//! Fuzz target: every parser and validator that sees client input (percent-decoding, query
//! forms, stream names, event bodies, publish bodies, subscribe parameters, Basic auth,
//! glob patterns), through `eventserver::check::exercise`. None may panic.
//!
//! Run it (libFuzzer needs a nightly compiler for its sanitizer flags):
//!
//! ```text
//! cargo install cargo-fuzz
//! cargo +nightly fuzz run request --fuzz-dir tests/fuzz
//! ```
//!
//! On a stable toolchain, `cargo fuzz run request --fuzz-dir tests/fuzz --sanitizer none`
//! works too (no AddressSanitizer: the crate denies `unsafe`, so it adds little). Add
//! `-- -max_total_time=60` to stop after a minute. cargo fuzz writes the inputs it finds
//! into `tests/fuzz/corpus/request/`; keep only small, telling ones as seeds. A crash lands
//! in `tests/fuzz/artifacts/request/`; replay it with `cargo fuzz run request --fuzz-dir
//! tests/fuzz <file>`. CI does not fuzz: `tests/it/props.rs` runs every seed of the corpus
//! once through the same function (`cargo test`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    eventserver::check::exercise(data);
});
