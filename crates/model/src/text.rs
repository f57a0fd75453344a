//! The Gemma 3 text decoder on CPU: a batch of tokens at consecutive positions goes through
//! every layer at once (matrix products), keys/values land in the [`KvCache`], and logits
//! are produced only for the rows asked for.
//!
//! Per layer (fixtures README, items 1-8): `x += post_attn_norm(attn(input_norm(x)))`,
//! `x += post_ffn_norm(mlp(pre_ffn_norm(x)))`; attention applies q/k RMSNorm per head
//! before NeoX RoPE, scales scores by `query_pre_attn_scalar^-0.5`, and sliding layers see
//! keys `j` with `i - W < j <= i`.

use crate::cache::KvCache;
use crate::weights::TextWeights;
use crate::{LayerKind, ModelError, TextConfig};
use gemma3_kernels::attention::{
    attend_part, attend_rows, fold_part, key_part, key_parts, normalize, KvView, KEY_PART,
};
use gemma3_kernels::ops::{
    gelu_gate, gelu_gate_f16, rms_norm, rms_norm_inplace, rms_norm_rows, rope_cos_sin,
    rope_inv_freq, rope_neox, round_to_f16,
};
use gemma3_kernels::{matmul_multi, matmul_weights, Precision};
use rayon::prelude::*;
use std::cell::RefCell;

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

/// Rows of logits computed per output-projection call: the projection is decoded once per
/// group, so larger groups are faster but hold `LOGIT_GROUP × vocab` floats.
const LOGIT_GROUP: usize = 32;

/// Buffers for one forward pass of up to `max_batch` tokens, allocated once.
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
    /// Rows of the current chunk that want logits (reused, so decode allocates nothing).
    rows: Vec<usize>,
    /// Per row of the chunk: one past the last key it may see (its image block's end, or
    /// itself).
    attn_hi: Vec<usize>,
    /// Decode attention by parts of the key range (see `attend_part`): per part every
    /// head's unnormalised output, maximum and sum, and the running maxima and sums.
    part_acc: Vec<f32>,
    part_max: Vec<f32>,
    part_sum: Vec<f32>,
    run_max: Vec<f32>,
    run_sum: Vec<f32>,
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
            rows: Vec::with_capacity(n),
            attn_hi: vec![0; n],
            part_acc: vec![0.0; max_parts(cfg) * qd],
            part_max: vec![0.0; max_parts(cfg) * cfg.num_heads],
            part_sum: vec![0.0; max_parts(cfg) * cfg.num_heads],
            run_max: vec![0.0; cfg.num_heads],
            run_sum: vec![0.0; cfg.num_heads],
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
            &self.part_acc,
        ]
        .iter()
        .map(|v| v.len())
        .sum::<usize>()
    }
}

thread_local! {
    /// Gathered query rows, their outputs and key ranges for [`attend_rows`].
    static QUERY_TILE: RefCell<(Vec<f32>, Vec<f32>, Vec<std::ops::Range<usize>>)> =
        const { RefCell::new((Vec::new(), Vec::new(), Vec::new())) };
}

/// Positions per task of the prefill attention: with the query heads of a group that is
/// the row count of each score tile (64 measured best for 512-token prompts, with or
/// without a long context before them).
const QUERY_BLOCK: usize = 64;

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

/// The most key parts a decode step can touch (the whole context, unaligned).
fn max_parts(cfg: &TextConfig) -> usize {
    cfg.max_position_embeddings.div_ceil(KEY_PART) + 1
}

/// Query heads per kv head that the decode path handles (Gemma 3 has 2 to 4).
const MAX_GROUP: usize = 16;

pub struct TextModel {
    pub cfg: TextConfig,
    pub weights: TextWeights,
    /// How quantized weights are multiplied (8-bit activations by default).
    pub precision: Precision,
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
            inv_freq_local,
            inv_freq_global,
        }
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

    /// Runs `tokens` at positions `cache.len ..`, appending their keys/values to the cache,
    /// and calls `on_logits(row, logits)` for each row `want` names, in order.
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
        trace: Option<&mut (dyn FnMut(Stage, &[f32]) + Send)>,
    ) -> Result<(), ModelError> {
        self.forward_with(tokens, None, cache, ws, want, on_logits, trace)
    }

    /// The general forward pass: [`forward_traced`](Self::forward_traced) plus images.
    pub fn forward_with(
        &self,
        tokens: &[u32],
        images: Option<ImageInputs<'_>>,
        cache: &mut KvCache,
        ws: &mut Workspace,
        want: Logits<'_>,
        on_logits: &mut (dyn FnMut(usize, &[f32]) + Send),
        mut trace: Option<&mut (dyn FnMut(Stage, &[f32]) + Send)>,
    ) -> Result<(), ModelError> {
        // Called from outside the thread pool, each of the ~70 parallel steps of a token
        // would pay a hand-off to the pool's threads: run the whole pass on one of them.
        // (`join` from outside the pool runs both halves on a worker, from a job on this
        // thread's stack: no allocation.)
        if rayon::current_thread_index().is_none() && rayon::current_num_threads() > 1 {
            return rayon::join(
                || self.forward_with(tokens, images, cache, ws, want, on_logits, trace),
                || (),
            )
            .0;
        }
        let n_all = tokens.len();
        if n_all == 0 {
            return Ok(());
        }
        if cache.len + n_all > cache.context {
            return Err(ModelError::Input(format!(
                "{} tokens at position {} exceed the context size of {} tokens",
                n_all, cache.len, cache.context
            )));
        }
        // Image soft tokens never reach the embedding table, so their id may lie past the
        // vocabulary (llama.cpp's GGUF vocabulary ends just before `<image_soft_token>`).
        let is_image_id = |t: u32| images.is_some_and(|im| im.image_token == t);
        if let Some(&bad) = tokens
            .iter()
            .find(|&&t| t as usize >= self.cfg.vocab_size && !is_image_id(t))
        {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.cfg.vocab_size
            )));
        }
        let h = self.cfg.hidden_size;
        if let Some(im) = images {
            let n_img = tokens.iter().filter(|&&t| t == im.image_token).count();
            if im.embeds.len() != n_img * h {
                return Err(ModelError::Input(format!(
                    "the tokens hold {n_img} image tokens but {} image embeddings were given",
                    im.embeds.len() / h.max(1)
                )));
            }
        }
        let is_img = |t: usize| images.is_some_and(|im| tokens[t] == im.image_token);
        let mut start = 0;
        let mut embeds_used = 0;
        while start < n_all {
            let mut end = (start + ws.max_batch).min(n_all);
            // Never split an image block across chunks: its tokens see each other.
            if end < n_all && is_img(end) && is_img(end - 1) {
                let mut b = end - 1;
                while b > start && is_img(b - 1) {
                    b -= 1;
                }
                if b == start {
                    return Err(ModelError::Input(format!(
                        "an image block longer than the batch size ({}) cannot be processed",
                        ws.max_batch
                    )));
                }
                end = b;
            }
            let n = end - start;
            // Attention reach of each row, and the image rows' embeddings.
            for t in 0..n {
                ws.attn_hi[t] = t + 1;
            }
            let mut chunk_images = None;
            if let Some(im) = images {
                let mut t = 0;
                while t < n {
                    if is_img(start + t) {
                        let b0 = t;
                        while t < n && is_img(start + t) {
                            t += 1;
                        }
                        for r in b0..t {
                            ws.attn_hi[r] = t;
                        }
                    } else {
                        t += 1;
                    }
                }
                let k = (start..end).filter(|&r| is_img(r)).count();
                chunk_images = Some(ImageInputs {
                    image_token: im.image_token,
                    embeds: &im.embeds[embeds_used * h..(embeds_used + k) * h],
                });
                embeds_used += k;
            }
            self.forward_chunk(
                &tokens[start..end],
                chunk_images,
                cache,
                ws,
                trace.as_deref_mut(),
            );
            // Rows of this chunk that want logits.
            let mut rows = std::mem::take(&mut ws.rows);
            rows.clear();
            match want {
                Logits::None => {}
                Logits::Last => {
                    if end == n_all {
                        rows.push(n - 1);
                    }
                }
                Logits::All => rows.extend(0..n),
                Logits::Rows(r) => rows.extend(
                    r.iter()
                        .filter(|&&i| i >= start && i < end)
                        .map(|&i| i - start),
                ),
            }
            self.project(ws, &rows, start, on_logits);
            ws.rows = rows;
            start = end;
        }
        Ok(())
    }

    fn forward_chunk(
        &self,
        tokens: &[u32],
        images: Option<ImageInputs<'_>>,
        cache: &mut KvCache,
        ws: &mut Workspace,
        mut trace: Option<&mut (dyn FnMut(Stage, &[f32]) + Send + '_)>,
    ) {
        let cfg = &self.cfg;
        let n = tokens.len();
        let h = cfg.hidden_size;
        let hd = cfg.head_dim;
        let half = hd / 2;
        let nh = cfg.num_heads;
        let nkv = cfg.num_kv_heads;
        let qd = nh * hd;
        let kvd = nkv * hd;
        let ff = cfg.intermediate_size;
        let eps = cfg.rms_norm_eps;
        let p0 = cache.len;
        let w = &self.weights;

        // Embeddings, scaled by sqrt(hidden); image tokens take projector outputs unscaled.
        let mut next_image_row = 0;
        for (t, &tok) in tokens.iter().enumerate() {
            let row = &mut ws.x[t * h..(t + 1) * h];
            match images {
                Some(im) if tok == im.image_token => {
                    row.copy_from_slice(&im.embeds[next_image_row * h..(next_image_row + 1) * h]);
                    next_image_row += 1;
                }
                _ => {
                    gemma3_formats::quant::dequantize(
                        w.embed.dtype,
                        w.embed.row(tok as usize),
                        row,
                    );
                    row.iter_mut().for_each(|v| *v *= w.embed_scale);
                }
            }
        }
        if let Some(tr) = trace.as_deref_mut() {
            tr(Stage::Embedding, &ws.x[..n * h]);
        }
        for t in 0..n {
            let r = t * half..(t + 1) * half;
            rope_cos_sin(
                p0 + t,
                &self.inv_freq_local,
                &mut ws.cos_local[r.clone()],
                &mut ws.sin_local[r.clone()],
            );
            rope_cos_sin(
                p0 + t,
                &self.inv_freq_global,
                &mut ws.cos_global[r.clone()],
                &mut ws.sin_global[r],
            );
        }
        let scale = cfg.attn_scale();
        let softcap = cfg.attn_logit_softcapping;

        for (li, lw) in w.layers.iter().enumerate() {
            let kind = cfg.layer_kinds[li];
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
            let (cos, sin) = match kind {
                LayerKind::Sliding => (&ws.cos_local, &ws.sin_local),
                LayerKind::Full => (&ws.cos_global, &ws.sin_global),
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
            let lc = &mut cache.layers[li];
            for t in 0..n {
                let slot = (p0 + t) % lc.capacity;
                lc.k[slot * kvd..(slot + 1) * kvd].copy_from_slice(&ws.k[t * kvd..(t + 1) * kvd]);
                lc.v[slot * kvd..(slot + 1) * kvd].copy_from_slice(&ws.v[t * kvd..(t + 1) * kvd]);
            }
            let window = match kind {
                LayerKind::Sliding => Some(cfg.sliding_window),
                LayerKind::Full => None,
            };
            let (lk, lv, cap) = (&lc.k[..], &lc.v[..], lc.capacity);
            let q = &ws.q;
            let attn_hi = &ws.attn_hi;
            let group = nh / nkv;
            let kv_of = |kv_head: usize| KvView {
                k: lk,
                v: lv,
                capacity: cap,
                stride: kvd,
                offset: kv_head * hd,
                head_dim: hd,
            };
            if n >= 8 {
                // Blocks of up to QUERY_BLOCK positions, at least one per thread.
                let block = QUERY_BLOCK.min(n.div_ceil(rayon::current_num_threads()));
                // Prefill: each task takes a run of positions and, per kv head, all of its
                // query heads at once, so every key is read once per tile of rows.
                ws.attn[..n * qd]
                    .par_chunks_mut(block * qd)
                    .enumerate()
                    .for_each(|(b, out)| {
                        let t0 = b * block;
                        let nt = out.len() / qd;
                        QUERY_TILE.with(|tile| {
                            let (qt, ot, keys) = &mut *tile.borrow_mut();
                            qt.resize(nt * group * hd, 0.0);
                            ot.resize(nt * group * hd, 0.0);
                            for kvh in 0..nkv {
                                keys.clear();
                                for t in 0..nt {
                                    let pos = p0 + t0 + t;
                                    for j in 0..group {
                                        let head = kvh * group + j;
                                        let r = t * group + j;
                                        let src = (t0 + t) * qd + head * hd;
                                        qt[r * hd..(r + 1) * hd].copy_from_slice(&q[src..src + hd]);
                                        keys.push(key_range(pos, p0 + attn_hi[t0 + t], window));
                                    }
                                }
                                attend_rows(qt, keys, &kv_of(kvh), scale, softcap, ot);
                                for t in 0..nt {
                                    for j in 0..group {
                                        let (head, r) = (kvh * group + j, t * group + j);
                                        out[t * qd + head * hd..t * qd + (head + 1) * hd]
                                            .copy_from_slice(&ot[r * hd..(r + 1) * hd]);
                                    }
                                }
                            }
                        });
                    });
            } else {
                // Decode (and short chunks): per position and kv head, the group's query
                // heads together. The key range's parts (the same aligned parts a prefill
                // tile folds in order, so both give identical results) run in parallel,
                // then are folded in order.
                assert!(group <= MAX_GROUP, "{group} query heads per kv head");
                for t in 0..n {
                    let keys = key_range(p0 + t, p0 + attn_hi[t], window);
                    let ranges: [std::ops::Range<usize>; MAX_GROUP] =
                        std::array::from_fn(|_| keys.clone());
                    let parts = key_parts(keys.clone()).count();
                    let qt = &q[t * qd..(t + 1) * qd];
                    let task = |(j, ((acc, max), sum)): (
                        usize,
                        ((&mut [f32], &mut [f32]), &mut [f32]),
                    )| {
                        let (part, kvh) = (j / nkv, j % nkv);
                        let range = key_part(&keys, part);
                        let rows = &qt[kvh * group * hd..(kvh + 1) * group * hd];
                        let kv = kv_of(kvh);
                        attend_part(
                            rows,
                            &ranges[..group],
                            &kv,
                            scale,
                            softcap,
                            range,
                            acc,
                            max,
                            sum,
                        );
                    };
                    let (acc, max, sum) = (
                        &mut ws.part_acc[..parts * qd],
                        &mut ws.part_max[..parts * nh],
                        &mut ws.part_sum[..parts * nh],
                    );
                    // Fork-join costs more than short ranges: go parallel only for real work.
                    if parts * nkv > 1 && nh * keys.len() * hd >= 1 << 18 {
                        acc.par_chunks_mut(group * hd)
                            .zip(max.par_chunks_mut(group))
                            .zip(sum.par_chunks_mut(group))
                            .enumerate()
                            .for_each(task);
                    } else {
                        acc.chunks_mut(group * hd)
                            .zip(max.chunks_mut(group))
                            .zip(sum.chunks_mut(group))
                            .enumerate()
                            .for_each(task);
                    }
                    // Part p holds every head's state at p·nh (heads in kv-head order).
                    let out = &mut ws.attn[t * qd..(t + 1) * qd];
                    out.fill(0.0);
                    ws.run_max.fill(f32::NEG_INFINITY);
                    ws.run_sum.fill(0.0);
                    for p in 0..parts {
                        fold_part(
                            out,
                            &mut ws.run_max,
                            &mut ws.run_sum,
                            &ws.part_acc[p * qd..(p + 1) * qd],
                            &ws.part_max[p * nh..(p + 1) * nh],
                            &ws.part_sum[p * nh..(p + 1) * nh],
                            hd,
                        );
                    }
                    normalize(out, &ws.run_sum, hd);
                }
            }
            matmul_weights(lw.o.weights(), &ws.attn, n, &mut ws.o, self.precision);
            each_row(&mut ws.o, h, &mut ws.x, h, n, |_, o, x| {
                rms_norm_inplace(o, &lw.post_attn_norm, eps);
                x.iter_mut().zip(o.iter()).for_each(|(x, y)| *x += *y);
            });
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
            if let Some(tr) = trace.as_deref_mut() {
                tr(Stage::Layer(li), &ws.x[..n * h]);
            }
        }
        cache.len += n;
        if let Some(tr) = trace {
            for t in 0..n {
                rms_norm(
                    &ws.x[t * h..(t + 1) * h],
                    &w.final_norm,
                    eps,
                    &mut ws.xn[t * h..(t + 1) * h],
                );
            }
            tr(Stage::FinalNorm, &ws.xn[..n * h]);
        }
    }

    /// Final norm and output projection of `rows` of the last chunk, in groups.
    fn project(
        &self,
        ws: &mut Workspace,
        rows: &[usize],
        row_offset: usize,
        on_logits: &mut (dyn FnMut(usize, &[f32]) + Send),
    ) {
        let h = self.cfg.hidden_size;
        let vocab = self.cfg.vocab_size;
        let group = ws.final_rows.len() / h;
        for chunk in rows.chunks(group) {
            for (g, &r) in chunk.iter().enumerate() {
                rms_norm(
                    &ws.x[r * h..(r + 1) * h],
                    &self.weights.final_norm,
                    self.cfg.rms_norm_eps,
                    &mut ws.final_rows[g * h..(g + 1) * h],
                );
            }
            let m = chunk.len();
            matmul_weights(
                self.weights.lm_head.weights(),
                &ws.final_rows[..m * h],
                m,
                &mut ws.logits[..m * vocab],
                self.precision,
            );
            for (g, &r) in chunk.iter().enumerate() {
                let l = &mut ws.logits[g * vocab..(g + 1) * vocab];
                if let Some(c) = self.cfg.final_logit_softcapping {
                    l.iter_mut().for_each(|v| *v = c * (*v / c).tanh());
                }
                on_logits(row_offset + r, l);
            }
        }
    }
}
