//! One document: an `automerge` document read and written as JSON.
//!
//! Writes are minimal: [`Document::update`] diffs the new JSON value against the
//! current state and records only what differs, so concurrent edits of different
//! fields (or list items, or text ranges) merge instead of overwriting each other.
//! Strings that are collaborative text objects are diffed character-wise;
//! counters are incremented by the difference.
//!
//! Deleting a document is a change too: it clears the root and sets the
//! reserved root key [`DELETED_KEY`], so the deletion syncs like any edit.
//! A delete that is concurrent with an edit wins (the document stays deleted);
//! a later `update` revives it.

use automerge::transaction::{Transactable, Transaction};
use automerge::{
    Automerge, Change, ObjId, ObjType, Prop, ReadDoc, ScalarValue, TextEncoding, Value,
};
use serde_json::Value as Json;

use crate::ids::ReplicaId;

/// Reserved root key that marks a deleted document.
pub const DELETED_KEY: &str = "$deleted";

/// One step of a path into a document.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathSeg {
    /// A map key.
    Key(String),
    /// A list index.
    Index(usize),
}

impl From<&str> for PathSeg {
    fn from(s: &str) -> Self {
        PathSeg::Key(s.to_owned())
    }
}

impl From<usize> for PathSeg {
    fn from(i: usize) -> Self {
        PathSeg::Index(i)
    }
}

impl PathSeg {
    fn prop(&self) -> Prop {
        match self {
            PathSeg::Key(k) => Prop::Map(k.clone()),
            PathSeg::Index(i) => Prop::Seq(*i),
        }
    }
}

/// Why a document operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DocError {
    /// A document's root is a map: the value must be a JSON object.
    #[error("a document must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// User data may not use the reserved root key.
    #[error("the root key {DELETED_KEY:?} is reserved")]
    ReservedKey,
    /// The path does not lead where the operation needs.
    #[error("path {path} {problem}")]
    BadPath {
        /// The path, rendered.
        path: String,
        /// What is wrong there.
        problem: &'static str,
    },
    /// Text splice outside the text.
    #[error("splice at {pos} deleting {del} is outside text of length {len}")]
    OutOfRange {
        /// Requested position.
        pos: usize,
        /// Requested deletion.
        del: usize,
        /// Current length.
        len: usize,
    },
    /// One edit would make more ops than a server accepts in one change
    /// ([`crate::change_limits::DEFAULT_CHANGE_LIMITS`]): split it.
    #[error("one edit of {ops} ops is over the limit of {limit} per change; split it")]
    TooManyOps {
        /// Ops the edit made.
        ops: usize,
        /// The limit.
        limit: u64,
    },
    /// automerge panicked on this input (automerge 0.12 unwraps on some
    /// hostile but parseable changes). Caught where unwinding is possible
    /// (native builds); the document must be discarded.
    #[error("automerge failed on this input: {0}")]
    Panicked(String),
    /// automerge refused (corrupt save bytes, duplicate change, …).
    #[error("automerge: {0}")]
    Automerge(Box<automerge::AutomergeError>),
}

impl From<automerge::AutomergeError> for DocError {
    fn from(e: automerge::AutomergeError) -> Self {
        DocError::Automerge(Box::new(e))
    }
}

/// Run an automerge call that may panic on hostile input, as an error.
fn guarded<T>(f: impl FnOnce() -> Result<T, automerge::AutomergeError>) -> Result<T, DocError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(result) => Ok(result?),
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            Err(DocError::Panicked(what))
        }
    }
}

/// JSON type name for error messages.
fn json_kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn render_path(path: &[PathSeg]) -> String {
    let mut s = String::from("$");
    for p in path {
        match p {
            PathSeg::Key(k) => {
                s.push('.');
                s.push_str(k);
            }
            PathSeg::Index(i) => s.push_str(&format!("[{i}]")),
        }
    }
    s
}

/// An automerge document with JSON reads and minimal JSON writes.
#[derive(Debug, Clone)]
pub struct Document {
    am: Automerge,
}

impl Document {
    /// An empty document whose local changes are made by `replica`.
    pub fn new(replica: ReplicaId, encoding: TextEncoding) -> Self {
        Document {
            am: Automerge::new_with_encoding(encoding).with_actor(replica.actor()),
        }
    }

    /// Load `automerge` save bytes (a snapshot).
    pub fn load(
        bytes: &[u8],
        replica: ReplicaId,
        encoding: TextEncoding,
    ) -> Result<Self, DocError> {
        let opts = automerge::LoadOptions::new().text_encoding(encoding);
        let am = guarded(|| Automerge::load_with_options(bytes, opts))?.with_actor(replica.actor());
        Ok(Document { am })
    }

    /// Merge a snapshot's content (idempotent).
    pub fn merge_snapshot(&mut self, bytes: &[u8]) -> Result<(), DocError> {
        guarded(|| self.am.load_incremental(bytes))?;
        Ok(())
    }

    /// Apply one change (idempotent; changes with missing dependencies wait in
    /// automerge's queue until they arrive).
    pub fn apply(&mut self, change: Change) -> Result<(), DocError> {
        guarded(|| self.am.apply_changes([change]))?;
        Ok(())
    }

    /// Apply several changes in one automerge call (all-or-error).
    pub fn apply_batch(&mut self, changes: Vec<Change>) -> Result<(), DocError> {
        guarded(|| self.am.apply_changes(changes))?;
        Ok(())
    }

    /// `automerge` save bytes.
    pub fn save(&self) -> Vec<u8> {
        self.am.save()
    }

    /// `save()` bytes of the same changes applied in a canonical order.
    ///
    /// automerge's own `save` output depends on the order changes arrived in;
    /// this one depends only on the set of changes, so two replicas holding
    /// the same changes produce identical bytes (used to check convergence).
    pub fn canonical_save(&self) -> Vec<u8> {
        let mut changes = self.am.get_changes(&[]);
        // get_changes is topologically sorted; re-sort by (depth, hash) so
        // concurrent changes come in an order every replica agrees on.
        let mut depth: std::collections::HashMap<automerge::ChangeHash, usize> =
            std::collections::HashMap::new();
        for c in &changes {
            let d = c
                .deps()
                .iter()
                .map(|h| depth.get(h).copied().unwrap_or(0) + 1)
                .max()
                .unwrap_or(0);
            depth.insert(c.hash(), d);
        }
        changes.sort_by_key(|c| (depth.get(&c.hash()).copied().unwrap_or(0), c.hash()));
        let mut fresh = Automerge::new_with_encoding(self.am.text_encoding());
        // The changes come from a document that already applied them.
        if fresh.apply_changes(changes).is_err() {
            return self.am.save();
        }
        fresh.save()
    }

    /// The underlying automerge document.
    pub fn automerge(&self) -> &Automerge {
        &self.am
    }

    /// Whether the document is deleted (tombstoned).
    pub fn is_deleted(&self) -> bool {
        matches!(
            self.am.get(automerge::ROOT, DELETED_KEY),
            Ok(Some((Value::Scalar(s), _))) if matches!(s.as_ref(), ScalarValue::Boolean(true))
        )
    }

    /// The document as JSON, or `None` when it is deleted.
    pub fn to_json(&self) -> Option<Json> {
        root_to_json(self.raw_root())
    }

    /// The root map as stored, reserved keys ([`DELETED_KEY`]) included.
    pub(crate) fn raw_root(&self) -> serde_json::Map<String, Json> {
        match read_obj(&self.am, &automerge::ROOT, ObjType::Map) {
            Json::Object(map) => map,
            _ => serde_json::Map::new(), // the root is always a map
        }
    }

    /// The ops holding root key `key` now, sorted (more than one when
    /// concurrent writes conflict).
    pub(crate) fn root_holders(&self, key: &str) -> Vec<crate::patch::OpKey> {
        let all = self.am.get_all(automerge::ROOT, key).unwrap_or_default();
        crate::patch::op_keys(all.into_iter().map(|(_, id)| id))
    }

    /// Whether automerge holds changes back for a missing dependency.
    pub(crate) fn has_queued(&self) -> bool {
        !self.am.get_missing_deps(&[]).is_empty()
    }

    /// The hashes of the changes nothing else here depends on, sorted.
    pub(crate) fn heads(&self) -> Vec<automerge::ChangeHash> {
        self.am.get_heads()
    }

    /// The value at `path` as JSON (`None` when absent or deleted).
    pub fn get_path(&self, path: &[PathSeg]) -> Option<Json> {
        if self.is_deleted() {
            return None;
        }
        let mut obj = automerge::ROOT;
        let mut typ = ObjType::Map;
        for (i, seg) in path.iter().enumerate() {
            let (val, id) = self.am.get(&obj, seg.prop()).ok()??;
            match val {
                Value::Object(t) => {
                    obj = id;
                    typ = t;
                }
                Value::Scalar(s) if i + 1 == path.len() => return Some(scalar_to_json(&s)),
                Value::Scalar(_) => return None,
            }
        }
        Some(read_obj(&self.am, &obj, typ))
    }

    /// Replace the document's content by `value` (a JSON object), recording
    /// only what differs; strings are collaborative text ([`Strings::TEXT`]).
    /// Returns the change, or `None` when nothing changed.
    pub fn update(&mut self, value: &Json) -> Result<Option<Change>, DocError> {
        self.update_with(value, Strings::TEXT)
    }

    /// [`Document::update`] where only the root keys in `text_keys` hold
    /// collaborative text and other strings are values replaced whole
    /// ([`Strings::Values`]).
    pub fn update_with_text(
        &mut self,
        value: &Json,
        text_keys: &[String],
    ) -> Result<Option<Change>, DocError> {
        self.update_with(value, Strings::Values { text: text_keys })
    }

    /// [`Document::update`], with `strings` saying which new strings are
    /// created as text. A string that already is text is diffed either way.
    pub fn update_with(
        &mut self,
        value: &Json,
        strings: Strings<'_>,
    ) -> Result<Option<Change>, DocError> {
        let Json::Object(map) = value else {
            return Err(DocError::NotAnObject(json_kind(value)));
        };
        if map.contains_key(DELETED_KEY) {
            return Err(DocError::ReservedKey);
        }
        self.edit(|tx| {
            if tx.get(automerge::ROOT, DELETED_KEY)?.is_some() {
                tx.delete(automerge::ROOT, DELETED_KEY)?;
            }
            let at = match strings {
                Strings::Text { .. } => At::Text(strings),
                Strings::Values { .. } => At::Values,
            };
            update_map(tx, &automerge::ROOT, map, true, at)?;
            if let Strings::Values { text } = strings {
                for k in text {
                    if let Some(Json::String(text)) = map.get(k) {
                        ensure_text_value(tx, k, text)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// Delete the document (a tombstone change). `None` when already deleted.
    pub fn delete(&mut self) -> Result<Option<Change>, DocError> {
        if self.is_deleted() {
            return Ok(None);
        }
        self.edit(|tx| {
            let keys: Vec<String> = tx.keys(automerge::ROOT).collect();
            for k in keys {
                tx.delete(automerge::ROOT, k.as_str())?;
            }
            tx.put(automerge::ROOT, DELETED_KEY, true)?;
            Ok(())
        })
    }

    /// Splice collaborative text at `path`: delete `del` units at `pos`, insert
    /// `insert`. A missing value or a plain string there becomes a text object.
    pub fn splice_text(
        &mut self,
        path: &[PathSeg],
        pos: usize,
        del: usize,
        insert: &str,
    ) -> Result<Option<Change>, DocError> {
        self.edit(|tx| {
            let text = ensure_text(tx, path)?;
            let len = tx.length(&text);
            if pos > len || del > len - pos {
                return Err(DocError::OutOfRange { pos, del, len });
            }
            tx.splice_text(&text, pos, del as isize, insert)?;
            Ok(())
        })
    }

    /// Add `by` to the counter at `path` (created at 0 when missing).
    pub fn increment(&mut self, path: &[PathSeg], by: i64) -> Result<Option<Change>, DocError> {
        self.edit(|tx| {
            let (parent, last) = walk_parent(tx, path)?;
            match tx.get(&parent, last.prop())? {
                Some((Value::Scalar(s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_)) => {
                    tx.increment(&parent, last.prop(), by)?;
                }
                _ => put_scalar(tx, &parent, last.prop(), ScalarValue::counter(by), false)?,
            }
            Ok(())
        })
    }

    /// Run `f` in a transaction; commit when it succeeded, roll back otherwise.
    fn edit(
        &mut self,
        f: impl FnOnce(&mut Transaction<'_>) -> Result<(), DocError>,
    ) -> Result<Option<Change>, DocError> {
        let mut tx = self.am.transaction();
        f(&mut tx)?; // dropping `tx` on error rolls it back
        let limit = crate::change_limits::DEFAULT_CHANGE_LIMITS.max_ops;
        if tx.pending_ops() as u64 > limit {
            let ops = tx.pending_ops();
            tx.rollback();
            return Err(DocError::TooManyOps { ops, limit });
        }
        let (hash, _) = tx.commit();
        Ok(hash.and_then(|h| self.am.get_change_by_hash(&h)))
    }
}

/// A document's JSON from its raw root map: `None` when it is deleted
/// (see [`Document::is_deleted`]), else the map without reserved keys.
pub(crate) fn root_to_json(mut root: serde_json::Map<String, Json>) -> Option<Json> {
    if root_is_deleted(&root) {
        return None;
    }
    root.remove(DELETED_KEY);
    Some(Json::Object(root))
}

/// Whether a raw root map marks its document deleted.
pub(crate) fn root_is_deleted(root: &serde_json::Map<String, Json>) -> bool {
    root.get(DELETED_KEY) == Some(&Json::Bool(true))
}

pub(crate) fn scalar_to_json(s: &ScalarValue) -> Json {
    match s {
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::from(*i),
        ScalarValue::Uint(u) => Json::from(*u),
        ScalarValue::F64(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(c) => Json::from(i64::from(c)),
        ScalarValue::Timestamp(t) => Json::from(*t),
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Bytes(b) => Json::Array(b.iter().map(|&x| Json::from(x)).collect()),
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
    }
}

fn read_value<R: ReadDoc>(doc: &R, val: Value<'_>, id: &ObjId) -> Json {
    match val {
        Value::Scalar(s) => scalar_to_json(&s),
        Value::Object(t) => read_obj(doc, id, t),
    }
}

fn read_obj<R: ReadDoc>(doc: &R, obj: &ObjId, typ: ObjType) -> Json {
    match typ {
        ObjType::Map | ObjType::Table => {
            let mut out = serde_json::Map::new();
            for item in doc.map_range(obj, ..) {
                out.insert(item.key.to_string(), {
                    let id = item.id();
                    read_value(doc, item.value.into(), &id)
                });
            }
            Json::Object(out)
        }
        ObjType::List => Json::Array(
            doc.list_range(obj, ..)
                .map(|item| {
                    let id = item.id();
                    read_value(doc, item.value.into(), &id)
                })
                .collect(),
        ),
        ObjType::Text => Json::String(doc.text(obj).unwrap_or_default()),
    }
}

fn json_to_scalar(v: &Json) -> Option<ScalarValue> {
    Some(match v {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(0.0))
            }
        }
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Which strings a write creates as collaborative text (an automerge text
/// object: concurrent edits merge character by character) rather than as a
/// value replaced whole (concurrent edits: one wins, the others are lost).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strings<'a> {
    /// Every string is text, except anywhere under the keys in `atomic`
    /// (at any depth: ids, enums, timestamps, blobs).
    Text {
        /// Keys whose strings are values.
        atomic: &'a [String],
    },
    /// Strings are values, except at the root keys in `text`.
    Values {
        /// Root keys whose strings are text.
        text: &'a [String],
    },
}

impl Strings<'_> {
    /// Every string is text.
    pub const TEXT: Strings<'static> = Strings::Text { atomic: &[] };
}

/// Where in a write we are: creating strings as text, as values (the
/// [`Strings::Values`] mode: a string already text is still diffed), or
/// under a key named `atomic` (a string there is a value, even one that
/// was text).
#[derive(Debug, Clone, Copy)]
enum At<'a> {
    Text(Strings<'a>),
    Values,
    AtomicKey,
}

impl<'a> At<'a> {
    /// The mode under map key `k`.
    fn enter(self, k: &str) -> At<'a> {
        match self {
            At::Text(Strings::Text { atomic }) if atomic.iter().any(|a| a == k) => At::AtomicKey,
            at => at,
        }
    }
}

/// Strings longer than this (bytes) are values even where strings are
/// text: an operation per character would pass a change's operation limit
/// (`DEFAULT_CHANGE_LIMITS.max_ops`) and cost a megabyte of ops.
const MAX_TEXT_BYTES: usize = 256 << 10;

/// Texts longer than this together (bytes) are replaced whole when they
/// change instead of diffed: automerge's diff costs (length × distance),
/// seconds for two unrelated texts of a few hundred kilobytes.
const MAX_DIFF_BYTES: usize = 16 << 10;

/// Put a scalar unless the current value already equals it.
fn put_scalar(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    value: ScalarValue,
    insert: bool,
) -> Result<(), DocError> {
    if insert {
        let Prop::Seq(i) = prop else {
            return Err(not_a_position());
        };
        tx.insert(obj, i, value)?;
    } else {
        tx.put(obj, prop, value)?;
    }
    Ok(())
}

// Map props are never inserted; keep the error path typed instead of panicking.
fn not_a_position() -> DocError {
    DocError::BadPath {
        path: String::new(),
        problem: "is not a list position",
    }
}

/// Create a fresh object holding `value` at `prop` (put, or insert into a list).
fn create(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    value: &Json,
    insert: bool,
    at: At<'_>,
) -> Result<(), DocError> {
    let typ = match value {
        Json::Object(_) => ObjType::Map,
        Json::Array(_) => ObjType::List,
        Json::String(text) if matches!(at, At::Text(_)) && text.len() <= MAX_TEXT_BYTES => {
            let id = if insert {
                let Prop::Seq(i) = prop else {
                    return Err(not_a_position());
                };
                tx.insert_object(obj, i, ObjType::Text)?
            } else {
                tx.put_object(obj, prop, ObjType::Text)?
            };
            tx.splice_text(&id, 0, 0, text)?;
            return Ok(());
        }
        scalar => {
            let s = json_to_scalar(scalar).unwrap_or(ScalarValue::Null);
            return put_scalar(tx, obj, prop, s, insert);
        }
    };
    let child = if insert {
        let Prop::Seq(i) = prop else {
            return Err(not_a_position());
        };
        tx.insert_object(obj, i, typ)?
    } else {
        tx.put_object(obj, prop, typ)?
    };
    match value {
        Json::Object(m) => update_map(tx, &child, m, false, at),
        Json::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                create(tx, &child, Prop::Seq(i), item, true, at)?;
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Make the value at `prop` equal `new`, touching as little as possible.
fn update_value(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    prop: Prop,
    new: &Json,
    at: At<'_>,
) -> Result<(), DocError> {
    let current = tx.get(obj, prop.clone())?;
    match (current, new) {
        (Some((Value::Object(ObjType::Map | ObjType::Table), id)), Json::Object(m)) => {
            update_map(tx, &id, m, false, at)
        }
        (Some((Value::Object(ObjType::List), id)), Json::Array(items)) => {
            update_list(tx, &id, items, at)
        }
        (Some((Value::Object(ObjType::Text), _)), Json::String(_))
            if matches!(at, At::AtomicKey) =>
        {
            create(tx, obj, prop, new, false, at)
        }
        (Some((Value::Object(ObjType::Text), id)), Json::String(s)) => {
            let old = tx.text(&id)?;
            if old != *s {
                if old.len() + s.len() > MAX_DIFF_BYTES {
                    let len = tx.length(&id);
                    tx.splice_text(&id, 0, len as isize, s)?;
                } else {
                    tx.update_text(&id, s)?;
                }
            }
            Ok(())
        }
        (Some((Value::Scalar(old), _)), new) if !new.is_object() && !new.is_array() => {
            match (old.as_ref(), new) {
                (ScalarValue::Counter(c), Json::Number(n)) if n.is_i64() => {
                    let delta = n.as_i64().unwrap_or(0).wrapping_sub(i64::from(c));
                    if delta != 0 {
                        tx.increment(obj, prop, delta)?;
                    }
                    Ok(())
                }
                (old, new) if scalar_to_json(old) == *new => Ok(()),
                _ => create(tx, obj, prop, new, false, at),
            }
        }
        _ => create(tx, obj, prop, new, false, at),
    }
}

/// Make root key `k` a text object holding `text` (converting a scalar string).
fn ensure_text_value(tx: &mut Transaction<'_>, k: &str, text: &str) -> Result<(), DocError> {
    if let Some((Value::Object(ObjType::Text), _)) = tx.get(automerge::ROOT, k)? {
        return Ok(()); // `update_map` already diffed it
    }
    let id = tx.put_object(automerge::ROOT, k, ObjType::Text)?;
    tx.splice_text(&id, 0, 0, text)?;
    Ok(())
}

fn update_map(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    new: &serde_json::Map<String, Json>,
    is_root: bool,
    at: At<'_>,
) -> Result<(), DocError> {
    let old_keys: Vec<String> = tx.keys(obj).collect();
    for k in old_keys {
        let reserved = is_root && k == DELETED_KEY;
        if !new.contains_key(&k) && !reserved {
            tx.delete(obj, k.as_str())?;
        }
    }
    // serde_json's map is ordered, so the ops of one edit are deterministic.
    for (k, v) in new {
        update_value(tx, obj, Prop::Map(k.clone()), v, at.enter(k))?;
    }
    Ok(())
}

/// Lists: keep the common prefix and suffix, update the middle in place
/// (nested objects keep their identity), then insert or delete the rest.
fn update_list(
    tx: &mut Transaction<'_>,
    obj: &ObjId,
    new: &[Json],
    at: At<'_>,
) -> Result<(), DocError> {
    let old: Vec<Json> = tx
        .list_range(obj, ..)
        .map(|item| {
            let id = item.id();
            read_value(tx, item.value.into(), &id)
        })
        .collect();
    let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
    let max_suffix = old.len().min(new.len()) - prefix;
    let suffix = old
        .iter()
        .rev()
        .zip(new.iter().rev())
        .take(max_suffix)
        .take_while(|(a, b)| a == b)
        .count();
    let old_mid = old.len() - prefix - suffix;
    let new_mid = new.len() - prefix - suffix;
    let common = old_mid.min(new_mid);
    for i in 0..common {
        update_value(tx, obj, Prop::Seq(prefix + i), &new[prefix + i], at)?;
    }
    for _ in common..old_mid {
        tx.delete(obj, prefix + common)?;
    }
    for i in common..new_mid {
        create(tx, obj, Prop::Seq(prefix + i), &new[prefix + i], true, at)?;
    }
    Ok(())
}

/// Walk to the object holding the last path element.
fn walk_parent<'p>(
    tx: &Transaction<'_>,
    path: &'p [PathSeg],
) -> Result<(ObjId, &'p PathSeg), DocError> {
    let Some((last, parents)) = path.split_last() else {
        return Err(DocError::BadPath {
            path: "$".into(),
            problem: "is empty",
        });
    };
    let mut obj = automerge::ROOT;
    for (i, seg) in parents.iter().enumerate() {
        match tx.get(&obj, seg.prop())? {
            Some((Value::Object(ObjType::Map | ObjType::List | ObjType::Table), id)) => obj = id,
            _ => {
                return Err(DocError::BadPath {
                    path: render_path(&path[..=i]),
                    problem: "is not a map or list",
                });
            }
        }
    }
    if matches!(last, PathSeg::Key(k) if k == DELETED_KEY) && parents.is_empty() {
        return Err(DocError::ReservedKey);
    }
    Ok((obj, last))
}

fn ensure_text(tx: &mut Transaction<'_>, path: &[PathSeg]) -> Result<ObjId, DocError> {
    let (parent, last) = walk_parent(tx, path)?;
    let existing = match tx.get(&parent, last.prop())? {
        Some((Value::Object(ObjType::Text), id)) => return Ok(id),
        Some((Value::Scalar(s), _)) => match s.as_ref() {
            ScalarValue::Str(s) => s.to_string(),
            _ => {
                return Err(DocError::BadPath {
                    path: render_path(path),
                    problem: "holds a non-text value",
                });
            }
        },
        Some((Value::Object(_), _)) => {
            return Err(DocError::BadPath {
                path: render_path(path),
                problem: "holds an object, not text",
            });
        }
        None => String::new(),
    };
    let text = match last {
        PathSeg::Key(k) => tx.put_object(&parent, k.as_str(), ObjType::Text)?,
        PathSeg::Index(i) => {
            if *i >= tx.length(&parent) {
                return Err(DocError::BadPath {
                    path: render_path(path),
                    problem: "is past the end of the list",
                });
            }
            tx.put_object(&parent, *i, ObjType::Text)?
        }
    };
    if !existing.is_empty() {
        tx.splice_text(&text, 0, 0, &existing)?;
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(n: u8) -> Document {
        Document::new(ReplicaId([n; 16]), TextEncoding::UnicodeCodePoint)
    }

    fn merge(a: &mut Document, b: &Document) {
        for c in b.am.get_changes(&[]) {
            a.apply(c).unwrap();
        }
    }

    #[test]
    fn put_get_and_no_op_updates() {
        let mut d = doc(1);
        let v = json!({"title": "milk", "done": false, "n": 3, "f": 1.5, "tags": ["a", "b"], "o": {"x": null}});
        assert!(d.update(&v).unwrap().is_some());
        assert_eq!(d.to_json().unwrap(), v);
        assert!(
            d.update(&v).unwrap().is_none(),
            "same value records nothing"
        );
        assert_eq!(d.get_path(&["tags".into(), 1.into()]), Some(json!("b")));
        assert!(d.update(&json!([1])).is_err());
        assert!(matches!(
            d.update(&json!({"$deleted": 1})),
            Err(DocError::ReservedKey)
        ));
    }

    #[test]
    fn minimal_updates_merge_concurrent_fields() {
        let mut a = doc(1);
        a.update(&json!({"title": "milk", "done": false, "items": [1, 2, 3]}))
            .unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        a.update(&json!({"title": "milk", "done": true, "items": [1, 2, 3]}))
            .unwrap();
        b.update(&json!({"title": "oat milk", "done": false, "items": [1, 2, 3, 4]}))
            .unwrap();
        merge(&mut a, &b);
        merge(&mut b, &a);
        let expect = json!({"title": "oat milk", "done": true, "items": [1, 2, 3, 4]});
        assert_eq!(a.to_json().unwrap(), expect);
        assert_eq!(b.to_json().unwrap(), expect);
        assert_eq!(a.canonical_save(), b.canonical_save());
    }

    #[test]
    fn list_middle_edits() {
        let mut a = doc(1);
        a.update(&json!({"l": [1, 2, 3, 4, 5]})).unwrap();
        a.update(&json!({"l": [1, 9, 5]})).unwrap();
        assert_eq!(a.to_json().unwrap(), json!({"l": [1, 9, 5]}));
        a.update(&json!({"l": [0, 1, 9, 5, 6, {"k": [true]}]}))
            .unwrap();
        assert_eq!(
            a.to_json().unwrap(),
            json!({"l": [0, 1, 9, 5, 6, {"k": [true]}]})
        );
        a.update(&json!({"l": []})).unwrap();
        assert_eq!(a.to_json().unwrap(), json!({"l": []}));
    }

    #[test]
    fn strings_are_text_by_default_except_atomic_keys() {
        // Two replicas retitle one todo offline, and both change its status.
        let start = json!({"title": "buy milk", "status": "todo", "tags": ["home"]});
        let mut a = doc(1);
        let atomic = ["status".to_owned()];
        let strings = Strings::Text { atomic: &atomic };
        a.update_with(&start, strings).unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        a.update_with(
            &json!({"title": "buy oat milk", "status": "done", "tags": ["home!"]}),
            strings,
        )
        .unwrap();
        b.update_with(
            &json!({"title": "buy milk today", "status": "doing", "tags": ["shop home"]}),
            strings,
        )
        .unwrap();
        merge(&mut a, &b);
        merge(&mut b, &a);
        let v = a.to_json().unwrap();
        assert_eq!(b.to_json().unwrap(), v);
        // Both edits of the text survive; the atomic one is one whole value.
        assert_eq!(v["title"], "buy oat milk today");
        assert_eq!(v["tags"], json!(["shop home!"]));
        assert!(v["status"] == "done" || v["status"] == "doing", "{v}");
        // The same with strings as values: one title wins, the other is lost.
        let values = Strings::Values { text: &[] };
        let (mut c, mut d) = (doc(3), doc(4));
        c.update_with(&start, values).unwrap();
        merge(&mut d, &c);
        c.update_with(&json!({"title": "buy oat milk"}), values)
            .unwrap();
        d.update_with(&json!({"title": "buy milk today"}), values)
            .unwrap();
        merge(&mut c, &d);
        let title = c.to_json().unwrap()["title"].clone();
        assert!(title == "buy oat milk" || title == "buy milk today");
        // A key named atomic holds a value even where text was written before.
        let mut f = doc(6);
        f.update(&json!({"status": "todo"})).unwrap();
        let root = f.am.get(automerge::ROOT, "status").unwrap();
        assert!(matches!(root, Some((Value::Object(ObjType::Text), _))));
        f.update_with(&json!({"status": "done"}), strings).unwrap();
        let root = f.am.get(automerge::ROOT, "status").unwrap();
        assert!(matches!(root, Some((Value::Scalar(_), _))), "{root:?}");
        assert_eq!(f.to_json().unwrap(), json!({"status": "done"}));
        // Strings too long for an op per character are values; long texts
        // that change are replaced, not diffed.
        let long = "x".repeat(MAX_TEXT_BYTES + 1);
        c.update(&json!({"blob": long})).unwrap();
        let root = c.am.get(automerge::ROOT, "blob").unwrap();
        assert!(matches!(root, Some((Value::Scalar(_), _))));
        let (a1, a2) = ("a".repeat(MAX_DIFF_BYTES), "b".repeat(MAX_DIFF_BYTES));
        c.update(&json!({"big": a1})).unwrap();
        c.update(&json!({"big": a2})).unwrap();
        assert_eq!(c.to_json().unwrap()["big"], json!(a2));
        // `update` is the default: text.
        let mut e = doc(5);
        e.update(&json!({"t": "x", "l": ["y"], "m": {"n": "z"}}))
            .unwrap();
        for path in [
            vec!["t".into()],
            vec!["l".into(), PathSeg::Index(0)],
            vec!["m".into(), "n".into()],
        ] {
            let (obj, last) = walk_parent(&e.am.transaction(), &path)
                .map(|(o, l)| (o, l.clone()))
                .unwrap();
            assert!(
                matches!(
                    e.am.get(&obj, last.prop()).unwrap(),
                    Some((Value::Object(ObjType::Text), _))
                ),
                "{path:?} is text"
            );
        }
    }

    #[test]
    fn text_splices_merge() {
        let mut a = doc(1);
        a.update(&json!({"t": "hello"})).unwrap();
        a.splice_text(&["t".into()], 5, 0, " world").unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        a.splice_text(&["t".into()], 0, 0, ">> ").unwrap();
        b.splice_text(&["t".into()], 11, 0, "!").unwrap();
        merge(&mut a, &b);
        merge(&mut b, &a);
        assert_eq!(a.to_json().unwrap(), json!({"t": ">> hello world!"}));
        assert_eq!(b.to_json(), a.to_json());
        // updating text with a new string diffs it, keeping concurrent edits
        let mut c = doc(3);
        merge(&mut c, &a);
        a.update(&json!({"t": ">> hello there world!"})).unwrap();
        c.splice_text(&["t".into()], 8, 6, "").unwrap();
        merge(&mut a, &c);
        let merged = a.to_json().unwrap()["t"].as_str().unwrap().to_owned();
        assert!(
            merged.contains("there") && !merged.contains("world"),
            "{merged}"
        );
        assert!(matches!(
            a.splice_text(&["t".into()], 100, 0, "x"),
            Err(DocError::OutOfRange { .. })
        ));
        assert!(
            a.splice_text(&["nope".into(), "x".into()], 0, 0, "x")
                .is_err()
        );
    }

    #[test]
    fn text_keys_merge_concurrent_whole_value_updates() {
        let keys = ["title".to_owned()];
        let mut a = doc(1);
        a.update_with_text(&json!({"title": "buy milk", "done": false}), &keys)
            .unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        // Both replace the whole value, as a form or a Redux reducer does.
        a.update_with_text(&json!({"title": "buy oat milk", "done": false}), &keys)
            .unwrap();
        b.update_with_text(&json!({"title": "buy milk today", "done": true}), &keys)
            .unwrap();
        merge(&mut a, &b);
        merge(&mut b, &a);
        let want = json!({"title": "buy oat milk today", "done": true});
        assert_eq!(a.to_json(), Some(want.clone()));
        assert_eq!(b.to_json(), Some(want));
        // A scalar string written earlier becomes text on the first such update.
        let mut c = doc(3);
        c.update(&json!({"title": "x"})).unwrap();
        c.update_with_text(&json!({"title": "xy"}), &keys).unwrap();
        assert!(matches!(
            c.am.get(automerge::ROOT, "title").unwrap(),
            Some((Value::Object(ObjType::Text), _))
        ));
        assert_eq!(c.to_json(), Some(json!({"title": "xy"})));
    }

    #[test]
    fn an_edit_over_the_server_s_op_limit_is_refused_and_rolled_back() {
        let mut d = doc(1);
        d.update(&json!({"x": 1})).unwrap();
        let limit = crate::change_limits::DEFAULT_CHANGE_LIMITS.max_ops as usize;
        // A text object (one op) and a character per op.
        let huge = "a".repeat(limit);
        assert!(matches!(
            d.splice_text(&["t".into()], 0, 0, &huge),
            Err(DocError::TooManyOps { ops, .. }) if ops == limit + 1
        ));
        assert_eq!(d.to_json(), Some(json!({"x": 1})));
        let fits = &huge[1..];
        assert!(d.splice_text(&["t".into()], 0, 0, fits).unwrap().is_some());
    }

    #[test]
    fn a_change_automerge_panics_on_is_an_error_not_a_crash() {
        use crate::change_limits::testing::{run, with_column};
        let mut a = doc(1);
        a.update(&json!({"k": 1})).unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        let honest = a.update(&json!({"k": 2})).unwrap().unwrap();
        // The pred actor column (id 7, type 1) names actor 5 of 1.
        let bad = with_column(honest.raw_bytes(), 7 << 4 | 1, &run(1, 5));
        let bad = Change::try_from(&bad[..]).expect("automerge parses it");
        assert!(matches!(b.apply(bad), Err(DocError::Panicked(_))));
    }

    #[test]
    fn counters_add_up() {
        let mut a = doc(1);
        a.increment(&["n".into()], 2).unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        a.increment(&["n".into()], 3).unwrap();
        b.update(&json!({"n": 12})).unwrap(); // +10 on a counter
        merge(&mut a, &b);
        assert_eq!(a.to_json().unwrap(), json!({"n": 15}));
    }

    #[test]
    fn delete_is_a_change_and_update_revives() {
        let mut a = doc(1);
        a.update(&json!({"x": 1})).unwrap();
        let mut b = doc(2);
        merge(&mut b, &a);
        assert!(a.delete().unwrap().is_some());
        assert!(a.delete().unwrap().is_none());
        assert_eq!(a.to_json(), None);
        merge(&mut b, &a);
        assert_eq!(b.to_json(), None);
        b.update(&json!({"y": 2})).unwrap();
        assert_eq!(b.to_json().unwrap(), json!({"y": 2}));
    }

    #[test]
    fn snapshots_round_trip() {
        let mut a = doc(1);
        a.update(&json!({"x": [1, {"y": "z"}]})).unwrap();
        let b = Document::load(
            &a.save(),
            ReplicaId([2; 16]),
            TextEncoding::UnicodeCodePoint,
        )
        .unwrap();
        assert_eq!(b.to_json(), a.to_json());
        assert!(
            Document::load(
                b"garbage",
                ReplicaId([2; 16]),
                TextEncoding::UnicodeCodePoint
            )
            .is_err()
        );
    }
}
