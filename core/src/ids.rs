//! Validated identifiers: replicas, databases and documents.
//!
//! Every identifier that arrives from outside (a frame, a file, a JS call) goes
//! through one of the constructors here, so the rest of the crate can rely on
//! the invariants they document.

use std::fmt;

use rkyv::{Archive, Deserialize, Serialize};

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    /// Database names are `[A-Za-z0-9._-]{1,128}` and not `.` or `..`.
    #[error("invalid database name {0:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not \".\" or \"..\")")]
    DbName(String),
    /// Document ids are 1 to 256 bytes of UTF-8 without control characters.
    #[error("invalid document id {0:?}: use 1 to 256 bytes without control characters")]
    DocId(String),
    /// Replica ids are exactly 16 bytes.
    #[error("invalid replica id: expected 16 bytes, got {0}")]
    ReplicaLength(usize),
}

/// A replica's persistent random id; also the automerge actor id of its changes.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Archive, Serialize, Deserialize,
)]
pub struct ReplicaId(pub [u8; 16]);

impl ReplicaId {
    /// Length in bytes.
    pub const LEN: usize = 16;

    /// A fresh random id (uses automerge's random actor id, so no extra RNG dependency).
    pub fn random() -> Self {
        let actor = automerge::ActorId::random();
        let mut bytes = [0u8; 16];
        // ActorId::random is 16 random bytes.
        let src = actor.to_bytes();
        let n = src.len().min(16);
        bytes[..n].copy_from_slice(&src[..n]);
        ReplicaId(bytes)
    }

    /// Parse from a byte slice of exactly 16 bytes.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, IdError> {
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| IdError::ReplicaLength(bytes.len()))?;
        Ok(ReplicaId(arr))
    }

    /// The automerge actor id with the same bytes.
    pub fn actor(&self) -> automerge::ActorId {
        automerge::ActorId::from(&self.0[..])
    }

    /// Lowercase hex, 32 characters.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Parse 32 hex characters.
    pub fn from_hex(s: &str) -> Result<Self, IdError> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(IdError::ReplicaLength(s.len() / 2));
        }
        let mut out = [0u8; 16];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            let hex = std::str::from_utf8(chunk).map_err(|_| IdError::ReplicaLength(0))?;
            out[i] = u8::from_str_radix(hex, 16).map_err(|_| IdError::ReplicaLength(0))?;
        }
        Ok(ReplicaId(out))
    }
}

impl fmt::Debug for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplicaId({})", &self.to_hex()[..8])
    }
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// A database name: `[A-Za-z0-9._-]{1,128}`, never `.` or `..`, so it is
/// safe to use as a file name.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize)]
pub struct DbName(String);

impl DbName {
    /// Longest allowed name in bytes.
    pub const MAX_LEN: usize = 128;

    /// Validate and wrap a name.
    pub fn new(name: impl Into<String>) -> Result<Self, IdError> {
        let name = name.into();
        if Self::is_valid(&name) {
            Ok(DbName(name))
        } else {
            Err(IdError::DbName(name))
        }
    }

    /// Whether `name` is acceptable.
    pub fn is_valid(name: &str) -> bool {
        !name.is_empty()
            && name.len() <= Self::MAX_LEN
            && name != "."
            && name != ".."
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DbName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for DbName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A document id inside a database: 1 to 256 bytes of UTF-8, no control characters.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Archive, Serialize, Deserialize)]
pub struct DocId(String);

impl DocId {
    /// Longest allowed id in bytes.
    pub const MAX_LEN: usize = 256;

    /// Validate and wrap an id.
    pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
        let id = id.into();
        if Self::is_valid(&id) {
            Ok(DocId(id))
        } else {
            Err(IdError::DocId(id))
        }
    }

    /// Whether `id` is acceptable.
    pub fn is_valid(id: &str) -> bool {
        !id.is_empty() && id.len() <= Self::MAX_LEN && !id.chars().any(char::is_control)
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn db_names() {
        for ok in ["a", "org-42", "A.b_c-9", &"x".repeat(128)] {
            assert!(DbName::new(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a b", "é", &"x".repeat(129), "..\\x"] {
            assert!(DbName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn doc_ids() {
        assert!(DocId::new("todo:1 ü").is_ok());
        assert!(DocId::new("").is_err());
        assert!(DocId::new("a\nb").is_err());
        assert!(DocId::new("x".repeat(257)).is_err());
    }

    #[test]
    fn replica_hex_round_trip() {
        let r = ReplicaId::random();
        assert_eq!(ReplicaId::from_hex(&r.to_hex()).unwrap(), r);
        assert!(ReplicaId::from_hex("zz").is_err());
        assert!(ReplicaId::from_slice(&[1, 2, 3]).is_err());
        assert_ne!(ReplicaId::random(), ReplicaId::random());
    }
}
