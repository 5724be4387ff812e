//! The SSE event id: the client's position in every topic of its stream, so that the one
//! `Last-Event-ID` a browser sends back on reconnect resumes all of them. (A per-topic
//! offset alone would collide between topics of one stream.)
//!
//! Format: one entry per topic of the stream, in the order of the query's `topic`
//! parameters, joined by `,`; each entry `EPOCH:OFFSET`, or empty for "no position".
//! Example: `9f1c2a7b:41,03ab77c0:7`. Applications treat it as opaque.

use std::fmt::Write;
use std::sync::Arc;

use bytes::{BufMut, BytesMut};

use crate::broker::{StreamPosition, Subscribed};

/// The longest epoch accepted. Epochs are 8 hex characters today; a little room keeps a
/// future broker's epochs (another node kind) resumable without a format change.
const MAX_EPOCH_LEN: usize = 32;
/// The longest entry: an epoch, `:`, a u64 in decimal, and its `,`.
const MAX_ENTRY_LEN: usize = MAX_EPOCH_LEN + 1 + 20 + 1;

/// The longest id accepted when a stream may hold `max_topics` topics. The bound does not
/// depend on the request's own topic count, so an id from a stream of more topics is still
/// read (its extra entries are ignored) rather than refused.
pub fn max_len(max_topics: usize) -> usize {
    max_topics.saturating_mul(MAX_ENTRY_LEN)
}

/// Reads an id for a stream of `topics` topics: one position (or none) per topic. Entries
/// past `topics` are not read; missing ones mean "no position". Errors say what is wrong,
/// for the 400 `bad_last_event_id` answer.
pub fn parse(
    id: &str,
    topics: usize,
    max_topics: usize,
) -> Result<Vec<Option<StreamPosition>>, String> {
    if id.len() > max_len(max_topics) {
        return Err(format!(
            "the event id is longer than {} bytes",
            max_len(max_topics)
        ));
    }
    let mut out = Vec::with_capacity(topics);
    if !id.is_empty() {
        for entry in id.split(',').take(topics) {
            out.push(parse_entry(entry)?);
        }
    }
    out.resize(topics, None);
    Ok(out)
}

fn parse_entry(entry: &str) -> Result<Option<StreamPosition>, String> {
    if entry.is_empty() {
        return Ok(None);
    }
    let bad = || {
        format!(
            "bad event id entry {:?}: each entry is EPOCH:OFFSET (or empty), \
             entries joined by ',' in the order of the topics",
            entry.chars().take(64).collect::<String>()
        )
    };
    let (epoch, offset) = entry.split_once(':').ok_or_else(bad)?;
    if epoch.is_empty()
        || epoch.len() > MAX_EPOCH_LEN
        || !epoch.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(bad());
    }
    // `u64::from_str` would also take a leading `+`.
    if offset.is_empty() || !offset.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let offset = offset.parse::<u64>().map_err(|_| bad())?;
    Ok(Some(StreamPosition {
        offset,
        epoch: epoch.into(),
    }))
}

/// What a stream's writer knows of the client's position, topic by topic, as the events
/// go out. Every event carries the whole vector as it stands after that event.
pub struct IdVector {
    topics: Vec<Slot>,
    /// `subscribed` events written so far: they go out in the order of `topics`.
    acks_written: usize,
}

struct Slot {
    name: Arc<str>,
    /// The entry as the client would resume from it now.
    at: Option<StreamPosition>,
    /// The entry once this topic's `subscribed` event is out: the resume position when it
    /// was recovered (the replay that follows moves it on), else the topic's position when
    /// the client joined. Until then the client's own `since` stands, so a stream cut
    /// before this topic's `subscribed` event still resumes (or learns it could not) next
    /// time.
    joined: Option<StreamPosition>,
}

impl IdVector {
    /// `since`: the position the client asked to resume from, per topic.
    pub fn new(topics: &[String], since: Vec<Option<StreamPosition>>) -> IdVector {
        IdVector {
            topics: topics
                .iter()
                .zip(since)
                .map(|(name, at)| Slot {
                    name: name.as_str().into(),
                    at,
                    joined: None,
                })
                .collect(),
            acks_written: 0,
        }
    }

    /// Records the broker's answer for topic `index` (subscriptions are made in order).
    pub fn joined(&mut self, index: usize, sub: &Subscribed) {
        let slot = &mut self.topics[index];
        slot.joined = Some(match (sub.recovered, &slot.at) {
            (Some(true), Some(since)) => StreamPosition {
                offset: since.offset,
                epoch: sub.position.epoch.clone(),
            },
            _ => sub.position.clone(),
        });
    }

    /// The next topic's `subscribed` event is being written.
    pub fn subscribed_event(&mut self) {
        if let Some(slot) = self.topics.get_mut(self.acks_written) {
            slot.at = slot.joined.clone();
            self.acks_written += 1;
        }
    }

    /// A publication of `topic` at `offset` is being written.
    pub fn publication(&mut self, topic: &str, offset: u64) {
        let Some(slot) = self.topics.iter_mut().find(|s| &*s.name == topic) else {
            return;
        };
        // The epoch is the one the subscription was made in: a topic that has
        // subscribers is never evicted, so it cannot change under the stream.
        let Some(epoch) = slot.joined.as_ref().map(|j| j.epoch.clone()) else {
            return;
        };
        slot.at = Some(StreamPosition { offset, epoch });
    }

    /// The longest `id:` line this vector can write until its topics change: each entry
    /// only ever takes the client's `since` or the broker's epoch, and an offset has at
    /// most 20 digits. Every event of a batch carries a line, so the batch is sized by it.
    pub fn max_line_len(&self) -> usize {
        let epoch = |p: &Option<StreamPosition>| p.as_ref().map_or(0, |p| p.epoch.len());
        self.topics
            .iter()
            .map(|s| epoch(&s.at).max(epoch(&s.joined)) + 1 + 20 + 1)
            .sum::<usize>()
            + "id: \n".len()
    }

    /// Appends `id: ...\n` for the vector as it stands.
    pub fn write_line(&self, out: &mut BytesMut) {
        out.put_slice(b"id: ");
        for (i, slot) in self.topics.iter().enumerate() {
            if i > 0 {
                out.put_u8(b',');
            }
            if let Some(p) = &slot.at {
                write!(out, "{}:{}", p.epoch, p.offset).expect("writing to BytesMut");
            }
        }
        out.put_u8(b'\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(epoch: &str, offset: u64) -> Option<StreamPosition> {
        Some(StreamPosition {
            offset,
            epoch: epoch.into(),
        })
    }

    #[test]
    fn parses_entries_in_topic_order() {
        assert_eq!(
            parse("9f1c2a7b:41,03ab77c0:7", 2, 64).unwrap(),
            vec![pos("9f1c2a7b", 41), pos("03ab77c0", 7)]
        );
        // Empty entries, missing entries and extra entries.
        assert_eq!(
            parse(",03ab77c0:0", 3, 64).unwrap(),
            vec![None, pos("03ab77c0", 0), None]
        );
        assert_eq!(parse("", 2, 64).unwrap(), vec![None, None]);
        assert_eq!(parse("a:1,b:2,c:3", 1, 64).unwrap(), vec![pos("a", 1)]);
        // Extra entries are not read at all.
        assert_eq!(parse("a:1,not an entry", 1, 64).unwrap(), vec![pos("a", 1)]);
        assert_eq!(
            parse(&format!("a:{}", u64::MAX), 1, 64).unwrap(),
            vec![pos("a", u64::MAX)]
        );
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "41",
            "9f1c2a7b",
            "9f1c2a7b:",
            ":41",
            "9f1c2a7b:-1",
            "9f1c2a7b:+1",
            "9f1c2a7b:4 1",
            "9f1c2a7b:18446744073709551616",
            "9f1c:2a7b:41",
            "9f 1c:41",
            "é:1",
            "a:1,b",
        ] {
            assert!(parse(bad, 2, 64).is_err(), "{bad:?} is refused");
        }
        let long = format!("{}:1", "a".repeat(MAX_EPOCH_LEN + 1));
        assert!(parse(&long, 1, 64).is_err());
        // The whole id is bounded before anything is split.
        let many = "a:1,".repeat(1000);
        assert!(parse(&many, 1, 64).unwrap_err().contains("longer than"));
        assert!(parse(&many, 1, 1000).is_ok());
    }

    fn line(v: &IdVector) -> String {
        let mut out = BytesMut::new();
        v.write_line(&mut out);
        String::from_utf8(out.to_vec()).unwrap()
    }

    fn sub(epoch: &str, offset: u64, recovered: Option<bool>) -> Subscribed {
        Subscribed {
            position: StreamPosition {
                offset,
                epoch: epoch.into(),
            },
            recovered,
        }
    }

    #[test]
    fn the_vector_follows_the_events_written() {
        let topics = ["a".to_string(), "b".to_string(), "c".to_string()];
        let mut v = IdVector::new(&topics, vec![pos("e1", 3), pos("old", 9), None]);
        v.joined(0, &sub("e1", 5, Some(true)));
        v.joined(1, &sub("e2", 2, Some(false)));
        v.joined(2, &sub("e3", 0, None));
        // Before any subscribed event: what the client asked for, verbatim.
        assert_eq!(line(&v), "id: e1:3,old:9,\n");
        v.subscribed_event();
        assert_eq!(line(&v), "id: e1:3,old:9,\n");
        v.publication("a", 4);
        v.publication("a", 5);
        assert_eq!(line(&v), "id: e1:5,old:9,\n");
        // Not recovered: from now on the client stands at the topic's current position.
        v.subscribed_event();
        assert_eq!(line(&v), "id: e1:5,e2:2,\n");
        v.subscribed_event();
        assert_eq!(line(&v), "id: e1:5,e2:2,e3:0\n");
        v.publication("c", 1);
        v.publication("b", 3);
        v.publication("unknown", 3);
        assert_eq!(line(&v), "id: e1:5,e2:3,e3:1\n");
        assert!(line(&v).len() <= v.max_line_len());
        v.publication("a", u64::MAX);
        assert!(line(&v).len() <= v.max_line_len());
        v.publication("a", 5);
        // The line parses back into the same positions.
        let text = line(&v);
        let id = text.trim_end().strip_prefix("id: ").unwrap();
        assert_eq!(
            parse(id, 3, 64).unwrap(),
            vec![pos("e1", 5), pos("e2", 3), pos("e3", 1)]
        );
    }
}
