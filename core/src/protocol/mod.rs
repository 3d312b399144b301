//! The wire protocol: the message set, its error codes and the frame codec.
//!
//! Every WebSocket binary frame is
//! `[version: u8][body length: u32 LE][rkyv archive of Message]`.
//! See `core/PROTOCOL.md` for each message and a byte-level example.

mod codec;
mod error_code;
mod message;

pub use codec::{
    DecodeError, HEADER_LEN, archive, decode, decode_hello, encode, encoded_len, frame,
};
pub use error_code::ErrorCode;
pub use message::{
    Ack, Databases, Delta, ErrorMsg, Hello, Message, PeerPresence, Presence, PresenceUpdate, Push,
    Subscribe, Welcome,
};

/// The protocol version this build speaks; the first byte of every frame.
pub const PROTOCOL_VERSION: u8 = 5;

/// Default largest frame accepted, in bytes (16 MiB).
pub const DEFAULT_MAX_FRAME: usize = 16 << 20;

/// Largest token accepted in `Hello`.
pub const MAX_TOKEN_LEN: usize = 4096;

/// Largest first frame of a connection, which must be an uncompressed
/// `Hello` ([`decode_hello`]): room for a token of [`MAX_TOKEN_LEN`] bytes,
/// the replica id and the archive's overhead. A server reads nothing more
/// from a connection before it has accepted its `Hello`.
pub const MAX_HELLO_FRAME: usize = 8 * 1024;

/// A pruned horizon naming at least this many replicas is named by its
/// digest in `Subscribe::horizon` rather than sent, and announced to
/// subscribers that hold it without naming it (so they can name it next
/// time). Below it a whole vector is small (24 bytes a replica) and a
/// Subscribe sends it as is.
pub const HORIZON_REPLICAS: usize = 256;

/// Largest presence state a peer may publish.
pub const MAX_PRESENCE_LEN: usize = 16 * 1024;

/// Longest error message text kept from a frame.
pub const MAX_ERROR_TEXT: usize = 4096;
