//! A replica's copy of one database: the entry log plus the materialised
//! documents, with JSON reads and writes that produce entries.

use std::collections::{BTreeMap, BTreeSet};

use automerge::TextEncoding;
use serde_json::Value as Json;

use crate::clock::{Dot, VersionVector};
use crate::doc::{DocError, Document, PathSeg};
use crate::entry::{Entry, InvalidChange, Snapshot};
use crate::ids::{DbName, DocId, ReplicaId};
use crate::log::{Appended, Compaction, Log, LogError};
use crate::store::StoredDatabase;

/// Most out-of-order entries held while waiting for a gap to fill.
pub const MAX_PENDING: usize = 1 << 20;

/// A problem with one remote entry or snapshot; the rest of the batch still applies.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    /// The change bytes are not a valid change of the entry's replica.
    #[error(transparent)]
    Invalid(#[from] InvalidChange),
    /// The change parsed but automerge refused it (e.g. a forged duplicate).
    #[error("{doc}: {source}")]
    Doc {
        /// The document.
        doc: DocId,
        /// What automerge said.
        source: DocError,
    },
    /// Too many out-of-order entries: the pending buffer was dropped.
    #[error("too many out-of-order entries; dropped them and will resynchronise")]
    PendingOverflow,
}

/// What applying remote data did.
#[derive(Debug, Default)]
pub struct Applied {
    /// Entries newly added to the log, to persist.
    pub entries: Vec<Entry>,
    /// Snapshots to persist (the merged local document after a remote snapshot).
    pub snapshots: Vec<Snapshot>,
    /// Documents whose value may have changed.
    pub changed: BTreeSet<DocId>,
    /// Entries or snapshots that were refused.
    pub errors: Vec<ApplyError>,
}

/// One database as a replica holds it.
#[derive(Debug, Clone)]
pub struct Database {
    name: DbName,
    replica: ReplicaId,
    encoding: TextEncoding,
    log: Log,
    docs: BTreeMap<DocId, Document>,
    /// Remote entries that arrived before an earlier counter of their replica.
    pending: BTreeMap<Dot, Entry>,
}

impl Database {
    /// An empty database.
    pub fn new(name: DbName, replica: ReplicaId, encoding: TextEncoding) -> Self {
        Database {
            name,
            replica,
            encoding,
            log: Log::new(),
            docs: BTreeMap::new(),
            pending: BTreeMap::new(),
        }
    }

    /// Rebuild from a store's content: load snapshots, replay entries.
    /// Damaged records are skipped and reported; everything else loads.
    pub fn from_stored(
        name: DbName,
        replica: ReplicaId,
        encoding: TextEncoding,
        stored: StoredDatabase,
    ) -> (Self, Vec<ApplyError>) {
        let mut errors = Vec::new();
        let mut docs = BTreeMap::new();
        for s in &stored.snapshots {
            match Document::load(&s.bytes, replica, encoding) {
                Ok(d) => {
                    docs.insert(s.doc.clone(), d);
                }
                Err(source) => errors.push(ApplyError::Doc {
                    doc: s.doc.clone(),
                    source,
                }),
            }
        }
        let (log, problems) = Log::from_stored(stored);
        for p in problems {
            tracing::warn!(db = %name, "stored log: {p}");
        }
        let mut db = Database {
            name,
            replica,
            encoding,
            log,
            docs,
            pending: BTreeMap::new(),
        };
        let mut batches: BTreeMap<DocId, Vec<automerge::Change>> = BTreeMap::new();
        for e in db.log.entries() {
            match e.parse_change() {
                Ok(c) => batches.entry(e.doc.clone()).or_default().push(c),
                Err(err) => errors.push(err.into()),
            }
        }
        db.materialise(batches, &mut errors);
        (db, errors)
    }

    /// The database's name.
    pub fn name(&self) -> &DbName {
        &self.name
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// What this replica holds.
    pub fn vv(&self) -> &VersionVector {
        self.log.vv()
    }

    /// The underlying log.
    pub fn log(&self) -> &Log {
        &self.log
    }

    /// The highest counter of this replica's own entries.
    pub fn own_counter(&self) -> u64 {
        self.log.vv().get(&self.replica)
    }

    /// A document's JSON value (`None` when absent or deleted).
    pub fn get(&self, doc: &DocId) -> Option<Json> {
        self.docs.get(doc).and_then(Document::to_json)
    }

    /// The value at `path` inside a document.
    pub fn get_path(&self, doc: &DocId, path: &[PathSeg]) -> Option<Json> {
        self.docs.get(doc).and_then(|d| d.get_path(path))
    }

    /// A document, deleted or not.
    pub fn document(&self, doc: &DocId) -> Option<&Document> {
        self.docs.get(doc)
    }

    /// Ids of the documents that exist (not deleted), in order.
    pub fn list(&self) -> Vec<DocId> {
        self.docs
            .iter()
            .filter(|(_, d)| !d.is_deleted() && d.to_json().is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Every document, deleted ones included.
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &Document)> {
        self.docs.iter()
    }

    /// Make a document equal `value` with minimal changes (creating it when missing).
    pub fn update(&mut self, doc: &DocId, value: &Json) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.update(value))
    }

    /// [`Database::update`] with root keys holding collaborative text
    /// (see [`Document::update_with_text`]).
    pub fn update_with_text(
        &mut self,
        doc: &DocId,
        value: &Json,
        text_keys: &[String],
    ) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.update_with_text(value, text_keys))
    }

    /// Delete a document (a tombstone change that syncs).
    pub fn delete(&mut self, doc: &DocId) -> Result<Option<Entry>, DocError> {
        if !self.docs.contains_key(doc) {
            return Ok(None);
        }
        self.local(doc, Document::delete)
    }

    /// Splice collaborative text inside a document.
    pub fn splice_text(
        &mut self,
        doc: &DocId,
        path: &[PathSeg],
        pos: usize,
        del: usize,
        insert: &str,
    ) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.splice_text(path, pos, del, insert))
    }

    /// Add to a counter inside a document.
    pub fn increment(
        &mut self,
        doc: &DocId,
        path: &[PathSeg],
        by: i64,
    ) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.increment(path, by))
    }

    fn local(
        &mut self,
        doc: &DocId,
        f: impl FnOnce(&mut Document) -> Result<Option<automerge::Change>, DocError>,
    ) -> Result<Option<Entry>, DocError> {
        let (replica, encoding) = (self.replica, self.encoding);
        let created = !self.docs.contains_key(doc);
        let document = self
            .docs
            .entry(doc.clone())
            .or_insert_with(|| Document::new(replica, encoding));
        let result = f(document);
        let change = match result {
            Ok(Some(c)) => c,
            other => {
                if created {
                    self.docs.remove(doc);
                }
                return other.map(|_| None);
            }
        };
        let mut change = change;
        let entry = Entry {
            dot: Dot {
                replica,
                counter: self.own_counter() + 1,
            },
            doc: doc.clone(),
            change: change.bytes().into_owned(),
        };
        // Our own next counter always follows the log, so this cannot gap.
        let _ = self.log.append(entry.clone());
        Ok(Some(entry))
    }

    /// Apply remote entries (any order, duplicates allowed). Entries that
    /// arrive ahead of a gap wait in a bounded buffer until it fills.
    /// Changes are handed to automerge in one batch per document, which is
    /// much cheaper than one call per change.
    pub fn apply_entries(&mut self, entries: impl IntoIterator<Item = Entry>) -> Applied {
        let mut out = Applied::default();
        let mut batches = BTreeMap::new();
        for e in entries {
            self.apply_one(e, &mut out, &mut batches);
        }
        self.drain_pending(&mut out, &mut batches);
        self.materialise(batches, &mut out.errors);
        out
    }

    fn apply_one(
        &mut self,
        e: Entry,
        out: &mut Applied,
        batches: &mut BTreeMap<DocId, Vec<automerge::Change>>,
    ) {
        if self.log.vv().contains(&e.dot) {
            return;
        }
        let change = match e.parse_change() {
            Ok(c) => c,
            Err(err) => {
                out.errors.push(err.into());
                return;
            }
        };
        match self.log.append(e.clone()) {
            Ok(Appended::Added) => {
                batches.entry(e.doc.clone()).or_default().push(change);
                out.changed.insert(e.doc.clone());
                out.entries.push(e);
            }
            Ok(Appended::Duplicate) => {}
            Err(LogError::Gap { .. }) => {
                if self.pending.len() >= MAX_PENDING {
                    self.pending.clear();
                    out.errors.push(ApplyError::PendingOverflow);
                }
                self.pending.insert(e.dot, e);
            }
            Err(other) => tracing::warn!("unexpected log error: {other}"),
        }
    }

    fn drain_pending(
        &mut self,
        out: &mut Applied,
        batches: &mut BTreeMap<DocId, Vec<automerge::Change>>,
    ) {
        loop {
            let vv = self.log.vv().clone();
            self.pending.retain(|dot, _| !vv.contains(dot));
            let next: Vec<Dot> = self
                .pending
                .keys()
                .filter(|d| d.counter == vv.get(&d.replica) + 1)
                .copied()
                .collect();
            if next.is_empty() {
                return;
            }
            for dot in next {
                if let Some(e) = self.pending.remove(&dot) {
                    self.apply_one(e, out, batches);
                }
            }
        }
    }

    /// Whether out-of-order entries are waiting for a gap to fill.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Merge snapshots received from a peer that was asked for everything
    /// since our vector, then raise our vector to the peer's horizon `base`.
    /// Only call once the whole reply has arrived (all its snapshots): the
    /// snapshots cover exactly the documents we lacked below `base`.
    pub fn apply_snapshots(&mut self, snapshots: Vec<Snapshot>, base: &VersionVector) -> Applied {
        let mut out = Applied::default();
        let mut clocks = BTreeMap::new();
        for s in snapshots {
            let (replica, encoding) = (self.replica, self.encoding);
            let doc = self
                .docs
                .entry(s.doc.clone())
                .or_insert_with(|| Document::new(replica, encoding));
            if let Err(source) = doc.merge_snapshot(&s.bytes) {
                out.errors.push(ApplyError::Doc {
                    doc: s.doc.clone(),
                    source,
                });
                continue;
            }
            out.changed.insert(s.doc.clone());
            clocks.insert(s.doc, s.clock);
        }
        // Everything at or below `base` is now held: record it as a
        // compaction of our own documents (which hold the merged content),
        // so the log's invariants hold and a restart finds the same state.
        let mut new_base = base.clone();
        new_base.merge(self.log.base());
        let mut compaction = self.fold(&new_base, clocks.keys().cloned().collect());
        for snap in &mut compaction.snapshots {
            if let Some(c) = clocks.get(&snap.doc) {
                snap.clock.merge(c);
            }
        }
        self.log.absorb(compaction.clone());
        out.snapshots = compaction.snapshots;
        let mut batches = BTreeMap::new();
        self.drain_pending(&mut out, &mut batches);
        self.materialise(batches, &mut out.errors);
        out
    }

    /// Fold entries at or below `up_to` (clamped to what we hold) into
    /// snapshots of the current documents. Returns what the store must write.
    pub fn compact(&mut self, up_to: &VersionVector) -> Compaction {
        let mut base = up_to.meet(self.log.vv());
        base.merge(self.log.base());
        let compaction = self.fold(&base, BTreeSet::new());
        self.log.apply_compaction(compaction.clone());
        compaction
    }

    /// Snapshots (of the materialised documents) for every document with an
    /// entry at or below `base`, plus `extra` documents.
    fn fold(&self, base: &VersionVector, mut extra: BTreeSet<DocId>) -> Compaction {
        for e in self.log.entries() {
            if base.contains(&e.dot) {
                extra.insert(e.doc.clone());
            }
        }
        let snapshots = extra
            .into_iter()
            .filter_map(|doc| {
                let d = self.docs.get(&doc)?;
                Some(Snapshot {
                    clock: self.log.doc_clock(&doc).cloned().unwrap_or_default(),
                    bytes: d.save(),
                    doc,
                })
            })
            .collect();
        Compaction {
            base: base.clone(),
            snapshots,
        }
    }

    /// Apply parsed changes, one automerge batch per document. A batch that
    /// fails is retried change by change so one bad change costs only itself.
    fn materialise(
        &mut self,
        batches: BTreeMap<DocId, Vec<automerge::Change>>,
        errors: &mut Vec<ApplyError>,
    ) {
        let (replica, encoding) = (self.replica, self.encoding);
        for (doc, changes) in batches {
            let d = self
                .docs
                .entry(doc.clone())
                .or_insert_with(|| Document::new(replica, encoding));
            if d.apply_batch(changes.clone()).is_ok() {
                continue;
            }
            for c in changes {
                if let Err(source) = d.apply(c) {
                    errors.push(ApplyError::Doc {
                        doc: doc.clone(),
                        source,
                    });
                }
            }
        }
    }
}
