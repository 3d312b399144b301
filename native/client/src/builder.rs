//! [`ClientBuilder`]: every setting of a [`SyncClient`] in one place.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::client::{Backoff, ClientError, Settings, SyncClient, TokenSource, check_url, tls_for};

/// Where the replica lives.
#[derive(Debug, Clone)]
enum Replica {
    Unset,
    Dir(PathBuf),
    Memory,
}

/// How to build a [`SyncClient`] ([`SyncClient::builder`]). Nothing is
/// required but where the replica lives: [`ClientBuilder::dir`] (durable,
/// what an offline-first app wants) or [`ClientBuilder::in_memory`].
/// Without a URL the client is local only.
#[derive(Clone)]
pub struct ClientBuilder {
    urls: Vec<String>,
    token: TokenSource,
    replica: Replica,
    ca_file: Option<PathBuf>,
    backoff: Backoff,
}

impl Default for ClientBuilder {
    fn default() -> Self {
        ClientBuilder {
            urls: Vec::new(),
            token: TokenSource::Fixed(String::new()),
            replica: Replica::Unset,
            ca_file: None,
            backoff: Backoff::default(),
        }
    }
}

// Not derived: the token is a secret.
impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("urls", &self.urls)
            .field("replica", &self.replica)
            .field("ca_file", &self.ca_file)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A server's sync URL (`ws://host:port/sync` or `wss://…`); call again
    /// for more. With several, the client dials them in turn: a failed dial
    /// or a dropped connection moves on to the next, and any of them
    /// resumes where the last left off.
    pub fn url(mut self, url: impl Into<String>) -> Self {
        self.urls.push(url.into());
        self
    }

    /// Several servers at once (see [`ClientBuilder::url`]).
    pub fn urls<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.urls.extend(urls.into_iter().map(Into::into));
        self
    }

    /// The access token every connection presents (none: anonymous).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = TokenSource::Fixed(token.into());
        self
    }

    /// A function asked for the token before every connection, for tokens
    /// that expire: return the current one (refresh it elsewhere, e.g. on a
    /// timer or when the client reports `Unauthorized`). It runs on the
    /// client's task: return at once, never block.
    pub fn token_provider(mut self, provider: impl Fn() -> String + Send + Sync + 'static) -> Self {
        self.token = TokenSource::Provider(Arc::new(provider));
        self
    }

    /// Keep the replica in the data directory `dir` (created if missing):
    /// writes are durable there when they return, and survive restarts.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.replica = Replica::Dir(dir.into());
        self
    }

    /// Keep the replica in memory only (tests, tools): a fresh replica id,
    /// nothing kept when the client stops.
    pub fn in_memory(mut self) -> Self {
        self.replica = Replica::Memory;
        self
    }

    /// Trust the PEM certificates of a private CA for `wss://`, besides the
    /// system's roots and Mozilla's.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca_file = Some(path.into());
        self
    }

    /// Wait `min` before redialling after a failure, doubling per failed
    /// attempt up to `max` (with jitter: 50–100 % of that). Defaults: 100 ms
    /// and 10 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff { min, max };
        self
    }

    /// Start the client. Fails for a URL that is not a WebSocket URL, a CA
    /// file that does not load, a data directory that cannot be opened, or
    /// no choice of where the replica lives. Connecting happens in the
    /// background: the client works offline meanwhile. Must be called
    /// inside a tokio runtime.
    pub async fn build(self) -> Result<SyncClient, ClientError> {
        for url in &self.urls {
            check_url(url)?;
        }
        if self.backoff.min.is_zero() || self.backoff.min > self.backoff.max {
            return Err(ClientError::InvalidConfig(format!(
                "backoff: min ({:?}) must be above zero and at most max ({:?})",
                self.backoff.min, self.backoff.max
            )));
        }
        let tls = tls_for(&self.urls, self.ca_file.as_deref())?;
        let settings = Settings {
            urls: self.urls,
            token: self.token,
            backoff: self.backoff,
            tls,
        };
        match self.replica {
            Replica::Dir(dir) => SyncClient::on_dir(settings, &dir).await,
            Replica::Memory => Ok(SyncClient::on_memory(settings)),
            Replica::Unset => Err(ClientError::InvalidConfig(
                "say where the replica lives: .dir(PATH) to keep it (offline-first), \
                 or .in_memory()"
                    .into(),
            )),
        }
    }
}
