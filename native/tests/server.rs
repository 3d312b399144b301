//! Integration tests against the real `syncline` binary on 127.0.0.1 with an
//! ephemeral port, driven by the native client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

mod common;

use common::{ServerProc, WAIT, db, doc, incompressible, synced, token, until_value};
use serde_json::{Value as Json, json};
use syncline::client::{ClientError, SyncClient};
use syncline_core::DbName;
use syncline_core::protocol::ErrorCode;
use syncline_core::sync::ClientEvent;

fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out[9..12].parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_owned())
        .unwrap_or_default();
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscriber_applies_patched_changes_once_the_stream_pauses() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*"],
    );
    let list = db("demo-idle");
    let (writer, reader) = (
        SyncClient::in_memory(Some(&server.url()), ""),
        SyncClient::in_memory(Some(&server.url()), ""),
    );
    for c in [&writer, &reader] {
        c.open(&list).await.unwrap();
        synced(c, &list).await;
    }
    let t = doc("ticker");
    // One change per frame: each is shown patched (core's database tests
    // say when), and without the idle catch-up they would wait for ever.
    // Read as soon as each arrives (well before the idle catch-up, which
    // waits CATCH_UP_IDLE_MS of quiet), the reader is behind by at least
    // that change: else the patched path was not taken at all.
    let mut behind = Vec::new();
    for seq in 0..20 {
        writer.put(&list, &t, json!({ "seq": seq })).await.unwrap();
        until_value(&reader, &list, &t, &json!({ "seq": seq })).await;
        behind.push(reader.changes_behind(&list, &t).unwrap());
    }
    assert!(
        behind.iter().any(|&b| b >= 1),
        "no change was shown patched: changes behind after each arrival {behind:?}"
    );
    // Once nothing has arrived for a while the reader's driver hands them
    // to automerge.
    tokio::time::timeout(WAIT, async {
        while reader.changes_behind(&list, &t).unwrap() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await; // polling a state, bounded by WAIT
        }
    })
    .await
    .expect("caught up in time");
    assert_eq!(reader.changes_behind(&list, &t).unwrap(), 0);
    assert_eq!(
        reader.get(&list, &t).unwrap(),
        Some(json!({"seq": 19})),
        "automerge shows what the patches showed"
    );
    // What automerge now holds is the same document: a write on top of it
    // reaches the writer.
    reader.put(&list, &t, json!({"seq": -1})).await.unwrap();
    until_value(&writer, &list, &t, &json!({"seq": -1})).await;
    writer.close().await;
    reader.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_converge_live_and_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*"],
    );
    let a = SyncClient::connect(Some(&server.url()), "", dir.path().join("a"))
        .await
        .unwrap();
    let b = SyncClient::connect(Some(&server.url()), "", dir.path().join("b"))
        .await
        .unwrap();
    let list = db("demo-list");
    a.open(&list).await.unwrap();
    b.open(&list).await.unwrap();
    a.put(&list, &doc("t1"), json!({"title": "milk", "done": false}))
        .await
        .unwrap();
    synced(&a, &list).await;
    until_value(
        &b,
        &list,
        &doc("t1"),
        &json!({"title": "milk", "done": false}),
    )
    .await;
    b.put(&list, &doc("t1"), json!({"title": "milk", "done": true}))
        .await
        .unwrap();
    until_value(
        &a,
        &list,
        &doc("t1"),
        &json!({"title": "milk", "done": true}),
    )
    .await;

    // Presence: a publishes its state; b sees it and the live count.
    a.set_presence(&list, br#"{"name":"ada"}"#.to_vec())
        .await
        .unwrap();
    let mut events = b.events();
    tokio::time::timeout(WAIT, async {
        loop {
            let p = b.presence(&list).await;
            if p.online == 2
                && p.peers
                    .iter()
                    .any(|x| x.state.as_deref() == Some(&br#"{"name":"ada"}"#[..]))
            {
                return;
            }
            let _ = events.recv().await;
        }
    })
    .await
    .expect("presence arrives");
    assert_eq!(a.status().await, syncline_core::sync::Status::Online);

    assert_eq!(http_get(server.addr, "/healthz").0, 200);
    let (status, metrics) = http_get(server.addr, "/metrics");
    assert_eq!(status, 200);
    for series in [
        "syncline_connections 2",
        "syncline_entries_in_total",
        "syncline_fsync_seconds_count",
        "syncline_subscriptions 2",
    ] {
        assert!(
            metrics.contains(series),
            "metrics lack {series}:\n{metrics}"
        );
    }
    // Database names can be secrets (shared by link): not by default.
    assert!(!metrics.contains("demo-list"), "{metrics}");
}

/// `THP_enabled` of a process's /proc status (Linux): 0 once it opted out.
#[cfg(target_os = "linux")]
fn thp_enabled(pid: u32) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status"))
}

/// The server opts out of transparent huge pages (native/src/memory.rs: they
/// doubled its resident memory), unless `MIMALLOC_ALLOW_THP` says otherwise.
#[cfg(target_os = "linux")]
#[test]
fn the_server_runs_without_transparent_huge_pages() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("a"), "127.0.0.1:0", &[]);
    assert_eq!(thp_enabled(server.child.id()), "0");
    let kept = ServerProc::start_with_env(
        &dir.path().join("b"),
        "127.0.0.1:0",
        &[],
        &[("MIMALLOC_ALLOW_THP", "1")],
    );
    // As this test's own process has it (the flag is inherited, so 1 unless
    // whoever started the tests opted out).
    assert_eq!(
        thp_enabled(kept.child.id()),
        thp_enabled(std::process::id())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_clients_sync_and_keep_nothing_locally() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*"],
    );
    let list = db("demo-mem");
    let a = SyncClient::in_memory(Some(&server.url()), "");
    let on_disk = SyncClient::connect(Some(&server.url()), "", dir.path().join("b"))
        .await
        .unwrap();
    assert_ne!(a.replica(), on_disk.replica());
    a.open(&list).await.unwrap();
    on_disk.open(&list).await.unwrap();
    a.put(&list, &doc("t1"), json!({"title": "milk"}))
        .await
        .unwrap();
    // Reads take the replica's lock, not the driver's queue: a write that
    // returned is visible at once, and an unopened database is an error.
    assert_eq!(
        a.get(&list, &doc("t1")).unwrap(),
        Some(json!({"title": "milk"}))
    );
    assert_eq!(a.list(&list).unwrap(), vec![doc("t1")]);
    assert!(matches!(
        a.get(&db("demo-unopened"), &doc("t1")),
        Err(ClientError::Local(
            syncline_core::sync::ClientError::NotOpen(_)
        ))
    ));
    synced(&a, &list).await;
    until_value(&on_disk, &list, &doc("t1"), &json!({"title": "milk"})).await;
    on_disk
        .put(&list, &doc("t2"), json!({"title": "eggs"}))
        .await
        .unwrap();
    until_value(&a, &list, &doc("t2"), &json!({"title": "eggs"})).await;
    a.close().await;
    assert!(matches!(a.get(&list, &doc("t1")), Err(ClientError::Closed)));

    // A new in-memory client starts empty under a new replica id and gets
    // everything from the server (what `a` wrote was acknowledged durable).
    let c = SyncClient::in_memory(Some(&server.url()), "");
    assert_ne!(c.replica(), a.replica());
    c.open(&list).await.unwrap();
    synced(&c, &list).await;
    assert_eq!(
        c.get(&list, &doc("t1")).unwrap(),
        Some(json!({"title": "milk"}))
    );
    assert_eq!(c.list(&list).unwrap().len(), 2);

    // Without a server it is a purely local replica.
    let local = SyncClient::in_memory(None, "");
    local.open(&list).await.unwrap();
    local.put(&list, &doc("x"), json!({"n": 1})).await.unwrap();
    assert_eq!(local.get(&list, &doc("x")).unwrap(), Some(json!({"n": 1})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_edits_merge_and_survive_a_server_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let mut server = ServerProc::start(&data, "127.0.0.1:0", &["--anonymous", "demo-*"]);
    let addr = server.addr.to_string();
    let a = SyncClient::connect(Some(&server.url()), "", dir.path().join("a"))
        .await
        .unwrap();
    let b = SyncClient::connect(Some(&server.url()), "", dir.path().join("b"))
        .await
        .unwrap();
    let list = db("demo-offline");
    for c in [&a, &b] {
        c.open(&list).await.unwrap();
    }
    a.put(&list, &doc("t"), json!({"title": "milk", "done": false}))
        .await
        .unwrap();
    synced(&a, &list).await;
    until_value(
        &b,
        &list,
        &doc("t"),
        &json!({"title": "milk", "done": false}),
    )
    .await;

    // The server goes away; both edit offline.
    assert!(server.sigterm().success(), "SIGTERM exits cleanly");
    a.put(&list, &doc("t"), json!({"title": "milk", "done": true}))
        .await
        .unwrap();
    b.put(
        &list,
        &doc("t"),
        json!({"title": "oat milk", "done": false}),
    )
    .await
    .unwrap();
    b.put(&list, &doc("u"), json!({"title": "bread"}))
        .await
        .unwrap();

    // It comes back on the same port with the same data; both reconnect.
    let _server = ServerProc::start(&data, &addr, &["--anonymous", "demo-*"]);
    let merged = json!({"title": "oat milk", "done": true});
    until_value(&a, &list, &doc("t"), &merged).await;
    until_value(&b, &list, &doc("t"), &merged).await;
    until_value(&a, &list, &doc("u"), &json!({"title": "bread"})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_databases_on_one_connection() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "t-*"],
    );
    let a = SyncClient::connect(Some(&server.url()), "", dir.path().join("a"))
        .await
        .unwrap();
    let b = SyncClient::connect(Some(&server.url()), "", dir.path().join("b"))
        .await
        .unwrap();
    let names: Vec<DbName> = (0..50).map(|i| db(&format!("t-{i}"))).collect();
    for n in &names {
        a.open(n).await.unwrap();
        b.open(n).await.unwrap();
        a.put(n, &doc("d"), json!({"db": n.as_str()}))
            .await
            .unwrap();
    }
    for n in &names {
        synced(&a, n).await;
        until_value(&b, n, &doc("d"), &json!({"db": n.as_str()})).await;
    }
}

async fn refused(c: &SyncClient, name: &str) -> ErrorCode {
    c.open(&db(name)).await.unwrap();
    match tokio::time::timeout(WAIT, c.wait_synced(&db(name)))
        .await
        .expect("answered")
    {
        Err(ClientError::Server { code, .. }) => code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn syncline_core_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_matrix_over_the_wire() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let server = ServerProc::start(&data, "127.0.0.1:0", &[]);
    let url = server.url();
    let client = |name: &str, tok: String| {
        let path = dir.path().join(name);
        let url = url.clone();
        async move { SyncClient::connect(Some(&url), &tok, path).await.unwrap() }
    };
    let none = client("none", String::new()).await;
    assert_eq!(refused(&none, "org-1").await, ErrorCode::Unauthorized);
    // A JWT whose signature's first character is changed.
    let mut forged = token(&data, &["--db", "org-*", "--rights", "write"]);
    let at = forged.rfind('.').unwrap() + 1;
    let flipped = if forged.as_bytes()[at] == b'A' {
        "B"
    } else {
        "A"
    };
    forged.replace_range(at..at + 1, flipped);
    let forged = client("forged", forged).await;
    assert_eq!(refused(&forged, "org-1").await, ErrorCode::Unauthorized);
    // Expired two minutes ago (past the 60 s leeway).
    let now = syncline_core_now();
    let expired_token = syncline::auth::mint(
        b"test-secret-0123456789-0123456789",
        &syncline::auth::Claims {
            sub: None,
            exp: Some(now - 120),
            iat: Some(now - 180),
            grants: vec![syncline::auth::GrantClaim {
                db: "org-*".into(),
                rights: "write".into(),
            }],
        },
    )
    .unwrap();
    let expired = client("expired", expired_token).await;
    assert_eq!(refused(&expired, "org-1").await, ErrorCode::Unauthorized);
    let other = client(
        "other",
        token(&data, &["--db", "other-*", "--rights", "write"]),
    )
    .await;
    assert_eq!(refused(&other, "org-1").await, ErrorCode::Forbidden);
    // Asked after the refusal arrived, wait_synced still fails at once
    // (it used to wait forever when the refusal beat the call).
    match tokio::time::timeout(WAIT, other.wait_synced(&db("org-1"))).await {
        Ok(Err(ClientError::Server { code, .. })) => assert_eq!(code, ErrorCode::Forbidden),
        r => panic!("expected Forbidden at once, got {r:?}"),
    }
    // A refused token is final: the client stops dialling and says so.
    match tokio::time::timeout(WAIT, none.wait_synced(&db("org-2"))).await {
        Ok(Err(ClientError::Server { code, .. })) => assert_eq!(code, ErrorCode::Unauthorized),
        r => panic!("expected Unauthorized at once, got {r:?}"),
    }

    let reader = client(
        "reader",
        token(&data, &["--db", "org-*", "--rights", "read"]),
    )
    .await;
    reader.open(&db("org-1")).await.unwrap();
    synced(&reader, &db("org-1")).await;
    let mut events = reader.events();
    reader
        .put(&db("org-1"), &doc("x"), json!({"a": 1}))
        .await
        .unwrap();
    let code = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error { code, .. }) = events.recv().await {
                return code;
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(code, ErrorCode::Forbidden);

    let writer_token = token(&data, &["--db", "org-*", "--rights", "write"]);
    let writer = client("writer", writer_token.clone()).await;
    writer.open(&db("org-1")).await.unwrap();
    synced(&writer, &db("org-1")).await;
    assert_eq!(
        writer.get(&db("org-1"), &doc("x")).unwrap(),
        None,
        "nothing written by the refused push"
    );

    // Only admin tokens list databases (those their pattern covers).
    writer
        .put(&db("org-1"), &doc("y"), json!({"b": 1}))
        .await
        .unwrap();
    synced(&writer, &db("org-1")).await;
    match writer.list_databases().await {
        Err(ClientError::Server { code, .. }) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected Forbidden, got {other:?}"),
    }
    let admin_token = token(&data, &["--db", "org-*", "--rights", "admin"]);
    let admin = client("admin", admin_token.clone()).await;
    assert_eq!(admin.list_databases().await.unwrap(), vec![db("org-1")]);
    let (ok, out, err) = cli(&[
        "list",
        "--databases",
        "--url",
        &url,
        "--token",
        &admin_token,
    ]);
    assert!(ok && out == "org-1\n", "{out}{err}");
    let (ok, _, err) = cli(&[
        "list",
        "--databases",
        "--url",
        &url,
        "--token",
        &writer_token,
    ]);
    assert!(!ok && err.contains("Forbidden"), "{err}");

    // A connection does not outlive its token: it is closed when it expires.
    let brief = client(
        "brief",
        token(
            &data,
            &["--db", "org-*", "--rights", "write", "--expires", "5s"],
        ),
    )
    .await;
    let mut events = brief.events();
    brief.open(&db("org-1")).await.unwrap();
    synced(&brief, &db("org-1")).await;
    let message = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error {
                code: ErrorCode::Unauthorized,
                message,
                ..
            }) = events.recv().await
            {
                return message;
            }
        }
    })
    .await
    .expect("the expired connection is closed");
    assert!(message.contains("reconnect with a fresh one"), "{message}");
}

/// A log file read with the store's own record decoder (a torn tail, as
/// a killed writer leaves, is ignored as a restart ignores it).
fn stored_at(log: &Path) -> syncline_core::StoredDatabase {
    let bytes = std::fs::read(log).unwrap_or_default();
    let (records, _, _) = syncline::store::decode_records(&bytes);
    let mut stored = syncline_core::StoredDatabase::default();
    for r in records {
        stored.apply(&r.into());
    }
    stored
}

/// A stopped server's log of `name`: every change verifies and nothing is
/// missing in the middle.
fn stored_log(data: &Path, name: &str) -> syncline_core::Log {
    let stored = stored_at(&data.join("dbs").join(format!("{name}.log")));
    for e in &stored.entries {
        e.parse_change().expect("stored changes verify");
    }
    let (log, problems) = syncline_core::Log::from_stored(stored);
    assert!(problems.is_empty(), "stored log has gaps: {problems:?}");
    log
}

/// A stopped server's version vector of `name`.
fn stored_vv(data: &Path, name: &str) -> syncline_core::VersionVector {
    stored_log(data, name).vv().clone()
}

/// What the storm's event watchers report.
enum StormEvent {
    Acked(usize, u64),
    Offline(usize),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_push_storm_loses_nothing_acknowledged() {
    use syncline_core::sync::Status;
    use tokio::sync::broadcast::error::RecvError;
    let rounds: usize = std::env::var("SYNCLINE_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let list = db("demo-storm");
    let mut server = ServerProc::start(&data, "127.0.0.1:0", &["--anonymous", "demo-*"]);
    let addr = server.addr.to_string();
    let url = server.url();
    let mut clients = Vec::new();
    let client_dir = |i: usize| dir.path().join(format!("c{i}"));
    for i in 0..3 {
        let c = SyncClient::connect(Some(&url), "", client_dir(i))
            .await
            .unwrap();
        c.open(&list).await.unwrap();
        clients.push(c);
    }
    // Every client's acks and disconnections, in the order it reported
    // them. A watcher that falls behind the client's event buffer could
    // miss an ack: that fails the test rather than freezing a count.
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::unbounded_channel::<StormEvent>();
    let mut watchers = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        let mut events = c.events();
        let ev_tx = ev_tx.clone();
        watchers.push(tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClientEvent::Acked { counter, .. }) => {
                        let _ = ev_tx.send(StormEvent::Acked(i, counter));
                    }
                    Ok(ClientEvent::Status(Status::Offline)) => {
                        let _ = ev_tx.send(StormEvent::Offline(i));
                    }
                    Ok(_) => {}
                    Err(RecvError::Lagged(n)) => panic!("client {i}: {n} events missed"),
                    Err(RecvError::Closed) => return,
                }
            }
        }));
    }
    drop(ev_tx);
    let check_watchers = |watchers: &[tokio::task::JoinHandle<()>]| {
        for (i, w) in watchers.iter().enumerate() {
            assert!(!w.is_finished(), "client {i}'s event watcher stopped");
        }
    };
    // Highest own counter each client has seen acknowledged.
    let mut acked = vec![0u64; clients.len()];
    for round in 0..rounds {
        if round > 0 {
            server = ServerProc::start(&data, &addr, &["--anonymous", "demo-*"]);
        }
        let at_start = acked.clone();
        // The storm: every client writes as fast as its local fsync allows.
        let writers: Vec<_> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let (c, list) = (c.clone(), list.clone());
                tokio::spawn(async move {
                    for k in 0..2_000u32 {
                        let d = doc(&format!("c{i}-{}", k % 25));
                        if c.put(&list, &d, json!({"round": round, "k": k}))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                })
            })
            .collect();
        // Kill once some pushes of this round are acknowledged, and at
        // least one of every client's (event-driven).
        let target = 3 + (round * 7) % 40;
        let mut seen = 0;
        tokio::time::timeout(WAIT, async {
            while seen < target || acked.iter().zip(&at_start).any(|(a, s)| a <= s) {
                match ev_rx.recv().await.expect("watchers run") {
                    StormEvent::Acked(i, counter) => {
                        acked[i] = acked[i].max(counter);
                        seen += 1;
                    }
                    StormEvent::Offline(_) => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!("round {round}: acks arrive for every client ({at_start:?} -> {acked:?})")
        });
        server.kill9();
        // Acks of frames the server sent before it died may still be on
        // their way: count them all, until every client saw its
        // connection end (a client reports acks before the disconnection).
        let mut offline = vec![false; clients.len()];
        tokio::time::timeout(WAIT, async {
            while offline.contains(&false) {
                match ev_rx.recv().await.expect("watchers run") {
                    StormEvent::Acked(i, counter) => acked[i] = acked[i].max(counter),
                    StormEvent::Offline(i) => offline[i] = true,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("round {round}: clients go offline ({offline:?})"));
        check_watchers(&watchers);
        for w in writers {
            w.abort();
        }
        for (i, (a, s)) in acked.iter().zip(&at_start).enumerate() {
            assert!(
                a > s,
                "round {round}: client {i}'s acks did not grow ({s} -> {a})"
            );
        }
        // Every acknowledged change is in the server's log, byte for byte
        // as its author wrote it (a client pushes only what it made
        // durable, so its own log holds them all).
        let log = stored_log(&data, list.as_str());
        let stored: std::collections::HashMap<_, _> = log.entries().map(|e| (e.dot, e)).collect();
        for (i, c) in clients.iter().enumerate() {
            let vv = log.vv().get(&c.replica());
            assert!(
                vv >= acked[i],
                "round {round}: client {i} had {} acknowledged, the log holds {vv}",
                acked[i],
            );
            let own = stored_at(&syncline::store::FileStore::log_path(&client_dir(i), &list));
            let mut compared = 0;
            for e in own.entries.iter().filter(|e| e.dot.replica == c.replica()) {
                if e.dot.counter > acked[i] || log.base().get(&c.replica()) >= e.dot.counter {
                    continue;
                }
                let s = stored.get(&e.dot).unwrap_or_else(|| {
                    panic!("round {round}: acknowledged {:?} is not in the log", e.dot)
                });
                assert!(
                    **s == *e,
                    "round {round}: the server stored {:?} differently",
                    e.dot
                );
                compared += 1;
            }
            assert_eq!(
                compared as u64,
                acked[i].saturating_sub(log.base().get(&c.replica())),
                "round {round}: client {i}'s own log holds every change it had acknowledged"
            );
        }
    }
    // Finally everyone converges: each has pushed everything, a fresh
    // replica shows what the server holds, and every client shows the
    // same documents with the same values.
    let mut server = ServerProc::start(&data, &addr, &["--anonymous", "demo-*"]);
    for c in &clients {
        synced(c, &list).await;
    }
    check_watchers(&watchers);
    let fresh = SyncClient::in_memory(Some(&url), "");
    fresh.open(&list).await.unwrap();
    synced(&fresh, &list).await;
    let docs = fresh.list(&list).unwrap();
    assert_eq!(docs.len(), 75, "every client's 25 documents");
    let mut want = Vec::new();
    for d in &docs {
        want.push(fresh.get(&list, d).unwrap().expect("a value"));
    }
    for c in &clients {
        for (d, v) in docs.iter().zip(&want) {
            until_value(c, &list, d, v).await;
        }
        assert_eq!(c.list(&list).unwrap(), docs);
    }
    fresh.close().await;
    for c in &clients {
        c.close().await;
    }
    // And their version vectors, read from their logs, equal the server's.
    assert!(server.sigterm().success());
    let at_server = stored_log(&data, list.as_str()).vv().clone();
    for (i, c) in clients.iter().enumerate() {
        let (log, problems) = syncline_core::Log::from_stored(stored_at(
            &syncline::store::FileStore::log_path(&client_dir(i), &list),
        ));
        assert!(problems.is_empty(), "client {i}: {problems:?}");
        assert_eq!(log.vv(), &at_server, "client {i}'s version vector");
        assert!(at_server.get(&c.replica()) >= acked[i]);
    }
}

/// Where the CLI keeps its replicas in these tests (not the user's config
/// directory).
fn cli_replicas() -> PathBuf {
    std::env::temp_dir().join(format!("syncline-cli-tests-{}", std::process::id()))
}

fn cli(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_syncline"))
        .args(args)
        .env("SYNCLINE_LOG", "error")
        .env("SYNCLINE_CLI_DIR", cli_replicas())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cli_get_put_delete_list_and_data_dir_tools() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let mut server = ServerProc::start(&data, "127.0.0.1:0", &["--anonymous", "demo-*"]);
    let url = server.url();
    let u = url.as_str();
    let (ok, _, err) = cli(&[
        "put",
        "--url",
        u,
        "demo-cli",
        "d1",
        r#"{"title":"milk","n":[1,2]}"#,
    ]);
    assert!(ok, "{err}");
    assert!(cli(&["put", "--url", u, "demo-cli", "d2", r#"{"x":true}"#]).0);
    let (ok, out, _) = cli(&["get", "--url", u, "demo-cli", "d1"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Json>(&out).unwrap(),
        json!({"title": "milk", "n": [1, 2]})
    );
    assert_eq!(cli(&["list", "--url", u, "demo-cli"]).1, "d1\nd2\n");
    assert!(cli(&["delete", "--url", u, "demo-cli", "d2"]).0);
    let (ok, _, err) = cli(&["get", "--url", u, "demo-cli", "d2"]);
    assert!(!ok && err.contains("no document"), "{err}");
    // A database without anonymous access: the typed refusal, non-zero exit.
    let (ok, _, err) = cli(&["get", "--url", u, "private", "d1"]);
    assert!(!ok && err.contains("Forbidden"), "{err}");
    let (ok, _, err) = cli(&["put", "--url", u, "demo-cli", "d3", "not json"]);
    assert!(!ok && err.contains("JSON"), "{err}");

    // Every call ran on one replica, kept between calls: the database's
    // version vector names one replica, not one per call.
    server.kill9();
    let vv = stored_vv(&data, "demo-cli");
    assert_eq!(vv.iter().count(), 1, "{vv:?}");
    assert_eq!(
        vv.iter().next().map(|(_, c)| *c),
        Some(3),
        "put, put, delete"
    );
    let d = data.to_str().unwrap();
    let (ok, out, _) = cli(&["verify", "--data", d]);
    assert!(ok && out.contains("demo-cli: ok"), "{out}");
    let (_, before, _) = cli(&["dump", "--data", d]);
    assert!(
        before.contains(r#""doc":"d1""#) && !before.contains(r#""doc":"d2""#),
        "{before}"
    );
    let (ok, out, err) = cli(&["compact", "--data", d]);
    assert!(ok, "{out}{err}");
    assert_eq!(
        cli(&["dump", "--data", d]).1,
        before,
        "compaction keeps every document"
    );
    assert!(cli(&["verify", "--data", d]).0);
    // Corrupt the log: verify reports it and fails.
    let log = data.join("dbs/demo-cli.log");
    let mut bytes = std::fs::read(&log).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    std::fs::write(&log, bytes).unwrap();
    let (ok, out, _) = cli(&["verify", "--data", d]);
    assert!(!ok && out.contains("checksum"), "{out}");
    // A frame limit a log record could not hold is refused at start.
    let (ok, _, err) = cli(&["serve", "--data", d, "--max-frame", "4294967296"]);
    assert!(!ok && err.contains("--max-frame must be between"), "{err}");
    let (ok, _, err) = cli(&["serve", "--data", d, "--max-connections-per-ip", "0"]);
    assert!(
        !ok && err.contains("--max-connections-per-ip must be"),
        "{err}"
    );
}

mod raw {
    //! A raw WebSocket peer that speaks (or mangles) the protocol by hand.
    use futures_util::{SinkExt, StreamExt};
    use syncline_core::protocol::{self, Message};
    use tokio_tungstenite::tungstenite::Message as Ws;

    pub type Socket = tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >;

    /// A `Hello` of the replica whose key has seed `[seed; 32]`, proved
    /// for the server at `url` now.
    pub fn hello(url: &str, seed: u8, token: &str) -> syncline_core::protocol::Hello {
        let host = syncline_core::identity::host_of_url(url).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        syncline_core::protocol::Hello::signed(
            &syncline_core::Identity::from_seed([seed; 32]),
            token,
            &host,
            now,
        )
    }

    pub async fn open(url: &str) -> Socket {
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    pub async fn send(ws: &mut Socket, frame: Vec<u8>) {
        let _ = ws.send(Ws::Binary(frame.into())).await;
    }

    /// The next protocol message, or None when the server closed.
    pub async fn next(ws: &mut Socket) -> Option<Message> {
        while let Some(Ok(m)) = ws.next().await {
            match m {
                Ws::Binary(b) => return protocol::decode(&b, usize::MAX).ok(),
                Ws::Close(_) => return None,
                _ => {}
            }
        }
        None
    }
}

async fn refused_with(url: &str, frame: raw_frame::Frame) -> syncline_core::protocol::ErrorCode {
    use futures_util::SinkExt;
    let mut ws = raw::open(url).await;
    match frame {
        raw_frame::Frame::Binary(b) => raw::send(&mut ws, b).await,
        raw_frame::Frame::Text(t) => {
            let _ = ws
                .send(tokio_tungstenite::tungstenite::Message::Text(t.into()))
                .await;
        }
    }
    let first = tokio::time::timeout(WAIT, raw::next(&mut ws))
        .await
        .unwrap();
    let Some(syncline_core::protocol::Message::Error(e)) = first else {
        panic!("expected an error, got {first:?}");
    };
    assert!(
        tokio::time::timeout(WAIT, raw::next(&mut ws))
            .await
            .unwrap()
            .is_none(),
        "the connection is closed after a bad frame"
    );
    e.code()
}

mod raw_frame {
    pub enum Frame {
        Binary(Vec<u8>),
        Text(String),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_are_refused_and_slow_readers_dropped_while_others_are_served() {
    use raw_frame::Frame;
    use syncline_core::protocol::{self, Message, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "demo-*",
            "--max-frame",
            "65536",
            "--max-queued-bytes",
            "1048576",
        ],
    );
    let url = server.url();
    let good = SyncClient::connect(Some(&url), "", dir.path().join("good"))
        .await
        .unwrap();
    let list = db("demo-bad");
    good.open(&list).await.unwrap();
    synced(&good, &list).await;

    let v = protocol::PROTOCOL_VERSION;
    let mut junk = vec![v, 0, 20, 0, 0, 0];
    junk.extend((0..20u8).map(|i| i.wrapping_mul(37)));
    assert_eq!(
        refused_with(&url, Frame::Binary(junk)).await,
        ErrorCode::BadFrame
    );
    assert_eq!(
        refused_with(&url, Frame::Binary(vec![v, 2, 3])).await,
        ErrorCode::BadFrame
    );
    assert_eq!(
        refused_with(&url, Frame::Binary(vec![9; 40])).await,
        ErrorCode::UnknownVersion
    );
    assert_eq!(
        refused_with(&url, Frame::Binary(vec![1; 70_000])).await,
        ErrorCode::TooLarge
    );
    assert_eq!(
        refused_with(&url, Frame::Text("hello".into())).await,
        ErrorCode::BadFrame
    );

    // A subscriber that never reads.
    let mut slow = raw::open(&url).await;
    let hello = Message::Hello(Box::new(raw::hello(&url, 7, "")));
    raw::send(&mut slow, protocol::encode(&hello)).await;
    let sub = Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: list.clone(),
        since: Default::default(),
        req: 1,
    }));
    raw::send(&mut slow, protocol::encode(&sub)).await;
    // It reads only once the server has dropped it (`Overloaded` counted):
    // then it must find what was queued, the typed error, and the close.
    let addr = server.addr;
    let slow_reader = tokio::spawn(async move {
        // (Bounded by the storm's length, which can exceed WAIT on a busy
        // machine.)
        let deadline = tokio::time::Instant::now() + 10 * WAIT;
        while metric(addr, "syncline_errors_total{code=\"Overloaded\"}").await < 1.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the slow reader was never dropped"
            );
            tokio::time::sleep(Duration::from_millis(10)).await; // polling a counter, bounded
        }
        tokio::time::timeout(WAIT, async move {
            let mut last = None;
            while let Some(m) = raw::next(&mut slow).await {
                last = Some(m);
            }
            last
        })
        .await
        .expect("the slow reader's connection is closed")
    });
    // The good client must never lose its connection.
    let mut good_events = good.events();
    let good_watch = tokio::spawn(async move {
        let mut statuses = Vec::new();
        loop {
            match good_events.recv().await {
                Ok(ClientEvent::Status(s)) => statuses.push(s),
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    panic!("missed {n} of the good client's events")
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return statuses,
            }
        }
    });

    // A writer pushes ~20 MB (deflated), 20 times the queue limit; the
    // good client keeps up, the slow one is dropped.
    let writer = SyncClient::connect(Some(&url), "", dir.path().join("w"))
        .await
        .unwrap();
    writer.open(&list).await.unwrap();
    // Incompressible values (atomic: a blob, not text): automerge deflates
    // large changes.
    let mut last = json!(null);
    for k in 0..2_000 {
        last = json!({"k": k, "blob": incompressible(16_000, k)});
        let d = doc(&format!("d{}", k % 50));
        writer
            .put_with(&list, &d, last.clone(), &["blob"])
            .await
            .unwrap();
    }
    synced(&writer, &list).await;
    until_value(&good, &list, &doc("d49"), &last).await;
    // The queue limit held while far more than it went out.
    let peak = metric(server.addr, "syncline_queued_bytes_peak").await;
    assert!(
        peak > 0.0 && peak <= 1_048_576.0,
        "bytes queued to one connection peaked at {peak}"
    );
    let out = metric(server.addr, "syncline_bytes_out_total").await;
    assert!(out > 10.0 * 1_048_576.0, "{out} bytes sent");
    let (_, metrics) = http_get(server.addr, "/metrics");
    assert!(
        metrics.contains("syncline_errors_total{code=\"Overloaded\"}"),
        "the slow reader was disconnected:\n{metrics}"
    );
    let last_to_slow = slow_reader.await.unwrap();
    let Some(Message::Error(e)) = &last_to_slow else {
        panic!(
            "the slow reader's last frame was not an error: {:?}",
            last_to_slow.as_ref().map(Message::kind)
        );
    };
    assert_eq!(e.code(), ErrorCode::Overloaded);
    good.close().await;
    writer.close().await;
    drop(good); // (the last sender of its events: the watcher ends)
    let statuses = tokio::time::timeout(WAIT, good_watch)
        .await
        .expect("the watcher ends")
        .unwrap();
    assert!(
        !statuses.contains(&syncline_core::sync::Status::Offline),
        "the good client went offline: {statuses:?}"
    );
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.child.id())).unwrap();
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").parse().ok())
        .unwrap();
    println!("server RSS after the storm: {} MB", rss_kb / 1024);
    assert!(
        rss_kb < 300 * 1024,
        "server memory stays bounded: {rss_kb} kB"
    );
}

/// A deflate stream of stored blocks: valid for any inflater, no compressor.
fn stored_deflate(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunks = data.chunks(65_535).peekable();
    while let Some(c) = chunks.next() {
        out.push(u8::from(chunks.peek().is_none()));
        let len = c.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// A frame whose body is `body` deflated (flags bit 0 set).
fn deflated_frame(body: &[u8]) -> Vec<u8> {
    let z = stored_deflate(body);
    let mut f = vec![syncline_core::protocol::PROTOCOL_VERSION, 1];
    f.extend_from_slice(&(z.len() as u32).to_le_bytes());
    f.extend_from_slice(&z);
    f
}

/// The value of one `/metrics` series (0 when absent).
async fn metric(addr: SocketAddr, series: &'static str) -> f64 {
    let (_, m) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap();
    m.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Send `frames` as a new connection's first frames: the server answers
/// with one error and closes, well within `within`.
async fn first_frames_refused(
    url: &str,
    frames: Vec<Vec<u8>>,
    within: Duration,
) -> syncline_core::protocol::ErrorMsg {
    use futures_util::SinkExt;
    use syncline_core::protocol::Message;
    use tokio_tungstenite::tungstenite::Message as Ws;
    let mut ws = raw::open(url).await;
    // One write: the server has every frame at hand at once.
    for f in frames {
        let _ = ws.feed(Ws::Binary(f.into())).await;
    }
    let _ = ws.flush().await;
    let first = tokio::time::timeout(within, raw::next(&mut ws))
        .await
        .expect("refused promptly");
    let Some(Message::Error(e)) = first else {
        panic!("expected an error, got {first:?}");
    };
    let rest = tokio::time::timeout(within, raw::next(&mut ws))
        .await
        .expect("closed promptly");
    assert!(rest.is_none(), "closed after the error, got {rest:?}");
    *e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_hello_only_one_small_uncompressed_hello_is_read() {
    use syncline_core::protocol::{self, MAX_HELLO_FRAME, Message, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    // The default frame limit (16 MiB) and a long Hello timeout: each
    // refusal below comes from the first frame, not from the clock.
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*", "--hello-timeout", "60"],
    );
    let url = server.url();
    let prompt = Duration::from_secs(5);
    let list = db("demo-first");
    let good = SyncClient::connect(Some(&url), "", dir.path().join("good"))
        .await
        .unwrap();
    good.open(&list).await.unwrap();
    synced(&good, &list).await;
    let hello = |token: &str| Message::Hello(Box::new(raw::hello(&url, 5, token)));
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let junk: Vec<u8> = (0..1 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();

    // 1 MiB of compressed junk: refused by its length, never inflated.
    let e = first_frames_refused(&url, vec![deflated_frame(&junk)], prompt).await;
    assert_eq!(e.code(), ErrorCode::TooLarge, "{}", e.message);
    assert!(
        e.message.contains(&MAX_HELLO_FRAME.to_string()),
        "{}",
        e.message
    );

    // A valid Hello, but compressed: refused, not inflated.
    let zipped = deflated_frame(&protocol::archive(&hello("")));
    assert!(matches!(
        protocol::decode(&zipped, 1 << 20),
        Ok(Message::Hello(_))
    ));
    let e = first_frames_refused(&url, vec![zipped], prompt).await;
    assert_eq!(e.code(), ErrorCode::BadFrame, "{}", e.message);
    assert!(e.message.contains("compressed"), "{}", e.message);

    // Anything but a Hello first.
    let sub = protocol::encode(&Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: list.clone(),
        since: Default::default(),
        req: 1,
    })));
    let e = first_frames_refused(&url, vec![sub.clone()], prompt).await;
    assert_eq!(e.code(), ErrorCode::ProtocolViolation, "{}", e.message);
    assert!(e.message.contains("not subscribe"), "{}", e.message);

    // A refused Hello: whatever the peer sent after it is never read.
    let bad_before = metric(server.addr, "syncline_errors_total{code=\"BadFrame\"}").await;
    let read_before = metric(server.addr, "syncline_bytes_in_total").await;
    let e = first_frames_refused(
        &url,
        vec![
            protocol::encode(&hello("not-a-token")),
            vec![protocol::PROTOCOL_VERSION, 0, 1, 0, 0, 0, 0xFF],
            deflated_frame(&junk),
        ],
        prompt,
    )
    .await;
    assert_eq!(e.code(), ErrorCode::Unauthorized, "{}", e.message);
    let read = metric(server.addr, "syncline_bytes_in_total").await - read_before;
    assert!(
        read < 64.0 * 1024.0,
        "{read} bytes read after a refused Hello"
    );
    let bad = metric(server.addr, "syncline_errors_total{code=\"BadFrame\"}").await;
    assert_eq!(bad, bad_before, "a frame after a refused Hello was decoded");

    // An honest Hello with pipelined Subscribe is still answered in order,
    // and the honest client was served throughout.
    let mut ws = raw::open(&url).await;
    raw::send(&mut ws, protocol::encode(&hello(""))).await;
    raw::send(&mut ws, sub).await;
    let welcome = tokio::time::timeout(WAIT, raw::next(&mut ws))
        .await
        .unwrap();
    assert!(matches!(welcome, Some(Message::Welcome(_))), "{welcome:?}");
    loop {
        match tokio::time::timeout(WAIT, raw::next(&mut ws))
            .await
            .unwrap()
        {
            Some(Message::Delta(d)) if d.req == 1 && d.last => break,
            Some(Message::Error(e)) => panic!("refused: {}", e.message),
            None => panic!("closed"),
            Some(_) => {}
        }
    }
    let d = doc("still-served");
    good.put(&list, &d, json!({"ok": true})).await.unwrap();
    synced(&good, &list).await;
    let other = SyncClient::connect(Some(&url), "", dir.path().join("other"))
        .await
        .unwrap();
    other.open(&list).await.unwrap();
    until_value(&other, &list, &d, &json!({"ok": true})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_hello_the_server_reads_a_hello_s_worth_and_no_more() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message as Ws;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*", "--hello-timeout", "60"],
    );
    let url = server.url();
    // A first message of 15 MiB (under the 16 MiB frame limit). Were it
    // read, the send would complete (the socket buffers of both ends hold
    // less than that); the server stops reading after 16 KiB and closes.
    let mut ws = raw::open(&url).await;
    let sent = tokio::time::timeout(WAIT, ws.send(Ws::Binary(vec![0u8; 15 << 20].into())))
        .await
        .expect("the send ends, one way or the other");
    assert!(
        sent.is_err(),
        "the server read a 15 MiB message before any Hello"
    );
    // Many such peers at once cost the server no more than their budgets.
    let mut peers = Vec::new();
    for _ in 0..32 {
        let mut ws = raw::open(&url).await;
        peers.push(tokio::spawn(async move {
            let _ = ws.send(Ws::Binary(vec![1u8; 8 << 20].into())).await;
        }));
    }
    for p in peers {
        tokio::time::timeout(WAIT, p).await.unwrap().unwrap();
    }
    // Still serving.
    let list = db("demo-after");
    let c = SyncClient::connect(Some(&url), "", dir.path().join("c"))
        .await
        .unwrap();
    c.open(&list).await.unwrap();
    c.put(&list, &doc("d"), json!({"ok": 1})).await.unwrap();
    synced(&c, &list).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_time_out_and_one_address_cannot_hold_every_socket() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--max-connections-per-ip", "2", "--handshakes-per-ip", "1"],
    );
    let closed_within = |s: &mut TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue, // a 408 before the close is fine
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false, // timed out: still open
            }
        }
    };
    // Request headers that never end: closed after the header timeout
    // (10 s), where before nothing ever closed them.
    let started = std::time::Instant::now();
    let mut slow = TcpStream::connect(server.addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    assert!(closed_within(&mut slow, Duration::from_secs(20)));
    assert!(started.elapsed() >= Duration::from_secs(9));

    // 2 × 2 connections still speaking HTTP, then the next is closed unread.
    let held: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(b"GET").unwrap();
            s
        })
        .collect();
    let mut fifth = TcpStream::connect(server.addr).unwrap();
    assert!(closed_within(&mut fifth, Duration::from_secs(5)));
    drop(held);

    // Handshakes (on a server of their own, so the sockets above are not
    // counted): a burst of 2 (the per-address cap), then 1 per second. The
    // third is refused by the rate or, if the server has not yet seen the
    // first two close, by the cap; `server/http.rs` tests the rate alone.
    let server = ServerProc::start(
        &dir.path().join("srv2"),
        "127.0.0.1:0",
        &["--max-connections-per-ip", "2", "--handshakes-per-ip", "1"],
    );
    let url = server.url();
    for _ in 0..2 {
        let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        drop(ws);
    }
    let refused = tokio_tungstenite::connect_async(&url).await;
    assert!(refused.is_err(), "a third handshake within the second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_cannot_take_every_connection() {
    use syncline_core::protocol::{self, Message};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*", "--max-connections-per-ip", "2"],
    );
    let url = server.url();
    // A fresh Hello for each connection: one is accepted only once.
    let hello = || protocol::encode(&Message::Hello(Box::new(raw::hello(&url, 6, ""))));
    let mut a = raw::open(&url).await;
    let mut b = raw::open(&url).await;
    for ws in [&mut a, &mut b] {
        raw::send(ws, hello()).await;
        let w = tokio::time::timeout(WAIT, raw::next(ws)).await.unwrap();
        assert!(matches!(w, Some(Message::Welcome(_))), "{w:?}");
    }
    // A third from the same address is turned away at the upgrade.
    match tokio_tungstenite::connect_async(url.as_str()).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!("expected 503, got {other:?}"),
    }
    // Once one closes, its slot is free again.
    drop(a);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut c = loop {
        match tokio_tungstenite::connect_async(url.as_str()).await {
            Ok((ws, _)) => break ws,
            Err(e) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "slot never freed: {e}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    raw::send(&mut c, hello()).await;
    let w = tokio::time::timeout(WAIT, raw::next(&mut c)).await.unwrap();
    assert!(matches!(w, Some(Message::Welcome(_))), "{w:?}");
    drop(b);
}

/// 400 writes over 40 documents (~60 KB of entries), then wait until the
/// server has made them all durable.
async fn write_storm(w: &SyncClient, list: &DbName) {
    for k in 0..400 {
        let d = doc(&format!("d{}", k % 40));
        w.put(
            list,
            &d,
            json!({"k": k, "note": format!("edit number {k} of the storm")}),
        )
        .await
        .unwrap();
    }
    synced(w, list).await;
}

/// Poll `/metrics` (bounded) until `series` reports at least `min`.
async fn until_metric(addr: SocketAddr, series: &str, min: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, m) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
            .await
            .unwrap();
        let v = m
            .lines()
            .find_map(|l| {
                l.strip_prefix(series)
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        if v >= min {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {min}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_compaction_folds_the_log_and_new_replicas_still_get_everything() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    // The storm writes ~52 KB of entries: the one compaction starts when
    // the durable log crosses 45 KB, however fast planning runs, and leaves
    // only what came after (under 7 KB, ~55 records) outside the rewrite.
    // (With 20 KB, when the next compaction came depended on how long the
    // plans took, and up to ~130 records could be left.)
    let mut server = ServerProc::start(
        &data,
        "127.0.0.1:0",
        &["--anonymous", "demo-*", "--compact-after-bytes", "45000"],
    );
    let url = server.url();
    let list = db("demo-compact");
    let w = SyncClient::connect(Some(&url), "", dir.path().join("w"))
        .await
        .unwrap();
    w.open(&list).await.unwrap();
    write_storm(&w, &list).await;
    until_metric(server.addr, "syncline_compactions_total", 1.0).await;
    // A replica that starts from nothing gets every document (from snapshots).
    let fresh = SyncClient::connect(Some(&url), "", dir.path().join("fresh"))
        .await
        .unwrap();
    fresh.open(&list).await.unwrap();
    synced(&fresh, &list).await;
    assert_eq!(fresh.list(&list).unwrap().len(), 40);
    for k in 360..400 {
        let d = doc(&format!("d{}", k % 40));
        assert_eq!(fresh.get(&list, &d).unwrap(), w.get(&list, &d).unwrap());
    }
    server.kill9();
    let d = data.to_str().unwrap();
    let (ok, out, _) = cli(&["verify", "--data", d]);
    assert!(ok, "{out}");
    let records: usize = out
        .split('(')
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    assert!(
        records < 100,
        "the log was rewritten into few records: {out}"
    );
    let (_, dump, _) = cli(&["dump", "--data", d]);
    assert_eq!(dump.lines().count(), 40);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_database_gets_views_and_cold_replicas_receive_them() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*"],
    );
    let url = server.url();
    let list = db("demo-views");
    let w = SyncClient::connect(Some(&url), "", dir.path().join("w"))
        .await
        .unwrap();
    w.open(&list).await.unwrap();
    for rev in 0..3 {
        for k in 0..50 {
            w.put(&list, &doc(&format!("d{k}")), json!({"k": k, "rev": rev}))
                .await
                .unwrap();
        }
    }
    synced(&w, &list).await;
    until_metric(server.addr, "syncline_views_built_total", 50.0).await;
    let fresh = SyncClient::connect(Some(&url), "", dir.path().join("fresh"))
        .await
        .unwrap();
    fresh.open(&list).await.unwrap();
    synced(&fresh, &list).await;
    let (_, metrics) = http_get(server.addr, "/metrics");
    assert!(
        metrics.contains("syncline_views_out_total 50"),
        "the cold replica got a view per document:\n{metrics}"
    );
    assert_eq!(fresh.list(&list).unwrap().len(), 50);
    for k in 0..50 {
        let d = doc(&format!("d{k}"));
        assert_eq!(
            fresh.get(&list, &d).unwrap(),
            Some(json!({"k": k, "rev": 2}))
        );
    }
    // Documents shown from views take edits like any other, both ways.
    fresh
        .put(&list, &doc("d7"), json!({"k": 7, "rev": 9}))
        .await
        .unwrap();
    until_value(&w, &list, &doc("d7"), &json!({"k": 7, "rev": 9})).await;
    server.kill9();
}

/// A database that is never quiet (a write every 20 ms; the views wait
/// for 5 s without one here, so a stall of the disk cannot make a pause)
/// still gets its views, at most about a second old (`--views-max-wait`),
/// so a cold replica of an active database is shown views too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_written_without_pause_still_gets_views() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "demo-*", "--views-quiet", "5"],
    );
    let url = server.url();
    let list = db("demo-busy");
    // In memory: no local fsync between writes, so they stay 20 ms apart.
    let w = SyncClient::in_memory(Some(&url), "");
    w.open(&list).await.unwrap();
    for k in 0..50 {
        w.put(&list, &doc(&format!("d{k}")), json!({"k": k}))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut rev = 0;
    while metric(server.addr, "syncline_views_built_total").await < 50.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no views while the database was being written ({rev} writes)"
        );
        rev += 1;
        w.put(&list, &doc("hot"), json!({"rev": rev}))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    synced(&w, &list).await;
    let fresh = SyncClient::connect(Some(&url), "", dir.path().join("fresh"))
        .await
        .unwrap();
    fresh.open(&list).await.unwrap();
    synced(&fresh, &list).await;
    assert_eq!(fresh.list(&list).unwrap().len(), 51);
    let out = metric(server.addr, "syncline_views_out_total").await;
    assert!(out >= 50.0, "the cold replica got views: {out}");
    server.kill9();
}

/// A socket that never says Hello gets a typed refusal; one that stops
/// answering pings is closed; one that answers stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_are_closed_and_live_ones_kept() {
    use futures_util::StreamExt;
    use syncline_core::protocol::{self, Message};
    use tokio_tungstenite::tungstenite::Message as Ws;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "demo-*",
            "--hello-timeout",
            "0.3",
            "--ping-interval",
            "0.2",
        ],
    );
    let url = server.url();
    // A fresh Hello for each connection: one is accepted only once.
    let hello = || protocol::encode(&Message::Hello(Box::new(raw::hello(&url, 9, ""))));

    // Never says Hello: ProtocolViolation, then the close.
    let mut mute = raw::open(&url).await;
    match tokio::time::timeout(WAIT, raw::next(&mut mute))
        .await
        .unwrap()
    {
        Some(Message::Error(e)) => assert_eq!(e.code(), ErrorCode::ProtocolViolation),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(WAIT, raw::next(&mut mute))
            .await
            .unwrap()
            .is_none()
    );

    // Says Hello, then never reads, so never answers a ping: closed.
    let mut dead = raw::open(&url).await;
    raw::send(&mut dead, hello()).await;
    until_metric(server.addr, "syncline_dead_connections_total", 1.0).await;

    // Says Hello and keeps reading (tungstenite answers pings as it reads):
    // still served after several intervals.
    let mut live = raw::open(&url).await;
    raw::send(&mut live, hello()).await;
    let mut pings = 0;
    while pings < 5 {
        match tokio::time::timeout(WAIT, live.next()).await.unwrap() {
            Some(Ok(Ws::Ping(_))) => pings += 1,
            Some(Ok(Ws::Binary(_))) => {}
            other => panic!("the live connection ended: {other:?}"),
        }
    }
    raw::send(&mut live, protocol::encode(&Message::Ping { nonce: 42 })).await;
    loop {
        match tokio::time::timeout(WAIT, raw::next(&mut live))
            .await
            .unwrap()
        {
            Some(Message::Pong { nonce }) => {
                assert_eq!(nonce, 42);
                break;
            }
            Some(_) => {}
            None => panic!("the live connection was closed"),
        }
    }
    drop(dead);
}

/// `syncline serve ARGS` (run in `cwd`) refuses to start: it exits non-zero
/// without listening. Its stderr.
fn serve_refused(cwd: &Path, args: &[&str]) -> String {
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncline"))
        .arg("serve")
        .args([
            "--listen",
            "127.0.0.1:0",
            "--secret",
            "test-secret-0123456789-0123456789",
        ])
        .args(args)
        .current_dir(cwd)
        .env("SYNCLINE_LOG", "warn")
        .env_remove("SYNCLINE_DATA")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > WAIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`syncline serve {}` kept running", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(20)); // polling an exit, bounded by WAIT
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(!status.success(), "serve {args:?} succeeded: {err}");
    assert!(
        !out.contains("listening on"),
        "serve {args:?} listened: {out}"
    );
    err
}

/// The static directory must not hold the data directory (its `secret`
/// mints admin tokens) nor lie inside it: refused at start, as is the
/// `--static .` with the default `./syncline-data` of issue 28.
#[test]
fn a_static_dir_holding_the_data_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let err = serve_refused(&site, &["--static", "."]);
    assert!(err.contains("contains the data directory"), "{err}");
    // A data dir that does not exist yet.
    let new_data = site.join("new-data");
    let err = serve_refused(
        dir.path(),
        &["--static", "site", "--data", new_data.to_str().unwrap()],
    );
    assert!(err.contains("contains the data directory"), "{err}");
    // The reverse.
    std::fs::create_dir_all(dir.path().join("srv/public")).unwrap();
    let err = serve_refused(dir.path(), &["--static", "srv/public", "--data", "srv"]);
    assert!(err.contains("is inside the data directory"), "{err}");
}

/// Dotfiles, dot-directories and symlinks leading out of the static root
/// (or onto a dotfile) answer 404; symlinks within it are followed.
#[cfg(unix)]
#[test]
fn static_files_skip_dotfiles_and_symlinks_out() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    let write = |path: &Path, text: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    write(&site.join("index.html"), "home");
    write(&site.join("app/main.js"), "main");
    write(&site.join(".env"), "dotfile");
    write(&site.join(".git/config"), "dot-directory");
    write(&site.join("app/.hidden"), "nested dotfile");
    write(&dir.path().join("outside/secret"), "outside");
    symlink(dir.path().join("outside/secret"), site.join("leak")).unwrap();
    symlink(dir.path().join("outside"), site.join("out")).unwrap();
    symlink("../.env", site.join("app/env")).unwrap();
    symlink("main.js", site.join("app/alias.js")).unwrap();

    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--static", site.to_str().unwrap()],
    );
    for (path, status, body) in [
        ("/", 200, "home"),
        ("/app/main.js", 200, "main"),
        ("/app/alias.js", 200, "main"),
        ("/healthz", 200, "ok\n"),
        ("/.env", 404, ""),
        ("/%2eenv", 404, ""),
        ("/.git/config", 404, ""),
        ("/app/.hidden", 404, ""),
        ("/leak", 404, ""),
        ("/out/secret", 404, ""),
        ("/app/env", 404, ""),
    ] {
        let (got, text) = http_get(server.addr, path);
        assert_eq!(got, status, "GET {path}: {text}");
        if status == 200 {
            assert_eq!(text, body, "GET {path}");
        }
    }
}

/// A store error (here a log damaged in the middle) reaches the client as
/// `Internal` with a generic text; the path it names goes to the log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_load_tells_the_client_no_path() {
    use syncline::store::FileStore;
    use syncline_core::{Batch, Dot, Entry, ReplicaId, Store};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let broken = db("demo-broken");
    let log_file = data.join("dbs/demo-broken.log");
    let mut ends = Vec::new();
    {
        let store = FileStore::open(&data).unwrap();
        for counter in 1..=3 {
            let entry = Entry {
                dot: Dot {
                    replica: ReplicaId([1; 16]),
                    counter,
                },
                doc: doc("d"),
                change: vec![7; 40],
            };
            store
                .write(&broken, &Batch::entries(vec![entry]))
                .await
                .unwrap();
            ends.push(std::fs::metadata(&log_file).unwrap().len());
        }
    }
    // A flipped byte inside the second record, a valid one after it.
    let mut bytes = std::fs::read(&log_file).unwrap();
    bytes[ends[0] as usize + 12] ^= 0x40;
    std::fs::write(&log_file, &bytes).unwrap();

    let log = dir.path().join("server.log");
    let mut server = ServerProc::start_logging_to(&data, &["--anonymous", "demo-*"], &log);
    let client = SyncClient::in_memory(Some(&server.url()), "");
    let mut events = client.events();
    client.open(&broken).await.unwrap();
    // `Internal` is transient: it does not settle `wait_synced`.
    let (code, message) = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error { code, message, .. }) = events.recv().await {
                return (code, message);
            }
        }
    })
    .await
    .expect("refused in time");
    assert_eq!(code, ErrorCode::Internal);
    let data_text = data.to_str().unwrap();
    assert!(
        !message.contains(data_text) && !message.contains("demo-broken.log"),
        "the client was told a server path: {message}"
    );
    client.close().await;
    server.kill9();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains(log_file.to_str().unwrap()),
        "the log lacks the detail: {logged}"
    );
}

/// A document compaction cannot fold (two changes with one automerge actor
/// and seq) is skipped and reported: the rest of the database compacts, its
/// entries stay, and the hub does not plan again after every write although
/// they keep the log above the threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_compaction_cannot_fold_is_skipped_and_not_retried_after_every_write() {
    use automerge::transaction::Transactable;
    use syncline::store::FileStore;
    use syncline_core::{Batch, Dot, Entry, ReplicaId, Store};
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let list = db("demo-poisoned");
    {
        // Each change is larger than the threshold, and the second repeats
        // the first one's seq: automerge refuses it.
        let store = FileStore::open(&data).unwrap();
        let replica = ReplicaId([1; 16]);
        let mut entries = Vec::new();
        for (counter, key) in [(1, "x"), (2, "y")] {
            let mut am = automerge::AutoCommit::new().with_actor(replica.actor());
            let big: String = (0..30_000u64)
                .map(|i| char::from(b'a' + ((i * 7919 + counter * 13) % 26) as u8))
                .collect();
            am.put(automerge::ROOT, key, big).unwrap();
            let change = am.get_last_local_change().unwrap();
            entries.push(Entry {
                dot: Dot { replica, counter },
                doc: doc("bad"),
                change: change.raw_bytes().to_vec(),
            });
        }
        store.write(&list, &Batch::entries(entries)).await.unwrap();
    }
    let log = dir.path().join("server.log");
    let mut server = ServerProc::start_logging_to(
        &data,
        &["--anonymous", "demo-*", "--compact-after-bytes", "20000"],
        &log,
    );
    let w = SyncClient::connect(Some(&server.url()), "", dir.path().join("w"))
        .await
        .unwrap();
    w.open(&list).await.unwrap();
    write_storm(&w, &list).await;
    until_metric(server.addr, "syncline_compactions_total", 1.0).await;
    let skipped = metric(server.addr, "syncline_compaction_skipped_documents_total").await;
    // About 60 KB of new entries: a plan per 20 KB of growth, not per write.
    assert!((1.0..=6.0).contains(&skipped), "{skipped} plans skipped it");
    w.close().await;
    server.kill9();
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("compaction skipped a document")
            && logged.contains("demo-poisoned")
            && logged.contains("bad"),
        "no warning naming the database and document: {logged}"
    );
    let stored = FileStore::open(&data)
        .unwrap()
        .load_blocking(&list)
        .unwrap();
    let bad = stored
        .entries
        .iter()
        .filter(|e| e.doc == doc("bad"))
        .count();
    assert_eq!(
        bad, 2,
        "the document that cannot be folded keeps its entries"
    );
    assert!(
        !stored.snapshots.is_empty() && stored.entries.len() - bad < 400,
        "the other documents are compacted"
    );
}

/// `--metrics-listen` moves `/metrics` off the public listener, and only
/// `--metrics-db-labels` lets it name databases; a database's series go
/// when it has no subscriber left.
#[tokio::test]
async fn metrics_can_move_to_their_own_address_and_name_databases_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "pub-*",
            "--metrics-listen",
            "127.0.0.1:0",
            "--metrics-db-labels",
            "true",
        ],
    );
    let at = server.metrics.expect("the metrics address is printed");
    assert_ne!(at, server.addr);
    assert_eq!(http_get(server.addr, "/metrics").0, 404);
    assert_eq!(http_get(server.addr, "/healthz").0, 200);

    let list = db("pub-secret-list");
    let client = SyncClient::in_memory(Some(&server.url()), "");
    client.open(&list).await.unwrap();
    synced(&client, &list).await;
    let series = "syncline_subscriptions{db=\"pub-secret-list\"}";
    tokio::time::timeout(WAIT, until_metric(at, series, 1.0))
        .await
        .expect("the labelled series appears");
    client.close().await;
    tokio::time::timeout(WAIT, async {
        loop {
            // Scrapes ask the hub at most once a second.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let (_, m) = tokio::task::spawn_blocking(move || http_get(at, "/metrics"))
                .await
                .unwrap();
            if !m.contains("pub-secret-list") {
                assert!(m.contains("syncline_connections "), "{m}");
                return;
            }
        }
    })
    .await
    .expect("the series goes with the last subscriber");
}

/// Past `--max-loaded-bytes`, a database nobody is subscribed to is
/// unloaded (checked every 10 s), and the next client loads it again whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_databases_are_unloaded_and_load_again_on_demand() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        dir.path(),
        "127.0.0.1:0",
        &["--anonymous", "idle-*", "--max-loaded-bytes", "0"],
    );
    let list = db("idle-list");
    let writer = SyncClient::in_memory(Some(&server.url()), "");
    writer.open(&list).await.unwrap();
    writer
        .put(&list, &doc("t1"), json!({"title": "kept"}))
        .await
        .unwrap();
    synced(&writer, &list).await;
    writer.close().await;
    tokio::time::timeout(
        WAIT,
        until_metric(server.addr, "syncline_unloaded_databases_total", 1.0),
    )
    .await
    .expect("unloaded within a check or two");
    let reader = SyncClient::in_memory(Some(&server.url()), "");
    reader.open(&list).await.unwrap();
    until_value(&reader, &list, &doc("t1"), &json!({"title": "kept"})).await;
}

/// A connection sending faster than `--max-read-bytes-per-second` is read
/// at that rate (it waits in its own socket); what it sent is all handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_over_its_read_rate_waits_and_loses_nothing() {
    use syncline_core::protocol::{self, Message};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        dir.path(),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "rate-*",
            "--max-frame",
            "65536",
            "--max-read-bytes-per-second",
            "65536",
        ],
    );
    let mut ws = raw::open(&server.url()).await;
    let hello = Message::Hello(Box::new(raw::hello(&server.url(), 9, "")));
    raw::send(&mut ws, protocol::encode(&hello)).await;
    let welcome = tokio::time::timeout(WAIT, raw::next(&mut ws))
        .await
        .unwrap();
    assert!(matches!(welcome, Some(Message::Welcome(_))), "{welcome:?}");
    // 700 pings, each charged 512 bytes: the burst (four seconds, 256 KiB)
    // holds 512; the rest wait about 1.5 s.
    for nonce in 0..700u64 {
        raw::send(&mut ws, protocol::encode(&Message::Ping { nonce })).await;
    }
    let mut pongs = 0u64;
    tokio::time::timeout(WAIT, async {
        while let Some(m) = raw::next(&mut ws).await {
            if let Message::Pong { nonce } = m {
                assert_eq!(nonce, pongs, "in order, none lost");
                pongs += 1;
                if nonce == 699 {
                    return;
                }
            }
        }
        panic!("closed after {pongs} pongs");
    })
    .await
    .expect("every ping answered");
    assert!(metric(server.addr, "syncline_read_waits_total").await >= 1.0);
}

/// Replies to Subscribe are encoded part by part as the socket drains, not
/// queued whole: a cold sync three times the per-connection send queue
/// arrives complete (it used to get the reader dropped as too slow), and
/// Subscribes sent back to back are answered one after another, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_cold_syncs_larger_than_the_send_queue_stream_in_order() {
    use syncline_core::protocol::{self, Message, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "big-*",
            "--max-frame",
            "65536",
            "--max-queued-bytes",
            "1048576",
        ],
    );
    let url = server.url();
    let list = db("big-1");
    let writer = SyncClient::connect(Some(&url), "", dir.path().join("w"))
        .await
        .unwrap();
    writer.open(&list).await.unwrap();
    const PUTS: u64 = 200;
    for k in 0..PUTS {
        let body = json!({ "k": k, "blob": incompressible(16_000, k) });
        writer
            .put_with(&list, &doc(&format!("d{}", k % 20)), body, &["blob"])
            .await
            .unwrap();
    }
    synced(&writer, &list).await;

    let mut ws = raw::open(&url).await;
    let hello = Message::Hello(Box::new(raw::hello(&url, 5, "")));
    raw::send(&mut ws, protocol::encode(&hello)).await;
    const REPLIES: u32 = 4;
    for req in 1..=REPLIES {
        let sub = Message::Subscribe(Box::new(Subscribe {
            horizon: None,
            db: list.clone(),
            since: Default::default(),
            req,
        }));
        raw::send(&mut ws, protocol::encode(&sub)).await;
    }
    let (mut req, mut part, mut entries) = (1u32, 0u32, 0usize);
    tokio::time::timeout(WAIT, async {
        while let Some(m) = raw::next(&mut ws).await {
            match m {
                Message::Delta(d) => {
                    assert_eq!(
                        (d.req, d.part),
                        (req, part),
                        "replies in order, parts in order"
                    );
                    entries += d.entries.len();
                    part += 1;
                    if d.last {
                        assert_eq!(entries as u64, PUTS, "reply {req} is complete");
                        (req, part, entries) = (req + 1, 0, 0);
                        if req > REPLIES {
                            return;
                        }
                    }
                }
                Message::Error(e) => panic!("refused: {e:?}"),
                _ => {}
            }
        }
        panic!("closed during reply {req}, part {part}");
    })
    .await
    .expect("every reply arrives");
    assert_eq!(
        metric(server.addr, "syncline_errors_total{code=\"Overloaded\"}").await,
        0.0
    );
}

/// Put `value` into `name`/`d` and wait for the server's answer: `None`
/// when it is stored, or the code of the refusal.
async fn put_answered(c: &SyncClient, name: &str, d: &str, value: Json) -> Option<ErrorCode> {
    let mut events = c.events();
    c.open(&db(name)).await.unwrap();
    c.put(&db(name), &doc(d), value).await.unwrap();
    let at = db(name);
    tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Ok(ClientEvent::Acked { db, .. }) if db == at => return None,
                Ok(ClientEvent::Error {
                    db: Some(db), code, ..
                }) if db == at => return Some(code),
                Ok(_) => {}
                Err(e) => panic!("events: {e}"),
            }
        }
    })
    .await
    .expect("answered in time")
}

/// Bytes of the logs in a data directory.
fn logs_on_disk(data: &Path) -> u64 {
    std::fs::read_dir(data.join("dbs"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
        .map(|e| e.metadata().unwrap().len())
        .sum()
}

/// An anonymous pattern holds at most `--max-anonymous-databases`
/// databases and the logs at most `--max-disk-bytes`, both counted again
/// when the server restarts: a push past either is refused with
/// `TooLarge` and stored nowhere, and what exists stays readable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_and_disk_quotas_hold_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let quota = ["--anonymous", "todo-*", "--max-anonymous-databases", "2"];
    let mut server = ServerProc::start(&data, "127.0.0.1:0", &quota);
    let c = SyncClient::connect(Some(&server.url()), "", dir.path().join("c1"))
        .await
        .unwrap();
    for name in ["todo-a", "todo-b"] {
        assert_eq!(put_answered(&c, name, "d", json!({"n": 1})).await, None);
    }
    let refused = put_answered(&c, "todo-c", "d", json!({"n": 1})).await;
    assert_eq!(refused, Some(ErrorCode::TooLarge));
    drop(c);
    assert!(server.sigterm().success());
    assert!(!data.join("dbs").join("todo-c.log").exists());

    // Counted again at start; the logs' size too.
    let on_disk = logs_on_disk(&data);
    let limit = (on_disk + 2_000).to_string();
    let mut args = quota.to_vec();
    args.extend(["--max-disk-bytes", &limit]);
    let mut server = ServerProc::start(&data, "127.0.0.1:0", &args);
    let c = SyncClient::connect(Some(&server.url()), "", dir.path().join("c2"))
        .await
        .unwrap();
    let refused = put_answered(&c, "todo-c", "d", json!({"n": 2})).await;
    assert_eq!(refused, Some(ErrorCode::TooLarge));
    let big = json!({"text": incompressible(3_000, 1)});
    assert_eq!(put_answered(&c, "todo-a", "big", big).await, None);
    let full = put_answered(&c, "todo-b", "more", json!({"n": 3})).await;
    assert_eq!(
        full,
        Some(ErrorCode::TooLarge),
        "the logs are past the quota"
    );
    let counted = metric(server.addr, "syncline_disk_bytes").await as u64;
    drop(c);
    assert!(server.sigterm().success());
    assert_eq!(
        counted,
        logs_on_disk(&data),
        "the writer's count is the files'"
    );

    let server = ServerProc::start(&data, "127.0.0.1:0", &args);
    let c = SyncClient::connect(Some(&server.url()), "", dir.path().join("c3"))
        .await
        .unwrap();
    let still = put_answered(&c, "todo-b", "more", json!({"n": 4})).await;
    assert_eq!(
        still,
        Some(ErrorCode::TooLarge),
        "still past it after a restart"
    );
    c.open(&db("todo-a")).await.unwrap();
    synced(&c, &db("todo-a")).await;
    assert_eq!(
        c.get(&db("todo-a"), &doc("d")).unwrap(),
        Some(json!({"n": 1}))
    );
}

/// A client subscribing to new databases faster than the ten-second check
/// does not outrun `--max-loaded-bytes`: every quarter of the budget's
/// worth of loads (2 KiB counted per empty database), idle ones are
/// unloaded at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_new_databases_is_unloaded_as_it_loads() {
    use syncline_core::protocol::{self, Message, Subscribe};
    let dir = tempfile::tempdir().unwrap();
    // 512 KiB: a check after every 64 loads; at the fifth (320 loaded,
    // 640 KiB) down to 384 KiB (192 empty databases).
    let server = ServerProc::start(
        dir.path(),
        "127.0.0.1:0",
        &["--anonymous", "storm-*", "--max-loaded-bytes", "524288"],
    );
    let mut ws = raw::open(&server.url()).await;
    let hello = Message::Hello(Box::new(raw::hello(&server.url(), 7, "")));
    raw::send(&mut ws, protocol::encode(&hello)).await;
    // Pipelined: each database is loaded, subscribed and left.
    for k in 0..400u32 {
        let name = db(&format!("storm-{k}"));
        let sub = Message::Subscribe(Box::new(Subscribe {
            horizon: None,
            db: name.clone(),
            since: Default::default(),
            req: k + 1,
        }));
        raw::send(&mut ws, protocol::encode(&sub)).await;
        raw::send(
            &mut ws,
            protocol::encode(&Message::Unsubscribe { db: name }),
        )
        .await;
    }
    // Every reply came, so every load and Unsubscribe was handled.
    let mut replies = 0;
    tokio::time::timeout(WAIT, async {
        while replies < 400 {
            match raw::next(&mut ws).await {
                Some(Message::Delta(d)) if d.last => replies += 1,
                Some(_) => {}
                None => panic!("closed after {replies} replies"),
            }
        }
    })
    .await
    .expect("every reply in time");
    let unloaded = metric(server.addr, "syncline_unloaded_databases_total").await;
    let loaded = metric(server.addr, "syncline_loaded_bytes").await;
    assert!(unloaded >= 64.0, "unloaded {unloaded}, loaded {loaded}");
    assert!(loaded <= 524_288.0, "loaded {loaded}");
}

/// Issue 30, part 1, against the real binary: a client that knows a
/// victim's replica id (every subscriber does) cannot push under it, with
/// its own key, with the victim's public key, or with a captured Hello; the
/// victim's offline edit then arrives intact and its later pushes are
/// accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_one_writes_under_a_replica_id_they_do_not_own() {
    use syncline_core::protocol::{self, ErrorCode, Hello, Message, Push, Subscribe};
    use syncline_core::{Database, Dot, Entry, Identity};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &["--anonymous", "notes-*"],
    );
    let url = server.url();
    let notes = db("notes-shared");
    let victim_dir = dir.path().join("victim");

    // The victim syncs one edit, then makes another offline.
    let victim = SyncClient::connect(Some(&url), "", &victim_dir)
        .await
        .unwrap();
    let victim_id = victim.replica();
    victim.open(&notes).await.unwrap();
    victim
        .put(&notes, &doc("n"), json!({"v": 1}))
        .await
        .unwrap();
    synced(&victim, &notes).await;
    victim.close().await;
    let offline = SyncClient::connect(None, "", &victim_dir).await.unwrap();
    assert_eq!(offline.replica(), victim_id, "the id is kept with its key");
    offline.open(&notes).await.unwrap();
    offline
        .put(&notes, &doc("n"), json!({"v": 2}))
        .await
        .unwrap();
    offline.close().await;

    // A forged push at the victim's next counter.
    let mut fake = Database::new(
        notes.clone(),
        victim_id,
        automerge::TextEncoding::UnicodeCodePoint,
    );
    let forged = fake
        .update(&doc("n"), &json!({"v": "forged"}))
        .unwrap()
        .unwrap();
    let forged = Entry {
        dot: Dot {
            replica: victim_id,
            counter: 2,
        },
        ..forged
    };
    let host = syncline_core::identity::host_of_url(&url).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let attempt = |hello: Vec<u8>| {
        let (url, notes, forged) = (url.clone(), notes.clone(), forged.clone());
        async move {
            let mut ws = raw::open(&url).await;
            raw::send(&mut ws, hello).await;
            let sub = Message::Subscribe(Box::new(Subscribe {
                horizon: None,
                db: notes.clone(),
                since: Default::default(),
                req: 1,
            }));
            raw::send(&mut ws, protocol::encode(&sub)).await;
            let push = Message::Push(Box::new(Push {
                db: notes,
                entries: vec![forged],
            }));
            raw::send(&mut ws, protocol::encode(&push)).await;
            let mut got = Vec::new();
            while let Some(m) = tokio::time::timeout(WAIT, raw::next(&mut ws))
                .await
                .unwrap()
            {
                got.push(m);
            }
            got
        }
    };
    let refused = |got: &[Message], why: &str| {
        assert!(
            !got.iter()
                .any(|m| matches!(m, Message::Welcome(_) | Message::Ack(_))),
            "{got:?}"
        );
        match got.first() {
            Some(Message::Error(e)) => {
                assert_eq!(e.code(), ErrorCode::Unauthorized);
                assert!(e.message.contains(why), "{}", e.message);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    };
    let attacker = Identity::generate();

    // (1) The victim's id with the attacker's own key.
    let mut hello = Hello::signed(&attacker, "", &host, now);
    hello.replica = victim_id;
    let got = attempt(protocol::encode(&Message::Hello(Box::new(hello)))).await;
    refused(&got, "not derived from the key");

    // (2) The victim's public key, signed by the attacker.
    let key_file = victim_dir.join("meta/replica-key");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "the key is readable by its owner only");
    }
    let key = std::fs::read(&key_file).unwrap();
    let victim_key = Identity::from_seed(key.as_slice().try_into().unwrap());
    assert_eq!(victim_key.replica(), victim_id);
    let mut hello = Hello::signed(&attacker, "", &host, now);
    hello.replica = victim_id;
    hello.proof.key = victim_key.public_key();
    let got = attempt(protocol::encode(&Message::Hello(Box::new(hello)))).await;
    refused(&got, "does not verify");

    // (3) A Hello of the victim's, used once (by the victim) and captured.
    let captured = protocol::encode(&Message::Hello(Box::new(Hello::signed(
        &victim_key,
        "",
        &host,
        now,
    ))));
    let mut once = raw::open(&url).await;
    raw::send(&mut once, captured.clone()).await;
    let w = tokio::time::timeout(WAIT, raw::next(&mut once))
        .await
        .unwrap();
    assert!(matches!(w, Some(Message::Welcome(_))), "{w:?}");
    drop(once);
    let got = attempt(captured).await;
    refused(&got, "replay");

    // (4) Signed for another server.
    let hello = Hello::signed(&victim_key, "", "evil.example", now);
    let got = attempt(protocol::encode(&Message::Hello(Box::new(hello)))).await;
    refused(&got, "not this server");

    // Nothing was stored under the victim's id: a reader sees its synced
    // state, then its offline edit once it reconnects, and it writes on.
    let reader = SyncClient::in_memory(Some(&url), "");
    reader.open(&notes).await.unwrap();
    synced(&reader, &notes).await;
    assert_eq!(
        reader.get(&notes, &doc("n")).unwrap(),
        Some(json!({"v": 1}))
    );
    let victim = SyncClient::connect(Some(&url), "", &victim_dir)
        .await
        .unwrap();
    victim.open(&notes).await.unwrap();
    synced(&victim, &notes).await;
    victim
        .put(&notes, &doc("n"), json!({"v": 3}))
        .await
        .unwrap();
    synced(&victim, &notes).await;
    let mut events = reader.events();
    let deadline = tokio::time::Instant::now() + WAIT;
    while reader.get(&notes, &doc("n")).unwrap() != Some(json!({"v": 3})) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the edits never arrived"
        );
        let _ = tokio::time::timeout_at(deadline, events.recv()).await;
    }
    // Both of the victim's edits are in the server's log, under its id.
    let mut ws = raw::open(&url).await;
    raw::send(
        &mut ws,
        protocol::encode(&Message::Hello(Box::new(raw::hello(&url, 77, "")))),
    )
    .await;
    let sub = Message::Subscribe(Box::new(Subscribe {
        horizon: None,
        db: notes.clone(),
        since: Default::default(),
        req: 1,
    }));
    raw::send(&mut ws, protocol::encode(&sub)).await;
    let mut counters = Vec::new();
    while let Some(m) = tokio::time::timeout(WAIT, raw::next(&mut ws))
        .await
        .unwrap()
    {
        if let Message::Delta(d) = m {
            counters.extend(
                d.entries
                    .iter()
                    .filter(|e| e.dot.replica == victim_id)
                    .map(|e| e.dot.counter),
            );
            if d.last {
                break;
            }
        }
    }
    assert_eq!(counters, vec![1, 2, 3]);
}

/// A private CA and a certificate for 127.0.0.1 and localhost signed by
/// it, written as PEM files into `dir`: (ca.pem, cert.pem, key.pem).
fn test_certificates(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("Syncline test CA {tag}"));
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join(format!("ca-{tag}.pem")),
        dir.join(format!("cert-{tag}.pem")),
        dir.join(format!("key-{tag}.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, leaf.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Issue 30, part 3: the server terminates TLS on its port; the native
/// client and the CLI sync over wss:// when they trust its CA, fail with a
/// clear error when they do not; a renewed certificate is served without
/// a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_with_a_private_ca_and_a_certificate_renewed_in_place() {
    use syncline::client::ClientOptions;
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_certificates(dir.path(), "a");
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "tls-*",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("wss://127.0.0.1:{}/sync", server.addr.port());
    let notes = db("tls-notes");
    let trusting = ClientOptions {
        ca_file: Some(ca.clone()),
    };

    // A client that trusts the CA syncs; another reads what it wrote.
    let a = SyncClient::connect_with(Some(&url), "", dir.path().join("a"), &trusting)
        .await
        .unwrap();
    a.open(&notes).await.unwrap();
    a.put(&notes, &doc("n"), json!({"over": "tls"}))
        .await
        .unwrap();
    synced(&a, &notes).await;
    let b = SyncClient::in_memory_with(Some(&url), "", &trusting).unwrap();
    b.open(&notes).await.unwrap();
    synced(&b, &notes).await;
    assert_eq!(
        b.get(&notes, &doc("n")).unwrap(),
        Some(json!({"over": "tls"}))
    );

    // One that does not trust it fails with a TLS error, not a hang.
    let stranger = SyncClient::in_memory(Some(&url), "");
    stranger.open(&notes).await.unwrap();
    match tokio::time::timeout(WAIT, stranger.wait_synced(&notes)).await {
        Ok(Err(e @ ClientError::Tls { .. })) => {
            assert!(e.to_string().contains("certificate"), "{e}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }

    // The CLI, with --ca-file, and without.
    let u = url.as_str();
    let ca_arg = ca.to_str().unwrap();
    let (ok, _, err) = cli(&[
        "put",
        "--url",
        u,
        "--ca-file",
        ca_arg,
        "tls-notes",
        "c",
        r#"{"cli":1}"#,
    ]);
    assert!(ok, "{err}");
    let (ok, out, err) = cli(&["get", "--url", u, "--ca-file", ca_arg, "tls-notes", "n"]);
    assert!(ok, "{err}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&out).unwrap(),
        json!({"over": "tls"})
    );
    let (ok, _, err) = cli(&["get", "--url", u, "tls-notes", "n"]);
    assert!(!ok);
    assert!(err.contains("TLS") && err.contains("certificate"), "{err}");

    // Renewal: a certificate from another CA replaces the files; new
    // connections get it without a restart (the old CA no longer works).
    let (ca2, cert2, key2) = test_certificates(dir.path(), "b");
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    let renewed = ClientOptions { ca_file: Some(ca2) };
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let c = SyncClient::in_memory_with(Some(&url), "", &renewed).unwrap();
        c.open(&notes).await.unwrap();
        let r = tokio::time::timeout(WAIT, c.wait_synced(&notes))
            .await
            .unwrap();
        c.close().await;
        match r {
            Ok(()) => break,
            Err(ClientError::Tls { .. }) if tokio::time::Instant::now() < deadline => {
                // The server looks at the files at most every 5 s.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => panic!("the renewed certificate was not served: {e}"),
        }
    }
    a.close().await;
    b.close().await;
}

/// `--allowed-origins`: a page of another site may not open /sync; a page
/// of an allowed one, and a native client (no Origin), may.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_origins_may_open_sync() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("srv"),
        "127.0.0.1:0",
        &[
            "--anonymous",
            "o-*",
            "--allowed-origins",
            "https://app.example,https://*.trusted.example",
        ],
    );
    let url = server.url();
    let open_from = |origin: &str| {
        let mut req = url.as_str().into_client_request().unwrap();
        req.headers_mut().insert("origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match open_from("https://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!("expected 403, got {:?}", other.map(|_| ())),
    }
    assert!(open_from("https://app.example").await.is_ok());
    assert!(open_from("https://eu.trusted.example").await.is_ok());
    let native = SyncClient::in_memory(Some(&url), "");
    native.open(&db("o-1")).await.unwrap();
    synced(&native, &db("o-1")).await;
}

/// The audit trail: a token's subject is recorded with the replica that
/// connected with it, and `syncline dump --changes` shows who wrote each
/// stored change (no one for anonymous replicas).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dump_shows_who_wrote_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let server = ServerProc::start(&data, "127.0.0.1:0", &["--anonymous", "org-open"]);
    let url = server.url();
    let org = db("org-1");
    let alice_token = token(&data, &["--grant", "org-*=write", "--sub", "alice"]);
    let alice = SyncClient::in_memory(Some(&url), &alice_token);
    alice.open(&org).await.unwrap();
    alice
        .put(&org, &doc("a"), json!({"by": "alice"}))
        .await
        .unwrap();
    synced(&alice, &org).await;
    let anon = SyncClient::in_memory(Some(&url), "");
    anon.open(&db("org-open")).await.unwrap();
    anon.put(&db("org-open"), &doc("x"), json!({"by": "?"}))
        .await
        .unwrap();
    synced(&anon, &db("org-open")).await;
    // The pairing is appended off the hub: wait for it (bounded).
    let file = data.join("subjects.jsonl");
    let deadline = tokio::time::Instant::now() + WAIT;
    while !std::fs::read_to_string(&file).is_ok_and(|t| t.contains("alice")) {
        assert!(tokio::time::Instant::now() < deadline, "no subjects line");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let out = Command::new(env!("CARGO_BIN_EXE_syncline"))
        .args(["dump", "--changes", "--data"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Json> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |name: &str| {
        lines
            .iter()
            .find(|l| l["db"] == name)
            .unwrap_or_else(|| panic!("no change of {name} in {lines:?}"))
            .clone()
    };
    let a = of("org-1");
    assert_eq!(a["replica"], alice.replica().to_hex());
    assert_eq!(a["subjects"], json!(["alice"]));
    let x = of("org-open");
    assert_eq!(x["replica"], anon.replica().to_hex());
    assert_eq!(x["subjects"], json!([]));
}
