//! Benchmark evaluation by log-likelihood, scored as lm-evaluation-harness does
//! (`lm_eval/api/task.py`, `TemplateLM._encode_pair`): HellaSwag, PIQA, ARC-Easy,
//! ARC-Challenge, BoolQ, WinoGrande and LAMBADA (OpenAI), read from the JSON Lines files
//! described in `shared/evals/README.md`.
//!
//! - A request is a `(context, continuation)` pair. Trailing whitespace of the context moves
//!   to the continuation; `whole = tok(context + continuation)` and `ctx = tok(context)`,
//!   both with BOS, and the continuation's tokens are `whole[len(ctx)..]`.
//! - Its log-likelihood is the sum of the continuation tokens' log-probabilities; it is
//!   *greedy* when every continuation token is the argmax (first index on ties).
//! - `acc` compares `argmax LL` with the gold choice, `acc_norm` `argmax LL / len`, where
//!   `len` counts the characters of the choice without its leading space; LAMBADA's `acc`
//!   is `is_greedy` and its perplexity `exp(-mean LL)`.
//! - Few-shot examples come from the same file, leaving the item itself out, drawn with a
//!   seed per item (SplitMix64 of `seed` and the item's position), so a result does not
//!   depend on `--limit`, the order of scoring or an interrupted run.
//!
//! The requests of one item run as one prefix (their longest common token prefix, usually
//! the whole context) followed by each request's remaining tokens, rewinding the KV cache
//! between them; the decoder's rows do not depend on how a sequence is batched, so this
//! gives the same numbers as running each request alone.

use crate::EvalError;
use gemma3_engine::Model;
use gemma3_model::text::Stage;
use gemma3_model::{KvCache, Logits, Workspace, MAX_BATCH};
use rayon::prelude::*;
use serde::Serialize;
use std::path::Path;

/// The benchmarks this harness knows, named as lm-evaluation-harness names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Task {
    Hellaswag,
    Piqa,
    ArcEasy,
    ArcChallenge,
    Boolq,
    Winogrande,
    LambadaOpenai,
}

/// How a task's items are laid out (see the evals README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Schema {
    /// `{"id", "context", "choices": [..], "gold"}`: one request per choice.
    MultipleChoice,
    /// `{"id", "contexts": [..], "continuation", "gold"}` (WinoGrande's partial scoring):
    /// one request per context, the continuation shared.
    PartialContexts,
    /// `{"id", "context", "continuation"}` (LAMBADA): one request.
    Completion,
}

impl Task {
    pub const ALL: [Task; 7] = [
        Task::Hellaswag,
        Task::Piqa,
        Task::ArcEasy,
        Task::ArcChallenge,
        Task::Boolq,
        Task::Winogrande,
        Task::LambadaOpenai,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Task::Hellaswag => "hellaswag",
            Task::Piqa => "piqa",
            Task::ArcEasy => "arc_easy",
            Task::ArcChallenge => "arc_challenge",
            Task::Boolq => "boolq",
            Task::Winogrande => "winogrande",
            Task::LambadaOpenai => "lambada_openai",
        }
    }

    /// The task called `name` (lm-eval's names; `lambada` is accepted for `lambada_openai`).
    pub fn from_name(name: &str) -> Result<Task, EvalError> {
        let n = name.trim().to_ascii_lowercase().replace('-', "_");
        if n == "lambada" {
            return Ok(Task::LambadaOpenai);
        }
        Task::ALL
            .into_iter()
            .find(|t| t.name() == n)
            .ok_or_else(|| {
                EvalError::Input(format!(
                    "unknown task {name:?}; known tasks: {}",
                    Task::ALL.map(|t| t.name()).join(", ")
                ))
            })
    }

    pub fn schema(self) -> Schema {
        match self {
            Task::Winogrande => Schema::PartialContexts,
            Task::LambadaOpenai => Schema::Completion,
            _ => Schema::MultipleChoice,
        }
    }

    /// Whether lm-eval reports `acc_norm` for this task (HellaSwag, PIQA, ARC).
    pub fn has_acc_norm(self) -> bool {
        matches!(
            self,
            Task::Hellaswag | Task::Piqa | Task::ArcEasy | Task::ArcChallenge
        )
    }
}

impl std::fmt::Display for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One benchmark item as read from the data file.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub id: String,
    /// 1-based line in the data file (for messages).
    pub line: usize,
    pub data: ItemData,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemData {
    MultipleChoice {
        context: String,
        choices: Vec<String>,
        gold: usize,
    },
    PartialContexts {
        contexts: Vec<String>,
        continuation: String,
        gold: usize,
    },
    Completion {
        context: String,
        continuation: String,
    },
}

impl Item {
    pub fn gold(&self) -> Option<usize> {
        match &self.data {
            ItemData::MultipleChoice { gold, .. } | ItemData::PartialContexts { gold, .. } => {
                Some(*gold)
            }
            ItemData::Completion { .. } => None,
        }
    }

    /// The item with its answer, as a few-shot example: `context + choices[gold]`
    /// (WinoGrande: `contexts[gold] + continuation`; LAMBADA: `context + continuation`).
    pub fn as_shot(&self) -> String {
        match &self.data {
            ItemData::MultipleChoice {
                context,
                choices,
                gold,
            } => format!("{context}{}", choices[*gold]),
            ItemData::PartialContexts {
                contexts,
                continuation,
                gold,
            } => format!("{}{continuation}", contexts[*gold]),
            ItemData::Completion {
                context,
                continuation,
            } => format!("{context}{continuation}"),
        }
    }

    /// The item's `(context, continuation)` requests, each context preceded by `prefix`
    /// (the few-shot examples, or "").
    pub fn requests(&self, prefix: &str) -> Vec<(String, String)> {
        match &self.data {
            ItemData::MultipleChoice {
                context, choices, ..
            } => choices
                .iter()
                .map(|c| (format!("{prefix}{context}"), c.clone()))
                .collect(),
            ItemData::PartialContexts {
                contexts,
                continuation,
                ..
            } => contexts
                .iter()
                .map(|c| (format!("{prefix}{c}"), continuation.clone()))
                .collect(),
            ItemData::Completion {
                context,
                continuation,
            } => vec![(format!("{prefix}{context}"), continuation.clone())],
        }
    }

    /// Lengths `acc_norm` divides by: the characters of each choice without its leading
    /// space (at least 1). None for schemas without choices.
    pub fn choice_lengths(&self) -> Option<Vec<usize>> {
        match &self.data {
            ItemData::MultipleChoice { choices, .. } => Some(
                choices
                    .iter()
                    .map(|c| c.strip_prefix(' ').unwrap_or(c).chars().count().max(1))
                    .collect(),
            ),
            _ => None,
        }
    }
}

fn input_err(msg: String) -> EvalError {
    EvalError::Input(msg)
}

/// Reads a task's JSON Lines file. Every problem is reported with the file and line:
/// unreadable file, invalid JSON, a field missing or of the wrong type, a gold index out of
/// range, duplicate ids, an id of another task, or no items at all.
pub fn load_items(task: Task, path: &Path) -> Result<Vec<Item>, EvalError> {
    let text = gemma3_formats::read_text(path, gemma3_formats::MAX_TEXT_BYTES)
        .map_err(|e| input_err(format!("the {task} data file: {e}")))?;
    parse_items(task, &text, &path.display().to_string())
}

/// [`load_items`] on text already read; `source` names it in messages.
pub fn parse_items(task: Task, text: &str, source: &str) -> Result<Vec<Item>, EvalError> {
    let mut items = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        let at = |msg: String| input_err(format!("{source}:{line}: {msg}"));
        let v: serde_json::Value =
            serde_json::from_str(raw).map_err(|e| at(format!("not valid JSON ({e})")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| at("expected a JSON object, one item per line".into()))?;
        let schema_hint = match task.schema() {
            Schema::MultipleChoice => {
                r#"{"id": str, "context": str, "choices": [str, ...], "gold": int}"#
            }
            Schema::PartialContexts => {
                r#"{"id": str, "contexts": [str, ...], "continuation": str, "gold": int}"#
            }
            Schema::Completion => r#"{"id": str, "context": str, "continuation": str}"#,
        };
        let field = |name: &str| {
            obj.get(name).ok_or_else(|| {
                at(format!(
                    "missing field {name:?}; {task} items look like {schema_hint}"
                ))
            })
        };
        let string = |name: &str| -> Result<String, EvalError> {
            field(name)?
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| at(format!("field {name:?} must be a string")))
        };
        let strings = |name: &str| -> Result<Vec<String>, EvalError> {
            let arr = field(name)?
                .as_array()
                .ok_or_else(|| at(format!("field {name:?} must be a list of strings")))?;
            let out: Option<Vec<String>> =
                arr.iter().map(|x| x.as_str().map(str::to_string)).collect();
            let out = out.ok_or_else(|| at(format!("field {name:?} must be a list of strings")))?;
            if out.len() < 2 {
                return Err(at(format!(
                    "field {name:?} needs at least 2 entries, has {}",
                    out.len()
                )));
            }
            Ok(out)
        };
        let gold = |n: usize| -> Result<usize, EvalError> {
            let g = field("gold")?
                .as_u64()
                .ok_or_else(|| at("field \"gold\" must be a non-negative integer".into()))?;
            if g as usize >= n {
                return Err(at(format!(
                    "gold index {g} is out of range for {n} choices"
                )));
            }
            Ok(g as usize)
        };
        let id = match field("id")? {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Number(n) => n.to_string(),
            _ => return Err(at("field \"id\" must be a string".into())),
        };
        let data = match task.schema() {
            Schema::MultipleChoice => {
                let choices = strings("choices")?;
                ItemData::MultipleChoice {
                    context: string("context")?,
                    gold: gold(choices.len())?,
                    choices,
                }
            }
            Schema::PartialContexts => {
                let contexts = strings("contexts")?;
                ItemData::PartialContexts {
                    gold: gold(contexts.len())?,
                    contexts,
                    continuation: string("continuation")?,
                }
            }
            Schema::Completion => ItemData::Completion {
                context: string("context")?,
                continuation: string("continuation")?,
            },
        };
        // An id of another task means the wrong file was given.
        if let Some(other) = Task::ALL.into_iter().find(|t| {
            *t != task
                && id.starts_with(&format!("{}-", t.name()))
                && !id.starts_with(&format!("{}-", task.name()))
        }) {
            return Err(at(format!(
                "item {id:?} belongs to task {other}, not {task}: is this the right --data file?"
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(at(format!("duplicate id {id:?}")));
        }
        items.push(Item { id, line, data });
    }
    if items.is_empty() {
        return Err(input_err(format!("{source}: no items (the file is empty)")));
    }
    Ok(items)
}

/// SplitMix64, as the sampler uses.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Positions of the `shots` examples for item `index` among `n_items`: distinct, never
/// `index` itself, in drawing order. Depends only on `(n_items, index, shots, seed)`.
pub fn shot_indices(n_items: usize, index: usize, shots: usize, seed: u64) -> Vec<usize> {
    let pool = n_items.saturating_sub(1);
    let k = shots.min(pool);
    let mut state = seed ^ (index as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93);
    // Partial Fisher-Yates over the virtual list of all positions but `index`.
    let mut swapped: std::collections::HashMap<usize, usize> = Default::default();
    let mut out = Vec::with_capacity(k);
    for i in 0..k {
        let j = i + (splitmix(&mut state) % (pool - i) as u64) as usize;
        let vj = *swapped.get(&j).unwrap_or(&j);
        let vi = *swapped.get(&i).unwrap_or(&i);
        swapped.insert(j, vi);
        out.push(if vj >= index { vj + 1 } else { vj });
    }
    out
}

/// The few-shot prefix of item `index`: its examples joined with "\n\n", then "\n\n"
/// (empty for 0 shots).
pub fn fewshot_prefix(items: &[Item], index: usize, shots: usize, seed: u64) -> String {
    let mut s = String::new();
    for j in shot_indices(items.len(), index, shots, seed) {
        s.push_str(&items[j].as_shot());
        s.push_str("\n\n");
    }
    s
}

/// Python's `str.isspace`, which `str.rstrip()` uses (Unicode White_Space plus the
/// separators U+001C..U+001F).
fn py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// lm-eval's `_encode_pair` with BOS: trailing whitespace of the context moves to the
/// continuation, then `whole = tok(context + continuation)`, `ctx = tok(context)`, and the
/// continuation's tokens are `whole[len(ctx)..]`. Returns `(context_ids, continuation_ids)`.
pub fn encode_pair(model: &Model, context: &str, continuation: &str) -> (Vec<u32>, Vec<u32>) {
    let ctx = context.trim_end_matches(py_space);
    let cont = format!("{}{continuation}", &context[ctx.len()..]);
    let tok = &model.tokenizer;
    let whole = tok.encode(&format!("{ctx}{cont}"), true, true);
    let ctx_ids = tok.encode(ctx, true, true);
    let cont_ids = whole.get(ctx_ids.len()..).unwrap_or(&[]).to_vec();
    (ctx_ids, cont_ids)
}

/// The score of one request.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct LogLik {
    /// Sum of the continuation tokens' log-probabilities (nats).
    pub loglik: f64,
    pub n_tokens: usize,
    /// Every continuation token was the most likely one.
    pub is_greedy: bool,
}

/// Runs requests through a model, reusing one KV cache and workspace.
pub struct Scorer<'m> {
    pub model: &'m Model,
    cache: KvCache,
    ws: Workspace,
    /// Final-norm hidden states of the rows to score, `rows × hidden`.
    hidden: Vec<f32>,
    /// For each of those rows, the `(request, target token)` pairs it scores.
    owners: Vec<Vec<(usize, u32)>>,
    logits: Vec<f32>,
}

/// Rows per output-projection call: the projection matrix (the largest of the model) is
/// decoded once per call, so an item's rows, from all its requests, go through together.
const PROJECT_GROUP: usize = 64;

impl<'m> Scorer<'m> {
    pub fn new(model: &'m Model) -> Self {
        let cfg = &model.text.cfg;
        let context = 2048.min(cfg.max_position_embeddings);
        Scorer {
            model,
            cache: model.text.new_cache(context, MAX_BATCH),
            ws: Workspace::new(cfg, MAX_BATCH),
            hidden: Vec::new(),
            owners: Vec::new(),
            logits: Vec::new(),
        }
    }

    fn ensure_context(&mut self, needed: usize) -> Result<(), EvalError> {
        let max = self.model.text.cfg.max_position_embeddings;
        if needed > max {
            return Err(EvalError::Input(format!(
                "a request has {needed} tokens, more than the model's context of {max}"
            )));
        }
        if needed > self.cache.context() {
            let ctx = needed.next_power_of_two().min(max);
            self.cache = self.model.text.new_cache(ctx, MAX_BATCH);
        }
        Ok(())
    }

    /// Runs `tokens` at the cache's position and keeps the final-norm hidden state of each
    /// row `r` for which `owners_of(r)` names requests to score.
    fn run(
        &mut self,
        tokens: &[u32],
        owners_of: &(dyn Fn(usize) -> Vec<(usize, u32)> + Sync),
    ) -> Result<(), EvalError> {
        let h = self.model.text.cfg.hidden_size;
        let (hidden, owners) = (&mut self.hidden, &mut self.owners);
        let mut offset = 0;
        let mut trace = |stage: Stage, x: &[f32]| {
            if stage != Stage::FinalNorm {
                return;
            }
            let n = x.len() / h;
            for t in 0..n {
                let o = owners_of(offset + t);
                if !o.is_empty() {
                    hidden.extend_from_slice(&x[t * h..(t + 1) * h]);
                    owners.push(o);
                }
            }
            offset += n;
        };
        self.model.text.forward_traced(
            tokens,
            &mut self.cache,
            &mut self.ws,
            Logits::None,
            &mut |_, _| {},
            Some(&mut trace as &mut (dyn FnMut(Stage, &[f32]) + Send)),
        )?;
        Ok(())
    }

    /// Scores `(context_ids, continuation_ids)` pairs (context ids include BOS). The
    /// requests' longest common prefix is run once; each request's remaining tokens follow
    /// it with the cache rewound to the prefix; then the rows to score, from all requests,
    /// go through the output projection together. Every row gives the numbers it would
    /// give with each request run alone.
    pub fn score(&mut self, reqs: &[(Vec<u32>, Vec<u32>)]) -> Result<Vec<LogLik>, EvalError> {
        let mut out = vec![
            LogLik {
                loglik: 0.0,
                n_tokens: 0,
                is_greedy: true,
            };
            reqs.len()
        ];
        // Model input (context + continuation)[..-1]; rows ctx-1 .. end predict the
        // continuation.
        let mut inputs: Vec<Vec<u32>> = Vec::with_capacity(reqs.len());
        let mut live: Vec<usize> = Vec::new();
        for (i, (c, k)) in reqs.iter().enumerate() {
            if c.is_empty() && !k.is_empty() {
                return Err(EvalError::Input(
                    "a request's context has no tokens (not even BOS)".into(),
                ));
            }
            let mut s = c.clone();
            s.extend_from_slice(k);
            s.pop();
            if !k.is_empty() {
                live.push(i);
            }
            inputs.push(s);
        }
        if live.is_empty() {
            return Ok(out);
        }
        let longest = live.iter().map(|&i| inputs[i].len()).max().unwrap_or(0);
        self.ensure_context(longest)?;
        // Longest common prefix of the live inputs.
        let first = &inputs[live[0]];
        let mut p = first.len();
        for &i in &live[1..] {
            p = p.min(
                first
                    .iter()
                    .zip(&inputs[i])
                    .take_while(|(a, b)| a == b)
                    .count(),
            );
        }
        // Target of row `r` for request `i`, if that row is scored.
        let target = |i: usize, r: usize| -> Option<u32> {
            let (c, k) = &reqs[i];
            let lo = c.len() - 1;
            (r >= lo && r < lo + k.len()).then(|| k[r - lo])
        };
        self.hidden.clear();
        self.owners.clear();

        // The shared prefix, with the rows any request scores in it.
        self.cache.clear();
        self.run(&first[..p], &|r| {
            live.iter()
                .filter_map(|&i| target(i, r).map(|t| (i, t)))
                .collect()
        })?;
        // Each request's own tail.
        for &i in &live {
            let inp = &inputs[i];
            if inp.len() == p {
                continue;
            }
            let start = if self.cache.truncate(p) {
                p
            } else {
                // The rings have wrapped past the prefix: run this request whole.
                self.cache.clear();
                0
            };
            self.run(&inp[start..], &|r| {
                let r = r + start;
                match target(i, r) {
                    Some(t) if r >= p => vec![(i, t)],
                    _ => vec![],
                }
            })?;
        }
        self.project(&mut out);
        Ok(out)
    }

    /// The output projection of the kept rows, as the decoder computes it (final-norm rows
    /// times the projection, then soft-capping), and each row's log-probabilities.
    fn project(&mut self, out: &mut [LogLik]) {
        let text = &self.model.text;
        let h = text.cfg.hidden_size;
        let vocab = text.cfg.vocab_size;
        let rows = self.owners.len();
        let group = rows.min(PROJECT_GROUP);
        if self.logits.len() < group * vocab {
            self.logits.resize(group * vocab, 0.0);
        }
        for g0 in (0..rows).step_by(PROJECT_GROUP) {
            let m = (rows - g0).min(PROJECT_GROUP);
            let logits = &mut self.logits[..m * vocab];
            text.project(&self.hidden[g0 * h..(g0 + m) * h], m, logits);
            let stats: Vec<RowStats> = logits.par_chunks(vocab).map(RowStats::of).collect();
            for (k, st) in stats.iter().enumerate() {
                let l = &logits[k * vocab..(k + 1) * vocab];
                for &(i, t) in &self.owners[g0 + k] {
                    st.add(l, t, &mut out[i]);
                }
            }
        }
    }
}

/// `log Σ exp(logits)` and the argmax (first index on ties) of one row.
struct RowStats {
    lse: f64,
    argmax: usize,
}

impl RowStats {
    fn of(l: &[f32]) -> RowStats {
        let mut argmax = 0;
        let mut max = f32::NEG_INFINITY;
        for (j, &v) in l.iter().enumerate() {
            if v > max {
                max = v;
                argmax = j;
            }
        }
        // exp in f32 (as a float32 log_softmax does), summed in f64 over 8 lanes.
        let mut acc = [0.0f64; 8];
        let chunks = l.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += (v - max).exp() as f64;
            }
        }
        let mut sum: f64 = acc.iter().sum();
        for &v in rest {
            sum += (v - max).exp() as f64;
        }
        RowStats {
            lse: max as f64 + sum.ln(),
            argmax,
        }
    }

    fn add(&self, l: &[f32], target: u32, o: &mut LogLik) {
        o.loglik += l[target as usize] as f64 - self.lse;
        o.n_tokens += 1;
        o.is_greedy &= self.argmax == target as usize;
    }
}

/// The result of one item, as written to the JSON output.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// Per request (choice, context or the one completion).
    pub logliks: Vec<f64>,
    pub n_tokens: Vec<usize>,
    pub is_greedy: Vec<bool>,
    /// `argmax LL` (None for LAMBADA).
    pub pred: Option<usize>,
    /// `argmax LL / len` (None where the task has no acc_norm).
    pub pred_norm: Option<usize>,
    pub gold: Option<usize>,
    /// 1 or 0 (LAMBADA: is_greedy).
    pub acc: f64,
    pub acc_norm: Option<f64>,
}

/// First index of the largest value (Python's `max`/`np.argmax` on ties).
pub fn argmax_first(xs: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// The tokenized requests of item `index` with its few-shot prefix.
pub fn item_requests(
    model: &Model,
    items: &[Item],
    index: usize,
    shots: usize,
    seed: u64,
) -> Vec<(Vec<u32>, Vec<u32>)> {
    let prefix = fewshot_prefix(items, index, shots, seed);
    items[index]
        .requests(&prefix)
        .iter()
        .map(|(c, k)| encode_pair(model, c, k))
        .collect()
}

/// Scores item `index` of `items` (the whole file, where shots are drawn from).
pub fn score_item(
    scorer: &mut Scorer<'_>,
    task: Task,
    items: &[Item],
    index: usize,
    shots: usize,
    seed: u64,
) -> Result<ItemResult, EvalError> {
    let item = &items[index];
    let reqs = item_requests(scorer.model, items, index, shots, seed);
    let lls = scorer
        .score(&reqs)
        .map_err(|e| EvalError::Input(format!("item {} (line {}): {e}", item.id, item.line)))?;
    Ok(item_result(task, item, &lls))
}

/// Turns an item's request scores into predictions and per-item metrics.
pub fn item_result(task: Task, item: &Item, lls: &[LogLik]) -> ItemResult {
    let logliks: Vec<f64> = lls.iter().map(|l| l.loglik).collect();
    let gold = item.gold();
    let (pred, pred_norm, acc, acc_norm) = match &item.data {
        ItemData::Completion { .. } => (None, None, lls[0].is_greedy as u8 as f64, None),
        _ => {
            let pred = argmax_first(&logliks);
            let g = gold.unwrap_or(usize::MAX);
            let pred_norm = if task.has_acc_norm() {
                item.choice_lengths().map(|lens| {
                    let normed: Vec<f64> = logliks
                        .iter()
                        .zip(&lens)
                        .map(|(l, &n)| l / n as f64)
                        .collect();
                    argmax_first(&normed)
                })
            } else {
                None
            };
            (
                Some(pred),
                pred_norm,
                (pred == g) as u8 as f64,
                pred_norm.map(|p| (p == g) as u8 as f64),
            )
        }
    };
    ItemResult {
        id: item.id.clone(),
        logliks,
        n_tokens: lls.iter().map(|l| l.n_tokens).collect(),
        is_greedy: lls.iter().map(|l| l.is_greedy).collect(),
        pred,
        pred_norm,
        gold,
        acc,
        acc_norm,
    }
}

/// lm-eval's `mean_stderr`: the sample standard deviation (n − 1) over √n.
pub fn mean_stderr(xs: &[f64]) -> f64 {
    let n = xs.len();
    if n < 2 {
        return 0.0;
    }
    let mean = xs.iter().sum::<f64>() / n as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var / n as f64).sqrt()
}

/// Aggregate metrics of a run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub task: String,
    pub n: usize,
    pub shots: usize,
    pub seed: u64,
    pub acc: f64,
    pub acc_stderr: f64,
    pub acc_norm: Option<f64>,
    pub acc_norm_stderr: Option<f64>,
    /// LAMBADA: `exp(-mean LL)` over items.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl: Option<f64>,
    /// LAMBADA: delta-method standard error of the perplexity (`ppl · stderr(LL)`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ppl_stderr: Option<f64>,
}

pub fn summarize(task: Task, shots: usize, seed: u64, results: &[ItemResult]) -> Summary {
    let n = results.len();
    let mean = |xs: &[f64]| {
        if xs.is_empty() {
            f64::NAN
        } else {
            xs.iter().sum::<f64>() / xs.len() as f64
        }
    };
    let acc: Vec<f64> = results.iter().map(|r| r.acc).collect();
    let norm: Vec<f64> = results.iter().filter_map(|r| r.acc_norm).collect();
    let has_norm = task.has_acc_norm() && norm.len() == n && n > 0;
    let (ppl, ppl_stderr) = if task.schema() == Schema::Completion {
        let ll: Vec<f64> = results.iter().map(|r| r.logliks[0]).collect();
        let ppl = (-mean(&ll)).exp();
        (Some(ppl), Some(ppl * mean_stderr(&ll)))
    } else {
        (None, None)
    };
    Summary {
        task: task.name().to_string(),
        n,
        shots,
        seed,
        acc: mean(&acc),
        acc_stderr: mean_stderr(&acc),
        acc_norm: has_norm.then(|| mean(&norm)),
        acc_norm_stderr: has_norm.then(|| mean_stderr(&norm)),
        ppl,
        ppl_stderr,
    }
}

/// Options of a whole run.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub shots: usize,
    /// Score only the first `limit` items of the file (shots still come from all of it).
    pub limit: Option<usize>,
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions {
            shots: 0,
            limit: None,
            seed: DEFAULT_SEED,
        }
    }
}

/// lm-eval's few-shot seed.
pub const DEFAULT_SEED: u64 = 1234;

/// Scores the first `limit` items of `items`, skipping those whose id `done` says were
/// scored already, and calls `on_item` with each new result as it finishes (return an
/// error to stop). Returns the new results in item order.
pub fn evaluate(
    model: &Model,
    task: Task,
    items: &[Item],
    opts: &EvalOptions,
    done: &dyn Fn(&str) -> bool,
    on_item: &mut dyn FnMut(&ItemResult) -> Result<(), EvalError>,
) -> Result<Vec<ItemResult>, EvalError> {
    let n = opts.limit.unwrap_or(items.len()).min(items.len());
    let mut scorer = Scorer::new(model);
    let mut out = Vec::new();
    for index in 0..n {
        if done(&items[index].id) {
            continue;
        }
        let r = score_item(&mut scorer, task, items, index, opts.shots, opts.seed)?;
        on_item(&r)?;
        out.push(r);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shots_are_distinct_and_leave_the_item_out() {
        for n in [2, 3, 10, 50] {
            for idx in 0..n {
                for k in [0, 1, 5, 25] {
                    let s = shot_indices(n, idx, k, 1234);
                    assert_eq!(s.len(), k.min(n - 1));
                    assert!(!s.contains(&idx));
                    let mut d = s.clone();
                    d.sort();
                    d.dedup();
                    assert_eq!(d.len(), s.len());
                    assert!(s.iter().all(|&j| j < n));
                    assert_eq!(s, shot_indices(n, idx, k, 1234));
                }
            }
        }
        assert_ne!(shot_indices(100, 0, 5, 1), shot_indices(100, 0, 5, 2));
    }

    #[test]
    fn stderr_is_lm_evals() {
        let xs = [1.0, 0.0, 1.0, 1.0];
        // sample std = sqrt(0.25 * 4/3) = 0.5; / sqrt(4)
        assert!((mean_stderr(&xs) - 0.25).abs() < 1e-12);
    }

    #[test]
    fn parse_errors_name_source_and_line() {
        let good = r#"{"id": "piqa-0", "context": "Q", "choices": [" a", " b"], "gold": 1}"#;
        let e = parse_items(Task::Piqa, &format!("{good}\n{{oops"), "f.jsonl").unwrap_err();
        assert!(
            e.to_string().starts_with("f.jsonl:2: not valid JSON"),
            "{e}"
        );
        let e = parse_items(Task::Winogrande, good, "w.jsonl").unwrap_err();
        assert!(e.to_string().contains("w.jsonl:1: "), "{e}");
        let e = parse_items(
            Task::Piqa,
            r#"{"id": "piqa-0", "context": "Q", "choices": [" a", " b"], "gold": 2}"#,
            "f",
        )
        .unwrap_err();
        assert!(e.to_string().contains("out of range"), "{e}");
        assert!(parse_items(Task::Piqa, "\n", "f").is_err());
        let items = parse_items(Task::Piqa, good, "f").unwrap();
        assert_eq!(items[0].choice_lengths(), Some(vec![1, 1]));
    }
}
