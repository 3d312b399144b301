//! Cluster mode: several server nodes share one ordered log (a stream).
//! A node's own accepted batches come back from the stream and are
//! `persisted`; every other node's batches are given to `Server::ingest`.
//! Here the stream is the test: it decides the order and hands each batch
//! to each node, one call at a time.

use serde_json::json;
use syncline_core::Identity;
use syncline_core::clock::VersionVector;
use syncline_core::database::Database;
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{
    self, ErrorCode, Hello, Message, PeerPresence, Presence, Push, Subscribe,
};
use syncline_core::store::{Batch, StoredDatabase};
use syncline_core::sync::{Ingested, OpenAccess, PeerId, Server, ServerConfig, ServerOutput};

fn db() -> DbName {
    DbName::new("shared").unwrap()
}

fn doc() -> DocId {
    DocId::new("doc").unwrap()
}

fn replica(r: u8) -> ReplicaId {
    Identity::from_seed([r; 32]).replica()
}

/// The local database of replica `r`: what its client pushes.
fn local(r: u8) -> Database {
    Database::new(db(), replica(r), automerge::TextEncoding::UnicodeCodePoint)
}

/// One local edit per value of `ks`, each the next entry of `d`'s replica.
fn edits(d: &mut Database, ks: impl IntoIterator<Item = u64>) -> Vec<Entry> {
    ks.into_iter()
        .map(|k| d.update(&doc(), &json!({ "k": k })).unwrap().unwrap())
        .collect()
}

/// One server node of the cluster, its adapter reduced to what a test
/// needs: loads find an empty store, validation runs where it is asked
/// for, and persists wait for the test (the stream) to deliver them back.
struct Node {
    server: Server<OpenAccess>,
    /// Batches this node accepted, in order, not yet taken by the test.
    persists: Vec<(u64, Batch)>,
    hellos: u8,
}

impl Node {
    fn new(id: u8) -> Self {
        let config = ServerConfig {
            replica: ReplicaId([id; 16]),
            ..ServerConfig::default()
        };
        Node {
            server: Server::new(config, OpenAccess),
            persists: Vec::new(),
            hellos: 0,
        }
    }

    /// Carry out the adapter's part; return every other output, in order.
    fn drain(&mut self) -> Vec<ServerOutput> {
        let mut rest = Vec::new();
        loop {
            let outs = self.server.take_outputs();
            if outs.is_empty() {
                return rest;
            }
            for o in outs {
                match o {
                    ServerOutput::Load { db } => self.server.loaded(db, StoredDatabase::default()),
                    ServerOutput::Validate { peer, job } => self.server.validated(peer, job.run()),
                    ServerOutput::Persist { db: d, seq, batch } => {
                        assert_eq!(d, db());
                        self.persists.push((seq, batch));
                    }
                    o => rest.push(o),
                }
            }
        }
    }

    /// A client of replica `r` connects, says Hello and subscribes to
    /// `shared` holding `since`.
    fn join(&mut self, r: u8, since: VersionVector) -> PeerId {
        let p = self.server.connect();
        self.hellos += 1;
        let identity = Identity::from_seed([r; 32]);
        self.server.handle(
            p,
            Message::Hello(Box::new(Hello {
                replica: identity.replica(),
                token: String::new(),
                proof: identity.prove_with_nonce("", 0, [self.hellos; 16]),
            })),
        );
        self.server.handle(
            p,
            Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: db(),
                since,
                req: 1,
            })),
        );
        let outs = self.drain();
        assert!(
            sent_to(&outs, p)
                .iter()
                .any(|m| matches!(m, Message::Welcome(_))),
            "replica {r} was not welcomed: {:?}",
            kinds(&outs, p)
        );
        assert!(errors(&outs, p).is_empty());
        p
    }

    fn push(&mut self, peer: PeerId, entries: Vec<Entry>) -> Vec<ServerOutput> {
        self.server
            .handle(peer, Message::Push(Box::new(Push { db: db(), entries })));
        self.drain()
    }

    /// The one batch this node accepted since the last call.
    fn accepted_batch(&mut self) -> (u64, Batch) {
        assert_eq!(self.persists.len(), 1, "expected exactly one Persist");
        self.persists.remove(0)
    }

    /// The stream delivered this node's own batch `seq` back.
    fn persisted(&mut self, seq: u64) -> Vec<ServerOutput> {
        self.server.persisted(&db(), seq);
        self.drain()
    }

    /// The stream delivered another node's batch.
    fn ingest(&mut self, entries: Vec<Entry>) -> (Ingested, Vec<ServerOutput>) {
        let ingested = self.server.ingest(&db(), entries);
        (ingested, self.drain())
    }

    fn vv(&self) -> VersionVector {
        self.server.log(&db()).expect("loaded").vv().clone()
    }
}

/// Every message `outs` delivers to `peer`, in order (a Broadcast's frame
/// decoded; subscribe replies left out: they are not live).
fn sent_to(outs: &[ServerOutput], peer: PeerId) -> Vec<Message> {
    outs.iter()
        .filter_map(|o| match o {
            ServerOutput::Send { peer: p, msg } if *p == peer => Some(msg.clone()),
            ServerOutput::Broadcast { peers, frame, .. } if peers.contains(&peer) => {
                Some(protocol::decode(frame, usize::MAX).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn kinds(outs: &[ServerOutput], peer: PeerId) -> Vec<&'static str> {
    sent_to(outs, peer).iter().map(Message::kind).collect()
}

/// The entries of each live delta `outs` delivers to `peer`.
fn live_to(outs: &[ServerOutput], peer: PeerId) -> Vec<Vec<Entry>> {
    sent_to(outs, peer)
        .into_iter()
        .filter_map(|m| match m {
            Message::Delta(d) if d.req == 0 => Some(d.entries),
            _ => None,
        })
        .collect()
}

/// The acknowledged counters of replica `r` in `outs`' Acks to `peer`.
fn acks(outs: &[ServerOutput], peer: PeerId, r: u8) -> Vec<u64> {
    sent_to(outs, peer)
        .into_iter()
        .filter_map(|m| match m {
            Message::Ack(a) => Some(a.vv.get(&replica(r))),
            _ => None,
        })
        .collect()
}

fn errors(outs: &[ServerOutput], peer: PeerId) -> Vec<ErrorCode> {
    sent_to(outs, peer)
        .into_iter()
        .filter_map(|m| match m {
            Message::Error(e) => Some(e.code()),
            _ => None,
        })
        .collect()
}

/// Nodes A and B, replica 1's client X on A, replica 2's subscriber Y on
/// B; X has pushed three edits, which A accepted and the stream delivered
/// back to A and then to B (`ingest`).
struct Delivered {
    a: Node,
    b: Node,
    y: PeerId,
    x_local: Database,
    batch: Batch,
    ingested: Ingested,
    outs_b: Vec<ServerOutput>,
}

fn x_on_a_delivered_to_b() -> Delivered {
    let mut a = Node::new(0xA0);
    let mut b = Node::new(0xB0);
    let x = a.join(1, VersionVector::new());
    let y = b.join(2, VersionVector::new());
    let mut x_local = local(1);
    let entries = edits(&mut x_local, 1..=3);
    let outs = a.push(x, entries.clone());
    assert!(errors(&outs, x).is_empty(), "{:?}", kinds(&outs, x));
    assert!(
        acks(&outs, x, 1).is_empty(),
        "no Ack before the stream has it"
    );
    let (seq, batch) = a.accepted_batch();
    assert_eq!(batch.entries, entries);
    // The stream delivers the batch to every node: its writer, then B.
    let outs_a = a.persisted(seq);
    assert_eq!(acks(&outs_a, x, 1), [3]);
    let (ingested, outs_b) = b.ingest(batch.entries.clone());
    Delivered {
        a,
        b,
        y,
        x_local,
        batch,
        ingested,
        outs_b,
    }
}

/// Fails if `ingest` does not append (B's vv stays empty), does not fan
/// out to local subscribers (Y gets no Delta, e.g. `broadcast_live` with no
/// peers), or miscounts (`added` not 3).
#[test]
fn a_batch_from_the_stream_reaches_another_node_s_subscribers() {
    let d = x_on_a_delivered_to_b();
    assert_eq!(
        d.ingested,
        Ingested {
            added: 3,
            conflicts: 0,
            gaps: 0
        }
    );
    let live = live_to(&d.outs_b, d.y);
    assert_eq!(live.concat(), d.batch.entries, "Y sees X's edits live");
    assert_eq!(d.b.vv(), d.a.vv());
    assert_eq!(d.b.vv().get(&replica(1)), 3);
    assert!(
        d.b.persists.is_empty(),
        "B does not write what the stream holds"
    );
}

/// Fails if `ingest` does not skip held dots (e.g. appends or fans out
/// again, or counts them as added) or reports them as conflicts.
#[test]
fn ingesting_held_entries_again_adds_and_sends_nothing() {
    let mut d = x_on_a_delivered_to_b();
    let vv = d.b.vv();
    let (again, outs) = d.b.ingest(d.batch.entries.clone());
    assert_eq!(again, Ingested::default(), "added 0, conflicts 0, gaps 0");
    assert!(sent_to(&outs, d.y).is_empty(), "no frame to Y");
    assert!(outs.is_empty(), "nothing at all: {} outputs", outs.len());
    assert_eq!(d.b.vv(), vv);
    // A prefix of it (a redelivery cut short) is held too.
    let (prefix, outs) = d.b.ingest(d.batch.entries[..2].to_vec());
    assert_eq!(prefix, Ingested::default());
    assert!(outs.is_empty());
}

/// Fails if `ingest` does not count ingested entries as accepted (remove
/// its `d.accepted.set(..)`): B still expects counter 1 from replica 1, so
/// the next push is refused `OutOfOrder` (and a resend of the ingested
/// entries would be taken as new and persisted a second time).
#[test]
fn pushes_continue_from_ingested_entries_on_another_node() {
    let mut d = x_on_a_delivered_to_b();
    // X moves to B, holding its own three edits (acknowledged by A), and
    // pushes its next one.
    let x_b = d.b.join(1, d.x_local.vv().clone());
    let next = edits(&mut d.x_local, [4]);
    assert_eq!(next[0].dot.counter, 4);
    let outs = d.b.push(x_b, next.clone());
    assert_eq!(errors(&outs, x_b), [], "no OutOfOrder");
    let (seq, batch) = d.b.accepted_batch();
    assert_eq!(batch.entries, next);
    let outs = d.b.persisted(seq);
    assert_eq!(acks(&outs, x_b, 1), [4]);
    assert_eq!(live_to(&outs, d.y).concat(), next);
    // A resend of everything (a lost Ack): the ingested entries are
    // duplicates like the rest, acknowledged and not written again.
    let mut all = d.batch.entries.clone();
    all.extend(next);
    let outs = d.b.push(x_b, all);
    assert_eq!(errors(&outs, x_b), []);
    assert_eq!(acks(&outs, x_b, 1), [4]);
    assert!(d.b.persists.is_empty(), "no Persist for held entries");
    assert!(live_to(&outs, d.y).is_empty());
    // And A takes X's edit from the stream in turn.
    let (ingested, _) = d.a.ingest(batch.entries);
    assert_eq!(ingested.added, 1);
    assert_eq!(d.a.vv(), d.b.vv());
}

/// Fails if `persisted` fans out entries the log already holds (as it did
/// before its held-dot check, pushing every entry `append` did not refuse
/// into `all`): Y gets X's edits twice; or if it treats a resend of a held
/// dot as a conflict: X gets an error, not an Ack. Also fails if `ingest`
/// fans out or counts held dots, or calls a resend a conflict.
#[test]
fn a_change_pushed_to_two_nodes_is_acked_by_both_and_fanned_out_once() {
    let mut a = Node::new(0xA0);
    let mut b = Node::new(0xB0);
    // X holds a connection to each node (a reconnect racing the old one).
    let x_a = a.join(1, VersionVector::new());
    let x_b = b.join(1, VersionVector::new());
    let y = b.join(2, VersionVector::new());
    let entries = edits(&mut local(1), 1..=2);
    let outs_a = a.push(x_a, entries.clone());
    let outs_b = b.push(x_b, entries.clone());
    assert_eq!(errors(&outs_a, x_a), []);
    assert_eq!(errors(&outs_b, x_b), []);
    let (seq_a, batch_a) = a.accepted_batch();
    let (seq_b, batch_b) = b.accepted_batch();
    assert_eq!(batch_a.entries, entries);
    assert_eq!(batch_b.entries, entries);

    // The stream holds A's batch first, then B's.
    let outs = a.persisted(seq_a);
    assert_eq!(acks(&outs, x_a, 1), [2]);
    let (ingested, outs) = b.ingest(batch_a.entries.clone());
    assert_eq!(
        ingested,
        Ingested {
            added: 2,
            conflicts: 0,
            gaps: 0
        }
    );
    let mut to_y = live_to(&outs, y);
    assert_eq!(to_y.concat(), entries);
    // B's own batch comes back: it holds those dots already.
    let outs = b.persisted(seq_b);
    assert_eq!(errors(&outs, x_b), [], "a resend is not an error");
    assert_eq!(acks(&outs, x_b, 1), [2]);
    to_y.extend(live_to(&outs, y));
    assert_eq!(to_y.concat(), entries, "Y gets X's edits once");
    assert_eq!(b.vv(), a.vv());
    assert_eq!(b.server.log(&db()).unwrap().entries().count(), 2);
    // A reads B's batch from the stream after its own: all held.
    let (ingested, outs) = a.ingest(batch_b.entries);
    assert_eq!(ingested, Ingested::default());
    assert!(outs.is_empty());
}

/// Fails if `persisted` does not look for a different change under a held
/// dot (remove its `d.log.get(&e.dot)` check): B's pusher gets an Ack for
/// a change the cluster dropped. Also fails if `ingest` does not count a
/// different change under a held dot (`conflicts` stays 0).
#[test]
fn a_different_change_under_a_dot_the_stream_already_holds_is_refused() {
    let mut a = Node::new(0xA0);
    let mut b = Node::new(0xB0);
    // Two clients under one replica id, one on each node.
    let x1 = a.join(1, VersionVector::new());
    let x2 = b.join(1, VersionVector::new());
    let y = b.join(2, VersionVector::new());
    let mut first = local(1);
    let mut second = local(1);
    let e1 = first
        .update(&doc(), &json!({ "by": "first" }))
        .unwrap()
        .unwrap();
    let e2 = second
        .update(&doc(), &json!({ "by": "second" }))
        .unwrap()
        .unwrap();
    assert_eq!(e1.dot, e2.dot, "one dot, counter 1");
    assert_ne!(e1.change, e2.change);
    let outs = a.push(x1, vec![e1.clone()]);
    assert_eq!(errors(&outs, x1), []);
    let outs = b.push(x2, vec![e2.clone()]);
    assert_eq!(errors(&outs, x2), []);
    let (seq_a, batch_a) = a.accepted_batch();
    let (seq_b, batch_b) = b.accepted_batch();

    // A's batch is first in the stream.
    let outs = a.persisted(seq_a);
    assert_eq!(acks(&outs, x1, 1), [1]);
    let (ingested, outs) = b.ingest(batch_a.entries);
    assert_eq!(ingested.added, 1);
    assert_eq!(live_to(&outs, y).concat(), std::slice::from_ref(&e1));
    // B's batch comes back: its change lost the dot.
    let outs = b.persisted(seq_b);
    assert_eq!(errors(&outs, x2), [ErrorCode::InvalidChange]);
    assert!(acks(&outs, x2, 1).is_empty(), "no Ack for a dropped change");
    assert!(
        live_to(&outs, y).is_empty(),
        "the losing change is not fanned out"
    );
    assert_eq!(b.server.log(&db()).unwrap().get(&e1.dot), Some(&e1));
    // A reads B's batch from the stream: a conflict, dropped.
    let (ingested, outs) = a.ingest(batch_b.entries);
    assert_eq!(
        ingested,
        Ingested {
            added: 0,
            conflicts: 1,
            gaps: 0
        }
    );
    assert!(outs.is_empty());
    assert_eq!(a.server.log(&db()).unwrap().get(&e1.dot), Some(&e1));
    assert_eq!(a.vv(), b.vv());
}

/// Fails if `ingest` loads, creates or touches a database that is not
/// loaded (it must return `Ingested::default()` and emit nothing: the
/// database's load reads the entries from the store).
#[test]
fn ingest_into_a_database_not_loaded_does_nothing() {
    let mut b = Node::new(0xB0);
    let entries = edits(&mut local(1), 1..=2);
    assert_eq!(b.server.ingest(&db(), entries.clone()), Ingested::default());
    assert!(b.server.take_outputs().is_empty());
    assert!(b.server.log(&db()).is_none());
    // Nor when another database is loaded.
    b.join(2, VersionVector::new());
    let other = DbName::new("other").unwrap();
    assert_eq!(b.server.ingest(&other, entries), Ingested::default());
    assert!(b.server.take_outputs().is_empty());
    assert!(b.server.log(&other).is_none());
    assert_eq!(b.vv(), VersionVector::new());
}

/// A node that shares presence with the others, numbering its
/// connections from `base` (as each node draws a random base).
fn sharing(id: u8, base: u64) -> Node {
    let mut node = Node::new(id);
    let config = ServerConfig {
        replica: ReplicaId([id; 16]),
        share_presence: true,
        peer_id_base: base,
        ..ServerConfig::default()
    };
    node.server = Server::new(config, OpenAccess);
    node
}

/// What the presence updates in `outs` tell `peer`: (online, peers).
fn presence_to(outs: &[ServerOutput], peer: PeerId) -> Vec<(u32, Vec<PeerPresence>)> {
    sent_to(outs, peer)
        .into_iter()
        .filter_map(|m| match m {
            Message::PresenceUpdate(u) => Some((u.online, u.peers)),
            _ => None,
        })
        .collect()
}

#[test]
fn presence_spans_nodes_and_a_node_not_heard_from_is_forgotten() {
    let mut a = sharing(1, 1 << 40);
    let mut b = sharing(2, 2 << 40);
    let x = a.join(1, VersionVector::new());
    let y = b.join(2, VersionVector::new());
    assert_ne!(x, y, "connection ids differ across nodes");

    // X publishes a state on A; A shares it; B hears it at t = 1,000 ms.
    a.server.handle(
        x,
        Message::Presence(Box::new(Presence {
            db: db(),
            state: b"here".to_vec(),
        })),
    );
    let shared: Vec<_> = a
        .drain()
        .into_iter()
        .filter_map(|o| match o {
            ServerOutput::SharePresence { update } => Some(update),
            _ => None,
        })
        .collect();
    assert!(!shared.is_empty(), "A shares X's presence");
    for update in shared {
        b.server.remote_presence("a", update, 1_000);
    }
    let outs = b.drain();
    let seen = presence_to(&outs, y);
    let (online, peers) = seen.last().expect("Y hears of X");
    assert_eq!(*online, 2, "Y and X are online");
    assert!(
        peers
            .iter()
            .any(|p| p.peer == x && !p.left && p.state.as_deref() == Some(&b"here"[..])),
        "{peers:?}"
    );

    // Heard from since t = 500: kept.
    b.server.expire_remote_presence(500);
    assert!(presence_to(&b.drain(), y).is_empty());
    // Not heard from since t = 2,000: forgotten, X left, one online.
    b.server.expire_remote_presence(2_000);
    let seen = presence_to(&b.drain(), y);
    let (online, peers) = seen.last().expect("Y hears X left");
    assert_eq!(*online, 1);
    assert!(peers.iter().any(|p| p.peer == x && p.left), "{peers:?}");
}
