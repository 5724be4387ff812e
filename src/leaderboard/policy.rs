//! Board policies (`[[board]]` tables, docs/configuration.md): what a game may refuse
//! before a score reaches the ranking. A leaked or cheating client can post impossible
//! scores, flood one player's entry, or post at all; score bounds, a per-player rate and
//! `scoped_keys_only` answer each. Checked by the HTTP handler before `Boards::submit`, so a
//! node alone and a `--redis` node apply them alike. The rate is counted per node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::service::{ScoreInput, MAX_PLAYER_LEN};
use crate::auth::keys::Caller;
use crate::auth::TopicPattern;
pub use crate::config::BoardPolicyConfig;
use crate::config::Config;
use crate::error_code::{ErrorCode, Refusal};

/// Most (board, player) pairs the rate table tracks on one node. Past it (after expired
/// pairs are swept) new players are refused with 429 rather than the table growing: each
/// pair costs under 400 bytes (a 61-bucket window, names of at most 64 + 128 bytes, map
/// slots), so the table stays under 40 MB however many names a client invents.
pub const MAX_RATE_ENTRIES: usize = 100_000;
/// Highest `max_submissions_per_minute`: counts are kept in `u16` buckets.
pub const MAX_PER_MINUTE: u32 = 10_000;
/// One-second buckets a window counts: the current second and the 60 before it. Any 60 s
/// span touches at most 61 whole seconds, so counting 61 guarantees "at most N in any
/// 60 s" (refusing at most one second longer than an exact log of times would).
const BUCKETS: usize = 61;
/// How often expired pairs are swept when the table is not full.
const SWEEP_EVERY_SECS: u64 = 60;

/// A checked `[[board]]` table.
#[derive(Clone, Debug)]
pub struct BoardPolicy {
    pub pattern: TopicPattern,
    pub min_score: Option<f64>,
    pub max_score: Option<f64>,
    pub max_per_minute: Option<u32>,
    pub scoped_keys_only: bool,
    pub max_players: Option<usize>,
}

impl TryFrom<BoardPolicyConfig> for BoardPolicy {
    type Error = String;

    fn try_from(c: BoardPolicyConfig) -> Result<BoardPolicy, String> {
        let p = &c.pattern;
        let body = p.strip_suffix('*').unwrap_or(p);
        if !(p == "*" || crier_protocol::names::is_valid_board(body)) {
            return Err(format!(
                "[[board]] pattern {p:?} must be a board name (A-Z a-z 0-9 _ - .), \
                 optionally ending in *, or *"
            ));
        }
        let pattern = TopicPattern::parse(p).map_err(|e| format!("[[board]] {e}"))?;
        for (field, v) in [("min_score", c.min_score), ("max_score", c.max_score)] {
            if v.is_some_and(|v| !v.is_finite()) {
                return Err(format!("[[board]] {p:?}: {field} must be a finite number"));
            }
        }
        if let (Some(min), Some(max)) = (c.min_score, c.max_score) {
            if min > max {
                return Err(format!(
                    "[[board]] {p:?}: min_score {min} is above max_score {max}"
                ));
            }
        }
        if let Some(n) = c.max_submissions_per_minute {
            if !(1..=MAX_PER_MINUTE).contains(&n) {
                return Err(format!(
                    "[[board]] {p:?}: max_submissions_per_minute must be 1-{MAX_PER_MINUTE}"
                ));
            }
        }
        super::season::check_season_options(
            c.reset.as_deref(),
            c.timezone.as_deref(),
            c.keep_seasons,
        )
        .map_err(|e| format!("[[board]] {p:?}: {e}"))?;
        if let Some(t) = c.tiebreak.as_deref() {
            if t != "high" && t != "low" {
                return Err(format!(
                    "[[board]] {p:?}: tiebreak must be \"high\" or \"low\", not {t:?}"
                ));
            }
        }
        if c.max_players_per_board == Some(0) {
            return Err(format!(
                "[[board]] {p:?}: max_players_per_board must be at least 1"
            ));
        }
        Ok(BoardPolicy {
            pattern,
            min_score: c.min_score,
            max_score: c.max_score,
            max_per_minute: c.max_submissions_per_minute,
            scoped_keys_only: c.scoped_keys_only,
            max_players: c.max_players_per_board,
        })
    }
}

impl BoardPolicy {
    fn refuse(&self, code: ErrorCode, what: String) -> Refusal {
        Refusal::new(code, format!("board policy \"{}\": {what}", self.pattern))
    }

    /// `scoped_keys_only`: `authorize` has already checked that a scoped key's `boards`
    /// scope covers the board, so any scoped caller here qualifies.
    pub fn check_caller(&self, board: &str, caller: &Caller<'_>) -> Result<(), Refusal> {
        if !self.scoped_keys_only || matches!(caller, Caller::Scoped(_)) {
            return Ok(());
        }
        Err(self.refuse(
            ErrorCode::ScopedKeyRequired,
            format!(
                "only a [[key]] whose boards scope covers {board:?} may post scores here \
                 (this request used {})",
                caller.describe()
            ),
        ))
    }

    fn check_one(&self, what: &str, player: &str, v: f64) -> Result<(), Refusal> {
        let fail = |side: &str, limit: f64| {
            self.refuse(
                ErrorCode::ScoreOutOfBounds,
                format!(
                    "{what} {v} of player {player:?} is {side} {limit}; nothing of the batch \
                     was applied"
                ),
            )
        };
        if let Some(max) = self.max_score.filter(|max| v > *max) {
            return Err(fail("above max_score", max));
        }
        if let Some(min) = self.min_score.filter(|min| v < *min) {
            return Err(fail("below min_score", min));
        }
        Ok(())
    }

    /// Every entry's score within `[min_score, max_score]`, else the whole batch is
    /// refused. On an `increment` board `current` gives a player's stored total: the bound
    /// then holds for each submitted delta and for the total it would make. The total is
    /// read when the batch is checked, so two batches racing may both pass it; the delta
    /// bound always holds. Entries that are not valid scores are left to `submit`, which
    /// refuses them.
    pub fn check_bounds(
        &self,
        inputs: &[ScoreInput],
        current: Option<&dyn Fn(&str) -> f64>,
    ) -> Result<(), Refusal> {
        if self.min_score.is_none() && self.max_score.is_none() {
            return Ok(());
        }
        let mut totals: HashMap<&str, f64> = HashMap::new();
        for input in inputs {
            let (Some(player), Some(score)) = (&input.player, &input.score) else {
                continue;
            };
            let Some(v) = score.as_f64().filter(|v| v.is_finite()) else {
                continue;
            };
            self.check_one("score", player, v)?;
            if let Some(current) = current {
                let total = totals
                    .entry(player.as_str())
                    .or_insert_with(|| current(player));
                *total += v;
                self.check_one("total", player, *total)?;
            }
        }
        Ok(())
    }
}

/// Submissions counted for a batch that was let through; handed back with `release` when
/// the batch turned out not to be applied, so only accepted submissions count.
#[derive(Debug)]
pub struct Reservation {
    board: Box<str>,
    sec: u64,
    players: Vec<(Box<str>, u16)>,
}

/// The node's policies and the rate table they share.
pub struct BoardPolicies {
    policies: Vec<BoardPolicy>,
    base: Instant,
    /// Seconds added to the clock: the one-minute window is tested by moving this instead
    /// of waiting a real minute (`skip_ahead`). Always 0 in a running server.
    skipped: AtomicU64,
    rate: Mutex<RateTable>,
}

/// The `[[board]]` tables as `Config::resolve` cannot judge them; `server::check_config`
/// runs it before anything starts.
pub fn check_config(cfg: &Config) -> anyhow::Result<()> {
    BoardPolicies::from_config(cfg).map(drop)
}

impl BoardPolicies {
    /// The settings' `[[board]]` tables, each checked; the first error names its table.
    pub fn from_config(cfg: &Config) -> anyhow::Result<Self> {
        let policies = cfg
            .board_policies
            .iter()
            .cloned()
            .map(BoardPolicy::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        Ok(BoardPolicies::new(policies))
    }

    pub fn new(policies: Vec<BoardPolicy>) -> Self {
        BoardPolicies {
            policies,
            base: Instant::now(),
            skipped: AtomicU64::new(0),
            rate: Mutex::new(RateTable::new(MAX_RATE_ENTRIES)),
        }
    }

    /// The rate table's clock, in whole seconds since the policies were made.
    fn now(&self) -> u64 {
        self.base.elapsed().as_secs() + self.skipped.load(Ordering::Relaxed)
    }

    /// Moves the submission window's clock forward, so that tests of the one-minute window
    /// through the HTTP API do not wait a minute. Not for production use.
    #[doc(hidden)]
    pub fn skip_ahead(&self, by: Duration) {
        self.skipped.fetch_add(by.as_secs(), Ordering::Relaxed);
    }

    /// The first policy whose pattern matches `board`.
    pub fn for_board(&self, board: &str) -> Option<&BoardPolicy> {
        self.policies.iter().find(|p| p.pattern.matches(board))
    }

    /// The most players `board` may hold: the first matching table's
    /// `max_players_per_board`, else the node's (`default`).
    pub fn max_players(&self, board: &str, default: usize) -> usize {
        self.for_board(board)
            .and_then(|p| p.max_players)
            .unwrap_or(default)
    }

    /// Counts the batch's submissions against `max_submissions_per_minute`, all or
    /// nothing: if any player would go over, nothing is counted and the batch is refused
    /// with the seconds until it would fit.
    pub fn reserve(
        &self,
        policy: &BoardPolicy,
        board: &str,
        inputs: &[ScoreInput],
    ) -> Result<Option<Reservation>, Refusal> {
        let Some(limit) = policy.max_per_minute else {
            return Ok(None);
        };
        // Only names `submit` would take: anything else refuses the batch there, and
        // never reaches the table.
        let mut batch: Vec<(&str, u16)> = Vec::new();
        for input in inputs {
            let Some(p) = input.player.as_deref() else {
                continue;
            };
            if p.is_empty() || p.len() > MAX_PLAYER_LEN || p.chars().any(char::is_control) {
                continue;
            }
            match batch.iter_mut().find(|(q, _)| *q == p) {
                Some((_, n)) => *n = n.saturating_add(1),
                None => batch.push((p, 1)),
            }
        }
        let now = self.now();
        let result = self.rate.lock().reserve(now, board, limit, &batch);
        match result {
            Ok(()) => Ok(Some(Reservation {
                board: board.into(),
                sec: now,
                players: batch.into_iter().map(|(p, n)| (p.into(), n)).collect(),
            })),
            Err(over) => Err(policy
                .refuse(ErrorCode::TooManySubmissions, over.message(limit))
                .retry_after(over.retry_after())),
        }
    }

    /// Uncounts a batch that was not applied.
    pub fn release(&self, r: Reservation) {
        self.rate.lock().release(&r);
    }

    /// (board, player) pairs tracked now, for tests and metrics.
    pub fn tracked(&self) -> usize {
        self.rate.lock().len
    }
}

/// One player's submissions on one board: counts per second, a ring over `BUCKETS`.
struct Window {
    /// The newest second counted; the ring holds `last - 60 ..= last`.
    last: u64,
    counts: [u16; BUCKETS],
}

impl Window {
    fn new(now: u64) -> Self {
        Window {
            last: now,
            counts: [0; BUCKETS],
        }
    }

    fn advance(&mut self, now: u64) {
        if now <= self.last {
            return;
        }
        let gap = (now - self.last).min(BUCKETS as u64);
        for s in 1..=gap {
            self.counts[((self.last + s) % BUCKETS as u64) as usize] = 0;
        }
        self.last = now;
    }

    fn total(&self) -> u32 {
        self.counts.iter().map(|&c| u32::from(c)).sum()
    }

    /// Seconds until `need` more fit under `limit`, as the oldest seconds leave the window.
    fn wait(&self, need: u32, limit: u32) -> u64 {
        let mut total = self.total();
        for d in 1..=BUCKETS as u64 {
            total -= u32::from(self.counts[((self.last + d) % BUCKETS as u64) as usize]);
            if total + need <= limit {
                return d;
            }
        }
        BUCKETS as u64
    }

    fn expired(&self, now: u64) -> bool {
        now.saturating_sub(self.last) >= BUCKETS as u64
    }
}

/// Why a batch did not fit.
#[derive(Debug, PartialEq)]
enum Over {
    Player {
        player: String,
        counted: u32,
        asked: u32,
        wait: u64,
    },
    /// More entries for one player than the limit: no wait makes the batch fit.
    Batch {
        player: String,
        asked: u32,
    },
    Full,
}

impl Over {
    fn retry_after(&self) -> u64 {
        match self {
            Over::Player { wait, .. } => *wait,
            Over::Batch { .. } | Over::Full => BUCKETS as u64,
        }
    }

    fn message(&self, limit: u32) -> String {
        match self {
            Over::Player {
                player,
                counted,
                asked,
                wait,
            } => format!(
                "player {player:?} has {counted} accepted submissions in the last minute and \
                 this request adds {asked}, over max_submissions_per_minute {limit}; retry in \
                 {wait} s; nothing of the batch was applied"
            ),
            Over::Batch { player, asked } => format!(
                "the request holds {asked} entries for player {player:?}, over \
                 max_submissions_per_minute {limit}; send fewer"
            ),
            Over::Full => format!(
                "this node already rate-limits {MAX_RATE_ENTRIES} (board, player) pairs; \
                 retry in {BUCKETS} s"
            ),
        }
    }
}

struct RateTable {
    boards: HashMap<Box<str>, HashMap<Box<str>, Window>>,
    len: usize,
    capacity: usize,
    last_sweep: u64,
}

impl RateTable {
    fn new(capacity: usize) -> Self {
        RateTable {
            boards: HashMap::new(),
            len: 0,
            capacity,
            last_sweep: 0,
        }
    }

    /// Drops every pair with nothing left in its window. At most once per second, so a
    /// table full of live pairs is not rescanned on every request.
    fn sweep(&mut self, now: u64) {
        if self.last_sweep == now && now != 0 {
            return;
        }
        self.last_sweep = now;
        self.boards.retain(|_, players| {
            players.retain(|_, w| !w.expired(now));
            !players.is_empty()
        });
        self.len = self.boards.values().map(HashMap::len).sum();
    }

    fn reserve(
        &mut self,
        now: u64,
        board: &str,
        limit: u32,
        batch: &[(&str, u16)],
    ) -> Result<(), Over> {
        if now >= self.last_sweep + SWEEP_EVERY_SECS {
            self.sweep(now);
        }
        let players = self.boards.get_mut(board);
        let mut fresh = 0;
        let mut over = None;
        match players {
            Some(players) => {
                for &(p, n) in batch {
                    let asked = u32::from(n);
                    let Some(w) = players.get_mut(p) else {
                        fresh += 1;
                        if asked > limit && over.is_none() {
                            over = Some(Over::Batch {
                                player: p.into(),
                                asked,
                            });
                        }
                        continue;
                    };
                    w.advance(now);
                    let counted = w.total();
                    if counted + asked > limit && over.is_none() {
                        over = Some(if asked > limit {
                            Over::Batch {
                                player: p.into(),
                                asked,
                            }
                        } else {
                            Over::Player {
                                player: p.into(),
                                counted,
                                asked,
                                wait: w.wait(asked, limit),
                            }
                        });
                    }
                }
            }
            None => {
                fresh = batch.len();
                if let Some(&(p, n)) = batch.iter().find(|(_, n)| u32::from(*n) > limit) {
                    over = Some(Over::Batch {
                        player: p.into(),
                        asked: u32::from(n),
                    });
                }
            }
        }
        if let Some(over) = over {
            return Err(over);
        }
        if self.len + fresh > self.capacity {
            self.sweep(now);
            if self.len + fresh > self.capacity {
                return Err(Over::Full);
            }
        }
        let players = self.boards.entry(board.into()).or_default();
        let bucket = (now % BUCKETS as u64) as usize;
        for &(p, n) in batch {
            let w = match players.get_mut(p) {
                Some(w) => w,
                None => {
                    self.len += 1;
                    players.entry(p.into()).or_insert_with(|| Window::new(now))
                }
            };
            w.advance(now);
            w.counts[bucket] = w.counts[bucket].saturating_add(n);
        }
        Ok(())
    }

    fn release(&mut self, r: &Reservation) {
        let Some(players) = self.boards.get_mut(&*r.board) else {
            return;
        };
        for (p, n) in &r.players {
            if let Some(w) = players.get_mut(&**p) {
                // Only while that second is still in the ring.
                if w.last < r.sec + BUCKETS as u64 && w.last >= r.sec {
                    let i = (r.sec % BUCKETS as u64) as usize;
                    w.counts[i] = w.counts[i].saturating_sub(*n);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sliding_window_counts_sixty_one_seconds() {
        let mut t = RateTable::new(10);
        for s in 0..3 {
            t.reserve(s * 10, "b", 3, &[("p", 1)]).unwrap();
        }
        // 3 in the window (s=0, 10, 20): a fourth waits until second 0 leaves it (61).
        let over = t.reserve(30, "b", 3, &[("p", 1)]).unwrap_err();
        assert_eq!(
            over,
            Over::Player {
                player: "p".into(),
                counted: 3,
                asked: 1,
                wait: 31
            }
        );
        // Another player and another board are unaffected.
        t.reserve(30, "b", 3, &[("q", 1)]).unwrap();
        t.reserve(30, "c", 3, &[("p", 1)]).unwrap();
        assert!(t.reserve(60, "b", 3, &[("p", 1)]).is_err());
        t.reserve(61, "b", 3, &[("p", 1)]).unwrap();
        // All or nothing: q fits, p does not, so q is not counted either.
        assert!(t.reserve(62, "b", 3, &[("q", 2), ("p", 1)]).is_err());
        t.reserve(62, "b", 3, &[("q", 2)]).unwrap();
        assert_eq!(
            t.reserve(62, "b", 3, &[("r", 4)]).unwrap_err(),
            Over::Batch {
                player: "r".into(),
                asked: 4
            }
        );
    }

    #[test]
    fn release_uncounts_and_full_table_refuses_until_swept() {
        let mut t = RateTable::new(2);
        t.reserve(5, "b", 1, &[("p", 1)]).unwrap();
        assert!(t.reserve(5, "b", 1, &[("p", 1)]).is_err());
        t.release(&Reservation {
            board: "b".into(),
            sec: 5,
            players: vec![("p".into(), 1)],
        });
        t.reserve(6, "b", 1, &[("p", 1)]).unwrap();
        t.reserve(6, "b", 1, &[("q", 1)]).unwrap();
        assert_eq!(t.reserve(7, "b", 1, &[("r", 1)]), Err(Over::Full));
        assert_eq!(t.len, 2);
        // Once p and q have nothing left in their windows, they are swept for r.
        t.reserve(6 + 61, "b", 1, &[("r", 1)]).unwrap();
        assert_eq!(t.len, 1);
    }
}
