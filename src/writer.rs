//! What both transports' writers share: the accounting of one write batch (deliveries,
//! bytes, the oldest publication's age), reported to the metrics once per batch rather
//! than once per message. (A publication frames itself, once per transport:
//! `Publication::wire` with `crate::framing`.)

use std::time::Instant;

use bytes::Bytes;

use crate::client::Item;
use crate::metrics::{Metrics, Transport};

/// One write batch: the queue items taken for it and the bytes that went out. A writer
/// feeds it every item it takes (`add`), tells it what the socket took (`wrote`), and
/// calls `report` when the batch is done.
#[derive(Default)]
pub struct Batch {
    messages: u64,
    bytes: u64,
    oldest: Option<Instant>,
}

impl Batch {
    /// Counts an item into the batch and hands back its bytes. Only live publications
    /// carry a publish time: replies, replays and retained state are not deliveries whose
    /// latency means anything.
    pub fn add(&mut self, item: Item) -> Bytes {
        if let Some(at) = item.published_at {
            self.messages += 1;
            self.oldest = Some(self.oldest.map_or(at, |o| o.min(at)));
        }
        item.bytes
    }

    /// Bytes handed to the socket (or to hyper) for this batch.
    pub fn wrote(&mut self, bytes: usize) {
        self.bytes += bytes as u64;
    }

    /// Reports the batch, if it wrote anything, and starts a new one.
    pub fn report(&mut self, metrics: &Metrics, transport: Transport) {
        let b = std::mem::take(self);
        if b.bytes > 0 {
            metrics.record_write(transport, b.messages, b.bytes, b.oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publication::Publication;

    #[test]
    fn a_batch_counts_live_publications_and_reports_once() {
        let metrics = Metrics::new();
        let p = Publication::new("t".into(), 1, b"{}");
        let mut batch = Batch::default();
        let live = batch.add(Item::publication(&p, p.wire(Transport::Ws), false, true));
        let replayed = batch.add(Item::publication(&p, p.wire(Transport::Ws), false, false));
        let reply = batch.add(Item::control(Bytes::from_static(b"x")));
        batch.wrote(live.len() + replayed.len() + reply.len());
        batch.report(&metrics, Transport::Ws);
        let text = metrics.encode();
        let line = text
            .lines()
            .find(|l| l.starts_with("crier_deliveries_total") && l.contains("ws"))
            .expect("deliveries metric");
        assert!(line.ends_with(" 1"), "{line}");
        // Reported and reset: a second report of an empty batch records nothing.
        batch.report(&metrics, Transport::Ws);
        assert_eq!(metrics.encode(), text);
    }
}
