//! Typed error codes carried by `Error` messages.

/// Why a request (or a connection) was refused. Numbers are stable on the
/// wire; unknown numbers from newer peers decode as [`ErrorCode::Unknown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorCode {
    /// No valid token, or the token does not verify.
    Unauthorized,
    /// The token does not grant the right needed for this database.
    Forbidden,
    /// The frame does not decode (truncated, corrupt, invalid names).
    BadFrame,
    /// The frame, push or presence state exceeds a limit.
    TooLarge,
    /// The frame's protocol version is not spoken here.
    UnknownVersion,
    /// An entry's change bytes are invalid or not the sender's own.
    InvalidChange,
    /// The server is at capacity or the peer is too slow to keep up.
    Overloaded,
    /// `Push`/`Presence` for a database the peer has not subscribed to.
    NotSubscribed,
    /// A pushed entry skips counters; resubscribe and push from the reply.
    OutOfOrder,
    /// A message arrived out of place (before `Hello`, a second `Hello`, …).
    ProtocolViolation,
    /// The server failed internally (storage error); nothing was acknowledged.
    Internal,
    /// The server is shutting down.
    ShuttingDown,
    /// A pushed change builds on changes of another replica that the server
    /// does not hold yet (another tab's, not yet pushed): nothing of the
    /// push was stored; push it again once the server has them.
    MissingDependency,
    /// A `Subscribe` named a pruned horizon (`Subscribe::horizon`) that is
    /// not the server's (it compacted since, or restarted from other data):
    /// subscribe again with the whole version vector.
    UnknownHorizon,
    /// A code this build does not know.
    Unknown(u16),
}

impl ErrorCode {
    /// Wire number.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 1,
            ErrorCode::Forbidden => 2,
            ErrorCode::BadFrame => 3,
            ErrorCode::TooLarge => 4,
            ErrorCode::UnknownVersion => 5,
            ErrorCode::InvalidChange => 6,
            ErrorCode::Overloaded => 7,
            ErrorCode::NotSubscribed => 8,
            ErrorCode::OutOfOrder => 9,
            ErrorCode::ProtocolViolation => 10,
            ErrorCode::Internal => 11,
            ErrorCode::ShuttingDown => 12,
            ErrorCode::MissingDependency => 13,
            ErrorCode::UnknownHorizon => 14,
            ErrorCode::Unknown(n) => n,
        }
    }

    /// From a wire number.
    pub fn from_u16(n: u16) -> Self {
        match n {
            1 => ErrorCode::Unauthorized,
            2 => ErrorCode::Forbidden,
            3 => ErrorCode::BadFrame,
            4 => ErrorCode::TooLarge,
            5 => ErrorCode::UnknownVersion,
            6 => ErrorCode::InvalidChange,
            7 => ErrorCode::Overloaded,
            8 => ErrorCode::NotSubscribed,
            9 => ErrorCode::OutOfOrder,
            10 => ErrorCode::ProtocolViolation,
            11 => ErrorCode::Internal,
            12 => ErrorCode::ShuttingDown,
            13 => ErrorCode::MissingDependency,
            14 => ErrorCode::UnknownHorizon,
            n => ErrorCode::Unknown(n),
        }
    }

    /// A stable name, e.g. for a JS `error.code` or a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::Forbidden => "Forbidden",
            ErrorCode::BadFrame => "BadFrame",
            ErrorCode::TooLarge => "TooLarge",
            ErrorCode::UnknownVersion => "UnknownVersion",
            ErrorCode::InvalidChange => "InvalidChange",
            ErrorCode::Overloaded => "Overloaded",
            ErrorCode::NotSubscribed => "NotSubscribed",
            ErrorCode::OutOfOrder => "OutOfOrder",
            ErrorCode::ProtocolViolation => "ProtocolViolation",
            ErrorCode::Internal => "Internal",
            ErrorCode::ShuttingDown => "ShuttingDown",
            ErrorCode::MissingDependency => "MissingDependency",
            ErrorCode::UnknownHorizon => "UnknownHorizon",
            ErrorCode::Unknown(_) => "Unknown",
        }
    }

    /// Whether a connection-level error refuses the replica itself (its
    /// token or protocol version): connecting again the same way would be
    /// refused again, so clients stop reconnecting.
    pub fn refuses_identity(self) -> bool {
        matches!(self, ErrorCode::Unauthorized | ErrorCode::UnknownVersion)
    }

    /// Whether an error about one database means it will not sync on this
    /// connection (no right to it, or a change no frame can carry), so
    /// callers waiting for it to sync are told instead of waiting.
    pub fn refuses_database(self) -> bool {
        matches!(
            self,
            ErrorCode::Forbidden | ErrorCode::Unauthorized | ErrorCode::TooLarge
        )
    }

    /// Whether the connection is closed after this error.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            ErrorCode::Unauthorized
                | ErrorCode::BadFrame
                | ErrorCode::UnknownVersion
                | ErrorCode::ProtocolViolation
                | ErrorCode::ShuttingDown
                | ErrorCode::Overloaded
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for n in 0..20u16 {
            assert_eq!(ErrorCode::from_u16(n).to_u16(), n);
        }
    }
}
