//! # syncline-core
//!
//! The sans-IO heart of Syncline, an offline-first CRDT sync library: the
//! data model (databases of `automerge` documents), the clocks that summarise
//! what a replica holds (dots and version vectors), the per-database entry
//! log with its delta indexes and compaction, the wire protocol, and the two
//! sync state machines ([`sync::Client`], [`sync::Server`]).
//!
//! Nothing here does I/O, spawns tasks or touches a browser API, so the same
//! code runs in the native server, the native client and the WebAssembly
//! package, and tests can simulate whole networks deterministically.
//!
//! ## A two-replica sync loop
//!
//! ```
//! use serde_json::json;
//! use syncline_core::{DbName, DocId, Identity, StoredDatabase, protocol};
//! use syncline_core::sync::{Client, ClientConfig, ClientOutput, OpenAccess, Server, ServerConfig, ServerOutput};
//!
//! let db = DbName::new("org-42")?;
//! let mut server = Server::new(ServerConfig::default(), OpenAccess);
//! server.set_clock(1_700_000_000_000);
//! // Each replica owns a key; its id is derived from the public key.
//! let ids = [Identity::generate(), Identity::generate()];
//! let mut clients = ids
//!     .each_ref()
//!     .map(|id| Client::new(id.replica(), "token", ClientConfig::default()));
//! let mut peers = Vec::new();
//! for (c, id) in clients.iter_mut().zip(&ids) {
//!     c.open(db.clone(), StoredDatabase::default());
//!     peers.push(server.connect_to(Some("sync.example.com")));
//!     // A fresh proof of the replica's key for every connection.
//!     c.connected(id.prove("sync.example.com", 1_700_000_000_000));
//! }
//! clients[0].update(&db, &DocId::new("todo:1")?, &json!({"title": "milk"}))?;
//!
//! // The adapter's job, done by hand: persist, deliver frames, repeat.
//! for _ in 0..10 {
//!     for (i, c) in clients.iter_mut().enumerate() {
//!         for out in c.take_outputs() {
//!             match out {
//!                 ClientOutput::Send(msg) => server.handle_frame(peers[i], &protocol::encode(&msg)),
//!                 ClientOutput::Persist { db, seq, .. } => c.persisted(&db, seq), // "durable"
//!                 ClientOutput::Event(_) => {}
//!             }
//!         }
//!     }
//!     for out in server.take_outputs() {
//!         match out {
//!             ServerOutput::Send { peer, msg } => {
//!                 let i = peers.iter().position(|p| *p == peer).unwrap();
//!                 clients[i].handle_frame(&protocol::encode(&msg))?;
//!             }
//!             ServerOutput::Broadcast { peers: to, frame, .. } => {
//!                 for peer in to {
//!                     let i = peers.iter().position(|p| *p == peer).unwrap();
//!                     clients[i].handle_frame(&frame)?;
//!                 }
//!             }
//!             ServerOutput::Reply { peer, reply } => {
//!                 let i = peers.iter().position(|p| *p == peer).unwrap();
//!                 for frame in reply.frames() {
//!                     clients[i].handle_frame(&frame)?;
//!                 }
//!             }
//!             ServerOutput::Persist { db, seq, .. } => server.persisted(&db, seq),
//!             ServerOutput::Load { db } => server.loaded(db, StoredDatabase::default()),
//!             ServerOutput::ListDatabases { peer, req } => server.databases_listed(peer, req, vec![]),
//!             ServerOutput::Validate { peer, job } => server.validated(peer, job.run()),
//!             ServerOutput::Close { .. } | ServerOutput::SharePresence { .. } => {}
//!         }
//!     }
//! }
//! let copy = clients[1].database(&db).unwrap().get(&DocId::new("todo:1")?);
//! assert_eq!(copy, Some(json!({"title": "milk"})));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! See `ARCHITECTURE.md` at the repository root for the map of the code and
//! its invariants, and `core/PROTOCOL.md` for the wire format.

#![warn(missing_docs, missing_debug_implementations)]

pub mod change_limits;
pub mod chunked;
pub mod clock;
pub mod database;
pub mod doc;
pub mod entry;
pub mod identity;
pub mod ids;
pub mod log;
mod patch;
pub mod protocol;
pub mod record;
pub mod store;
pub mod sync;
pub mod view;

pub use change_limits::{ChangeLimits, ChangeRefused, ChangeSummary};
pub use clock::{Dot, VersionVector};
pub use database::Database;
pub use doc::{DocError, Document, PathSeg, Strings};
pub use entry::{Entry, Snapshot};
pub use identity::{Identity, Proof, ProofError};
pub use ids::{DbName, DocId, IdError, ReplicaId};
pub use log::{Compaction, Log};
pub use store::{
    Batch, CorruptRecord, EncodeRecord, MemoryStore, Store, StoredDatabase, decode_batch,
    encode_batch,
};
pub use view::{BuiltViews, DocView, ViewJob, decode_view, encode_view};
