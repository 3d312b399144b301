//! Persistence: the [`Store`] trait every backend implements, and an in-memory store.
//!
//! Stores are asynchronous because the real ones are: IndexedDB answers in
//! callbacks and the native log acknowledges a write only after a (group)
//! fsync. The sync state machines never call a store: they emit "persist this
//! batch" outputs and take "persisted" inputs, so `core` never awaits. The
//! futures carry no `Send` bound so the browser store (which holds `!Send` JS
//! handles) fits; native implementations may refine their futures to be `Send`.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::chunked::Chunked;
use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::ids::{DbName, DocId};

/// What a store holds for one database.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredDatabase {
    /// Pruned horizon: entries at or below it live in `snapshots`.
    pub base: VersionVector,
    /// One snapshot per compacted document.
    pub snapshots: Vec<Snapshot>,
    /// Entries above the horizon in append order.
    pub entries: Vec<Entry>,
}

impl StoredDatabase {
    /// Apply a batch the way every store must: append entries, replace
    /// snapshots per document, raise the horizon and drop the entries it covers.
    pub fn apply(&mut self, batch: &Batch) {
        apply_batch(
            batch.clone(),
            &mut self.base,
            &mut self.snapshots,
            &mut self.entries,
        );
    }
}

/// A sequence of entries a batch appends to ([`StoredDatabase::apply`]).
trait Entries: Extend<Entry> {
    fn retain_entries(&mut self, keep: impl FnMut(&Entry) -> bool);
}

impl Entries for Vec<Entry> {
    fn retain_entries(&mut self, keep: impl FnMut(&Entry) -> bool) {
        self.retain(keep);
    }
}

impl Entries for Chunked<Entry> {
    fn retain_entries(&mut self, keep: impl FnMut(&Entry) -> bool) {
        self.retain(keep);
    }
}

fn apply_batch(
    batch: Batch,
    base: &mut VersionVector,
    snapshots: &mut Vec<Snapshot>,
    entries: &mut impl Entries,
) {
    entries.extend(batch.entries);
    if batch.snapshots.len() <= 8 {
        for s in batch.snapshots {
            match snapshots.iter_mut().find(|x| x.doc == s.doc) {
                Some(slot) => *slot = s,
                None => snapshots.push(s),
            }
        }
    } else {
        // A compaction's batch holds a snapshot per document: index the held
        // ones once instead of scanning them per snapshot (O(n²) on load).
        let mut at: HashMap<DocId, usize> = snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.doc.clone(), i))
            .collect();
        for s in batch.snapshots {
            match at.get(&s.doc) {
                Some(&i) => snapshots[i] = s,
                None => {
                    at.insert(s.doc.clone(), snapshots.len());
                    snapshots.push(s);
                }
            }
        }
    }
    if let Some(b) = &batch.base {
        base.merge(b);
        entries.retain_entries(|e| !base.contains(&e.dot));
    }
}

/// One atomic write: either all of it is durable or none of it.
#[derive(Debug, Clone, Default, PartialEq, Archive, Serialize, Deserialize)]
pub struct Batch {
    /// Entries to append, in order.
    pub entries: Vec<Entry>,
    /// Snapshots that replace the stored snapshot of their document.
    pub snapshots: Vec<Snapshot>,
    /// A new pruned horizon: the store may drop entries at or below it.
    pub base: Option<VersionVector>,
}

impl Batch {
    /// A batch of entries only.
    pub fn entries(entries: Vec<Entry>) -> Self {
        Batch {
            entries,
            ..Batch::default()
        }
    }

    /// Whether the batch writes nothing.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.snapshots.is_empty() && self.base.is_none()
    }
}

/// Encode a batch as one opaque record (an rkyv archive), for stores that
/// keep batches as they come (the browser's IndexedDB store). The layout is
/// the native log's record payload too. A batch that does not serialize is
/// an error, never an empty record standing in for it.
pub fn encode_batch(batch: &Batch) -> Result<Vec<u8>, EncodeRecord> {
    rkyv::to_bytes::<rancor::Error>(batch)
        .map(|b| b.to_vec())
        .map_err(|e| EncodeRecord(e.to_string()))
}

/// Why a batch could not be encoded as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a record does not serialize: {0}")]
pub struct EncodeRecord(pub String);

/// Why a stored record could not be read back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("stored record is corrupt: {0}")]
pub struct CorruptRecord(pub String);

/// Decode and validate a record written by [`encode_batch`]. Stored bytes are
/// untrusted (another version, another tab, a damaged disk): anything that
/// does not validate is an error, never a panic.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, CorruptRecord> {
    let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let mut batch = rkyv::from_bytes::<Batch, rancor::Error>(&aligned)
        .map_err(|e| CorruptRecord(e.to_string()))?;
    for e in &batch.entries {
        if !DocId::is_valid(e.doc.as_str()) || e.dot.counter == 0 {
            return Err(CorruptRecord(format!("entry {:?}", e.dot)));
        }
    }
    for s in &mut batch.snapshots {
        if !DocId::is_valid(s.doc.as_str()) {
            return Err(CorruptRecord("snapshot document id".into()));
        }
        s.clock.normalize();
    }
    if let Some(base) = &mut batch.base {
        base.normalize();
    }
    Ok(batch)
}

/// A durable home for databases. Every method's future resolves only when
/// the effect is durable (for native stores: after fsync).
pub trait Store {
    /// The backend's error.
    type Error: std::error::Error + 'static;

    /// Names of the databases held.
    fn list_databases(&self) -> impl Future<Output = Result<Vec<DbName>, Self::Error>>;

    /// Everything held for `db` (empty when unknown).
    fn load(&self, db: &DbName) -> impl Future<Output = Result<StoredDatabase, Self::Error>>;

    /// Entries of `db` not covered by `since`, in append order. Entries
    /// already folded into snapshots are not returned: callers that are
    /// behind the horizon use [`Store::load`].
    fn read_since(
        &self,
        db: &DbName,
        since: &VersionVector,
    ) -> impl Future<Output = Result<Vec<Entry>, Self::Error>>;

    /// Apply one batch atomically and durably.
    fn write(&self, db: &DbName, batch: &Batch) -> impl Future<Output = Result<(), Self::Error>>;

    /// Read a small metadata value (a replica's own id, for instance).
    fn get_meta(&self, key: &str) -> impl Future<Output = Result<Option<Vec<u8>>, Self::Error>>;

    /// Durably set a small metadata value.
    fn put_meta(&self, key: &str, value: &[u8]) -> impl Future<Output = Result<(), Self::Error>>;
}

/// The in-memory store's (never produced) error.
#[derive(Debug, thiserror::Error)]
#[error("memory store lock poisoned")]
pub struct MemoryStoreError;

/// One database in a [`MemoryStore`]: a [`StoredDatabase`] whose entries
/// grow in chunks ([`Chunked`]), as the log's do.
#[derive(Debug, Clone, Default)]
struct MemoryDb {
    base: VersionVector,
    snapshots: Vec<Snapshot>,
    entries: Chunked<Entry>,
}

impl MemoryDb {
    fn apply(&mut self, batch: Batch) {
        apply_batch(
            batch,
            &mut self.base,
            &mut self.snapshots,
            &mut self.entries,
        );
    }

    fn to_stored(&self) -> StoredDatabase {
        StoredDatabase {
            base: self.base.clone(),
            snapshots: self.snapshots.clone(),
            entries: self.entries.iter().cloned().collect(),
        }
    }
}

#[derive(Debug, Default)]
struct MemoryInner {
    dbs: BTreeMap<DbName, MemoryDb>,
    meta: BTreeMap<String, Vec<u8>>,
}

/// A store in memory: for tests, simulations and purely local use. Clones
/// share content, so a test can "restart" a replica from the same store.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<MemoryInner>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn with<T>(&self, f: impl FnOnce(&mut MemoryInner) -> T) -> Result<T, MemoryStoreError> {
        let mut guard = self.inner.lock().map_err(|_| MemoryStoreError)?;
        Ok(f(&mut guard))
    }

    /// Synchronous form of [`Store::write`] (the memory store is never pending).
    pub fn write_now(&self, db: &DbName, batch: &Batch) -> Result<(), MemoryStoreError> {
        self.write_owned(db, batch.clone())
    }

    /// [`MemoryStore::write_now`] of a batch the caller no longer needs: its
    /// entries move in instead of being copied.
    pub fn write_owned(&self, db: &DbName, batch: Batch) -> Result<(), MemoryStoreError> {
        self.with(|m| match m.dbs.get_mut(db) {
            Some(d) => d.apply(batch),
            None => m.dbs.entry(db.clone()).or_default().apply(batch),
        })
    }

    /// Synchronous form of [`Store::load`].
    pub fn load_now(&self, db: &DbName) -> Result<StoredDatabase, MemoryStoreError> {
        self.with(|m| m.dbs.get(db).map(MemoryDb::to_stored).unwrap_or_default())
    }

    /// Synchronous form of [`Store::list_databases`].
    pub fn list_now(&self) -> Result<Vec<DbName>, MemoryStoreError> {
        self.with(|m| m.dbs.keys().cloned().collect())
    }
}

impl Store for MemoryStore {
    type Error = MemoryStoreError;

    async fn list_databases(&self) -> Result<Vec<DbName>, Self::Error> {
        self.list_now()
    }

    async fn load(&self, db: &DbName) -> Result<StoredDatabase, Self::Error> {
        self.load_now(db)
    }

    async fn read_since(
        &self,
        db: &DbName,
        since: &VersionVector,
    ) -> Result<Vec<Entry>, Self::Error> {
        self.with(|m| {
            m.dbs
                .get(db)
                .map(|s| {
                    s.entries
                        .iter()
                        .filter(|e| !since.contains(&e.dot))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        })
    }

    async fn write(&self, db: &DbName, batch: &Batch) -> Result<(), Self::Error> {
        self.write_now(db, batch)
    }

    async fn get_meta(&self, key: &str) -> Result<Option<Vec<u8>>, Self::Error> {
        self.with(|m| m.meta.get(key).cloned())
    }

    async fn put_meta(&self, key: &str, value: &[u8]) -> Result<(), Self::Error> {
        self.with(|m| {
            m.meta.insert(key.to_owned(), value.to_vec());
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Dot, ReplicaId};

    fn batch() -> Batch {
        let r = ReplicaId([7; 16]);
        let mut base = VersionVector::new();
        base.set(r, 1);
        Batch {
            entries: vec![Entry {
                dot: Dot {
                    replica: r,
                    counter: 2,
                },
                doc: DocId::new("a").expect("valid id"),
                change: vec![1, 2, 3],
            }],
            snapshots: vec![Snapshot {
                doc: DocId::new("b").expect("valid id"),
                clock: base.clone(),
                bytes: vec![9; 40],
            }],
            base: Some(base),
        }
    }

    fn snaps(ids: impl IntoIterator<Item = usize>, tag: u8) -> Vec<Snapshot> {
        ids.into_iter()
            .map(|i| Snapshot {
                doc: DocId::new(format!("doc-{i}")).expect("valid id"),
                clock: VersionVector::new(),
                bytes: vec![tag],
            })
            .collect()
    }

    /// Small and large snapshot batches (scan and index paths) both replace
    /// a document's snapshot in place and append new documents in order.
    #[test]
    fn snapshots_replace_per_document_in_order() {
        for (first, second) in [(3, 2), (50, 30)] {
            let mut db = StoredDatabase::default();
            db.apply(&Batch {
                snapshots: snaps(0..first, 1),
                ..Batch::default()
            });
            db.apply(&Batch {
                snapshots: snaps(first - 1..first - 1 + second, 2),
                ..Batch::default()
            });
            let got: Vec<(String, u8)> = db
                .snapshots
                .iter()
                .map(|s| (s.doc.as_str().to_owned(), s.bytes[0]))
                .collect();
            let want: Vec<(String, u8)> = (0..first - 1 + second)
                .map(|i| (format!("doc-{i}"), if i < first - 1 { 1 } else { 2 }))
                .collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn batch_records_round_trip() {
        let b = batch();
        assert_eq!(decode_batch(&encode_batch(&b).unwrap()), Ok(b));
    }

    #[test]
    fn corrupt_records_are_errors() {
        let bytes = encode_batch(&batch()).unwrap();
        for cut in 0..bytes.len() {
            let _ = decode_batch(&bytes[..cut]); // must not panic
        }
        assert!(decode_batch(&bytes[..bytes.len() / 2]).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode_batch(&b);
        }
        assert!(decode_batch(&[]).is_err());
    }
}
