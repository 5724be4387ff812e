//! The webhook events and their JSON (docs/webhooks.md): one object per event, embedded
//! as is in a delivery's `events` array.

use std::fmt::Write;

/// Which of the four events a node sends (`webhook_events`; empty: all).
#[derive(Clone, Copy, Debug, Default)]
pub struct Filter {
    pub occupied: bool,
    pub vacated: bool,
    pub joined: bool,
    pub left: bool,
}

impl Filter {
    /// From the setting's names (already checked by `Config::check`); none named: all.
    pub fn new(names: &[String]) -> Self {
        let all = names.is_empty();
        let has = |n: &str| all || names.iter().any(|x| x == n);
        Filter {
            occupied: has("topic_occupied"),
            vacated: has("topic_vacated"),
            joined: has("member_joined"),
            left: has("member_left"),
        }
    }

    pub fn topics(&self) -> bool {
        self.occupied || self.vacated
    }

    pub fn members(&self) -> bool {
        self.joined || self.left
    }
}

/// The wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `{"name":"topic_occupied","topic":"t","time_ms":N}` (or `topic_vacated`).
pub fn topic(name: &str, topic: &str) -> String {
    // Topic names need no escaping (topic.rs charset).
    format!(
        r#"{{"name":"{name}","topic":"{topic}","time_ms":{}}}"#,
        now_ms()
    )
}

/// `{"name":"member_joined","topic":"t","time_ms":N,"client":"7","user":…,"info":…}`
/// (or `member_left`): the member as presence shows it (docs/protocol.md, "Presence").
pub fn member(
    name: &str,
    topic: &str,
    client: u64,
    user: Option<&str>,
    info: Option<&str>,
) -> String {
    let user = user.map_or_else(
        || "null".to_string(),
        |u| serde_json::to_string(u).expect("a string serializes"),
    );
    let mut s = String::with_capacity(96 + topic.len() + user.len());
    let _ = write!(
        s,
        r#"{{"name":"{name}","topic":"{topic}","time_ms":{},"client":"{client}","user":{user},"info":{}}}"#,
        now_ms(),
        info.unwrap_or("null")
    );
    s
}

/// A Pusher webhook event (docs/pusher.md): `{"name":NAME,"channel":C}` plus `extra`
/// fields, already JSON (`,"user_id":"u"`).
pub fn pusher(name: &str, channel: &str, extra: &str) -> String {
    // Pusher channel names need no escaping (topic.rs charset).
    format!(r#"{{"name":"{name}","channel":"{channel}"{extra}}}"#)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_json() {
        let v: serde_json::Value = serde_json::from_str(&topic("topic_occupied", "a:b")).unwrap();
        assert_eq!(v["name"], "topic_occupied");
        assert_eq!(v["topic"], "a:b");
        let m = member(
            "member_joined",
            "p:1",
            7,
            Some("al\"ice"),
            Some(r#"{"n":1}"#),
        );
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        assert_eq!(v["client"], "7");
        assert_eq!(v["user"], "al\"ice");
        assert_eq!(v["info"]["n"], 1);
        let v: serde_json::Value =
            serde_json::from_str(&member("member_left", "p:1", 8, None, None)).unwrap();
        assert!(v["user"].is_null() && v["info"].is_null());
    }

    #[test]
    fn an_empty_filter_sends_all() {
        let f = Filter::new(&[]);
        assert!(f.occupied && f.vacated && f.joined && f.left);
        let f = Filter::new(&["member_left".into()]);
        assert!(!f.occupied && !f.vacated && !f.joined && f.left);
    }
}
