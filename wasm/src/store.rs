//! The browser's durable store: IndexedDB through `indexed_db_futures`.
//!
//! Layout of one IndexedDB database (one per replica, see `js/README.md` on
//! tabs):
//! - object store `log`: one record per written [`Batch`], key
//!   `"<db>\u{0}<seq as 16 hex digits>"`, value the batch as
//!   [`encode_batch`] bytes. A database's state is the fold of its records in
//!   key order, exactly like the native append-only log.
//! - object store `views`: the cached JSON view of each document
//!   ([`syncline_core::view`]), key `"<db>\u{0}<doc id>"`, value
//!   [`encode_view`] bytes, written in the same transaction as the batch
//!   that changed the document. Opening a database shows documents from
//!   them without loading each into automerge; a view that does not match
//!   the log is ignored, so losing or damaging one costs only time.
//! - object store `meta`: small values (the replica id).
//!
//! Every batch is written in one `readwrite` transaction with `strict`
//! durability (the browser flushes to disk before `complete`), and many
//! queued batches share one transaction (group commit). When a database has
//! accumulated many records, they are folded into one record in a single
//! transaction, so loads stay cheap.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use futures_util::future::{Either, select};
use indexed_db_futures::KeyRange;
use indexed_db_futures::database::Database as IdbDatabase;
use indexed_db_futures::error::{DomException, Error as IdbError, OpenDbError};
use indexed_db_futures::prelude::*;
use indexed_db_futures::transaction::{TransactionDurability, TransactionMode, TransactionOptions};
use indexed_db_futures::typed_array::Uint8Array;
use syncline_core::{
    Batch, DbName, DocView, Entry, MemoryStore, Store, StoredDatabase, VersionVector, decode_batch,
    decode_view, encode_batch, encode_view,
};
use wasm_bindgen::JsValue;

const LOG: &str = "log";
const META: &str = "meta";
const VIEWS: &str = "views";
/// 2 added `views`.
pub(crate) const SCHEMA_VERSION: u8 = 2;
/// Records of one database after which they are folded into one.
const FOLD_AFTER: u64 = 512;

/// Why the browser store failed. Each variant has a stable [`StoreError::code`].
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The origin's storage quota is exhausted; nothing of the batch was written.
    #[error("storage quota exceeded: {0}")]
    QuotaExceeded(String),
    /// Another tab holds an older version of the database open and blocks the upgrade.
    #[error("opening the local database is blocked by another tab holding an older version")]
    Blocked,
    /// IndexedDB is missing (private mode in some browsers, Node).
    #[error("IndexedDB is not available here")]
    Unavailable,
    /// A stored record does not decode.
    #[error(transparent)]
    Corrupt(#[from] syncline_core::CorruptRecord),
    /// A batch does not encode (nothing was written).
    #[error(transparent)]
    Encode(#[from] syncline_core::EncodeRecord),
    /// Any other IndexedDB failure (the transaction was rolled back).
    #[error("IndexedDB: {0}")]
    Idb(String),
    /// A file operation failed (Node's file store; nothing of the write is
    /// acknowledged).
    #[error("file store: {0}")]
    Files(String),
    /// A log is damaged in its middle; it is left as it is.
    #[error("{0}")]
    Damaged(String),
}

impl StoreError {
    /// The stable code JS programs switch on.
    pub fn code(&self) -> &'static str {
        match self {
            StoreError::QuotaExceeded(_) => "QuotaExceeded",
            StoreError::Blocked => "StorageBlocked",
            StoreError::Unavailable => "StorageUnavailable",
            StoreError::Corrupt(_) | StoreError::Damaged(_) => "StorageCorrupt",
            StoreError::Idb(_) | StoreError::Encode(_) | StoreError::Files(_) => "StorageFailed",
        }
    }
}

impl From<IdbError> for StoreError {
    fn from(e: IdbError) -> Self {
        match &e {
            IdbError::DomException(DomException::Other(d)) if d.name() == "QuotaExceededError" => {
                StoreError::QuotaExceeded(d.message())
            }
            _ => StoreError::Idb(e.to_string()),
        }
    }
}

impl From<OpenDbError> for StoreError {
    fn from(e: OpenDbError) -> Self {
        match e {
            OpenDbError::UnsupportedEnvironment | OpenDbError::NullFactory => {
                StoreError::Unavailable
            }
            OpenDbError::Base(b) => b.into(),
            other => StoreError::Idb(other.to_string()),
        }
    }
}

fn key(db: &DbName, seq: u64) -> String {
    format!("{}\u{0}{seq:016x}", db.as_str())
}

fn range(db: &DbName) -> KeyRange<String> {
    KeyRange::Bound(
        format!("{}\u{0}", db.as_str()),
        false,
        format!("{}\u{1}", db.as_str()),
        true,
    )
}

fn view_key(db: &DbName, doc: &str) -> String {
    format!("{}\u{0}{doc}", db.as_str())
}

/// One write: a batch of `db` and the views of the documents it touches.
pub type Write<'a> = (&'a DbName, &'a Batch, &'a [DocView]);

fn parse_key(k: &str) -> Option<(DbName, u64)> {
    let (db, seq) = k.split_once('\u{0}')?;
    Some((DbName::new(db).ok()?, u64::from_str_radix(seq, 16).ok()?))
}

/// The IndexedDB store of one replica.
#[derive(Debug)]
pub struct IdbStore {
    db: IdbDatabase,
    /// Per database: (next record number, records held).
    seqs: RefCell<HashMap<DbName, (u64, u64)>>,
}

impl IdbStore {
    /// Open (creating if needed) the IndexedDB database `name`.
    pub async fn open(name: &str) -> Result<Self, StoreError> {
        Self::open_version(name, SCHEMA_VERSION).await
    }

    pub(crate) async fn open_version(name: &str, version: u8) -> Result<Self, StoreError> {
        // `blocked` fires when another connection holds an older version
        // open; the open request would wait for it indefinitely, so the
        // caller gets a typed error instead.
        let (blocked_tx, blocked_rx) = futures_channel::oneshot::channel::<()>();
        let open = IdbDatabase::open(name)
            .with_version(version)
            .with_on_blocked(move |_| {
                let _ = blocked_tx.send(());
                Ok(())
            })
            .with_on_upgrade_needed(|_, db| {
                let names: Vec<String> = db.object_store_names().collect();
                for store in [LOG, META, VIEWS] {
                    if !names.iter().any(|n| n == store) {
                        db.create_object_store(store).build()?;
                    }
                }
                Ok(())
            })
            .into_future();
        let db = match select(Box::pin(open), blocked_rx).await {
            Either::Left((db, _)) => db?,
            Either::Right((Ok(()), _)) => return Err(StoreError::Blocked),
            Either::Right((Err(_), open)) => open.await?,
        };
        Ok(IdbStore {
            db,
            seqs: RefCell::new(HashMap::new()),
        })
    }

    /// Delete every IndexedDB database of this store (tests, "log out").
    pub fn close(self) {
        self.db.close();
    }

    fn options() -> TransactionOptions {
        TransactionOptions::new().with_durability(TransactionDurability::Strict)
    }

    async fn records(&self, db: &DbName) -> Result<Vec<(u64, Batch)>, StoreError> {
        let tx = self.db.transaction(LOG).build()?;
        let store = tx.object_store(LOG)?;
        let keys: Vec<String> = store
            .get_all_keys::<String>()
            .with_query::<String, _>(range(db))
            .primitive()?
            .await?
            .collect::<Result<_, _>>()?;
        let values: Vec<Uint8Array> = store
            .get_all::<Uint8Array>()
            .with_query::<String, _>(range(db))
            .primitive()?
            .await?
            .collect::<Result<_, _>>()?;
        let mut out = Vec::with_capacity(keys.len());
        for (k, v) in keys.iter().zip(values) {
            let seq = parse_key(k).map_or(0, |(_, s)| s);
            out.push((seq, decode_batch(v.as_ref())?));
        }
        Ok(out)
    }

    /// The cached views kept for `db`. A record that does not decode is
    /// skipped (its document loads from the log instead).
    pub async fn load_views(&self, db: &DbName) -> Result<Vec<DocView>, StoreError> {
        let tx = self.db.transaction(VIEWS).build()?;
        let values: Vec<Uint8Array> = tx
            .object_store(VIEWS)?
            .get_all::<Uint8Array>()
            .with_query::<String, _>(range(db))
            .primitive()?
            .await?
            .collect::<Result<_, _>>()?;
        let mut views = Vec::with_capacity(values.len());
        for v in values {
            match decode_view(v.as_ref()) {
                Ok(view) => views.push(view),
                Err(e) => tracing::warn!(%db, "skipping a cached view: {e}"),
            }
        }
        Ok(views)
    }

    /// Write many batches (of any databases) and their views in one
    /// transaction: all or none.
    pub async fn write_many(&self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        for (db, _, _) in writes {
            self.ensure_seq(db).await?;
        }
        let tx = self
            .db
            .transaction([LOG, VIEWS])
            .with_mode(TransactionMode::Readwrite)
            .with_options(Self::options())
            .build()?;
        let store = tx.object_store(LOG)?;
        let views = tx.object_store(VIEWS)?;
        let mut planned: HashMap<DbName, (u64, u64)> = self.seqs.borrow().clone();
        for (db, batch, batch_views) in writes {
            // (An empty batch carries only views: no log record.)
            if !batch.is_empty() {
                let slot = planned.entry((*db).clone()).or_insert((0, 0));
                let bytes = encode_batch(batch)?;
                // `add`: a key that exists (another writer of this replica)
                // fails the transaction instead of overwriting a durable batch.
                store
                    .add(Uint8Array::from(bytes))
                    .with_key(key(db, slot.0))
                    .primitive()?;
                slot.0 += 1;
                slot.1 += 1;
            }
            for v in *batch_views {
                views
                    .put(Uint8Array::from(encode_view(v)))
                    .with_key(view_key(db, v.doc.as_str()))
                    .primitive()?;
            }
        }
        drop((store, views));
        if let Err(e) = commit(tx).await {
            // The next keys are re-read before the next attempt: if another
            // writer added records meanwhile, retrying the same keys would
            // fail forever.
            let mut seqs = self.seqs.borrow_mut();
            for (db, _, _) in writes {
                seqs.remove(*db);
            }
            return Err(e);
        }
        *self.seqs.borrow_mut() = planned;
        let full: Vec<DbName> = self
            .seqs
            .borrow()
            .iter()
            .filter(|(_, (_, n))| *n > FOLD_AFTER)
            .map(|(db, _)| db.clone())
            .collect();
        for db in full {
            // The batches are durable already; a failed fold only leaves
            // more records to read (it is retried after the next write).
            if let Err(e) = self.fold(&db).await {
                tracing::warn!(%db, "folding the local log failed: {e}");
            }
        }
        Ok(())
    }

    async fn ensure_seq(&self, db: &DbName) -> Result<(), StoreError> {
        if self.seqs.borrow().contains_key(db) {
            return Ok(());
        }
        let tx = self.db.transaction(LOG).build()?;
        let keys: Vec<String> = tx
            .object_store(LOG)?
            .get_all_keys::<String>()
            .with_query::<String, _>(range(db))
            .primitive()?
            .await?
            .collect::<Result<_, _>>()?;
        let next = keys
            .iter()
            .filter_map(|k| parse_key(k))
            .map(|(_, s)| s + 1)
            .max()
            .unwrap_or(0);
        self.seqs
            .borrow_mut()
            .insert(db.clone(), (next, keys.len() as u64));
        Ok(())
    }

    /// Replace a database's records by one record of their fold, atomically.
    async fn fold(&self, db: &DbName) -> Result<StoredDatabase, StoreError> {
        let records = self.records(db).await?;
        let mut state = StoredDatabase::default();
        for (_, b) in &records {
            state.apply(b);
        }
        let next = records.last().map_or(0, |(s, _)| s + 1);
        let folded = Batch {
            entries: state.entries.clone(),
            snapshots: state.snapshots.clone(),
            base: (!state.base.is_empty()).then(|| state.base.clone()),
        };
        let tx = self
            .db
            .transaction(LOG)
            .with_mode(TransactionMode::Readwrite)
            .with_options(Self::options())
            .build()?;
        let store = tx.object_store(LOG)?;
        store.delete::<String, _>(range(db)).primitive()?;
        store
            .put(Uint8Array::from(encode_batch(&folded)?))
            .with_key(key(db, next))
            .primitive()?;
        drop(store);
        commit(tx).await?;
        self.seqs.borrow_mut().insert(db.clone(), (next + 1, 1));
        Ok(state)
    }
}

/// Commit, reporting the transaction's own error (e.g. the quota) rather
/// than the generic "aborted".
async fn commit(tx: indexed_db_futures::transaction::Transaction<'_>) -> Result<(), StoreError> {
    use indexed_db_futures::internals::SystemRepr;
    let sys = tx.as_sys().clone();
    match tx.commit().await {
        Ok(()) => Ok(()),
        Err(e) => Err(match sys.error() {
            Some(d) if d.name() == "QuotaExceededError" => StoreError::QuotaExceeded(d.message()),
            Some(d) => StoreError::Idb(format!("{}: {}", d.name(), d.message())),
            None => e.into(),
        }),
    }
}

impl Store for IdbStore {
    type Error = StoreError;

    async fn list_databases(&self) -> Result<Vec<DbName>, StoreError> {
        let tx = self.db.transaction(LOG).build()?;
        let keys: Vec<String> = tx
            .object_store(LOG)?
            .get_all_keys::<String>()
            .primitive()?
            .await?
            .collect::<Result<_, _>>()?;
        let mut names: Vec<DbName> = keys
            .iter()
            .filter_map(|k| parse_key(k))
            .map(|(d, _)| d)
            .collect();
        names.dedup();
        Ok(names)
    }

    async fn load(&self, db: &DbName) -> Result<StoredDatabase, StoreError> {
        let records = self.records(db).await?;
        if records.len() as u64 > FOLD_AFTER / 4 {
            return self.fold(db).await;
        }
        let mut state = StoredDatabase::default();
        for (_, b) in &records {
            state.apply(b);
        }
        let next = records.last().map_or(0, |(s, _)| s + 1);
        self.seqs
            .borrow_mut()
            .insert(db.clone(), (next, records.len() as u64));
        Ok(state)
    }

    async fn read_since(
        &self,
        db: &DbName,
        since: &VersionVector,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut state = StoredDatabase::default();
        for (_, b) in self.records(db).await? {
            state.apply(&b);
        }
        Ok(state
            .entries
            .into_iter()
            .filter(|e| !since.contains(&e.dot))
            .collect())
    }

    async fn write(&self, db: &DbName, batch: &Batch) -> Result<(), StoreError> {
        self.write_many(&[(db, batch, &[])]).await
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let tx = self.db.transaction(META).build()?;
        let v: Option<Uint8Array> = tx
            .object_store(META)?
            .get(key.to_owned())
            .primitive()?
            .await?;
        Ok(v.map(|a| a.as_ref().to_vec()))
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let tx = self
            .db
            .transaction(META)
            .with_mode(TransactionMode::Readwrite)
            .with_options(Self::options())
            .build()?;
        tx.object_store(META)?
            .put(Uint8Array::from(value.to_vec()))
            .with_key(key.to_owned())
            .primitive()?;
        commit(tx).await
    }
}

impl IdbStore {
    async fn get_meta_value(&self, key: &str) -> Result<Option<JsValue>, StoreError> {
        let tx = self.db.transaction(META).build()?;
        let v: Option<JsValue> = tx
            .object_store(META)?
            .get(key.to_owned())
            .primitive()?
            .await?;
        Ok(v)
    }

    async fn put_meta_value(&self, key: &str, value: &JsValue) -> Result<(), StoreError> {
        let tx = self
            .db
            .transaction(META)
            .with_mode(TransactionMode::Readwrite)
            .with_options(Self::options())
            .build()?;
        tx.object_store(META)?
            .put(value.clone())
            .with_key(key.to_owned())
            .primitive()?;
        commit(tx).await
    }
}

/// Where a browser client keeps its data: IndexedDB, or memory (Node, tests,
/// or an app that opts out of persistence).
#[derive(Debug, Clone)]
pub enum BrowserStore {
    /// Durable.
    Idb(Rc<IdbStore>),
    /// Gone when the page goes.
    Memory(MemoryStore),
    /// Files (Node): durable, in the native store's record format.
    Files(Rc<crate::files::FileStore>),
}

impl BrowserStore {
    /// Load a database.
    pub async fn load(&self, db: &DbName) -> Result<StoredDatabase, StoreError> {
        match self {
            BrowserStore::Idb(s) => s.load(db).await,
            BrowserStore::Memory(m) => Ok(m.load_now(db).unwrap_or_default()),
            BrowserStore::Files(f) => f.load(db).await,
        }
    }

    /// Whether this store keeps cached document views (IndexedDB does; a
    /// memory store has no reopen to speed up).
    pub fn keeps_views(&self) -> bool {
        matches!(self, BrowserStore::Idb(_))
    }

    /// The cached views kept for `db` (none in memory).
    pub async fn load_views(&self, db: &DbName) -> Result<Vec<DocView>, StoreError> {
        match self {
            BrowserStore::Idb(s) => s.load_views(db).await,
            BrowserStore::Memory(_) | BrowserStore::Files(_) => Ok(Vec::new()),
        }
    }

    /// Write batches (and their views, where kept) atomically.
    pub async fn write_many(&self, writes: &[Write<'_>]) -> Result<(), StoreError> {
        match self {
            BrowserStore::Idb(s) => s.write_many(writes).await,
            BrowserStore::Memory(m) => {
                for (db, b, _) in writes {
                    m.write_now(db, b)
                        .map_err(|e| StoreError::Idb(e.to_string()))?;
                }
                Ok(())
            }
            BrowserStore::Files(f) => f.write_many(writes).await,
        }
    }

    /// Read a metadata value.
    pub async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match self {
            BrowserStore::Idb(s) => s.get_meta(key).await,
            BrowserStore::Memory(m) => m
                .get_meta(key)
                .await
                .map_err(|e| StoreError::Idb(e.to_string())),
            BrowserStore::Files(f) => f.get_meta(key).await,
        }
    }

    /// Write a metadata value.
    pub async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match self {
            BrowserStore::Idb(s) => s.put_meta(key, value).await,
            BrowserStore::Memory(m) => m
                .put_meta(key, value)
                .await
                .map_err(|e| StoreError::Idb(e.to_string())),
            BrowserStore::Files(f) => f.put_meta(key, value, false).await,
        }
    }

    /// A metadata value that is a JS object (a WebCrypto key pair, which
    /// IndexedDB stores as it is). Memory stores keep none.
    pub async fn get_meta_value(&self, key: &str) -> Result<Option<JsValue>, StoreError> {
        match self {
            BrowserStore::Idb(s) => s.get_meta_value(key).await,
            BrowserStore::Memory(_) | BrowserStore::Files(_) => Ok(None),
        }
    }

    /// Write a metadata value that is a JS object (see
    /// [`BrowserStore::get_meta_value`]).
    pub async fn put_meta_value(&self, key: &str, value: &JsValue) -> Result<(), StoreError> {
        match self {
            BrowserStore::Idb(s) => s.put_meta_value(key, value).await,
            BrowserStore::Memory(_) | BrowserStore::Files(_) => Ok(()),
        }
    }

    /// Release the IndexedDB connection.
    pub fn close(&self) {
        match self {
            BrowserStore::Idb(s) => s.db.clone().close(),
            BrowserStore::Files(f) => f.close(),
            BrowserStore::Memory(_) => {}
        }
    }
}

impl From<StoreError> for JsValue {
    fn from(e: StoreError) -> Self {
        crate::error::js_error(e.code(), &e.to_string())
    }
}
