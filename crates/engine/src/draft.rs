//! Speculative decoding by prompt lookup: guesses of the next tokens copied from what the
//! sequence has already seen (its prompt and what it generated), checked by the target
//! model in one pass over the last token and the guesses (the batch-shaped forward pass
//! reads the weights once for all rows). The check samples each row exactly as plain
//! decoding would (same penalties, same random draw) and stops at the first row whose token
//! differs from the guess, so the output is the same token for token, greedy or seeded.
//!
//! The guess: the longest n-gram (`max_ngram` down to `min_ngram` tokens) that ends the
//! history and occurred before, and the tokens that followed its latest earlier occurrence.
//! The draft length adapts: it grows by two while guesses are accepted whole, halves when one is
//! refused at its first token; after [`MISSES_BEFORE_PAUSE`] refusals in a row drafting
//! pauses for [`PAUSE_TOKENS`] tokens, so a text with nothing to copy costs almost nothing.

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

/// One sequence's drafting state and what it achieved.
#[derive(Clone, Debug)]
pub struct Drafter {
    pub cfg: Lookup,
    /// The current draft length (adapted).
    k: usize,
    misses: usize,
    /// Plain steps left in a pause.
    paused: usize,
    /// Tokens guessed and tokens of them accepted, so far.
    pub drafted: usize,
    pub accepted: usize,
}

impl Drafter {
    pub fn new(cfg: Lookup) -> Drafter {
        let max = cfg.max_draft.clamp(1, MAX_DRAFT);
        Drafter {
            cfg: Lookup {
                max_draft: max,
                ..cfg
            },
            k: max.div_ceil(2),
            misses: 0,
            paused: 0,
            drafted: 0,
            accepted: 0,
        }
    }

    /// How many tokens to guess this step: the adapted length within `limit`, 0 while
    /// paused (each call counts one plain step of a pause).
    pub fn budget(&mut self, limit: usize) -> usize {
        if self.paused > 0 {
            self.paused -= 1;
            return 0;
        }
        self.k.min(limit)
    }

    /// Appends up to `limit` guessed tokens that would follow `history` to `out` (none
    /// while paused, none without a match); never `exclude` (an image placeholder).
    pub fn propose(
        &mut self,
        history: &[u32],
        limit: usize,
        exclude: Option<u32>,
        out: &mut Vec<u32>,
    ) {
        let k = self.budget(limit);
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
        if accepted == drafted {
            self.k = (self.k + 2).min(self.cfg.max_draft);
            self.misses = 0;
        } else if accepted == 0 {
            self.k = (self.k / 2).max(1);
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
    fn the_draft_length_adapts_and_pauses() {
        let cfg = Lookup {
            max_draft: 6,
            ..Lookup::default()
        };
        let mut d = Drafter::new(cfg.clone());
        let h = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2];
        let mut out = vec![];
        d.propose(&h, 16, None, &mut out);
        assert_eq!(out, vec![3, 4, 5], "starts at half the most");
        d.record(3, 3);
        out.clear();
        d.propose(&h, 16, None, &mut out);
        assert_eq!(out.len(), 5, "grows by two after a whole acceptance");
        out.clear();
        d.propose(&h, 2, None, &mut out);
        assert_eq!(out.len(), 2, "never past the limit");
        for _ in 0..MISSES_BEFORE_PAUSE {
            d.record(2, 0);
        }
        out.clear();
        d.propose(&h, 16, None, &mut out);
        assert!(out.is_empty(), "paused after repeated misses");
        out.clear();
        d.propose(&h, 16, Some(4), &mut out);
        assert!(out.is_empty());
        let mut d = Drafter::new(cfg);
        d.propose(&h, 16, Some(4), &mut out);
        assert_eq!(out, vec![3], "stops before an excluded token");
    }
}
