//! The client side: a replica's databases and its connection to one server.
//!
//! The client works offline: edits apply locally at once and are persisted
//! through [`ClientOutput::Persist`]; once the adapter reports them durable
//! ([`Client::persisted`]) they are pushed whenever a connection is up.
//! Pushing only durable entries means a crash can never make a replica reuse
//! a counter the server has already seen.

mod tabs;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use automerge::TextEncoding;
use serde_json::Value as Json;

use crate::clock::VersionVector;
use crate::database::{Applied, ApplyError, Database};
use crate::doc::{DocError, PathSeg};
use crate::entry::{Entry, Snapshot};
use crate::identity::Proof;
use crate::ids::{DbName, DocId, ReplicaId};
use crate::protocol::{
    self, DEFAULT_MAX_FRAME, Delta, ErrorCode, ErrorMsg, HORIZON_REPLICAS, Hello, Message,
    Presence, PresenceUpdate, Push, Subscribe,
};
use crate::store::{Batch, StoredDatabase};
use crate::view::DocView;

/// Client settings.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Largest frame sent or accepted.
    pub max_frame: usize,
    /// Most entries in one `Push` (the server's limit).
    pub max_entries_per_push: usize,
    /// How text positions are counted (`Utf16CodeUnit` in browsers).
    pub encoding: TextEncoding,
    /// Attach to [`ClientOutput::Persist`] the cached JSON views of the
    /// documents changed ([`crate::view`]; refreshed every
    /// [`VIEW_REFRESH_ENTRIES`] entries and by [`Client::take_views`]), for
    /// stores that keep them so a reopen need not load every document into
    /// automerge.
    pub keep_views: bool,
    /// With `keep_views`: entries persisted between view refreshes
    /// ([`VIEW_REFRESH_ENTRIES`] by default).
    pub view_refresh_entries: usize,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            max_frame: DEFAULT_MAX_FRAME,
            max_entries_per_push: 10_000,
            encoding: TextEncoding::UnicodeCodePoint,
            keep_views: false,
            view_refresh_entries: VIEW_REFRESH_ENTRIES,
        }
    }
}

/// Connection status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// No connection.
    Offline,
    /// Connected, handshake in progress.
    Connecting,
    /// Handshake done.
    Online,
}

/// Something the application may want to know.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientEvent {
    /// Connection status changed.
    Status(Status),
    /// Documents changed (locally or from the server).
    Changed {
        /// The database.
        db: DbName,
        /// The documents.
        docs: Vec<DocId>,
        /// Whether the change came from elsewhere.
        remote: bool,
    },
    /// The server made this replica's entries up to `counter` durable.
    Acked {
        /// The database.
        db: DbName,
        /// Own counter acknowledged.
        counter: u64,
    },
    /// The database is in sync: the reply arrived and is durable locally,
    /// and every local change is durable on the server (so a reload, or
    /// going offline, shows everything the server had).
    Synced {
        /// The database.
        db: DbName,
    },
    /// Who is here changed.
    Presence {
        /// The database.
        db: DbName,
    },
    /// The answer to [`Client::list_databases`].
    Databases {
        /// The request number it returned.
        req: u32,
        /// The databases this token administers.
        names: Vec<DbName>,
    },
    /// The transport could not connect (the adapter says why, see
    /// [`Client::connect_failed`]). `permanent`: the adapter stops
    /// trying (a bad URL, an untrusted certificate); otherwise it retries.
    ConnectFailed {
        /// What went wrong, for people.
        message: String,
        /// Whether retrying cannot help.
        permanent: bool,
    },
    /// The server refused something, or remote data was unusable.
    Error {
        /// The database concerned.
        db: Option<DbName>,
        /// Typed code.
        code: ErrorCode,
        /// Readable text.
        message: String,
    },
}

/// What the adapter must do.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientOutput {
    /// Send this message to the server.
    Send(Message),
    /// Write durably, in `seq` order per database, then call [`Client::persisted`].
    Persist {
        /// The database.
        db: DbName,
        /// Sequence number.
        seq: u64,
        /// What to write.
        batch: Batch,
        /// Cached views of documents changed by this or earlier batches, to
        /// keep beside it (in the same atomic write where the store can);
        /// empty unless [`ClientConfig::keep_views`]. Losing them loses nothing.
        views: Vec<DocView>,
    },
    /// Tell the application.
    Event(ClientEvent),
}

/// One peer present on a database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's connection id.
    pub peer: u64,
    /// Its replica.
    pub replica: ReplicaId,
    /// Its published state.
    pub state: Option<Vec<u8>>,
}

/// Presence on one database.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PresenceView {
    /// Peers subscribed (with their state, if they published one).
    pub peers: Vec<PeerInfo>,
    /// Connections subscribed right now, this one included.
    pub online: u32,
}

/// Why a local operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The database was not opened.
    #[error("database {0} is not open")]
    NotOpen(DbName),
    /// The document operation failed.
    #[error(transparent)]
    Doc(#[from] DocError),
    /// A presence state over the protocol's limit (the server would drop
    /// the connection for it).
    #[error("presence state of {len} bytes is over the {max}-byte limit")]
    PresenceTooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
}

#[derive(Debug)]
enum Sync {
    /// Not subscribed on this connection.
    Idle,
    /// `Subscribe` sent; collecting the reply's parts.
    Awaiting {
        req: u32,
        parts: BTreeSet<u32>,
        last: Option<u32>,
        base: VersionVector,
        snapshots: Vec<Snapshot>,
        vv: VersionVector,
    },
    /// Reply complete; live updates flow; own entries up to `pushed` were sent.
    Live { pushed: u64 },
}

#[derive(Debug)]
struct ClientDb {
    db: Database,
    wanted: bool,
    sync: Sync,
    /// Own counter the server has made durable.
    acked: u64,
    /// Own counter durable locally.
    local_durable: u64,
    /// Persist batches not yet durable: (seq, highest own counter inside).
    unpersisted: VecDeque<(u64, u64)>,
    next_seq: u64,
    presence: Option<Vec<u8>>,
    peers: BTreeMap<u64, (ReplicaId, Option<Vec<u8>>)>,
    online: u32,
    synced: bool,
    /// Own counter of an entry too large for the server's frame limit,
    /// once reported (so it is reported once per connection).
    too_large: Option<u64>,
    /// With [`ClientConfig::keep_views`]: documents changed since their
    /// view was last handed out, and how many entries were persisted since.
    views_dirty: BTreeSet<DocId>,
    entries_since_views: usize,
    /// The last persist batch of the finished reply, and the highest batch
    /// made durable: `Synced` waits for the reply itself to be durable, not
    /// for every later live batch (which could keep the queue busy forever).
    reply_seq: u64,
    persisted_seq: u64,
    /// Our version vector when we last subscribed again because the server
    /// held something we still lacked. Asking again without having gained
    /// anything (an entry we cannot apply) would loop; we stop and report.
    resubscribed_at: Option<VersionVector>,
    /// The server refused our pushes as building on another replica's
    /// changes it lacks (`MissingDependency`: another tab's, not pushed
    /// yet); they go again once the server relays new entries of others,
    /// at the next heartbeat, or on the next connection.
    awaiting_others: bool,
    /// The digest of our horizon the server answered `UnknownHorizon` to:
    /// not named again (the whole vector goes) until a reply installs
    /// another horizon.
    refused_horizon: Option<[u8; 16]>,
    /// The server failed to load the database for our Subscribe
    /// (`Internal`: its store or engine failed): subscribe again at the
    /// next heartbeat.
    retry_subscribe: bool,
}

/// Default of [`ClientConfig::view_refresh_entries`]: entries persisted
/// after which the views of the documents they touched ride along with the
/// next batch. Refreshing a view serialises the whole
/// document, so it is not done on every keystroke; a document changed
/// since its last view loads from the log on reopen (correct, only slower)
/// unless [`Client::take_views`] flushed it first (the adapters do on close).
pub const VIEW_REFRESH_ENTRIES: usize = 64;

/// How long nothing must have arrived before an adapter calls
/// [`Client::catch_up`]: longer than the gaps of a live stream, so the
/// catch-up runs in its pauses rather than delaying its next change.
pub const CATCH_UP_IDLE_MS: u64 = 250;

/// How many changes one [`Client::catch_up`] call is asked to apply: a few
/// milliseconds of automerge's time, so a change that arrives meanwhile
/// waits little.
pub const CATCH_UP_STEP: usize = 256;

/// A live update (not part of a reply): safe to merge with its neighbours.
fn is_live(d: &Delta) -> bool {
    d.req == 0 && d.snapshots.is_empty() && d.base.is_empty()
}

/// Room a push frame needs besides its one entry (header, names, archive).
const PUSH_OVERHEAD: usize = 1024;

/// A replica's sans-IO client.
#[derive(Debug)]
pub struct Client {
    replica: ReplicaId,
    token: String,
    config: ClientConfig,
    status: Status,
    dbs: BTreeMap<DbName, ClientDb>,
    next_req: u32,
    /// The frame limit the server announced in `Welcome`.
    server_max_frame: usize,
    /// Liveness ([`Client::heartbeat`]): a Ping is out, and whether any
    /// frame has arrived since it was sent.
    probe_out: bool,
    heard: bool,
    next_nonce: u64,
    out: Vec<ClientOutput>,
}

impl Client {
    /// A client for `replica` that presents `token`.
    pub fn new(replica: ReplicaId, token: impl Into<String>, config: ClientConfig) -> Self {
        Client {
            replica,
            token: token.into(),
            config,
            status: Status::Offline,
            dbs: BTreeMap::new(),
            next_req: 1,
            server_max_frame: DEFAULT_MAX_FRAME,
            probe_out: false,
            heard: false,
            next_nonce: 1,
            out: Vec::new(),
        }
    }

    /// Liveness probe: call every few tens of seconds while a transport is
    /// open. Sends a `Ping`; returns `false` when nothing at all has arrived
    /// since the previous call's `Ping` — the connection is dead (a laptop
    /// that slept, a NAT that forgot it) even if the transport has not
    /// noticed, and the adapter should drop it and reconnect.
    pub fn heartbeat(&mut self) -> bool {
        if self.status == Status::Offline {
            return true;
        }
        if self.probe_out && !self.heard {
            return false;
        }
        self.probe_out = true;
        self.heard = false;
        let nonce = self.next_nonce;
        self.next_nonce = self.next_nonce.wrapping_add(1);
        self.send(Message::Ping { nonce });
        // Also the retry tick for pushes the server failed to store, and
        // for those it refused as building on what it lacked (the relay that
        // would have retried them may have come before the refusal).
        // And for Subscribes the server could not load the database for.
        let names: Vec<DbName> = self.dbs.keys().cloned().collect();
        for name in names {
            let mut again = false;
            if let Some(c) = self.dbs.get_mut(&name) {
                c.awaiting_others = false;
                again = std::mem::take(&mut c.retry_subscribe)
                    && c.wanted
                    && matches!(c.sync, Sync::Awaiting { .. });
            }
            if again && self.status == Status::Online {
                self.send_subscribe(&name);
            } else {
                self.push(&name);
            }
        }
        true
    }

    /// The largest frame accepted from the server: our own limit, or the
    /// server's announced one (plus room for a fanned-out push's envelope)
    /// when larger — refusing what the server may legitimately send would
    /// drop every connection at the same frame.
    fn frame_limit(&self) -> usize {
        let server = self.server_max_frame;
        self.config.max_frame.max(server.saturating_add(server / 4))
    }

    /// This replica's id.
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    /// Connection status.
    pub fn status(&self) -> Status {
        self.status
    }

    /// Drain the outbox.
    pub fn take_outputs(&mut self) -> Vec<ClientOutput> {
        std::mem::take(&mut self.out)
    }

    /// Open a database from what the store holds (an empty
    /// [`StoredDatabase`] for a new one) and subscribe to it.
    pub fn open(&mut self, name: DbName, stored: StoredDatabase) {
        self.open_with_views(name, stored, Vec::new());
    }

    /// [`Client::open`] with the cached views the store kept
    /// ([`Database::from_stored_with_views`]).
    pub fn open_with_views(&mut self, name: DbName, stored: StoredDatabase, views: Vec<DocView>) {
        if self.dbs.contains_key(&name) {
            return;
        }
        let (db, errors) = Database::from_stored_with_views(
            name.clone(),
            self.replica,
            self.config.encoding,
            stored,
            views,
        );
        for e in errors {
            self.apply_error(&name, e);
        }
        let own = db.own_counter();
        // Documents that had no usable view get one at the next refresh.
        let views_dirty = if self.config.keep_views {
            db.log()
                .doc_clocks()
                .keys()
                .filter(|d| !db.is_cached(d))
                .cloned()
                .collect()
        } else {
            BTreeSet::new()
        };
        self.dbs.insert(
            name.clone(),
            ClientDb {
                db,
                wanted: true,
                sync: Sync::Idle,
                acked: 0,
                local_durable: own,
                unpersisted: VecDeque::new(),
                next_seq: 1,
                presence: None,
                peers: BTreeMap::new(),
                online: 0,
                synced: false,
                too_large: None,
                views_dirty,
                entries_since_views: 0,
                reply_seq: 0,
                persisted_seq: 0,
                resubscribed_at: None,
                refused_horizon: None,
                retry_subscribe: false,
                awaiting_others: false,
            },
        );
        if self.status != Status::Offline {
            self.send_subscribe(&name);
        }
    }

    /// Stop syncing a database and forget it in memory (the store keeps it).
    pub fn close(&mut self, name: &DbName) {
        if self.dbs.remove(name).is_some() && self.status != Status::Offline {
            self.send(Message::Unsubscribe { db: name.clone() });
        }
    }

    /// An open database.
    pub fn database(&self, name: &DbName) -> Option<&Database> {
        self.dbs.get(name).map(|c| &c.db)
    }

    /// Names of the open databases.
    pub fn databases(&self) -> impl Iterator<Item = &DbName> {
        self.dbs.keys()
    }

    /// Own counter the server has made durable for `db`.
    pub fn acked(&self, db: &DbName) -> u64 {
        self.dbs.get(db).map_or(0, |c| c.acked)
    }

    /// Whether `db` is in sync (see [`ClientEvent::Synced`]).
    pub fn is_synced(&self, db: &DbName) -> bool {
        self.dbs.get(db).is_some_and(|c| c.synced)
    }

    /// The views of `db`'s documents changed since views last rode along
    /// with a batch ([`ClientConfig::keep_views`]), for the adapter to
    /// store (on close, or when idle). Empty without `keep_views`.
    pub fn take_views(&mut self, db: &DbName) -> Vec<DocView> {
        let Some(c) = self.dbs.get_mut(db) else {
            return Vec::new();
        };
        c.entries_since_views = 0;
        std::mem::take(&mut c.views_dirty)
            .iter()
            .filter_map(|d| c.db.view(d))
            .collect()
    }

    /// Who is present on `db`.
    pub fn presence(&self, db: &DbName) -> PresenceView {
        self.dbs
            .get(db)
            .map_or_else(PresenceView::default, |c| PresenceView {
                peers: c
                    .peers
                    .iter()
                    .map(|(p, (r, s))| PeerInfo {
                        peer: *p,
                        replica: *r,
                        state: s.clone(),
                    })
                    .collect(),
                online: c.online,
            })
    }

    // ---- local edits ----

    /// Make a document equal `value` with minimal changes.
    pub fn update(&mut self, db: &DbName, doc: &DocId, value: &Json) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.update(doc, value))
    }

    /// [`Client::update`] with only root keys holding collaborative text.
    pub fn update_with_text(
        &mut self,
        db: &DbName,
        doc: &DocId,
        value: &Json,
        text_keys: &[String],
    ) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.update_with_text(doc, value, text_keys))
    }

    /// [`Client::update`] saying which strings are text (see [`crate::Strings`]).
    pub fn update_with(
        &mut self,
        db: &DbName,
        doc: &DocId,
        value: &Json,
        strings: crate::Strings<'_>,
    ) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.update_with(doc, value, strings))
    }

    /// Delete a document.
    pub fn delete(&mut self, db: &DbName, doc: &DocId) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.delete(doc))
    }

    /// Splice collaborative text.
    pub fn splice_text(
        &mut self,
        db: &DbName,
        doc: &DocId,
        path: &[PathSeg],
        pos: usize,
        del: usize,
        insert: &str,
    ) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.splice_text(doc, path, pos, del, insert))
    }

    /// Add to a counter.
    pub fn increment(
        &mut self,
        db: &DbName,
        doc: &DocId,
        path: &[PathSeg],
        by: i64,
    ) -> Result<bool, ClientError> {
        self.local(db, doc, |d| d.increment(doc, path, by))
    }

    /// Publish this connection's presence state on `db` (empty clears it).
    pub fn set_presence(&mut self, db: &DbName, state: Vec<u8>) -> Result<(), ClientError> {
        if state.len() > protocol::MAX_PRESENCE_LEN {
            return Err(ClientError::PresenceTooLarge {
                len: state.len(),
                max: protocol::MAX_PRESENCE_LEN,
            });
        }
        let c = self
            .dbs
            .get_mut(db)
            .ok_or_else(|| ClientError::NotOpen(db.clone()))?;
        c.presence = Some(state.clone());
        if !matches!(c.sync, Sync::Idle) {
            self.send(Message::Presence(Box::new(Presence {
                db: db.clone(),
                state,
            })));
        }
        Ok(())
    }

    /// Hand remote changes that documents show patched to automerge, about
    /// `changes` of them (whole documents, or a long wait's oldest
    /// step, at a time): for idle time, so that a replica which stopped
    /// receiving pays now what its next write would otherwise pay
    /// ([`Database::catch_up`]). Adapters call it once
    /// nothing has arrived for [`CATCH_UP_IDLE_MS`], [`CATCH_UP_STEP`] at a
    /// time, while it returns `true` (more wait) and nothing else arrives.
    /// A change automerge refuses is reported as when it arrived, and its
    /// document announced: its value falls back to what automerge holds.
    pub fn catch_up(&mut self, changes: usize) -> bool {
        let names: Vec<DbName> = self.dbs.keys().cloned().collect();
        for name in names {
            let Some(c) = self.dbs.get_mut(&name) else {
                continue;
            };
            let (more, errors) = c.db.catch_up(changes);
            let docs: BTreeSet<DocId> = errors
                .iter()
                .filter_map(|e| match e {
                    ApplyError::Doc { doc, .. } => Some(doc.clone()),
                    _ => None,
                })
                .collect();
            for e in errors {
                self.apply_error(&name, e);
            }
            if !docs.is_empty() {
                self.event(ClientEvent::Changed {
                    db: name.clone(),
                    docs: docs.into_iter().collect(),
                    remote: true,
                });
            }
            if more {
                return true;
            }
        }
        false
    }

    /// Fold history the server has made durable into snapshots, locally.
    /// Own entries not yet acknowledged are kept (they still need pushing).
    pub fn compact(&mut self, db: &DbName) -> Result<(), ClientError> {
        let c = self
            .dbs
            .get_mut(db)
            .ok_or_else(|| ClientError::NotOpen(db.clone()))?;
        let mut up_to = c.db.vv().clone();
        up_to.set(self.replica, c.acked.min(c.local_durable));
        let compaction = c.db.compact(&up_to);
        let batch = Batch {
            entries: Vec::new(),
            snapshots: compaction.snapshots,
            base: Some(compaction.base),
        };
        self.persist(db, batch);
        Ok(())
    }

    fn local(
        &mut self,
        db: &DbName,
        doc: &DocId,
        f: impl FnOnce(&mut Database) -> Result<Option<Entry>, DocError>,
    ) -> Result<bool, ClientError> {
        let c = self
            .dbs
            .get_mut(db)
            .ok_or_else(|| ClientError::NotOpen(db.clone()))?;
        let Some(entry) = f(&mut c.db)? else {
            return Ok(false);
        };
        c.synced = false;
        self.persist(db, Batch::entries(vec![entry]));
        self.event(ClientEvent::Changed {
            db: db.clone(),
            docs: vec![doc.clone()],
            remote: false,
        });
        Ok(true)
    }

    /// Ask the server which databases exist (needs an admin token); the
    /// answer comes as [`ClientEvent::Databases`] with the returned number.
    pub fn list_databases(&mut self) -> u32 {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        self.send(Message::ListDatabases { req });
        req
    }

    // ---- connection ----

    /// The transport connected: start the handshake. Subscriptions follow
    /// `Hello` at once instead of waiting for `Welcome`, so catching up takes
    /// one round trip; the server handles a connection's messages in order,
    /// and after a refused `Hello` it ignores them.
    ///
    /// `proof` shows the server that this client owns its replica id: made
    /// fresh for every connection by [`Identity::prove`] (or by WebCrypto in
    /// the browser) for the host the adapter dialled.
    ///
    /// [`Identity::prove`]: crate::Identity::prove
    pub fn connected(&mut self, proof: Proof) {
        self.status = Status::Connecting;
        self.probe_out = false;
        self.heard = false;
        for c in self.dbs.values_mut() {
            c.resubscribed_at = None;
            c.retry_subscribe = false;
        }
        self.send(Message::Hello(Box::new(Hello {
            replica: self.replica,
            token: self.token.clone(),
            proof,
        })));
        self.event(ClientEvent::Status(Status::Connecting));
        let names: Vec<DbName> = self
            .dbs
            .iter()
            .filter(|(_, c)| c.wanted)
            .map(|(n, _)| n.clone())
            .collect();
        for n in names {
            self.send_subscribe(&n);
        }
    }

    /// Present `token` from the next connection on (a refreshed token; the
    /// adapter calls this before [`Client::connected`]).
    pub fn set_token(&mut self, token: impl Into<String>) {
        self.token = token.into();
    }

    /// The transport failed to connect: tell the application why (status
    /// stays as it is: offline).
    pub fn connect_failed(&mut self, message: impl Into<String>, permanent: bool) {
        self.event(ClientEvent::ConnectFailed {
            message: message.into(),
            permanent,
        });
    }

    /// The transport closed.
    pub fn disconnected(&mut self) {
        if self.status == Status::Offline {
            return;
        }
        self.status = Status::Offline;
        for c in self.dbs.values_mut() {
            // A new connection pushes again (resubscribing on this one does
            // not: an OutOfOrder after a refusal would loop with no wait).
            c.awaiting_others = false;
            c.sync = Sync::Idle;
            c.peers.clear();
            c.online = 0;
            c.synced = false;
            c.too_large = None;
            let waited = c.db.withdraw_offers();
            if !waited.is_empty() {
                self.out.push(ClientOutput::Event(ClientEvent::Changed {
                    db: c.db.name().clone(),
                    docs: waited,
                    remote: true,
                }));
            }
        }
        self.event(ClientEvent::Status(Status::Offline));
    }

    /// A frame arrived. A frame that does not decode is reported and
    /// returned as an error: the adapter should close the connection.
    pub fn handle_frame(&mut self, frame: &[u8]) -> Result<(), protocol::DecodeError> {
        self.handle_frames(std::iter::once(frame))
    }

    /// Several frames that arrived together, in order. Equivalent to
    /// [`Client::handle_frame`] on each, except that live deltas of one
    /// database arriving back to back are applied as one batch: automerge
    /// costs about as much to apply one change to a document as many, so a
    /// subscriber that falls behind a busy document catches up in fewer,
    /// larger applies instead of falling further behind. Adapters pass
    /// everything their transport has queued. On a frame that does not
    /// decode, what came before it is handled and the error returned.
    pub fn handle_frames<'a>(
        &mut self,
        frames: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), protocol::DecodeError> {
        let mut run: Option<Delta> = None;
        for frame in frames {
            let msg = match protocol::decode(frame, self.frame_limit()) {
                Ok(msg) => {
                    self.heard = true;
                    msg
                }
                Err(e) => {
                    if let Some(d) = run.take() {
                        self.delta(d);
                    }
                    self.event(ClientEvent::Error {
                        db: None,
                        code: ErrorCode::BadFrame,
                        message: format!("server sent a bad frame: {e}"),
                    });
                    return Err(e);
                }
            };
            match msg {
                Message::Delta(d) if is_live(&d) => match &mut run {
                    Some(r) if r.db == d.db => {
                        r.entries.extend(d.entries);
                        r.vv.merge(&d.vv);
                        r.last = d.last;
                    }
                    _ => {
                        if let Some(r) = run.replace(*d) {
                            self.delta(r);
                        }
                    }
                },
                other => {
                    if let Some(r) = run.take() {
                        self.delta(r);
                    }
                    self.handle(other);
                }
            }
        }
        if let Some(r) = run {
            self.delta(r);
        }
        Ok(())
    }

    /// A message arrived from the server.
    pub fn handle(&mut self, msg: Message) {
        match msg {
            Message::Welcome(w) => {
                // (Bounded: the announcement also sets what we accept.)
                self.server_max_frame = (w.max_frame as usize).clamp(1024, 128 << 20);
                self.status = Status::Online;
                self.event(ClientEvent::Status(Status::Online));
            }
            Message::Delta(d) => self.delta(*d),
            Message::Ack(a) => self.ack(&a.db, a.vv.get(&self.replica)),
            Message::PresenceUpdate(p) => self.presence_update(*p),
            Message::Error(e) => self.server_error(*e),
            Message::Ping { nonce } => self.send(Message::Pong { nonce }),
            Message::Pong { .. } => {}
            Message::Databases(d) => self.event(ClientEvent::Databases {
                req: d.req,
                names: d.names,
            }),
            other => self.event(ClientEvent::Error {
                db: None,
                code: ErrorCode::ProtocolViolation,
                message: format!("server sent a client message: {}", other.kind()),
            }),
        }
    }

    /// Persist batches of `db` up to `seq` are durable locally.
    pub fn persisted(&mut self, db: &DbName, seq: u64) {
        let Some(c) = self.dbs.get_mut(db) else {
            return;
        };
        c.persisted_seq = c.persisted_seq.max(seq);
        while c.unpersisted.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, own)) = c.unpersisted.pop_front() {
                c.local_durable = c.local_durable.max(own);
            }
        }
        self.push(db);
        self.check_synced(db);
    }

    // ---- internals ----

    fn send(&mut self, msg: Message) {
        self.out.push(ClientOutput::Send(msg));
    }

    fn event(&mut self, e: ClientEvent) {
        self.out.push(ClientOutput::Event(e));
    }

    fn persist(&mut self, db: &DbName, batch: Batch) {
        if batch.is_empty() {
            return;
        }
        let me = self.replica;
        let Some(c) = self.dbs.get_mut(db) else {
            return;
        };
        let own = batch
            .entries
            .iter()
            .filter(|e| e.dot.replica == me)
            .map(|e| e.dot.counter)
            .max()
            .unwrap_or(0);
        let seq = c.next_seq;
        c.next_seq += 1;
        c.unpersisted.push_back((seq, own));
        let mut views = Vec::new();
        if self.config.keep_views {
            let docs = batch.entries.iter().map(|e| &e.doc);
            c.views_dirty
                .extend(docs.chain(batch.snapshots.iter().map(|s| &s.doc)).cloned());
            c.entries_since_views += batch.entries.len() + batch.snapshots.len();
            if c.entries_since_views >= self.config.view_refresh_entries {
                c.entries_since_views = 0;
                // Documents still waiting for a server view stay due.
                let dirty = std::mem::take(&mut c.views_dirty);
                for d in dirty {
                    match c.db.view(&d) {
                        Some(v) => views.push(v),
                        None if c.db.awaits_view(&d) => {
                            c.views_dirty.insert(d);
                        }
                        None => {}
                    }
                }
            }
        }
        self.out.push(ClientOutput::Persist {
            db: db.clone(),
            seq,
            batch,
            views,
        });
    }

    fn apply_error(&mut self, db: &DbName, e: ApplyError) {
        self.event(ClientEvent::Error {
            db: Some(db.clone()),
            code: ErrorCode::InvalidChange,
            message: e.to_string(),
        });
    }

    /// Record a resubscription for what is still missing; false when the
    /// previous one (on this connection) gained nothing.
    fn note_resubscribe(&mut self, name: &DbName) -> bool {
        let Some(c) = self.dbs.get_mut(name) else {
            return false;
        };
        let now = c.db.vv();
        if c.resubscribed_at.as_ref() == Some(now) {
            return false;
        }
        c.resubscribed_at = Some(now.clone());
        true
    }

    fn send_subscribe(&mut self, name: &DbName) {
        let req = self.next_req;
        self.next_req = self.next_req.wrapping_add(1).max(1);
        let Some(c) = self.dbs.get_mut(name) else {
            return;
        };
        c.sync = Sync::Awaiting {
            req,
            parts: BTreeSet::new(),
            last: None,
            base: VersionVector::new(),
            snapshots: Vec::new(),
            vv: VersionVector::new(),
        };
        let (since, horizon) = subscribe_vector(c);
        let presence = c.presence.clone();
        self.send(Message::Subscribe(Box::new(Subscribe {
            db: name.clone(),
            since,
            req,
            horizon,
        })));
        if let Some(state) = presence {
            self.send(Message::Presence(Box::new(Presence {
                db: name.clone(),
                state,
            })));
        }
    }

    fn delta(&mut self, d: Delta) {
        let name = d.db.clone();
        let me = self.replica;
        let relays_others = d.entries.iter().any(|e| e.dot.replica != me);
        let final_part = d.last;
        let Some(c) = self.dbs.get_mut(&name) else {
            return;
        };
        let mut complete = None;
        let mut applied = match &mut c.sync {
            Sync::Idle => return,
            Sync::Awaiting {
                req,
                parts,
                last,
                base,
                snapshots,
                vv,
            } => {
                if d.req != 0 && d.req != *req {
                    return; // a stale reply to an earlier Subscribe
                }
                if d.req != 0 {
                    c.db.offer_views(d.views);
                    parts.insert(d.part);
                    if d.last {
                        *last = Some(d.part);
                    }
                    base.merge(&d.base);
                    snapshots.extend(d.snapshots);
                    vv.merge(&d.vv);
                }
                if let Some(l) = *last
                    && parts.len() == l as usize + 1
                {
                    complete = Some((
                        std::mem::take(base),
                        std::mem::take(snapshots),
                        std::mem::take(vv),
                    ));
                }
                c.db.apply_entries(d.entries)
            }
            Sync::Live { .. } => {
                if d.req != 0 {
                    return; // a duplicate of the finished reply
                }
                c.db.apply_entries(d.entries)
            }
        };
        let server_vv = d.vv;
        if relays_others {
            // The server holds more of others now (perhaps what we already
            // had from another tab): what it refused may go.
            c.awaiting_others = false;
        }
        let mut resubscribe = false;
        let reply_done = complete.is_some();
        let mut new_base = false;
        if let Some((base, snapshots, vv)) = complete {
            // Behind the server's horizon: its snapshots bring us up to it.
            // Holding all of it (the reply announced it): fold our own
            // documents to the same horizon, so we can name it next time.
            if !base.is_empty()
                && (!c.db.vv().dominates(&base) || !c.db.log().base().dominates(&base))
            {
                let more = c.db.apply_snapshots(snapshots, &base);
                merge_applied(&mut applied, more);
                new_base = true;
            }
            applied.changed.extend(c.db.withdraw_offers());
            let pushed = vv.get(&self.replica);
            c.sync = Sync::Live { pushed };
            // Anything the server holds that we still lack means a part went
            // missing (or arrived out of order and is still pending).
            resubscribe = !c.db.vv().dominates(&vv);
        } else if matches!(c.sync, Sync::Live { .. })
            && final_part
            && !c.db.vv().dominates(&without(&server_vv, self.replica))
        {
            // (Every part of a live delta carries the vector after its last
            // part, so only the last part can tell that something is missing.)
            resubscribe = true;
        }
        self.absorb(&name, applied, new_base);
        if reply_done && let Some(c) = self.dbs.get_mut(&name) {
            // Everything of the reply is in batches up to the newest one.
            c.reply_seq = c.next_seq - 1;
        }
        self.ack(&name, server_vv.get(&self.replica));
        if resubscribe && !self.note_resubscribe(&name) {
            self.event(ClientEvent::Error {
                db: Some(name.clone()),
                code: ErrorCode::InvalidChange,
                message: "the server holds changes this replica cannot apply; \
                          not asking for them again on this connection"
                    .into(),
            });
            resubscribe = false;
        }
        if resubscribe {
            self.send_subscribe(&name);
        } else {
            self.push(&name);
        }
    }

    /// Persist and announce what applying remote data did.
    fn absorb(&mut self, name: &DbName, applied: Applied, new_base: bool) {
        for e in applied.errors {
            self.apply_error(name, e);
        }
        let base = (new_base || !applied.snapshots.is_empty()).then(|| {
            self.dbs
                .get(name)
                .map(|c| c.db.log().base().clone())
                .unwrap_or_default()
        });
        self.persist(
            name,
            Batch {
                entries: applied.entries,
                snapshots: applied.snapshots,
                base,
            },
        );
        if !applied.changed.is_empty() {
            self.event(ClientEvent::Changed {
                db: name.clone(),
                docs: applied.changed.into_iter().collect(),
                remote: true,
            });
        }
    }

    fn ack(&mut self, name: &DbName, counter: u64) {
        let Some(c) = self.dbs.get_mut(name) else {
            return;
        };
        if counter > c.acked {
            c.acked = counter;
            self.out.push(ClientOutput::Event(ClientEvent::Acked {
                db: name.clone(),
                counter,
            }));
        }
        self.check_synced(name);
    }

    fn check_synced(&mut self, name: &DbName) {
        let Some(c) = self.dbs.get_mut(name) else {
            return;
        };
        // Becoming synced also waits for the reply to be durable locally;
        // live updates arriving afterwards do not hold it back.
        let now = matches!(c.sync, Sync::Live { .. })
            && c.acked >= c.db.own_counter()
            && c.persisted_seq >= c.reply_seq;
        if now && !c.synced {
            c.synced = true;
            self.event(ClientEvent::Synced { db: name.clone() });
        } else if !now {
            c.synced = false;
        }
    }

    /// Push durable own entries the server has not been sent on this connection.
    fn push(&mut self, name: &DbName) {
        let me = self.replica;
        let max = self.config.max_entries_per_push.max(1);
        let Some(c) = self.dbs.get_mut(name) else {
            return;
        };
        let Sync::Live { pushed } = &mut c.sync else {
            return;
        };
        if c.awaiting_others {
            return;
        }
        let from = (*pushed).max(c.acked) + 1;
        if from > c.local_durable || c.too_large == Some(from) {
            // Nothing new, or stuck behind a change no frame can carry.
            return;
        }
        let entries = c.db.log().entries_of(&me, from, c.local_durable);
        // Cut pushes by size as well as count: entries that piled up offline
        // must not make one frame over the server's limit, which it would
        // refuse on every reconnect. Half the limit leaves room for framing,
        // as the server does for its deltas.
        let budget = self.server_max_frame / 2;
        let alone_max = self.server_max_frame.saturating_sub(PUSH_OVERHEAD);
        let mut pushes: Vec<Vec<Entry>> = Vec::new();
        let mut used = 0usize;
        let mut too_large = None;
        for e in entries {
            let len = e.encoded_len();
            if len > alone_max {
                // Never sendable to this server: stop before it (the server
                // needs a replica's entries in order) and say so once.
                too_large = Some((e.dot.counter, len));
                break;
            }
            *pushed = e.dot.counter;
            match pushes.last_mut() {
                Some(p) if used + len <= budget && p.len() < max => p.push(e.clone()),
                _ => {
                    used = 0;
                    pushes.push(vec![e.clone()]);
                }
            }
            used += len;
        }
        let report = too_large.filter(|(counter, _)| c.too_large != Some(*counter));
        if let Some((counter, _)) = report {
            c.too_large = Some(counter);
        }
        for entries in pushes {
            self.out
                .push(ClientOutput::Send(Message::Push(Box::new(Push {
                    db: name.clone(),
                    entries,
                }))));
        }
        if let Some((counter, len)) = report {
            let message = format!(
                "change {counter} is {len} bytes, over the server's {}-byte frame limit; \
                 it and later changes stay local",
                self.server_max_frame
            );
            self.event(ClientEvent::Error {
                db: Some(name.clone()),
                code: ErrorCode::TooLarge,
                message,
            });
        }
    }

    fn presence_update(&mut self, p: PresenceUpdate) {
        let Some(c) = self.dbs.get_mut(&p.db) else {
            return;
        };
        if p.full {
            c.peers.clear();
        }
        for peer in p.peers {
            if peer.left {
                c.peers.remove(&peer.peer);
            } else {
                c.peers.insert(peer.peer, (peer.replica, peer.state));
            }
        }
        c.online = p.online;
        self.event(ClientEvent::Presence { db: p.db });
    }

    fn server_error(&mut self, e: ErrorMsg) {
        let code = e.code();
        if let Some(db) = &e.db
            && matches!(code, ErrorCode::OutOfOrder | ErrorCode::NotSubscribed)
            && self.dbs.get(db).is_some_and(|c| c.wanted)
            && self.status == Status::Online
        {
            // The server lost track of our stream: start over from our vector.
            let db = db.clone();
            self.send_subscribe(&db);
            return;
        }
        if code == ErrorCode::UnknownHorizon
            && let Some(db) = &e.db
            && let Some(c) = self.dbs.get_mut(db)
            && c.wanted
            && matches!(c.sync, Sync::Awaiting { .. })
            && self.status == Status::Online
        {
            // The server compacted since (or is another): ask again with the
            // whole vector; the reply announces its horizon.
            c.refused_horizon = Some(c.db.log().base_digest());
            let db = db.clone();
            self.send_subscribe(&db);
            return;
        }
        if code == ErrorCode::MissingDependency
            && let Some(db) = &e.db
            && let Some(c) = self.dbs.get_mut(db)
            && let Sync::Live { pushed } = &mut c.sync
        {
            // Not an error of ours to report: another tab's changes we built
            // on reach the server when that tab pushes them, and then ours go.
            *pushed = c.acked;
            c.awaiting_others = true;
            return;
        }
        if code == ErrorCode::Internal
            && let Some(db) = &e.db
            && let Some(c) = self.dbs.get_mut(db)
            && matches!(c.sync, Sync::Awaiting { .. })
        {
            // The server could not load the database (its disk or engine
            // failed): reported, and asked again at the next heartbeat.
            c.retry_subscribe = true;
        }
        if matches!(code, ErrorCode::Internal | ErrorCode::TooLarge)
            && let Some(db) = &e.db
            && let Some(c) = self.dbs.get_mut(db)
            && let Sync::Live { pushed } = &mut c.sync
        {
            // Nothing of those pushes was stored (the server's disk is
            // failing, or the database is over its quota): they stay here
            // and go again at the next heartbeat, not at once.
            *pushed = c.acked;
        }
        self.event(ClientEvent::Error {
            db: e.db,
            code,
            message: e.message,
        });
    }
}

/// What a Subscribe of `c` says it holds: its whole vector, or — once its
/// pruned horizon names [`HORIZON_REPLICAS`] replicas or more — the
/// horizon's digest and only the counters above it (the server fills in
/// the rest), unless the server refused that horizon.
fn subscribe_vector(c: &ClientDb) -> (VersionVector, Option<[u8; 16]>) {
    let base = c.db.log().base();
    let digest = c.db.log().base_digest();
    if base.len() < HORIZON_REPLICAS || c.refused_horizon == Some(digest) {
        return (c.db.vv().clone(), None);
    }
    let above =
        c.db.vv()
            .iter()
            .filter(|(r, n)| **n > base.get(r))
            .map(|(r, n)| (*r, *n))
            .collect();
    (above, Some(digest))
}

fn merge_applied(into: &mut Applied, more: Applied) {
    into.entries.extend(more.entries);
    into.snapshots.extend(more.snapshots);
    into.changed.extend(more.changed);
    into.errors.extend(more.errors);
}

/// `vv` without `replica`'s component (our own entries may be ahead there).
fn without(vv: &VersionVector, replica: ReplicaId) -> VersionVector {
    let mut v = vv.clone();
    v.set(replica, 0);
    v
}
