//! `crier demo`: a simulated game so a newcomer sees a live board within seconds. Bots post
//! scores through the same service the HTTP API uses (durable, ranked, published). The
//! command line starts it once the server runs; it knows only the boards it plays on.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::ranking::{ScoreMode, SortOrder};
use super::service::{BoardOptions, Boards, ScoreInput};
use tokio_util::sync::CancellationToken;

const NAMES: [&str; 24] = [
    "Ada", "Blaze", "Cosmo", "Dune", "Echo", "Fable", "Ghost", "Halo", "Iris", "Jinx", "Kite",
    "Luna", "Mako", "Nova", "Onyx", "Pixel", "Quill", "Rogue", "Sable", "Tango", "Umbra", "Vega",
    "Wren", "Zephyr",
];

/// Plays on `boards` until `shutdown`; `addr` is where the server listens, for the log
/// line pointing at the live board.
pub fn spawn(boards: Arc<Boards>, shutdown: CancellationToken, addr: SocketAddr) {
    tokio::spawn(async move {
        let boards = &boards;
        let arena = BoardOptions {
            order: SortOrder::High,
            mode: ScoreMode::Best,
            top: 10,
            ..BoardOptions::default()
        };
        let speedrun = BoardOptions {
            order: SortOrder::Low,
            mode: ScoreMode::Best,
            top: 10,
            ..BoardOptions::default()
        };
        for (name, options) in [("arena", arena), ("speedrun", speedrun)] {
            if let Err(e) = boards.put_board(name, options).await {
                tracing::warn!("demo: cannot set up board {name}: {e}");
                return;
            }
        }
        tracing::info!(
            "demo: bots are playing; watch http://{addr}/boards/arena (all boards: http://{addr}/)"
        );
        let mut arena_scores = [0f64; NAMES.len()];
        let mut ticker = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let (i, gain, lap) = {
                let mut rng = rand::thread_rng();
                let i = rng.gen_range(0..NAMES.len());
                // Mostly small gains, sometimes a big play that shakes up the top.
                let gain = if rng.gen_bool(0.1) {
                    rng.gen_range(400.0..1500.0)
                } else {
                    rng.gen_range(10.0..200.0)
                };
                (i, gain, rng.gen_range(55.0..95.0f64))
            };
            arena_scores[i] += f64::round(gain);
            let post = |player: usize, score: f64| ScoreInput {
                player: Some(format!("bot-{}", NAMES[player].to_lowercase())),
                score: serde_json::Number::from_f64(score),
                subscore: None,
                meta: serde_json::value::to_raw_value(
                    &serde_json::json!({ "name": NAMES[player] }),
                )
                .ok(),
            };
            let lap = (lap * 100.0).round() / 100.0;
            if boards
                .submit(
                    "arena",
                    vec![post(i, arena_scores[i])],
                    boards.max_players(),
                )
                .await
                .is_err()
                || boards
                    .submit("speedrun", vec![post(i, lap)], boards.max_players())
                    .await
                    .is_err()
            {
                return; // shutting down
            }
        }
    });
}
