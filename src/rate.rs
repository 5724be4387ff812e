//! One token bucket for every rate crier enforces: new connections per client address
//! (`conn_limits`) and commands per WebSocket (`ws::connection`). The limit (`Rate`) is
//! passed in on each use rather than stored, so a bucket is just its level and its clock
//! (24 bytes) and a table of thousands of them repeats no configuration. Hand-written
//! rather than `governor`: the per-address bucket has to share an entry and a lock with
//! the connection count (one bounded table decides both), and the per-connection one lives
//! in a single task with no need for atomics.

use std::time::Instant;

/// Tokens added per second, and the most a bucket holds (what one burst may take).
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub per_second: f64,
    pub burst: f64,
}

pub struct TokenBucket {
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A bucket that starts full: a newcomer may use its whole burst at once.
    pub fn full(rate: Rate, now: Instant) -> Self {
        TokenBucket {
            tokens: rate.burst,
            last: now,
        }
    }

    /// Adds what `rate` earned since the last look, up to the burst.
    pub fn refill(&mut self, rate: Rate, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.last = now;
    }

    /// Whether the bucket is back to its burst (after a `refill`): it then says nothing
    /// about its past and can be forgotten.
    pub fn is_full(&self, rate: Rate) -> bool {
        self.tokens >= rate.burst
    }

    /// Takes one token; false when the bucket is empty (the client is over its rate).
    pub fn take(&mut self, rate: Rate, now: Instant) -> bool {
        self.refill(rate, now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refills_at_the_rate() {
        let rate = Rate {
            per_second: 10.0,
            burst: 20.0,
        };
        let t0 = Instant::now();
        let mut b = TokenBucket::full(rate, t0);
        assert!((0..20).all(|_| b.take(rate, t0)));
        assert!(!b.take(rate, t0));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| b.take(rate, t1)).count(), 5);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        b.refill(rate, t2);
        assert!(b.is_full(rate));
        assert_eq!((0..100).filter(|_| b.take(rate, t2)).count(), 20);
    }
}
