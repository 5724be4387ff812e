//! One topic's stream: its epoch, the offsets it gave out, the history it keeps, its
//! retained state and its idempotency keys, all behind the stream's own mutex, which orders
//! everything about the topic (see `memory.rs` for the lock order).
//!
//! A topic made again after it left the table (evicted, or a restart of memory-only
//! history) starts a new stream with a new epoch, so an old position is never mistaken
//! for one of the new stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::idempotency::Keys;
use super::StreamPosition;
use crate::config::Namespace;
use crate::publication::Publication;
use crate::topic::TopicName;

pub(super) struct Stream {
    pub(super) name: TopicName,
    pub(super) epoch: Arc<str>,
    /// The topic's history settings, looked up once when the stream is created.
    pub(super) ns: Namespace,
    pub(super) state: Mutex<StreamState>,
    /// The newest offset that left history (history only ever loses its oldest
    /// publications): a node-wide FIFO entry at or below it is stale. Read without the lock.
    pub(super) trimmed: AtomicU64,
    /// The same for idempotency keys, by their sequence number.
    pub(super) keys_trimmed: AtomicU64,
    /// Set (under the shard and stream locks) when the stream leaves the table: a holder of
    /// a stale `Arc<Stream>` must look the topic up again, and its FIFO entries are stale.
    pub(super) dead: AtomicBool,
}

pub(super) struct StreamState {
    /// The newest offset handed to subscribers (and, for durable topics, on disk).
    pub(super) last_offset: u64,
    /// The newest offset given out. Equal to `last_offset` except on the durable path,
    /// where an offset is assigned before its commit and delivered after it.
    pub(super) assigned: u64,
    /// Local subscribers (kept in step with the hub under this lock).
    pub(super) subscribers: usize,
    pub(super) retained: Option<(Arc<Publication>, bool)>,
    /// Oldest first, offsets contiguous up to `last_offset`.
    pub(super) history: VecDeque<Arc<Publication>>,
    pub(super) keys: Keys,
    /// Published to at least once: counts against `max_topics` only, and its offsets are
    /// kept while idle. Otherwise it counts against `max_subscriber_topics` too.
    pub(super) published: bool,
    /// Has an entry in the idle queue (which may be stale by now).
    pub(super) queued: bool,
    /// Durable path: bumped when a commit fails and `assigned` is rolled back, so the
    /// failures of the publications queued on top of it (same generation) roll nothing
    /// back a second time.
    pub(super) generation: u64,
}

impl Stream {
    /// A stream as the table holds it. Its epoch is new for a topic made now and the
    /// stored one for a durable topic rebuilt at start-up; `trimmed` is the offset its
    /// history starts after.
    pub(super) fn new(
        name: TopicName,
        epoch: Arc<str>,
        ns: Namespace,
        last_offset: u64,
        published: bool,
        trimmed: u64,
    ) -> Stream {
        Stream {
            name,
            epoch,
            ns,
            state: Mutex::new(StreamState {
                last_offset,
                assigned: last_offset,
                subscribers: 0,
                retained: None,
                history: VecDeque::new(),
                keys: Keys::default(),
                published,
                queued: false,
                generation: 0,
            }),
            trimmed: AtomicU64::new(trimmed),
            keys_trimmed: AtomicU64::new(0),
            dead: AtomicBool::new(false),
        }
    }

    /// The resume rule (docs/protocol.md): whether `since` can be served from history,
    /// and from which index of it. A state topic's snapshot is a full recovery.
    pub(super) fn resume_point(&self, st: &StreamState, since: &StreamPosition) -> Option<usize> {
        if since.epoch != self.epoch || since.offset > st.last_offset {
            return None;
        }
        if since.offset == st.last_offset || st.state_topic() {
            return Some(st.history.len());
        }
        let first = st.history.front()?.offset;
        (first <= since.offset + 1).then(|| (since.offset + 1 - first) as usize)
    }
}

impl StreamState {
    pub(super) fn idle(&self) -> bool {
        self.subscribers == 0 && self.retained.is_none()
    }

    /// Idle with no durable publication waiting for its commit: the commit's callback
    /// needs the stream it was assigned in.
    pub(super) fn evictable(&self) -> bool {
        self.idle() && self.assigned == self.last_offset
    }

    /// A state topic (retained, like a leaderboard) keeps no history: its newest
    /// publication is the whole state.
    pub(super) fn state_topic(&self) -> bool {
        self.retained.is_some()
    }
}

pub(super) fn expired(at: Instant, ttl: Duration, now: Instant) -> bool {
    now.saturating_duration_since(at) >= ttl
}

/// 8 lowercase hex characters, fresh for every stream.
pub fn new_epoch() -> Arc<str> {
    format!("{:08x}", rand::random::<u32>()).into()
}
