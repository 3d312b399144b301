//! Sans-IO sync state machines: [`Client`] for a replica talking to one
//! server, [`Server`] for the server side of every connection.
//!
//! Neither does I/O. Adapters feed them frames and storage completions and
//! carry out what they output (send, persist, load, close).

mod auth;
mod client;
mod parts;
mod server;

pub use auth::{AuthError, Authenticator, Grant, Grants, OpenAccess, Right, glob_match};
pub use client::{
    CATCH_UP_IDLE_MS, CATCH_UP_STEP, Client, ClientConfig, ClientError, ClientEvent, ClientOutput,
    PeerInfo, PresenceView, Status, VIEW_REFRESH_ENTRIES,
};
pub use parts::Reply;
pub use server::{
    CheckedHello, DatabaseQuota, EMPTY_DATABASE_BYTES, Ingested, PeerId, Server, ServerConfig,
    ServerOutput, ValidateJob, Validated,
};
