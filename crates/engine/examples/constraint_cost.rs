//! What constrained decoding costs, on a directory of JSON schemas (e.g. JSONSchemaBench's
//! real-world sets): how many compile, the time to compile and compute the first mask, and
//! per generated token the cost of the cheap check (is the sampled token allowed? then
//! move past it) and of a full mask (computed only when the check refuses a token).
//! Each reply is written as a JSON line (file, finished, text) for validation elsewhere
//! (`scripts/bench-structured.sh` validates them with Python's jsonschema).
//!
//! cargo run --release -p gemma3-engine --example constraint_cost -- DIR [MODEL] > replies.jsonl

use gemma3_engine::{GenerateOptions, Grammar, Model, SamplingParams, StopReason};
use serde_json::{json, Value};
use std::time::Instant;

/// Tokens generated per schema.
const MAX_TOKENS: usize = 256;
/// Characters of the schema shown in the prompt.
const SCHEMA_CHARS: usize = 1500;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = args.get(1).ok_or("usage: constraint_cost DIR [MODEL]")?;
    let model = match args.get(2) {
        Some(p) => Model::open(std::path::Path::new(p))?,
        None => Model::open(&gemma3_hub::cached_default_model().ok_or("no default model")?)?,
    };
    let t = Instant::now();
    let c = model.constraints()?;
    eprintln!("token trie: {:.0} ms", t.elapsed().as_secs_f64() * 1e3);

    let mut files: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let (mut compiled, mut finished) = (0, 0);
    let (mut first_ms, mut check_us, mut mask_us) = (Vec::new(), Vec::new(), Vec::new());
    for f in &files {
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(f)?)?;
        let g = Grammar::JsonSchema(schema.clone());
        let t = Instant::now();
        let mut m = match c.matcher(&g) {
            Ok(m) => m,
            Err(e) => {
                eprintln!("{}: {e}", f.display());
                continue;
            }
        };
        let mut logits = vec![0.0f32; model.text.cfg.vocab_size];
        m.mask(&mut logits, &mut [])?;
        first_ms.push(t.elapsed().as_secs_f64() * 1e3);
        compiled += 1;

        let shown: String = schema.to_string().chars().take(SCHEMA_CHARS).collect();
        let prompt = format!("A JSON object that follows this JSON schema:\n{shown}\nJSON:\n");
        let opts = GenerateOptions {
            max_new_tokens: MAX_TOKENS,
            sampling: SamplingParams::greedy(),
            constraint: Some(g.clone()),
            ..Default::default()
        };
        let out = model.generate(&prompt, &opts, |_| true)?;
        let done = out.stop == StopReason::EndOfSequence;
        finished += done as usize;
        println!(
            "{}",
            json!({"file": f.file_name().map(|n| n.to_string_lossy()), "finished": done, "text": out.text})
        );
        // Replay the reply's tokens, timing both paths at every position.
        let mut m = c.matcher(&g)?;
        for &tok in &out.tokens {
            let t = Instant::now();
            m.mask(&mut logits, &mut [])?;
            mask_us.push(t.elapsed().as_secs_f64() * 1e6);
            let t = Instant::now();
            if !m.allows(tok) {
                break;
            }
            m.consume(tok)?;
            check_us.push(t.elapsed().as_secs_f64() * 1e6);
        }
    }
    eprintln!(
        "schemas: {}, compiled: {compiled} ({:.0}%), finished within {MAX_TOKENS} tokens: {finished}",
        files.len(),
        100.0 * compiled as f64 / files.len().max(1) as f64
    );
    eprintln!(
        "compile + first mask: median {:.1} ms, p95 {:.1} ms, max {:.1} ms",
        percentile(&mut first_ms, 0.5),
        percentile(&mut first_ms, 0.95),
        percentile(&mut first_ms, 1.0)
    );
    eprintln!(
        "per token ({} tokens): check+consume median {:.1} us, p99 {:.1} us; full mask median {:.1} us, p99 {:.1} us",
        check_us.len(),
        percentile(&mut check_us, 0.5),
        percentile(&mut check_us, 0.99),
        percentile(&mut mask_us, 0.5),
        percentile(&mut mask_us, 0.99)
    );
    Ok(())
}
