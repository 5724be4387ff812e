//! Leaderboard modes of `crier bench`.
//!
//! - `--mode scores` (ingest): `--publishers` concurrent HTTP connections post `--messages`
//!   random scores of players drawn from a pool of `--players` to
//!   `POST /api/boards/{board}/scores`, `--batch` per request. A 200 means the scores are
//!   fsynced (group commit), so scores/s here is durable throughput.
//! - `--mode board` (post-to-screen): `--subscribers` WebSocket watchers subscribe
//!   `board:{board}`; then one score per 1/`--rate` s makes a fresh player the leader (an
//!   ever-increasing score). Latency is the time a watcher receives an update whose
//!   `data.top[0].player` is that player minus the time that POST returned.
//!
//! Board updates coalesce (the server sends at most one per `board_update_interval` with
//! the newest state), so a watcher may never see a leader that was overtaken quickly and
//! go straight to a later one. A (watcher, post) pair therefore counts as *seen* if the
//! watcher saw that post's player or any later post's player as leader; latency is measured
//! only for posts seen first-hand.

use crate::stop::{Seat, Stop};
use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::subscriber::Conn;
use anyhow::{bail, Context};
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::envelope::find;
use super::report::Percentiles;
use super::subscriber::{self, fill, new_histogram, wait_readable, Filled, Shared};
use super::BenchArgs;
use crier_protocol::frame::{self, Decoder, Message};
use crier_protocol::http_client::HttpClient;

/// The first entry of a board update's top list as docs/leaderboards.md shows it...
pub const LEADER_KEY: &[u8] = b"\"top\":[{\"rank\":1,\"player\":\"";
/// ...and as the server writes it today: the state is built with `serde_json::json!`, whose
/// maps sort their keys (`meta`, `player`, `rank`, `score`), so an entry without `meta`
/// starts with `player`.
pub const LEADER_KEY_SORTED: &[u8] = b"\"top\":[{\"player\":\"";
/// Largest batch the server accepts (`MAX_BATCH` in the leaderboard service).
pub const MAX_BATCH: usize = 1000;
/// Random scores of `--mode scores` are below this, far under the leaders of `--mode board`.
const RANDOM_SCORE_MAX: u64 = 1_000_000_000;
/// Time after the watchers connected before the first post: the server re-checks watcher
/// counts every second and publishes a change, which should not land among the posts.
const SETTLE: Duration = Duration::from_millis(1500);
const READ_BUF: usize = 64 * 1024;

/// The rank-1 player of a board update (a WebSocket text frame: the envelope around the
/// board state). Byte search for `"top":[{"rank":1,"player":"` or `"top":[{"player":"`;
/// falls back to a full JSON parse only if neither is there while the top is not empty
/// (e.g. the leader has `meta`), or the id has escapes. `None` for replies (`{"op":...}`)
/// and empty boards.
pub fn leader(text: &[u8]) -> Option<Cow<'_, [u8]>> {
    let hit = find(text, LEADER_KEY_SORTED)
        .map(|i| i + LEADER_KEY_SORTED.len())
        .or_else(|| find(text, LEADER_KEY).map(|i| i + LEADER_KEY.len()));
    if let Some(i) = hit {
        let rest = &text[i..];
        let end = rest.iter().position(|&b| b == b'"' || b == b'\\')?;
        if rest[end] == b'"' {
            return Some(Cow::Borrowed(&rest[..end]));
        }
    } else if find(text, b"\"top\":[").is_none() || find(text, b"\"top\":[]").is_some() {
        return None;
    }
    let v: serde_json::Value = serde_json::from_slice(text).ok()?;
    let p = v.get("data")?.get("top")?.get(0)?.get("player")?.as_str()?;
    Some(Cow::Owned(p.as_bytes().to_vec()))
}

/// The post index `k` of a leader id `{prefix}{k}`.
pub fn post_index(player: &[u8], prefix: &[u8]) -> Option<u64> {
    let digits = player.strip_prefix(prefix)?;
    if digits.is_empty() || digits.len() > 12 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    Some(digits.iter().fold(0, |n, &d| n * 10 + (d - b'0') as u64))
}

/// The body of one request of `--mode scores`: one object for a batch of 1, else an array.
pub fn scores_body(rng: &mut impl Rng, n: usize, players: u64) -> Vec<u8> {
    use std::io::Write as _;
    let mut v = Vec::with_capacity(n * 40 + 2);
    if n != 1 {
        v.push(b'[');
    }
    for i in 0..n {
        if i > 0 {
            v.push(b',');
        }
        let _ = write!(
            v,
            "{{\"player\":\"p{}\",\"score\":{}}}",
            rng.gen_range(0..players.max(1)),
            rng.gen_range(0..RANDOM_SCORE_MAX)
        );
    }
    if n != 1 {
        v.push(b']');
    }
    v
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct ScoresReport {
    pub board: String,
    /// Boards posted to (--boards): 1 is --board, K is --board.0 ..= --board.(K-1).
    pub boards: usize,
    /// Servers the requests went to, round robin (--target with --publish-via rr).
    pub servers: usize,
    pub scores: u64,
    pub batch: usize,
    pub publishers: usize,
    pub players: u64,
    pub requests: u64,
    pub requests_failed: u64,
    pub first_error: Option<String>,
    /// Scores in requests answered 200 (durable).
    pub scores_acked: u64,
    /// From the first request to the last answer.
    pub secs: f64,
    pub scores_per_sec: f64,
    pub requests_per_sec: f64,
    /// Request latency (send to full answer), milliseconds.
    pub request_ms: Percentiles,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct BoardReport {
    pub board: String,
    pub watchers: usize,
    pub rate: f64,
    pub posts: u64,
    pub posts_ok: u64,
    pub post_errors: u64,
    pub first_post_error: Option<String>,
    /// POST latency (the poster's view, includes the fsync), milliseconds.
    pub post_ms: Percentiles,
    /// (watcher, successful post) pairs.
    pub pairs: u64,
    /// Pairs where the watcher saw this post's player as leader.
    pub seen_first_hand: u64,
    /// Pairs seen only through a later leader (the update coalesced away).
    pub seen_later: u64,
    /// Pairs where the watcher saw neither this nor any later post's player as leader.
    pub never_seen: u64,
    /// First-hand sightings that arrived before the POST's answer (recorded as 0 ms).
    pub before_return: u64,
    /// Board updates received over all watchers (snapshots included).
    pub updates: u64,
    pub watchers_closed: usize,
    pub timed_out: bool,
    /// POST returned -> watcher received it as leader, milliseconds, first-hand only.
    pub latency_ms: Percentiles,
}

/// `--mode scores`.
pub async fn run_scores(args: &BenchArgs) -> anyhow::Result<ScoresReport> {
    anyhow::ensure!(
        (1..=MAX_BATCH).contains(&args.batch),
        "--batch must be 1-{MAX_BATCH}"
    );
    anyhow::ensure!(
        (1..=10_000).contains(&args.boards),
        "--boards must be 1-10000"
    );
    let names = super::throughput::topic_names(&args.board, args.boards);
    anyhow::ensure!(
        names
            .iter()
            .all(|b| crier_protocol::names::is_valid_board(b)),
        "--board with its .N suffix must be 1-64 bytes of A-Z a-z 0-9 _ - ."
    );
    let client = crate::http_client(args)?;
    let bases = args.publish_bases()?;
    // Request r goes to board r mod K through server r mod S; with K a multiple of S
    // that would pin each board to one server, so the server index skips by r / K.
    let urls: Arc<Vec<Vec<String>>> = Arc::new(
        names
            .iter()
            .map(|b| {
                bases
                    .iter()
                    .map(|base| format!("{base}/api/boards/{b}/scores"))
                    .collect()
            })
            .collect(),
    );
    let batch = args.batch as u64;
    let total = args.messages;
    let requests = total.div_ceil(batch);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..args.publishers {
        let (client, urls, next) = (client.clone(), urls.clone(), next.clone());
        let players = args.players;
        set.spawn(async move {
            let mut rng = StdRng::from_entropy();
            let mut hist = new_histogram();
            let (mut acked, mut failed, mut first) = (0u64, 0u64, None::<String>);
            let mut last = start;
            loop {
                let r = next.fetch_add(1, Ordering::Relaxed);
                if r >= requests {
                    break;
                }
                let n = batch.min(total - r * batch) as usize;
                let body = scores_body(&mut rng, n, players);
                let k = urls.len() as u64;
                let board = &urls[(r % k) as usize];
                let url = &board[((r + r / k) % board.len() as u64) as usize];
                let t0 = Instant::now();
                let res =
                    tokio::time::timeout(Duration::from_secs(30), client.post(url, body)).await;
                last = Instant::now();
                let err = match res {
                    Ok(Ok((s, _))) if s.is_success() => None,
                    Ok(Ok((s, b))) => Some(format!("{s}: {}", String::from_utf8_lossy(&b))),
                    Ok(Err(e)) => Some(format!("{e:#}")),
                    Err(_) => Some("request timed out after 30 s".into()),
                };
                match err {
                    None => {
                        acked += n as u64;
                        hist.saturating_record((last - t0).as_micros().max(1) as u64);
                    }
                    Some(e) => {
                        failed += 1;
                        first.get_or_insert(e);
                    }
                }
            }
            (hist, acked, failed, first, last)
        });
    }
    let mut rep = ScoresReport {
        board: args.board.clone(),
        boards: args.boards,
        servers: bases.len(),
        scores: total,
        batch: args.batch,
        publishers: args.publishers,
        players: args.players,
        requests,
        ..Default::default()
    };
    let mut hist = new_histogram();
    let mut end = start;
    while let Some(r) = set.join_next().await {
        let (h, acked, failed, first, last) = r.context("score poster panicked")?;
        let _ = hist.add(&h);
        rep.scores_acked += acked;
        rep.requests_failed += failed;
        if rep.first_error.is_none() {
            rep.first_error = first;
        }
        end = end.max(last);
    }
    let secs = (end - start).as_secs_f64();
    rep.secs = secs;
    if secs > 0.0 {
        rep.scores_per_sec = rep.scores_acked as f64 / secs;
        rep.requests_per_sec = hist.len() as f64 / secs;
    }
    rep.request_ms = Percentiles::from_us(&hist);
    Ok(rep)
}

/// What the watchers share.
struct Watch {
    prefix: Vec<u8>,
    stop: Stop,
    /// Per watcher: 1 + the highest post index seen as leader (0: none yet).
    max_seen: Box<[AtomicU64]>,
    closed: AtomicU64,
}

#[derive(Default)]
struct WatchResult {
    /// (post index, received) for every post this watcher saw as leader first-hand.
    seen: Vec<(u64, Instant)>,
    updates: u64,
    closed: bool,
}

/// One watcher: reads board updates until `stop`, recording each new leader of ours.
async fn watch(mut stream: Conn, mut decoder: Decoder, w: Arc<Watch>, i: usize) -> WatchResult {
    let mut r = WatchResult::default();
    let mask = rand::random::<[u8; 4]>();
    let mut pending = decoder.buffered() > 0;
    let mut seat = Seat::default();
    'outer: loop {
        if !pending {
            match wait_readable(&mut stream, &w.stop, &mut seat).await {
                Ok(true) => {}
                Ok(false) => break,
                Err(()) => {
                    r.closed = true;
                    break;
                }
            }
        }
        loop {
            if !pending {
                match fill(&mut stream, decoder.buffer_mut(READ_BUF)) {
                    Filled::Data => {}
                    Filled::Drained => break,
                    Filled::Closed => {
                        r.closed = true;
                        break 'outer;
                    }
                }
            }
            pending = false;
            let now = Instant::now();
            let mut pong = None;
            loop {
                match decoder.next_message() {
                    Ok(Some(Message::Text(t))) => {
                        if t.starts_with(b"{\"op\"") {
                            continue;
                        }
                        r.updates += 1;
                        let Some(k) = leader(&t).and_then(|p| post_index(&p, &w.prefix)) else {
                            continue;
                        };
                        let max = &w.max_seen[i];
                        if k + 1 > max.load(Ordering::Relaxed) {
                            max.store(k + 1, Ordering::Relaxed);
                            r.seen.push((k, now));
                        }
                    }
                    Ok(Some(Message::Ping(p))) => pong = Some(p),
                    Ok(Some(Message::Close(..))) => {
                        r.closed = true;
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        r.closed = true;
                        break;
                    }
                }
            }
            if r.closed {
                break 'outer;
            }
            if let Some(p) = pong {
                use tokio::io::AsyncWriteExt;
                let f = frame::encode_masked(frame::OP_PONG, &p, mask);
                if stream.write_all(&f).await.is_err() {
                    r.closed = true;
                    break 'outer;
                }
            }
        }
        decoder.shrink_if_empty();
    }
    if r.closed {
        w.closed.fetch_add(1, Ordering::Relaxed);
    }
    r
}

/// The score the first leader needs: above the board's current best (a `high` board).
async fn base_score(client: &HttpClient, base_url: &str, board: &str) -> anyhow::Result<f64> {
    let (status, body) = client
        .get(&format!("{base_url}/api/boards/{board}?limit=1"))
        .await
        .context("reading the board")?;
    if status == hyper::StatusCode::NOT_FOUND {
        return Ok(1.0);
    }
    if !status.is_success() {
        bail!(
            "GET board {board}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body).context("board JSON")?;
    if v["order"] != "high" {
        bail!(
            "board {board} is ordered {}; --mode board needs a `high` board",
            v["order"]
        );
    }
    let top = v["entries"][0]["score"].as_f64().unwrap_or(0.0).max(0.0);
    Ok(top.floor() + 1.0)
}

/// `--mode board`. Fills the connection part of `conn` (the common report) and returns the
/// board part.
pub async fn run_board(
    args: &BenchArgs,
    shared: Arc<Shared>,
    conn: &mut super::report::Report,
) -> anyhow::Result<BoardReport> {
    let base_url = args.url.trim_end_matches('/').to_string();
    let client = crate::http_client(args)?;
    let rate = if args.rate > 0.0 { args.rate } else { 5.0 };
    let post_url = format!("{base_url}/api/boards/{}/scores", args.board);
    let base = base_score(&client, &base_url, &args.board).await?;
    if base <= 1.0 {
        // Create the board so every watcher starts from a snapshot.
        let (s, b) = client
            .post(&post_url, br#"{"player":"bench-seed","score":0}"#.to_vec())
            .await?;
        anyhow::ensure!(
            s.is_success(),
            "creating board: {s} {}",
            String::from_utf8_lossy(&b)
        );
    }
    anyhow::ensure!(
        base + args.messages as f64 <= 1e15,
        "board {} already has scores near 1e15",
        args.board
    );
    let prefix = format!("bl-{:08x}-", rand::random::<u32>());
    let w = Arc::new(Watch {
        prefix: prefix.as_bytes().to_vec(),
        stop: Stop::new(),
        max_seen: (0..args.subscribers).map(|_| AtomicU64::new(0)).collect(),
        closed: AtomicU64::new(0),
    });

    // Connect the watchers.
    let sem = Arc::new(Semaphore::new(args.connect_concurrency));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Duration, String>>();
    let mut subs: JoinSet<WatchResult> = JoinSet::new();
    let connect_start = Instant::now();
    for i in 0..args.subscribers {
        let (shared, sem, tx, w) = (shared.clone(), sem.clone(), tx.clone(), w.clone());
        subs.spawn(async move {
            let permit = sem.acquire_owned().await.expect("semaphore open");
            let t0 = Instant::now();
            match subscriber::ws_open(&shared, i, None).await {
                Ok((stream, decoder, _)) => {
                    drop(permit);
                    let _ = tx.send(Ok(t0.elapsed()));
                    watch(stream, decoder, w, i).await
                }
                Err(e) => {
                    let _ = tx.send(Err(format!("{e:#}")));
                    WatchResult::default()
                }
            }
        });
    }
    drop(tx);
    let mut connect_hist = new_histogram();
    let deadline = tokio::time::Instant::now() + args.timeout;
    let mut outcomes = 0;
    while outcomes < args.subscribers {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(d))) => {
                conn.connected += 1;
                connect_hist.saturating_record(d.as_micros().max(1) as u64);
            }
            Ok(Some(Err(e))) => {
                conn.first_connect_error.get_or_insert(e);
            }
            Ok(None) => break,
            Err(_) => {
                conn.first_connect_error.get_or_insert_with(|| {
                    format!("connect phase timed out after {:?}", args.timeout)
                });
                break;
            }
        }
        outcomes += 1;
    }
    conn.connect_failed = args.subscribers - conn.connected;
    conn.connect_total_ms = connect_start.elapsed().as_secs_f64() * 1000.0;
    conn.connect_ms = Percentiles::from_us(&connect_hist);
    tokio::time::sleep(SETTLE).await;

    // Post the new leaders at a steady rate.
    let n = args.messages as usize;
    let returned: Arc<Vec<parking_lot::Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| parking_lot::Mutex::new(None)).collect());
    let errors = Arc::new(parking_lot::Mutex::new((0u64, None::<String>)));
    let post_hist = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let inflight = Arc::new(Semaphore::new(args.publishers.max(1) * 4));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let url = Arc::new(post_url);
    let mut posts = JoinSet::new();
    for k in 0..n {
        tick.tick().await;
        let permit = inflight.clone().acquire_owned().await.expect("open");
        let (client, url, returned, errors, post_hist) = (
            client.clone(),
            url.clone(),
            returned.clone(),
            errors.clone(),
            post_hist.clone(),
        );
        let body = format!(
            "{{\"player\":\"{prefix}{k}\",\"score\":{}}}",
            base + k as f64
        );
        posts.spawn(async move {
            let t0 = Instant::now();
            let res = tokio::time::timeout(Duration::from_secs(10), client.post(&url, body)).await;
            let now = Instant::now();
            let err = match res {
                Ok(Ok((s, _))) if s.is_success() => None,
                Ok(Ok((s, b))) => Some(format!("{s}: {}", String::from_utf8_lossy(&b))),
                Ok(Err(e)) => Some(format!("{e:#}")),
                Err(_) => Some("post timed out after 10 s".into()),
            };
            match err {
                None => {
                    *returned[k].lock() = Some(now);
                    post_hist
                        .lock()
                        .saturating_record((now - t0).as_micros().max(1) as u64);
                }
                Some(e) => {
                    let mut g = errors.lock();
                    g.0 += 1;
                    g.1.get_or_insert(e);
                }
            }
            drop(permit);
        });
    }
    while posts.join_next().await.is_some() {}
    let ok: Vec<Option<Instant>> = returned.iter().map(|m| *m.lock()).collect();

    // Wait until every watcher saw the last successful post's leader (or a timeout).
    let mut timed_out = false;
    if let Some(last) = ok.iter().rposition(Option::is_some) {
        let deadline = Instant::now() + args.timeout;
        loop {
            let caught_up = w
                .max_seen
                .iter()
                .filter(|m| m.load(Ordering::Relaxed) > last as u64)
                .count() as u64;
            if caught_up + w.closed.load(Ordering::Relaxed) >= conn.connected as u64 {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    w.stop.cancel();

    let (post_errors, first_post_error) = errors.lock().clone();
    let posts_ok = ok.iter().filter(|t| t.is_some()).count() as u64;
    let mut rep = BoardReport {
        board: args.board.clone(),
        watchers: conn.connected,
        rate,
        posts: args.messages,
        posts_ok,
        post_errors,
        first_post_error,
        post_ms: Percentiles::from_us(&post_hist.lock()),
        timed_out,
        ..Default::default()
    };
    let mut lat: Histogram<u64> = new_histogram();
    while let Some(r) = subs.join_next().await {
        let r = r.context("watcher task panicked")?;
        rep.updates += r.updates;
        if r.closed {
            rep.watchers_closed += 1;
        }
        let mut first_hand = vec![false; n];
        let mut max_seen = 0u64;
        for (k, at) in &r.seen {
            let k = *k as usize;
            if k >= n {
                continue;
            }
            max_seen = max_seen.max(k as u64 + 1);
            if let Some(t0) = ok[k] {
                first_hand[k] = true;
                if at < &t0 {
                    rep.before_return += 1;
                }
                lat.saturating_record(at.saturating_duration_since(t0).as_micros().max(1) as u64);
            }
        }
        for (k, t) in ok.iter().enumerate() {
            if t.is_none() {
                continue;
            }
            if first_hand[k] {
                rep.seen_first_hand += 1;
            } else if (k as u64) < max_seen {
                rep.seen_later += 1;
            } else {
                rep.never_seen += 1;
            }
        }
    }
    // Watchers that never connected are failed connections, not unseen posts.
    rep.pairs = rep.seen_first_hand + rep.seen_later + rep.never_seen;
    let unconnected = (args.subscribers - conn.connected) as u64 * posts_ok;
    rep.never_seen -= unconnected.min(rep.never_seen);
    rep.pairs -= unconnected.min(rep.pairs);
    rep.latency_ms = Percentiles::from_us(&lat);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_by_byte_search_agrees_with_serde() {
        let samples: Vec<(&[u8], Option<&str>)> = vec![
            (
                br#"{"topic":"board:b","offset":3,"data":{"board":"b","version":9,"players":2,"watchers":1,"order":"high","mode":"best","top":[{"rank":1,"player":"bl-0000abcd-17","score":1018},{"rank":2,"player":"p1","score":5}]}}"#,
                Some("bl-0000abcd-17"),
            ),
            // Another key order: found by the JSON fallback.
            (
                br#"{"topic":"board:b","offset":3,"data":{"top":[{"player":"x","rank":1,"score":1}]}}"#,
                Some("x"),
            ),
            // An escaped id: fallback too.
            (
                br#"{"topic":"board:b","offset":3,"data":{"top":[{"rank":1,"player":"a\"b","score":1}]}}"#,
                Some("a\"b"),
            ),
            (
                br#"{"topic":"board:b","offset":1,"data":{"board":"b","top":[]}}"#,
                None,
            ),
            (br#"{"op":"subscribed","topic":"board:b","offset":1}"#, None),
            (b"garbage", None),
        ];
        for (text, want) in samples {
            let got = leader(text).map(|c| String::from_utf8(c.into_owned()).unwrap());
            assert_eq!(got.as_deref(), want, "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn leader_of_a_board_update() {
        // A board state as the server serializes it (`Boards::publish`: rank, player,
        // score, meta when set), in its envelope. tests/it/bench_tool.rs checks the same
        // against the server's own serializer.
        let envelope = |first: &str| {
            format!(
                r#"{{"topic":"board:b","offset":7,"data":{{"board":"b","version":2,"top":[{first},{{"rank":2,"player":"second","score":42}}]}}}}"#
            )
        };
        // The bench's leaders have no meta: found by the byte search, no JSON parse.
        let env = envelope(r#"{"rank":1,"player":"bl-1-4","score":42}"#);
        let p = leader(env.as_bytes()).unwrap();
        assert!(matches!(p, Cow::Borrowed(_)), "{p:?}");
        assert_eq!(&*p, b"bl-1-4");
        assert_eq!(post_index(&p, b"bl-1-"), Some(4));
        // With meta (which may hold a "player" key of its own) the fallback is right.
        let env = envelope(r#"{"rank":1,"player":"bl-1-5","score":42,"meta":{"player":"not me"}}"#);
        assert_eq!(&*leader(env.as_bytes()).unwrap(), b"bl-1-5");
    }

    #[test]
    fn post_indices() {
        assert_eq!(post_index(b"bl-ab-0", b"bl-ab-"), Some(0));
        assert_eq!(post_index(b"bl-ab-123", b"bl-ab-"), Some(123));
        assert_eq!(post_index(b"bl-ab-", b"bl-ab-"), None);
        assert_eq!(post_index(b"bl-cd-1", b"bl-ab-"), None);
        assert_eq!(post_index(b"bl-ab-1x", b"bl-ab-"), None);
    }

    #[test]
    fn score_bodies_parse() {
        let mut rng = StdRng::seed_from_u64(1);
        let one: serde_json::Value = serde_json::from_slice(&scores_body(&mut rng, 1, 10)).unwrap();
        assert!(one["player"].as_str().unwrap().starts_with('p'));
        let many: serde_json::Value =
            serde_json::from_slice(&scores_body(&mut rng, 100, 10)).unwrap();
        let many = many.as_array().unwrap();
        assert_eq!(many.len(), 100);
        assert!(many
            .iter()
            .all(|e| e["score"].as_u64().unwrap() < RANDOM_SCORE_MAX));
    }
}
