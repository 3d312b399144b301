//! Cluster mode (`syncline serve --cluster nats://…`): databases live in a
//! NATS JetStream cluster instead of the local file store, so any number of
//! nodes serve any database.
//!
//! Layout in the engine (see ARCHITECTURE.md, *Cluster mode*):
//! - streams `SL_E_<k>` for shards `k` in `0..K` (K fixed when the first
//!   node creates them, kept in the streams' metadata), subjects
//!   `sl.e.<k>.<database as one token>`; file storage, `--cluster-replicas`
//!   replicas (3), `discard: new`, no limits, deletes denied;
//! - one message = one node's group commit of one database (a core `Batch`
//!   of entries, under the engine's `max_payload`), with a message id
//!   `<node>-<n>` so a retried publish is a duplicate to the engine.
//!
//! The core stays sans-IO: `hub_side.rs` feeds the core `Server` what the
//! engine delivers (`Server::persisted` for this node's own messages,
//! `Server::ingest` for the others'), `tail.rs` reads the streams in order,
//! `load.rs` replays one database.

mod hub_side;
mod load;
mod presence;
mod tail;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use syncline_core::DbName;

pub use hub_side::{ClusterHub, StreamMsg};
pub use load::LoadedDb;
pub use presence::{PRESENCE_EVERY, PRESENCE_EXPIRE, spawn_presence};
pub use tail::spawn_tails;

/// Shards a new cluster gets (`--cluster-shards`): streams read in
/// parallel, and a load filters a smaller stream.
pub const DEFAULT_SHARDS: u32 = 4;

/// The metadata key of stream `SL_E_0` that holds the shard count.
const SHARDS_KEY: &str = "syncline.shards";

/// Bytes kept free under the engine's `max_payload` for a message's
/// headers and the batch encoding around the entries.
pub const PAYLOAD_HEADROOM: usize = 64 << 10;

/// How a node reaches the engine.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// NATS server URLs (any of the cluster's; the client learns the rest).
    pub urls: Vec<String>,
    /// Shards when this node creates the streams (an existing cluster's
    /// count wins).
    pub shards: u32,
    /// Replicas of each stream (3 in production; the engine refuses more
    /// than it has servers).
    pub replicas: usize,
    /// How long a publish is retried (with the same message id) before its
    /// batch fails and its clients are told to push again.
    pub publish_deadline: Duration,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            urls: Vec::new(),
            shards: DEFAULT_SHARDS,
            replicas: 3,
            publish_deadline: Duration::from_secs(10),
        }
    }
}

/// Why the cluster could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No URL given, or one that is not a NATS URL.
    #[error("--cluster: {0}")]
    Config(String),
    /// The streams exist with settings that can drop or forget messages.
    #[error("the NATS cluster: {0}")]
    Unsafe(String),
    /// The engine could not be reached or refused a request.
    #[error("the NATS cluster: {0}")]
    Engine(String),
}

fn engine(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Engine(e.to_string())
}

/// A connection to the engine and the layout of its streams.
#[derive(Clone)]
pub struct Engine {
    js: jetstream::Context,
    client: async_nats::Client,
    /// This node's id in message ids (random per process: a restarted
    /// node's messages are new messages).
    node: String,
    shards: u32,
    /// Largest message the engine takes.
    max_payload: usize,
    /// Whether the connection is up (`/healthz`).
    up: Arc<AtomicBool>,
    options: ClusterOptions,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("node", &self.node)
            .field("shards", &self.shards)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Connect and create (or check) the streams.
    pub async fn connect(options: ClusterOptions) -> Result<Engine, ClusterError> {
        if options.urls.is_empty() {
            return Err(ClusterError::Config("no NATS URL given".into()));
        }
        let mut addrs = Vec::new();
        for url in &options.urls {
            let addr: async_nats::ServerAddr = url
                .parse()
                .map_err(|e| ClusterError::Config(format!("{url}: {e}")))?;
            addrs.push(addr);
        }
        let up = Arc::new(AtomicBool::new(false));
        let client = async_nats::ConnectOptions::new()
            .name("syncline")
            .connection_timeout(Duration::from_secs(5))
            // A server that stops answering (paused, cut off) without
            // closing the socket is given up after two missed pings, so
            // the node moves to another within seconds, not minutes.
            .ping_interval(Duration::from_secs(2))
            .event_callback(move |event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("connected to the NATS cluster"),
                    async_nats::Event::Disconnected => {
                        tracing::warn!("lost the NATS cluster; reconnecting");
                    }
                    other => tracing::debug!("NATS: {other}"),
                }
            })
            .connect(addrs)
            .await
            .map_err(engine)?;
        up.store(true, Ordering::Relaxed);
        let max_payload = client.server_info().max_payload;
        let js = jetstream::new(client.clone());
        // Several nodes starting at once race to create the streams, and a
        // young engine may still be electing leaders: retry for a while.
        let started = std::time::Instant::now();
        let shards = loop {
            match ensure_streams(&js, &options).await {
                Ok(k) => break k,
                Err(e @ (ClusterError::Config(_) | ClusterError::Unsafe(_))) => return Err(e),
                Err(e) if started.elapsed() > Duration::from_secs(30) => return Err(e),
                Err(e) => {
                    tracing::info!("setting up the streams: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        tokio::spawn(watch_health(js.clone(), client.clone(), shards, up.clone()));
        let node = format!("{:016x}", rand_u64());
        tracing::info!(shards, max_payload, node, "cluster mode: streams ready");
        Ok(Engine {
            js,
            client,
            node,
            shards,
            max_payload,
            up,
            options,
        })
    }

    /// Whether the engine is reachable now.
    pub fn up(&self) -> Arc<AtomicBool> {
        self.up.clone()
    }

    /// Largest change the cluster can store in one message.
    pub fn max_change_bytes(&self) -> usize {
        self.max_payload.saturating_sub(PAYLOAD_HEADROOM).max(1024)
    }

    /// Largest batch encoding one message may carry.
    pub fn max_message_bytes(&self) -> usize {
        self.max_payload.saturating_sub(4 << 10)
    }

    /// The shard of a database.
    pub fn shard_of(&self, db: &DbName) -> u32 {
        shard_of(db, self.shards)
    }

    /// The subject of a database's messages.
    pub fn subject(&self, db: &DbName) -> String {
        format!("sl.e.{}.{}", self.shard_of(db), subject_token(db))
    }

    /// This node's id (the prefix of its message ids).
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The plain NATS connection (presence: never stored).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context.
    pub fn js(&self) -> &jetstream::Context {
        &self.js
    }

    /// Shards.
    pub fn shards(&self) -> u32 {
        self.shards
    }

    /// The settings it was started with.
    pub fn options(&self) -> &ClusterOptions {
        &self.options
    }

    /// Every database the streams hold messages of.
    pub async fn list(&self) -> Result<Vec<DbName>, ClusterError> {
        use futures_util::TryStreamExt;
        let mut names = Vec::new();
        for k in 0..self.shards {
            let stream = self.js.get_stream(stream_name(k)).await.map_err(engine)?;
            let mut subjects = stream
                .info_with_subjects(format!("sl.e.{k}.>"))
                .await
                .map_err(engine)?;
            while let Some((subject, _count)) = subjects.try_next().await.map_err(engine)? {
                if let Some(db) = subject.rsplit('.').next().and_then(db_of_token) {
                    names.push(db);
                }
            }
        }
        Ok(names)
    }
}

/// Keep `up` true only while the engine answers: connected, and every
/// shard stream's leader answering an info request within 2 s (after an
/// engine restart, streams elect leaders before they take writes).
async fn watch_health(
    js: jetstream::Context,
    client: async_nats::Client,
    shards: u32,
    up: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        let mut ok = client.connection_state() == async_nats::connection::State::Connected;
        for k in 0..shards {
            if !ok {
                break;
            }
            let info = async {
                let mut s = js.get_stream(stream_name(k)).await.ok()?;
                s.info().await.ok().map(|_| ())
            };
            ok = matches!(
                tokio::time::timeout(Duration::from_secs(2), info).await,
                Ok(Some(()))
            );
        }
        if up.swap(ok, Ordering::Relaxed) != ok {
            if ok {
                tracing::info!("the NATS cluster answers again");
            } else {
                tracing::warn!("the NATS cluster does not answer: /healthz is 503");
            }
        }
        if Arc::strong_count(&up) == 1 {
            return;
        }
    }
}

/// The stream of shard `k`.
pub fn stream_name(k: u32) -> String {
    format!("SL_E_{k}")
}

/// A database's shard: FNV-1a of its name (stable across versions and
/// machines: every node must agree).
pub fn shard_of(db: &DbName, shards: u32) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in db.as_str().bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h % shards.max(1)
}

/// A database name as one subject token: `.` separates tokens, so it is
/// written `_d`, and `_` doubles (`__`) so the mapping is injective. Names
/// hold only ASCII letters, digits, `.`, `_` and `-` (never `*`, `>` or
/// white space).
pub fn subject_token(db: &DbName) -> String {
    let mut out = String::with_capacity(db.as_str().len() + 4);
    for c in db.as_str().chars() {
        match c {
            '.' => out.push_str("_d"),
            '_' => out.push_str("__"),
            c => out.push(c),
        }
    }
    out
}

/// The inverse of [`subject_token`] (`None` for a token it never makes).
pub fn db_of_token(token: &str) -> Option<DbName> {
    let mut out = String::with_capacity(token.len());
    let mut chars = token.chars();
    while let Some(c) = chars.next() {
        match c {
            '_' => match chars.next()? {
                'd' => out.push('.'),
                '_' => out.push('_'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    DbName::new(out).ok()
}

fn rand_u64() -> u64 {
    let id = syncline_core::ReplicaId::random();
    u64::from_le_bytes(id.0[..8].try_into().unwrap_or([0; 8]))
}

/// Create the shard streams, or check the existing ones; returns K.
async fn ensure_streams(
    js: &jetstream::Context,
    options: &ClusterOptions,
) -> Result<u32, ClusterError> {
    let shards = match js.get_stream(stream_name(0)).await {
        Ok(mut s) => {
            let info = s.info().await.map_err(engine)?;
            info.config
                .metadata
                .get(SHARDS_KEY)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|k| *k > 0)
                .ok_or_else(|| {
                    ClusterError::Engine(format!(
                        "stream {} exists without a valid {SHARDS_KEY}",
                        stream_name(0)
                    ))
                })?
        }
        Err(_) => options.shards.max(1),
    };
    for k in 0..shards {
        let config = stream_config(k, shards, options.replicas);
        let mut s = js.get_or_create_stream(config).await.map_err(engine)?;
        let info = s.info().await.map_err(engine)?;
        let c = &info.config;
        // A stream that drops or forgets messages, or holds them in memory
        // or on fewer replicas, would break the durability contract.
        if c.storage != stream::StorageType::File
            || c.num_replicas < options.replicas
            || c.discard != stream::DiscardPolicy::New
            || c.max_messages > 0
            || c.max_bytes > 0
            || c.max_age > Duration::ZERO
        {
            return Err(ClusterError::Unsafe(format!(
                "stream {} exists with settings that can lose messages \
                 (storage {:?}, replicas {}, discard {:?}, limits {}/{}/{:?})",
                c.name,
                c.storage,
                c.num_replicas,
                c.discard,
                c.max_messages,
                c.max_bytes,
                c.max_age
            )));
        }
    }
    Ok(shards)
}

fn stream_config(k: u32, shards: u32, replicas: usize) -> stream::Config {
    stream::Config {
        name: stream_name(k),
        subjects: vec![format!("sl.e.{k}.>")],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        deny_delete: true,
        metadata: HashMap::from([(SHARDS_KEY.to_string(), shards.to_string())]),
        ..stream::Config::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_tokens_are_one_token_and_map_back_to_the_exact_name() {
        for name in [
            "todo", "a.b", "a_d", "a._", "x__d.y", "A-b.C_", "a..b", "_d",
        ] {
            let db = DbName::new(name).unwrap();
            let t = subject_token(&db);
            assert!(
                !t.contains('.') && !t.contains('*') && !t.contains('>'),
                "{t}"
            );
            assert_eq!(db_of_token(&t), Some(db), "{name}");
        }
        // `a.b` and `a_db` must not share a token.
        let a = subject_token(&DbName::new("a.b").unwrap());
        let b = subject_token(&DbName::new("a_db").unwrap());
        assert_ne!(a, b);
        assert_eq!(db_of_token("a_x"), None);
    }

    #[test]
    fn shards_are_stable() {
        let db = DbName::new("todo-1").unwrap();
        assert_eq!(shard_of(&db, 4), shard_of(&db, 4));
        assert!(shard_of(&db, 4) < 4);
        assert_eq!(shard_of(&db, 1), 0);
    }
}
