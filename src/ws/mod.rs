//! WebSocket transport: the upgrade (`handshake`), the framing (`frame`) and the
//! per-connection loop (`connection`).

pub mod connection;
pub mod frame;
pub mod handshake;
