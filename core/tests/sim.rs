//! Seeded multi-replica simulations: random edits on 2–6 replicas through a
//! server, over a simulated network that drops, duplicates, reorders and cuts
//! messages, with crashes (replicas and server restart from their stores,
//! losing whatever was not yet durable) and compactions at random points.
//!
//! After a healing phase (clean reconnects, everything delivered), every
//! replica must hold byte-identical documents (canonical automerge save),
//! equal to the server's, and nothing the server ever acknowledged may be
//! missing anywhere.
//!
//! `SYNCLINE_SIM_SEED=<n>` replays one seed; `SYNCLINE_SIM_CASES=<n>` sets
//! how many seeds each of the two randomized tests tries (default 1,000
//! each; the two run in parallel). Each draws its seeds from one base seed
//! it prints to stderr (`--nocapture` shows it; `SYNCLINE_SIM_BASE=<n>`
//! repeats that run); a failure names its seed and appends it to
//! `tests/sim-regressions.txt`, whose seeds every run replays.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde_json::{Value as Json, json};
use syncline_core::Identity;
use syncline_core::clock::VersionVector;
use syncline_core::database::Database;
use syncline_core::doc::PathSeg;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::protocol::{self, Message};
use syncline_core::store::{Batch, MemoryStore, StoredDatabase};
use syncline_core::sync::{
    Client, ClientConfig, ClientOutput, OpenAccess, PeerId, Server, ServerConfig, ServerOutput,
    ValidateJob,
};
use syncline_core::view::{BuiltViews, DocView};

/// xorshift64*: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

struct Conn {
    peer: PeerId,
    to_server: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
    closing: bool,
}

struct Replica {
    id: ReplicaId,
    identity: Identity,
    client: Client,
    store: MemoryStore,
    /// Cached document views, written with their batch (replicas with an
    /// even first id byte keep them, like a browser store does).
    views: Views,
    persists: VecDeque<(DbName, u64, Batch, Vec<DocView>)>,
    conn: Option<Conn>,
}

type Views = BTreeMap<(DbName, DocId), DocView>;

fn keeps_views(id: ReplicaId) -> bool {
    id.0[0].is_multiple_of(2)
}

struct Sim {
    rng: Rng,
    faults: bool,
    dbs: Vec<DbName>,
    server_id: ReplicaId,
    server: Server<OpenAccess>,
    server_store: MemoryStore,
    server_persists: VecDeque<(DbName, u64, Batch)>,
    loads: VecDeque<DbName>,
    /// Pushes being parsed "off the hub" (the server defers validation).
    validations: VecDeque<(PeerId, ValidateJob)>,
    /// Server views built and not yet handed back (they may go stale).
    built_views: Vec<(DbName, BuiltViews)>,
    replicas: Vec<Replica>,
    /// Everything the server ever acknowledged (Ack or reply vv), per database.
    acked: HashMap<DbName, VersionVector>,
    log: Vec<String>,
    /// `Hello`s sent so far (each one's nonce).
    hellos: u64,
}

const DOCS: [&str; 5] = ["a", "b", "c", "todo:1", "todo:2"];

fn random_json(rng: &mut Rng) -> Json {
    let mut m = serde_json::Map::new();
    // Some writes set only scalars (a status, a cursor): on top of what a
    // replica holds, those are shown without automerge (`Database`'s
    // patched documents), so the simulation exercises that path too.
    let scalars_only = rng.chance(40);
    for key in ["title", "done", "n", "tags", "meta"] {
        if rng.chance(60) {
            let kinds = if scalars_only { 3 } else { 6 };
            let v = match rng.below(kinds) {
                0 => json!(format!("t{}", rng.below(5))),
                1 => json!(rng.chance(50)),
                2 => json!(rng.below(100)),
                3 => json!(
                    (0..rng.below(4))
                        .map(|i| i * rng.below(3))
                        .collect::<Vec<_>>()
                ),
                4 => json!({"x": rng.below(3), "y": [rng.below(2)]}),
                _ => Json::Null,
            };
            m.insert(key.to_string(), v);
        }
    }
    Json::Object(m)
}

impl Sim {
    fn new(seed: u64, n: usize) -> Self {
        let mut rng = Rng::new(seed);
        let dbs = vec![DbName::new("alpha").unwrap(), DbName::new("beta").unwrap()];
        let server_id = ReplicaId([0xEE; 16]);
        let replicas = (0..n)
            .map(|i| {
                let mut seed = [0u8; 32];
                seed[0] = i as u8 + 1;
                seed[1..9].copy_from_slice(&rng.next().to_le_bytes());
                let identity = Identity::from_seed(seed);
                let id = identity.replica();
                let store = MemoryStore::new();
                let views = Views::new();
                let client = Self::boot_client(id, &store, &views, &dbs);
                Replica {
                    id,
                    identity,
                    client,
                    store,
                    views,
                    persists: VecDeque::new(),
                    conn: None,
                }
            })
            .collect();
        Sim {
            rng,
            faults: true,
            dbs,
            server_id,
            server: Self::boot_server(server_id),
            server_store: MemoryStore::new(),
            server_persists: VecDeque::new(),
            loads: VecDeque::new(),
            validations: VecDeque::new(),
            built_views: Vec::new(),
            replicas,
            acked: HashMap::new(),
            log: Vec::new(),
            hellos: 0,
        }
    }

    fn boot_server(id: ReplicaId) -> Server<OpenAccess> {
        let config = ServerConfig {
            replica: id,
            // Small frames so replies are cut into several parts.
            max_frame: 4096,
            max_entries_per_push: 8,
            serve_views: true,
            reply_part_bytes: 2048,
            // Validate "off the hub", so a push waits while others run.
            defer_validation: true,
            ..ServerConfig::default()
        };
        Server::new(config, OpenAccess)
    }

    fn boot_client(id: ReplicaId, store: &MemoryStore, views: &Views, dbs: &[DbName]) -> Client {
        let config = ClientConfig {
            max_frame: 4096,
            max_entries_per_push: 8,
            keep_views: keeps_views(id),
            // Refresh views often (every 1–4 entries) so crashes land
            // between views and batches.
            view_refresh_entries: 1 + usize::from(id.0[1] % 4),
            ..ClientConfig::default()
        };
        let mut c = Client::new(id, "", config);
        for db in dbs {
            let v = views
                .iter()
                .filter(|((d, _), _)| d == db)
                .map(|(_, v)| v.clone())
                .collect();
            c.open_with_views(db.clone(), store.load_now(db).unwrap(), v);
        }
        c
    }

    fn note(&mut self, s: String) {
        self.log.push(s);
    }

    // ---- routing outputs ----

    fn route_client(&mut self, i: usize) {
        let outs = self.replicas[i].client.take_outputs();
        for o in outs {
            match o {
                ClientOutput::Send(m) => {
                    let frame = protocol::encode(&m);
                    if let Some(c) = &mut self.replicas[i].conn {
                        c.to_server.push_back(frame);
                    }
                }
                ClientOutput::Persist {
                    db,
                    seq,
                    batch,
                    views,
                } => self.replicas[i].persists.push_back((db, seq, batch, views)),
                ClientOutput::Event(_) => {}
            }
        }
    }

    fn conn_of_peer(&mut self, peer: PeerId) -> Option<&mut Conn> {
        self.replicas
            .iter_mut()
            .filter_map(|r| r.conn.as_mut())
            .find(|c| c.peer == peer)
    }

    fn record_acks(&mut self, frame: &[u8]) {
        if let Ok(m) = protocol::decode(frame, usize::MAX) {
            let (db, vv) = match m {
                Message::Ack(a) => (a.db, a.vv),
                Message::Delta(d) => (d.db, d.vv),
                _ => return,
            };
            self.acked.entry(db).or_default().merge(&vv);
        }
    }

    fn route_server(&mut self) {
        let outs = self.server.take_outputs();
        for o in outs {
            match o {
                ServerOutput::Send { peer, msg } => {
                    let frame = protocol::encode(&msg);
                    self.record_acks(&frame);
                    if let Some(c) = self.conn_of_peer(peer) {
                        c.to_client.push_back(frame);
                    }
                }
                ServerOutput::Broadcast { peers, frame, .. } => {
                    self.record_acks(&frame);
                    for p in peers {
                        if let Some(c) = self.conn_of_peer(p) {
                            c.to_client.push_back(frame.as_ref().clone());
                        }
                    }
                }
                ServerOutput::Reply { peer, reply } => {
                    for frame in reply.frames() {
                        self.record_acks(&frame);
                        if let Some(c) = self.conn_of_peer(peer) {
                            c.to_client.push_back(frame);
                        }
                    }
                }
                ServerOutput::Close { peer, .. } => {
                    if let Some(c) = self.conn_of_peer(peer) {
                        c.closing = true;
                        c.to_server.clear();
                    }
                }
                ServerOutput::Persist { db, seq, batch } => {
                    self.server_persists.push_back((db, seq, batch))
                }
                ServerOutput::Load { db } => self.loads.push_back(db),
                ServerOutput::Validate { peer, job } => self.validations.push_back((peer, *job)),
                // Cluster mode only (share_presence is off here).
                ServerOutput::SharePresence { .. } => {}
                ServerOutput::ListDatabases { peer, req } => {
                    let names = self.server_store.list_now().unwrap();
                    self.server.databases_listed(peer, req, names);
                }
            }
        }
    }

    // ---- actions ----

    fn edit(&mut self) {
        let i = self.rng.below(self.replicas.len());
        let db = self.dbs[self.rng.below(self.dbs.len())].clone();
        let doc = DocId::new(DOCS[self.rng.below(DOCS.len())]).unwrap();
        // Whatever the replica had to send or write goes first, so a failed
        // edit can be seen to add nothing.
        self.route_client(i);
        let before = replica_state(&self.replicas[i].client, &db);
        let client = &mut self.replicas[i].client;
        let kind = self.rng.below(10);
        let res = match kind {
            0..=4 => {
                let v = random_json(&mut self.rng);
                client.update(&db, &doc, &v)
            }
            5 | 6 => {
                // Now and then where the edit must be refused: a key random
                // writes hold scalars under, or past the end of the text.
                let key = if self.rng.chance(15) { "title" } else { "text" };
                let path = [PathSeg::from(key)];
                let len = client
                    .database(&db)
                    .and_then(|d| d.get_path(&doc, &path))
                    .and_then(|v| v.as_str().map(|s| s.chars().count()))
                    .unwrap_or(0);
                let pos = self.rng.below(len + 1);
                let del = self.rng.below(len - pos + 1).min(2);
                let pos = if self.rng.chance(10) { len + 1 } else { pos };
                let ins = ["x", "yz", "", "ü"][self.rng.below(4)];
                client.splice_text(&db, &doc, &path, pos, del, ins)
            }
            7 | 8 => {
                let key = if self.rng.chance(15) { "n" } else { "count" };
                client.increment(
                    &db,
                    &doc,
                    &[PathSeg::from(key)],
                    1 + self.rng.below(3) as i64,
                )
            }
            _ => client.delete(&db, &doc),
        };
        // Errors are fine (e.g. splicing where a concurrent edit put a number):
        // they must be typed, not panics, and must change nothing.
        if let Err(e) = res {
            let client = &mut self.replicas[i].client;
            let outputs = client.take_outputs();
            assert!(
                outputs.is_empty(),
                "replica {i}: the failed edit ({e}) of {db}/{doc} produced {outputs:?}"
            );
            assert!(
                replica_state(client, &db) == before,
                "replica {i}: the failed edit ({e}) of {db}/{doc} changed the replica"
            );
            self.note(format!("replica {i}: edit of {db}/{doc} refused: {e}"));
            REFUSED_EDITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.route_client(i);
    }

    fn flush_client(&mut self, i: usize, all: bool) {
        while let Some((db, seq, batch, views)) = self.replicas[i].persists.pop_front() {
            self.replicas[i].store.write_now(&db, &batch).unwrap();
            for v in views {
                self.replicas[i]
                    .views
                    .insert((db.clone(), v.doc.clone()), v);
            }
            self.replicas[i].client.persisted(&db, seq);
            self.route_client(i);
            if !all {
                break;
            }
        }
    }

    fn flush_server(&mut self, n: usize) {
        for _ in 0..n {
            let Some((db, seq, batch)) = self.server_persists.pop_front() else {
                break;
            };
            self.server_store.write_now(&db, &batch).unwrap();
            self.server.persisted(&db, seq);
            self.route_server();
        }
    }

    fn load(&mut self) {
        if let Some(db) = self.loads.pop_front() {
            let stored = self.server_store.load_now(&db).unwrap();
            self.server.loaded(db, stored);
            self.route_server();
        }
    }

    fn validate(&mut self) {
        if let Some((peer, job)) = self.validations.pop_front() {
            self.server.validated(peer, job.run());
            self.route_server();
        }
    }

    fn connect(&mut self, i: usize) {
        if self.replicas[i].conn.is_some() {
            return;
        }
        let peer = self.server.connect();
        self.replicas[i].conn = Some(Conn {
            peer,
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            closing: false,
        });
        // A counter for the nonce keeps the run deterministic.
        self.hellos += 1;
        let mut nonce = [0u8; 16];
        nonce[..8].copy_from_slice(&self.hellos.to_le_bytes());
        let proof = self.replicas[i].identity.prove_with_nonce("", 0, nonce);
        self.replicas[i].client.connected(proof);
        self.route_client(i);
    }

    fn cut(&mut self, i: usize) {
        if let Some(c) = self.replicas[i].conn.take() {
            self.server.disconnect(c.peer);
            self.route_server();
            self.replicas[i].client.disconnected();
            self.route_client(i);
        }
    }

    /// Deliver one frame on connection `i`, maybe with a fault.
    fn deliver(&mut self, i: usize, to_server: bool) {
        let faults = self.faults;
        let mode = if faults { self.rng.below(100) } else { 99 };
        let pick = self.rng.next() as usize;
        let Some(c) = self.replicas[i].conn.as_mut() else {
            return;
        };
        let q = if to_server {
            &mut c.to_server
        } else {
            &mut c.to_client
        };
        if q.is_empty() {
            if !to_server && c.closing {
                self.cut(i);
            }
            return;
        }
        if !to_server && mode >= 10 && pick.is_multiple_of(3) {
            // Several queued frames at once, as a transport hands them over
            // (live deltas of one database are then applied as one batch).
            let k = (1 + (pick >> 8) % 6).min(q.len());
            let frames: Vec<Vec<u8>> = q.drain(..k).collect();
            if self.replicas[i]
                .client
                .handle_frames(frames.iter().map(Vec::as_slice))
                .is_err()
            {
                self.cut(i);
            }
            self.route_client(i);
            return;
        }
        let frame = match mode {
            0..=2 => {
                q.pop_front(); // dropped
                return;
            }
            3..=5 => q.front().cloned(), // duplicated: delivered, stays queued
            6..=9 => {
                let k = pick % q.len();
                q.remove(k) // reordered
            }
            _ => q.pop_front(),
        };
        let Some(frame) = frame else { return };
        if to_server {
            let peer = c.peer;
            self.server.handle_frame(peer, &frame);
            self.route_server();
        } else {
            // A frame the client cannot decode closes the connection.
            if self.replicas[i].client.handle_frame(&frame).is_err() {
                self.cut(i);
            }
            self.route_client(i);
        }
    }

    fn restart_client(&mut self, i: usize) {
        self.cut(i);
        let r = &mut self.replicas[i];
        r.persists.clear(); // not durable: lost in the crash
        r.client = Self::boot_client(r.id, &r.store, &r.views, &self.dbs);
        let _ = r.client.take_outputs();
        self.note(format!("restart client {i}"));
    }

    fn restart_server(&mut self) {
        for i in 0..self.replicas.len() {
            if let Some(_c) = self.replicas[i].conn.take() {
                self.replicas[i].client.disconnected();
                self.route_client(i);
            }
        }
        self.server_persists.clear();
        self.loads.clear();
        self.validations.clear();
        self.server = Self::boot_server(self.server_id);
        // Nothing acknowledged may be missing from the store.
        for db in self.dbs.clone() {
            let stored = self.server_store.load_now(&db).unwrap();
            let (log, _) = syncline_core::log::Log::from_stored(stored);
            let acked = self.acked.get(&db).cloned().unwrap_or_default();
            assert!(
                log.vv().dominates(&acked),
                "server lost acknowledged entries of {db}: store {:?} < acked {:?}",
                log.vv(),
                acked
            );
        }
        self.note("restart server".into());
    }

    fn compact_server(&mut self) {
        let db = self.dbs[self.rng.below(self.dbs.len())].clone();
        let Some(log) = self.server.log(&db) else {
            return;
        };
        let mut up_to = log.vv().clone();
        // Sometimes only part of the log.
        let reps: Vec<ReplicaId> = up_to.iter().map(|(r, _)| *r).collect();
        for r in reps {
            if self.rng.chance(30) {
                let c = up_to.get(&r);
                up_to.set(r, c / 2);
            }
        }
        self.server.compact(&db, &up_to);
        self.route_server();
        self.note(format!("compact server {db}"));
    }

    /// Build some of the server's missing views; hand them back now or at a
    /// later step, when they may have gone stale.
    fn build_server_views(&mut self) {
        let db = self.dbs[self.rng.below(self.dbs.len())].clone();
        let max = 1 + self.rng.below(40);
        if let Some(job) = self.server.view_job(&db, max) {
            self.built_views.push((db.clone(), job.build()));
            self.note(format!("build views {db}"));
        }
        while !self.built_views.is_empty() && self.rng.chance(50) {
            let (db, built) = self.built_views.remove(0);
            self.server.views_built(&db, built);
        }
    }

    fn compact_client(&mut self) {
        let i = self.rng.below(self.replicas.len());
        let db = self.dbs[self.rng.below(self.dbs.len())].clone();
        self.replicas[i].client.compact(&db).unwrap();
        self.route_client(i);
    }

    fn step(&mut self) {
        let n = self.replicas.len();
        let i = self.rng.below(n);
        match self.rng.below(106) {
            0..=19 => self.edit(),
            20..=44 => self.deliver(i, true),
            45..=69 => self.deliver(i, false),
            70..=77 => {
                let all = self.rng.chance(50);
                self.flush_client(i, all)
            }
            78..=85 => {
                let k = 1 + self.rng.below(3);
                self.flush_server(k)
            }
            86..=88 => {
                self.load();
                self.validate();
            }
            89..=92 => self.connect(i),
            93..=94 => self.cut(i),
            95 => self.restart_client(i),
            96 => self.restart_server(),
            97 | 98 => self.compact_server(),
            99 => self.compact_client(),
            _ => self.build_server_views(),
        }
    }

    fn busy(&self) -> bool {
        !self.server_persists.is_empty()
            || !self.loads.is_empty()
            || !self.validations.is_empty()
            || self.replicas.iter().any(|r| {
                !r.persists.is_empty()
                    || r.conn
                        .as_ref()
                        .is_some_and(|c| !c.to_server.is_empty() || !c.to_client.is_empty())
            })
    }

    /// Clean reconnects and fault-free delivery until nothing moves.
    fn heal(&mut self) {
        self.faults = false;
        for i in 0..self.replicas.len() {
            self.cut(i);
        }
        for i in 0..self.replicas.len() {
            self.flush_client(i, true);
            self.connect(i);
        }
        let mut rounds = 0;
        while self.busy() {
            rounds += 1;
            assert!(rounds < 2_000, "no quiescence after healing");
            for i in 0..self.replicas.len() {
                self.flush_client(i, true);
                while self.replicas[i]
                    .conn
                    .as_ref()
                    .is_some_and(|c| !c.to_server.is_empty())
                {
                    self.deliver(i, true);
                }
            }
            while !self.loads.is_empty() || !self.validations.is_empty() {
                self.load();
                self.validate();
            }
            self.flush_server(usize::MAX);
            for i in 0..self.replicas.len() {
                while self.replicas[i]
                    .conn
                    .as_ref()
                    .is_some_and(|c| !c.to_client.is_empty())
                {
                    self.deliver(i, false);
                }
            }
        }
    }

    fn check(&mut self) {
        for db in self.dbs.clone() {
            let stored: StoredDatabase = self.server_store.load_now(&db).unwrap();
            let (server_db, errors) = Database::from_stored(
                db.clone(),
                self.server_id,
                automerge::TextEncoding::UnicodeCodePoint,
                stored,
            );
            assert!(errors.is_empty(), "server data does not load: {errors:?}");
            let acked = self.acked.get(&db).cloned().unwrap_or_default();
            assert!(
                server_db.vv().dominates(&acked),
                "server lost acked entries of {db}"
            );
            let expect: BTreeMap<String, (Vec<u8>, Option<Json>)> = server_db
                .documents()
                .map(|(id, d)| (id.to_string(), (d.canonical_save(), d.to_json())))
                .collect();
            for (i, r) in self.replicas.iter().enumerate() {
                let d = r.client.database(&db).expect("open");
                assert!(
                    d.vv().dominates(&acked),
                    "replica {i} misses acked entries of {db}"
                );
                assert_eq!(d.vv(), server_db.vv(), "replica {i} vector differs on {db}");
                // Values as shown (from cached views where not loaded) first,
                // then the automerge documents themselves.
                let shown: BTreeMap<String, Option<Json>> = d
                    .ids()
                    .map(|id| {
                        let v = if d.is_cached(id) {
                            // (The simulation's values hold no floats.)
                            d.cached_json(id).map(|t| serde_json::from_str(t).unwrap())
                        } else {
                            d.get(id)
                        };
                        (id.to_string(), v)
                    })
                    .collect();
                let expect_shown: BTreeMap<String, Option<Json>> = expect
                    .iter()
                    .map(|(k, (_, v))| (k.clone(), v.clone()))
                    .collect();
                assert_eq!(
                    shown, expect_shown,
                    "replica {i} shows other values on {db}"
                );
                let got: BTreeMap<String, (Vec<u8>, Option<Json>)> = d
                    .documents()
                    .map(|(id, d)| (id.to_string(), (d.canonical_save(), d.to_json())))
                    .collect();
                assert_eq!(
                    got.keys().collect::<Vec<_>>(),
                    expect.keys().collect::<Vec<_>>(),
                    "replica {i} documents differ on {db}"
                );
                for (k, (bytes, json)) in &got {
                    assert_eq!(json, &expect[k].1, "replica {i} {db}/{k} value differs");
                    assert!(bytes == &expect[k].0, "replica {i} {db}/{k} bytes differ");
                }
                // The replica's own store reloads to the same state.
                let reloaded = Database::from_stored(
                    db.clone(),
                    r.id,
                    automerge::TextEncoding::UnicodeCodePoint,
                    r.store.load_now(&db).unwrap(),
                )
                .0;
                assert_eq!(reloaded.vv(), d.vv(), "replica {i} store is behind on {db}");
            }
        }
    }
}

/// Edits refused (and checked to have changed nothing), over the process.
static REFUSED_EDITS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// What an edit could change on a replica's database: its version vector,
/// own counter, log and every document's value.
fn replica_state(client: &Client, db: &DbName) -> (VersionVector, u64, usize, Vec<(DocId, Json)>) {
    let d = client.database(db).expect("open");
    let docs = d
        .ids()
        .map(|id| (id.clone(), d.get(id).unwrap_or(Json::Null)))
        .collect();
    (
        d.vv().clone(),
        d.own_counter(),
        d.log().entries().len(),
        docs,
    )
}

fn run(seed: u64) {
    let mut rng = Rng::new(seed ^ 0xABCD);
    let n = 2 + rng.below(5);
    let steps = 150 + rng.below(250);
    let mut sim = Sim::new(seed, n);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        for i in 0..n {
            sim.connect(i);
        }
        for _ in 0..steps {
            sim.step();
        }
        sim.heal();
        sim.check();
        // And once more after a full restart of everything.
        sim.restart_server();
        for i in 0..n {
            // A clean shutdown: the adapter stores the views not yet written.
            let dbs = sim.dbs.clone();
            let r = &mut sim.replicas[i];
            for db in &dbs {
                for v in r.client.take_views(db) {
                    r.views.insert((db.clone(), v.doc.clone()), v);
                }
            }
            sim.restart_client(i);
            // A replica keeping views shows every document from them.
            let r = &sim.replicas[i];
            if keeps_views(r.id) {
                for db in &sim.dbs {
                    let d = r.client.database(db).expect("open");
                    assert_eq!(
                        d.cached_documents(),
                        d.log().doc_clocks().len(),
                        "replica {i} loaded documents of {db} its views cover"
                    );
                }
            }
        }
        sim.heal();
        sim.check();
    }));
    if let Err(e) = result {
        let tail: Vec<&String> = sim.log.iter().rev().take(10).collect();
        eprintln!(
            "simulation failed: SYNCLINE_SIM_SEED={seed} ({n} replicas, {steps} steps); last notes: {tail:?}"
        );
        std::panic::resume_unwind(e);
    }
}

fn cases() -> u32 {
    std::env::var("SYNCLINE_SIM_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

/// Seeds that failed once (and a few fixed ones), replayed by every run.
const REGRESSIONS: &str = "tests/sim-regressions.txt";

fn regression_seeds() -> Vec<u64> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(REGRESSIONS);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("{}: {l:?} is not a seed", path.display()))
        })
        .collect()
}

/// Run `seed`; on failure, keep it in the regression list (to be
/// committed) and fail with the seed in the message.
fn run_recorded(what: &str, seed: u64) {
    if let Err(e) = std::panic::catch_unwind(|| run(seed)) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(REGRESSIONS);
        let known = regression_seeds().contains(&seed);
        if !known {
            use std::io::Write;
            let _ = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut f| writeln!(f, "{seed} # failed in {what}"));
        }
        let why = e
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| e.downcast_ref::<&str>().copied())
            .unwrap_or("(panic)");
        panic!(
            "{what}: SYNCLINE_SIM_SEED={seed} failed{}: {why}",
            if known {
                String::new()
            } else {
                format!(" (added to {REGRESSIONS}: commit it)")
            }
        );
    }
}

/// `cases()` seeds drawn from one base seed (`SYNCLINE_SIM_BASE`, else a
/// fresh one), announced on stderr so any run can be repeated whole, and
/// each failing one named in the failure and kept as a regression.
fn run_many(what: &str, salt: u64) {
    let base = std::env::var("SYNCLINE_SIM_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            use std::hash::BuildHasher;
            std::collections::hash_map::RandomState::new().hash_one(std::time::SystemTime::now())
        });
    let mut rng = Rng::new(base ^ salt);
    let seeds: Vec<u64> = (0..cases()).map(|_| rng.next()).collect();
    eprintln!(
        "{what}: {} seeds from SYNCLINE_SIM_BASE={base} (first {:?}, last {:?})",
        seeds.len(),
        seeds.first(),
        seeds.last()
    );
    for (k, &seed) in seeds.iter().enumerate() {
        run_recorded(
            &format!(
                "{what} (seed {k} of {} from SYNCLINE_SIM_BASE={base})",
                seeds.len()
            ),
            seed,
        );
    }
    eprintln!(
        "{what}: passed; {} refused edits so far in this process, each changing nothing",
        REFUSED_EDITS.load(std::sync::atomic::Ordering::Relaxed)
    );
}

#[test]
fn replay_seed_from_env() {
    if let Some(seed) = std::env::var("SYNCLINE_SIM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        run(seed);
    }
}

#[test]
fn regression_seeds_still_pass() {
    let seeds = regression_seeds();
    assert!(!seeds.is_empty(), "{REGRESSIONS} lists no seed");
    eprintln!(
        "replaying {} seeds from {REGRESSIONS}: {seeds:?}",
        seeds.len()
    );
    for seed in seeds {
        run_recorded("regression_seeds_still_pass", seed);
    }
}

// The two run in parallel, each over its own seeds.
#[test]
fn replicas_converge_and_keep_acknowledged_entries() {
    run_many("replicas_converge_and_keep_acknowledged_entries", 0);
}

#[test]
fn replicas_converge_and_keep_acknowledged_entries_more() {
    run_many(
        "replicas_converge_and_keep_acknowledged_entries_more",
        0x5EED_0FA1_7E55,
    );
}
