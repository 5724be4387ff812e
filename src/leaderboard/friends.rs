//! Friends views (issue 19): the live ranking of a given set of players on one board,
//! watched as the topic `board:{board}:friends@{p1}@{p2}...` (at most
//! [`MAX_FRIENDS`](crate::topic::MAX_FRIENDS) players, checked at subscribe by
//! `auth::Auth::check_read`) and read once by `GET /api/boards/{b}/friends?players=...`.
//!
//! A view is recomputed only when the board changed since the last update and one of its
//! players may have moved (a rank in the moved range, or a player without an entry, who
//! may have got one); it goes out only when its content differs from the one last sent,
//! with the board's update, so it is coalesced and conflated like the top.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use serde::Serialize;

use super::ranking::{Entry, Ranking};
use super::service::{ranked, RankedEntry};

/// One friends view watched on this node: its players, and a hash of what was last
/// published (`None`: nothing yet).
pub(super) struct Watch {
    pub players: Vec<Arc<str>>,
    pub last: Option<u64>,
}

/// A friends view's topic and players.
pub(super) type Named = (String, Vec<Arc<str>>);

/// The players' entries with their ranks, best first, and the players without one.
pub fn entries<'p, S: AsRef<str>>(
    ranking: &Ranking,
    players: &'p [S],
) -> (Vec<(u64, Entry)>, Vec<&'p str>) {
    let mut found = Vec::with_capacity(players.len());
    let mut missing = Vec::new();
    for p in players {
        let p = p.as_ref();
        match (ranking.rank(p), ranking.get(p)) {
            (Some(rank), Some(e)) => found.push((rank, e.clone())),
            _ => missing.push(p),
        }
    }
    found.sort_by_key(|(rank, _)| *rank);
    (found, missing)
}

/// A friends view's `data` (live) and body (REST).
#[derive(Serialize)]
pub struct View<'a> {
    pub board: &'a str,
    pub version: u64,
    pub season: u64,
    /// Players on the board.
    pub players: usize,
    /// The players asked for, as asked.
    pub friends: Vec<&'a str>,
    /// Those with an entry this season, best first, with their board ranks.
    pub ranking: Vec<RankedEntry<'a>>,
    /// Those without one.
    pub missing: Vec<&'a str>,
}

impl<'a> View<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new<S: AsRef<str>>(
        board: &'a str,
        subscore: bool,
        version: u64,
        season: u64,
        players: usize,
        friends: &'a [S],
        found: &'a [(u64, Entry)],
        missing: Vec<&'a str>,
    ) -> Self {
        View {
            board,
            version,
            season,
            players,
            friends: friends.iter().map(|p| p.as_ref()).collect(),
            ranking: ranked(found, subscore),
            missing,
        }
    }
}

/// The view's content without its version: an unchanged view is not sent again.
pub(super) fn content_hash(found: &[(u64, Entry)], missing: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (r, e) in found {
        (
            r,
            &e.player,
            e.score.to_bits(),
            e.subscore.to_bits(),
            &e.meta,
        )
            .hash(&mut h);
    }
    missing.hash(&mut h);
    h.finish()
}

/// Whether `w` may have changed since it was last sent, given the ranks that moved:
/// never sent, a player without an entry, or one whose rank is in the moved range.
pub(super) fn may_have_changed(w: &Watch, ranking: &Ranking, (lo, hi): (u64, u64)) -> bool {
    w.last.is_none()
        || w.players
            .iter()
            .any(|p| ranking.rank(p).is_none_or(|r| (lo..=hi).contains(&r)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::leaderboard::ranking::{ScoreMode, SortOrder};

    #[test]
    fn a_view_is_its_players_by_rank_and_the_missing_ones() {
        let mut r = Ranking::new(SortOrder::High);
        for (i, p) in ["a", "b", "c", "d"].into_iter().enumerate() {
            r.submit(p, 10.0 * i as f64, ScoreMode::Best, i as u64, None);
        }
        let friends = ["a", "zz", "c"];
        let (found, missing) = entries(&r, &friends);
        assert_eq!(missing, ["zz"]);
        let ranks: Vec<(u64, &str)> = found.iter().map(|(k, e)| (*k, &*e.player)).collect();
        assert_eq!(ranks, [(2, "c"), (4, "a")]);
        let json = serde_json::to_value(View::new("b", false, 7, 1, 4, &friends, &found, missing))
            .unwrap();
        assert_eq!(json["ranking"][0]["player"], "c");
        assert_eq!(json["friends"], serde_json::json!(["a", "zz", "c"]));

        let w = Watch {
            players: friends.iter().map(|p| Arc::from(*p)).collect(),
            last: Some(1),
        };
        assert!(may_have_changed(&w, &r, (1, 1)), "zz may have got an entry");
        let w = Watch {
            players: vec!["a".into(), "c".into()],
            last: Some(1),
        };
        assert!(
            !may_have_changed(&w, &r, (3, 3)),
            "ranks 2 and 4 did not move"
        );
        assert!(may_have_changed(&w, &r, (1, 2)));
    }
}
