//! WebSocket transport: the upgrade (`handshake`), the framing (`frame`), the
//! per-connection loop (`connection`) and its command rate limit (`rate`).

pub mod connection;
pub mod frame;
pub mod handshake;
