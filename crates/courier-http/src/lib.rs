//! Serving HTTP with bounds, for the scheduler's API and every `/metrics`
//! endpoint: a client that is slow to send its request head, or that holds an
//! idle keep-alive connection, is cut off after [`Bounds::header_read`]; at
//! most [`Bounds::max_connections`] connections are served at once (further
//! ones wait in the kernel's backlog), and at most [`Bounds::max_per_peer`]
//! from one address (more are closed at once), so one client cannot take
//! every slot; shutdown stops accepting and gives open connections a short
//! grace.
//!
//! `axum::serve` has no hook for either bound, so this is its accept loop with
//! hyper's HTTP/1 connection builder.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Limits on what clients may hold.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Time to send a request head, and the longest a keep-alive connection
    /// may sit idle between requests.
    pub header_read: Duration,
    /// Connections served at once.
    pub max_connections: usize,
    /// Connections served at once from one IP address.
    pub max_per_peer: usize,
    /// How long open connections get to finish after shutdown.
    pub shutdown_grace: Duration,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            max_connections: 512,
            max_per_peer: 64,
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

/// Serve `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(listener: TcpListener, router: axum::Router, bounds: Bounds, shutdown: CancellationToken) {
    let permits = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let open = tokio_util::task::TaskTracker::new();
    let peers: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    let stopping = CancellationToken::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            () = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => (stream, peer.ip()),
                Err(e) => {
                    // Out of file descriptors and the like: back off, go on.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let Some(share) = PeerShare::take(&peers, peer, bounds.max_per_peer) else {
            // Over its share: closed at once, the slot freed for others.
            continue;
        };
        let service = TowerToHyperService::new(router.clone());
        let stopping = stopping.clone();
        open.spawn(async move {
            let _share = share;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(bounds.header_read)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = stopping.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    stopping.cancel();
    open.close();
    if tokio::time::timeout(bounds.shutdown_grace, open.wait()).await.is_err() {
        tracing::warn!(
            open = open.len(),
            "HTTP connections still open after the grace period; closing them"
        );
    }
}

/// One connection counted against its peer's share; released on drop.
struct PeerShare {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    peer: IpAddr,
}

impl PeerShare {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, peer: IpAddr, max: usize) -> Option<Self> {
        let mut counts = peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(peer).or_insert(0);
        if *count >= max.max(1) {
            return None;
        }
        *count += 1;
        Some(Self {
            peers: peers.clone(),
            peer,
        })
    }
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut counts = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.peer) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.peer);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::time::Instant;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn start(bounds: Bounds) -> (std::net::SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/", axum::routing::get(|| async { "ok" }));
        let shutdown = CancellationToken::new();
        tokio::spawn(serve(listener, router, bounds, shutdown.clone()));
        (addr, shutdown)
    }

    /// Read until the server closes the connection; how long that took.
    async fn closed_after(stream: &mut tokio::net::TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 1024];
        while stream.read(&mut buf).await.unwrap_or(0) > 0 {}
        started.elapsed()
    }

    #[tokio::test]
    async fn a_silent_or_idle_client_is_cut_off() {
        let bounds = Bounds {
            header_read: Duration::from_millis(300),
            ..Bounds::default()
        };
        let (addr, _shutdown) = start(bounds).await;
        // Connects and says nothing.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_after(&mut silent).await < Duration::from_secs(2));
        // Sends half a request head.
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        assert!(closed_after(&mut slow).await < Duration::from_secs(2));
        // One request on a keep-alive connection, then idle.
        let mut idle = tokio::net::TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut buf = [0u8; 256];
        let n = idle.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200 OK"));
        assert!(closed_after(&mut idle).await < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn one_peer_cannot_take_more_than_its_share() {
        let bounds = Bounds {
            max_per_peer: 3,
            ..Bounds::default()
        };
        let (addr, _shutdown) = start(bounds).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The fourth from the same address is closed at once.
        let mut fourth = tokio::net::TcpStream::connect(addr).await.unwrap();
        assert!(closed_after(&mut fourth).await < Duration::from_millis(500));
        // Once one is gone, there is room again.
        drop(held.pop());
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut next = tokio::net::TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        next.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_wait_for_a_free_one() {
        let bounds = Bounds {
            header_read: Duration::from_millis(500),
            max_connections: 2,
            ..Bounds::default()
        };
        let (addr, _shutdown) = start(bounds).await;
        let _a = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _b = tokio::net::TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // The third is not served until one of the two is cut off (500 ms).
        let started = Instant::now();
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "{:?}",
            started.elapsed()
        );
    }
}
