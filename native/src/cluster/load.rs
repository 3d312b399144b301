//! Loading a database on a node: replay its subject from the stream.

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures_util::StreamExt;
use syncline_core::{DbName, StoredDatabase, VersionVector};

use super::{Engine, stream_name, tail::decode};

/// A database read from its stream.
#[derive(Debug)]
pub struct LoadedDb {
    /// What it holds, in stream order, each dot once.
    pub stored: StoredDatabase,
    /// The stream sequence up to which it is complete: the tail's messages
    /// at or below it are already in `stored`.
    pub covered: u64,
}

/// Read every message of `db`'s subject, up to the stream's end as of
/// now (or later).
pub async fn load(engine: &Engine, db: &DbName) -> Result<LoadedDb, String> {
    let k = engine.shard_of(db);
    let mut stream = engine
        .js()
        .get_stream(stream_name(k))
        .await
        .map_err(|e| e.to_string())?;
    // Everything of this subject at or below `end` is read below.
    let end = stream
        .info()
        .await
        .map_err(|e| e.to_string())?
        .state
        .last_sequence;
    let mut consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: engine.subject(db),
            deliver_policy: DeliverPolicy::All,
            ..pull::OrderedConfig::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut stored = StoredDatabase::default();
    let mut vv = VersionVector::new();
    let mut covered = end;
    let pending = consumer
        .info()
        .await
        .map_err(|e| e.to_string())?
        .num_pending;
    if pending == 0 {
        return Ok(LoadedDb { stored, covered });
    }
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let info = m.info().map_err(|e| e.to_string())?;
        let (seq, left) = (info.stream_sequence, info.pending);
        covered = covered.max(seq);
        if let Some(msg) = decode(k, seq, &m.message) {
            // Idempotent by dot, in stream order, as `Server::ingest` does:
            // a resend through another node, or a retried publish, is
            // skipped; so is a gap (which the order never makes).
            for e in msg.batch.entries {
                let have = vv.get(&e.dot.replica);
                if e.dot.counter == have + 1 {
                    vv.set(e.dot.replica, e.dot.counter);
                    stored.entries.push(e);
                } else if e.dot.counter > have + 1 {
                    tracing::error!(%db, seq, "stream entry {:?} leaves a gap; skipped", e.dot);
                }
            }
        }
        if left == 0 {
            break;
        }
    }
    Ok(LoadedDb { stored, covered })
}
