//! Pushed changes are bounded before automerge parses them, parsed off the
//! hub when the adapter asks for it, and resends of held entries are
//! dropped by their bytes without being parsed.

use serde_json::json;
use syncline_core::Identity;
use syncline_core::change_limits::{ChangeLimits, ChangeRefused, inspect};
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{ErrorCode, Hello, Message, Push, Subscribe};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{OpenAccess, PeerId, Server, ServerConfig, ServerOutput, ValidateJob};

fn db() -> DbName {
    DbName::new("pushes").unwrap()
}

/// `n` consecutive entries of replica `r`.
fn entries(r: u8, n: u64) -> Vec<Entry> {
    entries_of(r, n, 1)
}

/// Entries too large to be checked where they arrive (compressed, over
/// 64 KiB in all): they go to a validation job.
fn heavy(r: u8, n: u64) -> Vec<Entry> {
    entries_of(r, n, 40_000)
}

/// `n` consecutive entries of replica `r`, each holding `len` bytes of text.
fn entries_of(r: u8, n: u64, len: usize) -> Vec<Entry> {
    let mut d = syncline_core::database::Database::new(
        db(),
        Identity::from_seed([r; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    (0..n)
        .map(|k| {
            let v = json!({ "t": format!("{k}{}", "x".repeat(len)) });
            // A value each time (as text, each change would be a small diff).
            let values = syncline_core::Strings::Values { text: &[] };
            d.update_with(&DocId::new("doc").unwrap(), &v, values)
                .unwrap()
                .unwrap()
        })
        .collect()
}

struct Hub {
    server: Server<OpenAccess>,
    /// Everything sent, per peer, in order.
    sent: Vec<(PeerId, Message)>,
    jobs: Vec<(PeerId, ValidateJob)>,
    /// Loads not yet carried out (when `hold_loads`).
    loads: Vec<DbName>,
    hold_loads: bool,
}

impl Hub {
    fn new(defer: bool) -> Self {
        let config = ServerConfig {
            defer_validation: defer,
            ..ServerConfig::default()
        };
        Hub {
            server: Server::new(config, OpenAccess),
            sent: Vec::new(),
            jobs: Vec::new(),
            loads: Vec::new(),
            hold_loads: false,
        }
    }

    fn peer(&mut self, r: u8) -> PeerId {
        let p = self.server.connect();
        self.server.handle(
            p,
            Message::Hello(Box::new(Hello::signed(
                &Identity::from_seed([r; 32]),
                String::new(),
                "",
                0,
            ))),
        );
        self.server.handle(
            p,
            Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: db(),
                since: Default::default(),
                req: 1,
            })),
        );
        self.drain();
        p
    }

    fn push(&mut self, p: PeerId, entries: Vec<Entry>) {
        self.server
            .handle(p, Message::Push(Box::new(Push { db: db(), entries })));
        self.drain();
    }

    /// Carry out outputs: load empty databases, make writes durable at
    /// once, keep validation jobs for the test to run.
    fn drain(&mut self) {
        loop {
            let outs = self.server.take_outputs();
            if outs.is_empty() {
                return;
            }
            for o in outs {
                match o {
                    ServerOutput::Send { peer, msg } => self.sent.push((peer, msg)),
                    ServerOutput::Load { db } if self.hold_loads => self.loads.push(db),
                    ServerOutput::Load { db } => self.server.loaded(db, StoredDatabase::default()),
                    ServerOutput::Persist { db, seq, .. } => self.server.persisted(&db, seq),
                    ServerOutput::Validate { peer, job } => self.jobs.push((peer, *job)),
                    _ => {}
                }
            }
        }
    }

    fn run_jobs(&mut self) {
        for (peer, job) in std::mem::take(&mut self.jobs) {
            self.server.validated(peer, job.run());
        }
        self.drain();
    }

    fn kinds(&self, p: PeerId) -> Vec<String> {
        self.sent
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, m)| match m {
                Message::Error(e) => format!("Error({})", e.code()),
                m => m.kind().to_string(),
            })
            .collect()
    }
}

/// A well-formed change of `ops` ops in a few dozen bytes, which automerge
/// parses op by op (`measure_automerge_on_op_bombs`: 4 Mi ops in ~0.5 s).
fn op_bomb(r: u8, ops: u64) -> Entry {
    let mut e = entries(r, 1).remove(0);
    e.change = syncline_core::change_limits::testing::op_bomb(&[r; 16], ops);
    e
}

#[test]
fn a_change_claiming_a_trillion_ops_is_refused_without_parsing() {
    let mut hub = Hub::new(false);
    let a = hub.peer(1);
    let bomb = op_bomb(1, 1 << 40);
    assert!(bomb.change.len() < 200);
    hub.push(a, vec![bomb]);
    let Some((_, Message::Error(e))) = hub.sent.last() else {
        panic!("{:?}", hub.kinds(a))
    };
    assert_eq!(e.code(), ErrorCode::InvalidChange);
    assert!(e.message.contains("over the limit"), "{}", e.message);
    assert!(hub.server.log(&db()).unwrap().entries().count() == 0);
}

#[test]
fn the_limits_are_the_server_s_configuration() {
    let limits = ChangeLimits {
        max_ops: 2,
        ..ChangeLimits::default()
    };
    let mut hub = Hub::new(false);
    hub.server = Server::new(
        ServerConfig {
            change_limits: limits,
            ..ServerConfig::default()
        },
        OpenAccess,
    );
    let a = hub.peer(1);
    let mut d = syncline_core::database::Database::new(
        db(),
        Identity::from_seed([1; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let three = d
        .update(
            &DocId::new("doc").unwrap(),
            &json!({"a": 1, "b": 2, "c": 3}),
        )
        .unwrap()
        .unwrap();
    assert_eq!(
        inspect(&three.change, &limits).unwrap_err(),
        ChangeRefused::OverLimit {
            what: "ops",
            limit: 2
        }
    );
    hub.push(a, vec![three]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
}

#[test]
fn deferred_validation_holds_only_the_sender_and_keeps_its_order() {
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    let b = hub.peer(2);
    let before = hub.sent.len();
    hub.push(a, heavy(1, 3));
    assert_eq!(hub.jobs.len(), 1, "the push waits for its job");
    // The sender's next messages wait behind its push ...
    hub.server.handle(a, Message::Ping { nonce: 7 });
    // ... nobody else's do.
    hub.server.handle(b, Message::Ping { nonce: 8 });
    hub.drain();
    let after: Vec<_> = hub.sent[before..]
        .iter()
        .map(|(p, m)| (*p, m.kind()))
        .collect();
    assert_eq!(after, [(b, "pong")]);
    hub.run_jobs();
    // The Pong answers once the push is accepted, the Ack once it is durable.
    let kinds = hub.kinds(a);
    assert!(kinds.ends_with(&["pong".into(), "ack".into()]), "{kinds:?}");
    assert_eq!(hub.server.log(&db()).unwrap().entries().count(), 3);
}

#[test]
fn resends_of_held_entries_are_acknowledged_without_a_parse() {
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    // Large enough that automerge compresses them in `bytes()`.
    let es = entries_of(1, 50, 2000);
    hub.push(a, es.clone());
    hub.run_jobs();
    assert_eq!(hub.server.log(&db()).unwrap().entries().count(), 50);
    // Some of it again, as a reconnecting client with a lost Ack does:
    // compared where it arrives.
    assert!(es[..10].iter().map(|e| e.change.len()).sum::<usize>() < 64 << 10);
    hub.push(a, es[..10].to_vec());
    assert!(hub.jobs.is_empty(), "nothing to parse");
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    // All of it (over 64 KiB): the bytes are compared off the hub, in a job
    // that parses nothing, so megabytes of resends cost the hub nothing.
    assert!(es.iter().map(|e| e.change.len()).sum::<usize>() > 64 << 10);
    hub.push(a, es.clone());
    assert_eq!(hub.jobs.len(), 1);
    assert_eq!(hub.jobs[0].1.bytes(), 0, "no new change to parse");
    hub.run_jobs();
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    let acks = hub.kinds(a).iter().filter(|k| *k == "ack").count();
    // The same changes in other bytes (compressed) are parsed to compare
    // hashes, and accepted as resends.
    let mut other = es.clone();
    for e in &mut other {
        let raw = e.change.len();
        e.change = automerge::Change::try_from(&e.change[..])
            .unwrap()
            .bytes()
            .into_owned();
        assert!(e.change.len() < raw);
    }
    hub.push(a, other);
    assert_eq!(hub.jobs.len(), 1);
    assert_eq!(hub.jobs[0].1.bytes(), 0, "no new change to parse");
    hub.run_jobs();
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    assert_eq!(
        hub.kinds(a).iter().filter(|k| *k == "ack").count(),
        acks + 1
    );
    // A different change under a held dot is a conflict, in a small push
    // or among the resends of a large one.
    let mut forged = es[0].clone();
    forged.doc = DocId::new("elsewhere").unwrap();
    hub.push(a, vec![forged.clone()]);
    hub.run_jobs();
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    let mut large = es.clone();
    large[49] = es[0].clone();
    large[49].dot = es[49].dot;
    hub.push(a, large);
    assert_eq!(hub.jobs.len(), 1);
    hub.run_jobs();
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
}

#[test]
fn too_many_messages_behind_a_push_overload_the_sender_only() {
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    let b = hub.peer(2);
    hub.push(a, heavy(1, 1));
    for n in 0..1000 {
        hub.server.handle(a, Message::Ping { nonce: n });
    }
    hub.drain();
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(Overloaded)");
    hub.server.handle(b, Message::Ping { nonce: 1 });
    hub.drain();
    assert_eq!(hub.kinds(b).last().unwrap(), "pong");
    hub.run_jobs(); // the job of a closed peer is dropped
}

/// What the limits spare the server: automerge's parse time of op bombs.
/// `cargo test -p syncline-core --release --test push_validation -- --ignored --nocapture`
#[test]
#[ignore = "a measurement, not a check"]
fn measure_automerge_on_op_bombs() {
    for n in [1u64, 1 << 16, 1 << 22] {
        let b = syncline_core::change_limits::testing::op_bomb(&[1; 16], n);
        let t = std::time::Instant::now();
        let r = automerge::Change::try_from(&b[..]);
        eprintln!(
            "{} bytes {:?} in {:?}",
            b.len(),
            r.map(|c| c.len()),
            t.elapsed()
        );
    }
}

/// `e`'s change re-encoded after `edit` (what a hostile peer can send).
fn rewritten(e: &Entry, edit: impl FnOnce(&mut automerge::ExpandedChange)) -> Entry {
    let change = automerge::Change::try_from(&e.change[..]).unwrap();
    let mut expanded = change.decode();
    edit(&mut expanded);
    expanded.hash = None;
    Entry {
        change: automerge::Change::from(expanded).raw_bytes().to_vec(),
        ..e.clone()
    }
}

#[test]
fn a_change_automerge_would_panic_on_is_refused() {
    let mut hub = Hub::new(false);
    let a = hub.peer(1);
    let es = entries(1, 2);
    hub.push(a, vec![es[0].clone()]);
    // The next change, with a pred naming an actor this document has never
    // seen: automerge 0.12 panics applying it (an `unwrap` in its actor
    // lookup), in the server's compaction and in every client.
    let stranger = automerge::ActorId::from([9u8; 16]);
    let hostile = rewritten(&es[1], |c| {
        for op in &mut c.operations {
            op.pred = vec![automerge::legacy::OpId(1, stranger.clone())].into();
        }
    });
    let mut doc = automerge::Automerge::new();
    doc.apply_changes([automerge::Change::try_from(&es[0].change[..]).unwrap()])
        .unwrap();
    let change = automerge::Change::try_from(&hostile.change[..]).unwrap();
    let panicked = std::panic::catch_unwind(move || {
        let _ = doc.apply_changes([change]);
    });
    assert!(panicked.is_err(), "automerge panics on it");
    hub.push(a, vec![hostile]);
    let Some((_, Message::Error(e))) = hub.sent.last() else {
        panic!("{:?}", hub.kinds(a))
    };
    // Refused as building on changes the server lacks (an honest client's
    // may name another tab's replica, not pushed yet): nothing stored.
    assert_eq!(e.code(), ErrorCode::MissingDependency);
    assert!(e.message.contains("another replica"), "{}", e.message);
    assert_eq!(hub.server.log(&db()).unwrap().entries().count(), 1);
}

#[test]
fn automerge_sequence_numbers_must_follow_the_document() {
    let mut hub = Hub::new(false);
    let a = hub.peer(1);
    let es = entries(1, 2);
    // A first change to the document claiming seq 5 (automerge registers
    // an actor only at its seq 1).
    let skipped = rewritten(&es[0], |c| c.seq = 5);
    hub.push(a, vec![skipped]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    hub.push(a, vec![es[0].clone()]);
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    // A second seq 1 of the same actor to the same document.
    let again = rewritten(&es[1], |c| c.seq = 1);
    hub.push(a, vec![again]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    hub.push(a, vec![es[1].clone()]);
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    assert_eq!(hub.server.log(&db()).unwrap().entries().count(), 2);
    // A repeated seq (2 again, for the third change) or a skipped one, in
    // one push or across pushes.
    let es = entries(1, 4);
    let repeated = rewritten(&es[2], |c| c.seq = 2);
    hub.push(a, vec![repeated]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    let skipped = rewritten(&es[3], |c| c.seq = 5);
    hub.push(a, vec![es[2].clone(), skipped]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    hub.push(a, vec![es[2].clone(), es[3].clone()]);
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    assert_eq!(hub.server.log(&db()).unwrap().entries().count(), 4);
}

#[test]
fn messages_held_for_a_peer_are_bounded_in_bytes() {
    let config = ServerConfig {
        defer_validation: true,
        max_queued_per_peer: 64 << 10,
        ..ServerConfig::default()
    };
    let mut hub = Hub::new(true);
    hub.server = Server::new(config, OpenAccess);
    let a = hub.peer(1);
    let b = hub.peer(2);
    hub.push(a, heavy(1, 1));
    // Behind its push, 10 KiB presence states: the seventh is over 64 KiB.
    let presence = |db: &str, n: u8| {
        Message::Presence(Box::new(syncline_core::protocol::Presence {
            db: DbName::new(db).unwrap(),
            state: vec![n; 10 << 10],
        }))
    };
    for n in 0..6 {
        hub.server.handle(a, presence("pushes", n));
    }
    hub.drain();
    assert!(hub.server.queued_bytes() > 60 << 10);
    assert!(!hub.kinds(a).iter().any(|k| k.starts_with("Error")));
    hub.server.handle(a, presence("pushes", 6));
    hub.drain();
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(Overloaded)");
    assert_eq!(hub.server.queued_bytes(), 0, "freed with the peer");
    hub.run_jobs();

    // Messages waiting for a database to load count the same way.
    hub.hold_loads = true;
    for n in 0..6 {
        hub.server.handle(b, presence("elsewhere", n));
    }
    hub.drain();
    assert_eq!(hub.loads.len(), 1);
    assert!(hub.server.queued_bytes() > 60 << 10);
    hub.server.handle(b, presence("elsewhere", 7));
    hub.drain();
    assert_eq!(hub.kinds(b).last().unwrap(), "Error(Overloaded)");
    assert_eq!(hub.server.queued_bytes(), 0);
}

#[test]
fn held_bytes_return_to_zero_once_handled() {
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    hub.push(a, heavy(1, 2));
    hub.server.handle(a, Message::Ping { nonce: 1 });
    hub.drain();
    assert!(hub.server.queued_bytes() > 0);
    hub.run_jobs();
    assert_eq!(hub.server.queued_bytes(), 0);
    hub.hold_loads = true;
    hub.server.handle(
        a,
        Message::Subscribe(Box::new(Subscribe {
            horizon: None,
            db: DbName::new("later").unwrap(),
            since: Default::default(),
            req: 3,
        })),
    );
    hub.drain();
    assert!(hub.server.queued_bytes() > 0);
    for db in std::mem::take(&mut hub.loads) {
        hub.server.loaded(db, StoredDatabase::default());
    }
    hub.drain();
    assert_eq!(hub.server.queued_bytes(), 0);
}

#[test]
fn a_small_push_is_checked_where_it_arrives_even_when_validation_is_deferred() {
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    hub.push(a, entries(1, 3));
    assert!(hub.jobs.is_empty(), "no job for three small changes");
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    // A small bomb is not small: its ops are counted first.
    let mut bomb = entries(1, 4).remove(3);
    bomb.change = syncline_core::change_limits::testing::op_bomb(&[1; 16], 5000);
    hub.push(a, vec![bomb]);
    assert_eq!(hub.jobs.len(), 1);
}

#[test]
fn a_busy_writer_s_batch_is_checked_inline_and_a_bulk_upload_is_not() {
    // W4's shape: 128 small changes in one push. Deferred, each such push
    // was accepted alone, and the store's groups (one fsync each) shrank
    // to a third.
    let mut hub = Hub::new(true);
    let a = hub.peer(1);
    let all = entries(1, 128 + 257);
    hub.push(a, all[..128].to_vec());
    assert!(hub.jobs.is_empty(), "128 small changes are checked inline");
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
    hub.push(a, all[128..].to_vec());
    assert_eq!(hub.jobs.len(), 1, "257 changes go to a job");
    hub.run_jobs();
    assert_eq!(hub.kinds(a).last().unwrap(), "ack");
}

#[test]
fn a_connection_that_keeps_sending_invalid_changes_is_closed() {
    let mut hub = Hub::new(false);
    let a = hub.peer(1);
    let b = hub.peer(2);
    for _ in 0..16 {
        hub.push(a, vec![op_bomb(1, 1 << 40)]);
    }
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(InvalidChange)");
    assert!(hub.server.greeted(a), "sixteen refusals are answered");
    hub.push(a, vec![op_bomb(1, 1 << 40)]);
    assert_eq!(hub.kinds(a).last().unwrap(), "Error(ProtocolViolation)");
    assert!(
        !hub.server.greeted(a),
        "the seventeenth closes the connection"
    );
    hub.push(b, entries(2, 1));
    assert_eq!(hub.kinds(b).last().unwrap(), "ack");
}
