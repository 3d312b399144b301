//! The per-database entry log: snapshots below a pruned horizon, entries above
//! it, and the indexes that make a delta cost O(replicas + missing entries).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

use automerge::{ReadDoc, TextEncoding};

use crate::chunked::Chunked;
use crate::clock::{Dot, VersionVector};
use crate::doc::Document;
use crate::entry::{Entry, Snapshot};
use crate::ids::{DocId, ReplicaId};
use crate::store::StoredDatabase;
use crate::view::{ViewJob, ViewSource};

/// Why an entry could not join the log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LogError {
    /// The entry skips counters: `expected` must come first.
    #[error("entry {got:?} arrived before counter {expected} of that replica")]
    Gap {
        /// The counter that must come next.
        expected: u64,
        /// What arrived.
        got: Dot,
    },
}

/// What appending did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// The entry is new and now in the log.
    Added,
    /// The log already covers this dot; nothing changed.
    Duplicate,
}

/// What a peer holding some version vector lacks.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Delta<'a> {
    /// Set when the peer is behind the pruned horizon: after merging
    /// `snapshots` it may raise its vector to `base`.
    pub base: Option<VersionVector>,
    /// Snapshots of documents changed beyond what the peer holds, below `base`.
    pub snapshots: Vec<&'a Snapshot>,
    /// Entries the peer lacks, in log (causal) order.
    pub entries: Vec<&'a Entry>,
}

/// What a peer lacks, holding its own share of the log: see
/// [`Log::missing_since`].
#[derive(Debug, Clone, Default)]
pub struct Missing {
    /// As [`Delta::base`].
    pub base: Option<VersionVector>,
    /// As [`Delta::snapshots`].
    pub snapshots: Vec<Arc<Snapshot>>,
    /// The log's entries when this was taken (shared chunks).
    entries: Chunked<Arc<Entry>>,
    /// Which of them the peer lacks, in log order.
    positions: Vec<u32>,
}

impl Missing {
    /// Entries alone (a live update): all of them, in order.
    pub fn from_entries(entries: Vec<Entry>) -> Self {
        let positions = (0..u32::try_from(entries.len()).unwrap_or(u32::MAX)).collect();
        Missing {
            base: None,
            snapshots: Vec::new(),
            entries: entries.into_iter().map(Arc::new).collect(),
            positions,
        }
    }

    /// How many entries the peer lacks.
    pub fn entry_count(&self) -> usize {
        self.positions.len()
    }

    /// Whether the peer lacks every entry the log held.
    pub fn lacks_all_entries(&self) -> bool {
        self.positions.len() == self.entries.len()
    }

    /// The `i`th entry the peer lacks.
    pub fn entry(&self, i: usize) -> Option<&Entry> {
        let p = *self.positions.get(i)?;
        self.entries.get(p as usize).map(Arc::as_ref)
    }

    /// The entries the peer lacks, in log order.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.positions
            .iter()
            .filter_map(|&p| self.entries.get(p as usize).map(Arc::as_ref))
    }
}

/// A compaction, planned by [`Log::plan_compaction`] and applied by
/// [`Log::apply_compaction`] (and by stores, which prune what it covers).
#[derive(Debug, Clone, PartialEq)]
pub struct Compaction {
    /// The new pruned horizon: every entry at or below it is in a snapshot.
    pub base: VersionVector,
    /// New or replaced snapshots.
    pub snapshots: Vec<Snapshot>,
    /// Documents that could not be folded (automerge refused one of their
    /// changes, or their snapshot did not load), with why. Their entries stay
    /// above the horizon, which is lowered to keep them.
    pub skipped: BTreeMap<DocId, String>,
}

/// What folding one document's entries gave.
enum Folded {
    Done(Snapshot),
    /// Entries whose changes automerge held back for a missing dependency.
    Held(Vec<Dot>),
}

/// [`VersionVector::digest`] of a pruned horizon.
pub type HorizonDigest = [u8; 16];

/// Horizons a log remembers besides its current one ([`Log::horizon`]).
pub const EARLIER_HORIZONS: usize = 4;

/// Snapshots + entries of one database, with delta indexes.
///
/// Invariants: for every replica `r`, the log holds exactly the counters
/// `base[r]+1 ..= vv[r]` of `r`, in the order they were appended; every entry
/// at or below `base` is folded into `snapshots`.
#[derive(Debug, Clone, Default)]
pub struct Log {
    base: VersionVector,
    /// `base.digest()`, kept with it (a Subscribe that names the horizon
    /// is compared with it; hashing 100,000 replicas takes milliseconds).
    base_digest: [u8; 16],
    /// The horizons before `base`, newest first (at most
    /// [`EARLIER_HORIZONS`]): each one's digest and the counters it held
    /// where the next differs, so a client naming a horizon this log has
    /// since moved past still resumes in one round trip
    /// ([`Log::horizon`]). Not stored: after a restart only `base` is known.
    earlier: VecDeque<(HorizonDigest, Vec<(ReplicaId, u64)>)>,
    vv: VersionVector,
    snapshots: BTreeMap<DocId, Arc<Snapshot>>,
    /// Each entry in its own `Arc`, so a chunk a reply still shares is
    /// copied on append at the cost of 64 reference counts, not 64 changes.
    entries: Chunked<Arc<Entry>>,
    /// Positions in `entries` of each replica's entries, in counter order.
    by_replica: HashMap<ReplicaId, Vec<u32>>,
    /// Per document, the highest counter per replica of any change to it.
    doc_clocks: HashMap<DocId, VersionVector>,
    /// Per document, how many of its entries are above the horizon.
    doc_entries: HashMap<DocId, u32>,
    /// Entries ever appended to this log (a logical clock), and per
    /// document its value after the document's latest entry: which
    /// documents changed since some moment ([`Log::doc_appended`]).
    appended: u64,
    doc_appended: HashMap<DocId, u64>,
    entry_bytes: usize,
    /// Bytes of snapshot data.
    snapshot_bytes: usize,
}

impl Log {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Rebuild from stored content. Entries already covered (at or below the
    /// base, or repeated) are skipped; the first gap of a replica ends that
    /// replica's entries (they are reported back so the caller can log them).
    pub fn from_stored(stored: StoredDatabase) -> (Self, Vec<LogError>) {
        let mut log = Log::new();
        log.base_digest = stored.base.digest();
        log.base = stored.base.clone();
        log.vv = stored.base;
        for s in stored.snapshots {
            log.doc_clocks
                .entry(s.doc.clone())
                .or_default()
                .merge(&s.clock);
            log.snapshot_bytes += s.bytes.len();
            if let Some(old) = log.snapshots.insert(s.doc.clone(), Arc::new(s)) {
                log.snapshot_bytes -= old.bytes.len();
            }
        }
        let mut problems = Vec::new();
        for e in stored.entries {
            if let Err(err) = log.append(e) {
                problems.push(err);
            }
        }
        (log, problems)
    }

    /// The version vector: everything held, snapshots included.
    pub fn vv(&self) -> &VersionVector {
        &self.vv
    }

    /// The pruned horizon.
    pub fn base(&self) -> &VersionVector {
        &self.base
    }

    /// Entries appended to this log so far (since it was built; a logical
    /// clock, not a count of what it holds).
    pub fn appended(&self) -> u64 {
        self.appended
    }

    /// [`Log::appended`] as of `doc`'s latest entry (0 when it got none
    /// since the log was built): the document changed after a moment `m`
    /// exactly when this is above `appended()` read at `m`.
    pub fn doc_appended(&self, doc: &DocId) -> u64 {
        self.doc_appended.get(doc).copied().unwrap_or(0)
    }

    /// [`VersionVector::digest`] of the pruned horizon.
    pub fn base_digest(&self) -> HorizonDigest {
        self.base_digest
    }

    /// The horizon whose digest is `digest`: the current one or one of the
    /// last [`EARLIER_HORIZONS`] it replaced (rebuilt from the current one
    /// and what changed since; horizons only rise). `None` for an unknown
    /// digest, or the empty horizon (no client holds it "whole").
    pub fn horizon(&self, digest: &HorizonDigest) -> Option<VersionVector> {
        if self.base.is_empty() {
            return None;
        }
        if *digest == self.base_digest {
            return Some(self.base.clone());
        }
        let at = self.earlier.iter().position(|(d, _)| d == digest)?;
        let mut vv = self.base.clone();
        for (_, held) in self.earlier.iter().take(at + 1) {
            for (r, c) in held {
                vv.set(*r, *c);
            }
        }
        Some(vv)
    }

    /// Entries above the horizon, in log order.
    pub fn entries(&self) -> impl DoubleEndedIterator<Item = &Entry> + ExactSizeIterator {
        self.entries.iter().map(Arc::as_ref)
    }

    /// Snapshots below the horizon.
    pub fn snapshots(&self) -> impl Iterator<Item = &Snapshot> {
        self.snapshots.values().map(Arc::as_ref)
    }

    /// The snapshot of one document, if it has one below the horizon.
    pub fn snapshot(&self, doc: &DocId) -> Option<&Snapshot> {
        self.snapshots.get(doc).map(Arc::as_ref)
    }

    /// Bytes of change data held in entries (a compaction trigger).
    pub fn entry_bytes(&self) -> usize {
        self.entry_bytes
    }

    /// Bytes of snapshot data held below the horizon.
    pub fn snapshot_bytes(&self) -> usize {
        self.snapshot_bytes
    }

    /// Documents ever changed, with their last-change clock.
    pub fn doc_clocks(&self) -> &HashMap<DocId, VersionVector> {
        &self.doc_clocks
    }

    /// The clock of a document's last changes.
    pub fn doc_clock(&self, doc: &DocId) -> Option<&VersionVector> {
        self.doc_clocks.get(doc)
    }

    /// How many of a document's entries are above the horizon.
    pub fn doc_entry_count(&self, doc: &DocId) -> u32 {
        self.doc_entries.get(doc).copied().unwrap_or(0)
    }

    /// Whether a peer holding nothing of `doc` would get all of it from
    /// entries: the document has no snapshot and `in_delta` is the number of
    /// its entries the peer is about to receive.
    pub fn is_whole_history(&self, doc: &DocId, in_delta: u32) -> bool {
        !self.snapshots.contains_key(doc) && in_delta > 0 && in_delta == self.doc_entry_count(doc)
    }

    /// What building the views of `docs` needs, copied out of the log so the
    /// build can run elsewhere ([`ViewJob::build`]). Documents with a
    /// snapshot are left out: views are served only for documents whose
    /// whole history is in entries. One pass over the entries.
    pub fn view_job(&self, docs: impl IntoIterator<Item = DocId>) -> ViewJob {
        let mut wanted: HashMap<DocId, ViewSource> = docs
            .into_iter()
            .filter(|d| !self.snapshots.contains_key(d))
            .filter_map(|d| {
                let clock = self.doc_clocks.get(&d)?.clone();
                Some((
                    d.clone(),
                    ViewSource {
                        doc: d,
                        clock,
                        changes: Vec::new(),
                    },
                ))
            })
            .collect();
        for e in &self.entries {
            if let Some(src) = wanted.get_mut(&e.doc) {
                src.changes.push(e.change.clone());
            }
        }
        ViewJob {
            docs: wanted.into_values().collect(),
        }
    }

    /// Append the next entry of its replica.
    pub fn append(&mut self, entry: Entry) -> Result<Appended, LogError> {
        let r = entry.dot.replica;
        let have = self.vv.get(&r);
        if entry.dot.counter <= have {
            return Ok(Appended::Duplicate);
        }
        if entry.dot.counter != have + 1 {
            return Err(LogError::Gap {
                expected: have + 1,
                got: entry.dot,
            });
        }
        let pos = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
        self.by_replica.entry(r).or_default().push(pos);
        self.vv.set(r, entry.dot.counter);
        // Looked up before inserting: the id is cloned (allocated) only for a
        // document's first entry, not on every append of a live stream.
        match self.doc_clocks.get_mut(&entry.doc) {
            Some(clock) => clock.set(r, entry.dot.counter),
            None => {
                let mut clock = VersionVector::new();
                clock.set(r, entry.dot.counter);
                self.doc_clocks.insert(entry.doc.clone(), clock);
            }
        }
        match self.doc_entries.get_mut(&entry.doc) {
            Some(n) => *n += 1,
            None => {
                self.doc_entries.insert(entry.doc.clone(), 1);
            }
        }
        self.appended += 1;
        match self.doc_appended.get_mut(&entry.doc) {
            Some(n) => *n = self.appended,
            None => {
                self.doc_appended.insert(entry.doc.clone(), self.appended);
            }
        }
        self.entry_bytes += entry.change.len();
        self.entries.push(Arc::new(entry));
        Ok(Appended::Added)
    }

    /// The entry with this dot, if it is above the horizon.
    pub fn get(&self, dot: &Dot) -> Option<&Entry> {
        self.entries.get(self.position(dot)?).map(Arc::as_ref)
    }

    /// [`Log::get`], sharing the entry.
    pub fn get_shared(&self, dot: &Dot) -> Option<Arc<Entry>> {
        self.entries.get(self.position(dot)?).cloned()
    }

    fn position(&self, dot: &Dot) -> Option<usize> {
        let base = self.base.get(&dot.replica);
        let idx = dot.counter.checked_sub(base + 1)?;
        let positions = self.by_replica.get(&dot.replica)?;
        Some(*positions.get(usize::try_from(idx).ok()?)? as usize)
    }

    /// `replica`'s entries with counters in `from..=to` (those above the horizon).
    pub fn entries_of(&self, replica: &ReplicaId, from: u64, to: u64) -> Vec<&Entry> {
        let Some(positions) = self.by_replica.get(replica) else {
            return Vec::new();
        };
        let base = self.base.get(replica);
        let start = from.max(base + 1) - (base + 1);
        let end = to.saturating_sub(base).min(positions.len() as u64);
        (start..end)
            .filter_map(|i| positions.get(i as usize))
            .filter_map(|&p| self.entries.get(p as usize).map(Arc::as_ref))
            .collect()
    }

    /// What a peer holding `since` lacks: snapshots when it is behind the
    /// horizon, then the missing entries in log order. Costs
    /// O(replicas + missing · log missing), plus a scan of the snapshots only
    /// when the peer is behind the horizon.
    pub fn changes_since(&self, since: &VersionVector) -> Delta<'_> {
        let (base, snapshots) = self.snapshots_since(since, false);
        Delta {
            base,
            snapshots: snapshots.into_iter().map(|s| s.as_ref()).collect(),
            entries: self
                .positions_since(since)
                .into_iter()
                .filter_map(|p| self.entries.get(p as usize).map(Arc::as_ref))
                .collect(),
        }
    }

    /// [`Log::changes_since`] as a value that owns a snapshot of the log
    /// (shared chunks and snapshots: reference counts, no copies), so the
    /// entries can be read and encoded later, elsewhere, while the log moves
    /// on. With `announce`, a peer holding the whole horizon is told it
    /// too (`base` without snapshots), so it can name it next time
    /// (`Subscribe::horizon`).
    pub fn missing_since(&self, since: &VersionVector, announce: bool) -> Missing {
        let (base, snapshots) = self.snapshots_since(since, announce);
        Missing {
            base,
            snapshots: snapshots.into_iter().cloned().collect(),
            positions: self.positions_since(since),
            entries: self.entries.clone(),
        }
    }

    fn snapshots_since(
        &self,
        since: &VersionVector,
        announce: bool,
    ) -> (Option<VersionVector>, Vec<&Arc<Snapshot>>) {
        if since.dominates(&self.base) {
            let base = (announce && !self.base.is_empty()).then(|| self.base.clone());
            return (base, Vec::new());
        }
        let snapshots = self
            .snapshots
            .values()
            .filter(|s| !since.dominates(&s.clock))
            .collect();
        (Some(self.base.clone()), snapshots)
    }

    /// Positions in `entries` of those `since` lacks, in log order.
    fn positions_since(&self, since: &VersionVector) -> Vec<u32> {
        // A cold sync (or any peer with nothing above the horizon) lacks
        // every entry: all positions, already in order.
        let lacks_all = self
            .by_replica
            .keys()
            .all(|r| since.get(r) <= self.base.get(r));
        if lacks_all {
            return (0..u32::try_from(self.entries.len()).unwrap_or(u32::MAX)).collect();
        }
        let mut positions = Vec::new();
        for (r, idxs) in &self.by_replica {
            let base = self.base.get(r);
            let have = since.get(r).max(base);
            let skip = usize::try_from(have - base).unwrap_or(usize::MAX);
            if skip < idxs.len() {
                positions.extend_from_slice(&idxs[skip..]);
            }
        }
        positions.sort_unstable();
        positions
    }

    /// Fold every entry at or below `up_to` (clamped to what the log holds)
    /// into per-document snapshots. Pure: the log is unchanged until
    /// [`Log::apply_compaction`], so this can run on a copy in the background.
    ///
    /// A document that cannot be folded (one crafted change automerge
    /// refuses) does not stop the rest: it is listed in
    /// [`Compaction::skipped`] and the horizon is lowered below each of its
    /// entries, so they stay in the log, with whatever follows them from the
    /// same replicas; a change automerge holds back for a dependency left
    /// above the horizon is kept above it too.
    pub fn plan_compaction(&self, up_to: &VersionVector) -> Compaction {
        let mut base = up_to.meet(&self.vv);
        base.merge(&self.base);
        let mut skipped = BTreeMap::new();
        // Each folded document, with how many entries went into it.
        let mut done: BTreeMap<DocId, (usize, Snapshot)> = BTreeMap::new();
        // Lowering the horizon shrinks what other documents fold, so fold
        // again those that changed; every round skips one more document.
        loop {
            let mut folded: BTreeMap<&DocId, Vec<&Entry>> = BTreeMap::new();
            for e in &self.entries {
                if base.contains(&e.dot) && !skipped.contains_key(&e.doc) {
                    folded.entry(&e.doc).or_default().push(e);
                }
            }
            done.retain(|doc, (n, _)| folded.get(doc).is_some_and(|f| f.len() == *n));
            let mut lowered = false;
            for (doc, entries) in folded {
                if done.contains_key(doc) {
                    continue;
                }
                match self.fold(doc, &entries) {
                    Ok(Folded::Done(snapshot)) => {
                        done.insert(doc.clone(), (entries.len(), snapshot));
                    }
                    // Changes that depend on one left out (above the lowered
                    // horizon) must stay out too, or the snapshot (automerge
                    // saves only what it applied) would drop them.
                    Ok(Folded::Held(dots)) => {
                        for dot in dots {
                            if dot.counter - 1 < base.get(&dot.replica) {
                                base.set(dot.replica, dot.counter - 1);
                            }
                        }
                        lowered = true;
                    }
                    Err(reason) => {
                        // Entries come in counter order per replica: the
                        // first one of each replica sets the new horizon.
                        for e in &self.entries {
                            if e.doc == *doc && base.contains(&e.dot) {
                                base.set(e.dot.replica, e.dot.counter - 1);
                            }
                        }
                        skipped.insert(doc.clone(), reason);
                        lowered = true;
                    }
                }
            }
            if !lowered {
                break;
            }
        }
        Compaction {
            base,
            snapshots: done.into_values().map(|(_, s)| s).collect(),
            skipped,
        }
    }

    /// `doc`'s snapshot (if any) with `entries` applied, or the entries
    /// automerge held back for a missing dependency.
    fn fold(&self, doc: &DocId, entries: &[&Entry]) -> Result<Folded, String> {
        let actor = ReplicaId::default();
        let (mut document, mut clock) = match self.snapshots.get(doc) {
            Some(s) => (
                Document::load(&s.bytes, actor, TextEncoding::UnicodeCodePoint)
                    .map_err(|e| e.to_string())?,
                s.clock.clone(),
            ),
            None => (
                Document::new(actor, TextEncoding::UnicodeCodePoint),
                VersionVector::new(),
            ),
        };
        let mut hashes = Vec::with_capacity(entries.len());
        for e in entries {
            let change = e.parse_change().map_err(|e| e.to_string())?;
            hashes.push((e.dot, change.hash()));
            document.apply(change).map_err(|e| e.to_string())?;
            if e.dot.counter > clock.get(&e.dot.replica) {
                clock.set(e.dot.replica, e.dot.counter);
            }
        }
        if document.has_queued() {
            let am = document.automerge();
            return Ok(Folded::Held(
                hashes
                    .into_iter()
                    .filter(|(_, h)| am.get_change_by_hash(h).is_none())
                    .map(|(dot, _)| dot)
                    .collect(),
            ));
        }
        Ok(Folded::Done(Snapshot {
            doc: doc.clone(),
            clock,
            bytes: document.save(),
        }))
    }

    /// Install a compaction: replace snapshots, raise the horizon, prune the
    /// entries it covers and rebuild the indexes.
    pub fn apply_compaction(&mut self, compaction: Compaction) {
        let mut base = compaction.base.meet(&self.vv);
        base.merge(&self.base);
        for s in compaction.snapshots {
            self.doc_clocks
                .entry(s.doc.clone())
                .or_default()
                .merge(&s.clock);
            self.snapshot_bytes += s.bytes.len();
            if let Some(old) = self.snapshots.insert(s.doc.clone(), Arc::new(s)) {
                self.snapshot_bytes -= old.bytes.len();
            }
        }
        let entries = std::mem::take(&mut self.entries);
        self.by_replica.clear();
        self.doc_entries.clear();
        self.entry_bytes = 0;
        for e in entries {
            if base.contains(&e.dot) {
                continue;
            }
            let pos = u32::try_from(self.entries.len()).unwrap_or(u32::MAX);
            self.by_replica.entry(e.dot.replica).or_default().push(pos);
            *self.doc_entries.entry(e.doc.clone()).or_default() += 1;
            self.entry_bytes += e.change.len();
            self.entries.push(e);
        }
        if base != self.base {
            let held: Vec<(ReplicaId, u64)> = base
                .iter()
                .filter(|&(r, &c)| self.base.get(r) != c)
                .map(|(r, _)| (*r, self.base.get(r)))
                .collect();
            if !self.base.is_empty() {
                self.earlier.push_front((self.base_digest, held));
                self.earlier.truncate(EARLIER_HORIZONS);
            }
            self.base_digest = base.digest();
            self.base = base;
        }
    }

    /// Install a compaction whose horizon may be ahead of this log: the
    /// caller obtained the missing content from a peer's snapshots, so the
    /// vector rises to the horizon too.
    pub fn absorb(&mut self, compaction: Compaction) {
        self.vv.merge(&compaction.base);
        self.apply_compaction(compaction);
    }

    /// Everything, as a store would hold it.
    pub fn to_stored(&self) -> StoredDatabase {
        StoredDatabase {
            base: self.base.clone(),
            snapshots: self.snapshots().cloned().collect(),
            entries: self.entries().cloned().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use automerge::transaction::Transactable;
    use automerge::{AutoCommit, ROOT};

    use super::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    #[test]
    fn a_log_names_its_current_and_its_last_earlier_horizons() {
        let mut log = Log::new();
        assert_eq!(log.horizon(&log.base_digest()), None, "no horizon yet");
        let mut bases = Vec::new();
        for k in 1..=7u64 {
            // Each compaction raises some replicas and adds one.
            let base: VersionVector = (0..=k as u8)
                .map(|r| (ReplicaId([r; 16]), if r % 2 == 0 { k } else { 1 }))
                .collect();
            log.absorb(Compaction {
                base: base.clone(),
                snapshots: Vec::new(),
                skipped: BTreeMap::new(),
            });
            assert_eq!(log.base(), &base);
            bases.push(base);
        }
        for (i, base) in bases.iter().enumerate() {
            let known = i + 1 + EARLIER_HORIZONS >= bases.len();
            assert_eq!(
                log.horizon(&base.digest()),
                known.then(|| base.clone()),
                "horizon {i}"
            );
        }
        assert_eq!(log.horizon(&[7; 16]), None);
    }

    /// One change per actor in turn, each on top of the ones before.
    fn changes(actors: &[u8], key: &str) -> Vec<Vec<u8>> {
        let mut doc = AutoCommit::new();
        let mut out = Vec::new();
        for (i, &actor) in actors.iter().enumerate() {
            doc.set_actor(ReplicaId([actor; 16]).actor());
            doc.put(ROOT, key, i as i64).expect("put");
            doc.commit();
            let change = doc.get_last_local_change().expect("a change");
            out.push(change.raw_bytes().to_vec());
        }
        out
    }

    fn entry(replica: u8, counter: u64, doc: &str, change: &[u8]) -> Entry {
        Entry {
            dot: Dot {
                replica: ReplicaId([replica; 16]),
                counter,
            },
            doc: id(doc),
            change: change.to_vec(),
        }
    }

    #[test]
    fn a_document_automerge_refuses_is_skipped_and_the_rest_compacts() {
        // Two changes of "bad" by replica 1 with the same automerge seq but
        // different content: automerge refuses the second.
        let (bad1, bad2) = (changes(&[1], "x"), changes(&[1], "y"));
        let ok = changes(&[1, 2, 2, 1, 2], "k");
        let other = changes(&[3, 3], "o");
        let stored = StoredDatabase {
            entries: vec![
                entry(1, 1, "ok", &ok[0]),
                entry(1, 2, "bad", &bad1[0]),
                entry(2, 1, "ok", &ok[1]),
                entry(2, 2, "ok", &ok[2]),
                entry(1, 3, "ok", &ok[3]),
                // Depends on 1:3, which stays above the horizon: so does it.
                entry(2, 3, "ok", &ok[4]),
                entry(1, 4, "bad", &bad2[0]),
                entry(3, 1, "other", &other[0]),
                entry(3, 2, "other", &other[1]),
            ],
            ..StoredDatabase::default()
        };
        let (mut log, errors) = Log::from_stored(stored);
        assert!(errors.is_empty(), "{errors:?}");

        let plan = log.plan_compaction(&log.vv().clone());
        assert_eq!(
            plan.skipped.keys().collect::<Vec<_>>(),
            [&id("bad")],
            "{plan:?}"
        );
        assert!(
            plan.skipped[&id("bad")].contains("duplicate seq"),
            "{plan:?}"
        );
        // The horizon stops below "bad"'s first entry.
        let r = |n: u8| ReplicaId([n; 16]);
        assert_eq!(
            (
                plan.base.get(&r(1)),
                plan.base.get(&r(2)),
                plan.base.get(&r(3))
            ),
            (1, 2, 2)
        );
        let folded: Vec<(&str, VersionVector)> = plan
            .snapshots
            .iter()
            .map(|s| (s.doc.as_str(), s.clock.clone()))
            .collect();
        let mut ok_clock = VersionVector::new();
        ok_clock.set(r(1), 1);
        ok_clock.set(r(2), 2);
        let mut other_clock = VersionVector::new();
        other_clock.set(r(3), 2);
        assert_eq!(folded, [("ok", ok_clock), ("other", other_clock)]);

        log.apply_compaction(plan);
        let left: Vec<(Dot, &str)> = log.entries().map(|e| (e.dot, e.doc.as_str())).collect();
        let dot = |replica: u8, counter: u64| Dot {
            replica: r(replica),
            counter,
        };
        // Nothing lost: both of "bad"'s entries, and the "ok" entries after
        // the first of them, stay; the rest is in snapshots.
        assert_eq!(
            left,
            [
                (dot(1, 2), "bad"),
                (dot(1, 3), "ok"),
                (dot(2, 3), "ok"),
                (dot(1, 4), "bad")
            ]
        );
        let ok_snapshot = log.snapshot(&id("ok")).expect("snapshot");
        let mut doc = AutoCommit::load(&ok_snapshot.bytes).expect("loads");
        assert_eq!(doc.get_changes(&[]).len(), 3);

        // Compacting again folds what is left of "ok" and skips "bad" again.
        let again = log.plan_compaction(&log.vv().clone());
        assert_eq!(again.skipped.len(), 1);
        assert_eq!(again.snapshots.len(), 0, "{again:?}");
    }
}
