//! What one connection may cost everyone else: databases it subscribes to,
//! and presence (state size, announcement rate, frames a join takes).

use syncline_core::Identity;
use syncline_core::ids::DbName;
use syncline_core::protocol::{
    self, ErrorCode, Hello, Message, Presence, PresenceUpdate, Subscribe,
};
use syncline_core::store::StoredDatabase;
use syncline_core::sync::{OpenAccess, PeerId, Server, ServerConfig, ServerOutput};

fn db(name: &str) -> DbName {
    DbName::new(name).unwrap()
}

/// The core server with loads answered at once (unless held) and every
/// message each peer received, broadcasts decoded.
struct Hub {
    server: Server<OpenAccess>,
    got: Vec<(PeerId, Message)>,
    hold_loads: bool,
    loads: Vec<DbName>,
    frames: Vec<usize>,
}

impl Hub {
    fn new(config: ServerConfig) -> Self {
        Hub {
            server: Server::new(config, OpenAccess),
            got: Vec::new(),
            hold_loads: false,
            loads: Vec::new(),
            frames: Vec::new(),
        }
    }

    fn peer(&mut self, r: u8) -> PeerId {
        let p = self.server.connect();
        let hello = Hello::signed(&Identity::from_seed([r; 32]), String::new(), "", 0);
        self.server.handle(p, Message::Hello(Box::new(hello)));
        self.drain();
        p
    }

    fn subscribe(&mut self, p: PeerId, name: &str) {
        let s = Subscribe {
            horizon: None,
            db: db(name),
            since: Default::default(),
            req: 1,
        };
        self.server.handle(p, Message::Subscribe(Box::new(s)));
        self.drain();
    }

    fn presence(&mut self, p: PeerId, name: &str, state: Vec<u8>) {
        let msg = Presence {
            db: db(name),
            state,
        };
        self.server.handle(p, Message::Presence(Box::new(msg)));
        self.drain();
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
                        self.frames.push(protocol::encode(&msg).len());
                        self.got.push((peer, msg));
                    }
                    ServerOutput::Broadcast { peers, frame, .. } => {
                        self.frames.push(frame.len());
                        let msg = protocol::decode(&frame, usize::MAX).unwrap();
                        for p in peers {
                            self.got.push((p, msg.clone()));
                        }
                    }
                    ServerOutput::Reply { peer, reply } => {
                        for frame in reply.frames() {
                            self.frames.push(frame.len());
                            let msg = protocol::decode(&frame, usize::MAX).unwrap();
                            self.got.push((peer, msg));
                        }
                    }
                    ServerOutput::Load { db } if self.hold_loads => self.loads.push(db),
                    ServerOutput::Load { db } => self.server.loaded(db, StoredDatabase::default()),
                    _ => {}
                }
            }
        }
    }

    fn take(&mut self, p: PeerId) -> Vec<Message> {
        let (mine, rest) = std::mem::take(&mut self.got)
            .into_iter()
            .partition(|(q, _)| *q == p);
        self.got = rest;
        mine.into_iter().map(|(_, m)| m).collect()
    }
}

fn errors(msgs: &[Message]) -> Vec<ErrorCode> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Error(e) => Some(e.code()),
            _ => None,
        })
        .collect()
}

fn presence_updates(msgs: Vec<Message>) -> Vec<PresenceUpdate> {
    msgs.into_iter()
        .filter_map(|m| match m {
            Message::PresenceUpdate(u) => Some(*u),
            _ => None,
        })
        .collect()
}

#[test]
fn subscriptions_per_connection_are_capped_before_anything_loads() {
    let mut hub = Hub::new(ServerConfig {
        max_subscriptions_per_peer: 3,
        ..ServerConfig::default()
    });
    let a = hub.peer(1);
    for name in ["a-1", "a-2", "a-3"] {
        hub.subscribe(a, name);
    }
    assert!(errors(&hub.take(a)).is_empty());
    hub.subscribe(a, "a-4");
    assert_eq!(errors(&hub.take(a)), [ErrorCode::TooLarge]);
    assert!(
        hub.server.log(&db("a-4")).is_none(),
        "nothing loaded for it"
    );
    // A resubscribe is no new subscription; leaving frees a slot.
    hub.subscribe(a, "a-2");
    assert!(errors(&hub.take(a)).is_empty());
    hub.server.handle(a, Message::Unsubscribe { db: db("a-1") });
    hub.subscribe(a, "a-4");
    assert!(errors(&hub.take(a)).is_empty());

    // Subscribes waiting for their databases to load count too.
    hub.hold_loads = true;
    let b = hub.peer(2);
    for name in ["b-1", "b-2", "b-3", "b-4", "b-5"] {
        hub.subscribe(b, name);
    }
    assert_eq!(hub.loads.len(), 3, "{:?}", hub.loads);
    assert_eq!(
        errors(&hub.take(b)),
        [ErrorCode::TooLarge, ErrorCode::TooLarge]
    );
}

#[test]
fn a_presence_state_over_the_limit_is_refused_and_reaches_nobody() {
    let mut hub = Hub::new(ServerConfig {
        max_presence_bytes: 1024,
        ..ServerConfig::default()
    });
    let (a, b) = (hub.peer(1), hub.peer(2));
    hub.subscribe(a, "room");
    hub.subscribe(b, "room");
    hub.take(b);
    hub.presence(a, "room", vec![b'x'; 1025]);
    assert_eq!(errors(&hub.take(a)), [ErrorCode::TooLarge]);
    assert!(presence_updates(hub.take(b)).is_empty());
    hub.presence(a, "room", vec![b'x'; 1024]);
    assert!(errors(&hub.take(a)).is_empty());
    assert_eq!(presence_updates(hub.take(b)).len(), 1);
}

#[test]
fn a_presence_flood_costs_each_subscriber_a_few_updates_a_tick_and_the_latest_wins() {
    let mut hub = Hub::new(ServerConfig {
        presence_per_tick: 5,
        ..ServerConfig::default()
    });
    let (a, b) = (hub.peer(1), hub.peer(2));
    hub.subscribe(a, "room");
    hub.subscribe(b, "room");
    hub.take(b);
    // Each message handled alone (as a hub that is keeping up would).
    for n in 0..100u32 {
        hub.presence(a, "room", n.to_string().into_bytes());
    }
    assert!(errors(&hub.take(a)).is_empty());
    assert_eq!(presence_updates(hub.take(b)).len(), 5);
    // The next tick announces the latest state, once.
    hub.server.expire(0);
    hub.drain();
    let later = presence_updates(hub.take(b));
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].peers[0].state.as_deref(), Some(&b"99"[..]));
    hub.server.expire(1);
    hub.drain();
    assert!(presence_updates(hub.take(b)).is_empty(), "nothing new");
    // A newcomer sees the latest state too.
    let c = hub.peer(3);
    hub.subscribe(c, "room");
    let full = presence_updates(hub.take(c));
    assert_eq!(full[0].peers[0].state.as_deref(), Some(&b"99"[..]));
}

#[test]
fn joining_beside_many_large_states_takes_several_frames_each_under_the_limit() {
    let max_frame = 64 << 10;
    let mut hub = Hub::new(ServerConfig {
        max_frame,
        max_presence_bytes: 8 << 10,
        ..ServerConfig::default()
    });
    let peers: Vec<PeerId> = (1..=40).map(|r| hub.peer(r)).collect();
    for (i, &p) in peers.iter().enumerate() {
        hub.subscribe(p, "room");
        // Incompressible, so frames are as large as the states.
        let state: Vec<u8> = (0..8 << 10)
            .map(|k: usize| (k.wrapping_mul(2_654_435_761).wrapping_add(i * 7919) >> 13) as u8)
            .collect();
        hub.presence(p, "room", state);
        hub.server.expire(i as u64); // a tick between peers: no deferral
        hub.drain();
    }
    hub.got.clear();
    hub.frames.clear();
    let newcomer = hub.peer(99);
    hub.subscribe(newcomer, "room");
    let updates = presence_updates(hub.take(newcomer));
    assert!(updates.len() >= 5, "{} updates", updates.len());
    assert!(updates[0].full);
    assert!(updates[1..].iter().all(|u| !u.full));
    let seen: usize = updates.iter().map(|u| u.peers.len()).sum();
    assert_eq!(seen, 40);
    assert!(
        hub.frames.iter().all(|&n| n <= max_frame),
        "frames {:?}",
        hub.frames
    );
}

#[test]
fn idle_databases_are_unloaded_least_recently_used_first_within_the_budget() {
    let mut hub = Hub::new(ServerConfig::default());
    let a = hub.peer(1);
    for name in ["x", "y", "z", "kept"] {
        hub.subscribe(a, name);
    }
    for name in ["x", "y", "z"] {
        hub.server.handle(a, Message::Unsubscribe { db: db(name) });
    }
    // x is used again: y is now the least recently used idle database.
    hub.subscribe(a, "x");
    hub.server.handle(a, Message::Unsubscribe { db: db("x") });
    hub.drain();
    let none = std::collections::BTreeSet::new();
    let empty = hub.server.loaded_bytes() / 4;
    assert!(
        hub.server.unload_idle(4 * empty, &none).is_empty(),
        "within budget"
    );
    assert_eq!(hub.server.unload_idle(3 * empty, &none), [db("y")]);
    // A database in use (subscribed, or busy in the adapter) stays.
    let busy = [db("z")].into_iter().collect();
    assert_eq!(hub.server.unload_idle(0, &busy), [db("x")]);
    assert!(hub.server.log(&db("kept")).is_some());
    assert!(hub.server.log(&db("z")).is_some());
    assert!(hub.server.log(&db("y")).is_none());
    // Used again, an unloaded database is loaded again.
    hub.hold_loads = true;
    hub.subscribe(a, "y");
    assert_eq!(hub.loads, [db("y")]);
}
