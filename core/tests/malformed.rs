//! Hostile input: every malformed frame or change is a typed error, never a
//! panic, and changes nothing.

mod common;

use proptest::prelude::*;
use serde_json::json;
use syncline_core::Identity;
use syncline_core::clock::Dot;
use syncline_core::database::Database;
use syncline_core::entry::{Entry, InvalidChange};
use syncline_core::ids::{DbName, DocId};
use syncline_core::protocol::{self, DecodeError, Message, PROTOCOL_VERSION, Subscribe};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{OpenAccess, PeerId, ServerConfig, ServerOutput};

fn named_vectors() -> Vec<(String, Vec<u8>)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(path).unwrap())
        })
        .collect();
    v.sort();
    assert!(v.len() > 10, "the vectors are missing");
    v
}

#[test]
fn empty_wrong_version_and_oversized_frames() {
    assert_eq!(protocol::decode(&[], 100), Err(DecodeError::Empty));
    assert_eq!(
        protocol::decode(&[9, 0, 0, 0, 0], 100),
        Err(DecodeError::UnknownVersion(9))
    );
    let ping = protocol::encode(&Message::Ping { nonce: 1 });
    assert!(matches!(
        protocol::decode(&ping, ping.len() - 1),
        Err(DecodeError::TooLarge { .. })
    ));
    assert!(protocol::decode(&ping, ping.len()).is_ok());
}

/// A core server holding some data in its (in-memory) store, to which
/// damaged frames are sent on fresh connections: each must be answered
/// with an error or a close when it does not decode, and none may make the
/// server persist anything.
struct Target {
    net: common::Net<OpenAccess>,
    /// The store's content before any damaged frame: (names, each loaded).
    before: Vec<(DbName, StoredDatabase)>,
    sent: usize,
    refused: usize,
}

impl Target {
    fn new() -> Self {
        let mut net = common::Net::new(OpenAccess);
        let i = net.add(1, "");
        // The database the vectors name, so damaged pushes and subscribes
        // reach data that exists.
        for name in ["org-42", "org-7"] {
            net.open(i, name);
        }
        net.connect(i);
        net.run();
        for name in ["org-42", "org-7"] {
            net.nodes[i]
                .client
                .update(
                    &DbName::new(name).unwrap(),
                    &DocId::new("todo:1").unwrap(),
                    &json!({"title": "milk", "n": 1}),
                )
                .unwrap();
        }
        net.run();
        let before = Self::stored(&net);
        assert_eq!(before.len(), 2, "{before:?}");
        assert!(before.iter().all(|(_, s)| !s.entries.is_empty()));
        Target {
            net,
            before,
            sent: 0,
            refused: 0,
        }
    }

    fn stored(net: &common::Net<OpenAccess>) -> Vec<(DbName, StoredDatabase)> {
        let mut names = net.server_store.list_now().unwrap();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let s = net.server_store.load_now(&n).unwrap();
                (n, s)
            })
            .collect()
    }

    /// Send `frame` on a new connection that has said `Hello` (and
    /// subscribed to the vectors' database), then let the server do all it
    /// asks for, except persisting.
    fn send(&mut self, frame: &[u8], what: &str) {
        let server = &mut self.net.server;
        let peer = server.connect();
        let hello = Message::Hello(Box::new(protocol::Hello::signed(
            &Identity::from_seed([0x11; 32]),
            "",
            "",
            0,
        )));
        server.handle_frame(peer, &protocol::encode(&hello));
        server.handle(
            peer,
            Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: DbName::new("org-42").unwrap(),
                since: Default::default(),
                req: 1,
            })),
        );
        self.drain(peer, what);
        let decodes = protocol::decode(frame, ServerConfig::default().max_frame).is_ok();
        self.net.server.handle_frame(peer, frame);
        let answered = self.drain(peer, what);
        if !decodes {
            assert!(
                answered,
                "{what}: a frame that does not decode got neither an error nor a close"
            );
            self.refused += 1;
        }
        self.sent += 1;
        self.net.server.disconnect(peer);
        self.drain(peer, what);
    }

    /// Serve the server's requests until it is idle; whether it sent `peer`
    /// an error or closed it.
    fn drain(&mut self, peer: PeerId, what: &str) -> bool {
        let mut answered = false;
        loop {
            let outputs = self.net.server.take_outputs();
            if outputs.is_empty() {
                return answered;
            }
            for o in outputs {
                match o {
                    ServerOutput::Send { peer: p, msg } if p == peer => {
                        answered |= matches!(msg, Message::Error(_));
                    }
                    ServerOutput::Close { peer: p, .. } if p == peer => answered = true,
                    ServerOutput::Persist { db, batch, .. } => {
                        panic!("{what}: the server asked to persist {batch:?} in {db}")
                    }
                    ServerOutput::Load { db } => {
                        let stored = self.net.server_store.load_now(&db).unwrap();
                        self.net.server.loaded(db, stored);
                    }
                    // Cluster mode only (share_presence is off here).
                    ServerOutput::SharePresence { .. } => {}
                    ServerOutput::ListDatabases { peer, req } => {
                        let names = self.net.server_store.list_now().unwrap();
                        self.net.server.databases_listed(peer, req, names);
                    }
                    ServerOutput::Validate { peer, job } => {
                        self.net.server.validated(peer, job.run())
                    }
                    _ => {}
                }
            }
        }
    }

    fn unchanged(&self) {
        assert_eq!(Self::stored(&self.net), self.before, "the store changed");
        assert_eq!(self.net.pending_server_persists(), 0);
    }
}

#[test]
fn every_truncation_and_extension_of_every_vector_is_refused() {
    let mut target = Target::new();
    for (name, frame) in named_vectors() {
        for cut in 0..frame.len() {
            assert!(
                protocol::decode(&frame[..cut], usize::MAX).is_err(),
                "prefix {cut}"
            );
            target.send(&frame[..cut], &format!("{name} cut at {cut}"));
        }
        let mut longer = frame.clone();
        longer.push(0);
        assert!(matches!(
            protocol::decode(&longer, usize::MAX),
            Err(DecodeError::Length { .. })
        ));
        target.send(&longer, &format!("{name} with a byte more"));
    }
    target.unchanged();
    assert_eq!(target.refused, target.sent, "every one was refused");
}

#[test]
fn flipped_bytes_never_panic_and_change_nothing() {
    let mut target = Target::new();
    for (name, frame) in named_vectors() {
        for i in protocol::HEADER_LEN..frame.len() {
            for bit in [0x01u8, 0x80, 0xFF] {
                let mut f = frame.clone();
                f[i] ^= bit;
                // Either a typed error or a message that passed validation;
                // neither persists anything here (every push in the vectors
                // is under a replica id the connection does not own).
                target.send(&f, &format!("{name} with byte {i} ^ {bit:#x}"));
            }
        }
        target.unchanged();
    }
    assert!(target.sent > 1000, "{} frames", target.sent);
    // (Many flips land in change bytes or values and still decode.)
    assert!(
        target.refused > target.sent / 3,
        "{} of {} refused",
        target.refused,
        target.sent
    );
}

#[test]
fn invalid_names_inside_a_valid_archive_are_refused() {
    let msg = Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: DbName::new("abcd").unwrap(),
        since: Default::default(),
        req: 1,
    }));
    let mut frame = protocol::encode(&msg);
    let at = frame.windows(4).position(|w| w == b"abcd").unwrap();
    frame[at + 1] = b'/';
    assert!(matches!(
        protocol::decode(&frame, usize::MAX),
        Err(DecodeError::Invalid(_))
    ));
}

/// A frame whose deflated body is tiny but inflates past the frame limit.
#[test]
fn a_deflate_bomb_is_refused_by_the_limit() {
    use std::io::Write;
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(&vec![0u8; 8 << 20]).unwrap();
    let body = z.finish().unwrap();
    assert!(body.len() < 64 * 1024);
    let mut frame = vec![PROTOCOL_VERSION, 1];
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    assert!(matches!(
        protocol::decode(&frame, 1 << 20),
        Err(DecodeError::TooLarge { max: 1_048_576, .. })
    ));
    // Within the limit it inflates, and the zeros are not a valid archive.
    assert!(matches!(
        protocol::decode(&frame, 64 << 20),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn unknown_frame_flags_are_refused() {
    let mut frame = protocol::encode(&Message::Ping { nonce: 7 });
    frame[1] = 0x82;
    assert!(matches!(
        protocol::decode(&frame, usize::MAX),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn fuzz_crashers_decode_to_errors() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-crashers");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        // (server/ holds the Server fuzz target's crashers: tests/server_fuzz.rs.)
        if path.is_dir() || path.extension().is_some_and(|x| x == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        assert!(
            protocol::decode(&bytes, protocol::DEFAULT_MAX_FRAME).is_err(),
            "{}",
            path.display()
        );
        n += 1;
    }
    assert!(n > 0, "the regression corpus is empty");
}

proptest! {
    #[test]
    fn random_frames_never_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = protocol::decode(&body, 1 << 20);
        for flags in [0u8, 1] {
            let mut framed = vec![PROTOCOL_VERSION, flags];
            framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
            framed.extend_from_slice(&body);
            let _ = protocol::decode(&framed, 1 << 20);
        }
    }

    #[test]
    fn random_change_bytes_are_typed_errors(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let e = Entry {
            dot: Dot { replica: Identity::from_seed([1; 32]).replica(), counter: 1 },
            doc: DocId::new("d").unwrap(),
            change: bytes,
        };
        prop_assert!(e.parse_change().is_err());
        let mut db = Database::new(DbName::new("x").unwrap(), Identity::from_seed([2; 32]).replica(), automerge::TextEncoding::UnicodeCodePoint);
        let applied = db.apply_entries([e]);
        prop_assert_eq!(applied.errors.len(), 1);
        prop_assert!(db.vv().is_empty());
    }
}

#[test]
fn corrupted_change_checksum_is_refused() {
    let mut db = Database::new(
        DbName::new("x").unwrap(),
        Identity::from_seed([1; 32]).replica(),
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let mut e = db
        .update(&DocId::new("d").unwrap(), &json!({"a": "hello"}))
        .unwrap()
        .unwrap();
    let last = e.change.len() - 1;
    e.change[last] ^= 0x55;
    // Found by the hashed cheap pass, before automerge is asked...
    assert!(matches!(
        e.inspect(&syncline_core::ChangeLimits::default()),
        Err(InvalidChange::Refused {
            reason: syncline_core::ChangeRefused::Malformed("checksum mismatch"),
            ..
        })
    ));
    // ... and by the parse (which skips the cheap pass's hash and compares
    // the checksum with automerge's own).
    assert!(e.parse_change().is_err());
    let zero = Entry {
        dot: Dot {
            replica: Identity::from_seed([1; 32]).replica(),
            counter: 0,
        },
        ..e
    };
    assert!(matches!(
        zero.parse_change(),
        Err(InvalidChange::ZeroCounter { .. })
    ));
}

/// A deflate stream of stored (uncompressed) blocks: valid input for any
/// inflater, built without a compressor.
fn stored_deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks = data.chunks(65_535).peekable();
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

fn deflated_frame(body: &[u8]) -> Vec<u8> {
    let z = stored_deflate(body);
    let mut f = vec![PROTOCOL_VERSION, 1];
    f.extend_from_slice(&(z.len() as u32).to_le_bytes());
    f.extend_from_slice(&z);
    f
}

#[test]
fn the_first_frame_must_be_a_small_uncompressed_hello() {
    use protocol::{Hello, MAX_HELLO_FRAME, MAX_TOKEN_LEN, decode_hello};
    let hello = |token: String| {
        // With the longest host a proof may carry.
        let host = "h".repeat(syncline_core::identity::MAX_HOST_LEN);
        Message::Hello(Box::new(Hello::signed(
            &Identity::from_seed([3; 32]),
            token,
            &host,
            0,
        )))
    };
    // The longest token a Hello may carry fits, and encoders never compress
    // a Hello, however compressible its token.
    let longest = protocol::encode(&hello("a".repeat(MAX_TOKEN_LEN)));
    assert!(longest.len() <= MAX_HELLO_FRAME, "{}", longest.len());
    assert_eq!(longest[1], 0, "a Hello is sent uncompressed");
    assert_eq!(decode_hello(&longest).unwrap().token.len(), MAX_TOKEN_LEN);
    // The same Hello compressed is refused without being inflated.
    let compressed = deflated_frame(&protocol::archive(&hello(String::new())));
    assert!(matches!(
        protocol::decode(&compressed, 1 << 20),
        Ok(Message::Hello(_))
    ));
    assert_eq!(decode_hello(&compressed), Err(DecodeError::CompressedHello));
    // Anything larger is refused by its length alone.
    let big = deflated_frame(&vec![7; 1 << 20]);
    assert!(matches!(
        decode_hello(&big),
        Err(DecodeError::TooLarge {
            max: MAX_HELLO_FRAME,
            ..
        })
    ));
    // Another message first is a protocol violation.
    let sub = protocol::encode(&Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: DbName::new("a").unwrap(),
        since: Default::default(),
        req: 1,
    })));
    let err = decode_hello(&sub).unwrap_err();
    assert_eq!(err, DecodeError::NotHello("subscribe"));
    assert_eq!(err.code(), protocol::ErrorCode::ProtocolViolation);
}
