//! The generation loop: prefill the prompt as one batch, then decode token by token with
//! the KV cache, sampling each next token and streaming text as soon as it is whole UTF-8
//! and cannot be the start of a stop string.

use crate::image::{Image, PanAndScan};
use crate::load::Model;
use crate::sampling::{Sampler, SamplingParams};
use crate::tokenizer::StreamDecoder;
use crate::EngineError;
use gemma3_model::{ImageInputs, KvCache, Logits, Workspace};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before any of these strings would be printed.
    pub stop_strings: Vec<String>,
    /// Keep going through end-of-sequence tokens (for benchmarks).
    pub ignore_eos: bool,
    /// Prepend `<bos>` (the tokenizer's default when `None`).
    pub add_bos: Option<bool>,
    /// Read control tokens such as `<start_of_turn>` in the prompt as tokens (default), or
    /// as plain text.
    pub parse_special: bool,
    /// Context size in tokens; by default the larger of 4096 and what the request needs,
    /// capped at the model's maximum.
    pub context: Option<usize>,
    /// Images for a multimodal model, in the order of the prompt's `<start_of_image>`
    /// markers (missing markers are added in front).
    pub images: Vec<Image>,
    /// Also show each elongated image as crops (Gemma3Processor's `do_pan_and_scan`).
    pub pan_and_scan: Option<PanAndScan>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 256,
            sampling: SamplingParams::greedy(),
            stop_strings: vec![],
            ignore_eos: false,
            add_bos: None,
            parse_special: true,
            context: None,
            images: vec![],
            pan_and_scan: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token (`<eos>` or `<end_of_turn>`) was produced.
    EndOfSequence,
    StopString,
    MaxTokens,
    /// The context is full.
    Context,
    /// The caller's callback asked to stop.
    Cancelled,
}

#[derive(Clone, Debug)]
pub struct Generation {
    pub prompt_tokens: usize,
    /// Prompt tokens whose keys/values were reused from the previous request.
    pub reused_tokens: usize,
    /// Generated ids (an end-of-sequence token is not included).
    pub tokens: Vec<u32>,
    /// The text shown (up to any stop string).
    pub text: String,
    pub stop: StopReason,
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Time spent encoding images (before the prefill).
    pub image_secs: f64,
}

impl Generation {
    pub fn prefill_tokens_per_s(&self) -> f64 {
        (self.prompt_tokens - self.reused_tokens) as f64 / self.prefill_secs.max(1e-9)
    }
    /// Decode speed over the tokens after the first (which comes from the prefill).
    pub fn decode_tokens_per_s(&self) -> f64 {
        self.tokens.len().saturating_sub(1) as f64 / self.decode_secs.max(1e-9)
    }
}

/// Maximum tokens in one prefill batch: bounds the workspace (and the sliding caches).
pub const MAX_BATCH: usize = 512;

/// A model with a cache and workspace sized for one context, reusable across requests.
pub struct Generator<'m> {
    pub model: &'m Model,
    pub cache: KvCache,
    pub ws: Workspace,
    logits: Vec<f32>,
    /// The tokens whose keys and values are in the cache, so that a prompt sharing a
    /// prefix with the previous request (a chat's history) is not computed again.
    cached: Vec<u32>,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model, context: usize) -> Self {
        let cfg = &model.text.cfg;
        Generator {
            model,
            cache: KvCache::new(cfg, context, MAX_BATCH),
            ws: Workspace::new(cfg, MAX_BATCH),
            logits: vec![0.0; cfg.vocab_size],
            cached: Vec::new(),
        }
    }

    /// Forgets the cached prefix (the next request is computed from scratch).
    pub fn forget(&mut self) {
        self.cache.clear();
        self.cached.clear();
    }

    pub fn context(&self) -> usize {
        self.cache.context
    }

    /// Generates from prompt ids; `on_text` receives each piece of printable text and
    /// returns false to stop.
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.generate_ids_with(prompt, None, opts, on_text)
    }

    /// [`generate_ids`](Self::generate_ids) with the rows that replace the prompt's image
    /// soft tokens (see [`Model::encode_image_views`]).
    pub fn generate_ids_with(
        &mut self,
        prompt: &[u32],
        images: Option<ImageInputs<'_>>,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        opts.sampling.validate().map_err(EngineError::Input)?;
        if prompt.is_empty() {
            return Err(EngineError::Input("the prompt is empty (no tokens)".into()));
        }
        check_fits(self.model, prompt.len(), self.context())?;
        let model = &self.model.text;
        let tok = &self.model.tokenizer;
        let eos = &model.cfg.eos_token_ids;
        let mut sampler = Sampler::new(opts.sampling.clone(), model.cfg.vocab_size);
        let mut history: Vec<u32> = Vec::with_capacity(prompt.len() + opts.max_new_tokens);
        history.extend_from_slice(prompt);
        let mut out = Generation {
            prompt_tokens: prompt.len(),
            reused_tokens: 0,
            tokens: Vec::with_capacity(opts.max_new_tokens),
            text: String::new(),
            stop: StopReason::MaxTokens,
            prefill_secs: 0.0,
            decode_secs: 0.0,
            image_secs: 0.0,
        };
        // Reuse the longest cached prefix (at least one prompt token must run, for logits).
        let common = self
            .cached
            .iter()
            .zip(prompt)
            .take_while(|(a, b)| a == b)
            .count();
        let reuse = common.min(prompt.len() - 1);
        let start = if reuse > 0 && self.cache.truncate(reuse) {
            reuse
        } else {
            self.cache.clear();
            0
        };
        self.cached.truncate(start);
        out.reused_tokens = start;
        let t0 = Instant::now();
        let logits = &mut self.logits;
        // Image tokens are cached as an id no prompt holds: what they stand for is not in
        // the ids, so no later request may reuse them (a shared prefix stops before them).
        model.forward_with(
            &prompt[start..],
            images,
            &mut self.cache,
            &mut self.ws,
            Logits::Last,
            &mut |_, l| logits.copy_from_slice(l),
            None,
        )?;
        self.cached
            .extend(prompt[start..].iter().map(|&t| match images {
                Some(im) if t == im.image_token => u32::MAX,
                _ => t,
            }));
        out.prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut stream = StreamDecoder::new();
        let mut pending = String::new();
        let max_stop = opts.stop_strings.iter().map(|s| s.len()).max().unwrap_or(0);
        if opts.max_new_tokens == 0 {
            return Ok(out);
        }
        loop {
            let next = sampler.sample(&mut self.logits, &history);
            if !opts.ignore_eos && eos.contains(&next) {
                out.stop = StopReason::EndOfSequence;
                break;
            }
            out.tokens.push(next);
            history.push(next);
            pending.push_str(&stream.push(tok, next));
            // Stop strings: cut at the first match; otherwise hold back only a tail that
            // could still grow into one.
            if let Some(cut) = opts
                .stop_strings
                .iter()
                .filter(|s| !s.is_empty())
                .filter_map(|s| pending.find(s.as_str()))
                .min()
            {
                pending.truncate(cut);
                out.text.push_str(&pending);
                on_text(&pending);
                out.stop = StopReason::StopString;
                break;
            }
            let hold = held_back(&pending, &opts.stop_strings, max_stop);
            let emit = pending.len() - hold;
            if emit > 0 {
                out.text.push_str(&pending[..emit]);
                let keep_going = on_text(&pending[..emit]);
                pending.drain(..emit);
                if !keep_going {
                    out.stop = StopReason::Cancelled;
                    break;
                }
            }
            if out.tokens.len() >= opts.max_new_tokens {
                out.stop = StopReason::MaxTokens;
                break;
            }
            if self.cache.len >= self.context() {
                out.stop = StopReason::Context;
                break;
            }
            let logits = &mut self.logits;
            model.forward(
                &[next],
                &mut self.cache,
                &mut self.ws,
                Logits::Last,
                &mut |_, l| logits.copy_from_slice(l),
            )?;
            self.cached.push(next);
        }
        if !matches!(out.stop, StopReason::StopString) {
            pending.push_str(&stream.flush());
            if !pending.is_empty() {
                out.text.push_str(&pending);
                on_text(&pending);
            }
        }
        out.decode_secs = t1.elapsed().as_secs_f64();
        Ok(out)
    }
}

/// A prompt of `len` tokens must leave room for one new token in a context of `ctx`.
pub(crate) fn check_fits(model: &Model, len: usize, ctx: usize) -> Result<(), EngineError> {
    if len >= ctx {
        return Err(EngineError::Input(format!(
            "the prompt has {len} tokens, which does not fit the context of {ctx} tokens (leave room for at least one new token; raise --ctx-size up to the model's {} if needed)",
            model.text.cfg.max_position_embeddings
        )));
    }
    Ok(())
}

/// Bytes at the end of `text` that are a prefix of some stop string (so must wait).
fn held_back(text: &str, stops: &[String], max_stop: usize) -> usize {
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

impl Model {
    /// Tokenizes `prompt` and generates, streaming text to `on_text`. With
    /// `opts.images`, each image is encoded by the vision tower and shown where its
    /// `<start_of_image>` marker is.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        if opts.images.is_empty() {
            let ids = self.encode_prompt(prompt, opts.add_bos, opts.parse_special);
            let ctx = self.context_for(ids.len() + opts.max_new_tokens, opts.context);
            return Generator::new(self, ctx).generate_ids(&ids, opts, on_text);
        }
        let views = self.image_views(&opts.images, opts.pan_and_scan.as_ref())?;
        let ids = self.image_prompt_ids(prompt, &views, opts.add_bos, opts.parse_special)?;
        let ctx = self.context_for(ids.len() + opts.max_new_tokens, opts.context);
        // Fail before the (slow) image encoding when the prompt cannot fit.
        check_fits(self, ids.len(), ctx)?;
        let t0 = Instant::now();
        let embeds = self.encode_image_views(&ids, &views)?;
        let image_secs = t0.elapsed().as_secs_f64();
        let inputs = ImageInputs {
            image_token: self.image_tokens()?.soft,
            embeds: &embeds,
        };
        let mut g =
            Generator::new(self, ctx).generate_ids_with(&ids, Some(inputs), opts, on_text)?;
        g.image_secs = image_secs;
        Ok(g)
    }

    pub fn encode_prompt(
        &self,
        prompt: &str,
        add_bos: Option<bool>,
        parse_special: bool,
    ) -> Vec<u32> {
        let bos = add_bos.unwrap_or(self.tokenizer.add_bos());
        self.tokenizer.encode(prompt, bos, parse_special)
    }

    /// The context size to allocate for `needed` tokens: an explicit size, else at least
    /// 4096, never more than the model allows.
    pub fn context_for(&self, needed: usize, explicit: Option<usize>) -> usize {
        let max = self.text.cfg.max_position_embeddings;
        explicit.unwrap_or_else(|| needed.max(4096)).min(max)
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
