//! Ranking on a 1,000,000-player board.
//!
//! Run: `cargo bench --bench ranking -- --warm-up-time 1 --measurement-time 3`
//! Besides criterion's medians, prints the board's resident memory and the latency
//! percentiles of 100k individually timed random rank queries.

use std::hint::black_box;
use std::time::Instant;

use crier::leaderboard::ranking::{Ranking, ScoreMode, SortOrder};
use criterion::{criterion_group, criterion_main, Criterion};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const PLAYERS: usize = 1_000_000;

fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

fn board() -> (Ranking, Vec<String>, u64) {
    let names: Vec<String> = (0..PLAYERS).map(|i| format!("player-{i:07}")).collect();
    let mut rng = StdRng::seed_from_u64(7);
    let before = rss_bytes();
    let mut r = Ranking::new(SortOrder::High);
    let start = Instant::now();
    for (seq, p) in names.iter().enumerate() {
        // Integer scores in a narrow range so ties (broken by `achieved`) are common.
        let score = f64::from(rng.gen_range(0..100_000u32));
        r.submit(p, score, ScoreMode::Best, seq as u64, None);
    }
    let built = start.elapsed();
    if let (Some(b), Some(a)) = (before, rss_bytes()) {
        eprintln!(
            "board: {PLAYERS} players built in {built:?}, resident memory +{:.1} MB ({:.0} B/player)",
            (a - b) as f64 / 1e6,
            (a - b) as f64 / PLAYERS as f64
        );
    }
    (r, names, PLAYERS as u64)
}

fn bench(c: &mut Criterion) {
    let (mut r, names, mut seq) = board();
    let mut rng = StdRng::seed_from_u64(42);

    c.bench_function("rank (1M board, random player)", |b| {
        b.iter(|| {
            let p = &names[rng.gen_range(0..PLAYERS)];
            black_box(r.rank(black_box(p)))
        })
    });

    c.bench_function("submit latest, score change (1M board)", |b| {
        b.iter(|| {
            let p = &names[rng.gen_range(0..PLAYERS)];
            let score = f64::from(rng.gen_range(0..100_000u32)) + 0.5;
            seq += 1;
            black_box(r.submit(p, score, ScoreMode::Latest, seq, None).new_rank)
        })
    });

    c.bench_function("top(10) (1M board)", |b| b.iter(|| black_box(r.top(10))));

    c.bench_function("page(500000, 50) (1M board)", |b| {
        b.iter(|| black_box(r.page(black_box(500_000), 50)))
    });

    c.bench_function("at(random rank) (1M board)", |b| {
        b.iter(|| black_box(r.at(rng.gen_range(1..=PLAYERS as u64)).map(|e| e.score)))
    });

    // Tail latency: individually timed random rank queries.
    const QUERIES: usize = 100_000;
    let picks: Vec<usize> = (0..QUERIES).map(|_| rng.gen_range(0..PLAYERS)).collect();
    let mut lat = Vec::with_capacity(QUERIES);
    for &i in &picks {
        let t = Instant::now();
        black_box(r.rank(black_box(&names[i])));
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    let pct = |q: f64| lat[((lat.len() as f64 * q) as usize).min(lat.len() - 1)];
    eprintln!(
        "rank latency over {QUERIES} random queries: p50 {} ns, p90 {} ns, p99 {} ns, p99.9 {} ns, max {} ns",
        pct(0.50),
        pct(0.90),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );
}

criterion_group!(benches, bench);
criterion_main!(benches);
