//! # syncline-wasm
//!
//! The browser build of Syncline: a thin adapter that drives the sans-IO
//! core [`syncline_core::sync::Client`] with browser parts: an IndexedDB
//! store ([`store`]), a `web-sys` WebSocket with jittered reconnection
//! ([`socket`]), and `wasm-bindgen` exports ([`client`]) that the npm package
//! in `js/` wraps in its TypeScript API. Values cross the boundary with
//! `serde-wasm-bindgen`; failures reach JS as `Error` objects with a stable
//! `code` ([`error`]).

#![warn(missing_debug_implementations)]

pub mod client;
pub mod error;
pub mod files;
pub mod identity;
pub mod socket;
pub mod store;
pub mod tabs;

/// Talc instead of the default dlmalloc: malloc in a churned dlmalloc heap
/// was the largest single cost of syncing 1,000 documents (BENCHMARKS.md).
#[cfg(all(target_family = "wasm", not(target_feature = "atomics")))]
#[global_allocator]
static ALLOCATOR: talc::wasm::WasmDynamicTalc = talc::wasm::new_wasm_dynamic_allocator();

use wasm_bindgen::prelude::*;

/// The wire protocol version this build speaks.
#[wasm_bindgen(js_name = protocolVersion)]
pub fn protocol_version() -> u8 {
    syncline_core::protocol::PROTOCOL_VERSION
}

#[cfg(all(test, target_arch = "wasm32"))]
mod tests;
