//! Throughput of durable (fsync'd) leaderboard store commits, in entries/s:
//!
//! * `single_sequential`: 1 entry per `Store::commit`, one caller.
//! * `single_256_callers`: 1 entry per `StoreWriter::commit`, 256 concurrent callers
//!   (grouped into shared transactions by the writer).
//! * `batch_1000`: 1,000 entries per `Store::commit`.
//! * `batch_1000_seqkeys`: the same with ascending (append-only) player keys.
//!
//! Player keys are otherwise pseudo-random over a 1M key space, as for a big live board.
//!
//! Run: `cargo bench --bench store`. The database lives under `CARGO_TARGET_TMPDIR` (on the
//! build disk, not a tmpfs) so fsync costs are real.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crier::leaderboard::store::{Store, StoreOp, StoreWriter, StoredEntry};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const BOARD: &str = "bench";

fn put(i: u64) -> StoreOp {
    StoreOp::PutEntry {
        board: BOARD.into(),
        entry: StoredEntry {
            // Bounded key space (upserts after the first 1M) so the tree size stays realistic.
            player: format!("player-{:07}", (i.wrapping_mul(2_654_435_761)) % 1_000_000),
            score: i as f64,
            subscore: 0.0,
            achieved: i,
            meta: Some(r#"{"country":"NZ"}"#.into()),
        },
    }
}

fn open_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let store = Store::open(dir.path()).unwrap();
    store
        .commit(&[StoreOp::PutBoard {
            board: BOARD.into(),
            options: "{}".into(),
        }])
        .unwrap();
    (dir, store)
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("store_durable");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    {
        let (_dir, store) = open_store();
        let mut i = 0u64;
        g.throughput(Throughput::Elements(1));
        g.bench_function("single_sequential", |b| {
            b.iter(|| {
                i += 1;
                store.commit(&[put(i)]).unwrap();
            })
        });
    }

    {
        const CALLERS: u64 = 256;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (_dir, store) = open_store();
        let (writer, task) = rt
            .block_on(async { StoreWriter::spawn(store, 1024) })
            .unwrap();
        let writer = Arc::new(writer);
        let before = writer.stats();
        g.throughput(Throughput::Elements(CALLERS));
        // Each iteration = every one of the 256 callers commits one entry; the callers run
        // continuously (each awaits its ack, then commits its next entry).
        g.bench_function("single_256_callers", |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for c in 0..CALLERS {
                        let w = writer.clone();
                        set.spawn(async move {
                            for k in 0..iters {
                                w.commit(vec![put(k * CALLERS + c)]).await.unwrap();
                            }
                        });
                    }
                    while let Some(r) = set.join_next().await {
                        r.unwrap();
                    }
                    start.elapsed()
                })
            })
        });
        let after = writer.stats();
        let txns = after.transactions - before.transactions;
        eprintln!(
            "single_256_callers: {} requests in {} transactions ({:.1} entries/transaction)",
            after.requests - before.requests,
            txns,
            (after.ops - before.ops) as f64 / txns.max(1) as f64
        );
        drop(writer);
        rt.block_on(task).unwrap();
    }

    {
        const BATCH: u64 = 1000;
        let (_dir, store) = open_store();
        let mut i = 0u64;
        g.throughput(Throughput::Elements(BATCH));
        g.bench_function("batch_1000", |b| {
            b.iter_batched(
                || {
                    let ops: Vec<StoreOp> = (i..i + BATCH).map(put).collect();
                    i += BATCH;
                    ops
                },
                |ops| store.commit(&ops).unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    {
        // Same, but with ascending keys: isolates the cost of dirtying one B-tree leaf per
        // randomly placed entry (write amplification) from the rest of the commit path.
        const BATCH: u64 = 1000;
        let (_dir, store) = open_store();
        let mut i = 0u64;
        g.throughput(Throughput::Elements(BATCH));
        g.bench_function("batch_1000_seqkeys", |b| {
            b.iter_batched(
                || {
                    let ops: Vec<StoreOp> = (i..i + BATCH)
                        .map(|i| StoreOp::PutEntry {
                            board: BOARD.into(),
                            entry: StoredEntry {
                                player: format!("player-{i:09}"),
                                score: i as f64,
                                subscore: 0.0,
                                achieved: i,
                                meta: Some(r#"{"country":"NZ"}"#.into()),
                            },
                        })
                        .collect();
                    i += BATCH;
                    ops
                },
                |ops| store.commit(&ops).unwrap(),
                criterion::BatchSize::PerIteration,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
