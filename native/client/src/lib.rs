//! # syncline-client
//!
//! The native client of Syncline, an offline-first sync library for JSON
//! documents (`automerge` CRDTs grouped in named databases), without the
//! server: [`SyncClient`] keeps its replica in a local data directory (or
//! in memory); reads and writes work offline and are durable locally when
//! they return, and it syncs with a Syncline server whenever it can reach
//! one, reconnecting on its own. The server, its CLI and its tools are the
//! `syncline` crate, which depends on this one.
//!
//! What a client's user needs of the sans-IO `syncline-core` is
//! re-exported here ([`DbName`], [`DocId`], [`ClientEvent`], [`Status`],
//! [`ErrorCode`], [`PathSeg`]), so this one dependency is enough.
//!
//! ## Two clients, one document
//!
//! Syncline is not on crates.io yet: depend on a checkout by path.
//!
//! ```toml
//! [dependencies]
//! syncline-client = { path = "/path/to/syncline/native/client" }
//! serde_json = "1"
//! tokio = { version = "1.54", features = ["macros", "rt-multi-thread", "time"] }
//! ```
//!
//! Start a server that lets anyone into the `todo-*` databases, e.g. from a
//! checkout `cargo run --release -p syncline -- serve --anonymous 'todo-*'`
//! (or `./scripts/demo`), and run this as `src/main.rs`. Set `SYNCLINE_URL`
//! for another server and `SYNCLINE_TOKEN` for a token
//! (`syncline token --db 'todo-*' --rights write`).
//!
//! ```no_run
//! use std::error::Error;
//! use std::time::Duration;
//!
//! use serde_json::json;
//! use syncline_client::{DbName, DocId, SyncClient};
//! use tokio::sync::broadcast::error::RecvError;
//! use tokio::time::timeout;
//!
//! /// How long to wait for the server before giving up.
//! const WAIT: Duration = Duration::from_secs(10);
//!
//! #[tokio::main]
//! async fn main() {
//!     if let Err(e) = run().await {
//!         eprintln!("error: {e}");
//!         std::process::exit(1);
//!     }
//! }
//!
//! async fn run() -> Result<(), Box<dyn Error>> {
//!     let url = std::env::var("SYNCLINE_URL").unwrap_or("ws://127.0.0.1:7070/sync".into());
//!     let token = std::env::var("SYNCLINE_TOKEN").unwrap_or_default();
//!
//!     // Two clients, each with its own replica in a directory of its own.
//!     // Connecting happens in the background: both work offline meanwhile.
//!     let dir = std::env::temp_dir().join(format!("syncline-example-{}", std::process::id()));
//!     let alice = SyncClient::connect(Some(&url), &token, dir.join("alice")).await?;
//!     let bob = SyncClient::connect(Some(&url), &token, dir.join("bob")).await?;
//!     let result = alice_writes_bob_reads(&alice, &bob, &url).await;
//!     alice.close().await;
//!     bob.close().await;
//!     std::fs::remove_dir_all(&dir)?;
//!     result
//! }
//!
//! async fn alice_writes_bob_reads(
//!     alice: &SyncClient,
//!     bob: &SyncClient,
//!     url: &str,
//! ) -> Result<(), Box<dyn Error>> {
//!     let db = DbName::new("todo-rust-example")?;
//!     // A new document each run.
//!     let doc = DocId::new(format!("todo-{}", &alice.replica().to_hex()[..8]))?;
//!     alice.open(&db).await?;
//!     bob.open(&db).await?;
//!
//!     // Alice's write is durable in her replica when `put` returns, online
//!     // or not; `wait_synced_for` returns once the server has it too (or
//!     // fails if the server refuses, e.g. a database the token does not
//!     // cover, or if it does not answer in time).
//!     let todo = json!({ "title": "buy milk", "done": false });
//!     alice.put(&db, &doc, todo.clone()).await?;
//!     alice
//!         .wait_synced_for(&db, WAIT)
//!         .await
//!         .map_err(|e| format!("{url}: {e}: is the server running?"))?;
//!     println!("alice wrote {db}/{doc}: {todo}");
//!
//!     // Bob's client announces every change it receives as an event: look,
//!     // and if the document is not there yet, wait for the next event.
//!     let mut events = bob.events();
//!     let seen = timeout(WAIT, async {
//!         loop {
//!             if let Some(value) = bob.get(&db, &doc)? {
//!                 return Ok::<_, Box<dyn Error>>(value);
//!             }
//!             if let Err(RecvError::Closed) = events.recv().await {
//!                 return Err("bob's client stopped".into());
//!             }
//!         }
//!     })
//!     .await
//!     .map_err(|_| format!("bob did not receive {doc} within {WAIT:?}"))??;
//!     println!("bob read {db}/{doc}: {seen}");
//!     if seen != todo {
//!         return Err(format!("bob read {seen}, expected {todo}").into());
//!     }
//!     Ok(())
//! }
//! ```
//!
//! It prints (the document id differs each run):
//!
//! ```text
//! alice wrote todo-rust-example/todo-3f2a9c1e: {"done":false,"title":"buy milk"}
//! bob read todo-rust-example/todo-3f2a9c1e: {"done":false,"title":"buy milk"}
//! ```
//!
//! [`SyncClient::in_memory`] is the same client with nothing kept
//! locally (tests, tools, load generators).

#![warn(missing_docs, missing_debug_implementations)]

mod builder;
pub mod client;
pub mod store;
pub mod tls;
mod typed;

pub use builder::ClientBuilder;
pub use client::{ClientError, ClientOptions, SyncClient};
pub use syncline_core::protocol::ErrorCode;
pub use syncline_core::sync::{ClientEvent, PresenceView, Status};
pub use syncline_core::{DbName, DocId, PathSeg};
pub use typed::Peer;

/// The repository README's Rust program, compiled as a doc test (never
/// part of the crate).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct RootReadme;
