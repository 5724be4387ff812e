//! crier: a real-time broadcast server.
//!
//! The path of one publication: `api::publish` -> `broker` (offset, history) -> `hub` (fan-out) -> `client`
//! (bounded per-client queue) -> `ws::connection` or `sse` (batched socket writes).
//! Leaderboards (`leaderboard`) publish into the hub as retained, conflated topics.

pub mod api;
pub mod app;
pub mod auth;
pub mod broker;
pub mod cli;
pub mod client;
pub mod close;
pub mod config;
pub mod config_check;
pub mod config_example;
pub mod conn_limits;
pub mod error_code;
pub mod fd_limit;
pub mod framing;
/// Shared with the load tool (`crier-protocol`); `crier publish` and the tests use it.
pub use crier_protocol::http_client;
pub mod hub;
pub mod leaderboard;
pub mod logging;
pub mod metrics;
pub mod net;
pub mod origin;
pub mod protocol;
pub mod publication;
pub mod pusher;
pub mod rate;
pub mod redb_file;
pub mod refusal_log;
pub mod server;
pub mod sharded_metrics;
pub mod sse;
pub mod state;
pub mod subscribe;
pub mod tls;
pub mod topic;
pub mod web;
pub mod webhook;
pub mod writer;
pub mod ws;
