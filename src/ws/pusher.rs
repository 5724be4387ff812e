//! `GET /app/{key}`: a Pusher client's WebSocket (protocol 7, docs/pusher.md). The HTTP
//! checks are `/ws`'s (Origin, RFC 6455 headers: a 4xx before any upgrade). What the
//! Pusher protocol refuses after the upgrade (an unknown key 4001, a protocol version it
//! does not speak 4007, an app or node at its connection limit 4100) gets a
//! `pusher:error` and the close frame with that code, written straight to the socket:
//! nothing is registered for it. An accepted client gets `pusher:connection_established`
//! first, then runs as any WebSocket connection in `Mode::Pusher`.

use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, RawQuery, Request, State};
use axum::response::Response;

use super::connection::{self, PusherSession};
use super::frame;
use super::handshake::{check_headers, respond, spawn_upgraded, switching_protocols, Mode};
use crate::api::error::ApiError;
use crate::client::Item;
use crate::metrics::Transport;
use crate::pusher::messages::{self, code};
use crate::state::{AppState, Registration};
use crate::ws::stream::WsStream;

/// How long a refused client's error and close frames may take to write.
const REFUSAL_WRITE: Duration = Duration::from_secs(2);

pub async fn upgrade(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
    RawQuery(query): RawQuery,
    req: Request,
) -> Response {
    respond(prepare(&state, &key, query.as_deref(), req))
}

/// What the connection turns into after the upgrade.
enum Outcome {
    Run(Registration, Box<PusherSession>),
    Refuse(u16, String),
}

fn protocol_of(query: Option<&str>) -> Option<u32> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or("")).ok()?;
    pairs
        .into_iter()
        .find(|(k, _)| k == "protocol")
        .and_then(|(_, v)| v.parse().ok())
}

fn admit(state: &Arc<AppState>, key: &str, query: Option<&str>) -> Outcome {
    let protocol = protocol_of(query);
    if !protocol.is_some_and(|p| messages::PROTOCOLS.contains(&p)) {
        let msg = format!(
            "unsupported protocol version {protocol:?}: this server speaks {}-{}",
            messages::PROTOCOLS.start(),
            messages::PROTOCOLS.end()
        );
        return Outcome::Refuse(code::BAD_PROTOCOL, msg);
    }
    let Some(app) = state.pusher.by_key(key) else {
        return Outcome::Refuse(code::UNKNOWN_APP, format!("app key {key} does not exist"));
    };
    let Some(slot) = app.admit() else {
        let msg = format!(
            "app {} is at its maximum of {} connections on this node",
            app.id, app.max_connections
        );
        return Outcome::Refuse(code::OVER_CAPACITY, msg);
    };
    match Registration::new(state, Transport::Pusher) {
        Ok(reg) => Outcome::Run(reg, PusherSession::new(slot, &state.metrics)),
        Err(e) => Outcome::Refuse(code::OVER_CAPACITY, e.message.to_string()),
    }
}

fn prepare(
    state: &Arc<AppState>,
    key: &str,
    query: Option<&str>,
    mut req: Request,
) -> Result<Response, ApiError> {
    crate::origin::check(req.headers(), &state.cfg)?;
    let ws_key = check_headers(req.headers())?;
    let outcome = admit(state, key, query);
    if let Outcome::Run(reg, _) = &outcome {
        let socket_id = crate::publication::socket_id(reg.client.id);
        let timeout = state.cfg.ping_interval.as_secs().max(1);
        let hello = messages::connection_established(&socket_id, timeout);
        reg.client.push(
            Item::control(frame::encode(frame::OP_TEXT, &hello)),
            &state.metrics,
        );
    }
    let on_upgrade = hyper::upgrade::on(&mut req);
    let setup = Box::new((outcome, state.clone()));
    spawn_upgraded(
        state,
        on_upgrade,
        setup,
        |stream, read_buf, (outcome, state)| async move {
            match outcome {
                Outcome::Run(reg, session) => {
                    connection::run(
                        stream,
                        read_buf,
                        reg,
                        state,
                        Mode::Pusher,
                        None,
                        Some(session),
                    )
                    .await;
                }
                Outcome::Refuse(code, message) => {
                    let _ =
                        tokio::time::timeout(REFUSAL_WRITE, refuse(stream, code, &message)).await;
                }
            }
        },
    );
    Ok(switching_protocols(&ws_key))
}

/// Writes `pusher:error` and a close frame with `code`, then drops the socket.
async fn refuse(mut stream: WsStream, code: u16, message: &str) {
    let error = frame::encode(frame::OP_TEXT, &messages::error(Some(code), message));
    // A close reason is at most 123 bytes.
    let reason: String = message.chars().take(100).collect();
    let close = frame::encode(frame::OP_CLOSE, &frame::close_payload(code, &reason));
    let bytes = [error, close].concat();
    let mut written = 0;
    while written < bytes.len() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.try_write_vectored(&[IoSlice::new(&bytes[written..])]) {
            Ok(0) => return,
            Ok(n) => written += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return,
        }
    }
    while stream.pending_write() {
        if stream.writable().await.is_err() {
            return;
        }
        match stream.flush_pending() {
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => return,
            _ => {}
        }
    }
}
