//! In-process fan-out cost: one publication handed to N subscribers' queues (encode once,
//! a refcount bump and a short queue lock per subscriber), without any socket.

use std::sync::Arc;

use crier::client::{Batch, Client};
use crier::hub::{Hub, PublishOptions};
use crier::metrics::{Metrics, Transport};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("hub_publish");
    for subscribers in [1_000usize, 10_000] {
        let metrics = Arc::new(Metrics::new());
        let hub = Hub::new(1000, 64, metrics);
        let clients: Vec<Arc<Client>> = (0..subscribers)
            .map(|i| {
                let t = if i % 10 == 0 {
                    Transport::Sse
                } else {
                    Transport::Ws
                };
                let c = Arc::new(Client::new(t, 1 << 30));
                hub.subscribe(&c, "bench", |_| None).unwrap();
                c
            })
            .collect();
        let payload = format!("{{\"seq\":1,\"pad\":\"{}\"}}", "x".repeat(80));
        group.throughput(Throughput::Elements(subscribers as u64));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, _| {
                let mut n = 0u32;
                b.iter(|| {
                    hub.publish("bench", payload.as_bytes(), PublishOptions::default())
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
