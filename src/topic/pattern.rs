//! Topic patterns: an exact name, or a prefix ending in `*` (`chat:*`), and `*` alone for
//! everything. One syntax for token `topics`, `private_topics`, key scopes and board
//! policies, the same as `[[namespace]]` patterns, so an operator learns it once. A rule
//! about topic names, so it sits with them, below the settings and everyone who reads them.

use std::fmt;

/// One pattern, validated when it is read (config or token), so matching never fails.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicPattern {
    Exact(Box<str>),
    /// Everything starting with this (empty for `*`).
    Prefix(Box<str>),
}

impl TopicPattern {
    /// Reads `name` or `prefix*`, where the name (or prefix, unless empty) obeys the topic
    /// name rules.
    pub fn parse(s: &str) -> Result<TopicPattern, String> {
        match s.strip_suffix('*') {
            Some("") => Ok(TopicPattern::Prefix("".into())),
            Some(prefix) if super::is_valid(prefix) || super::is_pusher_pattern(prefix) => {
                Ok(TopicPattern::Prefix(prefix.into()))
            }
            None if super::is_valid(s) || super::is_pusher_pattern(s) => {
                Ok(TopicPattern::Exact(s.into()))
            }
            _ => Err(format!(
                "{s:?} is not a topic pattern: a topic name, optionally ending in * (chat:*), or *"
            )),
        }
    }

    pub fn matches(&self, topic: &str) -> bool {
        match self {
            TopicPattern::Exact(name) => **name == *topic,
            TopicPattern::Prefix(prefix) => topic.starts_with(&**prefix),
        }
    }
}

impl fmt::Display for TopicPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TopicPattern::Exact(name) => f.write_str(name),
            TopicPattern::Prefix(prefix) => write!(f, "{prefix}*"),
        }
    }
}

/// A list of patterns; a name matches when any pattern does. Boxed slice: a token's grant
/// is held for a connection's life, so no spare capacity.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Patterns(Box<[TopicPattern]>);

impl Patterns {
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Patterns, String> {
        list.iter()
            .map(|s| TopicPattern::parse(s.as_ref()))
            .collect::<Result<Vec<_>, _>>()
            .map(|v| Patterns(v.into_boxed_slice()))
    }

    pub fn matches(&self, topic: &str) -> bool {
        self.0.iter().any(|p| p.matches(topic))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Display for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("none");
        }
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_prefix_and_everything() {
        let p = Patterns::parse(&["chat:*", "user:42", "*"][..2]).unwrap();
        assert!(p.matches("chat:lobby"));
        assert!(p.matches("chat:"));
        assert!(p.matches("user:42"));
        assert!(!p.matches("user:420"));
        assert!(!p.matches("cha"));
        assert!(Patterns::parse(&["*"]).unwrap().matches("anything"));
        assert!(!Patterns::default().matches("x"));
        assert_eq!(p.to_string(), "chat:*, user:42");
    }

    #[test]
    fn refuses_what_is_not_a_pattern() {
        for bad in [
            "",
            "a b*",
            "a*b",
            "**",
            "x/y",
            &"a".repeat(129),
            "pusher/1",
            "pusher//x",
        ] {
            assert!(TopicPattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pusher_topics_are_named_by_app() {
        let p = Patterns::parse(&["pusher/1/*", "pusher/2/presence-*", "pusher/3/news"]).unwrap();
        assert!(p.matches("pusher/1/anything"));
        assert!(p.matches("pusher/2/presence-room") && !p.matches("pusher/2/room"));
        assert!(p.matches("pusher/3/news") && !p.matches("pusher/3/newsy"));
        assert!(!p.matches("pusher/10/x"));
    }
}
