//! Frames carry only the part of a database's version vector that matters
//! to them: after 100,000 replicas have written, a one-entry live update,
//! an ack and a resume that lacks one entry each stay under a KiB (the
//! whole vector is over a MB, and a frame of it over 100 KB deflated).

use serde_json::json;
use syncline_core::Identity;
use syncline_core::clock::{Dot, VersionVector};
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{self, Hello, Message, Push, Subscribe};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{OpenAccess, PeerId, Server, ServerConfig, ServerOutput};

const REPLICAS: u32 = 100_000;

fn db() -> DbName {
    DbName::new("crowd").unwrap()
}

fn replica(i: u32) -> ReplicaId {
    let mut id = [0xAA; 16];
    id[..4].copy_from_slice(&i.to_be_bytes());
    ReplicaId(id)
}

/// Every frame each peer received, in order, with its size.
struct Hub {
    server: Server<OpenAccess>,
    stored: Option<StoredDatabase>,
    got: Vec<(PeerId, usize, Message)>,
}

impl Hub {
    fn peer(&mut self, r: u8, since: VersionVector) -> PeerId {
        let p = self.server.connect();
        let hello = Hello::signed(&Identity::from_seed([r; 32]), String::new(), "", 0);
        self.server.handle(p, Message::Hello(Box::new(hello)));
        let s = Subscribe {
            horizon: None,
            db: db(),
            since,
            req: 1,
        };
        self.server.handle(p, Message::Subscribe(Box::new(s)));
        self.drain();
        p
    }

    fn drain(&mut self) {
        loop {
            let outs = self.server.take_outputs();
            if outs.is_empty() {
                return;
            }
            for o in outs {
                match o {
                    ServerOutput::Send { peer, msg } => {
                        let len = protocol::encode(&msg).len();
                        self.got.push((peer, len, msg));
                    }
                    ServerOutput::Broadcast { peers, frame, .. } => {
                        let msg = protocol::decode(&frame, usize::MAX).unwrap();
                        for p in peers {
                            self.got.push((p, frame.len(), msg.clone()));
                        }
                    }
                    ServerOutput::Reply { peer, reply } => {
                        for frame in reply.frames() {
                            let msg = protocol::decode(&frame, usize::MAX).unwrap();
                            self.got.push((peer, frame.len(), msg));
                        }
                    }
                    ServerOutput::Load { db } => {
                        let stored = self.stored.take().unwrap_or_default();
                        self.server.loaded(db, stored);
                    }
                    ServerOutput::Persist { db, seq, .. } => self.server.persisted(&db, seq),
                    ServerOutput::Validate { peer, job } => {
                        self.server.validated(peer, job.run());
                    }
                    _ => {}
                }
            }
        }
    }

    /// What `p` received since `from`: (kind, bytes) per frame.
    fn frames(&self, p: PeerId, from: usize) -> Vec<(&'static str, usize)> {
        self.got[from..]
            .iter()
            .filter(|(q, _, _)| *q == p)
            .map(|(_, len, m)| (m.kind(), *len))
            .collect()
    }
}

#[test]
fn a_hundred_thousand_replicas_leave_live_frames_acks_and_resumes_small() {
    // One real change, stored under 100,000 replicas (a server stores
    // without parsing again; nothing here parses them).
    let mut writer_db = syncline_core::database::Database::new(
        db(),
        Identity::from_seed([2; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let old = DocId::new("old").unwrap();
    let change = writer_db
        .update(&old, &json!({"n": 0}))
        .unwrap()
        .unwrap()
        .change;
    let mut writer_db = syncline_core::database::Database::new(
        db(),
        Identity::from_seed([2; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let mut all = VersionVector::new();
    let entries = (0..REPLICAS)
        .map(|i| {
            all.set(replica(i), 1);
            Entry {
                dot: Dot {
                    replica: replica(i),
                    counter: 1,
                },
                doc: old.clone(),
                change: change.clone(),
            }
        })
        .collect();
    let whole = Message::Ack(Box::new(protocol::Ack {
        db: db(),
        vv: all.clone(),
    }));
    let (archived, framed) = (
        protocol::archive(&whole).len(),
        protocol::encode(&whole).len(),
    );
    assert!(
        archived > 1 << 20 && framed > 100 << 10,
        "the whole vector: {archived} bytes, {framed} deflated"
    );

    let mut hub = Hub {
        server: Server::new(ServerConfig::default(), OpenAccess),
        stored: Some(StoredDatabase {
            entries,
            ..StoredDatabase::default()
        }),
        got: Vec::new(),
    };
    // Two replicas that hold everything already: their replies are tiny.
    let watcher = hub.peer(1, all.clone());
    let writer = hub.peer(2, all.clone());
    for p in [watcher, writer] {
        let frames = hub.frames(p, 0);
        assert!(frames.iter().all(|(_, len)| *len < 1024), "{frames:?}");
        assert!(
            frames.iter().any(|(kind, _)| *kind == "delta"),
            "{frames:?}"
        );
    }

    // One new entry: the watcher's live update and the writer's ack.
    let from = hub.got.len();
    let e = writer_db
        .update(&DocId::new("new").unwrap(), &json!({"n": 1}))
        .unwrap()
        .unwrap();
    hub.server.handle(
        writer,
        Message::Push(Box::new(Push {
            db: db(),
            entries: vec![e],
        })),
    );
    hub.drain();
    let live = hub.frames(watcher, from);
    assert_eq!(
        live.iter().filter(|(k, _)| *k == "delta").count(),
        1,
        "{live:?}"
    );
    assert!(live.iter().all(|(_, len)| *len < 1024), "{live:?}");
    let ack = hub.frames(writer, from);
    assert_eq!(
        ack.iter().filter(|(k, _)| *k == "ack").count(),
        1,
        "{ack:?}"
    );
    assert!(ack.iter().all(|(_, len)| *len < 1024), "{ack:?}");

    // A replica that lacks only that entry resumes with a reply of that
    // entry and what changed of the vector.
    let from = hub.got.len();
    let behind = hub.peer(3, all.clone());
    let reply: Vec<_> = hub
        .frames(behind, from)
        .into_iter()
        .filter(|(k, _)| *k == "delta")
        .collect();
    assert_eq!(reply.len(), 1, "{reply:?}");
    assert!(reply[0].1 < 1024, "{reply:?}");
    let Some((_, _, Message::Delta(d))) = hub
        .got
        .iter()
        .rev()
        .find(|(p, _, m)| *p == behind && m.kind() == "delta")
    else {
        panic!("no reply");
    };
    assert_eq!(d.entries.len(), 1);
    assert_eq!(
        d.vv.get(&Identity::from_seed([2; 32]).replica()),
        1,
        "what it lacked"
    );
    assert!(d.vv.len() <= 2, "{:?}", d.vv);
}
