//! A replica's copy of one database: the entry log plus the materialised
//! documents, with JSON reads and writes that produce entries.
//!
//! Documents opened from cached views ([`crate::view`]) start as their JSON
//! only and are loaded into automerge from the log the first time something
//! needs the automerge document (a write, a remote change, a snapshot, a
//! compaction, [`Database::document`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;

use automerge::TextEncoding;
use serde_json::Value as Json;

use crate::chunked::Chunked;
use crate::clock::{Dot, VersionVector};
use crate::doc::{DocError, Document, PathSeg, root_is_deleted, root_to_json};
use crate::entry::{Entry, InvalidChange, Snapshot};
use crate::ids::{DbName, DocId, ReplicaId};
use crate::log::{Appended, Compaction, Log, LogError};
use crate::patch::{self, OpKey};
use crate::store::StoredDatabase;
use crate::view::DocView;

/// Local changes up to this size are stored uncompressed (see [`Database::update`]).
pub const RAW_CHANGE_MAX: usize = 16 << 10;

/// Most out-of-order entries held while waiting for a gap to fill.
pub const MAX_PENDING: usize = 1 << 20;

/// Most remote changes a document shows patched (`src/patch.rs`) before
/// they are handed to automerge. The waiting changes are the log's own
/// entries (a patched document keeps only their dots), so the limit bounds
/// the work of one catch-up, not memory: one automerge batch walks each
/// object it touches once, so a large batch costs less per change than a
/// small one (several times less in wasm), but the change that fills the
/// limit pays for a step of it ([`LIMIT_CATCH_UP_STEP`]).
/// Replicas that only read never need the catch-up until they write;
/// adapters catch up when idle ([`Database::catch_up`]). Each replica
/// catches up somewhere between half this and this many
/// ([`Database::behind_limit`]), so replicas that receive the same stream
/// (tabs, a fan-out) do not all pay at the same change.
pub const MAX_BEHIND: usize = 2048;

/// How many of a document's waiting changes go to automerge at once, oldest
/// first, when it reaches its limit ([`MAX_BEHIND`]) or the connection is
/// idle: at least this many, and at least an eighth of the document's
/// entries in the log (automerge walks the history once per batch; after a
/// compaction the entries are those since the snapshot). Once that reaches
/// the limit (a history of 8–16 thousand entries) everything waiting goes
/// at once; a document over its byte limit may take several steps at once.
/// A step bounds the stall of a long stream's reader (natively ~2 ms
/// instead of 7–15 ms for a whole limit; in Node ~6 ms instead of ~18),
/// which in a fan-out held up every replica sharing its thread. In wasm the
/// smaller batches cost ~5 % more CPU per delivered change in all, for a
/// p99 about half as long (BENCHMARKS.md §27–§28).
pub const LIMIT_CATCH_UP_STEP: usize = 256;

/// Most change bytes a document's waiting changes may hold: the other bound
/// on one catch-up's work, for streams of large changes. Spread like
/// [`MAX_BEHIND`] ([`Database::behind_limits`]): a fan-out's replicas fed
/// changes of one size all reached a fixed byte bound at the same change.
pub const MAX_BEHIND_BYTES: usize = 1 << 20;

/// Remote batches of a loaded document up to this many changes are patched
/// when they can be; larger ones (a catch-up) go to automerge in one batch.
/// A document already patched is patched on, whatever the batch: a
/// subscriber that fell behind for a moment gets the changes it missed
/// together, and handing them to automerge would first apply everything
/// waiting, making it fall further behind (replicas sharing a machine
/// then stalled each other in turn).
const PATCH_BATCH_MAX: usize = 8;

/// Parsed changes by document, with the dots of their entries, in log order.
type Batches = BTreeMap<DocId, Vec<(Dot, automerge::Change)>>;

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

/// A document as a replica holds it.
#[derive(Debug, Clone)]
enum Slot {
    /// Loaded into automerge.
    Loaded(Document),
    /// Opened from a cached view: its JSON text (`None`: deleted or empty),
    /// and the automerge document once a read needed it (a write turns the
    /// slot into `Loaded`).
    Cached {
        json: Option<String>,
        loaded: OnceLock<Document>,
    },
    /// Its entries are in the log but were not applied (they arrived with
    /// a server's view, [`Database::offer_views`], which has not matched
    /// yet): loaded from the log the first time anything needs it.
    Lazy { loaded: OnceLock<Document> },
    /// Loaded, with remote changes shown but not yet applied to automerge.
    Patched(Box<Patched>),
}

/// A document whose latest remote changes were read off their operations
/// ([`crate::patch`]): each was made on top of exactly what this replica
/// held, so its JSON is known without automerge's walk of the objects it
/// touches. The changes wait in the log, named by `behind`, until something
/// needs the automerge document (a write, a change that cannot be patched,
/// a compaction), when they are parsed again and applied in one batch; or
/// until [`Database::behind_limits`] are reached or the replica is idle
/// ([`Database::catch_up`]), when the oldest [`LIMIT_CATCH_UP_STEP`] are.
#[derive(Debug, Clone)]
struct Patched {
    /// The automerge document, without `behind`.
    doc: Document,
    /// The log entries shown but not applied, in order. In chunks: replicas
    /// fed one stream patch in step, and a `Vec` doubling in all of them at
    /// once stalled a fan-out.
    behind: Chunked<Dot>,
    /// Their change bytes ([`MAX_BEHIND_BYTES`]).
    behind_bytes: usize,
    /// The heads with `behind` applied (the last patched change's hash).
    heads: Vec<automerge::ChangeHash>,
    /// The root map with `behind` applied, reserved keys included.
    root: serde_json::Map<String, Json>,
    /// The ops holding each root key `behind` touched, with `behind`
    /// applied; other keys are held as in `doc`. A patched change must
    /// overwrite exactly these ([`crate::patch`]).
    root_ops: BTreeMap<String, Vec<OpKey>>,
    /// `doc` with `behind` applied, once a read needed the automerge document.
    loaded: OnceLock<Document>,
}

impl Patched {
    /// The document's JSON (`None` when deleted): the patched root, or the
    /// automerge document once a read caught one up (automerge has the
    /// last word should it refuse a change the patch showed).
    fn json(&self) -> Option<Json> {
        match self.loaded.get() {
            Some(d) => d.to_json(),
            None => root_to_json(self.root.clone()),
        }
    }

    /// The automerge document with everything applied; what automerge
    /// refuses is added to `errors` (the patched JSON is then dropped with
    /// the slot, and the document's own JSON shown instead).
    fn catch_up(self, at: Source<'_>, name: &DocId, errors: &mut Vec<ApplyError>) -> Document {
        let Patched {
            doc,
            behind,
            loaded,
            ..
        } = self;
        match loaded.into_inner() {
            Some(d) => d,
            None => apply_behind(doc, &behind, at, name, errors),
        }
    }

    /// Hand the oldest waiting changes to automerge, `step` at a time,
    /// until the document is back under `limit` changes and `byte_limit`
    /// bytes; the patched JSON stays what it shows. False as
    /// [`Patched::apply_oldest`]: the caller then catches all of it up.
    fn catch_up_oldest(
        &mut self,
        at: Source<'_>,
        name: &DocId,
        step: usize,
        (limit, byte_limit): (usize, usize),
        errors: &mut Vec<ApplyError>,
    ) -> bool {
        while !self.behind.is_empty()
            && (self.behind.len() >= limit || self.behind_bytes > byte_limit)
        {
            if !self.apply_oldest(at, name, step, errors) {
                return false;
            }
        }
        true
    }

    /// Hand the oldest `n` waiting changes to automerge in one batch. False
    /// if automerge refused one or a change no longer parses (the patched
    /// JSON can then no longer be trusted, and what was refused is in
    /// `errors`) or one left the log: the caller then catches all of it up.
    fn apply_oldest(
        &mut self,
        at: Source<'_>,
        name: &DocId,
        n: usize,
        errors: &mut Vec<ApplyError>,
    ) -> bool {
        if self.behind.is_empty() {
            return true;
        }
        let before = errors.len();
        let n = n.clamp(1, self.behind.len());
        let Some(changes) = changes_of(at.log, self.behind.iter().take(n), errors) else {
            // The full catch-up reports these changes again.
            errors.truncate(before);
            return false;
        };
        let bytes: usize = changes.iter().map(|c| c.raw_bytes().len()).sum();
        apply_or_report(&mut self.doc, name, changes, errors);
        self.behind.take_front(n);
        self.behind_bytes = match self.behind.is_empty() {
            true => 0,
            false => self.behind_bytes.saturating_sub(bytes),
        };
        errors.len() == before
    }
}

/// How many of a document's waiting changes one step hands to automerge
/// ([`LIMIT_CATCH_UP_STEP`]): automerge walks the document's history once
/// per batch, so a step is at least an eighth of it; on a long history
/// smaller steps would cost more than they spare.
fn catch_up_step(log: &Log, doc: &DocId) -> usize {
    let history = usize::try_from(log.doc_entry_count(doc)).unwrap_or(usize::MAX);
    LIMIT_CATCH_UP_STEP.max(history / 8)
}

/// Where a patched document's waiting changes are read from: the log, and
/// what a document reloaded from it needs.
#[derive(Clone, Copy)]
struct Source<'a> {
    log: &'a Log,
    replica: ReplicaId,
    encoding: TextEncoding,
}

/// `doc` with the changes of the log entries at `behind` applied.
fn apply_behind(
    mut doc: Document,
    behind: &Chunked<Dot>,
    at: Source<'_>,
    name: &DocId,
    errors: &mut Vec<ApplyError>,
) -> Document {
    match changes_of(at.log, behind.iter(), errors) {
        Some(changes) => {
            apply_or_report(&mut doc, name, changes, errors);
            doc
        }
        None => {
            // Not expected (compaction catches patched documents up first),
            // but the log holds the whole document either way.
            tracing::error!(%name, "a patched document's change left the log; reloading it");
            let (d, problems) = load_from_log(at.log, name, at.replica, at.encoding);
            errors.extend(problems);
            d
        }
    }
}

/// The changes of the log entries at `dots`, parsed again (they parsed when
/// they arrived; what no longer does is reported). `None` if one of them is
/// no longer in the log.
fn changes_of<'a>(
    log: &Log,
    dots: impl ExactSizeIterator<Item = &'a Dot>,
    errors: &mut Vec<ApplyError>,
) -> Option<Vec<automerge::Change>> {
    let mut changes = Vec::with_capacity(dots.len());
    for dot in dots {
        match log.get(dot)?.parse_change() {
            Ok(c) => changes.push(c),
            Err(e) => errors.push(e.into()),
        }
    }
    Some(changes)
}

impl Slot {
    /// Not loaded into automerge, and nothing has asked for it yet.
    fn is_unloaded(&self) -> bool {
        match self {
            Slot::Loaded(_) | Slot::Patched(_) => false,
            Slot::Cached { loaded, .. } | Slot::Lazy { loaded } => loaded.get().is_none(),
        }
    }
}

/// One database as a replica holds it.
#[derive(Debug, Clone)]
pub struct Database {
    name: DbName,
    replica: ReplicaId,
    encoding: TextEncoding,
    log: Log,
    docs: BTreeMap<DocId, Slot>,
    /// Remote entries that arrived before an earlier counter of their replica.
    pending: BTreeMap<Dot, Entry>,
    /// Views a server offered for documents this replica held nothing of.
    offered: HashMap<DocId, DocView>,
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
            offered: HashMap::new(),
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
        Self::from_stored_with_views(name, replica, encoding, stored, Vec::new())
    }

    /// [`Database::from_stored`], showing documents from cached `views`
    /// where a view's clock equals the document's clock in the log: those
    /// documents are not loaded into automerge until something needs them.
    /// Views that do not match (stale, newer than the log, unknown
    /// documents) are ignored.
    pub fn from_stored_with_views(
        name: DbName,
        replica: ReplicaId,
        encoding: TextEncoding,
        stored: StoredDatabase,
        views: Vec<DocView>,
    ) -> (Self, Vec<ApplyError>) {
        let mut errors = Vec::new();
        let (log, problems) = Log::from_stored(stored);
        for p in problems {
            tracing::warn!(db = %name, "stored log: {p}");
        }
        let mut docs = BTreeMap::new();
        for v in views {
            if log.doc_clock(&v.doc) == Some(&v.clock) {
                let slot = Slot::Cached {
                    json: v.json,
                    loaded: OnceLock::new(),
                };
                docs.insert(v.doc, slot);
            }
        }
        for s in log.snapshots() {
            if docs.contains_key(&s.doc) {
                continue;
            }
            match Document::load(&s.bytes, replica, encoding) {
                Ok(d) => {
                    docs.insert(s.doc.clone(), Slot::Loaded(d));
                }
                Err(source) => errors.push(ApplyError::Doc {
                    doc: s.doc.clone(),
                    source,
                }),
            }
        }
        let mut db = Database {
            name,
            replica,
            encoding,
            log,
            docs,
            pending: BTreeMap::new(),
            offered: HashMap::new(),
        };
        let mut batches = Batches::new();
        for e in db.log.entries() {
            if matches!(db.docs.get(&e.doc), Some(Slot::Cached { .. })) {
                continue;
            }
            match e.parse_change() {
                Ok(c) => batches.entry(e.doc.clone()).or_default().push((e.dot, c)),
                Err(err) => errors.push(err.into()),
            }
        }
        db.materialise(batches, false, &mut errors);
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

    /// A document's JSON value (`None` when absent or deleted). A document
    /// shown from its cached view is loaded for this (re-parsing the text
    /// could round a float differently than it was written); adapters that
    /// parse JSON exactly read [`Database::cached_json`] first.
    pub fn get(&self, doc: &DocId) -> Option<Json> {
        if let Some(Slot::Patched(p)) = self.docs.get(doc) {
            return p.json();
        }
        self.document(doc).and_then(Document::to_json)
    }

    /// The JSON text of a document shown from its cached view and not yet
    /// loaded into automerge (`None` otherwise: use [`Database::get`]).
    /// Lets an adapter hand the text on without parsing it.
    pub fn cached_json(&self, doc: &DocId) -> Option<&str> {
        match self.docs.get(doc)? {
            Slot::Cached { json, loaded } if loaded.get().is_none() => json.as_deref(),
            _ => None,
        }
    }

    /// Whether a document is shown from its cached view, not loaded into automerge.
    pub fn is_cached(&self, doc: &DocId) -> bool {
        matches!(self.docs.get(doc), Some(Slot::Cached { loaded, .. }) if loaded.get().is_none())
    }

    /// How many documents are shown from cached views, not loaded into automerge.
    pub fn cached_documents(&self) -> usize {
        self.docs
            .values()
            .filter(|s| matches!(s, Slot::Cached { loaded, .. } if loaded.get().is_none()))
            .count()
    }

    /// How many remote changes a document shows that automerge has not
    /// applied yet (shown patched); they are in the log either way.
    pub fn changes_behind(&self, doc: &DocId) -> usize {
        match self.docs.get(doc) {
            Some(Slot::Patched(p)) if p.loaded.get().is_none() => p.behind.len(),
            _ => 0,
        }
    }

    /// The value at `path` inside a document.
    pub fn get_path(&self, doc: &DocId, path: &[PathSeg]) -> Option<Json> {
        self.document(doc).and_then(|d| d.get_path(path))
    }

    /// A document, deleted or not (loaded into automerge if it was shown
    /// from a cached view).
    pub fn document(&self, doc: &DocId) -> Option<&Document> {
        match self.docs.get(doc)? {
            Slot::Loaded(d) => Some(d),
            Slot::Patched(p) => Some(p.loaded.get_or_init(|| {
                let mut errors = Vec::new();
                let d = apply_behind(p.doc.clone(), &p.behind, self.source(), doc, &mut errors);
                for e in errors {
                    tracing::warn!(db = %self.name, "catching a document up for a read: {e}");
                }
                d
            })),
            Slot::Cached { loaded, .. } | Slot::Lazy { loaded } => Some(loaded.get_or_init(|| {
                let (d, errors) = load_from_log(&self.log, doc, self.replica, self.encoding);
                for e in errors {
                    tracing::warn!(db = %self.name, "loading a document for a read: {e}");
                }
                d
            })),
        }
    }

    /// Ids of the documents that exist (not deleted), in order.
    pub fn list(&self) -> Vec<DocId> {
        self.docs
            .iter()
            .filter(|(id, s)| match s {
                Slot::Cached { json, loaded } if loaded.get().is_none() => json.is_some(),
                Slot::Patched(p) if p.loaded.get().is_none() => !root_is_deleted(&p.root),
                _ => self
                    .document(id)
                    .is_some_and(|d| !d.is_deleted() && d.to_json().is_some()),
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Ids of every document held, deleted ones included, in order.
    pub fn ids(&self) -> impl Iterator<Item = &DocId> {
        self.docs.keys()
    }

    /// Every document, deleted ones included (loading into automerge those
    /// shown from cached views).
    pub fn documents(&self) -> impl Iterator<Item = (&DocId, &Document)> {
        self.docs
            .keys()
            .filter_map(|id| Some((id, self.document(id)?)))
    }

    /// The cached view of a document as it is now, for a store to keep
    /// beside the log (`None` when the document is unknown).
    pub fn view(&self, doc: &DocId) -> Option<DocView> {
        let clock = self.log.doc_clock(doc)?.clone();
        let json = match self.docs.get(doc)? {
            Slot::Cached { json, .. } => json.clone(),
            Slot::Loaded(d) => d.to_json().map(|v| v.to_string()),
            Slot::Patched(p) => p.json().map(|v| v.to_string()),
            // Waiting for an offered view: loading it now would undo the
            // point of the view (asked again once the view settles).
            Slot::Lazy { .. } if self.awaits_view(doc) => return None,
            Slot::Lazy { .. } => self.document(doc)?.to_json().map(|v| v.to_string()),
        };
        Some(DocView {
            doc: doc.clone(),
            clock,
            json,
        })
    }

    /// Make a document equal `value` with minimal changes (creating it when missing).
    pub fn update(&mut self, doc: &DocId, value: &Json) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.update(value))
    }

    /// [`Database::update`] with only root keys holding collaborative text
    /// (see [`Document::update_with_text`]).
    pub fn update_with_text(
        &mut self,
        doc: &DocId,
        value: &Json,
        text_keys: &[String],
    ) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.update_with_text(value, text_keys))
    }

    /// [`Database::update`] saying which strings are text (see [`Strings`]).
    pub fn update_with(
        &mut self,
        doc: &DocId,
        value: &Json,
        strings: crate::Strings<'_>,
    ) -> Result<Option<Entry>, DocError> {
        self.local(doc, |d| d.update_with(value, strings))
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
        let replica = self.replica;
        let created = !self.docs.contains_key(doc);
        let mut errors = Vec::new();
        let result = f(self.doc_mut(doc, &mut errors).0);
        for e in errors {
            tracing::warn!(db = %self.name, "loading a document for a write: {e}");
        }
        let mut change = match result {
            Ok(Some(c)) => c,
            other => {
                if created {
                    self.docs.remove(doc);
                }
                return other.map(|_| None);
            }
        };
        let entry = Entry {
            dot: Dot {
                replica,
                counter: self.own_counter() + 1,
            },
            doc: doc.clone(),
            // Uncompressed when small: a frame is deflated as a whole, which
            // finds the repeats across changes that per-change compression
            // cannot. A large change stays compressed, so the frame limit
            // (which applies to the inflated body) still admits it.
            change: if change.raw_bytes().len() <= RAW_CHANGE_MAX {
                change.raw_bytes().to_vec()
            } else {
                change.bytes().into_owned()
            },
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
        self.materialise(batches, true, &mut out.errors);
        self.settle_offers();
        // A document still waiting for its view is announced once it is
        // shown from it (or when the offer is withdrawn), not half-arrived.
        if !self.offered.is_empty() {
            out.changed.retain(|d| !self.awaits_view(d));
        }
        out
    }

    /// Views a server sent with its reply ([`crate::protocol::Delta::views`]).
    /// Kept for documents this replica holds nothing of; their entries are
    /// then stored without being applied, and once the log's clock for such
    /// a document equals the view's clock (the same entries as the server's
    /// view was built from), the document is shown from the view and loaded
    /// into automerge only when something needs it, as after a reopen from
    /// cached views. The offers last until [`Database::withdraw_offers`].
    pub fn offer_views(&mut self, views: Vec<DocView>) {
        for v in views {
            if self.log.doc_clock(&v.doc).is_none() && !self.docs.contains_key(&v.doc) {
                self.offered.insert(v.doc.clone(), v);
            }
        }
    }

    /// Forget the offered views not yet matched (the reply is complete or
    /// the connection is gone). Documents whose entries were stored for
    /// them load from the log when needed; nothing is lost. Returns those
    /// documents: their changes were held back from [`Applied::changed`]
    /// while they waited, so the caller announces them now.
    pub fn withdraw_offers(&mut self) -> Vec<DocId> {
        let waiting = std::mem::take(&mut self.offered);
        waiting
            .into_keys()
            .filter(|d| matches!(self.docs.get(d), Some(Slot::Lazy { .. })))
            .collect()
    }

    /// Whether a document's entries are being stored for an offered view
    /// that has not matched yet (reads would load it from the log).
    pub fn awaits_view(&self, doc: &DocId) -> bool {
        self.offered.contains_key(doc) && self.is_unloaded_lazy(doc)
    }

    fn is_unloaded_lazy(&self, doc: &DocId) -> bool {
        matches!(self.docs.get(doc), Some(s @ Slot::Lazy { .. }) if s.is_unloaded())
    }

    /// Show from its view each offered document whose entries have all arrived.
    fn settle_offers(&mut self) {
        if self.offered.is_empty() {
            return;
        }
        let ready: Vec<DocId> = self
            .offered
            .iter()
            .filter(|(doc, v)| {
                self.is_unloaded_lazy(doc) && self.log.doc_clock(doc) == Some(&v.clock)
            })
            .map(|(doc, _)| doc.clone())
            .collect();
        for doc in ready {
            if let Some(v) = self.offered.remove(&doc) {
                let slot = Slot::Cached {
                    json: v.json,
                    loaded: OnceLock::new(),
                };
                self.docs.insert(doc, slot);
            }
        }
    }

    fn apply_one(&mut self, e: Entry, out: &mut Applied, batches: &mut Batches) {
        if self.log.vv().contains(&e.dot) {
            return;
        }
        // A document a server sent a view for is stored, not applied, while
        // nothing has loaded it: its changes are parsed if and when it loads.
        let deferred = self.offered.contains_key(&e.doc)
            && (!self.docs.contains_key(&e.doc) || self.is_unloaded_lazy(&e.doc));
        let change = if deferred {
            None
        } else {
            match e.parse_change() {
                Ok(c) => Some(c),
                Err(err) => {
                    out.errors.push(err.into());
                    return;
                }
            }
        };
        match self.log.append(e.clone()) {
            Ok(Appended::Added) => {
                // (Ids are cloned only for a batch's first change of a document.)
                match change {
                    Some(c) => match batches.get_mut(&e.doc) {
                        Some(b) => b.push((e.dot, c)),
                        None => {
                            batches.insert(e.doc.clone(), vec![(e.dot, c)]);
                        }
                    },
                    None => {
                        self.docs
                            .entry(e.doc.clone())
                            .or_insert_with(|| Slot::Lazy {
                                loaded: OnceLock::new(),
                            });
                    }
                }
                if !out.changed.contains(&e.doc) {
                    out.changed.insert(e.doc.clone());
                }
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
        }
    }

    fn drain_pending(&mut self, out: &mut Applied, batches: &mut Batches) {
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
        // The fold below drops log entries that patched documents point at.
        self.catch_up_all(&mut out.errors);
        let mut clocks = BTreeMap::new();
        for s in snapshots {
            let (doc, _) = self.doc_mut(&s.doc, &mut out.errors);
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
        self.materialise(batches, false, &mut out.errors);
        self.settle_offers();
        out
    }

    /// Fold entries at or below `up_to` (clamped to what we hold) into
    /// snapshots of the current documents. Returns what the store must write.
    pub fn compact(&mut self, up_to: &VersionVector) -> Compaction {
        let mut errors = Vec::new();
        self.catch_up_all(&mut errors);
        for e in errors {
            tracing::warn!(db = %self.name, "catching documents up to compact: {e}");
        }
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
                let d = self.document(&doc)?;
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
            skipped: BTreeMap::new(),
        }
    }

    /// A document to change, created when missing and loaded into automerge
    /// when it was shown from a cached view. The flag says it was loaded
    /// from the log just now (so it holds every change appended so far);
    /// what did not load from the log is added to `errors`.
    fn doc_mut(&mut self, doc: &DocId, errors: &mut Vec<ApplyError>) -> (&mut Document, bool) {
        let (replica, encoding) = (self.replica, self.encoding);
        let slot = self
            .docs
            .entry(doc.clone())
            .or_insert_with(|| Slot::Loaded(Document::new(replica, encoding)));
        let mut from_log = false;
        if let Slot::Patched(_) = slot {
            let placeholder = Slot::Lazy {
                loaded: OnceLock::new(),
            };
            if let Slot::Patched(p) = std::mem::replace(slot, placeholder) {
                let at = Source {
                    log: &self.log,
                    replica,
                    encoding,
                };
                *slot = Slot::Loaded(p.catch_up(at, doc, errors));
            }
        }
        if let Slot::Cached { loaded, .. } | Slot::Lazy { loaded } = slot {
            // A document a read loaded earlier lacks what was appended
            // since; one loaded now holds all of it.
            let d = loaded.take().unwrap_or_else(|| {
                from_log = true;
                let (d, problems) = load_from_log(&self.log, doc, replica, encoding);
                errors.extend(problems);
                d
            });
            *slot = Slot::Loaded(d);
        }
        match slot {
            Slot::Loaded(d) => (d, from_log),
            // Just replaced by `Loaded` above.
            Slot::Cached { .. } | Slot::Lazy { .. } | Slot::Patched(_) => {
                unreachable!("slot was loaded above")
            }
        }
    }

    /// Apply parsed changes, one automerge batch per document. With
    /// `patch`, a small batch on top of what a loaded document holds is
    /// shown patched and applied later ([`Patched`]).
    fn materialise(&mut self, batches: Batches, patch: bool, errors: &mut Vec<ApplyError>) {
        for (doc, mut changes) in batches {
            let patched = matches!(self.docs.get(&doc), Some(Slot::Patched(_)));
            if patch && (changes.len() <= PATCH_BATCH_MAX || patched) {
                changes = self.patch(&doc, changes, errors);
                if changes.is_empty() {
                    continue;
                }
            }
            let (d, from_log) = self.doc_mut(&doc, errors);
            if from_log {
                continue; // loaded from the log, which holds these changes already
            }
            apply_or_report(
                d,
                &doc,
                changes.into_iter().map(|(_, c)| c).collect(),
                errors,
            );
        }
    }

    /// Show the leading changes that can be patched ([`crate::patch`]) on a
    /// loaded document; returns the rest, for automerge.
    fn patch(
        &mut self,
        doc: &DocId,
        changes: Vec<(Dot, automerge::Change)>,
        errors: &mut Vec<ApplyError>,
    ) -> Vec<(Dot, automerge::Change)> {
        let (limit, byte_limit) = self.behind_limits();
        let Some(slot) = self.docs.get_mut(doc) else {
            return changes;
        };
        let mut rest = changes.into_iter().peekable();
        while let Some((_, c)) = rest.peek() {
            let mut deps = c.deps().to_vec();
            deps.sort_unstable();
            let patched = match slot {
                Slot::Loaded(d) => {
                    let mut heads = d.heads();
                    heads.sort_unstable();
                    // A change automerge holds back for a missing dependency
                    // would apply with this one: only patch with none queued.
                    let plan = (heads == deps && !d.has_queued())
                        .then(|| patch::plan(c, &|k| d.root_holders(k)))
                        .flatten();
                    if let Some(plan) = plan {
                        let mut root = d.raw_root();
                        let mut root_ops = BTreeMap::new();
                        plan.apply(&mut root, &mut root_ops);
                        let placeholder = Slot::Lazy {
                            loaded: OnceLock::new(),
                        };
                        if let Slot::Loaded(d) = std::mem::replace(slot, placeholder) {
                            *slot = Slot::Patched(Box::new(Patched {
                                doc: d,
                                behind: Chunked::new(),
                                behind_bytes: 0,
                                heads: Vec::new(),
                                root,
                                root_ops,
                                loaded: OnceLock::new(),
                            }));
                        }
                        true
                    } else {
                        false
                    }
                }
                Slot::Patched(p) => {
                    // A read caught the document up: that copy holds `behind`.
                    if let Some(d) = p.loaded.take() {
                        p.doc = d;
                        p.behind = Chunked::new();
                        p.behind_bytes = 0;
                        p.root_ops.clear();
                    }
                    let plan = (p.heads == deps)
                        .then(|| {
                            let held = |k: &str| match p.root_ops.get(k) {
                                Some(ops) => ops.clone(),
                                None => p.doc.root_holders(k),
                            };
                            patch::plan(c, &held)
                        })
                        .flatten();
                    plan.map(|plan| plan.apply(&mut p.root, &mut p.root_ops))
                        .is_some()
                }
                _ => false,
            };
            if !patched {
                break;
            }
            let Some((dot, c)) = rest.next() else { break };
            let full = match slot {
                Slot::Patched(p) => {
                    p.heads = vec![c.hash()];
                    p.behind_bytes += c.raw_bytes().len();
                    p.behind.push(dot);
                    p.behind.len() >= limit || p.behind_bytes > byte_limit
                }
                _ => false,
            };
            if full {
                let at = Source {
                    log: &self.log,
                    replica: self.replica,
                    encoding: self.encoding,
                };
                let step = catch_up_step(&self.log, doc);
                let stepped = match slot {
                    Slot::Patched(p) if step < limit => {
                        p.catch_up_oldest(at, doc, step, (limit, byte_limit), errors)
                    }
                    _ => false,
                };
                if !stepped {
                    self.doc_mut(doc, errors);
                    return rest.collect();
                }
            }
        }
        rest.collect()
    }

    fn source(&self) -> Source<'_> {
        Source {
            log: &self.log,
            replica: self.replica,
            encoding: self.encoding,
        }
    }

    /// How many changes this replica lets a document fall behind (see
    /// [`MAX_BEHIND`]): fixed per replica, from its id.
    pub fn behind_limit(&self) -> usize {
        self.behind_limits().0
    }

    /// The changes and change bytes this replica lets a document fall
    /// behind: between half of [`MAX_BEHIND`] / [`MAX_BEHIND_BYTES`] and
    /// all of it, fixed per replica from its id.
    pub fn behind_limits(&self) -> (usize, usize) {
        // Sixteen bits, so that the limits also spread evenly modulo a
        // 256-change step: with one byte they fell on 64 phases only, and
        // the replicas of each caught up together.
        // In u64: the product overflows a wasm32 usize.
        let r = u64::from(u16::from_le_bytes([self.replica.0[14], self.replica.0[15]]));
        let spread = |max: usize| {
            let half = max / 2;
            let extra = r * half as u64 / 65_536; // < half
            half + usize::try_from(extra).unwrap_or(0)
        };
        (spread(MAX_BEHIND), spread(MAX_BEHIND_BYTES))
    }

    /// Hand patched documents' waiting changes to automerge, the document
    /// with the most first, until at least `changes` were applied or none
    /// wait; a document with more than a step waiting
    /// ([`LIMIT_CATCH_UP_STEP`]) gives only its oldest step. For idle time:
    /// a replica that stopped receiving can pay now what its next write
    /// would otherwise pay. Returns whether any still wait; what automerge
    /// refuses is returned with the rest ([`Applied::errors`]).
    pub fn catch_up(&mut self, changes: usize) -> (bool, Vec<ApplyError>) {
        let mut errors = Vec::new();
        let mut done = 0;
        while done < changes {
            let Some((n, doc)) = self.most_behind() else {
                return (false, errors);
            };
            done += self.idle_step(&doc, n, &mut errors);
        }
        (self.most_behind().is_some(), errors)
    }

    /// One step of [`Database::catch_up`] for `doc`, with `n` changes
    /// waiting: its oldest [`catch_up_step`] if more wait, else all of them.
    /// Returns how many were applied. Stepping bounds how long a change
    /// arriving meanwhile waits.
    fn idle_step(&mut self, doc: &DocId, n: usize, errors: &mut Vec<ApplyError>) -> usize {
        let step = catch_up_step(&self.log, doc);
        if step < n {
            let at = Source {
                log: &self.log,
                replica: self.replica,
                encoding: self.encoding,
            };
            // A read that caught the document up left nothing to step.
            if let Some(Slot::Patched(p)) = self.docs.get_mut(doc)
                && p.loaded.get().is_none()
                && p.apply_oldest(at, doc, step, errors)
            {
                return step;
            }
        }
        self.doc_mut(doc, errors);
        n
    }

    /// The patched document with the most changes waiting, and how many.
    fn most_behind(&self) -> Option<(usize, DocId)> {
        self.docs
            .iter()
            .filter_map(|(id, s)| match s {
                Slot::Patched(p) if !p.behind.is_empty() => Some((p.behind.len(), id)),
                _ => None,
            })
            .max()
            .map(|(n, id)| (n, id.clone()))
    }

    /// Catch every patched document up: before the log drops entries
    /// (compaction), which their waiting changes point at.
    fn catch_up_all(&mut self, errors: &mut Vec<ApplyError>) {
        let patched: Vec<DocId> = self
            .docs
            .iter()
            .filter(|(_, s)| matches!(s, Slot::Patched(_)))
            .map(|(id, _)| id.clone())
            .collect();
        for doc in patched {
            self.doc_mut(&doc, errors);
        }
    }
}

/// Apply changes to a document in one automerge batch; a batch that fails
/// is retried change by change so one bad change costs only itself.
fn apply_or_report(
    d: &mut Document,
    doc: &DocId,
    changes: Vec<automerge::Change>,
    errors: &mut Vec<ApplyError>,
) {
    if changes.is_empty() || d.apply_batch(changes.clone()).is_ok() {
        return;
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

/// Build one document from what the log holds for it: its snapshot, then its
/// entries. The log's content was validated when it was appended or stored,
/// so a failure here means damaged storage (or a change automerge refused
/// when it arrived, which stays refused); the document keeps whatever did
/// load, and the failures are returned to be reported.
fn load_from_log(
    log: &Log,
    doc: &DocId,
    replica: ReplicaId,
    encoding: TextEncoding,
) -> (Document, Vec<ApplyError>) {
    let mut errors = Vec::new();
    let mut d = match log
        .snapshot(doc)
        .map(|s| Document::load(&s.bytes, replica, encoding))
    {
        Some(Ok(d)) => d,
        Some(Err(source)) => {
            errors.push(ApplyError::Doc {
                doc: doc.clone(),
                source,
            });
            Document::new(replica, encoding)
        }
        None => Document::new(replica, encoding),
    };
    let mut changes = Vec::new();
    for e in log.entries().filter(|e| &e.doc == doc) {
        match e.parse_change() {
            Ok(c) => changes.push(c),
            Err(err) => errors.push(err.into()),
        }
    }
    apply_or_report(&mut d, doc, changes, &mut errors);
    (d, errors)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    fn db(n: u8) -> Database {
        let name = DbName::new("live").expect("valid name");
        Database::new(name, ReplicaId([n; 16]), TextEncoding::UnicodeCodePoint)
    }

    /// A database of four documents (one deleted, one with text) and what
    /// its store holds.
    fn sample() -> (Database, StoredDatabase) {
        let name = DbName::new("views").expect("valid name");
        let mut db = Database::new(name, ReplicaId([1; 16]), TextEncoding::UnicodeCodePoint);
        let mut entries = Vec::new();
        for round in 0..5 {
            for (doc, value) in [
                (
                    "a",
                    json!({"title": "milk", "n": round, "tags": ["x", round]}),
                ),
                ("b", json!({"done": round % 2 == 0})),
                ("gone", json!({"x": round})),
            ] {
                entries.extend(db.update(&id(doc), &value).expect("update"));
            }
        }
        let text = json!({"body": "hello world"});
        entries.extend(
            db.update_with_text(&id("t"), &text, &["body".into()])
                .expect("text"),
        );
        entries.extend(db.delete(&id("gone")).expect("delete"));
        let stored = StoredDatabase {
            entries,
            ..StoredDatabase::default()
        };
        (db, stored)
    }

    fn views_of(db: &Database) -> Vec<DocView> {
        db.documents()
            .filter_map(|(d, _)| db.view(d))
            .collect::<Vec<_>>()
    }

    fn reopen(db: &Database, stored: StoredDatabase, views: Vec<DocView>) -> Database {
        let (copy, errors) = Database::from_stored_with_views(
            db.name().clone(),
            db.replica(),
            TextEncoding::UnicodeCodePoint,
            stored,
            views,
        );
        assert!(errors.is_empty(), "{errors:?}");
        copy
    }

    /// What a reader sees: the cached text where a document is shown from
    /// its view (these tests hold no floats), else the loaded document.
    fn values(db: &Database) -> Vec<(DocId, Option<Json>)> {
        db.ids()
            .map(|d| {
                let v = if db.is_cached(d) {
                    db.cached_json(d)
                        .map(|text| serde_json::from_str(text).expect("view json"))
                } else {
                    db.get(d)
                };
                (d.clone(), v)
            })
            .collect()
    }

    #[test]
    fn a_reopen_from_views_shows_documents_without_loading_them() {
        let (db, stored) = sample();
        let copy = reopen(&db, stored, views_of(&db));
        assert_eq!(copy.cached_documents(), 4);
        assert_eq!(values(&copy), values(&db));
        assert_eq!(copy.list(), db.list());
        assert_eq!(copy.cached_json(&id("gone")), None);
        assert_eq!(copy.cached_json(&id("b")), Some(r#"{"done":true}"#));
        assert_eq!(
            copy.cached_documents(),
            4,
            "listing and cached text load nothing"
        );
        // `get` loads (exact numbers), and equals the view.
        assert_eq!(copy.get(&id("gone")), None);
        assert_eq!(copy.get(&id("b")), Some(json!({"done": true})));
        assert_eq!(copy.cached_documents(), 2);
        // Asking for the automerge document loads it, identical to the original.
        let doc = copy.document(&id("t")).expect("t");
        assert_eq!(
            doc.canonical_save(),
            db.document(&id("t")).expect("t").canonical_save()
        );
        assert_eq!(copy.cached_documents(), 1);
        assert_eq!(copy.cached_json(&id("t")), None);
        assert_eq!(copy.get(&id("t")), db.get(&id("t")));
    }

    #[test]
    fn writes_and_remote_changes_load_a_cached_document_first() {
        let (mut db, stored) = sample();
        let mut copy = reopen(&db, stored.clone(), views_of(&db));
        // A local write on the copy continues the document's history.
        let value = json!({"title": "oat milk", "n": 9, "tags": ["x"]});
        let entry = copy
            .update(&id("a"), &value)
            .expect("update")
            .expect("a change");
        assert_eq!(copy.get(&id("a")), Some(value.clone()));
        assert_eq!(copy.cached_documents(), 3);
        let applied = db.apply_entries([entry.clone()]);
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        assert_eq!(db.get(&id("a")), Some(value));
        // A change from another replica to a cached document.
        let mut other = reopen(&db, stored, Vec::new());
        other.apply_entries([entry]);
        let mut remote = Database::new(
            db.name().clone(),
            ReplicaId([2; 16]),
            TextEncoding::UnicodeCodePoint,
        );
        remote.apply_entries(other.log().entries().cloned().collect::<Vec<_>>());
        let change = remote
            .update(&id("b"), &json!({"done": false, "by": "two"}))
            .expect("update")
            .expect("a change");
        let applied = copy.apply_entries([change.clone()]);
        assert!(applied.errors.is_empty(), "{:?}", applied.errors);
        assert!(applied.changed.contains(&id("b")));
        db.apply_entries([change]);
        assert_eq!(copy.get(&id("b")), db.get(&id("b")));
        assert_eq!(copy.get(&id("b")), remote.get(&id("b")));
        assert_eq!(copy.cached_documents(), 2);
        // Everything converges byte for byte.
        for (d, doc) in db.documents() {
            let mine = copy.document(d).expect("held");
            assert_eq!(mine.canonical_save(), doc.canonical_save(), "{d}");
        }
    }

    #[test]
    fn a_document_loaded_by_a_read_still_takes_later_changes() {
        let (db, stored) = sample();
        let mut copy = reopen(&db, stored.clone(), views_of(&db));
        assert!(copy.document(&id("a")).is_some()); // loads `a` for a read
        let mut remote = reopen(&db, stored, Vec::new());
        let value = json!({"title": "tea"});
        let entry = remote
            .update(&id("a"), &value)
            .expect("update")
            .expect("a change");
        copy.apply_entries([entry]);
        assert_eq!(copy.get(&id("a")), Some(value));
    }

    #[test]
    fn damage_found_when_a_cached_document_loads_is_reported() {
        let (db, mut stored) = sample();
        // A stored entry of `a` whose change bytes are damaged.
        stored.entries.push(Entry {
            dot: Dot {
                replica: db.replica(),
                counter: db.own_counter() + 1,
            },
            doc: id("a"),
            change: vec![0xde, 0xad],
        });
        let (plain, errors) = Database::from_stored(
            db.name().clone(),
            db.replica(),
            TextEncoding::UnicodeCodePoint,
            stored.clone(),
        );
        assert_eq!(errors.len(), 1, "a full open reports it");
        let mut copy = reopen(&plain, stored.clone(), views_of(&plain));
        assert!(copy.is_cached(&id("a")), "shown from its view, not loaded");
        // A remote change to `a` loads it: the damage is reported then.
        let mut remote = Database::new(
            db.name().clone(),
            ReplicaId([2; 16]),
            TextEncoding::UnicodeCodePoint,
        );
        remote.apply_entries(stored.entries.clone());
        let change = remote
            .update(&id("a"), &json!({"title": "tea"}))
            .expect("update")
            .expect("a change");
        let applied = copy.apply_entries([change]);
        assert_eq!(applied.errors.len(), 1, "{:?}", applied.errors);
        assert!(matches!(applied.errors[0], ApplyError::Invalid(_)));
        assert_eq!(copy.get(&id("a")), Some(json!({"title": "tea"})));
    }

    #[test]
    fn stale_and_damaged_views_are_not_trusted() {
        let (mut db, mut stored) = sample();
        let old = views_of(&db);
        // A change after the views were taken makes `a`'s view stale.
        let newer = json!({"title": "bread"});
        stored
            .entries
            .extend(db.update(&id("a"), &newer).expect("update"));
        let mut views = old;
        for v in &mut views {
            if v.doc == id("b") {
                v.json = Some("{not json".into());
            }
        }
        // A view of a document the log does not know is dropped too.
        views.push(DocView {
            doc: id("ghost"),
            clock: VersionVector::new(),
            json: Some("{}".into()),
        });
        let copy = reopen(&db, stored, views);
        assert_eq!(copy.cached_documents(), 3, "a's view is stale");
        assert_eq!(copy.get(&id("a")), Some(newer));
        assert_eq!(copy.get(&id("b")), db.get(&id("b")));
        assert_eq!(copy.get(&id("ghost")), None);
        assert_eq!(values(&copy), values(&db));
        assert_eq!(copy.list(), db.list());
    }

    #[test]
    fn compacting_cached_documents_keeps_their_content() {
        let (db, stored) = sample();
        let mut copy = reopen(&db, stored, views_of(&db));
        let vv = copy.vv().clone();
        let compaction = copy.compact(&vv);
        assert_eq!(compaction.snapshots.len(), 4);
        let folded = StoredDatabase {
            base: compaction.base,
            snapshots: compaction.snapshots,
            entries: Vec::new(),
        };
        let views = views_of(&copy);
        for (v, cached) in [(Vec::new(), 0), (views, 4)] {
            let again = reopen(&db, folded.clone(), v);
            assert_eq!(
                again.cached_documents(),
                cached,
                "views still match after compaction"
            );
            assert_eq!(values(&again), values(&db));
            assert_eq!(again.vv(), db.vv());
        }
    }

    /// Strings as values: a changed string is a root put, which is patched
    /// (with text it is an edit inside an earlier object: automerge's).
    const VALUES: crate::Strings<'static> = crate::Strings::Values { text: &[] };

    fn entries_since(db: &Database, n: usize) -> Vec<Entry> {
        db.log().entries().skip(n).cloned().collect()
    }

    #[test]
    fn sequential_remote_changes_are_shown_before_automerge_applies_them() {
        let (mut a, mut b) = (db(1), db(2));
        let t = id("t");
        a.update_with(&t, &json!({"seq": 0, "tags": ["x"]}), VALUES)
            .expect("write");
        b.apply_entries(entries_since(&a, 0));
        assert_eq!(b.changes_behind(&t), 0, "a new document is applied");
        let limit = b.behind_limit();
        assert!((MAX_BEHIND / 2..MAX_BEHIND).contains(&limit));
        // Past 2,048 entries the step is an eighth of the history.
        let mut behind = 0;
        for i in 1..=2 * limit + 600 {
            let n = a.log().entries().len();
            a.update_with(
                &t,
                &json!({"seq": i, "tags": ["x"], "s": format!("v{i}")}),
                VALUES,
            )
            .expect("write");
            let out = b.apply_entries(entries_since(&a, n));
            assert!(out.errors.is_empty(), "{:?}", out.errors);
            assert!(out.changed.contains(&t));
            assert_eq!(b.get(&t), a.get(&t), "after change {i}");
            assert_eq!(b.view(&t).map(|v| v.json), a.view(&t).map(|v| v.json));
            // At the limit, the oldest `step` go to automerge, each time.
            behind += 1;
            if behind >= limit {
                let history = b.log().doc_entry_count(&t) as usize;
                behind -= LIMIT_CATCH_UP_STEP.max(history / 8).min(behind);
                // automerge's document (the steps applied, then what still
                // waits) is the writer's, in a copy: a read ends the steps.
                let read = b.clone();
                let d = read.document(&t).expect("held");
                assert_eq!(d.to_json(), a.get(&t), "read after change {i}");
            }
            assert_eq!(b.changes_behind(&t), behind, "after change {i}");
        }
        assert_eq!(b.list(), vec![t.clone()]);
        // A read of the automerge document sees every change.
        let read = b.document(&t).expect("held").to_json();
        assert_eq!(read, a.get(&t));
        // A write catches up first and merges back.
        let n = b.log().entries().len();
        b.update_with(&t, &json!({"seq": -1, "tags": ["x"]}), VALUES)
            .expect("write");
        assert_eq!(b.changes_behind(&t), 0);
        a.apply_entries(entries_since(&b, n));
        assert_eq!(a.get(&t), Some(json!({"seq": -1, "tags": ["x"]})));
        assert_eq!(
            a.document(&t).expect("a").canonical_save(),
            b.document(&t).expect("b").canonical_save()
        );
    }

    /// Changes of `size` characters each, `rounds` of them: the waiting
    /// changes never pass the byte limit, nor reach the count limit. Returns
    /// how often they dropped, and whether one drop left some waiting.
    fn within_byte_bound(size: usize, rounds: usize) -> (usize, bool) {
        let (mut a, mut b) = (db(1), db(2));
        let t = id("t");
        a.update_with(&t, &json!({"v": ""}), VALUES).expect("write");
        b.apply_entries(entries_since(&a, 0));
        let byte_limit = b.behind_limits().1;
        assert!((MAX_BEHIND_BYTES / 2..MAX_BEHIND_BYTES).contains(&byte_limit));
        let (mut caught_up, mut partly) = (0, false);
        let mut before = 0;
        for round in 0..rounds {
            let n = a.log().entries().len();
            // Distinct text each time, so the changes do not compress away.
            let v: String = (0..size)
                .map(|i| char::from(b'a' + ((i * 7 + round) % 26) as u8))
                .collect();
            a.update_with(&t, &json!({ "v": v }), VALUES)
                .expect("write");
            b.apply_entries(entries_since(&a, n));
            assert_eq!(b.get(&t), a.get(&t));
            let (behind, bytes) = match b.docs.get(&t) {
                Some(Slot::Patched(p)) => (p.behind.len(), p.behind_bytes),
                _ => (0, 0),
            };
            assert!(bytes <= byte_limit, "{bytes} bytes waiting");
            assert!(
                behind < b.behind_limit(),
                "the count limit is not what bound it"
            );
            if behind < before {
                caught_up += 1;
                partly |= behind > 0;
            }
            before = behind;
        }
        (caught_up, partly)
    }

    #[test]
    fn waiting_changes_stay_within_their_byte_bound() {
        // Large changes: a step of 256 takes all of them.
        let (caught_up, _) = within_byte_bound(6000, 300);
        assert!(caught_up >= 2, "caught up {caught_up} times");
        // Small ones: more than a step waits at the byte limit, so the
        // oldest go and the rest keep waiting.
        let (caught_up, partly) = within_byte_bound(1500, 700);
        assert!(caught_up >= 2, "caught up {caught_up} times");
        assert!(partly, "the oldest step went alone");
    }

    #[test]
    fn a_patched_document_takes_a_burst_of_changes_patched() {
        let (mut a, mut b) = (db(1), db(2));
        let t = id("t");
        a.update(&t, &json!({"seq": 0})).expect("write");
        b.apply_entries(entries_since(&a, 0));
        let n = a.log().entries().len();
        a.update(&t, &json!({"seq": 1})).expect("write");
        b.apply_entries(entries_since(&a, n));
        assert_eq!(b.changes_behind(&t), 1);
        // More than PATCH_BATCH_MAX at once (a subscriber that fell behind
        // for a moment): patched on, not a catch-up of what waits.
        let n = a.log().entries().len();
        for seq in 2..30 {
            a.update(&t, &json!({ "seq": seq })).expect("write");
        }
        let out = b.apply_entries(entries_since(&a, n));
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(b.changes_behind(&t), 29);
        assert_eq!(b.get(&t), Some(json!({"seq": 29})));
        // A loaded document still takes a large batch through automerge.
        let mut c = db(3);
        c.apply_entries(entries_since(&a, 0));
        assert_eq!(c.changes_behind(&t), 0);
        assert_eq!(c.get(&t), Some(json!({"seq": 29})));
    }

    #[test]
    fn idle_catch_up_and_remote_snapshots_apply_what_waits() {
        let (mut a, mut b) = (db(1), db(2));
        let docs: Vec<DocId> = (0..3).map(|i| id(&format!("d{i}"))).collect();
        for d in &docs {
            a.update(d, &json!({"seq": 0})).expect("write");
        }
        b.apply_entries(entries_since(&a, 0));
        for i in 1..=20 {
            for (k, d) in docs.iter().enumerate() {
                if i > 5 * (k + 1) {
                    continue; // d0 gets 5 changes, d1 10, d2 15
                }
                let n = a.log().entries().len();
                a.update(d, &json!({ "seq": i })).expect("write");
                let out = b.apply_entries(entries_since(&a, n));
                assert!(out.errors.is_empty(), "{:?}", out.errors);
            }
        }
        let behind = |b: &Database| docs.iter().map(|d| b.changes_behind(d)).collect::<Vec<_>>();
        assert_eq!(behind(&b), vec![5, 10, 15]);
        // A budget of one change still catches up a whole document, the
        // one with the most waiting first.
        let (more, errors) = b.catch_up(1);
        assert!(more && errors.is_empty(), "{errors:?}");
        assert_eq!(behind(&b), vec![5, 10, 0]);
        let mut c = b.clone();
        let (more, errors) = b.catch_up(usize::MAX);
        assert!(!more && errors.is_empty(), "{errors:?}");
        assert_eq!(behind(&b), vec![0, 0, 0]);
        for d in &docs {
            assert_eq!(b.get(d), a.get(d));
            assert_eq!(
                b.document(d).expect("b").canonical_save(),
                a.document(d).expect("a").canonical_save()
            );
        }
        // A server's compacted reply folds the log under documents still
        // patched: they are caught up first, and keep every change.
        let vv = a.vv().clone();
        let snapshots = a.compact(&vv).snapshots;
        let out = c.apply_snapshots(snapshots, &vv);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        assert_eq!(behind(&c), vec![0, 0, 0]);
        for d in &docs {
            assert_eq!(c.get(d), a.get(d));
            let n = c.log().entries().len();
            c.update(d, &json!({ "seq": -1 })).expect("write");
            a.apply_entries(entries_since(&c, n));
            assert_eq!(a.get(d), Some(json!({ "seq": -1 })));
        }
    }

    #[test]
    fn idle_catch_up_steps_through_a_long_wait() {
        let (mut a, mut b) = (db(1), db(2));
        let t = id("t");
        a.update(&t, &json!({"seq": 0})).expect("write");
        b.apply_entries(entries_since(&a, 0));
        // Under any replica's limit (at least half of MAX_BEHIND).
        let waiting = 600;
        for i in 1..=waiting {
            let n = a.log().entries().len();
            a.update(&t, &json!({ "seq": i })).expect("write");
            let out = b.apply_entries(entries_since(&a, n));
            assert!(out.errors.is_empty(), "{:?}", out.errors);
        }
        assert_eq!(b.changes_behind(&t), waiting);
        // 601 entries: a step is LIMIT_CATCH_UP_STEP (256), so
        // 600 -> 344 -> 88 -> 0.
        let step = LIMIT_CATCH_UP_STEP.max((waiting + 1) / 8);
        let mut expect = waiting;
        let mut calls = 0;
        loop {
            let (more, errors) = b.catch_up(1);
            calls += 1;
            assert!(errors.is_empty(), "{errors:?}");
            expect -= step.min(expect);
            assert_eq!(b.changes_behind(&t), expect);
            assert_eq!(more, expect > 0);
            // What automerge holds plus what still waits is the writer's.
            assert_eq!(b.get(&t), a.get(&t));
            assert_eq!(
                b.clone().document(&t).expect("b").canonical_save(),
                a.document(&t).expect("a").canonical_save()
            );
            if !more {
                break;
            }
        }
        assert_eq!(calls, waiting.div_ceil(step));
        assert_eq!(
            b.document(&t).expect("b").canonical_save(),
            a.document(&t).expect("a").canonical_save()
        );
    }

    #[test]
    fn a_change_automerge_holds_back_is_not_left_out() {
        let (mut a, mut b, mut c) = (db(1), db(2), db(3));
        let t = id("t");
        a.update(&t, &json!({"k": 0})).expect("write");
        for r in [&mut b, &mut c] {
            r.apply_entries(entries_since(&a, 0));
        }
        let na = a.log().entries().len();
        a.update(&t, &json!({"k": 1})).expect("write x");
        let x = entries_since(&a, na);
        b.apply_entries(x.clone());
        let nb = b.log().entries().len();
        b.update(&t, &json!({"k": 1, "m": 2}))
            .expect("write q, on top of x");
        // c gets q first (automerge queues it: x is missing), then x,
        // which is on top of c's heads but releases q.
        c.apply_entries(entries_since(&b, nb));
        assert_eq!(c.get(&t), Some(json!({"k": 0})));
        c.apply_entries(x);
        assert_eq!(c.get(&t), Some(json!({"k": 1, "m": 2})));
        assert_eq!(c.changes_behind(&t), 0);
    }

    #[test]
    fn changes_made_concurrently_go_to_automerge() {
        let (mut a, mut b, mut c) = (db(1), db(2), db(3));
        let t = id("t");
        a.update_with(&t, &json!({"k": "a"}), VALUES)
            .expect("write");
        for r in [&mut b, &mut c] {
            r.apply_entries(entries_since(&a, 0));
        }
        // b and c both write on top of the same state; a receives both.
        let (nb, nc) = (b.log().entries().len(), c.log().entries().len());
        b.update_with(&t, &json!({"k": "b"}), VALUES)
            .expect("write");
        c.update_with(&t, &json!({"k": "c"}), VALUES)
            .expect("write");
        a.apply_entries(entries_since(&b, nb));
        assert_eq!(a.changes_behind(&t), 1);
        let out = a.apply_entries(entries_since(&c, nc));
        assert!(out.errors.is_empty());
        assert_eq!(
            a.changes_behind(&t),
            0,
            "the concurrent change is applied by automerge"
        );
        b.apply_entries(entries_since(&c, nc));
        assert_eq!(a.get(&t), b.get(&t), "automerge's conflict winner on both");
    }

    #[test]
    fn compacting_a_patched_document_keeps_every_change() {
        let (mut a, mut b) = (db(1), db(2));
        let t = id("t");
        a.update(&t, &json!({"v": 0})).expect("write");
        b.apply_entries(entries_since(&a, 0));
        let n = a.log().entries().len();
        a.update(&t, &json!({"v": 1})).expect("write");
        b.apply_entries(entries_since(&a, n));
        assert_eq!(b.changes_behind(&t), 1);
        let vv = b.vv().clone();
        let compaction = b.compact(&vv);
        let snap = compaction
            .snapshots
            .iter()
            .find(|s| s.doc == t)
            .expect("snapshot");
        let loaded = Document::load(
            &snap.bytes,
            ReplicaId([9; 16]),
            TextEncoding::UnicodeCodePoint,
        )
        .expect("load");
        assert_eq!(loaded.to_json(), Some(json!({"v": 1})));
    }

    #[test]
    fn large_local_changes_stay_compressed_small_ones_do_not() {
        let mut db = Database::new(
            DbName::new("d").unwrap(),
            ReplicaId([1; 16]),
            TextEncoding::UnicodeCodePoint,
        );
        let small = db.update(&id("a"), &json!({"t": "x"})).unwrap().unwrap();
        let parsed = small.parse_change().unwrap();
        assert_eq!(small.change, parsed.raw_bytes(), "small: raw bytes");
        let big = json!({"t": "all work and no play ".repeat(5000)});
        let e = db.update(&id("b"), &big).unwrap().unwrap();
        assert!(e.change.len() < RAW_CHANGE_MAX, "{} bytes", e.change.len());
        assert!(e.parse_change().unwrap().raw_bytes().len() > RAW_CHANGE_MAX);
        assert_eq!(db.get(&id("b")), Some(big));
    }
}
