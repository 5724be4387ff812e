//! Liveness and Prometheus metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

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

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}
