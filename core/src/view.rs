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

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

use crate::clock::VersionVector;
use crate::ids::DocId;
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
