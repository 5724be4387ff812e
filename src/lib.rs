//! crier: a real-time broadcast server.
//!
//! The path of one publication: `api` -> `hub` -> `client::queue` -> `ws::connection` /
//! `sse` -> socket. Leaderboards (`leaderboard`) sit on top of the hub as retained,
//! conflated topics.

pub mod leaderboard;
pub mod web;
