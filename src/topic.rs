//! Topic names. Validated once at the edge (API, WebSocket command, SSE query) so the hub
//! and the envelope encoder can trust them: the charset needs no JSON escaping.

use std::sync::Arc;

pub const MAX_TOPIC_LEN: usize = 128;

/// A validated topic name, cheap to clone into many registries.
pub type TopicName = Arc<str>;

pub const BAD_TOPIC_MESSAGE: &str = "topic name must be 1-128 bytes of A-Z a-z 0-9 _ - . :";

pub fn is_valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
