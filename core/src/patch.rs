//! Reading a change's effect on a document's JSON off its operations,
//! without applying it to automerge.
//!
//! automerge 0.12 applies a remote change by walking every operation of each
//! object it touches, overwritten ones included, so a document that gains a
//! few operations per change costs more to update with every change (a live
//! counter, a cursor, a status field). For a change made on top of exactly
//! what this replica holds (its dependencies are the document's heads), the
//! result is simple: each `put` replaces the key's value, each `delete`
//! removes it, and objects the change creates hold what the change put in
//! them. Concurrency, which is what needs automerge's rules, cannot arise.
//!
//! [`patch_root`] reads such a change when every operation is one it can
//! follow (edits of the root map, and of maps, lists and text the same
//! change creates); anything else (counters, marks, edits inside objects
//! made earlier) is left to automerge. The caller ([`crate::Database`])
//! shows the patched JSON at once and hands the changes to automerge later,
//! in one batch, when something needs the automerge document.

use std::collections::BTreeMap;

use automerge::legacy::{ElementId, Key, ObjectId, Op, OpType};
use automerge::{ActorId, Change, ObjType};
use serde_json::{Map, Value as Json};

use crate::doc::scalar_to_json;

/// Deepest object nesting a change may create and still be patched
/// (deeper ones go to automerge; this keeps assembly's recursion bounded).
const MAX_DEPTH: usize = 64;

/// Most operations a patched change may carry: a sequence edit here costs
/// time linear in the sequence, so a long paste (or a hostile change) goes
/// to automerge rather than costing quadratic time.
const MAX_OPS: usize = 1024;

/// A value inside an object the change creates.
enum Val {
    Scalar(Json),
    /// Another object the change creates: its op counter.
    Obj(u64),
}

/// An object the change creates, and how deep it sits below the root.
struct Node {
    depth: usize,
    kind: Kind,
}

enum Kind {
    Map(BTreeMap<String, Val>),
    /// Elements in document order, by the counter of their insert op.
    List(Vec<(u64, Val)>),
    Text(Vec<(u64, String)>),
}

/// What the change does to one root key.
enum RootEdit {
    Set(Json),
    Obj(u64),
    Remove,
}

/// What a change does to a document's root map, read off its operations.
pub(crate) struct Plan {
    root: BTreeMap<String, RootEdit>,
    nodes: BTreeMap<u64, Node>,
}

/// The change's effect, if every operation is one this module follows. The
/// caller applies it ([`Plan::apply`]) only to the root read at exactly the
/// change's dependencies, with nothing queued in automerge behind them.
pub(crate) fn plan(change: &Change) -> Option<Plan> {
    // automerge refuses a second actor claiming an author it knows; that
    // takes its state, so a change carrying one goes to automerge.
    if change.len() > MAX_OPS || change.author().is_some() {
        return None;
    }
    let expanded = change.decode();
    read_ops(
        &expanded.operations,
        change.actor_id(),
        change.start_op().get(),
    )
}

impl Plan {
    /// Apply the change to `root` (reserved keys included).
    pub(crate) fn apply(mut self, root: &mut Map<String, Json>) {
        for (key, edit) in std::mem::take(&mut self.root) {
            match edit {
                RootEdit::Set(v) => {
                    root.insert(key, v);
                }
                RootEdit::Obj(id) => {
                    root.insert(key, assemble(id, &mut self.nodes));
                }
                RootEdit::Remove => {
                    root.remove(&key);
                }
            }
        }
    }
}

/// [`plan`] then [`Plan::apply`]: whether the change was applied (`root`
/// is untouched when not).
pub(crate) fn patch_root(root: &mut Map<String, Json>, change: &Change) -> bool {
    plan(change).map(|p| p.apply(root)).is_some()
}

/// The change's effect, or `None` when an operation is not one we follow.
fn read_ops(ops: &[Op], actor: &ActorId, start_op: u64) -> Option<Plan> {
    let mut root = BTreeMap::new();
    let mut nodes: BTreeMap<u64, Node> = BTreeMap::new();
    for (i, op) in ops.iter().enumerate() {
        let id = start_op.checked_add(i as u64)?;
        // The value this op stores, if it stores one (creating an object
        // registers the object first).
        let target_depth = match &op.obj {
            ObjectId::Root => 0,
            ObjectId::Id(o) if o.actor() == actor => nodes.get(&o.counter())?.depth,
            ObjectId::Id(_) => return None,
        };
        let value = match &op.action {
            OpType::Put(s) => Some(Val::Scalar(scalar_to_json(s))),
            OpType::Make(t) => {
                if target_depth + 1 > MAX_DEPTH {
                    return None;
                }
                let kind = match t {
                    ObjType::Map | ObjType::Table => Kind::Map(BTreeMap::new()),
                    ObjType::List => Kind::List(Vec::new()),
                    ObjType::Text => Kind::Text(Vec::new()),
                };
                let depth = target_depth + 1;
                nodes.insert(id, Node { depth, kind });
                Some(Val::Obj(id))
            }
            OpType::Delete => None,
            OpType::Increment(_) | OpType::MarkBegin(_) | OpType::MarkEnd(_) => return None,
        };
        match (&op.obj, &op.key, op.insert) {
            (ObjectId::Root, Key::Map(k), false) => {
                let edit = match value {
                    Some(Val::Scalar(v)) => RootEdit::Set(v),
                    Some(Val::Obj(o)) => RootEdit::Obj(o),
                    None => RootEdit::Remove,
                };
                root.insert(k.to_string(), edit);
            }
            (ObjectId::Id(o), key, insert) => {
                let node = nodes.get_mut(&o.counter())?;
                edit_node(&mut node.kind, key, insert, id, value, actor)?;
            }
            _ => return None,
        }
    }
    Some(Plan { root, nodes })
}

/// One operation on an object the change created.
fn edit_node(
    kind: &mut Kind,
    key: &Key,
    insert: bool,
    id: u64,
    value: Option<Val>,
    actor: &ActorId,
) -> Option<()> {
    match (kind, key) {
        (Kind::Map(m), Key::Map(k)) if !insert => {
            match value {
                Some(v) => m.insert(k.to_string(), v),
                None => m.remove(k.as_str()),
            };
        }
        (Kind::List(items), Key::Seq(elem)) => {
            seq_edit(items, elem, insert, id, value, actor)?;
        }
        (Kind::Text(chars), Key::Seq(elem)) => {
            let value = match value {
                Some(Val::Scalar(Json::String(s))) => Some(s),
                None => None,
                Some(_) => return None,
            };
            seq_edit(chars, elem, insert, id, value, actor)?;
        }
        _ => return None,
    }
    Some(())
}

/// Insert after `elem`, or overwrite/delete `elem`, in a sequence whose
/// every element this change inserted. A new element goes right after its
/// reference: every element already there has a lower op id (same actor,
/// earlier op), so automerge's ordering puts the new one first.
fn seq_edit<T>(
    items: &mut Vec<(u64, T)>,
    elem: &ElementId,
    insert: bool,
    id: u64,
    value: Option<T>,
    actor: &ActorId,
) -> Option<()> {
    let at = match elem {
        ElementId::Head => None,
        ElementId::Id(e) if e.actor() == actor => {
            Some(items.iter().position(|(i, _)| *i == e.counter())?)
        }
        ElementId::Id(_) => return None,
    };
    match (insert, at, value) {
        (true, at, Some(v)) => items.insert(at.map_or(0, |p| p + 1), (id, v)),
        (false, Some(p), Some(v)) => items[p].1 = v,
        (false, Some(p), None) => {
            items.remove(p);
        }
        _ => return None,
    }
    Some(())
}

/// The JSON of an object the change created (each is assembled once: an
/// object belongs to the one key that holds it).
fn assemble(id: u64, nodes: &mut BTreeMap<u64, Node>) -> Json {
    let Some(node) = nodes.remove(&id) else {
        return Json::Null;
    };
    let val = |v: Val, nodes: &mut BTreeMap<u64, Node>| match v {
        Val::Scalar(j) => j,
        Val::Obj(o) => assemble(o, nodes),
    };
    match node.kind {
        Kind::Map(m) => Json::Object(m.into_iter().map(|(k, v)| (k, val(v, nodes))).collect()),
        Kind::List(items) => Json::Array(items.into_iter().map(|(_, v)| val(v, nodes)).collect()),
        Kind::Text(chars) => Json::String(chars.into_iter().map(|(_, s)| s).collect()),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;
    use crate::doc::Document;
    use crate::ids::ReplicaId;
    use automerge::TextEncoding;

    fn doc(n: u8) -> Document {
        Document::new(ReplicaId([n; 16]), TextEncoding::UnicodeCodePoint)
    }

    /// Patch a copy of `from`'s root with `change` and compare with
    /// automerge's result; returns whether the change was patched.
    fn check(from: &Document, change: &Change) -> bool {
        let mut root = from.raw_root();
        let mut truth = from.clone();
        truth.apply(change.clone()).expect("apply");
        let before = root.clone();
        if !patch_root(&mut root, change) {
            assert_eq!(root, before, "a refused change leaves the root alone");
            return false;
        }
        assert_eq!(root, truth.raw_root(), "patched JSON matches automerge");
        true
    }

    #[test]
    fn root_edits_and_new_objects_are_patched() {
        let mut a = doc(1);
        let steps = [
            json!({"title": "milk", "n": 1, "f": 1.5, "ok": true, "none": null}),
            json!({"title": "eggs", "n": 2}),
            json!({"tags": ["a", "b", "c"], "meta": {"x": {"y": [1, {"z": "deep"}]}}}),
            json!({"tags": "none", "meta": 3}),
            json!({}),
        ];
        for v in steps {
            let before = a.clone();
            let c = a.update(&v).expect("update").expect("a change");
            assert!(check(&before, &c), "patched: {v}");
        }
        let before = a.clone();
        let c = a.delete().expect("delete").expect("a change");
        assert!(check(&before, &c), "a delete is patched");
    }

    #[test]
    fn new_text_is_patched() {
        let mut a = doc(1);
        let before = a.clone();
        let c = a
            .update_with_text(&json!({"body": "héllo wörld"}), &["body".to_owned()])
            .expect("update")
            .expect("a change");
        assert!(check(&before, &c));
    }

    #[test]
    fn long_changes_go_to_automerge() {
        let mut a = doc(1);
        let before = a.clone();
        let long = "x".repeat(MAX_OPS + 1);
        let c = a
            .update_with_text(&json!({"body": long}), &["body".to_owned()])
            .expect("update")
            .expect("a change");
        assert!(c.len() > MAX_OPS);
        assert!(!check(&before, &c));
    }

    #[test]
    fn edits_inside_earlier_objects_and_counters_go_to_automerge() {
        let mut a = doc(1);
        a.update(&json!({"tags": ["a"], "m": {"k": 1}}))
            .expect("update");
        let before = a.clone();
        let c = a
            .update(&json!({"tags": ["a", "b"], "m": {"k": 1}}))
            .expect("update")
            .expect("c");
        assert!(!check(&before, &c), "a list made earlier");
        let before = a.clone();
        let c = a
            .update(&json!({"tags": ["a", "b"], "m": {"k": 2}}))
            .expect("update")
            .expect("c");
        assert!(!check(&before, &c), "a map made earlier");
        a.update_with_text(&json!({"t": "ab"}), &["t".to_owned()])
            .expect("text");
        let before = a.clone();
        let c = a
            .splice_text(&["t".into()], 1, 0, "x")
            .expect("splice")
            .expect("c");
        assert!(!check(&before, &c), "text made earlier");
    }

    #[test]
    fn inserts_anywhere_in_new_sequences_are_patched() {
        use automerge::transaction::Transactable;
        use automerge::{AutoCommit, ROOT};
        let mut am = AutoCommit::new();
        am.put(ROOT, "keep", 1).expect("put");
        am.commit();
        let before = Document::load(
            &am.save(),
            ReplicaId([2; 16]),
            TextEncoding::UnicodeCodePoint,
        )
        .expect("load");
        let list = am.put_object(ROOT, "list", ObjType::List).expect("list");
        for (i, v) in [(0, "a"), (0, "b"), (1, "c"), (3, "d"), (0, "e")] {
            am.insert(&list, i, v).expect("insert");
        }
        am.delete(&list, 2).expect("delete");
        am.put(&list, 0, "E").expect("overwrite");
        let inner = am
            .insert_object(&list, 1, ObjType::Map)
            .expect("map in list");
        am.put(&inner, "k", true).expect("put");
        am.insert(&list, 0, 7).expect("insert");
        let text = am.put_object(ROOT, "text", ObjType::Text).expect("text");
        am.splice_text(&text, 0, 0, "world").expect("splice");
        am.splice_text(&text, 0, 0, "hello ").expect("splice");
        am.splice_text(&text, 5, 1, ", ").expect("splice");
        am.delete(ROOT, "keep").expect("delete");
        am.commit();
        let change = am.get_last_local_change().expect("a change").clone();
        assert!(check(&before, &change));
        let now = Document::load(
            &am.save(),
            ReplicaId([2; 16]),
            TextEncoding::UnicodeCodePoint,
        )
        .expect("load");
        assert_eq!(
            now.to_json(),
            Some(json!({"list": [7, "E", {"k": true}, "b", "a", "d"], "text": "hello, world"}))
        );
    }

    fn json_value() -> impl Strategy<Value = Json> {
        let leaf = prop_oneof![
            Just(Json::Null),
            any::<bool>().prop_map(Json::Bool),
            any::<i64>().prop_map(Json::from),
            (-1e6f64..1e6).prop_map(Json::from),
            "[a-zé ]{0,6}".prop_map(Json::String),
        ];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
                prop::collection::btree_map("[a-c]", inner, 0..4)
                    .prop_map(|m| Json::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Whatever a sequence of updates records, a patched root equals
        /// automerge's; and root-level scalar updates are always patched.
        #[test]
        fn patched_json_equals_automerge(
            steps in prop::collection::vec(prop::collection::btree_map("[a-d$]{1,2}", json_value(), 0..5), 1..8),
            delete_at in 0usize..10,
        ) {
            let mut a = doc(7);
            for (i, m) in steps.into_iter().enumerate() {
                let before = a.clone();
                let change = if i == delete_at {
                    a.delete().expect("delete")
                } else {
                    a.update(&Json::Object(m.into_iter().collect())).expect("update")
                };
                if let Some(c) = change {
                    check(&before, &c);
                }
            }
        }

        #[test]
        fn scalar_updates_are_patched(values in prop::collection::vec(any::<i64>(), 1..20)) {
            let mut a = doc(3);
            for v in values {
                let before = a.clone();
                if let Some(c) = a.update(&json!({"seq": v, "t": v.to_string()})).expect("update") {
                    prop_assert!(check(&before, &c));
                }
            }
        }
    }
}
