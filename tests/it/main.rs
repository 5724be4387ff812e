//! One integration-test binary: every suite is a module here, so the tests link once
//! instead of once per file (issue 16). `tests/settings_env.rs` stays apart: it sets
//! process-wide `CRIER_*` variables that servers spawned by other tests would inherit.

mod auth_examples;
mod auth_http;
mod auth_keys;
mod auth_sse;
mod auth_ws;
mod bench_redis;
mod bench_tool;
mod binary;
mod board_durability;
mod board_limits;
mod board_policy;
mod broadcast;
mod broker_contract;
mod common;
mod deploy_nginx;
mod docs_tables;
mod fuzz_regressions;
mod help;
mod history_api;
mod history_durability;
mod hostile_bodies;
mod hostile_headers;
mod hostile_http;
mod hostile_limits;
mod hostile_topics;
mod hostile_ws;
mod idempotency;
mod layers;
mod leaderboard;
mod openapi;
mod presence;
mod reconnect_storm;
mod redis_boards;
mod redis_broker;
mod redis_failover;
mod redis_nodes;
mod redis_ops;
mod resume_sse;
mod resume_ws;
mod robustness;
mod store_crash;
