//! The HTTP routes, apart from `main` so tests and the server build the same app.

use std::sync::Arc;

use axum::middleware::map_response;
use axum::routing::{get, post};
use axum::Router;

use crate::api::error::ApiError;
use crate::api::{
    backup, health, history, intent, json_errors, openapi, presence, publish, publish_batch,
    pusher, single_headers,
};
use crate::state::AppState;
use crate::{sse, web, ws};

pub fn router(state: Arc<AppState>) -> Router {
    let mut router = Router::new();
    if state.cfg.echo_endpoint {
        // Conformance testing only (`--echo-endpoint`, off by default).
        router = router.route("/echo", get(ws::handshake::echo));
    }
    router
        .route("/ws", get(ws::handshake::upgrade))
        .route("/sse", get(sse::subscribe))
        .route("/api/publish", post(publish_batch::publish_batch))
        .route("/api/publish/{topic}", post(publish::publish))
        .route("/api/topics/{topic}/history", get(history::history))
        .route("/api/topics/{topic}/presence", get(presence::members))
        .route("/api/topics/{topic}/presence/stats", get(presence::stats))
        .route("/api/backup", get(backup::list))
        .route("/api/backup/{file}", get(backup::file))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(health::metrics))
        .route("/api/openapi.json", get(openapi::document))
        .route("/app/{key}", get(ws::pusher::upgrade))
        .route("/apps/{id}/events", post(pusher::events))
        .route("/apps/{id}/batch_events", post(pusher::batch_events))
        .route("/apps/{id}/channels", get(pusher::channels))
        .route("/apps/{id}/channels/{channel}", get(pusher::channel))
        .route("/apps/{id}/channels/{channel}/users", get(pusher::users))
        .route(
            "/apps/{id}/users/{user}/terminate_connections",
            post(pusher::terminate_connections),
        )
        .merge(crate::api::boards::routes())
        .merge(web::routes())
        // Every route above: writes need intent (api::intent).
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            intent::require,
        ))
        .fallback(|| async {
            ApiError::new(crate::error_code::ErrorCode::NotFound, "no such endpoint")
        })
        // Every request, matched or not: a header that must be single, sent twice, is
        // refused before anything reads it (api::single_headers).
        .layer(axum::middleware::from_fn(single_headers::refuse_repeats))
        .layer(map_response(json_errors::json_errors))
        .with_state(state)
}
