//! Leaderboard scores are exactly as durable as their acknowledgements say (issue #6, item
//! 6), proven against the real `crier` binary:
//!
//! * `sigkill_leaves_every_board_as_acknowledged`: concurrent posts for the same few
//!   players on a `best`, a `latest` and an `increment` board, plus an `increment` board
//!   that is reset meanwhile; the process is SIGKILLed at a random moment, restarted, and
//!   every board must be what SOME serial order of the acknowledged requests (plus any
//!   subset of those in flight at the kill) yields, consistent with real time.
//! * `full_disk_gets_503_and_changes_nothing`: the data directory is a small tmpfs that is
//!   then filled up, a real full disk; the write gets 503, readers and watchers see no
//!   change, and once space is freed the retried write counts once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::disk::{fill_disk, Tmpfs};
use crate::common::http::post_acked;
use crate::common::{next_json, serve_binary, wait_until, WAIT};
use crier::http_client::HttpClient;
use parking_lot::Mutex;
use rand::Rng;
use serde_json::{json, Value};

/// Concurrent sequential writers per player on the boards with concurrent writers.
const WRITERS: u64 = 4;
const PLAYERS: usize = 3;
const RESET_PLAYERS: usize = 4;
const ROUNDS: u64 = 4;

/// One score post as the client saw it.
#[derive(Clone, Debug)]
struct Post {
    board: &'static str,
    player: String,
    writer: u64,
    /// Position in its writer's sequence.
    idx: u64,
    value: f64,
    send: Instant,
    /// Acknowledged (200): when, and the player's score the answer reported.
    ack: Option<(Instant, f64)>,
}

#[derive(Clone, Debug)]
struct Reset {
    send: Instant,
    ack: Option<Instant>,
}

#[derive(Default)]
struct Log {
    posts: Vec<Post>,
    resets: Vec<Reset>,
    /// Scores seen by reads that completed: (board, player) -> highest seen. Reads show
    /// only what is durable, so a crash must not take it back.
    read: HashMap<(&'static str, String), f64>,
}

async fn board_scores(http: &HttpClient, addr: &str, board: &str) -> HashMap<String, f64> {
    let (status, body) = http
        .get(&format!("http://{addr}/api/boards/{board}?limit=1000"))
        .await
        .unwrap();
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let page: Value = serde_json::from_slice(&body).unwrap();
    page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["player"].as_str().unwrap().to_owned(),
                e["score"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// A writer posting `value(idx)` for one player until the server dies.
fn spawn_writer(
    log: Arc<Mutex<Log>>,
    addr: &str,
    board: &'static str,
    player: String,
    writer: u64,
    value: impl Fn(u64) -> f64 + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let url = format!("http://{addr}/api/boards/{board}/scores");
    tokio::spawn(async move {
        let http = HttpClient::new(None);
        for idx in 0u64.. {
            let v = value(idx);
            let send = Instant::now();
            let body = json!([{ "player": player, "score": v }]).to_string();
            let answer = post_acked(&http, &url, body).await;
            let ack = answer.map(|a| (Instant::now(), a["results"][0]["score"].as_f64().unwrap()));
            let done = ack.is_none();
            log.lock().posts.push(Post {
                board,
                player: player.clone(),
                writer,
                idx,
                value: v,
                send,
                ack,
            });
            if done || idx >= 100_000 {
                return;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leaves_every_board_as_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let http = HttpClient::new(None);
    let mut rng = rand::thread_rng();
    // What the disk held at the start of each round (checked at the end of the previous).
    let mut base: HashMap<(&str, String), f64> = HashMap::new();

    for round in 0..ROUNDS {
        let (mut proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
        if round == 0 {
            for (board, mode) in [
                ("best", "best"),
                ("latest", "latest"),
                ("inc", "increment"),
                ("rst", "increment"),
            ] {
                let url = format!("http://{addr}/api/boards/{board}");
                post_acked(&http, &url, json!({ "mode": mode }).to_string())
                    .await
                    .expect("board created");
            }
        }
        let log = Arc::new(Mutex::new(Log::default()));
        let mut tasks = Vec::new();
        for p in 0..PLAYERS {
            for w in 0..WRITERS {
                let seed = round * 1_000_003 + p as u64 * 7919 + w;
                tasks.push(spawn_writer(
                    log.clone(),
                    &addr,
                    "best",
                    format!("b{p}"),
                    w,
                    // Pseudo-random, distinct per (round, writer, idx).
                    move |i| ((seed + i * 104_729) % 1_000_000 * WRITERS + w) as f64,
                ));
                tasks.push(spawn_writer(
                    log.clone(),
                    &addr,
                    "latest",
                    format!("l{p}"),
                    w,
                    move |i| ((round * 1_000_000 + i) * WRITERS + w) as f64,
                ));
                tasks.push(spawn_writer(
                    log.clone(),
                    &addr,
                    "inc",
                    format!("i{p}"),
                    w,
                    |_| 1.0,
                ));
            }
        }
        for p in 0..RESET_PLAYERS {
            tasks.push(spawn_writer(
                log.clone(),
                &addr,
                "rst",
                format!("r{p}"),
                0,
                |_| 1.0,
            ));
        }
        {
            let log = log.clone();
            let url = format!("http://{addr}/api/boards/rst/reset");
            tasks.push(tokio::spawn(async move {
                let http = HttpClient::new(None);
                for _ in 0..100_000 {
                    let pause = rand::thread_rng().gen_range(5..60);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    let send = Instant::now();
                    let ack = post_acked(&http, &url, String::new())
                        .await
                        .map(|_| Instant::now());
                    let done = ack.is_none();
                    log.lock().resets.push(Reset { send, ack });
                    if done {
                        return;
                    }
                }
            }));
        }
        // Readers of the boards whose scores only grow.
        for board in ["best", "inc"] {
            let log = log.clone();
            let addr = addr.clone();
            tasks.push(tokio::spawn(async move {
                let http = HttpClient::new(None);
                let url = format!("http://{addr}/api/boards/{board}?limit=1000");
                for _ in 0..1_000_000 {
                    let Ok((status, body)) = http.get(&url).await else {
                        return; // the server died
                    };
                    assert_eq!(status, 200);
                    let page: Value = serde_json::from_slice(&body).unwrap();
                    let mut log = log.lock();
                    for e in page["entries"].as_array().unwrap() {
                        let player = e["player"].as_str().unwrap().to_owned();
                        let score = e["score"].as_f64().unwrap();
                        let seen = log.read.entry((board, player)).or_insert(score);
                        *seen = seen.max(score);
                    }
                }
            }));
        }
        // Kill at a random moment once load is flowing (and some resets happened).
        wait_until("load flowing", || {
            let l = log.lock();
            l.posts.len() >= 300 && !l.resets.is_empty()
        })
        .await;
        tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1200))).await;
        proc.0.kill().unwrap(); // SIGKILL
        proc.0.wait().unwrap();
        drop(proc);
        for t in tasks {
            crate::common::within("writers stop after the kill", t)
                .await
                .unwrap();
        }
        let log = std::mem::take(&mut *log.lock());
        let acked = log.posts.iter().filter(|p| p.ack.is_some()).count();
        let in_flight = log.posts.len() - acked;

        let (_proc, addr) = serve_binary(dir.path(), "127.0.0.1:0", &[]);
        let mut durable = HashMap::new();
        for board in ["best", "latest", "inc", "rst"] {
            for (player, score) in board_scores(&http, &addr, board).await {
                durable.insert((board, player), score);
            }
        }
        for p in 0..PLAYERS {
            let b = format!("b{p}");
            check_best(
                &log,
                &b,
                base_of(&base, "best", &b),
                at(&durable, "best", &b),
            );
            let l = format!("l{p}");
            check_latest(
                &log,
                &l,
                base_of(&base, "latest", &l),
                at(&durable, "latest", &l),
            );
            let i = format!("i{p}");
            check_increment(&log, &i, base_of(&base, "inc", &i), at(&durable, "inc", &i));
        }
        for p in 0..RESET_PLAYERS {
            let r = format!("r{p}");
            check_reset(&log, &r, base_of(&base, "rst", &r), at(&durable, "rst", &r));
        }
        eprintln!(
            "round {round}: {acked} posts acknowledged, {in_flight} in flight, {} resets",
            log.resets.len()
        );
        base = durable;
    }
}

fn base_of(base: &HashMap<(&str, String), f64>, board: &str, player: &str) -> Option<f64> {
    base.get(&(board, player.to_owned())).copied()
}

fn at(durable: &HashMap<(&str, String), f64>, board: &str, player: &str) -> Option<f64> {
    durable.get(&(board, player.to_owned())).copied()
}

fn posts_of<'a>(log: &'a Log, board: &str, player: &str) -> Vec<&'a Post> {
    log.posts
        .iter()
        .filter(|p| p.board == board && p.player == player)
        .collect()
}

/// The highest score a completed read showed for the player.
fn read_of(log: &Log, board: &'static str, player: &str) -> Option<f64> {
    log.read.get(&(board, player.to_owned())).copied()
}

/// `best`: every answer and every read reported the best so far, so the disk holds at
/// least the highest reported; anything higher must come from a post still in flight at
/// the kill.
fn check_best(log: &Log, player: &str, base: Option<f64>, durable: Option<f64>) {
    let posts = posts_of(log, "best", player);
    let reported = posts
        .iter()
        .filter_map(|p| p.ack.map(|a| a.1))
        .chain(base)
        .chain(read_of(log, "best", player))
        .reduce(f64::max);
    match (reported, durable) {
        (None, d) => assert!(
            d.is_none() || posts.iter().any(|p| p.ack.is_none() && Some(p.value) == d),
            "best {player}: {d:?} on disk, nothing acknowledged"
        ),
        (Some(r), Some(d)) if d == r => {}
        (Some(r), Some(d)) if d > r => assert!(
            posts.iter().any(|p| p.ack.is_none() && p.value == d),
            "best {player}: {d} on disk is above every acknowledged best ({r}) and no post \
             in flight sent it"
        ),
        (Some(r), d) => panic!("best {player}: acknowledged best {r}, disk holds {d:?}"),
    }
}

/// `latest`: the disk holds the value of the post serialised last. That post P was
/// acknowledged or in flight; its own writer has no acknowledged post after it (a writer's
/// posts are sequential), and no acknowledged post was sent after P's acknowledgement
/// (it would be serialised after P).
fn check_latest(log: &Log, player: &str, base: Option<f64>, durable: Option<f64>) {
    let posts = posts_of(log, "latest", player);
    let any_acked = posts.iter().any(|p| p.ack.is_some());
    if durable == base && !any_acked {
        return; // nothing of this round became durable
    }
    let d = durable.unwrap_or_else(|| panic!("latest {player}: missing on disk"));
    let p = posts
        .iter()
        .find(|p| p.value == d)
        .unwrap_or_else(|| panic!("latest {player}: {d} on disk was never sent this round"));
    let last_acked_idx = posts
        .iter()
        .filter(|q| q.writer == p.writer && q.ack.is_some())
        .map(|q| q.idx)
        .max();
    assert!(
        last_acked_idx.is_none_or(|i| p.idx >= i),
        "latest {player}: disk holds writer {}'s post {} but its post {last_acked_idx:?} \
         was acknowledged after it",
        p.writer,
        p.idx
    );
    if let Some((acked_at, _)) = p.ack {
        let later = posts.iter().find(|q| q.ack.is_some() && q.send > acked_at);
        assert!(
            later.is_none(),
            "latest {player}: disk holds {d}, but {later:?} was sent after it was \
             acknowledged and acknowledged too"
        );
    }
}

/// `increment` by 1: each answer (and read) reported the total at that point, so the disk
/// holds at least the highest reported total, plus at most one per post in flight.
fn check_increment(log: &Log, player: &str, base: Option<f64>, durable: Option<f64>) {
    let posts = posts_of(log, "inc", player);
    let reported = posts
        .iter()
        .filter_map(|p| p.ack.map(|a| a.1))
        .chain(read_of(log, "inc", player))
        .reduce(f64::max)
        .or(base)
        .unwrap_or(0.0);
    let in_flight = posts.iter().filter(|p| p.ack.is_none()).count() as f64;
    let d = durable.unwrap_or(0.0);
    assert!(
        reported <= d && d <= reported + in_flight,
        "increment {player}: acknowledged or read total {reported}, {in_flight} in flight, disk {d}"
    );
}

/// `increment` by 1 from ONE sequential writer per player, with resets from another
/// client. After the player's last acknowledged post L (total T) come only: the post in
/// flight, if any (+1), and resets. A reset sent after L's acknowledgement and itself
/// acknowledged is certainly serialised after L; one whose interval overlaps or follows
/// L and was not surely before it may be.
fn check_reset(log: &Log, player: &str, base: Option<f64>, durable: Option<f64>) {
    let posts = posts_of(log, "rst", player);
    let last = posts.iter().rfind(|p| p.ack.is_some());
    let in_flight = posts.iter().any(|p| p.ack.is_none());
    let (t, last_send, last_ack) = match last {
        Some(p) => {
            let (ack, total) = p.ack.unwrap();
            (total, Some(p.send), Some(ack))
        }
        None => (base.unwrap_or(0.0), None, None),
    };
    let surely_reset = log
        .resets
        .iter()
        .any(|r| r.ack.is_some() && last_ack.is_none_or(|a| r.send > a));
    let maybe_reset = log.resets.iter().any(|r| match (r.ack, last_send) {
        (None, _) | (_, None) => true,
        (Some(ack), Some(send)) => ack > send,
    });
    let mut allowed = vec![];
    if surely_reset {
        allowed.push(0.0);
    } else {
        allowed.push(t);
        if maybe_reset {
            allowed.push(0.0);
        }
    }
    if in_flight {
        let plus_one: Vec<f64> = allowed.iter().map(|v| v + 1.0).collect();
        allowed.extend(plus_one);
    }
    let d = durable.unwrap_or(0.0);
    assert!(
        allowed.contains(&d),
        "reset board {player}: disk {d}, allowed {allowed:?} (last acknowledged total {t}, \
         in flight {in_flight}, surely reset {surely_reset}, maybe reset {maybe_reset})"
    );
}

/// A batch big enough to need fresh pages in the database file: +10 for `p` and one
/// entry with 400 bytes of meta for each of 999 other players.
fn big_batch() -> String {
    let meta = json!({ "pad": "x".repeat(400) });
    let mut batch = vec![json!({ "player": "p", "score": 10 })];
    batch.extend(
        (0..999).map(|i| json!({ "player": format!("f{i:03}"), "score": 1, "meta": meta })),
    );
    Value::Array(batch).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_disk_gets_503_and_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let mnt = tmp.path().join("disk");
    let Some(disk) = Tmpfs::mount(&mnt, "16m") else {
        // Mounting needs root (CAP_SYS_ADMIN); without it there is no real full disk.
        crate::common::tools::missing("cannot mount a tmpfs here", "run the tests as root");
        return;
    };
    let data = mnt.join("data");
    let http = HttpClient::new(None);
    let (mut proc, addr) = serve_binary(&data, "127.0.0.1:0", &[]);
    let base = format!("http://{addr}/api/boards/inc");
    post_acked(&http, &base, json!({ "mode": "increment" }).to_string())
        .await
        .expect("board created");
    let r = post_acked(
        &http,
        &format!("{base}/scores"),
        json!([{ "player": "p", "score": 10 }]).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(r["results"][0]["score"], 10);

    // A watcher of the live board, and a healthy publication client alongside.
    let mut ws = {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=board:inc"))
            .await
            .unwrap();
        ws
    };
    let score_of_p = |update: &Value| -> Option<f64> {
        update["data"]["top"]
            .as_array()?
            .iter()
            .find(|e| e["player"] == "p")?["score"]
            .as_f64()
    };
    assert_eq!(next_json(&mut ws).await["op"], "subscribed");
    // Updates are throttled: the first may still show the board before the +10.
    loop {
        let update = next_json(&mut ws).await;
        match score_of_p(&update) {
            Some(10.0) => break,
            None => continue,
            other => panic!("watchers saw p = {other:?}: {update}"),
        }
    }

    // A healthy subscriber of another topic keeps receiving every publication throughout.
    let (mut healthy, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws?topic=news"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut healthy).await["op"], "subscribed");
    let mut published = 0u64;
    let mut publish_and_receive = async |healthy: &mut crate::common::Ws| {
        published += 1;
        let url = format!("http://{addr}/api/publish/news");
        post_acked(&http, &url, json!({ "n": published }).to_string())
            .await
            .expect("publish works");
        let got = next_json(healthy).await;
        assert_eq!(got["data"]["n"], published, "{got}");
    };
    publish_and_receive(&mut healthy).await;

    let filler = fill_disk(&mnt);
    let (status, body) = http
        .post(&format!("{base}/scores"), big_batch())
        .await
        .unwrap();
    let err: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 503, "{err}");
    assert_eq!(err["error"]["code"], "store_unavailable", "{err}");
    assert!(err["error"]["message"].is_string(), "{err}");
    // Readers see no change.
    let before = board_scores(&http, &addr, "inc").await;
    assert_eq!(before, HashMap::from([("p".to_owned(), 10.0)]));
    publish_and_receive(&mut healthy).await;

    // The fault clears; the retried batch counts once.
    std::fs::remove_file(filler).unwrap();
    let r = post_acked(&http, &format!("{base}/scores"), big_batch())
        .await
        .expect("the write works once the disk has room");
    assert_eq!(r["results"][0]["score"], 20, "{r}");
    let after = board_scores(&http, &addr, "inc").await;
    assert_eq!(after.len(), 1000);
    assert_eq!(after["p"], 20.0);
    assert!(after.iter().all(|(k, v)| k == "p" || *v == 1.0));
    publish_and_receive(&mut healthy).await;

    // Watchers never saw the failed change: every update until the retried one shows 10.
    let deadline = Instant::now() + WAIT;
    loop {
        assert!(Instant::now() < deadline, "no live update after the retry");
        let update = next_json(&mut ws).await;
        match score_of_p(&update) {
            Some(10.0) => continue, // e.g. the watcher count changed
            Some(20.0) => break,
            other => panic!("watchers saw p = {other:?}: {update}"),
        }
    }

    // And the disk agrees after a SIGKILL and restart.
    proc.0.kill().unwrap();
    proc.0.wait().unwrap();
    drop(proc);
    let (proc, addr) = serve_binary(&data, "127.0.0.1:0", &[]);
    let restarted = board_scores(&http, &addr, "inc").await;
    assert_eq!(restarted, after);
    drop(proc);
    drop(disk);
}
