//! Encoded test vectors: one frame per message kind under `tests/vectors/`.
//! Each must still decode, and re-encode to the identical bytes, so a change
//! to the wire format cannot slip in unnoticed (other clients check against
//! these files too). `SYNCLINE_WRITE_VECTORS=1 cargo test --test vectors`
//! rewrites them from `sample_messages` after a deliberate format change.

use std::path::PathBuf;

use syncline_core::Identity;
use syncline_core::clock::{Dot, VersionVector};
use syncline_core::entry::{Entry, Snapshot};
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{
    self, Ack, Databases, Delta, ErrorCode, Hello, Message, PeerPresence, Presence, PresenceUpdate,
    Push, Subscribe, Welcome,
};
use syncline_core::view::DocView;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/vectors")
}

/// One message of every kind, with fixed ids.
fn sample_messages() -> Vec<(&'static str, Message)> {
    let db = DbName::new("org-42").unwrap();
    let a = ReplicaId([0xAA; 16]);
    let b = ReplicaId([0xBB; 16]);
    let vv: VersionVector = [(a, 2), (b, 7)].into_iter().collect();
    // Changes made with a fixed timestamp (a replica's own would carry the
    // clock's), so the samples are the same bytes on every run and can be
    // compared with the files.
    let doc = DocId::new("todo:1").unwrap();
    let mut am = automerge::Automerge::new_with_encoding(automerge::TextEncoding::UnicodeCodePoint)
        .with_actor(a.actor());
    let mut counter = 0;
    let mut change = |title: String, done: Option<bool>| {
        use automerge::transaction::{CommitOptions, Transactable};
        let mut tx = am.transaction();
        tx.put(automerge::ROOT, "title", title).unwrap();
        if let Some(done) = done {
            tx.put(automerge::ROOT, "done", done).unwrap();
        }
        tx.commit_with(CommitOptions::default().with_time(1_700_000_000));
        counter += 1;
        Entry {
            dot: Dot {
                replica: a,
                counter,
            },
            doc: doc.clone(),
            change: am.get_last_local_change().unwrap().raw_bytes().to_vec(),
        }
    };
    let e1 = change("milk".into(), None);
    let e2 = change("milk".into(), Some(true));
    // A catch-up's worth of small entries: a body over the compression
    // threshold, so the delta vector covers the deflated frame path.
    let more: Vec<Entry> = (0..12)
        .map(|k| change(format!("milk {k}"), Some(k % 2 == 0)))
        .collect();
    let snapshot = Snapshot {
        doc: doc.clone(),
        clock: [(a, 2)].into_iter().collect(),
        bytes: am.save(),
    };
    vec![
        (
            "hello",
            Message::Hello(Box::new(Hello {
                replica: Identity::from_seed([0xAA; 32]).replica(),
                token: "tok".into(),
                // Ed25519 signatures are deterministic: a fixed nonce and
                // clock give fixed bytes.
                proof: Identity::from_seed([0xAA; 32]).prove_with_nonce(
                    "sync.example.com",
                    1_700_000_000_000,
                    [9; 16],
                ),
            })),
        ),
        (
            "welcome",
            Message::Welcome(Box::new(Welcome {
                server: b,
                peer: 7,
                max_frame: 1 << 24,
            })),
        ),
        (
            "subscribe",
            Message::Subscribe(Box::new(Subscribe {
                horizon: Some([0xCC; 16]),
                db: db.clone(),
                since: vv.clone(),
                req: 1,
            })),
        ),
        ("unsubscribe", Message::Unsubscribe { db: db.clone() }),
        (
            "delta",
            Message::Delta(Box::new(Delta {
                db: db.clone(),
                req: 1,
                part: 0,
                last: true,
                base: [(a, 1)].into_iter().collect(),
                snapshots: vec![snapshot],
                entries: [e2.clone()].into_iter().chain(more).collect(),
                views: vec![DocView {
                    doc: DocId::new("todo:2").unwrap(),
                    clock: [(a, 3)].into_iter().collect(),
                    json: Some(r#"{"title":"bread"}"#.into()),
                }],
                vv: vv.clone(),
            })),
        ),
        (
            "push",
            Message::Push(Box::new(Push {
                db: db.clone(),
                entries: vec![e1, e2],
            })),
        ),
        ("ack", Message::Ack(Box::new(Ack { db: db.clone(), vv }))),
        (
            "presence",
            Message::Presence(Box::new(Presence {
                db: db.clone(),
                state: br#"{"x":1}"#.to_vec(),
            })),
        ),
        (
            "presence_update",
            Message::PresenceUpdate(Box::new(PresenceUpdate {
                db: db.clone(),
                full: true,
                online: 2,
                peers: vec![
                    PeerPresence {
                        peer: 1,
                        replica: a,
                        left: false,
                        state: Some(b"{}".to_vec()),
                    },
                    PeerPresence {
                        peer: 2,
                        replica: b,
                        left: false,
                        state: None,
                    },
                ],
            })),
        ),
        (
            "error",
            Message::error(ErrorCode::Forbidden, "no write right", Some(db)),
        ),
        ("ping", Message::Ping { nonce: 42 }),
        ("list_databases", Message::ListDatabases { req: 3 }),
        (
            "databases",
            Message::Databases(Box::new(Databases {
                req: 3,
                names: vec![
                    DbName::new("org-42").unwrap(),
                    DbName::new("org-7").unwrap(),
                ],
            })),
        ),
        ("pong", Message::Pong { nonce: 42 }),
    ]
}

#[test]
fn vectors_decode_and_reencode_identically() {
    if std::env::var_os("SYNCLINE_WRITE_VECTORS").is_some() {
        for (name, msg) in sample_messages() {
            std::fs::write(dir().join(format!("{name}.bin")), protocol::encode(&msg)).unwrap();
        }
    }
    let mut kinds = Vec::new();
    for entry in std::fs::read_dir(dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "bin") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let msg = protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            protocol::encode(&msg),
            bytes,
            "{} re-encodes differently",
            path.display()
        );
        assert_eq!(
            path.file_stem().unwrap().to_str().unwrap(),
            msg.kind(),
            "file named for its message kind"
        );
        kinds.push(msg.kind());
    }
    kinds.sort();
    let mut all: Vec<&str> = sample_messages().iter().map(|(n, _)| *n).collect();
    all.sort();
    assert_eq!(kinds, all, "one vector per message kind");
}

/// Each file is exactly its sample: it decodes to the sample, and the
/// sample encodes to the file, so an encoder and decoder that agree with
/// each other but not with the files (two fields swapped in both, say)
/// are caught.
#[test]
fn every_vector_is_its_sample() {
    if std::env::var_os("SYNCLINE_WRITE_VECTORS").is_some() {
        return; // being rewritten by `vectors_decode_and_reencode_identically`
    }
    for (name, msg) in sample_messages() {
        let path = dir().join(format!("{name}.bin"));
        let file = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let decoded = protocol::decode(&file, protocol::DEFAULT_MAX_FRAME)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            decoded == msg,
            "{} decodes to another message than its sample",
            path.display()
        );
        assert!(
            protocol::encode(&msg) == file,
            "the {name} sample encodes to other bytes than {}",
            path.display()
        );
    }
}

#[test]
fn samples_round_trip() {
    for (_, msg) in sample_messages() {
        let frame = protocol::encode(&msg);
        assert_eq!(protocol::decode(&frame, usize::MAX).unwrap(), msg);
    }
}
