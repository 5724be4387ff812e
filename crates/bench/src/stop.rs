//! The run's stop signal, cheap enough to look at on every delivery.
//!
//! A subscriber's read loop waits for its socket or the end of the run. Waiting on a
//! `CancellationToken` for that took the token's shared mutex twice per wake-up (to
//! register the waiter and to drop it): 10,000 subscribers on two threads took turns on
//! one lock for every delivery, and the tool's own CPU, which shares the cores with the
//! server under test, went up by it. Here a subscriber leaves its waker once, at its first
//! wait, and after that a wait is one atomic load. `cancel` wakes every waker left.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use parking_lot::Mutex;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

const SHARDS: usize = 32;

pub struct Stop {
    token: CancellationToken,
    fired: AtomicBool,
    wakers: Box<[Mutex<Vec<Waker>>]>,
    next: AtomicUsize,
}

impl Default for Stop {
    fn default() -> Self {
        Stop {
            token: CancellationToken::new(),
            fired: AtomicBool::new(false),
            wakers: (0..SHARDS).map(|_| Mutex::new(Vec::new())).collect(),
            next: AtomicUsize::new(0),
        }
    }
}

/// One waiter's registration (a subscriber keeps one for its whole connection).
#[derive(Default)]
pub struct Seat {
    taken: bool,
}

impl Stop {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the run: every waiter, seated or waiting on `cancelled`, is woken.
    pub fn cancel(&self) {
        self.fired.store(true, Ordering::SeqCst);
        self.token.cancel();
        for shard in self.wakers.iter() {
            for w in std::mem::take(&mut *shard.lock()) {
                w.wake();
            }
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.fired.load(Ordering::SeqCst)
    }

    /// For waits that are not per delivery (`select!` in the attack and control loops).
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    /// Ready once the run is stopping. The first call through a `Seat` leaves the task's
    /// waker; later calls only read a flag (the task's waker does not change).
    pub fn poll_stopped(&self, seat: &mut Seat, cx: &mut Context<'_>) -> Poll<()> {
        if self.fired.load(Ordering::SeqCst) {
            return Poll::Ready(());
        }
        if !seat.taken {
            seat.taken = true;
            let i = self.next.fetch_add(1, Ordering::Relaxed) % SHARDS;
            self.wakers[i].lock().push(cx.waker().clone());
            // `cancel` may have drained this shard before the push: look again.
            if self.fired.load(Ordering::SeqCst) {
                return Poll::Ready(());
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn cancel_wakes_seated_waiters_and_cancelled_futures() {
        let stop = Arc::new(Stop::new());
        let mut waiters = Vec::new();
        for _ in 0..100 {
            let stop = stop.clone();
            waiters.push(tokio::spawn(async move {
                let mut seat = Seat::default();
                // Woken for nothing a few times first: the seat is kept.
                for _ in 0..3 {
                    tokio::task::yield_now().await;
                }
                std::future::poll_fn(|cx| stop.poll_stopped(&mut seat, cx)).await;
            }));
        }
        let plain = {
            let stop = stop.clone();
            tokio::spawn(async move { stop.cancelled().await })
        };
        tokio::task::yield_now().await;
        assert!(!stop.is_cancelled());
        stop.cancel();
        for w in waiters {
            w.await.unwrap();
        }
        plain.await.unwrap();
        // A seat taken after the end is ready at once.
        let mut late = Seat::default();
        let waker = Waker::noop();
        let mut cx = Context::from_waker(waker);
        assert!(stop.poll_stopped(&mut late, &mut cx).is_ready());
    }
}
