//! The evaluation harness on the real Gemma 3 270M Q4_K_M against Hugging Face transformers
//! (`shared/reference/transformers_270m_loglik.jsonl`: every request of the quick subsets
//! in `shared/evals/quick/`, float32): the lm-eval token split, per-choice log-likelihoods,
//! per-item accuracies, LAMBADA greediness and perplexity; plus few-shot prompts, KV reuse,
//! and clear errors on bad input.
//!
//! Every reference request's token split is checked. Log-likelihoods are checked on the
//! first `GEMMA3_EVAL_ITEMS` items of every task (default 24, LAMBADA twice that; 0 = all
//! the reference has) to keep the suite within a few minutes on 2 cores.

use gemma3_engine::Model;
use gemma3_eval::eval::{self, Item, ItemResult, Task};
use gemma3_model::Precision;
use std::collections::HashMap;
use std::sync::OnceLock;

#[path = "../../engine/tests/common/mod.rs"]
mod common;
use common::{open_real_model, shared};

/// The model multiplying in f32, as transformers does (the harness's default).
fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| {
        let mut m = open_real_model();
        m.set_precision(Precision::Exact);
        m
    })
}

struct RefRequest {
    context_ids: Vec<u32>,
    continuation_ids: Vec<u32>,
    loglik: f64,
    n_tokens: usize,
    is_greedy: bool,
}

struct RefItem {
    task: String,
    requests: Vec<RefRequest>,
    acc: f64,
    acc_norm: Option<f64>,
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// The reference by item id, and the ids in file order.
fn reference() -> &'static (HashMap<String, RefItem>, Vec<String>) {
    static R: OnceLock<(HashMap<String, RefItem>, Vec<String>)> = OnceLock::new();
    R.get_or_init(|| {
        let path = shared().join("reference/transformers_270m_loglik.jsonl");
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let mut map = HashMap::new();
        let mut order = Vec::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            let requests = v["requests"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| RefRequest {
                    context_ids: ids(&r["context_ids"]),
                    continuation_ids: ids(&r["continuation_ids"]),
                    loglik: r["loglik"].as_f64().unwrap(),
                    n_tokens: r["n_tokens"].as_u64().unwrap() as usize,
                    is_greedy: r["is_greedy"].as_bool().unwrap(),
                })
                .collect();
            let id = v["id"].as_str().unwrap().to_string();
            order.push(id.clone());
            map.insert(
                id,
                RefItem {
                    task: v["task"].as_str().unwrap().to_string(),
                    requests,
                    acc: v["acc"].as_f64().unwrap(),
                    acc_norm: v["acc_norm"].as_f64(),
                },
            );
        }
        (map, order)
    })
}

fn quick_items(task: Task) -> Vec<Item> {
    let p = shared().join(format!("evals/quick/{}.jsonl", task.name()));
    eval::load_items(task, &p).unwrap()
}

/// Items per task scored by default: enough to see a difference in log-likelihoods, few
/// enough for the suite's 20 minutes (the whole reference: `GEMMA3_EVAL_ITEMS=0`).
const DEFAULT_EVAL_ITEMS: usize = 24;

/// How many items per task to score (LAMBADA: twice as many; it is cheap per item).
fn items_per_task(task: Task) -> usize {
    let n = std::env::var("GEMMA3_EVAL_ITEMS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_EVAL_ITEMS);
    match (n, task) {
        (0, _) => usize::MAX,
        (n, Task::LambadaOpenai) => 2 * n,
        (n, _) => n,
    }
}

#[test]
fn token_split_matches_lm_eval_for_every_reference_request() {
    let m = model();
    let (refs, _) = reference();
    let mut checked = 0;
    for task in Task::ALL {
        let items = quick_items(task);
        for (i, item) in items.iter().enumerate() {
            let Some(r) = refs.get(&item.id) else {
                continue;
            };
            let ours = eval::item_requests(m, &items, i, 0, eval::DEFAULT_SEED);
            assert_eq!(ours.len(), r.requests.len(), "{}: request count", item.id);
            for (j, ((c, k), q)) in ours.iter().zip(&r.requests).enumerate() {
                assert_eq!(c, &q.context_ids, "{} request {j}: context ids", item.id);
                assert_eq!(
                    k, &q.continuation_ids,
                    "{} request {j}: continuation ids",
                    item.id
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 1599, "every reference request is checked");
}

#[test]
fn logliks_and_accuracies_match_transformers() {
    let m = model();
    let (refs, _) = reference();
    let mut scorer = eval::Scorer::new(m);
    let (mut all_within, mut all_total) = (0usize, 0usize);
    let mut failures = Vec::new();
    let t0 = std::time::Instant::now();
    for task in Task::ALL {
        let items = quick_items(task);
        let limit = items_per_task(task);
        let mut results: Vec<(ItemResult, &RefItem)> = Vec::new();
        for (i, item) in items.iter().enumerate() {
            if results.len() >= limit {
                break;
            }
            let Some(r) = refs.get(&item.id) else {
                continue;
            };
            assert_eq!(r.task, task.name());
            let ours = eval::score_item(&mut scorer, task, &items, i, 0, eval::DEFAULT_SEED)
                .unwrap_or_else(|e| panic!("{}: {e}", item.id));
            results.push((ours, r));
        }
        let n = results.len();
        assert!(n > 0, "{task}: no reference items");
        let (mut within, mut total, mut max_diff) = (0usize, 0usize, 0f64);
        let (mut acc_ours, mut acc_ref, mut norm_ours, mut norm_ref) = (0.0, 0.0, 0.0, 0.0);
        let mut greedy_diff = 0;
        for (o, r) in &results {
            for (j, q) in r.requests.iter().enumerate() {
                let d = (o.logliks[j] - q.loglik).abs();
                max_diff = max_diff.max(d);
                within += (d <= 0.05) as usize;
                total += 1;
                assert_eq!(o.n_tokens[j], q.n_tokens, "{} request {j}: n_tokens", o.id);
                greedy_diff += (o.is_greedy[j] != q.is_greedy) as usize;
            }
            acc_ours += o.acc;
            acc_ref += r.acc;
            if task.has_acc_norm() {
                norm_ours += o.acc_norm.expect("acc_norm");
                norm_ref += r.acc_norm.expect("reference acc_norm");
            }
        }
        // "Within 2 items per 100", at least 1 item on a smaller sample.
        let allowed = (2.0 * n as f64 / 100.0).max(1.0);
        eprintln!(
            "{task}: {n} items, {within}/{total} choices within 0.05 nats (max diff {max_diff:.4}); acc {acc_ours} vs {acc_ref}, acc_norm {norm_ours} vs {norm_ref}, is_greedy differs in {greedy_diff}; {:.0} s so far",
            t0.elapsed().as_secs_f64()
        );
        if (within as f64) < 0.95 * total as f64 {
            failures.push(format!(
                "{task}: only {within}/{total} choices within 0.05 nats"
            ));
        }
        if (acc_ours - acc_ref).abs() > allowed {
            failures.push(format!(
                "{task}: {acc_ours} correct, transformers {acc_ref}"
            ));
        }
        if (norm_ours - norm_ref).abs() > allowed {
            failures.push(format!(
                "{task}: {norm_ours} correct by acc_norm, transformers {norm_ref}"
            ));
        }
        if task == Task::LambadaOpenai {
            let ll = |f: &dyn Fn(&(ItemResult, &RefItem)) -> f64| {
                results.iter().map(f).sum::<f64>() / n as f64
            };
            let ppl_ours = (-ll(&|(o, _)| o.logliks[0])).exp();
            let ppl_ref = (-ll(&|(_, r)| r.requests[0].loglik)).exp();
            eprintln!("{task}: perplexity {ppl_ours:.3} vs {ppl_ref:.3}");
            if (ppl_ours / ppl_ref - 1.0).abs() > 0.01 {
                failures.push(format!("{task}: perplexity {ppl_ours} vs {ppl_ref}"));
            }
        }
        all_within += within;
        all_total += total;
    }
    assert!(
        failures.is_empty(),
        "disagreements with transformers:\n{}",
        failures.join("\n")
    );
    assert!(all_within as f64 >= 0.95 * all_total as f64);
}

#[test]
fn kv_reuse_gives_the_same_logliks_as_separate_runs() {
    let m = model();
    let mut scorer = eval::Scorer::new(m);
    // Few-shot prompts: HellaSwag choices share a long context; WinoGrande contexts share
    // only the shots and the start of the sentence.
    for (task, shots) in [(Task::Hellaswag, 2), (Task::Winogrande, 3)] {
        let items = quick_items(task);
        let reqs = eval::item_requests(m, &items, 7, shots, 99);
        let together = scorer.score(&reqs).unwrap();
        for (j, r) in reqs.iter().enumerate() {
            let alone = scorer.score(std::slice::from_ref(r)).unwrap();
            assert_eq!(alone[0].n_tokens, together[j].n_tokens);
            assert_eq!(alone[0].is_greedy, together[j].is_greedy);
            assert!(
                (alone[0].loglik - together[j].loglik).abs() < 1e-4,
                "{task} request {j}: {} alone, {} with a shared prefix",
                alone[0].loglik,
                together[j].loglik
            );
        }
    }
}

#[test]
fn fewshot_prompts_follow_lm_eval_and_leave_the_item_out() {
    let items = quick_items(Task::ArcEasy);
    let i = 5;
    let shots = eval::shot_indices(items.len(), i, 3, 1234);
    assert_eq!(shots.len(), 3);
    assert!(!shots.contains(&i));
    let prefix = eval::fewshot_prefix(&items, i, 3, 1234);
    let expected: String = shots
        .iter()
        .map(|&j| format!("{}\n\n", items[j].as_shot()))
        .collect();
    assert_eq!(prefix, expected);
    let reqs = items[i].requests(&prefix);
    let eval::ItemData::MultipleChoice {
        context, choices, ..
    } = &items[i].data
    else {
        panic!("arc_easy is multiple choice")
    };
    assert_eq!(reqs[0].0, format!("{prefix}{context}"));
    assert_eq!(reqs[0].1, choices[0]);
    // A shot is context + gold choice.
    let eval::ItemData::MultipleChoice {
        context: c0,
        choices: ch0,
        gold: g0,
    } = &items[shots[0]].data
    else {
        panic!()
    };
    assert!(prefix.starts_with(&format!("{c0}{}\n\n", ch0[*g0])));
    // WinoGrande shots: the gold context + the continuation.
    let w = quick_items(Task::Winogrande);
    let eval::ItemData::PartialContexts {
        contexts,
        continuation,
        gold,
    } = &w[0].data
    else {
        panic!()
    };
    assert_eq!(w[0].as_shot(), format!("{}{continuation}", contexts[*gold]));
    // Same seed, same shots; the seed matters.
    assert_eq!(shots, eval::shot_indices(items.len(), i, 3, 1234));
    assert_ne!(shots, eval::shot_indices(items.len(), i, 3, 1235));
}

#[test]
fn summary_has_the_json_contract_keys() {
    let items = quick_items(Task::Piqa);
    let lls = [
        eval::LogLik {
            loglik: -10.0,
            n_tokens: 3,
            is_greedy: false,
        },
        eval::LogLik {
            loglik: -12.0,
            n_tokens: 4,
            is_greedy: false,
        },
    ];
    let r = eval::item_result(Task::Piqa, &items[0], &lls);
    assert_eq!(r.pred, Some(0));
    let s = eval::summarize(Task::Piqa, 0, 1234, std::slice::from_ref(&r));
    let v = serde_json::to_value(&s).unwrap();
    for k in [
        "task",
        "n",
        "shots",
        "seed",
        "acc",
        "acc_stderr",
        "acc_norm",
        "acc_norm_stderr",
    ] {
        assert!(v.get(k).is_some(), "summary lacks {k}");
    }
    let v = serde_json::to_value(&r).unwrap();
    for k in ["id", "logliks", "n_tokens", "pred", "pred_norm", "gold"] {
        assert!(v.get(k).is_some(), "item lacks {k}");
    }
    // No acc_norm for WinoGrande (null, not absent); LAMBADA has a perplexity.
    let w = quick_items(Task::Winogrande);
    let s = eval::summarize(
        Task::Winogrande,
        0,
        1,
        &[eval::item_result(Task::Winogrande, &w[0], &lls)],
    );
    let v = serde_json::to_value(&s).unwrap();
    assert!(v["acc_norm"].is_null() && v.get("acc_norm").is_some());
    let l = quick_items(Task::LambadaOpenai);
    let r = eval::item_result(Task::LambadaOpenai, &l[0], &lls[..1]);
    assert!(r.gold.is_none() && r.pred.is_none());
    let v = serde_json::to_value(eval::summarize(Task::LambadaOpenai, 0, 1, &[r])).unwrap();
    assert!((v["ppl"].as_f64().unwrap() - 10f64.exp()).abs() < 1e-6);
}

#[test]
fn bad_input_is_a_clear_error_naming_file_and_line() {
    let dir = std::env::temp_dir().join(format!("gemma3-eval-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = r#"{"id": "piqa-0", "context": "Question: x\nAnswer:", "choices": [" a", " b"], "gold": 0}"#;
    let err = |task: Task, p: &std::path::Path| eval::load_items(task, p).unwrap_err().to_string();

    // Missing file.
    let missing = dir.join("nope.jsonl");
    let e = err(Task::Piqa, &missing);
    assert!(e.contains("nope.jsonl") && e.contains("cannot read"), "{e}");
    // Malformed JSON on line 3.
    let p = write(
        "bad.jsonl",
        &format!("{good}\n{}\n{{\"id\": ", good.replace("piqa-0", "piqa-1")),
    );
    let e = err(Task::Piqa, &p);
    assert!(
        e.contains("bad.jsonl:3:") && e.contains("not valid JSON"),
        "{e}"
    );
    // Wrong schema: a multiple-choice file read as WinoGrande, and the reverse.
    let p = write("mc.jsonl", good);
    let e = err(Task::Winogrande, &p);
    assert!(e.contains("mc.jsonl:1:") && e.contains("contexts"), "{e}");
    let p = write(
        "wg.jsonl",
        r#"{"id": "winogrande-0", "contexts": ["a", "b"], "continuation": " c", "gold": 0}"#,
    );
    let e = err(Task::Piqa, &p);
    assert!(
        e.contains("wg.jsonl:1:") && e.contains("\"context\""),
        "{e}"
    );
    // Wrong types and values.
    for (text, what) in [
        (
            r#"{"id": "piqa-0", "context": "q", "choices": " a", "gold": 0}"#,
            "list of strings",
        ),
        (
            r#"{"id": "piqa-0", "context": "q", "choices": [" a", " b"], "gold": 5}"#,
            "out of range",
        ),
        (
            r#"{"id": "piqa-0", "context": "q", "choices": [" a", " b"], "gold": "0"}"#,
            "integer",
        ),
        (
            r#"{"id": "piqa-0", "context": 3, "choices": [" a", " b"], "gold": 0}"#,
            "string",
        ),
        (r#"[1, 2]"#, "JSON object"),
    ] {
        let p = write("t.jsonl", &format!("{good}\n\n{text}\n"));
        let e = err(Task::Piqa, &p);
        assert!(e.contains("t.jsonl:3:") && e.contains(what), "{what}: {e}");
    }
    // Duplicate ids, an empty file, another task's file.
    let p = write("dup.jsonl", &format!("{good}\n{good}\n"));
    assert!(err(Task::Piqa, &p).contains("dup.jsonl:2: duplicate id"));
    let p = write("empty.jsonl", "");
    assert!(err(Task::Piqa, &p).contains("no items"));
    let p = write("arc.jsonl", &good.replace("piqa-0", "arc_easy-0"));
    let e = err(Task::Piqa, &p);
    assert!(e.contains("arc.jsonl:1:") && e.contains("arc_easy"), "{e}");
    // Unknown task.
    let e = Task::from_name("mmlu").unwrap_err().to_string();
    assert!(e.contains("unknown task") && e.contains("hellaswag"), "{e}");
    assert_eq!(Task::from_name("lambada").unwrap(), Task::LambadaOpenai);
    std::fs::remove_dir_all(&dir).ok();
}
