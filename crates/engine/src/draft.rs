//! Speculative decoding by prompt lookup: guesses of the next tokens copied from what the
//! sequence has already seen (its prompt and what it generated), checked by the target
//! model in one pass over the last token and the guesses (the batch-shaped forward pass
//! reads the weights once for all rows). The check samples each row exactly as plain
//! decoding would (same penalties, same random draw) and stops at the first row whose token
//! differs from the guess, so the output is the same token for token, greedy or seeded.
//!
//! The guess: the longest n-gram (`max_ngram` down to `min_ngram` tokens) that ends the
//! history and occurred before, and the tokens that followed its latest earlier occurrence.
//! The draft length is the one that gives the most tokens per unit of time: from the
//! acceptance seen (decayed, so it follows the text) and what a pass of k + 1 rows costs
//! against one row on this machine ([`PassCost`], learned from the passes run). When no
//! length pays, or after [`MISSES_BEFORE_PAUSE`] refusals at the first guess in a row,
//! drafting pauses for [`PAUSE_TOKENS`] tokens, so text with nothing to copy costs almost
//! nothing.

/// How prompt lookup drafts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lookup {
    /// The most tokens guessed per step.
    pub max_draft: usize,
    /// The shortest n-gram that may be matched (shorter matches guess too often wrong).
    pub min_ngram: usize,
    /// The longest n-gram tried first.
    pub max_ngram: usize,
}

/// The most tokens a draft may hold (the rows a sequence keeps for checking them).
pub const MAX_DRAFT: usize = 16;
/// Guesses refused at their first token, in a row, before drafting pauses.
pub const MISSES_BEFORE_PAUSE: usize = 3;
/// Tokens decoded plainly during a pause.
pub const PAUSE_TOKENS: usize = 16;

impl Default for Lookup {
    fn default() -> Self {
        Lookup {
            max_draft: 10,
            min_ngram: 2,
            max_ngram: 4,
        }
    }
}

/// What a forward pass costs by its rows, learned from the decode passes this machine ran:
/// `seconds = a + b·rows`, fitted by least squares with older passes forgotten. A drafter
/// weighs k guesses (a pass of k + 1 rows) against what they save with it.
#[derive(Clone, Debug, Default)]
pub struct PassCost {
    /// Decayed sums: weight, rows, seconds, rows², rows·seconds.
    n: f64,
    sx: f64,
    sy: f64,
    sxx: f64,
    sxy: f64,
}

impl PassCost {
    /// How much of the past each new pass keeps.
    const DECAY: f64 = 0.98;
    /// The cost of each extra row relative to a one-row pass until passes of several sizes
    /// were seen (a mid value of those measured: 0.1 at 4B shapes, 0.2-0.35 at 270M).
    const PRIOR_ROW: f64 = 0.2;

    /// Records a decode pass of `rows` rows that took `secs`.
    pub fn record(&mut self, rows: usize, secs: f64) {
        let (x, y) = (rows as f64, secs);
        let d = Self::DECAY;
        self.n = self.n * d + 1.0;
        self.sx = self.sx * d + x;
        self.sy = self.sy * d + y;
        self.sxx = self.sxx * d + x * x;
        self.sxy = self.sxy * d + x * y;
    }

    /// The cost of one extra row relative to a one-row pass.
    pub fn per_row(&self) -> f64 {
        let var = self.n * self.sxx - self.sx * self.sx;
        // Rows must have varied (relative to their size) for a slope to mean anything.
        if self.n < 4.0 || var <= 0.25 * self.n * self.n {
            return Self::PRIOR_ROW;
        }
        let b = (self.n * self.sxy - self.sx * self.sy) / var;
        let a = (self.sy - b * self.sx) / self.n;
        if a + b <= 0.0 {
            return Self::PRIOR_ROW;
        }
        (b / (a + b)).clamp(0.0, 4.0)
    }

    /// The seconds of a one-row pass (None before any pass).
    pub fn one_row_secs(&self) -> Option<f64> {
        (self.n > 0.0).then(|| {
            let mean_rows = self.sx / self.n;
            let mean_secs = self.sy / self.n;
            mean_secs / (1.0 + self.per_row() * (mean_rows - 1.0).max(0.0))
        })
    }
}

/// One sequence's drafting state and what it achieved.
#[derive(Clone, Debug)]
pub struct Drafter {
    pub cfg: Lookup,
    /// Guessed tokens accepted and refusals (a guess refused ends its draft), decayed: the
    /// chance that the next guess is accepted is estimated from them.
    hits: f64,
    refusals: f64,
    misses: usize,
    /// Plain steps left in a pause.
    paused: usize,
    /// Tokens guessed and tokens of them accepted, so far.
    pub drafted: usize,
    pub accepted: usize,
}

impl Drafter {
    /// How much of the acceptance seen so far each new draft keeps.
    const DECAY: f64 = 0.9;

    pub fn new(cfg: Lookup) -> Drafter {
        let max = cfg.max_draft.clamp(1, MAX_DRAFT);
        Drafter {
            cfg: Lookup {
                max_draft: max,
                ..cfg
            },
            hits: 0.0,
            refusals: 0.0,
            misses: 0,
            paused: 0,
            drafted: 0,
            accepted: 0,
        }
    }

    /// The estimated chance that a guess is accepted (its predecessors were).
    pub fn acceptance(&self) -> f64 {
        (self.hits + 1.0) / (self.hits + self.refusals + 2.0)
    }

    /// How many tokens to guess this step, within `limit`: the k that gives the most tokens
    /// per unit of time, a pass of k + 1 rows costing `cost` and each guess `per_guess` of a
    /// one-row pass (a draft model's pass; 0 for prompt lookup), at the acceptance seen. 0
    /// while paused (each call counts one plain step of a pause), and when no k pays: a
    /// pause follows, after which one guess probes again.
    pub fn budget(&mut self, limit: usize, cost: &PassCost, per_guess: f64) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        let alpha = self.acceptance();
        let per_row = cost.per_row();
        let (mut best_k, mut best) = (0, 1.0);
        let mut expected = 1.0;
        let mut p = 1.0;
        for k in 1..=self.cfg.max_draft.min(limit) {
            p *= alpha;
            expected += p;
            let rate = expected / (1.0 + (per_row + per_guess) * k as f64);
            if rate > best {
                (best_k, best) = (k, rate);
            }
        }
        if best_k == 0 && limit > 0 {
            // Not worth it at this acceptance: decode plainly a while, then probe.
            self.paused = PAUSE_TOKENS;
            self.hits *= 0.5;
            self.refusals *= 0.5;
            return 0;
        }
        best_k
    }

    /// Appends up to `limit` guessed tokens that would follow `history` to `out` (none
    /// while paused, none without a match); never `exclude` (an image placeholder).
    pub fn propose(
        &mut self,
        history: &[u32],
        limit: usize,
        cost: &PassCost,
        exclude: Option<u32>,
        out: &mut Vec<u32>,
    ) {
        let k = self.budget(limit, cost, 0.0);
        if k == 0 {
            return;
        }
        let start = out.len();
        lookup(history, self.cfg.min_ngram, self.cfg.max_ngram, k, out);
        if let Some(x) = exclude {
            if let Some(i) = out[start..].iter().position(|&t| t == x) {
                out.truncate(start + i);
            }
        }
    }

    /// Records that `accepted` of `drafted` guessed tokens were accepted, and adapts.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.drafted += drafted;
        self.accepted += accepted;
        let refused = (accepted < drafted) as usize as f64;
        self.hits = self.hits * Self::DECAY + accepted as f64;
        self.refusals = self.refusals * Self::DECAY + refused;
        if accepted == 0 {
            self.misses += 1;
            if self.misses >= MISSES_BEFORE_PAUSE {
                self.misses = 0;
                self.paused = PAUSE_TOKENS;
            }
        } else {
            self.misses = 0;
        }
    }
}

/// The tokens that followed the latest earlier occurrence of the longest n-gram
/// (`max_n` down to `min_n` tokens) ending `history`, up to `k`, appended to `out`.
pub fn lookup(history: &[u32], min_n: usize, max_n: usize, k: usize, out: &mut Vec<u32>) {
    let len = history.len();
    for n in (min_n.max(1)..=max_n).rev() {
        if n >= len {
            continue;
        }
        let tail = &history[len - n..];
        // Latest occurrence first, one that has at least one token after it.
        let found = (0..len - n).rev().find(|&s| &history[s..s + n] == tail);
        if let Some(s) = found {
            let from = s + n;
            let take = k.min(len - from);
            out.extend_from_slice(&history[from..from + take]);
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_what_followed_the_longest_latest_match() {
        let h = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3];
        let mut out = vec![];
        lookup(&h, 2, 4, 3, &mut out);
        // "1 2 3" last occurred before at 5..8, followed by 7 8 5.
        assert_eq!(out, vec![7, 8, 5]);
        out.clear();
        lookup(&[4, 5, 6], 2, 4, 3, &mut out);
        assert!(out.is_empty(), "no n-gram repeats");
        out.clear();
        // The draft stops at the end of the history.
        lookup(&[1, 2, 1, 2], 2, 2, 5, &mut out);
        assert_eq!(out, vec![1, 2]);
    }

    #[test]
    fn the_draft_length_follows_acceptance_and_cost() {
        let cfg = Lookup {
            max_draft: 16,
            ..Lookup::default()
        };
        let cost = PassCost::default();
        let mut d = Drafter::new(cfg.clone());
        let first = d.budget(16, &cost, 0.0);
        assert!((1..=4).contains(&first), "a modest start: {first}");
        for _ in 0..6 {
            d.record(4, 4);
        }
        let grown = d.budget(16, &cost, 0.0);
        assert!(grown > first, "grows after whole acceptances: {grown}");
        assert_eq!(d.budget(2, &cost, 0.0), 2, "never past the limit");
        // Guesses that cost as much as a pass never pay: a pause.
        assert_eq!(d.budget(16, &cost, 1.5), 0);
        assert!((0..PAUSE_TOKENS).all(|_| d.budget(16, &cost, 0.0) == 0));
        assert!(d.budget(16, &cost, 0.0) > 0, "probes again after the pause");
        // Rows that cost almost nothing (a big model's pass reads the weights once for
        // all) make long drafts pay at a lower acceptance.
        let mut cheap = PassCost::default();
        for i in 0..40 {
            let rows = 1 + i % 9;
            cheap.record(rows, 0.1 + 0.002 * rows as f64);
        }
        assert!(cheap.per_row() < 0.03, "{}", cheap.per_row());
        let mut d = Drafter::new(cfg);
        for _ in 0..6 {
            d.record(4, 2);
        }
        let dear = d.budget(16, &PassCost::default(), 0.0);
        let mut d2 = d.clone();
        assert!(d2.budget(16, &cheap, 0.0) > dear);
    }

    #[test]
    fn refusals_at_the_first_guess_pause_drafting() {
        let mut d = Drafter::new(Lookup::default());
        let cost = PassCost::default();
        let h = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2];
        let mut out = vec![];
        d.propose(&h, 16, &cost, None, &mut out);
        assert_eq!(out[0], 3);
        for _ in 0..MISSES_BEFORE_PAUSE {
            d.record(2, 0);
        }
        out.clear();
        d.propose(&h, 16, &cost, None, &mut out);
        assert!(out.is_empty(), "paused after repeated misses");
        let mut d = Drafter::new(Lookup::default());
        d.propose(&h, 16, &cost, Some(4), &mut out);
        assert_eq!(out, vec![3], "stops before an excluded token");
    }
}
