//! The message set (DESIGN.md §4).

use rkyv::{Archive, Deserialize, Serialize};

use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::identity::Proof;
use crate::ids::{DbName, ReplicaId};
use crate::view::DocView;

use super::ErrorCode;

/// First message of a connection, client → server.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Hello {
    /// The client's replica id; every entry it pushes must carry it.
    pub replica: ReplicaId,
    /// Credentials (may be empty for anonymous databases).
    pub token: String,
    /// That the client owns `replica` (see `crate::identity`).
    pub proof: Proof,
}

impl Hello {
    /// A `Hello` for `identity`'s replica, proved for `host` at `now_ms`
    /// (Unix milliseconds) with a fresh nonce.
    pub fn signed(
        identity: &crate::identity::Identity,
        token: impl Into<String>,
        host: &str,
        now_ms: u64,
    ) -> Hello {
        Hello {
            replica: identity.replica(),
            token: token.into(),
            proof: identity.prove(host, now_ms),
        }
    }
}

/// The server accepted `Hello`.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Welcome {
    /// The server's replica id.
    pub server: ReplicaId,
    /// This connection's id, as it appears in presence.
    pub peer: u64,
    /// Largest frame the server accepts.
    pub max_frame: u32,
}

/// Start (or restart) syncing a database.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Subscribe {
    /// The database.
    pub db: DbName,
    /// What the client holds; the reply carries what it lacks. With
    /// `horizon`, only the counters above that horizon.
    pub since: VersionVector,
    /// Request number echoed by the reply (non-zero).
    pub req: u32,
    /// The [`VersionVector::digest`] of a pruned horizon the client holds
    /// whole (the server's `base`, as a reply announced it). `since` then
    /// omits every counter at or below it, so a Subscribe costs the
    /// replicas that wrote since the last compaction, not every replica
    /// ever. A server whose horizon is another answers `UnknownHorizon`
    /// and the client asks again with its whole vector.
    pub horizon: Option<[u8; 16]>,
}

/// Entries (and snapshots) a peer lacks: the reply to `Subscribe`, cut into
/// parts, or a live update (`req == 0`).
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Delta {
    /// The database.
    pub db: DbName,
    /// The `Subscribe` this answers, or 0 for live updates.
    pub req: u32,
    /// Part number within the reply, from 0.
    pub part: u32,
    /// Whether this is the reply's final part.
    pub last: bool,
    /// When non-empty, the sender's pruned horizon: once every part has
    /// arrived, the receiver holds everything at or below it.
    pub base: VersionVector,
    /// Snapshots of documents the receiver lacks below `base`.
    pub snapshots: Vec<Snapshot>,
    /// Entries in causal order.
    pub entries: Vec<Entry>,
    /// JSON views of documents whose whole history is among this reply's
    /// entries, at the clock those entries give them, each in the part of
    /// its document's first entry. A receiver holding nothing of such a
    /// document may show the view instead of applying its entries (it still
    /// stores them). Only in replies to `Subscribe`; may be empty.
    pub views: Vec<DocView>,
    /// The sender's durable version vector (for the client: also an ack).
    /// A reply sends it (and `base`) in its last part only, the parts
    /// before carry empty vectors; a live update carries only the replicas
    /// whose entries it holds. Frames then stay small however many
    /// replicas a database has seen.
    pub vv: VersionVector,
}

/// Client → server: the client's own new entries.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Push {
    /// The database.
    pub db: DbName,
    /// Consecutive entries of the client's replica.
    pub entries: Vec<Entry>,
}

/// Server → client: everything up to `vv` is durable on the server.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Ack {
    /// The database.
    pub db: DbName,
    /// What is durable on the server: the pusher's own replica's counter
    /// (a server may send more of its vector; it need not).
    pub vv: VersionVector,
}

/// Client → server: publish this connection's ephemeral state (empty clears it).
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Presence {
    /// The database.
    pub db: DbName,
    /// Opaque bytes (the JS package sends JSON).
    pub state: Vec<u8>,
}

/// One peer's presence.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct PeerPresence {
    /// The peer's connection id.
    pub peer: u64,
    /// The peer's replica.
    pub replica: ReplicaId,
    /// Whether the peer left (unsubscribed or disconnected).
    pub left: bool,
    /// Its published state, if any.
    pub state: Option<Vec<u8>>,
}

/// Server → subscribers: who is here.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct PresenceUpdate {
    /// The database.
    pub db: DbName,
    /// Whether `peers` is the whole set (sent on subscribe) or changes only.
    pub full: bool,
    /// Connections subscribed to the database right now.
    pub online: u32,
    /// Peers that joined, changed or left.
    pub peers: Vec<PeerPresence>,
}

/// A typed refusal.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// [`ErrorCode`] number.
    pub code: u16,
    /// Readable explanation.
    pub message: String,
    /// The database concerned, if any.
    pub db: Option<DbName>,
}

impl ErrorMsg {
    /// Build from a code.
    pub fn new(code: ErrorCode, message: impl Into<String>, db: Option<DbName>) -> Self {
        ErrorMsg {
            code: code.to_u16(),
            message: message.into(),
            db,
        }
    }

    /// The typed code.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::from_u16(self.code)
    }
}

/// Server → admin client: the databases it may administer.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Databases {
    /// The `ListDatabases` this answers.
    pub req: u32,
    /// Database names, sorted.
    pub names: Vec<DbName>,
}

/// Every message of the protocol. Struct payloads are boxed so the archived
/// enum stays small (16 bytes) and each message costs only its own fields.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub enum Message {
    /// Client → server, first.
    Hello(Box<Hello>),
    /// Server → client, answer to `Hello`.
    Welcome(Box<Welcome>),
    /// Client → server.
    Subscribe(Box<Subscribe>),
    /// Client → server: stop receiving a database.
    Unsubscribe {
        /// The database.
        db: DbName,
    },
    /// Server → client.
    Delta(Box<Delta>),
    /// Client → server.
    Push(Box<Push>),
    /// Server → client.
    Ack(Box<Ack>),
    /// Client → server.
    Presence(Box<Presence>),
    /// Server → client.
    PresenceUpdate(Box<PresenceUpdate>),
    /// Either way.
    Error(Box<ErrorMsg>),
    /// Either way: are you there?
    Ping {
        /// Echoed by `Pong`.
        nonce: u64,
    },
    /// Answer to `Ping`.
    Pong {
        /// From the `Ping`.
        nonce: u64,
    },
    /// Client → server (admin): which databases exist?
    ListDatabases {
        /// Echoed by `Databases`.
        req: u32,
    },
    /// Server → client: answer to `ListDatabases`.
    Databases(Box<Databases>),
}

impl Message {
    /// Roughly what a peer's message costs to hold: its variable parts
    /// plus a fixed overhead (used to bound queues by bytes).
    pub fn held_bytes(&self) -> usize {
        64 + match self {
            Message::Push(p) => p.entries.iter().map(crate::Entry::encoded_len).sum(),
            Message::Presence(p) => p.state.len(),
            Message::Subscribe(s) => 24 * s.since.len(),
            _ => 0,
        }
    }

    /// Short name for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Welcome(_) => "welcome",
            Message::Subscribe(_) => "subscribe",
            Message::Unsubscribe { .. } => "unsubscribe",
            Message::Delta(_) => "delta",
            Message::Push(_) => "push",
            Message::Ack(_) => "ack",
            Message::Presence(_) => "presence",
            Message::PresenceUpdate(_) => "presence_update",
            Message::Error(_) => "error",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::ListDatabases { .. } => "list_databases",
            Message::Databases(_) => "databases",
        }
    }

    /// An error message.
    pub fn error(code: ErrorCode, message: impl Into<String>, db: Option<DbName>) -> Self {
        Message::Error(Box::new(ErrorMsg::new(code, message, db)))
    }
}
