//! The embedded on-disk store: one append-only log file per database.
//!
//! ```text
//! DATA/
//!   dbs/<stem>.log      records: [len u32 LE][crc32c u32 LE][rkyv Record]
//!   meta/<key>          small values, replaced atomically
//! ```
//!
//! * **Group commit.** One writer thread takes every pending write, appends
//!   them, fsyncs each touched file once and only then answers all of them:
//!   concurrent pushes share one fsync. A write's future resolves after fsync.
//! * **Recovery.** Before the writer first appends to a file it scans it and
//!   truncates a torn tail (short record, bad checksum, record that does not
//!   decode, with no valid record after it) back to the last good record.
//!   A bad record followed by valid ones is damage in the middle: the
//!   database is refused ([`StoreError::Corrupt`]) and the file left as it
//!   is, since cutting there would drop acknowledged records. Readers never
//!   modify the file.
//! * **Size.** A record is at most [`MAX_RECORD`] bytes; a larger batch is
//!   refused when written ([`RecordError::TooLarge`]), so every record
//!   written can be read back.
//! * **Compaction** is a record too (new snapshots and a raised horizon);
//!   [`FileStore::rewrite`] folds a log into a fresh file of records of at
//!   most 32 MiB beside the old one and switches atomically (write, fsync,
//!   rename, fsync dir).
//! * Database names are validated (`[A-Za-z0-9._-]`, never `.`/`..`), so a
//!   name can never leave the data directory. A name's file stem is the name
//!   when it has no upper-case letter and is no Windows device name;
//!   otherwise it is escaped with `+` (`ORG-1` → `org-1+7.log`, `nul` →
//!   `+nul.log`; see [`file_stem`]), so distinct names never share a file,
//!   even where the file system ignores case. Files are plain: copying a
//!   closed data dir is a backup.

#[cfg(test)]
mod crash_tests;
mod file;
mod fs;
mod names;
#[cfg(test)]
mod sim_fs;

pub use file::{DEFAULT_MAX_OPEN_FILES, FileStore, StoreError, StoreStats};
pub use names::{db_from_stem, file_stem, upgrade_legacy_names};
pub use syncline_core::record::{
    MAX_RECORD, Record, RecordError, decode_records, encode_chunked, encode_record,
    valid_record_after,
};
