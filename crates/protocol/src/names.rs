//! Which topic and board names exist. The charsets need no JSON or URL escaping, which is
//! why the server can splice a name into an envelope unescaped; the load tool checks its
//! flags against the same rules so it fails before connecting, not with a 400 mid-run.

pub const MAX_TOPIC_LEN: usize = 128;

pub const MAX_BOARD_NAME: usize = 64;

/// `.` and `..` are path segments, not names: a URL holding them is rewritten by clients,
/// proxies and file-system-minded code on the way (`/api/boards/../scores`), so the name a
/// client meant and the one the server sees could differ.
fn is_dot_segment(name: &str) -> bool {
    name == "." || name == ".."
}

/// A topic name: 1-128 bytes of `A-Z a-z 0-9 _ - . : @`, and not `.` or `..`.
pub fn is_valid_topic(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_TOPIC_LEN
        && !is_dot_segment(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':' | b'@'))
}

/// A leaderboard name: 1-64 bytes of `A-Z a-z 0-9 _ - .` (no `:`, as its topic is
/// `board:NAME`), and not `.` or `..`.
pub fn is_valid_board(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_BOARD_NAME
        && !is_dot_segment(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics() {
        assert!(is_valid_topic("scores"));
        assert!(is_valid_topic("board:arena-1.eu_west"));
        assert!(is_valid_topic("board:arena@p42"));
        assert!(is_valid_topic(&"a".repeat(128)));
        assert!(!is_valid_topic(""));
        assert!(!is_valid_topic(&"a".repeat(129)));
        assert!(!is_valid_topic("has space"));
        assert!(!is_valid_topic("quote\""));
        assert!(!is_valid_topic("slash/x"));
        assert!(!is_valid_topic("é"));
        assert!(!is_valid_topic("."));
        assert!(!is_valid_topic(".."));
        assert!(is_valid_topic("..."));
        assert!(is_valid_topic("a.."));
    }

    #[test]
    fn boards() {
        assert!(is_valid_board("arena-1.eu_west"));
        assert!(is_valid_board(&"b".repeat(64)));
        assert!(!is_valid_board(&"b".repeat(65)));
        assert!(!is_valid_board(""));
        assert!(!is_valid_board("board:x"));
        assert!(!is_valid_board("."));
        assert!(!is_valid_board(".."));
        assert!(is_valid_board(".a"));
    }
}
