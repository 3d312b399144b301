//! Cutting a delta into frames that stay under the frame limit.

use std::borrow::Cow;
use std::collections::HashMap;

use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::ids::{DbName, DocId};
use crate::protocol::Delta;
use crate::view::DocView;

/// What every part of one delta shares.
pub(crate) struct Parts<'a> {
    pub db: &'a DbName,
    /// The `Subscribe` answered, or 0 for a live update.
    pub req: u32,
    pub base: &'a VersionVector,
    pub vv: &'a VersionVector,
    /// Bytes of snapshots, entries and views per part (a single larger
    /// item travels alone).
    pub budget: usize,
}

impl Parts<'_> {
    /// Hand `emit` the parts of one delta in order, each built only when
    /// the one before it is done (borrowed items are cloned then, owned ones
    /// moved), so a caller that encodes each part at once holds one part's
    /// copy of the log at a time instead of the whole reply's. Snapshots come first so a receiver can install
    /// them before the entries built on them; a view travels in the part of
    /// its document's first entry, so the receiver knows it before it
    /// would apply that entry.
    pub fn emit<'e>(
        &self,
        snapshots: &[&Snapshot],
        entries: impl IntoIterator<Item = Cow<'e, Entry>>,
        mut views: HashMap<&DocId, &DocView>,
        mut emit: impl FnMut(Delta),
    ) {
        let new_part = |part: u32| Delta {
            db: self.db.clone(),
            req: self.req,
            part,
            last: false,
            base: self.base.clone(),
            snapshots: Vec::new(),
            entries: Vec::new(),
            views: Vec::new(),
            vv: self.vv.clone(),
        };
        let mut part = new_part(0);
        let mut used = 0usize;
        let mut next = |part: &mut Delta, used: &mut usize, len: usize| {
            if *used > 0 && *used + len > self.budget {
                let n = part.part + 1;
                emit(std::mem::replace(part, new_part(n)));
                *used = 0;
            }
            *used += len;
        };
        for s in snapshots {
            next(&mut part, &mut used, s.encoded_len());
            part.snapshots.push((*s).clone());
        }
        for e in entries {
            let view = views.remove(&e.doc);
            let len = e.encoded_len() + view.map_or(0, DocView::encoded_len);
            next(&mut part, &mut used, len);
            part.views.extend(view.cloned());
            part.entries.push(e.into_owned());
        }
        part.last = true;
        emit(part);
    }
}
