//! The wire level crier shares with its load tool (`crier-bench`): the RFC 6455 framing
//! (`frame`), the handshake's accept key (`handshake`), the rules for topic and board
//! names (`names`) and a small HTTP/1 client (`http_client`).
//!
//! It is a crate of its own so the load tool can speak to a server without depending on
//! the server library (which would make the `crier` binary, which runs both, a cycle),
//! and so both sides use one implementation: the tool decodes frames with the very
//! decoder the server fuzzes and tests.

pub mod frame;
pub mod handshake;
pub mod http_client;
pub mod names;
