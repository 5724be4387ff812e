//! The group-commit writer both durable stores use (leaderboards, `leaderboard/store.rs`;
//! topic history, `broker/durable.rs`): one thread owns the file, callers queue requests
//! in a bounded queue, and everything waiting (up to a limit) goes into ONE transaction
//! with one fsync. While a batch is on its way to the disk the next one forms, so the batch
//! size follows the load and the fsync latency.
//!
//! Ack order = disk order: the writer answers every request of a batch, in queue order,
//! after that batch's commit and before it takes the next one. A caller that keeps state
//! derived from its queued requests (a board's pending view, a topic's next offset) can
//! apply each outcome in exactly the order the requests reached the disk.
//!
//! [`GroupCommit::reserve`] waits for room outside the caller's locks; [`Slot::send`]
//! never blocks, so a caller can queue under its own lock, which makes the queue order the
//! order in which the caller computed its requests.

use std::panic::AssertUnwindSafe;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

/// What a request's outcome is handed to, on the writer thread, in queue order. It must be
/// quick and must not block: the next batch waits for it.
pub type Done<E> = Box<dyn FnOnce(Result<(), E>) + Send>;

/// What the writer does with the requests it batches: the store's side.
pub trait Committer: Send + 'static {
    type Request: Send + 'static;
    type Error: Clone + Send + 'static;

    /// What a request counts toward [`Limits::max_weight`] (ops, bytes).
    fn weight(request: &Self::Request) -> usize;

    /// Commits `batch` (in queue order) in one durable transaction as far as the store
    /// allows, and returns one outcome per request, in the same order. Called with an
    /// empty batch after a [`GroupCommit::wake`] with nothing queued.
    fn commit(&mut self, batch: Vec<Self::Request>) -> Vec<Result<(), Self::Error>>;

    /// The outcome of every request of a batch whose commit panicked.
    fn panicked(message: String) -> Self::Error;

    /// The first request of a batch arrived, before the rest are taken (tests hold the
    /// writer here so requests pile up).
    fn forming(&mut self) {}

    /// After a batch was answered: work that callers need not wait for (checkpoints).
    fn answered(&mut self) {}

    /// Every sender is gone and the queue is drained: the last chance to write.
    fn finish(&mut self) {}
}

/// How much the queue and a batch hold.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Requests that may wait in the queue; `reserve` waits beyond it.
    pub capacity: usize,
    /// Most requests one batch takes.
    pub max_requests: usize,
    /// Most weight one batch takes (a single heavier request still goes, alone).
    pub max_weight: usize,
}

enum Msg<R, E> {
    Request(R, Done<E>),
    /// Wakes the writer with nothing queued, for work the committer noted on the side.
    Wake,
}

/// A reserved place in the queue (see [`GroupCommit::reserve`]).
pub struct Slot<R, E>(mpsc::OwnedPermit<Msg<R, E>>);

impl<R, E> Slot<R, E> {
    /// Queues `request`; `done` later gets its outcome. Never blocks.
    pub fn send(self, request: R, done: impl FnOnce(Result<(), E>) + Send + 'static) {
        self.0.send(Msg::Request(request, Box::new(done)));
    }
}

/// The handle of one writer thread. The thread stops once [`GroupCommit::close`] was called
/// (or the handle dropped) and every reserved slot is sent, after committing all of it.
pub struct GroupCommit<R, E> {
    tx: Mutex<Option<mpsc::Sender<Msg<R, E>>>>,
    stopped: watch::Receiver<bool>,
}

impl<R: Send + 'static, E: Clone + Send + 'static> GroupCommit<R, E> {
    /// Starts the writer thread, named `name`, owning `committer`.
    pub fn spawn<C>(name: &str, limits: Limits, committer: C) -> std::io::Result<Self>
    where
        C: Committer<Request = R, Error = E>,
    {
        let (tx, rx) = mpsc::channel(limits.capacity.max(1));
        let (stopped_tx, stopped) = watch::channel(false);
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                run(committer, rx, limits);
                let _ = stopped_tx.send(true);
            })?;
        Ok(GroupCommit {
            tx: Mutex::new(Some(tx)),
            stopped,
        })
    }

    /// Waits for room in the queue (call it before taking any lock); `None` once closed.
    pub async fn reserve(&self) -> Option<Slot<R, E>> {
        let tx = self.tx.lock().clone()?;
        tx.reserve_owned().await.ok().map(Slot)
    }

    /// Queues `request` and waits for its outcome; `None` when the writer is closed or
    /// stopped before answering. Dropped after queueing, the request is still committed.
    pub async fn commit(&self, request: R) -> Option<Result<(), E>> {
        let (ack, done) = oneshot::channel();
        self.reserve().await?.send(request, move |r| {
            let _ = ack.send(r); // the caller may have gone away
        });
        done.await.ok()
    }

    /// Makes the writer run a batch soon even if nothing is queued; a full queue means one
    /// is coming anyway.
    pub fn wake(&self) {
        if let Some(tx) = self.tx.lock().as_ref() {
            let _ = tx.try_send(Msg::Wake);
        }
    }

    /// Takes no more requests; what is queued (and slots reserved) is still committed.
    pub fn close(&self) {
        if let Some(tx) = self.tx.lock().take() {
            let _ = tx.try_send(Msg::Wake);
        }
    }

    /// Resolves once the writer thread has committed everything and stopped.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopped = self.stopped.clone();
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        }
    }
}

fn run<C: Committer>(
    mut committer: C,
    mut rx: mpsc::Receiver<Msg<C::Request, C::Error>>,
    limits: Limits,
) {
    while let Some(first) = rx.blocking_recv() {
        committer.forming();
        let mut batch = Vec::new();
        let mut dones = Vec::new();
        let mut weight = 0;
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            if let Msg::Request(request, done) = msg {
                weight += C::weight(&request);
                batch.push(request);
                dones.push(done);
            }
            if batch.len() < limits.max_requests && weight < limits.max_weight {
                next = rx.try_recv().ok();
            }
        }
        let n = dones.len();
        let results = match std::panic::catch_unwind(AssertUnwindSafe(|| committer.commit(batch))) {
            Ok(results) if results.len() == n => results,
            Ok(results) => {
                let e = format!("{} outcomes for {n} requests", results.len());
                tracing::error!("group commit: {e}");
                vec![Err(C::panicked(e)); n]
            }
            Err(_) => {
                tracing::error!("group commit panicked");
                vec![Err(C::panicked("the commit panicked".into())); n]
            }
        };
        for (done, result) in dones.into_iter().zip(results) {
            // A panicking callback must not take the writer (and every later request)
            // down with it.
            if std::panic::catch_unwind(AssertUnwindSafe(move || done(result))).is_err() {
                tracing::error!("group commit callback panicked");
            }
        }
        committer.answered();
    }
    committer.finish();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Commits into a shared "disk" and fails requests equal to 0.
    struct Disk(Arc<Mutex<Vec<Vec<u32>>>>);

    impl Committer for Disk {
        type Request = u32;
        type Error = String;
        fn weight(_: &u32) -> usize {
            1
        }
        fn commit(&mut self, batch: Vec<u32>) -> Vec<Result<(), String>> {
            let results = batch
                .iter()
                .map(|&r| if r == 0 { Err("zero".into()) } else { Ok(()) })
                .collect();
            self.0.lock().push(batch);
            results
        }
        fn panicked(m: String) -> String {
            m
        }
    }

    #[tokio::test]
    async fn answers_follow_the_disk_and_close_commits_what_is_queued() {
        let disk = Arc::new(Mutex::new(Vec::new()));
        let limits = Limits {
            capacity: 64,
            max_requests: 4,
            max_weight: usize::MAX,
        };
        let gc = GroupCommit::spawn("test-writer", limits, Disk(disk.clone())).unwrap();
        let answered = Arc::new(Mutex::new(Vec::new()));
        for i in 1..=20u32 {
            let slot = gc.reserve().await.unwrap();
            let answered = answered.clone();
            slot.send(i, move |r| {
                assert!(r.is_ok());
                answered.lock().push(i);
            });
        }
        assert_eq!(gc.commit(0).await, Some(Err("zero".into())));
        gc.close();
        assert!(gc.reserve().await.is_none());
        gc.stopped().await;
        let on_disk: Vec<u32> = disk.lock().iter().flatten().copied().collect();
        assert_eq!(on_disk, (1..=20).chain([0]).collect::<Vec<_>>());
        assert!(disk.lock().iter().all(|b| b.len() <= 4));
        assert_eq!(*answered.lock(), (1..=20).collect::<Vec<_>>());
    }
}
