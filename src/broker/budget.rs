//! The node-wide history byte budget, `history_max_bytes`, shared by every topic's kept
//! publications and remembered idempotency keys.
//!
//! Every kept publication and key is also entered in one node-wide FIFO; past the budget
//! the oldest entries of any topic leave first. Entries whose publication already left (by
//! the count or age limit) are stale and skipped when popped; the FIFO is compacted
//! whenever it is more than twice the live entries, so it stays proportional to what is
//! kept and every entry is handled O(1) times.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::memory::MemoryBroker;
use super::stream::{expired, Stream};

/// One entry of the node-wide history FIFO.
pub(super) struct Kept {
    pub(super) stream: Arc<Stream>,
    pub(super) what: KeptKind,
    pub(super) at: Instant,
}

#[derive(Clone, Copy)]
pub(super) enum KeptKind {
    Publication(u64),
    Key(u64),
}

impl Kept {
    pub(super) fn live(&self) -> bool {
        !self.stream.dead.load(Ordering::Acquire)
            && match self.what {
                KeptKind::Publication(o) => o > self.stream.trimmed.load(Ordering::Acquire),
                KeptKind::Key(s) => s > self.stream.keys_trimmed.load(Ordering::Acquire),
            }
    }

    pub(super) fn expired(&self, now: Instant, idempotency_window: Duration) -> bool {
        let ttl = match self.what {
            KeptKind::Publication(_) => self.stream.ns.history_ttl,
            KeptKind::Key(_) => idempotency_window,
        };
        expired(self.at, ttl, now)
    }
}

impl MemoryBroker {
    /// Enters one kept item in the node-wide FIFO (called under its stream lock, so a
    /// stream's entries are in its own order), compacting the FIFO when stale entries
    /// outnumber live ones.
    pub(super) fn enter(&self, stream: &Arc<Stream>, what: KeptKind, bytes: usize, at: Instant) {
        let live = self.kept_live.fetch_add(1, Ordering::Relaxed) + 1;
        self.history_bytes.fetch_add(bytes, Ordering::Relaxed);
        self.metrics.history_bytes.inc_by(bytes as i64);
        let mut kept = self.kept.lock();
        kept.push_back(Kept {
            stream: stream.clone(),
            what,
            at,
        });
        if kept.len() > 2 * live + 1024 {
            // Halves the FIFO at least: amortized O(1) per entry.
            kept.retain(Kept::live);
        }
    }

    /// Takes `n` kept items, `bytes` in all, that left their stream off the budget.
    pub(super) fn give_back(&self, bytes: usize, n: usize) {
        self.history_bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.kept_live.fetch_sub(n, Ordering::Relaxed);
        self.metrics.history_bytes.dec_by(bytes as i64);
    }

    /// Evicts the oldest kept items of any topic until history fits `history_max_bytes`,
    /// and past that, while the oldest item has outlived its age limit: so the expired
    /// history of topics nobody touches any more is freed as publishing goes on, not only
    /// under byte pressure. (The FIFO is in publish order across namespaces, so an item
    /// with a short limit behind one with a long limit waits for it: memory stays bounded
    /// by the budget either way, and reads apply the age limit exactly.) Each round pops
    /// one entry, so the work is bounded by what was entered. Called with no lock held.
    pub(super) fn enforce_budget(&self) {
        let max = self.cfg.history_max_bytes;
        let window = self.cfg.idempotency_window;
        let now = Instant::now();
        loop {
            let k = {
                let mut kept = self.kept.lock();
                let Some(front) = kept.front() else {
                    return;
                };
                let over = self.history_bytes.load(Ordering::Relaxed) > max;
                if !over && front.live() && !front.expired(now, window) {
                    return;
                }
                kept.pop_front().expect("front exists")
            };
            if !k.live() {
                continue;
            }
            let stream = &k.stream;
            let mut st = stream.state.lock();
            if stream.dead.load(Ordering::Acquire) {
                continue;
            }
            match k.what {
                KeptKind::Publication(offset) => {
                    let n = st.history.iter().take_while(|p| p.offset <= offset).count();
                    self.trim_history(stream, &mut st, n);
                }
                KeptKind::Key(seq) => {
                    let n = st.keys.order.iter().take_while(|k| k.0 <= seq).count();
                    self.forget_keys(stream, &mut st, n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::*;
    use crate::broker::{Broker, PublishRequest, StreamPosition};
    use crate::publication::Publication;
    use crate::subscribe::testing::*;

    #[test]
    fn the_byte_cap_evicts_the_oldest_history_of_any_topic() {
        let one = Publication::new("a".into(), 1, b"\"xxxxxxxxxx\"").cost();
        let b = broker_with(|c| c.history_max_bytes = 4 * one);
        for t in ["a", "b", "a", "c", "a", "b"] {
            publish(&b, t, "\"xxxxxxxxxx\"");
        }
        // Six kept, four fit: a:1 and b:1 (the two oldest) left, whatever their topic.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let kept = |t: &str| -> Vec<u64> {
            let h = rt.block_on(b.history(t, None, 100)).unwrap();
            h.publications.iter().map(|p| p.offset).collect()
        };
        assert_eq!(kept("a"), [2, 3]);
        assert_eq!(kept("b"), [2]);
        assert_eq!(kept("c"), [1]);
        assert_eq!(b.history_bytes(), 4 * one);
        assert_eq!(b.metrics.history_evicted.get(), 2);
        // Resuming from before the evicted part is refused, after it works.
        let epoch = publish(&b, "c", "\"xxxxxxxxxx\"").epoch;
        let c = ws_client();
        let s = resume(
            &b,
            &c,
            "a",
            StreamPosition {
                offset: 0,
                epoch: kept_epoch(&rt, &b, "a"),
            },
        );
        assert_eq!(s.recovered, Some(false));
        b.remove_client(&c);
        let s = resume(&b, &c, "c", StreamPosition { offset: 1, epoch });
        assert_eq!(s.recovered, Some(true));
        assert_eq!(offsets(&drain(&c)), [2]);
        b.remove_client(&c);
        check_counts(&b);
    }

    fn kept_epoch(rt: &tokio::runtime::Runtime, b: &MemoryBroker, t: &str) -> Arc<str> {
        rt.block_on(b.history(t, None, 1)).unwrap().position.epoch
    }

    #[test]
    fn expired_history_of_untouched_topics_is_freed_by_later_publishing() {
        let ttl = Duration::from_secs(60);
        let b = broker_with(|c| {
            c.history_ttl = ttl;
            c.idempotency_window = ttl;
        });
        for i in 0..5 {
            b.publish_now(PublishRequest {
                topic: "quiet",
                data: b"1",
                idempotency_key: Some(&format!("k{i}")),
                ..PublishRequest::default()
            })
            .unwrap();
        }
        assert!(b.history_bytes() > 0);
        // Their age limits pass on an injected clock, no sleep: what the FIFO kept is dated
        // one `ttl` back, as if it had been published that long ago.
        age_fifo(&b, ttl);
        // "quiet" is never touched again; another topic's publication frees its history.
        publish(&b, "busy", "1");
        let busy = Publication::new("busy".into(), 1, b"1").cost();
        assert_eq!(b.history_bytes(), busy);
        assert_eq!(b.metrics.history_publications.get(), 1);
        check_counts(&b);
    }

    /// Dates every entry of the node-wide FIFO `by` earlier: the sweep (`enforce_budget`)
    /// reads only these dates.
    fn age_fifo(b: &MemoryBroker, by: Duration) {
        for k in b.kept.lock().iter_mut() {
            k.at =
                k.at.checked_sub(by)
                    .expect("the clock started long enough ago");
        }
    }

    #[test]
    fn stale_fifo_entries_stay_bounded() {
        // A small count limit trims locally; the node-wide FIFO must not keep the trimmed
        // entries forever.
        let b = broker_with(|c| c.history_size = 1);
        for i in 0..20_000 {
            publish(&b, "t", &i.to_string());
        }
        assert!(b.kept.lock().len() <= 2 + 1025, "one publication kept");
        check_counts(&b);
    }
}
