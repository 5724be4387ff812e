//! Order-statistic ranking of one leaderboard: pure data structure, no IO, no async.
//!
//! # Order
//!
//! Entries are kept in one total, deterministic order; rank 1 is the first entry:
//!
//! 1. better score first: with [`SortOrder::High`] a higher score ranks first, with
//!    [`SortOrder::Low`] a lower score ranks first (e.g. race times);
//! 2. on equal scores, on a board with a tie-break (`tiebreak`), the better `subscore`
//!    (higher first with [`SortOrder::High`], lower first with [`SortOrder::Low`]); on a
//!    board without one every subscore is 0, so this step never decides;
//! 3. then the earlier `achieved` sequence number ranks first (whoever reached the score
//!    first keeps the better rank);
//! 4. then the player id in ascending byte order.
//!
//! Scores (and subscores) are compared with [`f64::total_cmp`]; `-0.0` is normalised to `0.0` on the way in so
//! both zeros are equal. Scores are expected to be finite (the caller validates them); an
//! `Increment` may still overflow to an infinity, which the total order handles.
//!
//! # Structure
//!
//! A treap (randomised balanced binary search tree) whose nodes live in one arena `Vec`
//! addressed by `u32` indices and carry their subtree size, so rank and select are
//! `O(log n)` expected; priorities come from a per-board randomly seeded PRNG, so the
//! expected bounds hold whatever the order of submissions. Removal swaps the last arena
//! node into the freed slot, keeping the arena dense. Players are found by a `hashbrown::HashTable<u32>` holding only arena
//! indices (the player id lives once, in the node), which keeps the per-entry overhead to
//! the 72-byte node, ~5 bytes of table and the player id's own allocation.
//!
//! | operation | cost |
//! | --- | --- |
//! | `submit`, `insert`, `remove`, `rank`, `at` | `O(log n)` expected |
//! | `page`, `top`, `around` | `O(log n + k)` expected |
//! | `get` | `O(1)` expected |

use std::cmp::Ordering;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;

/// Which scores rank first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SortOrder {
    /// Higher score ranks first (default).
    #[default]
    High,
    /// Lower score ranks first (e.g. race times).
    Low,
}

/// How a submitted score combines with the player's stored one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScoreMode {
    /// Keep the player's best score (default).
    #[default]
    Best,
    /// Replace the stored score.
    Latest,
    /// Add to the stored score.
    Increment,
}

/// One player's stored entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub player: Arc<str>,
    pub score: f64,
    /// The tie-break between equal scores on a board with `tiebreak` (0 on other boards).
    pub subscore: f64,
    /// Per-board logical sequence number assigned by the caller when this score was achieved
    /// (monotonic). Breaks ties between equal scores: earlier first.
    pub achieved: u64,
    /// Small raw JSON text, opaque here.
    pub meta: Option<Arc<str>>,
}

/// Result of [`Ranking::submit`].
#[derive(Clone, Debug, PartialEq)]
pub struct Submitted {
    /// Whether the stored entry changed (new player, score, `achieved` or meta).
    pub changed: bool,
    /// Rank before the submission; `None` for a new player.
    pub old_rank: Option<u64>,
    /// Rank after the submission.
    pub new_rank: u64,
    /// The entry as stored after the submission.
    pub entry: Entry,
}

const NIL: u32 = u32::MAX;

struct Node {
    entry: Entry,
    left: u32,
    right: u32,
    /// Number of nodes in the subtree rooted here (including this one).
    size: u32,
    /// Heap priority: a parent's priority is >= its children's.
    prio: u32,
}

/// Order-statistic ranking of one leaderboard. See the module docs for the order.
pub struct Ranking {
    order: SortOrder,
    tiebreak: Option<SortOrder>,
    nodes: Vec<Node>,
    /// Arena indices, hashed by the node's player id.
    index: HashTable<u32>,
    hasher: RandomState,
    root: u32,
    rng: u64,
}

impl std::fmt::Debug for Ranking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ranking")
            .field("order", &self.order)
            .field("tiebreak", &self.tiebreak)
            .field("len", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

impl Default for Ranking {
    fn default() -> Self {
        Self::new(SortOrder::default())
    }
}

/// Normalises `-0.0` to `0.0` so both zeros compare equal under `total_cmp`.
#[inline]
fn norm(score: f64) -> f64 {
    if score == 0.0 {
        0.0
    } else {
        score
    }
}

/// What [`Ranking::submit`] would store for `player`, given the entry it has now (`old`),
/// without touching a ranking: `None` when the submission changes nothing. Lets a caller
/// compute a score against a state that is not (yet) in the ranking, e.g. one whose earlier
/// submissions still wait to become durable.
pub fn combine(
    rules: Rules,
    old: Option<&Entry>,
    player: &str,
    score: f64,
    subscore: f64,
    seq: u64,
    meta: Option<Arc<str>>,
) -> Option<Entry> {
    let (score, subscore) = (norm(score), norm(subscore));
    let Some(old) = old else {
        return Some(Entry {
            player: Arc::from(player),
            score,
            subscore,
            achieved: seq,
            meta,
        });
    };
    let ((new_score, new_sub), score_changed, meta_changed) =
        decide(rules, old, score, subscore, &meta);
    if !score_changed && !meta_changed {
        return None;
    }
    let mut entry = old.clone();
    if score_changed {
        entry.score = new_score;
        entry.subscore = new_sub;
        entry.achieved = seq;
    }
    if meta_changed {
        entry.meta = meta;
    }
    Some(entry)
}

/// How a board ranks and combines scores: its options `order`, `tiebreak` and `mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rules {
    pub order: SortOrder,
    /// The subscore's direction; `None`: the board has no subscore.
    pub tiebreak: Option<SortOrder>,
    pub mode: ScoreMode,
}

/// `Less` means `(a, a_sub)` ranks before `(b, b_sub)`: score by `order`, then (with a
/// tie-break) subscore by its direction.
#[inline]
fn cmp_scores(
    order: SortOrder,
    tiebreak: Option<SortOrder>,
    a: (f64, f64),
    b: (f64, f64),
) -> Ordering {
    let dir = |o: SortOrder, x: f64, y: f64| match o {
        SortOrder::High => y.total_cmp(&x),
        SortOrder::Low => x.total_cmp(&y),
    };
    dir(order, a.0, b.0).then_with(|| match tiebreak {
        Some(t) => dir(t, a.1, b.1),
        None => Ordering::Equal,
    })
}

/// The one rule of what a submission does to an existing entry, shared by
/// [`Ranking::submit`] and [`combine`]: the new (score, subscore), and whether they and
/// the meta change. Meta changes only with an accepted score (a worse `best` keeps the old
/// meta). `best` takes a (score, subscore) that ranks strictly better; `increment` adds
/// both.
fn decide(
    rules: Rules,
    old: &Entry,
    score: f64,
    subscore: f64,
    meta: &Option<Arc<str>>,
) -> ((f64, f64), bool, bool) {
    let old_pair = (old.score, old.subscore);
    let (new, accepted) = match rules.mode {
        ScoreMode::Best => {
            let better = cmp_scores(rules.order, rules.tiebreak, (score, subscore), old_pair)
                == Ordering::Less;
            (if better { (score, subscore) } else { old_pair }, better)
        }
        ScoreMode::Latest => ((score, subscore), true),
        ScoreMode::Increment => (
            (norm(old.score + score), norm(old.subscore + subscore)),
            true,
        ),
    };
    let score_changed = new.0.total_cmp(&old.score) != Ordering::Equal
        || new.1.total_cmp(&old.subscore) != Ordering::Equal;
    let meta_changed = accepted && meta.is_some() && *meta != old.meta;
    (new, score_changed, meta_changed)
}

/// `Less` means `a` ranks before `b`.
#[inline]
fn cmp_entries(order: SortOrder, tiebreak: Option<SortOrder>, a: &Entry, b: &Entry) -> Ordering {
    cmp_scores(
        order,
        tiebreak,
        (a.score, a.subscore),
        (b.score, b.subscore),
    )
    .then_with(|| a.achieved.cmp(&b.achieved))
    .then_with(|| a.player.as_bytes().cmp(b.player.as_bytes()))
}

impl Ranking {
    pub fn new(order: SortOrder) -> Self {
        Self::with_tiebreak(order, None)
    }

    /// A ranking whose equal scores are ordered by subscore in the `tiebreak` direction.
    pub fn with_tiebreak(order: SortOrder, tiebreak: Option<SortOrder>) -> Self {
        let hasher = RandomState::new();
        // Per-board random priority seed: the tree shape is then unpredictable, so no
        // submission pattern can force a degenerate (deep) treap. Never zero for xorshift.
        let rng = hasher.hash_one(0x9E37_79B9_7F4A_7C15u64) | 1;
        Ranking {
            order,
            tiebreak,
            nodes: Vec::new(),
            index: HashTable::new(),
            hasher,
            root: NIL,
            rng,
        }
    }

    pub fn order(&self) -> SortOrder {
        self.order
    }

    pub fn tiebreak(&self) -> Option<SortOrder> {
        self.tiebreak
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Applies one score under `mode`.
    ///
    /// * `Best`: the score is taken only if strictly better (per the board's [`SortOrder`])
    ///   than the stored one; then `achieved = seq` and `meta` (if `Some`) replaces the stored
    ///   meta. A score that is not better changes nothing, not even meta.
    /// * `Latest`: the score replaces the stored one; `achieved = seq` only if the score
    ///   actually changed (so resubmitting the same score keeps its tie-break position);
    ///   `meta` (if `Some`) replaces the stored meta.
    /// * `Increment`: new score = old + `score`, `achieved = seq` if that changed the score
    ///   (an increment by 0 keeps `achieved`); `meta` (if `Some`) replaces the stored meta.
    ///
    /// A new player is stored with `score`, `achieved = seq` and `meta` in every mode.
    pub fn submit(
        &mut self,
        player: &str,
        score: f64,
        mode: ScoreMode,
        seq: u64,
        meta: Option<Arc<str>>,
    ) -> Submitted {
        self.submit_sub(player, (score, 0.0), mode, seq, meta)
    }

    /// [`Ranking::submit`] with a subscore: `best` takes a (score, subscore) that ranks
    /// strictly better, `latest` replaces both, `increment` adds both.
    pub fn submit_sub(
        &mut self,
        player: &str,
        (score, subscore): (f64, f64),
        mode: ScoreMode,
        seq: u64,
        meta: Option<Arc<str>>,
    ) -> Submitted {
        let (score, subscore) = (norm(score), norm(subscore));
        let hash = self.hasher.hash_one(player);
        let Some(idx) = self.find(hash, player) else {
            let entry = Entry {
                player: Arc::from(player),
                score,
                subscore,
                achieved: seq,
                meta,
            };
            let idx = self.push(hash, entry.clone());
            return Submitted {
                changed: true,
                old_rank: None,
                new_rank: self.rank_of(idx),
                entry,
            };
        };

        let old = &self.nodes[idx as usize].entry;
        let rules = Rules {
            order: self.order,
            tiebreak: self.tiebreak,
            mode,
        };
        let ((new_score, new_sub), score_changed, meta_changed) =
            decide(rules, old, score, subscore, &meta);
        let old_rank = self.rank_of(idx);

        if !score_changed {
            let node = &mut self.nodes[idx as usize];
            if meta_changed {
                node.entry.meta = meta;
            }
            return Submitted {
                changed: meta_changed,
                old_rank: Some(old_rank),
                new_rank: old_rank,
                entry: node.entry.clone(),
            };
        }

        self.root = self.detach(self.root, idx);
        let node = &mut self.nodes[idx as usize];
        node.entry.score = new_score;
        node.entry.subscore = new_sub;
        node.entry.achieved = seq;
        if meta_changed {
            node.entry.meta = meta;
        }
        node.left = NIL;
        node.right = NIL;
        node.size = 1;
        let entry = node.entry.clone();
        self.root = self.attach(self.root, idx);
        Submitted {
            changed: true,
            old_rank: Some(old_rank),
            new_rank: self.rank_of(idx),
            entry,
        }
    }

    /// Inserts an entry exactly as stored (used when loading from disk); replaces any existing
    /// entry of that player. Only `-0.0` is normalised to `0.0`.
    pub fn insert(&mut self, mut entry: Entry) {
        entry.score = norm(entry.score);
        entry.subscore = norm(entry.subscore);
        let hash = self.hasher.hash_one(&*entry.player);
        match self.find(hash, &entry.player) {
            Some(idx) => {
                self.root = self.detach(self.root, idx);
                let node = &mut self.nodes[idx as usize];
                node.entry = entry;
                node.left = NIL;
                node.right = NIL;
                node.size = 1;
                self.root = self.attach(self.root, idx);
            }
            None => {
                self.push(hash, entry);
            }
        }
    }

    pub fn get(&self, player: &str) -> Option<&Entry> {
        let idx = self.find(self.hasher.hash_one(player), player)?;
        Some(&self.nodes[idx as usize].entry)
    }

    /// 1-based rank of `player`, `O(log n)`.
    pub fn rank(&self, player: &str) -> Option<u64> {
        let idx = self.find(self.hasher.hash_one(player), player)?;
        Some(self.rank_of(idx))
    }

    /// Entry at 1-based `rank`, `O(log n)`.
    pub fn at(&self, rank: u64) -> Option<&Entry> {
        if rank == 0 || rank > self.nodes.len() as u64 {
            return None;
        }
        let mut k = (rank - 1) as u32;
        let mut t = self.root;
        while t != NIL {
            let node = &self.nodes[t as usize];
            let ls = self.size(node.left);
            match k.cmp(&ls) {
                Ordering::Less => t = node.left,
                Ordering::Equal => return Some(&node.entry),
                Ordering::Greater => {
                    k -= ls + 1;
                    t = node.right;
                }
            }
        }
        None
    }

    /// Entries at ranks `offset + 1 ..= offset + limit` (fewer past the end), each with its
    /// rank. `O(log n + limit)`.
    pub fn page(&self, offset: usize, limit: usize) -> Vec<(u64, Entry)> {
        let len = self.nodes.len();
        if offset >= len || limit == 0 {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(limit.min(len - offset));
        // Stack of nodes still to visit in order: the path to rank `offset + 1`, keeping only
        // the nodes at which the descent went left (those come after the target).
        let mut stack: Vec<u32> = Vec::with_capacity(64);
        let mut k = offset as u32;
        let mut t = self.root;
        while t != NIL {
            let node = &self.nodes[t as usize];
            let ls = self.size(node.left);
            match k.cmp(&ls) {
                Ordering::Less => {
                    stack.push(t);
                    t = node.left;
                }
                Ordering::Equal => {
                    stack.push(t);
                    break;
                }
                Ordering::Greater => {
                    k -= ls + 1;
                    t = node.right;
                }
            }
        }
        let mut rank = offset as u64 + 1;
        while out.len() < limit {
            let Some(t) = stack.pop() else { break };
            let node = &self.nodes[t as usize];
            out.push((rank, node.entry.clone()));
            rank += 1;
            let mut c = node.right;
            while c != NIL {
                stack.push(c);
                c = self.nodes[c as usize].left;
            }
        }
        out
    }

    /// Up to `n` entries above `player`, the player, and up to `n` below, with ranks.
    /// `None` if the player has no entry.
    pub fn around(&self, player: &str, n: usize) -> Option<Vec<(u64, Entry)>> {
        let rank = self.rank(player)?;
        let first = rank.saturating_sub(n as u64).max(1);
        let above = (rank - first) as usize;
        Some(self.page(
            (first - 1) as usize,
            above.saturating_add(1).saturating_add(n),
        ))
    }

    /// The first `n` entries with ranks.
    pub fn top(&self, n: usize) -> Vec<(u64, Entry)> {
        self.page(0, n)
    }

    pub fn remove(&mut self, player: &str) -> Option<Entry> {
        let hash = self.hasher.hash_one(player);
        let idx = self.find(hash, player)?;
        self.root = self.detach(self.root, idx);
        let last = (self.nodes.len() - 1) as u32;
        if idx != last {
            // `last` moves into slot `idx`: repoint its parent link and its index entry.
            self.relink(last, idx);
            let last_hash = self
                .hasher
                .hash_one(&*self.nodes[last as usize].entry.player);
            let slot = self
                .index
                .find_mut(last_hash, |&i| i == last)
                .expect("arena node missing from index");
            *slot = idx;
        }
        match self.index.find_entry(hash, |&i| i == idx) {
            Ok(e) => {
                e.remove();
            }
            Err(_) => unreachable!("removed node missing from index"),
        }
        Some(self.nodes.swap_remove(idx as usize).entry)
    }

    pub fn clear(&mut self) {
        self.nodes.clear();
        self.index.clear();
        self.root = NIL;
    }

    // ---- internals -------------------------------------------------------------------

    #[inline]
    fn find(&self, hash: u64, player: &str) -> Option<u32> {
        let nodes = &self.nodes;
        self.index
            .find(hash, |&i| &*nodes[i as usize].entry.player == player)
            .copied()
    }

    #[inline]
    fn size(&self, t: u32) -> u32 {
        if t == NIL {
            0
        } else {
            self.nodes[t as usize].size
        }
    }

    #[inline]
    fn update(&mut self, t: u32) {
        let n = &self.nodes[t as usize];
        let size = 1 + self.size(n.left) + self.size(n.right);
        self.nodes[t as usize].size = size;
    }

    #[inline]
    fn cmp_idx(&self, a: u32, b: u32) -> Ordering {
        cmp_entries(
            self.order,
            self.tiebreak,
            &self.nodes[a as usize].entry,
            &self.nodes[b as usize].entry,
        )
    }

    fn next_prio(&mut self) -> u32 {
        // xorshift64*
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 32) as u32
    }

    /// Appends a new node for a player not yet present and links it into the tree.
    fn push(&mut self, hash: u64, entry: Entry) -> u32 {
        assert!(
            self.nodes.len() < NIL as usize,
            "leaderboard is full ({} entries)",
            NIL
        );
        let idx = self.nodes.len() as u32;
        let prio = self.next_prio();
        self.nodes.push(Node {
            entry,
            left: NIL,
            right: NIL,
            size: 1,
            prio,
        });
        let (nodes, hasher) = (&self.nodes, &self.hasher);
        self.index.insert_unique(hash, idx, |&i| {
            hasher.hash_one(&*nodes[i as usize].entry.player)
        });
        self.root = self.attach(self.root, idx);
        idx
    }

    /// 1-based rank of the node at `idx`, which must be in the tree.
    fn rank_of(&self, idx: u32) -> u64 {
        let key = &self.nodes[idx as usize].entry;
        let mut rank = 0u64;
        let mut t = self.root;
        while t != NIL {
            let node = &self.nodes[t as usize];
            match cmp_entries(self.order, self.tiebreak, key, &node.entry) {
                Ordering::Less => t = node.left,
                Ordering::Equal => return rank + u64::from(self.size(node.left)) + 1,
                Ordering::Greater => {
                    rank += u64::from(self.size(node.left)) + 1;
                    t = node.right;
                }
            }
        }
        unreachable!("rank_of: node not in tree")
    }

    /// Splits subtree `t` into (nodes ranking before `k`, nodes ranking after `k`);
    /// `k` itself must not be in `t`.
    fn split(&mut self, t: u32, k: u32) -> (u32, u32) {
        if t == NIL {
            return (NIL, NIL);
        }
        if self.cmp_idx(t, k) == Ordering::Less {
            let (l, r) = self.split(self.nodes[t as usize].right, k);
            self.nodes[t as usize].right = l;
            self.update(t);
            (t, r)
        } else {
            let (l, r) = self.split(self.nodes[t as usize].left, k);
            self.nodes[t as usize].left = r;
            self.update(t);
            (l, t)
        }
    }

    /// Merges two subtrees where every node of `a` ranks before every node of `b`.
    fn merge(&mut self, a: u32, b: u32) -> u32 {
        if a == NIL {
            return b;
        }
        if b == NIL {
            return a;
        }
        if self.nodes[a as usize].prio > self.nodes[b as usize].prio {
            let m = self.merge(self.nodes[a as usize].right, b);
            self.nodes[a as usize].right = m;
            self.update(a);
            a
        } else {
            let m = self.merge(a, self.nodes[b as usize].left);
            self.nodes[b as usize].left = m;
            self.update(b);
            b
        }
    }

    /// Links the lone node `k` (no children, size 1) into subtree `t`; returns the new root.
    fn attach(&mut self, t: u32, k: u32) -> u32 {
        if t == NIL {
            return k;
        }
        if self.nodes[k as usize].prio > self.nodes[t as usize].prio {
            let (l, r) = self.split(t, k);
            let node = &mut self.nodes[k as usize];
            node.left = l;
            node.right = r;
            self.update(k);
            return k;
        }
        if self.cmp_idx(k, t) == Ordering::Less {
            let c = self.attach(self.nodes[t as usize].left, k);
            self.nodes[t as usize].left = c;
        } else {
            let c = self.attach(self.nodes[t as usize].right, k);
            self.nodes[t as usize].right = c;
        }
        self.nodes[t as usize].size += 1;
        t
    }

    /// Unlinks node `k` (which must be in subtree `t`); returns the new root of `t`.
    fn detach(&mut self, t: u32, k: u32) -> u32 {
        debug_assert!(t != NIL, "detach: node not in tree");
        if t == k {
            let node = &self.nodes[k as usize];
            return self.merge(node.left, node.right);
        }
        if self.cmp_idx(k, t) == Ordering::Less {
            let c = self.detach(self.nodes[t as usize].left, k);
            self.nodes[t as usize].left = c;
        } else {
            let c = self.detach(self.nodes[t as usize].right, k);
            self.nodes[t as usize].right = c;
        }
        self.nodes[t as usize].size -= 1;
        t
    }

    /// Replaces the tree link pointing at node `from` (which is in the tree) by `to`.
    fn relink(&mut self, from: u32, to: u32) {
        if self.root == from {
            self.root = to;
            return;
        }
        let mut t = self.root;
        loop {
            let node = &self.nodes[t as usize];
            let (child, go_left) = if self.cmp_idx(from, t) == Ordering::Less {
                (node.left, true)
            } else {
                (node.right, false)
            };
            debug_assert!(child != NIL, "relink: node not in tree");
            if child == from {
                let node = &mut self.nodes[t as usize];
                if go_left {
                    node.left = to;
                } else {
                    node.right = to;
                }
                return;
            }
            t = child;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// `combine` predicts exactly what `submit` stores, for every mode and order.
        #[test]
        fn combine_matches_submit(
            ops in prop::collection::vec((0u8..4, -5i32..5, -2i32..2, any::<bool>(), 0u8..3), 1..60),
            low in any::<bool>(),
            mode in 0u8..3,
            tiebreak in 0u8..3,
        ) {
            let order = if low { SortOrder::Low } else { SortOrder::High };
            let mode = [ScoreMode::Best, ScoreMode::Latest, ScoreMode::Increment][mode as usize];
            let tiebreak = [None, Some(SortOrder::High), Some(SortOrder::Low)][tiebreak as usize];
            let rules = Rules { order, tiebreak, mode };
            let mut ranking = Ranking::with_tiebreak(order, tiebreak);
            for (seq, (p, score, sub, with_meta, m)) in ops.into_iter().enumerate() {
                let player = format!("p{p}");
                let meta = with_meta.then(|| Arc::from(format!("{{\"m\":{m}}}")));
                let sub = if tiebreak.is_some() { sub as f64 } else { 0.0 };
                let before = ranking.get(&player).cloned();
                let predicted = combine(
                    rules, before.as_ref(), &player, score as f64, sub, seq as u64, meta.clone(),
                );
                let s = ranking.submit_sub(&player, (score as f64, sub), mode, seq as u64, meta);
                prop_assert_eq!(s.changed, predicted.is_some());
                prop_assert_eq!(Some(&s.entry), predicted.as_ref().or(before.as_ref()));
            }
        }
    }

    fn meta(s: &str) -> Option<Arc<str>> {
        Some(Arc::from(s))
    }

    fn players(v: &[(u64, Entry)]) -> Vec<(u64, &str)> {
        v.iter().map(|(r, e)| (*r, &*e.player)).collect()
    }

    impl Ranking {
        /// Checks tree shape, sizes, heap and search order, and the player index.
        fn check_invariants(&self) {
            fn walk(r: &Ranking, t: u32, seen: &mut Vec<u32>) -> u32 {
                if t == NIL {
                    return 0;
                }
                let n = &r.nodes[t as usize];
                for c in [n.left, n.right] {
                    if c != NIL {
                        assert!(r.nodes[c as usize].prio <= n.prio, "heap order");
                    }
                }
                let ls = walk(r, n.left, seen);
                seen.push(t);
                let rs = walk(r, n.right, seen);
                assert_eq!(n.size, ls + rs + 1, "subtree size");
                n.size
            }
            let mut seen = Vec::new();
            let total = walk(self, self.root, &mut seen);
            assert_eq!(total as usize, self.nodes.len());
            assert_eq!(seen.len(), self.nodes.len());
            for w in seen.windows(2) {
                assert_eq!(self.cmp_idx(w[0], w[1]), Ordering::Less, "in-order sorted");
            }
            assert_eq!(self.index.len(), self.nodes.len());
            for (i, n) in self.nodes.iter().enumerate() {
                assert_eq!(
                    self.find(self.hasher.hash_one(&*n.entry.player), &n.entry.player),
                    Some(i as u32)
                );
            }
        }
    }

    #[test]
    fn empty_board() {
        let r = Ranking::new(SortOrder::High);
        assert!(r.is_empty());
        assert_eq!(r.len(), 0);
        assert_eq!(r.rank("a"), None);
        assert_eq!(r.get("a"), None);
        assert_eq!(r.at(0), None);
        assert_eq!(r.at(1), None);
        assert!(r.top(10).is_empty());
        assert!(r.page(0, 10).is_empty());
        assert_eq!(r.around("a", 2), None);
        assert_eq!(r.order(), SortOrder::High);
    }

    #[test]
    fn best_mode_keeps_best() {
        let mut r = Ranking::new(SortOrder::High);
        let s = r.submit("a", 10.0, ScoreMode::Best, 1, meta("m1"));
        assert!(s.changed);
        assert_eq!((s.old_rank, s.new_rank), (None, 1));
        assert_eq!(s.entry.achieved, 1);
        // Worse: nothing changes, not even meta.
        let s = r.submit("a", 5.0, ScoreMode::Best, 2, meta("m2"));
        assert!(!s.changed);
        assert_eq!((s.old_rank, s.new_rank), (Some(1), 1));
        assert_eq!((s.entry.score, s.entry.achieved), (10.0, 1));
        assert_eq!(s.entry.meta, meta("m1"));
        // Equal is not strictly better.
        let s = r.submit("a", 10.0, ScoreMode::Best, 3, None);
        assert!(!s.changed);
        assert_eq!(r.get("a").unwrap().achieved, 1);
        // Better: score, achieved, meta replaced.
        let s = r.submit("a", 12.5, ScoreMode::Best, 4, meta("m4"));
        assert!(s.changed);
        assert_eq!(
            s.entry,
            Entry {
                player: "a".into(),
                score: 12.5,
                subscore: 0.0,
                achieved: 4,
                meta: meta("m4")
            }
        );
        // Better with None meta keeps meta.
        let s = r.submit("a", 13.0, ScoreMode::Best, 5, None);
        assert_eq!(s.entry.meta, meta("m4"));
        assert_eq!(r.get("a").unwrap().score, 13.0);
        r.check_invariants();
    }

    #[test]
    fn best_mode_low_order() {
        let mut r = Ranking::new(SortOrder::Low);
        r.submit("a", 60.0, ScoreMode::Best, 1, None);
        r.submit("b", 55.0, ScoreMode::Best, 2, None);
        assert_eq!(players(&r.top(10)), vec![(1, "b"), (2, "a")]);
        let s = r.submit("a", 70.0, ScoreMode::Best, 3, None);
        assert!(!s.changed);
        let s = r.submit("a", 50.0, ScoreMode::Best, 4, None);
        assert!(s.changed);
        assert_eq!((s.old_rank, s.new_rank), (Some(2), 1));
        assert_eq!(players(&r.top(10)), vec![(1, "a"), (2, "b")]);
        r.check_invariants();
    }

    #[test]
    fn latest_mode_replaces() {
        let mut r = Ranking::new(SortOrder::High);
        r.submit("a", 10.0, ScoreMode::Latest, 1, meta("x"));
        r.submit("b", 8.0, ScoreMode::Latest, 2, None);
        let s = r.submit("a", 3.0, ScoreMode::Latest, 3, None);
        assert!(s.changed);
        assert_eq!((s.old_rank, s.new_rank), (Some(1), 2));
        assert_eq!(
            s.entry,
            Entry {
                player: "a".into(),
                score: 3.0,
                subscore: 0.0,
                achieved: 3,
                meta: meta("x")
            }
        );
        // Same score: achieved kept, unchanged unless meta changes.
        let s = r.submit("a", 3.0, ScoreMode::Latest, 4, None);
        assert!(!s.changed);
        assert_eq!(s.entry.achieved, 3);
        let s = r.submit("a", 3.0, ScoreMode::Latest, 5, meta("y"));
        assert!(s.changed);
        assert_eq!((s.entry.achieved, s.entry.meta.clone()), (3, meta("y")));
        let s = r.submit("a", 3.0, ScoreMode::Latest, 6, meta("y"));
        assert!(!s.changed);
        r.check_invariants();
    }

    #[test]
    fn increment_mode_adds() {
        let mut r = Ranking::new(SortOrder::High);
        let s = r.submit("a", 5.0, ScoreMode::Increment, 1, None);
        assert_eq!((s.entry.score, s.entry.achieved), (5.0, 1));
        r.submit("b", 7.0, ScoreMode::Increment, 2, None);
        let s = r.submit("a", 3.0, ScoreMode::Increment, 3, meta("m"));
        assert!(s.changed);
        assert_eq!((s.old_rank, s.new_rank), (Some(2), 1));
        assert_eq!(
            s.entry,
            Entry {
                player: "a".into(),
                score: 8.0,
                subscore: 0.0,
                achieved: 3,
                meta: meta("m")
            }
        );
        let s = r.submit("a", -8.0, ScoreMode::Increment, 4, None);
        assert_eq!(s.entry.score, 0.0);
        assert!(s.entry.score.is_sign_positive());
        // +0 is a no-op: keeps achieved.
        let s = r.submit("a", 0.0, ScoreMode::Increment, 5, None);
        assert!(!s.changed);
        assert_eq!(s.entry.achieved, 4);
        r.check_invariants();
    }

    #[test]
    fn ties_break_on_achieved_then_player() {
        let mut r = Ranking::new(SortOrder::High);
        r.submit("c", 10.0, ScoreMode::Best, 5, None);
        r.submit("b", 10.0, ScoreMode::Best, 3, None);
        r.submit("a", 10.0, ScoreMode::Best, 7, None);
        r.submit("z", 11.0, ScoreMode::Best, 9, None);
        assert_eq!(
            players(&r.top(10)),
            vec![(1, "z"), (2, "b"), (3, "c"), (4, "a")]
        );
        // Same score and achieved: player id byte order ("B" < "a").
        r.insert(Entry {
            player: "y".into(),
            score: 1.0,
            subscore: 0.0,
            achieved: 1,
            meta: None,
        });
        r.insert(Entry {
            player: "B".into(),
            score: 1.0,
            subscore: 0.0,
            achieved: 1,
            meta: None,
        });
        r.insert(Entry {
            player: "x".into(),
            score: 1.0,
            subscore: 0.0,
            achieved: 1,
            meta: None,
        });
        assert_eq!(players(&r.page(4, 10)), vec![(5, "B"), (6, "x"), (7, "y")]);
        r.check_invariants();
    }

    #[test]
    fn subscore_breaks_ties_before_achieved() {
        // Higher score first; equal scores: lower subscore first (e.g. fewer seconds).
        let mut r = Ranking::with_tiebreak(SortOrder::High, Some(SortOrder::Low));
        r.submit_sub("early", (100.0, 60.0), ScoreMode::Best, 1, None);
        r.submit_sub("late", (100.0, 30.0), ScoreMode::Best, 2, None);
        r.submit_sub("same", (100.0, 30.0), ScoreMode::Best, 3, None);
        r.submit_sub("top", (200.0, 99.0), ScoreMode::Best, 4, None);
        assert_eq!(
            players(&r.top(10)),
            vec![(1, "top"), (2, "late"), (3, "same"), (4, "early")]
        );
        // `best`: an equal score with a better subscore is an improvement, a worse one not.
        let s = r.submit_sub("early", (100.0, 10.0), ScoreMode::Best, 5, None);
        assert!(s.changed);
        assert_eq!((s.old_rank, s.new_rank), (Some(4), 2));
        assert!(
            !r.submit_sub("late", (100.0, 40.0), ScoreMode::Best, 6, None)
                .changed
        );
        // `increment` adds both.
        let mut inc = Ranking::with_tiebreak(SortOrder::High, Some(SortOrder::High));
        inc.submit_sub("a", (1.0, 2.0), ScoreMode::Increment, 1, None);
        let s = inc.submit_sub("a", (1.0, 3.0), ScoreMode::Increment, 2, None);
        assert_eq!((s.entry.score, s.entry.subscore), (2.0, 5.0));
        // Without a tiebreak the subscore never decides (every entry holds 0 there).
        let plain = Ranking::new(SortOrder::High);
        assert_eq!(plain.tiebreak(), None);
        r.check_invariants();
        inc.check_invariants();
    }

    #[test]
    fn negative_zero_equals_zero() {
        let mut r = Ranking::new(SortOrder::High);
        r.submit("a", -0.0, ScoreMode::Best, 1, None);
        r.submit("b", 0.0, ScoreMode::Best, 2, None);
        assert!(r.get("a").unwrap().score.is_sign_positive());
        assert_eq!(players(&r.top(2)), vec![(1, "a"), (2, "b")]);
        // -0.0 is not better than 0.0 on a Low board either.
        let mut r = Ranking::new(SortOrder::Low);
        r.submit("a", 0.0, ScoreMode::Best, 1, None);
        assert!(!r.submit("a", -0.0, ScoreMode::Best, 2, None).changed);
        assert!(!r.submit("a", -0.0, ScoreMode::Latest, 3, None).changed);
        r.insert(Entry {
            player: "c".into(),
            score: -0.0,
            subscore: 0.0,
            achieved: 0,
            meta: None,
        });
        assert!(r.get("c").unwrap().score.is_sign_positive());
        assert_eq!(r.rank("c"), Some(1));
    }

    #[test]
    fn around_at_edges() {
        let mut r = Ranking::new(SortOrder::High);
        for i in 0..10u64 {
            r.submit(&format!("p{i}"), (100 - i) as f64, ScoreMode::Best, i, None);
        }
        let ranks = |v: Vec<(u64, Entry)>| v.iter().map(|(r, _)| *r).collect::<Vec<_>>();
        assert_eq!(ranks(r.around("p0", 2).unwrap()), vec![1, 2, 3]);
        assert_eq!(ranks(r.around("p1", 2).unwrap()), vec![1, 2, 3, 4]);
        assert_eq!(ranks(r.around("p5", 2).unwrap()), vec![4, 5, 6, 7, 8]);
        assert_eq!(ranks(r.around("p9", 2).unwrap()), vec![8, 9, 10]);
        assert_eq!(ranks(r.around("p8", 3).unwrap()), vec![6, 7, 8, 9, 10]);
        assert_eq!(ranks(r.around("p4", 0).unwrap()), vec![5]);
        assert_eq!(ranks(r.around("p4", usize::MAX).unwrap()).len(), 10);
        assert_eq!(r.around("nobody", 2), None);
        let a = r.around("p5", 1).unwrap();
        assert_eq!(players(&a), vec![(5, "p4"), (6, "p5"), (7, "p6")]);
    }

    #[test]
    fn page_and_at() {
        let mut r = Ranking::new(SortOrder::Low);
        for i in 0..20u64 {
            r.submit(&format!("p{i:02}"), i as f64, ScoreMode::Latest, i, None);
        }
        let p = r.page(5, 3);
        assert_eq!(players(&p), vec![(6, "p05"), (7, "p06"), (8, "p07")]);
        assert_eq!(r.page(18, 10).len(), 2);
        assert!(r.page(20, 10).is_empty());
        assert!(r.page(usize::MAX, 10).is_empty());
        assert!(r.page(3, 0).is_empty());
        assert_eq!(r.page(0, usize::MAX).len(), 20);
        assert_eq!(r.top(3).len(), 3);
        assert_eq!(r.at(1).unwrap().player.as_ref(), "p00");
        assert_eq!(r.at(20).unwrap().player.as_ref(), "p19");
        assert_eq!(r.at(21), None);
        assert_eq!(r.at(0), None);
    }

    #[test]
    fn remove_and_clear() {
        let mut r = Ranking::new(SortOrder::High);
        for i in 0..50u64 {
            r.submit(
                &format!("p{i}"),
                (i % 7) as f64,
                ScoreMode::Best,
                i,
                meta("m"),
            );
        }
        r.check_invariants();
        let e = r.remove("p3").unwrap();
        assert_eq!((e.score, e.achieved, e.meta), (3.0, 3, meta("m")));
        assert_eq!(r.remove("p3"), None);
        assert_eq!(r.len(), 49);
        assert_eq!(r.rank("p3"), None);
        r.check_invariants();
        // Remove everything in a scattered order.
        for i in (0..50u64).rev().step_by(3).chain((0..50).step_by(2)) {
            r.remove(&format!("p{i}"));
            r.check_invariants();
        }
        r.clear();
        assert!(r.is_empty());
        assert_eq!(r.rank("p1"), None);
        assert!(r.top(5).is_empty());
        r.submit("again", 1.0, ScoreMode::Best, 100, None);
        assert_eq!(r.rank("again"), Some(1));
        r.check_invariants();
    }

    #[test]
    fn insert_replaces_existing() {
        let mut r = Ranking::new(SortOrder::High);
        r.submit("a", 1.0, ScoreMode::Best, 1, meta("m"));
        r.submit("b", 2.0, ScoreMode::Best, 2, None);
        let e = Entry {
            player: "a".into(),
            score: 0.5,
            subscore: 0.0,
            achieved: 9,
            meta: None,
        };
        r.insert(e.clone());
        assert_eq!(r.get("a"), Some(&e));
        assert_eq!(r.rank("a"), Some(2));
        assert_eq!(r.len(), 2);
        r.check_invariants();
    }

    #[test]
    fn serde_names() {
        assert_eq!(serde_json::to_string(&SortOrder::Low).unwrap(), "\"low\"");
        assert_eq!(
            serde_json::from_str::<ScoreMode>("\"increment\"").unwrap(),
            ScoreMode::Increment
        );
        assert_eq!(SortOrder::default(), SortOrder::High);
        assert_eq!(ScoreMode::default(), ScoreMode::Best);
    }

    // ---- property tests against a reference model -------------------------------------

    /// Naive model: a map of entries, sorted on every query.
    struct Model {
        order: SortOrder,
        entries: Vec<Entry>,
    }

    impl Model {
        fn sorted(&self) -> Vec<Entry> {
            let mut v = self.entries.clone();
            v.sort_by(|a, b| {
                let s = match self.order {
                    SortOrder::High => b.score.partial_cmp(&a.score).unwrap(),
                    SortOrder::Low => a.score.partial_cmp(&b.score).unwrap(),
                };
                s.then(a.achieved.cmp(&b.achieved))
                    .then(a.player.cmp(&b.player))
            });
            v
        }
        fn rank(&self, p: &str) -> Option<u64> {
            self.sorted()
                .iter()
                .position(|e| &*e.player == p)
                .map(|i| i as u64 + 1)
        }
        fn pos(&self, p: &str) -> Option<usize> {
            self.entries.iter().position(|e| &*e.player == p)
        }
        fn submit(
            &mut self,
            p: &str,
            score: f64,
            mode: ScoreMode,
            seq: u64,
            meta: Option<Arc<str>>,
        ) -> Submitted {
            let score = if score == 0.0 { 0.0 } else { score };
            let old_rank = self.rank(p);
            let Some(i) = self.pos(p) else {
                let entry = Entry {
                    player: p.into(),
                    score,
                    subscore: 0.0,
                    achieved: seq,
                    meta,
                };
                self.entries.push(entry.clone());
                return Submitted {
                    changed: true,
                    old_rank: None,
                    new_rank: self.rank(p).unwrap(),
                    entry,
                };
            };
            let before = self.entries[i].clone();
            let e = &mut self.entries[i];
            match mode {
                ScoreMode::Best => {
                    let better = match self.order {
                        SortOrder::High => score > e.score,
                        SortOrder::Low => score < e.score,
                    };
                    if better {
                        e.score = score;
                        e.achieved = seq;
                        if meta.is_some() {
                            e.meta = meta;
                        }
                    }
                }
                ScoreMode::Latest | ScoreMode::Increment => {
                    let mut new = if mode == ScoreMode::Latest {
                        score
                    } else {
                        e.score + score
                    };
                    if new == 0.0 {
                        new = 0.0;
                    }
                    if new != e.score {
                        e.score = new;
                        e.achieved = seq;
                    }
                    if meta.is_some() {
                        e.meta = meta;
                    }
                }
            }
            let entry = e.clone();
            Submitted {
                changed: entry != before,
                old_rank,
                new_rank: self.rank(p).unwrap(),
                entry,
            }
        }
        fn insert(&mut self, mut e: Entry) {
            if e.score == 0.0 {
                e.score = 0.0;
            }
            match self.pos(&e.player) {
                Some(i) => self.entries[i] = e,
                None => self.entries.push(e),
            }
        }
        fn remove(&mut self, p: &str) -> Option<Entry> {
            self.pos(p).map(|i| self.entries.remove(i))
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Submit {
            p: u8,
            score: f64,
            mode: ScoreMode,
            meta: Option<u8>,
        },
        Insert {
            p: u8,
            score: f64,
            achieved: u64,
            meta: Option<u8>,
        },
        Remove {
            p: u8,
        },
        Clear,
    }

    fn score() -> impl Strategy<Value = f64> {
        prop_oneof![
            4 => (-3i32..=3).prop_map(f64::from),
            1 => Just(-0.0),
            1 => Just(0.5),
            1 => -1e6f64..1e6,
        ]
    }

    fn mode() -> impl Strategy<Value = ScoreMode> {
        prop_oneof![
            Just(ScoreMode::Best),
            Just(ScoreMode::Latest),
            Just(ScoreMode::Increment)
        ]
    }

    fn op() -> impl Strategy<Value = Op> {
        let p = 0u8..8;
        let m = proptest::option::of(0u8..3);
        prop_oneof![
            12 => (p.clone(), score(), mode(), m.clone()).prop_map(|(p, score, mode, meta)| Op::Submit { p, score, mode, meta }),
            3 => (p.clone(), score(), 0u64..4, m).prop_map(|(p, score, achieved, meta)| Op::Insert { p, score, achieved, meta }),
            3 => p.prop_map(|p| Op::Remove { p }),
            1 => Just(Op::Clear),
        ]
    }

    fn name(p: u8) -> String {
        // Mixed case/lengths so byte order differs from numeric order.
        ["a", "B", "ab", "b", "Z", "aa", "z0", "0"][p as usize].to_string()
    }

    fn check_against(r: &Ranking, m: &Model) {
        r.check_invariants();
        let sorted = m.sorted();
        assert_eq!(r.len(), sorted.len());
        assert_eq!(r.is_empty(), sorted.is_empty());
        let expected: Vec<(u64, Entry)> = sorted
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, e)| (i as u64 + 1, e))
            .collect();
        for p in 0..8u8 {
            let p = name(p);
            assert_eq!(r.rank(&p), m.rank(&p), "rank {p}");
            assert_eq!(r.get(&p), m.pos(&p).map(|i| &m.entries[i]), "get {p}");
            for n in 0..4usize {
                let want = m.rank(&p).map(|rk| {
                    let i = rk as usize - 1;
                    expected[i.saturating_sub(n)..(i + n + 1).min(expected.len())].to_vec()
                });
                assert_eq!(r.around(&p, n), want, "around {p} {n}");
            }
        }
        for rk in 0..=sorted.len() as u64 + 1 {
            let want = if rk == 0 {
                None
            } else {
                sorted.get(rk as usize - 1)
            };
            assert_eq!(r.at(rk), want, "at {rk}");
        }
        for off in 0..=sorted.len() + 1 {
            for lim in 0..=sorted.len() + 1 {
                let want: Vec<_> = expected.iter().skip(off).take(lim).cloned().collect();
                assert_eq!(r.page(off, lim), want, "page {off} {lim}");
            }
            assert_eq!(
                r.top(off),
                expected.iter().take(off).cloned().collect::<Vec<_>>()
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn matches_model(low in any::<bool>(), ops in proptest::collection::vec(op(), 1..60)) {
            let order = if low { SortOrder::Low } else { SortOrder::High };
            let mut r = Ranking::new(order);
            let mut m = Model { order, entries: Vec::new() };
            let metas = |x: Option<u8>| x.map(|x| Arc::<str>::from(format!("{{\"k\":{x}}}")));
            for (seq, op) in ops.into_iter().enumerate() {
                let seq = seq as u64 + 10;
                match op {
                    Op::Submit { p, score, mode, meta } => {
                        let got = r.submit(&name(p), score, mode, seq, metas(meta));
                        let want = m.submit(&name(p), score, mode, seq, metas(meta));
                        prop_assert_eq!(got, want);
                    }
                    Op::Insert { p, score, achieved, meta } => {
                        let e = Entry { player: name(p).into(), score, subscore: 0.0, achieved, meta: metas(meta) };
                        r.insert(e.clone());
                        m.insert(e);
                    }
                    Op::Remove { p } => {
                        prop_assert_eq!(r.remove(&name(p)), m.remove(&name(p)));
                    }
                    Op::Clear => {
                        r.clear();
                        m.entries.clear();
                    }
                }
                check_against(&r, &m);
            }
        }

        /// Larger boards with many distinct players: ranks and pages stay consistent.
        #[test]
        fn many_players(ops in proptest::collection::vec((0u16..300, -50i32..50, mode(), any::<bool>()), 1..600)) {
            let mut r = Ranking::new(SortOrder::High);
            let mut m = Model { order: SortOrder::High, entries: Vec::new() };
            for (seq, (p, s, mode, rm)) in ops.into_iter().enumerate() {
                let p = format!("p{p}");
                if rm && seq % 5 == 0 {
                    prop_assert_eq!(r.remove(&p), m.remove(&p));
                } else {
                    let got = r.submit(&p, f64::from(s), mode, seq as u64, None);
                    prop_assert_eq!(got, m.submit(&p, f64::from(s), mode, seq as u64, None));
                }
            }
            r.check_invariants();
            let sorted = m.sorted();
            for (i, e) in sorted.iter().enumerate() {
                prop_assert_eq!(r.rank(&e.player), Some(i as u64 + 1));
                prop_assert_eq!(r.at(i as u64 + 1), Some(e));
            }
            let page: Vec<Entry> = r.page(7, 25).into_iter().map(|(_, e)| e).collect();
            prop_assert_eq!(page, sorted.iter().skip(7).take(25).cloned().collect::<Vec<_>>());
        }
    }
}
