//! No client writes under a replica id it does not own (issue 30, part 1):
//! `Hello` must prove the replica's key, and a captured `Hello` cannot be
//! used again. The victim's offline edits arrive intact whatever an
//! attacker sent meanwhile.

mod common;

use common::Net;
use serde_json::json;
use syncline_core::clock::Dot;
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{self, ErrorCode, Hello, Message, Push, Subscribe};
use syncline_core::sync::{OpenAccess, ServerConfig};
use syncline_core::{Database, Identity};

const VICTIM: usize = 0;
const OBSERVER: usize = 1;
const ATTACKER: usize = 2;

fn db() -> DbName {
    DbName::new("shared").unwrap()
}

fn doc() -> DocId {
    DocId::new("note").unwrap()
}

/// The victim has written `{"v": 1}` (synced) and then `{"v": 2}` offline.
fn victim_with_offline_edit() -> Net<OpenAccess> {
    let mut net = Net::new(OpenAccess);
    for n in [1, 2, 3] {
        net.add(n, "");
    }
    net.open(VICTIM, "shared");
    net.open(OBSERVER, "shared");
    net.connect(VICTIM);
    net.connect(OBSERVER);
    net.run();
    net.nodes[VICTIM]
        .client
        .update(&db(), &doc(), &json!({"v": 1}))
        .unwrap();
    net.run();
    net.disconnect(VICTIM);
    net.nodes[VICTIM]
        .client
        .update(&db(), &doc(), &json!({"v": 2}))
        .unwrap();
    net.run();
    net
}

/// Send raw frames from a fresh connection of the attacker's node and
/// return what the server answered.
fn attack(net: &mut Net<OpenAccess>, frames: Vec<Vec<u8>>) -> Vec<Message> {
    let peer = net.server.connect();
    let n = &mut net.nodes[ATTACKER];
    n.peer = Some(peer);
    n.down.frames.clear();
    for f in frames {
        net.raw(ATTACKER, f);
    }
    net.run();
    net.nodes[ATTACKER].down.frames.clone()
}

fn refused(answers: &[Message], why: &str) {
    assert!(
        !answers.iter().any(|m| matches!(m, Message::Welcome(_))),
        "{answers:?}"
    );
    let err = answers.iter().find_map(|m| match m {
        Message::Error(e) => Some(e),
        _ => None,
    });
    let err = err.unwrap_or_else(|| panic!("no error in {answers:?}"));
    assert_eq!(ErrorCode::from_u16(err.code), ErrorCode::Unauthorized);
    assert!(err.message.contains(why), "{}", err.message);
}

/// A forged push under the victim's next counter, made by a replica
/// database that uses the victim's id as its actor.
fn forged_push(net: &Net<OpenAccess>) -> Vec<Vec<u8>> {
    let victim = net.nodes[VICTIM].identity.replica();
    let mut fake = Database::new(db(), victim, automerge::TextEncoding::UnicodeCodePoint);
    let first = fake
        .update(&doc(), &json!({"v": "forged"}))
        .unwrap()
        .unwrap();
    let forged = Entry {
        dot: Dot {
            replica: victim,
            counter: 2,
        },
        ..first
    };
    let subscribe = Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: db(),
        since: Default::default(),
        req: 1,
    }));
    let push = Message::Push(Box::new(Push {
        db: db(),
        entries: vec![forged],
    }));
    vec![protocol::encode(&subscribe), protocol::encode(&push)]
}

fn observer_sees(net: &Net<OpenAccess>) -> Option<serde_json::Value> {
    net.nodes[OBSERVER]
        .client
        .database(&db())
        .unwrap()
        .get(&doc())
}

fn victim_reconnects_and_its_edit_arrives(net: &mut Net<OpenAccess>) {
    net.connect(VICTIM);
    net.run();
    assert_eq!(observer_sees(net), Some(json!({"v": 2})));
    let victim = net.nodes[VICTIM].identity.replica();
    assert_eq!(net.nodes[VICTIM].client.acked(&db()), 2);
    assert!(
        net.nodes[OBSERVER]
            .client
            .database(&db())
            .unwrap()
            .vv()
            .get(&victim)
            == 2
    );
}

#[test]
fn a_hello_for_another_replica_with_ones_own_key_is_refused() {
    let mut net = victim_with_offline_edit();
    let attacker = Identity::from_seed([66; 32]);
    let victim = net.nodes[VICTIM].identity.replica();
    let mut hello = Hello::signed(&attacker, "", "", 0);
    hello.replica = victim;
    let mut frames = vec![protocol::encode(&Message::Hello(Box::new(hello)))];
    frames.extend(forged_push(&net));
    let answers = attack(&mut net, frames);
    refused(&answers, "not derived from the key");
    // Nothing was stored under the victim's id: the observer still sees
    // the victim's last synced state, and the victim's edit arrives.
    assert_eq!(observer_sees(&net), Some(json!({"v": 1})));
    victim_reconnects_and_its_edit_arrives(&mut net);
}

#[test]
fn the_victims_public_key_with_another_signature_is_refused() {
    let mut net = victim_with_offline_edit();
    let attacker = Identity::from_seed([66; 32]);
    let victim = &net.nodes[VICTIM].identity;
    let mut hello = Hello::signed(&attacker, "", "", 0);
    hello.replica = victim.replica();
    hello.proof.key = victim.public_key();
    let mut frames = vec![protocol::encode(&Message::Hello(Box::new(hello)))];
    frames.extend(forged_push(&net));
    let answers = attack(&mut net, frames);
    refused(&answers, "does not verify");
    assert_eq!(observer_sees(&net), Some(json!({"v": 1})));
    victim_reconnects_and_its_edit_arrives(&mut net);
}

#[test]
fn a_captured_hello_cannot_be_replayed() {
    let mut net = victim_with_offline_edit();
    // The victim connects; its Hello is captured on the way.
    net.connect(VICTIM);
    let captured = net.nodes[VICTIM].to_server.front().cloned().unwrap();
    assert!(matches!(
        protocol::decode_hello(&captured),
        Ok(Hello { .. })
    ));
    net.run();
    assert_eq!(observer_sees(&net), Some(json!({"v": 2})));
    net.disconnect(VICTIM);
    let mut frames = vec![captured];
    frames.extend(forged_push(&net));
    let answers = attack(&mut net, frames);
    refused(&answers, "replay");
    assert_eq!(observer_sees(&net), Some(json!({"v": 2})));
    // The victim writes on; its next edit takes counter 3 as its own.
    net.nodes[VICTIM]
        .client
        .update(&db(), &doc(), &json!({"v": 3}))
        .unwrap();
    net.connect(VICTIM);
    net.run();
    assert_eq!(observer_sees(&net), Some(json!({"v": 3})));
    assert_eq!(net.nodes[VICTIM].client.acked(&db()), 3);
}

#[test]
fn a_hello_signed_for_another_host_or_time_is_refused() {
    let me = Identity::from_seed([5; 32]);
    let now = 1_800_000_000_000;
    let try_hello = |config: ServerConfig, dialled: Option<&str>, hello: Hello| {
        let mut server = syncline_core::sync::Server::new(config, OpenAccess);
        server.set_clock(now);
        let p = server.connect_to(dialled);
        server.handle(p, Message::Hello(Box::new(hello)));
        server
            .take_outputs()
            .into_iter()
            .find_map(|o| match o {
                syncline_core::sync::ServerOutput::Send { msg, .. } => Some(msg),
                _ => None,
            })
            .unwrap()
    };
    let welcomed = |m: &Message| matches!(m, Message::Welcome(_));
    let default = ServerConfig::default;
    // The host dialled, as the request's Host header says.
    let ok = try_hello(
        default(),
        Some("Sync.Example:443"),
        Hello::signed(&me, "", "sync.example", now),
    );
    assert!(welcomed(&ok), "{ok:?}");
    let other = try_hello(
        default(),
        Some("sync.example"),
        Hello::signed(&me, "", "evil.example", now),
    );
    refused(&[other], "not this server");
    // Behind a proxy that rewrites Host, the configured names count.
    let named = ServerConfig {
        server_names: vec!["sync.example".into()],
        ..default()
    };
    let ok = try_hello(
        named.clone(),
        Some("10.0.0.7:8080"),
        Hello::signed(&me, "", "sync.example", now),
    );
    assert!(welcomed(&ok), "{ok:?}");
    let other = try_hello(
        named,
        Some("10.0.0.7:8080"),
        Hello::signed(&me, "", "10.0.0.7:8080", now),
    );
    refused(&[other], "not this server");
    // Clocks more than the window apart.
    let late = try_hello(
        default(),
        None,
        Hello::signed(&me, "", "", now - 11 * 60 * 1000),
    );
    refused(&[late], "check the client's clock");
    let early = try_hello(
        default(),
        None,
        Hello::signed(&me, "", "", now + 11 * 60 * 1000),
    );
    refused(&[early], "check the client's clock");
}
