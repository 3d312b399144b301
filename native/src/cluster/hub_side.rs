//! The hub's part of cluster mode: writes go to the engine, and the
//! engine's order decides what every node's log holds.
//!
//! A node writes a database's batches as messages, **one in flight per
//! database** (batches arriving meanwhile fold into the next message), and
//! acknowledges its clients when the engine has acknowledged the message
//! (replicated and fsynced) **and** this node's own tail has delivered it:
//! its entries join the log at their place in the stream, so every node's
//! log has the stream's order. A message of this node's that the tail
//! delivers before the engine's acknowledgement arrives waits for it, and
//! so do the later messages of its database (its order is kept). Other
//! nodes' messages are ingested. A database being loaded buffers what the
//! tail delivers until the load says where it ends.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use syncline_core::sync::{Server, ServerOutput};
use syncline_core::{Batch, DbName, Entry};
use tokio::sync::mpsc;

use super::Engine;
use crate::auth::TokenAuth;
use crate::server::{HubMsg, Metrics};

/// A message the tail delivered.
#[derive(Debug)]
pub struct StreamMsg {
    /// Its shard.
    pub shard: u32,
    /// Its sequence in the shard's stream.
    pub seq: u64,
    /// The message id its publisher gave it.
    pub msg_id: Option<String>,
    /// Its database.
    pub db: DbName,
    /// What it holds.
    pub batch: Batch,
}

/// A message this node published, until its tail delivers it.
#[derive(Debug)]
struct Own {
    db: DbName,
    /// The core batch its first entry belongs to.
    first_seq: u64,
    /// The last core batch it completes (`None`: a part of a batch too
    /// large for one message; its later parts complete it).
    done_seq: Option<u64>,
    /// The engine acknowledged it.
    acked: bool,
    /// The tail delivered it (it waits at the head of `parked`).
    tailed: bool,
}

/// Cluster state owned by the hub task.
pub struct ClusterHub {
    engine: Engine,
    tx: mpsc::Sender<HubMsg>,
    metrics: Arc<Metrics>,
    next_id: u64,
    /// Databases with a message waiting for the engine's acknowledgement.
    publishing: HashSet<DbName>,
    /// Batches not yet published, per database, in core order.
    queued: HashMap<DbName, VecDeque<(u64, Vec<Entry>)>>,
    own: HashMap<String, Own>,
    /// Per database, tail messages held back behind an own message the
    /// engine has not acknowledged yet (that one first).
    parked: HashMap<DbName, VecDeque<StreamMsg>>,
    /// Tail messages of databases being loaded.
    loading: HashMap<DbName, Vec<StreamMsg>>,
    /// Stream sequence each loaded database's load covered.
    covered: HashMap<DbName, u64>,
    /// This node's presence updates, to the publishing task.
    presence: mpsc::Sender<syncline_core::protocol::PresenceUpdate>,
}

impl std::fmt::Debug for ClusterHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHub")
            .field("engine", &self.engine)
            .field("own", &self.own.len())
            .finish_non_exhaustive()
    }
}

impl ClusterHub {
    /// The hub's cluster state.
    pub fn new(
        engine: Engine,
        tx: mpsc::Sender<HubMsg>,
        metrics: Arc<Metrics>,
        presence: mpsc::Sender<syncline_core::protocol::PresenceUpdate>,
    ) -> Self {
        ClusterHub {
            presence,
            engine,
            tx,
            metrics,
            next_id: 0,
            publishing: HashSet::new(),
            queued: HashMap::new(),
            own: HashMap::new(),
            parked: HashMap::new(),
            loading: HashMap::new(),
            covered: HashMap::new(),
        }
    }

    /// Writes and loads not finished (shutdown waits for them).
    pub fn busy(&self) -> usize {
        self.own.len() + self.loading.len()
    }

    /// The engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// A `Persist` from the core server.
    pub fn persist(&mut self, server: &mut Server<TokenAuth>, db: DbName, seq: u64, batch: Batch) {
        if batch.base.is_some() || !batch.snapshots.is_empty() {
            // Compaction does not run in cluster mode (the hub never plans
            // one); refuse rather than drop it silently.
            server.persist_failed(&db, seq, "compaction is not supported in cluster mode");
            return;
        }
        self.queued
            .entry(db.clone())
            .or_default()
            .push_back((seq, batch.entries));
        if !self.publishing.contains(&db) {
            self.publish_next(db);
        }
    }

    /// Publish the next message of `db`: queued batches folded up to the
    /// engine's message size (a batch larger than that goes in parts).
    fn publish_next(&mut self, db: DbName) {
        let Some(queue) = self.queued.get_mut(&db) else {
            return;
        };
        let Some(&(first_seq, _)) = queue.front() else {
            self.queued.remove(&db);
            return;
        };
        let budget = self.engine.max_message_bytes();
        let mut entries: Vec<Entry> = Vec::new();
        let mut bytes = 0usize;
        let mut done_seq = None;
        while let Some((seq, batch)) = queue.front_mut() {
            let seq = *seq;
            let mut fit = 0;
            let mut size_fit = 0;
            for e in batch.iter() {
                // The entry, its doc id and the archive's framing.
                let size = e.change.len() + e.doc.as_str().len() + 64;
                if bytes + size_fit + size > budget {
                    break;
                }
                size_fit += size;
                fit += 1;
            }
            if fit == batch.len() {
                bytes += size_fit;
                entries.append(batch);
                queue.pop_front();
                done_seq = Some(seq);
                continue;
            }
            if entries.is_empty() {
                // Too large for one message: its first part now (at least
                // one entry; the core's change limit keeps one under the
                // engine's), the rest in the next messages.
                entries.extend(batch.drain(..fit.max(1)));
                done_seq = None;
            }
            break;
        }
        if queue.is_empty() {
            self.queued.remove(&db);
        }
        let payload = match syncline_core::store::encode_batch(&Batch::entries(entries)) {
            Ok(p) => bytes::Bytes::from(p),
            Err(e) => {
                tracing::error!(%db, "encoding a batch for the stream: {e}");
                return;
            }
        };
        self.next_id += 1;
        let id = format!("{}-{}", self.engine.node(), self.next_id);
        self.own.insert(
            id.clone(),
            Own {
                db: db.clone(),
                first_seq,
                done_seq,
                acked: false,
                tailed: false,
            },
        );
        self.publishing.insert(db.clone());
        let (js, tx, metrics) = (
            self.engine.js().clone(),
            self.tx.clone(),
            self.metrics.clone(),
        );
        let subject = self.engine.subject(&db);
        let deadline = self.engine.options().publish_deadline;
        tokio::spawn(async move {
            let started = Instant::now();
            let result = publish(&js, subject, &id, payload, deadline).await;
            metrics
                .engine_publish_seconds
                .observe(started.elapsed().as_secs_f64());
            let _ = tx.send(HubMsg::Published { id, result }).await;
        });
    }

    /// The engine answered a publish.
    pub fn published(
        &mut self,
        server: &mut Server<TokenAuth>,
        id: &str,
        result: Result<(), String>,
    ) {
        let Some(own) = self.own.get_mut(id) else {
            return;
        };
        let db = own.db.clone();
        self.publishing.remove(&db);
        match result {
            Ok(()) => own.acked = true,
            // Delivered by the tail, so the engine holds it: a lost
            // acknowledgement, not a lost message.
            Err(e) if own.tailed => {
                tracing::warn!(%db, "publish not acknowledged ({e}) but in the stream");
                own.acked = true;
            }
            Err(e) => {
                let first = own.first_seq;
                self.own.remove(id);
                // This batch and every later one fail (none may overtake
                // it); their senders push again. If the message reaches
                // the stream after all, the tail ingests it like another
                // node's.
                self.queued.remove(&db);
                self.metrics.engine_publish_failed.inc();
                server.persist_failed(&db, first, &format!("the NATS cluster: {e}"));
                return;
            }
        }
        if own.tailed {
            self.unpark(server, &db);
        }
        if !self.publishing.contains(&db) && self.queued.contains_key(&db) {
            self.publish_next(db);
        }
    }

    /// A message from the tail.
    pub fn on_stream(&mut self, server: &mut Server<TokenAuth>, msg: StreamMsg) {
        if let Some(parked) = self.parked.get_mut(&msg.db) {
            parked.push_back(msg);
            return;
        }
        self.process(server, msg);
    }

    /// Take in one tail message (its database's earlier ones are in).
    fn process(&mut self, server: &mut Server<TokenAuth>, msg: StreamMsg) {
        if let Some(own) = msg.msg_id.as_deref().and_then(|id| self.own.get_mut(id)) {
            if !own.acked {
                own.tailed = true;
                self.parked
                    .entry(msg.db.clone())
                    .or_default()
                    .push_back(msg);
                return;
            }
            self.complete(server, msg);
            return;
        }
        if let Some(buffer) = self.loading.get_mut(&msg.db) {
            buffer.push(msg);
            return;
        }
        if server.log(&msg.db).is_none() || self.covered.get(&msg.db).is_some_and(|c| msg.seq <= *c)
        {
            // Not loaded here (its load will read it), or read by the load.
            return;
        }
        let n = msg.batch.entries.len();
        let got = server.ingest(&msg.db, msg.batch.entries);
        self.metrics.engine_ingested.inc_by(got.added as u64);
        if got.conflicts + got.gaps > 0 {
            tracing::warn!(db = %msg.db, seq = msg.seq, n, ?got, "stream entries not applied");
        }
    }

    /// An own message, acknowledged and delivered: its entries join the
    /// log here and its clients are acknowledged.
    fn complete(&mut self, server: &mut Server<TokenAuth>, msg: StreamMsg) {
        let Some(own) = msg.msg_id.as_deref().and_then(|id| self.own.remove(id)) else {
            return;
        };
        match own.done_seq {
            Some(seq) => server.persisted(&own.db, seq),
            // A part: its entries are in, the batch is acknowledged with
            // its last part (which then finds these held).
            None => {
                server.ingest(&own.db, msg.batch.entries);
            }
        }
    }

    /// The head of `db`'s parked messages was acknowledged: take it and
    /// what waited behind it in, up to the next own message still waiting.
    fn unpark(&mut self, server: &mut Server<TokenAuth>, db: &DbName) {
        let Some(mut parked) = self.parked.remove(db) else {
            return;
        };
        while let Some(msg) = parked.pop_front() {
            self.process(server, msg);
            if let Some(again) = self.parked.get_mut(db) {
                // Parked behind another own message: keep the rest behind it.
                again.extend(parked);
                return;
            }
        }
    }

    /// Start loading `db` from its stream.
    pub fn load(&mut self, db: DbName) {
        self.loading.insert(db.clone(), Vec::new());
        let (engine, tx) = (self.engine.clone(), self.tx.clone());
        tokio::spawn(async move {
            let result = super::load::load(&engine, &db).await;
            let _ = tx.send(HubMsg::ClusterLoaded { db, result }).await;
        });
    }

    /// A load finished: hand it to the core server, then what the tail
    /// delivered meanwhile past the load's end.
    pub fn loaded(
        &mut self,
        server: &mut Server<TokenAuth>,
        db: DbName,
        result: Result<super::LoadedDb, String>,
    ) {
        let buffered = self.loading.remove(&db).unwrap_or_default();
        match result {
            Ok(loaded) => {
                server.loaded(db.clone(), loaded.stored);
                self.covered.insert(db.clone(), loaded.covered);
                for msg in buffered {
                    self.process(server, msg);
                }
            }
            Err(e) => server.load_failed(&db, &format!("the NATS cluster: {e}")),
        }
    }

    /// `db` was unloaded: a later load starts over.
    pub fn forget(&mut self, db: &DbName) {
        self.covered.remove(db);
    }

    /// Route a core output this side handles; others come back.
    pub fn execute(
        &mut self,
        server: &mut Server<TokenAuth>,
        out: ServerOutput,
    ) -> Option<ServerOutput> {
        match out {
            ServerOutput::Persist { db, seq, batch } => {
                self.persist(server, db, seq, batch);
                None
            }
            ServerOutput::Load { db } => {
                self.load(db);
                None
            }
            ServerOutput::SharePresence { update } => {
                // Ephemeral: a full queue loses this one, the next full
                // update (every few seconds) repairs it.
                let _ = self.presence.try_send(update);
                None
            }
            other => Some(other),
        }
    }
}

/// Publish with `id` until the engine acknowledges it or `deadline`
/// passes; a retry with the same id is a duplicate to the engine (within
/// its window), and past it, dots make the entries idempotent anyway.
async fn publish(
    js: &async_nats::jetstream::Context,
    subject: String,
    id: &str,
    payload: bytes::Bytes,
    deadline: Duration,
) -> Result<(), String> {
    let until = Instant::now() + deadline;
    let mut last = String::from("no answer");
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("not acknowledged within {deadline:?}: {last}"));
        }
        let attempt = async {
            js.send_publish(
                subject.clone(),
                PublishMessage::build()
                    .payload(payload.clone())
                    .message_id(id),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())
        };
        match tokio::time::timeout(left.min(Duration::from_secs(2)), attempt).await {
            Ok(Ok(_ack)) => return Ok(()),
            Ok(Err(e)) => last = e,
            Err(_) => last = "timed out".into(),
        }
        tokio::time::sleep(Duration::from_millis(100).min(left)).await;
    }
}
