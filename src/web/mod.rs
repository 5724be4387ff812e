//! The embedded leaderboard web page (placeholder until the page lands).
use axum::Router;

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
}
