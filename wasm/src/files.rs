//! The file store of the npm package in Node: one append-only log per
//! database in the native store's record format, with its recovery rules
//! (`syncline_core::record`: a torn tail is cut back to the last whole
//! record; damage followed by valid records is refused, never cut). The
//! bytes come and go through a small I/O object the package's Node entry
//! makes from `node:fs` (`js/src/files.ts`), which appends a group of
//! records and `fdatasync`s each file before it resolves, so a write is
//! acknowledged only once durable, as in the native store.
//!
//! Layout under the replica's directory: `dbs/<hex of the name>.log`,
//! `meta/<key>` (written to a temporary file, synced, renamed, the
//! directory synced).

use js_sys::{Array, Function, Promise, Reflect, Uint8Array};
use syncline_core::record::{Record, decode_records, encode_record, valid_record_after};
use syncline_core::{Batch, DbName, StoredDatabase};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use crate::store::{StoreError, Write};

/// How many bytes recovery may checksum looking for a valid record after a
/// bad one (as the native store).
const RESYNC_BUDGET: usize = 256 << 20;

/// Logs and metadata in files, through the package's I/O object.
#[derive(Debug)]
pub struct FileStore {
    io: JsValue,
}

fn failed(what: &str, e: &JsValue) -> StoreError {
    let detail = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .unwrap_or_else(|| format!("{e:?}"));
    StoreError::Files(format!("{what}: {detail}"))
}

fn log_file(db: &DbName) -> String {
    let hex: String = db.as_str().bytes().map(|b| format!("{b:02x}")).collect();
    format!("dbs/{hex}.log")
}

fn meta_file(key: &str) -> Result<String, StoreError> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(StoreError::Files(format!("invalid metadata key {key:?}")));
    }
    Ok(format!("meta/{key}"))
}

impl FileStore {
    /// A store over `io` (`{read, append, truncate, writeAtomic, close}`).
    pub fn new(io: JsValue) -> Self {
        FileStore { io }
    }

    async fn call(&self, method: &str, args: &[JsValue]) -> Result<JsValue, StoreError> {
        let f: Function = Reflect::get(&self.io, &method.into())
            .and_then(|f| f.dyn_into())
            .map_err(|e| failed(method, &e))?;
        let result = f
            .apply(&self.io, &args.iter().collect::<Array>())
            .map_err(|e| failed(method, &e))?;
        match result.dyn_into::<Promise>() {
            Ok(p) => JsFuture::from(p).await.map_err(|e| failed(method, &e)),
            Err(v) => Ok(v),
        }
    }

    async fn read(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let v = self.call("read", &[name.into()]).await?;
        Ok((!v.is_null() && !v.is_undefined()).then(|| Uint8Array::new(&v).to_vec()))
    }

    /// Load a database: its records replayed, a torn tail cut off.
    pub async fn load(&self, db: &DbName) -> Result<StoredDatabase, StoreError> {
        let name = log_file(db);
        let Some(bytes) = self.read(&name).await? else {
            return Ok(StoredDatabase::default());
        };
        let (records, good, problem) = decode_records(&bytes);
        if let Some(problem) = problem {
            if let Some(later) = valid_record_after(&bytes, good, RESYNC_BUDGET) {
                return Err(StoreError::Damaged(format!(
                    "the log of {db}: {problem}, but a valid record follows at offset {later}; \
                     refusing to cut acknowledged data"
                )));
            }
            // A crash mid-append: nothing after `good` was acknowledged.
            tracing::warn!(%db, "cutting a torn log tail at offset {good}: {problem}");
            self.call("truncate", &[name.into(), JsValue::from_f64(good as f64)])
                .await?;
        }
        let mut stored = StoredDatabase::default();
        for r in records {
            stored.apply(&Batch::from(r));
        }
        Ok(stored)
    }

    /// Append each batch to its database's log, one durable group.
    pub async fn write_many(&self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        for (db, batch, _) in writes {
            if batch.is_empty() {
                continue;
            }
            let record = encode_record(&Record::from(*batch))
                .map_err(|e| StoreError::Files(e.to_string()))?;
            let name = log_file(db);
            match files.iter_mut().find(|(n, _)| *n == name) {
                Some((_, bytes)) => bytes.extend_from_slice(&record),
                None => files.push((name, record)),
            }
        }
        if files.is_empty() {
            return Ok(());
        }
        let list = Array::new();
        for (name, bytes) in files {
            list.push(&Array::of2(
                &name.into(),
                &Uint8Array::from(&bytes[..]).into(),
            ));
        }
        self.call("append", &[list.into()]).await?;
        Ok(())
    }

    /// A metadata value.
    pub async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.read(&meta_file(key)?).await
    }

    /// Write a metadata value durably (`private`: readable by its owner only).
    pub async fn put_meta(&self, key: &str, value: &[u8], private: bool) -> Result<(), StoreError> {
        let args = [
            meta_file(key)?.into(),
            Uint8Array::from(value).into(),
            JsValue::from_bool(private),
        ];
        self.call("writeAtomic", &args).await?;
        Ok(())
    }

    /// Release the directory (its lock).
    pub fn close(&self) {
        if let Ok(f) =
            Reflect::get(&self.io, &"close".into()).and_then(|f| f.dyn_into::<Function>())
        {
            let _ = f.call0(&self.io);
        }
    }
}
