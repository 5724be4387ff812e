//! The Pusher Channels door (docs/pusher.md): apps, their signatures and the protocol's
//! messages. Pusher clients (`pusher-js`, Laravel Echo) and server SDKs talk to crier as to
//! Pusher; behind the door everything is crier's: a Pusher channel is the topic
//! `pusher/{app id}/{channel}` (`topic::pusher_topic`, a name no crier client can spell),
//! subscribed through the one subscribe path and fanned out by the hub with the
//! `Transport::Pusher` framing of each publication (`publication::Publication::wire`).
//!
//! This module is plain domain: the WebSocket glue is `ws/connection/pusher.rs`, the
//! HTTP API `api/pusher.rs`.

pub mod apps;
pub mod messages;
pub mod sign;

pub use apps::{App, AppSlot, Apps};

/// Checks the `[[app]]` tables (`server::check_config`). The three `pusher_*` settings
/// are checked together at start (`Apps::from_config`): each alone is a valid setting,
/// as `webhook_url` is without its secret until the server starts.
pub fn check_config(cfg: &crate::config::Config) -> anyhow::Result<()> {
    let tables_only = crate::config::Config {
        pusher_app_id: String::new(),
        pusher_key: String::new(),
        pusher_secret: String::new(),
        ..cfg.clone()
    };
    Apps::from_config(&tables_only).map(|_| ())
}
