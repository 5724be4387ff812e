//! Query strings: the `topic` list of `/ws` and `/sse` (`topic::topics_from_query`) and the
//! leaderboard's `?limit=&offset=` and `?around=` (deserialized as axum's `Query` does, with
//! serde_urlencoded) applied to a small ranking.
//!
//! Input: one byte for the per-connection topic limit, one for the board size, then the
//! query string.
#![no_main]

use crier::api::boards::{AroundQuery, PageQuery};
use crier::leaderboard::ranking::{Entry, Ranking, SortOrder};
use crier::topic::{is_valid, topics_from_query};
use libfuzzer_sys::fuzz_target;

/// The clamps in `api::boards` (private there).
const MAX_PAGE: usize = 1000;
const MAX_AROUND: usize = 100;

fuzz_target!(|input: &[u8]| {
    let [max_topics, players, rest @ ..] = input else {
        return;
    };
    // RawQuery hands over the query as a str; non-UTF-8 never reaches the parser.
    let Ok(query) = std::str::from_utf8(rest) else {
        return;
    };
    let max_topics = *max_topics as usize;

    match topics_from_query(Some(query), max_topics) {
        Ok(topics) => {
            assert!(topics.len() <= max_topics);
            for (i, t) in topics.iter().enumerate() {
                assert!(is_valid(t), "{t:?}");
                assert!(!topics[..i].contains(t), "duplicate {t:?}");
            }
        }
        Err(e) => {
            let e = crier::api::error::ApiError::from(e);
            assert_eq!(e.status.as_u16(), 400);
            assert!(
                matches!(e.code.as_str(), "bad_query" | "bad_topic" | "too_many_topics"),
                "{}",
                e.code
            );
        }
    }

    let n = *players as usize % 64;
    let mut ranking = Ranking::new(SortOrder::High);
    for i in 0..n {
        ranking.insert(Entry {
            player: format!("p{i}").into(),
            score: (i % 7) as f64,
            subscore: 0.0,
            achieved: i as u64,
            meta: None,
        });
    }

    if let Ok(q) = serde_urlencoded::from_str::<PageQuery>(query) {
        let limit = q.limit.unwrap_or(50).min(MAX_PAGE);
        let offset = q.offset.unwrap_or(0);
        let page = ranking.page(offset, limit);
        assert!(page.len() <= limit);
        assert_eq!(page.len(), limit.min(n.saturating_sub(offset)));
        for (i, (rank, _)) in page.iter().enumerate() {
            assert_eq!(*rank, offset as u64 + i as u64 + 1);
        }
    }

    if let Ok(q) = serde_urlencoded::from_str::<AroundQuery>(query) {
        let around = q.around.unwrap_or(0).min(MAX_AROUND);
        match ranking.around("p3", around) {
            Some(list) => {
                assert!(n > 3);
                assert!(list.len() <= 2 * around + 1);
                assert!(list.iter().any(|(_, e)| &*e.player == "p3"));
            }
            None => assert!(n <= 3),
        }
    }
});
