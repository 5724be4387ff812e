//! One publish to a memory topic, entirely under the stream lock: the idempotency key is
//! checked, the next offset assigned, and `commit` hands the publication to the hub and
//! keeps it (history or retained state). Durable topics take the same `commit` after
//! their log commit (`durable_topics.rs`).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::budget::KeptKind;
use super::idempotency::KeyState;
use super::memory::MemoryBroker;
use super::stream::{Stream, StreamState};
use super::table::Creator;
use super::{BrokerError, PublishRequest, Receipt};
use crate::broker::Wakeups;
use crate::publication::Publication;

/// Why a publish attempt did not finish under the stream lock.
pub(super) enum Attempt {
    Failed(BrokerError),
    /// A publish with the same key is in flight: wait for it, then look again.
    Wait(watch::Receiver<Option<u64>>),
}

impl From<BrokerError> for Attempt {
    fn from(e: BrokerError) -> Self {
        Attempt::Failed(e)
    }
}

impl MemoryBroker {
    /// After its offset was assigned (and, for durable topics, committed): hands the
    /// publication to the hub, keeps it in history or as the retained state, and answers
    /// its idempotency key. Runs under the stream lock, in offset order. Returns the number
    /// of local subscribers it reached.
    pub(super) fn commit(
        &self,
        stream: &Arc<Stream>,
        st: &mut StreamState,
        p: &Arc<Publication>,
        req: &PublishRequest<'_>,
        to_wake: &mut Wakeups,
    ) -> usize {
        let now = Instant::now();
        st.last_offset = p.offset;
        let reached = self.sink.deliver(p, &stream.epoch, req.conflate, to_wake);
        if req.retain {
            st.retained = Some((p.clone(), req.conflate));
            // A state topic's newest publication is all a subscriber needs.
            let n = st.history.len();
            self.trim_history(stream, st, n);
        } else {
            st.retained = None;
            if stream.ns.history_size > 0 {
                st.history.push_back(p.clone());
                self.metrics.history_publications.inc();
                self.enter(stream, KeptKind::Publication(p.offset), p.cost(), now);
            } else {
                stream.trimmed.store(p.offset, Ordering::Release);
                self.log_trim(stream, p.offset);
            }
            self.trim_expired(stream, st, now);
        }
        if let Some(key) = req.idempotency_key {
            self.remember_key(stream, st, key, KeyState::Done(p.offset), now);
        }
        self.metrics.publications.inc();
        reached
    }

    /// One publish attempt, entirely under the stream lock (memory topics).
    pub(super) fn try_publish(&self, req: &PublishRequest<'_>) -> Result<Receipt, Attempt> {
        let mut to_wake = Wakeups::default();
        let result = self.with_stream(req.topic, Creator::Publisher, |stream, st| {
            if let Some(duplicate) =
                self.replay_key(stream, st, req.idempotency_key, Instant::now())?
            {
                return Ok(duplicate);
            }
            if stream.ns.durable && self.log.is_some() {
                // Its offsets are assigned by the log's commit order (`publish_durable`).
                return Err(Attempt::Failed(BrokerError::Unavailable(
                    "a durable topic is published through the async path only".into(),
                )));
            }
            self.mark_published(stream, st);
            // Durable namespaces take the same steps with the log's commit between the
            // assignment and `commit` (`publish_durable`).
            st.assigned += 1;
            let p = Arc::new(Publication::new(stream.name.clone(), st.assigned, req.data));
            let reached = self.commit(stream, st, &p, req, &mut to_wake);
            Ok(Receipt {
                offset: p.offset,
                epoch: stream.epoch.clone(),
                subscribers: reached,
                duplicate: false,
            })
        });
        // Waking schedules each writer task: done after the stream lock is released so the
        // next publication of this topic does not wait behind 10,000 wake-ups.
        to_wake.wake();
        self.enforce_budget();
        result?
    }

    /// Publishes without waiting (memory topics): for callers outside async code.
    pub fn publish_now(&self, req: PublishRequest<'_>) -> Result<Receipt, BrokerError> {
        self.publish_once(
            &req,
            "a publish with this idempotency key is still in progress",
        )
    }

    /// One attempt that does not wait for a first publish with the same key still in
    /// flight: that answers `store_unavailable`, saying `why`.
    pub(super) fn publish_once(
        &self,
        req: &PublishRequest<'_>,
        why: &str,
    ) -> Result<Receipt, BrokerError> {
        match self.try_publish(req) {
            Ok(r) => Ok(r),
            Err(Attempt::Failed(e)) => Err(e),
            Err(Attempt::Wait(_)) => Err(BrokerError::Unavailable(why.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::*;
    use crate::client::Client;
    use crate::metrics::Transport;
    use crate::subscribe::testing::*;
    use bytes::Bytes;

    #[test]
    fn offsets_are_per_topic_and_gapless() {
        let b = broker(10);
        assert_eq!(publish(&b, "a", "1").offset, 1);
        assert_eq!(publish(&b, "a", "2").offset, 2);
        assert_eq!(publish(&b, "b", "3").offset, 1);
        let e = publish(&b, "a", "4").epoch;
        assert_eq!(e.len(), 8);
        assert!(e
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn ack_then_retained_then_live_in_order() {
        let b = broker(10);
        publish_state(&b, "board:x", "{\"v\":1}");
        let c = Arc::new(Client::new(Transport::Sse, 1 << 20));
        let s = b
            .subscribe(&c, "board:x", None, &|s| {
                Some(Bytes::from(format!("ack{}", s.position.offset)))
            })
            .unwrap();
        assert_eq!(s.position.offset, 1);
        publish_state(&b, "board:x", "{\"v\":2}");
        // Unsent state v1 is conflated into v2: the subscriber gets the ack, then the newest.
        let got = drain(&c);
        assert_eq!(got.len(), 2);
        assert_eq!(&got[0].bytes[..], b"ack1");
        assert!(std::str::from_utf8(&got[1].bytes)
            .unwrap()
            .contains("\"v\":2"));
        publish_state(&b, "board:x", "{\"v\":3}");
        assert_eq!(offsets(&drain(&c)), [3]);
        b.remove_client(&c);
        check_counts(&b);
    }
}
