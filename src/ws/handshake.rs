//! `GET /ws`: checks Origin and the RFC 6455 headers, subscribes the query's topics, answers
//! 101 and hands the raw TCP socket to `connection::run`. Everything that can be refused is
//! refused here, with an HTTP status and a JSON body, before any upgrade.

use std::sync::Arc;

use axum::extract::{RawQuery, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use hyper_util::rt::TokioIo;
use sha1::{Digest, Sha1};

use super::connection;
use super::frame;
use crate::api::error::ApiError;
use crate::metrics::Transport;
use crate::net::DeadlineStream;
use crate::protocol;
use crate::state::{AppState, Registration};
use crate::topic::topics_from_query;

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    RawQuery(query): RawQuery,
    mut req: Request,
) -> Response {
    match prepare(&state, query.as_deref(), &mut req) {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    }
}

fn prepare(
    state: &Arc<AppState>,
    query: Option<&str>,
    req: &mut Request,
) -> Result<Response, ApiError> {
    if !origin_allowed(req.headers(), &state.cfg.allowed_origins) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "origin_not_allowed",
            "this Origin may not open WebSockets here (see --allowed-origin)",
        ));
    }
    let key = check_headers(req.headers())?;
    let topics = topics_from_query(query, state.cfg.max_topics_per_connection)?;
    let reg = Registration::new(state, Transport::Ws)?;
    for t in &topics {
        state.hub.subscribe(&reg.client, t, |pos| {
            Some(frame::encode(
                frame::OP_TEXT,
                &protocol::subscribed(t, pos, None),
            ))
        })?;
    }
    let on_upgrade = hyper::upgrade::on(req);
    let task_state = state.clone();
    state.tracker.spawn(async move {
        let upgraded = match on_upgrade.await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!("upgrade failed: {e}");
                return;
            }
        };
        match upgraded.downcast::<TokioIo<DeadlineStream>>() {
            Ok(parts) => {
                let stream = parts.io.into_inner().into_inner();
                connection::run(stream, parts.read_buf, reg, task_state).await;
            }
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
        }
    });
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
    Ok(resp)
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
            StatusCode::UPGRADE_REQUIRED,
            "upgrade_required",
            "this endpoint speaks WebSocket only (Upgrade: websocket)",
        ));
    }
    if h.get(header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        != Some("13")
    {
        return Err(ApiError::bad_request(
            "bad_handshake",
            "Sec-WebSocket-Version must be 13",
        ));
    }
    match h
        .get(header::SEC_WEBSOCKET_KEY)
        .and_then(|v| v.to_str().ok())
    {
        Some(k) if !k.trim().is_empty() => Ok(k.trim().to_string()),
        _ => Err(ApiError::bad_request(
            "bad_handshake",
            "Sec-WebSocket-Key is missing",
        )),
    }
}

pub fn accept_key(key: &[u8]) -> String {
    let mut sha = Sha1::new();
    sha.update(key);
    sha.update(GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(sha.finalize())
}

/// No Origin (not a browser) is fine; a browser's Origin must match the Host it asked for,
/// or be listed exactly in `allowed`. This stops another site's page from riding a
/// visitor's browser into the server (cross-site WebSocket hijacking).
pub fn origin_allowed(h: &HeaderMap, allowed: &[String]) -> bool {
    let Some(origin) = h.get(header::ORIGIN) else {
        return true;
    };
    let Ok(origin) = origin.to_str() else {
        return false;
    };
    let origin = origin.trim_end_matches('/');
    if allowed.iter().any(|a| a.eq_ignore_ascii_case(origin)) {
        return true;
    }
    let host = h
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    matches!(origin_host, Some(oh) if !host.is_empty() && oh.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc_example_accept_key() {
        assert_eq!(
            accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn origins() {
        let mut h = HeaderMap::new();
        assert!(origin_allowed(&h, &[]));
        h.insert(header::HOST, "127.0.0.1:7700".parse().unwrap());
        h.insert(header::ORIGIN, "http://127.0.0.1:7700".parse().unwrap());
        assert!(origin_allowed(&h, &[]));
        h.insert(header::ORIGIN, "http://evil.example".parse().unwrap());
        assert!(!origin_allowed(&h, &[]));
        assert!(origin_allowed(&h, &["http://evil.example".to_string()]));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!origin_allowed(&h, &[]));
    }
}
