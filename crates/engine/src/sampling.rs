//! Choosing the next token from logits: greedy, or penalties → top-k → top-p → min-p →
//! temperature → a seeded draw (llama.cpp's default order). Buffers are sized once per
//! vocabulary, so sampling a token allocates nothing.

/// Sampling settings. `temperature <= 0` means greedy (argmax), and then the filters do
/// not matter; penalties still apply.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0 = all).
    pub top_k: usize,
    /// Keep the smallest set whose probability reaches `top_p` (1 = all).
    pub top_p: f32,
    /// Drop tokens less likely than `min_p` × the most likely one (0 = off).
    pub min_p: f32,
    /// Divide positive logits (multiply negative ones) of recent tokens (1 = off).
    pub repetition_penalty: f32,
    /// Subtract from logits of tokens that appeared recently (0 = off).
    pub presence_penalty: f32,
    /// Subtract, per occurrence, from logits of recent tokens (0 = off).
    pub frequency_penalty: f32,
    /// How many recent tokens the penalties look at (llama.cpp's default is 64).
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams::greedy()
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }

    /// Gemma 3's recommended sampling (its generation_config): temperature 1, top-k 64,
    /// top-p 0.95.
    pub fn gemma_default(seed: u64) -> Self {
        SamplingParams {
            temperature: 1.0,
            top_k: 64,
            top_p: 0.95,
            seed,
            ..Self::greedy()
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(format!(
                "temperature must be >= 0, got {}",
                self.temperature
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return Err(format!("min_p must be in [0, 1], got {}", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be > 0, got {}",
                self.repetition_penalty
            ));
        }
        if !self.presence_penalty.is_finite() || !self.frequency_penalty.is_finite() {
            return Err("presence and frequency penalties must be finite".into());
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and its sequence for a seed never changes between versions,
/// which is what "same seed, same tokens" needs.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
    candidates: Vec<(u32, f32)>,
    counts: Vec<u32>,
    touched: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, vocab: usize) -> Self {
        Sampler {
            rng: Rng::new(params.seed),
            params,
            candidates: Vec::with_capacity(vocab),
            counts: vec![0; vocab],
            touched: Vec::with_capacity(256),
        }
    }

    /// Restarts the random sequence from the seed.
    pub fn reset(&mut self) {
        self.rng = Rng::new(self.params.seed);
    }

    /// Picks a token. `logits` may be modified (penalties are applied in place);
    /// `history` is every token so far (prompt and generated).
    pub fn sample(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        self.penalize(logits, history);
        self.draw(logits)
    }

    /// Applies the repetition, presence and frequency penalties of `history` to `logits`
    /// (the first half of [`sample`](Self::sample); once per step).
    pub fn penalize(&mut self, logits: &mut [f32], history: &[u32]) {
        self.apply_penalties(logits, history);
    }

    /// Draws a token from penalized logits (the second half of [`sample`](Self::sample)),
    /// leaving them as they are: a constraint that refuses the token can mask them and
    /// draw again.
    pub fn draw(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits);
        }
        let params = &self.params;
        let c = &mut self.candidates;
        let by_logit = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if params.top_k == 0 || params.top_k >= logits.len() {
            c.clear();
            c.extend(logits.iter().enumerate().map(|(i, &l)| (i as u32, l)));
        } else {
            top_k(logits, params.top_k, c);
        }
        c.sort_unstable_by(by_logit);
        // Probabilities at temperature 1 for top-p / min-p, as llama.cpp filters before
        // applying temperature.
        let max = c[0].1;
        let mut sum = 0.0f64;
        for e in c.iter() {
            sum += ((e.1 - max) as f64).exp();
        }
        if params.top_p < 1.0 {
            let mut cum = 0.0f64;
            let mut keep = c.len();
            for (i, e) in c.iter().enumerate() {
                cum += ((e.1 - max) as f64).exp() / sum;
                if cum >= params.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            c.truncate(keep.max(1));
        }
        if params.min_p > 0.0 {
            // p_i >= min_p * p_max  <=>  l_i >= l_max + ln(min_p)
            let cut = max + params.min_p.ln();
            let keep = c.iter().take_while(|e| e.1 >= cut).count();
            c.truncate(keep.max(1));
        }
        let t = params.temperature;
        let mut total = 0.0f64;
        for e in c.iter_mut() {
            e.1 = (((e.1 - max) / t) as f64).exp() as f32;
            total += e.1 as f64;
        }
        let r = self.rng.next_f64() * total;
        let mut acc = 0.0f64;
        for e in c.iter() {
            acc += e.1 as f64;
            if r < acc {
                return e.0;
            }
        }
        c[c.len() - 1].0
    }

    fn apply_penalties(&mut self, logits: &mut [f32], history: &[u32]) {
        let p = &self.params;
        if p.repetition_penalty == 1.0 && p.presence_penalty == 0.0 && p.frequency_penalty == 0.0 {
            return;
        }
        let recent = &history[history.len().saturating_sub(p.penalty_last_n)..];
        for &t in recent {
            if let Some(c) = self.counts.get_mut(t as usize) {
                if *c == 0 {
                    self.touched.push(t);
                }
                *c += 1;
            }
        }
        for &t in &self.touched {
            let n = self.counts[t as usize] as f32;
            let l = &mut logits[t as usize];
            if *l > 0.0 {
                *l /= p.repetition_penalty;
            } else {
                *l *= p.repetition_penalty;
            }
            *l -= p.presence_penalty + n * p.frequency_penalty;
        }
        for &t in &self.touched {
            self.counts[t as usize] = 0;
        }
        self.touched.clear();
    }
}

/// The `k` largest logits with their ids (ties to the lower id), in no order: one pass
/// that keeps the current best `k` in a min-heap, so a large vocabulary is never copied.
fn top_k(logits: &[f32], k: usize, out: &mut Vec<(u32, f32)>) {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    /// Orders by logit, then by *lower* id as the better: the heap's minimum is the
    /// candidate to drop.
    #[derive(PartialEq)]
    struct Cand(f32, Reverse<u32>);
    impl Eq for Cand {}
    impl PartialOrd for Cand {
        fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
            Some(self.cmp(o))
        }
    }
    impl Ord for Cand {
        fn cmp(&self, o: &Self) -> std::cmp::Ordering {
            self.0.total_cmp(&o.0).then(self.1.cmp(&o.1))
        }
    }
    let mut heap: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(k + 1);
    for (i, &l) in logits.iter().enumerate() {
        if heap.len() < k {
            heap.push(Reverse(Cand(l, Reverse(i as u32))));
        } else if let Some(Reverse(min)) = heap.peek() {
            // Later ids lose ties, so only a strictly larger logit gets in.
            if l.total_cmp(&min.0).is_gt() {
                heap.pop();
                heap.push(Reverse(Cand(l, Reverse(i as u32))));
            }
        }
    }
    out.clear();
    out.extend(heap.into_iter().map(|Reverse(Cand(l, Reverse(i)))| (i, l)));
}

/// Index of the largest value (the first one on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in x.iter().enumerate() {
        if *v > x[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logits() -> Vec<f32> {
        vec![1.0, 3.0, 2.0, -1.0, 2.5, 0.0]
    }

    #[test]
    fn top_k_keeps_the_largest_with_ties_to_the_lower_id() {
        let l: Vec<f32> = (0..1000).map(|i| ((i * 7919) % 97) as f32 / 7.0).collect();
        for k in [1, 5, 64, 999] {
            let mut got = vec![];
            top_k(&l, k, &mut got);
            let mut want: Vec<(u32, f32)> =
                l.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
            want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            want.truncate(k);
            got.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            assert_eq!(got, want, "k = {k}");
        }
    }

    #[test]
    fn greedy_is_argmax() {
        let mut s = Sampler::new(SamplingParams::greedy(), 6);
        assert_eq!(s.sample(&mut logits(), &[]), 1);
    }

    #[test]
    fn repetition_penalty_can_change_argmax() {
        let mut s = Sampler::new(
            SamplingParams {
                repetition_penalty: 2.0,
                ..SamplingParams::greedy()
            },
            6,
        );
        // 3.0 / 2 = 1.5 < 2.5
        assert_eq!(s.sample(&mut logits(), &[1]), 4);
    }

    #[test]
    fn presence_and_frequency_penalties() {
        let mut s = Sampler::new(
            SamplingParams {
                frequency_penalty: 0.4,
                ..SamplingParams::greedy()
            },
            6,
        );
        // token 1 seen twice: 3.0 - 0.8 = 2.2 < 2.5
        assert_eq!(s.sample(&mut logits(), &[1, 1]), 4);
        let mut s = Sampler::new(
            SamplingParams {
                presence_penalty: 0.4,
                ..SamplingParams::greedy()
            },
            6,
        );
        assert_eq!(s.sample(&mut logits(), &[1, 1]), 1); // 2.6 > 2.5
    }

    #[test]
    fn same_seed_same_tokens() {
        let p = SamplingParams {
            temperature: 1.5,
            seed: 7,
            ..SamplingParams::greedy()
        };
        let draw = |p: &SamplingParams| {
            let mut s = Sampler::new(p.clone(), 6);
            (0..50)
                .map(|_| s.sample(&mut logits(), &[]))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(&p), draw(&p));
        let other = SamplingParams {
            seed: 8,
            ..p.clone()
        };
        assert_ne!(draw(&p), draw(&other));
        // A high temperature draws more than one distinct token.
        let mut seen = draw(&p);
        seen.sort();
        seen.dedup();
        assert!(seen.len() > 2);
    }

    #[test]
    fn top_k_top_p_min_p_restrict_the_draw() {
        let run = |p: SamplingParams| {
            let mut s = Sampler::new(p, 6);
            let mut seen: Vec<u32> = (0..300).map(|_| s.sample(&mut logits(), &[])).collect();
            seen.sort();
            seen.dedup();
            seen
        };
        let base = SamplingParams {
            temperature: 5.0,
            seed: 1,
            ..SamplingParams::greedy()
        };
        assert_eq!(
            run(SamplingParams {
                top_k: 2,
                ..base.clone()
            }),
            vec![1, 4]
        );
        assert_eq!(
            run(SamplingParams {
                top_k: 1,
                ..base.clone()
            }),
            vec![1]
        );
        // softmax(logits): p(1)=.43, p(4)=.26, p(2)=.16 -> top_p .6 keeps {1, 4}
        assert_eq!(
            run(SamplingParams {
                top_p: 0.6,
                ..base.clone()
            }),
            vec![1, 4]
        );
        // min_p .5: keep l >= 3 + ln .5 = 2.31 -> {1, 4}
        assert_eq!(
            run(SamplingParams {
                min_p: 0.5,
                ..base.clone()
            }),
            vec![1, 4]
        );
        assert_eq!(run(base).len(), 6);
    }

    #[test]
    fn invalid_params_are_rejected() {
        assert!(SamplingParams {
            temperature: -1.0,
            ..SamplingParams::greedy()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            top_p: 0.0,
            ..SamplingParams::greedy()
        }
        .validate()
        .is_err());
        assert!(SamplingParams {
            min_p: 2.0,
            ..SamplingParams::greedy()
        }
        .validate()
        .is_err());
        assert!(SamplingParams::gemma_default(1).validate().is_ok());
    }
}
