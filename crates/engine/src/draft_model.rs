//! Speculative decoding with a draft model: a second, smaller model of the same vocabulary
//! (the 270M drafting for a 4B-27B, or a Q4 file for its own F32) guesses the next tokens
//! greedily from its own KV cache; the target checks them exactly as it checks prompt
//! lookup's guesses (see [`crate::draft`]), so the output is the same token for token.
//!
//! A [`Draft`] is the shared part (the model and how it drafts), checked once against the
//! target ([`Draft::new`]: same pieces for the ids both have, same BOS/EOS). Each sequence
//! keeps a [`ModelDrafter`]: the draft's cache and the tokens in it. Before a batch's pass,
//! [`draft_batch`] runs the draft for every sequence that drafts: one draft pass catches
//! each cache up with its sequence's history (the prompt on the first step; then the last
//! accepted guesses and the target's own token), then one pass per guessed token, all
//! sequences together. A sequence stops guessing when the draft's top probability falls
//! below `p_min`, or at its draft length. Refused guesses are dropped from the draft's
//! cache on the next step by keeping only the prefix it shares with the history (the
//! sliding layers' rings hold a pass's worth of extra positions for exactly this).

use crate::draft::MAX_DRAFT;
use crate::load::{Model, OpenOptions};
use crate::EngineError;
use gemma3_model::{KvCache, Logits, SeqChunk, Workspace, MAX_BATCH};
use std::sync::Arc;

/// Ids below this are special tokens (pad, eos, bos, unk, mask) whose pieces may differ in
/// spelling between conversions of one vocabulary; they are compared by role instead.
const FIRST_CHECKED_ID: u32 = 5;
/// How many more tokens one vocabulary may have than the other (the 4B+ models carry 64
/// extra embedding rows the smaller ones lack).
const MAX_VOCAB_DIFFERENCE: usize = 128;

/// How a draft model drafts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DraftParams {
    /// The most tokens guessed per step (the adapted length never exceeds it).
    pub max_draft: usize,
    /// Fewer guesses than this are not worth a check: the step decodes plainly.
    pub min_draft: usize,
    /// Guessing stops at a token the draft gives less than this probability.
    pub p_min: f32,
    /// Choose each step's length from the acceptance seen and what guesses cost on this
    /// machine (pausing when they do not pay); false guesses `max_draft` every step, as
    /// llama.cpp and vLLM do.
    pub adaptive: bool,
}

impl Default for DraftParams {
    fn default() -> Self {
        DraftParams {
            max_draft: MAX_DRAFT,
            min_draft: 1,
            p_min: 0.2,
            adaptive: true,
        }
    }
}

/// A draft model checked against its target, and how it drafts.
#[derive(Clone)]
pub struct Draft {
    model: Arc<Model>,
    params: DraftParams,
    /// Guesses are ids below this (both vocabularies have them).
    vocab: usize,
}

impl std::fmt::Debug for Draft {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Draft")
            .field("model", &self.model.name())
            .field("params", &self.params)
            .finish()
    }
}

impl Draft {
    /// `draft` drafting for `target`: an error naming the difference unless both read and
    /// write the same token ids (same BOS and EOS, the same piece for every id both have,
    /// vocabularies within [`MAX_VOCAB_DIFFERENCE`] of each other).
    pub fn new(
        target: &Model,
        draft: Arc<Model>,
        params: DraftParams,
    ) -> Result<Draft, EngineError> {
        let (t, d) = (&target.tokenizer, &draft.tokenizer);
        let bad = |what: String| {
            EngineError::DraftIncompatible(format!(
                "{} cannot draft for {}: {what}",
                draft.name(),
                target.name()
            ))
        };
        let (tv, dv) = (
            t.vocab_size().min(target.text.cfg.vocab_size),
            d.vocab_size().min(draft.text.cfg.vocab_size),
        );
        if tv.abs_diff(dv) > MAX_VOCAB_DIFFERENCE {
            return Err(bad(format!(
                "its vocabulary has {dv} tokens, the target's {tv} (more than {MAX_VOCAB_DIFFERENCE} apart)"
            )));
        }
        if t.bos_id() != d.bos_id() || t.eos_id() != d.eos_id() {
            return Err(bad(format!(
                "BOS/EOS ids {}/{} differ from the target's {}/{}",
                d.bos_id(),
                d.eos_id(),
                t.bos_id(),
                t.eos_id()
            )));
        }
        if t.add_bos() != d.add_bos() {
            return Err(bad("one adds BOS to a prompt, the other does not".into()));
        }
        let vocab = tv.min(dv);
        if let Some(id) =
            (FIRST_CHECKED_ID..vocab as u32).find(|&id| t.id_to_piece(id) != d.id_to_piece(id))
        {
            return Err(bad(format!(
                "token {id} is {:?} in the draft and {:?} in the target",
                d.id_to_piece(id).unwrap_or(""),
                t.id_to_piece(id).unwrap_or("")
            )));
        }
        if params.p_min.is_nan() || !(0.0..=1.0).contains(&params.p_min) {
            return Err(EngineError::Input(format!(
                "the draft's minimum probability must be within 0..1, not {}",
                params.p_min
            )));
        }
        let max_draft = params.max_draft.clamp(1, MAX_DRAFT);
        Ok(Draft {
            model: draft,
            params: DraftParams {
                max_draft,
                min_draft: params.min_draft.clamp(1, max_draft),
                ..params
            },
            vocab,
        })
    }

    /// Opens the model `name` (any form [`Model::open_with`] takes) to draft for `target`,
    /// checked as [`Draft::new`] checks it: what every front end's `--draft` does.
    pub fn open(
        target: &Model,
        name: &str,
        opts: &OpenOptions,
        params: DraftParams,
    ) -> Result<Draft, EngineError> {
        let model = Model::open_with(Some(name), opts)?;
        Draft::new(target, Arc::new(model), params)
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn params(&self) -> DraftParams {
        self.params
    }
}

/// One sequence's draft: its cache, the tokens in it, and this step's guesses.
pub(crate) struct ModelDrafter {
    pub(crate) draft: Draft,
    /// Made on the first step that drafts (sized like the sequence's own).
    cache: Option<KvCache>,
    /// The tokens whose keys and values `cache` holds.
    cached: Vec<u32>,
    /// The tokens of the next draft pass (catching up, or the latest guess), as ids the
    /// draft model reads.
    feed: Vec<u32>,
    /// This step's guesses, and how many it may make.
    pub(crate) guesses: Vec<u32>,
    want: usize,
    /// An id the draft may not guess (the image placeholder).
    exclude: Option<u32>,
}

impl ModelDrafter {
    pub(crate) fn new(draft: Draft, exclude: Option<u32>) -> ModelDrafter {
        ModelDrafter {
            draft,
            cache: None,
            cached: Vec::new(),
            feed: Vec::with_capacity(MAX_BATCH),
            guesses: Vec::with_capacity(MAX_DRAFT),
            want: 0,
            exclude,
        }
    }

    /// Starts a step that guesses up to `want` tokens after `history` (whose last token is
    /// the target's latest); `context` sizes the draft's cache. Keeps the cached prefix
    /// `history` shares, drops the rest (refused guesses).
    pub(crate) fn begin(&mut self, history: &[u32], want: usize, context: usize) {
        self.guesses.clear();
        self.want = want;
        let model = &self.draft.model;
        let context = context.min(model.text.cfg.max_position_embeddings);
        let cache = self
            .cache
            .get_or_insert_with(|| model.text.new_cache(context, MAX_BATCH));
        // At most all but the history's last token: the pass that catches up must give
        // the logits after it.
        let common = self
            .cached
            .iter()
            .zip(history)
            .take_while(|(a, b)| a == b)
            .count()
            .min(history.len().saturating_sub(1));
        if !cache.truncate(common) {
            cache.clear();
            self.cached.clear();
        }
        self.cached.truncate(cache.len());
    }

    /// This step's next draft pass over at most `room` rows: the history not yet in the
    /// cache, or the latest guess. None when nothing is left to run.
    pub(crate) fn chunk<'a>(&'a mut self, history: &[u32], room: usize) -> Option<SeqChunk<'a>> {
        let cache = self.cache.as_mut()?;
        if room == 0 {
            return None;
        }
        self.feed.clear();
        let behind = history.len().saturating_sub(self.cached.len());
        let last = if behind > 0 {
            let n = behind.min(room).min(cache.max_chunk());
            let from = self.cached.len();
            let vocab = self.draft.vocab as u32;
            // Ids the draft lacks (an image's placeholders: the draft sees only the text)
            // read as padding.
            let pad = self.draft.model.tokenizer.pad_id().unwrap_or(0);
            self.feed.extend(history[from..from + n].iter().map(|&t| {
                if t >= vocab || Some(t) == self.exclude {
                    pad
                } else {
                    t
                }
            }));
            n == behind
        } else {
            let &g = self.guesses.last()?;
            self.feed.push(g);
            true
        };
        let row_base = cache.len();
        let mut c = SeqChunk::new(
            &self.feed,
            cache,
            if last { Logits::Last } else { Logits::None },
        );
        c.row_base = row_base;
        Some(c)
    }

    /// After a draft pass that ran `n` of this sequence's rows, with the next token's
    /// logits when the pass ended at the newest position. Returns whether the step goes on.
    pub(crate) fn ran(&mut self, history: &[u32], n: usize, logits: Option<&[f32]>) -> bool {
        if self.cached.len() < history.len() {
            let from = self.cached.len();
            self.cached.extend_from_slice(&history[from..from + n]);
        } else if let Some(&g) = self.guesses.last() {
            self.cached.push(g);
        }
        let Some(logits) = logits else {
            return true;
        };
        let (token, p) = top(
            &logits[..self.draft.vocab.min(logits.len())],
            logits,
            self.exclude,
        );
        if p < self.draft.params.p_min {
            return false;
        }
        self.guesses.push(token);
        self.guesses.len() < self.want
    }

    /// Forgets the draft's cache (after a failed draft pass).
    pub(crate) fn reset(&mut self) {
        if let Some(c) = &mut self.cache {
            c.clear();
        }
        self.cached.clear();
        self.guesses.clear();
    }
}

/// The most likely token among `allowed` (never `exclude`) and its probability under the
/// softmax of all of `logits`.
fn top(allowed: &[f32], logits: &[f32], exclude: Option<u32>) -> (u32, f32) {
    let mut best = 0usize;
    for (i, &v) in allowed.iter().enumerate() {
        if v > allowed[best] && Some(i as u32) != exclude {
            best = i;
        }
    }
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let sum: f32 = logits.iter().map(|&l| (l - max).exp()).sum();
    (best as u32, (allowed[best] - max).exp() / sum)
}

/// The draft passes of one step for the sequences in `drafters` (each with its history):
/// catch up, then guess token by token, all sequences in each pass. Returns the mean
/// seconds of its guessing passes (None when it made none). A pass that fails
/// ends drafting for its sequences this step and clears their draft caches (the target
/// then decodes plainly); it never fails the step.
pub(crate) fn draft_batch(
    ws: &mut DraftWorkspace,
    drafters: &mut [(&mut ModelDrafter, &[u32])],
) -> Option<f64> {
    // Seconds and count of the passes that guessed (one row per sequence); catching up
    // with a prompt would swamp them.
    let (mut secs, mut timed) = (0.0, 0usize);
    let DraftWorkspace { model, ws, logits } = ws;
    let mut active: Vec<usize> = (0..drafters.len()).collect();
    let mut next: Vec<Option<usize>> = vec![None; drafters.len()];
    let vocab = model.text.cfg.vocab_size;
    while !active.is_empty() {
        let mut room = ws.max_batch;
        let mut chunks = Vec::with_capacity(active.len());
        let mut who = Vec::with_capacity(active.len());
        let mut rows = Vec::with_capacity(active.len());
        let failed;
        {
            let mut slots: Vec<Option<&mut (&mut ModelDrafter, &[u32])>> =
                drafters.iter_mut().map(Some).collect();
            for &i in &active {
                let (d, history) = slots[i].take().expect("each drafter once");
                if let Some(c) = d.chunk(history, room) {
                    room -= c.tokens.len();
                    rows.push(c.tokens.len());
                    chunks.push(c);
                    who.push(i);
                }
            }
            if chunks.is_empty() {
                return (timed > 0).then(|| secs / timed as f64);
            }
            let guessing = rows.iter().all(|&r| r == 1);
            let t0 = std::time::Instant::now();
            if logits.len() < chunks.len() * vocab {
                logits.resize(chunks.len() * vocab, 0.0);
            }
            next.iter_mut().for_each(|n| *n = None);
            let result = model.text.forward_batch(
                &mut chunks,
                ws,
                &mut |s, _row, l| {
                    logits[s * vocab..(s + 1) * vocab].copy_from_slice(l);
                    next[who[s]] = Some(s);
                },
                None,
            );
            failed = result.is_err();
            if guessing && !failed {
                secs += t0.elapsed().as_secs_f64();
                timed += 1;
            }
        }
        if failed {
            for &i in &who {
                drafters[i].0.reset();
            }
            return (timed > 0).then(|| secs / timed as f64);
        }
        for (k, &i) in who.iter().enumerate() {
            let (d, history) = &mut drafters[i];
            let l = next[i].map(|s| &logits[s * vocab..(s + 1) * vocab]);
            if !d.ran(history, rows[k], l) {
                active.retain(|&a| a != i);
            }
        }
        // Sequences that got no rows this pass (it was full) wait for the next.
    }
    (timed > 0).then(|| secs / timed as f64)
}

/// What the draft passes of a batch reuse from step to step: the draft model's workspace
/// and its logits rows.
pub(crate) struct DraftWorkspace {
    /// The draft model it was made for.
    pub(crate) model: Arc<Model>,
    ws: Workspace,
    logits: Vec<f32>,
}

impl DraftWorkspace {
    pub(crate) fn new(model: Arc<Model>) -> DraftWorkspace {
        DraftWorkspace {
            ws: Workspace::new(&model.text.cfg, MAX_BATCH),
            logits: Vec::new(),
            model,
        }
    }
}
