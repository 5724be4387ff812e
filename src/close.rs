//! Why a connection ended. One enum serves the WebSocket close code, the SSE closing
//! comment and the `reason` label of `crier_disconnects_total`, so the three never disagree.

/// Codes 4000-4499 invite a reconnect, 4500-4999 do not (documented in docs/protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// The client closed, or its socket ended (EOF or reset).
    Normal,
    Shutdown,
    ProtocolError,
    BadUtf8,
    MessageTooLarge,
    SlowConsumer,
    NoPong,
    WriteTimeout,
    /// Under Redis, the topic's stream restarted under a new epoch (Redis lost it, or a gap
    /// in this node's deliveries is no longer in history): resume now, from the position
    /// held; the answer says `recovered:false` if the history is gone. Not a shutdown: the
    /// node is fine, and its metrics should say so.
    StreamRestarted,
    /// More frames than `max_commands_per_second` allows (commands, pings, pongs and
    /// fragments alike): a buggy or hostile client.
    TooManyCommands,
    /// A message in more frames than `max_fragments_per_message`: no real client splits a
    /// message that finely, and a message that never ends would cost a decode per frame.
    TooManyFragments,
    /// The connection's token expired and no `refresh` came first: reconnect with a fresh
    /// token.
    TokenExpired,
    /// An in-band `auth` or `refresh` with a token that is not accepted: reconnecting with
    /// the same token would fail the same way.
    BadToken,
    /// The app ended the connections of the user this one is signed in as (Pusher's
    /// `terminate_connections`, docs/pusher.md).
    Terminated,
}

impl DisconnectReason {
    pub const ALL: [DisconnectReason; 14] = [
        Self::Normal,
        Self::Shutdown,
        Self::ProtocolError,
        Self::BadUtf8,
        Self::MessageTooLarge,
        Self::SlowConsumer,
        Self::NoPong,
        Self::WriteTimeout,
        Self::StreamRestarted,
        Self::TooManyCommands,
        Self::TooManyFragments,
        Self::TokenExpired,
        Self::BadToken,
        Self::Terminated,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::Shutdown => 1001,
            Self::ProtocolError => 1002,
            Self::BadUtf8 => 1007,
            Self::MessageTooLarge => 1009,
            Self::SlowConsumer => 4001,
            Self::NoPong => 4002,
            Self::WriteTimeout => 4003,
            Self::StreamRestarted => 4004,
            Self::TokenExpired => 4005,
            // 45xx: reconnecting unchanged would only hit the limit again.
            Self::TooManyCommands => 4500,
            Self::BadToken => 4501,
            Self::TooManyFragments => 4502,
            Self::Terminated => 4503,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Shutdown => "shutdown",
            Self::ProtocolError => "protocol_error",
            Self::BadUtf8 => "bad_utf8",
            Self::MessageTooLarge => "message_too_large",
            Self::SlowConsumer => "slow_consumer",
            Self::NoPong => "no_pong",
            Self::WriteTimeout => "write_timeout",
            Self::StreamRestarted => "stream_restarted",
            Self::TooManyCommands => "too_many_commands",
            Self::TokenExpired => "token_expired",
            Self::BadToken => "bad_token",
            Self::TooManyFragments => "too_many_fragments",
            Self::Terminated => "terminated",
        }
    }

    /// Closes after which the peer is probably gone: no point waiting for its close frame.
    pub fn peer_is_gone(self) -> bool {
        matches!(self, Self::NoPong | Self::WriteTimeout)
    }

    /// Closes of a flooding peer: once our close is queued, nothing more it sends is read
    /// (decoding a flood only to discard it would cost CPU that healthy clients need) and
    /// its close reply is not awaited.
    pub fn stops_reading(self) -> bool {
        matches!(self, Self::TooManyCommands)
    }
}
