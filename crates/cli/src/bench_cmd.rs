//! `gemma3 bench`: llama-bench's measurements (prompt processing `pp` and token generation
//! `tg`, tokens per second, mean ± sd over repetitions, per thread count) and per-kernel
//! microbenchmarks of the matrix products at real model shapes.

use anyhow::{bail, Context, Result};
use clap::Args;
use gemma3_formats::{DType, TensorData};
use gemma3_kernels::{matmul_weights, Linear, Precision};
use gemma3_model::vision::{VisionLayer, VisionWeights};
use gemma3_model::{KvCache, Logits, SeqChunk, VisionConfig, VisionTower, Workspace, MAX_BATCH};
use std::sync::Arc;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// A .gguf file, a Hugging Face directory or repo id, or an Ollama name [default: Gemma 3
    /// 270M Q4_K_M]
    #[arg(short, long, env = "GEMMA3_MODEL")]
    pub model: Option<String>,
    /// Multiply in f32 instead of with 8-bit activations (with --vision: instead of bf16)
    #[arg(long)]
    pub exact: bool,
    #[command(flatten)]
    pub cache: crate::CacheArgs,
    /// Quantize the weights at load (see `gemma3 quantize`)
    #[arg(long, value_name = "TYPE", value_parser = crate::parse_file_type)]
    pub quantize: Option<gemma3_model::FileType>,
    /// Prompt lengths to time (pp tests); 0 skips them
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to time (tg tests); 0 skips them
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Thread counts to run each test with
    #[arg(
        short = 't',
        long = "threads",
        value_delimiter = ',',
        default_value = "2"
    )]
    pub threads: Vec<usize>,
    /// Context depths: each test first fills the cache with this many tokens (untimed),
    /// as llama-bench's -d does, to show how speed holds up as the context grows
    #[arg(
        short = 'd',
        long = "depth",
        value_delimiter = ',',
        default_value = "0"
    )]
    pub depth: Vec<usize>,
    /// Sequences decoded together in each tg test (as a server's concurrent streams): one
    /// forward pass per step takes every sequence's next token; t/s counts all of them
    #[arg(short = 's', long, value_delimiter = ',', default_value = "1")]
    pub sequences: Vec<usize>,
    /// Repetitions per test
    #[arg(short = 'r', long, default_value_t = 5)]
    pub reps: usize,
    /// Print a JSON array of {"test","threads","tokens_per_s","sd","reps"}
    #[arg(long)]
    pub json: bool,
    /// Instead, time the matrix product of every weight type at model shapes
    #[arg(long)]
    pub kernels: bool,
    /// With --kernels: only shapes whose label contains this (e.g. "270M", "output")
    #[arg(long)]
    pub shape: Option<String>,
    /// With --kernels: only these weight types (e.g. Q8_0,Q4_K)
    #[arg(long = "type", value_delimiter = ',')]
    pub types: Vec<String>,
    /// Instead, time the vision tower: a full-size SigLIP So400m (27 layers, hidden 1152)
    /// with random BF16 weights encoding one 896x896 image, with the projector
    #[arg(long)]
    pub vision: bool,
    /// Instead, time speculative decoding's check: one pass over the last token and k
    /// guesses (k + 1 rows, logits for each) against a one-row decode pass, for each k
    /// given (e.g. 1,2,4,8,16), at the depth of the first -d
    #[arg(long, value_delimiter = ',', value_name = "K,...")]
    pub spec_rows: Vec<usize>,
}

struct Row {
    test: String,
    depth: usize,
    threads: usize,
    mean: f64,
    sd: f64,
    reps: usize,
    /// tg: the tokens/s the measured memory bandwidth allows, reading every weight and the
    /// keys and values attended once per token.
    bound: Option<f64>,
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

pub fn run(a: BenchArgs) -> Result<()> {
    if a.reps == 0 {
        bail!("--reps must be at least 1");
    }
    if a.threads.contains(&0) {
        bail!("thread counts must be at least 1");
    }
    eprintln!("kernels: {}", gemma3_kernels::describe());
    if a.kernels {
        // In the pool, as the model runs them: a call from outside would time the
        // hand-off to the pool's threads too.
        for &t in &a.threads {
            let pool = pool(t)?;
            pool.install(|| kernels(&a))?;
        }
        return Ok(());
    }
    if a.vision {
        return vision(&a);
    }
    let model = crate::setup(&crate::ModelArgs {
        model: a.model.clone(),
        threads: None,
        exact: a.exact,
        mmproj: None,
        cache: a.cache.clone(),
        quantize: a.quantize,
        chat_template: None,
    })?;
    if !a.spec_rows.is_empty() {
        return spec_rows(&a, &model);
    }
    let cfg = &model.text.cfg;
    let max_p = a.n_prompt.iter().copied().max().unwrap_or(0);
    let max_n = a.n_gen.iter().copied().max().unwrap_or(0);
    let max_d = a.depth.iter().copied().max().unwrap_or(0);
    let ctx = (max_d + max_p.max(max_n) + 1).max(16);
    if ctx > cfg.max_position_embeddings {
        bail!(
            "tests need {ctx} positions; the model allows {}",
            cfg.max_position_embeddings
        );
    }
    let mut cache = model.text.new_cache(ctx, MAX_BATCH);
    let mut ws = Workspace::new(cfg, MAX_BATCH);
    let tokens = bench_tokens(cfg.vocab_size, ctx);
    let mut rows = Vec::new();
    for &t in &a.threads {
        let pool = pool(t)?;
        pool.install(|| -> Result<()> {
            let mut gbps = 0.0;
            if a.n_gen.iter().any(|&n| n > 0) {
                // Decoding reads every weight once per token: say what memory allows.
                gbps = stream_read_gbps();
                let bytes = model.text.weights.bytes() as f64;
                eprintln!(
                    "{t} threads: memory streams {gbps:.1} GB/s; the weights are {:.1} MB, so tg \
                     is bound near {:.0} t/s (less at depth: the keys and values are read too)",
                    bytes / 1e6,
                    gbps * 1e9 / bytes
                );
            }
            // Warm up: page in the weights, size the thread-local buffers.
            cache.clear();
            model.text.forward(
                &tokens[..8],
                &mut cache,
                &mut ws,
                Logits::Last,
                &mut |_, _| {},
            )?;
            // The cache holding `d` tokens of context, filled in batches (untimed).
            let fill = |cache: &mut KvCache, ws: &mut Workspace, d: usize| -> Result<()> {
                cache.clear();
                for chunk in tokens[..d].chunks(512) {
                    model
                        .text
                        .forward(chunk, cache, ws, Logits::None, &mut |_, _| {})?;
                }
                Ok(())
            };
            let label = |test: String, d: usize| {
                if d == 0 {
                    test
                } else {
                    format!("{test} @ d{d}")
                }
            };
            // pp: one batch of `len` tokens; tg: `len` single-token steps.
            let tests = a.n_prompt.iter().map(|&p| ("pp", p));
            let tests: Vec<_> = tests.chain(a.n_gen.iter().map(|&n| ("tg", n))).collect();
            for &d in &a.depth {
                for &(kind, len) in tests.iter().filter(|t| t.1 > 0) {
                    let seqs: &[usize] = if kind == "tg" { &a.sequences } else { &[1] };
                    for &n_seq in seqs {
                        let mut speeds = vec![];
                        for _ in 0..a.reps {
                            let t = if n_seq == 1 {
                                fill(&mut cache, &mut ws, d)?;
                                let batch = if kind == "pp" { len } else { 1 };
                                let t0 = Instant::now();
                                for chunk in tokens[d..d + len].chunks(batch) {
                                    model.text.forward(
                                        chunk,
                                        &mut cache,
                                        &mut ws,
                                        Logits::Last,
                                        &mut |_, _| {},
                                    )?;
                                }
                                t0.elapsed()
                            } else {
                                let mut caches: Vec<KvCache> = (0..n_seq)
                                    .map(|_| model.text.new_cache(ctx, MAX_BATCH))
                                    .collect();
                                for c in &mut caches {
                                    fill(c, &mut ws, d)?;
                                }
                                let t0 = Instant::now();
                                for step in 0..len {
                                    let tok = [tokens[d + step]];
                                    let mut chunks: Vec<SeqChunk> = caches
                                        .iter_mut()
                                        .map(|c| SeqChunk::new(&tok, c, Logits::Last))
                                        .collect();
                                    model.text.forward_batch(
                                        &mut chunks,
                                        &mut ws,
                                        &mut |_, _, _| {},
                                        None,
                                    )?;
                                }
                                t0.elapsed()
                            };
                            speeds.push((n_seq * len) as f64 / t.as_secs_f64());
                        }
                        let (mean, sd) = mean_sd(&speeds);
                        let bound = (kind == "tg" && gbps > 0.0).then(|| {
                            // The middle step of the run attends to d + len/2 positions in
                            // each sequence; the weights are read once for all of them.
                            let w = model.text.weights.bytes();
                            let kv = token_bytes(&model.text, d + len / 2) - w;
                            n_seq as f64 * gbps * 1e9 / (w + n_seq * kv) as f64
                        });
                        let name = match n_seq {
                            1 => format!("{kind}{len}"),
                            n => format!("{kind}{len} x{n}"),
                        };
                        rows.push(Row {
                            test: label(name, d),
                            depth: d,
                            threads: t,
                            mean,
                            sd,
                            reps: a.reps,
                            bound,
                        });
                    }
                }
            }
            Ok(())
        })?;
    }
    let kv = model.text.kv_types().label();
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|r| {
                serde_json::json!({"test": r.test, "threads": r.threads, "tokens_per_s": r.mean, "sd": r.sd, "reps": r.reps, "depth": r.depth, "kv": kv, "bound_tokens_per_s": r.bound})
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        let name = model
            .source
            .path()
            .file_name()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        outln!("| model | size | precision | kv | threads | test | t/s | of bound |")?;
        outln!("| --- | ---: | --- | --- | ---: | ---: | ---: | ---: |")?;
        for r in &rows {
            let of_bound = r.bound.map_or(String::new(), |b| {
                format!("{:.0}% of {b:.0}", 100.0 * r.mean / b)
            });
            outln!(
                "| {name} | {:.2} MiB | {:?} | {kv} | {} | {} | {:.2} ± {:.2} | {of_bound} |",
                model.text.weights.bytes() as f64 / (1 << 20) as f64,
                model.text.precision,
                r.threads,
                r.test,
                r.mean,
                r.sd
            )?;
        }
    }
    Ok(())
}

/// Random weights of `dtype` (finite scales), `rows × cols`.
fn random_weights(dtype: DType, rows: usize, cols: usize, seed: u64) -> Result<TensorData> {
    let mut s = seed;
    let mut next = move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (s >> 33) as u32
    };
    let n = rows * cols;
    let bytes: Vec<u8> = match dtype {
        DType::F32 => (0..n)
            .flat_map(|_| ((next() % 2000) as f32 / 1000.0 - 1.0).to_le_bytes())
            .collect(),
        DType::F16 | DType::BF16 => (0..n)
            .flat_map(|_| (0x3000u16 + (next() % 0x800) as u16).to_le_bytes())
            .collect(),
        _ => {
            let bb = dtype.block_bytes();
            let mut b: Vec<u8> = (0..n / dtype.block_elems() * bb)
                .map(|_| next() as u8)
                .collect();
            let scale = half::f16::from_f32(0.01).to_le_bytes();
            for blk in b.chunks_exact_mut(bb) {
                let fields: &[usize] = match dtype {
                    DType::Q6_K => &[208],
                    DType::Q4_1 | DType::Q5_1 | DType::Q4_K | DType::Q5_K => &[0, 2],
                    _ => &[0],
                };
                for &f in fields {
                    blk[f..f + 2].copy_from_slice(&scale);
                }
            }
            b
        }
    };
    let len = bytes.len();
    Ok(TensorData::new(
        format!("{dtype}"),
        dtype,
        vec![rows, cols],
        Arc::new(bytes),
        0..len,
    )?)
}

fn kernels(a: &BenchArgs) -> Result<()> {
    // Shapes: the 270M model's projections and output, and Gemma 3 4B's MLP and output.
    let shapes: &[(&str, usize, usize)] = &[
        ("270M ffn_up", 2048, 640),
        ("270M ffn_down", 640, 2048),
        ("270M output", 262_144, 640),
        ("4B ffn_up", 10_240, 2560),
        ("4B ffn_down", 2560, 10_240),
        ("4B output", 262_144, 2560),
    ];
    let types: Vec<DType> = gemma3_kernels::packed::PACKED_TYPES
        .into_iter()
        .chain([DType::BF16, DType::F16, DType::F32])
        .collect();
    outln!(
        "matrix products, {} threads; this machine streams {:.1} GB/s from memory (read, {} threads)",
        rayon::current_num_threads(),
        stream_read_gbps(),
        rayon::current_num_threads()
    )?;
    outln!("| shape | type | batch | precision | time | weights GB/s | GFLOP/s |")?;
    outln!("| --- | --- | ---: | --- | ---: | ---: | ---: |")?;
    for &(label, rows, cols) in shapes {
        if a.shape.as_deref().is_some_and(|f| !label.contains(f)) {
            continue;
        }
        for &t in &types {
            if !a.types.is_empty()
                && !a
                    .types
                    .iter()
                    .any(|n| n.eq_ignore_ascii_case(&t.to_string()))
            {
                continue;
            }
            if cols % t.block_elems() != 0 {
                continue;
            }
            // The 4B output at f32 would be 2.7 GB: skip the float types there.
            if rows * cols > 100_000_000 && !t.is_quantized() && t != DType::BF16 {
                continue;
            }
            let w = Linear::new(random_weights(t, rows, cols, 42)?);
            let layout = if w.packed.is_some() { " (packed)" } else { "" };
            for &(n, precision) in &[
                (1usize, Precision::Fast),
                (16, Precision::Fast),
                (64, Precision::Fast),
                (1, Precision::Exact),
            ] {
                if !t.is_quantized() && precision == Precision::Exact {
                    continue;
                }
                let x: Vec<f32> = (0..n * cols)
                    .map(|i| ((i * 7919) % 1000) as f32 / 500.0 - 1.0)
                    .collect();
                let mut out = vec![0f32; n * rows];
                matmul_weights(w.weights(), &x, n, &mut out, precision);
                let reps = ((2e9 / (rows * cols * n) as f64) as usize).clamp(1, a.reps.max(1) * 20);
                let t0 = Instant::now();
                for _ in 0..reps {
                    matmul_weights(w.weights(), &x, n, &mut out, precision);
                }
                let s = t0.elapsed().as_secs_f64() / reps as f64;
                outln!(
                    "| {label} {rows}x{cols} | {t}{} | {n} | {precision:?} | {:.3} ms | {:.1} | {:.1} |",
                    if precision == Precision::Fast { layout } else { "" },
                    s * 1e3,
                    w.tensor.bytes().len() as f64 / s / 1e9,
                    2.0 * (rows * cols * n) as f64 / s / 1e9
                )?;
            }
        }
    }
    Ok(())
}

/// Bytes a decode step reads at `positions` of context: every weight, and the keys and
/// values each layer attends to (its window in sliding layers).
fn token_bytes(m: &gemma3_model::TextModel, positions: usize) -> usize {
    let cfg = &m.cfg;
    let per_position = m.kv_types().bytes_per_position(cfg);
    let attended: usize = cfg
        .layer_kinds
        .iter()
        .map(|k| match k {
            gemma3_model::LayerKind::Full => positions,
            gemma3_model::LayerKind::Sliding => positions.min(cfg.sliding_window),
        })
        .sum();
    m.weights.bytes() + attended * per_position
}

/// The memory bandwidth the weight kernels are measured against: the best of five parallel
/// sums over 256 MB (far past any cache), on the current thread pool.
fn stream_read_gbps() -> f64 {
    use rayon::prelude::*;
    let words: Vec<u64> = (0..32u64 << 20).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let t0 = Instant::now();
        let s: u64 = words
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &v| a.wrapping_add(v)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(s);
        best = best.max((words.len() * 8) as f64 / t0.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// A Gemma 3 (So400m) vision tower with random weights: BF16 matrices (as on the hub)
/// uniform in ±1/sqrt(fan-in), unit LayerNorms, small biases.
fn random_tower(cfg: &VisionConfig) -> Result<VisionTower> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut uniform = move |a: f32| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        ((seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
    };
    let mut matrix = |rows: usize, cols: usize| -> Result<TensorData> {
        let a = 1.0 / (cols as f32).sqrt();
        let bytes: Vec<u8> = (0..rows * cols)
            .flat_map(|_| half::bf16::from_f32(uniform(a)).to_le_bytes())
            .collect();
        let len = bytes.len();
        Ok(TensorData::new(
            "random".into(),
            DType::BF16,
            vec![rows, cols],
            Arc::new(bytes),
            0..len,
        )?)
    };
    let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
    let small = |n: usize| vec![0.01f32; n];
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for _ in 0..cfg.num_layers {
        layers.push(VisionLayer {
            ln1_w: vec![1.0; d],
            ln1_b: small(d),
            q: matrix(d, d)?,
            q_b: small(d),
            k: matrix(d, d)?,
            k_b: small(d),
            v: matrix(d, d)?,
            v_b: small(d),
            o: matrix(d, d)?,
            o_b: small(d),
            ln2_w: vec![1.0; d],
            ln2_b: small(d),
            fc1: matrix(f, d)?,
            fc1_b: small(f),
            fc2: matrix(d, f)?,
            fc2_b: small(d),
        });
    }
    let cpp = cfg.num_channels * cfg.patch_size * cfg.patch_size;
    let to_f32 = |t: TensorData| TensorData::from_f32("random", t.shape.clone(), &t.to_f32());
    let weights = VisionWeights {
        patch: to_f32(matrix(d, cpp)?)?,
        patch_b: small(d),
        position: (0..cfg.num_patches() * d)
            .map(|i| (i % 7) as f32 * 0.01)
            .collect(),
        layers,
        post_ln_w: vec![1.0; d],
        post_ln_b: small(d),
        soft_norm: vec![1.0; d],
        projection: to_f32(matrix(cfg.text_hidden_size, d)?)?,
    };
    Ok(VisionTower::new(cfg.clone(), weights))
}

/// Floating-point operations (multiply and add counted apart) of one image through the
/// tower and projector.
fn vision_flops(cfg: &VisionConfig) -> f64 {
    let n = cfg.num_patches() as f64;
    let d = cfg.hidden_size as f64;
    let f = cfg.intermediate_size as f64;
    let cpp = (cfg.num_channels * cfg.patch_size * cfg.patch_size) as f64;
    let per_layer = 2.0 * n * d * d * 4.0 // q, k, v, out
        + 2.0 * n * n * d * 2.0 // scores and weighted values
        + 2.0 * n * d * f * 2.0; // fc1, fc2
    2.0 * n * d * cpp
        + cfg.num_layers as f64 * per_layer
        + 2.0 * cfg.mm_tokens_per_image as f64 * d * cfg.text_hidden_size as f64
}

fn vision(a: &BenchArgs) -> Result<()> {
    let cfg = VisionConfig::default();
    let t0 = Instant::now();
    let mut tower = random_tower(&cfg)?;
    if a.exact {
        tower.precision = Precision::Exact;
    }
    eprintln!(
        "random So400m weights ({:.0} M parameters) made in {:.1} s",
        tower.num_params() as f64 / 1e6,
        t0.elapsed().as_secs_f64()
    );
    let pixels: Vec<f32> = (0..cfg.pixel_values_len())
        .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
        .collect();
    let flops = vision_flops(&cfg);
    let mut rows = Vec::new();
    for &t in &a.threads {
        let pool = pool(t)?;
        let times = pool.install(|| -> Result<(Vec<f64>, Option<f64>)> {
            // Warm up: thread-local buffers, page faults.
            let out = tower.encode(&pixels)?;
            if !out.iter().all(|v| v.is_finite()) {
                bail!("the vision tower gave non-finite values");
            }
            let mut times = Vec::with_capacity(a.reps);
            let cpu0 = process_cpu_seconds();
            for _ in 0..a.reps {
                let t0 = Instant::now();
                tower.encode(&pixels)?;
                times.push(t0.elapsed().as_secs_f64());
            }
            let cpu = process_cpu_seconds().zip(cpu0).map(|(b, a)| b - a);
            Ok((times, cpu))
        })?;
        let (times, cpu) = times;
        let (mean, sd) = mean_sd(&times);
        // CPU seconds per wall second: below the thread count when other work shares
        // the cores.
        let cores = cpu.map(|c| c / times.iter().sum::<f64>());
        rows.push((t, mean, sd, times.len(), cores));
    }
    if a.json {
        let v: Vec<serde_json::Value> = rows
            .iter()
            .map(|&(t, mean, sd, reps, cores)| {
                serde_json::json!({"test": "vision So400m 896x896", "threads": t, "seconds": mean, "sd": sd, "reps": reps, "gflop": flops / 1e9, "gflop_per_s": flops / mean / 1e9, "cores_used": cores})
            })
            .collect();
        outln!("{}", serde_json::to_string_pretty(&v)?)?;
    } else {
        outln!("| model | threads | test | s/image | GFLOP | GFLOP/s | cores used |")?;
        outln!("| --- | ---: | --- | ---: | ---: | ---: | ---: |")?;
        for (t, mean, sd, _, cores) in rows {
            outln!(
                "| SigLIP So400m (random BF16) + projector | {t} | 896x896, {} patches | {mean:.2} ± {sd:.2} | {:.0} | {:.1} | {} |",
                cfg.num_patches(),
                flops / 1e9,
                flops / mean / 1e9,
                cores.map_or("?".to_string(), |c| format!("{c:.2}"))
            )?;
        }
    }
    Ok(())
}

/// User + system CPU time of this process (Linux `/proc/self/stat`, 100 ticks a second).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// What checking k guesses costs: a pass of k + 1 rows (logits for each, as speculative
/// decoding needs) against a one-row decode pass, after `-d` tokens of context. A pass of
/// k + 1 rows that costs `c` one-row passes pays when more than `c - 1` guesses are
/// accepted per pass on average.
fn spec_rows(a: &BenchArgs, model: &gemma3_engine::Model) -> Result<()> {
    let depth = a.depth.first().copied().unwrap_or(0).max(1);
    let max_k = a.spec_rows.iter().copied().max().unwrap_or(1);
    if max_k + 1 > MAX_BATCH {
        bail!("--spec-rows: at most {} guesses per pass", MAX_BATCH - 1);
    }
    let cfg = &model.text.cfg;
    let ctx = depth + max_k + 1;
    if ctx > cfg.max_position_embeddings {
        bail!(
            "--spec-rows needs {ctx} positions; the model allows {}",
            cfg.max_position_embeddings
        );
    }
    let tokens = bench_tokens(cfg.vocab_size, ctx);
    println!(
        "| threads | rows (1 + k) | ms per pass | x one row | guesses accepted per pass to pay |"
    );
    println!("|---|---|---|---|---|");
    for &t in &a.threads {
        let pool = pool(t)?;
        pool.install(|| -> Result<()> {
            let mut cache = model.text.new_cache(ctx, MAX_BATCH);
            let mut ws = Workspace::new(cfg, MAX_BATCH);
            for chunk in tokens[..depth].chunks(512) {
                model
                    .text
                    .forward(chunk, &mut cache, &mut ws, Logits::None, &mut |_, _| {})?;
            }
            let mut time = |rows: usize| -> Result<f64> {
                let reps = a.reps * 4;
                let mut best = f64::MAX;
                for _ in 0..reps {
                    let t0 = Instant::now();
                    let logits = if rows == 1 { Logits::Last } else { Logits::All };
                    model.text.forward(
                        &tokens[depth..depth + rows],
                        &mut cache,
                        &mut ws,
                        logits,
                        &mut |_, _| {},
                    )?;
                    best = best.min(t0.elapsed().as_secs_f64());
                    if !cache.truncate(depth) {
                        bail!("the cache could not rewind {rows} positions");
                    }
                }
                Ok(best * 1e3)
            };
            let one = time(1)?;
            println!("| {t} | 1 | {one:.2} | 1.00 | - |");
            for &k in &a.spec_rows {
                let ms = time(k + 1)?;
                println!(
                    "| {t} | {} | {ms:.2} | {:.2} | {:.2} |",
                    k + 1,
                    ms / one,
                    ms / one - 1.0
                );
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Tokens as llama-bench uses them: arbitrary ids, here a fixed pseudo-random sequence of
/// `n` ids below `vocab` (never the first two, padding and end of sequence).
fn bench_tokens(vocab: usize, n: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (2 + (i.wrapping_mul(2_654_435_761) % (vocab as u64 - 2))) as u32)
        .collect()
}

/// A pool of `t` threads to run a test in (as the model runs its work: a call from outside
/// a pool would time the hand-off to its threads too).
fn pool(t: usize) -> Result<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(t)
        .build()
        .context("thread pool")
}
