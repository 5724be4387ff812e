//! Idempotent publish: the `Idempotency-Key`s a topic remembers, so a retry within
//! `idempotency_window` gets the first publication's receipt instead of a second
//! publication. Bounded per topic (`MAX_KEYS_PER_TOPIC`) and counted against the node-wide
//! history budget (`budget.rs`); the oldest key is forgotten first.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::watch;

use super::budget::KeptKind;
use super::memory::MemoryBroker;
use super::publish::Attempt;
use super::stream::{expired, Stream, StreamState};
use super::Receipt;

/// Remembered idempotency keys per topic; the oldest is forgotten first past it.
pub const MAX_KEYS_PER_TOPIC: usize = 10_000;

/// What a remembered key costs against `history_max_bytes`, beside its own length.
pub(super) const KEY_COST: usize = 96;

/// A topic's remembered idempotency keys, oldest first.
#[derive(Default)]
pub(super) struct Keys {
    pub(super) order: VecDeque<(u64, Arc<str>, Instant)>,
    pub(super) map: HashMap<Arc<str>, KeyState>,
    pub(super) next_seq: u64,
}

/// What a remembered key answers.
#[derive(Clone)]
pub enum KeyState {
    /// Published: a retry gets this offset back.
    Done(u64),
    /// The first publish with this key is still waiting for its commit (durable topics);
    /// a retry waits for the offset it is given (None: it failed, so the retry publishes).
    Pending(watch::Receiver<Option<u64>>),
}

impl MemoryBroker {
    /// Expires the stream's old keys, then answers a publish carrying `key` if it repeats
    /// one: `Ok(Some(receipt))` for a key already published (the first receipt, marked a
    /// duplicate), `Err(Wait)` while the first publish still awaits its commit, `Ok(None)`
    /// for a publish that goes ahead.
    pub(super) fn replay_key(
        &self,
        stream: &Stream,
        st: &mut StreamState,
        key: Option<&str>,
        now: Instant,
    ) -> Result<Option<Receipt>, Attempt> {
        self.expire_keys(stream, st, now);
        let Some(key) = key else { return Ok(None) };
        match st.keys.map.get(key) {
            Some(KeyState::Done(offset)) => {
                self.metrics.idempotent_replays.inc();
                Ok(Some(Receipt {
                    offset: *offset,
                    epoch: stream.epoch.clone(),
                    subscribers: st.subscribers,
                    duplicate: true,
                }))
            }
            Some(KeyState::Pending(rx)) => Err(Attempt::Wait(rx.clone())),
            None => Ok(None),
        }
    }

    /// Forgets the `n` oldest idempotency keys of the stream.
    pub(super) fn forget_keys(&self, stream: &Stream, st: &mut StreamState, n: usize) {
        let mut bytes = 0;
        let mut last = None;
        for (seq, key, _) in st.keys.order.drain(..n) {
            st.keys.map.remove(&key);
            bytes += key.len() + KEY_COST;
            last = Some(seq);
        }
        if let Some(seq) = last {
            stream.keys_trimmed.store(seq, Ordering::Release);
            self.give_back(bytes, n);
        }
    }

    pub(super) fn expire_keys(&self, stream: &Stream, st: &mut StreamState, now: Instant) {
        let window = self.cfg.idempotency_window;
        let old = st
            .keys
            .order
            .iter()
            .take_while(|(_, _, at)| expired(*at, window, now))
            .count();
        if old > 0 {
            self.forget_keys(stream, st, old);
        }
    }

    /// Remembers a key's answer, forgetting the topic's oldest past `MAX_KEYS_PER_TOPIC`.
    pub(super) fn remember_key(
        &self,
        stream: &Arc<Stream>,
        st: &mut StreamState,
        key: &str,
        state: KeyState,
        now: Instant,
    ) {
        if let Some(s) = st.keys.map.get_mut(key) {
            *s = state;
            return;
        }
        if st.keys.order.len() >= MAX_KEYS_PER_TOPIC {
            self.forget_keys(stream, st, 1);
        }
        st.keys.next_seq += 1;
        let seq = st.keys.next_seq;
        let key: Arc<str> = key.into();
        st.keys.order.push_back((seq, key.clone(), now));
        st.keys.map.insert(key.clone(), state);
        self.enter(stream, KeptKind::Key(seq), key.len() + KEY_COST, now);
    }

    /// Forgets a key whose first publication failed, so a retry publishes.
    pub(super) fn drop_pending_key(&self, st: &mut StreamState, key: &str) {
        if !matches!(st.keys.map.get(key), Some(KeyState::Pending(_))) {
            return;
        }
        st.keys.map.remove(key);
        if let Some(i) = st.keys.order.iter().position(|(_, k, _)| &**k == key) {
            st.keys.order.remove(i);
            self.give_back(key.len() + KEY_COST, 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::testing::*;
    use crate::broker::{Broker, BrokerError, PublishRequest};
    use std::time::Duration;

    fn set_key(b: &MemoryBroker, topic: &str, key: &str, state: Option<KeyState>) {
        let s = b.lookup(topic).unwrap();
        let mut st = s.state.lock();
        match state {
            Some(state) => b.remember_key(&s, &mut st, key, state, Instant::now()),
            None => {
                let n = st.keys.order.len();
                b.forget_keys(&s, &mut st, n);
            }
        }
    }

    #[tokio::test]
    async fn retries_wait_for_a_pending_first_publish() {
        let b = Arc::new(broker(10));
        publish(&b, "t", "1");
        let keyed = |b: Arc<TestBroker>| async move {
            b.publish(PublishRequest {
                topic: "t",
                data: b"2",
                idempotency_key: Some("k"),
                ..PublishRequest::default()
            })
            .await
        };
        // Settled while (or before) the retry waits: it gets the first receipt.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "k", Some(KeyState::Pending(rx)));
        let retry = tokio::spawn(keyed(b.clone()));
        set_key(&b, "t", "k", Some(KeyState::Done(1)));
        tx.send_replace(Some(1));
        let r = retry.await.unwrap().unwrap();
        assert_eq!((r.offset, r.duplicate), (1, true));

        // The first publish failed and its key was forgotten: the retry publishes.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "k", None);
        set_key(&b, "t", "k", Some(KeyState::Pending(rx)));
        let retry = tokio::spawn(keyed(b.clone()));
        set_key(&b, "t", "k", None);
        drop(tx);
        let r = retry.await.unwrap().unwrap();
        assert_eq!((r.offset, r.duplicate), (2, false));

        // A key left pending by a first publish that is gone: an error, not a busy loop.
        let (tx, rx) = watch::channel(None);
        set_key(&b, "t", "j", Some(KeyState::Pending(rx)));
        drop(tx);
        let e = b
            .publish(PublishRequest {
                topic: "t",
                data: b"3",
                idempotency_key: Some("j"),
                ..PublishRequest::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(e, BrokerError::Unavailable(_)));
        check_counts(&b);
    }

    #[test]
    fn idempotent_retries_get_the_first_receipt() {
        let window = Duration::from_secs(60);
        let b = broker_with(|c| c.idempotency_window = window);
        let keyed = |key: &'static str, data: &'static str| {
            b.publish_now(PublishRequest {
                topic: "t",
                data: data.as_bytes(),
                idempotency_key: Some(key),
                ..PublishRequest::default()
            })
            .unwrap()
        };
        let first = keyed("k1", "1");
        let again = keyed("k1", "2");
        assert_eq!(
            (again.offset, &again.epoch, again.duplicate),
            (1, &first.epoch, true)
        );
        assert_eq!(keyed("k2", "3").offset, 2);
        assert_eq!(b.metrics.idempotent_replays.get(), 1);
        check_counts(&b);
        // The window passes on an injected clock: exactly one window later, no sleep (and no
        // race with a slow machine, as a real window this short would have).
        let later = Instant::now() + window;
        let s = b.lookup("t").unwrap();
        b.expire_keys(&s, &mut s.state.lock(), later);
        let late = keyed("k1", "4");
        assert_eq!(
            (late.offset, late.duplicate),
            (3, false),
            "the window passed"
        );
        check_counts(&b);
    }
}
