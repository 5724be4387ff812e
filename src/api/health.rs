//! Liveness (`/healthz`), readiness (`/readyz`) and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

use super::error::ApiError;
use crate::state::AppState;

pub async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let status = if state.shutdown.is_cancelled() {
        "shutting_down"
    } else {
        "ok"
    };
    Json(serde_json::json!({
        "status": status,
        "connections": state.connection_count(),
        "subscriptions": state.hub.total_subscriptions(),
        "topics": state.metrics.topics.get(),
        "tasks": state.tracker.len(),
    }))
}

/// Whether a load balancer should send this node traffic: not while it shuts down, nor
/// while (with `--redis`) Redis does not answer its health checks or its pub/sub connection
/// is not subscribed, since publishes would fail and subscribers would hear nothing.
/// `/healthz` stays liveness: a node waiting for Redis is alive, just not ready.
pub async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let mut reasons: Vec<&'static str> = Vec::new();
    if state.shutdown.is_cancelled() {
        reasons.push("shutting_down");
    }
    if let Some(h) = &state.redis {
        reasons.extend(h.reasons());
    }
    let node = state.redis.as_ref().map(|h| h.node().to_owned());
    let mut body = if reasons.is_empty() {
        serde_json::json!({"status": "ready"})
    } else {
        serde_json::json!({"status": "not_ready", "reasons": reasons})
    };
    if let Some(node) = node {
        body["node"] = node.into();
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body))
}

/// Open unless `[[key]]` tables exist; then only flat keys and `admin` keys may read it.
pub async fn metrics(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    super::auth::require_admin(&state.auth.publishers, &headers)?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    ))
}
