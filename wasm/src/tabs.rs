//! Tabs of one app exchanging entries directly (a `BroadcastChannel` the
//! npm package opens per replica namespace), so they see each other's
//! changes with no server; the rules are the core's
//! ([`syncline_core::sync::Client::apply_tab_entries`]).
//!
//! Messages carry one store record ([`syncline_core::encode_batch`]): the
//! entries announced or answered, or, for a tab asking what it lacks, its
//! version vector as the record's `base`. What arrives is decoded with the
//! store's validation, like a record read from disk.

use js_sys::{Object, Reflect, Uint8Array};
use syncline_core::{Batch, DbName, Entry, decode_batch, encode_batch};
use wasm_bindgen::prelude::*;

use crate::client::{WasmClient, db_name, run};
use crate::error::WasmError;

/// The `tabEntries` event that announces `entries` (none: no event).
pub(crate) fn announcement(db: &DbName, entries: Vec<Entry>) -> Option<JsValue> {
    if entries.is_empty() {
        return None;
    }
    let bytes = encode_batch(&Batch::entries(entries)).ok()?;
    let event = Object::new();
    let set = |k: &str, v: &JsValue| Reflect::set(&event, &JsValue::from_str(k), v).is_ok();
    let ok = set("type", &JsValue::from_str("tabEntries"))
        && set("db", &JsValue::from_str(db.as_str()))
        && set("bytes", &Uint8Array::from(&bytes[..]).into());
    ok.then(|| event.into())
}

fn decode(bytes: &[u8]) -> Result<Batch, WasmError> {
    decode_batch(bytes)
        .map_err(|e| WasmError::InvalidValue(format!("a message from another tab: {e}")))
}

#[wasm_bindgen]
impl WasmClient {
    /// What to send the other tabs to ask for what this replica lacks of `db`.
    #[wasm_bindgen(js_name = tabAsk)]
    pub fn tab_ask(&self, db: &str) -> Result<Uint8Array, JsValue> {
        self.check_open()?;
        let name = db_name(db)?;
        let d = self.shared.borrow();
        let vv = d
            .client
            .database(&name)
            .map(|x| x.vv().clone())
            .unwrap_or_default();
        let batch = Batch {
            base: Some(vv),
            ..Batch::default()
        };
        let bytes = encode_batch(&batch).map_err(|e| WasmError::InvalidValue(e.to_string()))?;
        Ok(Uint8Array::from(&bytes[..]))
    }

    /// The answer to another tab's `tabAsk`: this replica's own entries it
    /// lacks (bounded), or `undefined` when there are none.
    #[wasm_bindgen(js_name = tabAnswer)]
    pub fn tab_answer(&self, db: &str, ask: &[u8]) -> Result<JsValue, JsValue> {
        self.check_open()?;
        let name = db_name(db)?;
        let since = decode(ask)?.base.unwrap_or_default();
        let entries = self.shared.borrow().client.own_entries_since(&name, &since);
        Ok(match announcement(&name, entries) {
            Some(event) => Reflect::get(&event, &JsValue::from_str("bytes"))?,
            None => JsValue::UNDEFINED,
        })
    }

    /// Apply entries another tab announced or answered with (stored, then
    /// shown as remote changes).
    #[wasm_bindgen(js_name = tabApply)]
    pub fn tab_apply(&self, db: &str, bytes: &[u8]) -> Result<(), JsValue> {
        self.check_open()?;
        let name = db_name(db)?;
        let entries = decode(bytes)?.entries;
        run(&self.shared, |d| d.client.apply_tab_entries(&name, entries))
            .map_err(WasmError::from)?;
        Ok(())
    }
}
