//! Presence across the cluster: plain NATS subjects `sl.p.<database>`,
//! never stored. Each node publishes its own peers' presence changes and
//! online count, and every few seconds the full list (so a node that
//! joins, or missed an update, catches up, and a node that died is
//! forgotten once it has been silent for [`PRESENCE_EXPIRE`]).

use std::time::Duration;

use futures_util::StreamExt;
use syncline_core::protocol::{self, Message, PresenceUpdate};
use tokio::sync::mpsc;

use super::{Engine, db_of_token, subject_token};
use crate::server::HubMsg;

/// How often a node sends its full presence.
pub const PRESENCE_EVERY: Duration = Duration::from_secs(5);

/// How long a node may be silent before its peers are taken as gone.
pub const PRESENCE_EXPIRE: Duration = Duration::from_secs(16);

/// The header naming the node that sent a presence update.
const NODE_HEADER: &str = "Syncline-Node";

/// Start presence: returns the sender the hub queues its updates on
/// (published in order by one task; a full queue drops an update, which
/// the next full one repairs), and forwards other nodes' updates to the hub.
pub async fn spawn_presence(
    engine: &Engine,
    hub: mpsc::Sender<HubMsg>,
) -> Result<mpsc::Sender<PresenceUpdate>, super::ClusterError> {
    let mut sub = engine
        .client()
        .subscribe("sl.p.>")
        .await
        .map_err(super::engine)?;
    let me = engine.node().to_owned();
    let max = engine.max_message_bytes();
    tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            let node = m
                .headers
                .as_ref()
                .and_then(|h| h.get(NODE_HEADER))
                .map(|v| v.as_str().to_owned());
            let Some(node) = node.filter(|n| *n != me) else {
                continue;
            };
            let token = m.subject.as_str().rsplit('.').next().unwrap_or("");
            let update = match protocol::decode(&m.payload, max) {
                Ok(Message::PresenceUpdate(u)) if db_of_token(token).as_ref() == Some(&u.db) => u,
                _ => {
                    tracing::warn!(node, "a presence message that does not decode; skipped");
                    continue;
                }
            };
            if hub
                .send(HubMsg::RemotePresence { node, update })
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let (tx, mut rx) = mpsc::channel::<PresenceUpdate>(1024);
    let client = engine.client().clone();
    let me = engine.node().to_owned();
    tokio::spawn(async move {
        while let Some(update) = rx.recv().await {
            let subject = format!("sl.p.{}", subject_token(&update.db));
            let payload = protocol::encode(&Message::PresenceUpdate(Box::new(update)));
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(NODE_HEADER, me.as_str());
            if let Err(e) = client
                .publish_with_headers(subject, headers, payload.into())
                .await
            {
                tracing::debug!("publishing presence: {e}");
            }
        }
    });
    Ok(tx)
}
