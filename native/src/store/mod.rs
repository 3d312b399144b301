//! The embedded on-disk store: the append-only logs of
//! `syncline_client::store` (the native client keeps its replica in the
//! same format), re-exported, and the server's audit trail [`subjects`]
//! (`DATA/subjects.jsonl`).

pub mod subjects;

pub use syncline_client::store::*;
