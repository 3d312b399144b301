//! Server views (DESIGN.md §3, `core/src/view.rs`): a replica that holds
//! nothing of a document receives its JSON view with the entries, stores the
//! entries and shows the view without applying them; it loads the document
//! from its log only when something needs the automerge document. Views are
//! never sent to a replica that holds part of a document, and a stale view
//! is never served.

mod common;

use common::Net;
use serde_json::{Value as Json, json};
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::Message;
use syncline_core::protocol::{self, Delta};
use syncline_core::sync::{ClientEvent, OpenAccess, ServerConfig};
use syncline_core::view::DocView;

fn db() -> DbName {
    DbName::new("views").unwrap()
}

fn id(k: usize) -> DocId {
    DocId::new(format!("doc-{k}")).unwrap()
}

fn value(k: usize, rev: u32) -> Json {
    json!({"title": format!("item {k}"), "rev": rev, "tags": ["a", "b"], "score": 0.1 + k as f64})
}

/// A server with `config` (the tests' fixed replica id) and one connected writer.
fn with_writer(config: ServerConfig) -> (Net<OpenAccess>, usize) {
    let config = ServerConfig {
        replica: syncline_core::ids::ReplicaId([0xEE; 16]),
        ..config
    };
    let mut net = Net::with_config(OpenAccess, config);
    let w = net.add(1, "");
    net.open(w, "views");
    net.connect(w);
    net.run();
    (net, w)
}

/// A writer holding `n` documents with three changes each, synced.
fn seeded(n: usize) -> (Net<OpenAccess>, usize) {
    let (mut net, w) = with_writer(ServerConfig::default());
    for rev in 0..3 {
        for k in 0..n {
            net.nodes[w]
                .client
                .update(&db(), &id(k), &value(k, rev))
                .unwrap();
        }
    }
    net.run();
    (net, w)
}

/// Views received by node `i` in reply deltas.
fn views_received(net: &Net<OpenAccess>, i: usize) -> Vec<DocId> {
    let mut out = Vec::new();
    for m in &net.nodes[i].down.frames {
        if let Message::Delta(d) = m {
            assert!(
                d.req != 0 || d.views.is_empty(),
                "views ride only on replies"
            );
            out.extend(d.views.iter().map(|v| v.doc.clone()));
        }
    }
    out.sort();
    out
}

fn join(net: &mut Net<OpenAccess>, n: u8) -> usize {
    let c = net.add(n, "");
    net.open(c, "views");
    net.connect(c);
    net.run();
    c
}

#[test]
fn a_cold_replica_shows_server_views_without_applying_entries() {
    let (mut net, w) = seeded(5);
    net.build_views(&db());
    assert_eq!(net.server.stale_views(&db()), 0);
    let c = join(&mut net, 2);
    assert_eq!(views_received(&net, c), (0..5).map(id).collect::<Vec<_>>());

    let replica = net.nodes[c].client.database(&db()).unwrap();
    let writer = net.nodes[w].client.database(&db()).unwrap();
    assert_eq!(replica.vv(), writer.vv());
    assert_eq!(
        replica.cached_documents(),
        5,
        "every document is shown from its view"
    );
    for k in 0..5 {
        let shown: Json = serde_json::from_str(replica.cached_json(&id(k)).unwrap()).unwrap();
        assert_eq!(shown, value(k, 2));
    }
    // The entries themselves are stored: a restart from the store has them all.
    let stored = net.nodes[c].store.load_now(&db()).unwrap();
    assert_eq!(stored.entries.len(), 15);

    // A local write loads the document from the log first, then changes it.
    net.nodes[c]
        .client
        .update(&db(), &id(3), &value(3, 9))
        .unwrap();
    net.run();
    let replica = net.nodes[c].client.database(&db()).unwrap();
    assert!(!replica.is_cached(&id(3)));
    assert_eq!(replica.get(&id(3)), Some(value(3, 9)));
    assert_eq!(
        net.nodes[w].client.database(&db()).unwrap().get(&id(3)),
        Some(value(3, 9)),
        "the write merged on top of the full history"
    );
    // A remote change to a document shown from its view applies on top too.
    net.nodes[w]
        .client
        .update(&db(), &id(1), &value(1, 7))
        .unwrap();
    net.run();
    assert_eq!(
        net.nodes[c].client.database(&db()).unwrap().get(&id(1)),
        Some(value(1, 7))
    );
}

#[test]
fn stale_views_are_not_served_and_partial_holders_get_none() {
    let (mut net, w) = seeded(4);
    net.build_views(&db());
    let old = join(&mut net, 2);
    net.disconnect(old);
    // Doc 0 changes after its view was built.
    net.nodes[w]
        .client
        .update(&db(), &id(0), &value(0, 5))
        .unwrap();
    net.run();
    assert_eq!(net.server.stale_views(&db()), 1);

    let fresh = join(&mut net, 3);
    assert_eq!(
        views_received(&net, fresh),
        (1..4).map(id).collect::<Vec<_>>()
    );
    let replica = net.nodes[fresh].client.database(&db()).unwrap();
    assert!(
        !replica.is_cached(&id(0)),
        "no view: applied from its entries"
    );
    for (k, rev) in [(0, 5), (1, 2), (2, 2), (3, 2)] {
        let shown = match replica.cached_json(&id(k)) {
            Some(t) => serde_json::from_str(t).unwrap(),
            None => replica.get(&id(k)).unwrap(),
        };
        assert_eq!(shown, value(k, rev));
    }

    // A replica that holds every document, missing one change, gets the
    // change and no view, even once the view is rebuilt.
    net.build_views(&db());
    net.reset_traffic();
    net.connect(old);
    net.run();
    assert!(views_received(&net, old).is_empty());
    let replica = net.nodes[old].client.database(&db()).unwrap();
    assert_eq!(replica.get(&id(0)), Some(value(0, 5)));
}

#[test]
fn a_replica_with_local_changes_to_a_document_ignores_its_view() {
    let (mut net, w) = seeded(2);
    net.build_views(&db());
    // Written offline, before the first sync: the replica holds its own
    // change to doc 1, so the server's view of doc 1 does not match.
    let c = net.add(2, "");
    net.open(c, "views");
    net.nodes[c]
        .client
        .update(&db(), &id(1), &json!({"mine": true}))
        .unwrap();
    net.route_client(c);
    net.connect(c);
    net.run();
    let replica = net.nodes[c].client.database(&db()).unwrap();
    assert!(replica.is_cached(&id(0)));
    assert!(!replica.is_cached(&id(1)));
    let writer = net.nodes[w].client.database(&db()).unwrap();
    assert_eq!(
        replica.get(&id(1)),
        writer.get(&id(1)),
        "both merged the same changes"
    );
    assert_eq!(replica.get(&id(0)), Some(value(0, 2)));
}

#[test]
fn replies_cut_into_parts_still_match_their_views() {
    let (mut net, w) = with_writer(ServerConfig {
        max_frame: 2048,
        ..Default::default()
    });
    for rev in 0..6 {
        for k in 0..6 {
            net.nodes[w]
                .client
                .update(&db(), &id(k), &value(k, rev))
                .unwrap();
            net.run();
        }
    }
    net.build_views(&db());
    let c = join(&mut net, 2);
    let parts = net.nodes[c]
        .down
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Delta(d) if d.req != 0))
        .count();
    assert!(parts > 3, "the reply is cut into parts ({parts})");
    // Every document is announced, and only once it can be shown.
    let mut announced = std::collections::BTreeSet::new();
    for e in &net.nodes[c].events {
        if let ClientEvent::Changed { docs, .. } = e {
            announced.extend(docs.iter().cloned());
        }
    }
    assert_eq!(announced, (0..6).map(id).collect());
    let replica = net.nodes[c].client.database(&db()).unwrap();
    assert_eq!(replica.cached_documents(), 6);
    for k in 0..6 {
        let shown: Json = serde_json::from_str(replica.cached_json(&id(k)).unwrap()).unwrap();
        assert_eq!(shown, value(k, 5));
        assert_eq!(
            replica.get(&id(k)),
            Some(value(k, 5)),
            "and the log loads to the same"
        );
    }
}

#[test]
fn servers_configured_without_views_send_none() {
    let (mut net, w) = with_writer(ServerConfig {
        serve_views: false,
        ..Default::default()
    });
    net.nodes[w]
        .client
        .update(&db(), &id(0), &value(0, 0))
        .unwrap();
    net.run();
    net.build_views(&db());
    let c = join(&mut net, 2);
    assert!(views_received(&net, c).is_empty());
    assert_eq!(
        net.nodes[c].client.database(&db()).unwrap().get(&id(0)),
        Some(value(0, 0))
    );
}

#[test]
fn views_too_large_for_a_part_are_left_out() {
    let (mut net, w) = with_writer(ServerConfig {
        reply_part_bytes: 1024,
        ..Default::default()
    });
    // Doc 0 grows by small changes to a value far larger than any of them.
    let mut list = Vec::new();
    for k in 0..60 {
        list.push(format!("line {k} of a long list"));
        net.nodes[w]
            .client
            .update(&db(), &id(0), &json!({"lines": list}))
            .unwrap();
        net.run();
    }
    net.nodes[w]
        .client
        .update(&db(), &id(1), &value(1, 0))
        .unwrap();
    net.run();
    net.build_views(&db());
    let c = join(&mut net, 2);
    assert_eq!(views_received(&net, c), vec![id(1)]);
    let replica = net.nodes[c].client.database(&db()).unwrap();
    assert_eq!(replica.get(&id(0)), Some(json!({"lines": list})));
}

#[test]
fn a_view_that_is_not_json_is_dropped_not_the_frame() {
    let bad = |json: &str| DocView {
        doc: id(1),
        clock: Default::default(),
        json: Some(json.into()),
    };
    let delta = Delta {
        db: db(),
        req: 1,
        part: 0,
        last: true,
        base: Default::default(),
        snapshots: Vec::new(),
        entries: Vec::new(),
        views: vec![bad("{\"a\": 1}"), bad("{\"a\""), bad(&"[".repeat(500))],
        vv: Default::default(),
    };
    let frame = protocol::encode(&Message::Delta(Box::new(delta)));
    match protocol::decode(&frame, 1 << 20) {
        Ok(Message::Delta(d)) => assert_eq!(d.views, vec![bad("{\"a\": 1}")]),
        other => panic!("{other:?}"),
    }
}

/// A view build while the database is still being written leaves out the
/// documents changed since a given moment (`Server::appended`): their
/// views would be stale at once (the native hub builds those only once
/// they settle, and everything when the database goes quiet).
#[test]
fn a_settled_view_job_leaves_out_the_documents_still_being_written() {
    let (mut net, w) = seeded(4);
    let mark = net.server.appended(&db()).unwrap();
    for k in [1, 3] {
        net.nodes[w]
            .client
            .update(&db(), &id(k), &value(k, 9))
            .unwrap();
    }
    net.run();
    assert_eq!(net.server.appended(&db()), Some(mark + 2));
    let mut settled: Vec<DocId> = net
        .server
        .view_job_settled(&db(), 1_000, mark)
        .unwrap()
        .targets()
        .into_iter()
        .map(|(doc, _)| doc)
        .collect();
    settled.sort();
    assert_eq!(settled, vec![id(0), id(2)]);
    let all = net.server.view_job(&db(), 1_000).unwrap();
    assert_eq!(all.len(), 4);
    // Once the settled ones are built, nothing settled is left to build.
    let built = net
        .server
        .view_job_settled(&db(), 1_000, mark)
        .unwrap()
        .build();
    net.server.views_built(&db(), built);
    assert!(net.server.view_job_settled(&db(), 1_000, mark).is_none());
    assert_eq!(net.server.stale_views(&db()), 2);
}
