//! `--mode follow` of `crier bench`: every player's own rank, live (issue 19).
//!
//! 1. The board `--board` is made a `latest` board (every post changes its player's entry)
//!    and seeded with `--players` players `p0 ..` (batches of 1000).
//! 2. `--subscribers` WebSocket watchers connect; watcher `i` follows its own player,
//!    `board:{board}@p{i}`, and receives that player's window (entry and ±5 around).
//! 3. `--messages` scores are posted at `--rate` per second (default 1000) on random
//!    players, one per request, over keep-alive connections. Post `k` carries the score
//!    `r * 1e6 + k` (r random), so every score is new and names its post; seed scores end
//!    in 999999.
//!
//! Posts on one followed player go out one after the other (the next waits for the previous
//! one's answer), as a game server posting one player's scores would: two posts on one
//! player in flight at once may be applied in either order, and which one is the player's
//! last score would then be unknown to the tool.
//!
//! Latency is measured from a post's acknowledgement (the 200) to the moment the posting
//! player's own watcher (when that player is followed) receives a window whose entry shows
//! that score: the window of the player that moved. Windows are conflated per update
//! interval, so a post overtaken by a later post of the same player within one interval
//! may only be seen through the later one (`superseded`). Deliveries count every window
//! received during the post phase, by every watcher (the neighbours' windows that moved
//! included). After the posts the tool waits until no window has come for a second and
//! reports when the last one came (`settled_ms`: the neighbours' windows, which the server
//! refreshes at a bounded rate, catching up). With `--server-pid`, the server's CPU (cores
//! busy) over the post phase and its RSS after seeding and at the end.

use crate::stop::{Seat, Stop};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use super::envelope::find;
use super::report::Percentiles;
use super::subscriber::{self, fill, new_histogram, wait_readable, Conn, Filled, Shared};
use super::BenchArgs;
use crier_protocol::frame::{self, Decoder, Message};

/// Seed scores end in this, which no post index reaches.
const SEED: u64 = 999_999;
const SCALE: u64 = 1_000_000;
const READ_BUF: usize = 64 * 1024;
/// Time after the watchers connected before the first post (their first windows, and the
/// server's once-a-second watcher check, land before it).
const SETTLE: Duration = Duration::from_millis(1500);
/// No window for this long after the posts: every window has caught up.
const QUIET: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Default, Serialize)]
pub struct FollowReport {
    pub board: String,
    /// Players on the board (seeded).
    pub players: u64,
    pub seed_secs: f64,
    pub watchers: usize,
    pub rate: f64,
    pub posts: u64,
    pub posts_ok: u64,
    pub post_errors: u64,
    pub first_post_error: Option<String>,
    /// POST latency (the poster's view, includes the fsync), milliseconds.
    pub post_ms: Percentiles,
    /// From the first post to the last window the run waited for.
    pub secs: f64,
    /// Successful posts whose player is followed.
    pub followed_posts: u64,
    /// Followed posts whose own window showed them.
    pub seen_first_hand: u64,
    /// Followed posts seen only through a later post of the same player (conflated).
    pub superseded: u64,
    /// Followed posts never shown (a failure).
    pub never_seen: u64,
    /// First-hand sightings that arrived before the POST's answer (recorded as 0 ms).
    pub before_return: u64,
    /// Windows received by all watchers during the post phase.
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub watchers_closed: usize,
    pub timed_out: bool,
    /// POST answered -> the player's own window shows the score, milliseconds.
    pub latency_ms: Percentiles,
    /// With --server-pid: server CPU over the post phase (cores busy).
    pub server_cpu_cores: Option<f64>,
    /// With --server-pid: server RSS after seeding (before the watchers) and at the end.
    pub rss_seeded_kib: Option<u64>,
    pub rss_end_kib: Option<u64>,
    /// From the last post's answer to the last window any watcher received, once windows
    /// stopped coming for [`QUIET`]: how long the neighbours' (shifted) windows take to
    /// catch up after the posts stop. `None` if the run timed out first.
    pub settled_ms: Option<f64>,
}

impl FollowReport {
    pub fn failures(&self) -> Vec<String> {
        let mut f = Vec::new();
        if self.post_errors > 0 {
            f.push(format!("{} score posts failed", self.post_errors));
        }
        if self.never_seen > 0 {
            f.push(format!(
                "{} followed posts never reached their window",
                self.never_seen
            ));
        }
        f
    }

    pub fn text(&self, s: &mut String) {
        use std::fmt::Write as _;
        let _ = writeln!(
            s,
            "  board        {} players (seeded in {:.1} s), {} watchers each following its own player",
            self.players, self.seed_secs, self.watchers
        );
        let p = &self.post_ms;
        let _ = writeln!(
            s,
            "  posts        {} of {} at {}/s on random players, {} failed (POST p50 {:.2} ms, p99 {:.2} ms)",
            self.posts_ok, self.posts, self.rate, self.post_errors, p.p50, p.p99
        );
        if let Some(e) = &self.first_post_error {
            let _ = writeln!(s, "               first error: {e}");
        }
        let _ = writeln!(
            s,
            "  followed     {} posts: {} seen first-hand, {} via a later post, {} never{}; {} watchers closed",
            self.followed_posts,
            self.seen_first_hand,
            self.superseded,
            self.never_seen,
            if self.timed_out { " (timed out)" } else { "" },
            self.watchers_closed
        );
        let l = &self.latency_ms;
        let _ = writeln!(
            s,
            "  latency      POST answered -> own window: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} samples, {} before the answer)",
            l.p50, l.p90, l.p99, l.max, l.count, self.before_return
        );
        let _ = writeln!(
            s,
            "  deliveries   {} windows in {:.1} s: {:.0}/s",
            self.deliveries, self.secs, self.deliveries_per_sec
        );
        if let Some(ms) = self.settled_ms {
            let _ = writeln!(
                s,
                "  settled      the last window came {ms:.0} ms after the last post's answer"
            );
        }
        if let Some(c) = self.server_cpu_cores {
            let kib = |v: Option<u64>| v.map_or("-".into(), |v| format!("{} MiB", v / 1024));
            let _ = writeln!(
                s,
                "  server       {:.2} cores busy; RSS {} seeded -> {} at the end",
                c,
                kib(self.rss_seeded_kib),
                kib(self.rss_end_kib)
            );
        }
    }
}

/// The score a followed player's own entry shows in a window message (the envelope around
/// `{"entry":{"rank":..,"player":..,"score":S,..},..}`); `None` for `"entry":null`, replies
/// and non-integer scores.
pub fn own_score(text: &[u8]) -> Option<u64> {
    let e = find(text, b"\"entry\":{")?;
    let rest = &text[e..];
    let s = find(rest, b"\"score\":")? + b"\"score\":".len();
    let digits = rest[s..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 || digits > 19 {
        return None;
    }
    std::str::from_utf8(&rest[s..s + digits]).ok()?.parse().ok()
}

struct Watch {
    stop: Stop,
    /// Windows received since the post phase began (reset at its start).
    deliveries: AtomicU64,
    /// Per watcher: 1 + the highest post index its own entry showed (0: none yet).
    max_seen: Box<[AtomicU64]>,
    closed: AtomicU64,
    /// When the last window (of any watcher) arrived, in µs since `epoch`.
    epoch: Instant,
    last_window_us: AtomicU64,
}

#[derive(Default)]
struct WatchResult {
    /// (post index, received) of each post the own entry showed first-hand.
    seen: Vec<(u64, Instant)>,
    closed: bool,
}

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
                        w.deliveries.fetch_add(1, Ordering::Relaxed);
                        let at = now.saturating_duration_since(w.epoch).as_micros() as u64;
                        w.last_window_us.fetch_max(at, Ordering::Relaxed);
                        let Some(score) = own_score(&t) else { continue };
                        let k = score % SCALE;
                        if k == SEED {
                            continue;
                        }
                        let max = &w.max_seen[i];
                        if k + 1 > max.load(Ordering::Relaxed) {
                            max.store(k + 1, Ordering::Relaxed);
                            r.seen.push((k, now));
                        }
                    }
                    Ok(Some(Message::Ping(p))) => pong = Some(p),
                    Ok(Some(Message::Close(..))) => r.closed = true,
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

/// Makes `--board` a `latest` board holding players `p0 .. p{players-1}`.
async fn seed(args: &BenchArgs, base_url: &str) -> anyhow::Result<()> {
    let client = crate::http_client(args)?;
    let (s, b) = client
        .post(
            &format!("{base_url}/api/boards/{}", args.board),
            br#"{"mode":"latest"}"#.to_vec(),
        )
        .await
        .context("setting the board's options")?;
    anyhow::ensure!(
        s.is_success(),
        "board options: {s} {}",
        String::from_utf8_lossy(&b)
    );
    let url = Arc::new(format!("{base_url}/api/boards/{}/scores", args.board));
    let players = args.players;
    let next = Arc::new(AtomicU64::new(0));
    let mut set = JoinSet::new();
    for _ in 0..args.publishers.max(1) {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        set.spawn(async move {
            let mut rng = StdRng::from_entropy();
            loop {
                let from = next.fetch_add(1000, Ordering::Relaxed);
                if from >= players {
                    return Ok(());
                }
                let body: Vec<serde_json::Value> = (from..players.min(from + 1000))
                    .map(|p| {
                        serde_json::json!({
                            "player": format!("p{p}"),
                            "score": rng.gen_range(0..SCALE) * SCALE + SEED,
                        })
                    })
                    .collect();
                let (s, b) = client
                    .post(&url, serde_json::to_vec(&body).expect("json"))
                    .await?;
                anyhow::ensure!(
                    s.is_success(),
                    "seeding: {s} {}",
                    String::from_utf8_lossy(&b)
                );
            }
        });
    }
    while let Some(r) = set.join_next().await {
        r.context("seeder panicked")??;
    }
    Ok(())
}

/// `--mode follow`. Fills the connection part of `conn` and returns the follow part.
pub async fn run(
    args: &BenchArgs,
    shared: Arc<Shared>,
    conn: &mut super::report::Report,
) -> anyhow::Result<FollowReport> {
    anyhow::ensure!(
        (args.subscribers as u64) <= args.players,
        "--subscribers must not exceed --players (watcher i follows player p{{i}})"
    );
    anyhow::ensure!(args.messages < SEED, "--messages must be below {SEED}");
    let base_url = args.url.trim_end_matches('/').to_string();
    let rate = if args.rate > 0.0 { args.rate } else { 1000.0 };
    let seed_start = Instant::now();
    seed(args, &base_url).await?;
    let seed_secs = seed_start.elapsed().as_secs_f64();
    let rss_seeded_kib = args.server_pid.and_then(super::rss_kib);

    let w = Arc::new(Watch {
        stop: Stop::new(),
        deliveries: AtomicU64::new(0),
        max_seen: (0..args.subscribers).map(|_| AtomicU64::new(0)).collect(),
        closed: AtomicU64::new(0),
        epoch: Instant::now(),
        last_window_us: AtomicU64::new(0),
    });
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

    // The post phase.
    let client = crate::http_client(args)?;
    let n = args.messages as usize;
    let mut rng = StdRng::from_entropy();
    let targets: Vec<u64> = (0..n).map(|_| rng.gen_range(0..args.players)).collect();
    let returned: Arc<Vec<parking_lot::Mutex<Option<Instant>>>> =
        Arc::new((0..n).map(|_| parking_lot::Mutex::new(None)).collect());
    let errors = Arc::new(parking_lot::Mutex::new((0u64, None::<String>)));
    let post_hist = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let inflight = Arc::new(Semaphore::new(args.publishers.max(1) * 16));
    let url = Arc::new(format!("{base_url}/api/boards/{}/scores", args.board));
    let cpu_before = args.server_pid.and_then(super::cpu_secs);
    w.deliveries.store(0, Ordering::Relaxed);
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut posts = JoinSet::new();
    let watchers = args.subscribers as u64;
    let in_order: Vec<Arc<tokio::sync::Mutex<()>>> = (0..watchers)
        .map(|_| Arc::new(tokio::sync::Mutex::new(())))
        .collect();
    for (k, &player) in targets.iter().enumerate() {
        tick.tick().await;
        let permit = inflight.clone().acquire_owned().await.expect("open");
        // Taken here, in post order: the previous post on this player has been answered.
        let turn = match in_order.get(player as usize) {
            Some(m) => Some(m.clone().lock_owned().await),
            None => None,
        };
        let (client, url, returned, errors, post_hist) = (
            client.clone(),
            url.clone(),
            returned.clone(),
            errors.clone(),
            post_hist.clone(),
        );
        let score = rng.gen_range(0..SCALE) * SCALE + k as u64;
        let body = format!("{{\"player\":\"p{player}\",\"score\":{score}}}");
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
            drop((permit, turn));
        });
        // Reap finished posts as we go, so the set stays small over long runs.
        while posts.try_join_next().is_some() {}
    }
    while posts.join_next().await.is_some() {}
    let ok: Vec<Option<Instant>> = returned.iter().map(|m| *m.lock()).collect();

    // The last successful post of each followed player: its watcher must show it (or the
    // run times out).
    let mut last_of: HashMap<u64, usize> = HashMap::new();
    for (k, &p) in targets.iter().enumerate() {
        if p < watchers && ok[k].is_some() {
            last_of.insert(p, k);
        }
    }
    let mut timed_out = false;
    let deadline = Instant::now() + args.timeout;
    loop {
        let behind = last_of
            .iter()
            .filter(|(p, k)| w.max_seen[**p as usize].load(Ordering::Relaxed) <= **k as u64)
            .count() as u64;
        if behind <= w.closed.load(Ordering::Relaxed) {
            break;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let deliveries = w.deliveries.load(Ordering::Relaxed);
    let cpu_after = args.server_pid.and_then(super::cpu_secs);
    let rss_end_kib = args.server_pid.and_then(super::rss_kib);
    // The shifted windows still queued on the server drain after the posts: wait until
    // none has come for QUIET.
    let last_answer = ok.iter().flatten().max().copied();
    let mut settled_ms = None;
    while !timed_out && Instant::now() < deadline {
        let last = w.epoch + Duration::from_micros(w.last_window_us.load(Ordering::Relaxed));
        if last.elapsed() >= QUIET {
            settled_ms = last_answer.map(|a| last.saturating_duration_since(a).as_secs_f64() * 1e3);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.stop.cancel();

    let (post_errors, first_post_error) = errors.lock().clone();
    let mut rep = FollowReport {
        board: args.board.clone(),
        players: args.players,
        seed_secs,
        watchers: conn.connected,
        rate,
        posts: args.messages,
        posts_ok: ok.iter().filter(|t| t.is_some()).count() as u64,
        post_errors,
        first_post_error,
        post_ms: Percentiles::from_us(&post_hist.lock()),
        secs,
        deliveries,
        deliveries_per_sec: if secs > 0.0 {
            deliveries as f64 / secs
        } else {
            0.0
        },
        timed_out,
        server_cpu_cores: cpu_before
            .zip(cpu_after)
            .map(|(b, a)| (a - b) / secs.max(1e-9)),
        rss_seeded_kib,
        rss_end_kib,
        settled_ms,
        ..Default::default()
    };
    let mut lat: Histogram<u64> = new_histogram();
    let mut first_hand = vec![false; n];
    let mut max_seen = vec![0u64; args.subscribers];
    let mut i = 0;
    while let Some(r) = subs.join_next().await {
        let r = r.context("watcher task panicked")?;
        if r.closed {
            rep.watchers_closed += 1;
        }
        for (k, at) in &r.seen {
            let k = *k as usize;
            let Some(Some(t0)) = ok.get(k) else { continue };
            let p = targets[k] as usize;
            if p >= max_seen.len() {
                continue;
            }
            first_hand[k] = true;
            max_seen[p] = max_seen[p].max(k as u64 + 1);
            if at < t0 {
                rep.before_return += 1;
            }
            lat.saturating_record(at.saturating_duration_since(*t0).as_micros().max(1) as u64);
        }
        i += 1;
    }
    debug_assert_eq!(i, args.subscribers);
    for (k, t) in ok.iter().enumerate() {
        let p = targets[k];
        if t.is_none() || p >= watchers {
            continue;
        }
        rep.followed_posts += 1;
        if first_hand[k] {
            rep.seen_first_hand += 1;
        } else if (k as u64) < max_seen[p as usize] {
            rep.superseded += 1;
        } else {
            rep.never_seen += 1;
        }
    }
    rep.latency_ms = Percentiles::from_us(&lat);
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_score_of_a_window() {
        let w = br#"{"topic":"board:b@p1","data":{"board":"b","player":"p1","version":3,"season":1,"players":9,"entry":{"rank":2,"player":"p1","score":7000042},"around":[{"rank":1,"player":"p0","score":9000001}]}}"#;
        assert_eq!(own_score(w), Some(7_000_042));
        let none = br#"{"data":{"entry":null,"around":[{"rank":1,"player":"p0","score":5}]}}"#;
        assert_eq!(own_score(none), None);
        assert_eq!(own_score(br#"{"op":"subscribed"}"#), None);
    }
}
