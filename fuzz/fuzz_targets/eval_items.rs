//! An eval task's JSON Lines data: the reader, then what the harness derives from each
//! item (few-shot examples and prefixes, requests, acc_norm lengths). The first byte picks
//! the task and the shot count; the rest is the file's text.
#![no_main]

use gemma3_eval::eval::{fewshot_prefix, parse_items, shot_indices, Task};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    let task = Task::ALL[sel as usize % Task::ALL.len()];
    let shots = (sel >> 4) as usize;
    let Ok(items) = parse_items(task, text, "fuzz.jsonl") else {
        return;
    };
    for (i, item) in items.iter().enumerate() {
        if let Some(gold) = item.gold() {
            assert!(gold < item.requests("").len());
        }
        let prefix = fewshot_prefix(&items, i, shots, u64::from(sel));
        let _ = item.requests(&prefix);
        let _ = item.choice_lengths();
        let picked = shot_indices(items.len(), i, shots, u64::from(sel));
        assert!(picked.iter().all(|&j| j != i && j < items.len()));
    }
});
