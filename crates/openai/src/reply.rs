//! Replies as OpenAI's API shapes them: the events of a request's choices collected into
//! one response object, or turned into stream chunks; usage, logprobs in both the chat
//! and the legacy form, tool calls, and a log line per request.

use crate::error::ApiError;
use crate::toolcalls;
use gemma3_engine::scheduler::{Event, Summary};
use gemma3_engine::tools::{CallParser, CallSyntax};
use gemma3_engine::{Model, StopReason, TokenLogprob};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    /// `n` choices per prompt.
    Completion {
        n: usize,
    },
}

/// What a response needs besides the events.
pub(crate) struct Meta {
    pub id: String,
    pub created: u64,
    pub model: String,
    pub kind: Kind,
    pub choices: usize,
    /// The syntax of the model's tool calls, when the request lets it call any.
    pub calls: Option<CallSyntax>,
    /// Per prompt (one for chat): its ids and its text, for echo.
    pub prompts: Vec<(Vec<u32>, String)>,
    pub echo: bool,
    pub include_usage: bool,
    pub arrived: Instant,
}

/// One choice as it accumulates.
#[derive(Default)]
struct ChoiceState {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<TokenLogprob>,
    summary: Option<Summary>,
    failed: Option<String>,
    started: bool,
    /// Splits a streamed reply into content and tool calls.
    parser: Option<CallParser>,
}

fn finish_reason(s: StopReason) -> &'static str {
    match s {
        StopReason::EndOfSequence | StopReason::StopString => "stop",
        StopReason::MaxTokens | StopReason::Context => "length",
        StopReason::Cancelled | StopReason::Aborted => "abort",
    }
}

/// Token counts; choices of one prompt (`per_prompt` of them) count its tokens once.
fn usage(choices: &[ChoiceState], per_prompt: usize) -> Value {
    let mut prompt = 0;
    let mut cached = 0;
    let mut completion = 0;
    for group in choices.chunks(per_prompt.max(1)) {
        let done: Vec<&Summary> = group.iter().filter_map(|c| c.summary.as_ref()).collect();
        prompt += done.iter().map(|s| s.prompt_tokens).max().unwrap_or(0);
        cached += done.iter().map(|s| s.cached_tokens).max().unwrap_or(0);
        completion += done.iter().map(|s| s.completion_tokens).sum::<usize>();
    }
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    })
}

/// A token as text and bytes, as it appears in generated text (control tokens, such as
/// `<bos>`, appear as nothing).
fn token_text(m: &Model, id: u32) -> (String, Vec<u8>) {
    if m.tokenizer.is_control(id) {
        return (String::new(), vec![]);
    }
    let bytes = m.tokenizer.piece_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

/// Chat logprobs: per token its text, bytes, log-probability and alternatives.
fn chat_logprobs(m: &Model, lps: &[TokenLogprob]) -> Vec<Value> {
    lps.iter()
        .map(|lp| {
            let (t, b) = token_text(m, lp.id);
            json!({
                "token": t,
                "logprob": lp.logprob,
                "bytes": b,
                "top_logprobs": lp.top.iter().map(|&(id, l)| {
                    let (t, b) = token_text(m, id);
                    json!({"token": t, "logprob": l, "bytes": b})
                }).collect::<Vec<_>>(),
            })
        })
        .collect()
}

/// Legacy completion logprobs: parallel lists of tokens, their log-probabilities, the
/// alternatives (as token → logprob maps) and each token's character offset in the text.
fn legacy_logprobs(m: &Model, entries: &[(u32, Option<&TokenLogprob>)], offset0: usize) -> Value {
    let mut tokens = vec![];
    let mut lps = vec![];
    let mut tops = vec![];
    let mut offsets = vec![];
    let mut offset = offset0;
    for (id, lp) in entries {
        let (t, _) = token_text(m, *id);
        offsets.push(offset);
        offset += t.chars().count();
        tokens.push(Value::from(t));
        lps.push(lp.map_or(Value::Null, |l| Value::from(l.logprob)));
        tops.push(lp.map_or(Value::Null, |l| {
            let mut o = serde_json::Map::new();
            for &(id, v) in &l.top {
                o.insert(token_text(m, id).0, Value::from(v));
            }
            Value::Object(o)
        }));
    }
    json!({"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// A completion choice's text (after its prompt's, with echo) and legacy logprobs.
fn completion_text(
    m: Option<&Model>,
    meta: &Meta,
    prompt: usize,
    c: &ChoiceState,
) -> (String, Value) {
    let (ids, prompt_text) = &meta.prompts[prompt];
    let mut text = String::new();
    if meta.echo {
        text.push_str(prompt_text);
    }
    text.push_str(&c.text);
    let prompt_lps = c
        .summary
        .as_ref()
        .map_or(&[][..], |s| &s.prompt_logprobs[..]);
    let Some(m) = m.filter(|_| !c.logprobs.is_empty() || !prompt_lps.is_empty()) else {
        return (text, Value::Null);
    };
    let mut entries: Vec<(u32, Option<&TokenLogprob>)> = vec![];
    if meta.echo {
        // The first prompt token has no log-probability (nothing comes before it).
        entries.extend(
            ids.iter()
                .enumerate()
                .map(|(i, &id)| (id, i.checked_sub(1).and_then(|j| prompt_lps.get(j)))),
        );
    }
    entries.extend(c.logprobs.iter().map(|l| (l.id, Some(l))));
    (text, legacy_logprobs(m, &entries, 0))
}

fn log_request(meta: &Meta, choices: &[ChoiceState], status: u16) {
    let prompt: usize = choices
        .iter()
        .filter_map(|c| c.summary.as_ref())
        .map(|s| s.prompt_tokens)
        .max()
        .unwrap_or(0);
    let generated: usize = choices.iter().map(|c| c.tokens.len()).sum();
    let ttft = choices
        .iter()
        .filter_map(|c| c.summary.as_ref().and_then(|s| s.ttft))
        .fold(f64::NAN, f64::min);
    let decode = choices
        .iter()
        .filter_map(|c| c.summary.as_ref())
        .map(|s| s.decode_secs)
        .fold(0.0, f64::max);
    let tps = if decode > 0.0 {
        generated.saturating_sub(choices.len()) as f64 / decode
    } else {
        0.0
    };
    tracing::info!(
        id = %meta.id,
        status,
        prompt_tokens = prompt,
        generated_tokens = generated,
        ttft_ms = (ttft * 1000.0).round(),
        tokens_per_s = (tps * 10.0).round() / 10.0,
        total_ms = meta.arrived.elapsed().as_millis() as u64,
        "request"
    );
}

/// A streamed reply: [`next`](Chunks::next) gives each chunk (OpenAI's
/// `chat.completion.chunk` or `text_completion` objects; an error object after a failed
/// choice's last chunk; the usage chunk when asked), then None. A transport adds its own
/// end marker (SSE's `[DONE]`).
pub struct Chunks {
    model: Arc<Model>,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    choices: Vec<ChoiceState>,
    /// Choices finished so far.
    open: usize,
    done: bool,
    queue: std::collections::VecDeque<Value>,
}

impl Meta {
    /// Choices per prompt.
    fn per_prompt(&self) -> usize {
        match self.kind {
            Kind::Chat => self.choices,
            Kind::Completion { n } => n,
        }
    }
}

impl Chunks {
    /// A stream chunk's envelope around `choices`.
    fn envelope(&self, choices: Value) -> Value {
        let object = match self.meta.kind {
            Kind::Chat => "chat.completion.chunk",
            Kind::Completion { .. } => "text_completion",
        };
        json!({
            "id": self.meta.id,
            "object": object,
            "created": self.meta.created,
            "model": self.meta.model,
            "choices": choices,
        })
    }

    fn chunk(&self, choice: Value) -> Value {
        self.envelope(json!([choice]))
    }

    /// The next chunk, None after the last. Cancel-safe: a caller may stop waiting (a
    /// timeout) and call again.
    pub async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(v) = self.queue.pop_front() {
                return Some(v);
            }
            if self.done {
                return None;
            }
            self.pump().await;
        }
    }

    /// Waits for the next event and queues what it means for the client.
    async fn pump(&mut self) {
        let model = Some(self.model.clone());
        let Some(ev) = self.rx.recv().await else {
            self.finish();
            return;
        };
        match ev {
            Event::Update { choice, update } => {
                if self.meta.kind == Kind::Chat && !self.choices[choice].started {
                    self.choices[choice].started = true;
                    let c = json!({"index": choice, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null});
                    self.queue.push_back(self.chunk(c));
                }
                let lp = match (&model, update.logprobs.is_empty()) {
                    (Some(m), false) => match self.meta.kind {
                        Kind::Chat => json!({"content": chat_logprobs(m, &update.logprobs)}),
                        Kind::Completion { .. } => {
                            let e: Vec<_> =
                                update.logprobs.iter().map(|l| (l.id, Some(l))).collect();
                            let off = self.choices[choice].text.chars().count();
                            legacy_logprobs(m, &e, off)
                        }
                    },
                    _ => Value::Null,
                };
                if let (Some(syntax), Kind::Chat) = (self.meta.calls, self.meta.kind) {
                    let parser = self.choices[choice]
                        .parser
                        .get_or_insert_with(|| CallParser::new(syntax));
                    let events = parser.push(&update.text);
                    self.call_deltas(choice, events, lp);
                } else if !update.text.is_empty() || !lp.is_null() {
                    let c = match self.meta.kind {
                        Kind::Chat => {
                            json!({"index": choice, "delta": {"content": update.text}, "logprobs": lp, "finish_reason": null})
                        }
                        Kind::Completion { .. } => {
                            json!({"index": choice, "text": update.text, "logprobs": lp, "finish_reason": null})
                        }
                    };
                    self.queue.push_back(self.chunk(c));
                }
                let c = &mut self.choices[choice];
                c.text.push_str(&update.text);
                c.tokens.extend(update.tokens);
                c.logprobs.extend(update.logprobs);
            }
            Event::Done { choice, summary } => {
                let mut reason = finish_reason(summary.stop);
                if let Some(mut parser) = self.choices[choice].parser.take() {
                    let events = parser.finish();
                    self.call_deltas(choice, events, Value::Null);
                    reason = toolcalls::finish_reason(reason, !parser.calls().is_empty());
                }
                let c = match self.meta.kind {
                    Kind::Chat => {
                        json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": reason})
                    }
                    Kind::Completion { .. } => {
                        json!({"index": choice, "text": "", "logprobs": null, "finish_reason": reason})
                    }
                };
                self.queue.push_back(self.chunk(c));
                self.choices[choice].summary = Some(summary);
                self.open += 1;
            }
            Event::Failed { choice, message } => {
                // The choice ends with a finish reason, then the error.
                let c = match self.meta.kind {
                    Kind::Chat => {
                        json!({"index": choice, "delta": {}, "logprobs": null, "finish_reason": "abort"})
                    }
                    Kind::Completion { .. } => {
                        json!({"index": choice, "text": "", "logprobs": null, "finish_reason": "abort"})
                    }
                };
                self.queue.push_back(self.chunk(c));
                self.queue
                    .push_back(ApiError::Internal(message.clone()).body());
                self.choices[choice].failed = Some(message);
                self.open += 1;
            }
        }
        if self.open == self.meta.choices {
            self.finish();
        }
    }

    /// Queues a chat delta per call event (content, a call's start, a piece of its
    /// arguments); log-probabilities ride on the first, or on an empty delta.
    fn call_deltas(
        &mut self,
        choice: usize,
        events: Vec<gemma3_engine::tools::CallEvent>,
        lp: Value,
    ) {
        let mut lp = Some(lp).filter(|l| !l.is_null());
        let deltas = toolcalls::deltas(events, &self.meta.id, choice);
        if deltas.is_empty() {
            if let Some(l) = lp.take() {
                let c = json!({"index": choice, "delta": {}, "logprobs": l, "finish_reason": null});
                self.queue.push_back(self.chunk(c));
            }
            return;
        }
        for d in deltas {
            let c =
                json!({"index": choice, "delta": d, "logprobs": lp.take(), "finish_reason": null});
            self.queue.push_back(self.chunk(c));
        }
    }

    fn finish(&mut self) {
        if self.done {
            return;
        }
        if self.meta.include_usage {
            let mut v = self.envelope(json!([]));
            v["usage"] = usage(&self.choices, self.meta.per_prompt());
            self.queue.push_back(v);
        }
        let status = if self.choices.iter().any(|c| c.failed.is_some()) {
            500
        } else {
            200
        };
        log_request(&self.meta, &self.choices, status);
        self.done = true;
    }
}

/// A queued request's reply, before it is read as a whole or as a stream.
pub struct Pending {
    model: Arc<Model>,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    stream: bool,
}

impl Pending {
    pub(crate) fn new(
        model: Arc<Model>,
        meta: Meta,
        rx: UnboundedReceiver<Event>,
        stream: bool,
    ) -> Self {
        Pending {
            model,
            meta,
            rx,
            stream,
        }
    }

    /// Whether the request asked for a stream.
    pub fn stream(&self) -> bool {
        self.stream
    }

    /// The request's id (`chatcmpl-…`, `cmpl-…`).
    pub fn id(&self) -> &str {
        &self.meta.id
    }

    /// Read as one response.
    pub fn reply(self) -> Reply {
        let choices = (0..self.meta.choices)
            .map(|_| ChoiceState::default())
            .collect();
        Reply {
            open: self.meta.choices,
            model: self.model,
            meta: self.meta,
            rx: self.rx,
            choices,
        }
    }

    /// Read as stream chunks.
    pub fn chunks(self) -> Chunks {
        let choices = (0..self.meta.choices)
            .map(|_| ChoiceState::default())
            .collect();
        Chunks {
            model: self.model,
            meta: self.meta,
            rx: self.rx,
            choices,
            open: 0,
            done: false,
            queue: std::collections::VecDeque::new(),
        }
    }
}

/// A reply read as a whole: [`recv`](Reply::recv) until it says every choice ended, then
/// [`finish`](Reply::finish) for the response object.
pub struct Reply {
    model: Arc<Model>,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
    choices: Vec<ChoiceState>,
    open: usize,
}

impl Reply {
    /// Waits for the next event; false once every choice has ended. Cancel-safe: a caller
    /// may stop waiting (a timeout) and call again.
    pub async fn recv(&mut self) -> bool {
        if self.open == 0 {
            return false;
        }
        let Some(ev) = self.rx.recv().await else {
            self.open = 0;
            return false;
        };
        match ev {
            Event::Update { choice, update } => {
                let c = &mut self.choices[choice];
                c.text.push_str(&update.text);
                c.tokens.extend(update.tokens);
                c.logprobs.extend(update.logprobs);
            }
            Event::Done { choice, summary } => {
                self.choices[choice].summary = Some(summary);
                self.open -= 1;
            }
            Event::Failed { choice, message } => {
                self.choices[choice].failed = Some(message);
                self.open -= 1;
            }
        }
        self.open > 0
    }

    /// Reads every event, then builds the response.
    pub async fn collect(mut self) -> Result<Value, ApiError> {
        while self.recv().await {}
        self.finish()
    }

    /// The response object (`chat.completion` or `text_completion`), or the error that
    /// ended a choice.
    pub fn finish(self) -> Result<Value, ApiError> {
        let (meta, choices) = (self.meta, self.choices);
        if let Some(msg) = choices.iter().find_map(|c| c.failed.clone()) {
            log_request(&meta, &choices, 500);
            return Err(ApiError::Internal(msg));
        }
        if choices.iter().any(|c| c.summary.is_none()) {
            log_request(&meta, &choices, 500);
            return Err(ApiError::Internal(
                "the engine stopped before the reply was complete".into(),
            ));
        }
        let tok = Some(self.model);
        let out: Vec<Value> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let reason = c.summary.as_ref().map(|s| finish_reason(s.stop));
                match meta.kind {
                    Kind::Chat => {
                        let (message, reason) = match meta.calls {
                            Some(syntax) => {
                                let (m, made) = toolcalls::message(syntax, &c.text, &meta.id, i);
                                (m, reason.map(|r| toolcalls::finish_reason(r, made)))
                            }
                            None => (json!({"role": "assistant", "content": c.text}), reason),
                        };
                        json!({
                            "index": i,
                            "message": message,
                            "logprobs": tok.as_ref().filter(|_| !c.logprobs.is_empty()).map(|m| json!({"content": chat_logprobs(m, &c.logprobs)})),
                            "finish_reason": reason,
                        })
                    }
                    Kind::Completion { n } => {
                        let (text, lp) = completion_text(tok.as_deref(), &meta, i / n, c);
                        json!({"index": i, "text": text, "logprobs": lp, "finish_reason": reason})
                    }
                }
            })
            .collect();
        log_request(&meta, &choices, 200);
        let object = match meta.kind {
            Kind::Chat => "chat.completion",
            Kind::Completion { .. } => "text_completion",
        };
        Ok(json!({
            "id": meta.id,
            "object": object,
            "created": meta.created,
            "model": meta.model,
            "choices": out,
            "usage": usage(&choices, meta.per_prompt()),
        }))
    }
}
