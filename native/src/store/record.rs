//! Log records: `[len u32 LE][crc32c u32 LE][payload]`, payload an rkyv archive.

use rkyv::rancor;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Serialize};
use syncline_core::{Batch, Entry, Snapshot, VersionVector};

/// Largest record accepted when reading (a sanity bound against a corrupt length).
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
}

/// Frame one record.
pub fn encode_record(record: &Record) -> Vec<u8> {
    let payload = rkyv::to_bytes::<rancor::Error>(record)
        .map(|b| b.into_vec())
        .unwrap_or_default();
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
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
