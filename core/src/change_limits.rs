//! Cheap checks on an automerge change's bytes, before automerge parses them.
//!
//! automerge inflates a compressed change with no cap and walks every op a
//! change claims, and a run-length encoded column can claim 2⁴⁰ ops in a
//! few bytes. A peer's change is therefore read here first, without
//! building a single op: the chunk header, the change header and the column
//! directory are parsed, a compressed body is inflated only up to a cap,
//! and the run lengths of the two columns that decide how long automerge
//! loops (the action column: one row per op; the pred group column: how
//! many predecessors each op lists) are summed. Anything over a limit is
//! refused before automerge sees it.
//!
//! The pass is linear in the (capped) bytes and allocates at most the
//! inflated body. It also yields the change hash, so a resend of a held
//! change is recognised without parsing it.

use std::io::Read;

use sha2::{Digest, Sha256};

/// The first bytes of every automerge chunk.
const MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
const CHUNK_CHANGE: u8 = 1;
const CHUNK_COMPRESSED: u8 = 2;
/// Column ids (a column spec is `id << 4 | deflate << 3 | type`).
const ACTION_COLUMN: u64 = 4;
const PRED_COLUMN: u64 = 7;
const TYPE_GROUP: u64 = 0;
const TYPE_ACTOR: u64 = 1;
const TYPE_ULEB: u64 = 2;
const DEFLATE_BIT: u64 = 8;

/// Bounds on one change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeLimits {
    /// Largest change as sent (compressed or not).
    pub max_bytes: usize,
    /// Largest change once inflated.
    pub max_inflated: usize,
    /// Most ops in one change.
    pub max_ops: u64,
    /// Most predecessor references, summed over the change's ops.
    pub max_preds: u64,
}

/// Default [`ChangeLimits`]: a change of up to 16 MiB inflated and 2²⁰ ops
/// (pasting a megabyte of text is one op per character).
pub const DEFAULT_CHANGE_LIMITS: ChangeLimits = ChangeLimits {
    max_bytes: 16 << 20,
    max_inflated: 16 << 20,
    max_ops: 1 << 20,
    max_preds: 2 << 20,
};

impl Default for ChangeLimits {
    fn default() -> Self {
        DEFAULT_CHANGE_LIMITS
    }
}

/// What the cheap pass learned about a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeSummary {
    /// The author's actor id bytes.
    pub actor: Vec<u8>,
    /// automerge's sequence number of this change for its actor.
    pub seq: u64,
    /// The change hash (as automerge computes it); `None` from
    /// [`inspect_unhashed`].
    pub hash: Option<[u8; 32]>,
    /// Ops in the change.
    pub ops: u64,
    /// Bytes of the change once inflated.
    pub inflated: usize,
}

/// Why a change was refused by the cheap pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeRefused {
    /// Over one of the [`ChangeLimits`].
    #[error("change too large: {what} is over the limit of {limit}")]
    OverLimit {
        /// What was counted.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// Not a well-formed change chunk.
    #[error("not an automerge change: {0}")]
    Malformed(&'static str),
}

fn over(what: &'static str, limit: u64) -> ChangeRefused {
    ChangeRefused::OverLimit { what, limit }
}

/// Read a change's headers and column lengths within `limits`, and
/// compute its hash (checking the chunk's checksum).
pub fn inspect(bytes: &[u8], limits: &ChangeLimits) -> Result<ChangeSummary, ChangeRefused> {
    inspect_with(bytes, limits, true)
}

/// [`inspect`] without the hash: for a change parsed next by
/// [`crate::Entry::parse_change_within`], which checks the checksum
/// against the hash automerge computes while parsing (the SHA-256 is most
/// of the cheap pass's cost on small changes; one is enough).
pub fn inspect_unhashed(
    bytes: &[u8],
    limits: &ChangeLimits,
) -> Result<ChangeSummary, ChangeRefused> {
    inspect_with(bytes, limits, false)
}

fn inspect_with(
    bytes: &[u8],
    limits: &ChangeLimits,
    hashed: bool,
) -> Result<ChangeSummary, ChangeRefused> {
    if bytes.len() > limits.max_bytes {
        return Err(over("its size in bytes", limits.max_bytes as u64));
    }
    let mut r = Reader::new(bytes);
    if r.take(4)? != MAGIC {
        return Err(ChangeRefused::Malformed("bad magic bytes"));
    }
    let checksum: [u8; 4] = r
        .take(4)?
        .try_into()
        .map_err(|_| ChangeRefused::Malformed("truncated header"))?;
    let kind = r.byte()?;
    let len = usize::try_from(r.uleb()?).map_err(|_| ChangeRefused::Malformed("length"))?;
    let data = r.take(len)?;
    if !r.is_empty() {
        return Err(ChangeRefused::Malformed("bytes after the chunk"));
    }
    let inflated;
    let body = match kind {
        CHUNK_CHANGE => data,
        CHUNK_COMPRESSED => {
            inflated = inflate_capped(data, limits.max_inflated)?;
            &inflated[..]
        }
        _ => return Err(ChangeRefused::Malformed("not a change chunk")),
    };
    if body.len() > limits.max_inflated {
        return Err(over(
            "its inflated size in bytes",
            limits.max_inflated as u64,
        ));
    }
    let hash = if hashed {
        let hash = chunk_hash(body);
        if hash[..4] != checksum {
            return Err(ChangeRefused::Malformed("checksum mismatch"));
        }
        Some(hash)
    } else {
        None
    };
    let (actor, seq, ops) = read_change(body, limits)?;
    Ok(ChangeSummary {
        actor,
        seq,
        hash,
        ops,
        inflated: body.len(),
    })
}

/// automerge's change hash: SHA-256 over the uncompressed chunk type,
/// length and body.
fn chunk_hash(body: &[u8]) -> [u8; 32] {
    let mut head = Vec::with_capacity(11);
    head.push(CHUNK_CHANGE);
    write_uleb(&mut head, body.len() as u64);
    let mut h = Sha256::new();
    h.update(&head);
    h.update(body);
    h.finalize().into()
}

fn inflate_capped(data: &[u8], cap: usize) -> Result<Vec<u8>, ChangeRefused> {
    let mut out = Vec::new();
    let decoder = flate2::bufread::DeflateDecoder::new(data);
    decoder
        .take(cap as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|_| ChangeRefused::Malformed("compressed body does not inflate"))?;
    if out.len() > cap {
        return Err(over("its inflated size in bytes", cap as u64));
    }
    Ok(out)
}

/// The change header and the op count, from an uncompressed change body.
fn read_change(body: &[u8], limits: &ChangeLimits) -> Result<(Vec<u8>, u64, u64), ChangeRefused> {
    let mut r = Reader::new(body);
    let deps = r.uleb()?;
    r.skip_items(deps, 32)?;
    let actor = r.prefixed()?.to_vec();
    let seq = r.uleb()?;
    let start_op = r.uleb()?;
    if start_op == 0 {
        return Err(ChangeRefused::Malformed("start op is zero"));
    }
    r.sleb()?; // time
    r.prefixed()?; // message
    let others = r.uleb()?;
    // The author is actor 0, the others follow.
    let actors = others.saturating_add(1);
    for _ in 0..others {
        r.prefixed()?; // each iteration consumes at least a byte
    }
    let columns = r.uleb()?;
    let mut specs = Vec::new();
    for _ in 0..columns {
        let spec = r.uleb()?;
        let len = usize::try_from(r.uleb()?).map_err(|_| ChangeRefused::Malformed("column"))?;
        if spec & DEFLATE_BIT != 0 {
            return Err(ChangeRefused::Malformed("compressed column in a change"));
        }
        specs.push((spec, len));
    }
    let mut ops = 0;
    for (spec, len) in specs {
        let col = r.take(len)?;
        match (spec >> 4, spec & 7) {
            (ACTION_COLUMN, TYPE_ULEB) => {
                ops = rle_rows(col, limits.max_ops, "ops")?;
            }
            (PRED_COLUMN, TYPE_GROUP) => {
                rle_sum(col, limits.max_preds, "predecessor references")?;
            }
            // automerge indexes its actor table with these unchecked.
            (_, TYPE_ACTOR) => rle_values_below(col, actors)?,
            _ => {}
        }
    }
    // automerge keeps op counters in 32 bits and unwraps the conversion.
    if start_op.saturating_add(ops) > u64::from(u32::MAX) {
        return Err(ChangeRefused::Malformed("op counters past 2^32"));
    }
    Ok((actor, seq, ops))
}

/// Rows of an RLE column of uLEB values, refusing more than `max`.
fn rle_rows(col: &[u8], max: u64, what: &'static str) -> Result<u64, ChangeRefused> {
    rle_walk(col, max, what, |count, _| Some(count))
}

/// Sum of an RLE column of uLEB values (a group column: each value is how
/// many rows a group holds), refusing more than `max`.
fn rle_sum(col: &[u8], max: u64, what: &'static str) -> Result<u64, ChangeRefused> {
    rle_walk(col, max, what, |count, value| count.checked_mul(value))
}

/// Walk the runs of an RLE column of uLEB values, adding `weight(count,
/// value)` for each run (nulls weigh their count in rows, nothing in sums
/// — `weight(n, 0)`), and refusing as soon as the total passes `max`.
fn rle_walk(
    col: &[u8],
    max: u64,
    what: &'static str,
    weight: impl Fn(u64, u64) -> Option<u64>,
) -> Result<u64, ChangeRefused> {
    let mut r = Reader::new(col);
    let mut total: u64 = 0;
    let mut add = |w: Option<u64>| -> Result<(), ChangeRefused> {
        total = w
            .and_then(|w| total.checked_add(w))
            .filter(|t| *t <= max)
            .ok_or_else(|| over(what, max))?;
        Ok(())
    };
    while !r.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            let value = r.uleb()?;
            add(weight(count as u64, value))?;
        } else if count < 0 {
            // A literal run: each value takes at least a byte, so this
            // loop is bounded by the column's length.
            for _ in 0..count.unsigned_abs() {
                let value = r.uleb()?;
                add(weight(1, value))?;
            }
        } else {
            let nulls = r.uleb()?;
            add(weight(nulls, 0))?;
        }
    }
    Ok(total)
}

/// Every value of an RLE column of uLEB values is below `bound`.
fn rle_values_below(col: &[u8], bound: u64) -> Result<(), ChangeRefused> {
    let mut r = Reader::new(col);
    let out_of_range = ChangeRefused::Malformed("an actor index past the change's actors");
    while !r.is_empty() {
        let count = r.sleb()?;
        if count > 0 {
            if r.uleb()? >= bound {
                return Err(out_of_range);
            }
        } else if count < 0 {
            for _ in 0..count.unsigned_abs() {
                if r.uleb()? >= bound {
                    return Err(out_of_range);
                }
            }
        } else {
            r.uleb()?; // nulls
        }
    }
    Ok(())
}

/// A bounds-checked cursor over bytes.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], ChangeRefused> {
        if n > self.bytes.len() {
            return Err(ChangeRefused::Malformed("truncated"));
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Ok(head)
    }

    fn byte(&mut self) -> Result<u8, ChangeRefused> {
        Ok(self.take(1)?[0])
    }

    /// `n` items of `size` bytes each.
    fn skip_items(&mut self, n: u64, size: usize) -> Result<(), ChangeRefused> {
        let total = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(size))
            .ok_or(ChangeRefused::Malformed("truncated"))?;
        self.take(total).map(|_| ())
    }

    /// A uLEB length and that many bytes.
    fn prefixed(&mut self) -> Result<&'a [u8], ChangeRefused> {
        let n = usize::try_from(self.uleb()?).map_err(|_| ChangeRefused::Malformed("length"))?;
        self.take(n)
    }

    fn uleb(&mut self) -> Result<u64, ChangeRefused> {
        let mut value: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && part > 1 {
                return Err(ChangeRefused::Malformed("LEB128 overflow"));
            }
            value |= part << (7 * i);
            if b & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(ChangeRefused::Malformed("LEB128 overflow"))
    }

    fn sleb(&mut self) -> Result<i64, ChangeRefused> {
        let mut value: i64 = 0;
        let mut shift = 0;
        loop {
            let b = self.byte()?;
            if shift == 63 && b != 0 && b != 0x7f {
                return Err(ChangeRefused::Malformed("LEB128 overflow"));
            }
            value |= i64::from(b & 0x7f) << shift;
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    value |= -1i64 << shift;
                }
                return Ok(value);
            }
            if shift > 63 {
                return Err(ChangeRefused::Malformed("LEB128 overflow"));
            }
        }
    }
}

fn write_uleb(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// Crafting hostile changes, for tests here and in other crates.
#[doc(hidden)]
pub mod testing {
    use super::*;

    /// `raw` (an uncompressed change) with the column `spec` replaced by
    /// `data`: how a hostile peer crafts a change automerge would loop on.
    pub fn with_column(raw: &[u8], spec: u64, data: &[u8]) -> Vec<u8> {
        let mut r = Reader::new(raw);
        r.take(9).unwrap();
        let len = r.uleb().unwrap() as usize;
        let body = r.take(len).unwrap();
        let mut r = Reader::new(body);
        let start = r.bytes.len();
        let deps = r.uleb().unwrap();
        r.skip_items(deps, 32).unwrap();
        r.prefixed().unwrap();
        r.uleb().unwrap();
        r.uleb().unwrap();
        r.sleb().unwrap();
        r.prefixed().unwrap();
        for _ in 0..r.uleb().unwrap() {
            r.prefixed().unwrap();
        }
        let head = &body[..start - r.bytes.len()];
        let mut cols = Vec::new();
        for _ in 0..r.uleb().unwrap() {
            cols.push((r.uleb().unwrap(), r.uleb().unwrap() as usize));
        }
        let datas: Vec<&[u8]> = cols.iter().map(|(_, l)| r.take(*l).unwrap()).collect();
        let mut new_body = head.to_vec();
        write_uleb(&mut new_body, cols.len() as u64);
        let mut new_data = Vec::new();
        for ((s, _), d) in cols.iter().zip(&datas) {
            let d = if *s == spec { data } else { d };
            write_uleb(&mut new_body, *s);
            write_uleb(&mut new_body, d.len() as u64);
            new_data.extend_from_slice(d);
        }
        new_body.extend(new_data);
        new_body.extend_from_slice(r.bytes);
        let hash = chunk_hash(&new_body);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&hash[..4]);
        out.push(CHUNK_CHANGE);
        write_uleb(&mut out, new_body.len() as u64);
        out.extend(new_body);
        out
    }

    /// An RLE run of `count` copies of `value`.
    pub fn run(count: i64, value: u64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut v = count;
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if (v == 0 && b & 0x40 == 0) || (v == -1 && b & 0x40 != 0) {
                out.push(b);
                break;
            }
            out.push(b | 0x80);
        }
        write_uleb(&mut out, value);
        out
    }

    /// A compressed change chunk around a raw deflate stream (checksum
    /// zero): a deflate bomb when `deflated` inflates past the limit.
    pub fn compressed_chunk(deflated: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend([0; 4]);
        out.push(CHUNK_COMPRESSED);
        write_uleb(&mut out, deflated.len() as u64);
        out.extend_from_slice(deflated);
        out
    }

    /// A complete change by `actor` of `ops` puts of null to root key "k",
    /// every column one run: a few dozen bytes for any number of ops.
    pub fn op_bomb(actor: &[u8], ops: u64) -> Vec<u8> {
        let n = ops as i64;
        let mut key = run(n, 1);
        key.push(b'k');
        let mut insert = Vec::new();
        write_uleb(&mut insert, ops);
        let columns: [(u64, Vec<u8>); 5] = [
            (1 << 4 | 5, key),                           // key strings
            (3 << 4 | 4, insert),                        // insert flags: `ops` falses
            (ACTION_COLUMN << 4 | TYPE_ULEB, run(n, 1)), // set
            (5 << 4 | 6, run(n, 0)),                     // value metadata: null
            (PRED_COLUMN << 4 | TYPE_GROUP, run(n, 0)),  // no predecessors
        ];
        let mut body = vec![0]; // no dependencies
        write_uleb(&mut body, actor.len() as u64);
        body.extend_from_slice(actor);
        body.extend([1, 1, 0, 0, 0]); // seq, start op, time, message, other actors
        write_uleb(&mut body, columns.len() as u64);
        for (spec, data) in &columns {
            write_uleb(&mut body, *spec);
            write_uleb(&mut body, data.len() as u64);
        }
        for (_, data) in columns {
            body.extend(data);
        }
        let hash = chunk_hash(&body);
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&hash[..4]);
        out.push(CHUNK_CHANGE);
        write_uleb(&mut out, body.len() as u64);
        out.extend(body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{run, with_column};
    use super::*;
    use automerge::transaction::Transactable;
    use automerge::{ActorId, Automerge, ROOT};

    fn change(n_keys: usize) -> automerge::Change {
        let mut doc = Automerge::new().with_actor(ActorId::from([7u8; 16]));
        let mut tx = doc.transaction();
        for i in 0..n_keys {
            tx.put(ROOT, format!("k{i}"), i as i64).unwrap();
        }
        tx.commit();
        doc.get_last_local_change().unwrap()
    }

    #[test]
    fn honest_changes_pass_with_automerge_s_own_hash_and_counts() {
        for n in [1, 3, 1000] {
            let mut c = change(n);
            for bytes in [c.raw_bytes().to_vec(), c.bytes().into_owned()] {
                let s = inspect(&bytes, &DEFAULT_CHANGE_LIMITS).unwrap();
                assert_eq!(s.hash, Some(c.hash().0));
                assert_eq!(s.ops, n as u64);
                assert_eq!(s.seq, c.seq());
                assert_eq!(s.actor, c.actor_id().to_bytes());
            }
        }
    }

    #[test]
    fn a_bad_checksum_is_refused_hashed_here_and_unhashed_by_automerge() {
        let mut bytes = change(2).raw_bytes().to_vec();
        assert!(inspect_unhashed(&bytes, &DEFAULT_CHANGE_LIMITS).is_ok());
        bytes[4] ^= 1; // the first checksum byte
        assert!(matches!(
            inspect(&bytes, &DEFAULT_CHANGE_LIMITS),
            Err(ChangeRefused::Malformed("checksum mismatch"))
        ));
        let s = inspect_unhashed(&bytes, &DEFAULT_CHANGE_LIMITS).unwrap();
        assert_eq!(s.hash, None);
        // automerge's parser does not check it (so the entry's parse does:
        // a stored change with a bad checksum would fail document loads).
        assert!(automerge::Change::try_from(&bytes[..]).is_ok());
        let entry = crate::Entry {
            dot: crate::clock::Dot {
                replica: crate::ReplicaId([7; 16]),
                counter: 1,
            },
            doc: crate::DocId::new("d").unwrap(),
            change: bytes,
        };
        assert!(matches!(
            entry.parse_change(),
            Err(crate::entry::InvalidChange::Unparsable { .. })
        ));
    }

    #[test]
    fn a_few_bytes_claiming_a_trillion_ops_are_refused_at_once() {
        let raw = change(1).raw_bytes().to_vec();
        let bomb = with_column(&raw, ACTION_COLUMN << 4 | TYPE_ULEB, &run(1 << 40, 1));
        assert!(bomb.len() < 200, "{} bytes", bomb.len());
        assert_eq!(
            inspect(&bomb, &DEFAULT_CHANGE_LIMITS),
            Err(over("ops", DEFAULT_CHANGE_LIMITS.max_ops))
        );
        let preds = with_column(&raw, PRED_COLUMN << 4 | TYPE_GROUP, &run(1, 1 << 40));
        assert_eq!(
            inspect(&preds, &DEFAULT_CHANGE_LIMITS),
            Err(over(
                "predecessor references",
                DEFAULT_CHANGE_LIMITS.max_preds
            ))
        );
        // A literal run claiming more values than the column holds.
        let truncated = with_column(&raw, ACTION_COLUMN << 4 | TYPE_ULEB, &run(-(1 << 50), 1));
        assert!(matches!(
            inspect(&truncated, &DEFAULT_CHANGE_LIMITS),
            Err(ChangeRefused::Malformed(_))
        ));
    }

    #[test]
    fn an_actor_index_past_the_change_s_actors_is_refused() {
        let mut doc = Automerge::new().with_actor(ActorId::from([7u8; 16]));
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", 1).unwrap();
        tx.commit();
        let mut tx = doc.transaction();
        tx.put(ROOT, "k", 2).unwrap();
        tx.commit();
        let raw = doc.get_last_local_change().unwrap().raw_bytes().to_vec();
        assert!(inspect(&raw, &DEFAULT_CHANGE_LIMITS).is_ok());
        // The pred actor column (id 7) names actor 5 of a change with one.
        let bad = with_column(&raw, PRED_COLUMN << 4 | TYPE_ACTOR, &run(1, 5));
        assert_eq!(
            inspect(&bad, &DEFAULT_CHANGE_LIMITS),
            Err(ChangeRefused::Malformed(
                "an actor index past the change's actors"
            ))
        );
        // automerge itself parses it, and panics applying it.
        let parsed = automerge::Change::try_from(&bad[..]).unwrap();
        let first = doc.get_changes(&[])[0].clone();
        let applied = std::panic::catch_unwind(move || {
            let mut fresh = Automerge::new();
            fresh.apply_changes([first]).unwrap();
            let _ = fresh.apply_changes([parsed]);
        });
        assert!(applied.is_err(), "automerge 0.12 panics on it");
    }

    #[test]
    fn a_deflate_bomb_is_refused_before_it_is_inflated_whole() {
        // 64 MiB of zeros deflates to ~64 KiB.
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        std::io::Write::write_all(&mut e, &vec![0u8; 64 << 20]).unwrap();
        let deflated = e.finish().unwrap();
        let bomb = super::testing::compressed_chunk(&deflated);
        assert_eq!(
            inspect(&bomb, &DEFAULT_CHANGE_LIMITS),
            Err(over("its inflated size in bytes", 16 << 20))
        );
    }

    #[test]
    fn every_limit_is_enforced() {
        let mut c = change(1000);
        let raw = c.raw_bytes().to_vec();
        let compressed = c.bytes().into_owned();
        assert!(compressed.len() < raw.len());
        let tight = |f: fn(&mut ChangeLimits)| {
            let mut l = DEFAULT_CHANGE_LIMITS;
            f(&mut l);
            l
        };
        let by_ops = tight(|l| l.max_ops = 999);
        assert!(matches!(
            inspect(&raw, &by_ops),
            Err(ChangeRefused::OverLimit { what: "ops", .. })
        ));
        let by_inflated = tight(|l| l.max_inflated = 1000);
        assert!(inspect(&compressed, &by_inflated).is_err());
        let by_bytes = tight(|l| l.max_bytes = 100);
        assert!(inspect(&raw, &by_bytes).is_err());
    }
}
