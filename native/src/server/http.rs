//! The HTTP/1 accept loop: hyper with a header timeout, per-address caps on
//! TCP connections and WebSocket handshakes, and graceful shutdown.
//!
//! `axum::serve` sets no timer, so hyper cannot time out a request's
//! headers: a peer sending one header byte every few seconds holds a socket
//! (and a task) forever, and a few thousand such peers exhaust the file
//! descriptors. Here every connection must deliver its request headers
//! within [`HEADER_TIMEOUT`], and one address holds at most
//! `2 × --max-connections-per-ip` connections still speaking HTTP (its
//! WebSocket connections have their own cap and handshake rate, checked
//! by the `/sync` handler).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tower_service::Service;

use super::budget::{BudgetedListener, PeerConn};

/// How long a connection may take to send a request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Addresses tracked before idle ones are forgotten.
const MAX_TRACKED: usize = 1 << 16;

/// How long shutdown waits for HTTP requests in progress.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serve `app` on `listener` until `shutdown` resolves (after which the
/// caller's shutdown work, inside `shutdown`, has run), then let requests
/// in progress finish.
pub async fn serve(
    mut listener: BudgetedListener,
    app: Router,
    tcp_per_ip: Arc<PerIp>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    // Shutdown: `signal` asks each connection to finish its request and
    // close; every task holds a `close` receiver until it has.
    let (signal_tx, signal_rx) = tokio::sync::watch::channel(());
    let (close_tx, close_rx) = tokio::sync::watch::channel(());
    tokio::pin!(shutdown);
    loop {
        let (io, addr) = tokio::select! {
            accepted = axum::serve::Listener::accept(&mut listener) => accepted,
            () = &mut shutdown => break,
        };
        // Over the cap: closed at once, before any byte is read.
        let Some(slot) = tcp_per_ip.acquire(addr.ip().to_canonical()) else {
            tracing::debug!(%addr, "too many TCP connections from this address");
            continue;
        };
        let peer = PeerConn {
            addr,
            budget: io.budget(),
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
            let mut app = app.clone();
            async move { app.call(req).await }
        });
        let (signal, close) = (signal_rx.clone(), close_rx.clone());
        let (http, tls) = (http.clone(), tls.clone());
        tokio::spawn(async move {
            match tls {
                None => serve_one(&http, io, service, signal, addr).await,
                // The handshake shares the header deadline: a peer that
                // trickles its ClientHello holds nothing for longer.
                Some(tls) => match tokio::time::timeout(HEADER_TIMEOUT, tls.accept(io)).await {
                    Ok(Ok(io)) => serve_one(&http, io, service, signal, addr).await,
                    Ok(Err(e)) => tracing::debug!(%addr, "TLS handshake: {e}"),
                    Err(_) => tracing::debug!(%addr, "TLS handshake timed out"),
                },
            }
            drop((close, slot));
        });
    }
    drop(close_rx);
    let _ = signal_tx.send(());
    let _ = tokio::time::timeout(DRAIN_TIMEOUT, close_tx.closed()).await;
}

/// Serve HTTP/1 (and its WebSocket upgrade) on one accepted connection
/// until it ends or shutdown asks it to finish.
async fn serve_one<IO, S>(
    http: &hyper::server::conn::http1::Builder,
    io: IO,
    service: S,
    mut signal: tokio::sync::watch::Receiver<()>,
    addr: std::net::SocketAddr,
) where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send + 'static,
    S::Future: Send,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = http
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = signal.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%addr, "connection: {e}");
    }
}

/// Connections open per IP address, so one address cannot take every slot;
/// and, when given a rate, how fast it may open them.
pub struct PerIp {
    limit: usize,
    /// Tokens per second and the bucket's size, for handshakes.
    rate: Option<(f64, f64)>,
    open: Mutex<HashMap<IpAddr, Open>>,
}

struct Open {
    count: usize,
    tokens: f64,
    at: Instant,
}

impl PerIp {
    /// At most `limit` connections per address at once.
    pub fn new(limit: usize) -> Arc<Self> {
        Arc::new(PerIp {
            limit,
            rate: None,
            open: Mutex::new(HashMap::new()),
        })
    }

    /// Also at most `per_sec` new connections per second per address,
    /// with bursts of `burst`.
    pub fn with_rate(limit: usize, per_sec: f64, burst: f64) -> Arc<Self> {
        Arc::new(PerIp {
            limit,
            rate: Some((per_sec, burst.max(1.0))),
            open: Mutex::new(HashMap::new()),
        })
    }

    /// A slot for one more connection from `ip`, if it is under its limit
    /// (and its rate).
    pub fn acquire(self: &Arc<Self>, ip: IpAddr) -> Option<IpSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        // Addresses with nothing open are kept only for their rate; when
        // a flood of addresses passes, forget those (bounded memory).
        if open.len() > MAX_TRACKED {
            open.retain(|_, o| o.count > 0);
        }
        let now = Instant::now();
        let burst = self.rate.map_or(0.0, |(_, b)| b);
        let o = open.entry(ip).or_insert(Open {
            count: 0,
            tokens: burst,
            at: now,
        });
        if o.count >= self.limit {
            return None;
        }
        if let Some((per_sec, burst)) = self.rate {
            let refill = now.duration_since(o.at).as_secs_f64() * per_sec;
            o.tokens = (o.tokens + refill).min(burst);
            o.at = now;
            if o.tokens < 1.0 {
                return None;
            }
            o.tokens -= 1.0;
        }
        o.count += 1;
        Some(IpSlot {
            per_ip: self.clone(),
            ip,
        })
    }
}

/// One connection's share of its address's limit, given back on drop.
pub struct IpSlot {
    per_ip: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut open = self.per_ip.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = open.get_mut(&self.ip) {
            o.count -= 1;
            // Forget an idle address once its bucket is full again (or
            // there is no rate): nothing of it is worth keeping.
            let full = match self.per_ip.rate {
                Some((per_sec, burst)) => {
                    o.tokens + o.at.elapsed().as_secs_f64() * per_sec >= burst
                }
                None => true,
            };
            if o.count == 0 && full {
                open.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_its_limit_and_its_rate() {
        let ip: IpAddr = [10, 0, 0, 1].into();
        let other: IpAddr = [10, 0, 0, 2].into();
        let caps = PerIp::new(2);
        let a = caps.acquire(ip).expect("first");
        let _b = caps.acquire(ip).expect("second");
        assert!(caps.acquire(ip).is_none(), "third over the limit");
        assert!(caps.acquire(other).is_some(), "another address");
        drop(a);
        assert!(caps.acquire(ip).is_some(), "a slot given back");

        // A rate of (almost) nothing per second with bursts of 3.
        let rated = PerIp::with_rate(100, 1e-9, 3.0);
        let slots: Vec<_> = (0..3).map(|_| rated.acquire(ip).expect("burst")).collect();
        drop(slots);
        assert!(rated.acquire(ip).is_none(), "the burst is spent");
    }
}
