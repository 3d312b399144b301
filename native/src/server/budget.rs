//! A cap on the bytes a WebSocket peer may send before its `Hello` is
//! accepted.
//!
//! The WebSocket layer buffers a whole message before the server sees it,
//! up to the frame limit (16 MiB): without a cap, every connection that
//! never says Hello could make the server hold 16 MiB. Each accepted TCP
//! stream is wrapped in [`Budgeted`]: reads are free until the `/sync`
//! handler arms the budget at the upgrade (the HTTP layer bounds the
//! request itself), then at most [`PRE_HELLO_BYTES`] more may be read
//! until the connection lifts it once the hub accepted the Hello. A peer
//! past the cap gets its connection closed unread.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// Bytes a peer may send after the upgrade and before its Hello is
/// accepted: a Hello frame is at most 8 KiB (`protocol::MAX_HELLO_FRAME`),
/// plus WebSocket framing and control frames.
pub const PRE_HELLO_BYTES: usize = 16 << 10;

/// No cap (the state before the upgrade and after the Hello).
const UNLIMITED: usize = usize::MAX;

/// The shared read budget of one TCP connection.
#[derive(Debug, Clone)]
pub struct ReadBudget(Arc<AtomicUsize>);

impl ReadBudget {
    fn unlimited() -> Self {
        ReadBudget(Arc::new(AtomicUsize::new(UNLIMITED)))
    }

    /// From now on, allow `bytes` more.
    pub fn arm(&self, bytes: usize) {
        self.0.store(bytes, Ordering::Relaxed);
    }

    /// Lift the cap.
    pub fn lift(&self) {
        self.0.store(UNLIMITED, Ordering::Relaxed);
    }

    /// Take `n` bytes from the budget; false if that overdraws it.
    fn take(&self, n: usize) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                if left == UNLIMITED {
                    Some(UNLIMITED)
                } else {
                    left.checked_sub(n)
                }
            })
            .is_ok()
    }

    fn left(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

/// A stream whose reads draw on a [`ReadBudget`].
#[derive(Debug)]
pub struct Budgeted<S> {
    inner: S,
    budget: ReadBudget,
}

impl<S> Budgeted<S> {
    /// `inner`, with no cap until the budget is armed.
    pub fn new(inner: S) -> Self {
        Budgeted {
            inner,
            budget: ReadBudget::unlimited(),
        }
    }

    /// The handle that arms and lifts the cap.
    pub fn budget(&self) -> ReadBudget {
        self.budget.clone()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Budgeted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let left = self.budget.left();
        if left == UNLIMITED {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        if left == 0 {
            return Poll::Ready(Err(over_budget()));
        }
        // Armed (only between the upgrade and the Hello, a few KiB): read
        // at most what the budget allows, through a small copy.
        let mut tmp = [0u8; 2048];
        let room = buf.remaining().min(left).min(tmp.len());
        let mut limited = ReadBuf::new(&mut tmp[..room]);
        let res = Pin::new(&mut self.inner).poll_read(cx, &mut limited);
        if let Poll::Ready(Ok(())) = res {
            let n = limited.filled().len();
            if !self.budget.take(n) {
                return Poll::Ready(Err(over_budget()));
            }
            buf.put_slice(limited.filled());
        }
        res
    }
}

fn over_budget() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        "peer sent too much before its Hello",
    )
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Budgeted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A TCP listener whose streams are [`Budgeted`] (and set `TCP_NODELAY`).
#[derive(Debug)]
pub struct BudgetedListener(pub TcpListener);

impl Listener for BudgetedListener {
    type Io = Budgeted<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (tcp, addr) = Listener::accept(&mut self.0).await;
        // Live deltas are small frames: without TCP_NODELAY, Nagle's
        // algorithm meeting the peer's delayed ACK holds some of them back
        // ~40 ms (seen as the p99 of the fan-out benchmark, BENCHMARKS.md).
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY not set: {e}");
        }
        (Budgeted::new(tcp), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

/// What a handler learns of its connection: the peer's address and the
/// connection's read budget.
#[derive(Debug, Clone)]
pub struct PeerConn {
    /// The peer's address.
    pub addr: SocketAddr,
    /// The connection's read budget.
    pub budget: ReadBudget,
}

impl Connected<IncomingStream<'_, BudgetedListener>> for PeerConn {
    fn connect_info(stream: IncomingStream<'_, BudgetedListener>) -> Self {
        PeerConn {
            addr: *stream.remote_addr(),
            budget: stream.io().budget(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_stop_at_the_budget_until_it_is_lifted() {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let mut server = Budgeted::new(server);
        let budget = server.budget();
        client.write_all(&[7; 100]).await.unwrap();
        let mut buf = vec![0; 1000];
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            100,
            "free before armed"
        );
        budget.arm(10);
        client.write_all(&[8; 100]).await.unwrap();
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            10,
            "never past the budget"
        );
        assert!(buf[..10].iter().all(|b| *b == 8));
        let err = server.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        budget.lift();
        assert_eq!(
            server.read(&mut buf).await.unwrap(),
            90,
            "the rest, once lifted"
        );
    }
}
