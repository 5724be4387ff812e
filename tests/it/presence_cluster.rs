//! Presence across nodes under `--redis` (issue 17, docs/scaling.md "Presence"), with a
//! real redis-server and real `crier` processes: joins and leaves seen by every node's
//! subscribers in one order, one member list and one count on every node, a SIGKILLed
//! node's members leaving within the documented time and announced once, a node killed
//! again right after it came back leaving no ghost, and Redis restarted under the nodes.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::auth::{hs256, now};
use crate::common::http::{get, ws};
use crate::common::redis::RedisServer;
use crate::common::{next_json, serve_binary, topic_command, within, Proc, Ws};

const SECRET: &str = "presence-cluster-secret-of-32-bytes!";
const TOPIC: &str = "lobby:cluster";
/// The user of the watchers, whose own notices the tests skip.
const WATCHER: &str = "watcher";
/// docs/scaling.md: a dead node's members are gone within 7 s of its death (heartbeat
/// 1 s, dead after 5 s, looked for every second). The test allows for a loaded machine.
const REAPED_WITHIN: Duration = Duration::from_secs(12);
/// Writes that need no death to be noticed: well under a second, on a loaded CI machine
/// more.
const SETTLE: Duration = Duration::from_secs(10);

struct Node {
    proc: Proc,
    addr: String,
    _dir: tempfile::TempDir,
}

fn settings(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("crier.toml");
    std::fs::write(
        &path,
        format!(
            "jwt_secret = \"{SECRET}\"\n\
             [[namespace]]\npattern = \"lobby:*\"\npresence = true\njoin_leave = true\n"
        ),
    )
    .unwrap();
    path
}

fn start(redis: &RedisServer) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let cfg = settings(dir.path());
    let (proc, addr) = serve_binary(
        dir.path(),
        "127.0.0.1:0",
        &["--redis", &redis.url(), "--config", cfg.to_str().unwrap()],
    );
    Node {
        proc,
        addr,
        _dir: dir,
    }
}

fn token(sub: &str) -> String {
    hs256(
        &json!({"sub": sub, "exp": now() + 600, "info": {"name": sub}}),
        SECRET,
    )
}

/// A connection subscribed to the topic (as `user` when given).
async fn member(node: &Node, user: Option<&str>) -> Ws {
    let q = user
        .map(|u| format!("?token={}", token(u)))
        .unwrap_or_default();
    let mut w = ws(&node.addr, &q).await;
    topic_command(&mut w, "subscribe", TOPIC).await;
    w
}

/// The next join or leave of the topic that is not a watcher's: ("join"/"leave", client
/// id). A watcher's own join may reach the others after they started reading (it is
/// written once its `subscribed` reply is out), so the watchers' are left out of every
/// comparison.
async fn next_notice(w: &mut Ws) -> (String, String) {
    loop {
        let v = next_json(w).await;
        if v["topic"] != TOPIC || v.get("op").is_some() {
            continue;
        }
        for kind in ["join", "leave"] {
            if let Some(m) = v.get(kind) {
                if m["user"] == WATCHER {
                    break;
                }
                return (kind.into(), m["client"].as_str().unwrap().into());
            }
        }
    }
}

async fn stats(node: &Node) -> Option<(u64, u64)> {
    let (s, v) = get(&node.addr, &format!("/api/topics/{TOPIC}/presence/stats")).await;
    (s == 200).then(|| (v["clients"].as_u64().unwrap(), v["users"].as_u64().unwrap()))
}

/// Every member's client id, in order, read page by page (pages of 4).
async fn members(node: &Node) -> Vec<String> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (s, v) = get(
            &node.addr,
            &format!("/api/topics/{TOPIC}/presence?limit=4{cursor}"),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        for m in v["members"].as_array().unwrap() {
            out.push(m["client"].as_str().unwrap().to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = format!("&cursor={c}"),
            None => return out,
        }
    }
}

/// Waits until every node answers `clients` members (polling: the condition is Redis's).
async fn await_clients(nodes: &[&Node], clients: u64, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let mut all = true;
        for n in nodes {
            all &= stats(n).await.map(|s| s.0) == Some(clients);
        }
        if all {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "nodes did not all count {clients} members within {within:?}: {:?}",
            {
                let mut s = Vec::new();
                for n in nodes {
                    s.push(stats(n).await);
                }
                s
            }
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One watcher per node, all counted by every node before anything else joins.
async fn watchers(nodes: &[&Node]) -> Vec<Ws> {
    let mut out = Vec::new();
    for n in nodes {
        out.push(member(n, Some(WATCHER)).await);
    }
    await_clients(nodes, nodes.len() as u64, SETTLE).await;
    out
}

#[tokio::test]
async fn joins_and_leaves_reach_every_node_in_one_order() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let nodes = [start(&redis), start(&redis), start(&redis)];
    let refs: Vec<&Node> = nodes.iter().collect();
    let mut watchers = watchers(&refs).await;

    // 12 members join at once over the three nodes (users u0..u3, three connections
    // each), then 6 of them leave at once.
    let joins = (0..12).map(|i| {
        let node = &nodes[i % 3];
        async move { member(node, Some(&format!("u{}", i % 4))).await }
    });
    let mut joined = futures_util::future::join_all(joins).await;
    let leaving: Vec<Ws> = joined.drain(..6).collect();
    drop(leaving);

    let mut seen: Vec<Vec<(String, String)>> = Vec::new();
    for w in &mut watchers {
        let mut got = Vec::new();
        while got.len() < 18 {
            got.push(within("notices", next_notice(w)).await);
        }
        seen.push(got);
    }
    assert_eq!(seen[0], seen[1], "node a and node b saw another order");
    assert_eq!(seen[0], seen[2], "node a and node c saw another order");
    let ids: HashSet<&String> = seen[0].iter().map(|(_, id)| id).collect();
    assert_eq!(ids.len(), 12, "member ids are unique across the nodes");

    await_clients(&refs, 3 + 6, SETTLE).await;
    let lists = [
        members(&nodes[0]).await,
        members(&nodes[1]).await,
        members(&nodes[2]).await,
    ];
    assert_eq!(lists[0].len(), 9);
    assert_eq!(lists[0], lists[1]);
    assert_eq!(lists[0], lists[2]);
    // users: the watchers' one, and u0..u3 (each still has a connection among the six).
    for n in &nodes {
        assert_eq!(stats(n).await, Some((9, 1 + 4)));
    }
}

#[tokio::test]
async fn a_killed_nodes_members_leave_once_and_a_storm_leaves_no_ghost() {
    crate::need_redis!();
    let redis = RedisServer::start();
    let a = start(&redis);
    let b = start(&redis);
    let mut c = start(&redis);
    let mut watchers = watchers(&[&a, &b]).await;
    let mut on_c = Vec::new();
    for i in 0..4 {
        on_c.push(member(&c, Some(&format!("c{i}"))).await);
    }
    for w in &mut watchers {
        for _ in 0..4 {
            assert_eq!(next_notice(w).await.0, "join");
        }
    }
    await_clients(&[&a, &b, &c], 2 + 4, SETTLE).await;

    // SIGKILL: nobody says goodbye; the survivors find it silent and remove its members.
    let _ = c.proc.0.kill();
    let killed = Instant::now();
    drop(on_c);
    for w in &mut watchers {
        for _ in 0..4 {
            let (kind, _) = tokio::time::timeout(REAPED_WITHIN, next_notice(w))
                .await
                .expect("a dead node's members leave in time");
            assert_eq!(kind, "leave");
        }
    }
    eprintln!(
        "a SIGKILLed node's 4 members left after {:?}",
        killed.elapsed()
    );
    assert!(killed.elapsed() < REAPED_WITHIN);
    // Announced once: the next notice each watcher gets is a fresh join, not a second
    // leave.
    let _fresh = member(&b, None).await;
    let mut fresh_id = None;
    for w in &mut watchers {
        let (kind, id) = next_notice(w).await;
        assert_eq!(kind, "join", "a leave announced twice?");
        assert_eq!(*fresh_id.get_or_insert(id.clone()), id);
    }
    assert_eq!(stats(&a).await, Some((3, 1)));

    // A storm: c comes back, takes members, is killed again at once, comes back again.
    c = start(&redis);
    let mut doomed = Vec::new();
    for _ in 0..3 {
        doomed.push(member(&c, None).await);
    }
    let _ = c.proc.0.kill();
    drop(doomed);
    c = start(&redis);
    let mut kept = Vec::new();
    for _ in 0..2 {
        kept.push(member(&c, None).await);
    }
    // The 3 doomed members leave, the 2 kept ones stay: 2 watchers + 1 fresh + 2.
    let took = await_clients(&[&a, &b, &c], 5, REAPED_WITHIN).await;
    eprintln!("storm settled after {took:?}");
    let live = members(&a).await;
    assert_eq!(live.len(), 5);
    assert_eq!(live, members(&c).await);
}

#[tokio::test]
async fn redis_restarted_under_the_nodes_gets_the_members_back() {
    crate::need_redis!();
    let mut redis = RedisServer::start();
    let a = start(&redis);
    let b = start(&redis);
    let _held = [
        member(&a, Some("x")).await,
        member(&a, None).await,
        member(&b, Some("y")).await,
    ];
    await_clients(&[&a, &b], 3, SETTLE).await;

    redis.kill();
    // Reads say why they cannot answer; nothing hangs.
    let mut refused = false;
    for _ in 0..100 {
        let (s, v) = get(&a.addr, &format!("/api/topics/{TOPIC}/presence/stats")).await;
        if s == 503 {
            assert!(v.to_string().contains("redis"), "{v}");
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "a presence read with Redis down answers 503");

    // Without persistence Redis comes back empty: the nodes write their members again.
    redis.restart();
    let took = await_clients(&[&a, &b], 3, SETTLE).await;
    eprintln!("members back {took:?} after the Redis restart");
    assert_eq!(stats(&a).await, Some((3, 2)));
    assert_eq!(members(&a).await, members(&b).await);
}
