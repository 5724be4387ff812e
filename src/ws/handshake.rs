//! `GET /ws`: checks Origin and the RFC 6455 headers, subscribes the query's topics, answers
//! 101 and hands the raw TCP socket to `connection::run`. Everything that can be refused is
//! refused here, with an HTTP status and a JSON body, before any upgrade: a bad token, or a
//! private query topic the token does not allow, is a 401/403 and subscribes nothing.

use std::sync::Arc;

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;

use super::connection;
use super::frame;
use crate::api::error::ApiError;
use crate::error_code::ErrorCode;
use crate::metrics::Transport;
use crate::net::DeadlineStream;
use crate::protocol;
use crate::state::{AppState, Registration};
use crate::topic::topics_from_query;
use crate::ws::stream::WsStream;
use tokio_rustls::server::TlsStream;

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    mut req: Request,
) -> Response {
    respond(prepare(&state, query.as_deref(), &mut req, Mode::Commands).await)
}

/// `GET /echo` (only with `--echo-endpoint`): the same handshake and connection code as
/// `/ws`, but each message is echoed back, so a conformance suite exercises the real stack.
pub async fn echo(State(state): State<Arc<AppState>>, mut req: Request) -> Response {
    respond(prepare(&state, None, &mut req, Mode::Echo).await)
}

/// What the connection does with the client's data messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// JSON commands (docs/protocol.md).
    Commands,
    /// Echo every message back (conformance testing).
    Echo,
    /// The Pusher Channels protocol (`/app/{key}`, `ws::pusher`).
    Pusher,
}

pub(super) fn respond(r: Result<Response, ApiError>) -> Response {
    match r {
        Ok(resp) => resp,
        Err(e) => {
            // RFC 6455 4.4: a refused version names the one this server speaks.
            let version_refused = e.code == ErrorCode::BadVersion;
            let mut resp = e.into_response();
            if version_refused {
                resp.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            resp
        }
    }
}

async fn prepare(
    state: &Arc<AppState>,
    query: Option<&str>,
    req: &mut Request,
    mode: Mode,
) -> Result<Response, ApiError> {
    crate::origin::check(req.headers(), &state.cfg)?;
    let key = check_headers(req.headers())?;
    let topics = match mode {
        Mode::Commands => topics_from_query(query, state.cfg.max_topics_per_connection)?,
        Mode::Echo | Mode::Pusher => Vec::new(),
    };
    let grant = match mode {
        Mode::Commands => state.auth.grant_from_request(query, req.headers())?,
        Mode::Echo | Mode::Pusher => None,
    };
    for t in &topics {
        state.auth.check_read(t, grant.as_ref())?;
    }
    let reg = Registration::new(state, Transport::Ws)?;
    let who = crate::auth::identity(grant.as_ref());
    for t in &topics {
        let ack = |sub: &_| {
            Some(frame::encode(
                frame::OP_TEXT,
                &protocol::subscribed(t, sub, None),
            ))
        };
        crate::subscribe::subscribe(&state.hub, &*state.broker, &reg.client, t, None, &ack, &who)
            .await?;
        state.boards.watching(t);
    }
    let setup = Box::new((reg, state.clone(), grant));
    spawn_upgraded(
        state,
        hyper::upgrade::on(req),
        setup,
        move |stream, read_buf, (reg, state, grant)| {
            connection::run(stream, read_buf, reg, state, mode, grant, None)
        },
    );
    Ok(switching_protocols(&key))
}

/// Waits for `on_upgrade` on a task of the node's tracker, then hands the socket
/// and `setup` to `run`. `setup` is kept behind one pointer across the upgrade's wait:
/// what the task captures stays in its future for the connection's whole life, and the
/// box is freed once `run` takes what it holds.
pub(super) fn spawn_upgraded<S, F, Fut>(
    state: &AppState,
    on_upgrade: hyper::upgrade::OnUpgrade,
    setup: Box<S>,
    run: F,
) where
    S: Send + 'static,
    F: FnOnce(WsStream, bytes::Bytes, S) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tracker = state.tracker.clone();
    state.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        let Some((stream, read_buf)) = into_socket(upgraded) else {
            tracing::error!("upgraded connection is neither TCP nor TLS over TCP");
            return;
        };
        // Moved out of a temporary, so the box is freed here, not when the task ends.
        // The connection gets a task of its own, sized to it: awaited here, it would sit
        // beside this task's upgrade state for its whole life.
        tracker.spawn(run(stream, read_buf, *{ setup }));
    });
}

/// The `101 Switching Protocols` answer to a WebSocket handshake with `key`.
pub(super) fn switching_protocols(key: &str) -> Response {
    let accept = accept_key(key.as_bytes());
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header"),
    );
    resp
}

#[doc(hidden)] // pub for fuzz/fuzz_targets/ws_handshake.rs
pub fn check_headers(h: &HeaderMap) -> Result<String, ApiError> {
    let has_token = |name: header::HeaderName, token: &str| {
        h.get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return Err(ApiError::new(
            ErrorCode::UpgradeRequired,
            "this endpoint speaks WebSocket only (Upgrade: websocket)",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        != Some("13")
    {
        return Err(ApiError::new(
            ErrorCode::BadVersion,
            "Sec-WebSocket-Version must be 13",
        ));
    }
    match h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
    {
        Some(k) if key_is_valid(k) => Ok(k.to_string()),
        _ => Err(ApiError::new(
            ErrorCode::BadHandshake,
            "Sec-WebSocket-Key must be 16 bytes in base64",
        )),
    }
}

/// RFC 6455 4.1: the key is a random 16-byte value, base64-encoded (24 characters).
fn key_is_valid(key: &str) -> bool {
    key.len() == 24
        && base64::engine::general_purpose::STANDARD
            .decode(key)
            .is_ok_and(|k| k.len() == 16)
}

/// Shared with the load tool, which checks the server's answer with it.
pub use crier_protocol::handshake::accept_key;

/// The socket under an upgraded connection, and what hyper read past the request. Not
/// async on purpose: the TLS session it unpacks is large, and inside the connection's task
/// the compiler would keep room for it across the connection's whole life, in every plain
/// connection too (an idle WebSocket cost twice as much that way, docs/BENCHMARKS.md).
pub(super) fn into_socket(upgraded: hyper::upgrade::Upgraded) -> Option<(WsStream, bytes::Bytes)> {
    match upgraded.downcast::<TokioIo<DeadlineStream>>() {
        Ok(parts) => Some((
            WsStream::Plain(parts.io.into_inner().into_inner()),
            parts.read_buf,
        )),
        Err(upgraded) => {
            let parts = upgraded
                .downcast::<TokioIo<TlsStream<DeadlineStream>>>()
                .ok()?;
            let (tcp, tls) = parts.io.into_inner().into_inner();
            Some((WsStream::tls(tcp.into_inner(), tls), parts.read_buf))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, "websocket".parse().unwrap());
        h.insert(header::CONNECTION, "keep-alive, Upgrade".parse().unwrap());
        let e = check_headers(&h).unwrap_err();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::UPGRADE_REQUIRED, ErrorCode::BadVersion)
        );
        h.insert(header::SEC_WEBSOCKET_VERSION, "8".parse().unwrap());
        assert_eq!(check_headers(&h).unwrap_err().code, ErrorCode::BadVersion);
        let resp = respond(check_headers(&h).map(|_| Response::default()));
        assert_eq!(resp.status(), StatusCode::UPGRADE_REQUIRED);
        assert_eq!(resp.headers()[header::SEC_WEBSOCKET_VERSION], "13");
        h.insert(header::SEC_WEBSOCKET_VERSION, "13".parse().unwrap());
        for bad in [
            "",
            "abc",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25jZQ=!",
            "aGVsbG8gd29ybGQgaGVsbG8gd29ybGQ=",
        ] {
            h.insert(header::SEC_WEBSOCKET_KEY, bad.parse().unwrap());
            let e = check_headers(&h).unwrap_err();
            assert_eq!(
                (e.status, e.code),
                (StatusCode::BAD_REQUEST, ErrorCode::BadHandshake),
                "{bad:?}"
            );
        }
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            "dGhlIHNhbXBsZSBub25jZQ==".parse().unwrap(),
        );
        assert_eq!(check_headers(&h).unwrap(), "dGhlIHNhbXBsZSBub25jZQ==");
    }
}
