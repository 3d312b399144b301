//! Fuzz the core `Server` state machine: the bytes are a program of
//! actions from several connections and the adapter (connect, Hello,
//! frames, pushes of honest and hostile entries, persists completed or
//! failed, loads, validations in any order, compaction, views, restarts).
//! The driver is shared with the stable test `core/tests/server_fuzz.rs`;
//! it panics on any invariant violation (see its module docs).

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../tests/server_driver/mod.rs"]
mod driver;

fuzz_target!(|data: &[u8]| driver::run(data));
