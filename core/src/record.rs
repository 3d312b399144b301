//! Log records: `[len u32 LE][crc32c u32 LE][payload]`, payload an rkyv
//! archive. The format of every file store (the native server's and client's
//! `FileStore`, the npm package's file store in Node) and its recovery rules:
//! bytes in, records out, no I/O.

use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::store::Batch;
use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};

/// Largest record payload written or read: a sanity bound against a corrupt
/// length. Writes above it are refused ([`RecordError::TooLarge`]), so every
/// record written can be read back.
pub const MAX_RECORD: usize = 256 << 20;

const HEADER: usize = 8;

/// One durable write: a `Batch` as stored.
#[derive(Debug, Clone, PartialEq, Archive, Serialize, Deserialize)]
pub struct Record {
    /// Entries appended.
    pub entries: Vec<Entry>,
    /// Snapshots replacing their document's.
    pub snapshots: Vec<Snapshot>,
    /// A raised horizon.
    pub base: Option<VersionVector>,
}

impl From<&Batch> for Record {
    fn from(b: &Batch) -> Self {
        Record {
            entries: b.entries.clone(),
            snapshots: b.snapshots.clone(),
            base: b.base.clone(),
        }
    }
}

impl From<Record> for Batch {
    fn from(r: Record) -> Self {
        Batch {
            entries: r.entries,
            snapshots: r.snapshots,
            base: r.base,
        }
    }
}

/// Why reading stopped before the end of a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// The file ends inside a record (a torn write).
    #[error("torn record at offset {offset}")]
    Torn {
        /// Where the record starts.
        offset: u64,
    },
    /// The checksum does not match (corruption).
    #[error("checksum mismatch at offset {offset}")]
    Checksum {
        /// Where the record starts.
        offset: u64,
    },
    /// The length field is absurd.
    #[error("record at offset {offset} claims {len} bytes")]
    Length {
        /// Where the record starts.
        offset: u64,
        /// Claimed length.
        len: usize,
    },
    /// The payload does not decode.
    #[error("record at offset {offset} does not decode: {reason}")]
    Decode {
        /// Where the record starts.
        offset: u64,
        /// Why.
        reason: String,
    },
    /// A record to write is larger than [`MAX_RECORD`].
    #[error("a record of {len} bytes is larger than the {max}-byte limit")]
    TooLarge {
        /// Its payload size.
        len: usize,
        /// [`MAX_RECORD`].
        max: usize,
    },
    /// The record could not be serialized.
    #[error("a record does not serialize: {0}")]
    Encode(String),
}

impl RecordError {
    /// Where the bad record starts (`None` for write-side errors).
    pub fn offset(&self) -> Option<u64> {
        match self {
            RecordError::Torn { offset }
            | RecordError::Checksum { offset }
            | RecordError::Length { offset, .. }
            | RecordError::Decode { offset, .. } => Some(*offset),
            RecordError::TooLarge { .. } | RecordError::Encode(_) => None,
        }
    }
}

/// Frame one record; refuses one that could not be read back.
pub fn encode_record(record: &Record) -> Result<Vec<u8>, RecordError> {
    encode_limited(record, MAX_RECORD)
}

fn encode_limited(record: &Record, max: usize) -> Result<Vec<u8>, RecordError> {
    let payload =
        rkyv::to_bytes::<rancor::Error>(record).map_err(|e| RecordError::Encode(e.to_string()))?;
    let too_large = || RecordError::TooLarge {
        len: payload.len(),
        max,
    };
    if payload.len() > max {
        return Err(too_large());
    }
    let len = u32::try_from(payload.len()).map_err(|_| too_large())?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Frame a whole database as records of at most about `chunk` bytes each
/// (one record per item when an item alone is larger): the horizon first,
/// then snapshots, then entries. Replaying them in order gives the same
/// state as one record holding everything, and no record exceeds
/// [`MAX_RECORD`] unless a single snapshot or entry does.
pub fn encode_chunked(
    base: VersionVector,
    snapshots: Vec<Snapshot>,
    entries: Vec<Entry>,
    chunk: usize,
) -> Result<Vec<u8>, RecordError> {
    let mut out = Vec::new();
    let mut record = Record {
        entries: Vec::new(),
        snapshots: Vec::new(),
        base: Some(base),
    };
    let mut size = 0usize;
    let flush = |record: &mut Record, size: &mut usize, out: &mut Vec<u8>| {
        let r = std::mem::replace(
            record,
            Record {
                entries: Vec::new(),
                snapshots: Vec::new(),
                base: None,
            },
        );
        *size = 0;
        encode_record(&r).map(|b| out.extend_from_slice(&b))
    };
    // 64 bytes covers an item's ids, clock and rkyv overhead.
    for s in snapshots {
        let item = s.bytes.len() + s.clock.len() * 24 + 64;
        if size > 0 && size + item > chunk {
            flush(&mut record, &mut size, &mut out)?;
        }
        size += item;
        record.snapshots.push(s);
    }
    for e in entries {
        let item = e.change.len() + 64;
        if size > 0 && size + item > chunk {
            flush(&mut record, &mut size, &mut out)?;
        }
        size += item;
        record.entries.push(e);
    }
    flush(&mut record, &mut size, &mut out)?;
    Ok(out)
}

/// Decode records from the start of `bytes`. Returns the good records, the
/// length of the good prefix, and why reading stopped early (if it did).
pub fn decode_records(bytes: &[u8]) -> (Vec<Record>, u64, Option<RecordError>) {
    let mut records = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let offset = at as u64;
        let Some(header) = bytes.get(at..at + HEADER) else {
            return (records, offset, Some(RecordError::Torn { offset }));
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_RECORD {
            return (records, offset, Some(RecordError::Length { offset, len }));
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            return (records, offset, Some(RecordError::Torn { offset }));
        };
        if crc32c::crc32c(payload) != crc {
            return (records, offset, Some(RecordError::Checksum { offset }));
        }
        let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(len);
        aligned.extend_from_slice(payload);
        match rkyv::from_bytes::<Record, rancor::Error>(&aligned) {
            Ok(r) => records.push(r),
            Err(e) => {
                let reason = e.to_string();
                return (
                    records,
                    offset,
                    Some(RecordError::Decode { offset, reason }),
                );
            }
        }
        at += HEADER + len;
    }
    (records, at as u64, None)
}

/// The offset of the first whole, valid record that starts after the bad
/// record at `bad`, if any. None means everything from `bad` on is a torn
/// tail (a crash mid-append) and may be cut; Some means the damage is in the
/// middle of the log and records after it must be kept.
///
/// Checks the bad record's own end first (a flipped bit leaves the length
/// intact), then every byte offset. Checksumming is bounded by `budget`
/// bytes; when it runs out the answer is conservatively "there is one".
pub fn valid_record_after(bytes: &[u8], bad: u64, budget: usize) -> Option<u64> {
    let bad = usize::try_from(bad).unwrap_or(usize::MAX);
    let mut spent = 0usize;
    let valid_at = |at: usize, spent: &mut usize| -> bool {
        let Some(header) = bytes.get(at..at + HEADER) else {
            return false;
        };
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len == 0 || len > MAX_RECORD {
            return false;
        }
        let Some(payload) = bytes.get(at + HEADER..at + HEADER + len) else {
            return false;
        };
        *spent = spent.saturating_add(len);
        if crc32c::crc32c(payload) != crc {
            return false;
        }
        let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(len);
        aligned.extend_from_slice(payload);
        rkyv::from_bytes::<Record, rancor::Error>(&aligned).is_ok()
    };
    if let Some(header) = bytes.get(bad..bad + HEADER) {
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let next = bad + HEADER + len;
        if len <= MAX_RECORD && next < bytes.len() && valid_at(next, &mut spent) {
            return Some(next as u64);
        }
    }
    for at in bad.saturating_add(1)..bytes.len() {
        if valid_at(at, &mut spent) {
            return Some(at as u64);
        }
        if spent > budget {
            return Some(at as u64);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DocId, Dot, ReplicaId};

    fn entry(counter: u64, size: usize) -> Entry {
        Entry {
            dot: Dot {
                replica: ReplicaId([1; 16]),
                counter,
            },
            doc: DocId::new("d").unwrap(),
            change: vec![counter as u8; size],
        }
    }

    #[test]
    fn a_record_over_the_limit_is_refused_not_truncated() {
        let r = Record {
            entries: vec![entry(1, 5000)],
            snapshots: vec![],
            base: None,
        };
        assert!(matches!(
            encode_limited(&r, 4096),
            Err(RecordError::TooLarge { max: 4096, .. })
        ));
        let bytes = encode_limited(&r, 8192).unwrap();
        assert_eq!(decode_records(&bytes).0, vec![r]);
    }

    #[test]
    fn chunked_records_replay_to_the_same_state() {
        let entries: Vec<Entry> = (1..=50).map(|c| entry(c, 1000)).collect();
        let base: VersionVector = [(ReplicaId([2; 16]), 3)].into_iter().collect();
        let snap = Snapshot {
            doc: DocId::new("s").unwrap(),
            clock: base.clone(),
            bytes: vec![9; 3000],
        };
        let bytes =
            encode_chunked(base.clone(), vec![snap.clone()], entries.clone(), 10_000).unwrap();
        let (records, good, problem) = decode_records(&bytes);
        assert_eq!((good as usize, problem), (bytes.len(), None));
        assert!(records.len() >= 5, "{} records", records.len());
        assert_eq!(records[0].base.as_ref(), Some(&base));
        assert!(records[1..].iter().all(|r| r.base.is_none()));
        let mut stored = crate::StoredDatabase::default();
        for r in records {
            stored.apply(&Batch::from(r));
        }
        assert_eq!(
            (stored.base, stored.snapshots, stored.entries),
            (base, vec![snap], entries)
        );
    }

    #[test]
    fn a_torn_tail_has_no_valid_record_after_it_but_mid_file_damage_does() {
        let mut log = Vec::new();
        let mut starts = Vec::new();
        for c in 1..=3 {
            starts.push(log.len() as u64);
            let r = Record {
                entries: vec![entry(c, 100)],
                snapshots: vec![],
                base: None,
            };
            log.extend(encode_record(&r).unwrap());
        }
        // A flipped bit in the second record: the third must be found.
        let mut flipped = log.clone();
        flipped[starts[1] as usize + 20] ^= 1;
        let (_, good, problem) = decode_records(&flipped);
        assert_eq!(good, starts[1]);
        assert!(matches!(problem, Some(RecordError::Checksum { .. })));
        assert_eq!(valid_record_after(&flipped, good, 1 << 20), Some(starts[2]));
        // A corrupt length in the second record: found by scanning.
        let mut length = log.clone();
        length[starts[1] as usize + 3] = 0x7f;
        let (_, good, _) = decode_records(&length);
        assert_eq!(valid_record_after(&length, good, 1 << 20), Some(starts[2]));
        // A torn last record, or zeros after the end: nothing after.
        let torn = &log[..log.len() - 7];
        let (_, good, _) = decode_records(torn);
        assert_eq!(valid_record_after(torn, good, 1 << 20), None);
        let mut zeros = log.clone();
        zeros.extend([0u8; 4096]);
        let (_, good, _) = decode_records(&zeros);
        assert_eq!(good as usize, log.len());
        assert_eq!(valid_record_after(&zeros, good, 1 << 20), None);
    }
}
