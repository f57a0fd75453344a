//! A step-able generation: a [`Sequence`] holds one request's prompt, KV cache, sampler,
//! stop strings and streaming decoder; a [`Batch`] runs one forward pass over several of
//! them at once (each decoding sequence's next token and prompt chunks of the ones still
//! prefilling) and samples each sequence's next token. `generate`, `chat` and the server
//! all run on these two.

use crate::constraint::Constraint;
use crate::draft::{Drafter, Lookup, PassCost, MAX_DRAFT};
use crate::draft_model::{draft_batch, DraftWorkspace, ModelDrafter};
use crate::load::Model;
use crate::request::{GenerateOptions, Generation, StopReason};
use crate::sampling::{argmax, Sampler};
use crate::EngineError;
use gemma3_model::{chunk_end, ImageInputs, KvCache, Logits, SeqChunk, Workspace, MAX_BATCH};
use gemma3_text::StreamDecoder;
use rayon::prelude::*;
use std::sync::Arc;
use std::time::Instant;

/// The id a cache records for an image token: what it stands for is not in the ids, so no
/// later prompt may share a prefix through it.
const IMAGE_ID_IN_CACHE: u32 = u32::MAX;

/// A generated (or prompt) token's log-probability under the model's raw logits, with the
/// most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    /// The `top` most likely tokens with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// The projector rows of a prompt's image tokens.
#[derive(Clone, Debug)]
pub struct SeqImages {
    pub image_token: u32,
    /// `n_image_tokens × hidden`, in prompt order.
    pub embeds: Vec<f32>,
}

/// What a sequence has produced since it was last asked (see [`Sequence::take_update`]).
#[derive(Clone, Debug, Default)]
pub struct Update {
    /// Text that became final (stop strings cannot cut it any more).
    pub text: String,
    /// New generated token ids.
    pub tokens: Vec<u32>,
    /// Their log-probabilities, when asked for.
    pub logprobs: Vec<TokenLogprob>,
    /// Set once, when the sequence ends.
    pub finished: Option<StopReason>,
}

/// One request being generated.
pub struct Sequence {
    prompt: Vec<u32>,
    images: Option<SeqImages>,
    cache: KvCache,
    /// What a decode step feeds next: the last token sampled, then any guesses of the
    /// tokens after it (speculative decoding) to be checked in the same pass.
    next: Vec<u32>,
    state: State,
}

/// Everything of a sequence that sampling touches (apart from the cache the forward pass
/// borrows).
struct State {
    /// Prompt tokens whose keys and values are in the cache.
    fed: usize,
    /// The tokens whose keys and values are in the cache (image tokens as
    /// `IMAGE_ID_IN_CACHE`), for prefix reuse by a later request.
    cached: Vec<u32>,
    sampler: Sampler,
    /// Prompt and generated tokens, for the penalties.
    history: Vec<u32>,
    logits: Vec<f32>,
    /// Where the output must go (a compiled grammar), if anywhere.
    constraint: Option<Constraint>,
    /// Speculative decoding by prompt lookup, when asked for.
    spec: Option<Spec>,
    /// The logits before penalties, when log-probabilities are asked for.
    raw_logits: Vec<f32>,
    /// Logits wait in `logits` for sampling.
    to_sample: bool,
    stream: StreamDecoder,
    /// Text decoded but held back (it could still become a stop string).
    pending: String,
    max_stop: usize,
    /// `opts.max_new_tokens` was cut to the room the context has left (reaching it ends
    /// with [`StopReason::Context`]).
    capped: bool,
    opts: GenerateOptions,
    eos: Vec<u32>,
    out: Generation,
    logprobs: Vec<TokenLogprob>,
    /// Per prompt token (from the second on, when asked for): its log-probability.
    prompt_logprobs: Vec<TokenLogprob>,
    finished: Option<StopReason>,
    /// What [`Sequence::take_update`] has handed out so far: bytes of text, tokens,
    /// log-probabilities; and whether the end was reported.
    sent: (usize, usize, usize, bool),
    started: Instant,
    first_token: Option<Instant>,
}

/// A sequence's speculative decoding: its drafter, the guesses in the current pass, and
/// the logits of the pass's rows (the last token's and each guess's), checked in order
/// after the pass.
struct Spec {
    /// The draft length, its adaptation and pauses, and the counts.
    drafter: Drafter,
    /// The draft model and its cache, when one guesses (prompt lookup otherwise).
    model: Option<ModelDrafter>,
    /// The guesses fed in this pass (after the last token).
    drafts: Vec<u32>,
    /// The position of the pass's first row, and how many rows it has (0: not speculating).
    base: usize,
    rows: usize,
    /// `rows × vocab` logits, allocated on the first guess.
    logits: Vec<f32>,
    /// Positions of this pass to keep in the cache once checked (the last token and the
    /// accepted guesses).
    keep: usize,
}

impl Sequence {
    /// A sequence for `prompt` (with the projector rows of its image tokens, if any) that
    /// generates into `cache`. `cached` names the tokens whose keys and values `cache`
    /// already holds: the longest prefix shared with the prompt is reused (all but the
    /// prompt's last token at most), the rest of the cache is dropped.
    pub fn new(
        model: &Model,
        prompt: Vec<u32>,
        images: Option<SeqImages>,
        opts: &GenerateOptions,
        mut cache: KvCache,
        mut cached: Vec<u32>,
    ) -> Result<Sequence, EngineError> {
        opts.sampling.validate().map_err(EngineError::Input)?;
        if prompt.is_empty() {
            return Err(EngineError::Input("the prompt is empty (no tokens)".into()));
        }
        // With `stop_at_context`, only the prompt and one new token must fit: generation
        // then ends when the context is full.
        let room = cache.context().saturating_sub(prompt.len());
        let capped = opts.stop_at_context && opts.max_new_tokens > room;
        let needed = match capped {
            true => 1,
            false => opts.max_new_tokens,
        };
        check_fits(model, prompt.len(), needed, cache.context())?;
        let mut opts = opts.clone();
        if capped {
            opts.max_new_tokens = room;
        }
        let cfg = &model.text.cfg;
        if let Some(&bad) = prompt.iter().find(|&&t| {
            t as usize >= cfg.vocab_size && images.as_ref().is_none_or(|im| im.image_token != t)
        }) {
            return Err(EngineError::Model(
                gemma3_model::ModelError::TokenOutOfVocab {
                    id: bad,
                    vocab: cfg.vocab_size,
                },
            ));
        }
        // Prompt log-probabilities need every prompt row computed.
        let common = if opts.prompt_logprobs {
            0
        } else {
            cached
                .iter()
                .zip(&prompt)
                .take_while(|(a, b)| a == b)
                .count()
        };
        let reuse = common.min(prompt.len() - 1);
        let start = if reuse > 0 && cache.truncate(reuse) {
            reuse
        } else {
            cache.clear();
            0
        };
        cached.truncate(start);
        let max_stop = opts.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut history = Vec::with_capacity(prompt.len() + opts.max_new_tokens.min(1 << 16));
        history.extend_from_slice(&prompt);
        let out = Generation {
            prompt_tokens: prompt.len(),
            reused_tokens: start,
            tokens: Vec::new(),
            text: String::new(),
            stop: StopReason::MaxTokens,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            image_secs: 0.0,
            error: None,
            drafted: 0,
            accepted: 0,
        };
        let constraint = match &opts.constraint {
            Some(g) => Some(model.constraints()?.matcher(g)?),
            None => None,
        };
        Ok(Sequence {
            state: State {
                fed: start,
                cached,
                sampler: Sampler::new(opts.sampling.clone(), cfg.vocab_size),
                history,
                logits: vec![0.0; cfg.vocab_size],
                constraint,
                spec: speculation(&opts, images.as_ref().map(|im| im.image_token)).map(
                    |(cfg, model)| Spec {
                        drafter: Drafter::new(cfg),
                        model,
                        drafts: Vec::with_capacity(MAX_DRAFT),
                        base: 0,
                        rows: 0,
                        logits: Vec::new(),
                        keep: 1,
                    },
                ),
                raw_logits: Vec::new(),
                to_sample: false,
                stream: StreamDecoder::new(),
                pending: String::new(),
                max_stop,
                capped,
                opts,
                eos: cfg.eos_token_ids.clone(),
                out,
                logprobs: Vec::new(),
                prompt_logprobs: Vec::new(),
                finished: None,
                sent: (0, 0, 0, false),
                started: Instant::now(),
                first_token: None,
            },
            prompt,
            images,
            cache,
            next: {
                let mut v = Vec::with_capacity(1 + MAX_DRAFT);
                v.push(0);
                v
            },
        })
    }

    pub fn is_finished(&self) -> bool {
        self.state.finished.is_some()
    }

    /// Whether the prompt is still being computed.
    pub fn is_prefilling(&self) -> bool {
        !self.is_finished() && self.state.fed < self.prompt.len()
    }

    /// Prompt tokens not computed yet.
    pub fn prompt_left(&self) -> usize {
        self.prompt.len() - self.state.fed
    }

    pub fn prompt(&self) -> &[u32] {
        &self.prompt
    }

    /// Ends the sequence now (a client went away, or asked to stop).
    pub fn cancel(&mut self) {
        self.finish(StopReason::Cancelled);
    }

    /// Ends the sequence now, reporting `reason` (e.g. a server shutting down).
    pub fn finish(&mut self, reason: StopReason) {
        if self.state.finished.is_none() {
            self.state.finish(reason);
        }
    }

    /// The result so far (the whole of it once finished).
    pub fn generation(&self) -> &Generation {
        &self.state.out
    }

    /// Log-probabilities of the generated tokens (when `opts.logprobs` is set).
    pub fn logprobs(&self) -> &[TokenLogprob] {
        &self.state.logprobs
    }

    /// Log-probabilities of the prompt's tokens from the second on (when
    /// `opts.prompt_logprobs` is set).
    pub fn prompt_logprobs(&self) -> &[TokenLogprob] {
        &self.state.prompt_logprobs
    }

    /// Seconds from creation to the first generated token.
    pub fn time_to_first_token(&self) -> Option<f64> {
        let s = &self.state;
        s.first_token.map(|t| (t - s.started).as_secs_f64())
    }

    /// Bytes of KV cache this sequence holds.
    pub fn cache_bytes(&self) -> usize {
        self.cache.bytes()
    }

    /// What is new since the last call: final text, tokens, log-probabilities, and the end.
    pub fn take_update(&mut self) -> Update {
        let s = &mut self.state;
        let (t, k, l, done) = s.sent;
        let u = Update {
            text: s.out.text[t..].to_string(),
            tokens: s.out.tokens[k..].to_vec(),
            logprobs: s.logprobs[l..].to_vec(),
            finished: if done { None } else { s.finished },
        };
        s.sent = (
            s.out.text.len(),
            s.out.tokens.len(),
            s.logprobs.len(),
            s.finished.is_some(),
        );
        u
    }

    /// Starts this step's draft-model guesses, when the sequence decodes with a draft model
    /// and drafts this step: its drafter and history, for [`draft_batch`].
    fn draft_begin(
        &mut self,
        cost: &PassCost,
        per_guess: f64,
    ) -> Option<(&mut ModelDrafter, &[u32])> {
        if self.is_finished() || self.is_prefilling() {
            return None;
        }
        let State {
            spec,
            history,
            opts,
            out,
            ..
        } = &mut self.state;
        let sp = spec.as_mut()?;
        let md = sp.model.as_mut()?;
        let limit = guess_limit(opts, out.tokens.len(), 1 + MAX_DRAFT, &self.cache);
        let params = md.draft.params();
        let want = match params.adaptive {
            true => sp.drafter.budget(limit, cost, per_guess),
            false => params.max_draft.min(limit),
        };
        // The draft reads no further than its own trained length (a 270M drafting for a
        // 128K-context 4B stops there).
        let reach = md.draft.model().text.cfg.max_position_embeddings;
        if want == 0 || want < params.min_draft || history.len() + want > reach {
            md.guesses.clear();
            return None;
        }
        md.begin(history, want, self.cache.context());
        Some((md, history))
    }

    /// The cache and the tokens it holds, for a later request to reuse.
    pub fn into_cache(self) -> (KvCache, Vec<u32>) {
        (self.cache, self.state.cached)
    }

    /// This sequence's part of the next forward pass: its decode token, or the next prompt
    /// chunk of at most `budget` tokens (an image block may take up to `room`, since it
    /// cannot be split). With it, the state that samples and the whole prompt. None when
    /// finished or out of room this pass.
    #[allow(clippy::type_complexity)]
    fn chunk(
        &mut self,
        budget: usize,
        room: usize,
        cost: &PassCost,
    ) -> Result<Option<(SeqChunk<'_>, &mut State, &[u32])>, EngineError> {
        let Sequence {
            prompt,
            images,
            cache,
            next,
            state,
        } = self;
        if state.finished.is_some() || budget == 0 {
            return Ok(None);
        }
        if state.fed == prompt.len() {
            let pos = cache.len();
            next.truncate(1);
            let image_token = images.as_ref().map(|im| im.image_token);
            state.propose(next, budget, cache, image_token, cost);
            let logits = match next.len() {
                1 => Logits::Last,
                _ => Logits::All,
            };
            let mut c = SeqChunk::new(&next[..], cache, logits);
            // Rows are numbered by position: the prompt's rows are its positions.
            c.row_base = pos;
            return Ok(Some((c, state, prompt)));
        }
        let image_token = images.as_ref().map(|im| im.image_token);
        let end = match chunk_end(
            prompt,
            state.fed,
            budget.min(cache.max_chunk()),
            image_token,
        ) {
            Ok(e) => e,
            Err(e) => {
                match chunk_end(prompt, state.fed, room.min(cache.max_chunk()), image_token) {
                    Ok(e) => e,
                    // Wait for a pass with more room, unless no pass could hold the block.
                    Err(_) if room < cache.max_chunk() => return Ok(None),
                    Err(_) => return Err(e.into()),
                }
            }
        };
        let tokens = &prompt[state.fed..end];
        let chunk_images = images.as_ref().map(|im| {
            let count = |ts: &[u32]| ts.iter().filter(|&&t| t == im.image_token).count();
            let (before, k) = (count(&prompt[..state.fed]), count(tokens));
            let h = im.embeds.len() / count(prompt).max(1);
            ImageInputs {
                image_token: im.image_token,
                embeds: &im.embeds[before * h..(before + k) * h],
            }
        });
        let logits = match (state.opts.prompt_logprobs, end == prompt.len()) {
            (true, _) => Logits::All,
            (false, true) => Logits::Last,
            (false, false) => Logits::None,
        };
        let chunk = SeqChunk {
            tokens,
            images: chunk_images,
            cache,
            logits,
            row_base: state.fed,
        };
        Ok(Some((chunk, state, prompt)))
    }

    /// After a pass: the tokens this sequence ran are in its cache.
    fn ran(&mut self, n: usize) {
        let s = &mut self.state;
        if s.fed < self.prompt.len() {
            let image = self.images.as_ref().map(|im| im.image_token);
            s.cached
                .extend(self.prompt[s.fed..s.fed + n].iter().map(|&t| {
                    if Some(t) == image {
                        IMAGE_ID_IN_CACHE
                    } else {
                        t
                    }
                }));
            s.fed += n;
        } else {
            // The last token and the guesses the check accepted stay in the cache; the
            // refused guesses' positions are dropped.
            let keep = match s.spec.as_mut() {
                Some(sp) if n > 1 => std::mem::replace(&mut sp.keep, 1).clamp(1, n),
                _ => 1,
            };
            if keep < n {
                let len = self.cache.len() - (n - keep);
                let rewound = self.cache.truncate(len);
                debug_assert!(rewound, "a draft's rows are always within the rings");
            }
            s.cached.extend_from_slice(&self.next[..keep]);
        }
        self.next.truncate(1);
        if let Some(&t) = s.out.tokens.last() {
            self.next[0] = t;
        }
    }
}

impl State {
    fn finish(&mut self, reason: StopReason) {
        if !matches!(reason, StopReason::StopString) {
            self.pending.push_str(&self.stream.flush());
            let p = std::mem::take(&mut self.pending);
            self.out.text.push_str(&p);
        }
        self.out.stop = reason;
        self.finished = Some(reason);
        if let Some(t) = self.first_token {
            self.out.decode_secs = t.elapsed().as_secs_f64();
        }
    }

    /// Guesses of the tokens after `next[0]`, appended to `next`: at most what the pass's
    /// `budget` and the tokens left to generate allow (a guess past either could never be
    /// used), and what the cache can take back when refused.
    fn propose(
        &mut self,
        next: &mut Vec<u32>,
        budget: usize,
        cache: &KvCache,
        exclude: Option<u32>,
        cost: &PassCost,
    ) {
        let Some(sp) = self.spec.as_mut() else {
            return;
        };
        sp.rows = 0;
        let limit = guess_limit(&self.opts, self.out.tokens.len(), budget, cache);
        sp.drafts.clear();
        match &sp.model {
            // The draft model guessed before the pass (`Batch::step`).
            Some(md) => {
                let take = md.guesses.len().min(limit);
                if take >= md.draft.params().min_draft {
                    sp.drafts.extend_from_slice(&md.guesses[..take]);
                }
            }
            // The history ends with the prompt and every generated token; `next[0]` is
            // the last of them.
            None => sp
                .drafter
                .propose(&self.history, limit, cost, exclude, &mut sp.drafts),
        }
        // Under a grammar, guesses it refuses could never be accepted: check only the
        // prefix it takes.
        if let Some(c) = self.constraint.as_mut() {
            let ok = c.valid_prefix(&sp.drafts);
            sp.drafts.truncate(ok);
        }
        if sp.drafts.is_empty() {
            return;
        }
        next.extend_from_slice(&sp.drafts);
        sp.base = cache.len();
        sp.rows = next.len();
        let want = sp.rows * self.logits.len();
        if sp.logits.len() < want {
            sp.logits
                .resize((1 + sp.drafter.cfg.max_draft) * self.logits.len(), 0.0);
        }
    }

    /// Takes one row's logits during a pass: a prompt row's log-probability now; the last
    /// row's (the next token's) are kept for [`sample`](Self::sample) after the pass, so
    /// that the sequences of a batch sample in parallel. The rows of a speculative pass
    /// are all kept, to be checked in order.
    fn take_logits(&mut self, prompt: &[u32], row: usize, logits: &[f32]) {
        if let Some(sp) = self.spec.as_mut().filter(|sp| sp.rows > 1) {
            let i = row - sp.base;
            let v = logits.len();
            sp.logits[i * v..(i + 1) * v].copy_from_slice(logits);
            if i + 1 == sp.rows {
                self.to_sample = true;
            }
            return;
        }
        if row + 1 < prompt.len() {
            if self.opts.prompt_logprobs {
                let lp = token_logprob(logits, prompt[row + 1], self.opts.logprobs.unwrap_or(0));
                self.prompt_logprobs.push(lp);
            }
            return;
        }
        self.logits.copy_from_slice(logits);
        if self.opts.logprobs.is_some() {
            // Penalties change `logits`: keep the model's own for the log-probabilities.
            self.raw_logits.clear();
            self.raw_logits.extend_from_slice(logits);
        }
        self.to_sample = true;
    }

    /// The next token: sampled from the logits, then, under a constraint, checked; a refused
    /// token is sampled again from the allowed tokens only (the mask is computed only
    /// then). With log-probabilities asked for, the mask comes first, so that they are
    /// those of the allowed distribution.
    fn sample_allowed(&mut self) -> Result<u32, EngineError> {
        let Some(c) = self.constraint.as_mut() else {
            return Ok(self.sampler.sample(&mut self.logits, &self.history));
        };
        if self.opts.logprobs.is_some() {
            // The model's own choice, for a grammar that ends where the model leaves it.
            if let Some(end) = c.end_instead() {
                if !c.allows(argmax(&self.logits)) {
                    return Ok(end);
                }
            }
            c.mask(&mut self.logits, &mut self.raw_logits)?;
            self.sampler.penalize(&mut self.logits, &self.history);
        } else {
            self.sampler.penalize(&mut self.logits, &self.history);
            let t = self.sampler.draw(&self.logits);
            if c.allows(t) {
                c.consume(t)?;
                return Ok(t);
            }
            if let Some(end) = c.end_instead() {
                return Ok(end);
            }
            c.mask(&mut self.logits, &mut [])?;
        }
        let t = self.sampler.draw(&self.logits);
        if !c.allows(t) {
            return Err(EngineError::Grammar(format!(
                "the output constraint refused token {t}, which its own mask allowed"
            )));
        }
        c.consume(t)?;
        Ok(t)
    }

    /// Samples the next token from the logits [`take_logits`](Self::take_logits) kept; after
    /// a speculative pass, row after row while the sampled token is the guess (each row
    /// sampled as plain decoding would sample it), which keeps the output the same.
    fn sample(&mut self, model: &Model) {
        if !std::mem::take(&mut self.to_sample) {
            return;
        }
        let rows = self.spec.as_ref().map_or(0, |sp| sp.rows);
        if rows <= 1 {
            return self.sample_one(model);
        }
        let before = self.out.tokens.len();
        let mut sp = self.spec.take().expect("a speculative pass has its state");
        let v = self.logits.len();
        for i in 0..rows {
            let row = &sp.logits[i * v..(i + 1) * v];
            self.logits.copy_from_slice(row);
            if self.opts.logprobs.is_some() {
                self.raw_logits.clear();
                self.raw_logits.extend_from_slice(row);
            }
            self.sample_one(model);
            let appended = self.out.tokens.len() - before;
            let guessed = sp.drafts.get(i).copied();
            if self.finished.is_some()
                || appended != i + 1
                || self.out.tokens.last().copied() != guessed
            {
                break;
            }
        }
        // Guesses accepted: the leading sampled tokens that equal them.
        let accepted = self.out.tokens[before..]
            .iter()
            .zip(&sp.drafts)
            .take_while(|(t, d)| t == d)
            .count();
        sp.drafter.record(sp.drafts.len(), accepted);
        self.out.drafted = sp.drafter.drafted;
        self.out.accepted = sp.drafter.accepted;
        sp.keep = 1 + accepted;
        sp.rows = 0;
        self.spec = Some(sp);
    }

    /// Samples one token from `logits` and takes it through the stops: end of sequence,
    /// stop strings, the grammar's end, the token limit.
    fn sample_one(&mut self, model: &Model) {
        if self.opts.max_new_tokens == 0 {
            // Only the prompt was wanted (its log-probabilities).
            self.finish(StopReason::MaxTokens);
            return;
        }
        let next = match self.sample_allowed() {
            Ok(t) => t,
            Err(e) => {
                self.out.error = Some(e.to_string());
                self.finish(StopReason::Aborted);
                return;
            }
        };
        if self.first_token.is_none() {
            let now = Instant::now();
            self.out.prefill_secs = (now - self.started).as_secs_f64();
            self.first_token = Some(now);
        }
        if !self.opts.ignore_eos && self.eos.contains(&next) {
            self.finish(StopReason::EndOfSequence);
            return;
        }
        if let Some(top) = self.opts.logprobs {
            self.logprobs
                .push(token_logprob(&self.raw_logits, next, top));
        }
        self.out.tokens.push(next);
        self.history.push(next);
        let piece = self.stream.push(&model.tokenizer, next);
        self.pending.push_str(&piece);

        // Stop strings: cut at the first match; otherwise hold back only a tail that could
        // still grow into one.
        if let Some(cut) = self
            .opts
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            self.pending.truncate(cut);
            let p = std::mem::take(&mut self.pending);
            self.out.text.push_str(&p);
            self.finish(StopReason::StopString);
            return;
        }
        let hold = held_back(&self.pending, &self.opts.stop_strings, self.max_stop);
        let emit = self.pending.len() - hold;
        if emit > 0 {
            self.out.text.push_str(&self.pending[..emit]);
            self.pending.drain(..emit);
        }
        if self.constraint.as_ref().is_some_and(|c| c.is_complete()) {
            // The grammar is complete: nothing may follow.
            self.finish(StopReason::EndOfSequence);
            return;
        }
        if self.out.tokens.len() >= self.opts.max_new_tokens {
            self.finish(match self.capped {
                true => StopReason::Context,
                false => StopReason::MaxTokens,
            });
        }
    }
}

/// `log_softmax(logits)[id]`, and the `top` most likely tokens.
pub fn token_logprob(logits: &[f32], id: u32, top: usize) -> TokenLogprob {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut best: Vec<(u32, f32)> = Vec::new();
    if top > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = top.min(idx.len());
        if k < idx.len() {
            idx.select_nth_unstable_by(k, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        best = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        id,
        logprob: logits[id as usize] - lse,
        top: best,
    }
}

/// Bytes at the end of `text` that are a prefix of some stop string (so must wait).
pub(crate) fn held_back(text: &str, stops: &[String], max_stop: usize) -> usize {
    let mut hold = 0;
    for k in 1..max_stop.min(text.len() + 1) {
        let start = text.len() - k;
        if !text.is_char_boundary(start) {
            continue;
        }
        let tail = &text[start..];
        if stops.iter().any(|s| s.len() > k && s.starts_with(tail)) {
            hold = k;
        }
    }
    hold
}

/// The drafter and draft model a request speculates with, if any: a draft model when it
/// names one (never guessing `image_token`), else prompt lookup.
fn speculation(
    opts: &GenerateOptions,
    image_token: Option<u32>,
) -> Option<(Lookup, Option<ModelDrafter>)> {
    if let Some(d) = &opts.draft {
        let cfg = Lookup {
            max_draft: d.params().max_draft,
            ..Lookup::default()
        };
        return Some((cfg, Some(ModelDrafter::new(d.clone(), image_token))));
    }
    opts.lookup.clone().map(|cfg| (cfg, None))
}

/// The most tokens a sequence may guess after its next token: what a pass's `budget` of
/// rows, the tokens left to generate (a guess past either could never be used), and what
/// the cache can take back when refused allow.
fn guess_limit(opts: &GenerateOptions, generated: usize, budget: usize, cache: &KvCache) -> usize {
    let left = opts.max_new_tokens.saturating_sub(generated);
    let room = cache.context().saturating_sub(cache.len() + 1);
    budget
        .saturating_sub(1)
        .min(left.saturating_sub(1))
        .min(room)
        .min(cache.max_chunk().saturating_sub(1))
}

/// A prompt of `len` tokens plus `max_new` new ones must fit a context of `ctx`; at least
/// the prompt and one new token must.
pub(crate) fn check_fits(
    model: &Model,
    len: usize,
    max_new: usize,
    ctx: usize,
) -> Result<(), EngineError> {
    if len.saturating_add(max_new.max(1)) > ctx {
        return Err(EngineError::ContextOverflow {
            prompt: len,
            max_new,
            context: ctx,
            model_max: model.text.cfg.max_position_embeddings,
        });
    }
    Ok(())
}

/// What a draft model's guess costs against a one-row pass of the model before either was
/// timed (the 270M drafting for a 4B is about this).
const DRAFT_GUESS_PRIOR: f64 = 0.1;

/// One forward pass at a time over many sequences: the workspace, and how many prompt
/// tokens a pass may take.
pub struct Batch {
    ws: Workspace,
    /// The draft model's workspace, made when a sequence first drafts with one.
    draft: Option<DraftWorkspace>,
    /// What the model's decode passes cost by their rows, and a draft pass's seconds
    /// (averaged): what a drafter weighs its guesses against.
    cost: PassCost,
    draft_secs: Option<f64>,
    /// Prompt tokens per pass (over all prefilling sequences), so that a long new prompt
    /// delays the running decodes by one chunk at a time.
    prefill_chunk: usize,
}

impl Batch {
    /// A batch runner for `model`; prompts advance by up to `prefill_chunk` tokens a pass.
    pub fn new(model: &Model, prefill_chunk: usize) -> Batch {
        Batch {
            ws: Workspace::new(&model.text.cfg, MAX_BATCH),
            draft: None,
            cost: PassCost::default(),
            draft_secs: None,
            prefill_chunk: prefill_chunk.clamp(1, MAX_BATCH),
        }
    }

    /// One forward pass: every decoding sequence's next token, then prompt chunks of the
    /// prefilling ones (in the order given) while the pass has room; samples the next token
    /// of each sequence whose last row ran. Returns the rows run (0 when every sequence is
    /// finished). On an error, the sequences of the failed pass are unchanged.
    pub fn step(
        &mut self,
        model: &Model,
        seqs: &mut [&mut Sequence],
    ) -> Result<usize, EngineError> {
        self.draft(seqs);
        let mut room = self.ws.max_batch;
        let mut prefill_room = self.prefill_chunk;
        // Decode rows first, so they never wait behind prompts.
        let mut order: Vec<usize> = (0..seqs.len())
            .filter(|&i| !seqs[i].is_prefilling())
            .collect();
        order.extend((0..seqs.len()).filter(|&i| seqs[i].is_prefilling()));
        let mut ran = vec![0usize; seqs.len()];
        let mut chunks = Vec::with_capacity(seqs.len());
        let mut states = Vec::with_capacity(seqs.len());
        let mut which = Vec::with_capacity(seqs.len());
        let mut prefilling = false;
        {
            // Each sequence once, in `order`: split the slice into disjoint borrows.
            let mut slots: Vec<Option<&mut Sequence>> =
                seqs.iter_mut().map(|s| Some(&mut **s)).collect();
            for &i in &order {
                let s = slots[i].take().expect("each sequence once");
                let prefill = s.is_prefilling();
                // A decoding sequence's token and its guesses, if it drafts.
                let budget = if prefill {
                    room.min(prefill_room)
                } else {
                    room.min(1 + MAX_DRAFT)
                };
                if let Some((chunk, state, prompt)) = s.chunk(budget, room, &self.cost)? {
                    let n = chunk.tokens.len();
                    room -= n;
                    if prefill {
                        prefill_room = prefill_room.saturating_sub(n);
                        prefilling = true;
                    }
                    ran[i] = n;
                    chunks.push(chunk);
                    states.push((state, prompt));
                    which.push(i);
                }
            }
            if chunks.is_empty() {
                return Ok(0);
            }
            let t0 = Instant::now();
            model.text.forward_batch(
                &mut chunks,
                &mut self.ws,
                &mut |s, row, logits| {
                    let (state, prompt) = &mut states[s];
                    state.take_logits(prompt, row, logits);
                },
                None,
            )?;
            // Decode passes teach what a pass costs by its rows (prompt chunks would
            // swamp the fit).
            if !prefilling {
                let rows = chunks.iter().map(|c| c.tokens.len()).sum();
                self.cost.record(rows, t0.elapsed().as_secs_f64());
            }
            // Sampling (a top-k selection over the vocabulary, penalties, stop strings)
            // of each sequence, in parallel.
            if states.len() > 1 {
                states.par_iter_mut().for_each(|(st, _)| st.sample(model));
            } else {
                states.iter_mut().for_each(|(st, _)| st.sample(model));
            }
        }
        let mut rows = 0;
        for i in which {
            seqs[i].ran(ran[i]);
            rows += ran[i];
        }
        Ok(rows)
    }

    /// The draft model's guesses for every decoding sequence that drafts with one, made in
    /// passes shared by all of them (sequences of a second draft model decode plainly this
    /// step). A failed draft pass only costs the guesses.
    fn draft(&mut self, seqs: &mut [&mut Sequence]) {
        // A guess costs one draft pass: as a share of the model's one-row pass, from what
        // both took so far (a small model's guess, before any was timed).
        let per_guess = match (self.draft_secs, self.cost.one_row_secs()) {
            (Some(d), Some(t)) if t > 0.0 => d / t,
            _ => DRAFT_GUESS_PRIOR,
        };
        let mut drafters = Vec::new();
        let mut model: Option<Arc<Model>> = None;
        for s in seqs.iter_mut() {
            let Some((d, history)) = s.draft_begin(&self.cost, per_guess) else {
                continue;
            };
            let m = d.draft.model();
            match &model {
                None => model = Some(m.clone()),
                Some(x) if Arc::ptr_eq(x, m) => {}
                Some(_) => continue,
            }
            drafters.push((d, history));
        }
        let Some(model) = model else {
            return;
        };
        if self
            .draft
            .as_ref()
            .is_none_or(|w| !Arc::ptr_eq(&w.model, &model))
        {
            self.draft = Some(DraftWorkspace::new(model));
        }
        if let Some(ws) = self.draft.as_mut() {
            if let Some(secs) = draft_batch(ws, &mut drafters) {
                self.draft_secs = Some(match self.draft_secs {
                    Some(s) => 0.9 * s + 0.1 * secs,
                    None => secs,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::held_back;

    #[test]
    fn holds_back_possible_stop_prefixes() {
        let stops = vec!["\n\nUser:".to_string()];
        assert_eq!(held_back("hello\n", &stops, 7), 1);
        assert_eq!(held_back("hello\n\nUs", &stops, 7), 4);
        assert_eq!(held_back("hello", &stops, 7), 0);
        assert_eq!(held_back("héllo", &["ö".to_string()], 2), 0);
    }
}
