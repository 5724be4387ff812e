//! Topic names. Validated once at the edge (API, WebSocket command, SSE query) so the hub
//! and the envelope encoder can trust them: the charset needs no JSON escaping.

use std::sync::Arc;

pub mod pattern;
pub use pattern::{Patterns, TopicPattern};

/// The name rules live in `crier-protocol`, so the load tool checks its flags by them too.
pub use crier_protocol::names::{is_valid_topic as is_valid, MAX_TOPIC_LEN};

/// A validated topic name, cheap to clone into many registries.
pub type TopicName = Arc<str>;

pub const BAD_TOPIC_MESSAGE: &str =
    "topic name must be 1-128 bytes of A-Z a-z 0-9 _ - . : @, and not . or ..";

/// What every leaderboard's topic starts with. Only the leaderboard API writes these
/// topics (a publish to one is refused), and the routed broker sends them to the board
/// store's broker, so the prefix is spelled here once.
pub const BOARD_PREFIX: &str = "board:";

/// The topic watchers of leaderboard `board` subscribe to: `board:{board}`.
pub fn board_topic(board: &str) -> String {
    format!("{BOARD_PREFIX}{board}")
}

/// The topic that follows one player on a board: `board:{board}@{player}`.
pub fn player_topic(board: &str, player: &str) -> String {
    format!("{BOARD_PREFIX}{board}@{player}")
}

/// The (board, player) of a `player_topic`, if `topic` is one. A board name never holds
/// `:`, so a friends view (`friends_topic`) is never taken for a followed player.
pub fn player_topic_parts(topic: &str) -> Option<(&str, &str)> {
    let rest = topic.strip_prefix(BOARD_PREFIX)?;
    let (board, player) = rest.split_once('@')?;
    (!board.is_empty() && !board.contains(':') && !player.is_empty()).then_some((board, player))
}

/// What follows the board's name in a friends view's topic, before its players.
pub const FRIENDS_MARK: &str = ":friends@";

/// Players one friends view may hold (its topic's 128 bytes bound it further).
pub const MAX_FRIENDS: usize = 32;

/// The topic of the live ranking of a set of players on a board (a "friends view"):
/// `board:{board}:friends@{p1}@{p2}...`. A board name never holds `:` or `@`, so this
/// is neither a board's topic nor a followed player's.
pub fn friends_topic<S: AsRef<str>>(board: &str, players: &[S]) -> String {
    let mut t = format!("{BOARD_PREFIX}{board}{FRIENDS_MARK}");
    for (i, p) in players.iter().enumerate() {
        if i > 0 {
            t.push('@');
        }
        t.push_str(p.as_ref());
    }
    t
}

/// The (board, players) of a `friends_topic`, if `topic` is one; not checked (see
/// [`check_friends`]).
pub fn friends_topic_parts(topic: &str) -> Option<(&str, Vec<&str>)> {
    let rest = topic.strip_prefix(BOARD_PREFIX)?;
    let (board, players) = rest.split_once(FRIENDS_MARK)?;
    Some((board, players.split('@').collect()))
}

/// Why a friends view's topic cannot be watched, if it cannot: its board name, too many
/// players, an empty one (`@@`), or one named twice.
pub fn check_friends(topic: &str, board: &str, players: &[&str]) -> Result<(), String> {
    if !is_valid(topic) {
        return Err(format!("{topic:?}: {BAD_TOPIC_MESSAGE}"));
    }
    if !crier_protocol::names::is_valid_board(board) {
        return Err(format!("{topic:?}: {board:?} is not a board name"));
    }
    if players.len() > MAX_FRIENDS {
        return Err(format!(
            "{topic:?} names {} players; a friends view holds at most {MAX_FRIENDS}",
            players.len()
        ));
    }
    if players.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "{topic:?}: an empty player name (players are separated by one @)"
        ));
    }
    let mut seen = std::collections::HashSet::with_capacity(players.len());
    if let Some(p) = players.iter().find(|p| !seen.insert(**p)) {
        return Err(format!("{topic:?} names {p:?} twice"));
    }
    Ok(())
}

/// Whether `topic` is a leaderboard's topic (`board_topic` of some board).
pub fn is_board_topic(topic: &str) -> bool {
    topic.starts_with(BOARD_PREFIX)
}

/// What every Pusher channel's topic starts with: `pusher/{app id}/{channel}`. A crier
/// topic name never holds `/`, so no crier client or publisher can name (forge or read)
/// one: each Pusher app is its own channel space, reachable only through `/app/{key}` and
/// `/apps/{id}/...` (src/pusher/).
pub const PUSHER_PREFIX: &str = "pusher/";

/// The longest Pusher channel name (the protocol's limit).
pub const MAX_PUSHER_CHANNEL: usize = 164;

/// A signed-in user's own channel (`pusher:signin`, docs/pusher.md): `#server-to-user-ID`,
/// the only channel name holding `#`. The HTTP API sends to it; only a connection signed
/// in as ID may subscribe to it.
pub const PUSHER_USER_CHANNEL: &str = "#server-to-user-";

/// The longest user id a Pusher connection may sign in as (the id is part of its channel).
pub const MAX_PUSHER_USER_ID: usize = 128;

fn is_pusher_channel_text(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'@' | b',' | b'.' | b';')
        })
}

/// A Pusher user id crier takes: 1-128 bytes of the channel charset (it names the
/// user's channel, `#server-to-user-ID`).
pub fn is_valid_pusher_user_id(id: &str) -> bool {
    id.len() <= MAX_PUSHER_USER_ID && is_pusher_channel_text(id)
}

/// The user a `#server-to-user-ID` channel belongs to, if it is one.
pub fn pusher_user_of(channel: &str) -> Option<&str> {
    channel
        .strip_prefix(PUSHER_USER_CHANNEL)
        .filter(|id| is_valid_pusher_user_id(id))
}

/// A Pusher channel name: 1-164 bytes of `A-Z a-z 0-9 _ - = @ , . ;` (the protocol's
/// charset, which needs no JSON escaping either), or a user's `#server-to-user-ID`.
pub fn is_valid_pusher_channel(name: &str) -> bool {
    name.len() <= MAX_PUSHER_CHANNEL
        && (is_pusher_channel_text(name) || pusher_user_of(name).is_some())
}

/// How a friends view's `:friends@` is spelled in a Pusher channel name.
const PUSHER_FRIENDS_MARK: &str = ";friends@";

/// The Pusher channel a crier topic is watched as from any Pusher app (`:` is not a Pusher
/// channel character): `board:NAME` is `board@NAME`, a followed player `board:NAME@P` is
/// `board@NAME@P`, a friends view `board:NAME:friends@A@B` is `board@NAME;friends@A@B`.
/// docs/pusher.md.
pub fn watch_channel(topic: &str) -> String {
    topic
        .replacen(':', "@", 1)
        .replacen(FRIENDS_MARK, PUSHER_FRIENDS_MARK, 1)
}

/// The crier topic a Pusher channel watches (the inverse of [`watch_channel`]), if it
/// names one. The topic's own rules (a friends view's set) are checked on subscribe.
pub fn watched_topic(channel: &str) -> Option<String> {
    let name = channel.strip_prefix("board@")?;
    let board = name.split(['@', ';']).next().unwrap_or_default();
    let topic = board_topic(&name.replacen(PUSHER_FRIENDS_MARK, FRIENDS_MARK, 1));
    (crier_protocol::names::is_valid_board(board) && is_valid(&topic)).then_some(topic)
}

/// A Pusher topic or the start of one, as a pattern names it (`[[namespace]]`):
/// `pusher/APP/` then part of a channel name (`pusher/1/presence-`).
pub fn is_pusher_pattern(s: &str) -> bool {
    let Some(rest) = s.strip_prefix(PUSHER_PREFIX) else {
        return false;
    };
    let Some((app, channel)) = rest.split_once('/') else {
        return false;
    };
    !app.is_empty()
        && app.len() <= 64
        && app
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
        && (channel.is_empty() || is_valid_pusher_channel(channel))
}

/// The topic of `channel` in Pusher app `app` (both already valid).
pub fn pusher_topic(app: &str, channel: &str) -> String {
    format!("{PUSHER_PREFIX}{app}/{channel}")
}

/// The channel a Pusher topic carries (None for any other topic).
pub fn pusher_channel(topic: &str) -> Option<&str> {
    let rest = topic.strip_prefix(PUSHER_PREFIX)?;
    rest.split_once('/').map(|(_, channel)| channel)
}

/// Why topic names were refused. A domain error: the HTTP layer (`api::error`) and the
/// WebSocket layer each map it to their own answer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TopicError {
    #[error("{BAD_TOPIC_MESSAGE}")]
    BadName,
    #[error("bad query string: {0}")]
    BadQuery(String),
    #[error("give at least one ?topic=NAME")]
    NoTopic,
    #[error("a connection may hold at most {0} topics")]
    TooMany(usize),
}

/// The `topic` parameters of a `/ws` or `/sse` query string, each validated, at most `max`.
pub fn topics_from_query(query: Option<&str>, max: usize) -> Result<Vec<String>, TopicError> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| TopicError::BadQuery(e.to_string()))?;
    let mut topics: Vec<String> = Vec::new();
    for (k, v) in pairs {
        if k == "topic" {
            if !is_valid(&v) {
                return Err(TopicError::BadName);
            }
            if topics.contains(&v) {
                continue;
            }
            // Refused at the first name past the limit: the dedup scan above stays
            // O(max) per name however long the query.
            if topics.len() == max {
                return Err(TopicError::TooMany(max));
            }
            topics.push(v);
        }
    }
    Ok(topics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn board_topics_and_their_pusher_channels_map_both_ways() {
        for (topic, channel) in [
            ("board:arena", "board@arena"),
            ("board:arena@p42", "board@arena@p42"),
            ("board:arena:friends@a@b.c", "board@arena;friends@a@b.c"),
        ] {
            assert_eq!(watch_channel(topic), channel);
            assert!(is_valid_pusher_channel(channel), "{channel}");
            assert_eq!(watched_topic(channel).as_deref(), Some(topic), "{channel}");
        }
        assert_eq!(watched_topic("scores"), None);
        assert_eq!(watched_topic("board@"), None);
    }

    #[test]
    fn friends_topics_parse_check_and_are_not_followed_players() {
        let t = friends_topic("arena", &["a", "b.c", "d:e"]);
        assert_eq!(t, "board:arena:friends@a@b.c@d:e");
        let (board, players) = friends_topic_parts(&t).unwrap();
        assert_eq!((board, players.clone()), ("arena", vec!["a", "b.c", "d:e"]));
        assert!(check_friends(&t, board, &players).is_ok());
        assert_eq!(player_topic_parts(&t), None);
        assert_eq!(
            player_topic_parts("board:arena@a@b"),
            Some(("arena", "a@b"))
        );
        assert_eq!(friends_topic_parts("board:arena@a"), None);
        let bad = |t: &str| {
            let (b, p) = friends_topic_parts(t).unwrap();
            check_friends(t, b, &p).unwrap_err()
        };
        assert!(bad("board:arena:friends@a@@b").contains("empty"));
        assert!(bad("board:arena:friends@a@").contains("empty"));
        assert!(bad("board:arena:friends@a@b@a").contains("twice"));
        assert!(bad("board:..:friends@a").contains("board name"));
        let many: Vec<String> = (0..=MAX_FRIENDS).map(|i| format!("{i}")).collect();
        assert!(bad(&friends_topic("a", &many)).contains("at most"));
    }

    #[test]
    fn accepts_and_rejects() {
        assert!(is_valid("scores"));
        assert!(is_valid("board:arena-1.eu_west"));
        assert!(is_valid(&"a".repeat(128)));
        assert!(!is_valid(""));
        assert!(!is_valid(&"a".repeat(129)));
        assert!(!is_valid("has space"));
        assert!(!is_valid("quote\""));
        assert!(!is_valid("slash/x"));
        assert!(!is_valid("é"));
    }

    #[test]
    fn query_topics() {
        assert_eq!(
            topics_from_query(Some("topic=a&topic=b&x=1&topic=a"), 8).unwrap(),
            vec!["a", "b"]
        );
        assert_eq!(
            topics_from_query(Some("topic=board%3Aarena"), 8).unwrap(),
            vec!["board:arena"]
        );
        assert_eq!(
            topics_from_query(Some("topic=bad%20name"), 8),
            Err(TopicError::BadName)
        );
        assert!(topics_from_query(None, 8).unwrap().is_empty());
        assert_eq!(
            topics_from_query(Some("topic=a&topic=b"), 1),
            Err(TopicError::TooMany(1))
        );
    }
}
