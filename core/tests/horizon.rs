//! A resume costs the replicas that wrote since the last compaction, not
//! every replica that ever wrote: once the server's pruned horizon names
//! 100,000 replicas, a client names it by its digest (`Subscribe::horizon`)
//! and sends only the counters above it, across reconnects, its own
//! restart and the server compacting again; a server restarted since knows
//! only its current horizon (`UnknownHorizon`, then the whole vector once).

mod common;

use common::Net;
use serde_json::json;
use syncline_core::clock::VersionVector;
use syncline_core::entry::Snapshot;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{self, ErrorCode, HORIZON_REPLICAS, Message, Subscribe};
use syncline_core::store::Batch;
use syncline_core::sync::{ClientEvent, OpenAccess, Server, ServerConfig};

const REPLICAS: u32 = 100_000;

fn replica(i: u32) -> ReplicaId {
    let mut id = [0xAA; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    ReplicaId(id)
}

fn db() -> DbName {
    DbName::new("crowd").unwrap()
}

/// The Subscribes client `i` sent since its traffic was last reset, with
/// their encoded sizes.
fn subscribes<A>(net: &Net<A>, i: usize) -> Vec<(Subscribe, usize)> {
    net.nodes[i]
        .up
        .frames
        .iter()
        .filter_map(|m| match m {
            Message::Subscribe(s) => Some(((**s).clone(), protocol::encode(m).len())),
            _ => None,
        })
        .collect()
}

fn down_bytes<A>(net: &Net<A>, i: usize) -> usize {
    net.nodes[i].down.bytes
}

fn refused_horizon<A>(net: &Net<A>, i: usize) -> bool {
    net.nodes[i]
        .down
        .frames
        .iter()
        .any(|m| matches!(m, Message::Error(e) if e.code() == ErrorCode::UnknownHorizon))
}

/// `a` sets document "new" to `{"n": n}`; then `b` (disconnected)
/// reconnects and catches up. Returns `b`'s Subscribes.
fn write_then_resume(
    net: &mut Net<OpenAccess>,
    a: usize,
    b: usize,
    n: u32,
) -> Vec<(Subscribe, usize)> {
    net.nodes[a]
        .client
        .update(&db(), &DocId::new("new").unwrap(), &json!({ "n": n }))
        .unwrap();
    net.run();
    net.reset_traffic();
    net.connect(b);
    net.run();
    subscribes(net, b)
}

fn app_errors<A>(net: &Net<A>, i: usize) -> Vec<String> {
    net.nodes[i]
        .events
        .iter()
        .filter_map(|e| match e {
            ClientEvent::Error { code, message, .. } => Some(format!("{code}: {message}")),
            _ => None,
        })
        .collect()
}

#[test]
fn a_resume_names_the_horizon_instead_of_sending_a_hundred_thousand_counters() {
    // A database whose history, by 100,000 replicas, was compacted into one
    // document's snapshot.
    let mut all = VersionVector::new();
    for i in 0..REPLICAS {
        all.set(replica(i), 1);
    }
    let old = DocId::new("old").unwrap();
    let mut doc = automerge::AutoCommit::new();
    automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "n", 0).unwrap();
    let mut net = Net::new(OpenAccess);
    net.server_store
        .write_now(
            &db(),
            &Batch {
                entries: Vec::new(),
                snapshots: vec![Snapshot {
                    doc: old.clone(),
                    clock: all.clone(),
                    bytes: doc.save(),
                }],
                base: Some(all.clone()),
            },
        )
        .unwrap();
    assert!(all.len() >= HORIZON_REPLICAS);

    // Two cold syncs: each receives the horizon (2.4 MB of vector, once)
    // and installs it as its own.
    let (a, b) = (net.add(1, ""), net.add(2, ""));
    for i in [a, b] {
        net.open(i, "crowd");
        net.connect(i);
    }
    net.run();
    for i in [a, b] {
        let c = net.nodes[i].client.database(&db()).unwrap();
        assert_eq!(
            c.log().base(),
            &all,
            "client {i} holds the server's horizon"
        );
        assert_eq!(c.get(&old).unwrap(), json!({"n": 0}));
        assert!(app_errors(&net, i).is_empty(), "{:?}", app_errors(&net, i));
    }

    // A writes while B is away; B's resume names the horizon and sends
    // only what it holds above it.
    net.disconnect(b);
    let new = DocId::new("new").unwrap();
    let subs = write_then_resume(&mut net, a, b, 1);
    assert_eq!(subs.len(), 1, "one round trip");
    let (sub, size) = &subs[0];
    assert_eq!(sub.horizon, Some(all.digest()));
    assert!(sub.since.is_empty(), "B wrote nothing: {:?}", sub.since);
    assert!(*size < 1024, "Subscribe of {size} bytes");
    assert!(
        down_bytes(&net, b) < 4096,
        "the reply is the missing entry: {} bytes down",
        down_bytes(&net, b)
    );
    let got = net.nodes[b].client.database(&db()).unwrap();
    assert_eq!(got.get(&new).unwrap(), json!({"n": 1}));
    assert_eq!(got.vv(), net.server.log(&db()).unwrap().vv());

    // B writes too and reconnects: its own counter is above the horizon,
    // so it is all `since` lists.
    net.nodes[b]
        .client
        .update(&db(), &new, &json!({"n": 2}))
        .unwrap();
    net.run();
    net.disconnect(b);
    net.reset_traffic();
    net.connect(b);
    net.run();
    let subs = subscribes(&net, b);
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].0.since.len(), 2, "A's and B's counters");
    assert!(subs[0].1 < 1024);

    // The server compacts while B is away. B's resume names the horizon
    // it holds, which the server has moved past but remembers: still one
    // round trip, and the reply announces the new horizon (no snapshots:
    // B holds everything below it), which B folds its documents to.
    net.disconnect(b);
    let compact = |net: &mut Net<OpenAccess>| {
        let vv = net.server.log(&db()).unwrap().vv().clone();
        net.server.compact(&db(), &vv);
        net.route_server();
        net.flush_server();
        assert_eq!(net.server.log(&db()).unwrap().base(), &vv);
        vv
    };
    let horizon = compact(&mut net);
    let subs = write_then_resume(&mut net, a, b, 3);
    assert_eq!(subs.len(), 1, "one round trip");
    assert_eq!(subs[0].0.horizon, Some(all.digest()));
    assert!(subs[0].1 < 1024);
    let got = net.nodes[b].client.database(&db()).unwrap();
    assert_eq!(got.log().base(), &horizon);
    assert_eq!(got.get(&new).unwrap(), json!({"n": 3}));
    assert_eq!(got.vv(), net.server.log(&db()).unwrap().vv());
    assert!(app_errors(&net, b).is_empty(), "{:?}", app_errors(&net, b));
    let snapshots = |net: &Net<OpenAccess>, i: usize| -> usize {
        net.nodes[i]
            .down
            .frames
            .iter()
            .map(|m| match m {
                Message::Delta(d) => d.snapshots.len(),
                _ => 0,
            })
            .sum()
    };
    assert_eq!(snapshots(&net, b), 0, "B held everything below it");

    // The server compacts again and restarts: it knows only its current
    // horizon now. B names the one it holds, is refused, asks once more
    // with its whole vector and is told the new horizon. The application
    // sees no error.
    net.disconnect(a);
    net.disconnect(b);
    net.nodes[a]
        .client
        .update(&db(), &new, &json!({"n": 4}))
        .unwrap();
    net.connect(a);
    net.run();
    net.disconnect(a);
    let horizon = compact(&mut net);
    let config = ServerConfig {
        replica: ReplicaId([0xEE; 16]),
        ..ServerConfig::default()
    };
    net.server = Server::new(config, OpenAccess);
    net.reset_traffic();
    net.connect(b);
    net.run();
    assert!(refused_horizon(&net, b));
    let subs = subscribes(&net, b);
    assert_eq!(subs.len(), 2, "the refused one and the whole vector");
    assert!(subs[0].0.horizon.is_some());
    assert_eq!(subs[1].0.horizon, None);
    assert!(subs[1].0.since.len() > REPLICAS as usize);
    let got = net.nodes[b].client.database(&db()).unwrap();
    assert_eq!(got.log().base(), &horizon);
    assert_eq!(got.get(&new).unwrap(), json!({"n": 4}));
    assert!(app_errors(&net, b).is_empty(), "{:?}", app_errors(&net, b));
    assert_eq!(
        snapshots(&net, b),
        1,
        "A's last write is below the new horizon: that document only"
    );

    // B restarts from its store: the new horizon was persisted, and the
    // first Subscribe of the new process names it.
    net.disconnect(b);
    let stored = net.nodes[b].store.load_now(&db()).unwrap();
    assert_eq!(stored.base, horizon);
    let b2 = net.add(2, "");
    net.nodes[b2].store = net.nodes[b].store.clone();
    net.open(b2, "crowd");
    net.reset_traffic();
    net.connect(b2);
    net.run();
    let subs = subscribes(&net, b2);
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].0.horizon, Some(horizon.digest()));
    assert!(subs[0].1 < 1024, "Subscribe of {} bytes", subs[0].1);
    let got = net.nodes[b2].client.database(&db()).unwrap();
    assert_eq!(got.get(&new).unwrap(), json!({"n": 4}));
    assert_eq!(got.get(&old).unwrap(), json!({"n": 0}));
    assert_eq!(got.vv(), net.server.log(&db()).unwrap().vv());
}

#[test]
fn a_small_horizon_is_sent_whole_and_a_wrong_digest_is_refused() {
    // Below HORIZON_REPLICAS nothing changes: the whole vector goes.
    let mut net = Net::new(OpenAccess);
    let (a, b) = (net.add(1, ""), net.add(2, ""));
    for i in [a, b] {
        net.open(i, "crowd");
        net.connect(i);
    }
    net.run();
    let doc = DocId::new("d").unwrap();
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"n": 1}))
        .unwrap();
    net.run();
    let vv = net.server.log(&db()).unwrap().vv().clone();
    net.server.compact(&db(), &vv);
    net.route_server();
    net.flush_server();
    net.disconnect(b);
    net.reset_traffic();
    net.connect(b);
    net.run();
    let subs = subscribes(&net, b);
    assert_eq!(subs.len(), 1);
    assert_eq!(subs[0].0.horizon, None);
    assert_eq!(&subs[0].0.since, net.server.log(&db()).unwrap().vv());

    // A Subscribe naming a horizon the server does not have (a digest of
    // nothing, or of another vector) is refused, not read as holding it.
    for horizon in [VersionVector::new().digest(), [7; 16]] {
        let before = net.nodes[b].down.frames.len();
        let frame = protocol::encode(&Message::Subscribe(Box::new(Subscribe {
            db: db(),
            since: VersionVector::new(),
            req: 99,
            horizon: Some(horizon),
        })));
        net.raw(b, frame);
        net.run();
        let answers = &net.nodes[b].down.frames[before..];
        assert!(
            answers
                .iter()
                .any(|m| matches!(m, Message::Error(e) if e.code() == ErrorCode::UnknownHorizon)),
            "{answers:?}"
        );
        assert!(
            !answers
                .iter()
                .any(|m| matches!(m, Message::Delta(d) if d.req == 99)),
            "no reply to a horizon it does not hold"
        );
    }
}
