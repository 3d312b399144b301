//! The sync state machines' handshake, authorisation, acknowledgement and
//! presence rules, exercised through encoded frames.

mod common;

use common::Net;
use serde_json::json;
use syncline_core::Identity;
use syncline_core::clock::{Dot, VersionVector};
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{self, ErrorCode, Hello, Message, Push, Subscribe};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{
    AuthError, Authenticator, Client, ClientConfig, ClientEvent, ClientOutput, Grant, Grants,
    OpenAccess, Right, ServerOutput, Status,
};

struct Tokens;

impl Authenticator for Tokens {
    fn authenticate(&self, token: &str) -> Result<Grants, AuthError> {
        match token {
            "" => Err(AuthError::Missing),
            "reader" => Ok(Grants::new(vec![Grant {
                pattern: "shared".into(),
                right: Right::Read,
            }])),
            "writer" => Ok(Grants::new(vec![Grant {
                pattern: "shared".into(),
                right: Right::Write,
            }])),
            "other" => Ok(Grants::new(vec![Grant {
                pattern: "other-*".into(),
                right: Right::Admin,
            }])),
            _ => Err(AuthError::Invalid("bad signature".into())),
        }
    }
}

fn errors(net: &Net<impl Authenticator>, i: usize) -> Vec<ErrorCode> {
    net.nodes[i]
        .down
        .frames
        .iter()
        .filter_map(|m| match m {
            Message::Error(e) => Some(e.code()),
            _ => None,
        })
        .collect()
}

/// Replicas 1 and 2 with `shared` open, connected and caught up.
fn two_online(net: &mut Net<impl Authenticator>) -> (usize, usize) {
    let a = net.add(1, "");
    let b = net.add(2, "");
    for i in [a, b] {
        net.open(i, "shared");
        net.connect(i);
    }
    net.run();
    (a, b)
}

fn db() -> DbName {
    DbName::new("shared").unwrap()
}

#[test]
fn auth_matrix_refuses_with_typed_errors_and_stores_nothing() {
    let mut net = Net::new(Tokens);
    let anon = net.add(1, "");
    let forged = net.add(2, "forged");
    let reader = net.add(3, "reader");
    let other = net.add(4, "other");
    let writer = net.add(5, "writer");
    for i in [anon, forged, reader, other, writer] {
        net.open(i, "shared");
        net.connect(i);
    }
    net.run();
    assert_eq!(errors(&net, anon), [ErrorCode::Unauthorized]);
    assert_eq!(errors(&net, forged), [ErrorCode::Unauthorized]);
    assert!(
        net.nodes[anon].peer.is_none(),
        "refused connections are closed"
    );
    assert_eq!(errors(&net, other), [ErrorCode::Forbidden]);
    assert!(errors(&net, reader).is_empty(), "a reader may subscribe");

    // A reader that pushes is refused; nothing is stored.
    net.nodes[reader]
        .client
        .update(&db(), &DocId::new("x").unwrap(), &json!({"a": 1}))
        .unwrap();
    net.run();
    assert_eq!(errors(&net, reader), [ErrorCode::Forbidden]);
    assert!(net.server_store.load_now(&db()).unwrap().entries.is_empty());
    assert!(net.nodes[reader].events.iter().any(|e| matches!(
        e,
        ClientEvent::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    )));

    // The writer's push is stored and reaches the reader.
    net.nodes[writer]
        .client
        .update(&db(), &DocId::new("y").unwrap(), &json!({"b": 2}))
        .unwrap();
    net.run();
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 1);
    let r = net.nodes[reader].client.database(&db()).unwrap();
    assert_eq!(r.get(&DocId::new("y").unwrap()), Some(json!({"b": 2})));
}

#[test]
fn messages_before_hello_and_a_second_hello_close_the_connection() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    net.nodes[a].peer = Some(net.server.connect());
    net.raw(
        a,
        protocol::encode(&Message::Subscribe(Box::new(Subscribe {
            horizon: None,
            db: db(),
            since: VersionVector::new(),
            req: 1,
        }))),
    );
    net.run();
    assert_eq!(errors(&net, a), [ErrorCode::ProtocolViolation]);
    assert!(net.nodes[a].peer.is_none());

    let b = net.add(2, "");
    net.connect(b);
    net.run();
    net.raw(
        b,
        protocol::encode(&Message::Hello(Box::new(Hello::signed(
            &Identity::from_seed([2; 32]),
            String::new(),
            "",
            0,
        )))),
    );
    net.run();
    assert_eq!(errors(&net, b), [ErrorCode::ProtocolViolation]);
}

fn entry_of(author: u8, counter: u64, as_replica: u8) -> Entry {
    let mut d = syncline_core::database::Database::new(
        db(),
        Identity::from_seed([author; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let mut last = None;
    for k in 0..counter {
        last = d
            .update(&DocId::new("doc").unwrap(), &json!({ "k": k }))
            .unwrap();
    }
    let mut e = last.unwrap();
    e.dot.replica = Identity::from_seed([as_replica; 32]).replica();
    e
}

#[test]
fn forged_authorship_invalid_changes_and_gaps_are_refused() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    net.open(a, "shared");
    net.connect(a);
    net.run();
    let push = |entries| protocol::encode(&Message::Push(Box::new(Push { db: db(), entries })));

    // Another replica's entry, relabelled as ours: the actor does not match.
    net.raw(a, push(vec![entry_of(9, 1, 1)]));
    // Someone else's dot.
    net.raw(a, push(vec![entry_of(9, 1, 9)]));
    // Garbage change bytes.
    let mut garbage = entry_of(1, 1, 1);
    garbage.change = vec![0x85, 0x6f, 0x4a, 0x83, 1, 2, 3];
    net.raw(a, push(vec![garbage]));
    net.run();
    assert_eq!(
        errors(&net, a),
        [
            ErrorCode::InvalidChange,
            ErrorCode::InvalidChange,
            ErrorCode::InvalidChange
        ]
    );
    assert!(net.server_store.load_now(&db()).unwrap().entries.is_empty());

    // A gap: counter 2 before counter 1. The client resubscribes on OutOfOrder.
    net.raw(a, push(vec![entry_of(1, 2, 1)]));
    net.run();
    assert_eq!(errors(&net, a).last(), Some(&ErrorCode::OutOfOrder));
    assert!(net.server_store.load_now(&db()).unwrap().entries.is_empty());
}

#[test]
fn acknowledgement_waits_for_durability() {
    let mut net = Net::new(OpenAccess);
    let (a, b) = two_online(&mut net);
    net.hold_server_persists = true;
    net.reset_traffic();
    net.nodes[a]
        .client
        .update(&db(), &DocId::new("x").unwrap(), &json!({"v": 1}))
        .unwrap();
    net.run();
    assert_eq!(net.pending_server_persists(), 1);
    assert!(
        !net.nodes[a]
            .down
            .frames
            .iter()
            .any(|m| matches!(m, Message::Ack(_))),
        "no ack before the store says durable"
    );
    assert!(
        net.nodes[b].down.frames.is_empty(),
        "no fan-out of undurable entries"
    );
    assert_eq!(net.nodes[a].client.acked(&db()), 0);
    assert!(!net.nodes[a].client.is_synced(&db()));

    net.flush_server();
    net.run();
    assert_eq!(net.nodes[a].client.acked(&db()), 1);
    assert!(net.nodes[a].client.is_synced(&db()));
    assert!(net.nodes[a].events.contains(&ClientEvent::Acked {
        db: db(),
        counter: 1
    }));
    let got = net.nodes[b]
        .client
        .database(&db())
        .unwrap()
        .get(&DocId::new("x").unwrap());
    assert_eq!(got, Some(json!({"v": 1})));
}

#[test]
fn a_failed_write_is_not_acknowledged_and_is_pushed_again() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    net.open(a, "shared");
    net.connect(a);
    net.run();
    net.hold_server_persists = true;
    net.nodes[a]
        .client
        .update(&db(), &DocId::new("x").unwrap(), &json!({"v": 1}))
        .unwrap();
    net.run();
    // The disk fails: the batch is dropped, the sender told.
    net.drop_server_persists();
    net.server.persist_failed(&db(), 0, "disk full");
    net.route_server();
    net.hold_server_persists = false;
    net.run();
    assert!(errors(&net, a).contains(&ErrorCode::Internal));
    assert_eq!(net.nodes[a].client.acked(&db()), 0);
    // On reconnect the client pushes it again and it is stored.
    net.disconnect(a);
    net.connect(a);
    net.run();
    assert_eq!(net.nodes[a].client.acked(&db()), 1);
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 1);
}

#[test]
fn presence_is_broadcast_and_cleared_on_leave() {
    let mut net = Net::new(OpenAccess);
    let (a, b) = two_online(&mut net);
    net.nodes[a]
        .client
        .set_presence(&db(), br#"{"name":"ada"}"#.to_vec())
        .unwrap();
    net.run();
    let seen = net.nodes[b].client.presence(&db());
    assert_eq!(seen.online, 2);
    // b published no state: it is counted, not listed.
    assert_eq!(seen.peers.len(), 1);
    let ada = seen
        .peers
        .iter()
        .find(|p| p.replica == Identity::from_seed([1; 32]).replica())
        .unwrap();
    assert_eq!(ada.state.as_deref(), Some(&br#"{"name":"ada"}"#[..]));
    // Presence is never stored.
    assert!(net.server_store.load_now(&db()).unwrap().entries.is_empty());
    // A state over the limit is refused locally; the connection lives on.
    let huge = vec![b'x'; syncline_core::protocol::MAX_PRESENCE_LEN + 1];
    assert!(matches!(
        net.nodes[a].client.set_presence(&db(), huge),
        Err(syncline_core::sync::ClientError::PresenceTooLarge { .. })
    ));
    net.run();
    assert_eq!(net.nodes[a].client.status(), Status::Online);

    net.disconnect(a);
    net.run();
    let seen = net.nodes[b].client.presence(&db());
    assert_eq!(seen.online, 1);
    assert!(
        seen.peers
            .iter()
            .all(|p| p.replica != Identity::from_seed([1; 32]).replica())
    );
    assert_eq!(net.nodes[a].client.status(), Status::Offline);

    // A late joiner sees the current state in full.
    net.nodes[b]
        .client
        .set_presence(&db(), br#"{"name":"bob"}"#.to_vec())
        .unwrap();
    net.run();
    net.connect(a);
    net.run();
    let seen = net.nodes[a].client.presence(&db());
    assert_eq!(seen.online, 2);
    assert_eq!(seen.peers.len(), 2);
}

#[test]
fn synced_waits_until_the_reply_is_durable_locally() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    let b = net.add(2, "");
    net.open(a, "shared");
    net.connect(a);
    let doc = DocId::new("todo").unwrap();
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"title": "milk"}))
        .unwrap();
    net.run();
    assert!(net.nodes[a].client.is_synced(&db()));
    // b catches up, but its store has not written the reply yet.
    net.hold_client_persists = true;
    net.open(b, "shared");
    net.connect(b);
    net.run();
    let synced = |net: &Net<OpenAccess>| {
        net.nodes[b]
            .events
            .iter()
            .filter(|e| matches!(e, ClientEvent::Synced { .. }))
            .count()
    };
    assert_eq!(
        net.nodes[b].client.database(&db()).unwrap().get(&doc),
        Some(json!({"title": "milk"}))
    );
    assert!(!net.nodes[b].client.is_synced(&db()));
    assert_eq!(synced(&net), 0);
    // A live update arrives (and waits for b's store) before the reply is
    // durable: the reply alone being durable is enough.
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"title": "soy milk"}))
        .unwrap();
    net.flush_client(a);
    net.run();
    assert_eq!(
        net.nodes[b].client.database(&db()).unwrap().get(&doc),
        Some(json!({"title": "soy milk"}))
    );
    assert!(!net.nodes[b].client.is_synced(&db()));
    assert!(net.flush_client_one(b));
    assert!(net.nodes[b].client.is_synced(&db()));
    assert_eq!(synced(&net), 1);
    net.flush_client(b);
    // Once synced, a live update that is not yet durable does not un-sync.
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"title": "oat milk"}))
        .unwrap();
    net.flush_client(a);
    net.run();
    assert_eq!(
        net.nodes[b].client.database(&db()).unwrap().get(&doc),
        Some(json!({"title": "oat milk"}))
    );
    assert!(net.nodes[b].client.is_synced(&db()));
    assert_eq!(synced(&net), 1);
}

fn config_with_views() -> ClientConfig {
    ClientConfig {
        keep_views: true,
        view_refresh_entries: 3,
        ..ClientConfig::default()
    }
}

#[test]
fn views_ride_along_every_few_entries_and_on_request() {
    let mut c = Client::new(
        Identity::from_seed([1; 32]).replica(),
        "",
        config_with_views(),
    );
    c.open(db(), StoredDatabase::default());
    let put = |c: &mut Client, doc: &str, n: i64| -> Vec<String> {
        let id = DocId::new(doc).unwrap();
        c.update(&db(), &id, &json!({"n": n})).unwrap();
        c.take_outputs()
            .into_iter()
            .flat_map(|o| match o {
                ClientOutput::Persist { views, .. } => views,
                _ => Vec::new(),
            })
            .map(|v| format!("{}={}", v.doc, v.json.unwrap_or_default()))
            .collect()
    };
    assert!(put(&mut c, "a", 1).is_empty());
    assert!(put(&mut c, "b", 1).is_empty());
    // The third entry refreshes the views of everything changed so far.
    assert_eq!(put(&mut c, "a", 2), ["a={\"n\":2}", "b={\"n\":1}"]);
    assert!(put(&mut c, "c", 1).is_empty());
    let flushed: Vec<String> = c
        .take_views(&db())
        .into_iter()
        .map(|v| v.doc.to_string())
        .collect();
    assert_eq!(flushed, ["c"]);
    assert!(c.take_views(&db()).is_empty());
    // Reopened from a store with no views: every document gets one.
    let stored = StoredDatabase {
        entries: c
            .database(&db())
            .unwrap()
            .log()
            .entries()
            .cloned()
            .collect(),
        ..StoredDatabase::default()
    };
    let mut again = Client::new(
        Identity::from_seed([1; 32]).replica(),
        "",
        config_with_views(),
    );
    again.open(db(), stored);
    let mut docs: Vec<String> = again
        .take_views(&db())
        .into_iter()
        .map(|v| v.doc.to_string())
        .collect();
    docs.sort();
    assert_eq!(docs, ["a", "b", "c"]);
    // Without keep_views there are none.
    let mut plain = Client::new(
        Identity::from_seed([2; 32]).replica(),
        "",
        ClientConfig::default(),
    );
    plain.open(db(), StoredDatabase::default());
    for i in 0..100 {
        assert!(put(&mut plain, "a", i).is_empty());
    }
    assert!(plain.take_views(&db()).is_empty());
}

#[test]
fn offline_edits_merge_on_reconnect() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    let b = net.add(2, "");
    for i in [a, b] {
        net.open(i, "shared");
        net.connect(i);
    }
    let doc = DocId::new("todo").unwrap();
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"title": "milk", "done": false}))
        .unwrap();
    net.run();
    net.disconnect(a);
    net.disconnect(b);
    net.nodes[a]
        .client
        .update(&db(), &doc, &json!({"title": "milk", "done": true}))
        .unwrap();
    net.nodes[b]
        .client
        .update(&db(), &doc, &json!({"title": "oat milk", "done": false}))
        .unwrap();
    net.run();
    net.connect(a);
    net.connect(b);
    net.run();
    // b saw a's edit live only if it subscribed before; reconnect both once more.
    net.run();
    for i in [a, b] {
        let d = net.nodes[i].client.database(&db()).unwrap();
        assert_eq!(
            d.get(&doc),
            Some(json!({"title": "oat milk", "done": true}))
        );
    }
    let dot = Dot {
        replica: Identity::from_seed([1; 32]).replica(),
        counter: 2,
    };
    assert!(net.server.log(&db()).unwrap().get(&dot).is_some());
}

#[test]
fn only_admin_tokens_list_databases() {
    let mut net = Net::new(Tokens);
    let writer = net.add(1, "writer");
    let admin = net.add(2, "other"); // admin on other-*
    for (i, name) in [(writer, "shared"), (admin, "other-1")] {
        net.open(i, name);
        net.connect(i);
    }
    net.run();
    net.nodes[writer]
        .client
        .update(&db(), &DocId::new("x").unwrap(), &json!({"a": 1}))
        .unwrap();
    net.nodes[admin]
        .client
        .update(
            &DbName::new("other-1").unwrap(),
            &DocId::new("x").unwrap(),
            &json!({"a": 1}),
        )
        .unwrap();
    net.run();
    let req = net.nodes[admin].client.list_databases();
    let w = net.nodes[writer].client.list_databases();
    net.run();
    assert!(net.nodes[admin].events.contains(&ClientEvent::Databases {
        req,
        names: vec![DbName::new("other-1").unwrap()],
    }));
    assert!(
        !net.nodes[writer]
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::Databases { req, .. } if *req == w))
    );
    assert_eq!(errors(&net, writer), [ErrorCode::Forbidden]);
}

/// An open-access network whose server announces `max_frame`.
fn net_with_max_frame(max_frame: usize) -> Net<OpenAccess> {
    Net::with_config(
        OpenAccess,
        syncline_core::sync::ServerConfig {
            replica: ReplicaId([0xEE; 16]),
            max_frame,
            ..Default::default()
        },
    )
}

/// Text that automerge cannot compress, `len` characters from `seed`.
fn noise(seed: u64, len: usize) -> String {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

#[test]
fn offline_backlog_is_pushed_in_frames_under_the_servers_limit() {
    let max_frame = 64 * 1024;
    let mut net = net_with_max_frame(max_frame);
    let a = net.add(1, "");
    net.open(a, "shared");
    // 40 changes of ~8 KB written offline: 320 KB, five times the limit.
    for k in 0..40u64 {
        let doc = DocId::new(format!("d{k}")).unwrap();
        net.nodes[a]
            .client
            .update(&db(), &doc, &json!({"blob": noise(k + 1, 8_000)}))
            .unwrap();
    }
    net.run();
    net.connect(a);
    net.run();
    assert_eq!(errors(&net, a), vec![], "no push was refused");
    let pushes: Vec<usize> = net.nodes[a]
        .up
        .frames
        .iter()
        .filter_map(|m| match m {
            Message::Push(_) => Some(protocol::encode(m).len()),
            _ => None,
        })
        .collect();
    assert!(pushes.len() >= 5, "cut into several pushes: {pushes:?}");
    assert!(pushes.iter().all(|&len| len <= max_frame), "{pushes:?}");
    assert_eq!(net.nodes[a].client.acked(&db()), 40);
    assert!(net.nodes[a].client.is_synced(&db()));

    // A change no frame can carry is reported once, stays local, and does
    // not cost the connection; the backlog before it is acknowledged.
    let big = DocId::new("big").unwrap();
    net.nodes[a]
        .client
        .update(&db(), &big, &json!({"blob": noise(99, 200_000)}))
        .unwrap();
    net.nodes[a]
        .client
        .update(&db(), &DocId::new("after").unwrap(), &json!({"n": 1}))
        .unwrap();
    net.run();
    let too_large: Vec<_> = net.nodes[a]
        .events
        .iter()
        .filter(|e| {
            matches!(e, ClientEvent::Error { db: Some(d), code: ErrorCode::TooLarge, .. } if *d == db())
        })
        .collect();
    assert_eq!(too_large.len(), 1, "{:?}", net.nodes[a].events);
    assert_eq!(net.nodes[a].client.acked(&db()), 40);
    assert!(!net.nodes[a].client.is_synced(&db()));
    assert_eq!(net.nodes[a].client.status(), Status::Online);
    assert_eq!(errors(&net, a), vec![]);
}

#[test]
fn a_live_delta_in_several_parts_does_not_look_like_a_gap() {
    let mut net = net_with_max_frame(64 * 1024);
    let (a, b) = two_online(&mut net);
    // Several pushes made durable in one group commit: their fan-out is one
    // live delta cut into parts, each carrying the vector after the last.
    net.hold_server_persists = true;
    for k in 0..20u64 {
        let doc = DocId::new(format!("d{k}")).unwrap();
        net.nodes[a]
            .client
            .update(&db(), &doc, &json!({"blob": noise(k + 7, 8_000)}))
            .unwrap();
        net.run();
    }
    net.reset_traffic();
    net.flush_server_together();
    net.hold_server_persists = false;
    net.run();
    let parts = net.nodes[b]
        .down
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Delta(d) if d.req == 0))
        .count();
    assert!(parts > 1, "the fan-out came in {parts} part(s)");
    let resubscribes = net.nodes[b]
        .up
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Subscribe(_)))
        .count();
    assert_eq!(
        resubscribes, 0,
        "parts handled one by one caused a resubscribe"
    );
    let d = net.nodes[b].client.database(&db()).unwrap();
    assert_eq!(d.list().len(), 20);
}

/// A reply to Subscribe is handed out unencoded, holding a share of the log
/// (no copy, no outbox bytes): the adapter encodes it part by part as the
/// connection drains. It answers for the log as it was when asked, however
/// much the log grows before it is sent.
#[test]
fn a_subscribe_reply_shares_the_log_as_it_was_when_asked() {
    let mut net = Net::new(OpenAccess);
    let (a, b) = two_online(&mut net);
    let write = |net: &mut Net<OpenAccess>, range: std::ops::Range<u64>| {
        for i in range {
            let id = DocId::new(format!("doc-{i}")).unwrap();
            let body = json!({ "text": common::incompressible(500, i), "i": i });
            net.nodes[a].client.update(&db(), &id, &body).unwrap();
        }
        net.route_client(a);
        net.run();
    };
    write(&mut net, 0..20);
    assert_eq!(net.server.outbox_bytes(), 0);
    let vv_then = net.server.log(&db()).unwrap().vv().clone();
    let peer = net.nodes[b].peer.unwrap();
    for req in [7, 8, 9] {
        net.server.handle(
            peer,
            Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: db(),
                since: VersionVector::new(),
                req,
            })),
        );
    }
    // Three replies of the whole database cost no encoded bytes.
    assert_eq!(net.server.outbox_bytes(), 0);
    let mut replies: Vec<_> = net
        .server
        .take_outputs()
        .into_iter()
        .filter_map(|o| match o {
            ServerOutput::Reply { peer: to, reply } if to == peer => Some(reply),
            _ => None,
        })
        .collect();
    assert_eq!(replies.len(), 3);
    let left = replies[0].bytes_left();
    assert!(left > 20 * 500, "{left}");
    // The log moves on before the replies are sent.
    write(&mut net, 20..30);
    assert_ne!(net.server.log(&db()).unwrap().vv(), &vv_then);
    for reply in replies {
        let mut entries = 0;
        let frames = reply.frames();
        for (i, frame) in frames.iter().enumerate() {
            let Message::Delta(d) = protocol::decode(frame, usize::MAX).unwrap() else {
                panic!("a reply part that is not a Delta");
            };
            assert_eq!((d.part as usize, d.last), (i, i + 1 == frames.len()));
            // The vector rides in the last part only.
            if d.last {
                assert_eq!(d.vv, vv_then);
            } else {
                assert!(d.vv.is_empty());
            }
            entries += d.entries.len();
        }
        assert_eq!(entries, 20);
    }
}

/// `heartbeat` pings while connected and reports a connection on which
/// nothing has arrived since its previous ping as dead.
#[test]
fn heartbeat_detects_a_silent_connection() {
    let mut net = Net::new(OpenAccess);
    let (a, _) = two_online(&mut net);
    assert!(net.nodes[a].client.heartbeat());
    net.route_client(a);
    net.run();
    assert!(
        net.nodes[a]
            .down
            .frames
            .iter()
            .any(|m| matches!(m, Message::Pong { .. })),
        "the server answers the ping"
    );
    assert!(net.nodes[a].client.heartbeat(), "a Pong came back: alive");
    // This ping (and anything else) is lost: the network went away.
    let _ = net.nodes[a].client.take_outputs();
    assert!(
        !net.nodes[a].client.heartbeat(),
        "nothing heard since: dead"
    );
    // A new connection starts afresh.
    net.disconnect(a);
    assert!(net.nodes[a].client.heartbeat(), "offline: nothing to probe");
    net.connect(a);
    net.run();
    assert!(net.nodes[a].client.heartbeat());
}

/// A client whose own frame limit is below the server's accepts what the
/// server announced it may send, instead of dropping the connection at
/// every large frame (a reconnect loop).
#[test]
fn a_client_accepts_frames_up_to_the_servers_announced_limit() {
    let mut net = Net::with_config(
        OpenAccess,
        syncline_core::sync::ServerConfig {
            replica: ReplicaId([0xEE; 16]),
            max_frame: 4 << 20,
            ..Default::default()
        },
    );
    let small = ClientConfig {
        max_frame: 64 << 10,
        ..ClientConfig::default()
    };
    let reader = net.add_with(1, "", small);
    let writer = net.add(2, "");
    for i in [reader, writer] {
        net.open(i, "shared");
        net.connect(i);
    }
    net.run();
    let text = common::incompressible(300_000, 1);
    let id = DocId::new("big").unwrap();
    net.nodes[writer]
        .client
        .update(&db(), &id, &json!({ "text": text }))
        .unwrap();
    net.route_client(writer);
    net.run();
    assert!(
        net.nodes[reader].down.bytes > 64 << 10,
        "the delta was larger than the reader's own limit"
    );
    assert!(!errors(&net, reader).contains(&ErrorCode::BadFrame));
    let got = net.nodes[reader].client.database(&db()).unwrap().get(&id);
    assert_eq!(got, Some(json!({ "text": text })));
}

/// A server holding an entry this replica cannot apply: the client asks
/// once more (a part may have gone missing), then reports instead of
/// resubscribing in a tight loop.
#[test]
fn an_entry_the_client_cannot_apply_does_not_loop_subscriptions() {
    let mut net = Net::new(OpenAccess);
    let bad = Entry {
        dot: Dot {
            replica: Identity::from_seed([7; 32]).replica(),
            counter: 1,
        },
        doc: DocId::new("broken").unwrap(),
        change: vec![0xde, 0xad, 0xbe, 0xef],
    };
    net.server_store
        .write_now(&db(), &syncline_core::Batch::entries(vec![bad]))
        .unwrap();
    let a = net.add(1, "");
    net.open(a, "shared");
    net.connect(a);
    let mut settled = false;
    for _ in 0..200 {
        if !net.step() {
            settled = true;
            break;
        }
    }
    assert!(settled, "the client kept resubscribing");
    let subscribes = net.nodes[a]
        .up
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Subscribe(_)))
        .count();
    assert!(subscribes <= 2, "{subscribes} subscribes");
    assert!(net.nodes[a].events.iter().any(|e| matches!(
        e,
        ClientEvent::Error { code: ErrorCode::InvalidChange, message, .. }
            if message.contains("not asking")
    )));
}

/// Two clients using one replica id (a copied profile, or one impersonating
/// another) push different changes under the same counter: the server keeps
/// the first and refuses the second with a typed error instead of
/// acknowledging it as a resend.
#[test]
fn a_different_change_under_a_held_dot_is_refused() {
    let mut net = Net::new(OpenAccess);
    let a = net.add(1, "");
    let twin = net.add(1, "");
    for i in [a, twin] {
        net.open(i, "shared");
        net.connect(i);
    }
    net.run();
    let (x, y) = (DocId::new("x").unwrap(), DocId::new("y").unwrap());
    net.nodes[a]
        .client
        .update(&db(), &x, &json!({ "by": "a" }))
        .unwrap();
    net.nodes[twin]
        .client
        .update(&db(), &y, &json!({ "by": "twin" }))
        .unwrap();
    net.run();
    assert!(errors(&net, twin).contains(&ErrorCode::InvalidChange));
    assert!(!errors(&net, a).contains(&ErrorCode::InvalidChange));
    let stored = net.server_store.load_now(&db()).unwrap();
    assert_eq!(stored.entries.len(), 1);
    assert_eq!(stored.entries[0].doc, x);
    // A plain resend of the held change is still acknowledged.
    let held = stored.entries[0].clone();
    let peer = net.nodes[a].peer.unwrap();
    net.server.handle(
        peer,
        Message::Push(Box::new(Push {
            db: db(),
            entries: vec![held],
        })),
    );
    let outs = net.server.take_outputs();
    assert!(outs.iter().any(|o| matches!(
        o,
        syncline_core::sync::ServerOutput::Send {
            msg: Message::Ack(_),
            ..
        }
    )));
}

/// The server failed to store a push (`Internal`): the client sends it
/// again at its next heartbeat instead of waiting for a reconnect.
#[test]
fn a_push_the_server_failed_to_store_is_sent_again() {
    let mut net = Net::new(OpenAccess);
    let (a, _) = two_online(&mut net);
    net.hold_server_persists = true;
    let id = DocId::new("x").unwrap();
    net.nodes[a]
        .client
        .update(&db(), &id, &json!({ "v": 1 }))
        .unwrap();
    net.run();
    assert_eq!(net.pending_server_persists(), 1);
    net.fail_server_persists();
    net.run();
    assert!(errors(&net, a).contains(&ErrorCode::Internal));
    assert_eq!(net.nodes[a].client.acked(&db()), 0);
    net.hold_server_persists = false;
    assert!(net.nodes[a].client.heartbeat());
    net.run();
    assert_eq!(net.nodes[a].client.acked(&db()), 1, "stored on the retry");
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 1);
}

/// The server's disk is behind (more than `max_pending_bytes` accepted but
/// not yet durable): pushes are refused (`Internal`, the connection stays),
/// the server's memory stays bounded, and the client sends them again at
/// its next heartbeat.
#[test]
fn pushes_beyond_the_pending_bytes_are_refused_then_sent_again() {
    let config = syncline_core::sync::ServerConfig {
        max_pending_bytes: 1,
        ..Default::default()
    };
    let mut net = Net::with_config(OpenAccess, config);
    let (a, _) = two_online(&mut net);
    net.hold_server_persists = true;
    let id = DocId::new("x").unwrap();
    for v in [1, 2] {
        net.nodes[a]
            .client
            .update(&db(), &id, &json!({ "v": v }))
            .unwrap();
        net.run();
    }
    assert_eq!(
        net.pending_server_persists(),
        1,
        "the second push was refused"
    );
    assert_eq!(errors(&net, a), [ErrorCode::Internal]);
    assert!(net.nodes[a].peer.is_some(), "still connected");
    net.hold_server_persists = false;
    net.flush_server();
    net.run();
    assert_eq!(net.nodes[a].client.acked(&db()), 1);
    assert!(net.nodes[a].client.heartbeat());
    net.run();
    assert_eq!(net.nodes[a].client.acked(&db()), 2, "stored on the retry");
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 2);
}

/// A database over its quota refuses pushes with `TooLarge` and stores
/// nothing of them; the client keeps its changes and pushes them again at
/// its next heartbeat instead of dropping them.
#[test]
fn a_database_over_its_quota_refuses_pushes_and_the_client_keeps_them() {
    let config = syncline_core::sync::ServerConfig {
        max_database_bytes: 2_000,
        ..Default::default()
    };
    let mut net = Net::with_config(OpenAccess, config);
    let (a, _) = two_online(&mut net);
    for i in 0..3 {
        let id = DocId::new(format!("doc-{i}")).unwrap();
        let body = json!({ "text": common::incompressible(1_500, i) });
        net.nodes[a].client.update(&db(), &id, &body).unwrap();
        net.run();
    }
    // Two pushes fit under 2,000 bytes before them; the third does not.
    assert_eq!(errors(&net, a), [ErrorCode::TooLarge]);
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 2);
    assert_eq!(net.nodes[a].client.acked(&db()), 2);
    assert!(net.nodes[a].peer.is_some(), "still connected");
    let d = net.nodes[a].client.database(&db()).unwrap();
    assert_eq!(d.list().len(), 3, "the refused change is kept locally");
    // Pushed again at the heartbeat (and refused again: still full).
    assert!(net.nodes[a].client.heartbeat());
    net.run();
    assert_eq!(errors(&net, a), [ErrorCode::TooLarge, ErrorCode::TooLarge]);
    assert_eq!(net.server_store.load_now(&db()).unwrap().entries.len(), 2);
}

struct Expiring;

impl Authenticator for Expiring {
    fn authenticate(&self, _token: &str) -> Result<Grants, AuthError> {
        Ok(Grants::all().until(Some(100)))
    }
}

/// `Server::expire` ends connections whose token expired, with a typed
/// refusal; the others stay.
#[test]
fn connections_end_when_their_token_expires() {
    let mut net = Net::new(Expiring);
    let (a, _) = two_online(&mut net);
    net.server.expire(99);
    net.route_server();
    net.run();
    assert!(errors(&net, a).is_empty());
    assert!(net.nodes[a].peer.is_some());
    net.server.expire(100);
    net.route_server();
    net.run();
    assert!(errors(&net, a).contains(&ErrorCode::Unauthorized));
    assert!(net.nodes[a].peer.is_none(), "closed");
    assert_eq!(net.server.connections(), 0);
}

/// A Subscribe the server could not load the database for (its store or
/// engine failed: `Internal`) is reported and asked again at the next
/// heartbeat, so the database syncs without a reconnect.
#[test]
fn a_failed_load_is_retried_at_the_next_heartbeat() {
    let mut net = Net::new(OpenAccess);
    net.fail_loads = 1;
    let a = net.add(1, "");
    net.open(a, "shared");
    net.connect(a);
    net.run();
    assert_eq!(errors(&net, a), vec![ErrorCode::Internal]);
    let synced = |net: &Net<OpenAccess>| {
        net.nodes[a]
            .events
            .iter()
            .any(|e| matches!(e, ClientEvent::Synced { .. }))
    };
    assert!(!synced(&net), "not synced after the failed load");
    assert!(
        net.nodes[a].events.iter().any(|e| matches!(
            e,
            ClientEvent::Error { code: ErrorCode::Internal, db: Some(d), .. } if *d == db()
        )),
        "the application is told"
    );
    assert!(net.nodes[a].client.heartbeat());
    net.run();
    assert!(synced(&net), "synced once the load worked");
    let subscribes = net.nodes[a]
        .up
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Subscribe(_)))
        .count();
    assert_eq!(subscribes, 2);
    // A later heartbeat does not subscribe again.
    assert!(net.nodes[a].client.heartbeat());
    net.run();
    let again = net.nodes[a]
        .up
        .frames
        .iter()
        .filter(|m| matches!(m, Message::Subscribe(_)))
        .count();
    assert_eq!(again, 2);
}
