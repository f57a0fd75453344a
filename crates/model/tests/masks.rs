//! Prefill attention masks against the ones transformers builds
//! (../shared/fixtures/mask_cases.json): causal, sliding, and bidirectional image blocks.

mod common;
use gemma3_model::attention_mask;

#[test]
fn masks_match_transformers() {
    let v: serde_json::Value = serde_json::from_slice(
        &std::fs::read(common::shared().join("fixtures/mask_cases.json")).unwrap(),
    )
    .unwrap();
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 3);
    for c in cases {
        // token_type_ids 1 marks image soft tokens: use them as the token ids themselves.
        let tokens: Vec<u32> = c["token_type_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        let w = c["sliding_window"].as_u64().unwrap() as usize;
        for (key, window) in [("mask_full", None), ("mask_sliding", Some(w))] {
            let want: Vec<String> = c[key]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_str().unwrap().to_string())
                .collect();
            let got: Vec<String> = attention_mask(&tokens, Some(1), window)
                .iter()
                .map(|row| row.iter().map(|&b| if b { '1' } else { '.' }).collect())
                .collect();
            assert_eq!(got, want, "{} {key}", c["name"]);
        }
    }
}
