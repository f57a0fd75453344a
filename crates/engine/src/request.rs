//! What a request asks for ([`GenerateOptions`]) and what it got ([`Generation`], ended
//! for a [`StopReason`]): shared by the one-sequence loop (`generate`) and the batched
//! sequences (`sequence`) that both use them.

use crate::constraint::Grammar;
use crate::draft::Lookup;
use crate::draft_model::Draft;
use crate::image::{Image, PanAndScan};
use crate::sampling::SamplingParams;

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
    /// Context size in tokens; by default the model's trained length, capped by the
    /// memory this machine has (see [`Model::context`]).
    pub context: Option<usize>,
    /// When the prompt and `max_new_tokens` do not fit the context, drop the prompt's
    /// oldest tokens (after BOS) instead of failing. Prompts with images cannot be cut.
    pub truncate_left: bool,
    /// When the prompt and `max_new_tokens` do not fit the context, generate until the
    /// context is full ([`StopReason::Context`]) instead of failing (llama.cpp's `-n`).
    pub stop_at_context: bool,
    /// Images for a multimodal model, in the order of the prompt's `<start_of_image>`
    /// markers (missing markers are added in front).
    pub images: Vec<Image>,
    /// Also show each elongated image as crops (Gemma3Processor's `do_pan_and_scan`).
    pub pan_and_scan: Option<PanAndScan>,
    /// Record each generated token's log-probability and this many alternatives.
    pub logprobs: Option<usize>,
    /// Also record the log-probability of every prompt token after the first (no prefix of
    /// the prompt is then reused from a cache).
    pub prompt_logprobs: bool,
    /// What the reply must follow (a JSON schema, any JSON object, a regex, a grammar);
    /// the reply ends when it is complete.
    pub constraint: Option<Grammar>,
    /// Speculative decoding by prompt lookup (None: plain decoding). The output is the
    /// same either way; only the speed differs.
    pub lookup: Option<Lookup>,
    /// Speculative decoding with a draft model (used instead of prompt lookup). The output
    /// is the same either way.
    pub draft: Option<Draft>,
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
            logprobs: None,
            prompt_logprobs: false,
            truncate_left: false,
            stop_at_context: false,
            constraint: None,
            lookup: None,
            draft: None,
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
    /// Ended by the host (a server shutting down).
    Aborted,
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
    /// Why the sequence was ended early, when something failed mid-way (e.g. the output
    /// constraint); it then ends with [`StopReason::Aborted`].
    pub error: Option<String>,
    /// Tokens guessed by speculative decoding, and how many of them were accepted.
    pub drafted: usize,
    pub accepted: usize,
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
