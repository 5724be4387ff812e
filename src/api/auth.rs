//! Publisher keys. Game servers and backends publish; browsers only subscribe, so the keys
//! guard every write endpoint (and, once `[[key]]` tables exist, `/metrics`). Flat
//! `publisher_keys` can do everything; `[[key]]` keys only their scope. Each handler asks
//! `authorize` for the one scope it needs, so no write can forget to name it.

pub use crate::auth::keys::{authorize, require_admin, Caller, Scope};
