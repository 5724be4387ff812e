//! Every error code crier answers with, over HTTP (`{"error":{"code","message"}}`) or in a
//! WebSocket error frame. One typed list, like the close codes (`close.rs`): a call site
//! cannot misspell a code, and `docs/errors.md` is checked against this list so clients can
//! rely on it.

use axum::http::StatusCode;

macro_rules! error_codes {
    ($( $(#[$attr:meta])* $variant:ident = $code:literal, $status:expr, $meaning:literal; )*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$attr])* $variant, )*
        }

        impl ErrorCode {
            /// Every code, in the order the docs list them.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The code on the wire.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The HTTP status the code is answered with; `None` for codes only WebSocket
            /// error frames carry.
            pub fn status(self) -> Option<StatusCode> {
                match self { $(ErrorCode::$variant => $status,)* }
            }

            /// One line for docs/errors.md.
            pub fn meaning(self) -> &'static str {
                match self { $(ErrorCode::$variant => $meaning,)* }
            }
        }
    };
}

const fn http(code: u16) -> Option<StatusCode> {
    match StatusCode::from_u16(code) {
        Ok(s) => Some(s),
        Err(_) => None,
    }
}

const WS_ONLY: Option<StatusCode> = None;

error_codes! {
    // Requests and commands that are malformed.
    BadRequest = "bad_request", http(400),
        "the framework refused the request before any handler read it (a path or query that does not parse)";
    DuplicateHeader = "duplicate_header", http(400),
        "a header that must be sent once (`Authorization`, `Origin`, `Content-Type`, `Content-Length`, `Host`, `Idempotency-Key`) was sent more than once";
    BadTopic = "bad_topic", http(400),
        "the topic name is missing or invalid: 1-128 bytes of A-Z a-z 0-9 _ - . : @, not `.` or `..`";
    BadJson = "bad_json", http(400),
        "the body or the WebSocket command is not valid JSON, or not the expected shape";
    BadBody = "bad_body", http(400),
        "the request body could not be read";
    BadQuery = "bad_query", http(400),
        "a query parameter is malformed or out of range";
    BadSince = "bad_since", WS_ONLY,
        "a subscribe command's `since` is not `{\"offset\":N,\"epoch\":\"...\"}`";
    BadLastEventId = "bad_last_event_id", http(400),
        "the SSE `Last-Event-ID` header or `lastEventId` parameter is not a list of `EPOCH:OFFSET` entries, or is sent more than once";
    BadIdempotencyKey = "bad_idempotency_key", http(400),
        "the `Idempotency-Key` header is not 1-128 visible ASCII characters";
    ReservedTopic = "reserved_topic", http(400),
        "`board:*` topics are written only by the leaderboard API";
    UnknownOp = "unknown_op", WS_ONLY,
        "a WebSocket command's `op` is missing or not subscribe, unsubscribe or ping";
    UnsupportedData = "unsupported_data", WS_ONLY,
        "a binary WebSocket frame was sent; commands are JSON text frames";
    UnsupportedMediaType = "unsupported_media_type", http(415),
        "a write (`POST`/`PUT`) without `Content-Type: application/json`";
    MessageTooLarge = "message_too_large", http(413),
        "the body is larger than `max_message_bytes` (or the endpoint's own limit); a `Content-Length` over it is answered before any body byte is read";
    BodyTimeout = "body_timeout", http(408),
        "the body did not arrive within `body_read_timeout`";
    MethodNotAllowed = "method_not_allowed", http(405),
        "the path exists but not with this method (see the `Allow` header)";
    NotFound = "not_found", http(404),
        "no such endpoint";
    PresenceDisabled = "presence_disabled", http(404),
        "a presence read of a topic whose `[[namespace]]` has no `presence = true`: it keeps no members";
    // WebSocket handshake.
    UpgradeRequired = "upgrade_required", http(426),
        "a plain request on `/ws`, which speaks WebSocket only";
    BadVersion = "bad_version", http(426),
        "`/ws` without `Sec-WebSocket-Version: 13`";
    BadHandshake = "bad_handshake", http(400),
        "`/ws` without a `Sec-WebSocket-Key` of 16 base64-encoded bytes";
    // Who may do what.
    Unauthorized = "unauthorized", http(401),
        "publisher keys are configured and no bearer key was sent";
    Forbidden = "forbidden", http(403),
        "the bearer key is not one of the configured publisher keys";
    OriginNotAllowed = "origin_not_allowed", http(403),
        "a `/ws`, `/sse` or write request from a page whose Origin is not allowed";
    CrossSiteRequest = "cross_site_request", http(403),
        "a browser request labelled `Sec-Fetch-Site: cross-site` from no listed origin";
    // Subscriber tokens and scoped keys (docs/auth.md).
    TokenRequired = "token_required", http(401),
        "the topic is private (`private_topics`) and no token was sent";
    BadToken = "bad_token", http(401),
        "the token is malformed, forged, signed with a refused algorithm (`none`, key confusion) or an unknown key, not valid yet, or lacks `sub`/`exp`";
    TokenExpired = "token_expired", http(401),
        "the token's `exp` has passed";
    TopicForbidden = "topic_forbidden", http(403),
        "the topic is private and the token's `topics` do not allow it";
    NoPublishScope = "no_publish_scope", http(403),
        "the key's `publish` scope does not cover the topic";
    NoBoardsScope = "no_boards_scope", http(403),
        "the key's `boards` scope does not cover the board (scores, board options)";
    NoResetScope = "no_reset_scope", http(403),
        "the key's `reset` scope does not cover the board";
    NoAdminScope = "no_admin_scope", http(403),
        "scoped keys are configured and the key has no `admin` scope (`/metrics`)";
    ScopedKeyRequired = "scoped_key_required", http(403),
        "the board's policy has `scoped_keys_only` and the key is not a `[[key]]` whose `boards` scope names it";
    // Limits.
    TooManyTopics = "too_many_topics", http(503),
        "the connection holds `max_topics_per_connection` topics (400 on `/sse` and `/ws` queries), \
         or the node holds `max_topics` (or `max_subscriber_topics` never-published) topics and none is idle (503)";
    TooManyCommands = "too_many_commands", WS_ONLY,
        "more WebSocket frames (commands, pings, pongs, fragments) than `max_commands_per_second`; close 4500 follows";
    TooManyConnections = "too_many_connections", http(503),
        "the node already holds `max_connections` subscribers";
    TooManyConnectionsPerIp = "too_many_connections_per_ip", http(429),
        "at accept: the address holds `max_connections_per_ip` connections (then closed)";
    ConnectRateExceeded = "connect_rate_exceeded", http(429),
        "at accept: the address is over `connect_rate_per_ip` after its `connect_burst_per_ip` (then closed)";
    TooManyRequests = "too_many_requests", http(429),
        "too many requests; retry later";
    ServerFull = "server_full", http(503),
        "at accept: the node holds `max_sockets` TCP connections (then closed)";
    // The node's state.
    ShuttingDown = "shutting_down", http(503),
        "the node is shutting down";
    Closed = "closed", http(503),
        "the connection closed while the request was served";
    Unavailable = "unavailable", http(503),
        "the node cannot serve the request right now; retry later";
    StoreUnavailable = "store_unavailable", http(503),
        "the store could not commit the write; nothing was applied or published, retry later";
    BackupNeedsKey = "backup_needs_key", http(403),
        "`/api/backup` on a node without publisher keys: a backup reads every durable file, so it always needs an admin-capable key";
    NoDurableFile = "no_durable_file", http(404),
        "`/api/backup/{file}` names a file this node does not keep (under `--redis` Redis holds the state)";
    BackupInProgress = "backup_in_progress", http(409),
        "another backup of the node is being copied or sent; retry after it (`Retry-After`)";
    Internal = "internal", http(500),
        "a bug: the server failed in a way it did not expect";
    // Leaderboards (docs/leaderboards.md).
    BadBoard = "bad_board", http(400),
        "the board name is invalid";
    BadOptions = "bad_options", http(400),
        "the board options are not valid";
    InvalidScore = "invalid_score", http(400),
        "a score entry is malformed, out of range, or the batch is too large";
    NoTiebreak = "no_tiebreak", http(400),
        "a `subscore` was posted to a board without a `tiebreak` option; nothing of the batch was applied";
    NoBoard = "no_board", http(404),
        "no board of that name";
    NoPlayer = "no_player", http(404),
        "the player has no score on the board";
    NoSeason = "no_season", http(404),
        "the board keeps no closed season of that number (never closed, or past `keep_seasons`)";
    ScoreOutOfBounds = "score_out_of_bounds", http(400),
        "a score is outside the board policy's `min_score`/`max_score`";
    TooManySubmissions = "too_many_submissions", http(429),
        "a player is over the board policy's `max_submissions_per_minute`";
    Conflict = "conflict", http(409),
        "the change would move every rank (changing `order` or `tiebreak` of a board with players): reset it first";
    TooManyBoards = "too_many_boards", http(503),
        "a new board past `max_boards` (under `--redis`: counted over every node); nothing was created, existing boards keep working";
    TooManyPlayers = "too_many_players", http(409),
        "the batch would add players past the board's `max_players_per_board` (or its `[[board]]` table's own); nothing of it was applied, players already on the board can still post";

    // The Pusher Channels HTTP API (docs/pusher.md).
    NoApp = "no_app", http(404),
        "no Pusher app has that id (`[[app]]` tables, `pusher_app_id`)";
    BadSignature = "bad_signature", http(401),
        "a Pusher API call's signature is missing or wrong: `auth_key`, `auth_timestamp` (within 600 s), `auth_version`, `body_md5` or `auth_signature`";
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The table docs/errors.md holds between its markers; a test keeps the two equal.
pub fn markdown_table() -> String {
    let mut out = String::from("| code | HTTP status | meaning |\n|---|---|---|\n");
    for c in ErrorCode::ALL {
        let status = c.status().map_or("— (WebSocket only)".to_string(), |s| {
            s.as_u16().to_string()
        });
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            c.as_str(),
            status,
            c.meaning()
        ));
    }
    out
}

/// A refusal by the domain (who may connect, read or write; board policies; admission):
/// the code and message the client is told, and when it may try again. It names no
/// transport: the HTTP edge (`api::error`) answers it with the code's status and a
/// WebSocket error frame carries the code and message as they are, so the modules that
/// decide never build a response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: ErrorCode,
    pub message: String,
    /// Seconds until the same request may pass (`Retry-After` over HTTP).
    pub retry_after: Option<u64>,
}

impl Refusal {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Refusal {
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The same refusal, telling the client to wait `secs` seconds.
    pub fn retry_after(self, secs: u64) -> Self {
        Refusal {
            retry_after: Some(secs),
            ..self
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for Refusal {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for c in ErrorCode::ALL {
            assert!(seen.insert(c.as_str()), "{c} twice");
            assert!(c
                .as_str()
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(!c.meaning().is_empty());
        }
    }
}
