//! WebSocket transport: the upgrade (`handshake`), the framing (`frame`), the
//! per-connection loop (`connection`) and its command rate limit (`rate`).

pub mod connection;
/// The framing lives in `crier-protocol`, shared with the load tool; re-exported so
/// `crate::ws::frame` stays the server's path to it.
pub use crier_protocol::frame;
pub mod handshake;
pub mod pusher;
pub mod stream;
