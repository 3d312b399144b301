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
//!
//! With `--cluster ws://…/sync,ws://…/sync,…` (`./scripts/bench-cluster`
//! starts one) the same load then runs against those cluster nodes, the
//! writers spread over them, and both are printed side by side.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::protocol::{self, Hello, Message, Push, Subscribe};
use syncline_core::{Database, DbName, DocId, Entry, Identity, VersionVector};
use tokio_tungstenite::tungstenite::Message as Ws;

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

/// The value after `name` on the command line.
fn value(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn arg(name: &str, default: u64) -> u64 {
    value(name).and_then(|v| v.parse().ok()).unwrap_or(default)
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
fn make_entries(db: &str, id: u8, count: u64) -> (Identity, Vec<Entry>) {
    let db = DbName::new(db).unwrap();
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
    db: DbName,
    me: Identity,
    entries: Vec<Entry>,
    until: Instant,
) -> (u64, Vec<Duration>) {
    const WINDOW: u64 = 512;
    const PUSH: usize = 128;
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
        horizon: None,
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

/// What one run measured.
struct Run {
    total: u64,
    elapsed: f64,
    latencies: Vec<Duration>,
    mean_change: f64,
}

/// `writers` writers push to database `db`, writer i through `urls[i % n]`.
async fn run(urls: &[String], db: &str, writers: u8, per_writer: u64, seconds: u64) -> Run {
    let made: Vec<(Identity, Vec<Entry>)> = std::thread::scope(|s| {
        let jobs: Vec<_> = (0..writers)
            .map(|i| s.spawn(move || make_entries(db, i + 1, per_writer)))
            .collect();
        jobs.into_iter().map(|j| j.join().unwrap()).collect()
    });
    let bytes: usize = made
        .iter()
        .flat_map(|(_, e)| e.iter().map(|e| e.change.len()))
        .sum();
    let made_count: usize = made.iter().map(|(_, e)| e.len()).sum();
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let name = DbName::new(db).unwrap();
    let tasks: Vec<_> = made
        .into_iter()
        .enumerate()
        .map(|(i, (replica, entries))| {
            let url = urls[i % urls.len()].clone();
            tokio::spawn(writer(url, name.clone(), replica, entries, until))
        })
        .collect();
    let mut total = 0;
    let mut latencies = Vec::new();
    for t in tasks {
        let (n, l) = t.await.unwrap();
        total += n;
        latencies.extend(l);
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort();
    Run {
        total,
        elapsed,
        latencies,
        mean_change: bytes as f64 / made_count.max(1) as f64,
    }
}

/// `host:port` of a `ws://host:port/sync` URL.
fn addr_of(url: &str) -> String {
    url.trim_start_matches("ws://")
        .split('/')
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let writers = arg("--writers", 10) as u8;
    let seconds = arg("--seconds", 10);
    let per_writer = arg("--changes", 30_000);
    let binary = value("--binary")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/syncline"));
    let cluster: Vec<String> = value("--cluster")
        .map(|c| c.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    // Every process of the cluster (its engine servers too), for its CPU.
    let cluster_pids: Vec<u32> = value("--cluster-pids")
        .map(|p| {
            p.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default();
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

    let fsyncs_before = metric(&addr, "syncline_fsync_seconds_count");
    let cpu_before = cpu_seconds(server.0.id());
    let one = run(&[url], "bench-ingest", writers, per_writer, seconds).await;
    let fsyncs = metric(&addr, "syncline_fsync_seconds_count") - fsyncs_before;
    let server_cpu = cpu_seconds(server.0.id()) - cpu_before;
    drop(server);

    // The cluster: a database of its own each run (a cluster keeps its
    // data between runs, and held dots would be acknowledged unwritten).
    let on_cluster = if cluster.is_empty() {
        None
    } else {
        let engine =
            |name: &str| -> f64 { cluster.iter().map(|u| metric(&addr_of(u), name)).sum() };
        let publish_before = (
            engine("syncline_engine_publish_seconds_sum"),
            engine("syncline_engine_publish_seconds_count"),
        );
        let cpu = || -> f64 { cluster_pids.iter().map(|p| cpu_seconds(*p)).sum() };
        let cpu_before = cpu();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let r = run(
            &cluster,
            &format!("bench-ingest-{stamp}"),
            writers,
            per_writer,
            seconds,
        )
        .await;
        let publishes = engine("syncline_engine_publish_seconds_count") - publish_before.1;
        let publish_mean =
            (engine("syncline_engine_publish_seconds_sum") - publish_before.0) / publishes.max(1.0);
        Some((r, publishes, publish_mean, cpu() - cpu_before))
    };

    println!(
        "durable ingest, {writers} writers on one database, 1 change per entry \
         ({:.0} B of change each)",
        one.mean_change
    );
    let p = |r: &Run| {
        format!(
            "{:.1} ms / {:.1} ms",
            ms(percentile(&r.latencies, 0.5)),
            ms(percentile(&r.latencies, 0.99))
        )
    };
    let Some((r, publishes, publish_mean, cpu)) = on_cluster else {
        // One node: the table ./scripts/bench reads (W4), row for row.
        println!("| figure | value |");
        println!("| --- | --- |");
        println!("| changes acknowledged durable | {} |", one.total);
        println!("| changes/s | {:.0} |", one.total as f64 / one.elapsed);
        println!("| ack latency p50 / p99 | {} |", p(&one));
        println!("| server fsyncs/s | {:.0} |", fsyncs / one.elapsed);
        println!(
            "| changes per fsync | {:.1} |",
            one.total as f64 / fsyncs.max(1.0)
        );
        println!(
            "| raw disk: 1 KB write + fdatasync | {raw_single:.0}/s (p50 {:.2} ms) |",
            raw_p50.as_secs_f64() * 1e3
        );
        println!("| raw disk: 100 × 1 KB per fdatasync | {raw_grouped:.0} records/s |");
        println!(
            "| server CPU per change (µs) | {:.1} |",
            server_cpu / (one.total as f64).max(1.0) * 1e6
        );
        println!(
            "| ratio: our changes/s ÷ raw grouped records/s | {:.2} |",
            one.total as f64 / one.elapsed / raw_grouped
        );
        return;
    };
    println!(
        "| figure | one node (file store) | {} nodes on NATS JetStream (R3) |",
        cluster.len()
    );
    println!("| --- | --- | --- |");
    let row = |name: &str, single: String, clustered: String| {
        println!("| {name} | {single} | {clustered} |")
    };
    row(
        "seconds",
        format!("{:.1}", one.elapsed),
        format!("{:.1}", r.elapsed),
    );
    row(
        "changes acknowledged durable",
        one.total.to_string(),
        r.total.to_string(),
    );
    row(
        "changes/s",
        format!("{:.0}", one.total as f64 / one.elapsed),
        format!("{:.0}", r.total as f64 / r.elapsed),
    );
    row("ack latency p50 / p99", p(&one), p(&r));
    row(
        "server fsyncs/s · engine publishes/s",
        format!("{:.0}", fsyncs / one.elapsed),
        format!("{:.0}", publishes / r.elapsed),
    );
    row(
        "changes per fsync · per engine message",
        format!("{:.1}", one.total as f64 / fsyncs.max(1.0)),
        format!("{:.1}", r.total as f64 / publishes.max(1.0)),
    );
    row(
        "engine publish latency, mean",
        "–".into(),
        format!("{:.1} ms", publish_mean * 1e3),
    );
    row(
        "CPU per change (µs): the server · all nodes and engine servers",
        format!("{:.1}", server_cpu / (one.total as f64).max(1.0) * 1e6),
        if cluster_pids.is_empty() {
            "(no --cluster-pids)".into()
        } else {
            format!("{:.1}", cpu / (r.total as f64).max(1.0) * 1e6)
        },
    );
    println!(
        "| raw disk: 1 KB write + fdatasync | {raw_single:.0}/s (p50 {:.2} ms) | |",
        raw_p50.as_secs_f64() * 1e3
    );
    println!("| raw disk: 100 × 1 KB per fdatasync | {raw_grouped:.0} records/s | |");
}
