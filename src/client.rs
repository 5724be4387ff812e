//! One subscriber, as the hub sees it: an id, its transport, the topics it holds and its
//! bounded outbound queue. The queue is counted in bytes; passing the limit marks the
//! client a slow consumer instead of growing. Conflatable items (state topics such as
//! leaderboards) replace their own older, still-unsent version instead of piling up.
//!
//! `queue_max_bytes` is the client's one budget: the writer reports what it holds outside
//! the queue (the batch being written, a pending pong, a partly received message) with
//! `set_held`, and the queue only accepts what still fits beside it. One number bounds all
//! the memory a client, hostile or slow, can make the server keep for it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;

use crate::close::DisconnectReason;
use crate::metrics::{Metrics, Transport};
use crate::topic::TopicName;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub struct Item {
    pub bytes: Bytes,
    /// When the publication was accepted; None for replies and control frames.
    pub published_at: Option<Instant>,
    /// Set for state-topic items: a newer item of the same topic replaces this one.
    pub conflate: Option<TopicName>,
    /// The topic and offset of a publication (None for replies and control frames): what
    /// an SSE writer turns into its `id:` line, so every transport can report positions.
    pub source: Option<(TopicName, u64)>,
}

impl Item {
    /// A reply or control frame: not a publication, never conflated.
    pub fn control(bytes: Bytes) -> Item {
        Item {
            bytes,
            published_at: None,
            conflate: None,
            source: None,
        }
    }

    /// A publication's wire bytes for one transport. `live` publications count towards
    /// delivery latency; a replayed or retained one was published before the subscriber
    /// asked for it, so it does not.
    pub fn publication(
        p: &crate::publication::Publication,
        bytes: Bytes,
        conflate: bool,
        live: bool,
    ) -> Item {
        Item {
            bytes,
            published_at: live.then_some(p.published_at),
            conflate: conflate.then(|| p.topic.clone()),
            source: Some((p.topic.clone(), p.offset)),
        }
    }
}

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    closed: Option<DisconnectReason>,
}

pub struct Client {
    pub id: u64,
    pub transport: Transport,
    queue_max_bytes: usize,
    queue: Mutex<Queue>,
    /// Bytes the writer holds for this client outside the queue (see `set_held`).
    held: AtomicUsize,
    /// The writer's waker. A client has one writer, so a waker slot (and a flag that
    /// keeps a wake-up made while it was not waiting) is enough: the writer's future holds
    /// no waiter node, and an idle connection is smaller by one (docs/BENCHMARKS.md).
    waker: AtomicWaker,
    woken: AtomicBool,
    /// Topics held (joined or joining); guarded separately from the queue so fan-out never
    /// waits on it.
    pub(crate) topics: Mutex<Vec<TopicName>>,
    /// Set (under `topics`) once its connection is gone: no topic may be entered after.
    pub(crate) retired: AtomicBool,
}

/// What `enqueue` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued behind other items: the writer is already due to run.
    Queued,
    /// Queued into an empty queue: wake the writer.
    Wake,
    /// Not queued: the queue passed its limit and the client is now closed as a slow
    /// consumer. Wake the writer so it closes at once.
    Overflowed,
    /// The client was already closed; nothing was queued.
    Closed,
}

/// What `take_each` found.
pub enum Taken {
    /// Items were handed over; `more`: others are still queued.
    Some {
        more: bool,
    },
    Empty,
    Closed(DisconnectReason),
}

/// What the writer gets from the queue.
pub enum Batch {
    Items(Vec<Item>),
    Empty,
    Closed(DisconnectReason),
}

impl Client {
    pub fn new(transport: Transport, queue_max_bytes: usize) -> Self {
        Client {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            transport,
            queue_max_bytes,
            queue: Mutex::new(Queue::default()),
            held: AtomicUsize::new(0),
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            topics: Mutex::new(Vec::new()),
            retired: AtomicBool::new(false),
        }
    }

    /// Queues an item without waiting. Returns false if the client is closed (now or before).
    pub fn push(&self, item: Item, metrics: &Metrics) -> bool {
        match self.enqueue(item, metrics) {
            Pushed::Wake => {
                self.wake();
                true
            }
            Pushed::Overflowed => {
                self.wake();
                false
            }
            Pushed::Queued => true,
            Pushed::Closed => false,
        }
    }

    /// Wakes the writer after an `enqueue` that returned `Wake` or `Overflowed`.
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Marks the writer woken and hands over its waker, for the caller to wake once it has
    /// released its own locks (`Wakeups`): the waker moves out of the client, so a fan-out
    /// holds no reference to the client itself (whose reference count two cores would
    /// otherwise write in turn for every delivery). None: no waker is registered now (the
    /// writer is running, or registering, and will see the flag).
    pub fn take_wake(&self) -> Option<std::task::Waker> {
        self.woken.store(true, Ordering::Release);
        self.waker.take()
    }

    /// Queues an item and says whether the writer must be woken, without waking it, so
    /// a fan-out can wake writers after releasing its own lock.
    pub fn enqueue(&self, item: Item, metrics: &Metrics) -> Pushed {
        let mut q = self.queue.lock();
        if q.closed.is_some() {
            return Pushed::Closed;
        }
        let budget = self.queue_max_bytes.saturating_sub(self.held());
        if let Some(topic) = &item.conflate {
            let queued = q.bytes;
            if let Some(old) = q
                .items
                .iter_mut()
                .rev()
                .find(|i| i.conflate.as_ref() == Some(topic))
            {
                let (old_len, new_len) = (old.bytes.len(), item.bytes.len());
                if queued - old_len + new_len <= budget {
                    // Keep the older item's place (and publish time, so latency stays honest),
                    // but carry the newer position: the SSE id written with it must say
                    // which state the client now has.
                    old.bytes = item.bytes;
                    old.source = item.source;
                    q.bytes = queued - old_len + new_len;
                    metrics.conflated.inc();
                    return Pushed::Queued;
                }
            }
        }
        if q.bytes + item.bytes.len() > budget {
            let dropped = q.items.len() as u64 + 1;
            q.items = VecDeque::new();
            q.bytes = 0;
            q.closed = Some(DisconnectReason::SlowConsumer);
            drop(q);
            metrics.queue_full_drops.inc_by(dropped);
            return Pushed::Overflowed;
        }
        let was_empty = q.items.is_empty();
        q.bytes += item.bytes.len();
        q.items.push_back(item);
        if was_empty {
            Pushed::Wake
        } else {
            Pushed::Queued
        }
    }

    /// Takes queued items, up to about `max_bytes` (at least one) and `max_items`.
    pub fn take(&self, max_bytes: usize, max_items: usize) -> Batch {
        let mut items = Vec::new();
        match self.take_each(max_bytes, max_items, |item| items.push(item)) {
            Taken::Some { .. } => Batch::Items(items),
            Taken::Empty => Batch::Empty,
            Taken::Closed(reason) => Batch::Closed(reason),
        }
    }

    /// Like `take`, but hands each item to `each` (called under the queue lock: it must
    /// only move the item somewhere), so a writer can fill its own reused buffer without
    /// allocating a batch per wake-up.
    pub fn take_each(
        &self,
        max_bytes: usize,
        max_items: usize,
        mut each: impl FnMut(Item),
    ) -> Taken {
        let mut q = self.queue.lock();
        if let Some(reason) = q.closed {
            // Shutdown drains what is queued first; other closes drop the backlog.
            if reason != DisconnectReason::Shutdown || q.items.is_empty() {
                return Taken::Closed(reason);
            }
        }
        if q.items.is_empty() {
            return Taken::Empty;
        }
        let mut taken = 0;
        let mut n = 0;
        for item in &q.items {
            if n > 0 && (taken + item.bytes.len() > max_bytes || n == max_items) {
                break;
            }
            taken += item.bytes.len();
            n += 1;
        }
        q.bytes -= taken;
        q.items.drain(..n).for_each(&mut each);
        let more = !q.items.is_empty();
        if !more {
            // Give the buffer back once the queue has drained: an idle client holds none
            // (the first push of a batch allocates it again, beside a socket write).
            q.items = VecDeque::new();
        }
        Taken::Some { more }
    }

    /// Marks the client closed; the writer sends the close and ends. The first reason wins.
    pub fn close(&self, reason: DisconnectReason) {
        let mut q = self.queue.lock();
        if q.closed.is_none() {
            q.closed = Some(reason);
            if reason != DisconnectReason::Shutdown {
                q.items = VecDeque::new();
                q.bytes = 0;
            }
        }
        drop(q);
        self.wake();
    }

    pub fn closed(&self) -> Option<DisconnectReason> {
        self.queue.lock().closed
    }

    /// Resolves after a `push` to an empty queue or a `close` (a wake-up made while the
    /// writer was not waiting is kept, so none is lost between `take` returning Empty and
    /// this being awaited).
    pub async fn notified(&self) {
        std::future::poll_fn(|cx| self.poll_notified(cx)).await
    }

    /// `notified` as a poll, for a writer that waits on several things in one `poll_fn`.
    /// Only the client's one writer may call it.
    pub fn poll_notified(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        Poll::Pending
    }

    pub fn queued_bytes(&self) -> usize {
        self.queue.lock().bytes
    }

    /// The writer's report of what it holds for this client outside the queue; the queue
    /// then accepts only `queue_max_bytes` minus this.
    pub fn set_held(&self, bytes: usize) {
        self.held.store(bytes, Ordering::Relaxed);
    }

    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The whole budget: `queued_bytes() + held()` may not pass it.
    pub fn budget(&self) -> usize {
        self.queue_max_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize, conflate: Option<&str>) -> Item {
        Item {
            bytes: Bytes::from(vec![b'x'; n]),
            published_at: None,
            conflate: conflate.map(Into::into),
            source: None,
        }
    }

    #[test]
    fn over_limit_closes_as_slow_consumer() {
        let m = Metrics::new();
        let c = Client::new(Transport::Ws, 100);
        assert!(c.push(item(60, None), &m));
        assert!(!c.push(item(60, None), &m));
        assert_eq!(c.closed(), Some(DisconnectReason::SlowConsumer));
        assert!(matches!(
            c.take(1000, 10),
            Batch::Closed(DisconnectReason::SlowConsumer)
        ));
        assert_eq!(c.queued_bytes(), 0);
    }

    #[test]
    fn bytes_held_outside_the_queue_count_against_the_same_budget() {
        let m = Metrics::new();
        let c = Client::new(Transport::Ws, 100);
        c.set_held(50);
        assert!(c.push(item(40, None), &m));
        assert!(!c.push(item(20, None), &m));
        assert_eq!(c.closed(), Some(DisconnectReason::SlowConsumer));
    }

    #[test]
    fn conflation_keeps_newest_state_in_place() {
        let m = Metrics::new();
        let c = Client::new(Transport::Ws, 100);
        assert!(c.push(item(10, Some("board:a")), &m));
        assert!(c.push(item(5, None), &m));
        for n in 0..50 {
            assert!(c.push(item(20 + n % 3, Some("board:a")), &m));
        }
        let p = crate::publication::Publication::new("board:a".into(), 77, b"{}");
        assert!(c.push(Item::publication(&p, p.wire(Transport::Ws), true, true), &m));
        let Batch::Items(items) = c.take(1000, 10) else {
            panic!("expected items")
        };
        assert_eq!(items.len(), 2);
        assert_eq!(&items[0].bytes, &p.wire(Transport::Ws));
        // The newest state's position travels with its bytes.
        assert_eq!(items[0].source, Some(("board:a".into(), 77)));
        assert_eq!(c.queued_bytes(), 0);
    }

    #[test]
    fn take_respects_byte_and_item_caps() {
        let m = Metrics::new();
        let c = Client::new(Transport::Ws, 10_000);
        for _ in 0..10 {
            c.push(item(100, None), &m);
        }
        let Batch::Items(a) = c.take(250, 100) else {
            panic!()
        };
        assert_eq!(a.len(), 2);
        let Batch::Items(b) = c.take(10_000, 3) else {
            panic!()
        };
        assert_eq!(b.len(), 3);
        assert_eq!(c.queued_bytes(), 500);
        c.close(DisconnectReason::Shutdown);
        let Batch::Items(rest) = c.take(10_000, 100) else {
            panic!("shutdown drains first")
        };
        assert_eq!(rest.len(), 5);
        assert!(matches!(
            c.take(10_000, 100),
            Batch::Closed(DisconnectReason::Shutdown)
        ));
    }
}
