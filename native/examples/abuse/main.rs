//! Abuse benchmark (not a test): how much an attacker on other connections
//! slows down an honest client of a real `syncline serve`, and what it costs
//! the server in memory and CPU.
//!
//! One honest client (its own connection, its own thread and runtime, a
//! token for its own database `honest`) samples every 10 ms, for a fixed
//! window, the round trip of a Ping→Pong and of a durable Push→Ack of one
//! small change made with `Database::update`. It does so first with the
//! server quiet, then while each attack runs, one at a time, and once more
//! quiet at the end. Each attack comes from its own connections (anonymous,
//! to the `open-*` databases) and, when the server is on loopback, from a
//! loopback address of its own (127.0.0.10 + its phase number: another
//! host as far as the per-address cap and handshake rate go; the honest
//! client is 127.0.0.1). An attack starts half a second before the window
//! and stops at its end; every attack loop is bounded in count and in time.
//! Between phases the benchmark waits until the server's CPU is idle again
//! (the "settle" column: work the attack left behind).
//!
//! The attacks: 1a pushes of changes claiming 2^40 ops (refused), 1b of
//! changes of 2^20 - 1 ops (accepted), 2a a compressed change chunk that
//! inflates to 17 MiB, 2b a whole frame that does, 3 the same ~16 MiB push
//! of entries the server holds, again and again, 4a connections whose first
//! frame is 16 MiB of garbage, 200 bytes of garbage, compressed or a
//! Subscribe, 4b and 4c connections that never send Hello (within the
//! per-address cap, and twice the cap), 5a Subscribe with `since` empty on a
//! database of a few MB, 5b a subscribed client publishing 16 KiB presence
//! states as fast as its socket takes them, to 20 other subscribers.
//!
//! Per phase it reports the honest p50/p99, the ratio of each p99 to the
//! quiet phase's, the server's RSS (VmRSS sampled every 10 ms: peak and at
//! the window's end), the server's CPU (utime + stime) over the window, and
//! this process's CPU over the window (the load generator shares the
//! machine's cores with the server); then what each attack did and what
//! the server answered, the server's own counters, its busiest threads and
//! how long it took to go idle. A failed honest sample (an error, a dropped
//! connection, no answer in 5 s) counts as 5 s. Under a heavy attack a
//! sample can take longer than the 10 ms period, so fewer are taken.
//!
//! With `--soak` it runs the soak benchmark instead (`soak.rs`,
//! `./scripts/bench-soak`).
//!
//! `./scripts/bench-abuse [--seconds 5] [--conns 4] [--only 1b,3]`
//! (`SYNCLINE_LOG=debug` shows the server's log), or against a running
//! server started with `--anonymous 'open-*'`:
//! `abuse --url ws://HOST:PORT/sync --pid PID --token TOKEN` (a token with
//! write rights on the database `honest`).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::change_limits::testing::op_bomb;
use syncline_core::protocol::{self, ErrorCode, Hello, Message, Presence, Push, Subscribe};
use syncline_core::{Database, DbName, DocId, Dot, Entry, Identity, ReplicaId, VersionVector};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::{self, Bytes, Message as WsMsg};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

mod soak;

type Ws = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

/// How long an attack runs before the honest client starts measuring.
const RAMP: Duration = Duration::from_millis(500);
/// The honest client's sampling period.
const TICK: Duration = Duration::from_millis(10);
/// An honest operation with no answer after this counts as failed (and as
/// this long).
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// The server's default frame limit (`--max-frame`).
const MAX_FRAME: usize = protocol::DEFAULT_MAX_FRAME;
/// The server's default connection cap per address.
const PER_IP_CAP: usize = 256;

/// The server under test and its data dir: stopped and removed however the
/// run ends.
struct Server(Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg_u64(name: &str, default: u64) -> u64 {
    arg(name).and_then(|v| v.parse().ok()).unwrap_or(default)
}

// ---- /proc ----

/// User + system CPU seconds of a process (`self` for this one).
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    (f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0)) / 100.0
}

/// CPU seconds of each thread of a process, by thread id, with its name.
fn thread_cpu(pid: &str) -> BTreeMap<String, (String, f64)> {
    let mut out = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in dir.flatten().take(10_000) {
        let tid = t.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        out.insert(
            tid.clone(),
            (
                comm.trim().to_owned(),
                cpu_seconds(&format!("{pid}/task/{tid}")),
            ),
        );
    }
    out
}

/// The busiest threads between two [`thread_cpu`] snapshots.
fn busiest(
    before: &BTreeMap<String, (String, f64)>,
    after: &BTreeMap<String, (String, f64)>,
) -> String {
    let mut d: Vec<(f64, &str)> = after
        .iter()
        .map(|(tid, (name, cpu))| (cpu - before.get(tid).map_or(0.0, |b| b.1), name.as_str()))
        .filter(|(cpu, _)| *cpu >= 0.05)
        .collect();
    d.sort_by(|a, b| b.0.total_cmp(&a.0));
    d.iter()
        .take(3)
        .map(|(cpu, name)| format!("{cpu:.2} {name}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resident memory of a process in KiB.
fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until the server has used under 10% of a core for two quarter
/// seconds in a row (at most 180 s); how long that took.
fn settle(pid: &str) -> Duration {
    let start = Instant::now();
    let mut calm = 0;
    while start.elapsed() < Duration::from_secs(180) {
        let before = cpu_seconds(pid);
        std::thread::sleep(Duration::from_millis(250));
        if cpu_seconds(pid) - before < 0.025 {
            calm += 1;
            if calm == 2 {
                break;
            }
        } else {
            calm = 0;
        }
    }
    start.elapsed()
}

/// The server's own counters, from `/metrics` (0 when unreadable).
fn metrics(url: &str) -> BTreeMap<String, f64> {
    use std::io::{Read, Write};
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/sync")
        .to_owned();
    let mut text = String::new();
    if let Ok(mut s) = std::net::TcpStream::connect(&addr) {
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        );
        let _ = s.take(1 << 20).read_to_string(&mut text);
    }
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// What the server's counters say happened between two scrapes.
fn counters(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    let d = |k: &str| after.get(k).unwrap_or(&0.0) - before.get(k).unwrap_or(&0.0);
    format!(
        "in {:.0} MB, out {:.0} MB, {:.1} MB validated",
        d("syncline_bytes_in_total") / 1e6,
        d("syncline_bytes_out_total") / 1e6,
        d("syncline_validated_bytes_total") / 1e6,
    )
}

// ---- bookkeeping ----

/// What an attack did and what the server answered, by label.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<BTreeMap<String, u64>>>);

impl Tally {
    fn add(&self, what: &str, n: u64) {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *m.entry(what.to_owned()).or_default() += n;
    }

    fn summary(&self) -> String {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        m.iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// An attack's settings.
#[derive(Clone)]
struct Ctx {
    url: String,
    until: Instant,
    tally: Tally,
    /// The honest token, for the newcomer probe of the connection attacks.
    token: String,
    /// Attacker connections for the push and subscribe attacks.
    conns: usize,
    /// The attacker's local address.
    from: Option<IpAddr>,
}

impl Ctx {
    fn live(&self) -> bool {
        Instant::now() < self.until
    }

    /// Time left in the attack, at most `cap`.
    fn left(&self, cap: Duration) -> Duration {
        self.until
            .saturating_duration_since(Instant::now())
            .min(cap)
    }

    fn add(&self, what: &str) {
        self.tally.add(what, 1);
    }
}

// ---- the wire ----

enum Got {
    Msg(Message, usize),
    Raw(usize),
    Closed,
    Timeout,
}

/// A WebSocket connection to `url`, from the local address `from` when
/// given (a loopback address of its own for each attack, so the server's
/// per-address cap and handshake rate see it as another host).
async fn connect(url: &str, from: Option<IpAddr>) -> Result<Ws, String> {
    let connecting = async {
        let addr: SocketAddr = url
            .trim_start_matches("ws://")
            .trim_end_matches("/sync")
            .parse()
            .map_err(|e| format!("address: {e}"))?;
        let socket = TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
        if let Some(ip) = from {
            socket
                .bind(SocketAddr::new(ip, 0))
                .map_err(|e| format!("bind {ip}: {e}"))?;
        }
        let tcp = socket
            .connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let shake =
            tokio_tungstenite::client_async_with_config(url, MaybeTlsStream::Plain(tcp), None);
        match shake.await {
            Ok((ws, _)) => Ok(ws),
            Err(tungstenite::Error::Http(r)) => Err(format!("HTTP {}", r.status().as_u16())),
            Err(e) => Err(format!("handshake: {e}")),
        }
    };
    match tokio::time::timeout(Duration::from_secs(5), connecting).await {
        Ok(r) => r,
        Err(_) => Err("connect: timeout".into()),
    }
}

/// The next frame, decoded when `decode` (at most 64 MiB inflated).
async fn recv(ws: &mut Ws, wait: Duration, decode: bool) -> Got {
    match tokio::time::timeout(wait, ws.next()).await {
        Err(_) => Got::Timeout,
        Ok(Some(Ok(WsMsg::Binary(b)))) if decode => match protocol::decode(&b, 64 << 20) {
            Ok(m) => Got::Msg(m, b.len()),
            Err(_) => Got::Raw(b.len()),
        },
        Ok(Some(Ok(WsMsg::Binary(b)))) => Got::Raw(b.len()),
        Ok(Some(Ok(WsMsg::Close(_)))) | Ok(None) | Ok(Some(Err(_))) => Got::Closed,
        Ok(Some(Ok(_))) => Got::Raw(0),
    }
}

async fn send_raw(ws: &mut Ws, frame: Bytes) -> bool {
    let sending = ws.send(WsMsg::Binary(frame));
    match tokio::time::timeout(Duration::from_secs(10), sending).await {
        Ok(Ok(())) => true,
        Ok(Err(_)) | Err(_) => false,
    }
}

async fn send(ws: &mut Ws, msg: &Message) -> bool {
    send_raw(ws, protocol::encode(msg).into()).await
}

/// Read frames until `done` decides (`Some(Ok)`: done, `Some(Err)`:
/// failed), for at most `wait` and 100,000 frames. Returns the bytes read.
async fn wait_for(
    ws: &mut Ws,
    wait: Duration,
    mut done: impl FnMut(&Message) -> Option<Result<(), String>>,
) -> Result<usize, String> {
    let deadline = Instant::now() + wait;
    let mut bytes = 0;
    for _ in 0..100_000 {
        match recv(ws, deadline.saturating_duration_since(Instant::now()), true).await {
            Got::Msg(m, n) => {
                bytes += n;
                if let Some(r) = done(&m) {
                    return r.map(|()| bytes);
                }
            }
            Got::Raw(n) => bytes += n,
            Got::Closed => return Err("closed by the server".into()),
            Got::Timeout => return Err(format!("no answer in {} ms", wait.as_millis())),
        }
    }
    Err("too many frames".into())
}

fn refusal(m: &Message) -> Option<Result<(), String>> {
    match m {
        Message::Error(e) => Some(Err(format!("refused: {}", e.code()))),
        _ => None,
    }
}

/// Connect, say Hello and wait for Welcome; with `sub`, also Subscribe from
/// `since` and wait for the reply's last part. Returns the socket and the
/// bytes of the reply.
/// Unix milliseconds now, for a `Hello`'s proof.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn greet(
    url: &str,
    from: Option<IpAddr>,
    me: &Identity,
    token: &str,
    sub: Option<(&DbName, &VersionVector)>,
) -> Result<(Ws, usize), String> {
    let mut ws = connect(url, from).await?;
    let host = syncline_core::identity::host_of_url(url).unwrap_or_default();
    let hello = Message::Hello(Box::new(Hello::signed(me, token, &host, unix_ms())));
    if !send(&mut ws, &hello).await {
        return Err("Hello not sent".into());
    }
    wait_for(&mut ws, Duration::from_secs(10), |m| match m {
        Message::Welcome(_) => Some(Ok(())),
        m => refusal(m),
    })
    .await?;
    let mut reply = 0;
    if let Some((db, since)) = sub {
        let s = Message::Subscribe(Box::new(Subscribe {
            horizon: None,
            db: db.clone(),
            since: since.clone(),
            req: 1,
        }));
        if !send(&mut ws, &s).await {
            return Err("Subscribe not sent".into());
        }
        reply = wait_for(&mut ws, Duration::from_secs(60), |m| match m {
            Message::Delta(d) if d.req == 1 && d.last => Some(Ok(())),
            m => refusal(m),
        })
        .await?;
    }
    Ok((ws, reply))
}

fn push_msg(db: &DbName, entries: Vec<Entry>) -> Message {
    Message::Push(Box::new(Push {
        db: db.clone(),
        entries,
    }))
}

/// Deterministic filler that deflate cannot shrink much (62 symbols).
fn noise(seed: u64, len: usize) -> String {
    const ABC: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ABC[(x % ABC.len() as u64) as usize] as char
        })
        .collect()
}

// ---- the honest client ----

#[derive(Default)]
struct Samples {
    ping: Vec<Duration>,
    push: Vec<Duration>,
    failed: u64,
}

struct Honest {
    url: String,
    token: String,
    db: DbName,
    replica: ReplicaId,
    identity: Identity,
    local: Database,
    ws: Option<Ws>,
    /// Sent and not yet acknowledged (pushed again after a reconnect).
    unacked: Vec<Entry>,
    acked: VersionVector,
    nonce: u64,
    n: u64,
}

impl Honest {
    fn new(url: String, token: String) -> Self {
        let db = DbName::new("honest").expect("db name");
        let identity = Identity::generate();
        let replica = identity.replica();
        let local = Database::new(
            db.clone(),
            replica,
            automerge::TextEncoding::UnicodeCodePoint,
        );
        Honest {
            url,
            token,
            db,
            replica,
            identity,
            local,
            ws: None,
            unacked: Vec::new(),
            acked: VersionVector::new(),
            nonce: 0,
            n: 0,
        }
    }

    /// Connected, greeted, subscribed, with nothing left unacknowledged.
    async fn ensure(&mut self) -> Result<&mut Ws, String> {
        if self.ws.is_none() {
            let (mut ws, _) = greet(
                &self.url,
                None,
                &self.identity,
                &self.token,
                Some((&self.db, &self.acked)),
            )
            .await?;
            if let Some(last) = self.unacked.last().map(|e| e.dot.counter) {
                let replica = self.replica;
                if !send(&mut ws, &push_msg(&self.db, self.unacked.clone())).await {
                    return Err("push not sent".into());
                }
                wait_for(&mut ws, OP_TIMEOUT, |m| match m {
                    Message::Ack(a) if a.vv.get(&replica) >= last => Some(Ok(())),
                    m => refusal(m),
                })
                .await?;
                self.unacked.clear();
            }
            self.ws = Some(ws);
        }
        self.ws.as_mut().ok_or_else(|| "not connected".into())
    }

    async fn ping(&mut self) -> Result<Duration, String> {
        self.nonce += 1;
        let nonce = self.nonce;
        let ws = self.ensure().await?;
        let start = Instant::now();
        if !send(ws, &Message::Ping { nonce }).await {
            return Err("ping not sent".into());
        }
        wait_for(ws, OP_TIMEOUT, |m| match m {
            Message::Pong { nonce: n } if *n == nonce => Some(Ok(())),
            m => refusal(m),
        })
        .await?;
        Ok(start.elapsed())
    }

    async fn push(&mut self) -> Result<Duration, String> {
        self.ensure().await?;
        let doc = DocId::new(format!("h-{}", self.n % 20)).expect("doc id");
        let entry = self
            .local
            .update(&doc, &json!({"n": self.n, "note": "an honest edit"}))
            .map_err(|e| e.to_string())?
            .ok_or("no change")?;
        self.n += 1;
        let counter = entry.dot.counter;
        self.unacked.push(entry.clone());
        let (replica, msg) = (self.replica, push_msg(&self.db, vec![entry]));
        let ws = self.ensure().await?;
        let start = Instant::now();
        if !send(ws, &msg).await {
            return Err("push not sent".into());
        }
        let mut vv = None;
        wait_for(ws, OP_TIMEOUT, |m| match m {
            Message::Ack(a) if a.vv.get(&replica) >= counter => {
                vv = Some(a.vv.clone());
                Some(Ok(()))
            }
            m => refusal(m),
        })
        .await?;
        let elapsed = start.elapsed();
        self.acked = vv.unwrap_or_default();
        self.unacked.clear();
        Ok(elapsed)
    }

    /// Sample for `window`: every 10 ms a ping, then a push.
    async fn measure(&mut self, window: Duration) -> Samples {
        let end = Instant::now() + window;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut s = Samples::default();
        for _ in 0..1_000_000 {
            tick.tick().await;
            if Instant::now() >= end {
                break;
            }
            for op in 0..2 {
                let r = if op == 0 {
                    self.ping().await
                } else {
                    self.push().await
                };
                let lat = r.unwrap_or_else(|e| {
                    eprintln!("honest client: {e}");
                    s.failed += 1;
                    self.ws = None;
                    OP_TIMEOUT
                });
                if op == 0 {
                    s.ping.push(lat);
                } else {
                    s.push.push(lat);
                }
            }
        }
        s
    }
}

/// The honest client on its own thread and single-threaded runtime: it is
/// sent a window, measures, and sends back its samples.
fn spawn_honest(url: String, token: String) -> (mpsc::Sender<Duration>, mpsc::Receiver<Samples>) {
    let (cmd_tx, cmd_rx) = mpsc::channel::<Duration>();
    let (res_tx, res_rx) = mpsc::channel();
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("honest runtime");
        let mut honest = Honest::new(url, token);
        let ready = rt.block_on(honest.ensure()).map(|_| ());
        let _ = ready_tx.send(ready);
        for window in cmd_rx {
            if res_tx.send(rt.block_on(honest.measure(window))).is_err() {
                break;
            }
        }
    });
    ready_rx
        .recv()
        .expect("honest thread")
        .expect("the honest client connects");
    (cmd_tx, res_rx)
}

// ---- what the attacks send, made before the clock starts ----

struct Prepared {
    bomb_db: DbName,
    /// A compressed change chunk inflating to 17 MiB of zeros.
    deflate_chunk: Vec<u8>,
    /// A frame with the deflate flag inflating to 17 MiB of zeros.
    frame_bomb: Bytes,
    resend_db: DbName,
    resend_identity: Identity,
    resend_vv: VersionVector,
    /// The Push frame the server already holds every entry of.
    resend_frame: Bytes,
    resend_entries: usize,
    resend_body: usize,
    /// 16 MiB of random bytes: the largest first frame the server reads.
    garbage_big: Bytes,
    garbage_small: Bytes,
    subscribe_first: Bytes,
    big_db: DbName,
    big_log: usize,
    presence_db: DbName,
    presence_frames: [Bytes; 2],
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(&ReplicaId::random().0);
    }
    out.truncate(len);
    out
}

/// Entries of ~`size` bytes of noise each for `replica`, one document each.
fn noisy_entries(db: &DbName, replica: ReplicaId, size: usize, budget: usize) -> Vec<Entry> {
    let mut local = Database::new(
        db.clone(),
        replica,
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let mut out = Vec::new();
    let mut total = 0;
    for i in 0..10_000u64 {
        let doc = DocId::new(format!("d{i}")).expect("doc id");
        let entry = local
            .update(&doc, &json!({"i": i, "body": noise(i + 1, size)}))
            .expect("update")
            .expect("a change");
        // Room for the archive's per-entry fields.
        total += entry.change.len() + entry.doc.as_str().len() + 64;
        if total > budget {
            break;
        }
        out.push(entry);
    }
    out
}

/// Push `entries` in pushes of `per` and wait for each Ack; the final vv.
async fn push_all(
    ws: &mut Ws,
    db: &DbName,
    replica: ReplicaId,
    entries: &[Entry],
    per: usize,
) -> VersionVector {
    let mut vv = VersionVector::new();
    for chunk in entries.chunks(per) {
        let last = chunk.last().map_or(0, |e| e.dot.counter);
        assert!(
            send(ws, &push_msg(db, chunk.to_vec())).await,
            "seed push sent"
        );
        wait_for(ws, Duration::from_secs(120), |m| match m {
            Message::Ack(a) if a.vv.get(&replica) >= last => {
                vv = a.vv.clone();
                Some(Ok(()))
            }
            m => refusal(m),
        })
        .await
        .expect("seed push acknowledged");
    }
    vv
}

async fn prepare(url: &str) -> Prepared {
    let zeros = vec![0u8; 17 << 20];
    // `frame` deflates a body that shrinks: the flag set, a raw deflate
    // stream after the 6-byte header.
    let frame_bomb = protocol::frame(&zeros);
    drop(zeros);
    let deflate_chunk = syncline_core::change_limits::testing::compressed_chunk(
        &frame_bomb[protocol::HEADER_LEN..],
    );

    // A database with a few MB of log for the Subscribe flood.
    let big_db = DbName::new("open-big").expect("db name");
    let seeder_id = Identity::generate();
    let seeder = seeder_id.replica();
    let entries = noisy_entries(&big_db, seeder, 10_000, 4 << 20);
    let big_log = entries.iter().map(|e| e.change.len()).sum();
    let (mut ws, _) = greet(
        url,
        None,
        &seeder_id,
        "",
        Some((&big_db, &VersionVector::new())),
    )
    .await
    .expect("seeder connects");
    push_all(&mut ws, &big_db, seeder, &entries, 100).await;
    drop(ws);

    // One push of ~16 MiB the server holds, sent again in phase 3.
    let resend_db = DbName::new("open-resend").expect("db name");
    let resend_identity = Identity::generate();
    let resend_replica = resend_identity.replica();
    let entries = noisy_entries(&resend_db, resend_replica, 15_000, MAX_FRAME - (64 << 10));
    let resend_entries = entries.len();
    let msg = push_msg(&resend_db, entries.clone());
    let resend_body = protocol::encoded_len(&msg);
    assert!(resend_body <= MAX_FRAME, "resend frame within the limit");
    let resend_frame: Bytes = protocol::encode(&msg).into();
    let (mut ws, _) = greet(
        url,
        None,
        &resend_identity,
        "",
        Some((&resend_db, &VersionVector::new())),
    )
    .await
    .expect("resender connects");
    let resend_vv = push_all(&mut ws, &resend_db, resend_replica, &entries, entries.len()).await;
    drop(ws);

    let subscribe_first = protocol::encode(&Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: big_db.clone(),
        since: VersionVector::new(),
        req: 1,
    })));
    let presence_db = DbName::new("open-presence").expect("db name");
    let presence_frames = [1u8, 2].map(|k| {
        let mut state = random_bytes(protocol::MAX_PRESENCE_LEN);
        state[0] = k;
        Bytes::from(protocol::encode(&Message::Presence(Box::new(Presence {
            db: presence_db.clone(),
            state,
        }))))
    });
    Prepared {
        bomb_db: DbName::new("open-bombs").expect("db name"),
        deflate_chunk,
        frame_bomb: frame_bomb.into(),
        resend_db,
        resend_identity,
        resend_vv,
        resend_frame,
        resend_entries,
        resend_body,
        garbage_big: random_bytes(MAX_FRAME).into(),
        garbage_small: random_bytes(200).into(),
        subscribe_first: subscribe_first.into(),
        big_db,
        big_log,
        presence_db,
        presence_frames,
    }
}

// ---- the attacks ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Attack {
    None,
    /// 1a: changes claiming 2^40 ops.
    OpBombRefused,
    /// 1b: changes of 2^20 - 1 ops, one document each.
    OpBombAccepted,
    /// 2a: a compressed change chunk inflating past 16 MiB.
    DeflateChunk,
    /// 2b: a frame inflating past 16 MiB (after Hello).
    DeflateFrame,
    /// 3: the same ~16 MiB push of held entries, again and again.
    Resend,
    /// 4a: connections whose first frame is large, garbage or compressed.
    BadFirstFrames,
    /// 4b/4c: connections that never send Hello.
    Silent(usize),
    /// 5a: Subscribe with `since` empty on a database of a few MB.
    SubscribeFlood,
    /// 5b: Presence as fast as the socket takes it.
    PresenceFlood,
}

async fn run_attack(attack: Attack, ctx: Ctx, p: Arc<Prepared>) {
    let mut tasks = Vec::new();
    match attack {
        Attack::None => {}
        Attack::OpBombRefused | Attack::OpBombAccepted | Attack::DeflateChunk => {
            for i in 0..ctx.conns {
                tasks.push(tokio::spawn(push_loop(ctx.clone(), p.clone(), attack, i)));
            }
        }
        Attack::DeflateFrame => {
            for _ in 0..ctx.conns {
                tasks.push(tokio::spawn(frame_bomb_loop(ctx.clone(), p.clone())));
            }
        }
        Attack::Resend => {
            for _ in 0..ctx.conns {
                tasks.push(tokio::spawn(resend_loop(ctx.clone(), p.clone())));
            }
        }
        Attack::BadFirstFrames => {
            for i in 0..64 {
                tasks.push(tokio::spawn(bad_first_frame_loop(
                    ctx.clone(),
                    p.clone(),
                    i,
                )));
            }
        }
        Attack::Silent(n) => silent(ctx.clone(), n).await,
        Attack::SubscribeFlood => {
            for i in 0..ctx.conns {
                tasks.push(tokio::spawn(subscribe_loop(ctx.clone(), p.clone(), i)));
            }
        }
        Attack::PresenceFlood => {
            for _ in 0..20 {
                tasks.push(tokio::spawn(passive(ctx.clone(), p.presence_db.clone())));
            }
            tasks.push(tokio::spawn(presence_loop(ctx.clone(), p.clone())));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// 1a, 1b, 2a: a subscribed anonymous writer pushing one hostile change per
/// push, up to `window` pushes unanswered.
async fn push_loop(ctx: Ctx, p: Arc<Prepared>, attack: Attack, conn: usize) {
    let window = if attack == Attack::OpBombRefused {
        16
    } else {
        4
    };
    for _ in 0..1000 {
        if !ctx.live() {
            return;
        }
        let me = Identity::generate();
        let replica = me.replica();
        let since = VersionVector::new();
        let mut ws = match greet(&ctx.url, ctx.from, &me, "", Some((&p.bomb_db, &since))).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                ctx.add(&format!("could not connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ctx.add("connections");
        let (mut sent, mut acked, mut refused) = (0u64, 0u64, 0u64);
        'conn: while ctx.live() && sent < 1_000_000 {
            while sent - acked - refused < window && ctx.live() {
                let (counter, change) = match attack {
                    Attack::OpBombRefused => (1, op_bomb(&replica.0, 1 << 40)),
                    Attack::OpBombAccepted => (sent + 1, op_bomb(&replica.0, (1 << 20) - 1)),
                    _ => (1, p.deflate_chunk.clone()),
                };
                let entry = Entry {
                    dot: Dot { replica, counter },
                    doc: DocId::new(format!("b{conn}-{sent}")).expect("doc id"),
                    change,
                };
                if !send(&mut ws, &push_msg(&p.bomb_db, vec![entry])).await {
                    ctx.add("push not sent");
                    break 'conn;
                }
                sent += 1;
                ctx.add("pushes");
            }
            match recv(&mut ws, ctx.left(Duration::from_secs(5)), true).await {
                Got::Msg(Message::Ack(a), _) => {
                    let c = a.vv.get(&replica);
                    if c > acked {
                        ctx.tally.add("acknowledged", c - acked);
                        acked = c;
                    }
                }
                Got::Msg(Message::Error(e), _) => {
                    refused += 1;
                    ctx.add(&format!("refused {}", e.code()));
                }
                Got::Msg(..) | Got::Raw(_) | Got::Timeout => {}
                Got::Closed => {
                    ctx.add("closed by the server");
                    break;
                }
            }
        }
    }
}

/// 2b: Hello, then one frame that inflates past the frame limit; again on
/// a new connection.
async fn frame_bomb_loop(ctx: Ctx, p: Arc<Prepared>) {
    for _ in 0..100_000 {
        if !ctx.live() {
            return;
        }
        let mut ws = match greet(&ctx.url, ctx.from, &Identity::generate(), "", None).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                ctx.add(&format!("could not connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !send_raw(&mut ws, p.frame_bomb.clone()).await {
            ctx.add("bomb not sent");
            continue;
        }
        ctx.add("bombs");
        let mut code = None;
        let _ = wait_for(&mut ws, Duration::from_secs(5), |m| match m {
            Message::Error(e) => {
                code = Some(e.code());
                Some(Ok(()))
            }
            _ => None,
        })
        .await;
        ctx.add(&code.map_or("no error".into(), |c| format!("refused {c}")));
    }
}

/// 3: the held ~16 MiB push again and again, two unanswered at a time,
/// from a connection of its replica.
async fn resend_loop(ctx: Ctx, p: Arc<Prepared>) {
    for _ in 0..1000 {
        if !ctx.live() {
            return;
        }
        let sub = Some((&p.resend_db, &p.resend_vv));
        let mut ws = match greet(&ctx.url, ctx.from, &p.resend_identity, "", sub).await {
            Ok((ws, _)) => ws,
            Err(e) => {
                ctx.add(&format!("could not connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (mut sent, mut answered) = (0u64, 0u64);
        while ctx.live() && sent < 100_000 {
            while sent - answered < 2 && ctx.live() {
                if !send_raw(&mut ws, p.resend_frame.clone()).await {
                    ctx.add("resend not sent");
                    break;
                }
                sent += 1;
                ctx.add("resends");
            }
            match recv(&mut ws, ctx.left(Duration::from_secs(10)), true).await {
                Got::Msg(Message::Ack(_), _) => {
                    answered += 1;
                    ctx.add("acknowledged");
                }
                Got::Msg(Message::Error(e), _) => {
                    answered += 1;
                    ctx.add(&format!("refused {}", e.code()));
                }
                Got::Msg(..) | Got::Raw(_) | Got::Timeout => {}
                Got::Closed => {
                    ctx.add("closed by the server");
                    break;
                }
            }
        }
    }
}

/// 4a: a fresh connection whose first frame is not a small plain Hello.
async fn bad_first_frame_loop(ctx: Ctx, p: Arc<Prepared>, i: usize) {
    let (label, frame) = match i % 4 {
        0 => ("16 MiB garbage", p.garbage_big.clone()),
        1 => ("200 B garbage", p.garbage_small.clone()),
        2 => ("compressed (17 MiB inflated)", p.frame_bomb.clone()),
        _ => ("Subscribe before Hello", p.subscribe_first.clone()),
    };
    for _ in 0..100_000 {
        if !ctx.live() {
            return;
        }
        let mut ws = match connect(&ctx.url, ctx.from).await {
            Ok(ws) => ws,
            Err(e) => {
                ctx.add(&format!("{label}: {e}"));
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        if !send_raw(&mut ws, frame.clone()).await {
            // The server stops reading a peer before its Hello past a
            // small budget and closes: the send fails mid-frame.
            ctx.add(&format!("{label}: cut off mid-frame"));
            continue;
        }
        let mut code = None;
        let _ = wait_for(&mut ws, Duration::from_secs(5), |m| match m {
            Message::Error(e) => {
                code = Some(e.code());
                Some(Ok(()))
            }
            _ => None,
        })
        .await;
        ctx.add(&format!(
            "{label}: {}",
            code.map_or("no error".into(), |c: ErrorCode| format!("refused {c}"))
        ));
    }
}

/// 4b/4c: open `n` WebSocket connections that never send anything and
/// hold them until the end; meanwhile a newcomer (a new honest client)
/// tries to connect and ping.
async fn silent(ctx: Ctx, n: usize) {
    let mut held = Vec::new();
    let mut started = 0;
    while started < n && ctx.live() {
        let batch: Vec<_> = (started..n.min(started + 32))
            .map(|_| {
                let (url, from) = (ctx.url.clone(), ctx.from);
                tokio::spawn(async move { connect(&url, from).await })
            })
            .collect();
        started += batch.len();
        for t in batch {
            match t.await {
                Ok(Ok(ws)) => held.push(ws),
                Ok(Err(e)) => ctx.add(&format!("refused: {e}")),
                Err(_) => ctx.add("connect task failed"),
            }
        }
    }
    ctx.tally.add("held open", held.len() as u64);
    // A newcomer (an honest client connecting now) from the honest
    // client's address, and one from the attacker's.
    for (who, from) in [
        ("another address", None),
        ("the attacker's address", ctx.from),
    ] {
        let probe = async {
            let (mut ws, _) =
                greet(&ctx.url, from, &Identity::generate(), &ctx.token, None).await?;
            send(&mut ws, &Message::Ping { nonce: 7 }).await;
            wait_for(&mut ws, OP_TIMEOUT, |m| match m {
                Message::Pong { .. } => Some(Ok(())),
                m => refusal(m),
            })
            .await
        };
        match probe.await {
            Ok(_) => ctx.add(&format!("newcomer from {who}: served")),
            Err(e) => ctx.add(&format!("newcomer from {who}: {e}")),
        }
    }
    tokio::time::sleep_until(ctx.until.into()).await;
    drop(held);
}

/// 5a: Subscribe with `since` empty again and again, reading the replies
/// (not decoding them) with about two in flight.
async fn subscribe_loop(ctx: Ctx, p: Arc<Prepared>, conn: usize) {
    for attempt in 0..1000 {
        if !ctx.live() {
            return;
        }
        let none = VersionVector::new();
        let sub = Some((&p.big_db, &none));
        let (mut ws, reply) = match greet(&ctx.url, ctx.from, &Identity::generate(), "", sub).await
        {
            Ok(x) => x,
            Err(e) => {
                ctx.add(&format!("could not connect: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ctx.add("subscribes");
        if conn == 0 && attempt == 0 {
            ctx.tally.add("one reply (KB)", reply as u64 >> 10);
        }
        let reply = reply.max(1) as u64;
        let (mut subs, mut got, mut req) = (1u64, reply, 2u32);
        while ctx.live() && subs < 100_000 {
            while subs * reply < got + 2 * reply && ctx.live() {
                let s = Message::Subscribe(Box::new(Subscribe {
                    horizon: None,
                    db: p.big_db.clone(),
                    since: VersionVector::new(),
                    req,
                }));
                if !send(&mut ws, &s).await {
                    break;
                }
                ctx.add("subscribes");
                (subs, req) = (subs + 1, req + 1);
            }
            match recv(&mut ws, ctx.left(Duration::from_secs(5)), false).await {
                Got::Raw(n) | Got::Msg(_, n) => got += n as u64,
                Got::Timeout => {}
                Got::Closed => {
                    ctx.add("closed by the server");
                    break;
                }
            }
        }
        ctx.tally.add("replies (KB)", got >> 10);
    }
}

/// 5b: an anonymous subscriber that reads everything and does nothing.
async fn passive(ctx: Ctx, db: DbName) {
    let none = VersionVector::new();
    let Ok((mut ws, _)) = greet(
        &ctx.url,
        ctx.from,
        &Identity::generate(),
        "",
        Some((&db, &none)),
    )
    .await
    else {
        ctx.add("passive subscriber could not connect");
        return;
    };
    let mut bytes = 0u64;
    for _ in 0..10_000_000 {
        match recv(&mut ws, ctx.left(Duration::from_secs(1)), false).await {
            Got::Raw(n) | Got::Msg(_, n) => bytes += n as u64,
            Got::Timeout if ctx.live() => {}
            Got::Timeout => break,
            Got::Closed => {
                ctx.add("passive subscriber closed by the server");
                break;
            }
        }
    }
    ctx.tally
        .add("KB to the 20 passive subscribers", bytes >> 10);
}

/// 5b: one subscribed anonymous client publishing a 16 KiB presence state
/// as fast as its socket takes it, draining what it is sent.
async fn presence_loop(ctx: Ctx, p: Arc<Prepared>) {
    let none = VersionVector::new();
    // Let the passive subscribers join first.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sub = Some((&p.presence_db, &none));
    let ws = match greet(&ctx.url, ctx.from, &Identity::generate(), "", sub).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            ctx.add(&format!("flooder could not connect: {e}"));
            return;
        }
    };
    let (mut sink, mut stream) = ws.split();
    let drain_ctx = ctx.clone();
    let drain = tokio::spawn(async move {
        for _ in 0..10_000_000 {
            let wait = drain_ctx.left(Duration::from_secs(1));
            match tokio::time::timeout(wait, stream.next()).await {
                Ok(Some(Ok(WsMsg::Binary(_)))) => {}
                Ok(Some(Ok(_))) => {}
                Ok(_) => {
                    drain_ctx.add("flooder closed by the server");
                    return;
                }
                Err(_) if drain_ctx.live() => {}
                Err(_) => return,
            }
        }
    });
    let mut sent = 0u64;
    while ctx.live() && sent < 2_000_000 {
        let frame = p.presence_frames[(sent % 2) as usize].clone();
        let sending = sink.send(WsMsg::Binary(frame));
        match tokio::time::timeout(ctx.left(Duration::from_secs(5)), sending).await {
            Ok(Ok(())) => sent += 1,
            Ok(Err(_)) => {
                ctx.add("flooder: send failed");
                break;
            }
            Err(_) => break,
        }
    }
    ctx.tally.add("presence states sent (16 KiB each)", sent);
    let _ = drain.await;
}

// ---- phases ----

struct Row {
    id: &'static str,
    name: String,
    samples: Samples,
    rss_peak: u64,
    rss_end: u64,
    cpu: f64,
    gen_cpu: f64,
    settle: Duration,
    tally: String,
    counters: String,
    threads: String,
}

struct Env {
    rt: tokio::runtime::Runtime,
    url: String,
    token: String,
    pid: String,
    conns: usize,
    /// The server is on loopback: each attack connects from an address
    /// of its own (127.0.0.10 + its phase number).
    loopback: bool,
    window: Duration,
    prepared: Arc<Prepared>,
    honest_cmd: mpsc::Sender<Duration>,
    honest_res: mpsc::Receiver<Samples>,
}

fn run_phase(env: &Env, n: u8, id: &'static str, name: String, attack: Attack) -> Row {
    eprintln!("phase {id}: {name}");
    let scraped = metrics(&env.url);
    let tally = Tally::default();
    let ctx = Ctx {
        url: env.url.clone(),
        until: Instant::now() + RAMP + env.window,
        tally: tally.clone(),
        token: env.token.clone(),
        conns: env.conns,
        from: env
            .loopback
            .then(|| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n))),
    };
    let task = env.rt.spawn(run_attack(attack, ctx, env.prepared.clone()));
    std::thread::sleep(RAMP);
    let (cpu0, gen0) = (cpu_seconds(&env.pid), cpu_seconds("self"));
    let threads0 = thread_cpu(&env.pid);
    env.honest_cmd.send(env.window).expect("honest client");
    let mut rss_peak = 0;
    let start = Instant::now();
    let samples = loop {
        rss_peak = rss_peak.max(rss_kib(&env.pid));
        match env.honest_res.recv_timeout(TICK) {
            Ok(s) => break s,
            Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < Duration::from_secs(600) => {}
            Err(e) => panic!("the honest client stopped: {e}"),
        }
    };
    let rss_end = rss_kib(&env.pid);
    rss_peak = rss_peak.max(rss_end);
    let threads = busiest(&threads0, &thread_cpu(&env.pid));
    let (cpu, gen_cpu) = (cpu_seconds(&env.pid) - cpu0, cpu_seconds("self") - gen0);
    let abort = task.abort_handle();
    let finished = env
        .rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await });
    if finished.is_err() {
        abort.abort();
        tally.add("attack aborted after 30 s", 1);
    }
    let settle = settle(&env.pid);
    let counters = counters(&scraped, &metrics(&env.url));
    Row {
        id,
        name,
        samples,
        rss_peak,
        rss_end,
        cpu,
        gen_cpu,
        settle,
        tally: tally.summary(),
        counters,
        threads,
    }
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.0}")
    }
}

fn main() {
    let soak = std::env::args().any(|a| a == "--soak");
    let seconds = arg_u64("--seconds", if soak { 120 } else { 5 });
    let conns = arg_u64("--conns", 4) as usize;
    let only: Option<Vec<String>> =
        arg("--only").map(|s| s.split(',').map(|x| x.trim().to_owned()).collect());
    let binary =
        PathBuf::from(arg("--binary").unwrap_or_else(|| "target/release/syncline".to_owned()));

    // The server: given (--url, --pid, --token) or started here.
    let mut _server = None;
    let (url, pid, token) = match arg("--url") {
        Some(url) => (
            url,
            arg("--pid").expect("--pid of the given server"),
            arg("--token").expect("--token with write rights on `honest`"),
        ),
        None => {
            let data = std::env::temp_dir().join(format!("syncline-abuse-{}", std::process::id()));
            std::fs::create_dir_all(&data).expect("temp data dir");
            let secret: String = random_bytes(24)
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            let mut server = Server(
                Command::new(&binary)
                    .args(["serve", "--listen", "127.0.0.1:0", "--anonymous", "open-*"])
                    .args(if soak { &soak::SERVER_ARGS[..] } else { &[] })
                    .arg("--data")
                    .arg(&data)
                    .arg("--secret")
                    .arg(&secret)
                    .env(
                        "SYNCLINE_LOG",
                        std::env::var("SYNCLINE_LOG").unwrap_or_else(|_| "error".into()),
                    )
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("start the server (build it with cargo build --release -p syncline)"),
                data,
            );
            let mut line = String::new();
            BufReader::new(server.0.stdout.take().expect("server stdout"))
                .read_line(&mut line)
                .expect("the server's first line");
            let addr = line
                .trim()
                .trim_start_matches("listening on http://")
                .to_owned();
            let out = Command::new(&binary)
                .args(["token", "--db", "honest", "--rights", "write", "--secret"])
                .arg(&secret)
                .output()
                .expect("syncline token");
            assert!(out.status.success(), "syncline token failed");
            let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            let pid = server.0.id().to_string();
            _server = Some(server);
            (format!("ws://{addr}/sync"), pid, token)
        }
    };

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("attacker runtime");
    eprintln!("preparing (seeding open-big and open-resend, crafting frames)");
    let prepared = Arc::new(rt.block_on(prepare(&url)));
    let (honest_cmd, honest_res) = spawn_honest(url.clone(), token.clone());
    let loopback = url.starts_with("ws://127.");
    let env = Env {
        loopback,
        rt,
        url,
        token,
        pid,
        conns,
        window: Duration::from_secs(seconds),
        prepared: prepared.clone(),
        honest_cmd,
        honest_res,
    };
    let setup_settle = settle(&env.pid);
    let rss_start = rss_kib(&env.pid);
    if soak {
        let conns = arg_u64("--conns", 10_000) as usize;
        let dbs = arg_u64("--dbs", 2_000) as usize;
        let sample = Duration::from_secs(arg_u64("--sample", 5));
        soak::run(&env, Duration::from_secs(seconds), conns, dbs, sample);
        return;
    }

    let within = PER_IP_CAP - 16;
    let over = 2 * PER_IP_CAP;
    let big_mb = prepared.big_log as f64 / 1e6;
    let phases: Vec<(&'static str, String, Attack)> = vec![
        ("quiet", "quiet".into(), Attack::None),
        (
            "1a",
            format!("1a op bombs of 2^40 ops (refused), {conns} conns"),
            Attack::OpBombRefused,
        ),
        (
            "1b",
            format!("1b op bombs of 2^20-1 ops (accepted), {conns} conns"),
            Attack::OpBombAccepted,
        ),
        (
            "2a",
            format!("2a deflate bomb in a change chunk, {conns} conns"),
            Attack::DeflateChunk,
        ),
        (
            "2b",
            format!("2b deflate bomb as a whole frame, {conns} conns"),
            Attack::DeflateFrame,
        ),
        (
            "3",
            format!(
                "3 resends of a held {:.1} MiB push, {conns} conns",
                prepared.resend_frame.len() as f64 / (1 << 20) as f64
            ),
            Attack::Resend,
        ),
        (
            "4a",
            "4a bad first frames, 64 conns".into(),
            Attack::BadFirstFrames,
        ),
        (
            "4b",
            format!("4b {within} conns that never say Hello"),
            Attack::Silent(within),
        ),
        (
            "4c",
            format!("4c {over} conns that never say Hello (cap {PER_IP_CAP})"),
            Attack::Silent(over),
        ),
        (
            "5a",
            format!("5a Subscribe flood, since empty, {big_mb:.1} MB log, {conns} conns"),
            Attack::SubscribeFlood,
        ),
        (
            "5b",
            "5b Presence flood, 1 flooder + 20 subscribers".into(),
            Attack::PresenceFlood,
        ),
        ("quiet2", "quiet again".into(), Attack::None),
    ];
    let mut rows = Vec::new();
    for (n, (id, name, attack)) in (0u8..).zip(phases) {
        let wanted = only
            .as_ref()
            .is_none_or(|o| id.starts_with("quiet") || o.iter().any(|x| x == id));
        if wanted {
            rows.push(run_phase(&env, n, id, name, attack));
        }
    }
    let rss_final = rss_kib(&env.pid);

    let quiet = rows
        .iter()
        .find(|r| r.id == "quiet")
        .map(|r| (pct(&r.samples.ping, 0.99), pct(&r.samples.push, 0.99)));
    let mib = |kib: u64| kib as f64 / 1024.0;
    println!(
        "abuse: {seconds} s window per phase after a {} ms ramp; honest client samples every {} ms; \
         server RSS {:.1} MiB after setup ({:.1} s to settle), {:.1} MiB at the end; \
         resend push: {} entries, {:.1} MiB body, {:.1} MiB frame",
        RAMP.as_millis(),
        TICK.as_millis(),
        mib(rss_start),
        setup_settle.as_secs_f64(),
        mib(rss_final),
        prepared.resend_entries,
        prepared.resend_body as f64 / (1 << 20) as f64,
        prepared.resend_frame.len() as f64 / (1 << 20) as f64,
    );
    println!();
    println!(
        "| phase | ping p50 / p99 (ms) | push p50 / p99 (ms) | p99 ÷ quiet (ping / push) | \
         server RSS peak / end (MiB) | server CPU (s) | load generator CPU (s) |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        let (pp, qp) = (pct(&r.samples.ping, 0.99), pct(&r.samples.push, 0.99));
        let ratio = quiet.map_or("".into(), |(qi, qu)| {
            format!(
                "{:.1}× / {:.1}×",
                pp.as_secs_f64() / qi.as_secs_f64().max(1e-9),
                qp.as_secs_f64() / qu.as_secs_f64().max(1e-9)
            )
        });
        println!(
            "| {} | {} / {} | {} / {} | {} | {:.0} / {:.0} | {:.2} | {:.2} |",
            r.name,
            ms(pct(&r.samples.ping, 0.5)),
            ms(pp),
            ms(pct(&r.samples.push, 0.5)),
            ms(qp),
            ratio,
            mib(r.rss_peak),
            mib(r.rss_end),
            r.cpu,
            r.gen_cpu,
        );
    }
    println!();
    println!(
        "| phase | honest samples (failed) | what the attack did | \
         server counters (window + settle) | busiest server threads (CPU s) | settle after (s) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for r in &rows {
        println!(
            "| {} | {} ({}) | {} | {} | {} | {:.1} |",
            r.id,
            r.samples.ping.len(),
            r.samples.failed,
            if r.tally.is_empty() { "—" } else { &r.tally },
            r.counters,
            if r.threads.is_empty() {
                "—"
            } else {
                &r.threads
            },
            r.settle.as_secs_f64(),
        );
    }
}
