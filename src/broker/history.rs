//! The per-namespace limits of a stream's history: `history_size` publications at most,
//! none older than `history_ttl`. Applied to a topic whenever it is touched; what leaves
//! is released from the node-wide byte budget (`budget.rs`) and, for durable topics,
//! trimmed from the history log too.

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::memory::MemoryBroker;
use super::stream::{expired, Stream, StreamState};

impl MemoryBroker {
    /// Tells the durable log that the stream's history now starts after `upto`.
    pub(super) fn log_trim(&self, stream: &Stream, upto: u64) {
        if let (true, Some(log)) = (stream.ns.durable, &self.log) {
            log.trim(&stream.name, upto);
        }
    }

    /// Drops the `n` oldest publications of the stream's history.
    pub(super) fn trim_history(&self, stream: &Stream, st: &mut StreamState, n: usize) {
        let mut bytes = 0;
        let mut last = None;
        for p in st.history.drain(..n) {
            bytes += p.cost();
            last = Some(p.offset);
        }
        if let Some(o) = last {
            stream.trimmed.store(o, Ordering::Release);
            self.log_trim(stream, o);
            self.give_back(bytes, n);
            self.metrics.history_publications.dec_by(n as i64);
            self.metrics.history_evicted.inc_by(n as u64);
        }
    }

    /// Applies the namespace's count and age limits.
    pub(super) fn trim_expired(&self, stream: &Stream, st: &mut StreamState, now: Instant) {
        let over = st.history.len().saturating_sub(stream.ns.history_size);
        let old = st
            .history
            .iter()
            .skip(over)
            .take_while(|p| expired(p.published_at, stream.ns.history_ttl, now))
            .count();
        if over + old > 0 {
            self.trim_history(stream, st, over + old);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::broker::testing::*;
    use crate::broker::{Broker, StreamPosition};
    use crate::config::Namespace;
    use crate::subscribe::testing::*;
    use std::time::{Duration, Instant};

    #[test]
    fn history_keeps_the_namespace_count() {
        let b = broker_with(|c| {
            c.history_size = 3;
            c.namespaces.push(Namespace {
                pattern: "chat:*".into(),
                history_size: 5,
                history_ttl: Duration::from_secs(60),
                durable: false,
                presence: false,
                join_leave: false,
            });
        });
        for i in 0..10 {
            publish(&b, "plain", &i.to_string());
            publish(&b, "chat:1", &i.to_string());
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let h = rt.block_on(b.history("plain", None, 100)).unwrap();
        let got: Vec<u64> = h.publications.iter().map(|p| p.offset).collect();
        assert_eq!(got, [8, 9, 10]);
        assert_eq!(&h.publications[0].data()[..], b"7");
        let h = rt.block_on(b.history("chat:1", None, 100)).unwrap();
        assert_eq!(h.publications.len(), 5);
        assert_eq!(b.metrics.history_evicted.get(), 7 + 5);
        assert_eq!(b.metrics.history_publications.get(), 8);
        check_counts(&b);
    }

    #[test]
    fn history_ages_out() {
        let ttl = Duration::from_secs(60);
        let b = broker_with(|c| c.history_ttl = ttl);
        let r = publish(&b, "t", "1");
        publish(&b, "t", "2");
        let since = StreamPosition {
            offset: 0,
            epoch: r.epoch.clone(),
        };
        let c = ws_client();
        assert_eq!(resume(&b, &c, "t", since.clone()).recovered, Some(true));
        assert_eq!(offsets(&drain(&c)), [1, 2]);
        b.remove_client(&c);
        // The age limit on an injected clock: exactly one `history_ttl` later, no sleep (and
        // no race with a slow machine, as a real window this short would have).
        let later = Instant::now() + ttl;
        let s = b.lookup("t").unwrap();
        b.trim_expired(&s, &mut s.state.lock(), later);
        let s = resume(&b, &c, "t", since);
        assert_eq!(s.recovered, Some(false));
        assert_eq!(
            s.position.offset, 2,
            "the current position is still reported"
        );
        assert!(offsets(&drain(&c)).is_empty());
        assert_eq!(b.history_bytes(), 0);
        b.remove_client(&c);
        check_counts(&b);
    }
}
