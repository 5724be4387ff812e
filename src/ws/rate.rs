//! Per-connection command rate: a token bucket owned by the connection's own task, so it
//! needs no atomics or locks and costs 24 bytes per socket. A shared limiter crate
//! (governor) would add a dependency and a clock abstraction for what is one subtraction.

use std::time::Instant;

pub struct TokenBucket {
    /// Tokens added per second; a burst may take up to twice as many at once.
    rate: f32,
    tokens: f32,
    last: Instant,
}

impl TokenBucket {
    pub fn new(per_second: u32, now: Instant) -> Self {
        let rate = per_second as f32;
        TokenBucket {
            rate,
            tokens: 2.0 * rate,
            last: now,
        }
    }

    /// Takes one token; false when the bucket is empty (the client is over its rate).
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        if elapsed > 0.0 {
            self.tokens = (self.tokens + elapsed * self.rate).min(2.0 * self.rate);
            self.last = now;
        }
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
    fn burst_of_twice_the_rate_then_refills_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, t0);
        assert!((0..20).all(|_| b.take(t0)));
        assert!(!b.take(t0));
        let t1 = t0 + Duration::from_millis(500);
        assert_eq!((0..10).filter(|_| b.take(t1)).count(), 5);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..100).filter(|_| b.take(t2)).count(), 20);
    }
}
