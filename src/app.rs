//! The HTTP routes, apart from `main` so tests and the server build the same app.

use std::sync::Arc;

use axum::middleware::map_response;
use axum::routing::{get, post};
use axum::Router;

use crate::api::error::ApiError;
use crate::api::{health, json_errors, openapi, publish};
use crate::state::AppState;
use crate::{leaderboard, sse, web, ws};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/ws", get(ws::handshake::upgrade))
        .route("/sse", get(sse::subscribe))
        .route("/api/publish/{topic}", post(publish::publish))
        .route("/healthz", get(health::healthz))
        .route("/metrics", get(health::metrics))
        .route("/api/openapi.json", get(openapi::document))
        .merge(leaderboard::api::routes())
        .merge(web::routes())
        .fallback(|| async { ApiError::not_found("not_found", "no such endpoint") })
        .layer(map_response(json_errors::json_errors))
        .with_state(state)
}
