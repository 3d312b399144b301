//! The sync server: HTTP and WebSocket on one port (axum, whose WebSocket is
//! tokio-tungstenite), a hub task driving the core `Server`, the file store.
//!
//! `GET /sync` upgrades to the sync protocol, `GET /healthz` answers 200 while
//! serving, `GET /metrics` is Prometheus text, anything else is a static file
//! from the optional static directory (the demos; `files.rs` says what of it
//! is never served).

mod budget;
mod files;
mod heavy;
mod http;
mod hub;
mod metrics;
mod rate;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures_util::{FutureExt, SinkExt, StreamExt};
use syncline_core::ReplicaId;
use syncline_core::protocol::{self, ErrorCode, Message};
use syncline_core::sync::{CheckedHello, DatabaseQuota, Reply, Server, ServerConfig};
use tokio::net::TcpListener;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

pub use hub::HubConfig;
pub(crate) use hub::HubMsg;
pub use metrics::Metrics;

use crate::auth::TokenAuth;
use crate::store::{FileStore, StoreError};
use hub::{ConnHandle, Out};

/// Everything `syncline serve` can be told.
#[derive(Debug)]
pub struct ServeOptions {
    /// Data directory.
    pub data: PathBuf,
    /// How tokens are checked.
    pub auth: TokenAuth,
    /// Database patterns open to anonymous clients (read and write).
    pub anonymous: Vec<String>,
    /// TLS on the listening port (`--tls-cert`, `--tls-key`); `None`: plain.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Web origins whose pages may open `/sync` (`--allowed-origins`;
    /// `*` wildcards). Empty: any. Requests without an `Origin` header
    /// (native clients) are not browsers' and pass.
    pub allowed_origins: Vec<String>,
    /// Names clients dial this server by (`--server-name`): each `Hello`
    /// must be signed for one. Empty: the request's `Host` header.
    pub server_names: Vec<String>,
    /// Most simultaneous connections.
    pub max_connections: usize,
    /// Most simultaneous WebSocket connections from one IP address
    /// (loopback too); twice as many TCP connections, HTTP included.
    pub max_connections_per_ip: usize,
    /// WebSocket handshakes per second one address may open (in bursts of
    /// up to `max_connections_per_ip`).
    pub handshakes_per_ip: u32,
    /// Largest frame accepted.
    pub max_frame: usize,
    /// Most entries per push.
    pub max_entries_per_push: usize,
    /// Bytes queued for one connection before it is dropped as too slow.
    pub max_queued_bytes: usize,
    /// Directory of static files to serve (the demos), if any. Dotfiles,
    /// dot-directories and symlinks leading out of it are not served; it
    /// must not hold the data directory (the binary checks that at start).
    pub static_dir: Option<PathBuf>,
    /// Compact a database once its log holds this many bytes of changes.
    pub compact_after_bytes: usize,
    /// Build document views in the background and send them with cold syncs.
    pub serve_views: bool,
    /// How long a database goes without a write before its views are built.
    pub views_quiet: Duration,
    /// How long at most a changed document waits for its view while
    /// writes keep coming.
    pub views_max_wait: Duration,
    /// How long a new connection may take to send its first frame (Hello)
    /// before it is closed, so silent sockets cannot hold every slot.
    pub hello_timeout: Duration,
    /// How often the server pings each connection. A connection from which
    /// nothing (not even a pong) arrives for two intervals is closed, and so
    /// is one whose frame cannot be written within two intervals.
    pub ping_interval: Duration,
    /// Where `/metrics` is served instead of the main listener
    /// (`--metrics-listen`); `None` serves it beside `/sync`.
    pub metrics_listener: Option<TcpListener>,
    /// Let metrics name databases (`--metrics-db-labels`).
    pub metrics_db_labels: bool,
    /// Most databases one connection may subscribe to at once.
    pub max_subscriptions_per_peer: usize,
    /// Largest presence state a client may publish.
    pub max_presence_bytes: usize,
    /// Presence announcements per second one connection may cause.
    pub presence_per_second: u32,
    /// Log files the store keeps open at once (least recently written
    /// closed past it).
    pub max_open_files: usize,
    /// Bytes the loaded databases may hold before idle ones are unloaded.
    pub max_loaded_bytes: usize,
    /// Bytes one database may hold before pushes to it are refused.
    pub max_database_bytes: usize,
    /// Databases each anonymous pattern may hold (creating one more is
    /// refused, except to an admin).
    pub max_anonymous_databases: usize,
    /// Bytes the logs may take on disk before every push is refused
    /// (0: no limit).
    pub max_disk_bytes: u64,
    /// Bytes a second one connection's frames are read at, at most (every
    /// frame counted as at least [`rate::MIN_CHARGE`]), in bursts of up to
    /// four seconds' worth or one largest frame.
    pub read_bytes_per_sec: u64,
    /// Cluster mode (`--cluster`): databases live in a NATS JetStream
    /// cluster shared with other nodes; the data directory keeps only this
    /// node's own files (its replica id, `subjects.jsonl`).
    pub cluster: Option<crate::cluster::ClusterOptions>,
    /// Cluster mode with the engine already connected (the binary connects
    /// before it says it is listening); else `cluster` is connected here.
    pub engine: Option<crate::cluster::Engine>,
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The store failed to open.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Serving HTTP failed.
    #[error("http: {0}")]
    Http(#[from] std::io::Error),
    /// Cluster mode could not start.
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    /// The static directory cannot be served.
    #[error("static directory {}: {source}", dir.display())]
    Static {
        /// The directory given.
        dir: PathBuf,
        /// Why not.
        source: std::io::Error,
    },
}

#[derive(Clone)]
struct AppState {
    hub: mpsc::Sender<HubMsg>,
    /// `--allowed-origins`.
    allowed_origins: Arc<Vec<String>>,
    /// The hub's authenticator: connections check their own `Hello`'s
    /// token and proof, so the hub spends no signature verification.
    /// Shared: every connection task holds the state as long as it runs.
    auth: Arc<TokenAuth>,
    metrics: Arc<Metrics>,
    permits: Arc<Semaphore>,
    per_ip: Arc<http::PerIp>,
    /// KiB of messages on their way to the hub ([`hub::HELD_KIB`]).
    held: Arc<Semaphore>,
    /// Threads for expensive work ([`hub::heavy_threads`] of them, at a
    /// lower priority), shared with the hub's push validation.
    heavy: heavy::Heavy,
    max_frame: usize,
    hello_timeout: Duration,
    ping_interval: Duration,
    /// Per connection read rate, bytes a second.
    read_bytes_per_sec: u64,
    /// When `/metrics` last asked the hub for its counts.
    last_stats: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// Serve on `listener` until `shutdown` resolves; then close every
/// connection with `ShuttingDown` and wait for pending writes to be durable.
pub async fn run(
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let files = match &options.static_dir {
        Some(dir) => Some(files::serve_dir(dir).map_err(|source| ServeError::Static {
            dir: dir.clone(),
            source,
        })?),
        None => None,
    };
    let metrics = Arc::new(Metrics::new(options.metrics_db_labels));
    let observer_metrics = metrics.clone();
    let store = FileStore::open_with(
        &options.data,
        Arc::new(move |d: Duration| observer_metrics.fsync_seconds.observe(d.as_secs_f64())),
        options.max_open_files,
    )?;
    let replica = server_replica(&store).await?;
    let subjects =
        crate::store::subjects::Subjects::open(&options.data).map_err(|source| StoreError::Io {
            context: format!(
                "reading {}",
                options
                    .data
                    .join(crate::store::subjects::SUBJECTS_FILE)
                    .display()
            ),
            source,
        })?;
    let engine = match (options.engine.clone(), options.cluster.clone()) {
        (Some(engine), _) => Some(engine),
        (None, Some(c)) => Some(crate::cluster::Engine::connect(c).await?),
        (None, None) => None,
    };
    let mut change_limits = syncline_core::ChangeLimits::default();
    let mut max_frame = options.max_frame;
    if let Some(engine) = &engine {
        // One change must fit one message of the engine's: the server
        // refuses a larger one, and clients, which push in frames of at
        // most half the announced limit, keep a larger one local and say
        // so (`TooLarge`) instead of sending it.
        change_limits.max_bytes = change_limits.max_bytes.min(engine.max_change_bytes());
        max_frame = max_frame.min(2 * engine.max_change_bytes()).max(64 << 10);
    }
    let cluster_mode = engine.is_some();
    let mut server = Server::new(
        ServerConfig {
            change_limits,
            // Presence spans the cluster: connection ids must not collide
            // across nodes (kept under 2^52 for JavaScript's numbers).
            share_presence: cluster_mode,
            peer_id_base: if cluster_mode {
                let r = ReplicaId::random().0;
                (u64::from(r[0]) << 44 | u64::from(r[1]) << 36 | u64::from(r[2]) << 28).max(1)
            } else {
                1
            },
            replica,
            max_frame,
            max_entries_per_push: options.max_entries_per_push,
            serve_views: options.serve_views,
            // Large pushes are parsed on the heavy threads, not in the
            // hub that serves every connection.
            defer_validation: true,
            max_subscriptions_per_peer: options.max_subscriptions_per_peer,
            max_presence_bytes: options.max_presence_bytes,
            // The hub ticks `Server::expire` once a second.
            presence_per_tick: options.presence_per_second,
            max_database_bytes: options.max_database_bytes,
            server_names: options.server_names.clone(),
            database_quotas: options
                .anonymous
                .iter()
                .map(|pattern| DatabaseQuota {
                    pattern: pattern.clone(),
                    max_databases: options.max_anonymous_databases,
                })
                .collect(),
            ..ServerConfig::default()
        },
        options.auth.clone(),
    );
    if !options.anonymous.is_empty() {
        // Anonymous patterns have a quota of databases: count what exists.
        let names = match &engine {
            Some(engine) => engine.list().await?,
            None => store.list_blocking()?,
        };
        server.count_databases(&names);
    }
    let (hub_tx, hub_rx) = mpsc::channel(4096);
    let mut engine_up = None;
    let cluster = match engine {
        Some(engine) => {
            // The tails start from the streams' ends now, before any load.
            crate::cluster::spawn_tails(&engine, hub_tx.clone(), metrics.clone()).await?;
            let presence = crate::cluster::spawn_presence(&engine, hub_tx.clone()).await?;
            engine_up = Some(engine.up());
            Some(crate::cluster::ClusterHub::new(
                engine,
                hub_tx.clone(),
                metrics.clone(),
                presence,
            ))
        }
        None => None,
    };
    let pools = heavy::Pools::start(hub::heavy_threads())?;
    let heavy = pools.heavy.clone();
    let hub_task = tokio::spawn(hub::run(
        server,
        hub::Storage {
            store,
            subjects,
            cluster,
        },
        metrics.clone(),
        HubConfig {
            max_queued_bytes: options.max_queued_bytes,
            compact_after_bytes: options.compact_after_bytes,
            view_quiet: options.views_quiet,
            view_max_wait: options.views_max_wait,
            max_loaded_bytes: options.max_loaded_bytes,
            max_disk_bytes: options.max_disk_bytes,
            ..HubConfig::default()
        },
        (hub_tx.clone(), hub_rx),
        pools,
    ));
    let state = AppState {
        hub: hub_tx.clone(),
        allowed_origins: Arc::new(options.allowed_origins.clone()),
        auth: Arc::new(options.auth.clone()),
        metrics,
        permits: Arc::new(Semaphore::new(options.max_connections)),
        per_ip: http::PerIp::with_rate(
            options.max_connections_per_ip,
            f64::from(options.handshakes_per_ip),
            options.max_connections_per_ip as f64,
        ),
        held: Arc::new(Semaphore::new(hub::HELD_KIB)),
        heavy,
        max_frame,
        hello_timeout: options.hello_timeout,
        ping_interval: options.ping_interval.max(Duration::from_millis(10)),
        read_bytes_per_sec: options.read_bytes_per_sec,
        last_stats: Arc::new(std::sync::Mutex::new(None)),
    };
    let metrics_app = Router::new().route("/metrics", get(metrics_text));
    let mut metrics_task = None;
    let mut app = Router::new()
        .route("/sync", get(upgrade))
        .route("/healthz", get(move || healthz(engine_up.clone())));
    match options.metrics_listener {
        Some(listener) => {
            let metrics_app = metrics_app.with_state(state.clone());
            metrics_task = Some(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, metrics_app).await {
                    tracing::error!("serving metrics: {e}");
                }
            }));
        }
        None => app = app.merge(metrics_app),
    }
    let mut app = app.with_state(state);
    if let Some(files) = files {
        app = app.fallback_service(files);
    }
    let hub_for_shutdown = hub_tx.clone();
    let graceful = async move {
        shutdown.await;
        tracing::info!("shutting down: closing connections, flushing the store");
        let (done, wait) = oneshot::channel();
        if hub_for_shutdown
            .send(HubMsg::Shutdown { done })
            .await
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(30), wait).await;
        }
    };
    let tcp_per_ip = http::PerIp::new(options.max_connections_per_ip.saturating_mul(2));
    http::serve(
        budget::BudgetedListener(listener),
        app,
        tcp_per_ip,
        options.tls.clone().map(tokio_rustls::TlsAcceptor::from),
        graceful,
    )
    .await;
    drop(hub_tx);
    hub_task.abort();
    if let Some(task) = metrics_task {
        task.abort();
    }
    Ok(())
}

/// 200 while serving; in cluster mode 503 while the engine is unreachable
/// (writes cannot be acknowledged: a load balancer should drain this node).
async fn healthz(engine_up: Option<Arc<std::sync::atomic::AtomicBool>>) -> Response {
    match engine_up {
        Some(up) if !up.load(Ordering::Relaxed) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "the NATS cluster is unreachable\n",
        )
            .into_response(),
        _ => "ok\n".into_response(),
    }
}

/// The server's own replica id, created once and kept in the data dir.
async fn server_replica(store: &FileStore) -> Result<ReplicaId, StoreError> {
    use syncline_core::Store;
    if let Some(bytes) = store.get_meta("replica").await?
        && let Ok(id) = ReplicaId::from_slice(&bytes)
    {
        return Ok(id);
    }
    let id = ReplicaId::random();
    store.put_meta("replica", &id.0).await?;
    Ok(id)
}

/// How often a scrape may cost the hub a `Stats` message (more frequent
/// scrapes get the counts of the last one).
const STATS_EVERY: Duration = Duration::from_secs(1);

async fn metrics_text(State(state): State<AppState>) -> Response {
    let due = match state.last_stats.lock() {
        Ok(mut last) => {
            let now = std::time::Instant::now();
            let due = last.is_none_or(|t| now.duration_since(t) >= STATS_EVERY);
            if due {
                *last = Some(now);
            }
            due
        }
        Err(_) => false,
    };
    let (reply, rx) = oneshot::channel();
    if due
        && state.hub.send(HubMsg::Stats { reply }).await.is_ok()
        && let Ok((connections, subs)) = rx.await
    {
        let m = &state.metrics;
        m.connections.set(connections as i64);
        m.subscriptions_all
            .set(subs.iter().map(|(_, n)| *n as i64).sum());
        if m.db_labels {
            m.subscriptions.clear();
            for (db, n) in subs.into_iter().filter(|(_, n)| *n > 0) {
                m.subscriptions
                    .get_or_create(&metrics::DbLabel { db: db.to_string() })
                    .set(n as i64);
            }
        }
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        state.metrics.render(),
    )
        .into_response()
}

async fn upgrade(
    ws: WebSocketUpgrade,
    ConnectInfo(conn): ConnectInfo<budget::PeerConn>,
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
) -> Response {
    // What the client dialled: its Hello must be signed for this host
    // (or for one of `--server-name`).
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    if let Some(origin) = headers.get(axum::http::header::ORIGIN)
        && !origin_allowed(&state.allowed_origins, origin.to_str().unwrap_or(""))
    {
        state.metrics.error(ErrorCode::Forbidden.as_str());
        return (
            StatusCode::FORBIDDEN,
            "this page's origin may not use this server (--allowed-origins)\n",
        )
            .into_response();
    }
    let budget::PeerConn { addr, budget } = conn;
    // An IPv4 peer on a dual-stack socket counts as its IPv4 address.
    let ip = addr.ip().to_canonical();
    let Some(slot) = state.per_ip.acquire(ip) else {
        state.metrics.error(ErrorCode::Overloaded.as_str());
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections from your address\n",
        )
            .into_response();
    };
    let Ok(permit) = state.permits.clone().try_acquire_owned() else {
        state.metrics.error(ErrorCode::Overloaded.as_str());
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    // Let slightly oversized frames through the WebSocket layer so they get
    // a typed TooLarge error instead of a bare protocol close.
    let limit = state.max_frame.saturating_add(64 * 1024);
    // tungstenite reserves 128 KiB per connection for each of its read and
    // write buffers by default: most of an idle connection's memory (W5 in
    // BENCHMARKS.md). Small buffers grow when a large frame needs them; the
    // read chunk is only how much one read asks the socket for. 8 KiB cost
    // 24.5 KB per idle connection, 2 KiB 13.6 KB, with no change in durable
    // ingest (frames of ~20 KB).
    ws.max_message_size(limit)
        .max_frame_size(limit)
        .read_buffer_size(2 * 1024)
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            // The request is read: from here until the Hello is accepted,
            // only a Hello's worth of bytes is read from this peer.
            budget.arm(budget::PRE_HELLO_BYTES);
            connection(socket, state, budget, host).await;
            drop(permit);
            drop(slot);
        })
}

/// Whether a page from `origin` may open `/sync`: any when no list is set,
/// else one matching a pattern (`https://*.example.com`), compared in
/// lowercase.
fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    let origin = origin.to_ascii_lowercase();
    allowed.is_empty()
        || allowed
            .iter()
            .any(|p| syncline_core::sync::glob_match(&p.to_ascii_lowercase(), &origin))
}

fn close_frame(code: ErrorCode) -> WsMessage {
    // 4000 + our code: application-defined WebSocket close codes.
    WsMessage::Close(Some(CloseFrame {
        code: 4000 + code.to_u16(),
        reason: code.as_str().into(),
    }))
}

async fn connection(
    socket: WebSocket,
    state: AppState,
    budget: budget::ReadBudget,
    host: Option<String>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<Out>();
    let queued = Arc::new(AtomicUsize::new(0));
    let (kill_tx, kill_rx) = oneshot::channel::<ErrorCode>();
    let (reply, peer) = oneshot::channel();
    let conn = ConnHandle {
        tx: tx.clone(),
        queued: queued.clone(),
        kill: Some(kill_tx),
        slot: None,
    };
    // One reply to Subscribe at a time (see `HubMsg::Message`).
    let reply_slot = Arc::new(Semaphore::new(1));
    if state
        .hub
        .send(HubMsg::Connect { conn, host, reply })
        .await
        .is_err()
    {
        return;
    }
    let Ok(peer) = peer.await else { return };
    let (mut sink, mut stream) = socket.split();
    let (hello_timeout, ping_every) = (state.hello_timeout, state.ping_interval);
    // Silence for two ping intervals means the peer (or its network) is gone.
    let silent_after = ping_every * 2;

    let writer = async {
        // The hub's kill (a slow reader) wins even while a send is blocked on
        // the peer's full socket. A dropped sender (the hub removed the
        // connection after queueing its Close) is not a kill.
        let kill = async move {
            match kill_rx.await {
                Ok(code) => code,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::pin!(kill);
        let mut ping =
            tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The reply being sent, with the slot it gives back when done.
        let mut replying: Option<(Box<Reply>, Option<OwnedSemaphorePermit>)> = None;
        loop {
            let next = match replying.take() {
                // While a reply is under way, its parts go first (the frames
                // queued behind it were meant to follow it) and pings wait:
                // the peer hears from us anyway.
                Some((reply, slot)) => tokio::select! {
                    biased;
                    code = &mut kill => Err(code),
                    part = encode_part(&state, reply) => match part {
                        Some((reply, frame)) => {
                            replying = Some((reply, slot));
                            state.metrics.bytes_out.inc_by(frame.len() as u64);
                            Ok((WsMessage::Binary(frame), 0, false))
                        }
                        None => continue,
                    },
                },
                None => tokio::select! {
                    out = rx.recv() => match out {
                        Some(Out::Frame(frame)) => {
                            let len = frame.len();
                            Ok((WsMessage::Binary(frame), len, false))
                        }
                        Some(Out::Reply { reply, slot }) => {
                            replying = Some((reply, slot));
                            continue;
                        }
                        Some(Out::Close(code)) => Ok((close_frame(code), 0, true)),
                        None => return,
                    },
                    _ = ping.tick() => Ok((WsMessage::Ping(Default::default()), 0, false)),
                    code = &mut kill => Err(code),
                },
            };
            // The hub dropped a slow reader: tell it why (within a second:
            // its socket may never take the frame) and close.
            let bye = async |sink: &mut futures_util::stream::SplitSink<WebSocket, WsMessage>,
                             code: ErrorCode| {
                let err = Message::error(code, "you read too slowly; disconnected", None);
                let bye = async {
                    sink.send(WsMessage::Binary(protocol::encode(&err).into()))
                        .await?;
                    sink.send(close_frame(code)).await
                };
                let _ = tokio::time::timeout(Duration::from_secs(1), bye).await;
            };
            let (msg, len, last) = match next {
                Ok(next) => next,
                Err(code) => {
                    bye(&mut sink, code).await;
                    return;
                }
            };
            // Most sends complete at once (the socket has room); only a
            // blocked one arms the timer (one per frame would cost the
            // fan-out a timer-wheel entry per delivery).
            let mut send = sink.send(msg);
            let sent = match (&mut send).now_or_never() {
                Some(sent) => Ok(sent.is_ok()),
                None => tokio::select! {
                    sent = tokio::time::timeout(silent_after, send) => match sent {
                        Ok(sent) => Ok(sent.is_ok()),
                        Err(_) => {
                            state.metrics.dead_connections.inc();
                            Ok(false)
                        }
                    },
                    // Killed while blocked on the peer's full socket (the
                    // usual way a slow reader goes).
                    code = &mut kill => Err(code),
                },
            };
            queued.fetch_sub(len, Ordering::Relaxed);
            let sent = match sent {
                Ok(sent) => sent,
                Err(code) => {
                    bye(&mut sink, code).await;
                    return;
                }
            };
            if !sent {
                tracing::debug!(peer, "closing: a frame could not be written");
                return;
            }
            if last {
                return;
            }
        }
    };

    // Returns true when it refused the peer (the writer must flush the error).
    let reader = async {
        // Until the Hello the deadline is fixed (pongs do not extend it);
        // after it, any frame restarts the silence clock.
        let mut deadline = tokio::time::Instant::now() + hello_timeout;
        let mut greeted = false;
        let mut rate = rate::ReadRate::new(
            state.read_bytes_per_sec,
            (4 * state.read_bytes_per_sec).max(state.max_frame as u64),
            std::time::Instant::now(),
        );
        loop {
            let msg = match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(msg))) => msg,
                // Before the Hello, a read fails when the peer sends more
                // than a Hello's worth (the read budget): tell it why.
                Ok(Some(Err(_))) if !greeted => {
                    state.metrics.error(ErrorCode::TooLarge.as_str());
                    let text = format!(
                        "the first frame must be a Hello of at most {} bytes",
                        protocol::MAX_HELLO_FRAME
                    );
                    refuse(&tx, ErrorCode::TooLarge, &text);
                    return true;
                }
                Ok(_) => return false,
                Err(_) if !greeted => {
                    state.metrics.error(ErrorCode::ProtocolViolation.as_str());
                    let text = format!("no Hello within {} ms", hello_timeout.as_millis());
                    refuse(&tx, ErrorCode::ProtocolViolation, &text);
                    return true;
                }
                Err(_) => {
                    tracing::debug!(peer, "closing: nothing heard for two ping intervals");
                    state.metrics.dead_connections.inc();
                    return false;
                }
            };
            if greeted {
                deadline = tokio::time::Instant::now() + silent_after;
            }
            let bytes = match msg {
                WsMessage::Binary(b) => b,
                WsMessage::Close(_) => return false,
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                WsMessage::Text(_) => {
                    refuse(
                        &tx,
                        ErrorCode::BadFrame,
                        "text frames are not part of the protocol",
                    );
                    return true;
                }
            };
            state.metrics.bytes_in.inc_by(bytes.len() as u64);
            if greeted {
                // Over its rate, this peer waits (in its own socket) before
                // anything more of it is decoded or handled.
                let wait = rate.spend(bytes.len(), std::time::Instant::now());
                if !wait.is_zero() {
                    state.metrics.read_waits.inc();
                    tokio::time::sleep(wait).await;
                }
            }
            if !greeted {
                // A peer that has presented no token gets one small frame
                // read, which must be an uncompressed Hello: nothing of it
                // is inflated, and nothing more is read until the hub has
                // accepted it (pipelined Subscribes wait in the socket).
                let hello = match protocol::decode_hello(&bytes) {
                    Ok(hello) => hello,
                    Err(e) => {
                        state.metrics.error(e.code().as_str());
                        refuse(&tx, e.code(), &e.to_string());
                        return true;
                    }
                };
                let (accepted, verdict) = oneshot::channel();
                // The signature is checked here, not on the hub.
                let hello = HubMsg::Hello {
                    peer,
                    hello: Box::new(CheckedHello::check_with(hello, &*state.auth)),
                    accepted,
                };
                if state.hub.send(hello).await.is_err() {
                    return false;
                }
                // Refused: the hub has queued the error and the close.
                if verdict.await != Ok(true) {
                    return true;
                }
                greeted = true;
                budget.lift();
                deadline = tokio::time::Instant::now() + silent_after;
                continue;
            }
            match decode(&state, bytes).await {
                Ok(msg) => {
                    // A Subscribe waits (unread further) for the reply to
                    // the one before it to be written.
                    let slot = if matches!(msg, Message::Subscribe(_)) {
                        let Ok(slot) = reply_slot.clone().acquire_owned().await else {
                            return false;
                        };
                        Some(slot)
                    } else {
                        None
                    };
                    // Wait for room before handing it on (and reading more).
                    let kib = msg.held_bytes().div_ceil(1024).min(hub::HELD_KIB);
                    let Ok(held) = state
                        .held
                        .clone()
                        .acquire_many_owned(u32::try_from(kib).unwrap_or(u32::MAX))
                        .await
                    else {
                        return false;
                    };
                    let msg = HubMsg::Message {
                        peer,
                        msg,
                        held,
                        slot,
                    };
                    if state.hub.send(msg).await.is_err() {
                        return false;
                    }
                }
                Err(e) => {
                    let code = e.code();
                    state.metrics.error(code.as_str());
                    refuse(&tx, code, &e.to_string());
                    return true;
                }
            }
        }
    };

    tokio::pin!(writer);
    tokio::select! {
        _ = &mut writer => {}
        refused = reader => {
            if refused {
                // Let the writer deliver the error and the close frame.
                let _ = tokio::time::timeout(Duration::from_secs(5), &mut writer).await;
            }
        }
    }
    let _ = state.hub.send(HubMsg::Disconnect { peer }).await;
}

/// Frames up to this size on the wire, inflating to at most
/// [`LIGHT_INFLATED`], are decoded where they arrive (most frames: live
/// edits, pings, presence); larger ones on the heavy threads, so a peer
/// sending large or inflating frames takes CPU from the other large frames,
/// not from the hub's worker threads.
const LIGHT_WIRE: usize = 64 << 10;
const LIGHT_INFLATED: usize = 1 << 20;

async fn decode(state: &AppState, bytes: Bytes) -> Result<Message, protocol::DecodeError> {
    if bytes.len() <= LIGHT_WIRE {
        match protocol::decode(&bytes, LIGHT_INFLATED) {
            Err(protocol::DecodeError::TooLarge { .. }) if state.max_frame > LIGHT_INFLATED => {}
            done => return done,
        }
    }
    let max = state.max_frame;
    state
        .heavy
        .run(move || protocol::decode(&bytes, max))
        .await
        .unwrap_or_else(|| Err(protocol::DecodeError::Malformed("undecodable".into())))
}

/// Reply parts holding up to this many bytes are encoded where they are
/// sent; larger ones on the heavy threads.
const LIGHT_PART: usize = 32 << 10;

/// The next part of `reply`, encoded, with the rest of the reply; `None`
/// after the last part.
async fn encode_part(state: &AppState, mut reply: Box<Reply>) -> Option<(Box<Reply>, Bytes)> {
    let encode = |mut reply: Box<Reply>| {
        let part = reply.next_part()?;
        let frame = Bytes::from(protocol::encode(&Message::Delta(Box::new(part))));
        Some((reply, frame))
    };
    if reply.bytes_left() <= LIGHT_PART {
        return encode(reply);
    }
    let db = reply.db().clone();
    let encoded = state.heavy.run(move || encode(reply)).await;
    encoded.unwrap_or_else(|| {
        // Nothing here is expected to panic; if it did, the reply ends and
        // the client's next resume asks again.
        tracing::error!(%db, "encoding a reply failed");
        None
    })
}

fn refuse(tx: &mpsc::UnboundedSender<Out>, code: ErrorCode, text: &str) {
    let err = Message::error(code, text, None);
    let _ = tx.send(Out::Frame(protocol::encode(&err).into()));
    let _ = tx.send(Out::Close(code));
}

/// The address a listener is bound to, for logs and tests.
pub fn local_addr(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}
