//! Score posts: the body parser (`api::boards::parse_scores`), the per-entry validation
//! (`service::validate`, `check_increments`) and the ranking they feed, as
//! `Boards::submit` runs them. Accepted scores must be finite and within ±MAX_ABS_SCORE,
//! players and meta within their limits, and the ranking must stay ordered.
//!
//! Input: one byte of board options (order, mode), then up to four bodies separated by
//! NUL bytes, posted one after another to the same board.
#![no_main]

use std::collections::HashMap;

use crier::api::boards::parse_scores;
use crier::leaderboard::ranking::{Ranking, ScoreMode, SortOrder};
use crier::leaderboard::service::{
    check_increments, ranked, validate, ValidScore, MAX_ABS_SCORE, MAX_BATCH, MAX_META_BYTES,
    MAX_PLAYER_LEN,
};
use libfuzzer_sys::fuzz_target;
use serde_json::value::RawValue;

fuzz_target!(|input: &[u8]| {
    let Some((&opts, bodies)) = input.split_first() else {
        return;
    };
    let order = if opts & 1 == 0 {
        SortOrder::High
    } else {
        SortOrder::Low
    };
    let mode = match (opts >> 1) % 3 {
        0 => ScoreMode::Best,
        1 => ScoreMode::Latest,
        _ => ScoreMode::Increment,
    };
    let mut ranking = Ranking::new(order);
    let mut seq = 0u64;
    for body in bodies.split(|&b| b == 0).take(4) {
        post(&mut ranking, mode, &mut seq, body);
    }
    check_ranking(&ranking, order);
});

fn post(ranking: &mut Ranking, mode: ScoreMode, seq: &mut u64, body: &[u8]) {
    let inputs = match parse_scores(body) {
        Ok(i) => i,
        Err(e) => {
            assert_eq!(e.status.as_u16(), 400);
            assert!(matches!(e.code.as_str(), "bad_json" | "invalid_score"), "{}", e.code);
            return;
        }
    };
    // `submit` refuses these before validating anything.
    if inputs.is_empty() || inputs.len() > MAX_BATCH {
        return;
    }
    let mut scores: Vec<ValidScore> = Vec::with_capacity(inputs.len());
    for (i, input) in inputs.into_iter().enumerate() {
        match validate(i, input) {
            Ok(s) => scores.push(s),
            Err(e) => {
                assert!(e.to_string().starts_with(&format!("entry {i}: ")), "{e}");
                return;
            }
        }
    }
    for (player, score, meta, sub) in &scores {
        assert!(sub.is_none_or(|u| u.is_finite() && u.abs() <= MAX_ABS_SCORE));
        assert!(!player.is_empty() && player.len() <= MAX_PLAYER_LEN);
        assert!(!player.chars().any(char::is_control));
        assert!(score.is_finite() && score.abs() <= MAX_ABS_SCORE, "{score}");
        if let Some(m) = meta {
            assert!(m.len() <= MAX_META_BYTES);
            let v: HashMap<String, &RawValue> =
                serde_json::from_str(m).expect("meta is a JSON object");
            drop(v);
        }
    }
    if mode == ScoreMode::Increment && check_increments(|p| ranking.get(p), &scores).is_err() {
        return; // all-or-nothing: nothing applied
    }
    let before = ranking.len();
    for (player, score, meta, sub) in &scores {
        let s = ranking.submit_sub(player, (*score, sub.unwrap_or(0.0)), mode, *seq, meta.clone());
        *seq += 1;
        assert!(s.new_rank >= 1 && s.new_rank <= ranking.len() as u64);
        assert_eq!(ranking.rank(player), Some(s.new_rank));
        let e = ranking.get(player).expect("just submitted");
        assert!(
            e.score.is_finite() && e.score.abs() <= MAX_ABS_SCORE,
            "{}",
            e.score
        );
    }
    assert!(ranking.len() >= before && ranking.len() <= before + scores.len());
    // What the response and the board topic serialize.
    let top = ranking.top(10);
    serde_json::to_vec(&ranked(&top, true)).expect("entries serialize");
}

fn check_ranking(ranking: &Ranking, order: SortOrder) {
    let all = ranking.page(0, usize::MAX);
    assert_eq!(all.len(), ranking.len());
    for (i, w) in all.windows(2).enumerate() {
        let ((ra, a), (rb, b)) = (&w[0], &w[1]);
        assert_eq!(*ra, i as u64 + 1);
        assert_eq!(*rb, *ra + 1);
        let in_order = match order {
            SortOrder::High => a.score > b.score,
            SortOrder::Low => a.score < b.score,
        } || (a.score == b.score && a.achieved <= b.achieved);
        assert!(in_order, "rank {ra} {a:?} before rank {rb} {b:?}");
    }
    for (rank, e) in &all {
        assert_eq!(ranking.rank(&e.player), Some(*rank));
    }
}
