//! Every node reads every shard stream in order from the point it started
//! (what came before is read by loads): other nodes' messages become live
//! changes here, this node's own confirm its writes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures_util::StreamExt;
use syncline_core::store::decode_batch;
use tokio::sync::mpsc;

use super::{Engine, StreamMsg, db_of_token, stream_name};
use crate::server::{HubMsg, Metrics};

/// Start one reader per shard, each from the stream's current end.
pub async fn spawn_tails(
    engine: &Engine,
    hub: mpsc::Sender<HubMsg>,
    metrics: Arc<Metrics>,
) -> Result<(), super::ClusterError> {
    for k in 0..engine.shards() {
        let mut stream = engine
            .js()
            .get_stream(stream_name(k))
            .await
            .map_err(super::engine)?;
        let last = stream
            .info()
            .await
            .map_err(super::engine)?
            .state
            .last_sequence;
        let (engine, hub, metrics) = (engine.clone(), hub.clone(), metrics.clone());
        tokio::spawn(async move { tail(engine, k, last + 1, hub, metrics).await });
    }
    Ok(())
}

async fn tail(
    engine: Engine,
    k: u32,
    mut next: u64,
    hub: mpsc::Sender<HubMsg>,
    metrics: Arc<Metrics>,
) {
    loop {
        match read_from(&engine, k, &mut next, &hub, &metrics).await {
            // The hub is gone: the server is shutting down.
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(shard = k, next, "reading the stream: {e}; resuming");
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Read shard `k` from `next` until the hub goes away (`Ok`) or the
/// consumer fails (`Err`; `next` says where to resume).
async fn read_from(
    engine: &Engine,
    k: u32,
    next: &mut u64,
    hub: &mpsc::Sender<HubMsg>,
    metrics: &Metrics,
) -> Result<(), String> {
    let stream = engine
        .js()
        .get_stream(stream_name(k))
        .await
        .map_err(|e| e.to_string())?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: *next,
            },
            ..pull::OrderedConfig::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    let mut messages = consumer.messages().await.map_err(|e| e.to_string())?;
    while let Some(m) = messages.next().await {
        let m = m.map_err(|e| e.to_string())?;
        let Ok(info) = m.info() else {
            continue;
        };
        let (seq, pending) = (info.stream_sequence, info.pending);
        *next = seq + 1;
        metrics.engine_tail_lag.set(pending as i64);
        let Some(msg) = decode(k, seq, &m.message) else {
            metrics.engine_bad_messages.inc();
            continue;
        };
        if hub.send(HubMsg::Stream(Box::new(msg))).await.is_err() {
            return Ok(());
        }
    }
    Err("the consumer ended".into())
}

/// A stream message as the hub takes it; `None` (logged) for one this
/// version cannot read: it is skipped on every node alike.
pub(super) fn decode(k: u32, seq: u64, m: &async_nats::Message) -> Option<StreamMsg> {
    let token = m.subject.as_str().rsplit('.').next().unwrap_or("");
    let Some(db) = db_of_token(token) else {
        tracing::error!(
            shard = k,
            seq,
            "stream message on a subject that names no database"
        );
        return None;
    };
    let batch = match decode_batch(&m.payload) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(shard = k, seq, %db, "stream message does not decode: {e}");
            return None;
        }
    };
    let msg_id = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|v| v.as_str().to_string());
    Some(StreamMsg {
        shard: k,
        seq,
        msg_id,
        db,
        batch,
    })
}
