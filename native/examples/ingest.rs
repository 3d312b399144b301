//! Durable ingest benchmark (not a test): N writers push changes to a real
//! `syncline serve` as fast as durable acks allow; prints changes/s, ack
//! latency, and the server's fsyncs/s next to this disk's raw fsync rate
//! measured in the same run, and the server's CPU per change.
//!
//! The writers share the machine with the server, so they are a cheap load
//! generator: each prepares its changes (real automerge changes made by a
//! core `Database` for its own replica) before the clock starts, speaks the
//! protocol directly, and drops the other writers' live deltas unread
//! instead of applying them. The server does all its usual work: it
//! validates every change, logs it with fsync before acknowledging, and fans
//! it out to the other nine writers subscribed to the same database.
//!
//! `./scripts/bench-ingest [--writers 10] [--changes 30000] [--seconds 10]`
//! (`--changes` per writer; `--seconds` caps the run).

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::protocol::{self, Hello, Message, Push, Subscribe};
use syncline_core::{Database, DbName, DocId, Entry, Identity, VersionVector};
use tokio_tungstenite::tungstenite::Message as Ws;

const DB: &str = "bench-ingest";

/// The server under test and its data dir: stopped and removed however the
/// run ends (a writer that panics included).
struct Server(std::process::Child, PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Raw disk: (fsyncs/s with 1 KB each, p50 latency, 1 KB records/s with 100 per fsync).
fn raw_disk(dir: &Path) -> (f64, Duration, f64) {
    let path = dir.join("raw-fsync-probe");
    let mut f = std::fs::File::create(&path).unwrap();
    let record = [7u8; 1024];
    let mut lat = Vec::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        let t = Instant::now();
        f.write_all(&record).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed());
    }
    let single = lat.len() as f64 / start.elapsed().as_secs_f64();
    lat.sort();
    let mut records = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..100 {
            f.write_all(&record).unwrap();
        }
        f.sync_data().unwrap();
        records += 100;
    }
    let grouped = records as f64 / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    (single, percentile(&lat, 0.5), grouped)
}

/// User + system CPU seconds of a process, from /proc.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |x| x.1);
    let f: Vec<f64> = after
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0.0))
        .collect();
    let ticks = f.get(11).unwrap_or(&0.0) + f.get(12).unwrap_or(&0.0);
    ticks / 100.0
}

fn metric(addr: &str, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Entries (one automerge change each) for writer `id`, made before the
/// clock starts: the load generator shares the server's two cores, so it
/// must not spend them making changes (or applying the other writers'
/// fan-out) while the server is measured.
fn make_entries(id: u8, count: u64) -> (Identity, Vec<Entry>) {
    let db = DbName::new(DB).unwrap();
    let mut seed = [id; 32];
    seed[31] = 0xB0;
    let me = Identity::from_seed(seed);
    let replica = me.replica();
    let mut local = Database::new(db, replica, automerge::TextEncoding::UnicodeCodePoint);
    let entries = (0..count)
        .filter_map(|n| {
            let doc = DocId::new(format!("w{id}-{}", n % 100)).unwrap();
            local
                .update(&doc, &json!({"n": n, "pad": "x".repeat(64)}))
                .unwrap()
        })
        .collect();
    (me, entries)
}

/// One writer speaking the protocol directly: Hello and Subscribe, then
/// pushes of up to `PUSH` entries with up to `WINDOW` unacknowledged,
/// as fast as the server's durable acks allow. Live deltas from the other
/// writers are read and dropped (decoded, not applied).
async fn writer(
    url: String,
    me: Identity,
    entries: Vec<Entry>,
    until: Instant,
) -> (u64, Vec<Duration>) {
    const WINDOW: u64 = 512;
    const PUSH: usize = 128;
    let db = DbName::new(DB).unwrap();
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(url.as_str(), None, true)
        .await
        .unwrap();
    let replica = me.replica();
    let host = syncline_core::identity::host_of_url(&url).unwrap_or_default();
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let hello = Message::Hello(Box::new(Hello::signed(&me, "", &host, now_ms)));
    let sub = Message::Subscribe(Box::new(Subscribe {
        db: db.clone(),
        since: VersionVector::new(),
        req: 1,
    }));
    for m in [hello, sub] {
        ws.send(Ws::Binary(protocol::encode(&m).into()))
            .await
            .unwrap();
    }
    // Wait for the reply to Subscribe (pushing before it is refused).
    loop {
        match ws.next().await {
            Some(Ok(Ws::Binary(b))) => {
                if let Ok(Message::Delta(d)) = protocol::decode(&b, usize::MAX)
                    && d.req == 1
                    && d.last
                {
                    break;
                }
            }
            Some(Ok(_)) => {}
            _ => return (0, Vec::new()),
        }
    }
    let total = entries.len() as u64;
    let mut sent_at: Vec<Instant> = Vec::with_capacity(entries.len());
    let mut latencies = Vec::with_capacity(entries.len());
    let (mut acked, mut sent) = (0u64, 0u64);
    let mut pending = entries.into_iter();
    while acked < total {
        let now = Instant::now();
        if now < until {
            while sent < total && sent - acked < WINDOW {
                let batch: Vec<Entry> = pending.by_ref().take(PUSH).collect();
                sent += batch.len() as u64;
                sent_at.extend(std::iter::repeat_n(now, batch.len()));
                let push = Message::Push(Box::new(Push {
                    db: db.clone(),
                    entries: batch,
                }));
                ws.feed(Ws::Binary(protocol::encode(&push).into()))
                    .await
                    .unwrap();
            }
            ws.flush().await.unwrap();
        } else if acked >= sent {
            break;
        }
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Ws::Binary(b)))) => match protocol::decode(&b, usize::MAX) {
                Ok(Message::Ack(a)) => {
                    let c = a.vv.get(&replica);
                    let now = Instant::now();
                    for k in acked..c.min(sent) {
                        latencies.push(now - sent_at[k as usize]);
                    }
                    acked = acked.max(c);
                }
                Ok(Message::Error(e)) => panic!("writer refused: {e:?}"),
                _ => {} // other writers' changes
            },
            Ok(Some(Ok(_))) => {}
            _ => break,
        }
    }
    (acked, latencies)
}

#[tokio::main]
async fn main() {
    let writers = arg("--writers", 10) as u8;
    let seconds = arg("--seconds", 10);
    let binary = std::env::args()
        .skip_while(|a| a != "--binary")
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/syncline"));
    let data = std::env::temp_dir().join(format!("syncline-bench-{}", std::process::id()));
    std::fs::create_dir_all(&data).unwrap();

    let (raw_single, raw_p50, raw_grouped) = raw_disk(&data);

    let mut server = Server(
        Command::new(&binary)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--anonymous",
                "bench-*",
                "--data",
            ])
            .arg(&data)
            .env("SYNCLINE_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the server (build it with cargo build --release -p syncline)"),
        data.clone(),
    );
    let mut line = String::new();
    BufReader::new(server.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .trim_start_matches("listening on http://")
        .to_owned();
    let url = format!("ws://{addr}/sync");

    let per_writer = arg("--changes", 30_000);
    let made: Vec<(Identity, Vec<Entry>)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..writers)
            .map(|i| s.spawn(move || make_entries(i + 1, per_writer)))
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let bytes: usize = made
        .iter()
        .flat_map(|(_, e)| e.iter().map(|e| e.change.len()))
        .sum();
    let made_count: usize = made.iter().map(|(_, e)| e.len()).sum();
    let mean_change = bytes as f64 / made_count.max(1) as f64;

    let fsyncs_before = metric(&addr, "syncline_fsync_seconds_count");
    let cpu_before = cpu_seconds(server.0.id());
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = made
        .into_iter()
        .map(|(replica, entries)| tokio::spawn(writer(url.clone(), replica, entries, until)))
        .collect();
    let mut total = 0;
    let mut lat = Vec::new();
    for t in tasks {
        let (n, l) = t.await.unwrap();
        total += n;
        lat.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let fsyncs = metric(&addr, "syncline_fsync_seconds_count") - fsyncs_before;
    let server_cpu = cpu_seconds(server.0.id()) - cpu_before;
    drop(server);
    lat.sort();

    println!(
        "durable ingest, {writers} writers on one database, {elapsed:.1} s, \
         1 change per entry ({mean_change:.0} B of change each)"
    );
    println!("| figure | value |");
    println!("| --- | --- |");
    println!("| changes acknowledged durable | {total} |");
    println!("| changes/s | {:.0} |", total as f64 / elapsed);
    println!(
        "| ack latency p50 / p99 | {:.1} ms / {:.1} ms |",
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3
    );
    println!("| server fsyncs/s | {:.0} |", fsyncs / elapsed);
    println!(
        "| changes per fsync | {:.1} |",
        total as f64 / fsyncs.max(1.0)
    );
    println!(
        "| raw disk: 1 KB write + fdatasync | {raw_single:.0}/s (p50 {:.2} ms) |",
        raw_p50.as_secs_f64() * 1e3
    );
    println!("| raw disk: 100 × 1 KB per fdatasync | {raw_grouped:.0} records/s |");
    println!(
        "| server CPU per change (µs) | {:.1} |",
        server_cpu / (total as f64).max(1.0) * 1e6
    );
    println!(
        "| ratio: our changes/s ÷ raw grouped records/s | {:.2} |",
        total as f64 / elapsed / raw_grouped
    );
}
