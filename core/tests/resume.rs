//! The cost model of a resume: a replica holding a 1,000-document database
//! that misses 10 remote changes receives exactly those 10 entries, in one
//! round trip, for a few hundred bytes (not O(documents)).

mod common;

use common::Net;
use serde_json::json;
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{self, Message};
use syncline_core::sync::OpenAccess;

#[test]
fn resume_receives_exactly_the_missing_entries_in_one_round_trip() {
    let db = DbName::new("org-42").unwrap();
    let mut net = Net::new(OpenAccess);
    let reader = net.add(1, "");
    let writer = net.add(2, "");
    for i in [reader, writer] {
        net.open(i, "org-42");
        net.connect(i);
    }
    net.run();
    for k in 0..1000 {
        let id = DocId::new(format!("doc-{k:04}")).unwrap();
        let body = json!({"title": format!("item {k}"), "done": false, "notes": "x".repeat(64)});
        net.nodes[writer].client.update(&db, &id, &body).unwrap();
    }
    net.run();
    assert_eq!(
        net.nodes[reader].client.database(&db).unwrap().list().len(),
        1000
    );

    // The reader goes away; the writer changes 10 documents.
    net.disconnect(reader);
    let mut change_bytes = 0;
    for k in 0..10 {
        let id = DocId::new(format!("doc-{:04}", k * 97)).unwrap();
        net.nodes[writer]
            .client
            .update(
                &db,
                &id,
                &json!({"title": format!("item {k}"), "done": true, "notes": "x".repeat(64)}),
            )
            .unwrap();
    }
    net.run();
    let log = net.server.log(&db).unwrap();
    for e in log.entries().skip(log.entries().len() - 10) {
        change_bytes += e.change.len();
    }

    // Reconnect and count.
    net.reset_traffic();
    net.connect(reader);
    assert_eq!(
        net.nodes[reader].to_server.len(),
        2,
        "Subscribe leaves with Hello, before any reply: one round trip"
    );
    net.run();
    let up = &net.nodes[reader].up;
    let down = &net.nodes[reader].down;
    let kinds = |t: &common::Traffic| t.frames.iter().map(Message::kind).collect::<Vec<_>>();
    assert_eq!(
        kinds(up),
        ["hello", "subscribe"],
        "one request after the handshake"
    );
    assert_eq!(
        kinds(down),
        ["welcome", "delta", "presence_update"],
        "one reply"
    );
    let Message::Delta(delta) = &down.frames[1] else {
        unreachable!()
    };
    assert_eq!(delta.entries.len(), 10, "exactly the missing entries");
    assert!(delta.snapshots.is_empty() && delta.last && delta.part == 0);
    let subscribe_bytes = protocol::encoded_len(&up.frames[1]);
    let delta_bytes = protocol::encoded_len(&down.frames[1]);
    println!(
        "resume: subscribe {subscribe_bytes} B, delta {delta_bytes} B for {change_bytes} B of changes; total up {} B, down {} B",
        up.bytes, down.bytes
    );
    assert!(
        subscribe_bytes < 200,
        "request is O(replicas): {subscribe_bytes} B"
    );
    assert!(
        delta_bytes <= change_bytes + change_bytes / 10 + 512,
        "reply within 10% + 512 B of the changes: {delta_bytes} B vs {change_bytes} B"
    );
    let reader_db = net.nodes[reader].client.database(&db).unwrap();
    assert_eq!(reader_db.vv(), net.server.log(&db).unwrap().vv());
    assert_eq!(
        reader_db.get(&DocId::new("doc-0097").unwrap()).unwrap()["done"],
        json!(true)
    );
}

#[test]
fn resume_after_compaction_sends_snapshots_of_changed_documents_only() {
    let db = DbName::new("org-7").unwrap();
    let mut net = Net::new(OpenAccess);
    let reader = net.add(1, "");
    let writer = net.add(2, "");
    for i in [reader, writer] {
        net.open(i, "org-7");
        net.connect(i);
    }
    net.run();
    for k in 0..100 {
        let id = DocId::new(format!("d{k}")).unwrap();
        net.nodes[writer]
            .client
            .update(&db, &id, &json!({"v": k}))
            .unwrap();
    }
    net.run();
    net.disconnect(reader);
    for k in 0..5 {
        let id = DocId::new(format!("d{k}")).unwrap();
        net.nodes[writer]
            .client
            .update(&db, &id, &json!({"v": k + 1000}))
            .unwrap();
    }
    net.run();
    // The server prunes everything: the reader is now behind the horizon.
    let vv = net.server.log(&db).unwrap().vv().clone();
    net.server.compact(&db, &vv);
    net.route_server();
    net.flush_server();
    assert!(net.server.log(&db).unwrap().entries().len() == 0);

    net.reset_traffic();
    net.connect(reader);
    net.run();
    let down = &net.nodes[reader].down;
    let Message::Delta(delta) = &down.frames[1] else {
        panic!("expected a delta, got {:?}", down.frames[1].kind())
    };
    assert_eq!(delta.snapshots.len(), 5, "only the changed documents");
    assert!(delta.entries.is_empty());
    let reader_db = net.nodes[reader].client.database(&db).unwrap();
    assert_eq!(reader_db.vv(), &vv);
    assert_eq!(
        reader_db.get(&DocId::new("d3").unwrap()).unwrap(),
        json!({"v": 1003})
    );
    assert_eq!(
        reader_db.get(&DocId::new("d50").unwrap()).unwrap(),
        json!({"v": 50})
    );
}
