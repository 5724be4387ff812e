//! In-process fan-out cost: one publication handed to N subscribers' queues (encode once,
//! a refcount bump and a short queue lock per subscriber), without any socket. Goes
//! through the memory broker; run with history on (the default 100 per topic) and off
//! (`history_size = 0`) side by side, so the cost of keeping history shows.

use std::sync::Arc;

use crier::broker::memory::MemoryBroker;
use crier::broker::PublishRequest;
use crier::client::{Batch, Client};
use crier::config::Config;
use crier::hub::Hub;
use crier::metrics::{Metrics, Transport};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_publish");
    for (subscribers, history) in [(1_000usize, 100), (1_000, 0), (10_000, 100), (10_000, 0)] {
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(64, metrics.clone()));
        let cfg = Config {
            history_size: history,
            ..Config::default()
        };
        let broker = MemoryBroker::new(&cfg, hub.clone(), metrics);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let clients: Vec<Arc<Client>> = (0..subscribers)
            .map(|i| {
                let t = if i % 10 == 0 {
                    Transport::Sse
                } else {
                    Transport::Ws
                };
                let c = Arc::new(Client::new(t, 1 << 30));
                rt.block_on(crier::subscribe::subscribe(
                    &hub,
                    &broker,
                    &c,
                    "bench",
                    None,
                    &|_| None,
                    &Default::default(),
                ))
                .unwrap();
                c
            })
            .collect();
        let payload = format!("{{\"seq\":1,\"pad\":\"{}\"}}", "x".repeat(80));
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::new(format!("history_{history}"), subscribers),
            &subscribers,
            |b, _| {
                let mut n = 0u32;
                b.iter(|| {
                    broker
                        .publish_now(PublishRequest {
                            topic: "bench",
                            data: payload.as_bytes(),
                            ..PublishRequest::default()
                        })
                        .unwrap();
                    n += 1;
                    // Drain now and then so queues stay small, as writers would.
                    if n % 64 == 0 {
                        for c in &clients {
                            if let Batch::Items(items) = c.take(usize::MAX, usize::MAX) {
                                drop(items);
                            }
                        }
                    }
                })
            },
        );
    }
    group.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
