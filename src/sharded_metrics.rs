//! Counters and a histogram written on every delivery, sharded by thread.
//!
//! Every write batch of every connection records its deliveries, bytes and latency. With
//! prometheus-client's own types that is one shared atomic per counter and, for the
//! histogram, one shared mutex: at 10,000 subscribers the runtime's worker threads took
//! turns on the same cache lines tens of thousands of times per fan-out wave. Here each
//! thread writes its own cache-line-sized shard, with plain relaxed atomics nobody else
//! writes; a scrape adds the shards up. Values stay exact (nothing is held back in a
//! thread-local buffer), so a scrape right after a delivery already counts it.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// Shards per metric: more than the runtime's worker threads on most machines; threads
/// beyond it share shards, which is still correct, only less cheap.
const SHARDS: usize = 16;

/// This thread's shard, handed out round robin on a thread's first record.
fn shard() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// One cache line (two on CPUs that prefetch pairs) per shard.
#[repr(align(128))]
#[derive(Default)]
struct Padded<T>(T);

/// A monotonic counter, as prometheus-client's `Counter` encodes it. Clones share it.
#[derive(Clone, Default)]
pub struct ShardedCounter {
    shards: Arc<[Padded<AtomicU64>; SHARDS]>,
}

impl std::fmt::Debug for ShardedCounter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ShardedCounter").field(&self.get()).finish()
    }
}

impl ShardedCounter {
    pub fn inc_by(&self, v: u64) {
        self.shards[shard()].0.fetch_add(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.shards
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl TypedMetric for ShardedCounter {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for ShardedCounter {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.get(), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Most finite bucket bounds a `ShardedHistogram` takes (one more, +Inf, is implied).
const MAX_BOUNDS: usize = 13;

/// One thread's part of a histogram: a count per bucket (+Inf last) and the sum in
/// nanoseconds (an integer, so adding it up needs no compare-and-swap loop).
#[derive(Default)]
struct HistogramShard {
    buckets: [AtomicU64; MAX_BOUNDS + 1],
    sum_nanos: AtomicU64,
}

/// A histogram of durations with fixed bounds, as prometheus-client's `Histogram` encodes
/// it (its sum in seconds, to the nanosecond). Clones share it.
#[derive(Clone)]
pub struct ShardedHistogram {
    bounds: Arc<[f64]>,
    shards: Arc<[Padded<HistogramShard>; SHARDS]>,
}

impl std::fmt::Debug for ShardedHistogram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedHistogram")
            .field("bounds", &self.bounds)
            .finish_non_exhaustive()
    }
}

impl ShardedHistogram {
    /// `bounds`: the buckets' upper bounds in seconds, ascending, at most 13.
    pub fn new(bounds: &[f64]) -> Self {
        assert!(bounds.len() <= MAX_BOUNDS, "too many histogram buckets");
        assert!(bounds.windows(2).all(|w| w[0] < w[1]), "bounds must ascend");
        ShardedHistogram {
            bounds: bounds.into(),
            shards: Arc::default(),
        }
    }

    pub fn observe(&self, d: std::time::Duration) {
        let secs = d.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&b| secs <= b)
            .unwrap_or(self.bounds.len());
        let s = &self.shards[shard()].0;
        s.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        s.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// (sum in seconds, count, per-bucket counts with their upper bounds, +Inf last).
    fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets: Vec<(f64, u64)> = self
            .bounds
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .map(|b| (b, 0))
            .collect();
        let mut sum_nanos: u128 = 0;
        for s in self.shards.iter() {
            for (i, b) in buckets.iter_mut().enumerate() {
                b.1 += s.0.buckets[i].load(Ordering::Relaxed);
            }
            sum_nanos += u128::from(s.0.sum_nanos.load(Ordering::Relaxed));
        }
        let count = buckets.iter().map(|b| b.1).sum();
        (sum_nanos as f64 / 1e9, count, buckets)
    }
}

impl TypedMetric for ShardedHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for ShardedHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::histogram::Histogram;
    use prometheus_client::registry::Registry;
    use std::time::Duration;

    fn text(r: &Registry) -> String {
        let mut s = String::new();
        prometheus_client::encoding::text::encode(&mut s, r).unwrap();
        s
    }

    /// Encoded exactly as prometheus-client's own types encode the same records, from
    /// several threads at once.
    #[test]
    fn encodes_like_prometheus_clients_own_types() {
        let bounds = [0.001, 0.01, 0.1, 1.0];
        let (ours_c, ours_h) = (ShardedCounter::default(), ShardedHistogram::new(&bounds));
        let (theirs_c, theirs_h) = (Counter::<u64>::default(), Histogram::new(bounds));
        let samples: Vec<Duration> = (0..400u64)
            .map(|i| Duration::from_micros(i * i * 13))
            .collect();
        std::thread::scope(|s| {
            for chunk in samples.chunks(50) {
                let (c, h) = (ours_c.clone(), ours_h.clone());
                s.spawn(move || {
                    for d in chunk {
                        c.inc_by(3);
                        h.observe(*d);
                    }
                });
            }
        });
        for d in &samples {
            theirs_c.inc_by(3);
            theirs_h.observe(d.as_secs_f64());
        }
        let (mut a, mut b) = (Registry::default(), Registry::default());
        a.register("c", "c", ours_c);
        a.register("h", "h", ours_h);
        b.register("c", "c", theirs_c);
        b.register("h", "h", theirs_h);
        let (ours, theirs) = (text(&a), text(&b));
        // The sums differ only in the last digits (nanoseconds added as integers here,
        // seconds as floats there): compare every other line exactly.
        let strip = |t: &str| -> Vec<String> {
            t.lines()
                .filter(|l| !l.starts_with("h_sum"))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(strip(&ours), strip(&theirs));
        let sum = |t: &str| -> f64 {
            t.lines()
                .find_map(|l| l.strip_prefix("h_sum "))
                .unwrap()
                .parse()
                .unwrap()
        };
        assert!((sum(&ours) - sum(&theirs)).abs() < 1e-6, "{ours}\n{theirs}");
        assert!(ours.contains("c_total 1200"), "{ours}");
        assert!(ours.contains("h_count 400"), "{ours}");
    }
}
