//! A fault-free, synchronous network of one server and several clients,
//! with in-memory stores, that counts every frame and byte.

#![allow(dead_code)]

use std::collections::VecDeque;

use syncline_core::Identity;
use syncline_core::ids::{DbName, ReplicaId};
use syncline_core::protocol::{self, Message};
use syncline_core::store::{Batch, MemoryStore};
use syncline_core::sync::{
    Authenticator, Client, ClientConfig, ClientEvent, ClientOutput, PeerId, Server, ServerConfig,
    ServerOutput,
};

/// Frames and bytes seen in one direction.
#[derive(Debug, Default, Clone)]
pub struct Traffic {
    pub frames: Vec<Message>,
    pub bytes: usize,
}

pub struct Node {
    pub client: Client,
    pub identity: Identity,
    pub store: MemoryStore,
    pub peer: Option<PeerId>,
    pub up: Traffic,
    pub down: Traffic,
    pub events: Vec<ClientEvent>,
    pub to_server: VecDeque<Vec<u8>>,
    to_client: VecDeque<Vec<u8>>,
    persists: VecDeque<(DbName, u64, Batch)>,
    pub closed: bool,
}

pub struct Net<A> {
    pub server: Server<A>,
    pub server_store: MemoryStore,
    pub nodes: Vec<Node>,
    /// Hold server persists until `flush_server` (to observe ack-after-durable).
    pub hold_server_persists: bool,
    /// Hold client persists until `flush_client` (to observe local durability).
    pub hold_client_persists: bool,
    /// Fail this many of the server's next loads (`Server::load_failed`).
    pub fail_loads: usize,
    server_persists: VecDeque<(DbName, u64, Batch)>,
}

impl<A: Authenticator> Net<A> {
    pub fn new(auth: A) -> Self {
        Self::with_config(
            auth,
            ServerConfig {
                replica: ReplicaId([0xEE; 16]),
                ..ServerConfig::default()
            },
        )
    }

    pub fn with_config(auth: A, config: ServerConfig) -> Self {
        Net {
            server: Server::new(config, auth),
            server_store: MemoryStore::new(),
            nodes: Vec::new(),
            hold_server_persists: false,
            hold_client_persists: false,
            fail_loads: 0,
            server_persists: VecDeque::new(),
        }
    }

    /// Add a client with replica id `[n; 16]` and `token`.
    pub fn add(&mut self, n: u8, token: &str) -> usize {
        self.add_with(n, token, ClientConfig::default())
    }

    /// [`Net::add`] with a client configuration.
    pub fn add_with(&mut self, n: u8, token: &str, config: ClientConfig) -> usize {
        self.nodes.push(Node {
            client: Client::new(Identity::from_seed([n; 32]).replica(), token, config),
            identity: Identity::from_seed([n; 32]),
            store: MemoryStore::new(),
            peer: None,
            up: Traffic::default(),
            down: Traffic::default(),
            events: Vec::new(),
            to_server: VecDeque::new(),
            to_client: VecDeque::new(),
            persists: VecDeque::new(),
            closed: false,
        });
        self.nodes.len() - 1
    }

    pub fn open(&mut self, i: usize, db: &str) {
        let db = DbName::new(db).unwrap();
        let stored = self.nodes[i].store.load_now(&db).unwrap();
        self.nodes[i].client.open(db, stored);
        self.route_client(i);
    }

    pub fn connect(&mut self, i: usize) {
        let peer = self.server.connect();
        let n = &mut self.nodes[i];
        n.peer = Some(peer);
        n.closed = false;
        n.client.connected(n.identity.prove("", 0));
        self.route_client(i);
    }

    pub fn disconnect(&mut self, i: usize) {
        if let Some(p) = self.nodes[i].peer.take() {
            self.server.disconnect(p);
            self.route_server();
        }
        let n = &mut self.nodes[i];
        n.to_server.clear();
        n.to_client.clear();
        n.client.disconnected();
        self.route_client(i);
    }

    /// Send a raw frame from client `i` (bypassing its state machine).
    pub fn raw(&mut self, i: usize, frame: Vec<u8>) {
        self.nodes[i].to_server.push_back(frame);
    }

    pub fn route_client(&mut self, i: usize) {
        for o in self.nodes[i].client.take_outputs() {
            match o {
                ClientOutput::Send(m) => {
                    let f = protocol::encode(&m);
                    if self.nodes[i].peer.is_some() {
                        self.nodes[i].to_server.push_back(f);
                    }
                }
                ClientOutput::Persist { db, seq, batch, .. } => {
                    self.nodes[i].persists.push_back((db, seq, batch))
                }
                ClientOutput::Event(e) => self.nodes[i].events.push(e),
            }
        }
    }

    fn node_of(&mut self, peer: PeerId) -> Option<&mut Node> {
        self.nodes.iter_mut().find(|n| n.peer == Some(peer))
    }

    pub fn route_server(&mut self) {
        for o in self.server.take_outputs() {
            match o {
                ServerOutput::Send { peer, msg } => {
                    let f = protocol::encode(&msg);
                    if let Some(n) = self.node_of(peer) {
                        n.to_client.push_back(f);
                    }
                }
                ServerOutput::Broadcast { peers, frame, .. } => {
                    for p in peers {
                        if let Some(n) = self.node_of(p) {
                            n.to_client.push_back(frame.as_ref().clone());
                        }
                    }
                }
                ServerOutput::Reply { peer, reply } => {
                    if let Some(n) = self.node_of(peer) {
                        n.to_client.extend(reply.frames());
                    }
                }
                ServerOutput::Close { peer, .. } => {
                    if let Some(n) = self.node_of(peer) {
                        n.closed = true;
                    }
                }
                ServerOutput::Persist { db, seq, batch } => {
                    self.server_persists.push_back((db, seq, batch));
                }
                ServerOutput::Load { db } if self.fail_loads > 0 => {
                    self.fail_loads -= 1;
                    self.server.load_failed(&db, "the store timed out");
                }
                ServerOutput::Load { db } => {
                    let stored = self.server_store.load_now(&db).unwrap();
                    self.server.loaded(db, stored);
                }
                // Cluster mode only (share_presence is off here).
                ServerOutput::SharePresence { .. } => {}
                ServerOutput::ListDatabases { peer, req } => {
                    let names = self.server_store.list_now().unwrap();
                    self.server.databases_listed(peer, req, names);
                }
                ServerOutput::Validate { peer, job } => self.server.validated(peer, job.run()),
            }
        }
    }

    pub fn flush_server(&mut self) {
        while let Some((db, seq, batch)) = self.server_persists.pop_front() {
            self.server_store.write_now(&db, &batch).unwrap();
            self.server.persisted(&db, seq);
            self.route_server();
        }
    }

    /// Make every held batch durable in one group commit (one `persisted`
    /// for the last of them, as a store that fsyncs them together reports).
    pub fn flush_server_together(&mut self) {
        let mut last = None;
        while let Some((db, seq, batch)) = self.server_persists.pop_front() {
            self.server_store.write_now(&db, &batch).unwrap();
            last = Some((db, seq));
        }
        if let Some((db, seq)) = last {
            self.server.persisted(&db, seq);
            self.route_server();
        }
    }

    /// The disk lost the held batches (the adapter reports `persist_failed`).
    pub fn drop_server_persists(&mut self) {
        self.server_persists.clear();
    }

    /// The held batches failed to write; the adapter says so, as the hub
    /// does (the server answers their senders with `Internal`).
    pub fn fail_server_persists(&mut self) {
        while let Some((db, seq, _)) = self.server_persists.pop_front() {
            self.server.persist_failed(&db, seq, "disk full");
            self.route_server();
        }
    }

    /// Make client `i`'s pending writes durable; whether there were any.
    pub fn flush_client(&mut self, i: usize) -> bool {
        self.route_client(i);
        let mut any = false;
        while let Some((db, seq, batch)) = self.nodes[i].persists.pop_front() {
            self.nodes[i].store.write_now(&db, &batch).unwrap();
            self.nodes[i].client.persisted(&db, seq);
            self.route_client(i);
            any = true;
        }
        any
    }

    /// Make client `i`'s oldest pending write durable; whether there was one.
    pub fn flush_client_one(&mut self, i: usize) -> bool {
        self.route_client(i);
        let Some((db, seq, batch)) = self.nodes[i].persists.pop_front() else {
            return false;
        };
        self.nodes[i].store.write_now(&db, &batch).unwrap();
        self.nodes[i].client.persisted(&db, seq);
        self.route_client(i);
        true
    }

    pub fn pending_server_persists(&self) -> usize {
        self.server_persists.len()
    }

    /// Deliver everything until nothing moves.
    pub fn run(&mut self) {
        while self.step() {}
    }

    /// One round of deliveries; false when nothing moved.
    pub fn step(&mut self) -> bool {
        {
            let mut moved = false;
            for i in 0..self.nodes.len() {
                self.route_client(i);
                if !self.hold_client_persists && self.flush_client(i) {
                    moved = true;
                }
                while let Some(f) = self.nodes[i].to_server.pop_front() {
                    moved = true;
                    let n = &mut self.nodes[i];
                    n.up.bytes += f.len();
                    n.up.frames.push(protocol::decode(&f, usize::MAX).unwrap());
                    if let Some(p) = n.peer {
                        self.server.handle_frame(p, &f);
                        self.route_server();
                    }
                }
            }
            self.route_server();
            if !self.hold_server_persists && !self.server_persists.is_empty() {
                self.flush_server();
                moved = true;
            }
            for i in 0..self.nodes.len() {
                while let Some(f) = self.nodes[i].to_client.pop_front() {
                    moved = true;
                    let n = &mut self.nodes[i];
                    n.down.bytes += f.len();
                    n.down
                        .frames
                        .push(protocol::decode(&f, usize::MAX).unwrap());
                    // The server only sends frames a client can read.
                    if let Err(e) = n.client.handle_frame(&f) {
                        panic!("client {i} refused a frame from the server: {e}");
                    }
                    self.route_client(i);
                }
                if self.nodes[i].closed && self.nodes[i].peer.is_some() {
                    self.disconnect(i);
                }
            }
            moved
        }
    }

    /// Build every missing server view of `db`, as the native hub does
    /// when the database is quiet.
    pub fn build_views(&mut self, db: &DbName) {
        while let Some(job) = self.server.view_job(db, 1_000) {
            let built = job.build();
            self.server.views_built(db, built);
        }
    }

    /// Forget traffic counters.
    pub fn reset_traffic(&mut self) {
        for n in &mut self.nodes {
            n.up = Traffic::default();
            n.down = Traffic::default();
            n.events.clear();
        }
    }
}

/// `len` lowercase letters from a xorshift generator seeded by `seed`:
/// text that deflate cannot shrink much, so sizes on the wire are the data's.
pub fn incompressible(len: usize, seed: u64) -> String {
    let mut x = 0x2545_f491_4f6c_dd1d_u64 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}
