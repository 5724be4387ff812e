//! Accepting connections and shutting down. crier runs its own accept loop on hyper's
//! HTTP/1 connection driver (rather than `axum::serve`) for three reasons: the stream type
//! is known, so a WebSocket upgrade can take the raw `TcpStream` back and run its
//! buffer-free loop; every socket gets a write deadline; and shutdown is explicit: stop
//! accepting, tell every connection to drain, wait at most `drain_timeout`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::close::DisconnectReason;
use crate::config::Config;
use crate::hub::Hub;
use crate::leaderboard::service::Boards;
use crate::metrics::Metrics;
use crate::net::DeadlineStream;
use crate::state::AppState;

/// A running server. Dropping it without `shutdown` cancels it too.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds, opens the data store and starts serving in the background.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        let listener = bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(
            Hub::new(
                cfg.max_topics,
                cfg.max_topics_per_connection,
                metrics.clone(),
            )
            .with_max_subscriber_topics(cfg.max_subscriber_topics),
        );
        let shutdown = CancellationToken::new();
        let boards = Boards::open(&cfg, hub.clone(), metrics.clone(), shutdown.clone()).await?;
        let state = Arc::new(AppState::new(cfg, metrics, hub, boards, shutdown));
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        tracing::info!("listening on http://{addr}");
        Ok(Server {
            addr,
            state,
            accept: Some(accept),
        })
    }

    /// Graceful shutdown: stop accepting, close every client with 1001 after flushing its
    /// queue, end SSE streams, wait up to `drain_timeout`, then flush the store.
    pub async fn shutdown(mut self) {
        let state = self.state.clone();
        state.shutdown.cancel();
        if let Some(accept) = self.accept.take() {
            let _ = accept.await;
        }
        state.hub.close_all(DisconnectReason::Shutdown);
        state.tracker.close();
        if tokio::time::timeout(state.cfg.drain_timeout, state.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = state.tracker.len(),
                "drain timeout: closing remaining connections"
            );
        }
        state.boards.close().await;
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.state.shutdown.cancel();
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // A deep backlog: thousands of clients reconnecting at once must not see refusals.
    socket.listen(4096)
}

async fn accept_loop(listener: TcpListener, state: Arc<AppState>) {
    let router = app::router(state.clone());
    loop {
        let (tcp, _peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = tcp.set_nodelay(true);
        let io = TokioIo::new(DeadlineStream::new(tcp, state.cfg.write_timeout));
        let service = TowerToHyperService::new(router.clone());
        let shutdown = state.shutdown.clone();
        state.tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(io, service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("http connection ended: {e}");
                    }
                }
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
