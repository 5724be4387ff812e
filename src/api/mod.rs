//! HTTP endpoints for publishers and operators. Nothing here touches a socket: handlers
//! validate, then hand work to the broker or the leaderboard service.

pub mod auth;
pub mod backup;
pub mod boards;
pub mod body;
pub mod error;
pub mod health;
pub mod history;
pub mod intent;
pub mod json_errors;
pub mod openapi;
pub mod presence;
pub mod publish;
pub mod publish_batch;
pub mod pusher;
pub mod single_headers;
