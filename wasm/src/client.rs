//! The exported client: the core sans-IO [`Client`] driven by browser events.
//!
//! One [`Driver`] per client holds the core state machine, the store, the
//! socket and the timers, behind `Rc<RefCell<_>>`. Every input (a call from
//! JS, a socket event, a finished write, a timer) runs under one short
//! borrow, then the outputs are carried out: frames go to the socket,
//! batches to the write queue, events to the JS callback. The callback is
//! invoked only after the borrow is released, so it may call back into the
//! client.
//!
//! Writes never wait for the network: a local change is applied at once,
//! queued for IndexedDB (many queued batches share one transaction) and
//! pushed by the core client once it is durable locally.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use js_sys::{Function, Promise};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use syncline_core::protocol::ErrorCode;
use syncline_core::sync::{
    CATCH_UP_IDLE_MS, CATCH_UP_STEP, Client, ClientConfig, ClientEvent, ClientOutput, Status,
};
use syncline_core::{Batch, DbName, DocId, DocView, MemoryStore, PathSeg, ReplicaId, Strings};
use wasm_bindgen::prelude::*;

use crate::error::{WasmError, js_error};
use crate::identity::Signer;
use crate::socket::{Socket, SocketEvent, Timer, defer_drop, jittered_backoff};
use crate::store::{BrowserStore, IdbStore, Write};

/// How often an open connection is probed ([`Client::heartbeat`]): one on
/// which nothing arrives for two probes is dropped and redialled. Browsers
/// answer the server's WebSocket pings themselves but never tell the page,
/// so a socket killed by sleep or a NAT would otherwise look online forever.
const HEARTBEAT_MS: u32 = 15_000;
/// After `reconnectNow()` (the browser's `online` event) with a socket open,
/// how long the probe may take before the socket is taken for dead.
const PROBE_MS: u32 = 4_000;
/// A connection that lasted this long, or caught a database up, was good:
/// the next reconnect starts from the shortest backoff again. (Resetting on
/// `Welcome` alone retried every ~100 ms when something after the
/// handshake failed each time.)
const STABLE_MS: f64 = 10_000.0;

/// Options of [`create_client`] (camelCase in JS).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Options {
    /// `ws://` or `wss://` URL of the server's `/sync` endpoint; none (and
    /// no `urls`): local only.
    url: Option<String>,
    /// More servers' URLs (after `url`), dialled in turn: a failed dial or
    /// a dropped connection moves on to the next (see [`Driver::urls`]).
    urls: Vec<String>,
    /// The token presented in `Hello`.
    token: Option<String>,
    /// `"indexeddb"` (default in browsers) or `"memory"`.
    storage: Option<String>,
    /// IndexedDB database name (one per replica).
    idb_name: Option<String>,
    /// Longest wait between reconnection attempts.
    max_backoff_ms: Option<u32>,
    /// Announce this replica's durable entries to the other tabs
    /// (`tabEntries` events; see [`crate::tabs`]).
    share_tabs: bool,
}

/// What JS receives in its event callback.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
enum JsEvent {
    Status {
        status: &'static str,
    },
    Changed {
        db: String,
        docs: Vec<String>,
        remote: bool,
    },
    Acked {
        db: String,
        counter: u64,
    },
    Synced {
        db: String,
    },
    Presence {
        db: String,
    },
    Error {
        db: Option<String>,
        code: &'static str,
        message: String,
    },
}

fn status_name(s: Status) -> &'static str {
    match s {
        Status::Offline => "offline",
        Status::Connecting => "connecting",
        Status::Online => "online",
    }
}

fn to_js<T: Serialize + ?Sized>(v: &T) -> JsValue {
    v.serialize(&serde_wasm_bindgen::Serializer::json_compatible())
        .unwrap_or(JsValue::UNDEFINED)
}

/// User data goes out through `JSON.parse`, which makes every key an own
/// property: a document key `"__proto__"` stays data instead of becoming the
/// object's prototype (as a plain assignment would make it).
fn data_to_js<T: Serialize + ?Sized>(v: &T) -> JsValue {
    serde_json::to_string(v)
        .ok()
        .and_then(|s| js_sys::JSON::parse(&s).ok())
        .unwrap_or(JsValue::UNDEFINED)
}

type Resolvers = (Function, Function);

/// A promise plus its resolve/reject functions.
fn deferred() -> (Promise, Resolvers) {
    let mut slot = None;
    let promise = Promise::new(&mut |resolve, reject| slot = Some((resolve, reject)));
    // The executor runs synchronously inside `new Promise`.
    let resolvers = slot.unwrap_or_else(|| (Function::new_no_args(""), Function::new_no_args("")));
    (promise, resolvers)
}

fn settle(r: &Resolvers, result: Result<JsValue, JsValue>) {
    let _ = match result {
        Ok(v) => r.0.call1(&JsValue::NULL, &v),
        Err(e) => r.1.call1(&JsValue::NULL, &e),
    };
}

/// A batch waiting for IndexedDB: (database, seq, batch, views of the
/// documents it touches).
type Queued = (DbName, u64, Batch, Vec<DocView>);

pub(crate) struct Driver {
    pub(crate) client: Client,
    /// The replica's key: every connection's `Hello` proves it.
    signer: Rc<Signer>,
    store: BrowserStore,
    /// The servers, dialled in turn: a failed dial or a dropped connection
    /// moves on to the next, and any of them resumes where the last left
    /// off (the `Subscribe`s after `Hello`). One the runtime cannot even
    /// open a socket to leaves the rotation. Empty: local only.
    urls: Vec<String>,
    /// Which of `urls` the current (or next) connection dials.
    at: usize,
    /// The WebSocket class to dial with (`None`: the global `WebSocket`).
    web_socket: Option<Function>,
    on_event: Function,
    socket: Option<Socket>,
    generation: u64,
    attempts: u32,
    max_backoff_ms: u32,
    reconnect: Option<Timer>,
    /// The liveness probe's timer while a socket is open.
    heartbeat: Option<Timer>,
    /// When the current connection came online (`Date.now()`), and whether
    /// it caught a database up: either makes it worth a fresh backoff.
    online_since_ms: Option<f64>,
    caught_up: bool,
    /// A fatal refusal (bad token, unknown version): reconnecting cannot help.
    refused: Option<WasmError>,
    /// Databases the server refused (`Forbidden`, …), until they sync.
    db_refused: Vec<(DbName, WasmError)>,
    /// Batches waiting for the store, in order.
    queue: VecDeque<Queued>,
    writing: bool,
    write_retry: Option<Timer>,
    /// The idle catch-up's timer ([`Client::catch_up`]), and when the last
    /// frames were handled (`Date.now()`, ms): one timer per quiet period,
    /// not one per frame.
    catch_up: Option<Timer>,
    last_frames_ms: f64,
    /// Local writes waiting until their batch is durable: (db, seq, promise).
    write_waiters: Vec<(DbName, u64, Resolvers)>,
    /// `whenSynced` callers.
    sync_waiters: Vec<(DbName, Resolvers)>,
    /// `close` callers waiting for the queue to drain.
    close_waiters: Vec<Resolvers>,
    /// Frames received and not yet handled: handled together in a
    /// microtask, so frames the socket delivers in one task are applied as
    /// one batch (see `Client::handle_frames`). Node's WebSocket delivers
    /// every frame of one socket read in one task; browsers give each
    /// message its own task, so there frames are still handled one by one.
    inbox: Vec<Vec<u8>>,
    closed: bool,
    /// `goOffline()` was called: stay disconnected until `goOnline()`.
    paused: bool,
    /// Announce own durable entries to the other tabs.
    share_tabs: bool,
    events: Vec<JsValue>,
}

pub(crate) type Shared = Rc<RefCell<Driver>>;

impl std::fmt::Debug for WasmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmClient")
            .field("replica", &self.replica)
            .finish()
    }
}

/// The client class JS holds. Methods never throw for runtime conditions:
/// async ones reject with a `SynclineError` (`err.code`), sync ones throw one.
#[wasm_bindgen]
pub struct WasmClient {
    pub(crate) shared: Shared,
    replica: ReplicaId,
}

/// Create a client (`options`: `{url?, urls?, token?, storage?, idbName?,
/// maxBackoffMs?, WebSocket?}`: `urls` more servers dialled in turn after
/// `url`, `WebSocket` a class to use instead of the global one);
/// `onEvent` receives `{type: 'status'|'changed'|'acked'|'synced'|'presence'|'error', …}`.
#[wasm_bindgen(js_name = createClient)]
pub async fn create_client(options: JsValue, on_event: Function) -> Result<WasmClient, JsValue> {
    // A class is no serde value: taken from the object as it is.
    let web_socket = if options.is_object() {
        js_sys::Reflect::get(&options, &JsValue::from_str("WebSocket"))
            .ok()
            .filter(|v| !v.is_undefined() && !v.is_null())
    } else {
        None
    };
    let web_socket = match web_socket.map(|v| v.dyn_into::<Function>()) {
        None => None,
        Some(Ok(f)) => Some(f),
        Some(Err(_)) => {
            return Err(js_error(
                "InvalidOptions",
                "WebSocket must be a WebSocket class (a constructor)",
            ));
        }
    };
    // The file store's I/O object (Node), taken as it is, like the class.
    let file_io = if options.is_object() {
        js_sys::Reflect::get(&options, &JsValue::from_str("fileIo"))
            .ok()
            .filter(|v| v.is_object())
    } else {
        None
    };
    let options: Options = if options.is_undefined() || options.is_null() {
        Options::default()
    } else {
        serde_wasm_bindgen::from_value(options)
            .map_err(|e| js_error("InvalidOptions", &e.to_string()))?
    };
    let store = match options.storage.as_deref() {
        None | Some("indexeddb") => {
            let name = options.idb_name.as_deref().unwrap_or("syncline");
            BrowserStore::Idb(Rc::new(IdbStore::open(name).await?))
        }
        Some("memory") => BrowserStore::Memory(MemoryStore::new()),
        Some("files") => match file_io {
            Some(io) => BrowserStore::Files(Rc::new(crate::files::FileStore::new(io))),
            None => {
                return Err(js_error(
                    "InvalidOptions",
                    "storage \"files\" needs the file I/O object (fileIo)",
                ));
            }
        },
        Some(other) => {
            return Err(js_error(
                "InvalidOptions",
                &format!("unknown storage {other:?}: use \"indexeddb\", \"files\" or \"memory\""),
            ));
        }
    };
    // The replica id is the key's. A store from before replica keys has
    // an id and no key: it gets a key, and so a new id (changes of the old
    // id a server never acknowledged cannot be sent under it any more).
    let signer = Signer::load_or_create(&store).await?;
    let replica = signer.replica();
    if store.get_meta("replica").await?.as_deref() != Some(&replica.0[..]) {
        store.put_meta("replica", &replica.0).await?;
    }
    let config = ClientConfig {
        encoding: automerge::TextEncoding::Utf16CodeUnit,
        keep_views: store.keeps_views(),
        ..ClientConfig::default()
    };
    let driver = Driver {
        signer: Rc::new(signer),
        client: Client::new(replica, options.token.unwrap_or_default(), config),
        store,
        urls: options.url.into_iter().chain(options.urls).collect(),
        at: 0,
        web_socket,
        on_event,
        socket: None,
        generation: 0,
        attempts: 0,
        max_backoff_ms: options.max_backoff_ms.unwrap_or(10_000).max(50),
        reconnect: None,
        heartbeat: None,
        online_since_ms: None,
        caught_up: false,
        refused: None,
        db_refused: Vec::new(),
        queue: VecDeque::new(),
        writing: false,
        write_retry: None,
        catch_up: None,
        last_frames_ms: 0.0,
        write_waiters: Vec::new(),
        sync_waiters: Vec::new(),
        close_waiters: Vec::new(),
        inbox: Vec::new(),
        closed: false,
        paused: false,
        share_tabs: options.share_tabs,
        events: Vec::new(),
    };
    let shared = Rc::new(RefCell::new(driver));
    dial(&shared);
    Ok(WasmClient { shared, replica })
}

/// Run `f` on the driver, carry out the outputs, then tell JS.
pub(crate) fn run<R>(shared: &Shared, f: impl FnOnce(&mut Driver) -> R) -> R {
    let r = {
        let mut d = shared.borrow_mut();
        let r = f(&mut d);
        d.pump();
        r
    };
    after(shared);
    r
}

/// Start the writer if needed and deliver queued events (no borrow held).
fn after(shared: &Shared) {
    kick_writer(shared);
    let (events, callback) = {
        let mut d = shared.borrow_mut();
        (std::mem::take(&mut d.events), d.on_event.clone())
    };
    for e in events {
        let _ = callback.call1(&JsValue::NULL, &e);
    }
}

impl Driver {
    /// The URL the current (or next) connection dials (`None`: local only).
    fn url(&self) -> Option<&str> {
        self.urls.get(self.at).map(String::as_str)
    }

    /// Dial the next URL next time.
    fn rotate(&mut self) {
        if !self.urls.is_empty() {
            self.at = (self.at + 1) % self.urls.len();
        }
    }

    fn pump(&mut self) {
        loop {
            let outs = self.client.take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                match out {
                    ClientOutput::Send(msg) => {
                        if let Some(s) = &self.socket {
                            s.send(&syncline_core::protocol::encode(&msg));
                        }
                    }
                    ClientOutput::Persist {
                        db,
                        seq,
                        batch,
                        views,
                    } => {
                        self.queue.push_back((db, seq, batch, views));
                    }
                    ClientOutput::Event(e) => self.event(e),
                }
            }
        }
        let client = &self.client;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sync_waiters)
            .into_iter()
            .partition(|(db, _)| client.is_synced(db));
        self.sync_waiters = waiting;
        for (_, r) in done {
            settle(&r, Ok(JsValue::UNDEFINED));
        }
    }

    fn event(&mut self, e: ClientEvent) {
        let js = match e {
            ClientEvent::Status(s) => {
                if s == Status::Online {
                    self.online_since_ms = Some(js_sys::Date::now());
                }
                JsEvent::Status {
                    status: self.status_name(s),
                }
            }
            ClientEvent::Changed { db, docs, remote } => JsEvent::Changed {
                db: db.as_str().to_owned(),
                docs: docs.iter().map(|d| d.as_str().to_owned()).collect(),
                remote,
            },
            ClientEvent::Acked { db, counter } => JsEvent::Acked {
                db: db.as_str().to_owned(),
                counter,
            },
            ClientEvent::Synced { db } => {
                self.caught_up = true;
                // The server took every change of ours and sent its reply:
                // whatever it refused before, it accepts now.
                self.db_refused.retain(|(d, _)| *d != db);
                JsEvent::Synced {
                    db: db.as_str().to_owned(),
                }
            }
            ClientEvent::Presence { db } => JsEvent::Presence {
                db: db.as_str().to_owned(),
            },
            // The socket reports its own failures (socket.rs).
            ClientEvent::Databases { .. } | ClientEvent::ConnectFailed { .. } => return,
            ClientEvent::Error { db, code, message } => {
                self.server_error(db.as_ref(), code, &message);
                JsEvent::Error {
                    db: db.map(|d| d.as_str().to_owned()),
                    code: code.as_str(),
                    message,
                }
            }
        };
        self.events.push(to_js(&js));
    }

    /// The connection state JS sees: `refused` once reconnecting cannot help.
    fn status_name(&self, s: Status) -> &'static str {
        if self.refused.is_some() && s == Status::Offline {
            return "refused";
        }
        status_name(s)
    }

    /// A refusal fails the `whenSynced` callers it concerns; a fatal one
    /// (bad token, unknown version) stops reconnecting.
    fn server_error(&mut self, db: Option<&DbName>, code: ErrorCode, message: &str) {
        // Only a refused identity is final; a bad frame or an overloaded
        // server is worth another connection.
        let fatal = db.is_none() && code.refuses_identity();
        if fatal {
            self.refused = Some(WasmError::Server {
                code,
                message: message.to_owned(),
            });
        }
        if let Some(db) = db
            && code.refuses_database()
        {
            self.db_refused.retain(|(d, _)| d != db);
            self.db_refused.push((
                db.clone(),
                WasmError::Server {
                    code,
                    message: message.to_owned(),
                },
            ));
        }
        let (failed, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.sync_waiters)
            .into_iter()
            .partition(|(w, _)| fatal || Some(w) == db);
        self.sync_waiters = keep;
        for (_, r) in failed {
            let err = WasmError::Server {
                code,
                message: message.to_owned(),
            };
            settle(&r, Err(err.into()));
        }
    }

    /// Remove and return the local writes whose batch is among `items`.
    fn take_write_waiters(&mut self, items: &[Queued]) -> Vec<(DbName, u64, Resolvers)> {
        // The highest sequence number written per database (a handful of
        // databases; thousands of waiters and items in a bulk write).
        let mut upto: Vec<(&DbName, u64)> = Vec::new();
        for (db, seq, _, _) in items {
            match upto.iter_mut().find(|(d, _)| *d == db) {
                Some((_, s)) => *s = (*s).max(*seq),
                None => upto.push((db, *seq)),
            }
        }
        let (hit, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.write_waiters)
            .into_iter()
            .partition(|(db, seq, _)| upto.iter().any(|(d, s)| *d == db && s >= seq));
        self.write_waiters = keep;
        hit
    }

    fn emit_error(&mut self, db: Option<&DbName>, e: &WasmError) {
        self.events.push(to_js(&JsEvent::Error {
            db: db.map(|d| d.as_str().to_owned()),
            code: e.code(),
            message: e.to_string(),
        }));
    }

    /// Handle the frames received so far, in one batch.
    fn handle_inbox(&mut self, shared: &Shared) {
        let frames = std::mem::take(&mut self.inbox);
        if frames.is_empty() || self.socket.is_none() {
            return;
        }
        self.last_frames_ms = js_sys::Date::now();
        self.arm_catch_up(shared, CATCH_UP_IDLE_MS as u32);
        if self
            .client
            .handle_frames(frames.iter().map(Vec::as_slice))
            .is_err()
        {
            // A frame we cannot read: this connection is unusable.
            self.drop_connection(shared);
        }
    }

    /// Call [`idle_catch_up`] in `ms` unless it is already due.
    fn arm_catch_up(&mut self, shared: &Shared, ms: u32) {
        if self.catch_up.is_some() || self.closed {
            return;
        }
        let weak = Rc::downgrade(shared);
        self.catch_up = Some(Timer::new(ms, move || {
            if let Some(shared) = weak.upgrade() {
                idle_catch_up(&shared);
            }
        }));
    }

    /// Probe the connection in `ms` ([`heartbeat`]).
    fn arm_heartbeat(&mut self, shared: &Shared, ms: u32) {
        if self.socket.is_none() || self.closed {
            return;
        }
        let weak = Rc::downgrade(shared);
        self.heartbeat = Some(Timer::new(ms, move || {
            if let Some(shared) = weak.upgrade() {
                heartbeat(&shared);
            }
        }));
    }

    fn drop_connection(&mut self, shared: &Shared) {
        // Frames not yet handled belong to the connection going away.
        self.inbox.clear();
        // Possibly called from the socket's own callback.
        if let Some(s) = self.socket.take() {
            defer_drop(s);
        }
        self.client.disconnected();
        self.heartbeat = None;
        let stable = self
            .online_since_ms
            .take()
            .is_some_and(|t| js_sys::Date::now() - t >= STABLE_MS);
        if stable || std::mem::take(&mut self.caught_up) {
            self.attempts = 0;
        }
        if self.closed || self.paused || self.refused.is_some() {
            return;
        }
        // The next dial goes to the next server (the same one when there
        // is only one); the backoff below applies all the same.
        self.rotate();
        self.attempts = self.attempts.saturating_add(1);
        let delay = jittered_backoff(self.attempts, self.max_backoff_ms);
        let weak = Rc::downgrade(shared);
        self.reconnect = Some(Timer::new(delay, move || {
            if let Some(shared) = weak.upgrade() {
                if let Some(t) = shared.borrow_mut().reconnect.take() {
                    defer_drop(t);
                }
                dial(&shared);
            }
        }));
    }
}

/// Probe the open connection; drop it (and redial) when the previous probe
/// went unanswered.
fn heartbeat(shared: &Shared) {
    run(shared, |d| {
        if let Some(t) = d.heartbeat.take() {
            defer_drop(t); // this callback's own timer
        }
        if d.socket.is_none() {
            return;
        }
        if d.client.heartbeat() {
            d.arm_heartbeat(shared, HEARTBEAT_MS);
        } else {
            tracing::info!("no answer from the server since the last probe; reconnecting");
            d.drop_connection(shared);
        }
    });
}

/// Once no frame has arrived for `CATCH_UP_IDLE_MS`, hand patched
/// documents' changes to automerge, a step at a time (each step a timer
/// task of its own, so frames that arrive meanwhile go first).
fn idle_catch_up(shared: &Shared) {
    let wait = {
        let mut d = shared.borrow_mut();
        if let Some(t) = d.catch_up.take() {
            defer_drop(t); // this callback's own timer
        }
        if d.closed {
            return;
        }
        let quiet = js_sys::Date::now() - d.last_frames_ms;
        let idle = CATCH_UP_IDLE_MS as f64;
        (quiet < idle).then(|| (idle - quiet).ceil() as u32)
    };
    match wait {
        Some(ms) => shared.borrow_mut().arm_catch_up(shared, ms),
        None => {
            if run(shared, |d| d.client.catch_up(CATCH_UP_STEP)) {
                shared.borrow_mut().arm_catch_up(shared, 0);
            }
        }
    }
}

/// Open a socket if there is a server to talk to and none is open.
fn dial(shared: &Shared) {
    let mut d = shared.borrow_mut();
    if d.closed || d.paused || d.refused.is_some() || d.socket.is_some() {
        return;
    }
    let Some(url) = d.url().map(str::to_owned) else {
        return;
    };
    d.generation += 1;
    let generation = d.generation;
    let weak = Rc::downgrade(shared);
    let socket = Socket::open(&url, d.web_socket.as_ref(), move |ev| {
        let Some(shared) = weak.upgrade() else { return };
        if shared.borrow().generation != generation {
            return; // a stale socket
        }
        on_socket(&shared, ev);
    });
    match socket {
        Ok(s) => d.socket = Some(s),
        Err(message) if d.urls.len() > 1 => {
            // This runtime cannot open a socket to that URL, now or later:
            // it leaves the rotation (reported, not a refusal), and the
            // others are dialled as after a failed dial.
            tracing::warn!("cannot dial {url:?} ({message}); dialling the other servers");
            d.events.push(to_js(&JsEvent::Error {
                db: None,
                code: "InvalidUrl",
                message: format!("{url}: {message}"),
            }));
            let at = d.at;
            d.urls.remove(at);
            // `at` names the URL after the removed one; drop_connection
            // moves on by one, so step back first.
            d.at = (at + d.urls.len() - 1) % d.urls.len();
            d.drop_connection(shared);
            drop(d);
            after(shared);
        }
        Err(message) => {
            // A malformed URL will not get better by retrying.
            d.refused = Some(WasmError::InvalidUrl(message.clone()));
            d.events.push(to_js(&JsEvent::Error {
                db: None,
                code: "InvalidUrl",
                message,
            }));
            // Offline already: no disconnect will say it.
            d.events.push(to_js(&JsEvent::Status { status: "refused" }));
            drop(d);
            after(shared);
        }
    }
}

fn on_socket(shared: &Shared, ev: SocketEvent) {
    match ev {
        SocketEvent::Frame(bytes) => {
            let mut d = shared.borrow_mut();
            d.inbox.push(bytes);
            if d.inbox.len() == 1 {
                // The first frame of a burst: handle the burst once the
                // socket has delivered what it holds.
                let weak = Rc::downgrade(shared);
                wasm_bindgen_futures::spawn_local(async move {
                    if let Some(shared) = weak.upgrade() {
                        run(&shared, |d| d.handle_inbox(&shared));
                    }
                });
            }
        }
        SocketEvent::Open => {
            // Sign this connection's Hello (WebCrypto answers with a
            // promise), then start the handshake if the socket is still
            // the current one.
            // The proof names the host of the URL this socket dialled
            // (rotation moves on only when the connection is dropped).
            let (signer, generation, host) = {
                let d = shared.borrow();
                let host = d.url().and_then(syncline_core::identity::host_of_url);
                (d.signer.clone(), d.generation, host.unwrap_or_default())
            };
            let weak = Rc::downgrade(shared);
            wasm_bindgen_futures::spawn_local(async move {
                let proof = signer.prove(&host).await;
                let Some(shared) = weak.upgrade() else { return };
                {
                    let d = shared.borrow();
                    if d.generation != generation || d.socket.is_none() {
                        return;
                    }
                }
                run(&shared, |d| match proof {
                    Ok(proof) => {
                        d.client.connected(proof);
                        d.arm_heartbeat(&shared, HEARTBEAT_MS);
                    }
                    Err(e) => {
                        // Retrying will not give the runtime Ed25519.
                        d.events.push(to_js(&JsEvent::Error {
                            db: None,
                            code: e.code(),
                            message: e.to_string(),
                        }));
                        d.refused = Some(e);
                        d.drop_connection(&shared);
                    }
                });
            });
        }
        SocketEvent::Closed => run(shared, |d| {
            // Frames that arrived before the close come first (a bad one
            // among them has already dropped the connection).
            d.handle_inbox(shared);
            if d.socket.is_some() {
                d.drop_connection(shared);
            }
        }),
    }
}

/// Write queued batches (all of them, in one transaction) unless a write is
/// already running; on completion tell the core client and the waiters.
fn kick_writer(shared: &Shared) {
    let (items, store) = {
        let mut d = shared.borrow_mut();
        if d.writing || d.queue.is_empty() || d.write_retry.is_some() {
            if !d.writing && d.queue.is_empty() {
                for r in std::mem::take(&mut d.close_waiters) {
                    settle(&r, Ok(JsValue::UNDEFINED));
                }
            }
            return;
        }
        d.writing = true;
        let items: Vec<_> = d.queue.drain(..).collect();
        (items, d.store.clone())
    };
    let shared = shared.clone();
    wasm_bindgen_futures::spawn_local(async move {
        let writes: Vec<Write<'_>> = items
            .iter()
            .map(|(db, _, b, v)| (db, b, v.as_slice()))
            .collect();
        let result = store.write_many(&writes).await;
        drop(writes);
        run(&shared, |d| {
            d.writing = false;
            match result {
                Ok(()) => {
                    for (db, seq, _, _) in &items {
                        d.client.persisted(db, *seq);
                    }
                    if d.share_tabs {
                        // Durable now: the other tabs may hold them.
                        let me = d.client.replica();
                        for (db, _, batch, _) in &items {
                            let own = batch.entries.iter().filter(|e| e.dot.replica == me);
                            if let Some(e) = crate::tabs::announcement(db, own.cloned().collect()) {
                                d.events.push(e);
                            }
                        }
                    }
                    let done = d.take_write_waiters(&items);
                    for (_, _, r) in done {
                        settle(&r, Ok(JsValue::TRUE));
                    }
                }
                Err(e) => {
                    // Nothing of these batches is durable. They stay applied in
                    // memory and queued (in order) for another attempt; the
                    // callers waiting on them learn now.
                    let e = WasmError::Store(e);
                    d.emit_error(None, &e);
                    let failed = d.take_write_waiters(&items);
                    for (_, _, r) in failed {
                        settle(&r, Err(js_error(e.code(), &e.to_string())));
                    }
                    for item in items.into_iter().rev() {
                        d.queue.push_front(item);
                    }
                    if d.closed {
                        // Closing: report instead of retrying forever.
                        for r in std::mem::take(&mut d.close_waiters) {
                            settle(&r, Err(js_error(e.code(), &e.to_string())));
                        }
                        return;
                    }
                    let weak = Rc::downgrade(&shared);
                    d.write_retry = Some(Timer::new(1_000, move || {
                        if let Some(shared) = weak.upgrade() {
                            if let Some(t) = shared.borrow_mut().write_retry.take() {
                                defer_drop(t);
                            }
                            after(&shared);
                        }
                    }));
                }
            }
        });
    });
}

pub(crate) fn db_name(name: &str) -> Result<DbName, WasmError> {
    Ok(DbName::new(name)?)
}

fn doc_id(id: &str) -> Result<DocId, WasmError> {
    Ok(DocId::new(id)?)
}

fn path(path: JsValue) -> Result<Vec<PathSeg>, WasmError> {
    if path.is_undefined() || path.is_null() {
        return Ok(Vec::new());
    }
    let segs: Vec<Json> = serde_wasm_bindgen::from_value(path)
        .map_err(|e| WasmError::InvalidValue(format!("path: {e}")))?;
    segs.into_iter()
        .map(|s| match s {
            Json::String(k) => Ok(PathSeg::Key(k)),
            Json::Number(n) => n
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .map(PathSeg::Index)
                .ok_or_else(|| WasmError::InvalidValue(format!("path index {n}"))),
            other => Err(WasmError::InvalidValue(format!("path segment {other}"))),
        })
        .collect()
}

fn json(value: JsValue) -> Result<Json, WasmError> {
    serde_wasm_bindgen::from_value(value).map_err(|e| WasmError::InvalidValue(e.to_string()))
}

#[cfg(all(test, target_arch = "wasm32"))]
impl WasmClient {
    /// Remote changes a document shows that automerge has not applied yet.
    pub(crate) fn changes_behind(&self, db: &str, doc: &str) -> usize {
        let (Ok(db), Ok(doc)) = (db_name(db), doc_id(doc)) else {
            return 0;
        };
        let d = self.shared.borrow();
        d.client
            .database(&db)
            .map_or(0, |database| database.changes_behind(&doc))
    }
}

#[wasm_bindgen]
impl WasmClient {
    /// This replica's id (32 hex digits), stable across reloads.
    #[wasm_bindgen(getter)]
    pub fn replica(&self) -> String {
        self.replica.to_hex()
    }

    /// `"offline"`, `"connecting"`, `"online"` or `"refused"` (a refused
    /// token, protocol version or URL: no reconnection; see `refusal`).
    #[wasm_bindgen(getter)]
    pub fn status(&self) -> String {
        let d = self.shared.borrow();
        d.status_name(d.client.status()).to_owned()
    }

    /// Why the server (or this runtime) refused the client, or `db` when
    /// given: a `SynclineError`, or `undefined`. A database refusal holds
    /// until the database syncs (every change of ours accepted).
    pub fn refusal(&self, db: Option<String>) -> Result<JsValue, JsValue> {
        let d = self.shared.borrow();
        let e = match db {
            None => d.refused.as_ref(),
            Some(name) => {
                let name = db_name(&name)?;
                d.db_refused
                    .iter()
                    .find(|(x, _)| *x == name)
                    .map(|(_, e)| e)
            }
        };
        Ok(e.map_or(JsValue::UNDEFINED, |e| js_error(e.code(), &e.to_string())))
    }

    pub(crate) fn check_open(&self) -> Result<(), WasmError> {
        if self.shared.borrow().closed {
            Err(WasmError::Closed)
        } else {
            Ok(())
        }
    }

    /// Load a database from the local store and start syncing it.
    pub async fn open(&self, name: String) -> Result<(), JsValue> {
        self.check_open()?;
        let db = db_name(&name)?;
        if self.shared.borrow().client.database(&db).is_some() {
            return Ok(());
        }
        let store = self.shared.borrow().store.clone();
        let stored = store.load(&db).await?;
        // Views are a cache: one that cannot be read costs only time.
        let views = store.load_views(&db).await.unwrap_or_else(|e| {
            tracing::warn!(%db, "cached views not read: {e}");
            Vec::new()
        });
        run(&self.shared, |d| {
            if d.client.database(&db).is_none() {
                d.client.open_with_views(db, stored, views);
            }
        });
        Ok(())
    }

    /// A document as a plain object, or `undefined` when absent or deleted.
    pub fn get(&self, db: &str, id: &str) -> Result<JsValue, JsValue> {
        self.check_open()?;
        let (db, id) = (db_name(db)?, doc_id(id)?);
        let d = self.shared.borrow();
        let database = d
            .client
            .database(&db)
            .ok_or_else(|| WasmError::NotOpen(db.as_str().to_owned()))?;
        // A document shown from its cached view is handed to JSON.parse as
        // stored, without a round trip through serde.
        if database.is_cached(&id) {
            match database.cached_json(&id).map(js_sys::JSON::parse) {
                Some(Ok(v)) => return Ok(v),
                None => return Ok(JsValue::UNDEFINED), // deleted
                Some(Err(_)) => {}                     // damaged text: read the document itself
            }
        }
        Ok(database
            .get(&id)
            .map_or(JsValue::UNDEFINED, |v| data_to_js(&v)))
    }

    /// Ids of the documents that exist.
    pub fn list(&self, db: &str) -> Result<Vec<String>, JsValue> {
        self.check_open()?;
        let db = db_name(db)?;
        let d = self.shared.borrow();
        let database = d
            .client
            .database(&db)
            .ok_or_else(|| WasmError::NotOpen(db.as_str().to_owned()))?;
        Ok(database
            .list()
            .into_iter()
            .map(|d| d.as_str().to_owned())
            .collect())
    }

    /// Every document at once: `{id: value}`.
    pub fn all(&self, db: &str) -> Result<JsValue, JsValue> {
        self.check_open()?;
        let db = db_name(db)?;
        let d = self.shared.borrow();
        let database = d
            .client
            .database(&db)
            .ok_or_else(|| WasmError::NotOpen(db.as_str().to_owned()))?;
        let out = js_sys::Object::new();
        for id in database.ids() {
            // Cached text goes to JSON.parse as stored (see `get`).
            let value = if database.is_cached(id) {
                match database.cached_json(id).map(js_sys::JSON::parse) {
                    Some(Ok(v)) => v,
                    Some(Err(_)) => database
                        .get(id)
                        .map_or(JsValue::UNDEFINED, |v| data_to_js(&v)),
                    None => JsValue::UNDEFINED,
                }
            } else {
                database
                    .get(id)
                    .map_or(JsValue::UNDEFINED, |v| data_to_js(&v))
            };
            if !value.is_undefined() {
                js_sys::Reflect::set(&out, &id.as_str().into(), &value)?;
            }
        }
        Ok(out.into())
    }

    /// Make a document equal `value` with the fewest changes. Resolves to
    /// whether anything changed once the change is durable locally.
    /// Strings are collaborative text, except under the keys in `atomic`
    /// (values replaced whole).
    pub fn put(&self, db: &str, id: &str, value: JsValue, atomic: Option<Vec<String>>) -> Promise {
        // Converted before any borrow: a hostile value (deep, cyclic) fails
        // here without leaving the client borrowed.
        let value = match json(value) {
            Ok(v) => v,
            Err(e) => return Promise::reject(&e.into()),
        };
        let atomic = atomic.unwrap_or_default();
        self.local_write(db, id, |c, db, id| {
            Ok(c.update_with(db, id, &value, Strings::Text { atomic: &atomic })?)
        })
    }

    /// Delete a document (a synced tombstone).
    pub fn delete(&self, db: &str, id: &str) -> Promise {
        self.local_write(db, id, |c, db, id| Ok(c.delete(db, id)?))
    }

    /// Splice collaborative text at `path` (positions in UTF-16 code units).
    pub fn splice(
        &self,
        db: &str,
        id: &str,
        path_: JsValue,
        pos: u32,
        del: u32,
        insert: &str,
    ) -> Promise {
        let p = match path(path_) {
            Ok(p) => p,
            Err(e) => return Promise::reject(&e.into()),
        };
        self.local_write(db, id, |c, db, id| {
            Ok(c.splice_text(db, id, &p, pos as usize, del as usize, insert)?)
        })
    }

    /// Add to a counter at `path` (creating it at 0).
    pub fn increment(&self, db: &str, id: &str, path_: JsValue, by: f64) -> Promise {
        let input = path(path_).and_then(|p| {
            // Counters are integers; refuse what `as` would silently bend.
            if by.is_finite() && by.fract() == 0.0 && by.abs() <= 9_007_199_254_740_991.0 {
                Ok((p, by as i64))
            } else {
                Err(WasmError::InvalidValue(format!(
                    "increment by {by}: use a safe integer"
                )))
            }
        });
        let (p, by) = match input {
            Ok(x) => x,
            Err(e) => return Promise::reject(&e.into()),
        };
        self.local_write(db, id, |c, db, id| Ok(c.increment(db, id, &p, by)?))
    }

    fn local_write(
        &self,
        db: &str,
        id: &str,
        op: impl FnOnce(&mut Client, &DbName, &DocId) -> Result<bool, WasmError>,
    ) -> Promise {
        let (promise, resolvers) = deferred();
        let started = (|| -> Result<bool, WasmError> {
            self.check_open()?;
            let (db, id) = (db_name(db)?, doc_id(id)?);
            let mut d = self.shared.borrow_mut();
            let changed = op(&mut d.client, &db, &id)?;
            d.pump();
            // The change's batch is the newest queued one of `db`: resolve
            // when it is durable.
            match d.queue.iter().rev().find(|q| q.0 == db).map(|q| q.1) {
                Some(seq) if changed => d.write_waiters.push((db, seq, resolvers.clone())),
                _ => settle(&resolvers, Ok(JsValue::from_bool(changed))),
            }
            Ok(changed)
        })();
        if let Err(e) = started {
            settle(&resolvers, Err(e.into()));
        }
        after(&self.shared);
        promise
    }

    /// Publish this client's presence on a database (any JSON; `null` clears).
    #[wasm_bindgen(js_name = setPresence)]
    pub fn set_presence(&self, db: &str, state: JsValue) -> Result<(), JsValue> {
        let db = db_name(db)?;
        let state = json(state)?;
        let bytes = if state.is_null() {
            Vec::new()
        } else {
            serde_json::to_vec(&state).map_err(|e| WasmError::InvalidValue(e.to_string()))?
        };
        run(&self.shared, |d| d.client.set_presence(&db, bytes)).map_err(WasmError::from)?;
        Ok(())
    }

    /// `{online, peers: [{peer, replica, state}]}` for a database.
    pub fn presence(&self, db: &str) -> Result<JsValue, JsValue> {
        #[derive(Serialize)]
        struct Peer {
            peer: u64,
            replica: String,
            state: Json,
        }
        #[derive(Serialize)]
        struct View {
            online: u32,
            peers: Vec<Peer>,
        }
        let db = db_name(db)?;
        let view = self.shared.borrow().client.presence(&db);
        let peers = view
            .peers
            .into_iter()
            .map(|p| Peer {
                peer: p.peer,
                replica: p.replica.to_hex(),
                state: p
                    .state
                    .and_then(|s| serde_json::from_slice(&s).ok())
                    .unwrap_or(Json::Null),
            })
            .collect();
        Ok(data_to_js(&View {
            online: view.online,
            peers,
        }))
    }

    /// Whether the server's reply arrived and every local change of `db` is durable there.
    #[wasm_bindgen(js_name = isSynced)]
    pub fn is_synced(&self, db: &str) -> Result<bool, JsValue> {
        Ok(self.shared.borrow().client.is_synced(&db_name(db)?))
    }

    /// Own changes to `db` not yet acknowledged as durable by the server.
    pub fn pending(&self, db: &str) -> Result<f64, JsValue> {
        // After close the replicas are gone; 0 would claim nothing is pending.
        self.check_open()?;
        let db = db_name(db)?;
        let d = self.shared.borrow();
        let own = d.client.database(&db).map_or(0, |x| x.own_counter());
        Ok(own.saturating_sub(d.client.acked(&db)) as f64)
    }

    /// Resolves when `db` is synced (see `isSynced`); rejects on the server's refusal.
    #[wasm_bindgen(js_name = whenSynced)]
    pub fn when_synced(&self, db: &str) -> Promise {
        let (promise, resolvers) = deferred();
        match db_name(db) {
            Err(e) => settle(&resolvers, Err(e.into())),
            Ok(db) => {
                let mut d = self.shared.borrow_mut();
                if d.closed {
                    settle(&resolvers, Err(WasmError::Closed.into()));
                } else if d.urls.is_empty() {
                    let e = WasmError::NoServer;
                    settle(&resolvers, Err(e.into()));
                } else if d.client.is_synced(&db) {
                    settle(&resolvers, Ok(JsValue::UNDEFINED));
                } else if let Some(e) = d
                    .refused
                    .as_ref()
                    .or_else(|| d.db_refused.iter().find(|(x, _)| *x == db).map(|(_, e)| e))
                {
                    settle(&resolvers, Err(js_error(e.code(), &e.to_string())));
                } else {
                    d.sync_waiters.push((db, resolvers));
                }
            }
        }
        promise
    }

    /// Try to connect now instead of waiting for the backoff (e.g. on the
    /// browser's `online` event).
    #[wasm_bindgen(js_name = reconnectNow)]
    pub fn reconnect_now(&self) {
        let open = {
            let mut d = self.shared.borrow_mut();
            d.reconnect = None;
            d.attempts = 0;
            d.socket.is_some()
        };
        if open {
            // The socket may have died unnoticed while the network was
            // away: probe now, and again in `PROBE_MS` to judge the answer.
            run(&self.shared, |d| {
                if d.client.heartbeat() {
                    d.arm_heartbeat(&self.shared, PROBE_MS);
                } else {
                    d.drop_connection(&self.shared);
                }
            });
        } else {
            dial(&self.shared);
        }
    }

    /// Disconnect on purpose and stay offline (no reconnect attempts) until
    /// `goOnline()`. Reads and writes keep working locally.
    #[wasm_bindgen(js_name = goOffline)]
    pub fn go_offline(&self) {
        run(&self.shared, |d| {
            d.paused = true;
            d.drop_connection(&self.shared);
            d.reconnect = None;
        });
    }

    /// Undo `goOffline()`: connect now and resume syncing.
    #[wasm_bindgen(js_name = goOnline)]
    pub fn go_online(&self) {
        {
            let mut d = self.shared.borrow_mut();
            d.paused = false;
            d.reconnect = None;
            d.attempts = 0;
        }
        dial(&self.shared);
    }

    /// Stop: close the socket, let queued writes finish, release IndexedDB.
    pub fn close(&self) -> Promise {
        let (drained, resolvers) = deferred();
        {
            let mut d = self.shared.borrow_mut();
            if !d.closed {
                d.closed = true;
                d.reconnect = None;
                d.socket = None;
                // An armed timer holds Node's event loop open: a script
                // would run on for up to HEARTBEAT_MS after close().
                d.heartbeat = None;
                d.catch_up = None;
                d.client.disconnected();
                // Views not yet written go with the last transaction (as a
                // batch of nothing: sequence 0 settles no write and no waiter).
                let names: Vec<DbName> = d.client.databases().cloned().collect();
                for db in names {
                    let views = d.client.take_views(&db);
                    if !views.is_empty() {
                        d.queue.push_back((db, 0, Batch::default(), views));
                    }
                }
            }
            // Writes waiting to be retried get one last attempt now.
            d.write_retry = None;
            for (_, r) in std::mem::take(&mut d.sync_waiters) {
                settle(&r, Err(WasmError::Closed.into()));
            }
            d.close_waiters.push(resolvers);
        }
        after(&self.shared);
        let shared = self.shared.clone();
        wasm_bindgen_futures::future_to_promise(async move {
            let drained = wasm_bindgen_futures::JsFuture::from(drained).await;
            {
                let mut d = shared.borrow_mut();
                d.store.close();
                // Release the replicas now rather than whenever the JS
                // garbage collector finalizes this object: wasm memory does
                // not press on the JS heap, so that may be never.
                let names: Vec<DbName> = d.client.databases().cloned().collect();
                for name in names {
                    d.client.close(&name);
                }
                let _ = d.client.take_outputs();
                d.inbox = Vec::new();
            }
            drained.map(|_| JsValue::UNDEFINED)
        })
    }
}
