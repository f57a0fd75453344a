//! The Gemma 3 text decoder on CPU. One forward pass takes a batch of chunks of several
//! sequences (a prompt chunk, a decode step's single token…), each at its own positions and
//! with its own [`KvCache`]: the matrix products run once over every row, attention runs
//! per sequence against its cache, and logits are produced only for the rows asked for. A
//! row's result does not depend on what else is in the batch.
//!
//! The pass reads as its stages: [`TextModel::embed`], then per layer
//! [`TextModel::attention`] and [`TextModel::mlp`], then [`TextModel::logits`].
//!
//! Per layer (fixtures README, items 1-8): `x += post_attn_norm(attn(input_norm(x)))`,
//! `x += post_ffn_norm(mlp(pre_ffn_norm(x)))`; attention applies q/k RMSNorm per head
//! before NeoX RoPE, scales scores by `query_pre_attn_scalar^-0.5`, and sliding layers see
//! keys `j` with `i - W < j <= i`.

use crate::cache::{KvCache, KvTypes};
use crate::weights::{LayerWeights, TextWeights};
use crate::{LayerKind, ModelError, TextConfig};
use gemma3_kernels::attention::{attend_batch, AttnScratch, Heads, Scores, TILE_MIN_ROWS};
use gemma3_kernels::ops::{
    gelu_gate, gelu_gate_f16, rms_norm, rms_norm_inplace, rms_norm_rows, rope_cos_sin,
    rope_inv_freq, rope_neox, round_to_f16,
};
use gemma3_kernels::{matmul_multi, matmul_weights, team, Precision};
use rayon::prelude::*;
use std::ops::Range;

/// Which rows of a batch get logits.
#[derive(Clone, Copy, Debug)]
pub enum Logits<'a> {
    None,
    Last,
    All,
    /// Rows (indices into the tokens passed to `forward`), ascending.
    Rows(&'a [usize]),
}

/// Where a traced forward pass is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The scaled embeddings.
    Embedding,
    /// The residual stream after layer `i`.
    Layer(usize),
    /// After the final norm.
    FinalNorm,
}

/// Image inputs of a multimodal batch. Each contiguous run of `image_token` in the tokens is
/// one image block: its rows take the next `hidden`-sized rows of `embeds` (projector
/// outputs, not scaled), and in the prefill its tokens attend to each other both ways
/// (fixtures README, item 9). Earlier images stay causal; text never sees later images.
#[derive(Clone, Copy, Debug, Default)]
pub struct ImageInputs<'a> {
    pub image_token: u32,
    /// `n_image_tokens × hidden` values, in the order the image tokens appear.
    pub embeds: &'a [f32],
}

/// The keys query `i` attends to: `j > i - window` (sliding layers) and `j < reach`, where
/// `reach` is `i + 1` (causal) or the end of `i`'s image block (bidirectional within an
/// image). The rule of fixtures README item 9; the forward pass and [`attention_mask`]
/// both use it.
pub fn key_range(i: usize, reach: usize, window: Option<usize>) -> std::ops::Range<usize> {
    let lo = window.map_or(0, |w| (i + 1).saturating_sub(w));
    lo..reach.max(i + 1)
}

/// The prefill attention mask of `tokens` for one layer kind (`mask[i][j]`: query `i` may
/// see key `j`), with image blocks made of runs of `image_token`.
pub fn attention_mask(
    tokens: &[u32],
    image_token: Option<u32>,
    window: Option<usize>,
) -> Vec<Vec<bool>> {
    let n = tokens.len();
    let is_img = |t: usize| image_token.is_some_and(|it| tokens[t] == it);
    let mut reach: Vec<usize> = (1..=n).collect();
    let mut t = 0;
    while t < n {
        if is_img(t) {
            let b0 = t;
            while t < n && is_img(t) {
                t += 1;
            }
            reach[b0..t].fill(t);
        } else {
            t += 1;
        }
    }
    (0..n)
        .map(|i| {
            let r = key_range(i, reach[i], window);
            (0..n).map(|j| r.contains(&j)).collect()
        })
        .collect()
}

/// One sequence's part of a forward pass: `tokens` at positions `cache.len() ..`.
pub struct SeqChunk<'a> {
    pub tokens: &'a [u32],
    /// The projector rows of the image tokens among `tokens` (an image block is never
    /// split across chunks: see [`chunk_end`]).
    pub images: Option<ImageInputs<'a>>,
    pub cache: &'a mut KvCache,
    /// Which rows get logits. Row numbers (in `Rows` and in the callback) count from
    /// `row_base`: a prompt split into chunks keeps the numbering of the whole prompt.
    pub logits: Logits<'a>,
    pub row_base: usize,
}

impl<'a> SeqChunk<'a> {
    pub fn new(tokens: &'a [u32], cache: &'a mut KvCache, logits: Logits<'a>) -> Self {
        SeqChunk {
            tokens,
            images: None,
            cache,
            logits,
            row_base: 0,
        }
    }
}

/// Where a chunk of `tokens` starting at `start` ends: at most `max` tokens, never inside
/// an image block (its tokens see each other, so they go through one pass).
pub fn chunk_end(
    tokens: &[u32],
    start: usize,
    max: usize,
    image_token: Option<u32>,
) -> Result<usize, ModelError> {
    let n_all = tokens.len();
    let end = (start + max.max(1)).min(n_all);
    let is_img = |t: usize| image_token.is_some_and(|it| tokens[t] == it);
    if end < n_all && is_img(end) && is_img(end - 1) {
        let mut b = end - 1;
        while b > start && is_img(b - 1) {
            b -= 1;
        }
        if b == start {
            return Err(ModelError::Input(format!(
                "an image block longer than the chunk size ({max}) cannot be processed"
            )));
        }
        return Ok(b);
    }
    Ok(end)
}

/// Rows of logits computed per output-projection call: the projection is decoded once per
/// group, so larger groups are faster but hold `LOGIT_GROUP × vocab` floats.
const LOGIT_GROUP: usize = 32;

/// Buffers for one forward pass of up to `max_batch` rows, allocated once.
pub struct Workspace {
    pub max_batch: usize,
    x: Vec<f32>,
    xn: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    attn: Vec<f32>,
    o: Vec<f32>,
    gate: Vec<f32>,
    up: Vec<f32>,
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
    cos_global: Vec<f32>,
    sin_global: Vec<f32>,
    final_rows: Vec<f32>,
    logits: Vec<f32>,
    /// Per row: its position, and one past the last key it may see (its image block's end,
    /// or itself).
    pos: Vec<usize>,
    reach: Vec<usize>,
    /// Per row, the keys it sees in sliding and in full layers.
    keys_local: Vec<Range<usize>>,
    keys_global: Vec<Range<usize>>,
    /// Per sequence of the batch, its rows.
    segments: Vec<Range<usize>>,
    /// Rows that want logits.
    want: Vec<usize>,
    attn_scratch: AttnScratch,
    /// One stored row of a tied embedding, read back from the packed output projection.
    embed_row: Vec<u8>,
}

impl Workspace {
    pub fn new(cfg: &TextConfig, max_batch: usize) -> Self {
        let n = max_batch.max(1);
        let h = cfg.hidden_size;
        let qd = cfg.num_heads * cfg.head_dim;
        let kvd = cfg.num_kv_heads * cfg.head_dim;
        let half = cfg.head_dim / 2;
        let g = LOGIT_GROUP.min(n);
        Workspace {
            max_batch: n,
            x: vec![0.0; n * h],
            xn: vec![0.0; n * h],
            q: vec![0.0; n * qd],
            k: vec![0.0; n * kvd],
            v: vec![0.0; n * kvd],
            attn: vec![0.0; n * qd],
            o: vec![0.0; n * h],
            gate: vec![0.0; n * cfg.intermediate_size],
            up: vec![0.0; n * cfg.intermediate_size],
            cos_local: vec![0.0; n * half],
            sin_local: vec![0.0; n * half],
            cos_global: vec![0.0; n * half],
            sin_global: vec![0.0; n * half],
            final_rows: vec![0.0; g * h],
            logits: vec![0.0; g * cfg.vocab_size],
            pos: vec![0; n],
            reach: vec![0; n],
            keys_local: vec![0..0; n],
            keys_global: vec![0..0; n],
            segments: Vec::with_capacity(n),
            want: Vec::with_capacity(n),
            // A decode step of one sequence over the whole context allocates nothing;
            // batches of many decoding sequences grow the part buffers once.
            attn_scratch: AttnScratch::new(heads(cfg), 1, cfg.max_position_embeddings),
            embed_row: Vec::new(),
        }
    }

    pub fn bytes(&self) -> usize {
        4 * [
            &self.x,
            &self.xn,
            &self.q,
            &self.k,
            &self.v,
            &self.attn,
            &self.o,
            &self.gate,
            &self.up,
            &self.cos_local,
            &self.sin_local,
            &self.cos_global,
            &self.sin_global,
            &self.final_rows,
            &self.logits,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
            + self.attn_scratch.bytes()
    }
}

fn heads(cfg: &TextConfig) -> Heads {
    Heads {
        q: cfg.num_heads,
        kv: cfg.num_kv_heads,
        dim: cfg.head_dim,
    }
}

/// `f(t, a_t, b_t)` for each of `n` tokens' rows of `a` (width `wa`) and `b` (width `wb`):
/// across the pool for a prompt (rows are independent, so the split changes no result),
/// in place for a few tokens.
fn each_row(
    a: &mut [f32],
    wa: usize,
    b: &mut [f32],
    wb: usize,
    n: usize,
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Sync + Send,
) {
    a[..n * wa]
        .par_chunks_mut(wa)
        .zip(b[..n * wb].par_chunks_mut(wb))
        .enumerate()
        .with_min_len(if n >= 32 { 1 } else { n.max(1) })
        .for_each(|(t, (a, b))| f(t, a, b));
}

/// The logits callback of [`TextModel::forward_batch`]: `(sequence, row, logits)`.
pub type OnLogits<'a> = dyn FnMut(usize, usize, &[f32]) + Send + 'a;
/// The trace callback: each stage's hidden states, `rows × hidden` for the whole batch.
pub type OnStage<'a> = dyn FnMut(Stage, &[f32]) + Send + 'a;

pub struct TextModel {
    pub cfg: TextConfig,
    pub weights: TextWeights,
    /// How quantized weights are multiplied (8-bit activations by default).
    pub precision: Precision,
    /// How caches made by [`new_cache`](Self::new_cache) store keys and values (the
    /// precision's default when None).
    pub kv_types: Option<KvTypes>,
    inv_freq_local: Vec<f32>,
    inv_freq_global: Vec<f32>,
}

impl TextModel {
    pub fn new(cfg: TextConfig, weights: TextWeights) -> Self {
        let inv_freq_local = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, 1.0);
        let inv_freq_global = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor);
        TextModel {
            cfg,
            weights,
            precision: Precision::default(),
            kv_types: None,
            inv_freq_local,
            inv_freq_global,
        }
    }

    /// The key/value storage of new caches: as set, else the precision's default.
    pub fn kv_types(&self) -> KvTypes {
        self.kv_types
            .unwrap_or_else(|| KvTypes::for_precision(self.precision))
    }

    /// An empty cache (nothing allocated until used) for one sequence of up to `context`
    /// positions, appended in chunks of at most `max_chunk`.
    pub fn new_cache(&self, context: usize, max_chunk: usize) -> KvCache {
        KvCache::with_types(&self.cfg, context, max_chunk, self.kv_types())
    }

    /// Loads the text decoder of a GGUF file.
    pub fn from_gguf(g: &gemma3_formats::GgufFile) -> Result<Self, ModelError> {
        let cfg = TextConfig::from_gguf(g)?;
        let weights = TextWeights::load(&crate::WeightSource::Gguf(g), &cfg)?;
        Ok(Self::new(cfg, weights))
    }

    /// Loads the text decoder of a Hugging Face directory (text-only or multimodal).
    pub fn from_hf(d: &gemma3_formats::HfDirectory) -> Result<Self, ModelError> {
        let cfg = TextConfig::from_hf_json(&d.config)?;
        let weights = TextWeights::load(&crate::WeightSource::Hf(d), &cfg)?;
        Ok(Self::new(cfg, weights))
    }

    /// Runs `tokens` at positions `cache.len() ..`, appending their keys/values to the
    /// cache, and calls `on_logits(row, logits)` for each row `want` names, in order.
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        ws: &mut Workspace,
        want: Logits<'_>,
        on_logits: &mut (dyn FnMut(usize, &[f32]) + Send),
    ) -> Result<(), ModelError> {
        self.forward_traced(tokens, cache, ws, want, on_logits, None)
    }

    /// [`forward`](Self::forward), also showing each stage's hidden states
    /// (`rows × hidden`, one call per batch chunk) to `trace`.
    pub fn forward_traced(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        ws: &mut Workspace,
        want: Logits<'_>,
        on_logits: &mut (dyn FnMut(usize, &[f32]) + Send),
        trace: Option<&mut OnStage<'_>>,
    ) -> Result<(), ModelError> {
        self.forward_with(tokens, None, cache, ws, want, on_logits, trace)
    }

    /// One sequence, any length: [`forward_traced`](Self::forward_traced) plus images, in
    /// chunks of at most the workspace's and the cache's batch size.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        images: Option<ImageInputs<'_>>,
        cache: &mut KvCache,
        ws: &mut Workspace,
        want: Logits<'_>,
        on_logits: &mut (dyn FnMut(usize, &[f32]) + Send),
        mut trace: Option<&mut OnStage<'_>>,
    ) -> Result<(), ModelError> {
        let n_all = tokens.len();
        if cache.len() + n_all > cache.context() {
            return Err(ModelError::ContextOverflow {
                needed: cache.len() + n_all,
                context: cache.context(),
            });
        }
        let h = self.cfg.hidden_size;
        let image_token = images.map(|im| im.image_token);
        if let Some(im) = images {
            let n_img = tokens.iter().filter(|&&t| t == im.image_token).count();
            if im.embeds.len() != n_img * h {
                return Err(ModelError::Input(format!(
                    "the tokens hold {n_img} image tokens but {} image embeddings were given",
                    im.embeds.len() / h.max(1)
                )));
            }
        }
        let max = ws.max_batch.min(cache.max_chunk());
        let mut start = 0;
        let mut embeds_used = 0;
        while start < n_all {
            let end = chunk_end(tokens, start, max, image_token)?;
            let chunk = &tokens[start..end];
            let chunk_images = images.map(|im| {
                let k = chunk.iter().filter(|&&t| t == im.image_token).count();
                embeds_used += k;
                ImageInputs {
                    image_token: im.image_token,
                    embeds: &im.embeds[(embeds_used - k) * h..embeds_used * h],
                }
            });
            let logits = match want {
                Logits::None => Logits::None,
                Logits::Last if end == n_all => Logits::Last,
                Logits::Last => Logits::None,
                Logits::All => Logits::All,
                Logits::Rows(r) => {
                    let (a, b) = (
                        r.partition_point(|&i| i < start),
                        r.partition_point(|&i| i < end),
                    );
                    Logits::Rows(&r[a..b])
                }
            };
            let mut seq = [SeqChunk {
                tokens: chunk,
                images: chunk_images,
                cache: &mut *cache,
                logits,
                row_base: start,
            }];
            self.forward_batch(
                &mut seq,
                ws,
                &mut |_, row, l| on_logits(row, l),
                trace.as_deref_mut(),
            )?;
            start = end;
        }
        Ok(())
    }

    /// One forward pass over a batch of sequences' chunks (at most `ws.max_batch` rows in
    /// all): appends each chunk's keys and values to its cache and calls
    /// `on_logits(sequence, row, logits)` for the rows each chunk asks for. Nothing is
    /// changed when an input is invalid.
    pub fn forward_batch(
        &self,
        seqs: &mut [SeqChunk<'_>],
        ws: &mut Workspace,
        on_logits: &mut OnLogits<'_>,
        trace: Option<&mut OnStage<'_>>,
    ) -> Result<(), ModelError> {
        // Called from outside the thread pool, each of the ~70 parallel steps of a token
        // would pay a hand-off to the pool's threads: run the whole pass on one of them.
        // (`join` from outside the pool runs both halves on a worker, from a job on this
        // thread's stack: no allocation.)
        if rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1 {
            return rayon::join(|| self.forward_batch(seqs, ws, on_logits, trace), || ()).0;
        }
        let n = self.check_batch(seqs, ws)?;
        if n == 0 {
            return Ok(());
        }
        for s in seqs.iter_mut() {
            s.cache.reserve(s.tokens.len())?;
        }
        // A decode step (every chunk too short for attention's tiles) is ~100 short
        // parallel loops: the pool's threads stay on it between them.
        if seqs.iter().all(|s| s.tokens.len() < TILE_MIN_ROWS) {
            team::with_team(|| self.pass(seqs, ws, n, on_logits, trace));
        } else {
            self.pass(seqs, ws, n, on_logits, trace);
        }
        Ok(())
    }

    /// The stages of a checked batch of `n` rows whose pages are reserved.
    fn pass(
        &self,
        seqs: &mut [SeqChunk<'_>],
        ws: &mut Workspace,
        n: usize,
        on_logits: &mut OnLogits<'_>,
        trace: Option<&mut OnStage<'_>>,
    ) {
        self.lay_out_rows(seqs, ws);
        self.embed(seqs, ws, n);
        let mut trace = trace;
        if let Some(tr) = trace.as_deref_mut() {
            tr(Stage::Embedding, &ws.x[..n * self.cfg.hidden_size]);
        }
        for (li, lw) in self.weights.layers.iter().enumerate() {
            self.attention(li, lw, seqs, ws, n);
            self.mlp(lw, ws, n);
            if let Some(tr) = trace.as_deref_mut() {
                tr(Stage::Layer(li), &ws.x[..n * self.cfg.hidden_size]);
            }
        }
        for s in seqs.iter_mut() {
            s.cache.advance(s.tokens.len());
        }
        if let Some(tr) = trace {
            let (h, eps) = (self.cfg.hidden_size, self.cfg.rms_norm_eps);
            for t in 0..n {
                let (x, xn) = (&ws.x[t * h..(t + 1) * h], &mut ws.xn[t * h..(t + 1) * h]);
                rms_norm(x, &self.weights.final_norm, eps, xn);
            }
            tr(Stage::FinalNorm, &ws.xn[..n * h]);
        }
        self.logits(seqs, ws, on_logits);
    }

    /// Validates a batch before anything changes; returns its row count.
    fn check_batch(&self, seqs: &[SeqChunk<'_>], ws: &Workspace) -> Result<usize, ModelError> {
        let h = self.cfg.hidden_size;
        let mut n = 0;
        for s in seqs {
            let images = s.images;
            // Image soft tokens never reach the embedding table, so their id may lie past
            // the vocabulary (llama.cpp's GGUF vocabulary ends before `<image_soft_token>`).
            let is_image = |t: u32| images.is_some_and(|im| im.image_token == t);
            if let Some(&bad) = s
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.cfg.vocab_size && !is_image(t))
            {
                return Err(ModelError::TokenOutOfVocab {
                    id: bad,
                    vocab: self.cfg.vocab_size,
                });
            }
            if let Some(im) = images {
                let k = s.tokens.iter().filter(|&&t| t == im.image_token).count();
                if im.embeds.len() != k * h {
                    return Err(ModelError::Input(format!(
                        "a chunk holds {k} image tokens but {} image embeddings were given",
                        im.embeds.len() / h.max(1)
                    )));
                }
            }
            let end = s.cache.len() + s.tokens.len();
            if end > s.cache.context() {
                return Err(ModelError::ContextOverflow {
                    needed: end,
                    context: s.cache.context(),
                });
            }
            if s.tokens.len() > s.cache.max_chunk() {
                return Err(ModelError::Input(format!(
                    "a chunk of {} tokens is longer than its cache's chunk size of {}",
                    s.tokens.len(),
                    s.cache.max_chunk()
                )));
            }
            n += s.tokens.len();
        }
        if n > ws.max_batch {
            return Err(ModelError::Input(format!(
                "a batch of {n} tokens is larger than the workspace's {}",
                ws.max_batch
            )));
        }
        Ok(n)
    }

    /// Per row: its position, the keys it sees in each layer kind, and its sequence; per
    /// sequence its rows. An image block's rows see the whole block (fixtures README,
    /// item 9).
    fn lay_out_rows(&self, seqs: &[SeqChunk<'_>], ws: &mut Workspace) {
        ws.segments.clear();
        let mut r0 = 0;
        for s in seqs {
            let (n, p0) = (s.tokens.len(), s.cache.len());
            let is_img = |t: usize| s.images.is_some_and(|im| s.tokens[t] == im.image_token);
            let mut t = 0;
            while t < n {
                let b0 = t;
                if is_img(t) {
                    while t < n && is_img(t) {
                        t += 1;
                    }
                } else {
                    t += 1;
                }
                for r in b0..t {
                    ws.pos[r0 + r] = p0 + r;
                    ws.reach[r0 + r] = p0 + t;
                }
            }
            ws.segments.push(r0..r0 + n);
            r0 += n;
        }
        let window = Some(self.cfg.sliding_window);
        for r in 0..r0 {
            ws.keys_local[r] = key_range(ws.pos[r], ws.reach[r], window);
            ws.keys_global[r] = key_range(ws.pos[r], ws.reach[r], None);
        }
    }

    /// Embeddings scaled by sqrt(hidden) (image tokens take projector rows, unscaled), and
    /// each row's RoPE angles for both layer kinds.
    fn embed(&self, seqs: &[SeqChunk<'_>], ws: &mut Workspace, n: usize) {
        let h = self.cfg.hidden_size;
        let w = &self.weights;
        let mut r = 0;
        for s in seqs {
            let mut next_image_row = 0;
            for &tok in s.tokens {
                let row = &mut ws.x[r * h..(r + 1) * h];
                match s.images {
                    Some(im) if tok == im.image_token => {
                        row.copy_from_slice(
                            &im.embeds[next_image_row * h..(next_image_row + 1) * h],
                        );
                        next_image_row += 1;
                    }
                    _ => {
                        // A tied embedding's rows come from the output projection's packed
                        // copy: the file's pages were handed back when it was packed, and
                        // reading rows here and there would bring them back.
                        let stored = match (&w.lm_head.packed, w.tied) {
                            (Some(p), true) => {
                                ws.embed_row.resize(w.embed.row_bytes(), 0);
                                p.stored_row(tok as usize, &mut ws.embed_row);
                                &ws.embed_row[..]
                            }
                            _ => w.embed.row(tok as usize),
                        };
                        gemma3_formats::quant::dequantize(w.embed.dtype, stored, row);
                        row.iter_mut().for_each(|v| *v *= w.embed_scale);
                    }
                }
                r += 1;
            }
        }
        let half = self.cfg.head_dim / 2;
        for t in 0..n {
            let r = t * half..(t + 1) * half;
            let pos = ws.pos[t];
            rope_cos_sin(
                pos,
                &self.inv_freq_local,
                &mut ws.cos_local[r.clone()],
                &mut ws.sin_local[r.clone()],
            );
            rope_cos_sin(
                pos,
                &self.inv_freq_global,
                &mut ws.cos_global[r.clone()],
                &mut ws.sin_global[r],
            );
        }
    }

    /// `x += post_attn_norm(attention(input_norm(x)))`: q/k/v projections, q/k norms and
    /// RoPE, the new keys and values into each sequence's cache, attention against it.
    fn attention(
        &self,
        li: usize,
        lw: &LayerWeights,
        seqs: &mut [SeqChunk<'_>],
        ws: &mut Workspace,
        n: usize,
    ) {
        let cfg = &self.cfg;
        let (h, hd, eps) = (cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps);
        let half = hd / 2;
        let qd = cfg.num_heads * hd;
        let kvd = cfg.num_kv_heads * hd;
        each_row(&mut ws.x, h, &mut ws.xn, h, n, |_, x, xn| {
            rms_norm(x, &lw.attn_norm, eps, xn)
        });
        matmul_multi(
            &[lw.q.weights(), lw.k.weights(), lw.v.weights()],
            &ws.xn,
            n,
            &mut [&mut ws.q, &mut ws.k, &mut ws.v],
            self.precision,
        );
        let kind = cfg.layer_kinds[li];
        let (cos, sin, keys) = match kind {
            LayerKind::Sliding => (&ws.cos_local, &ws.sin_local, &ws.keys_local),
            LayerKind::Full => (&ws.cos_global, &ws.sin_global, &ws.keys_global),
        };
        let fast = self.precision == Precision::Fast;
        each_row(&mut ws.q, qd, &mut ws.k, kvd, n, |t, q, k| {
            rms_norm_rows(q, &lw.q_norm, eps);
            rms_norm_rows(k, &lw.k_norm, eps);
            let (c, s) = (
                &cos[t * half..(t + 1) * half],
                &sin[t * half..(t + 1) * half],
            );
            rope_neox(q, hd, c, s);
            rope_neox(k, hd, c, s);
            if fast {
                // llama.cpp keeps K and V in f16 and converts Q to f16 for the scores.
                round_to_f16(q);
                round_to_f16(k);
            }
        });
        if fast {
            round_to_f16(&mut ws.v[..n * kvd]);
        }
        for (s, rows) in seqs.iter_mut().zip(&ws.segments) {
            for r in rows.clone() {
                let (k, v) = (&ws.k[r * kvd..(r + 1) * kvd], &ws.v[r * kvd..(r + 1) * kvd]);
                s.cache.write(li, ws.pos[r], k, v);
            }
        }
        let seqs: &[SeqChunk<'_>] = seqs;
        attend_batch(
            &ws.q[..n * qd],
            &keys[..n],
            &ws.segments,
            &|s, head| seqs[s].cache.view(li, head),
            heads(cfg),
            Scores {
                scale: cfg.attn_scale(),
                softcap: cfg.attn_logit_softcapping,
            },
            &mut ws.attn[..n * qd],
            &mut ws.attn_scratch,
        );
        matmul_weights(lw.o.weights(), &ws.attn, n, &mut ws.o, self.precision);
        each_row(&mut ws.o, h, &mut ws.x, h, n, |_, o, x| {
            rms_norm_inplace(o, &lw.post_attn_norm, eps);
            x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += *y);
        });
    }

    /// `x += post_ffn_norm(down(gelu_tanh(gate(y)) · up(y)))` with `y = pre_ffn_norm(x)`.
    fn mlp(&self, lw: &LayerWeights, ws: &mut Workspace, n: usize) {
        let (h, ff, eps) = (
            self.cfg.hidden_size,
            self.cfg.intermediate_size,
            self.cfg.rms_norm_eps,
        );
        each_row(&mut ws.x, h, &mut ws.xn, h, n, |_, x, xn| {
            rms_norm(x, &lw.pre_ffn_norm, eps, xn)
        });
        matmul_multi(
            &[lw.gate.weights(), lw.up.weights()],
            &ws.xn,
            n,
            &mut [&mut ws.gate, &mut ws.up],
            self.precision,
        );
        let gelu: fn(&mut [f32], &[f32]) = if self.precision == Precision::Fast {
            gelu_gate_f16
        } else {
            gelu_gate
        };
        each_row(&mut ws.gate, ff, &mut ws.up, ff, n, |_, g, u| gelu(g, u));
        matmul_weights(lw.down.weights(), &ws.gate, n, &mut ws.o, self.precision);
        each_row(&mut ws.o, h, &mut ws.x, h, n, |_, o, x| {
            rms_norm_inplace(o, &lw.post_ffn_norm, eps);
            x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += *y);
        });
    }

    /// Final norm and output projection of the rows the sequences ask for, in groups; each
    /// row's logits go to `on_logits(sequence, row)` in batch order.
    fn logits(&self, seqs: &[SeqChunk<'_>], ws: &mut Workspace, on_logits: &mut OnLogits<'_>) {
        ws.want.clear();
        for (s, rows) in seqs.iter().zip(&ws.segments) {
            let n = rows.len();
            match s.logits {
                Logits::None => {}
                Logits::Last if n > 0 => ws.want.push(rows.end - 1),
                Logits::Last => {}
                Logits::All => ws.want.extend(rows.clone()),
                Logits::Rows(r) => ws.want.extend(
                    r.iter()
                        .filter(|&&i| i >= s.row_base && i - s.row_base < n)
                        .map(|&i| rows.start + i - s.row_base),
                ),
            }
        }
        let h = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size;
        let group = ws.final_rows.len() / h;
        for c0 in (0..ws.want.len()).step_by(group) {
            let m = (ws.want.len() - c0).min(group);
            for g in 0..m {
                let r = ws.want[c0 + g];
                rms_norm(
                    &ws.x[r * h..(r + 1) * h],
                    &self.weights.final_norm,
                    self.cfg.rms_norm_eps,
                    &mut ws.final_rows[g * h..(g + 1) * h],
                );
            }
            self.project(&ws.final_rows[..m * h], m, &mut ws.logits[..m * vocab]);
            for g in 0..m {
                let r = ws.want[c0 + g];
                let s = ws.segments.partition_point(|seg| seg.end <= r);
                let l = &mut ws.logits[g * vocab..(g + 1) * vocab];
                on_logits(s, seqs[s].row_base + r - ws.segments[s].start, l);
            }
        }
    }

    /// Logits of `m` rows that have been through the final norm: the output projection,
    /// then soft-capping. The one place the decoder's last step is computed (the forward
    /// pass and the eval harness's batched scoring both use it).
    pub fn project(&self, normed: &[f32], m: usize, logits: &mut [f32]) {
        matmul_weights(
            self.weights.lm_head.weights(),
            normed,
            m,
            logits,
            self.precision,
        );
        if let Some(c) = self.cfg.final_logit_softcapping {
            let softcap = |l: &mut [f32]| l.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
            match m {
                1 => softcap(logits),
                _ => logits.par_chunks_mut(self.cfg.vocab_size).for_each(softcap),
            }
        }
    }
}
