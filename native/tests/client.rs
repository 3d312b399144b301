//! The native client as a developer meets it in the first hour (issue 33):
//! read-modify-write that cannot undo others' edits, refusals every later
//! call sees, and waits that can fail. Against the real server binary.

mod common;

use std::time::Duration;

use common::{ServerProc, WAIT, db, doc, synced, token, until_value};
use serde_json::json;
use syncline::client::{ClientError, SyncClient};
use syncline_core::DbName;
use syncline_core::protocol::ErrorCode;
use syncline_core::sync::{ClientEvent, Status};

async fn two_clients(server: &ServerProc, list: &DbName) -> (SyncClient, SyncClient) {
    let a = SyncClient::in_memory(Some(&server.url()), "");
    let b = SyncClient::in_memory(Some(&server.url()), "");
    for c in [&a, &b] {
        c.open(list).await.unwrap();
        synced(c, list).await;
    }
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_changes_the_current_value_so_a_remote_edit_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), "127.0.0.1:0", &["--anonymous", "todo-*"]);
    let list = db("todo-rmw");
    let t = doc("t");
    let (a, b) = two_clients(&server, &list).await;
    a.put(&list, &t, json!({"a": 0, "b": 0})).await.unwrap();
    until_value(&b, &list, &t, &json!({"a": 0, "b": 0})).await;
    // A reads; B changes b; A receives it.
    let stale = a.get(&list, &t).unwrap().unwrap();
    b.update(&list, &t, |d| d["b"] = 1.into()).await.unwrap();
    until_value(&a, &list, &t, &json!({"a": 0, "b": 1})).await;
    // A's update starts from the document as it is now: b = 1 stays.
    assert!(a.update(&list, &t, |d| d["a"] = 1.into()).await.unwrap());
    let both = json!({"a": 1, "b": 1});
    until_value(&a, &list, &t, &both).await;
    until_value(&b, &list, &t, &both).await;
    // A put of the stale copy is what the docs say it is: the whole value,
    // reverting b (the reason to use update).
    let mut stale = stale;
    stale["a"] = 2.into();
    a.put(&list, &t, stale).await.unwrap();
    until_value(&b, &list, &t, &json!({"a": 2, "b": 0})).await;
    // An update of an absent document starts from {}.
    assert!(
        a.update(&list, &doc("new"), |d| d["x"] = 1.into())
            .await
            .unwrap()
    );
    assert_eq!(a.get(&list, &doc("new")).unwrap(), Some(json!({"x": 1})));
    // Nothing changed: false, and nothing written.
    assert!(!a.update(&list, &doc("new"), |_| {}).await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_and_text_merge_concurrent_edits() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), "127.0.0.1:0", &["--anonymous", "todo-*"]);
    let list = db("todo-fields");
    let t = doc("t");
    let (a, b) = two_clients(&server, &list).await;
    a.increment(&list, &t, &["votes"], 1).await.unwrap();
    a.splice_text(&list, &t, &["title"], 0, 0, "milk")
        .await
        .unwrap();
    until_value(&b, &list, &t, &json!({"votes": 1, "title": "milk"})).await;
    // Both add 1 and both edit the text without waiting for the other's
    // change: counters add and text merges, in whichever order they meet.
    let (ra, rb) = tokio::join!(
        a.increment(&list, &t, &["votes"], 1),
        b.increment(&list, &t, &["votes"], 1)
    );
    assert!(ra.unwrap() && rb.unwrap());
    a.splice_text(&list, &t, &["title"], 4, 0, " and eggs")
        .await
        .unwrap();
    b.splice_text(&list, &t, &["title"], 0, 0, "oat ")
        .await
        .unwrap();
    let want = json!({"votes": 3, "title": "oat milk and eggs"});
    until_value(&a, &list, &t, &want).await;
    until_value(&b, &list, &t, &want).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_update_writes_nothing_and_the_client_goes_on() {
    let c = SyncClient::in_memory(None, "");
    let list = db("local");
    c.open(&list).await.unwrap();
    c.put(&list, &doc("t"), json!({"n": 1})).await.unwrap();
    let r = c
        .update(&list, &doc("t"), |d| {
            d["n"] = 2.into();
            panic!("the app's bug");
        })
        .await;
    match r {
        Err(ClientError::UpdatePanicked(m)) => assert!(m.contains("the app's bug"), "{m}"),
        other => panic!("expected UpdatePanicked, got {other:?}"),
    }
    assert_eq!(c.get(&list, &doc("t")).unwrap(), Some(json!({"n": 1})));
    assert!(
        c.update(&list, &doc("t"), |d| d["n"] = 3.into())
            .await
            .unwrap()
    );
    assert_eq!(c.get(&list, &doc("t")).unwrap(), Some(json!({"n": 3})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_to_a_refused_database_fail_with_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let server = ServerProc::start(&data, "127.0.0.1:0", &[]);
    let reader_token = token(&data, &["--db", "org-*", "--rights", "read"]);
    let reader = SyncClient::connect(Some(&server.url()), &reader_token, dir.path().join("r"))
        .await
        .unwrap();
    let list = db("org-1");
    reader.open(&list).await.unwrap();
    synced(&reader, &list).await;
    let mut events = reader.events();
    // The first write is local: the server has not said anything yet.
    assert!(reader.put(&list, &doc("x"), json!({"a": 1})).await.unwrap());
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error { code, .. }) = events.recv().await {
                assert_eq!(code, ErrorCode::Forbidden);
                return;
            }
        }
    })
    .await
    .expect("the server refuses the push");
    // Every later write says so, and changes nothing.
    let forbidden = |r: Result<bool, ClientError>| match r {
        Err(ClientError::Server { code, .. }) => code == ErrorCode::Forbidden,
        _ => false,
    };
    assert!(forbidden(
        reader.put(&list, &doc("y"), json!({"b": 1})).await
    ));
    assert!(forbidden(
        reader.update(&list, &doc("x"), |d| d["a"] = 2.into()).await
    ));
    assert!(forbidden(
        reader.increment(&list, &doc("x"), &["n"], 1).await
    ));
    assert!(forbidden(reader.delete(&list, &doc("x")).await));
    assert_eq!(reader.get(&list, &doc("y")).unwrap(), None);
    assert_eq!(reader.get(&list, &doc("x")).unwrap(), Some(json!({"a": 1})));
    // Other databases are not affected.
    let other = db("org-2");
    reader.open(&other).await.unwrap();
    synced(&reader, &other).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_synced_fails_without_a_server_and_times_out_offline() {
    let local = SyncClient::in_memory(None, "");
    let list = db("local");
    local.open(&list).await.unwrap();
    match tokio::time::timeout(WAIT, local.wait_synced(&list)).await {
        Ok(Err(ClientError::NoServer)) => {}
        other => panic!("expected NoServer at once, got {other:?}"),
    }
    // A server that is not there: a port bound and closed again.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let offline = SyncClient::in_memory(Some(&format!("ws://127.0.0.1:{port}/sync")), "");
    let mut events = offline.events();
    offline.open(&list).await.unwrap();
    // The first dial has failed (so the timeout below can name its cause).
    tokio::time::timeout(WAIT, async {
        while !matches!(events.recv().await, Ok(ClientEvent::ConnectFailed { .. })) {}
    })
    .await
    .expect("a ConnectFailed event");
    let waited = Duration::from_millis(300);
    match offline.wait_synced_for(&list, waited).await {
        Err(ClientError::Timeout {
            db,
            waited: w,
            status,
            last_failure,
        }) => {
            assert_eq!((db, w), (list.clone(), waited));
            assert_ne!(status, Status::Online);
            assert!(last_failure.is_some(), "the refused dial is the cause");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_url_that_is_not_a_websocket_url_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    for url in [
        "http://127.0.0.1:7070/sync",
        "127.0.0.1:7070",
        "ws://bad host/sync",
    ] {
        match SyncClient::connect(Some(url), "", dir.path().join("r")).await {
            Err(ClientError::InvalidUrl { url: u, reason }) => {
                assert_eq!(u, url);
                assert!(!reason.is_empty());
            }
            other => panic!("{url}: expected InvalidUrl, got {other:?}"),
        }
        // in_memory cannot fail: every wait says it instead, at once.
        let c = SyncClient::in_memory(Some(url), "");
        let list = db("local");
        c.open(&list).await.unwrap();
        match tokio::time::timeout(WAIT, c.wait_synced(&list)).await {
            Ok(Err(ClientError::Connect { message, .. })) => {
                assert!(message.contains("invalid server URL"), "{message}")
            }
            other => panic!("{url}: expected Connect at once, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_failures_are_events_with_their_cause() {
    // Refused: retried, each failure an event, the cause in the timeout.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let c = SyncClient::in_memory(Some(&format!("ws://127.0.0.1:{port}/sync")), "");
    let mut events = c.events();
    let list = db("local");
    c.open(&list).await.unwrap();
    let (message, permanent) = tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::ConnectFailed { message, permanent }) = events.recv().await {
                return (message, permanent);
            }
        }
    })
    .await
    .expect("a ConnectFailed event");
    assert!(message.to_lowercase().contains("refused"), "{message}");
    assert!(!permanent);
    match c.wait_synced_for(&list, Duration::from_millis(200)).await {
        Err(e @ ClientError::Timeout { .. }) => {
            assert!(e.to_string().contains("refused"), "{e}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }

    // A wrong path: the server answers 404, which retrying cannot mend.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), "127.0.0.1:0", &["--anonymous", "todo-*"]);
    let wrong = format!("ws://{}/not-sync", server.addr);
    let c = SyncClient::in_memory(Some(&wrong), "");
    let list = db("todo-x");
    c.open(&list).await.unwrap();
    match tokio::time::timeout(WAIT, c.wait_synced(&list)).await {
        Ok(Err(ClientError::Connect { url, message })) => {
            assert_eq!(url, wrong);
            assert!(message.contains("404"), "{message}");
        }
        other => panic!("expected Connect (404), got {other:?}"),
    }
}

/// Run the CLI; (success, stdout, stderr). Bounded by `WAIT`: a command
/// that waits out a long `--timeout` fails the test.
fn cli(args: &[&str]) -> (bool, String, String) {
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_syncline"))
        .args(args)
        .env("SYNCLINE_LOG", "error")
        .env_remove("SYNCLINE_SECRET")
        .env_remove("SYNCLINE_DATA")
        .env_remove("SYNCLINE_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            started.elapsed() < WAIT,
            "syncline {args:?} still running after {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_cli_says_why_it_cannot_connect_as_soon_as_it_knows() {
    let dir = tempfile::tempdir().unwrap();
    let replicas = dir.path().join("cli");
    let replicas = replicas.to_str().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cases = [
        // Nothing listening: refused, at once (not after --timeout 600).
        (format!("ws://127.0.0.1:{port}/sync"), "refused"),
        (format!("http://127.0.0.1:{port}/sync"), "ws://"),
        (
            "ws://no-such-host.invalid/sync".to_owned(),
            "no-such-host.invalid",
        ),
    ];
    for (url, says) in cases {
        let args = ["get", "--url", &url, "--timeout", "600"];
        let (ok, _, err) = cli(&[&args[..], &["--replica-dir", replicas, "todo-1", "t"]].concat());
        assert!(!ok);
        assert!(err.to_lowercase().contains(says), "{url}: {err}");
        assert!(!err.contains("within 600s"), "{url}: {err}");
    }
}

#[test]
fn the_cli_asks_for_a_unit_shows_only_its_arguments_and_finds_the_secret() {
    let (ok, _, err) = cli(&["token", "--grant", "a=read", "--expires", "7"]);
    assert!(
        !ok && err.contains("needs a unit") && err.contains("7d"),
        "{err}"
    );
    let (ok, out, _) = cli(&[
        "token",
        "--grant",
        "a=read",
        "--expires",
        "7d",
        "--secret",
        common::SECRET,
    ]);
    assert!(ok && out.trim().split('.').count() == 3, "{out}");

    let (_, get_help, _) = cli(&["get", "--help"]);
    assert!(
        get_help.contains("<DOC>") && !get_help.contains("<JSON>"),
        "{get_help}"
    );
    let (_, list_help, _) = cli(&["list", "--help"]);
    assert!(
        !list_help.contains("<DOC>") && list_help.contains("--databases"),
        "{list_help}"
    );
    let (_, put_help, _) = cli(&["put", "--help"]);
    assert!(put_help.contains("<JSON>"), "{put_help}");

    // Outside the server's directory: the error says where it looked; the
    // server's config file is enough to find the secret.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("secret"), common::SECRET).unwrap();
    let (ok, _, err) = cli(&["token", "--grant", "a=read"]);
    assert!(
        !ok && err.contains("looked in") && err.contains("--config"),
        "{err}"
    );
    let config = dir.path().join("syncline.toml");
    std::fs::write(&config, format!("data = {:?}\n", data.to_str().unwrap())).unwrap();
    let (ok, out, err) = cli(&[
        "token",
        "--grant",
        "a=read",
        "--config",
        config.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    // Minted with the server's secret: the server accepts it.
    let server = ServerProc::start(&data, "127.0.0.1:0", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let c = SyncClient::in_memory(Some(&server.url()), out.trim());
        let list = db("a");
        c.open(&list).await.unwrap();
        synced(&c, &list).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builder_fails_over_between_urls_and_asks_the_token_provider_again() {
    use std::sync::{Arc, Mutex};
    use syncline::ClientBuilder;
    // Nothing chosen for the replica, and a bad URL: refused at build.
    match ClientBuilder::default().build().await {
        Err(ClientError::InvalidConfig(m)) => assert!(m.contains(".dir("), "{m}"),
        other => panic!("expected InvalidConfig, got {other:?}"),
    }
    match SyncClient::builder()
        .url("http://x/sync")
        .in_memory()
        .build()
        .await
    {
        Err(ClientError::InvalidUrl { .. }) => {}
        other => panic!("expected InvalidUrl, got {other:?}"),
    }

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("srv");
    let server = ServerProc::start(&data, "127.0.0.1:0", &[]);
    let good = token(&data, &["--db", "org-*", "--rights", "write"]);
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // The first URL has nothing behind it; the provider's token is refused
    // until the app refreshes it.
    let current = Arc::new(Mutex::new("not-a-token".to_owned()));
    let provided = current.clone();
    let c = SyncClient::builder()
        .url(format!("ws://127.0.0.1:{dead}/sync"))
        .url(server.url())
        .token_provider(move || provided.lock().unwrap().clone())
        .backoff(Duration::from_millis(10), Duration::from_millis(50))
        .dir(dir.path().join("replica"))
        .build()
        .await
        .unwrap();
    let mut events = c.events();
    let list = db("org-1");
    c.open(&list).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(ClientEvent::Error { code, .. }) = events.recv().await {
                assert_eq!(code, ErrorCode::Unauthorized);
                return;
            }
        }
    })
    .await
    .expect("the stale token is refused");
    *current.lock().unwrap() = good;
    c.put(&list, &doc("t"), json!({"ok": true})).await.unwrap();
    synced(&c, &list).await;
    let other = SyncClient::in_memory(
        Some(&server.url()),
        &token(&data, &["--db", "org-*", "--rights", "read"]),
    );
    other.open(&list).await.unwrap();
    until_value(&other, &list, &doc("t"), &json!({"ok": true})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_documents_presence_and_an_event_stream_that_never_lags() {
    use futures_util::StreamExt;
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Todo {
        title: String,
        done: bool,
    }
    let c = SyncClient::builder().in_memory().build().await.unwrap();
    let list = db("local");
    c.open(&list).await.unwrap();
    let milk = Todo {
        title: "milk".into(),
        done: false,
    };
    assert!(c.put_as(&list, &doc("t"), &milk).await.unwrap());
    assert_eq!(c.get_as::<Todo>(&list, &doc("t")).unwrap(), Some(milk));
    c.put(&list, &doc("n"), json!({"title": 3})).await.unwrap();
    match c.get_as::<Todo>(&list, &doc("n")) {
        Err(ClientError::Json(m)) => assert!(m.contains("local/n"), "{m}"),
        other => panic!("expected a JSON error, got {other:?}"),
    }
    assert_eq!(c.get_as::<Todo>(&list, &doc("absent")).unwrap(), None);

    // 1,100 writes while the stream is not read: the broadcast lags, and
    // the stream says every document changed instead.
    let mut stream = Box::pin(c.event_stream());
    for i in 0..1_100 {
        c.put(&list, &doc(&format!("d{i}")), json!({"i": i}))
            .await
            .unwrap();
    }
    let all = tokio::time::timeout(WAIT, async {
        while let Some(e) = stream.next().await {
            if let ClientEvent::Changed { docs, .. } = e
                && docs.len() > 1_000
            {
                return docs.len();
            }
        }
        panic!("the stream ended");
    })
    .await
    .expect("a Changed naming every document");
    assert_eq!(all, 1_102);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_presence_reaches_the_other_client() {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Clone)]
    struct Cursor {
        name: String,
        at: u32,
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(dir.path(), "127.0.0.1:0", &["--anonymous", "todo-*"]);
    let list = db("todo-presence");
    let (a, b) = two_clients(&server, &list).await;
    let mine = Cursor {
        name: "ada".into(),
        at: 7,
    };
    a.set_presence_as(&list, &mine).await.unwrap();
    let mut events = b.events();
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let peers = b.presence_as::<Cursor>(&list).await;
            if let Some(p) = peers.iter().find(|p| p.replica == a.replica())
                && p.state.is_some()
            {
                return p.state.clone();
            }
            let _ = events.recv().await;
        }
    })
    .await
    .expect("a's presence reaches b");
    assert_eq!(seen, Some(mine));
    // A state that is not a Cursor reads as None, not an error.
    a.set_presence(&list, b"not json".to_vec()).await.unwrap();
    tokio::time::timeout(WAIT, async {
        loop {
            let peers = b.presence_as::<Cursor>(&list).await;
            if peers
                .iter()
                .any(|p| p.replica == a.replica() && p.state.is_none())
            {
                return;
            }
            let _ = events.recv().await;
        }
    })
    .await
    .expect("the new state arrives");
}
