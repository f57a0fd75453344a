//! Perplexity as llama.cpp's `llama-perplexity` computes it: the token stream is cut into
//! non-overlapping chunks of `n_ctx` tokens, each chunk's first token is replaced by BOS,
//! and only the second half of each chunk is scored (the NLL of token `j+1` from the
//! logits at `j`, for `j` in `n_ctx/2 .. n_ctx-1`).

use crate::EvalError;
use gemma3_engine::Model;
use gemma3_model::{Logits, Workspace, MAX_BATCH};

#[derive(Clone, Debug)]
pub struct PerplexityResult {
    pub ppl: f64,
    /// Standard error of the perplexity (delta method, as llama.cpp reports it).
    pub ppl_stderr: f64,
    pub chunks: usize,
    pub scored_tokens: usize,
    /// Running perplexity after each chunk.
    pub running: Vec<f64>,
}

/// `log_softmax(logits)[target]`, accumulated in f64.
pub fn log_prob(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    logits[target] as f64 - max - sum.ln()
}

pub fn perplexity(
    model: &Model,
    tokens: &[u32],
    n_ctx: usize,
    mut on_chunk: impl FnMut(usize, usize, f64),
) -> Result<PerplexityResult, EvalError> {
    let cfg = &model.text.cfg;
    if n_ctx < 4 {
        return Err(EvalError::Input(format!(
            "a context of {n_ctx} tokens is too small for perplexity (at least 4)"
        )));
    }
    if n_ctx > cfg.max_position_embeddings {
        return Err(EvalError::Input(format!(
            "context {n_ctx} is beyond the model's trained context of {} tokens",
            cfg.max_position_embeddings
        )));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(EvalError::Input(format!(
            "the text has {} tokens; perplexity needs at least one chunk of {n_ctx}",
            tokens.len()
        )));
    }
    let mut cache = model.text.new_cache(n_ctx, MAX_BATCH);
    let mut ws = Workspace::new(cfg, MAX_BATCH);
    let first = n_ctx / 2;
    let rows: Vec<usize> = (first..n_ctx - 1).collect();
    let (mut nll, mut nll2, mut count) = (0.0f64, 0.0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    let mut chunk = vec![0u32; n_ctx];
    for c in 0..n_chunks {
        chunk.copy_from_slice(&tokens[c * n_ctx..(c + 1) * n_ctx]);
        chunk[0] = cfg.bos_token_id;
        cache.clear();
        model.text.forward(
            &chunk,
            &mut cache,
            &mut ws,
            Logits::Rows(&rows),
            &mut |j, l| {
                let lp = log_prob(l, chunk[j + 1] as usize);
                nll -= lp;
                nll2 += lp * lp;
                count += 1;
            },
        )?;
        let ppl = (nll / count as f64).exp();
        running.push(ppl);
        on_chunk(c + 1, n_chunks, ppl);
    }
    let mean = nll / count as f64;
    let var = (nll2 / count as f64 - mean * mean).max(0.0);
    let stderr_nll = (var / (count as f64 - 1.0).max(1.0)).sqrt();
    let ppl = mean.exp();
    Ok(PerplexityResult {
        ppl,
        ppl_stderr: ppl * stderr_nll,
        chunks: n_chunks,
        scored_tokens: count,
        running,
    })
}
