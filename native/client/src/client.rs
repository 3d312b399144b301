//! The native client: a local replica in a data directory that works offline
//! and syncs with a server whenever it can reach it.
//!
//! A driver task owns the core [`syncline_core::sync::Client`], the local
//! [`FileStore`] and the WebSocket; the [`SyncClient`] handle sends it
//! commands over a channel and reads (`get`, `list`) the replica directly
//! under a short lock. Writes apply locally and are durable before they return;
//! they are pushed when a connection is up. The driver reconnects with
//! jittered exponential backoff.
//!
//! [`SyncClient::in_memory`] runs the same client over a
//! [`syncline_core::MemoryStore`] instead: nothing survives the process
//! (like the npm package's `storage: 'memory'`), which suits tests, load
//! generators and short-lived tools.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::Value as Json;
use syncline_core::protocol::{self, ErrorCode};
use syncline_core::sync::{
    CATCH_UP_IDLE_MS, CATCH_UP_STEP, Client, ClientConfig, ClientEvent, ClientOutput, PresenceView,
    Status,
};
use syncline_core::{
    DbName, DocId, Identity, MemoryStore, PathSeg, ReplicaId, Store, StoredDatabase, store::Batch,
};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::Instant;

/// How often an open connection is probed ([`Client::heartbeat`]).
const HEARTBEAT: Duration = Duration::from_secs(15);
/// A connection that lasted this long earns a fresh backoff when it ends.
const STABLE_AFTER: Duration = Duration::from_secs(10);
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::store::{FileStore, StoreError};

/// Why a client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The in-memory replica failed (its lock was poisoned by a panic).
    #[error(transparent)]
    Memory(#[from] syncline_core::store::MemoryStoreError),
    /// The document operation was refused.
    #[error(transparent)]
    Local(#[from] syncline_core::sync::ClientError),
    /// The client has been closed.
    #[error("the client is closed")]
    Closed,
    /// The server's TLS certificate is not trusted (or TLS failed
    /// otherwise): the client stops dialling. Trust a private CA with
    /// [`ClientOptions::ca_file`].
    #[error("TLS to {url}: {message}")]
    Tls {
        /// The server.
        url: String,
        /// What rustls said.
        message: String,
    },
    /// The TLS set-up failed (a CA file that does not load).
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsError),
    /// The server refused with a typed error. Once the server has refused
    /// a database (`Forbidden`, `Unauthorized`, `TooLarge`) or this client
    /// (`Unauthorized`, `UnknownVersion`), writes to it fail with the
    /// refusal too, until the database syncs again: they could never sync.
    #[error("server refused ({code}): {message}")]
    Server {
        /// The code.
        code: ErrorCode,
        /// The server's text.
        message: String,
    },
    /// The closure given to [`SyncClient::update`] panicked: nothing was
    /// written.
    #[error("the update closure panicked: {0}")]
    UpdatePanicked(String),
    /// The URL is not a WebSocket URL (`ws://host[:port]/path` or `wss://…`).
    #[error("invalid server URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Connecting failed in a way retrying cannot mend (the server answered
    /// the upgrade with 404, say): the client stops dialling.
    #[error("cannot connect to {url}: {message}")]
    Connect {
        /// The server.
        url: String,
        /// What went wrong.
        message: String,
    },
    /// A document or a presence state is not the type asked for (or does
    /// not serialize to a JSON object).
    #[error("JSON: {0}")]
    Json(String),
    /// A setting of [`crate::ClientBuilder`] that cannot work.
    #[error("client settings: {0}")]
    InvalidConfig(String),
    /// [`SyncClient::wait_synced`] was asked of a client with no server.
    #[error("this client has no server to sync with")]
    NoServer,
    /// [`SyncClient::wait_synced_for`] ran out of time.
    #[error("{db} did not sync within {waited:?} ({})", match last_failure {
        Some(cause) => format!("offline: {cause}"),
        None => format!("{status:?}").to_lowercase(),
    })]
    Timeout {
        /// The database.
        db: DbName,
        /// How long it waited.
        waited: Duration,
        /// The connection's status when it gave up.
        status: Status,
        /// Why the last attempt to connect failed, if one did since the
        /// last connection.
        last_failure: Option<String>,
    },
}

type Reply<T> = oneshot::Sender<Result<T, ClientError>>;

/// Where the replica lives: a data directory (durable) or memory.
#[derive(Clone)]
enum Local {
    File(FileStore),
    Memory(MemoryStore),
}

impl Local {
    fn load(
        &self,
        db: &DbName,
    ) -> impl Future<Output = Result<StoredDatabase, ClientError>> + Send + 'static {
        let this = self.clone();
        let db = db.clone();
        async move {
            match this {
                Local::File(f) => Ok(f.load(&db).await?),
                Local::Memory(m) => Ok(m.load_now(&db)?),
            }
        }
    }

    /// Enqueued at once (so writes keep their order); resolves when durable.
    fn write(
        &self,
        db: &DbName,
        batch: &Batch,
    ) -> impl Future<Output = Result<(), ClientError>> + Send + 'static {
        let (file, memory) = match self {
            Local::File(f) => (Some(f.write(db, batch)), Ok(())),
            Local::Memory(m) => (None, m.write_now(db, batch)),
        };
        async move {
            if let Some(w) = file {
                w.await?;
            }
            Ok(memory?)
        }
    }
}

enum Cmd {
    Open(DbName, Reply<()>),
    Edit(DbName, DocId, Edit, Reply<bool>),
    Presence(DbName, Vec<u8>, Reply<()>),
    Status(oneshot::Sender<Status>),
    LastFailure(oneshot::Sender<Option<String>>),
    PresenceView(DbName, oneshot::Sender<PresenceView>),
    WaitSynced(DbName, Reply<()>),
    ListDatabases(Reply<Vec<DbName>>),
    Close(oneshot::Sender<()>),
}

/// A change to one document, made by the driver under the replica's lock.
enum Edit {
    /// Make the document equal the value; strings under the listed keys
    /// are atomic values.
    Put(Json, Vec<String>),
    /// Make the document equal what the closure makes of its current value
    /// (`{}` when absent); atomic keys as for `Put`.
    Update(UpdateFn, Vec<String>),
    /// Splice the text at a path: position, deleted characters, insertion.
    Splice(Vec<PathSeg>, usize, usize, String),
    /// Add to the counter at a path.
    Increment(Vec<PathSeg>, i64),
    Delete,
}

type UpdateFn = Box<dyn FnOnce(&mut Json) + Send>;

/// What the driver's own tasks (connections, file-store writes) report
/// back, on one channel the driver holds the sender of: one queue for the
/// loop to poll and no sender threaded through its functions (measured
/// within the noise against one queue per kind, BENCHMARKS.md §25).
enum Report {
    /// Connected: the driver reads `read` itself and writes through `out`.
    Connected(u64, mpsc::UnboundedSender<Vec<u8>>, WsRead),
    /// The connection failed, or writing to it did.
    Closed(u64),
    /// TLS failed (an untrusted certificate): dialling again will not help.
    TlsFailed(u64, String),
    /// Connecting failed: why, and whether dialling again can help.
    DialFailed(u64, String, bool),
    /// A batch written to the file store is durable (or failed).
    Persisted(DbName, u64, Result<(), String>),
}

/// The receiving half of a connection's WebSocket.
type WsRead = futures_util::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

/// The current connection. The driver reads it in its own loop, so a frame
/// wakes one task, not a reader task that hands it over a channel to the
/// driver (BENCHMARKS.md §24 measures what that saved: little). Writes go
/// through a task of the connection, which ends when `out` is dropped.
struct Conn {
    out: mpsc::UnboundedSender<Vec<u8>>,
    read: WsRead,
}

/// What reading the current connection gave.
enum Read {
    Frame(tokio_tungstenite::tungstenite::Bytes),
    /// Nothing for the client (pings are answered by tungstenite).
    Other,
    /// Closed by the server, or unreadable.
    End,
}

/// The next message of `conn`; never resolves without a connection.
async fn next_read(conn: &mut Option<Conn>) -> Read {
    match conn {
        Some(c) => classify(c.read.next().await),
        None => std::future::pending().await,
    }
}

fn classify(msg: Option<Result<WsMessage, tokio_tungstenite::tungstenite::Error>>) -> Read {
    match msg {
        Some(Ok(WsMessage::Binary(b))) => Read::Frame(b),
        Some(Ok(WsMessage::Close(_))) | Some(Err(_)) | None => Read::End,
        Some(Ok(_)) => Read::Other,
    }
}

/// A handle to a running native client. Cheap to clone.
#[derive(Clone)]
pub struct SyncClient {
    cmd: mpsc::Sender<Cmd>,
    /// The driver's replica, shared so reads ([`SyncClient::get`],
    /// [`SyncClient::list`]) take a short lock instead of a trip through
    /// the driver's queue.
    shared: Shared,
    events: broadcast::Sender<ClientEvent>,
    replica: ReplicaId,
}

// Not derived: the shared replica would print every database it holds.
impl std::fmt::Debug for SyncClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncClient")
            .field("replica", &self.replica)
            .field("closed", &self.cmd.is_closed())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cmd")
    }
}

/// The replica's key, kept in `meta/replica-key` (mode 0600), created on
/// first use. The replica id is derived from it (`meta/replica` keeps a copy
/// for tools that read it).
///
/// A data directory from before replica keys has an id and no key: it
/// gets a key and so a new id. Its old replica's changes stay in the local
/// databases; those a server already has are unaffected, while any never
/// acknowledged cannot be sent under the old id (no one can prove it).
async fn replica_identity(store: &FileStore) -> Result<Identity, ClientError> {
    let old = store.get_meta("replica").await?;
    let seed = store.private_meta("replica-key", || Identity::generate().seed().to_vec())?;
    let seed: [u8; 32] = seed.as_slice().try_into().map_err(|_| {
        ClientError::Store(StoreError::Io {
            context: format!(
                "reading {}",
                store.dir().join("meta").join("replica-key").display()
            ),
            source: std::io::Error::other("a replica key is 32 bytes"),
        })
    })?;
    let identity = Identity::from_seed(seed);
    let replica = identity.replica();
    if old.as_deref() != Some(&replica.0[..]) {
        if let Some(old) = old.as_deref().and_then(|b| ReplicaId::from_slice(b).ok()) {
            tracing::warn!(
                "{}: replica {old} has no key (made by an older version); writing as replica {replica} from now on",
                store.dir().display()
            );
        }
        store.put_meta("replica", &replica.0).await?;
    }
    Ok(identity)
}

/// How a client reaches its server.
#[derive(Debug, Clone, Default)]
pub struct ClientOptions {
    /// PEM certificates of a private CA to trust for `wss://`, besides the
    /// system's roots and Mozilla's.
    pub ca_file: Option<std::path::PathBuf>,
}

/// The TLS configuration the `wss://` URLs among `urls` need.
pub(crate) fn tls_for(
    urls: &[String],
    ca_file: Option<&Path>,
) -> Result<Option<Arc<rustls::ClientConfig>>, ClientError> {
    if urls
        .iter()
        .any(|u| u.to_ascii_lowercase().starts_with("wss://"))
    {
        Ok(Some(crate::tls::client_config(ca_file)?))
    } else {
        Ok(None)
    }
}

/// How a client reaches its servers (made by [`crate::ClientBuilder`]).
pub(crate) struct Settings {
    pub(crate) urls: Vec<String>,
    pub(crate) token: TokenSource,
    pub(crate) backoff: Backoff,
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
}

/// What a failed dial says about TLS, if it was TLS that failed.
fn tls_problem(e: &tokio_tungstenite::tungstenite::Error) -> Option<String> {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Tls(t) => Some(t.to_string()),
        Error::Io(io) => io
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(ToString::to_string),
        _ => None,
    }
}

impl SyncClient {
    /// Every setting in one place: servers (several, tried in turn), a
    /// token or a function that returns a fresh one, where the replica
    /// lives, a private CA, the reconnection backoff.
    ///
    /// ```no_run
    /// # async fn f() -> Result<(), syncline_client::ClientError> {
    /// let client = syncline_client::SyncClient::builder()
    ///     .urls(["wss://a.example.com/sync", "wss://b.example.com/sync"])
    ///     .token_provider(|| std::env::var("SYNCLINE_TOKEN").unwrap_or_default())
    ///     .dir("./replica")
    ///     .build()
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn builder() -> crate::ClientBuilder {
        crate::ClientBuilder::default()
    }

    /// Start a client for `url` (e.g. `ws://127.0.0.1:7070/sync`) with a local
    /// replica in `dir`. Returns at once; connecting happens in the background
    /// (pass `None` as url for a purely local replica). The same as
    /// `SyncClient::builder().url(url).token(token).dir(dir).build()`.
    pub async fn connect(
        url: Option<&str>,
        token: &str,
        dir: impl AsRef<Path>,
    ) -> Result<Self, ClientError> {
        Self::connect_with(url, token, dir, &ClientOptions::default()).await
    }

    /// [`SyncClient::connect`] with options (a private CA for `wss://`).
    pub async fn connect_with(
        url: Option<&str>,
        token: &str,
        dir: impl AsRef<Path>,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let mut b = Self::builder().urls(url).token(token).dir(dir.as_ref());
        if let Some(ca) = &options.ca_file {
            b = b.ca_file(ca);
        }
        b.build().await
    }

    /// Start a client whose replica lives in memory only: a fresh replica id,
    /// nothing kept when it stops (its writes are durable once the server
    /// acknowledges them, see [`SyncClient::wait_synced`]). Must be called
    /// inside a tokio runtime. It cannot fail: a URL that is not a
    /// WebSocket URL fails every wait instead ([`SyncClient::builder`]
    /// with `.in_memory()` refuses it at once).
    pub fn in_memory(url: Option<&str>, token: &str) -> Self {
        let urls: Vec<String> = url.into_iter().map(str::to_owned).collect();
        // The system's and Mozilla's roots always load (a CA file is what
        // can fail, and only the builder takes one).
        let tls = tls_for(&urls, None).unwrap_or_default();
        let settings = Settings {
            urls,
            token: TokenSource::Fixed(token.to_owned()),
            backoff: Backoff::default(),
            tls,
        };
        Self::start(
            settings,
            Local::Memory(MemoryStore::new()),
            Identity::generate(),
        )
    }

    /// [`SyncClient::in_memory`] with options.
    pub fn in_memory_with(
        url: Option<&str>,
        token: &str,
        options: &ClientOptions,
    ) -> Result<Self, ClientError> {
        let urls: Vec<String> = url.into_iter().map(str::to_owned).collect();
        for u in &urls {
            check_url(u)?;
        }
        let tls = tls_for(&urls, options.ca_file.as_deref())?;
        let settings = Settings {
            urls,
            token: TokenSource::Fixed(token.to_owned()),
            backoff: Backoff::default(),
            tls,
        };
        Ok(Self::start(
            settings,
            Local::Memory(MemoryStore::new()),
            Identity::generate(),
        ))
    }

    /// A client on a data directory (its store opened, its key read or made).
    pub(crate) async fn on_dir(settings: Settings, dir: &Path) -> Result<Self, ClientError> {
        let store = FileStore::open(dir)?;
        let identity = replica_identity(&store).await?;
        Ok(Self::start(settings, Local::File(store), identity))
    }

    /// A client in memory.
    pub(crate) fn on_memory(settings: Settings) -> Self {
        Self::start(
            settings,
            Local::Memory(MemoryStore::new()),
            Identity::generate(),
        )
    }

    fn start(settings: Settings, store: Local, identity: Identity) -> Self {
        let Settings {
            urls,
            token,
            backoff,
            tls,
        } = settings;
        let replica = identity.replica();
        let (cmd, cmd_rx) = mpsc::channel(256);
        let (events, _) = broadcast::channel(1024);
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let shared: Shared = Arc::new(Mutex::new(Client::new(
            replica,
            token.current(),
            ClientConfig::default(),
        )));
        // `in_memory` cannot refuse a bad URL: its client says so to every
        // wait instead of dialling it for ever.
        let stopped = urls
            .iter()
            .find_map(|u| check_url(u).err())
            .map(|e| Stopped::Connect(e.to_string()));
        let driver = Driver {
            identity,
            tls,
            stopped,
            last_failure: None,
            client: shared.clone(),
            store,
            urls,
            at: 0,
            token,
            backoff,
            events: events.clone(),
            reports,
            conn: None,
            generation: 0,
            attempts: 0,
            connected_at: None,
            next_attempt: Some(Instant::now()),
            catch_up_at: None,
            last_frames: Instant::now(),
            waiters: HashMap::new(),
            listings: Vec::new(),
            refused: HashMap::new(),
            fatal: None,
        };
        tokio::spawn(driver.run(cmd_rx, reports_rx));
        SyncClient {
            cmd,
            shared,
            events,
            replica,
        }
    }

    /// This replica's id (kept in the data directory, if there is one).
    pub fn replica(&self) -> ReplicaId {
        self.replica
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(make(tx))
            .await
            .map_err(|_| ClientError::Closed)?;
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Open (load and start syncing) a database.
    pub async fn open(&self, db: &DbName) -> Result<(), ClientError> {
        self.call(|r| Cmd::Open(db.clone(), r)).await
    }

    /// A document as JSON (`None` if absent or deleted). Reads the
    /// replica directly (a short lock, not a trip through the driver's
    /// queue), so it shows every write that has returned and every change
    /// announced by an event received before the call; a write whose future
    /// has not been awaited yet may still be queued, and not shown.
    pub fn get(&self, db: &DbName, doc: &DocId) -> Result<Option<Json>, ClientError> {
        self.read(db, |d| d.get(doc))
    }

    /// Make a document equal `value` (minimal changes). Durable locally on
    /// return; `Ok(true)` if the document changed, `Ok(false)` if it was
    /// already equal. Strings are collaborative text: concurrent edits of
    /// one merge character by character ([`SyncClient::put_with`] for
    /// values).
    ///
    /// `put` writes the whole value: a copy read before a remote change
    /// arrived undoes that change where it differs. To change a document
    /// from what it is now, use [`SyncClient::update`] (read and write in
    /// one step), [`SyncClient::increment`] or [`SyncClient::splice_text`].
    pub async fn put(&self, db: &DbName, doc: &DocId, value: Json) -> Result<bool, ClientError> {
        self.put_with(db, doc, value, &[]).await
    }

    /// Change a document from its current value: `f` gets the value as it
    /// is when the write happens (`{}` if absent) and changes it in place;
    /// the document is then made equal to the result, as [`SyncClient::put`]
    /// does. No remote change can arrive between the read and the write, so
    /// only what `f` changed is written:
    ///
    /// ```no_run
    /// # async fn f(client: syncline_client::SyncClient) -> Result<(), syncline_client::ClientError> {
    /// use syncline_client::{DbName, DocId};
    /// let (db, doc) = (DbName::new("todo").unwrap(), DocId::new("t1").unwrap());
    /// client.update(&db, &doc, |d| d["done"] = true.into()).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// `f` runs on the client's task and holds its replica: keep it short,
    /// and never block in it. A panic in `f` writes nothing and returns
    /// [`ClientError::UpdatePanicked`].
    pub async fn update(
        &self,
        db: &DbName,
        doc: &DocId,
        f: impl FnOnce(&mut Json) + Send + 'static,
    ) -> Result<bool, ClientError> {
        self.update_with(db, doc, &[], f).await
    }

    /// [`SyncClient::update`] with atomic keys (see [`SyncClient::put_with`]).
    pub async fn update_with(
        &self,
        db: &DbName,
        doc: &DocId,
        atomic: &[&str],
        f: impl FnOnce(&mut Json) + Send + 'static,
    ) -> Result<bool, ClientError> {
        let atomic = atomic.iter().map(|k| (*k).to_owned()).collect();
        let edit = Edit::Update(Box::new(f), atomic);
        self.call(|r| Cmd::Edit(db.clone(), doc.clone(), edit, r))
            .await
    }

    /// Add `by` to the counter at `path` (created at 0 if absent). Counters
    /// merge concurrent additions: two replicas adding 1 make 2.
    pub async fn increment(
        &self,
        db: &DbName,
        doc: &DocId,
        path: &[&str],
        by: i64,
    ) -> Result<bool, ClientError> {
        let edit = Edit::Increment(path_of(path), by);
        self.call(|r| Cmd::Edit(db.clone(), doc.clone(), edit, r))
            .await
    }

    /// Edit the collaborative text at `path` (created if absent): delete
    /// `delete` characters at `index`, then insert `insert` there. Indices
    /// count Unicode scalar values.
    pub async fn splice_text(
        &self,
        db: &DbName,
        doc: &DocId,
        path: &[&str],
        index: usize,
        delete: usize,
        insert: &str,
    ) -> Result<bool, ClientError> {
        let edit = Edit::Splice(path_of(path), index, delete, insert.to_owned());
        self.call(|r| Cmd::Edit(db.clone(), doc.clone(), edit, r))
            .await
    }

    /// [`SyncClient::put`] where strings under the keys in `atomic` (at any
    /// depth) are values replaced whole: ids, enums, timestamps, where a
    /// character merge of concurrent writes would make nonsense.
    pub async fn put_with(
        &self,
        db: &DbName,
        doc: &DocId,
        value: Json,
        atomic: &[&str],
    ) -> Result<bool, ClientError> {
        let atomic = atomic.iter().map(|k| (*k).to_owned()).collect();
        let edit = Edit::Put(value, atomic);
        self.call(|r| Cmd::Edit(db.clone(), doc.clone(), edit, r))
            .await
    }

    /// Delete a document. Durable locally on return.
    pub async fn delete(&self, db: &DbName, doc: &DocId) -> Result<bool, ClientError> {
        self.call(|r| Cmd::Edit(db.clone(), doc.clone(), Edit::Delete, r))
            .await
    }

    /// For every open database, a `Changed` event naming all its documents
    /// (what [`SyncClient::event_stream`] says after missed events).
    pub(crate) fn everything_changed(&self) -> Vec<ClientEvent> {
        let c = lock(&self.shared);
        c.databases()
            .filter_map(|db| {
                let d = c.database(db)?;
                Some(ClientEvent::Changed {
                    db: db.clone(),
                    docs: d.list(),
                    remote: true,
                })
            })
            .collect()
    }

    /// Ids of the existing documents (read as [`SyncClient::get`] reads).
    pub fn list(&self, db: &DbName) -> Result<Vec<DocId>, ClientError> {
        self.read(db, |d| d.list())
    }

    /// How many remote changes a document shows that automerge has not
    /// applied yet (a diagnostic; they are in the log either way, and the
    /// driver applies them once the connection has been quiet for
    /// [`CATCH_UP_IDLE_MS`], or before the document's next write).
    pub fn changes_behind(&self, db: &DbName, doc: &DocId) -> Result<usize, ClientError> {
        self.read(db, |d| d.changes_behind(doc))
    }

    fn read<T>(
        &self,
        db: &DbName,
        f: impl FnOnce(&syncline_core::Database) -> T,
    ) -> Result<T, ClientError> {
        if self.cmd.is_closed() {
            return Err(ClientError::Closed);
        }
        let c = lock(&self.shared);
        c.database(db)
            .map(f)
            .ok_or_else(|| syncline_core::sync::ClientError::NotOpen(db.clone()).into())
    }

    /// Publish this connection's presence state on a database.
    pub async fn set_presence(&self, db: &DbName, state: Vec<u8>) -> Result<(), ClientError> {
        self.call(|r| Cmd::Presence(db.clone(), state, r)).await
    }

    /// Who is on a database now (peers with their state, and the live
    /// count of connections subscribed to it).
    pub async fn presence(&self, db: &DbName) -> PresenceView {
        let (tx, rx) = oneshot::channel();
        if self
            .cmd
            .send(Cmd::PresenceView(db.clone(), tx))
            .await
            .is_err()
        {
            return PresenceView::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Connection status.
    pub async fn status(&self) -> Status {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Status(tx)).await.is_err() {
            return Status::Offline;
        }
        rx.await.unwrap_or(Status::Offline)
    }

    /// The databases on the server this client's (admin) token administers.
    /// Fails with `Forbidden` for other tokens; needs a connection.
    pub async fn list_databases(&self) -> Result<Vec<DbName>, ClientError> {
        self.call(Cmd::ListDatabases).await
    }

    /// Wait until the database is in sync: the server's reply arrived and
    /// every local change is durable on the server. Fails on a server refusal
    /// for this database (e.g. `Forbidden`), and at once with
    /// [`ClientError::NoServer`] for a client without a URL. Offline, it
    /// waits for a connection however long that takes:
    /// [`SyncClient::wait_synced_for`] gives up after a while.
    pub async fn wait_synced(&self, db: &DbName) -> Result<(), ClientError> {
        self.call(|r| Cmd::WaitSynced(db.clone(), r)).await
    }

    /// [`SyncClient::wait_synced`], failing with [`ClientError::Timeout`]
    /// (which says the connection's status) if the database has not synced
    /// within `timeout`.
    pub async fn wait_synced_for(&self, db: &DbName, timeout: Duration) -> Result<(), ClientError> {
        match tokio::time::timeout(timeout, self.wait_synced(db)).await {
            Ok(r) => r,
            Err(_) => Err(ClientError::Timeout {
                db: db.clone(),
                waited: timeout,
                status: self.status().await,
                last_failure: self.last_failure().await,
            }),
        }
    }

    /// Why the last attempt to connect failed (connection refused, a name
    /// that does not resolve, a 502 from a proxy, ...), until a connection
    /// succeeds. Each failure is also a [`ClientEvent::ConnectFailed`].
    pub async fn last_failure(&self) -> Option<String> {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::LastFailure(tx)).await.is_err() {
            return None;
        }
        rx.await.unwrap_or_default()
    }

    /// Every event (changes, acks, status, presence, errors).
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.events.subscribe()
    }

    /// Stop the driver (local data stays on disk).
    pub async fn close(&self) {
        let (tx, rx) = oneshot::channel();
        if self.cmd.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The core client, owned by the driver task and read by the handles. The
/// lock is only ever held for one synchronous step (never across an
/// `await`: the guard is not `Send`, so the compiler refuses that).
type Shared = Arc<Mutex<Client>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Client> {
    // A panic while locked ends the driver task; reads of what it left
    // are still answered (writes report `Closed`).
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Driver {
    /// This replica's key: every connection's `Hello` proves it.
    identity: Identity,
    /// For `wss://` URLs.
    tls: Option<Arc<rustls::ClientConfig>>,
    /// Dialling failed for good (TLS, a 4xx answer): no more dialling.
    stopped: Option<Stopped>,
    /// Why the last dial failed, until one succeeds.
    last_failure: Option<String>,
    client: Shared,
    store: Local,
    /// The servers, tried in turn: a failed dial or a dropped connection
    /// moves on to the next.
    urls: Vec<String>,
    /// Which of `urls` the current (or next) connection dials.
    at: usize,
    token: TokenSource,
    backoff: Backoff,
    events: broadcast::Sender<ClientEvent>,
    /// For the driver's own tasks (connections, file writes).
    reports: mpsc::UnboundedSender<Report>,
    conn: Option<Conn>,
    generation: u64,
    attempts: u32,
    /// When the current connection was made: one that lasted
    /// [`STABLE_AFTER`] earns a fresh backoff when it ends.
    connected_at: Option<Instant>,
    next_attempt: Option<Instant>,
    /// When to hand patched documents' changes to automerge: once nothing
    /// has arrived for a while ([`Client::catch_up`]). Set when frames
    /// arrive and none is due; checked against `last_frames` when it comes.
    catch_up_at: Option<Instant>,
    /// When frames last arrived.
    last_frames: Instant,
    waiters: HashMap<DbName, Vec<Reply<()>>>,
    /// `ListDatabases` requests waiting for their answer (or asked offline).
    listings: Vec<(Option<u32>, Reply<Vec<DbName>>)>,
    /// Databases the server refused (or that cannot be pushed), until they
    /// sync: their waiters fail at once, also those who ask later, and
    /// writes to them fail with the refusal.
    refused: HashMap<DbName, (ErrorCode, String)>,
    /// A refused identity (bad token, unknown version): reconnecting cannot
    /// help, so the driver stops dialling and every waiter fails.
    fatal: Option<(ErrorCode, String)>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Refuse what is not a WebSocket URL before dialling it for ever.
pub(crate) fn check_url(url: &str) -> Result<(), ClientError> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let invalid = |reason: String| ClientError::InvalidUrl {
        url: url.to_owned(),
        reason,
    };
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("ws" | "wss") => {}
        Some("http" | "https") => {
            return Err(invalid(
                "the server's sync endpoint is a WebSocket URL: ws://HOST:PORT/sync \
                 (wss:// for https)"
                    .into(),
            ));
        }
        _ => return Err(invalid("expected ws://HOST:PORT/sync or wss://…".into())),
    }
    url.into_client_request()
        .map(|_| ())
        .map_err(|e| invalid(e.to_string()))
}

/// Why a dial failed, for people, and whether dialling again can help.
fn dial_failure(e: &tokio_tungstenite::tungstenite::Error) -> (String, bool) {
    use tokio_tungstenite::tungstenite::Error;
    match e {
        Error::Url(u) => (u.to_string(), true),
        Error::Http(response) => {
            let status = response.status();
            // 4xx (a wrong path, a proxy refusing the upgrade) stays so;
            // a timeout, a rate limit and 5xx may pass.
            let permanent = status.is_client_error() && !matches!(status.as_u16(), 408 | 429);
            (
                format!("the server answered the WebSocket upgrade with HTTP {status}"),
                permanent,
            )
        }
        Error::Io(io) => (io.to_string(), false),
        other => (other.to_string(), false),
    }
}

fn path_of(path: &[&str]) -> Vec<PathSeg> {
    path.iter().map(|&k| PathSeg::from(k)).collect()
}

/// The text of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// The error a refusal settles callers with.
fn tls_error(url: &str, problem: &str) -> ClientError {
    ClientError::Tls {
        url: url.to_owned(),
        message: problem.to_owned(),
    }
}

/// Why a client stopped dialling.
enum Stopped {
    /// TLS failed (an untrusted certificate).
    Tls(String),
    /// The server (or a proxy) refused the upgrade, e.g. a wrong path.
    Connect(String),
}

impl Stopped {
    fn error(&self, url: &str) -> ClientError {
        match self {
            Stopped::Tls(problem) => tls_error(url, problem),
            Stopped::Connect(message) => ClientError::Connect {
                url: url.to_owned(),
                message: message.clone(),
            },
        }
    }

    fn message(&self) -> String {
        match self {
            Stopped::Tls(m) => format!("TLS: {m}"),
            Stopped::Connect(m) => m.clone(),
        }
    }
}

fn server_error((code, message): &(ErrorCode, String)) -> ClientError {
    ClientError::Server {
        code: *code,
        message: message.clone(),
    }
}

/// tungstenite's default read chunk is 128 KiB, and it zeroes that much of
/// its buffer before every read: with live changes of a few hundred bytes
/// that memset was a fifth of a subscriber's CPU (W3 in BENCHMARKS.md). The
/// buffer still grows for large frames (cold syncs); the chunk only bounds
/// how much one read asks the socket for. Frames are written at once.
fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(8 * 1024)
        .write_buffer_size(0)
}

/// How long to wait before dialling again: `min` doubled per failed
/// attempt, at most `max`, with jitter.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Backoff {
    pub(crate) min: Duration,
    pub(crate) max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(100),
            max: Duration::from_secs(10),
        }
    }
}

impl Backoff {
    fn delay(&self, attempts: u32) -> Duration {
        let base = self
            .min
            .saturating_mul(1 << attempts.min(16))
            .min(self.max)
            .as_millis() as u64;
        // Jitter from fresh random bytes: 50–100 % of the base.
        let r = ReplicaId::random().0[0] as u64;
        Duration::from_millis(base / 2 + base * r / 512)
    }
}

/// Where the token a connection presents comes from.
#[derive(Clone)]
pub(crate) enum TokenSource {
    Fixed(String),
    /// Asked before every connection (a token refreshed by the app).
    Provider(Arc<dyn Fn() -> String + Send + Sync>),
}

impl TokenSource {
    fn current(&self) -> String {
        match self {
            TokenSource::Fixed(t) => t.clone(),
            TokenSource::Provider(f) => f(),
        }
    }
}

impl Driver {
    fn client(&self) -> MutexGuard<'_, Client> {
        lock(&self.client)
    }

    /// The URL the current (or next) connection dials ("" with none).
    fn url(&self) -> String {
        self.urls.get(self.at).cloned().unwrap_or_default()
    }

    /// Dial the next URL next time.
    fn rotate(&mut self) {
        if !self.urls.is_empty() {
            self.at = (self.at + 1) % self.urls.len();
        }
    }

    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<Cmd>,
        mut reports: mpsc::UnboundedReceiver<Report>,
    ) {
        // One timer for the idle catch-up, moved only when its deadline
        // does (not once per frame).
        let catch_up = tokio::time::sleep_until(Instant::now());
        tokio::pin!(catch_up);
        let mut probe = tokio::time::interval_at(Instant::now() + HEARTBEAT, HEARTBEAT);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // No redialling after a refused identity: it would be refused again.
            let attempt_at = self.next_attempt.filter(|_| {
                !self.urls.is_empty()
                    && self.conn.is_none()
                    && self.fatal.is_none()
                    && self.stopped.is_none()
            });
            if let Some(at) = self.catch_up_at
                && catch_up.deadline() != at
            {
                catch_up.as_mut().reset(at);
            }
            tokio::select! {
                cmd = cmds.recv() => {
                    let Some(cmd) = cmd else { return };
                    if let Cmd::Close(done) = cmd {
                        // Every handle's calls fail with `Closed` from here
                        // on, reads included (they check the channel).
                        cmds.close();
                        let _ = done.send(());
                        return;
                    }
                    self.command(cmd).await;
                }
                read = next_read(&mut self.conn) => self.read(read),
                Some(report) = reports.recv() => self.report(report),
                _ = async { tokio::time::sleep_until(attempt_at.unwrap_or_else(Instant::now)).await }, if attempt_at.is_some() => {
                    self.next_attempt = None;
                    self.dial();
                }
                () = &mut catch_up, if self.catch_up_at.is_some() => self.idle(),
                _ = probe.tick() => {
                    // Nothing heard since the last probe: the connection is
                    // dead even if TCP has not noticed (see Client::heartbeat).
                    if self.conn.is_some() && !self.client().heartbeat() {
                        tracing::info!("no answer from the server since the last probe; reconnecting");
                        self.drop_connection();
                    }
                }
            }
            self.pump();
        }
    }

    /// The catch-up timer fired: one step if the connection has been quiet
    /// long enough (then back to the loop: what arrives meanwhile goes
    /// first), else wait for the rest of the quiet period.
    fn idle(&mut self) {
        let quiet_at = self.last_frames + Duration::from_millis(CATCH_UP_IDLE_MS);
        if Instant::now() < quiet_at {
            self.catch_up_at = Some(quiet_at);
            return;
        }
        let more = self.client().catch_up(CATCH_UP_STEP);
        self.catch_up_at = more.then(Instant::now);
    }

    /// A message of the current connection, with whatever else it has
    /// ready: frames received together are handled as one batch
    /// ([`Client::handle_frames`]).
    fn read(&mut self, first: Read) {
        let mut frames = Vec::new();
        let mut next = Some(first);
        while let Some(read) = next.take() {
            match read {
                Read::Frame(b) => frames.push(b),
                Read::Other => {}
                Read::End => {
                    self.frames(frames);
                    self.drop_connection();
                    return;
                }
            }
            if frames.len() < 256
                && let Some(c) = &mut self.conn
            {
                // Only what is ready now; the loop waits for the rest.
                next = c.read.next().now_or_never().map(classify);
            }
        }
        self.frames(frames);
    }

    fn dial(&mut self) {
        if self.urls.is_empty() {
            return;
        }
        let url = self.url();
        let reports = self.reports.clone();
        self.generation += 1;
        let generation = self.generation;
        let connector = self.tls.clone().map(tokio_tungstenite::Connector::Rustls);
        tokio::spawn(async move {
            // disable_nagle: small pushes leave at once (see the server).
            let ws = match tokio_tungstenite::connect_async_tls_with_config(
                url.as_str(),
                Some(ws_config()),
                true,
                connector,
            )
            .await
            {
                Ok((ws, _)) => ws,
                Err(e) => {
                    if let Some(problem) = tls_problem(&e) {
                        let _ = reports.send(Report::TlsFailed(generation, problem));
                        return;
                    }
                    let (message, permanent) = dial_failure(&e);
                    let _ = reports.send(Report::DialFailed(generation, message, permanent));
                    return;
                }
            };
            let (mut sink, read) = ws.split();
            let (out_tx, mut out_rx) = mpsc::unbounded_channel::<Vec<u8>>();
            let _ = reports.send(Report::Connected(generation, out_tx, read));
            while let Some(frame) = out_rx.recv().await {
                if sink.send(WsMessage::Binary(frame.into())).await.is_err() {
                    let _ = reports.send(Report::Closed(generation));
                    return;
                }
            }
            // The driver dropped the connection: close it politely.
            let _ = sink.close().await;
        });
    }

    fn report(&mut self, report: Report) {
        match report {
            // A connection is current while its generation is: the driver
            // dials (and so moves on) only with none up.
            Report::Connected(g, out, read) if g == self.generation => {
                self.conn = Some(Conn { out, read });
                self.connected_at = Some(Instant::now());
                self.last_failure = None;
                let host = syncline_core::identity::host_of_url(&self.url()).unwrap_or_default();
                let proof = self.identity.prove(&host, now_ms());
                let token = self.token.current();
                let mut c = self.client();
                c.set_token(token);
                c.connected(proof);
            }
            Report::Closed(g) if g == self.generation => self.drop_connection(),
            Report::TlsFailed(g, problem) if g == self.generation => {
                let url = self.url();
                tracing::error!("TLS to {url} failed, not dialling it again: {problem}");
                self.give_up_on_url(Stopped::Tls(problem));
            }
            Report::DialFailed(g, message, permanent) if g == self.generation => {
                let url = self.url();
                self.client().connect_failed(&message, permanent);
                if permanent {
                    tracing::error!("connecting to {url} failed, not dialling it again: {message}");
                    self.give_up_on_url(Stopped::Connect(message));
                } else {
                    // An event says it to the application; a log line per
                    // retry would be noise.
                    tracing::debug!("connecting to {url} failed (will retry): {message}");
                    self.last_failure = Some(message);
                    self.drop_connection();
                }
                self.pump();
            }
            Report::Persisted(db, seq, result) => match result {
                Ok(()) => self.client().persisted(&db, seq),
                Err(e) => tracing::error!(%db, "local write failed: {e}"),
            },
            _ => {} // a stale connection
        }
    }

    /// Handle frames of the current connection; one it cannot read ends it.
    fn frames(&mut self, frames: Vec<tokio_tungstenite::tungstenite::Bytes>) {
        if frames.is_empty() || self.conn.is_none() {
            return;
        }
        self.last_frames = Instant::now();
        if self.catch_up_at.is_none() {
            self.catch_up_at = Some(self.last_frames + Duration::from_millis(CATCH_UP_IDLE_MS));
        }
        if self
            .client()
            .handle_frames(frames.iter().map(|f| &f[..]))
            .is_err()
        {
            self.drop_connection();
        }
    }

    fn drop_connection(&mut self) {
        // Only a connection that lasted resets the backoff: one that fails
        // right after the handshake every time must not redial in a loop.
        let lasted = self
            .connected_at
            .take()
            .is_some_and(|t| t.elapsed() >= STABLE_AFTER);
        if self.conn.take().is_some() && lasted {
            self.attempts = 0;
        }
        self.client().disconnected();
        self.rotate();
        self.attempts = self.attempts.saturating_add(1);
        // After a refused identity the same token would be refused again.
        self.next_attempt = self
            .fatal
            .is_none()
            .then(|| Instant::now() + self.backoff.delay(self.attempts));
    }

    /// The current URL can never work: dial the others, or, if it was the
    /// last, stop.
    fn give_up_on_url(&mut self, why: Stopped) {
        if self.urls.len() <= 1 {
            self.stop(why);
            return;
        }
        self.last_failure = Some(format!("{}: {}", self.url(), why.message()));
        self.urls.remove(self.at);
        // `at` names the URL after the removed one; drop_connection moves
        // on by one, so step back first.
        self.at = (self.at + self.urls.len() - 1) % self.urls.len();
        self.drop_connection();
    }

    /// Stop dialling for good: settle everyone waiting with the reason.
    fn stop(&mut self, why: Stopped) {
        let url = self.url();
        for (_, waiters) in self.waiters.drain() {
            for w in waiters {
                let _ = w.send(Err(why.error(&url)));
            }
        }
        for (_, reply) in self.listings.drain(..) {
            let _ = reply.send(Err(why.error(&url)));
        }
        self.stopped = Some(why);
        self.drop_connection();
        self.next_attempt = None;
    }

    /// Why `db` will not sync on this connection, if the server said so.
    fn refusal_of(&self, db: &DbName) -> Option<&(ErrorCode, String)> {
        self.fatal.as_ref().or(self.refused.get(db))
    }

    /// Remember a refusal that settles `wait_synced` for its database (or,
    /// for a refused identity, for all of them).
    fn refusal(&mut self, db: Option<&DbName>, code: ErrorCode, message: &str) {
        let refusal = (code, message.to_owned());
        match db {
            // A token from a provider may be refreshed: ask again at the
            // next dial (with backoff) instead of giving up.
            None if code == ErrorCode::Unauthorized
                && matches!(self.token, TokenSource::Provider(_)) =>
            {
                tracing::warn!(
                    "the server refused this client's token: {message}; will ask the token provider again"
                );
            }
            None if code.refuses_identity() => {
                tracing::warn!(
                    "the server refused this client ({code}): {message}; not reconnecting"
                );
                self.next_attempt = None;
                // Listings waiting to be sent would wait for ever.
                for (_, reply) in self.listings.drain(..) {
                    let _ = reply.send(Err(server_error(&refusal)));
                }
                self.fatal = Some(refusal);
            }
            Some(db) if code.refuses_database() => {
                self.refused.insert(db.clone(), refusal);
            }
            _ => {}
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Open(db, reply) => {
                if self.client().database(&db).is_none() {
                    match self.store.load(&db).await {
                        Ok(stored) => self.client().open(db, stored),
                        Err(e) => {
                            let _ = reply.send(Err(e));
                            return;
                        }
                    }
                }
                let _ = reply.send(Ok(()));
            }
            Cmd::Edit(db, doc, edit, reply) => {
                // A database the server refused would never take the write:
                // say so rather than keep a change that cannot sync.
                if let Some(r) = self.refusal_of(&db) {
                    let _ = reply.send(Err(server_error(r)));
                    return;
                }
                match self.edit(&db, &doc, edit) {
                    Ok(r) => self.local_write(r, reply).await,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Cmd::Presence(db, state, reply) => {
                let _ = reply.send(self.client().set_presence(&db, state).map_err(Into::into));
            }
            Cmd::Status(reply) => {
                let _ = reply.send(self.client().status());
            }
            Cmd::LastFailure(reply) => {
                let why = self.stopped.as_ref().map(Stopped::message);
                let _ = reply.send(why.or_else(|| self.last_failure.clone()));
            }
            Cmd::PresenceView(db, reply) => {
                let _ = reply.send(self.client().presence(&db));
            }
            Cmd::WaitSynced(db, reply) => {
                if self.urls.is_empty() {
                    let _ = reply.send(Err(ClientError::NoServer));
                } else if let Some(why) = &self.stopped {
                    let url = self.url();
                    let _ = reply.send(Err(why.error(&url)));
                } else if let Some(r) = self.refusal_of(&db) {
                    let _ = reply.send(Err(server_error(r)));
                } else if self.client().is_synced(&db) {
                    let _ = reply.send(Ok(()));
                } else {
                    self.waiters.entry(db).or_default().push(reply);
                }
            }
            Cmd::ListDatabases(reply) => {
                if let Some(why) = &self.stopped {
                    let url = self.url();
                    let _ = reply.send(Err(why.error(&url)));
                    return;
                }
                if let Some(r) = &self.fatal {
                    let _ = reply.send(Err(server_error(r)));
                    return;
                }
                let req = {
                    let mut c = self.client();
                    (c.status() == Status::Online).then(|| c.list_databases())
                };
                self.listings.push((req, reply));
            }
            Cmd::Close(_) => {}
        }
    }

    /// Apply an edit to the replica, under its lock from read to write.
    fn edit(
        &self,
        db: &DbName,
        doc: &DocId,
        edit: Edit,
    ) -> Result<Result<bool, syncline_core::sync::ClientError>, ClientError> {
        let mut c = self.client();
        Ok(match edit {
            Edit::Put(value, atomic) => {
                let strings = syncline_core::Strings::Text { atomic: &atomic };
                c.update_with(db, doc, &value, strings)
            }
            Edit::Update(f, atomic) => {
                let Some(d) = c.database(db) else {
                    return Ok(Err(syncline_core::sync::ClientError::NotOpen(db.clone())));
                };
                let mut value = d
                    .get(doc)
                    .unwrap_or_else(|| Json::Object(Default::default()));
                // A panic in the caller's closure must not end the driver
                // (nor poison the replica's lock: it is caught inside).
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut value)))
                    .map_err(|p| ClientError::UpdatePanicked(panic_text(&*p)))?;
                let strings = syncline_core::Strings::Text { atomic: &atomic };
                c.update_with(db, doc, &value, strings)
            }
            Edit::Splice(path, index, delete, insert) => {
                c.splice_text(db, doc, &path, index, delete, &insert)
            }
            Edit::Increment(path, by) => c.increment(db, doc, &path, by),
            Edit::Delete => c.delete(db, doc),
        })
    }

    /// Run a local write and answer once its batch is durable on disk.
    async fn local_write(
        &mut self,
        r: Result<bool, syncline_core::sync::ClientError>,
        reply: Reply<bool>,
    ) {
        let changed = match r {
            Ok(c) => c,
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        // Write synchronously here so the caller's return means durable.
        let mut result = Ok(changed);
        let outs = self.client().take_outputs();
        for out in outs {
            match out {
                ClientOutput::Persist { db, seq, batch, .. } => {
                    match self.store.write(&db, &batch).await {
                        Ok(()) => self.client().persisted(&db, seq),
                        Err(e) => result = Err(e),
                    }
                }
                other => self.output(other),
            }
        }
        let _ = reply.send(result);
    }

    fn pump(&mut self) {
        loop {
            let outs = self.client().take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                self.output(out);
            }
        }
        let synced: Vec<DbName> = self
            .waiters
            .keys()
            .filter(|db| self.client().is_synced(db))
            .cloned()
            .collect();
        for db in synced {
            for w in self.waiters.remove(&db).unwrap_or_default() {
                let _ = w.send(Ok(()));
            }
        }
        // Refusals fail their waiters (all of them for a refused identity).
        let failed: Vec<(DbName, (ErrorCode, String))> = self
            .waiters
            .keys()
            .filter_map(|db| Some((db.clone(), self.refusal_of(db)?.clone())))
            .collect();
        for (db, refusal) in failed {
            for w in self.waiters.remove(&db).unwrap_or_default() {
                let _ = w.send(Err(server_error(&refusal)));
            }
        }
    }

    fn output(&mut self, out: ClientOutput) {
        match out {
            ClientOutput::Send(msg) => {
                if let Some(c) = &self.conn {
                    let _ = c.out.send(protocol::encode(&msg));
                }
            }
            ClientOutput::Persist { db, seq, batch, .. } => {
                if let Local::Memory(m) = &self.store {
                    // Nothing to wait for: done before the next output.
                    match m.write_owned(&db, batch) {
                        Ok(()) => self.client().persisted(&db, seq),
                        Err(e) => tracing::error!(%db, "local write failed: {e}"),
                    }
                    return;
                }
                // Enqueued now (in order); the wait for fsync runs in a task.
                let write = self.store.write(&db, &batch);
                let tx = self.reports.clone();
                tokio::spawn(async move {
                    let r = write.await.map_err(|e| e.to_string());
                    let _ = tx.send(Report::Persisted(db, seq, r));
                });
            }
            ClientOutput::Event(e) => {
                if let ClientEvent::Error { db, code, message } = &e {
                    self.refusal(db.as_ref(), *code, message);
                    if db.is_none() {
                        // A refused listing (or a refused connection) fails
                        // the listings already sent.
                        for (_, reply) in self.listings.extract_if(.., |(r, _)| r.is_some()) {
                            let _ = reply.send(Err(ClientError::Server {
                                code: *code,
                                message: message.clone(),
                            }));
                        }
                    }
                }
                if let ClientEvent::Databases { req, names } = &e
                    && let Some(i) = self.listings.iter().position(|(r, _)| *r == Some(*req))
                {
                    let (_, reply) = self.listings.remove(i);
                    let _ = reply.send(Ok(names.clone()));
                }
                if let ClientEvent::Status(Status::Online) = e {
                    let mut c = lock(&self.client);
                    for (r, _) in self.listings.iter_mut().filter(|(r, _)| r.is_none()) {
                        *r = Some(c.list_databases());
                    }
                }
                if let ClientEvent::Status(Status::Online) = e {
                    self.attempts = 0;
                    // Accepted after all (a connection already under way).
                    self.fatal = None;
                }
                // A refusal holds across reconnections (writes keep failing
                // with it) until the database syncs: then the server took
                // everything this replica had.
                if let ClientEvent::Synced { db } = &e {
                    self.refused.remove(db);
                }
                let _ = self.events.send(e);
            }
        }
    }
}
