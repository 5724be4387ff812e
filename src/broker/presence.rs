//! Presence on one node: who is subscribed to each topic of a `presence = true` namespace
//! (docs/protocol.md, "Presence"). A member is a connection: its client id, its `user`
//! (the token's `sub`, or none) and its `info` (the token's `info` claim, at most
//! `auth::token::MAX_INFO_BYTES` of JSON).
//!
//! Kept behind the broker seam (`Broker::presence_*`) so that a cluster-wide broker can
//! keep it elsewhere: today the memory broker keeps the node's members here, and so does
//! the Redis broker (presence is per node under `--redis` for now). With `join_leave`,
//! each join and leave is framed once and handed to the sink ([`BrokerSink::announce`])
//! under the topic's presence lock, so every subscriber sees a topic's joins and leaves
//! in the order they happened.
//!
//! Bounded by what it mirrors: one member per subscription of a presence topic, so at
//! most `max_connections` × `max_topics_per_connection`, and no more topics than the
//! broker's table holds. Stats are O(1): the member map's length and the count of
//! distinct users, kept as members come and go.
//!
//! Lock order: presence shard lock → hub shard lock → hub topic lock → client queue lock;
//! nothing takes a presence lock while holding another.

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::Mutex;

use super::BrokerSink;
use crate::config::Config;
use crate::hub::{MemberChange, MemberEvent, Notice, Wakeups};
use crate::topic::TopicName;

const SHARDS: usize = 16;
/// The most bytes of members one page holds (at least one member is always given), so a
/// read of a topic whose members carry large `info`s still fits a client's queue.
pub const MAX_PAGE_BYTES: usize = 256 * 1024;

/// Who a connection is, as presence shows it: taken from its token when it subscribes
/// (none: anonymous).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// The token's `sub`.
    pub user: Option<Arc<str>>,
    /// The token's `info` claim, as compact JSON.
    pub info: Option<Arc<str>>,
}

/// One member of a topic: a connection subscribed to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member {
    pub client: u64,
    pub user: Option<Arc<str>>,
    /// JSON text (embedded as is).
    pub info: Option<Arc<str>>,
}

impl Member {
    /// `{"client":"N","user":"..."|null,"info":...|null}`. The client id is a string on
    /// the wire: clients treat it as opaque, so a cluster-wide presence can make it
    /// unique across nodes (a node prefix) without changing its type.
    pub fn write_json(&self, out: &mut String) {
        use std::fmt::Write;
        let user = match &self.user {
            Some(u) => serde_json::to_string(&**u).expect("a string serializes"),
            None => "null".into(),
        };
        let info = self.info.as_deref().unwrap_or("null");
        let _ = write!(
            out,
            r#"{{"client":"{}","user":{user},"info":{info}}}"#,
            self.client
        );
    }

    /// About the length of `write_json`'s output (user escapes aside).
    fn json_len(&self) -> usize {
        42 + self.user.as_ref().map_or(0, |u| u.len()) + self.info.as_ref().map_or(0, |i| i.len())
    }

    pub fn to_json(&self) -> String {
        let mut s = String::new();
        self.write_json(&mut s);
        s
    }
}

/// A topic's counts: connections, and distinct `user`s among them (anonymous members
/// count as clients only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PresenceStats {
    pub clients: usize,
    pub users: usize,
}

/// A page of members in client-id order; `next` is the cursor of the next page (the last
/// client id given), None on the last page.
#[derive(Clone, Debug, Default)]
pub struct PresencePage {
    pub members: Vec<Member>,
    pub next: Option<u64>,
}

#[derive(Default)]
struct TopicPresence {
    members: BTreeMap<u64, Member>,
    /// Connections per user: its length is the `users` count.
    users: HashMap<Arc<str>, u32>,
}

/// The members of every presence topic on this node.
pub struct Presence {
    cfg: Config,
    /// Some namespace has `presence`: when none does, every call returns at once.
    any: bool,
    /// Whether joins and leaves are announced to the sink: not when the node's members
    /// are only its own record and the cluster announces them (`redis::presence`).
    announce: bool,
    sink: Arc<dyn BrokerSink>,
    shards: Box<[Mutex<HashMap<TopicName, TopicPresence>>]>,
}

impl Presence {
    pub fn new(cfg: &Config, sink: Arc<dyn BrokerSink>) -> Self {
        Presence {
            any: cfg.presence_anywhere(),
            announce: true,
            cfg: cfg.clone(),
            sink,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// This node's record of its own members, announcing nothing: the Redis broker keeps
    /// it so that it can write them to the cluster's view again (after Redis was down, or
    /// the node was taken for dead).
    pub fn quiet(cfg: &Config, sink: Arc<dyn BrokerSink>) -> Self {
        Presence {
            announce: false,
            ..Presence::new(cfg, sink)
        }
    }

    /// Every topic with members on this node.
    pub fn topics(&self) -> Vec<TopicName> {
        self.shards
            .iter()
            .flat_map(|s| s.lock().keys().cloned().collect::<Vec<_>>())
            .collect()
    }

    fn shard(&self, topic: &str) -> &Mutex<HashMap<TopicName, TopicPresence>> {
        let mut h = DefaultHasher::new();
        topic.hash(&mut h);
        &self.shards[(h.finish() as usize) % SHARDS]
    }

    /// The connection `client` joined `topic` (a no-op for topics without presence, or
    /// a member already there); returns whether it became a member.
    pub fn join(&self, topic: &str, client: u64, who: &Identity) -> bool {
        if !self.any {
            return false;
        }
        let mode = self.cfg.presence(topic);
        if !mode.members {
            return false;
        }
        let member = Member {
            client,
            user: who.user.clone(),
            info: who.info.clone(),
        };
        let mut wake = Wakeups::default();
        let mut shard = self.shard(topic).lock();
        let t = shard.entry(topic.into()).or_default();
        if t.members.contains_key(&client) {
            return false;
        }
        let mut first = false;
        if let Some(u) = &member.user {
            let n = t.users.entry(u.clone()).or_insert(0);
            *n += 1;
            first = *n == 1;
        }
        if mode.join_leave && self.announce {
            let n = notice(topic, MemberChange::Join, &member, first);
            self.sink.announce(topic, &n, &mut wake);
        }
        t.members.insert(client, member);
        drop(shard);
        wake.wake();
        true
    }

    /// The connection `client` left `topic` (unsubscribed, or gone); returns the member
    /// it was, if it was one.
    pub fn leave(&self, topic: &str, client: u64) -> Option<Member> {
        if !self.any {
            return None;
        }
        let mut wake = Wakeups::default();
        let mut shard = self.shard(topic).lock();
        let t = shard.get_mut(topic)?;
        let member = t.members.remove(&client)?;
        let mut last = false;
        if let Some(u) = &member.user {
            if let Some(n) = t.users.get_mut(u) {
                *n -= 1;
                if *n == 0 {
                    t.users.remove(u);
                    last = true;
                }
            }
        }
        if t.members.is_empty() {
            shard.remove(topic);
        }
        if self.announce && self.cfg.presence(topic).join_leave {
            let n = notice(topic, MemberChange::Leave, &member, last);
            self.sink.announce(topic, &n, &mut wake);
        }
        drop(shard);
        wake.wake();
        Some(member)
    }

    /// Up to `limit` members with a client id after `after`, in client-id order, within
    /// `MAX_PAGE_BYTES` of JSON.
    pub fn members(&self, topic: &str, after: Option<u64>, limit: usize) -> PresencePage {
        let shard = self.shard(topic).lock();
        let Some(t) = shard.get(topic) else {
            return PresencePage::default();
        };
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut members = Vec::new();
        let mut bytes = 0;
        let mut more = false;
        for m in t.members.range((from, Bound::Unbounded)).map(|(_, m)| m) {
            bytes += m.json_len();
            if members.len() == limit || (!members.is_empty() && bytes > MAX_PAGE_BYTES) {
                more = true;
                break;
            }
            members.push(m.clone());
        }
        drop(shard);
        let next = more.then(|| members.last().map(|m| m.client)).flatten();
        PresencePage { members, next }
    }

    /// The topic's counts, O(1).
    pub fn stats(&self, topic: &str) -> PresenceStats {
        let shard = self.shard(topic).lock();
        shard
            .get(topic)
            .map_or_else(PresenceStats::default, |t| PresenceStats {
                clients: t.members.len(),
                users: t.users.len(),
            })
    }
}

/// `{"topic":"t","join":{member}}` (or `leave`), framed for each transport; on SSE a
/// named event (`join` / `leave`). `edge`: the user's first connection in the topic (a
/// join) or its last (a leave). The cluster's presence frames the notices it receives
/// from Redis here too, so one node and many say the same.
pub fn notice(topic: &str, change: MemberChange, member: &Member, edge: bool) -> Notice {
    let kind = match change {
        MemberChange::Join => "join",
        MemberChange::Leave => "leave",
    };
    let mut json = String::with_capacity(64 + topic.len());
    // Topic names need no escaping (topic.rs charset).
    json.push_str(r#"{"topic":""#);
    json.push_str(topic);
    json.push_str(r#"",""#);
    json.push_str(kind);
    json.push_str(r#"":"#);
    member.write_json(&mut json);
    json.push('}');
    Notice {
        ws: crate::framing::ws_text(json.as_bytes()),
        sse: crate::framing::sse_event(Some(kind), json.as_bytes()),
        member: Some(Arc::new(MemberEvent {
            kind: change,
            client: member.client,
            user: member.user.clone(),
            info: member.info.clone(),
            user_first: edge && change == MemberChange::Join,
            user_last: edge && change == MemberChange::Leave,
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Namespace;

    struct Recorder(Mutex<Vec<String>>, Mutex<Vec<MemberEvent>>);

    impl BrokerSink for Recorder {
        fn deliver(
            &self,
            _: &Arc<crate::publication::Publication>,
            _: &str,
            _: bool,
            _: &mut Wakeups,
        ) -> usize {
            0
        }
        fn may_have_missed(&self, _: &str) {}
        fn restarted(&self, _: &str) {}
        fn announce(&self, _: &str, notice: &Notice, _: &mut Wakeups) {
            let ws = &notice.ws[2..];
            self.0.lock().push(String::from_utf8(ws.to_vec()).unwrap());
            self.1
                .lock()
                .push((**notice.member.as_ref().unwrap()).clone());
        }
        fn subscriber_count(&self, _: &str) -> usize {
            0
        }
        fn topic_counts(&self) -> Vec<(TopicName, usize)> {
            Vec::new()
        }
    }

    fn presence() -> (Presence, Arc<Recorder>) {
        let mut cfg = Config::default();
        for (pattern, presence, join_leave) in [("p:*", true, false), ("j:*", true, true)] {
            cfg.namespaces.push(Namespace {
                pattern: pattern.into(),
                history_size: 0,
                history_ttl: std::time::Duration::from_secs(1),
                durable: false,
                presence,
                join_leave,
            });
        }
        let rec = Arc::new(Recorder(Mutex::new(Vec::new()), Mutex::new(Vec::new())));
        (Presence::new(&cfg, rec.clone()), rec)
    }

    fn user(u: &str) -> Identity {
        Identity {
            user: Some(u.into()),
            info: Some(r#"{"n":1}"#.into()),
        }
    }

    #[test]
    fn counts_clients_and_distinct_users() {
        let (p, rec) = presence();
        p.join("p:a", 1, &user("alice"));
        p.join("p:a", 2, &user("alice"));
        p.join("p:a", 3, &Identity::default());
        p.join("p:a", 3, &Identity::default());
        p.join("other", 4, &user("bob"));
        assert_eq!(
            p.stats("p:a"),
            PresenceStats {
                clients: 3,
                users: 1
            }
        );
        assert_eq!(p.stats("other"), PresenceStats::default());
        p.leave("p:a", 1);
        assert_eq!(p.stats("p:a").users, 1);
        p.leave("p:a", 2);
        assert_eq!(
            p.stats("p:a"),
            PresenceStats {
                clients: 1,
                users: 0
            }
        );
        p.leave("p:a", 3);
        assert!(p.shards.iter().all(|s| s.lock().is_empty()));
        assert!(rec.0.lock().is_empty(), "no join_leave, no notices");
    }

    #[test]
    fn pages_in_client_order() {
        let (p, _) = presence();
        for c in 1..=5 {
            p.join("p:a", c, &Identity::default());
        }
        let first = p.members("p:a", None, 2);
        assert_eq!(
            first.members.iter().map(|m| m.client).collect::<Vec<_>>(),
            [1, 2]
        );
        let rest = p.members("p:a", first.next, 10);
        assert_eq!(
            rest.members.iter().map(|m| m.client).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        assert_eq!(rest.next, None);
        let all = p.members("p:a", None, 5);
        assert_eq!((all.members.len(), all.next), (5, None));
    }

    #[test]
    fn a_page_stops_at_its_byte_budget() {
        let (p, _) = presence();
        let big = Identity {
            user: None,
            info: Some(format!("\"{}\"", "x".repeat(1000)).into()),
        };
        for c in 1..=400 {
            p.join("p:big", c, &big);
        }
        let page = p.members("p:big", None, 1000);
        let n = page.members.len();
        assert!((200..=260).contains(&n), "{n} members of ~1 KiB in 256 KiB");
        assert_eq!(page.next, Some(n as u64));
        let rest = p.members("p:big", page.next, 1000);
        assert_eq!(rest.members.len() + n, 400);
    }

    #[test]
    fn join_leave_notices_carry_the_member() {
        let (p, rec) = presence();
        p.join("j:a", 7, &user("al\"ice"));
        p.leave("j:a", 7);
        p.leave("j:a", 7);
        assert_eq!(
            *rec.0.lock(),
            [
                r#"{"topic":"j:a","join":{"client":"7","user":"al\"ice","info":{"n":1}}}"#,
                r#"{"topic":"j:a","leave":{"client":"7","user":"al\"ice","info":{"n":1}}}"#,
            ]
        );
    }

    #[test]
    fn notices_say_a_users_first_join_and_last_leave() {
        let (p, rec) = presence();
        p.join("j:a", 1, &user("alice"));
        p.join("j:a", 2, &user("alice"));
        p.join("j:a", 3, &Identity::default());
        p.leave("j:a", 1);
        p.leave("j:a", 3);
        p.leave("j:a", 2);
        let got: Vec<(MemberChange, u64, bool, bool)> = rec
            .1
            .lock()
            .iter()
            .map(|e| (e.kind, e.client, e.user_first, e.user_last))
            .collect();
        use MemberChange::{Join, Leave};
        assert_eq!(
            got,
            [
                (Join, 1, true, false),
                (Join, 2, false, false),
                (Join, 3, false, false),
                (Leave, 1, false, false),
                (Leave, 3, false, false),
                (Leave, 2, false, true),
            ]
        );
        let e = &rec.1.lock()[0];
        assert_eq!(
            (e.user.as_deref(), e.info.as_deref()),
            (Some("alice"), Some(r#"{"n":1}"#))
        );
    }

    #[test]
    fn a_quiet_record_announces_nothing() {
        let (p, rec) = presence();
        let q = Presence::quiet(&p.cfg, rec.clone());
        assert!(q.join("j:a", 1, &user("alice")));
        assert!(!q.join("j:a", 1, &user("alice")));
        assert_eq!(q.topics(), [TopicName::from("j:a")]);
        assert_eq!(q.leave("j:a", 1).map(|m| m.client), Some(1));
        assert!(rec.0.lock().is_empty());
    }
}
