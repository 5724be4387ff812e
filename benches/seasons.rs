//! The cost of closing a season of 1,000,000 entries, on the real server in this process
//! (durable store on the build disk): how long until a watcher
//! of the board sees the new (empty) season, what posters to that board and to another
//! board wait meanwhile, and the first read of the archived season.
//!
//! Run: `nice -n 19 cargo bench --bench seasons` (release). Prints the median of 3 runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crier::config::Config;
use crier::leaderboard::service::ScoreInput;
use crier::server::Server;
use futures_util::StreamExt;

const PLAYERS: usize = 1_000_000;
const BATCH: usize = 1000;
/// Wed 2026-12-02 10:00 UTC; the daily boundary after it.
const T0: i64 = 1_796_205_600_000;
const BOUNDARY: i64 = 1_796_256_000_000;

fn score(player: &str, score: u64) -> ScoreInput {
    serde_json::from_value(serde_json::json!({"player": player, "score": score})).unwrap()
}

struct Run {
    fill: Duration,
    watcher: Duration,
    post_same_max: Duration,
    post_other_max: Duration,
    posts_during: usize,
    archive_read: Duration,
}

async fn run() -> Run {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let cfg = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        max_players_per_board: PLAYERS,
        ..Config::default()
    };
    let server = Server::start(cfg).await.unwrap();
    let boards = server.state.boards.clone();
    boards.clock().set(T0);
    let options = serde_json::from_value(serde_json::json!({"reset": "0 0 * * *"})).unwrap();
    boards.put_board("big", options).await.unwrap();
    boards
        .submit("other", vec![score("x", 1)], 10)
        .await
        .unwrap();
    let started = Instant::now();
    let mut posts = tokio::task::JoinSet::new();
    for chunk in 0..PLAYERS / BATCH {
        let b = boards.clone();
        posts.spawn(async move {
            let batch = (0..BATCH)
                .map(|i| {
                    score(
                        &format!("p{:07}", chunk * BATCH + i),
                        (i * 7919 % 100_000) as u64,
                    )
                })
                .collect();
            b.submit("big", batch, PLAYERS).await.unwrap();
        });
        if posts.len() >= 8 {
            posts.join_next().await;
        }
    }
    while posts.join_next().await.is_some() {}
    let fill = started.elapsed();

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/ws?topic=board:big", server.addr))
            .await
            .unwrap();
    // The snapshot with every player.
    loop {
        let m = ws.next().await.unwrap().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(m.to_text().unwrap_or("{}")).unwrap_or_default();
        if v["data"]["players"] == PLAYERS {
            break;
        }
    }
    // Posters to the closing board and to another one, from before the boundary to after.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut posters = Vec::new();
    for board in ["big", "other"] {
        let (b, stop) = (boards.clone(), stop.clone());
        posters.push(tokio::spawn(async move {
            let (mut worst, mut n) = (Duration::ZERO, 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                b.submit(board, vec![score(&format!("late{n}"), 5)], PLAYERS + 10_000)
                    .await
                    .unwrap();
                worst = worst.max(t.elapsed());
                n += 1;
            }
            (worst, n)
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    boards.clock().set(BOUNDARY);
    let watcher = loop {
        let m = ws.next().await.unwrap().unwrap();
        let v: serde_json::Value =
            serde_json::from_str(m.to_text().unwrap_or("{}")).unwrap_or_default();
        if v["data"]["season"] == 2 {
            break t.elapsed();
        }
    };
    assert_eq!(boards.with_board("big", |b| b.season.number).unwrap(), 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (same, n1) = posters.remove(0).await.unwrap();
    let (other, n2) = posters.remove(0).await.unwrap();
    let t = Instant::now();
    let archive = boards.season("big", 1).await.unwrap().unwrap();
    let archive_read = t.elapsed();
    assert!(archive.ranking.len() >= PLAYERS);
    server.shutdown().await;
    Run {
        fill,
        watcher,
        post_same_max: same,
        post_other_max: other,
        posts_during: n1 + n2,
        archive_read,
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let runs: Vec<Run> = (0..3).map(|_| rt.block_on(run())).collect();
    let m = |f: fn(&Run) -> Duration| median(runs.iter().map(f).collect());
    println!(
        "season close of {PLAYERS} entries, median of {} runs:",
        runs.len()
    );
    println!(
        "  fill (1000-entry batches, 8 in flight): {:?}",
        m(|r| r.fill)
    );
    println!(
        "  boundary -> watcher's season-2 frame:   {:?}",
        m(|r| r.watcher)
    );
    println!(
        "  worst post to the closing board:        {:?}",
        m(|r| r.post_same_max)
    );
    println!(
        "  worst post to another board:            {:?}",
        m(|r| r.post_other_max)
    );
    println!(
        "  first read of the archived season:      {:?}",
        m(|r| r.archive_read)
    );
    println!(
        "  posts acknowledged around the close:    {:?}",
        runs.iter().map(|r| r.posts_during).collect::<Vec<_>>()
    );
}
