//! Browser tests (`wasm-bindgen-test` in headless Chromium): the IndexedDB
//! store and the WebSocket transport. The transport tests talk to a real
//! `syncline serve` whose URL `scripts/test` passes at build time in
//! `SYNCLINE_TEST_SERVER`.

use std::cell::RefCell;
use std::rc::Rc;

use js_sys::{Function, Promise};
use syncline_core::{
    Batch, DbName, DocId, DocView, Dot, Entry, ReplicaId, Snapshot, Store, VersionVector,
};
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

use crate::client::create_client;
use crate::socket::{Socket, SocketEvent};
use crate::store::{IdbStore, StoreError};

wasm_bindgen_test_configure!(run_in_browser);

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ReplicaId::random().to_hex())
}

fn entry(replica: ReplicaId, counter: u64, doc: &str) -> Entry {
    Entry {
        dot: Dot { replica, counter },
        doc: DocId::new(doc).expect("valid id"),
        change: vec![counter as u8; 10],
    }
}

#[wasm_bindgen_test]
async fn batches_survive_reopening_in_order() {
    let name = unique("store");
    let db = DbName::new("org-1").expect("valid");
    let other = DbName::new("org-2").expect("valid");
    let r = ReplicaId([1; 16]);
    let store = IdbStore::open(&name).await.expect("open");
    store
        .write(
            &db,
            &Batch::entries(vec![entry(r, 1, "a"), entry(r, 2, "b")]),
        )
        .await
        .expect("write");
    store
        .write_many(&[
            (&db, &Batch::entries(vec![entry(r, 3, "a")]), &[]),
            (&other, &Batch::entries(vec![entry(r, 1, "z")]), &[]),
        ])
        .await
        .expect("write many");
    store.put_meta("replica", &r.0).await.expect("meta");
    store.close();

    let store = IdbStore::open(&name).await.expect("reopen");
    let loaded = store.load(&db).await.expect("load");
    let counters: Vec<u64> = loaded.entries.iter().map(|e| e.dot.counter).collect();
    assert_eq!(counters, [1, 2, 3]);
    assert_eq!(loaded.entries[2], entry(r, 3, "a"));
    assert_eq!(store.load(&other).await.expect("load").entries.len(), 1);
    let mut since = VersionVector::new();
    since.set(r, 2);
    assert_eq!(
        store.read_since(&db, &since).await.expect("since"),
        vec![entry(r, 3, "a")]
    );
    assert_eq!(
        store.get_meta("replica").await.expect("meta"),
        Some(r.0.to_vec())
    );
    assert_eq!(store.get_meta("nothing").await.expect("meta"), None);
    let mut names = store.list_databases().await.expect("list");
    names.sort();
    assert_eq!(names, vec![db.clone(), other]);
    // Appending after a reopen continues the record sequence.
    store
        .write(&db, &Batch::entries(vec![entry(r, 4, "c")]))
        .await
        .expect("write");
    assert_eq!(store.load(&db).await.expect("load").entries.len(), 4);
}

#[wasm_bindgen_test]
async fn snapshots_and_horizon_prune_entries() {
    let store = IdbStore::open(&unique("snap")).await.expect("open");
    let db = DbName::new("db").expect("valid");
    let r = ReplicaId([2; 16]);
    store
        .write(
            &db,
            &Batch::entries((1..=5).map(|c| entry(r, c, "a")).collect()),
        )
        .await
        .expect("write");
    let mut base = VersionVector::new();
    base.set(r, 3);
    let snapshot = Snapshot {
        doc: DocId::new("a").expect("valid"),
        clock: base.clone(),
        bytes: vec![7; 32],
    };
    store
        .write(
            &db,
            &Batch {
                entries: vec![],
                snapshots: vec![snapshot.clone()],
                base: Some(base.clone()),
            },
        )
        .await
        .expect("write");
    let loaded = store.load(&db).await.expect("load");
    assert_eq!(loaded.base, base);
    assert_eq!(loaded.snapshots, vec![snapshot]);
    let counters: Vec<u64> = loaded.entries.iter().map(|e| e.dot.counter).collect();
    assert_eq!(counters, [4, 5]);
}

#[wasm_bindgen_test]
async fn many_records_fold_into_one_without_loss() {
    let name = unique("fold");
    let store = IdbStore::open(&name).await.expect("open");
    let db = DbName::new("db").expect("valid");
    let r = ReplicaId([3; 16]);
    for c in 1..=600u64 {
        store
            .write(&db, &Batch::entries(vec![entry(r, c, "a")]))
            .await
            .expect("write");
    }
    store.close();
    let store = IdbStore::open(&name).await.expect("reopen");
    let loaded = store.load(&db).await.expect("load");
    assert_eq!(loaded.entries.len(), 600);
    assert!(
        loaded
            .entries
            .iter()
            .enumerate()
            .all(|(i, e)| e.dot.counter == i as u64 + 1)
    );
}

/// Write one record behind the store's back (damage, or an older layout).
async fn put_raw(
    raw: &indexed_db_futures::database::Database,
    store: &str,
    key: &str,
    bytes: Vec<u8>,
) {
    use indexed_db_futures::prelude::*;
    use indexed_db_futures::transaction::TransactionMode;
    use indexed_db_futures::typed_array::Uint8Array;
    let tx = raw
        .transaction(store)
        .with_mode(TransactionMode::Readwrite)
        .build()
        .expect("tx");
    tx.object_store(store)
        .expect("store")
        .put(Uint8Array::from(bytes))
        .with_key(key.to_owned())
        .primitive()
        .expect("put");
    tx.commit().await.expect("commit");
}

fn view(doc: &str, counter: u64, json: &str) -> DocView {
    let mut clock = VersionVector::new();
    clock.set(ReplicaId([4; 16]), counter);
    DocView {
        doc: DocId::new(doc).expect("valid id"),
        clock,
        json: Some(json.to_owned()),
    }
}

#[wasm_bindgen_test]
async fn views_are_written_with_their_batch_and_replaced_per_document() {
    let name = unique("views");
    let store = IdbStore::open(&name).await.expect("open");
    let (db, other) = (
        DbName::new("db").expect("valid"),
        DbName::new("db2").expect("valid"),
    );
    let r = ReplicaId([4; 16]);
    let a1 = view("a", 1, r#"{"n":1}"#);
    let b1 = view("b", 2, r#"{"n":2}"#);
    store
        .write_many(&[
            (
                &db,
                &Batch::entries(vec![entry(r, 1, "a"), entry(r, 2, "b")]),
                &[a1, b1.clone()],
            ),
            (
                &other,
                &Batch::entries(vec![entry(r, 1, "z")]),
                &[view("z", 1, "{}")],
            ),
        ])
        .await
        .expect("write");
    let a3 = view("a", 3, r#"{"n":3}"#);
    store
        .write_many(&[(
            &db,
            &Batch::entries(vec![entry(r, 3, "a")]),
            std::slice::from_ref(&a3),
        )])
        .await
        .expect("write");
    store.close();
    // Damage one more view behind the store's back: it is skipped, not fatal.
    let raw = indexed_db_futures::database::Database::open(name.as_str())
        .await
        .expect("raw open");
    put_raw(&raw, "views", "db\u{0}c", vec![0xde, 0xad]).await;
    raw.close();
    let store = IdbStore::open(&name).await.expect("reopen");
    let mut views = store.load_views(&db).await.expect("views");
    views.sort_by(|x, y| x.doc.as_str().cmp(y.doc.as_str()));
    assert_eq!(views, vec![a3, b1]);
    assert_eq!(store.load_views(&other).await.expect("views").len(), 1);
    assert_eq!(store.load(&db).await.expect("load").entries.len(), 3);
}

#[wasm_bindgen_test]
async fn a_reopened_client_shows_and_edits_what_it_stored() {
    let (cb, _) = waiter(|_| false);
    let idb = unique("reopen");
    let opts = options("ws://127.0.0.1:9/sync");
    let _ = js_sys::Reflect::set(&opts, &"storage".into(), &"indexeddb".into());
    let _ = js_sys::Reflect::set(&opts, &"idbName".into(), &idb.as_str().into());
    let js = |v: serde_json::Value| serde_wasm_bindgen::to_value(&v).expect("js");
    let read = |c: &crate::client::WasmClient, id: &str| -> Option<serde_json::Value> {
        let v = c.get("notes", id).expect("get");
        (!v.is_undefined()).then(|| serde_wasm_bindgen::from_value(v).expect("json"))
    };
    let client = create_client(opts.clone(), cb.clone())
        .await
        .expect("client");
    client.open("notes".to_owned()).await.expect("open");
    for i in 0..20 {
        let v = serde_json::json!({"title": format!("note {i}"), "n": i, "tags": ["a", i]});
        JsFuture::from(client.put("notes", &format!("n{}", i % 5), js(v), None))
            .await
            .expect("put");
    }
    let text = serde_json::json!({"body": "hello"});
    JsFuture::from(client.put("notes", "t", js(text), Some(vec!["body".into()])))
        .await
        .expect("put");
    JsFuture::from(client.delete("notes", "n4"))
        .await
        .expect("delete");
    // A float that a non-exact parser would round one unit off.
    let float = serde_json::json!({"x": 130.653_316_326_530_61_f64});
    JsFuture::from(client.put("notes", "f", js(float.clone()), None))
        .await
        .expect("put");
    let before: Vec<_> = ["n0", "n1", "n2", "n3", "n4", "t"]
        .iter()
        .map(|id| read(&client, id))
        .collect();
    let all_before: serde_json::Value =
        serde_wasm_bindgen::from_value(client.all("notes").expect("all")).expect("json");
    JsFuture::from(client.close()).await.expect("close");
    // A closed client has let its replicas go: reads say so.
    let err = client.get("notes", "t").expect_err("closed");
    let code = js_sys::Reflect::get(&err, &"code".into()).expect("code");
    assert_eq!(code.as_string().as_deref(), Some("Closed"));
    assert!(client.list("notes").is_err());
    // Closing stored the views of everything changed (23 entries: fewer
    // than a refresh needs, so they were all written on close).
    let store = IdbStore::open(&idb).await.expect("store");
    let notes = DbName::new("notes").expect("valid");
    assert_eq!(store.load_views(&notes).await.expect("views").len(), 7);
    store.close();

    let client = create_client(opts.clone(), cb.clone())
        .await
        .expect("reopen");
    client.open("notes".to_owned()).await.expect("open");
    let after: Vec<_> = ["n0", "n1", "n2", "n3", "n4", "t"]
        .iter()
        .map(|id| read(&client, id))
        .collect();
    assert_eq!(after, before);
    assert_eq!(after[4], None, "deleted stays deleted");
    let all_after: serde_json::Value =
        serde_wasm_bindgen::from_value(client.all("notes").expect("all")).expect("json");
    assert_eq!(all_after, all_before);
    assert_eq!(
        client.list("notes").expect("list"),
        vec!["f", "n0", "n1", "n2", "n3", "t"]
    );
    assert_eq!(read(&client, "f"), Some(float.clone()));
    assert_eq!(all_after["f"], float);
    // Editing after the reopen continues each document's history.
    JsFuture::from(client.splice(
        "notes",
        "t",
        js(serde_json::json!(["body"])),
        5,
        0,
        " world",
    ))
    .await
    .expect("splice");
    let v = serde_json::json!({"title": "note 1", "n": 100});
    JsFuture::from(client.put("notes", "n1", js(v.clone()), None))
        .await
        .expect("put");
    assert_eq!(
        read(&client, "t"),
        Some(serde_json::json!({"body": "hello world"}))
    );
    assert_eq!(read(&client, "n1"), Some(v.clone()));
    JsFuture::from(client.close()).await.expect("close");
    // And those edits are there after one more reopen.
    let client = create_client(opts, cb).await.expect("reopen again");
    client.open("notes".to_owned()).await.expect("open");
    assert_eq!(
        read(&client, "t"),
        Some(serde_json::json!({"body": "hello world"}))
    );
    assert_eq!(read(&client, "n1"), Some(v));
    assert_eq!(read(&client, "n2"), before[2]);
    JsFuture::from(client.close()).await.expect("close");
}

#[wasm_bindgen_test]
async fn corrupt_records_are_typed_errors() {
    let name = unique("corrupt");
    IdbStore::open(&name).await.expect("create").close();
    // Damage the log behind the store's back.
    let raw = indexed_db_futures::database::Database::open(name.as_str())
        .await
        .expect("raw open");
    put_raw(
        &raw,
        "log",
        "db\u{0}0000000000000000",
        vec![0xde, 0xad, 0xbe, 0xef],
    )
    .await;
    raw.close();
    let store = IdbStore::open(&name).await.expect("open");
    let err = store
        .load(&DbName::new("db").expect("valid"))
        .await
        .expect_err("corrupt");
    assert!(matches!(err, StoreError::Corrupt(_)), "{err:?}");
    assert_eq!(err.code(), "StorageCorrupt");
}

#[wasm_bindgen_test]
async fn data_of_the_first_schema_opens_after_the_upgrade() {
    use indexed_db_futures::prelude::*;
    let name = unique("upgrade");
    let db = DbName::new("db").expect("valid");
    let r = ReplicaId([5; 16]);
    // Schema 1: `log` and `meta` only, one batch record.
    let raw = indexed_db_futures::database::Database::open(name.as_str())
        .with_version(1u8)
        .with_on_upgrade_needed(|_, db| {
            db.create_object_store("log").build()?;
            db.create_object_store("meta").build()?;
            Ok(())
        })
        .await
        .expect("create v1");
    let batch = Batch::entries(vec![entry(r, 1, "a")]);
    let record = syncline_core::encode_batch(&batch).unwrap();
    put_raw(&raw, "log", "db\u{0}0000000000000000", record).await;
    raw.close();
    let store = IdbStore::open(&name).await.expect("upgrade");
    assert_eq!(store.load(&db).await.expect("load").entries, batch.entries);
    assert_eq!(store.load_views(&db).await.expect("views"), vec![]);
    let v = view("a", 2, "{}");
    store
        .write_many(&[(
            &db,
            &Batch::entries(vec![entry(r, 2, "a")]),
            std::slice::from_ref(&v),
        )])
        .await
        .expect("write");
    assert_eq!(store.load(&db).await.expect("load").entries.len(), 2);
    assert_eq!(store.load_views(&db).await.expect("views"), vec![v]);
}

#[wasm_bindgen_test]
async fn a_blocked_upgrade_is_a_typed_error() {
    let name = unique("blocked");
    let _holder = IdbStore::open(&name).await.expect("open");
    // A newer schema cannot open while this (older) connection is held.
    let err = IdbStore::open_version(&name, crate::store::SCHEMA_VERSION + 1)
        .await
        .expect_err("blocked");
    assert!(matches!(err, StoreError::Blocked), "{err:?}");
}

/// A promise resolved by the first event `pick` accepts.
fn waiter(pick: impl Fn(&JsValue) -> bool + 'static) -> (Function, Promise) {
    let resolve: Rc<RefCell<Option<Function>>> = Rc::default();
    let slot = resolve.clone();
    let promise = Promise::new(&mut |res, _| *slot.borrow_mut() = Some(res));
    let callback = Closure::<dyn FnMut(JsValue)>::new(move |ev: JsValue| {
        if pick(&ev)
            && let Some(r) = resolve.borrow_mut().take()
        {
            let _ = r.call1(&JsValue::NULL, &ev);
        }
    });
    (callback.into_js_value().unchecked_into(), promise)
}

fn field(ev: &JsValue, name: &str) -> Option<String> {
    js_sys::Reflect::get(ev, &name.into()).ok()?.as_string()
}

fn options(url: &str) -> JsValue {
    let o = js_sys::Object::new();
    let _ = js_sys::Reflect::set(&o, &"url".into(), &url.into());
    let _ = js_sys::Reflect::set(&o, &"storage".into(), &"memory".into());
    let _ = js_sys::Reflect::set(&o, &"maxBackoffMs".into(), &200.into());
    o.into()
}

// A missing URL fails the transport tests at run time, not every build
// (clippy and plain builds of the test target need no server).
#[allow(clippy::option_env_unwrap)]
fn server() -> &'static str {
    option_env!("SYNCLINE_TEST_SERVER")
        .expect("SYNCLINE_TEST_SERVER (a ws:// URL of a running server) must be set at build time; scripts/test does")
}

#[wasm_bindgen_test]
async fn socket_reports_an_unreachable_server_as_closed() {
    let (cb, closed) = waiter(|_| true);
    let _socket = Socket::open("ws://127.0.0.1:9/sync", None, move |ev| {
        let name = match ev {
            SocketEvent::Open => "open",
            SocketEvent::Frame(_) => "frame",
            SocketEvent::Closed => "closed",
        };
        let _ = cb.call1(&JsValue::NULL, &name.into());
    })
    .expect("valid url");
    let first = JsFuture::from(closed).await.expect("event");
    assert_eq!(first.as_string().as_deref(), Some("closed"));
    // Relative URLs resolve against the page; a foreign scheme cannot.
    assert!(Socket::open("ftp://example.invalid/", None, |_| {}).is_err());
}

#[wasm_bindgen_test]
async fn writes_never_wait_for_the_network() {
    let (cb, _) = waiter(|_| false);
    let client = create_client(options("ws://127.0.0.1:9/sync"), cb)
        .await
        .expect("client");
    client.open("offline-db".to_owned()).await.expect("open");
    let put = client.put(
        "offline-db",
        "a",
        serde_wasm_bindgen::to_value(&serde_json::json!({"x": 1})).expect("js"),
        None,
    );
    assert_eq!(
        JsFuture::from(put).await.expect("durable locally"),
        JsValue::TRUE
    );
    assert_eq!(client.status(), "offline");
    assert_eq!(client.pending("offline-db").expect("pending"), 1.0);
    JsFuture::from(client.close()).await.expect("close");
}

#[wasm_bindgen_test]
async fn two_clients_sync_through_the_server_with_acks() {
    let url = server();
    let db = unique("wasm");
    let (cb_a, a_synced) = waiter(|ev| field(ev, "type").as_deref() == Some("synced"));
    let a = create_client(options(url), cb_a).await.expect("client a");
    a.open(db.to_owned()).await.expect("open");
    let value = serde_wasm_bindgen::to_value(&serde_json::json!({"title": "milk"})).expect("js");
    JsFuture::from(a.put(&db, "todo", value, None))
        .await
        .expect("put");
    JsFuture::from(a.when_synced(&db))
        .await
        .expect("acknowledged by the server");
    JsFuture::from(a_synced).await.expect("synced event");
    assert_eq!(a.pending(&db).expect("pending"), 0.0);
    assert_eq!(a.status(), "online");

    let want = db.clone();
    let (cb_b, b_changed) = waiter(move |ev| {
        field(ev, "type").as_deref() == Some("changed")
            && field(ev, "db").as_deref() == Some(want.as_str())
    });
    let b = create_client(options(url), cb_b).await.expect("client b");
    b.open(db.to_owned()).await.expect("open");
    JsFuture::from(b_changed).await.expect("remote change");
    let got: serde_json::Value =
        serde_wasm_bindgen::from_value(b.get(&db, "todo").expect("get")).expect("json");
    assert_eq!(got, serde_json::json!({"title": "milk"}));
    JsFuture::from(a.close()).await.expect("close");
    JsFuture::from(b.close()).await.expect("close");
}

/// Resolves after `ms` (for polling a state; callers bound the polling).
async fn pause(ms: i32) {
    let promise = Promise::new(&mut |res, _| {
        let set_timeout = js_sys::Reflect::get(&js_sys::global(), &"setTimeout".into())
            .ok()
            .and_then(|f| f.dyn_into::<Function>().ok())
            .expect("setTimeout");
        let _ = set_timeout.call2(&JsValue::NULL, &res, &ms.into());
    });
    let _ = JsFuture::from(promise).await;
}

/// Poll `done` every 20 ms for at most 10 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        pause(20).await;
    }
    panic!("{what}: not within 10 s");
}

fn seq_of(c: &crate::client::WasmClient, db: &str) -> Option<i64> {
    let v: serde_json::Value = serde_wasm_bindgen::from_value(c.get(db, "t").ok()?).ok()?;
    v.get("seq")?.as_i64()
}

#[wasm_bindgen_test]
async fn a_subscriber_applies_patched_changes_once_the_stream_pauses() {
    let url = server();
    let db = unique("wasm-idle");
    let (cb_a, _) = waiter(|_| false);
    let a = create_client(options(url), cb_a).await.expect("client a");
    let (cb_b, _) = waiter(|_| false);
    let b = create_client(options(url), cb_b).await.expect("client b");
    for c in [&a, &b] {
        c.open(db.clone()).await.expect("open");
        JsFuture::from(c.when_synced(&db)).await.expect("synced");
    }
    // One change per frame: each is shown patched, and without the idle
    // catch-up they would wait for ever. Read as each arrives (within a
    // 20 ms poll, well before the idle catch-up's quiet period), the reader
    // is behind by at least that change: else nothing was shown patched.
    let mut behind = Vec::new();
    for seq in 0..10 {
        let v = serde_wasm_bindgen::to_value(&serde_json::json!({ "seq": seq })).expect("js");
        JsFuture::from(a.put(&db, "t", v, None)).await.expect("put");
        until("the change arrives", || seq_of(&b, &db) == Some(seq)).await;
        behind.push(b.changes_behind(&db, "t"));
    }
    assert!(
        behind.iter().any(|&n| n >= 1),
        "no change was shown patched: changes behind after each arrival {behind:?}"
    );
    until("the reader catches up", || b.changes_behind(&db, "t") == 0).await;
    assert_eq!(b.changes_behind(&db, "t"), 0);
    assert_eq!(
        seq_of(&b, &db),
        Some(9),
        "automerge shows what the patches showed"
    );
    // What automerge now holds is the same document: a write on top of it
    // reaches the writer.
    let v = serde_wasm_bindgen::to_value(&serde_json::json!({ "seq": -1 })).expect("js");
    JsFuture::from(b.put(&db, "t", v, None)).await.expect("put");
    until("the write arrives", || seq_of(&a, &db) == Some(-1)).await;
    JsFuture::from(a.close()).await.expect("close");
    JsFuture::from(b.close()).await.expect("close");
}

/// Issue 30: the replica's key is a non-extractable WebCrypto Ed25519 key
/// kept in IndexedDB; the replica id is derived from it, stays the same
/// across reopens, and each proof is fresh and verifies.
#[wasm_bindgen_test]
async fn the_replica_key_is_kept_non_extractable_and_proves_the_replica() {
    use crate::identity::Signer;
    use crate::store::BrowserStore;
    let name = unique("key");
    let store = BrowserStore::Idb(Rc::new(IdbStore::open(&name).await.expect("open")));
    let signer = Signer::load_or_create(&store).await.expect("key");
    let a = signer.prove("sync.example").await.expect("proof");
    let b = signer.prove("sync.example").await.expect("proof");
    assert_eq!(a.verify(signer.replica()), Ok(()));
    assert_eq!(b.verify(signer.replica()), Ok(()));
    assert_ne!(a.nonce, b.nonce, "a fresh nonce per proof");
    let kept = store
        .get_meta_value("replica-key")
        .await
        .expect("meta")
        .expect("the key pair is kept");
    let private = js_sys::Reflect::get(&kept, &"privateKey".into()).expect("private key");
    let extractable = js_sys::Reflect::get(&private, &"extractable".into()).expect("flag");
    assert_eq!(extractable.as_bool(), Some(false));
    store.close();

    let store = BrowserStore::Idb(Rc::new(IdbStore::open(&name).await.expect("reopen")));
    let again = Signer::load_or_create(&store).await.expect("key");
    assert_eq!(again.replica(), signer.replica());
    let memory = BrowserStore::Memory(syncline_core::MemoryStore::new());
    let fresh = Signer::load_or_create(&memory).await.expect("key");
    assert_ne!(fresh.replica(), signer.replica());
}
