//! WebAssembly bindings of Syncline for the browser package.
//!
//! A thin layer over `syncline-core`: today it exposes only the protocol
//! version; the database, IndexedDB store and WebSocket transport bindings
//! are the browser piece of work (see `ARCHITECTURE.md`, "Status").

use wasm_bindgen::prelude::*;

/// The wire protocol version this build speaks.
#[wasm_bindgen(js_name = protocolVersion)]
pub fn protocol_version() -> u8 {
    syncline_core::protocol::PROTOCOL_VERSION
}
