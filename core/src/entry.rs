//! Entries (one automerge change each) and snapshots (a compacted document).

use rkyv::{Archive, Deserialize, Serialize};

use crate::change_limits::{self, ChangeLimits, ChangeRefused, ChangeSummary};
use crate::clock::{Dot, VersionVector};
use crate::ids::DocId;

/// One local change to one document, named by its dot.
#[derive(Clone, PartialEq, Eq, Debug, Archive, Serialize, Deserialize)]
pub struct Entry {
    /// Who made it and where it sits in their sequence.
    pub dot: Dot,
    /// The document it changes.
    pub doc: DocId,
    /// The automerge change, as `Change::raw_bytes()` (uncompressed) or
    /// `Change::bytes()` (columns deflated) encodes it; both parse.
    pub change: Vec<u8>,
}

/// A document folded from pruned entries: `automerge` save bytes plus the
/// clock of the entries it contains.
#[derive(Clone, PartialEq, Eq, Debug, Archive, Serialize, Deserialize)]
pub struct Snapshot {
    /// The document.
    pub doc: DocId,
    /// Per replica, the highest counter of an entry of this document folded in.
    /// A peer whose version vector dominates it already has everything inside.
    pub clock: VersionVector,
    /// `Automerge::save()` output.
    pub bytes: Vec<u8>,
}

/// Why an entry's change bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidChange {
    /// The bytes are not an automerge change.
    #[error("entry {dot:?}: change bytes do not parse: {reason}")]
    Unparsable {
        /// The entry.
        dot: Dot,
        /// automerge's explanation.
        reason: String,
    },
    /// The change was made by another actor than the dot's replica.
    #[error("entry {dot:?}: change actor is not the entry's replica")]
    WrongActor {
        /// The entry.
        dot: Dot,
    },
    /// Over a [`ChangeLimits`] bound, or not a change chunk at all: found
    /// before automerge was asked to parse it.
    #[error("entry {dot:?}: {reason}")]
    Refused {
        /// The entry.
        dot: Dot,
        /// What the cheap pass found.
        reason: ChangeRefused,
    },
    /// Counter 0 is never used.
    #[error("entry {dot:?}: counters start at 1")]
    ZeroCounter {
        /// The entry.
        dot: Dot,
    },
}

impl Entry {
    /// Parse the change and check it belongs to the dot's replica, within
    /// the default [`ChangeLimits`].
    pub fn parse_change(&self) -> Result<automerge::Change, InvalidChange> {
        self.parse_change_within(&ChangeLimits::default())
    }

    /// The cheap pass of [`crate::change_limits`]: bounds, author and hash,
    /// without automerge.
    pub fn inspect(&self, limits: &ChangeLimits) -> Result<ChangeSummary, InvalidChange> {
        self.inspect_with(limits, change_limits::inspect)
    }

    /// [`Entry::inspect`] without the hash, for an entry automerge parses
    /// next ([`change_limits::inspect_unhashed`]).
    pub fn inspect_unhashed(&self, limits: &ChangeLimits) -> Result<ChangeSummary, InvalidChange> {
        self.inspect_with(limits, change_limits::inspect_unhashed)
    }

    fn inspect_with(
        &self,
        limits: &ChangeLimits,
        pass: fn(&[u8], &ChangeLimits) -> Result<ChangeSummary, change_limits::ChangeRefused>,
    ) -> Result<ChangeSummary, InvalidChange> {
        if self.dot.counter == 0 {
            return Err(InvalidChange::ZeroCounter { dot: self.dot });
        }
        let summary = pass(&self.change, limits).map_err(|reason| InvalidChange::Refused {
            dot: self.dot,
            reason,
        })?;
        if summary.actor != self.dot.replica.0 {
            return Err(InvalidChange::WrongActor { dot: self.dot });
        }
        Ok(summary)
    }

    /// [`Entry::parse_change`] within `limits`: automerge parses only what
    /// the cheap pass let through (and checks the checksum it skipped).
    pub fn parse_change_within(
        &self,
        limits: &ChangeLimits,
    ) -> Result<automerge::Change, InvalidChange> {
        self.inspect_unhashed(limits)?;
        self.parse_inspected()
    }

    /// The automerge half of [`Entry::parse_change_within`], for a caller
    /// that has just run [`Entry::inspect`] or [`Entry::inspect_unhashed`].
    pub(crate) fn parse_inspected(&self) -> Result<automerge::Change, InvalidChange> {
        // automerge's parser unwraps on some input the cheap pass lets
        // through: where unwinding is possible, that is a refusal too.
        let parsed = std::panic::catch_unwind(|| automerge::Change::try_from(&self.change[..]));
        let change = match parsed {
            Ok(parsed) => parsed.map_err(|e| e.to_string()),
            Err(_) => Err("automerge failed parsing it".to_string()),
        }
        .map_err(|reason| InvalidChange::Unparsable {
            dot: self.dot,
            reason,
        })?;
        // automerge computes the hash but does not compare the chunk's
        // checksum (its first four bytes) with it.
        if self.change.get(4..8) != Some(&change.hash().0[..4]) {
            return Err(InvalidChange::Unparsable {
                dot: self.dot,
                reason: "checksum mismatch".into(),
            });
        }
        if change.actor_id().to_bytes() != self.dot.replica.0 {
            return Err(InvalidChange::WrongActor { dot: self.dot });
        }
        Ok(change)
    }

    /// Approximate encoded size, used to cut deltas into frames.
    pub fn encoded_len(&self) -> usize {
        self.change.len() + self.doc.as_str().len() + 40
    }
}

impl Snapshot {
    /// Approximate encoded size, used to cut deltas into frames.
    pub fn encoded_len(&self) -> usize {
        self.bytes.len() + self.doc.as_str().len() + 24 * self.clock.len() + 24
    }
}
