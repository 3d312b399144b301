//! The hub: one task owning the sans-IO [`Server`] state machine. Connection
//! tasks send it decoded messages; it executes what the state machine asks:
//! queue frames to connections, write batches to the store (completions come
//! back as messages), load databases, close connections.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::body::Bytes;
use syncline_core::protocol::{self, ErrorCode, Message};
use syncline_core::sync::{
    CheckedHello, EMPTY_DATABASE_BYTES, PeerId, Reply, Server, ServerOutput, ValidateJob, Validated,
};
use syncline_core::{DbName, Store, StoredDatabase};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Duration, Instant};

use super::metrics::Metrics;
use crate::auth::TokenAuth;
use crate::store::FileStore;

/// KiB of decoded messages on their way from the connections to the hub
/// (the hub channel holds up to 4,096 messages of up to a frame each):
/// a connection waits for room before it reads on.
pub const HELD_KIB: usize = 256 << 10;

/// What a connection's writer sends.
#[derive(Debug)]
pub enum Out {
    /// One encoded frame (shared by every recipient of a broadcast: cloning
    /// it counts a reference, the bytes are not copied per connection).
    Frame(Bytes),
    /// A reply to `Subscribe`, encoded part by part as the socket drains
    /// (the frames queued after it wait for its last part).
    Reply {
        /// The reply.
        reply: Box<Reply>,
        /// The connection's reply slot ([`ConnHandle::slot`]), given back
        /// after the last part is written.
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// Close after the frames before this.
    Close(ErrorCode),
}

/// A connection as the hub sees it.
#[derive(Debug)]
pub struct ConnHandle {
    /// Its outgoing queue.
    pub tx: mpsc::UnboundedSender<Out>,
    /// Bytes queued and not yet written to the socket.
    pub queued: Arc<AtomicUsize>,
    /// Fired when the connection must be dropped at once (slow reader).
    pub kill: Option<oneshot::Sender<ErrorCode>>,
    /// The connection's reply slot while the server handles its Subscribe:
    /// moved into the reply, or given back if the Subscribe produced none
    /// now (refused, or waiting for its database to load).
    pub slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

/// Messages to the hub.
#[derive(Debug)]
pub enum HubMsg {
    /// A new connection.
    Connect {
        /// Its handle.
        conn: ConnHandle,
        /// The host it was made to (the request's `Host` header).
        host: Option<String>,
        /// Gets the peer id.
        reply: oneshot::Sender<PeerId>,
    },
    /// A connection's first frame, its `Hello`. The connection reads
    /// nothing more until the hub answers whether it was accepted.
    Hello {
        /// Who.
        peer: PeerId,
        /// The decoded `Hello`, its signature checked by the connection.
        hello: Box<CheckedHello>,
        /// Gets whether the server accepted it (if not, the server has
        /// queued its error and the close).
        accepted: oneshot::Sender<bool>,
    },
    /// A decoded frame from a peer.
    Message {
        /// Who.
        peer: PeerId,
        /// What.
        msg: Message,
        /// Its share of the bytes messages may hold on their way to the
        /// hub ([`HELD_KIB`]), given back once the server has taken it.
        held: tokio::sync::OwnedSemaphorePermit,
        /// For a `Subscribe`, the connection's only reply slot: its next
        /// Subscribe is not read until this one's reply is written, so one
        /// small frame cannot queue the encoding of a whole database many
        /// times over.
        slot: Option<tokio::sync::OwnedSemaphorePermit>,
    },
    /// The connection ended.
    Disconnect {
        /// Who.
        peer: PeerId,
    },
    /// A push's changes were checked and parsed off the hub.
    Validated {
        /// Who pushed.
        peer: PeerId,
        /// The outcome.
        validated: Validated,
    },
    /// A store write finished.
    Persisted {
        /// Database.
        db: DbName,
        /// Batch sequence number.
        seq: u64,
        /// Outcome.
        result: Result<(), String>,
    },
    /// A database load finished.
    Loaded {
        /// Database.
        db: DbName,
        /// Outcome.
        result: Result<StoredDatabase, String>,
    },
    /// Report connection and subscription counts (for `/metrics`).
    Stats {
        /// Gets (connections, subscriptions per database).
        reply: oneshot::Sender<(usize, Vec<(DbName, usize)>)>,
    },
    /// The store's database names, for an admin's `ListDatabases`.
    Listed {
        /// Who asked.
        peer: PeerId,
        /// Their request.
        req: u32,
        /// Names on disk (empty if listing failed).
        names: Vec<DbName>,
    },
    /// A background compaction plan is ready.
    Compacted {
        /// Database.
        db: DbName,
        /// The plan, or why planning failed.
        result: Result<syncline_core::Compaction, String>,
    },
    /// A compaction is durable and its log rewritten.
    CompactionDone {
        /// Database.
        db: DbName,
    },
    /// Views built in the background.
    ViewsBuilt {
        /// Database.
        db: DbName,
        /// The views.
        built: syncline_core::BuiltViews,
        /// How long building them took.
        took: Duration,
    },
    /// Cluster mode: a message the tail read from the engine.
    Stream(Box<crate::cluster::StreamMsg>),
    /// Cluster mode: the engine answered a publish.
    Published {
        /// The message id.
        id: String,
        /// Acknowledged, or why not by the deadline.
        result: Result<(), String>,
    },
    /// Cluster mode: another node's presence.
    RemotePresence {
        /// The node.
        node: String,
        /// Its update.
        update: Box<syncline_core::protocol::PresenceUpdate>,
    },
    /// Cluster mode: a database load from its stream finished.
    ClusterLoaded {
        /// Database.
        db: DbName,
        /// Outcome.
        result: Result<crate::cluster::LoadedDb, String>,
    },
    /// Close every connection and wait for pending writes.
    Shutdown {
        /// Fired when done.
        done: oneshot::Sender<()>,
    },
}

/// Hub settings.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Bytes a connection may have queued before it is dropped as too slow.
    pub max_queued_bytes: usize,
    /// Compact a database in the background once its log holds this many
    /// bytes of changes above the horizon.
    pub compact_after_bytes: usize,
    /// Build a database's missing views once it has had no durable write
    /// for this long: views cost a full load of each changed document, so
    /// they wait for a pause rather than competing with a burst of writes.
    pub view_quiet: Duration,
    /// The longest a database's changed documents wait for their views
    /// while writes keep coming (so a database that is never quiet for
    /// `view_quiet` is still served views, at most this old).
    pub view_max_wait: Duration,
    /// Most changes one background view build applies (then it yields
    /// to the hub and the next build continues).
    pub view_job_changes: usize,
    /// Bytes the loaded databases may hold before idle ones (no
    /// subscriber, no write on its way) are unloaded, least recently used
    /// first; checked every [`UNLOAD_EVERY`] seconds.
    pub max_loaded_bytes: usize,
    /// Bytes the store's logs may take before every push is refused
    /// (0: no limit); checked after each write and each second.
    pub max_disk_bytes: u64,
}

/// A database's view builds take at most one part in this many of the
/// time (the wait after a build is this many times its length, minus one),
/// so views of a database written without pause cost the writers little.
const VIEW_DUTY: u32 = 10;

/// When a database's missing views are built ([`HubConfig::view_quiet`]).
#[derive(Debug, Clone, Copy)]
struct ViewsDue {
    at: Instant,
    /// The first write this build waits for, and the database's
    /// `Server::appended` then: a build that starts while writes still
    /// come (after `view_max_wait`) builds only the documents not changed
    /// since (the others would be stale at once).
    since: Instant,
    mark: u64,
    /// The latest write this build waits for.
    last: Instant,
}

/// Seconds between checks of [`HubConfig::max_loaded_bytes`].
const UNLOAD_EVERY: u64 = 10;

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_queued_bytes: 32 << 20,
            compact_after_bytes: 64 << 20,
            view_quiet: Duration::from_millis(100),
            view_max_wait: Duration::from_secs(1),
            view_job_changes: 50_000,
            max_loaded_bytes: 1 << 30,
            max_disk_bytes: 0,
        }
    }
}

/// Where the hub keeps things.
#[derive(Debug)]
pub struct Storage {
    /// The file store: every database, or in cluster mode only this
    /// node's own metadata.
    pub store: FileStore,
    /// Replica–subject pairings (`DATA/subjects.jsonl`).
    pub subjects: crate::store::subjects::Subjects,
    /// Cluster mode: where databases live instead.
    pub cluster: Option<crate::cluster::ClusterHub>,
}

/// Run the hub until every sender is gone.
pub async fn run(
    mut server: Server<TokenAuth>,
    storage: Storage,
    metrics: Arc<Metrics>,
    config: HubConfig,
    (tx, mut rx): (mpsc::Sender<HubMsg>, mpsc::Receiver<HubMsg>),
    pools: super::heavy::Pools,
) {
    let Storage {
        store,
        subjects,
        cluster,
    } = storage;
    let mut hub = Hub {
        cluster,
        subjects,
        conns: HashMap::new(),
        store,
        metrics,
        config,
        tx,
        in_flight: 0,
        shutdown: None,
        compacting: std::collections::HashSet::new(),
        compacted_left: HashMap::new(),
        views_due: HashMap::new(),
        views_building: std::collections::HashSet::new(),
        views_rest: HashMap::new(),
        views_pending: std::collections::HashSet::new(),
        validators: pools.heavy,
        background: pools.background,
        slotted: Vec::new(),
        disk_full: false,
        loads_since_unload: 0,
    };
    hub.check_disk(&mut server);
    // Tokens are checked at Hello; this ends connections that outlive theirs.
    let mut expiry = tokio::time::interval(Duration::from_secs(1));
    let mut ticks = 0u64;
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // (A database whose build is still running waits for it to finish.)
        let next_due = hub
            .views_due
            .iter()
            .filter(|(db, _)| !hub.views_building.contains(*db))
            .map(|(_, due)| due.at)
            .min();
        let msg = tokio::select! {
            msg = rx.recv() => msg,
            () = sleep_until(next_due) => {
                hub.start_view_builds(&server);
                continue;
            }
            _ = expiry.tick() => {
                ticks += 1;
                server.expire(crate::auth::now_secs());
                hub.check_disk(&mut server);
                if ticks.is_multiple_of(UNLOAD_EVERY) {
                    hub.unload_idle(&mut server);
                }
                if hub.cluster.is_some()
                    && ticks.is_multiple_of(crate::cluster::PRESENCE_EVERY.as_secs())
                {
                    server.share_presence_full();
                    let expire = crate::cluster::PRESENCE_EXPIRE.as_millis() as u64;
                    server.expire_remote_presence(crate::auth::now_ms().saturating_sub(expire));
                }
                hub.execute(&mut server);
                continue;
            }
        };
        let Some(msg) = msg else { break };
        hub.handle(&mut server, msg);
        // Take in what else is already queued (bounded) before carrying out
        // the outputs: a burst (a thousand joins, many pushes) then costs
        // one presence update per subscriber and fewer store requests.
        // Stop taking in early once the frames encoded so far (live
        // updates, presence) exceed one connection's send limit: carrying
        // them out then lets that limit drop a peer that does not read.
        // (Replies to Subscribe are encoded later, by their connection.)
        for _ in 0..255 {
            if server.outbox_bytes() > hub.config.max_queued_bytes {
                break;
            }
            match rx.try_recv() {
                Ok(msg) => hub.handle(&mut server, msg),
                Err(_) => break,
            }
        }
        hub.execute(&mut server);
        if hub.in_flight == 0
            && hub.cluster.as_ref().is_none_or(|c| c.busy() == 0)
            && let Some(done) = hub.shutdown.take()
        {
            let _ = done.send(());
        }
    }
}

struct Hub {
    conns: HashMap<PeerId, ConnHandle>,
    /// Cluster mode: databases live in the engine, not in `store`.
    cluster: Option<crate::cluster::ClusterHub>,
    /// Replica–subject pairings already in `DATA/subjects.jsonl`.
    subjects: crate::store::subjects::Subjects,
    store: FileStore,
    metrics: Arc<Metrics>,
    config: HubConfig,
    tx: mpsc::Sender<HubMsg>,
    in_flight: usize,
    shutdown: Option<oneshot::Sender<()>>,
    compacting: std::collections::HashSet<DbName>,
    /// Bytes of entries each database's last compaction left in its log
    /// (all of it when the plan failed): the next one waits until the log
    /// has grown by `compact_after_bytes` past that, so a document that
    /// cannot be folded is not retried, with a copy of the log, after
    /// every write.
    compacted_left: HashMap<DbName, usize>,
    /// When each database's missing views may be built (pushed back by
    /// every durable write).
    views_due: HashMap<DbName, ViewsDue>,
    views_building: std::collections::HashSet<DbName>,
    /// Per database, the earliest its next view build may start: builds
    /// take at most a tenth of a core's time per database
    /// ([`VIEW_DUTY`]), however often its writes make views stale.
    views_rest: HashMap<DbName, Instant>,
    /// Databases counted in the `views_pending` metric.
    views_pending: std::collections::HashSet<DbName>,
    /// Threads for expensive work (parsing pushes, decoding large frames,
    /// encoding replies): one fewer than the machine has cores, at a lower
    /// priority, so the hub always has one ([`heavy_threads`]).
    validators: super::heavy::Heavy,
    /// One thread, lower still, for view builds and compaction plans.
    background: super::heavy::Heavy,
    /// Connections whose reply slot the hub holds until the outputs are
    /// carried out.
    slotted: Vec<PeerId>,
    /// Whether the core server was told the logs are over their quota.
    disk_full: bool,
    /// Databases loaded since idle ones were last unloaded.
    loads_since_unload: usize,
}

/// How many expensive jobs run at once: one core fewer than the machine.
pub fn heavy_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().saturating_sub(1).max(1))
}

/// Whether a log holding `bytes` of entries should be compacted, when its
/// last compaction left `left` bytes (of documents it could not fold, or of
/// entries that arrived while it was planned): once it has grown by `limit`.
fn compaction_due(bytes: usize, left: usize, limit: usize) -> bool {
    bytes >= left.saturating_add(limit)
}

/// Sleep until `at`, or forever.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

impl Hub {
    /// Tell the core server whether the logs are over `max_disk_bytes`
    /// (and update the store's gauges).
    fn check_disk(&mut self, server: &mut Server<TokenAuth>) {
        let stats = self.store.stats();
        let bytes = stats.log_bytes.load(Ordering::Relaxed);
        self.metrics.disk_bytes.set(bytes as i64);
        let open = stats.open_files.load(Ordering::Relaxed);
        self.metrics.open_files.set(open as i64);
        let full = self.config.max_disk_bytes > 0 && bytes >= self.config.max_disk_bytes;
        if full != self.disk_full {
            if full {
                tracing::warn!(
                    bytes,
                    quota = self.config.max_disk_bytes,
                    "the logs are at --max-disk-bytes: refusing pushes"
                );
            } else {
                tracing::info!(bytes, "the logs are under --max-disk-bytes again");
            }
            self.disk_full = full;
            server.storage_full(full);
        }
    }

    fn handle(&mut self, server: &mut Server<TokenAuth>, msg: HubMsg) {
        match msg {
            HubMsg::Connect { conn, host, reply } => {
                let peer = server.connect_to(host.as_deref());
                self.conns.insert(peer, conn);
                self.metrics.connections.set(self.conns.len() as i64);
                let _ = reply.send(peer);
            }
            HubMsg::Hello {
                peer,
                hello,
                accepted,
            } => {
                server.set_clock(crate::auth::now_ms());
                server.hello_checked(peer, *hello);
                if let (Some(sub), Some(replica)) = (server.subject(peer), server.replica_of(peer))
                {
                    tracing::info!(peer, subject = sub, %replica, "connection authenticated");
                    // The audit trail: who writes as this replica.
                    if let Some(line) = self.subjects.note(replica, sub, crate::auth::now_secs()) {
                        let path = self.subjects.path().to_owned();
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = crate::store::subjects::append(&path, &line) {
                                tracing::error!("writing {}: {e}", path.display());
                            }
                        });
                    }
                }
                let _ = accepted.send(server.greeted(peer));
            }
            HubMsg::Message {
                peer,
                msg,
                held,
                slot,
            } => {
                if let Message::Push(p) = &msg {
                    self.metrics.entries_in.inc_by(p.entries.len() as u64);
                }
                if let Some(c) = self.conns.get_mut(&peer)
                    && slot.is_some()
                {
                    c.slot = slot;
                    self.slotted.push(peer);
                }
                server.handle(peer, msg);
                drop(held);
            }
            HubMsg::Validated { peer, validated } => server.validated(peer, validated),
            HubMsg::Disconnect { peer } => {
                self.conns.remove(&peer);
                self.metrics.connections.set(self.conns.len() as i64);
                server.disconnect(peer);
            }
            HubMsg::Persisted { db, seq, result } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                match result {
                    Ok(()) => {
                        server.persisted(&db, seq);
                        self.check_disk(server);
                        self.maybe_compact(server, &db);
                        self.views_later(server, &db, true);
                    }
                    // The core server logs the reason and tells the clients less.
                    Err(e) => server.persist_failed(&db, seq, &e),
                }
            }
            HubMsg::Loaded { db, result } => {
                self.in_flight = self.in_flight.saturating_sub(1);
                match result {
                    Ok(stored) => {
                        server.loaded(db.clone(), stored);
                        self.views_later(server, &db, false);
                        // A client loading thousands of databases a second
                        // must not outrun the check every ten seconds: after
                        // a quarter of the budget of loads (each counted as
                        // an empty database), it is checked at once.
                        self.loads_since_unload += 1;
                        if self.loads_since_unload.saturating_mul(EMPTY_DATABASE_BYTES)
                            >= self.config.max_loaded_bytes / 4
                        {
                            self.unload_idle(server);
                        }
                    }
                    // The core server logs the reason and tells the clients less.
                    Err(e) => server.load_failed(&db, &e),
                }
            }
            HubMsg::Listed { peer, req, names } => server.databases_listed(peer, req, names),
            HubMsg::Compacted { db, result } => {
                match result {
                    Ok(c) => {
                        // The core server logs each skipped document.
                        self.metrics
                            .compaction_skipped_docs
                            .inc_by(c.skipped.len() as u64);
                        server.apply_compaction(&db, c);
                    }
                    Err(e) => {
                        tracing::error!(%db, "compaction failed: {e}");
                        self.compacting.remove(&db);
                    }
                }
                let left = server.log(&db).map_or(0, |l| l.entry_bytes());
                self.compacted_left.insert(db, left);
            }
            HubMsg::ViewsBuilt { db, built, took } => {
                self.views_rest
                    .insert(db.clone(), Instant::now() + took * (VIEW_DUTY - 1));
                self.metrics.views_built.inc_by(built.views.len() as u64);
                server.views_built(&db, built);
                self.views_building.remove(&db);
                if server.stale_views(&db) > 0 {
                    self.views_later(server, &db, false);
                } else if !self.views_due.contains_key(&db) {
                    self.views_gauge(&db, false);
                }
            }
            HubMsg::CompactionDone { db } => {
                self.metrics.compactions.inc();
                self.compacting.remove(&db);
            }
            HubMsg::Stats { reply } => {
                let subs = server
                    .subscriptions()
                    .map(|(db, n)| (db.clone(), n))
                    .collect();
                let _ = reply.send((server.connections(), subs));
            }
            HubMsg::Stream(msg) => {
                if let Some(c) = &mut self.cluster {
                    let db = msg.db.clone();
                    c.on_stream(server, *msg);
                    // Only databases loaded here have views to build.
                    if server.log(&db).is_some() {
                        self.views_later(server, &db, true);
                    }
                }
            }
            HubMsg::RemotePresence { node, update } => {
                server.remote_presence(&node, *update, crate::auth::now_ms());
            }
            HubMsg::Published { id, result } => {
                if let Some(c) = &mut self.cluster {
                    c.published(server, &id, result);
                }
            }
            HubMsg::ClusterLoaded { db, result } => {
                if let Some(c) = &mut self.cluster {
                    let ok = result.is_ok();
                    c.loaded(server, db.clone(), result);
                    if ok {
                        self.views_later(server, &db, false);
                    }
                }
            }
            HubMsg::Shutdown { done } => {
                self.views_due.clear();
                server.shutdown();
                self.shutdown = Some(done);
            }
        }
    }

    fn execute(&mut self, server: &mut Server<TokenAuth>) {
        // Dropping a slow peer makes the server emit more (presence), so loop.
        loop {
            let outs = server.take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                self.execute_one(server, out);
            }
        }
        // A Subscribe answered later (its database loading) or not at all
        // gives its slot back now.
        for peer in self.slotted.drain(..) {
            if let Some(c) = self.conns.get_mut(&peer) {
                c.slot = None;
            }
        }
    }

    fn execute_one(&mut self, server: &mut Server<TokenAuth>, out: ServerOutput) {
        let out = match &mut self.cluster {
            Some(c) => match c.execute(server, out) {
                Some(out) => out,
                None => return,
            },
            None => out,
        };
        {
            match out {
                ServerOutput::Send { peer, msg } => {
                    match &msg {
                        Message::Delta(d) => {
                            self.metrics.entries_out.inc_by(d.entries.len() as u64);
                            self.metrics.views_out.inc_by(d.views.len() as u64);
                        }
                        Message::Error(e) => self.metrics.error(e.code().as_str()),
                        _ => {}
                    }
                    // Drop the message (a cold sync's copy of the log)
                    // before compressing its archive.
                    let body = protocol::archive(&msg);
                    drop(msg);
                    let frame = Bytes::from(protocol::frame(&body));
                    drop(body);
                    self.send(server, peer, frame);
                }
                ServerOutput::Broadcast {
                    peers,
                    frame,
                    entries,
                    views,
                } => {
                    self.metrics
                        .entries_out
                        .inc_by((entries * peers.len()) as u64);
                    self.metrics.views_out.inc_by((views * peers.len()) as u64);
                    let frame = Bytes::from(Arc::unwrap_or_clone(frame));
                    for peer in peers {
                        self.send(server, peer, frame.clone());
                    }
                }
                ServerOutput::Reply { peer, reply } => {
                    let (entries, views) = reply.counts();
                    self.metrics.entries_out.inc_by(entries as u64);
                    self.metrics.views_out.inc_by(views as u64);
                    if let Some(c) = self.conns.get_mut(&peer) {
                        let slot = c.slot.take();
                        let _ = c.tx.send(Out::Reply { reply, slot });
                    }
                }
                ServerOutput::Close { peer, code } => {
                    if let Some(c) = self.conns.remove(&peer) {
                        let _ = c.tx.send(Out::Close(code));
                    }
                    self.metrics.connections.set(self.conns.len() as i64);
                }
                ServerOutput::Persist { db, seq, batch } => {
                    let compaction = batch.base.is_some();
                    // `write` enqueues on the writer thread now, in seq order;
                    // only the wait for fsync runs in the task.
                    let write = self.store.write(&db, &batch);
                    let (tx, store) = (self.tx.clone(), self.store.clone());
                    self.in_flight += 1;
                    tokio::spawn(async move {
                        let result = write.await.map_err(|e| e.to_string());
                        let ok = result.is_ok();
                        let _ = tx
                            .send(HubMsg::Persisted {
                                db: db.clone(),
                                seq,
                                result,
                            })
                            .await;
                        if compaction {
                            // Fold the file too, off the writer's path.
                            if ok && let Err(e) = store.rewrite(&db).await {
                                tracing::error!(%db, "log rewrite failed: {e}");
                            }
                            let _ = tx.send(HubMsg::CompactionDone { db }).await;
                        }
                    });
                }
                ServerOutput::Validate { peer, job } => self.validate(peer, job),
                // Handled by the cluster side above (emitted only there).
                ServerOutput::SharePresence { .. } => {}
                ServerOutput::ListDatabases { peer, req } if self.cluster.is_some() => {
                    let Some(engine) = self.cluster.as_ref().map(|c| c.engine().clone()) else {
                        return;
                    };
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let names = engine.list().await.unwrap_or_else(|e| {
                            tracing::error!("listing databases failed: {e}");
                            Vec::new()
                        });
                        let _ = tx.send(HubMsg::Listed { peer, req, names }).await;
                    });
                }
                ServerOutput::ListDatabases { peer, req } => {
                    let list = self.store.list_databases();
                    let tx = self.tx.clone();
                    tokio::spawn(async move {
                        let names = list.await.unwrap_or_else(|e| {
                            tracing::error!("listing databases failed: {e}");
                            Vec::new()
                        });
                        let _ = tx.send(HubMsg::Listed { peer, req, names }).await;
                    });
                }
                ServerOutput::Load { db } => {
                    let load = self.store.load(&db);
                    let tx = self.tx.clone();
                    self.in_flight += 1;
                    tokio::spawn(async move {
                        let result = load.await.map_err(|e| e.to_string());
                        let _ = tx.send(HubMsg::Loaded { db, result }).await;
                    });
                }
            }
        }
    }

    /// Parse a push on a heavy thread; its sender's later messages wait
    /// in the server meanwhile, nobody else's do.
    fn validate(&self, peer: PeerId, job: Box<ValidateJob>) {
        let (tx, heavy) = (self.tx.clone(), self.validators.clone());
        self.metrics.validated_bytes.inc_by(job.bytes() as u64);
        tokio::spawn(async move {
            let db = job.db().clone();
            let validated = heavy.run(move || job.run()).await.unwrap_or_else(|| {
                tracing::error!(peer, %db, "validating a push panicked");
                Validated::failed(db, "the server could not parse this change")
            });
            let _ = tx.send(HubMsg::Validated { peer, validated }).await;
        });
    }

    /// Unload idle databases past the memory budget, and forget them here
    /// (their metric series included).
    fn unload_idle(&mut self, server: &mut Server<TokenAuth>) {
        self.loads_since_unload = 0;
        let busy = self
            .compacting
            .iter()
            .chain(&self.views_building)
            .cloned()
            .collect();
        // Past the budget, down to three quarters of it: the next check
        // that has work to do is a quarter of the budget of loads away.
        let budget = self.config.max_loaded_bytes;
        let gone = if server.loaded_bytes() > budget {
            server.unload_idle(budget - budget / 4, &busy)
        } else {
            Vec::new()
        };
        for db in &gone {
            if let Some(c) = &mut self.cluster {
                c.forget(db);
            }
            self.views_due.remove(db);
            self.views_rest.remove(db);
            self.compacted_left.remove(db);
            self.views_gauge(db, false);
        }
        if !gone.is_empty() {
            self.metrics.unloaded.inc_by(gone.len() as u64);
            tracing::debug!(count = gone.len(), "unloaded idle databases");
        }
        self.metrics.loaded_bytes.set(server.loaded_bytes() as i64);
    }

    /// Schedule building `db`'s missing views after a quiet period.
    /// (`write`: a durable write of the database is why; otherwise it was
    /// loaded, or a build left documents stale.)
    fn views_later(&mut self, server: &Server<TokenAuth>, db: &DbName, write: bool) {
        if !server.config().serve_views || self.shutdown.is_some() {
            return;
        }
        let now = Instant::now();
        let (quiet, max_wait) = (self.config.view_quiet, self.config.view_max_wait);
        let mark = server.appended(db).unwrap_or(0);
        let due = self.views_due.entry(db.clone()).or_insert(ViewsDue {
            at: now + quiet,
            since: now,
            mark,
            last: now.checked_sub(quiet).unwrap_or(now),
        });
        if write {
            due.last = now;
        }
        // Each write postpones the build by `view_quiet`, up to
        // `view_max_wait` after the first write it waits for.
        due.at = (now + quiet).min(due.since + max_wait).max(due.at);
        if let Some(rest) = self.views_rest.get(db) {
            due.at = due.at.max(*rest);
        }
        self.views_gauge(db, true);
    }

    fn views_gauge(&mut self, db: &DbName, pending: bool) {
        let changed = if pending {
            self.views_pending.insert(db.clone())
        } else {
            self.views_pending.remove(db)
        };
        if !changed {
            return;
        }
        let m = &self.metrics;
        m.views_pending_all.set(self.views_pending.len() as i64);
        if m.db_labels {
            let label = super::metrics::DbLabel { db: db.to_string() };
            if pending {
                m.views_pending.get_or_create(&label).set(1);
            } else {
                m.views_pending.remove(&label);
            }
        }
    }

    /// Build the missing views of every database that has been quiet long
    /// enough, each on a blocking thread from a copy of what it needs.
    fn start_view_builds(&mut self, server: &Server<TokenAuth>) {
        let now = Instant::now();
        let due: Vec<DbName> = self
            .views_due
            .iter()
            .filter(|(db, due)| due.at <= now && !self.views_building.contains(*db))
            .map(|(db, _)| db.clone())
            .collect();
        for db in due {
            let Some(due) = self.views_due.remove(&db) else {
                continue;
            };
            let changes = self.config.view_job_changes;
            // Still being written: only the documents that were not since
            // the first write this build waited for.
            let busy = due.last + self.config.view_quiet > now;
            let job = if busy {
                server.view_job_settled(&db, changes, due.mark)
            } else {
                server.view_job(&db, changes)
            };
            let Some(job) = job else {
                if busy && server.stale_views(&db) > 0 {
                    // Every stale document is being written: look again
                    // once the ones written now have had time to settle.
                    self.views_due.insert(
                        db.clone(),
                        ViewsDue {
                            at: now + self.config.view_max_wait,
                            since: now,
                            mark: server.appended(&db).unwrap_or(0),
                            last: due.last,
                        },
                    );
                } else {
                    self.views_gauge(&db, false);
                }
                continue;
            };
            self.views_building.insert(db.clone());
            let (tx, background) = (self.tx.clone(), self.background.clone());
            tokio::spawn(async move {
                let (docs, changes, targets) = (job.len(), job.changes(), job.targets());
                let started = Instant::now();
                let built = background
                    .run(move || job.build())
                    .await
                    .unwrap_or_else(|| {
                        // Not retried until these documents change.
                        tracing::error!(%db, "building views failed");
                        syncline_core::BuiltViews {
                            views: Vec::new(),
                            failed: targets,
                        }
                    });
                let ms = started.elapsed().as_millis() as u64;
                tracing::debug!(%db, docs, changes, ms, "views built");
                let took = started.elapsed();
                let _ = tx.send(HubMsg::ViewsBuilt { db, built, took }).await;
            });
        }
    }

    /// Start a background compaction when the log has grown past the limit.
    fn maybe_compact(&mut self, server: &Server<TokenAuth>, db: &DbName) {
        if self.cluster.is_some() {
            // Not yet in cluster mode: the streams keep every entry.
            return;
        }
        let Some(log) = server.log(db) else { return };
        let left = self.compacted_left.get(db).copied().unwrap_or(0);
        if !compaction_due(log.entry_bytes(), left, self.config.compact_after_bytes)
            || self.compacting.contains(db)
        {
            return;
        }
        self.compacting.insert(db.clone());
        // Plan on a copy (shared chunks), on the background thread: the
        // hub keeps serving.
        let log = log.clone();
        let (tx, db, background) = (self.tx.clone(), db.clone(), self.background.clone());
        tokio::spawn(async move {
            let planned = background
                .run(move || log.plan_compaction(log.vv()))
                .await
                .ok_or_else(|| "planning panicked".to_string());
            let _ = tx
                .send(HubMsg::Compacted {
                    db,
                    result: planned,
                })
                .await;
        });
    }

    /// Queue a frame; a peer whose queue is over the byte limit is dropped.
    fn send(&mut self, server: &mut Server<TokenAuth>, peer: PeerId, frame: Bytes) {
        let Some(c) = self.conns.get_mut(&peer) else {
            return;
        };
        let len = frame.len();
        let queued = c.queued.fetch_add(len, Ordering::Relaxed) + len;
        if queued > self.config.max_queued_bytes {
            tracing::warn!(peer, queued, "peer reads too slowly; disconnecting");
            self.metrics.error(ErrorCode::Overloaded.as_str());
            if let Some(c) = self.conns.remove(&peer)
                && let Some(kill) = c.kill
            {
                let _ = kill.send(ErrorCode::Overloaded);
            }
            self.metrics.connections.set(self.conns.len() as i64);
            server.disconnect(peer);
            return;
        }
        self.metrics.queued(queued);
        self.metrics.bytes_out.inc_by(len as u64);
        let _ = c.tx.send(Out::Frame(frame));
    }
}

#[cfg(test)]
mod tests {
    use super::compaction_due;

    #[test]
    fn what_a_compaction_leaves_behind_waits_for_the_log_to_grow_again() {
        assert!(!compaction_due(99, 0, 100));
        assert!(compaction_due(100, 0, 100));
        // A document that cannot be folded left 500 bytes: the next write
        // does not plan again, only growth by the limit does.
        assert!(!compaction_due(510, 500, 100));
        assert!(compaction_due(600, 500, 100));
        assert!(!compaction_due(usize::MAX - 1, usize::MAX, 100));
    }
}
