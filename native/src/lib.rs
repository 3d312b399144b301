//! # syncline
//!
//! The native side of Syncline, an offline-first sync library for JSON
//! documents (`automerge` CRDTs grouped in named databases):
//!
//! * [`client::SyncClient`], the native client, re-exported from the
//!   `syncline-client` crate: depend on that one for a client alone (it
//!   builds without the server's dependencies; its docs have a complete
//!   two-client program).
//! * [`server`], the sync server (WebSocket `/sync`, `/healthz`, Prometheus
//!   `/metrics`), with [`auth`] for its signed access tokens and
//!   [`store::FileStore`], the crash-safe append-only store on disk.
//! * The `syncline` binary: `syncline serve` runs the server; `token`, `get`,
//!   `put`, `delete`, `list`, `dump`, `compact` and `verify` are its tools
//!   (`syncline --help`).
//!
//! The sync logic itself (documents, version vectors, the wire protocol, the
//! client and server state machines) is the sans-IO crate `syncline-core`;
//! this crate and `syncline-client` only do the I/O.
//!
#![warn(missing_docs, missing_debug_implementations)]

pub mod auth;
pub mod cluster;
pub mod server;
pub mod store;
pub mod tls;

pub use syncline_client::client;
pub use syncline_client::{
    ClientBuilder, ClientError, ClientEvent, ClientOptions, DbName, DocId, ErrorCode, PathSeg,
    PresenceView, Status, SyncClient,
};
