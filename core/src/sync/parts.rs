//! A delta cut into frames that stay under the frame limit, one part at a
//! time.

use std::collections::HashMap;
use std::sync::Arc;

use crate::clock::VersionVector;
use crate::entry::Snapshot;
use crate::ids::{DbName, DocId};
use crate::log::Missing;
use crate::protocol::{self, Delta, Message};
use crate::view::DocView;

/// A reply to `Subscribe` (or a live update) not yet encoded. It holds a
/// share of the log ([`Missing`]: reference-counted chunks, no copies), so
/// the server hands it out at the cost of a few reference counts and whoever
/// sends it builds each part when the one before it has been written: a cold
/// sync of a large database neither stalls the server's loop nor holds an
/// encoded copy of the log.
///
/// Snapshots come first so a receiver can install them before the entries
/// built on them; a view travels in the part of its document's first entry,
/// so the receiver knows it before it would apply that entry.
#[derive(Debug, Clone)]
pub struct Reply {
    db: DbName,
    /// The `Subscribe` answered, or 0 for a live update.
    req: u32,
    base: VersionVector,
    vv: VersionVector,
    /// Bytes of snapshots, entries and views per part (a single larger item
    /// travels alone).
    budget: usize,
    missing: Missing,
    views: HashMap<DocId, Arc<DocView>>,
    /// The next part's number, snapshot and entry.
    part: u32,
    snapshot: usize,
    entry: usize,
    done: bool,
    /// Bytes of snapshots, entries and views not yet in a part, once
    /// counted (by whoever sends the reply, not by the server's loop).
    left: Option<usize>,
}

impl Reply {
    pub(crate) fn new(
        db: DbName,
        req: u32,
        vv: VersionVector,
        budget: usize,
        missing: Missing,
        views: HashMap<DocId, Arc<DocView>>,
    ) -> Self {
        Reply {
            db,
            req,
            base: missing.base.clone().unwrap_or_default(),
            vv,
            budget: budget.max(1),
            missing,
            views,
            part: 0,
            snapshot: 0,
            entry: 0,
            done: false,
            left: None,
        }
    }

    /// The database it is for.
    pub fn db(&self) -> &DbName {
        &self.db
    }

    /// Entries and views in the whole reply (for metrics).
    pub fn counts(&self) -> (usize, usize) {
        (self.missing.entry_count(), self.views.len())
    }

    /// Bytes of content not yet cut into parts (an upper bound on what the
    /// rest of the reply will send, before compression). The first call
    /// counts them: O(entries).
    pub fn bytes_left(&mut self) -> usize {
        if let Some(left) = self.left {
            return left;
        }
        let snapshots = self.missing.snapshots[self.snapshot.min(self.missing.snapshots.len())..]
            .iter()
            .map(|s| s.encoded_len());
        let entries = (self.entry..self.missing.entry_count())
            .filter_map(|i| self.missing.entry(i))
            .map(|e| e.encoded_len());
        let views = self.views.values().map(|v| v.encoded_len());
        let left = snapshots.sum::<usize>() + entries.sum::<usize>() + views.sum::<usize>();
        self.left = Some(left);
        left
    }

    /// The next part, or `None` after the last one.
    pub fn next_part(&mut self) -> Option<Delta> {
        if self.done {
            return None;
        }
        // The vectors go in the last part only (see `Delta::vv`).
        let mut part = Delta {
            db: self.db.clone(),
            req: self.req,
            part: self.part,
            last: false,
            base: VersionVector::new(),
            snapshots: Vec::new(),
            entries: Vec::new(),
            views: Vec::new(),
            vv: VersionVector::new(),
        };
        self.part += 1;
        let mut used = 0usize;
        // Whether an item of `len` bytes still goes into this part.
        let fits = |used: usize, len: usize| used == 0 || used + len <= self.budget;
        while let Some(s) = self.missing.snapshots.get(self.snapshot) {
            let len = s.encoded_len();
            if !fits(used, len) {
                return Some(self.cut(part, used));
            }
            used += len;
            part.snapshots.push(Snapshot::clone(s.as_ref()));
            self.snapshot += 1;
        }
        while let Some(e) = self.missing.entry(self.entry) {
            let view = self.views.get(&e.doc);
            let len = e.encoded_len() + view.map_or(0, |v| v.encoded_len());
            if !fits(used, len) {
                return Some(self.cut(part, used));
            }
            used += len;
            if let Some(v) = self.views.remove(&e.doc) {
                part.views.push(Arc::unwrap_or_clone(v));
            }
            part.entries.push(e.clone());
            self.entry += 1;
        }
        self.left = Some(0);
        self.done = true;
        part.last = true;
        part.base = std::mem::take(&mut self.base);
        part.vv = std::mem::take(&mut self.vv);
        Some(part)
    }

    fn cut(&mut self, part: Delta, used: usize) -> Delta {
        self.left = self.left.map(|left| left.saturating_sub(used));
        part
    }

    /// Every part, encoded: for callers that send the whole reply at once
    /// (tests, simulations).
    pub fn frames(mut self) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| self.next_part())
            .map(|part| protocol::encode(&Message::Delta(Box::new(part))))
            .collect()
    }
}
