//! Cutting a delta into frames that stay under the frame limit.

use std::collections::HashMap;

use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::ids::{DbName, DocId};
use crate::protocol::Delta;
use crate::view::DocView;

/// Build the parts of one delta, each holding at most about `budget` bytes
/// of snapshots, entries and views (a single larger item travels alone).
/// Snapshots come first so a receiver can install them before the entries
/// built on them; a view travels in the part of its document's first entry,
/// so the receiver knows it before it would apply that entry.
#[allow(clippy::too_many_arguments)]
pub(crate) fn delta_parts(
    db: &DbName,
    req: u32,
    base: VersionVector,
    snapshots: Vec<Snapshot>,
    entries: Vec<Entry>,
    mut views: HashMap<DocId, DocView>,
    vv: &VersionVector,
    budget: usize,
) -> Vec<Delta> {
    let new_part = |part: u32| Delta {
        db: db.clone(),
        req,
        part,
        last: false,
        base: base.clone(),
        snapshots: Vec::new(),
        entries: Vec::new(),
        views: Vec::new(),
        vv: vv.clone(),
    };
    let mut parts = vec![new_part(0)];
    let mut used = 0usize;
    for s in snapshots {
        let len = s.encoded_len();
        if used > 0 && used + len > budget {
            parts.push(new_part(parts.len() as u32));
            used = 0;
        }
        used += len;
        if let Some(p) = parts.last_mut() {
            p.snapshots.push(s);
        }
    }
    for e in entries {
        let view = views.remove(&e.doc);
        let len = e.encoded_len() + view.as_ref().map_or(0, DocView::encoded_len);
        if used > 0 && used + len > budget {
            parts.push(new_part(parts.len() as u32));
            used = 0;
        }
        used += len;
        if let Some(p) = parts.last_mut() {
            p.views.extend(view);
            p.entries.push(e);
        }
    }
    if let Some(p) = parts.last_mut() {
        p.last = true;
    }
    parts
}
