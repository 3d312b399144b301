//! The typed side of [`SyncClient`]: documents and presence through serde,
//! and events as a [`Stream`] that never reports a lag (the untyped calls,
//! on `serde_json::Value` and a broadcast receiver, stay as they are).

use std::collections::VecDeque;

use futures_util::Stream;
use serde::Serialize;
use serde::de::DeserializeOwned;
use syncline_core::sync::ClientEvent;
use syncline_core::{DbName, DocId, ReplicaId};
use tokio::sync::broadcast::error::RecvError;

use crate::client::{ClientError, SyncClient};

/// A peer on a database, with its presence state as `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer<T> {
    /// The peer's connection id.
    pub peer: u64,
    /// Its replica.
    pub replica: ReplicaId,
    /// Its state (`None` if it published none, or one that is not a `T`).
    pub state: Option<T>,
}

impl SyncClient {
    /// A document as a `T` (`None` if absent or deleted; an error naming
    /// the mismatch if the document is not a `T`). Reads as
    /// [`SyncClient::get`] does.
    pub fn get_as<T: DeserializeOwned>(
        &self,
        db: &DbName,
        doc: &DocId,
    ) -> Result<Option<T>, ClientError> {
        match self.get(db, doc)? {
            None => Ok(None),
            Some(v) => serde_json::from_value(v)
                .map(Some)
                .map_err(|e| ClientError::Json(format!("{db}/{doc}: {e}"))),
        }
    }

    /// Make a document equal `value` (serialized to JSON: it must be an
    /// object), as [`SyncClient::put`] does.
    pub async fn put_as<T: Serialize>(
        &self,
        db: &DbName,
        doc: &DocId,
        value: &T,
    ) -> Result<bool, ClientError> {
        let value =
            serde_json::to_value(value).map_err(|e| ClientError::Json(format!("{doc}: {e}")))?;
        self.put(db, doc, value).await
    }

    /// Publish this connection's presence as `state`, serialized to JSON.
    pub async fn set_presence_as<T: Serialize>(
        &self,
        db: &DbName,
        state: &T,
    ) -> Result<(), ClientError> {
        let bytes = serde_json::to_vec(state).map_err(|e| ClientError::Json(e.to_string()))?;
        self.set_presence(db, bytes).await
    }

    /// Who is on a database, each peer's state read as a `T` (published by
    /// [`SyncClient::set_presence_as`], or by the JS package as JSON).
    pub async fn presence_as<T: DeserializeOwned>(&self, db: &DbName) -> Vec<Peer<T>> {
        self.presence(db)
            .await
            .peers
            .into_iter()
            .map(|p| Peer {
                peer: p.peer,
                replica: p.replica,
                state: p.state.and_then(|s| serde_json::from_slice(&s).ok()),
            })
            .collect()
    }

    /// Every event from now on, as a stream. Unlike [`SyncClient::events`],
    /// it never lags: if the app falls more than 1,024 events behind, the
    /// events it missed are replaced by one `Changed` per open database
    /// naming every document (so a view re-reads everything) and the
    /// current `Status`. Ends when the client is closed.
    pub fn event_stream(&self) -> impl Stream<Item = ClientEvent> + Send + 'static {
        let state = (self.events(), self.clone(), VecDeque::new());
        futures_util::stream::unfold(state, |(mut rx, client, mut queued)| async move {
            loop {
                if let Some(e) = queued.pop_front() {
                    return Some((e, (rx, client, queued)));
                }
                match rx.recv().await {
                    Ok(e) => return Some((e, (rx, client, queued))),
                    Err(RecvError::Closed) => return None,
                    Err(RecvError::Lagged(_)) => {
                        queued.extend(client.everything_changed());
                        queued.push_back(ClientEvent::Status(client.status().await));
                    }
                }
            }
        })
    }
}
