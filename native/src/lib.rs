//! # syncline (native)
//!
//! The native side of Syncline: the crash-safe append-only [`store::FileStore`]
//! that implements `syncline_core::Store`, and (being built) the tokio sync
//! server, the native client and the command-line tool. All sync logic lives
//! in `syncline-core`; this crate only does I/O.

#![warn(missing_docs, missing_debug_implementations)]

pub mod auth;
pub mod client;
pub mod server;
pub mod store;
