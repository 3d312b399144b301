//! Drives one core [`Server`] with a sequence of actions read from bytes:
//! shared by the `server` fuzz target (`core/fuzz/fuzz_targets/server.rs`,
//! which includes this file with `#[path]`) and the stable test
//! `core/tests/server_fuzz.rs` (crasher replay and seeded inputs).
//!
//! The first byte picks the configuration (deferred validation, frame
//! limit, push size, views, reply part size, and 0–3 replicas connected and
//! subscribed before the first action); every later action takes one byte
//! for its kind and a few more for its arguments. A missing byte reads as 0,
//! so every input is a valid program, and 0 picks the honest choice (an
//! honest entry, the next counter, an empty token). Actions cover up to four
//! connections, three databases and four replica ids (three with honest
//! changes, one stranger): connect, `Hello`, raw and damaged frames,
//! `Subscribe` with a since-vector, `Unsubscribe`, pushes of honest or
//! mutated entries, presence, pings and server-only messages, listing,
//! disconnect, and the adapter's side: persists completed (into a
//! [`MemoryStore`]) or failed, loads, validation jobs run in any order
//! across peers, compaction (inline and planned then applied late), view
//! builds handed back late, expiry, crash and restart.
//!
//! Invariants (a panic is a finding):
//! * nothing inside the server panics;
//! * every entry the server stores (each `Persist` batch, and its log) parses
//!   with [`Entry::parse_change`], was made by its dot's replica, and was
//!   pushed under that dot by a connection that said `Hello` as that replica;
//! * the log, every `Ack` and every `Delta`'s `vv` cover only entries the
//!   store holds durably;
//! * `Persist` sequence numbers of a database grow;
//! * every frame sent decodes, its counts match, and it stays within the
//!   frame limit (a delta part of one item aside: a single larger item
//!   travels alone);
//! * the outbox stays proportional to the work asked for: per action and
//!   over the run, bytes out are below a multiple of `max_frame` plus the
//!   stored data;
//! * at the end, every document in every log loads in automerge (what the
//!   server relays, every replica must be able to apply).
//!
//! A panic at one of automerge's debug-only self-checks that misfire on
//! input its release build handles ([`DEBUG_ONLY_PANICS`]) ends the input
//! without a finding.

use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::RangeInclusive;
use std::panic::AssertUnwindSafe;
use std::sync::{Once, OnceLock};

use serde_json::json;
use syncline_core::Identity;
use syncline_core::change_limits::ChangeLimits;
use syncline_core::change_limits::testing::{op_bomb, run as rle_run, with_column};
use syncline_core::clock::{Dot, VersionVector};
use syncline_core::database::Database;
use syncline_core::entry::Entry;
use syncline_core::ids::{DbName, DocId, ReplicaId};
use syncline_core::log::Compaction;
use syncline_core::protocol::{
    self, Ack, ErrorCode, Hello, Message, PROTOCOL_VERSION, Presence, Push, Subscribe,
};
use syncline_core::store::{Batch, MemoryStore, StoredDatabase};
use syncline_core::sync::{
    OpenAccess, PeerId, Server, ServerConfig, ServerOutput, ValidateJob, Validated,
};
use syncline_core::view::BuiltViews;

/// Most actions one input runs.
pub const MAX_ACTIONS: usize = 256;
/// Connection slots.
const SLOTS: usize = 4;
/// Replicas with honest changes in the pool; index `REPLICAS` is a stranger.
const REPLICAS: usize = 3;
/// Honest histories per replica (the second one conflicts with the first).
const VARIANTS: usize = 2;
/// Consecutive changes per history.
const COUNTERS: usize = 6;
const DBS: [&str; 3] = ["alpha", "beta", "Gamma-1"];
const DOCS: [&str; 2] = ["a", "todo:1"];
/// Op counts for op bombs: small honest ones, just over the default
/// `max_ops`, absurd ones, and values whose `i64` form is negative.
const BOMB_OPS: [u64; 7] = [1, 5, (1 << 20) + 1, 1 << 40, u64::MAX, 1 << 63, 300];
/// Column specs of an automerge change (id << 4 | deflate << 3 | type),
/// plus a few that no change has.
const SPECS: [u64; 18] = [
    1, 2, 17, 19, 21, 33, 35, 52, 66, 86, 87, 112, 113, 115, 148, 165, 74, 0x7fff,
];
/// RLE run lengths for crafted columns.
const RUNS: [i64; 8] = [1, 2, 7, 0, -1, -3, 1 << 40, -(1 << 50)];

fn identity_of(i: usize) -> Identity {
    let mut seed = [0x5A; 32];
    seed[0] = i as u8 + 1;
    Identity::from_seed(seed)
}

fn replica_id(i: usize) -> ReplicaId {
    identity_of(i).replica()
}

// ---- the pool of honest entries, made once ----

struct PoolEntry {
    /// As `Database::update` made it.
    entry: Entry,
    /// `Change::raw_bytes()`: what `with_column` rewrites.
    raw: Vec<u8>,
    /// `Change::bytes()`: the same change in its compressed encoding.
    compressed: Vec<u8>,
}

struct Pool {
    /// `[replica][variant][counter - 1]`.
    entries: Vec<Vec<Vec<PoolEntry>>>,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let name = DbName::new("pool").expect("a valid name");
        let entries = (0..REPLICAS)
            .map(|r| {
                (0..VARIANTS)
                    .map(|v| {
                        let mut d = Database::new(
                            name.clone(),
                            replica_id(r),
                            automerge::TextEncoding::UnicodeCodePoint,
                        );
                        (0..COUNTERS)
                            .map(|k| {
                                let doc = DocId::new(DOCS[k % DOCS.len()]).expect("a valid id");
                                // One long text per history, so that the
                                // compressed form really is compressed.
                                let len = if k == 2 { 700 } else { 3 * k };
                                let value = json!({
                                    "k": k, "v": v, "r": r,
                                    "text": "xy".repeat(len / 2),
                                    "list": (0..k).collect::<Vec<_>>(),
                                });
                                let entry = d
                                    .update(&doc, &value)
                                    .expect("an honest update")
                                    .expect("a change");
                                let mut change = automerge::Change::try_from(&entry.change[..])
                                    .expect("an honest change parses");
                                PoolEntry {
                                    raw: change.raw_bytes().to_vec(),
                                    compressed: change.bytes().into_owned(),
                                    entry,
                                }
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Pool { entries }
    })
}

// ---- reading the input ----

struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn done(&self) -> bool {
        self.pos >= self.data.len()
    }

    /// The next byte; 0 past the end.
    fn byte(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn below(&mut self, n: usize) -> usize {
        usize::from(self.byte()) % n.max(1)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    /// Up to `n` bytes of the input (fewer at its end).
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.data.len());
        let end = start.saturating_add(n).min(self.data.len());
        self.pos = self.pos.saturating_add(n);
        &self.data[start..end]
    }
}

// ---- the adapter ----

#[derive(Debug)]
struct Conn {
    peer: PeerId,
    /// The replica its accepted `Hello` named (a damaged one may name
    /// any).
    replica: Option<ReplicaId>,
    /// Databases it asked for (to aim pushes and presence).
    subs: BTreeSet<usize>,
    /// The server closed it; frames may still arrive before the adapter
    /// sees the close.
    closed: bool,
}

type EntryVariants = HashMap<Dot, Vec<(DocId, Vec<u8>)>>;

fn holds(map: &HashMap<DbName, EntryVariants>, db: &DbName, e: &Entry) -> bool {
    map.get(db)
        .and_then(|m| m.get(&e.dot))
        .is_some_and(|v| v.iter().any(|(d, c)| *d == e.doc && *c == e.change))
}

fn remember(map: &mut HashMap<DbName, EntryVariants>, db: &DbName, e: &Entry) {
    if !holds(map, db, e) {
        map.entry(db.clone())
            .or_default()
            .entry(e.dot)
            .or_default()
            .push((e.doc.clone(), e.change.clone()));
    }
}

/// What the store holds for `stored`, read as `Log::from_stored` reads it
/// (written out here so the check does not lean on the code it checks).
fn durable_vv(stored: &StoredDatabase) -> VersionVector {
    let mut vv = stored.base.clone();
    for e in &stored.entries {
        if e.dot.counter == vv.get(&e.dot.replica) + 1 {
            vv.set(e.dot.replica, e.dot.counter);
        }
    }
    vv
}

enum Op {
    ConnectHello,
    Connect,
    Hello,
    RawFrame,
    DamagedFrame,
    Subscribe,
    Unsubscribe,
    Push,
    Presence,
    SmallMessage,
    List,
    Disconnect,
    Persist,
    FailPersist,
    Load,
    Validate,
    Compact,
    PlannedCompaction,
    BuildViews,
    HandBackViews,
    Expire,
    Restart,
    Drain,
    Burst,
}

struct Driver {
    config: ServerConfig,
    server: Server<OpenAccess>,
    store: MemoryStore,
    dbs: Vec<DbName>,
    conns: Vec<Option<Conn>>,
    /// Persist batches not yet written, per database, in `seq` order.
    persists: BTreeMap<DbName, VecDeque<(u64, Batch)>>,
    last_seq: BTreeMap<DbName, u64>,
    loads: VecDeque<DbName>,
    jobs: Vec<(PeerId, ValidateJob)>,
    lists: VecDeque<(PeerId, u32)>,
    built: Vec<(DbName, BuiltViews)>,
    /// Compactions planned from the log and not yet applied (at most one
    /// per database, as the hub runs them).
    planned: BTreeMap<DbName, Compaction>,
    /// What the store holds durably, per database.
    durable: BTreeMap<DbName, VersionVector>,
    /// Entries pushed by a connection under its own replica, per database.
    pushed: HashMap<DbName, EntryVariants>,
    /// Stored entries already checked.
    verified: HashMap<DbName, EntryVariants>,
    /// Messages and completions handed to the server, and bytes it sent.
    inputs: usize,
    out_bytes: usize,
    /// Bytes of entries and snapshots in the store, per database, and the
    /// largest total seen.
    stored_size: BTreeMap<DbName, usize>,
    max_stored: usize,
}

impl Driver {
    fn new(config: ServerConfig) -> Self {
        Driver {
            server: Server::new(config.clone(), OpenAccess),
            config,
            store: MemoryStore::new(),
            dbs: DBS
                .iter()
                .map(|n| DbName::new(*n).expect("a valid name"))
                .collect(),
            conns: (0..SLOTS).map(|_| None).collect(),
            persists: BTreeMap::new(),
            last_seq: BTreeMap::new(),
            loads: VecDeque::new(),
            jobs: Vec::new(),
            lists: VecDeque::new(),
            built: Vec::new(),
            planned: BTreeMap::new(),
            durable: BTreeMap::new(),
            pushed: HashMap::new(),
            verified: HashMap::new(),
            inputs: 0,
            out_bytes: 0,
            stored_size: BTreeMap::new(),
            max_stored: 0,
        }
    }

    fn step(&mut self, input: &mut Input) {
        // Weighted so that random bytes reach deep states: the actions that
        // close connections or lose state are rare.
        let op = match input.byte() % 64 {
            0..=2 => Op::ConnectHello,
            3 => Op::Connect,
            4 => Op::Hello,
            5 => Op::RawFrame,
            6 => Op::DamagedFrame,
            7..=11 => Op::Subscribe,
            12 => Op::Unsubscribe,
            13..=28 => Op::Push,
            29 | 30 => Op::Presence,
            31 => Op::SmallMessage,
            32 => Op::List,
            33 => Op::Disconnect,
            34..=41 => Op::Persist,
            42 => Op::FailPersist,
            43..=46 => Op::Load,
            47..=51 => Op::Validate,
            52 | 53 => Op::Compact,
            54 | 55 => Op::PlannedCompaction,
            56 | 57 => Op::BuildViews,
            58 => Op::HandBackViews,
            59 => Op::Expire,
            60 => Op::Restart,
            61 | 62 => Op::Drain,
            _ => Op::Burst,
        };
        match op {
            Op::ConnectHello => {
                if let Some(slot) = self.connect() {
                    self.hello(input, slot);
                }
            }
            Op::Connect => {
                self.connect();
            }
            Op::Hello => {
                let slot = self.slot(input);
                self.hello(input, slot);
            }
            Op::RawFrame => self.raw_frame(input),
            Op::DamagedFrame => self.damaged_frame(input),
            Op::Subscribe => self.subscribe(input),
            Op::Unsubscribe => {
                let (slot, db) = (self.slot(input), input.below(DBS.len()));
                let db = self.dbs[db].clone();
                self.send(slot, &Message::Unsubscribe { db });
            }
            Op::Push => {
                let slot = self.slot(input);
                let msg = self.push_msg(input, slot);
                self.send(slot, &msg);
            }
            Op::Presence => {
                let slot = self.slot(input);
                let msg = self.presence_msg(input, slot);
                self.send(slot, &msg);
            }
            Op::SmallMessage => self.small_message(input),
            Op::List => {
                let slot = self.slot(input);
                let req = u32::from(input.byte());
                self.send(slot, &Message::ListDatabases { req });
            }
            Op::Disconnect => self.disconnect(input),
            Op::Persist => self.complete_persists(input),
            Op::FailPersist => self.fail_persist(input),
            Op::Load => self.finish_load(input),
            Op::Validate => self.run_job(input),
            Op::Compact => self.compact(input),
            Op::PlannedCompaction => self.planned_compaction(input),
            Op::BuildViews => self.build_views(input),
            Op::HandBackViews => self.hand_back_views(input),
            Op::Expire => {
                let now = u64::from(input.u16()) << (input.byte() % 48);
                self.server.expire(now);
            }
            Op::Restart => {
                // Rarer still: a restart closes every connection.
                if input.byte().is_multiple_of(2) {
                    self.restart(input);
                }
            }
            Op::Drain => self.drain(),
            Op::Burst => self.burst(input),
        }
        self.route();
    }

    // ---- connections and messages ----

    /// A slot: usually an open connection that said `Hello`, sometimes any.
    fn slot(&mut self, input: &mut Input) -> usize {
        let b = input.byte();
        let greeted: Vec<usize> = (0..SLOTS)
            .filter(|&i| {
                self.conns[i]
                    .as_ref()
                    .is_some_and(|c| c.replica.is_some() && !c.closed)
            })
            .collect();
        if b & 0x80 == 0 && !greeted.is_empty() {
            greeted[usize::from(b) % greeted.len()]
        } else {
            usize::from(b) % SLOTS
        }
    }

    /// A new connection in a free slot, or in place of one the server
    /// closed (whose end the adapter then reports).
    fn connect(&mut self) -> Option<usize> {
        let free = self.conns.iter().position(Option::is_none).or_else(|| {
            self.conns
                .iter()
                .position(|c| c.as_ref().is_some_and(|c| c.closed))
        })?;
        if let Some(old) = self.conns[free].take() {
            self.server.disconnect(old.peer);
        }
        let peer = self.server.connect();
        self.conns[free] = Some(Conn {
            peer,
            replica: None,
            subs: BTreeSet::new(),
            closed: false,
        });
        Some(free)
    }

    fn disconnect(&mut self, input: &mut Input) {
        let slot = input.below(SLOTS);
        if let Some(c) = self.conns[slot].take() {
            self.server.disconnect(c.peer);
        }
    }

    /// Hand a frame to the server; what it carries is read back first, so
    /// that a damaged push is known as what the server will see.
    fn send_frame(&mut self, slot: usize, frame: &[u8]) {
        let Some(c) = &mut self.conns[slot] else {
            return;
        };
        if let Some(me) = c.replica
            && let Ok(Message::Push(p)) = protocol::decode(frame, self.config.max_frame)
        {
            for e in p.entries.iter().filter(|e| e.dot.replica == me) {
                remember(&mut self.pushed, &p.db, e);
            }
        }
        let greeted = self.server.greeted(c.peer);
        self.inputs += 1;
        self.server.handle_frame(c.peer, frame);
        if !greeted
            && self.server.greeted(c.peer)
            && let Ok(hello) = protocol::decode_hello(frame)
        {
            c.replica = Some(hello.replica);
        }
    }

    fn send(&mut self, slot: usize, msg: &Message) {
        let Some(c) = &mut self.conns[slot] else {
            return;
        };
        if let Message::Subscribe(s) = msg
            && let Some(i) = DBS.iter().position(|n| *n == s.db.as_str())
        {
            c.subs.insert(i);
        }
        self.send_frame(slot, &protocol::encode(msg));
    }

    fn hello(&mut self, input: &mut Input, slot: usize) {
        // The stranger (no honest changes) now and then.
        let r = match input.byte() % 8 {
            7 => REPLICAS,
            b => usize::from(b) % REPLICAS,
        };
        let token = match input.byte() % 8 {
            7 => "t".repeat(protocol::MAX_TOKEN_LEN + 1),
            6 => "t".repeat(protocol::MAX_TOKEN_LEN),
            _ => String::new(),
        };
        let msg = Message::Hello(Box::new(Hello::signed(&identity_of(r), token, "", 0)));
        self.send(slot, &msg);
    }

    /// Arbitrary bytes, bare or behind a plausible frame header.
    fn raw_frame(&mut self, input: &mut Input) {
        let slot = self.slot(input);
        let mode = input.byte();
        let body = input.bytes(usize::from(mode >> 2) % 64).to_vec();
        let frame = if mode & 1 == 0 {
            body
        } else {
            let mut f = vec![PROTOCOL_VERSION, (mode >> 1) & 1];
            f.extend_from_slice(&(body.len() as u32).to_le_bytes());
            f.extend(body);
            f
        };
        self.send_frame(slot, &frame);
    }

    /// A valid message's frame, damaged.
    fn damaged_frame(&mut self, input: &mut Input) {
        let slot = self.slot(input);
        let msg = match input.byte() % 4 {
            0 => Message::Hello(Box::new(Hello::signed(
                &identity_of(input.below(REPLICAS + 1)),
                String::new(),
                "",
                0,
            ))),
            1 => self.subscribe_msg(input),
            2 => self.push_msg(input, slot),
            _ => self.presence_msg(input, slot),
        };
        let mut frame = protocol::encode(&msg);
        let len = frame.len();
        match input.byte() % 4 {
            0 => {
                let at = usize::from(input.u16()) % len.max(1);
                if let Some(b) = frame.get_mut(at) {
                    *b ^= input.byte() | 1;
                }
            }
            1 => frame.truncate(usize::from(input.u16()) % len.max(1)),
            2 => frame.extend_from_slice(input.bytes(8)),
            _ => {
                // A body byte flipped under a header that still matches.
                let at = 6 + usize::from(input.u16()) % len.saturating_sub(6).max(1);
                if let Some(b) = frame.get_mut(at) {
                    *b = input.byte();
                }
            }
        }
        self.send_frame(slot, &frame);
    }

    fn since(&self, input: &mut Input) -> VersionVector {
        let mut since = VersionVector::new();
        let mode = input.byte();
        if mode.is_multiple_of(4) {
            return since;
        }
        for r in 0..=REPLICAS {
            let b = input.byte();
            let counter = match b % 16 {
                0..=8 => u64::from(b % 8),
                9 => u64::MAX,
                10 => u64::from(input.u16()),
                _ => {
                    // Often what the server holds, so a reply is small.
                    let db = &self.dbs[usize::from(mode) % DBS.len()];
                    self.durable.get(db).map_or(0, |vv| vv.get(&replica_id(r)))
                }
            };
            if counter > 0 {
                since.set(replica_id(r), counter);
            }
        }
        since
    }

    fn subscribe_msg(&mut self, input: &mut Input) -> Message {
        let db = self.dbs[input.below(DBS.len())].clone();
        let since = self.since(input);
        let req = u32::from(input.byte());
        // Now and then a named horizon: the server's own (that of an empty
        // base, which it must not take as a horizon held) or garbage.
        let horizon = match input.byte() % 16 {
            14 => Some(VersionVector::new().digest()),
            15 => Some([input.byte(); 16]),
            _ => None,
        };
        Message::Subscribe(Box::new(Subscribe {
            horizon,
            db,
            since,
            req,
        }))
    }

    fn subscribe(&mut self, input: &mut Input) {
        let slot = self.slot(input);
        let msg = self.subscribe_msg(input);
        self.send(slot, &msg);
    }

    /// A database the connection subscribed to, mostly.
    fn db_for(&self, input: &mut Input, slot: usize) -> DbName {
        let b = input.byte();
        let subs: Vec<usize> = self.conns[slot]
            .as_ref()
            .map(|c| c.subs.iter().copied().collect())
            .unwrap_or_default();
        let i = if b % 8 != 7 && !subs.is_empty() {
            subs[usize::from(b) % subs.len()]
        } else {
            usize::from(b) % DBS.len()
        };
        self.dbs[i].clone()
    }

    fn push_msg(&mut self, input: &mut Input, slot: usize) -> Message {
        let db = self.db_for(input, slot);
        // The pool's changes of the sender's replica (the stranger's, when
        // it is none of the pool's: they are refused).
        let r = self.conns[slot]
            .as_ref()
            .and_then(|c| c.replica)
            .and_then(|id| (0..REPLICAS).find(|&i| replica_id(i) == id))
            .unwrap_or(REPLICAS);
        let limit = self.config.max_entries_per_push;
        let n = match input.byte() % 16 {
            14 => 0,
            15 => limit + 1,
            b => 1 + usize::from(b) % limit,
        };
        // Mostly the next counters of the sender in this database.
        let next = self
            .server
            .log(&db)
            .map_or(0, |l| l.vv().get(&replica_id(r)))
            + 1;
        let start = match input.byte() % 8 {
            4 => 1,
            5 => next.saturating_sub(1).max(1),
            6 => next + 1,
            7 => next.saturating_sub(u64::from(input.byte() % 4)).max(1),
            _ => next,
        };
        let entries = (0..n as u64)
            .map(|i| self.entry(input, r, start + i))
            .collect();
        Message::Push(Box::new(Push { db, entries }))
    }

    /// An entry of replica `r` at `counter`: honest, or mutated.
    fn entry(&mut self, input: &mut Input, r: usize, counter: u64) -> Entry {
        let m = input.byte();
        let pool = pool();
        // The other history of this replica (a conflict) now and then.
        let variant = usize::from(m % 64 == 39);
        let index = usize::try_from(counter.saturating_sub(1)).unwrap_or(0) % COUNTERS;
        let base = &pool.entries[r % REPLICAS][variant][index];
        let mut e = base.entry.clone();
        e.dot = Dot {
            replica: replica_id(r),
            counter,
        };
        match m % 64 {
            0..=39 => {} // honest, or (39) the conflicting history
            40..=43 => e.change = base.compressed.clone(),
            44 => e.change = base.raw.clone(),
            45 => e.dot.replica = replica_id(input.below(REPLICAS + 1)),
            46 => e.dot.counter = 0,
            47 => e.dot.counter = counter + 1 + u64::from(input.byte() % 3),
            48 => e.doc = DocId::new(DOCS[input.below(DOCS.len())]).expect("a valid id"),
            49 => {
                // Another history's change of this replica, or another
                // replica's change, under this dot.
                let other = &pool.entries[input.below(REPLICAS)][input.below(VARIANTS)];
                e.change = other[input.below(COUNTERS)].entry.change.clone();
            }
            50 => {
                let at = usize::from(input.u16()) % e.change.len().max(1);
                if let Some(b) = e.change.get_mut(at) {
                    *b ^= input.byte() | 1;
                }
            }
            51 => {
                let keep = usize::from(input.u16()) % e.change.len().max(1);
                e.change.truncate(keep);
            }
            52 => e
                .change
                .extend_from_slice(input.bytes(usize::from(m % 8) + 1)),
            53..=55 => {
                let actor = e.dot.replica.0;
                e.change = op_bomb(&actor, BOMB_OPS[input.below(BOMB_OPS.len())]);
            }
            _ => {
                // A column replaced: well formed, checksummed, hostile.
                let spec = match input.byte() {
                    b if b < 200 => SPECS[usize::from(b) % SPECS.len()],
                    b => u64::from(b) | u64::from(input.byte()) << 8,
                };
                let data = if input.byte() & 1 == 0 {
                    rle_run(RUNS[input.below(RUNS.len())], u64::from(input.byte()))
                } else {
                    let n = input.below(24);
                    input.bytes(n).to_vec()
                };
                e.change = with_column(&base.raw, spec, &data);
            }
        }
        e
    }

    fn presence_msg(&mut self, input: &mut Input, slot: usize) -> Message {
        let db = self.db_for(input, slot);
        let b = input.byte();
        let len = [
            0,
            1,
            40,
            900,
            1500,
            3000,
            5000,
            protocol::MAX_PRESENCE_LEN + 1,
        ][usize::from(b % 8)];
        let seed = input.byte();
        let state = (0..len)
            .map(|i| (i as u8).wrapping_mul(seed).wrapping_add(b))
            .collect();
        Message::Presence(Box::new(Presence { db, state }))
    }

    /// Ping, or a message only a server sends.
    fn small_message(&mut self, input: &mut Input) {
        let slot = self.slot(input);
        let nonce = u64::from(input.byte());
        let msg = match input.byte() % 6 {
            3 => Message::Pong { nonce },
            4 => Message::error(ErrorCode::Internal, "client trouble", None),
            5 => Message::Ack(Box::new(Ack {
                db: self.dbs[0].clone(),
                vv: VersionVector::new(),
            })),
            _ => Message::Ping { nonce },
        };
        self.send(slot, &msg);
    }

    /// Many messages at once (behind a push being validated, they wait,
    /// up to a limit).
    fn burst(&mut self, input: &mut Input) {
        let slot = self.slot(input);
        let n = usize::from(input.byte()) * 2;
        let kind = input.byte();
        let msg = if kind.is_multiple_of(4) {
            self.subscribe_msg(input)
        } else {
            Message::Ping { nonce: 1 }
        };
        let frame = protocol::encode(&msg);
        for _ in 0..n {
            self.send_frame(slot, &frame);
        }
    }

    // ---- the adapter's side ----

    fn pick_db_with<T>(&self, input: &mut Input, map: &BTreeMap<DbName, T>) -> Option<DbName> {
        let b = usize::from(input.byte());
        let keys: Vec<&DbName> = map.keys().collect();
        (!keys.is_empty()).then(|| keys[b % keys.len()].clone())
    }

    fn write(&mut self, db: &DbName, batch: Batch) {
        self.store
            .write_owned(db, batch)
            .expect("the memory store does not fail");
        let stored = self
            .store
            .load_now(db)
            .expect("the memory store does not fail");
        self.durable.insert(db.clone(), durable_vv(&stored));
        let size = stored.entries.iter().map(Entry::encoded_len).sum::<usize>()
            + stored
                .snapshots
                .iter()
                .map(|s| s.encoded_len())
                .sum::<usize>();
        self.stored_size.insert(db.clone(), size);
        self.max_stored = self.max_stored.max(self.stored_size.values().sum());
    }

    /// Write the first 1–3 batches of a database, then report them.
    fn complete_persists(&mut self, input: &mut Input) {
        let Some(db) = self.pick_db_with(input, &self.persists) else {
            return;
        };
        let n = 1 + input.below(3);
        let together = input.byte() & 1 == 0;
        let mut last = None;
        for _ in 0..n {
            let Some((seq, batch)) = self.persists.get_mut(&db).and_then(VecDeque::pop_front)
            else {
                break;
            };
            self.write(&db, batch);
            if together {
                last = Some(seq);
            } else {
                self.inputs += 1;
                self.server.persisted(&db, seq);
                self.route();
            }
        }
        if let Some(seq) = last {
            self.inputs += 1;
            self.server.persisted(&db, seq);
        }
        self.persists.retain(|_, q| !q.is_empty());
    }

    /// The first batch of a database fails (after landing, sometimes: an
    /// fsync error says nothing about what reached the disk).
    fn fail_persist(&mut self, input: &mut Input) {
        let Some(db) = self.pick_db_with(input, &self.persists) else {
            return;
        };
        let landed = input.byte() & 1 == 1;
        if let Some((seq, batch)) = self.persists.get_mut(&db).and_then(VecDeque::pop_front) {
            if landed {
                self.write(&db, batch);
            }
            self.inputs += 1;
            self.server.persist_failed(&db, seq, "disk full");
        }
        self.persists.retain(|_, q| !q.is_empty());
    }

    /// Answer a load (or fail it), or a listing.
    fn finish_load(&mut self, input: &mut Input) {
        let b = input.byte();
        if b & 2 == 2
            && let Some((peer, req)) = self.lists.pop_front()
        {
            let names = self.store.list_now().unwrap_or_default();
            self.inputs += 1;
            self.server.databases_listed(peer, req, names);
            return;
        }
        if self.loads.is_empty() {
            return;
        }
        let Some(db) = self.loads.remove(usize::from(b >> 2) % self.loads.len()) else {
            return;
        };
        self.inputs += 1;
        if b % 8 != 7 {
            let stored = self
                .store
                .load_now(&db)
                .expect("the memory store does not fail");
            self.server.loaded(db, stored);
        } else {
            self.server.load_failed(&db, "unreadable");
        }
    }

    /// Finish any queued validation (not necessarily the oldest).
    fn run_job(&mut self, input: &mut Input) {
        let b = input.byte();
        if self.jobs.is_empty() {
            return;
        }
        let (peer, job) = self.jobs.remove(usize::from(b) % self.jobs.len());
        let v = if b % 16 == 15 {
            Validated::failed(job.db().clone(), "the validator panicked")
        } else {
            job.run()
        };
        self.inputs += 1;
        self.server.validated(peer, v);
    }

    fn up_to(&self, input: &mut Input, db: &DbName) -> Option<VersionVector> {
        let vv = self.server.log(db)?.vv().clone();
        let mode = input.byte();
        let mut up_to = VersionVector::new();
        for (r, c) in vv.iter() {
            let c = match mode % 4 {
                0 => *c,
                1 => c / 2,
                2 => c.saturating_sub(u64::from(input.byte() % 3)),
                _ => c + u64::from(input.byte() % 3),
            };
            if c > 0 {
                up_to.set(*r, c);
            }
        }
        Some(up_to)
    }

    fn compact(&mut self, input: &mut Input) {
        let db = self.dbs[input.below(DBS.len())].clone();
        if self.planned.contains_key(&db) {
            return; // one compaction at a time per database
        }
        if let Some(up_to) = self.up_to(input, &db) {
            self.inputs += 1;
            self.server.compact(&db, &up_to);
        }
    }

    /// Plan a compaction from the log as it is now, or apply one planned
    /// earlier (the log may have grown meanwhile).
    fn planned_compaction(&mut self, input: &mut Input) {
        let db = self.dbs[input.below(DBS.len())].clone();
        if let Some(c) = self.planned.remove(&db) {
            self.inputs += 1;
            self.server.apply_compaction(&db, c);
        } else if let Some(up_to) = self.up_to(input, &db)
            && let Some(log) = self.server.log(&db)
        {
            self.planned.insert(db, log.plan_compaction(&up_to));
        }
    }

    fn build_views(&mut self, input: &mut Input) {
        let db = self.dbs[input.below(DBS.len())].clone();
        let max = 1 + input.below(16);
        let now = input.byte() & 1 == 0;
        let _ = self.server.stale_views(&db);
        if let Some(job) = self.server.view_job(&db, max) {
            let built = job.build();
            if now {
                self.inputs += 1;
                self.server.views_built(&db, built);
            } else {
                self.built.push((db, built));
            }
        }
    }

    fn hand_back_views(&mut self, input: &mut Input) {
        let b = input.byte();
        if self.built.is_empty() {
            return;
        }
        let (db, built) = self.built.remove(usize::from(b) % self.built.len());
        self.inputs += 1;
        self.server.views_built(&db, built);
    }

    /// The process dies (what was not written is lost) and starts again.
    fn restart(&mut self, input: &mut Input) {
        if input.byte() & 1 == 0 {
            self.server.shutdown();
            self.route();
        }
        self.server = Server::new(self.config.clone(), OpenAccess);
        self.conns.iter_mut().for_each(|c| *c = None);
        self.persists.clear();
        self.last_seq.clear();
        self.loads.clear();
        self.jobs.clear();
        self.lists.clear();
        self.built.clear();
        self.planned.clear();
    }

    /// Carry out everything queued, a few rounds.
    fn drain(&mut self) {
        for _ in 0..8 {
            let mut busy = false;
            while let Some(db) = self.loads.pop_front() {
                busy = true;
                let stored = self
                    .store
                    .load_now(&db)
                    .expect("the memory store does not fail");
                self.inputs += 1;
                self.server.loaded(db, stored);
                self.route();
            }
            for (peer, job) in std::mem::take(&mut self.jobs) {
                busy = true;
                self.inputs += 1;
                self.server.validated(peer, job.run());
                self.route();
            }
            for (db, queue) in std::mem::take(&mut self.persists) {
                for (seq, batch) in queue {
                    busy = true;
                    self.write(&db, batch);
                    self.inputs += 1;
                    self.server.persisted(&db, seq);
                    self.route();
                }
            }
            while let Some((peer, req)) = self.lists.pop_front() {
                busy = true;
                let names = self.store.list_now().unwrap_or_default();
                self.inputs += 1;
                self.server.databases_listed(peer, req, names);
                self.route();
            }
            if !busy {
                break;
            }
        }
    }

    // ---- outputs and invariants ----

    fn route(&mut self) {
        let queued = self.server.outbox_bytes();
        let outs = self.server.take_outputs();
        assert_eq!(self.server.outbox_bytes(), 0, "take_outputs left bytes");
        let mut frames = 0usize;
        let mut bytes = 0usize;
        for out in outs {
            match out {
                ServerOutput::Send { msg, .. } => {
                    let frame = protocol::encode(&msg);
                    bytes += frame.len();
                    self.check_frame(&msg, frame.len());
                }
                ServerOutput::Broadcast {
                    peers,
                    frame,
                    entries,
                    views,
                } => {
                    bytes += frame.len();
                    frames += frame.len();
                    assert!(!peers.is_empty(), "a broadcast to nobody");
                    let msg = protocol::decode(&frame, usize::MAX)
                        .unwrap_or_else(|e| panic!("the server sent a frame it cannot read: {e}"));
                    let counted = match &msg {
                        Message::Delta(d) => (d.entries.len(), d.views.len()),
                        _ => (0, 0),
                    };
                    assert_eq!((entries, views), counted, "broadcast counts");
                    self.check_frame(&msg, frame.len());
                }
                ServerOutput::Reply { reply, .. } => {
                    let expected = reply.counts();
                    let mut counted = (0, 0);
                    for frame in reply.frames() {
                        bytes += frame.len();
                        let msg = protocol::decode(&frame, usize::MAX).unwrap_or_else(|e| {
                            panic!("the server sent a frame it cannot read: {e}")
                        });
                        if let Message::Delta(d) = &msg {
                            counted.0 += d.entries.len();
                            counted.1 += d.views.len();
                        }
                        self.check_frame(&msg, frame.len());
                    }
                    assert_eq!(expected, counted, "reply counts");
                }
                ServerOutput::Close { peer, .. } => {
                    for c in self.conns.iter_mut().flatten() {
                        if c.peer == peer {
                            c.closed = true;
                        }
                    }
                }
                ServerOutput::Persist { db, seq, batch } => {
                    if let Some(&last) = self.last_seq.get(&db) {
                        assert!(seq > last, "{db}: persist seq {seq} after {last}");
                    }
                    self.last_seq.insert(db.clone(), seq);
                    for e in &batch.entries {
                        self.check_stored(&db, e);
                    }
                    self.persists.entry(db).or_default().push_back((seq, batch));
                }
                ServerOutput::Load { db } => self.loads.push_back(db),
                ServerOutput::Validate { peer, job } => self.jobs.push((peer, *job)),
                // Cluster mode only (share_presence is off here).
                ServerOutput::SharePresence { .. } => {}
                ServerOutput::ListDatabases { peer, req } => self.lists.push_back((peer, req)),
            }
        }
        assert!(
            queued <= frames,
            "outbox_bytes {queued} > the {frames} bytes of frames taken"
        );
        self.out_bytes += bytes;
        // Every input can cost a reply of the whole store, and each action
        // a presence update per database: nothing may grow beyond that.
        let unit = 16 * self.config.max_frame + 4 * self.max_stored + 4096;
        assert!(
            bytes <= (1 + self.inputs) * unit,
            "one action sent {bytes} bytes (inputs so far {}, stored {})",
            self.inputs,
            self.max_stored
        );
        assert!(
            self.out_bytes <= (MAX_ACTIONS + self.inputs) * unit,
            "the run sent {} bytes for {} inputs",
            self.out_bytes,
            self.inputs
        );
        self.check_logs();
    }

    fn covered(&self, db: &DbName, vv: &VersionVector, what: &str) {
        let durable = self.durable.get(db).cloned().unwrap_or_default();
        assert!(
            durable.dominates(vv),
            "{what} of {db} covers {vv:?}, the store holds {durable:?}"
        );
    }

    fn check_frame(&self, msg: &Message, len: usize) {
        match msg {
            Message::Ack(a) => self.covered(&a.db, &a.vv, "an Ack"),
            Message::Delta(d) => {
                self.covered(&d.db, &d.vv, "a Delta");
                let items = d.entries.len() + d.snapshots.len();
                let limit = self.config.max_frame + self.config.max_frame / 4;
                assert!(
                    len <= limit || items <= 1,
                    "a delta part of {items} items in {len} bytes (max_frame {})",
                    self.config.max_frame
                );
            }
            _ => {}
        }
    }

    /// An entry the server stores: it parses, its author is its dot's
    /// replica, and a connection of that replica pushed it under that dot.
    fn check_stored(&mut self, db: &DbName, e: &Entry) {
        if holds(&self.verified, db, e) {
            return;
        }
        if let Err(err) = e.parse_change() {
            panic!("{db}: stored an invalid entry {:?}: {err}", e.dot);
        }
        assert!(
            holds(&self.pushed, db, e),
            "{db}: stored {:?} of {}, which no connection of that replica pushed",
            e.dot,
            e.doc
        );
        remember(&mut self.verified, db, e);
    }

    fn check_logs(&mut self) {
        for i in 0..self.dbs.len() {
            let db = self.dbs[i].clone();
            let Some(log) = self.server.log(&db) else {
                continue;
            };
            let vv = log.vv().clone();
            let fresh: Vec<Entry> = log
                .entries()
                .filter(|e| !holds(&self.verified, &db, e))
                .cloned()
                .collect();
            self.covered(&db, &vv, "the log");
            for e in &fresh {
                self.check_stored(&db, e);
            }
        }
    }

    /// After the run: every document of every log loads in automerge (a
    /// replica must be able to apply whatever the server relays).
    fn check_documents(&self) {
        let limits = ChangeLimits::default();
        for db in &self.dbs {
            let Some(log) = self.server.log(db) else {
                continue;
            };
            let mut docs: BTreeMap<&DocId, Vec<automerge::Change>> = BTreeMap::new();
            for e in log.entries() {
                let change = e
                    .parse_change_within(&limits)
                    .unwrap_or_else(|err| panic!("{db}: the log holds {:?}: {err}", e.dot));
                docs.entry(&e.doc).or_default().push(change);
            }
            for (doc, changes) in docs {
                let mut am = match log.snapshot(doc) {
                    Some(s) => match automerge::Automerge::load(&s.bytes) {
                        Ok(am) => am,
                        Err(_) => continue,
                    },
                    None => automerge::Automerge::new(),
                };
                let _ = am.apply_changes(changes);
            }
        }
    }
}

/// automerge 0.12.0's debug-only self-checks that fail on input its release
/// build handles: a panic inside one is not a finding (it ends the input).
const DEBUG_ONLY_PANICS: &[(&str, RangeInclusive<u32>)] = &[
    // `ChangeCollector::from_build_meta` (`#[cfg(debug_assertions)]`)
    // derives the changes a second way and unwraps that; the second way
    // fails for a document holding a change whose dependency is missing
    // (which the server stores: it does not check dependencies), e.g. in
    // `Log::plan_compaction`.
    (
        "automerge-0.12.0/src/op_set2/change/collector.rs",
        742..=762,
    ),
];

thread_local! {
    static TOLERATED: Cell<bool> = const { Cell::new(false) };
}

/// Wrap the panic hook (the default one, or libFuzzer's, which aborts) so a
/// panic at a [`DEBUG_ONLY_PANICS`] site only unwinds, to [`run`].
fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let tolerated = info.location().is_some_and(|l| {
                DEBUG_ONLY_PANICS
                    .iter()
                    .any(|(file, lines)| l.file().ends_with(file) && lines.contains(&l.line()))
            });
            if tolerated {
                TOLERATED.set(true);
            } else {
                previous(info);
            }
        }));
    });
}

/// Run one input; panics on a finding.
pub fn run(data: &[u8]) {
    install_hook();
    TOLERATED.set(false);
    if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| run_actions(data)))
        && !TOLERATED.get()
    {
        std::panic::resume_unwind(panic);
    }
}

fn run_actions(data: &[u8]) {
    let mut input = Input { data, pos: 0 };
    let first = input.byte();
    let config = ServerConfig {
        replica: ReplicaId([0xEE; 16]),
        defer_validation: first & 1 == 1,
        max_frame: [1024, 2048, 4096, 16 << 10][usize::from(first >> 1) % 4],
        max_entries_per_push: [2, 4][usize::from(first >> 3) % 2],
        serve_views: first & 0x10 == 0,
        reply_part_bytes: if first & 0x20 == 0 { 1 << 20 } else { 600 },
        ..ServerConfig::default()
    };
    let mut d = Driver::new(config);
    // A prologue, so that short inputs start from a busy server: up to
    // three replicas connected and subscribed.
    for r in 0..usize::from(first >> 6) {
        if let Some(slot) = d.connect() {
            let hello = Hello::signed(&identity_of(r), String::new(), "", 0);
            d.send(slot, &Message::Hello(Box::new(hello)));
            let db = d.dbs[r % 2].clone();
            let since = VersionVector::new();
            let sub = Subscribe {
                horizon: None,
                db,
                since,
                req: 1,
            };
            d.send(slot, &Message::Subscribe(Box::new(sub)));
        }
    }
    d.route();
    d.drain();
    for _ in 0..MAX_ACTIONS {
        if input.done() {
            break;
        }
        d.step(&mut input);
    }
    d.drain();
    d.check_documents();
}
