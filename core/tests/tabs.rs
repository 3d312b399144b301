//! Tabs of one app exchange entries directly (no server); when they come
//! online, a tab whose changes build on another tab's not-yet-pushed ones
//! waits for the server to hold those, instead of being refused for good.

mod common;

use common::Net;
use serde_json::json;
use syncline_core::clock::VersionVector;
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{ErrorCode, Message};
use syncline_core::sync::{ClientEvent, OpenAccess};

fn db() -> DbName {
    DbName::new("notes").unwrap()
}

fn doc() -> DocId {
    DocId::new("note").unwrap()
}

/// Hand `from`'s own entries that `to` lacks to `to`, as a tab would.
fn tab_to(net: &mut Net<OpenAccess>, from: usize, to: usize) {
    let since = net.nodes[to].client.database(&db()).unwrap().vv().clone();
    let entries = net.nodes[from].client.own_entries_since(&db(), &since);
    net.nodes[to]
        .client
        .apply_tab_entries(&db(), entries)
        .unwrap();
}

fn codes(net: &Net<OpenAccess>, i: usize) -> Vec<ErrorCode> {
    let frames = &net.nodes[i].down.frames;
    frames
        .iter()
        .filter_map(|m| match m {
            Message::Error(e) => Some(e.code()),
            _ => None,
        })
        .collect()
}

#[test]
fn a_tab_building_on_another_tabs_unpushed_change_waits_for_it_then_syncs() {
    let mut net = Net::new(OpenAccess);
    let (a, b) = (net.add(1, ""), net.add(2, ""));
    for i in [a, b] {
        net.open(i, "notes");
    }
    net.run();
    // Offline: A writes, B gets it from A and edits it.
    net.nodes[a]
        .client
        .update(&db(), &doc(), &json!({"title": "buy milk"}))
        .unwrap();
    net.run();
    tab_to(&mut net, a, b);
    net.nodes[b]
        .client
        .update(&db(), &doc(), &json!({"title": "buy milk today"}))
        .unwrap();
    net.run();
    tab_to(&mut net, b, a);
    net.run();
    // B connects first: its change names A, which the server has never seen.
    net.connect(b);
    net.run();
    assert_eq!(codes(&net, b), [ErrorCode::MissingDependency]);
    assert!(
        !net.nodes[b]
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::Error { .. })),
        "not an error the app hears of"
    );
    assert!(!net.nodes[b].client.is_synced(&db()));
    let held = net
        .server
        .log(&db())
        .map(|l| l.vv().clone())
        .unwrap_or_default();
    assert_eq!(held, VersionVector::new(), "nothing of B's push was stored");
    // A connects and pushes; the server relays A's entry to B (which held it
    // already), and B's waiting change goes.
    net.connect(a);
    net.run();
    for i in [a, b] {
        assert!(net.nodes[i].client.is_synced(&db()), "node {i} synced");
    }
    assert_eq!(
        codes(&net, b),
        [ErrorCode::MissingDependency],
        "refused once"
    );
    let stored = net.server.log(&db()).unwrap().vv().clone();
    for i in [a, b] {
        assert_eq!(net.nodes[i].client.database(&db()).unwrap().vv(), &stored);
        let got = net.nodes[i].client.database(&db()).unwrap().get(&doc());
        assert_eq!(got, Some(json!({"title": "buy milk today"})));
    }
}
