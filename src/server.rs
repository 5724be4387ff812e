//! Accepting connections and shutting down. crier runs its own accept loop on hyper's
//! HTTP/1 connection driver (rather than `axum::serve`) for three reasons: the stream type
//! is known, so a WebSocket upgrade can take the raw `TcpStream` back and run its
//! buffer-free loop; every socket gets a write deadline; and shutdown is explicit: stop
//! accepting, tell every connection to drain, wait at most `drain_timeout`.
//!
//! Every accepted socket first takes its share from `conn_limits` (total, per address,
//! connect rate); a refused one gets a fixed JSON answer and is closed right there, before
//! any task, buffer or parser is spent on it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::app;
use crate::broker::cluster_counts::ClusterCounts;
use crate::broker::memory::MemoryBroker;
use crate::broker::redis::RedisBroker;
use crate::broker::routed::RoutedBroker;
use crate::close::DisconnectReason;
use crate::config::Config;
use crate::conn_limits::{Refusal, CONN_SLOT};
use crate::hub::Hub;
use crate::leaderboard::policy::BoardPolicies;
use crate::leaderboard::service::Boards;
use crate::metrics::Metrics;
use crate::net::{DeadlineStream, Takeover, TimedBody, TAKEOVER};
use crate::state::AppState;

/// Under `--redis`: the Redis broker for topics, a node-local memory broker for the board
/// snapshots each node computes from its own mirror (see `broker::routed`), cluster-wide
/// counts, and the boards shared through Redis.
async fn start_shared(
    cfg: &Config,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    webhooks: Option<Arc<crate::webhook::Webhooks>>,
) -> anyhow::Result<(
    Arc<dyn crate::broker::Broker>,
    Arc<Boards>,
    Arc<crate::broker::redis::RedisHealth>,
    Arc<ClusterCounts>,
)> {
    let redis = RedisBroker::connect(cfg, &cfg.redis, hub.clone(), metrics.clone()).await?;
    let (client, conn, health) = (redis.client(), redis.connection(), redis.health());
    let node = redis.node_id().to_string();
    if let Some(w) = webhooks {
        // Occupied and vacated once per cluster (webhook/cluster.rs).
        w.share(conn.clone(), node.clone(), shutdown.clone());
    }
    let local = Arc::new(MemoryBroker::new(cfg, hub.clone(), metrics.clone()));
    let broker: Arc<dyn crate::broker::Broker> = Arc::new(RoutedBroker::new(local, redis));
    let counts = ClusterCounts::spawn(conn.clone(), node, hub.clone(), shutdown.clone());
    let boards = Boards::open_shared(
        cfg,
        hub,
        broker.clone(),
        metrics,
        shutdown,
        conn,
        client,
        counts.clone(),
    )
    .await?;
    Ok((broker, boards, health, counts))
}

/// The settings with flags over variables over the file (`Config::resolve`), checked as a
/// whole: what the cli serves with.
pub fn resolve_config(args: &crate::config::ServeArgs) -> anyhow::Result<Config> {
    let cfg = Config::resolve(args)?;
    check_config(&cfg)?;
    Ok(cfg)
}

/// What `Config::resolve` cannot judge: each module checks the settings it reads (keys and
/// tokens, origins, board policies), so `config` holds plain data and imports none of them.
/// Reads no file and opens nothing.
pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
    crate::auth::check_config(cfg)?;
    crate::origin::check_config(cfg)?;
    crate::leaderboard::policy::check_config(cfg)?;
    crate::webhook::check_config(cfg)?;
    crate::pusher::check_config(cfg)?;
    Ok(())
}

/// A running server. Dropping it without `shutdown` cancels it too.
pub struct Server {
    pub addr: SocketAddr,
    pub state: Arc<AppState>,
    /// For flushing the durable history at shutdown.
    /// The in-process broker, to flush its durable history on shutdown (None with Redis).
    broker: Option<Arc<MemoryBroker>>,
    accept: Option<JoinHandle<()>>,
}

impl Server {
    /// Binds, opens the data store and starts serving in the background.
    pub async fn start(cfg: Config) -> anyhow::Result<Server> {
        let needed = cfg.max_sockets as u64 + crate::fd_limit::FILE_HEADROOM;
        crate::fd_limit::raise(needed);
        // Settings are checked and keys read before anything is opened: a bad key stops the
        // start cleanly.
        check_config(&cfg)?;
        crate::webhook::check_start(&cfg)?;
        let auth = crate::auth::Auth::from_config(&cfg)?;
        let board_policies = BoardPolicies::from_config(&cfg)?;
        let pusher_apps = crate::pusher::Apps::from_config(&cfg)?;
        // So is a bad certificate.
        let tls = crate::tls::Tls::from_config(&cfg)?;
        let listener = bind(cfg.listen).with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(cfg.max_topics_per_connection, metrics.clone()));
        let shutdown = CancellationToken::new();
        let webhooks = crate::webhook::Webhooks::spawn(&cfg, &metrics, shutdown.clone());
        if let Some(w) = &webhooks {
            hub.set_events(w.clone());
        }
        let (broker, memory_broker, boards, redis_health, cluster_counts): (
            Arc<dyn crate::broker::Broker>,
            _,
            _,
            _,
            _,
        ) = if cfg.redis.is_empty() {
            // Opening the durable history reads (and after a crash, repairs) a file:
            // off the async workers.
            let memory_broker = {
                let (cfg, hub, metrics) = (cfg.clone(), hub.clone(), metrics.clone());
                tokio::task::spawn_blocking(move || MemoryBroker::open(&cfg, hub, metrics))
                    .await?
                    .context("opening the durable history")?
            };
            let boards = Boards::open(
                &cfg,
                hub.clone(),
                memory_broker.clone(),
                metrics.clone(),
                shutdown.clone(),
            )
            .await?;
            (
                memory_broker.clone(),
                Some(memory_broker),
                boards,
                None,
                None,
            )
        } else {
            let (broker, boards, health, counts) = start_shared(
                &cfg,
                hub.clone(),
                metrics.clone(),
                shutdown.clone(),
                webhooks,
            )
            .await
            .with_context(|| format!("connecting to redis at {}", cfg.redis))?;
            (broker, None, boards, Some(health), Some(counts))
        };
        // The hub fills gaps in its deliveries from the broker's history.
        hub.attach(Arc::downgrade(&broker));
        let mut durable_files = Vec::new();
        if let Some(f) = boards.local_file() {
            durable_files.push((crate::leaderboard::store::DB_FILE, f));
        }
        if let Some(f) = memory_broker.as_ref().and_then(|b| b.history_file()) {
            durable_files.push((crate::broker::durable::HISTORY_FILE, f));
        }
        crate::api::backup::remove_stale_copies(&cfg.data_dir);
        let state = Arc::new(
            AppState::new(cfg, metrics, broker, hub, boards, shutdown)
                .with_pusher(pusher_apps)
                .with_redis(redis_health)
                .with_counts(cluster_counts)
                .with_auth(auth)
                .with_board_policies(board_policies)
                .with_durable_files(durable_files),
        );
        if let Some(tls) = &tls {
            tls.spawn_watcher(state.shutdown.clone());
        }
        // Shutdown reaches every subscriber through its queue (connections keep no
        // shutdown waiter of their own): also when the server is dropped, not shut down.
        let (clients, shutdown) = (state.clients.clone(), state.shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            clients.close_all(DisconnectReason::Shutdown);
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        let accept = tokio::spawn(accept_loop(listener, state.clone(), tls));
        tracing::info!("listening on {scheme}://{addr}");
        Ok(Server {
            addr,
            state,
            broker: memory_broker,
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
        state.clients.close_all(DisconnectReason::Shutdown);
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
        if let Some(b) = &self.broker {
            b.close().await;
        }
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

/// Back-off after a failed accept: EMFILE stays until some connection closes, and retrying
/// at once would spin a core while the listener stays readable.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

async fn accept_loop(
    listener: TcpListener,
    state: Arc<AppState>,
    tls: Option<Arc<crate::tls::Tls>>,
) {
    let router = app::router(state.clone());
    let body_timeout = state.cfg.body_read_timeout;
    let router = tower::ServiceExt::map_request(router, move |req: hyper::Request<Incoming>| {
        req.map(|b| Body::new(TimedBody::new(b, body_timeout)))
    });
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let (tcp, peer) = tokio::select! {
            _ = state.shutdown.cancelled() => break,
            _ = sweep.tick() => {
                state.limits.sweep();
                crate::refusal_log::flush();
                continue;
            }
            r = listener.accept() => match r {
                Ok(conn) => {
                    backoff = ACCEPT_BACKOFF_MIN;
                    conn
                }
                Err(e) => {
                    state.metrics.accept_errors.inc();
                    // One line per streak of failures, not one per retry.
                    if backoff == ACCEPT_BACKOFF_MIN {
                        tracing::warn!("accept failed: {e} (retrying with back-off)");
                    }
                    tokio::select! {
                        _ = state.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                    continue;
                }
            },
        };
        let slot = match state.limits.admit(peer.ip()) {
            Ok(slot) => Arc::new(slot),
            Err(why) => {
                crate::refusal_log::note(
                    why.label(),
                    Some(peer.ip()),
                    "connection refused at accept",
                );
                refuse(tcp, why);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let io = DeadlineStream::new(tcp, state.cfg.write_timeout);
        let service = TowerToHyperService::new(router.clone());
        let shutdown = state.shutdown.clone();
        let header_timeout = state.cfg.header_read_timeout;
        let acceptor = tls.as_ref().map(|t| t.acceptor.clone());
        // One task shape per kind: a plain connection's task must not carry room for a
        // TLS session it never has (the task's future is allocated whole, for the
        // connection's life: a SSE stream, a kept-alive client).
        match acceptor {
            None => {
                let conn = serve_plain(io, service, shutdown, header_timeout);
                state.tracker.spawn(CONN_SLOT.scope(slot, conn));
            }
            Some(acceptor) => {
                let conn = serve_tls(acceptor, io, peer, service, shutdown, header_timeout);
                state.tracker.spawn(CONN_SLOT.scope(slot, conn));
            }
        }
    }
}

/// The TLS handshake (it gets the time a request's headers get), then HTTP over it.
async fn serve_tls<S>(
    acceptor: tokio_rustls::TlsAcceptor,
    io: DeadlineStream,
    peer: SocketAddr,
    service: S,
    shutdown: CancellationToken,
    header_timeout: Duration,
) where
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let tls = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(header_timeout, acceptor.accept(io)) => r,
    };
    match tls {
        Ok(Ok(tls)) => serve_http(TokioIo::new(tls), service, shutdown, header_timeout).await,
        Ok(Err(e)) => crate::refusal_log::note(
            "tls_handshake",
            Some(peer.ip()),
            &format!("TLS handshake failed: {e}"),
        ),
        Err(_) => crate::refusal_log::note(
            "tls_handshake",
            Some(peer.ip()),
            "TLS handshake not done within header_read_timeout",
        ),
    }
}

/// A plain HTTP/1.1 connection: `serve_http`, except that a handler may take the raw
/// socket over (`net::Takeover`: an SSE stream, which then holds no hyper state or buffer
/// for its whole life). The takeover's `run` spawns its own task; this one ends.
async fn serve_plain<S>(
    io: DeadlineStream,
    service: S,
    shutdown: CancellationToken,
    header_timeout: Duration,
) where
    S: hyper::service::HttpService<Incoming> + Send + Unpin,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    TAKEOVER
        .scope(Takeover::default(), async move {
            let mut conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let cancelled = shutdown.cancelled();
            tokio::pin!(cancelled);
            let mut draining = false;
            let ended = std::future::poll_fn(|cx| {
                if !draining && cancelled.as_mut().poll(cx).is_ready() {
                    draining = true;
                    std::pin::Pin::new(&mut conn).graceful_shutdown();
                }
                let r = std::pin::Pin::new(&mut conn).poll(cx);
                if TAKEOVER.with(Takeover::claimed) {
                    return std::task::Poll::Ready(None);
                }
                r.map(Some)
            })
            .await;
            match ended {
                Some(Err(e)) => tracing::debug!("http connection ended: {e}"),
                Some(Ok(())) => {}
                None => {
                    let run = TAKEOVER.with(Takeover::take);
                    if let (Some(parts), Some(run)) = (conn.into_parts(), run) {
                        run(parts.io.into_inner().into_inner());
                    }
                }
            }
        })
        .await
}

/// One HTTP/1.1 connection, plain or TLS, until it ends or the node shuts down.
async fn serve_http<I, S>(io: I, service: S, shutdown: CancellationToken, header_timeout: Duration)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming> + Send,
    S::Future: Send + 'static,
    S::ResBody: Send + 'static,
    <S::ResBody as hyper::body::Body>::Data: Send,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    // header_read_timeout also runs while a kept-alive connection waits for its next
    // request, so it bounds idle connections too.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
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
}

/// Answers a refused socket without waiting on it: one non-blocking write of a fixed
/// response into its empty send buffer, then close. What the client already sent is read
/// and dropped first, so the close is a FIN that lets it read the answer, not a reset.
fn refuse(tcp: TcpStream, why: Refusal) {
    use std::io::{Read, Write};
    let Ok(mut tcp) = tcp.into_std() else {
        return;
    };
    let _ = tcp.write(why.response());
    let mut sink = [0u8; 1024];
    for _ in 0..8 {
        match tcp.read(&mut sink) {
            Ok(n) if n > 0 => continue,
            _ => break,
        }
    }
    let _ = tcp.shutdown(std::net::Shutdown::Write);
}
