//! One URL's queue of events waiting for delivery: bounded (`webhook_queue_max`), the
//! oldest dropped past it, so a receiver that is down costs the node a fixed amount of
//! memory; and the batches its delivery task takes from it.
//!
//! `push` is called under hub locks (see `hub::TopicEvents`): it takes this queue's lock
//! only (a leaf) and never waits.

use std::collections::VecDeque;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::Notify;

pub struct Queue {
    events: Mutex<VecDeque<String>>,
    max: usize,
    ready: Notify,
}

impl Queue {
    pub fn new(max: usize) -> Self {
        Queue {
            events: Mutex::new(VecDeque::new()),
            max,
            ready: Notify::new(),
        }
    }

    /// Queues one event's JSON; returns how many older events it pushed out (0 or 1).
    pub fn push(&self, event: String) -> u64 {
        let dropped = {
            let mut q = self.events.lock();
            let dropped = if q.len() >= self.max {
                q.pop_front();
                1
            } else {
                0
            };
            q.push_back(event);
            dropped
        };
        self.ready.notify_one();
        dropped
    }

    fn len(&self) -> usize {
        self.events.lock().len()
    }

    /// Waits for an event, then up to `linger` for more (or until `max` are queued), and
    /// takes up to `max` of them in order.
    pub async fn next_batch(&self, max: usize, linger: Duration) -> Vec<String> {
        loop {
            if self.len() > 0 {
                break;
            }
            self.ready.notified().await;
        }
        let deadline = tokio::time::Instant::now() + linger;
        while self.len() < max {
            if tokio::time::timeout_at(deadline, self.ready.notified())
                .await
                .is_err()
            {
                break;
            }
        }
        let mut q = self.events.lock();
        let n = q.len().min(max);
        q.drain(..n).collect()
    }
}

/// A delivery's body: `{"time_ms":N,"events":[…]}`, the events embedded as they are.
pub fn body(time_ms: u64, events: &[String]) -> String {
    let mut s = String::with_capacity(32 + events.iter().map(|e| e.len() + 1).sum::<usize>());
    s.push_str(r#"{"time_ms":"#);
    s.push_str(&time_ms.to_string());
    s.push_str(r#","events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(e);
    }
    s.push_str("]}");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drops_the_oldest_past_its_bound() {
        let q = Queue::new(3);
        let dropped: u64 = (0..5).map(|i| q.push(i.to_string())).sum();
        assert_eq!(dropped, 2);
        let b = q.next_batch(10, Duration::ZERO).await;
        assert_eq!(b, ["2", "3", "4"]);
    }

    #[tokio::test]
    async fn batches_up_to_max_in_order() {
        let q = Queue::new(100);
        for i in 0..7 {
            q.push(i.to_string());
        }
        assert_eq!(q.next_batch(5, Duration::from_secs(5)).await.len(), 5);
        assert_eq!(q.next_batch(5, Duration::from_millis(10)).await, ["5", "6"]);
        let v: serde_json::Value =
            serde_json::from_str(&body(9, &[r#"{"a":1}"#.into(), "2".into()])).unwrap();
        assert_eq!(v["events"][0]["a"], 1);
        assert_eq!(v["time_ms"], 9);
    }
}
