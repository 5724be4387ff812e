//! Durable topics (namespace `durable = true`): a publication's offset is assigned and
//! its record appended to the history log (`durable.rs`) under the stream lock, and it is
//! delivered and acknowledged only after its commit, in offset order. At start-up each
//! durable topic is rebuilt from the log with its epoch, offsets and history.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{oneshot, watch};

use super::budget::KeptKind;
use super::durable::{DurableError, DurableLog, Record, RecoveredTopic};
use super::idempotency::KeyState;
use super::memory::MemoryBroker;
use super::publish::Attempt;
use super::stream::{expired, Stream};
use super::table::Creator;
use super::{BrokerError, PublishRequest, Receipt};
use crate::publication::Publication;

/// What a durable publication's commit callback needs of its request.
pub(super) struct Pending {
    pub(super) stream: Arc<Stream>,
    pub(super) publication: Arc<Publication>,
    pub(super) retain: bool,
    pub(super) conflate: bool,
    pub(super) key: Option<Box<str>>,
    /// Wakes retries with the same key (dropped on failure, so they publish themselves).
    pub(super) key_tx: Option<watch::Sender<Option<u64>>>,
    pub(super) generation: u64,
    pub(super) answer: oneshot::Sender<Result<Receipt, BrokerError>>,
}

impl MemoryBroker {
    /// Rebuilds one durable topic from the log at start-up.
    pub(super) fn restore(&self, t: RecoveredTopic) {
        let Some(log) = &self.log else { return };
        let ns = self.cfg.namespace(&t.topic);
        if !ns.durable {
            // No longer durable: its stored history has no reader any more.
            log.forget(&t.topic);
            return;
        }
        if self.reserve(&t.topic, Creator::Publisher).is_err() {
            tracing::warn!(topic = %t.topic, "durable topic not restored: max_topics reached");
            return;
        }
        let trimmed = t.records.first().map_or(t.last_offset, |r| r.offset - 1);
        let stream = Arc::new(Stream::new(
            t.topic.clone(),
            t.epoch.clone(),
            ns,
            t.last_offset,
            true,
            trimmed,
        ));
        self.shard(&t.topic)
            .lock()
            .insert(t.topic.clone(), stream.clone());
        self.metrics.topics.inc();
        let now = Instant::now();
        let now_ms = unix_ms();
        let mut st = stream.state.lock();
        for r in t.records {
            // Age carried over from the wall clock; `None` only right after a boot, when
            // the record is certainly older than any limit.
            let Some(at) =
                now.checked_sub(Duration::from_millis(now_ms.saturating_sub(r.published_ms)))
            else {
                continue;
            };
            let mut p = Publication::new(stream.name.clone(), r.offset, &r.data);
            p.published_at = at;
            let p = Arc::new(p);
            if let Some(key) = &r.idempotency_key {
                if !expired(at, self.cfg.idempotency_window, now) {
                    self.remember_key(&stream, &mut st, key, KeyState::Done(r.offset), at);
                }
            }
            if stream.ns.history_size > 0 {
                self.metrics.history_publications.inc();
                self.enter(&stream, KeptKind::Publication(p.offset), p.cost(), at);
                st.history.push_back(p);
            }
        }
        // History must stay contiguous up to `last_offset`: drop what precedes a hole
        // (records skipped above).
        let contiguous_from = st
            .history
            .iter()
            .rev()
            .zip((1..=t.last_offset).rev())
            .take_while(|(p, o)| p.offset == *o)
            .count();
        let n = st.history.len() - contiguous_from;
        self.trim_history(&stream, &mut st, n);
        self.trim_expired(&stream, &mut st, now);
        self.settle(&stream, &mut st);
    }

    /// Publishes to a durable topic: the offset is assigned and the record appended under
    /// the stream lock (so the log holds the topic in offset order), then the publisher
    /// waits for the commit. The commit's callback (`settle_durable`, on the log's writer
    /// thread, in offset order) delivers, keeps history and answers.
    pub(super) async fn publish_durable(
        &self,
        log: &DurableLog,
        req: &PublishRequest<'_>,
    ) -> Result<Receipt, BrokerError> {
        let unavailable = |e: DurableError| BrokerError::Unavailable(e.to_string());
        let mut gone = false;
        loop {
            // Waiting for queue room happens here, before any lock.
            let mut slot = Some(log.reserve().await.map_err(unavailable)?);
            let (answer, answered) = oneshot::channel();
            let mut answer = Some(answer);
            let attempt = self.with_stream(req.topic, Creator::Publisher, |stream, st| {
                let now = Instant::now();
                if let Some(duplicate) = self.replay_key(stream, st, req.idempotency_key, now)? {
                    return Ok(Some(duplicate));
                }
                self.mark_published(stream, st);
                st.assigned += 1;
                let p = Arc::new(Publication::new(stream.name.clone(), st.assigned, req.data));
                let key_tx = req.idempotency_key.map(|key| {
                    let (tx, rx) = watch::channel(None);
                    self.remember_key(stream, st, key, KeyState::Pending(rx), now);
                    tx
                });
                let rec = Record {
                    topic: stream.name.clone(),
                    epoch: stream.epoch.clone(),
                    offset: p.offset,
                    data: p.data(),
                    published_ms: unix_ms(),
                    idempotency_key: req.idempotency_key.map(Into::into),
                };
                let pending = Pending {
                    stream: stream.clone(),
                    publication: p,
                    retain: req.retain,
                    conflate: req.conflate,
                    key: req.idempotency_key.map(Into::into),
                    key_tx,
                    generation: st.generation,
                    answer: answer.take().expect("called once per stream lookup"),
                };
                let me = self.me.clone();
                slot.take().expect("called once per stream lookup").append(
                    rec,
                    Box::new(move |result| match me.upgrade() {
                        Some(broker) => broker.settle_durable(pending, result),
                        None => {
                            let _ = pending
                                .answer
                                .send(Err(BrokerError::Unavailable("shutting down".into())));
                        }
                    }),
                );
                Ok(None)
            })?;
            match attempt {
                Ok(Some(duplicate)) => return Ok(duplicate),
                Ok(None) => {
                    return answered.await.unwrap_or_else(|_| {
                        Err(BrokerError::Unavailable("history log stopped".into()))
                    })
                }
                Err(Attempt::Failed(e)) => return Err(e),
                Err(Attempt::Wait(_)) if gone => {
                    return Err(BrokerError::Unavailable(
                        "the first publish with this idempotency key was lost".into(),
                    ))
                }
                // A failed first publish forgets its key before it lets the waiters go,
                // so the next attempt publishes; a key still pending after its publish is
                // gone (the log stopped) is an error, not a busy loop.
                Err(Attempt::Wait(mut rx)) => {
                    gone = rx.wait_for(|v| v.is_some()).await.is_err();
                }
            }
        }
    }

    /// A durable publication's commit outcome, on the log's writer thread in offset
    /// order: on success deliver and keep it like a memory publication; on failure roll
    /// the topic's offsets back to the last committed one (once per failure: everything
    /// queued on top of the failed record fails too) and forget its key.
    pub(super) fn settle_durable(&self, p: Pending, result: Result<(), DurableError>) {
        let stream = &p.stream;
        let mut to_wake = super::Wakeups::default();
        let mut st = stream.state.lock();
        let answer = match result {
            Ok(()) => {
                let req = PublishRequest {
                    topic: &stream.name,
                    data: &[],
                    retain: p.retain,
                    conflate: p.conflate,
                    idempotency_key: p.key.as_deref(),
                };
                let reached = self.commit(stream, &mut st, &p.publication, &req, &mut to_wake);
                if let Some(tx) = &p.key_tx {
                    tx.send_replace(Some(p.publication.offset));
                }
                Ok(Receipt {
                    offset: p.publication.offset,
                    epoch: stream.epoch.clone(),
                    subscribers: reached,
                    duplicate: false,
                })
            }
            Err(e) => {
                if st.generation == p.generation {
                    st.generation += 1;
                    st.assigned = st.last_offset;
                }
                if let Some(key) = &p.key {
                    self.drop_pending_key(&mut st, key);
                }
                tracing::warn!(topic = %stream.name, offset = p.publication.offset, error = %e,
                    "durable publication failed");
                Err(BrokerError::Unavailable(e.to_string()))
            }
        };
        self.settle(stream, &mut st);
        drop(st);
        to_wake.wake();
        self.enforce_budget();
        let _ = p.answer.send(answer);
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Broker;
    use crate::config::{Config, Namespace};
    use crate::hub::Hub;
    use crate::metrics::Metrics;

    fn durable_broker(dir: &std::path::Path) -> Arc<MemoryBroker> {
        let mut cfg = Config {
            data_dir: dir.to_path_buf(),
            ..Config::default()
        };
        cfg.namespaces.push(Namespace {
            pattern: "d:*".into(),
            history_size: 10_000,
            history_ttl: Duration::from_secs(3600),
            durable: true,
            presence: false,
            join_leave: false,
        });
        let metrics = Arc::new(Metrics::new());
        let hub = Arc::new(Hub::new(3, metrics.clone()));
        MemoryBroker::open(&cfg, hub, metrics).unwrap()
    }

    async fn publish(b: &MemoryBroker, n: u64) -> Result<Receipt, BrokerError> {
        let data = format!(r#"{{"n":{n}}}"#);
        b.publish(PublishRequest {
            topic: "d:t",
            data: data.as_bytes(),
            ..PublishRequest::default()
        })
        .await
    }

    async fn offsets(b: &MemoryBroker) -> Vec<u64> {
        let h = b.history("d:t", None, 100_000).await.unwrap();
        h.publications.iter().map(|p| p.offset).collect()
    }

    /// A failed commit fails the publications queued on top of it too, rolls the topic
    /// back once, and the next publications reuse the offsets: memory and disk stay
    /// contiguous, and the epoch stays.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_commits_leave_no_gap_in_memory_or_on_disk() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        let epoch = publish(&b, 0).await.unwrap().epoch;
        let mut ok = 1u64;
        for round in 0..3u64 {
            b.log.as_ref().unwrap().fail_next_commits(1);
            let mut tasks = tokio::task::JoinSet::new();
            for i in 0..20 {
                let b = b.clone();
                tasks.spawn(async move { publish(&b, 100 * (round + 1) + i).await });
            }
            let mut failed = 0;
            while let Some(r) = tasks.join_next().await {
                match r.unwrap() {
                    Ok(r) => {
                        assert_eq!(r.epoch, epoch);
                        ok += 1;
                    }
                    Err(BrokerError::Unavailable(_)) => failed += 1,
                    Err(e) => panic!("{e}"),
                }
            }
            assert!(failed >= 1, "the injected failure hit nobody");
            let r = publish(&b, 1000 + round).await.unwrap();
            ok += 1;
            assert_eq!(
                r.offset, ok,
                "offsets continue right after the last committed"
            );
        }
        assert_eq!(offsets(&b).await, (1..=ok).collect::<Vec<_>>());
        b.close().await;
        drop(b);

        let b = durable_broker(dir.path());
        assert_eq!(offsets(&b).await, (1..=ok).collect::<Vec<_>>());
        let r = publish(&b, 9999).await.unwrap();
        assert_eq!((r.offset, &r.epoch), (ok + 1, &epoch));
        b.close().await;
    }

    /// A keyed publication whose commit failed is forgotten with its key: the retry
    /// publishes (once), and concurrent retries of it share one publication.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_keyed_publish_lets_its_retry_publish_once() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        publish(&b, 0).await.unwrap();
        let keyed = |b: Arc<MemoryBroker>| async move {
            b.publish(PublishRequest {
                topic: "d:t",
                data: b"{}",
                idempotency_key: Some("k"),
                ..PublishRequest::default()
            })
            .await
        };
        let bytes_before = b.history_bytes();
        b.log.as_ref().unwrap().fail_next_commits(1);
        let e = keyed(b.clone()).await.unwrap_err();
        assert!(matches!(e, BrokerError::Unavailable(_)), "{e}");
        assert_eq!(
            b.history_bytes(),
            bytes_before,
            "the failed key is not kept"
        );
        let retries: Vec<_> = (0..8).map(|_| tokio::spawn(keyed(b.clone()))).collect();
        let mut firsts = 0;
        for r in retries {
            let r = r.await.unwrap().unwrap();
            assert_eq!(r.offset, 2);
            firsts += usize::from(!r.duplicate);
        }
        assert_eq!(firsts, 1);
        assert_eq!(offsets(&b).await, vec![1, 2]);
        b.close().await;
    }

    /// An evicted durable topic is forgotten on disk too: it comes back in a new epoch.
    #[tokio::test]
    async fn an_evicted_durable_topic_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let b = durable_broker(dir.path());
        let first = publish(&b, 1).await.unwrap();
        let stream = b.lookup("d:t").unwrap();
        assert!(b.unlink(&stream, |st| st.evictable()));
        b.close().await;
        drop(b);
        let b = durable_broker(dir.path());
        assert!(b.lookup("d:t").is_none());
        let again = publish(&b, 2).await.unwrap();
        assert_eq!(again.offset, 1);
        assert_ne!(again.epoch, first.epoch);
        b.close().await;
    }
}
