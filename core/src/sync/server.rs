//! The server side: one state machine for every connection and database.
//!
//! Inputs are calls (`connect`, `handle_frame`, `persisted`, `loaded`, …);
//! outputs accumulate in an outbox the adapter drains with
//! [`Server::take_outputs`]. The server is a relay: it validates, stores and
//! forwards entries without materialising documents (compaction aside).
//!
//! Durability: accepted entries are handed to the adapter as
//! [`ServerOutput::Persist`]; only when the adapter reports them
//! [`Server::persisted`] are they acknowledged to their sender, added to the
//! log that answers `Subscribe`, and fanned out to the other subscribers.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use crate::change_limits::{ChangeLimits, ChangeSummary};
use crate::clock::VersionVector;
use crate::entry::Entry;
use crate::identity::{self, ProofError, ReplayWindow};
use crate::ids::{DbName, DocId, ReplicaId};
use crate::log::{Appended, Compaction, Log, Missing};
use crate::protocol::{
    self, Ack, DEFAULT_MAX_FRAME, ErrorCode, HORIZON_REPLICAS, Hello, Message, PeerPresence,
    Presence, PresenceUpdate, Push, Subscribe, Welcome,
};
use crate::store::{Batch, StoredDatabase};
use crate::view::{BuiltViews, DocView, ViewJob};

use super::auth::{AuthError, Authenticator, Grants, Right, glob_match};
use super::parts::Reply;

/// A connection's id, assigned by [`Server::connect`].
pub type PeerId = u64;

/// Default [`ServerConfig::reply_part_bytes`].
pub const DEFAULT_REPLY_PART_BYTES: usize = 256 << 10;

/// Server limits.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The server's own replica id.
    pub replica: ReplicaId,
    /// The first connection id ([`PeerId`]); a cluster's nodes start
    /// theirs at random bases so ids are unique across the cluster (they
    /// name peers in presence updates).
    pub peer_id_base: u64,
    /// Cluster mode: emit [`ServerOutput::SharePresence`] with this node's
    /// presence changes, for the other nodes' [`Server::remote_presence`].
    pub share_presence: bool,
    /// Largest frame accepted and produced.
    pub max_frame: usize,
    /// Most entries in one `Push`.
    pub max_entries_per_push: usize,
    /// Bounds on each pushed change, checked before automerge parses it.
    pub change_limits: ChangeLimits,
    /// Most bytes of changes one `Push` may inflate to, summed over its
    /// entries (a frame of compressed changes could otherwise ask for
    /// thousands of maximal inflations).
    pub max_push_inflated: usize,
    /// Bytes of one peer's messages the server may hold while they wait
    /// (for a database to load, or behind the peer's push being validated).
    pub max_queued_per_peer: usize,
    /// The same, summed over every peer.
    pub max_queued_total: usize,
    /// Hand pushed changes to the adapter to parse
    /// ([`ServerOutput::Validate`]) instead of parsing them inline. An
    /// adapter serving many connections from one task sets this, so an
    /// expensive push delays its sender only.
    pub defer_validation: bool,
    /// Send the views built by [`Server::views_built`] with replies to
    /// replicas that hold nothing of a document.
    pub serve_views: bool,
    /// Bytes of entries, snapshots and views per part of a reply (at most
    /// half of `max_frame`). Smaller parts keep both ends' peak memory
    /// low (each part is archived, compressed, sent and parsed on its own;
    /// wasm memory never shrinks) at the cost of a little compression.
    pub reply_part_bytes: usize,
    /// Databases one connection may subscribe to (or wait to join) at
    /// once: each costs the server a loaded database and a presence slot.
    pub max_subscriptions_per_peer: usize,
    /// Largest presence state one peer may publish (bytes; keep it well
    /// under a quarter of `max_frame`). Presence updates are split into
    /// frames of half `max_frame`.
    pub max_presence_bytes: usize,
    /// Bytes of accepted changes not yet durable, over every database,
    /// past which pushes are refused (`Internal`) until the store
    /// catches up: the store's queue is bounded by this, and a client
    /// pushing faster than the disk cannot grow the server's memory.
    pub max_pending_bytes: usize,
    /// Presence announcements one peer may cause per [`Server::expire`]
    /// tick (about a second): states sent faster are kept, and the latest
    /// is announced at the next tick.
    pub presence_per_tick: u32,
    /// Bytes a database may hold (changes and snapshots, durable or on
    /// their way to the store) before pushes to it are refused
    /// (`TooLarge`, nothing stored; the client keeps its changes and pushes
    /// them again later). A push is checked against what the database
    /// holds before it, so one push may pass the quota by its own size.
    pub max_database_bytes: usize,
    /// Caps on how many databases matching a pattern may exist (the
    /// operator's anonymous patterns, which anyone may write to). A push
    /// that would create one more is refused (`TooLarge`, nothing stored)
    /// unless its sender has `Admin` on the database. The adapter counts
    /// what the store holds at start ([`Server::count_databases`]).
    pub database_quotas: Vec<DatabaseQuota>,
    /// The names clients may dial this server by (`host` or `host:port`,
    /// as in a URL). Each `Hello`'s proof must be signed for one of them.
    /// Empty: the host the connection was made to
    /// ([`Server::connect_to`]), which is right unless a proxy in front
    /// rewrites the `Host` header.
    pub server_names: Vec<String>,
    /// How far a client's clock may be from the server's, each way (ms),
    /// for its `Hello` to be accepted ([`crate::identity::ReplayWindow`]).
    pub clock_skew_ms: u64,
    /// Nonces of accepted `Hello`s remembered to refuse replays.
    pub replay_capacity: usize,
}

/// At most `max_databases` databases whose names match `pattern`
/// ([`ServerConfig::database_quotas`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseQuota {
    /// A glob pattern, as in a grant.
    pub pattern: String,
    /// How many databases matching it may exist.
    pub max_databases: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            replica: ReplicaId::random(),
            peer_id_base: 1,
            share_presence: false,
            max_frame: DEFAULT_MAX_FRAME,
            max_entries_per_push: 10_000,
            change_limits: ChangeLimits::default(),
            max_push_inflated: 64 << 20,
            max_queued_per_peer: 32 << 20,
            max_queued_total: 512 << 20,
            defer_validation: false,
            serve_views: true,
            reply_part_bytes: DEFAULT_REPLY_PART_BYTES,
            max_subscriptions_per_peer: 1_000,
            max_presence_bytes: protocol::MAX_PRESENCE_LEN,
            max_pending_bytes: 64 << 20,
            presence_per_tick: 10,
            max_database_bytes: 1 << 30,
            database_quotas: Vec::new(),
            server_names: Vec::new(),
            clock_skew_ms: identity::DEFAULT_CLOCK_SKEW_MS,
            replay_capacity: identity::DEFAULT_REPLAY_CAPACITY,
        }
    }
}

/// Another node's presence in one database.
#[derive(Debug, Default)]
struct RemotePresence {
    /// Its subscribers.
    online: u32,
    /// Its peers with a state.
    peers: BTreeMap<PeerId, (ReplicaId, Vec<u8>)>,
    /// When it was last heard (the adapter's clock).
    heard_ms: u64,
}

/// The peers of `presence` that published a state, as a full list has them.
fn with_state(presence: &BTreeMap<PeerId, (ReplicaId, Option<Vec<u8>>)>) -> Vec<PeerPresence> {
    presence
        .iter()
        .filter_map(|(&p, (r, st))| {
            st.as_ref().map(|st| PeerPresence {
                peer: p,
                replica: *r,
                left: false,
                state: Some(st.clone()),
            })
        })
        .collect()
}

/// Subscribers of `db` on other nodes.
fn remote_online(remote: &HashMap<DbName, BTreeMap<String, RemotePresence>>, db: &DbName) -> u32 {
    remote.get(db).map_or(0, |m| {
        m.values().fold(0u32, |a, r| a.saturating_add(r.online))
    })
}

/// What [`Server::ingest`] did with entries from the cluster.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ingested {
    /// Entries new to this node, appended and fanned out.
    pub added: usize,
    /// Entries under a dot held with a different change (dropped).
    pub conflicts: usize,
    /// Entries that would leave a gap in their replica's counters
    /// (dropped; the stream's order never makes one).
    pub gaps: usize,
}

/// What the adapter must do.
#[derive(Debug, Clone)]
pub enum ServerOutput {
    /// Send one message to one peer.
    Send {
        /// Recipient.
        peer: PeerId,
        /// The message.
        msg: Message,
    },
    /// Send one already-encoded frame to several peers (fan-out encodes once).
    Broadcast {
        /// Recipients.
        peers: Vec<PeerId>,
        /// The encoded frame.
        frame: Arc<Vec<u8>>,
        /// Entries inside the frame (for metrics).
        entries: usize,
        /// Views inside the frame (for metrics).
        views: usize,
    },
    /// Close the connection (after sending what precedes this output).
    Close {
        /// The peer.
        peer: PeerId,
        /// Why (also sent as an `Error` just before).
        code: ErrorCode,
    },
    /// Write `batch` durably, then call [`Server::persisted`] with `seq`.
    /// Batches of one database must be written in `seq` order.
    Persist {
        /// The database.
        db: DbName,
        /// Sequence number of this batch within the database.
        seq: u64,
        /// What to write.
        batch: Batch,
    },
    /// Load the database from the store, then call [`Server::loaded`].
    Load {
        /// The database.
        db: DbName,
    },
    /// Send a reply to `Subscribe`, built part by part as the connection
    /// drains (see [`Reply`]); frames queued for the peer after this output
    /// go after the reply's last part.
    Reply {
        /// Recipient.
        peer: PeerId,
        /// The reply.
        reply: Box<Reply>,
    },
    /// Run `job` (off the task serving other connections), then call
    /// [`Server::validated`] with its result. Until then the peer's later
    /// messages wait in order (with [`ServerConfig::defer_validation`]).
    Validate {
        /// The sender of the push.
        peer: PeerId,
        /// The parsing to do.
        job: Box<ValidateJob>,
    },
    /// Cluster mode ([`ServerConfig::share_presence`]): tell the other
    /// nodes this node's presence in `update.db` (its own peers only, its
    /// own online count; `full` after [`Server::share_presence_full`]).
    SharePresence {
        /// The update, under half a frame.
        update: PresenceUpdate,
    },
    /// List the databases in the store, then call [`Server::databases_listed`].
    ListDatabases {
        /// Who asked.
        peer: PeerId,
        /// Their request number.
        req: u32,
    },
}

#[derive(Debug)]
enum PeerState {
    AwaitHello,
    Ready { replica: ReplicaId, grants: Grants },
}

/// Pushes refused as `InvalidChange` before a connection is closed.
const MAX_INVALID_PUSHES: u32 = 16;

/// Most messages a peer may send while one of its pushes is validated;
/// an honest client waits for acknowledgements long before this.
const MAX_WAITING_MESSAGES: usize = 256;

#[derive(Debug)]
struct Peer {
    state: PeerState,
    subs: BTreeSet<DbName>,
    /// A push of this peer is being validated: later messages wait here.
    waiting: Option<VecDeque<Message>>,
    /// Bytes of this peer's messages in `waiting` and in `Server::loading`.
    queued: usize,
    /// Its pushes refused as `InvalidChange`.
    invalid: u32,
    /// Databases it asked to join that are still loading (they count
    /// toward [`ServerConfig::max_subscriptions_per_peer`]).
    joining: BTreeSet<DbName>,
    /// Presence announcements used in this tick.
    presence_used: u32,
    /// The host the client dialled, as the adapter saw it (`Host`).
    host: Option<String>,
}

/// Indices of the quotas whose pattern `db` matches.
fn quotas_of<'a>(quotas: &'a [DatabaseQuota], db: &'a DbName) -> impl Iterator<Item = usize> + 'a {
    quotas
        .iter()
        .enumerate()
        .filter(move |(_, q)| glob_match(&q.pattern, db.as_str()))
        .map(|(i, _)| i)
}

/// The entry `d` holds under `e`'s dot (None when it was compacted away).
fn held<'d>(d: &'d ServerDb, e: &Entry) -> Option<&'d Entry> {
    d.log.get(&e.dot).or_else(|| {
        d.pending
            .iter()
            .flat_map(|b| b.entries.iter())
            .find(|x| x.dot == e.dot)
    })
}

/// [`held`], sharing the log's copy (a pending one is copied: rare).
fn held_shared(d: &ServerDb, e: &Entry) -> Option<Arc<Entry>> {
    d.log
        .get_shared(&e.dot)
        .or_else(|| held(d, e).map(|h| Arc::new(h.clone())))
}

/// Whether `e` is a byte-for-byte resend of `held` (cheap; a resend in
/// another encoding needs [`same_change`]).
fn same_bytes(held: &Entry, e: &Entry) -> bool {
    held.doc == e.doc && held.change == e.change
}

/// Whether `e` is a resend of `held`, by change hash (the bounded cheap
/// pass, no automerge).
fn same_change(held: &Entry, e: &Entry, limits: &ChangeLimits) -> bool {
    same_bytes(held, e)
        || (held.doc == e.doc
            && matches!(
                (held.inspect(limits), e.inspect(limits)),
                (Ok(a), Ok(b)) if a.hash == b.hash
            ))
}

fn conflict_message(counter: u64) -> String {
    format!(
        "counter {counter} of this replica is already held with a different change: \
         is this replica id in use by another client?"
    )
}

/// The parsing of one push, done off the task that serves every
/// connection when [`ServerConfig::defer_validation`] is set.
#[derive(Debug, Clone)]
pub struct ValidateJob {
    db: DbName,
    /// Entries the database did not hold at push time: each is checked
    /// against the limits and parsed by automerge.
    new: Vec<Entry>,
    /// Entries under held dots with the held entry (shared with the log):
    /// in a small push only those whose bytes differ (same change hash, or
    /// a conflict); in a large one all of them, so comparing megabytes of
    /// resent bytes happens here, not in the hub.
    resent: Vec<(Arc<Entry>, Entry)>,
    /// Per document the new entries touch, the replicas with a change to
    /// it held or on its way to the store (automerge must know every actor
    /// a change names; see [`ValidateJob::check_actors`]).
    known: HashMap<DocId, BTreeSet<ReplicaId>>,
    /// Per document, the pusher's latest automerge seq in it, when known
    /// (`ServerDb::seqs`)...
    own_seq: HashMap<DocId, u64>,
    /// ... or else its latest change the log holds (not compacted away):
    /// the next must be its seq + 1.
    own_last: HashMap<DocId, Entry>,
    /// The counter expected and the one found where `new` stopped being
    /// consecutive (what follows a gap is not parsed).
    gap: Option<(u64, u64)>,
    limits: ChangeLimits,
    max_inflated: usize,
    /// The cheap pass over `new`, when [`ValidateJob::is_cheap`] has run
    /// it (so [`ValidateJob::run`] does not run it twice).
    summaries: Option<Vec<ChangeSummary>>,
}

/// The outcome of a [`ValidateJob`], for [`Server::validated`].
#[derive(Debug, Clone)]
pub struct Validated {
    db: DbName,
    entries: Vec<Entry>,
    /// Each entry's automerge seq (when the job succeeded).
    seqs: Vec<u64>,
    gap: Option<(u64, u64)>,
    result: Result<(), String>,
}

impl Validated {
    /// A job that could not run to the end (the adapter caught a panic):
    /// the push is refused.
    pub fn failed(db: DbName, reason: impl Into<String>) -> Self {
        Validated {
            db,
            entries: Vec::new(),
            seqs: Vec::new(),
            gap: None,
            result: Err(reason.into()),
        }
    }
}

/// Why [`ValidateJob::check_actors`] refuses a change that names an author
/// the document has no change of: it may be another tab's, not pushed yet.
const UNKNOWN_AUTHOR: &str =
    "the change builds on changes of another replica this server does not hold yet";

/// The code a refused push gets: `MissingDependency` (push again later)
/// when it only builds on changes the server does not hold yet.
fn refusal_code(problem: &str) -> ErrorCode {
    if problem == UNKNOWN_AUTHOR {
        ErrorCode::MissingDependency
    } else {
        ErrorCode::InvalidChange
    }
}

impl ValidateJob {
    /// automerge 0.12 registers a change's author only at its seq 1, and
    /// looks up every actor a change names (in preds, objects, keys) with
    /// an `unwrap`: a change naming an actor the document has never seen
    /// panics every replica that applies it. So: a replica's first change
    /// to a document is its seq 1, its later ones are not, and every other
    /// actor named has a change to this document already.
    /// `last_seq` is the author's latest seq in this document, when known:
    /// then the change must be the next (two changes with one actor and
    /// seq make automerge refuse the document at compaction and in every
    /// client).
    fn check_actors(
        change: &automerge::Change,
        known: &mut BTreeSet<ReplicaId>,
        last_seq: &mut Option<u64>,
    ) -> Result<(), String> {
        let bytes = |a: &automerge::ActorId| <[u8; 16]>::try_from(a.to_bytes()).ok();
        let author = bytes(change.actor_id()).map(ReplicaId);
        let first = author.is_none_or(|a| !known.contains(&a));
        let expected = match (first, *last_seq) {
            (true, _) => Some(1),
            (false, Some(last)) => Some(last + 1),
            (false, None) => None, // compacted away: any but 1
        };
        let ok = match expected {
            Some(seq) => change.seq() == seq,
            None => change.seq() > 1,
        };
        if !ok {
            return Err(format!(
                "automerge seq {} is not this replica's {} change to the document",
                change.seq(),
                if first { "first" } else { "next" }
            ));
        }
        *last_seq = Some(change.seq());
        for a in change.other_actor_ids() {
            if !bytes(a).is_some_and(|a| known.contains(&ReplicaId(a))) {
                return Err(UNKNOWN_AUTHOR.into());
            }
        }
        known.extend(author);
        Ok(())
    }

    /// Whether the job is cheap enough to run where the push arrived: no
    /// resend to compare, at most 256 changes, uncompressed, of at most
    /// 64 KiB and 4,096 ops in all (counted by the cheap pass, which costs
    /// microseconds here; the parse then costs the hub well under a
    /// millisecond). An honest client's live edits and a busy writer's
    /// batches are this: they are accepted in the hub's burst with the
    /// other pushes that arrived with them, so the store commits them in
    /// one fsync (deferring them split W4's groups into three times as
    /// many fsyncs). Bulk uploads (a client catching up) and anything
    /// compressed are parsed off the hub, and delay only their sender.
    pub fn is_cheap(&mut self) -> bool {
        const ENTRIES: usize = 256;
        const BYTES: usize = 64 << 10;
        const OPS: u64 = 4096;
        if !self.resent.is_empty() || self.new.len() > ENTRIES || self.bytes() > BYTES {
            return false;
        }
        let mut ops = 0u64;
        let mut summaries = Vec::with_capacity(self.new.len());
        for e in &self.new {
            // Byte 8 is the chunk type: 1 is an uncompressed change.
            if e.change.get(8) != Some(&1) {
                return false;
            }
            match e.inspect_unhashed(&self.limits) {
                Ok(s) => {
                    ops += s.ops;
                    summaries.push(s);
                }
                Err(_) => return false, // the job refuses it, off the hub
            }
            if ops > OPS {
                return false;
            }
        }
        self.summaries = Some(summaries);
        true
    }

    /// The database pushed to.
    pub fn db(&self) -> &DbName {
        &self.db
    }

    /// Bytes of change data to check (for the adapter's metrics).
    pub fn bytes(&self) -> usize {
        self.new.iter().map(|e| e.change.len()).sum()
    }

    /// Check and parse. Pure: runs anywhere.
    pub fn run(mut self) -> Validated {
        let (seqs, result) = match self.check() {
            Ok(seqs) => (seqs, Ok(())),
            Err(e) => (Vec::new(), Err(e)),
        };
        Validated {
            db: self.db,
            entries: self.new,
            seqs,
            gap: self.gap,
            result,
        }
    }

    /// The new entries' automerge seqs, or why the push is refused.
    fn check(&mut self) -> Result<Vec<u64>, String> {
        let mut seqs = Vec::with_capacity(self.new.len());
        let mut inflated = 0usize;
        let mut known = std::mem::take(&mut self.known);
        let mut last_seq: HashMap<&DocId, Option<u64>> = HashMap::new();
        for (i, e) in self.new.iter().enumerate() {
            let size = match self.summaries.as_ref().and_then(|s| s.get(i)) {
                Some(s) => s.inflated,
                None => {
                    e.inspect_unhashed(&self.limits)
                        .map_err(|e| e.to_string())?
                        .inflated
                }
            };
            inflated = inflated.saturating_add(size);
            if inflated > self.max_inflated {
                return Err(format!(
                    "the push's changes inflate to more than {} bytes; push fewer at a time",
                    self.max_inflated
                ));
            }
            let change = e.parse_inspected().map_err(|e| e.to_string())?;
            canonical(&change)?;
            let last = last_seq.entry(&e.doc).or_insert_with(|| {
                if let Some(seq) = self.own_seq.get(&e.doc) {
                    return Some(*seq);
                }
                let held = self.own_last.get(&e.doc)?;
                held.inspect(&self.limits).ok().map(|s| s.seq)
            });
            Self::check_actors(&change, known.entry(e.doc.clone()).or_default(), last)?;
            seqs.push(change.seq());
        }
        for (held, e) in &self.resent {
            if !same_change(held, e, &self.limits) {
                return Err(conflict_message(e.dot.counter));
            }
        }
        Ok(seqs)
    }
}

/// The change is in automerge's own encoding: decoded and encoded again,
/// it has the same hash. automerge's parser accepts column encodings its
/// encoder never writes (an actor column cut short, a run split oddly),
/// and its apply path then panics on some of them (found by the `server`
/// fuzz target); a replica in a browser cannot catch that. An honest
/// change comes from automerge's encoder and always passes. (Decoding a
/// hostile change may itself panic: caught, and refused.)
fn canonical(change: &automerge::Change) -> Result<(), String> {
    let again = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut expanded = change.decode();
        expanded.hash = None;
        automerge::Change::from(expanded).hash()
    }));
    match again {
        Ok(hash) if hash == change.hash() => Ok(()),
        _ => Err("the change is not in automerge's own encoding".into()),
    }
}

#[derive(Debug)]
struct PendingBatch {
    seq: u64,
    origin: PeerId,
    entries: Vec<Entry>,
    /// Bytes of its changes (counted in `Server::pending_bytes`).
    bytes: usize,
}

#[derive(Debug, Default)]
struct ServerDb {
    /// Durable content: answers `Subscribe`.
    log: Log,
    /// Durable plus accepted-but-not-yet-durable: decides duplicates and gaps.
    accepted: VersionVector,
    /// Per document, the automerge seq of each replica's latest change
    /// accepted since the database loaded (the push checks need it, and
    /// finding it among pending batches cost the hub O(pending) a push).
    seqs: HashMap<DocId, HashMap<ReplicaId, u64>>,
    pending: VecDeque<PendingBatch>,
    next_seq: u64,
    /// When a message last touched it ([`Server::unload_idle`] picks the
    /// least recent).
    last_used: u64,
    subscribers: BTreeSet<PeerId>,
    presence: BTreeMap<PeerId, (ReplicaId, Option<Vec<u8>>)>,
    /// Presence changes not yet announced (the latest per peer).
    presence_pending: Vec<PeerPresence>,
    /// Of those, this node's own (what [`ServerOutput::SharePresence`]
    /// tells the other nodes).
    presence_local: Vec<PeerPresence>,
    /// The online count last shared with the other nodes.
    online_shared: u32,
    /// Peers sent the full presence since the last announcement, with the
    /// count it carried: they need no count-only update.
    presence_fresh: Vec<(PeerId, u32)>,
    /// Views built off the hot path; one is served only while its clock is
    /// the document's clock in `log`.
    views: HashMap<DocId, Arc<DocView>>,
    /// Documents whose view could not be built at this clock (not retried
    /// until they change).
    views_failed: HashMap<DocId, VersionVector>,
    /// Counted against [`ServerConfig::database_quotas`] while it held
    /// nothing: a push is creating it.
    counted: bool,
    /// Pushes to it being validated off the hub (a creation is released
    /// only once none is left).
    validating: u32,
}

/// A `Hello` whose signature was checked where it arrived, so that the
/// task serving every connection ([`Server::hello_checked`]) does not spend
/// a signature verification (tens of microseconds) per handshake. Only
/// [`CheckedHello::check`] makes one.
#[derive(Debug)]
pub struct CheckedHello {
    hello: Hello,
    signature: Result<(), ProofError>,
    /// The token, checked by the same authenticator the server has.
    grants: Option<Result<Grants, AuthError>>,
}

impl CheckedHello {
    /// Verify `hello`'s proof of its replica (the signature and the key's
    /// replica id; the host, clock and nonce are the server's to check).
    pub fn check(hello: Hello) -> Self {
        let signature = hello.proof.verify(hello.replica);
        CheckedHello {
            hello,
            signature,
            grants: None,
        }
    }

    /// [`CheckedHello::check`], and the token too, with `auth`: it must be
    /// the server's authenticator (token signatures cost as much as the
    /// proof's).
    pub fn check_with(hello: Hello, auth: &impl Authenticator) -> Self {
        let grants = Some(auth.authenticate(&hello.token));
        CheckedHello {
            grants,
            ..CheckedHello::check(hello)
        }
    }
}

/// The server state machine.
#[derive(Debug)]
pub struct Server<A> {
    config: ServerConfig,
    auth: A,
    peers: HashMap<PeerId, Peer>,
    dbs: HashMap<DbName, ServerDb>,
    /// Messages waiting for their database to load.
    loading: HashMap<DbName, Vec<(PeerId, Message)>>,
    /// Bytes of messages held in `loading` and in peers' `waiting`.
    queued_total: usize,
    next_peer: PeerId,
    out: Vec<ServerOutput>,
    /// Bytes of encoded frames in `out` (see [`Server::outbox_bytes`]).
    out_bytes: usize,
    /// Databases with presence changes to announce.
    presence_dirty: BTreeSet<DbName>,
    /// Cluster mode: other nodes' presence per database, by node.
    remote: HashMap<DbName, BTreeMap<String, RemotePresence>>,
    /// Bytes of changes in every database's pending batches.
    pending_bytes: usize,
    /// Messages routed to loaded databases so far (a logical clock).
    uses: u64,
    /// Peers over their presence rate with a state not yet announced: the
    /// next [`Server::expire`] tick announces the latest.
    presence_later: BTreeSet<(DbName, PeerId)>,
    /// Databases that exist per entry of [`ServerConfig::database_quotas`].
    created: Vec<usize>,
    /// Set by the adapter while its storage is over its quota: pushes are
    /// refused ([`Server::storage_full`]).
    storage_full: bool,
    /// Nonces of recent `Hello`s.
    replay: ReplayWindow,
    /// Unix milliseconds, as last told by the adapter ([`Server::set_clock`]).
    now_ms: u64,
}

impl<A: Authenticator> Server<A> {
    /// A server with no connections and no loaded databases.
    pub fn new(config: ServerConfig, auth: A) -> Self {
        Server {
            auth,
            peers: HashMap::new(),
            dbs: HashMap::new(),
            loading: HashMap::new(),
            queued_total: 0,
            next_peer: config.peer_id_base.max(1),
            out: Vec::new(),
            out_bytes: 0,
            presence_dirty: BTreeSet::new(),
            remote: HashMap::new(),
            pending_bytes: 0,
            uses: 0,
            presence_later: BTreeSet::new(),
            created: vec![0; config.database_quotas.len()],
            storage_full: false,
            replay: ReplayWindow::new(config.clock_skew_ms, config.replay_capacity),
            now_ms: 0,
            config,
        }
    }

    /// Count the databases the store holds against
    /// [`ServerConfig::database_quotas`] (once, at start).
    pub fn count_databases<'a>(&mut self, names: impl IntoIterator<Item = &'a DbName>) {
        for db in names {
            for i in quotas_of(&self.config.database_quotas, db) {
                self.created[i] += 1;
            }
        }
    }

    /// How many databases exist per entry of
    /// [`ServerConfig::database_quotas`] (in its order).
    pub fn databases_created(&self) -> &[usize] {
        &self.created
    }

    /// The adapter's storage is over its quota (`true`) or back under it:
    /// while full, every push is refused (`TooLarge`, nothing stored; the
    /// client pushes again later). Compaction, which shrinks it, goes on.
    pub fn storage_full(&mut self, full: bool) {
        self.storage_full = full;
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// Drain the outbox. Presence changes made since the last call go out
    /// here as one update per database: an adapter that handles a burst of
    /// messages before draining (1,000 clients joining) sends each
    /// subscriber one update instead of one per join, which would be
    /// O(subscribers²) messages.
    pub fn take_outputs(&mut self) -> Vec<ServerOutput> {
        self.flush_presence();
        self.out_bytes = 0;
        std::mem::take(&mut self.out)
    }

    /// Bytes of encoded frames waiting in the outbox (live updates,
    /// presence; replies to Subscribe are not encoded here). An adapter
    /// batching a burst of messages drains when this grows large, so its
    /// per-connection limits see the frames before they pile up.
    pub fn outbox_bytes(&self) -> usize {
        self.out_bytes
    }

    fn flush_presence(&mut self) {
        for db in std::mem::take(&mut self.presence_dirty) {
            let remote_online = remote_online(&self.remote, &db);
            let Some(d) = self.dbs.get_mut(&db) else {
                continue;
            };
            let peers = std::mem::take(&mut d.presence_pending);
            let fresh = std::mem::take(&mut d.presence_fresh);
            let local = std::mem::take(&mut d.presence_local);
            let own_online = d.subscribers.len() as u32;
            let online = own_online.saturating_add(remote_online);
            if self.config.share_presence && (!local.is_empty() || d.online_shared != own_online) {
                d.online_shared = own_online;
                let share = PresenceUpdate {
                    db: db.clone(),
                    full: false,
                    online: own_online,
                    peers: local,
                };
                for update in presence_parts(share, self.config.max_frame / 2) {
                    self.out.push(ServerOutput::SharePresence { update });
                }
            }
            let to: Vec<PeerId> = d
                .subscribers
                .iter()
                .filter(|p| !(peers.is_empty() && fresh.contains(&(**p, online))))
                .copied()
                .collect();
            let update = PresenceUpdate {
                db,
                full: false,
                online,
                peers,
            };
            for part in presence_parts(update, self.config.max_frame / 2) {
                self.broadcast(&to, &Message::PresenceUpdate(Box::new(part)));
            }
        }
    }

    /// The adapter's clock, Unix milliseconds: a `Hello` is accepted only
    /// if dated within [`ServerConfig::clock_skew_ms`] of it. Adapters set
    /// it before handing over a `Hello` (or at least every second).
    pub fn set_clock(&mut self, now_unix_ms: u64) {
        self.now_ms = now_unix_ms;
    }

    /// A new connection, made to no particular host (see
    /// [`Server::connect_to`]).
    pub fn connect(&mut self) -> PeerId {
        self.connect_to(None)
    }

    /// A new connection, made to `host` (the request's `Host` header): a
    /// `Hello` signed for another host is refused, unless
    /// [`ServerConfig::server_names`] lists the names to accept instead.
    pub fn connect_to(&mut self, host: Option<&str>) -> PeerId {
        let id = self.next_peer;
        self.next_peer += 1;
        self.peers.insert(
            id,
            Peer {
                state: PeerState::AwaitHello,
                subs: BTreeSet::new(),
                waiting: None,
                queued: 0,
                invalid: 0,
                joining: BTreeSet::new(),
                presence_used: 0,
                host: host.map(identity::normalize_host),
            },
        );
        id
    }

    /// Whether `peer` is connected and its `Hello` was accepted. An adapter
    /// reads nothing more from a connection until this holds.
    pub fn greeted(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| matches!(p.state, PeerState::Ready { .. }))
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.peers.len()
    }

    /// Subscribed connections per loaded database.
    pub fn subscriptions(&self) -> impl Iterator<Item = (&DbName, usize)> {
        self.dbs.iter().map(|(n, d)| (n, d.subscribers.len()))
    }

    /// The durable log of a loaded database.
    pub fn log(&self, db: &DbName) -> Option<&Log> {
        self.dbs.get(db).map(|d| &d.log)
    }

    /// A connection ended: forget it and tell the others it left.
    pub fn disconnect(&mut self, peer: PeerId) {
        let Some(p) = self.peers.remove(&peer) else {
            return;
        };
        self.queued_total = self.queued_total.saturating_sub(p.queued);
        for db in p.subs {
            self.leave(peer, &db);
        }
        for queue in self.loading.values_mut() {
            queue.retain(|(p, _)| *p != peer);
        }
    }

    /// Tell every connection the server is going away and close them.
    pub fn shutdown(&mut self) {
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers {
            self.fail(peer, ErrorCode::ShuttingDown, "server shutting down", None);
        }
    }

    /// A frame arrived from `peer`.
    pub fn handle_frame(&mut self, peer: PeerId, frame: &[u8]) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        // Before its Hello is accepted a peer gets only the small,
        // uncompressed first frame read: nothing is inflated for it.
        let decoded = match p.state {
            PeerState::AwaitHello => {
                protocol::decode_hello(frame).map(|h| Message::Hello(Box::new(h)))
            }
            PeerState::Ready { .. } => protocol::decode(frame, self.config.max_frame),
        };
        match decoded {
            Ok(msg) => self.handle(peer, msg),
            Err(e) => self.fail(peer, e.code(), e.to_string(), None),
        }
    }

    /// A decoded message arrived from `peer`.
    pub fn handle(&mut self, peer: PeerId, msg: Message) {
        let Some(p) = self.peers.get_mut(&peer) else {
            return;
        };
        if let Some(waiting) = &p.waiting {
            if waiting.len() < MAX_WAITING_MESSAGES && self.enqueue(peer, &msg) {
                if let Some(waiting) = self.peers.get_mut(&peer).and_then(|p| p.waiting.as_mut()) {
                    waiting.push_back(msg);
                }
            } else {
                self.fail(
                    peer,
                    ErrorCode::Overloaded,
                    "too many messages while a push is validated; wait for its Ack",
                    None,
                );
            }
            return;
        }
        let ready = matches!(p.state, PeerState::Ready { .. });
        match msg {
            Message::Hello(h) if !ready => self.hello(peer, *h, None, None),
            Message::Hello(_) => {
                self.fail(peer, ErrorCode::ProtocolViolation, "second Hello", None)
            }
            _ if !ready => self.fail(
                peer,
                ErrorCode::ProtocolViolation,
                "the first message must be Hello",
                None,
            ),
            Message::Ping { nonce } => self.send(peer, Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::Error(e) => {
                tracing::debug!(peer, code = %e.code(), "peer reported: {}", e.message);
            }
            Message::Subscribe(s) => {
                if self.may_join(peer, &s.db) {
                    self.with_db(peer, s.db.clone(), Message::Subscribe(s));
                }
            }
            Message::Unsubscribe { db } => {
                self.with_db(peer, db.clone(), Message::Unsubscribe { db })
            }
            Message::Push(p) => self.with_db(peer, p.db.clone(), Message::Push(p)),
            Message::Presence(p) => self.with_db(peer, p.db.clone(), Message::Presence(p)),
            Message::ListDatabases { req } => {
                let admin = self.grants(peer).is_some_and(|(_, g)| g.any(Right::Admin));
                if admin {
                    self.out.push(ServerOutput::ListDatabases { peer, req });
                } else {
                    self.fail(
                        peer,
                        ErrorCode::Forbidden,
                        "listing databases needs an admin token",
                        None,
                    );
                }
            }
            other => self.fail(
                peer,
                ErrorCode::ProtocolViolation,
                format!("{} is a server message", other.kind()),
                None,
            ),
        }
    }

    /// Unload the least recently used idle databases (no subscriber, no
    /// write on its way to the store, not in `busy`) until the loaded ones
    /// hold about `budget` bytes or none is idle; returns those unloaded,
    /// for the adapter to forget (a later message loads one again). A
    /// long-running server otherwise keeps every database it ever served.
    pub fn unload_idle(&mut self, budget: usize, busy: &BTreeSet<DbName>) -> Vec<DbName> {
        let mut held: usize = self.dbs.values().map(held_bytes).sum();
        if held <= budget {
            return Vec::new();
        }
        // Sorted by reference; only the names unloaded are copied.
        let mut idle: Vec<(u64, &DbName, usize)> = self
            .dbs
            .iter()
            .filter(|(db, d)| {
                d.subscribers.is_empty()
                    && d.pending.is_empty()
                    && d.validating == 0
                    && !busy.contains(*db)
            })
            .map(|(db, d)| (d.last_used, db, held_bytes(d)))
            .collect();
        idle.sort_unstable_by_key(|x| x.0);
        let mut chosen = Vec::new();
        for (_, db, bytes) in idle {
            if held <= budget {
                break;
            }
            held = held.saturating_sub(bytes);
            chosen.push(db.clone());
        }
        let mut gone = Vec::with_capacity(chosen.len());
        for db in chosen {
            // A creation that stored nothing stops counting.
            self.release_creation(&db);
            if self.dbs.remove(&db).is_some() {
                self.presence_dirty.remove(&db);
                gone.push(db);
            }
        }
        if !gone.is_empty() {
            self.presence_later.retain(|(db, _)| !gone.contains(db));
        }
        gone
    }

    /// Bytes the loaded databases hold, roughly ([`Server::unload_idle`]).
    pub fn loaded_bytes(&self) -> usize {
        self.dbs.values().map(held_bytes).sum()
    }

    /// The store delivered a database requested by [`ServerOutput::Load`].
    pub fn loaded(&mut self, db: DbName, stored: StoredDatabase) {
        let (log, problems) = Log::from_stored(stored);
        for p in problems {
            tracing::warn!(%db, "stored log: {p}");
        }
        let accepted = log.vv().clone();
        self.dbs.insert(
            db.clone(),
            ServerDb {
                log,
                accepted,
                ..ServerDb::default()
            },
        );
        for (peer, msg) in self.loading.remove(&db).unwrap_or_default() {
            // A peer with a push being validated keeps its order (the
            // message stays counted as held).
            match self.peers.get_mut(&peer).and_then(|p| p.waiting.as_mut()) {
                Some(waiting) => waiting.push_back(msg),
                None => {
                    self.dequeue(peer, &msg);
                    self.db_message(peer, msg);
                }
            }
        }
    }

    /// Count `msg` as held for `peer`, if the per-peer and total limits
    /// allow it.
    fn enqueue(&mut self, peer: PeerId, msg: &Message) -> bool {
        let n = msg.held_bytes();
        let Some(p) = self.peers.get_mut(&peer) else {
            return false;
        };
        if p.queued + n > self.config.max_queued_per_peer
            || self.queued_total + n > self.config.max_queued_total
        {
            return false;
        }
        p.queued += n;
        self.queued_total += n;
        true
    }

    /// `msg`, held for `peer`, leaves the queues.
    fn dequeue(&mut self, peer: PeerId, msg: &Message) {
        let n = msg.held_bytes();
        if let Some(p) = self.peers.get_mut(&peer) {
            p.queued = p.queued.saturating_sub(n);
            self.queued_total = self.queued_total.saturating_sub(n);
        }
    }

    /// Bytes of messages held waiting, over every peer.
    pub fn queued_bytes(&self) -> usize {
        self.queued_total
    }

    /// A [`ServerOutput::Validate`] job finished: store what it accepted,
    /// or refuse the push; then handle the peer's messages that waited.
    pub fn validated(&mut self, peer: PeerId, v: Validated) {
        let db = v.db.clone();
        if let Some(d) = self.dbs.get_mut(&db) {
            d.validating = d.validating.saturating_sub(1);
        }
        let Some(p) = self.peers.get_mut(&peer) else {
            self.release_creation(&db);
            return;
        };
        let waiting = p.waiting.take().unwrap_or_default();
        match v.result {
            Ok(()) => self.accept(peer, v.db, v.entries, v.seqs, v.gap),
            Err(problem) => self.fail(peer, refusal_code(&problem), problem, Some(v.db)),
        }
        self.release_creation(&db);
        for msg in waiting {
            self.dequeue(peer, &msg);
            self.handle(peer, msg);
        }
    }

    /// The store could not load `db`: refuse the waiting requests.
    ///
    /// `reason` goes to the log, never to the clients: a store's errors name
    /// files and directories, which are none of a client's business. They
    /// get `Internal` and a generic text.
    pub fn load_failed(&mut self, db: &DbName, reason: &str) {
        tracing::error!(%db, "load failed: {reason}");
        for (peer, msg) in self.loading.remove(db).unwrap_or_default() {
            self.dequeue(peer, &msg);
            if let Some(p) = self.peers.get_mut(&peer) {
                p.joining.remove(db);
            }
            self.send(
                peer,
                Message::error(
                    ErrorCode::Internal,
                    "could not load the database; the server log has the details",
                    Some(db.clone()),
                ),
            );
        }
    }

    /// The store's database names for a [`ServerOutput::ListDatabases`]:
    /// answer with those (plus loaded ones) the peer administers.
    pub fn databases_listed(&mut self, peer: PeerId, req: u32, stored: Vec<DbName>) {
        let Some((_, grants)) = self.grants(peer) else {
            return;
        };
        let mut names: BTreeSet<DbName> = stored.into_iter().collect();
        names.extend(self.dbs.keys().cloned());
        let names = names
            .into_iter()
            .filter(|n| grants.allows(n.as_str(), Right::Admin))
            .collect();
        self.send(
            peer,
            Message::Databases(Box::new(protocol::Databases { req, names })),
        );
    }

    /// Batches of `db` up to `seq` are durable: acknowledge and fan out.
    pub fn persisted(&mut self, db: &DbName, seq: u64) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        let mut done = Vec::new();
        while d.pending.front().is_some_and(|b| b.seq <= seq) {
            if let Some(b) = d.pending.pop_front() {
                self.pending_bytes = self.pending_bytes.saturating_sub(b.bytes);
                done.push(b);
            }
        }
        if done.is_empty() {
            return;
        }
        let mut origins = BTreeSet::new();
        let mut all: Vec<(PeerId, Entry)> = Vec::new();
        // In a cluster another node's message may have brought a dot first
        // (the same client pushed it there too): a resend is acknowledged
        // and not fanned out again; a different change under it was lost
        // to the first writer, and its sender is told, not acknowledged.
        let mut conflicts: Vec<(PeerId, u64)> = Vec::new();
        let limits = self.config.change_limits;
        for b in done {
            origins.insert(b.origin);
            for e in b.entries {
                if let Some(h) = d.log.get(&e.dot) {
                    if !same_change(h, &e, &limits)
                        && !conflicts.iter().any(|(p, _)| *p == b.origin)
                    {
                        conflicts.push((b.origin, e.dot.counter));
                    }
                    continue;
                }
                match d.log.append(e.clone()) {
                    Ok(Appended::Added) => all.push((b.origin, e)),
                    Ok(Appended::Duplicate) => {}
                    Err(err) => {
                        tracing::error!(%db, "persisted entry does not fit the log: {err}");
                    }
                }
            }
        }
        let vv = d.log.vv().clone();
        // Subscribers that pushed none of these get one shared frame.
        let plain: Vec<PeerId> = d
            .subscribers
            .iter()
            .filter(|p| !origins.contains(p))
            .copied()
            .collect();
        let entries: Vec<Entry> = all.iter().map(|(_, e)| e.clone()).collect();
        let custom: Vec<(PeerId, Vec<Entry>)> = origins
            .iter()
            .filter(|o| d.subscribers.contains(o))
            .map(|o| {
                let theirs = all
                    .iter()
                    .filter(|(from, _)| from != o)
                    .map(|(_, e)| e.clone())
                    .collect();
                (*o, theirs)
            })
            .collect();
        self.broadcast_live(db, &plain, entries, &vv);
        for (peer, entries) in custom {
            if !entries.is_empty() {
                self.broadcast_live(db, &[peer], entries, &vv);
            }
        }
        for (o, counter) in &conflicts {
            origins.remove(o);
            self.fail(
                *o,
                ErrorCode::InvalidChange,
                conflict_message(*counter),
                Some(db.clone()),
            );
        }
        for o in origins {
            if let Some((replica, _)) = self.grants(o) {
                let ack = own_counter(&vv, replica);
                self.send(
                    o,
                    Message::Ack(Box::new(Ack {
                        db: db.clone(),
                        vv: ack,
                    })),
                );
            }
        }
    }

    /// Entries another node made durable (a cluster's shared log, in its
    /// order): append what this node does not hold, fan it out to every
    /// local subscriber, and count it as accepted so later pushes continue
    /// from it. A held dot is skipped (entries are idempotent by dot; a
    /// different change under it lost to the first writer and is dropped
    /// here as on every node, since every node reads the same order). An
    /// entry that leaves a gap cannot be appended: it is skipped and
    /// counted in the result, which says how many entries were new.
    ///
    /// Does nothing for a database that is not loaded: its load reads them.
    pub fn ingest(&mut self, db: &DbName, entries: Vec<Entry>) -> Ingested {
        let mut out = Ingested::default();
        let limits = self.config.change_limits;
        let Some(d) = self.dbs.get_mut(db) else {
            return out;
        };
        let mut added = Vec::new();
        for e in entries {
            if let Some(h) = d.log.get(&e.dot) {
                if !same_change(h, &e, &limits) {
                    out.conflicts += 1;
                }
                continue;
            }
            match d.log.append(e.clone()) {
                Ok(Appended::Added) => {
                    if d.accepted.get(&e.dot.replica) < e.dot.counter {
                        d.accepted.set(e.dot.replica, e.dot.counter);
                        if let Ok(summary) = e.inspect(&limits) {
                            d.seqs
                                .entry(e.doc.clone())
                                .or_default()
                                .insert(e.dot.replica, summary.seq);
                        }
                    }
                    added.push(e);
                }
                Ok(Appended::Duplicate) => {}
                Err(err) => {
                    tracing::error!(%db, "an entry from the cluster does not fit the log: {err}");
                    out.gaps += 1;
                }
            }
        }
        out.added = added.len();
        if added.is_empty() {
            return out;
        }
        d.last_used = self.uses;
        let vv = d.log.vv().clone();
        let peers: Vec<PeerId> = d.subscribers.iter().copied().collect();
        self.broadcast_live(db, &peers, added, &vv);
        out
    }

    /// Writing batch `seq` of `db` failed: nothing from it (or later) is
    /// acknowledged; the senders are told and will push again.
    ///
    /// As with [`Server::load_failed`], `reason` is logged and not sent.
    pub fn persist_failed(&mut self, db: &DbName, seq: u64, reason: &str) {
        tracing::error!(%db, seq, "write failed: {reason}");
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        let failed: Vec<PendingBatch> = d
            .pending
            .iter()
            .position(|b| b.seq >= seq)
            .map(|i| d.pending.drain(i..).collect())
            .unwrap_or_default();
        let failed_bytes: usize = failed.iter().map(|b| b.bytes).sum();
        self.pending_bytes = self.pending_bytes.saturating_sub(failed_bytes);
        let mut accepted = d.log.vv().clone();
        for b in &d.pending {
            for e in &b.entries {
                accepted.set(e.dot.replica, e.dot.counter);
            }
        }
        d.accepted = accepted;
        // The failed entries' seqs go too: what is left pending (or else
        // the log) says where each of those replicas stands.
        let mut lost: BTreeSet<(DocId, ReplicaId)> = BTreeSet::new();
        for e in failed.iter().flat_map(|b| b.entries.iter()) {
            lost.insert((e.doc.clone(), e.dot.replica));
        }
        for (doc, replica) in &lost {
            if let Some(m) = d.seqs.get_mut(doc) {
                m.remove(replica);
            }
        }
        let limits = self.config.change_limits;
        for e in d.pending.iter().flat_map(|b| b.entries.iter()) {
            if lost.contains(&(e.doc.clone(), e.dot.replica))
                && let Ok(summary) = e.inspect(&limits)
            {
                d.seqs
                    .entry(e.doc.clone())
                    .or_default()
                    .insert(e.dot.replica, summary.seq);
            }
        }
        let origins: BTreeSet<PeerId> = failed.iter().map(|b| b.origin).collect();
        for o in origins {
            self.send(
                o,
                Message::error(
                    ErrorCode::Internal,
                    "storage failed, not saved; the server log has the details",
                    Some(db.clone()),
                ),
            );
        }
    }

    /// Plan and install a compaction of `db` up to `up_to` (clamped to the
    /// durable log), and emit the batch that makes it durable.
    pub fn compact(&mut self, db: &DbName, up_to: &VersionVector) {
        let Some(d) = self.dbs.get(db) else {
            return;
        };
        let compaction = d.log.plan_compaction(up_to);
        self.apply_compaction(db, compaction);
    }

    /// Install a compaction planned elsewhere (e.g. on a background thread
    /// from a copy of the log) and emit the batch that makes it durable.
    /// Documents it skipped are logged; their entries stay in the log.
    pub fn apply_compaction(&mut self, db: &DbName, compaction: Compaction) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        for (doc, reason) in &compaction.skipped {
            tracing::warn!(%db, %doc, "compaction skipped a document it cannot fold: {reason}");
        }
        d.log.apply_compaction(compaction.clone());
        // Documents with a snapshot are served without views.
        for s in &compaction.snapshots {
            d.views.remove(&s.doc);
            d.views_failed.remove(&s.doc);
        }
        let seq = d.next_seq;
        d.next_seq += 1;
        self.out.push(ServerOutput::Persist {
            db: db.clone(),
            seq,
            batch: Batch {
                entries: Vec::new(),
                snapshots: compaction.snapshots,
                base: Some(compaction.base),
            },
        });
    }

    /// Documents of `db` that would be served with a view but have none at
    /// their current clock.
    pub fn stale_views(&self, db: &DbName) -> usize {
        self.dbs.get(db).map_or(0, |d| stale_docs(d).count())
    }

    /// What building the missing views of `db` needs, up to about
    /// `max_changes` changes (at least one document), or `None` when every
    /// view is current. The adapter runs [`ViewJob::build`] off its hot
    /// path and hands the result to [`Server::views_built`].
    pub fn view_job(&self, db: &DbName, max_changes: usize) -> Option<ViewJob> {
        self.view_job_settled(db, max_changes, u64::MAX)
    }

    /// [`Server::view_job`] for the documents whose latest change came
    /// before [`Server::appended`] read `settled` (the rest are still being
    /// written: a view of them would be stale at once).
    pub fn view_job_settled(
        &self,
        db: &DbName,
        max_changes: usize,
        settled: u64,
    ) -> Option<ViewJob> {
        if !self.config.serve_views {
            return None;
        }
        let d = self.dbs.get(db)?;
        let mut budget = 0usize;
        let docs: Vec<DocId> = stale_docs(d)
            .filter(|doc| d.log.doc_appended(doc) <= settled)
            .take_while(|doc| {
                let go = budget == 0 || budget < max_changes;
                budget += d.log.doc_entry_count(doc) as usize;
                go
            })
            .cloned()
            .collect();
        let job = d.log.view_job(docs);
        (!job.is_empty()).then_some(job)
    }

    /// [`Log::appended`] of a loaded database.
    pub fn appended(&self, db: &DbName) -> Option<u64> {
        self.dbs.get(db).map(|d| d.log.appended())
    }

    /// Keep views built from a [`Server::view_job`]; a view whose document
    /// changed meanwhile is dropped (the next job rebuilds it).
    pub fn views_built(&mut self, db: &DbName, built: BuiltViews) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        for v in built.views {
            if d.log.doc_clock(&v.doc) == Some(&v.clock) {
                d.views_failed.remove(&v.doc);
                d.views.insert(v.doc.clone(), Arc::new(v));
            }
        }
        for (doc, clock) in built.failed {
            d.views.remove(&doc);
            d.views_failed.insert(doc, clock);
        }
    }

    // ---- internals ----

    fn send(&mut self, peer: PeerId, msg: Message) {
        self.out.push(ServerOutput::Send { peer, msg });
    }

    fn fail(
        &mut self,
        peer: PeerId,
        code: ErrorCode,
        message: impl Into<String>,
        db: Option<DbName>,
    ) {
        let message = message.into();
        tracing::debug!(peer, %code, "refusing: {message}");
        self.send(peer, Message::error(code, message, db));
        // An honest client sends an invalid change rarely, and stops at the
        // error; a connection that keeps sending them is made to reconnect
        // (handshakes are rate-limited per address).
        let refused = self.peers.get_mut(&peer).map(|p| {
            p.invalid += u32::from(code == ErrorCode::InvalidChange);
            p.invalid
        });
        if refused.is_some_and(|n| n > MAX_INVALID_PUSHES) {
            self.send(
                peer,
                Message::error(
                    ErrorCode::ProtocolViolation,
                    format!("more than {MAX_INVALID_PUSHES} invalid changes on one connection"),
                    None,
                ),
            );
            self.out.push(ServerOutput::Close {
                peer,
                code: ErrorCode::ProtocolViolation,
            });
            self.disconnect(peer);
        } else if code.is_fatal() {
            self.out.push(ServerOutput::Close { peer, code });
            self.disconnect(peer);
        }
    }

    /// Close every connection whose token expired by `now_unix_secs`
    /// (`Unauthorized`). Tokens are checked at `Hello`; adapters call this
    /// periodically so a long-lived connection does not outlive its token.
    ///
    /// It is also the presence tick: each peer's presence rate
    /// ([`ServerConfig::presence_per_tick`]) starts again, and the latest
    /// state of a peer that went over it is announced.
    pub fn expire(&mut self, now_unix_secs: u64) {
        for p in self.peers.values_mut() {
            p.presence_used = 0;
        }
        for (db, peer) in std::mem::take(&mut self.presence_later) {
            let subscribed = self
                .dbs
                .get(&db)
                .is_some_and(|d| d.subscribers.contains(&peer));
            if let Some(p) = self.peers.get_mut(&peer).filter(|_| subscribed) {
                p.presence_used += 1;
                self.announce_presence(&db, peer);
            }
        }
        let expired: Vec<PeerId> = self
            .peers
            .iter()
            .filter(|(_, p)| match &p.state {
                PeerState::Ready { grants, .. } => {
                    grants.expires().is_some_and(|t| t <= now_unix_secs)
                }
                PeerState::AwaitHello => false,
            })
            .map(|(&peer, _)| peer)
            .collect();
        for peer in expired {
            self.fail(
                peer,
                ErrorCode::Unauthorized,
                "token expired; reconnect with a fresh one",
                None,
            );
        }
    }

    fn grants(&self, peer: PeerId) -> Option<(ReplicaId, &Grants)> {
        match &self.peers.get(&peer)?.state {
            PeerState::Ready { replica, grants } => Some((*replica, grants)),
            PeerState::AwaitHello => None,
        }
    }

    /// Whether `h` proves its replica: its host, its signature and a fresh
    /// nonce within the clock window. The nonce is remembered only once
    /// the signature holds, so forged proofs cannot fill the window.
    fn check_proof(
        &mut self,
        peer: PeerId,
        h: &Hello,
        signature: Option<&Result<(), ProofError>>,
    ) -> Result<(), ProofError> {
        let proof = &h.proof;
        if proof.host.len() > identity::MAX_HOST_LEN {
            return Err(ProofError::HostTooLong);
        }
        let signed = identity::normalize_host(&proof.host);
        let host_ok = if self.config.server_names.is_empty() {
            match self.peers.get(&peer).and_then(|p| p.host.as_deref()) {
                Some(dialled) => dialled == signed,
                None => true,
            }
        } else {
            self.config
                .server_names
                .iter()
                .any(|n| identity::normalize_host(n) == signed)
        };
        if !host_ok {
            return Err(ProofError::WrongHost(proof.host.clone()));
        }
        match signature {
            Some(checked) => checked.clone()?,
            None => proof.verify(h.replica)?,
        }
        self.replay.admit(proof, self.now_ms)
    }

    /// A connection's `Hello` whose signature the adapter checked
    /// ([`CheckedHello::check`]); the same as handing it to
    /// [`Server::handle`] otherwise.
    pub fn hello_checked(&mut self, peer: PeerId, hello: CheckedHello) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        if matches!(p.state, PeerState::Ready { .. }) {
            self.handle(peer, Message::Hello(Box::new(hello.hello)));
        } else {
            self.hello(peer, hello.hello, Some(&hello.signature), hello.grants);
        }
    }

    /// The replica `peer` proved it owns, once its `Hello` was accepted.
    pub fn replica_of(&self, peer: PeerId) -> Option<ReplicaId> {
        self.grants(peer).map(|(r, _)| r)
    }

    /// Who the token of `peer` names (its `sub`), once its `Hello` was
    /// accepted.
    pub fn subject(&self, peer: PeerId) -> Option<&str> {
        self.grants(peer).and_then(|(_, g)| g.subject())
    }

    fn hello(
        &mut self,
        peer: PeerId,
        h: Hello,
        signature: Option<&Result<(), ProofError>>,
        grants: Option<Result<Grants, AuthError>>,
    ) {
        let authenticated = grants.unwrap_or_else(|| self.auth.authenticate(&h.token));
        // The token first: it is cheaper to check than a signature.
        let authenticated = match authenticated {
            Ok(grants) => self
                .check_proof(peer, &h, signature)
                .map(|()| grants)
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match authenticated {
            Ok(grants) => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.state = PeerState::Ready {
                        replica: h.replica,
                        grants,
                    };
                }
                let max_frame = u32::try_from(self.config.max_frame).unwrap_or(u32::MAX);
                self.send(
                    peer,
                    Message::Welcome(Box::new(Welcome {
                        server: self.config.replica,
                        peer,
                        max_frame,
                    })),
                );
            }
            Err(e) => self.fail(peer, ErrorCode::Unauthorized, e, None),
        }
    }

    /// Route a database message, loading the database first if needed.
    fn with_db(&mut self, peer: PeerId, db: DbName, msg: Message) {
        if self.loading.contains_key(&db) {
            if !self.enqueue(peer, &msg) {
                self.overloaded_while_loading(peer, db);
            } else {
                self.joining(peer, &db, &msg);
                if let Some(queue) = self.loading.get_mut(&db) {
                    queue.push((peer, msg));
                }
            }
        } else if self.dbs.contains_key(&db) {
            self.db_message(peer, msg);
        } else {
            let needed = match &msg {
                Message::Push(_) => Right::Write,
                _ => Right::Read,
            };
            // Refuse before loading anything for a peer without rights.
            if !self
                .grants(peer)
                .is_some_and(|(_, g)| g.allows(db.as_str(), needed))
            {
                self.db_message(peer, msg);
                return;
            }
            if !self.enqueue(peer, &msg) {
                self.overloaded_while_loading(peer, db);
                return;
            }
            self.joining(peer, &db, &msg);
            self.loading.insert(db.clone(), vec![(peer, msg)]);
            self.out.push(ServerOutput::Load { db });
        }
    }

    /// Whether `peer` may subscribe to `db`: already subscribed or joining
    /// (a resubscribe), or under [`ServerConfig::max_subscriptions_per_peer`].
    /// Checked before anything is loaded.
    fn may_join(&mut self, peer: PeerId, db: &DbName) -> bool {
        let max = self.config.max_subscriptions_per_peer;
        let Some(p) = self.peers.get(&peer) else {
            return false;
        };
        if p.subs.contains(db) || p.joining.contains(db) || p.subs.len() + p.joining.len() < max {
            return true;
        }
        self.fail(
            peer,
            ErrorCode::TooLarge,
            format!(
                "more than {max} databases subscribed on one connection; unsubscribe from one first"
            ),
            Some(db.clone()),
        );
        false
    }

    /// Count a Subscribe waiting for its database to load.
    fn joining(&mut self, peer: PeerId, db: &DbName, msg: &Message) {
        if matches!(msg, Message::Subscribe(_))
            && let Some(p) = self.peers.get_mut(&peer)
        {
            p.joining.insert(db.clone());
        }
    }

    fn overloaded_while_loading(&mut self, peer: PeerId, db: DbName) {
        self.fail(
            peer,
            ErrorCode::Overloaded,
            "too many bytes of messages waiting for databases to load",
            Some(db),
        );
    }

    fn db_message(&mut self, peer: PeerId, msg: Message) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        let db = match &msg {
            Message::Subscribe(s) => Some(&s.db),
            Message::Unsubscribe { db } => Some(db),
            Message::Push(p) => Some(&p.db),
            Message::Presence(p) => Some(&p.db),
            _ => None,
        };
        if let Some(d) = db.and_then(|db| self.dbs.get_mut(db)) {
            self.uses += 1;
            d.last_used = self.uses;
        }
        match msg {
            Message::Subscribe(s) => self.subscribe(peer, *s),
            Message::Unsubscribe { db } => {
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.subs.remove(&db);
                }
                self.leave(peer, &db);
            }
            Message::Push(p) => self.push(peer, *p),
            Message::Presence(p) => self.presence(peer, *p),
            _ => {}
        }
    }

    fn check(&mut self, peer: PeerId, db: &DbName, right: Right) -> Option<ReplicaId> {
        let (replica, grants) = self.grants(peer)?;
        if grants.allows(db.as_str(), right) {
            Some(replica)
        } else {
            self.fail(
                peer,
                ErrorCode::Forbidden,
                format!("this token may not {} database {db}", right.as_str()),
                Some(db.clone()),
            );
            None
        }
    }

    fn subscribe(&mut self, peer: PeerId, s: Subscribe) {
        if let Some(p) = self.peers.get_mut(&peer) {
            p.joining.remove(&s.db);
        }
        let Some(replica) = self.check(peer, &s.db, Right::Read) else {
            return;
        };
        let budget = self
            .config
            .reply_part_bytes
            .clamp(1, self.config.max_frame / 2);
        let Some(d) = self.dbs.get_mut(&s.db) else {
            return;
        };
        // A client naming the horizon omitted every counter at or below it.
        let mut s = s;
        match s.horizon.map(|h| d.log.horizon(&h)) {
            Some(Some(horizon)) => s.since.merge(&horizon),
            Some(None) => {
                self.fail(
                    peer,
                    ErrorCode::UnknownHorizon,
                    "this server's pruned horizon is another; subscribe with the whole version vector",
                    Some(s.db.clone()),
                );
                return;
            }
            None => {}
        }
        // Tell a subscriber holding a large horizon what it is, once, so
        // its next Subscribe can name it instead of sending it.
        let announce =
            s.horizon != Some(d.log.base_digest()) && d.log.base().len() >= HORIZON_REPLICAS;
        let missing = d.log.missing_since(&s.since, announce);
        let views = if self.config.serve_views {
            fresh_views_for(&d.log, &d.views, &missing, budget / 2)
        } else {
            HashMap::new()
        };
        let reply = Reply::new(
            s.db.clone(),
            s.req,
            reply_vv(d.log.vv(), &s.since, replica),
            budget,
            missing,
            views,
        );
        let newly = d.subscribers.insert(peer);
        if newly {
            d.presence.insert(peer, (replica, None));
        }
        let online =
            (d.subscribers.len() as u32).saturating_add(remote_online(&self.remote, &s.db));
        // Peers that published a state; the rest are only counted, so a
        // join costs O(peers with state), not O(subscribers).
        let mut peers = with_state(&d.presence);
        for node in self.remote.get(&s.db).into_iter().flat_map(|m| m.values()) {
            peers.extend(node.peers.iter().map(|(&p, (r, st))| PeerPresence {
                peer: p,
                replica: *r,
                left: false,
                state: Some(st.clone()),
            }));
        }
        let full = PresenceUpdate {
            db: s.db.clone(),
            full: true,
            online,
            peers,
        };
        if let Some(p) = self.peers.get_mut(&peer) {
            p.subs.insert(s.db.clone());
        }
        self.out.push(ServerOutput::Reply {
            peer,
            reply: Box::new(reply),
        });
        for part in presence_parts(full, self.config.max_frame / 2) {
            self.send(peer, Message::PresenceUpdate(Box::new(part)));
        }
        if newly {
            if let Some(d) = self.dbs.get_mut(&s.db) {
                d.presence_fresh.push((peer, online));
            }
            // A peer without a state yet changes only the online count.
            self.presence_change(&s.db, None);
        }
    }

    fn leave(&mut self, peer: PeerId, db: &DbName) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        if !d.subscribers.remove(&peer) {
            return;
        }
        let had = d.presence.remove(&peer);
        let leave = had.and_then(|(replica, state)| {
            state.map(|_| PeerPresence {
                peer,
                replica,
                left: true,
                state: None,
            })
        });
        self.presence_change(db, leave);
    }

    fn push(&mut self, peer: PeerId, p: Push) {
        let Some(replica) = self.check(peer, &p.db, Right::Write) else {
            return;
        };
        if !self
            .peers
            .get(&peer)
            .is_some_and(|x| x.subs.contains(&p.db))
        {
            self.fail(
                peer,
                ErrorCode::NotSubscribed,
                "subscribe before pushing",
                Some(p.db),
            );
            return;
        }
        if self.pending_bytes > self.config.max_pending_bytes {
            // `Internal`, not `Overloaded` (which closes the connection):
            // nothing was stored, and a client sends its unacknowledged
            // pushes again at its next heartbeat.
            self.fail(
                peer,
                ErrorCode::Internal,
                "the server's disk is behind; nothing of this push was stored, push again in a moment",
                Some(p.db),
            );
            return;
        }
        if self.storage_full {
            self.fail(
                peer,
                ErrorCode::TooLarge,
                "the server's storage is at its quota; nothing of this push was stored",
                Some(p.db),
            );
            return;
        }
        if let Some(d) = self.dbs.get(&p.db) {
            let pending: usize = d.pending.iter().map(|b| b.bytes).sum();
            let held = d.log.entry_bytes() + d.log.snapshot_bytes() + pending;
            if held >= self.config.max_database_bytes {
                let quota = self.config.max_database_bytes;
                self.fail(
                    peer,
                    ErrorCode::TooLarge,
                    format!(
                        "database {} holds {held} bytes, its quota is {quota}; \
                         nothing of this push was stored",
                        p.db
                    ),
                    Some(p.db),
                );
                return;
            }
        }
        if p.entries.len() > self.config.max_entries_per_push {
            self.fail(
                peer,
                ErrorCode::TooLarge,
                format!(
                    "{} entries in one push; the limit is {}",
                    p.entries.len(),
                    self.config.max_entries_per_push
                ),
                Some(p.db),
            );
            return;
        }
        // Resends of held dots are dropped by their bytes before anything
        // is parsed; only what is new (or a resend in other bytes) goes to
        // the validation job, off the hub when validation is deferred. In a
        // push over 64 KiB every resend goes to the job, which compares the
        // bytes there (the hub only takes a reference to the held entry).
        let Some(d) = self.dbs.get(&p.db) else {
            return;
        };
        const COMPARE_INLINE: usize = 64 << 10;
        let compare_inline =
            p.entries.iter().map(|e| e.change.len()).sum::<usize>() <= COMPARE_INLINE;
        let have = d.accepted.get(&replica);
        let mut new = Vec::new();
        let mut resent = Vec::new();
        let mut gap = None;
        for e in p.entries {
            let problem = if e.dot.replica != replica {
                Some("entry is not the sender's own (dot replica differs)")
            } else if e.dot.counter == 0 {
                Some("counters start at 1")
            } else {
                None
            };
            if let Some(problem) = problem {
                self.fail(peer, ErrorCode::InvalidChange, problem, Some(p.db));
                return;
            }
            if e.dot.counter > have {
                // Consecutive from `have + 1`; what follows a gap is not
                // parsed (the sender resubscribes on `OutOfOrder`).
                let expected = have + 1 + new.len() as u64;
                if gap.is_none() && e.dot.counter != expected {
                    gap = Some((expected, e.dot.counter));
                }
                if gap.is_none() {
                    new.push(e);
                }
                continue;
            }
            if compare_inline {
                match held(d, &e) {
                    Some(h) if same_bytes(h, &e) => {}
                    Some(h) => resent.push((Arc::new(h.clone()), e)),
                    None => {} // compacted away: nothing to compare with
                }
            } else if let Some(h) = held_shared(d, &e) {
                resent.push((h, e));
            }
        }
        let mut known: HashMap<DocId, BTreeSet<ReplicaId>> = HashMap::new();
        for e in &new {
            known.entry(e.doc.clone()).or_insert_with(|| {
                let clock = d.log.doc_clock(&e.doc);
                clock
                    .map(|c| c.iter().map(|(r, _)| *r).collect())
                    .unwrap_or_default()
            });
        }
        // What was accepted since the database loaded is in `seqs` (held
        // or pending); what came with the load, in the log.
        let mut own_seq = HashMap::new();
        let mut own_last = HashMap::new();
        for (doc, set) in known.iter_mut() {
            let accepted = d.seqs.get(doc);
            set.extend(accepted.iter().flat_map(|m| m.keys().copied()));
            if let Some(seq) = accepted.and_then(|m| m.get(&replica)) {
                own_seq.insert(doc.clone(), *seq);
                continue;
            }
            let latest = d.log.doc_clock(doc).map_or(0, |c| c.get(&replica));
            let dot = crate::clock::Dot {
                replica,
                counter: latest,
            };
            if let Some(e) = d.log.get(&dot).filter(|_| latest > 0) {
                own_last.insert(doc.clone(), e.clone());
            }
        }
        if let Some(refusal) = self.reserve_creation(peer, &p.db) {
            self.fail(peer, ErrorCode::TooLarge, refusal, Some(p.db));
            return;
        }
        let mut job = ValidateJob {
            db: p.db,
            new,
            resent,
            known,
            own_seq,
            own_last,
            gap,
            limits: self.config.change_limits,
            max_inflated: self.config.max_push_inflated,
            summaries: None,
        };
        if self.config.defer_validation && !job.is_cheap() {
            if let Some(p) = self.peers.get_mut(&peer) {
                p.waiting = Some(VecDeque::new());
            }
            if let Some(d) = self.dbs.get_mut(&job.db) {
                d.validating += 1;
            }
            self.out.push(ServerOutput::Validate {
                peer,
                job: Box::new(job),
            });
        } else {
            let v = job.run();
            let db = v.db.clone();
            match v.result {
                Ok(()) => self.accept(peer, v.db, v.entries, v.seqs, v.gap),
                Err(problem) => self.fail(peer, refusal_code(&problem), problem, Some(v.db)),
            }
            self.release_creation(&db);
        }
    }

    /// Count a push that creates `db` against the quotas its name matches,
    /// or say why it may not create it. Databases that hold something, and
    /// pushes from a peer with `Admin` on `db`, pass.
    fn reserve_creation(&mut self, peer: PeerId, db: &DbName) -> Option<String> {
        let admin = self
            .grants(peer)
            .is_some_and(|(_, g)| g.allows(db.as_str(), Right::Admin));
        let d = self.dbs.get_mut(db)?;
        if d.counted || !d.accepted.is_empty() {
            return None;
        }
        let quotas = &self.config.database_quotas;
        let matching: Vec<usize> = quotas_of(quotas, db).collect();
        if matching.is_empty() {
            return None;
        }
        if !admin
            && let Some(&i) = matching
                .iter()
                .find(|&&i| self.created[i] >= quotas[i].max_databases)
        {
            return Some(format!(
                "{} databases matching {:?} exist, the most this server allows; \
                 {db} was not created",
                self.created[i], quotas[i].pattern
            ));
        }
        for i in matching {
            self.created[i] += 1;
        }
        d.counted = true;
        None
    }

    /// A push that was creating `db` stored nothing, and none is still
    /// being validated: it no longer counts against the quotas.
    fn release_creation(&mut self, db: &DbName) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        if !d.counted || d.validating > 0 || !d.accepted.is_empty() {
            return;
        }
        d.counted = false;
        for i in quotas_of(&self.config.database_quotas, db) {
            self.created[i] = self.created[i].saturating_sub(1);
        }
    }

    /// Queue validated entries for the store; acknowledge a push that
    /// held nothing new.
    fn accept(
        &mut self,
        peer: PeerId,
        db: DbName,
        entries: Vec<Entry>,
        seqs: Vec<u64>,
        mut gap: Option<(u64, u64)>,
    ) {
        let Some(replica) = self.grants(peer).map(|(r, _)| r) else {
            return;
        };
        let limits = self.config.change_limits;
        let Some(d) = self.dbs.get_mut(&db) else {
            return;
        };
        let mut accepted = Vec::new();
        for (e, seq) in entries.into_iter().zip(seqs) {
            let have = d.accepted.get(&replica);
            if e.dot.counter <= have {
                // Held meanwhile (another connection under this replica
                // id): a resend is acknowledged again; a different change
                // under a held dot means two writers use one replica id.
                // Acking it would tell its sender it is stored when it
                // was dropped.
                if held(d, &e).is_some_and(|h| !same_change(h, &e, &limits)) {
                    let problem = conflict_message(e.dot.counter);
                    self.fail(peer, ErrorCode::InvalidChange, problem, Some(db));
                    return;
                }
                continue; // duplicate
            }
            if e.dot.counter != have + 1 {
                gap = Some((have + 1, e.dot.counter));
                break;
            }
            d.accepted.set(replica, e.dot.counter);
            d.seqs
                .entry(e.doc.clone())
                .or_default()
                .insert(replica, seq);
            accepted.push(e);
        }
        if accepted.is_empty() {
            let vv = own_counter(d.log.vv(), replica);
            if gap.is_none() {
                self.send(peer, Message::Ack(Box::new(Ack { db: db.clone(), vv })));
            }
        } else {
            let seq = d.next_seq;
            d.next_seq += 1;
            let bytes = accepted.iter().map(|e| e.change.len()).sum();
            self.pending_bytes += bytes;
            d.pending.push_back(PendingBatch {
                seq,
                origin: peer,
                entries: accepted.clone(),
                bytes,
            });
            self.out.push(ServerOutput::Persist {
                db: db.clone(),
                seq,
                batch: Batch::entries(accepted),
            });
        }
        if let Some((expected, got)) = gap {
            self.fail(
                peer,
                ErrorCode::OutOfOrder,
                format!("expected counter {expected}, got {got}; resubscribe and push again"),
                Some(db),
            );
        }
    }

    fn presence(&mut self, peer: PeerId, p: Presence) {
        let Some(replica) = self.check(peer, &p.db, Right::Read) else {
            return;
        };
        let Some(d) = self.dbs.get_mut(&p.db) else {
            return;
        };
        if !d.subscribers.contains(&peer) {
            self.fail(
                peer,
                ErrorCode::NotSubscribed,
                "subscribe before publishing presence",
                Some(p.db),
            );
            return;
        }
        let max = self.config.max_presence_bytes;
        if p.state.len() > max {
            self.fail(
                peer,
                ErrorCode::TooLarge,
                format!(
                    "a presence state of {} bytes; the limit is {max}",
                    p.state.len()
                ),
                Some(p.db),
            );
            return;
        }
        let state = (!p.state.is_empty()).then_some(p.state);
        d.presence.insert(peer, (replica, state));
        // Over its rate, the peer's latest state waits for the next tick:
        // a flood costs every subscriber one update a tick, not one a
        // message.
        let Some(sender) = self.peers.get_mut(&peer) else {
            return;
        };
        if sender.presence_used >= self.config.presence_per_tick {
            self.presence_later.insert((p.db, peer));
            return;
        }
        sender.presence_used += 1;
        self.announce_presence(&p.db, peer);
    }

    /// Queue `peer`'s current presence in `db` for every subscriber.
    fn announce_presence(&mut self, db: &DbName, peer: PeerId) {
        let Some((replica, state)) = self.dbs.get(db).and_then(|d| d.presence.get(&peer)) else {
            return;
        };
        let change = PeerPresence {
            peer,
            replica: *replica,
            // A cleared state takes the peer off the list (it stays counted).
            left: state.is_none(),
            state: state.clone(),
        };
        self.presence_change(db, Some(change));
    }

    /// Queue the news that a peer published or cleared its state, or left
    /// (`None`: only the online count changed); every subscriber hears it at
    /// the next `take_outputs`.
    fn presence_change(&mut self, db: &DbName, who: Option<PeerPresence>) {
        let share = self.config.share_presence;
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        if let Some(who) = who {
            if share {
                d.presence_local.retain(|p| p.peer != who.peer);
                d.presence_local.push(who.clone());
            }
            d.presence_pending.retain(|p| p.peer != who.peer);
            d.presence_pending.push(who);
        }
        self.presence_dirty.insert(db.clone());
    }

    /// Cluster mode: another node's presence in `update.db` (its peers,
    /// its online count), heard at `now_ms`. Local subscribers hear the
    /// changes with the next announcement; a later subscriber gets them in
    /// its full list. Kept while the database is not loaded here too.
    pub fn remote_presence(&mut self, node: &str, update: PresenceUpdate, now_ms: u64) {
        let db = update.db.clone();
        let nodes = self.remote.entry(db.clone()).or_default();
        let r = nodes.entry(node.to_owned()).or_default();
        r.heard_ms = now_ms;
        let mut changes = Vec::new();
        if update.full {
            for (&p, (replica, _)) in &r.peers {
                if !update.peers.iter().any(|x| x.peer == p && !x.left) {
                    changes.push(PeerPresence {
                        peer: p,
                        replica: *replica,
                        left: true,
                        state: None,
                    });
                }
            }
            r.peers.clear();
        }
        for p in update.peers {
            match (&p.state, p.left) {
                (Some(state), false) => {
                    r.peers.insert(p.peer, (p.replica, state.clone()));
                }
                _ => {
                    r.peers.remove(&p.peer);
                }
            }
            changes.push(p);
        }
        r.online = update.online;
        self.remote_changes(&db, changes);
    }

    /// Cluster mode: forget nodes not heard from since `before_ms` (a
    /// node that died cannot say its peers left).
    pub fn expire_remote_presence(&mut self, before_ms: u64) {
        let mut gone: Vec<(DbName, Vec<PeerPresence>)> = Vec::new();
        for (db, nodes) in &mut self.remote {
            let mut changes = Vec::new();
            nodes.retain(|_, r| {
                if r.heard_ms >= before_ms {
                    return true;
                }
                changes.extend(r.peers.iter().map(|(&p, (replica, _))| PeerPresence {
                    peer: p,
                    replica: *replica,
                    left: true,
                    state: None,
                }));
                false
            });
            if !changes.is_empty() || nodes.is_empty() {
                gone.push((db.clone(), changes));
            }
        }
        for (db, changes) in gone {
            if self.remote.get(&db).is_some_and(BTreeMap::is_empty) {
                self.remote.remove(&db);
            }
            self.remote_changes(&db, changes);
        }
    }

    /// Cluster mode: a full [`ServerOutput::SharePresence`] of every loaded
    /// database with subscribers here (the adapter calls it every few
    /// seconds: a node that joined, or lost an update, catches up, and the
    /// others know this node is alive).
    pub fn share_presence_full(&mut self) {
        if !self.config.share_presence {
            return;
        }
        let budget = self.config.max_frame / 2;
        let mut out = Vec::new();
        for (db, d) in &mut self.dbs {
            if d.subscribers.is_empty() && d.online_shared == 0 {
                continue;
            }
            d.online_shared = d.subscribers.len() as u32;
            let update = PresenceUpdate {
                db: db.clone(),
                full: true,
                online: d.online_shared,
                peers: with_state(&d.presence),
            };
            out.extend(
                presence_parts(update, budget)
                    .into_iter()
                    .enumerate()
                    // Parts after the first are changes on top of it.
                    .map(|(i, mut update)| {
                        update.full = i == 0;
                        ServerOutput::SharePresence { update }
                    }),
            );
        }
        self.out.extend(out);
    }

    /// Remote presence changes for local subscribers (not shared again).
    fn remote_changes(&mut self, db: &DbName, changes: Vec<PeerPresence>) {
        let Some(d) = self.dbs.get_mut(db) else {
            return;
        };
        for who in changes {
            d.presence_pending.retain(|p| p.peer != who.peer);
            d.presence_pending.push(who);
        }
        self.presence_dirty.insert(db.clone());
    }

    fn broadcast(&mut self, peers: &[PeerId], msg: &Message) {
        if peers.is_empty() {
            return;
        }
        let (entries, views) = match msg {
            Message::Delta(d) => (d.entries.len(), d.views.len()),
            _ => (0, 0),
        };
        let frame = Arc::new(protocol::encode(msg));
        self.out_bytes += frame.len();
        self.out.push(ServerOutput::Broadcast {
            peers: peers.to_vec(),
            frame,
            entries,
            views,
        });
    }

    fn broadcast_live(
        &mut self,
        db: &DbName,
        peers: &[PeerId],
        entries: Vec<Entry>,
        vv: &VersionVector,
    ) {
        if peers.is_empty() || entries.is_empty() {
            return;
        }
        let budget = self.config.max_frame / 2;
        // Only the replicas these entries come from: a live update's size
        // does not grow with every replica the database has seen.
        let mut changed = VersionVector::new();
        for e in &entries {
            changed.set(e.dot.replica, vv.get(&e.dot.replica));
        }
        let missing = Missing::from_entries(entries);
        let mut reply = Reply::new(db.clone(), 0, changed, budget, missing, HashMap::new());
        while let Some(part) = reply.next_part() {
            self.broadcast(peers, &Message::Delta(Box::new(part)));
        }
    }
}

/// A reply's vector: what `vv` holds beyond `since`, and the subscriber's
/// own counter (its acknowledgement). A receiver holding `since` plus the
/// reply holds `vv` exactly when it dominates this, and a resume costs
/// O(replicas that wrote since), not O(replicas ever).
fn reply_vv(vv: &VersionVector, since: &VersionVector, replica: ReplicaId) -> VersionVector {
    let mut out = own_counter(vv, replica);
    for (r, &c) in vv.iter() {
        if c > since.get(r) {
            out.set(*r, c);
        }
    }
    out
}

/// An Ack's vector: `replica`'s counter in `vv`, alone.
fn own_counter(vv: &VersionVector, replica: ReplicaId) -> VersionVector {
    let mut own = VersionVector::new();
    let counter = vv.get(&replica);
    if counter > 0 {
        own.set(replica, counter);
    }
    own
}

/// Documents with entries only (no snapshot) whose view is missing or older
/// than their clock.
/// `update` cut into updates of about `budget` bytes of states each (a
/// thousand peers with large states would not fit one frame, and nobody
/// could join): the first keeps `full`, the rest are changes on top of it.
fn presence_parts(update: PresenceUpdate, budget: usize) -> Vec<PresenceUpdate> {
    // A peer's id, replica and flags, archived.
    const PEER_OVERHEAD: usize = 48;
    let part = |full| PresenceUpdate {
        db: update.db.clone(),
        full,
        online: update.online,
        peers: Vec::new(),
    };
    let mut parts = Vec::new();
    let mut current = part(update.full);
    let mut bytes = 0usize;
    for p in update.peers {
        let n = p.state.as_ref().map_or(0, Vec::len) + PEER_OVERHEAD;
        if !current.peers.is_empty() && bytes + n > budget {
            parts.push(std::mem::replace(&mut current, part(false)));
            bytes = 0;
        }
        bytes += n;
        current.peers.push(p);
    }
    parts.push(current);
    parts
}

/// What a loaded database costs in memory, roughly: its changes,
/// snapshots and views, and two kilobytes for its maps (so a million empty
/// databases count too).
fn held_bytes(d: &ServerDb) -> usize {
    let snapshots: usize = d.log.snapshots().map(|s| s.bytes.len()).sum();
    let views: usize = d
        .views
        .values()
        .map(|v| v.json.as_ref().map_or(0, String::len))
        .sum();
    EMPTY_DATABASE_BYTES + d.log.entry_bytes() + snapshots + views
}

/// What a loaded database with nothing in it counts as in
/// [`Server::loaded_bytes`]: about 1.5 KB in `Server` (measured with
/// 100,000 of them) and some more in an adapter's maps.
pub const EMPTY_DATABASE_BYTES: usize = 2048;

fn stale_docs(d: &ServerDb) -> impl Iterator<Item = &DocId> {
    d.log.doc_clocks().iter().filter_map(|(doc, clock)| {
        let fresh = d.views.get(doc).is_some_and(|v| &v.clock == clock)
            || d.views_failed.get(doc) == Some(clock);
        (!fresh && d.log.snapshot(doc).is_none()).then_some(doc)
    })
}

/// The current views of the documents whose whole history is in `entries`,
/// leaving out views over `max_len` (a view rides with an entry in one
/// part; both together must stay under the frame limit).
fn fresh_views_for(
    log: &Log,
    views: &HashMap<DocId, Arc<DocView>>,
    missing: &Missing,
    max_len: usize,
) -> HashMap<DocId, Arc<DocView>> {
    if views.is_empty() {
        return HashMap::new();
    }
    let fresh = |doc: &DocId, v: &DocView| {
        v.encoded_len() <= max_len && log.doc_clock(doc) == Some(&v.clock)
    };
    if missing.lacks_all_entries() {
        // A cold sync: every document without a snapshot comes whole, so
        // look at the views, not at every entry.
        return views
            .iter()
            .filter(|(doc, v)| log.is_whole_history(doc, log.doc_entry_count(doc)) && fresh(doc, v))
            .map(|(doc, v)| (doc.clone(), v.clone()))
            .collect();
    }
    let mut counts: HashMap<&DocId, u32> = HashMap::new();
    for e in missing.entries() {
        *counts.entry(&e.doc).or_default() += 1;
    }
    counts
        .into_iter()
        .filter(|(doc, n)| log.is_whole_history(doc, *n))
        .filter_map(|(doc, _)| {
            let v = views.get(doc)?;
            fresh(doc, v).then(|| (doc.clone(), v.clone()))
        })
        .collect()
}
