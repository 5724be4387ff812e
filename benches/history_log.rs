//! Throughput of the durable history log, in publications/s acknowledged (on disk):
//!
//! * `one_topic_64_appenders`: 64 concurrent publishers on one topic.
//! * `1000_topics_64_appenders`: 64 concurrent publishers spread over 1,000 topics.
//!
//! Each publisher does what the broker does for one publication: reserve a queue slot,
//! take the topic's lock to assign the next offset and append, await the commit. The
//! writer groups everything waiting into one fsync'd transaction (group commit).
//! Payloads are ~100-byte JSON documents.
//!
//! Run: `cargo bench --bench history_log`. The file lives under `CARGO_TARGET_TMPDIR` (the
//! build disk, not a tmpfs) so fsync costs are real.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crier::broker::durable::{DurableLog, Record, HISTORY_FILE};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use parking_lot::Mutex;
use tokio::sync::oneshot;

const APPENDERS: u64 = 64;

struct Topic {
    name: Arc<str>,
    next: Mutex<u64>,
}

async fn publish(log: &DurableLog, topic: &Topic, n: u64) {
    let slot = log.reserve().await.unwrap();
    let (tx, rx) = oneshot::channel();
    {
        let mut next = topic.next.lock();
        *next += 1;
        slot.append(
            Record {
                topic: topic.name.clone(),
                epoch: "0badcafe".into(),
                offset: *next,
                data: Bytes::from(format!(
                    r#"{{"player":"p-{n:07}","score":{n},"country":"NZ","note":"benchmark payload"}}"#
                )),
                published_ms: n,
                idempotency_key: None,
            },
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
    }
    rx.await.unwrap().unwrap();
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("history_log");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    for (name, n_topics) in [
        ("one_topic_64_appenders", 1usize),
        ("1000_topics_64_appenders", 1000),
    ] {
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
        let (log, _) = DurableLog::open(&dir.path().join(HISTORY_FILE)).unwrap();
        let topics: Arc<Vec<Topic>> = Arc::new(
            (0..n_topics)
                .map(|i| Topic {
                    name: format!("bench:{i}").into(),
                    next: Mutex::new(0),
                })
                .collect(),
        );
        let before = log.stats();
        g.throughput(Throughput::Elements(APPENDERS));
        // One iteration = each of the 64 publishers gets one publication acknowledged; the
        // publishers run continuously (each awaits its ack, then publishes the next).
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(async {
                    let start = Instant::now();
                    let mut set = tokio::task::JoinSet::new();
                    for a in 0..APPENDERS {
                        let log = log.clone();
                        let topics = topics.clone();
                        set.spawn(async move {
                            for k in 0..iters {
                                let n = k * APPENDERS + a;
                                publish(&log, &topics[n as usize % topics.len()], n).await;
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
        let after = log.stats();
        let commits = after.commits - before.commits;
        eprintln!(
            "{name}: {} records in {commits} commits ({:.1} records/commit)",
            after.records - before.records,
            (after.records - before.records) as f64 / commits.max(1) as f64
        );
        rt.block_on(log.close());
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
