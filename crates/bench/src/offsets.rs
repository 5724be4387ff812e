//! Per-subscriber offset accounting. Offsets of one topic on one node are 1, 2, 3, ... with
//! no gaps, and a subscriber's first publication is `subscribed offset + 1`, so anything
//! else is loss, a duplicate or out of order. In-order delivery (the normal case) costs one
//! comparison; only gaps are remembered, as ranges, so a healthy run holds no per-offset
//! memory at all whatever the number of messages.

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OffsetTracker {
    /// The `subscribed` offset: the first expected publication is `start + 1`.
    start: u64,
    /// Highest offset seen so far (`start` before any).
    last: u64,
    /// Offsets skipped over and not (yet) seen, as inclusive ranges, ascending.
    missing: Vec<(u64, u64)>,
    /// Distinct offsets seen after `start`.
    pub unique: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Every delivery, duplicates included.
    pub received: u64,
}

/// The outcome for one subscriber once the number of publications is known.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub expected: u64,
    pub received: u64,
    /// Distinct expected offsets received.
    pub delivered: u64,
    pub lost: u64,
    pub duplicates: u64,
    pub out_of_order: u64,
    /// Offsets beyond the expected range (someone else published to the topic).
    pub unexpected: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.expected += o.expected;
        self.received += o.received;
        self.delivered += o.delivered;
        self.lost += o.lost;
        self.duplicates += o.duplicates;
        self.out_of_order += o.out_of_order;
        self.unexpected += o.unexpected;
    }
}

impl OffsetTracker {
    pub fn new(start: u64) -> Self {
        OffsetTracker {
            start,
            last: start,
            ..Default::default()
        }
    }

    pub fn start(&self) -> u64 {
        self.start
    }

    /// Records one delivery. Returns true if it is a new offset (not a duplicate).
    #[inline]
    pub fn record(&mut self, offset: u64) -> bool {
        self.received += 1;
        if offset == self.last + 1 {
            self.last = offset;
            self.unique += 1;
            return true;
        }
        if offset > self.last {
            self.missing.push((self.last + 1, offset - 1));
            self.last = offset;
            self.unique += 1;
            return true;
        }
        // At or below the highest seen: either fills a gap (out of order) or a duplicate.
        // Offsets at or before `start` predate the subscription: never expected.
        if offset > self.start {
            if let Some(i) = self
                .missing
                .iter()
                .position(|&(lo, hi)| lo <= offset && offset <= hi)
            {
                let (lo, hi) = self.missing[i];
                match (offset == lo, offset == hi) {
                    (true, true) => {
                        self.missing.remove(i);
                    }
                    (true, false) => self.missing[i].0 = offset + 1,
                    (false, true) => self.missing[i].1 = offset - 1,
                    (false, false) => {
                        self.missing[i].1 = offset - 1;
                        self.missing.insert(i + 1, (offset + 1, hi));
                    }
                }
                self.unique += 1;
                self.out_of_order += 1;
                return true;
            }
            self.duplicates += 1;
            return false;
        }
        self.out_of_order += 1;
        false
    }

    /// Whether every offset in `start+1 ..= end` has been seen (a resumed client has
    /// caught up to `end`).
    pub fn has_all_through(&self, end: u64) -> bool {
        self.last >= end && self.missing.iter().all(|&(lo, _)| lo > end)
    }

    /// Offsets `start+1 ..= start+expected` were published; everything else is counted.
    pub fn tally(&self, expected: u64) -> Tally {
        let end = self.start + expected;
        let beyond_seen = self.last.saturating_sub(end);
        let missing_beyond: u64 = self
            .missing
            .iter()
            .filter(|&&(_, hi)| hi > end)
            .map(|&(lo, hi)| hi - lo.max(end + 1) + 1)
            .sum();
        let unexpected = beyond_seen - missing_beyond;
        let delivered = self.unique - unexpected;
        Tally {
            expected,
            received: self.received,
            delivered,
            lost: expected - delivered,
            duplicates: self.duplicates,
            out_of_order: self.out_of_order,
            unexpected,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(start: u64, offsets: &[u64], expected: u64) -> Tally {
        let mut t = OffsetTracker::new(start);
        for &o in offsets {
            t.record(o);
        }
        t.tally(expected)
    }

    #[test]
    fn caught_up_means_no_gap_up_to_the_end() {
        let mut t = OffsetTracker::new(10);
        assert!(t.has_all_through(10));
        assert!(!t.has_all_through(11));
        for o in [11, 13, 14] {
            t.record(o);
        }
        assert!(t.has_all_through(11));
        assert!(!t.has_all_through(14), "12 is missing");
        t.record(12);
        assert!(t.has_all_through(14));
        assert!(!t.has_all_through(15));
    }

    #[test]
    fn clean_run() {
        let t = run(10, &[11, 12, 13, 14], 4);
        assert_eq!(
            t,
            Tally {
                expected: 4,
                received: 4,
                delivered: 4,
                ..Default::default()
            }
        );
    }

    #[test]
    fn loss_at_end_middle_and_start() {
        assert_eq!(run(0, &[1, 2], 4).lost, 2);
        let t = run(0, &[1, 3, 4], 4);
        assert_eq!((t.lost, t.out_of_order, t.duplicates), (1, 0, 0));
        assert_eq!(run(0, &[3, 4], 4).lost, 2);
        assert_eq!(run(5, &[], 3).lost, 3);
    }

    #[test]
    fn duplicates_and_out_of_order() {
        let t = run(0, &[1, 2, 2, 3, 1], 3);
        assert_eq!((t.lost, t.duplicates, t.out_of_order), (0, 2, 0));
        assert_eq!(t.received, 5);
        let t = run(0, &[1, 3, 2, 4], 4);
        assert_eq!((t.lost, t.duplicates, t.out_of_order), (0, 0, 1));
        // Filling the middle of a gap splits it; a later duplicate of a filled one counts.
        let t = run(0, &[5, 3, 2, 3, 4, 1], 5);
        assert_eq!((t.lost, t.duplicates, t.out_of_order), (0, 1, 4));
        // An offset from before the subscription is out of order, never delivered.
        let t = run(10, &[10, 11], 1);
        assert_eq!((t.lost, t.delivered, t.out_of_order), (0, 1, 1));
    }

    #[test]
    fn offsets_beyond_the_expected_range() {
        let t = run(0, &[1, 2, 3, 5], 3);
        assert_eq!((t.lost, t.delivered, t.unexpected), (0, 3, 1));
        let t = run(0, &[1, 5], 3);
        assert_eq!((t.lost, t.delivered, t.unexpected), (2, 1, 1));
    }

    #[test]
    fn tallies_add_up() {
        let mut sum = Tally::default();
        sum += run(0, &[1, 2], 2);
        sum += run(0, &[1], 2);
        assert_eq!((sum.expected, sum.delivered, sum.lost), (4, 3, 1));
    }
}
