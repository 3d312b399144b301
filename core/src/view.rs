//! Cached JSON views of documents, kept by a replica's store beside its log.
//!
//! Opening a database used to mean applying every stored change through
//! automerge before the first read (300 ms for 1,000 documents of 11 changes
//! in a browser). A store that keeps a [`DocView`] per document (written with
//! the batch that changed it) lets [`crate::Database`] show each document from
//! its JSON and load it into automerge only when something needs the
//! automerge document: a local write, a remote change, a compaction.
//!
//! A view is a cache, never a source of truth: it is used only when its
//! clock equals the clock the log itself has for the document, so a view
//! that is older or newer than the stored log (a crash between two writes,
//! another version's data) is ignored and the document is rebuilt from the
//! log as before.
//!
//! The server keeps views too, built off its hot path ([`ViewJob`]), and
//! sends them with a reply to a replica that holds nothing of a document:
//! that replica stores the document's entries and shows the view, without
//! applying the entries through automerge until something needs the
//! automerge document (the same lazy load as after a reopen). A cold sync
//! of 1,000 documents then costs the client no CRDT work at all.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use automerge::TextEncoding;

use crate::clock::VersionVector;
use crate::doc::Document;
use crate::ids::{DocId, ReplicaId};
use crate::store::CorruptRecord;

/// A document's JSON as of its clock.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct DocView {
    /// The document.
    pub doc: DocId,
    /// The document's clock in the log when `json` was taken
    /// ([`crate::Log::doc_clock`]).
    pub clock: VersionVector,
    /// The document as JSON text; `None` when it is deleted or empty.
    pub json: Option<String>,
}

impl DocView {
    /// Approximate encoded size, used to cut deltas into frames.
    pub fn encoded_len(&self) -> usize {
        self.json.as_ref().map_or(0, String::len)
            + self.doc.as_str().len()
            + 24 * self.clock.len()
            + 16
    }

    /// Whether the JSON text parses (views from a peer are untrusted; an
    /// adapter hands the text straight to `JSON.parse`).
    pub fn is_well_formed(&self) -> bool {
        self.json
            .as_deref()
            .is_none_or(|j| serde_json::from_str::<serde::de::IgnoredAny>(j).is_ok())
    }
}

/// One document's history, copied out of a log to build its view.
#[derive(Debug, Clone)]
pub struct ViewSource {
    pub(crate) doc: DocId,
    pub(crate) clock: VersionVector,
    pub(crate) changes: Vec<Vec<u8>>,
}

/// Views to build away from the log ([`crate::Log::view_job`]): plain data,
/// so an adapter can build them on another thread and hand the result back.
#[derive(Debug, Clone, Default)]
pub struct ViewJob {
    pub(crate) docs: Vec<ViewSource>,
}

impl ViewJob {
    /// How many documents the job builds.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether there is nothing to build.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }

    /// How many changes the job applies (its cost).
    pub fn changes(&self) -> usize {
        self.docs.iter().map(|d| d.changes.len()).sum()
    }

    /// The documents and clocks the job is for.
    pub fn targets(&self) -> Vec<(DocId, VersionVector)> {
        self.docs
            .iter()
            .map(|d| (d.doc.clone(), d.clock.clone()))
            .collect()
    }

    /// Build the views, one document at a time (each is dropped once its
    /// JSON is taken). A document whose history does not load gets no view
    /// (the log's content was validated when appended, so this means
    /// damage; peers then apply its entries as usual) and is listed in
    /// `failed`, so it is not retried until it changes.
    pub fn build(self) -> BuiltViews {
        let mut out = BuiltViews::default();
        for src in self.docs {
            let target = (src.doc.clone(), src.clock.clone());
            match build_one(src) {
                Some(v) => out.views.push(v),
                None => out.failed.push(target),
            }
        }
        out
    }
}

/// What a [`ViewJob`] produced.
#[derive(Debug, Clone, Default)]
pub struct BuiltViews {
    /// The views built.
    pub views: Vec<DocView>,
    /// Documents (at these clocks) whose history did not load.
    pub failed: Vec<(DocId, VersionVector)>,
}

fn build_one(src: ViewSource) -> Option<DocView> {
    let mut changes = Vec::with_capacity(src.changes.len());
    for (i, bytes) in src.changes.iter().enumerate() {
        match automerge::Change::try_from(&bytes[..]) {
            Ok(c) => changes.push(c),
            Err(e) => {
                tracing::warn!(doc = %src.doc, change = i, "no view: {e}");
                return None;
            }
        }
    }
    let mut d = Document::new(ReplicaId::default(), TextEncoding::UnicodeCodePoint);
    if let Err(e) = d.apply_batch(changes) {
        tracing::warn!(doc = %src.doc, "no view: {e}");
        return None;
    }
    if !automerge::ReadDoc::get_missing_deps(d.automerge(), &[]).is_empty() {
        tracing::warn!(doc = %src.doc, "no view: changes with missing dependencies");
        return None;
    }
    let view = DocView {
        json: d.to_json().map(|v| v.to_string()),
        doc: src.doc,
        clock: src.clock,
    };
    // A receiver refuses text it cannot parse back (e.g. nesting deeper
    // than its parser allows): such a document is served without a view.
    if !view.is_well_formed() {
        tracing::warn!(doc = %view.doc, "no view: its JSON does not parse back");
        return None;
    }
    Some(view)
}

/// Encode a view as one opaque record (an rkyv archive).
pub fn encode_view(view: &DocView) -> Vec<u8> {
    rkyv::to_bytes::<rancor::Error>(view)
        .map(|b| b.to_vec())
        .unwrap_or_default()
}

/// Decode and validate a record written by [`encode_view`]. Stored bytes are
/// untrusted: anything that does not validate is an error, never a panic.
/// (The JSON text is checked when it is read; text that does not parse
/// makes the document load from the log instead.)
pub fn decode_view(bytes: &[u8]) -> Result<DocView, CorruptRecord> {
    let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    let mut view = rkyv::from_bytes::<DocView, rancor::Error>(&aligned)
        .map_err(|e| CorruptRecord(e.to_string()))?;
    if !DocId::is_valid(view.doc.as_str()) {
        return Err(CorruptRecord("view document id".into()));
    }
    view.clock.normalize();
    Ok(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ReplicaId;

    fn view() -> DocView {
        let mut clock = VersionVector::new();
        clock.set(ReplicaId([3; 16]), 4);
        DocView {
            doc: DocId::new("todo:1").expect("valid id"),
            clock,
            json: Some(r#"{"title":"milk"}"#.into()),
        }
    }

    #[test]
    fn view_records_round_trip() {
        let v = view();
        assert_eq!(decode_view(&encode_view(&v)), Ok(v));
    }

    #[test]
    fn corrupt_view_records_are_errors() {
        let bytes = encode_view(&view());
        for cut in 0..bytes.len() {
            let _ = decode_view(&bytes[..cut]); // must not panic
        }
        assert!(decode_view(&bytes[..bytes.len() / 2]).is_err());
        for i in 0..bytes.len() {
            let mut b = bytes.clone();
            b[i] ^= 0xff;
            let _ = decode_view(&b);
        }
        assert!(decode_view(&[]).is_err());
    }
}
