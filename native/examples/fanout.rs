//! W3 fan-out subscribers for the benchmark (not a test): `--count` native
//! clients ([`SyncClient::in_memory`], like the Node subscribers' in-memory
//! replicas) subscribe to one database of a running server, and each records
//! when it sees the writer's `ticker` document reach each sequence number.
//!
//! Every subscriber is a full client: it applies each change to its own
//! replica and reads the document back (`get`), as an app would. They share
//! one tokio runtime (two worker threads) in this process.
//!
//! Protocol with `bench/systems/syncline-native.mjs` on stdout, one line each:
//! `ready` once every client is in sync, `done` once every client has seen
//! the last sequence number; then, when stdin closes or sends a line, one
//! JSON line `{"arrivals": [[ms or null, ...], ...]}` (wall-clock ms since
//! the Unix epoch, comparable with Node's `performance.timeOrigin +
//! performance.now()`), and the process exits.
//!
//! `fanout --url ws://127.0.0.1:PORT/sync --db bench --count 1000 --changes 1000`
//!
//! Alone (`./scripts/bench-cluster`): `--url` may list several nodes
//! (comma-separated; subscriber i uses node i mod n), and `--write URL`
//! makes this process the writer too: once every subscriber is in sync it
//! writes `ticker` every `--interval-ms` (default 5) through its own
//! client on URL, then prints one Markdown row: delivery latency (write
//! to a subscriber's `get`) p50 / p99 and how many arrivals were missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use syncline::client::SyncClient;
use syncline_core::sync::ClientEvent;
use syncline_core::{DbName, DocId};
use tokio::io::AsyncBufReadExt;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::{Mutex, Notify};

// The `syncline` binary's allocator and memory settings (the same file as
// its `memory` module), so the native subscribers run as the CLI's client
// does: without them the subscribers spent 7 % of their CPU zeroing
// transparent huge pages (BENCHMARKS.md §25).
#[path = "../src/memory.rs"]
mod memory;

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn wall_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

/// One subscriber: record arrivals until the last sequence number is seen.
async fn subscribe(
    client: SyncClient,
    db: DbName,
    seen: Arc<Mutex<Vec<Option<f64>>>>,
    changes: usize,
    complete: Arc<AtomicUsize>,
    all_done: Arc<Notify>,
    count: usize,
) {
    let ticker = DocId::new("ticker").expect("a valid id");
    let mut events = client.events();
    let mut next = 0usize;
    while next < changes {
        match events.recv().await {
            Ok(ClientEvent::Changed { db: d, docs, .. }) if d == db && docs.contains(&ticker) => {}
            Ok(_) => continue,
            // Missed events: the document may have changed, read it.
            Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => return,
        }
        let Ok(Some(v)) = client.get(&db, &ticker) else {
            continue;
        };
        // Negative sequence numbers are the writer's unmeasured warm-up.
        let Some(seq) = v.get("seq").and_then(|s| s.as_i64()) else {
            continue;
        };
        if seq < next as i64 {
            continue;
        }
        let t = wall_ms();
        let upto = (seq as usize).min(changes - 1);
        let mut seen = seen.lock().await;
        for slot in &mut seen[next..=upto] {
            *slot = Some(t);
        }
        next = upto + 1;
    }
    if complete.fetch_add(1, Ordering::SeqCst) + 1 == count {
        all_done.notify_one();
    }
}

fn main() -> Result<()> {
    // Before the runtime allocates, as the binary's main does.
    memory::tune();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> Result<()> {
    let urls: Vec<String> = arg("--url")
        .context("--url is required")?
        .split(',')
        .map(str::to_owned)
        .collect();
    let db = DbName::new(arg("--db").as_deref().unwrap_or("bench"))?;
    let count: usize = arg("--count").as_deref().unwrap_or("100").parse()?;
    let changes: usize = arg("--changes").as_deref().unwrap_or("1000").parse()?;
    if count == 0 || changes == 0 {
        bail!("--count and --changes must be positive");
    }
    let complete = Arc::new(AtomicUsize::new(0));
    let all_done = Arc::new(Notify::new());
    let mut clients = Vec::with_capacity(count);
    let mut arrivals = Vec::with_capacity(count);
    // Connect in batches: thousands of simultaneous handshakes would measure
    // the accept queue, not the steady state (as the Node workers do).
    for start in (0..count).step_by(50) {
        let mut batch = Vec::new();
        for _ in start..(start + 50).min(count) {
            let c = SyncClient::in_memory(Some(&urls[clients.len() % urls.len()]), "");
            c.open(&db).await?;
            let seen = Arc::new(Mutex::new(vec![None; changes]));
            tokio::spawn(subscribe(
                c.clone(),
                db.clone(),
                seen.clone(),
                changes,
                complete.clone(),
                all_done.clone(),
                count,
            ));
            arrivals.push(seen);
            batch.push(c.clone());
            clients.push(c);
        }
        for c in batch {
            tokio::time::timeout(Duration::from_secs(120), c.wait_synced(&db))
                .await
                .context("a subscriber did not sync in 120 s")??;
        }
    }
    if let Some(write) = arg("--write") {
        let interval: u64 = arg("--interval-ms").as_deref().unwrap_or("5").parse()?;
        let report = write_and_report(
            &write,
            &db,
            changes,
            interval,
            urls.len(),
            &arrivals,
            &all_done,
        )
        .await;
        for c in &clients {
            c.close().await;
        }
        return report;
    }
    println!("ready");
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    tokio::select! {
        _ = all_done.notified() => {
            println!("done");
            // Wait for the parent to ask for the figures.
            let _ = stdin.next_line().await;
        }
        _ = stdin.next_line() => {}
    }
    let mut rows = Vec::with_capacity(count);
    for seen in &arrivals {
        rows.push(seen.lock().await.clone());
    }
    println!("{}", serde_json::json!({ "arrivals": rows }));
    for c in &clients {
        c.close().await;
    }
    Ok(())
}

/// The writer of a standalone run: `changes` writes of `ticker`, one per
/// `interval` ms, then one Markdown row of delivery latencies.
async fn write_and_report(
    url: &str,
    db: &DbName,
    changes: usize,
    interval: u64,
    nodes: usize,
    arrivals: &[Arc<Mutex<Vec<Option<f64>>>>],
    all_done: &Notify,
) -> Result<()> {
    let ticker = DocId::new("ticker")?;
    let writer = SyncClient::in_memory(Some(url), "");
    writer.open(db).await?;
    writer.wait_synced(db).await?;
    let mut sent = Vec::with_capacity(changes);
    let mut tick = tokio::time::interval(Duration::from_millis(interval));
    for seq in 0..changes {
        tick.tick().await;
        sent.push(wall_ms());
        writer
            .put(db, &ticker, serde_json::json!({ "seq": seq }))
            .await?;
    }
    // Every subscriber has seen the last write, or 30 s have passed.
    let _ = tokio::time::timeout(Duration::from_secs(30), all_done.notified()).await;
    let mut latencies = Vec::new();
    let mut missed = 0usize;
    for seen in arrivals {
        for (at, sent) in seen.lock().await.iter().zip(&sent) {
            match at {
                Some(at) => latencies.push(at - sent),
                None => missed += 1,
            }
        }
    }
    latencies.sort_by(f64::total_cmp);
    let p = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    println!(
        "| {} subscribers on {nodes} node(s), writer on {url} | {:.1} ms | {:.1} ms | {missed} |",
        arrivals.len(),
        p(0.5),
        p(0.99),
    );
    writer.close().await;
    Ok(())
}
