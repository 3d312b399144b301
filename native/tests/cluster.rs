//! Cluster mode against a real 3-server NATS JetStream cluster (R3 file
//! streams, every write fsynced) and several `syncline serve --cluster`
//! processes, all on 127.0.0.1: fan-out and resume across nodes, changes
//! too large for one message, a node killed mid-push, `/healthz` while the
//! engine is gone, and the chaos test (nodes and engine servers killed,
//! restarted and paused while clients write).

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use common::nats::NatsCluster;
use common::{ServerProc, WAIT, db, doc, synced, until_value};
use serde_json::{Value as Json, json};
use syncline::client::SyncClient;
use syncline_core::DbName;
use syncline_core::protocol::ErrorCode;
use syncline_core::sync::ClientEvent;

fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(WAIT)).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.get(9..12)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map(|x| x.1.to_owned())?;
    Some((status, body))
}

/// The value of one `/metrics` series (0 when absent).
fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, m) = http_get(addr, "/metrics").expect("metrics");
    m.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

fn node(data: &Path, nats: &NatsCluster) -> ServerProc {
    ServerProc::start(
        data,
        "127.0.0.1:0",
        &["--cluster", &nats.urls(), "--anonymous", "c-*"],
    )
}

async fn reader(url: &str, list: &DbName) -> SyncClient {
    let c = SyncClient::in_memory(Some(url), "");
    c.open(list).await.unwrap();
    synced(&c, list).await;
    c
}

/// Every document of `list` as `c` holds it.
fn snapshot(c: &SyncClient, list: &DbName) -> BTreeMap<String, Json> {
    c.list(list)
        .unwrap()
        .into_iter()
        .map(|d| {
            let v = c.get(list, &d).unwrap().unwrap_or(Json::Null);
            (d.to_string(), v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_fan_out_to_every_node_and_a_resume_elsewhere_gets_only_what_it_lacks() {
    let nats = NatsCluster::start(1 << 20);
    let dirs = tempfile::tempdir().unwrap();
    let nodes: Vec<ServerProc> = (0..3)
        .map(|i| node(&dirs.path().join(format!("node{i}")), &nats))
        .collect();
    let list = db("c-fanout");
    let t = doc("t");
    // A writer on node 0, subscribers on nodes 1 and 2.
    let w = reader(&nodes[0].url(), &list).await;
    let s1 = reader(&nodes[1].url(), &list).await;
    let s2 = reader(&nodes[2].url(), &list).await;
    w.put(&list, &t, json!({"n": 1})).await.unwrap();
    synced(&w, &list).await;
    until_value(&s1, &list, &t, &json!({"n": 1})).await;
    until_value(&s2, &list, &t, &json!({"n": 1})).await;
    // And back: a write on node 2 reaches node 0's client.
    s2.update(&list, &t, |v| v["m"] = 2.into()).await.unwrap();
    until_value(&w, &list, &t, &json!({"n": 1, "m": 2})).await;
    s2.close().await;

    // A client with its own store syncs on node 1, goes away; 5 changes
    // are made on node 0; it comes back on node 2 and gets exactly those.
    let store = tempfile::tempdir().unwrap();
    let d = SyncClient::builder()
        .url(nodes[1].url())
        .dir(store.path())
        .build()
        .await
        .unwrap();
    d.open(&list).await.unwrap();
    synced(&d, &list).await;
    until_value(&d, &list, &t, &json!({"n": 1, "m": 2})).await;
    d.close().await;
    drop(d);
    for i in 0..5 {
        w.put(&list, &doc(&format!("later-{i}")), json!({"i": i}))
            .await
            .unwrap();
    }
    synced(&w, &list).await;
    // Node 2 has them (its tail), and no subscriber of its own now.
    until_value(&s1, &list, &doc("later-4"), &json!({"i": 4})).await;
    let probe = reader(&nodes[2].url(), &list).await;
    until_value(&probe, &list, &doc("later-4"), &json!({"i": 4})).await;
    probe.close().await;
    drop(probe);
    let before = metric(nodes[2].addr, "syncline_entries_out_total");
    let d = SyncClient::builder()
        .url(nodes[2].url())
        .dir(store.path())
        .build()
        .await
        .unwrap();
    d.open(&list).await.unwrap();
    synced(&d, &list).await;
    for i in 0..5 {
        assert_eq!(
            d.get(&list, &doc(&format!("later-{i}"))).unwrap(),
            Some(json!({"i": i}))
        );
    }
    let sent = metric(nodes[2].addr, "syncline_entries_out_total") - before;
    assert_eq!(
        sent, 5.0,
        "a resume on another node sends only what is missing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_larger_than_one_engine_message_is_refused_whole_and_large_pushes_are_split() {
    let nats = NatsCluster::start(512 << 10);
    let dirs = tempfile::tempdir().unwrap();
    let a = node(&dirs.path().join("a"), &nats);
    let b = node(&dirs.path().join("b"), &nats);
    let list = db("c-large");
    let w = reader(&a.url(), &list).await;
    let r = reader(&b.url(), &list).await;
    // Random letters (about 0.6 bytes each once automerge deflates them):
    // 1.5 MB in one change, over the engine's 512 KiB message.
    let noise = |n: usize, seed: u64| -> String {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                char::from(b'a' + (x % 26) as u8)
            })
            .collect()
    };
    let mut events = w.events();
    w.put(&list, &doc("huge"), json!({"s": noise(1_500_000, 7)}))
        .await
        .unwrap();
    // Refused whole: the node refuses the change (`InvalidChange`: over
    // its change limit, set under the engine's message size), or the
    // client keeps it for being over the frame limit the node announces
    // (`TooLarge`).
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error { code, message, .. }) = events.recv().await {
                assert!(
                    matches!(code, ErrorCode::TooLarge | ErrorCode::InvalidChange),
                    "{code}: {message}"
                );
                return;
            }
        }
    })
    .await
    .expect("the client reports the change it cannot push");
    // 16 changes of 100 KB each, written offline, go in one push of
    // about 1 MB once deflated: more than one message; all of it arrives
    // elsewhere.
    let store = tempfile::tempdir().unwrap();
    let off = SyncClient::builder()
        .url("ws://127.0.0.1:9/sync")
        .dir(store.path())
        .build()
        .await
        .unwrap();
    off.open(&list).await.unwrap();
    for i in 0..16u64 {
        off.put(
            &list,
            &doc(&format!("p{i}")),
            json!({"s": noise(100_000, i + 11)}),
        )
        .await
        .unwrap();
    }
    off.close().await;
    drop(off);
    let on = SyncClient::builder()
        .url(a.url())
        .dir(store.path())
        .build()
        .await
        .unwrap();
    on.open(&list).await.unwrap();
    synced(&on, &list).await;
    until_value(&r, &list, &doc("p15"), &json!({"s": noise(100_000, 26)})).await;
    let fresh = reader(&b.url(), &list).await;
    let docs = snapshot(&fresh, &list);
    assert_eq!(
        docs.len(),
        16,
        "every part arrived; nothing of the refused change"
    );
    assert!(!docs.contains_key("huge"));
    assert!(metric(a.addr, "syncline_engine_publish_seconds_count") >= 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_while_the_engine_is_unreachable_and_recovers() {
    let mut nats = NatsCluster::start(1 << 20);
    let dirs = tempfile::tempdir().unwrap();
    let a = node(&dirs.path().join("a"), &nats);
    assert_eq!(http_get(a.addr, "/healthz").unwrap().0, 200);
    for i in 0..3 {
        nats.kill9(i);
    }
    let until = Instant::now() + WAIT;
    while http_get(a.addr, "/healthz").unwrap().0 != 503 {
        assert!(
            Instant::now() < until,
            "/healthz still 200 without the engine"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for i in 0..3 {
        nats.restart(i);
    }
    nats.wait_ready();
    let until = Instant::now() + Duration::from_secs(30);
    while http_get(a.addr, "/healthz").unwrap().0 != 200 {
        assert!(
            Instant::now() < until,
            "/healthz not back once the engine is"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And it serves writes again.
    let list = db("c-health");
    let c = reader(&a.url(), &list).await;
    c.put(&list, &doc("x"), json!({"ok": true})).await.unwrap();
    synced(&c, &list).await;
}
