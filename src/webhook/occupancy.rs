//! The vacate grace (`webhook_vacate_grace`): a topic that lost its last subscriber is
//! reported vacated only once it stayed empty that long; a subscriber back within it
//! cancels both the vacate and the occupy it would have caused, so a page reload does not
//! flap.
//!
//! Bounded: at most `max` topics wait out their grace (the node's `max_topics`); past it a
//! vacate is reported at once.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use crate::topic::TopicName;

pub struct Occupancy {
    grace: Duration,
    max: usize,
    /// Vacated topics waiting out their grace, and when it ends.
    pending: Mutex<HashMap<TopicName, Instant>>,
}

impl Occupancy {
    pub fn new(grace: Duration, max: usize) -> Self {
        Occupancy {
            grace,
            max,
            pending: Mutex::new(HashMap::new()),
        }
    }

    /// The topic gained a first subscriber: whether that is news (false: it was only
    /// waiting out its grace).
    pub fn occupied(&self, topic: &str) -> bool {
        self.pending.lock().remove(topic).is_none()
    }

    /// The topic lost its last subscriber: whether to report it now (else `due` gives it
    /// once its grace is over).
    pub fn vacated(&self, topic: &str, now: Instant) -> bool {
        if self.grace.is_zero() {
            return true;
        }
        let mut p = self.pending.lock();
        if p.len() >= self.max {
            return true;
        }
        p.insert(topic.into(), now + self.grace);
        false
    }

    /// The topics whose grace ended by `now`: vacated for good.
    pub fn due(&self, now: Instant) -> Vec<TopicName> {
        let mut out = Vec::new();
        self.pending.lock().retain(|t, end| {
            if *end <= now {
                out.push(t.clone());
                false
            } else {
                true
            }
        });
        out
    }

    /// How often `due` is worth asking.
    pub fn tick(&self) -> Duration {
        (self.grace / 10).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quick_return_cancels_both() {
        let o = Occupancy::new(Duration::from_secs(1), 10);
        let t0 = Instant::now();
        assert!(o.occupied("a"));
        assert!(!o.vacated("a", t0));
        assert!(!o.occupied("a"), "back within the grace: no occupy");
        assert!(
            o.due(t0 + Duration::from_secs(2)).is_empty(),
            "and no vacate"
        );
        assert!(!o.vacated("a", t0));
        assert!(o.due(t0 + Duration::from_millis(500)).is_empty());
        assert_eq!(o.due(t0 + Duration::from_secs(1)).len(), 1);
        assert!(o.occupied("a"), "after the grace: news again");
    }

    #[test]
    fn past_its_bound_a_vacate_is_reported_at_once() {
        let o = Occupancy::new(Duration::from_secs(1), 1);
        let now = Instant::now();
        assert!(!o.vacated("a", now));
        assert!(o.vacated("b", now));
        assert!(Occupancy::new(Duration::ZERO, 1).vacated("c", now));
    }
}
