//! Durable ingest benchmark (not a test): N writers push changes to a real
//! `syncline serve` as fast as durable acks allow; prints changes/s, ack
//! latency, and the server's fsyncs/s next to this disk's raw fsync rate
//! measured in the same run.
//!
//! `./scripts/bench-ingest [--writers 10] [--seconds 10]`

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use syncline_core::protocol;
use syncline_core::sync::{Client, ClientConfig, ClientEvent, ClientOutput};
use syncline_core::{DbName, DocId, ReplicaId, StoredDatabase};
use tokio_tungstenite::tungstenite::Message as Ws;

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

async fn writer(url: String, id: u8, until: Instant) -> (u64, Vec<Duration>) {
    let db = DbName::new("bench-ingest").unwrap();
    let mut replica = [id; 16];
    replica[15] = 0xB0;
    let mut client = Client::new(ReplicaId(replica), "", ClientConfig::default());
    client.open(db.clone(), StoredDatabase::default());
    let (mut ws, _) = tokio_tungstenite::connect_async(url.as_str())
        .await
        .unwrap();
    client.connected();
    let mut sent_at: Vec<Instant> = Vec::new(); // index = own counter - 1
    let mut latencies = Vec::new();
    let mut acked = 0u64;
    let mut counter = 0u64;
    let mut online = false;
    loop {
        // Keep up to 256 changes in flight once online.
        while online && counter - acked < 256 && Instant::now() < until {
            let doc = DocId::new(format!("w{id}-{}", counter % 100)).unwrap();
            client
                .update(&db, &doc, &json!({"n": counter, "pad": "x".repeat(64)}))
                .unwrap();
            counter += 1;
            sent_at.push(Instant::now());
        }
        loop {
            let outs = client.take_outputs();
            if outs.is_empty() {
                break;
            }
            for out in outs {
                match out {
                    ClientOutput::Send(m) => ws
                        .send(Ws::Binary(protocol::encode(&m).into()))
                        .await
                        .unwrap(),
                    // In-memory local replica: durable at once (we measure the server).
                    ClientOutput::Persist { db, seq, .. } => client.persisted(&db, seq),
                    ClientOutput::Event(ClientEvent::Acked { counter: c, .. }) => {
                        let now = Instant::now();
                        for k in acked..c {
                            if let Some(t) = sent_at.get(k as usize) {
                                latencies.push(now - *t);
                            }
                        }
                        acked = c;
                    }
                    ClientOutput::Event(ClientEvent::Synced { .. }) => online = true,
                    ClientOutput::Event(_) => {}
                }
            }
        }
        if Instant::now() >= until && acked >= counter {
            return (acked, latencies);
        }
        if !(online && counter - acked < 256 && Instant::now() < until) {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Ws::Binary(b)))) => {
                    client.handle(protocol::decode(&b, usize::MAX).unwrap())
                }
                Ok(Some(Ok(_))) => {}
                _ => return (acked, latencies),
            }
        }
    }
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

    let mut server = Command::new(&binary)
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
        .expect("start the server (build it with cargo build --release -p syncline)");
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .trim_start_matches("listening on http://")
        .to_owned();
    let url = format!("ws://{addr}/sync");

    let fsyncs_before = metric(&addr, "syncline_fsync_seconds_count");
    let start = Instant::now();
    let until = start + Duration::from_secs(seconds);
    let tasks: Vec<_> = (0..writers)
        .map(|i| tokio::spawn(writer(url.clone(), i + 1, until)))
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
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&data);
    lat.sort();

    println!("durable ingest, {writers} writers, {elapsed:.1} s, 1 change per entry (~110 B)");
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
        "| ratio: our changes/s ÷ raw grouped records/s | {:.2} |",
        total as f64 / elapsed / raw_grouped
    );
}
