//! Constrained decoding on the real Gemma 3 270M: JSON schemas, any JSON object, regexes and
//! Lark grammars are obeyed, greedy and sampled; a grammar that cannot be compiled is an
//! error naming the reason; constrained sequences batched with others give their solo
//! tokens; the first mask is computed quickly.

use gemma3_engine::{EngineError, GenerateOptions, Grammar, Model, SamplingParams};
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Instant;

mod common;
use common::open_real_model;

fn model() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(open_real_model)
}

fn gen(
    prompt: &str,
    g: Grammar,
    max: usize,
    sampling: SamplingParams,
) -> gemma3_engine::Generation {
    let opts = GenerateOptions {
        max_new_tokens: max,
        sampling,
        constraint: Some(g),
        ..Default::default()
    };
    model().generate(prompt, &opts, |_| true).unwrap()
}

#[test]
fn json_schema_replies_parse_and_follow_the_schema() {
    let schema = json!({
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 16},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 2}
        },
        "required": ["name", "age", "tags"],
        "additionalProperties": false
    });
    for (i, sampling) in [SamplingParams::greedy(), SamplingParams::gemma_default(5)]
        .into_iter()
        .enumerate()
    {
        let g = gen(
            "A person as JSON:",
            Grammar::JsonSchema(schema.clone()),
            120,
            sampling,
        );
        assert_eq!(
            g.stop,
            gemma3_engine::StopReason::EndOfSequence,
            "case {i}: {}",
            g.text
        );
        let v: Value = serde_json::from_str(&g.text).unwrap_or_else(|e| panic!("{e}: {}", g.text));
        assert!(v["name"].as_str().unwrap().chars().count() <= 16, "{v}");
        let age = v["age"].as_i64().unwrap();
        assert!((0..=120).contains(&age), "{v}");
        let tags = v["tags"].as_array().unwrap();
        assert!((1..=2).contains(&tags.len()), "{v}");
        assert_eq!(v.as_object().unwrap().len(), 3, "{v}");
        // The separators models write most, no other whitespace.
        assert!(g.text.starts_with("{\"name\": \""), "{}", g.text);
    }
    let g = gen(
        "Some JSON:",
        Grammar::JsonObject,
        80,
        SamplingParams::greedy(),
    );
    if g.stop == gemma3_engine::StopReason::EndOfSequence {
        assert!(serde_json::from_str::<Value>(&g.text).unwrap().is_object());
    }
}

#[test]
fn regexes_and_lark_grammars_are_obeyed() {
    let g = gen(
        "Call me at",
        Grammar::Regex("[0-9]{3}-[0-9]{4}".into()),
        20,
        SamplingParams::greedy(),
    );
    let t = &g.text;
    assert!(
        t.len() == 8
            && t.as_bytes()[3] == b'-'
            && t.chars().filter(char::is_ascii_digit).count() == 7,
        "{t}"
    );
    assert_eq!(g.stop, gemma3_engine::StopReason::EndOfSequence);
    let lark = "start: answer \".\"\nanswer: \"yes\" | \"no\"\n";
    let g = gen(
        "Is the sky blue?",
        Grammar::Lark(lark.into()),
        10,
        SamplingParams::gemma_default(1),
    );
    assert!(g.text == "yes." || g.text == "no.", "{}", g.text);
}

#[test]
fn grammars_that_cannot_compile_are_errors_naming_the_reason() {
    let c = model().constraints().unwrap();
    let bad = [
        Grammar::JsonSchema(
            json!({"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}}),
        ),
        Grammar::Regex("(unclosed".into()),
        Grammar::Lark("start: missing_rule\n".into()),
        Grammar::JsonSchema(json!({"type": "integer", "minimum": 5, "maximum": 1})),
    ];
    for g in bad {
        match c.matcher(&g) {
            Err(EngineError::Grammar(msg)) => {
                assert!(
                    msg.contains("cannot be used to constrain the output"),
                    "{msg}"
                )
            }
            Err(e) => panic!("{g:?}: a different error: {e}"),
            Ok(_) => panic!("{g:?} compiled"),
        }
    }
    // Through a sequence, too: nothing is generated.
    let opts = GenerateOptions {
        constraint: Some(Grammar::Regex("(".into())),
        ..Default::default()
    };
    assert!(matches!(
        model().generate("x", &opts, |_| true),
        Err(EngineError::Grammar(_))
    ));
}

#[test]
fn the_first_mask_allows_only_what_opens_the_object() {
    let c = model().constraints().unwrap();
    let schema = json!({"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city", "days"]});
    let t0 = Instant::now();
    let mut m = c.matcher(&Grammar::JsonSchema(schema)).unwrap();
    let mut logits = vec![0.0f32; model().text.cfg.vocab_size];
    m.mask(&mut logits, &mut []).unwrap();
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    eprintln!("compile + first mask: {ms:.1} ms");
    let allowed = logits.iter().filter(|l| l.is_finite()).count();
    assert!(
        allowed > 0 && allowed < 1000,
        "{allowed} tokens may start the object"
    );
}

#[test]
fn constrained_sequences_batched_together_give_their_solo_tokens() {
    let m = model();
    let schema = json!({"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 8}}, "required": ["a", "b"]});
    let cases: Vec<(&str, GenerateOptions)> = (0..6)
        .map(|i| {
            let constraint = match i % 3 {
                0 => Some(Grammar::JsonSchema(schema.clone())),
                1 => Some(Grammar::Regex("[a-z]+( [a-z]+)*\\.".into())),
                _ => None,
            };
            let prompt = ["JSON:", "A sentence:", "Once upon a time"][i % 3];
            (
                prompt,
                GenerateOptions {
                    max_new_tokens: 16 + i,
                    sampling: match i % 2 {
                        0 => SamplingParams::greedy(),
                        _ => SamplingParams::gemma_default(i as u64),
                    },
                    logprobs: (i == 3).then_some(2),
                    constraint,
                    ..Default::default()
                },
            )
        })
        .collect();
    let solo: Vec<_> = cases
        .iter()
        .map(|(p, o)| m.generate(p, o, |_| true).unwrap())
        .collect();
    let seqs = common::run_batched(m, &cases, 256, 5);
    for (i, (s, want)) in seqs.iter().zip(&solo).enumerate() {
        assert_eq!(s.generation().tokens, want.tokens, "case {i}");
        assert_eq!(s.generation().stop, want.stop, "case {i}");
    }
}

/// Tool calls in both syntaxes: every call the grammar lets through parses back into the
/// arguments object with its required keys, whichever choice forced it.
#[test]
fn tool_call_grammars_give_calls_that_parse() {
    use gemma3_engine::tools::{CallParser, CallSyntax, Tool, ToolChoice, Tools};
    let weather = json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 40},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "unit"], "additionalProperties": false});
    let time = json!({"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
        "required": ["timezone"], "additionalProperties": false});
    let tools = |choice| Tools {
        tools: vec![
            Tool {
                name: "get_weather".into(),
                description: "Weather in a city".into(),
                parameters: weather.clone(),
            },
            Tool {
                name: "get_time".into(),
                description: "Time in a timezone".into(),
                parameters: time.clone(),
            },
        ],
        choice,
        parallel: true,
    };
    for syntax in [CallSyntax::JsonBlocks, CallSyntax::FunctionGemma] {
        for choice in [ToolChoice::Required, ToolChoice::Named("get_time".into())] {
            let t = tools(choice.clone());
            let g = t.grammar(syntax, model()).unwrap().unwrap();
            let out = gen(
                "The weather in Paris? Call a tool.\n",
                g,
                80,
                SamplingParams::greedy(),
            );
            let mut p = CallParser::new(syntax);
            p.push(&out.text);
            p.finish();
            eprintln!("{syntax:?} {choice:?}: {:?}", out.text);
            assert!(
                !p.complete_calls().is_empty(),
                "{syntax:?} {choice:?}: no call in {:?}",
                out.text
            );
            for c in p.complete_calls() {
                let args: Value = serde_json::from_str(&c.arguments).unwrap();
                let keys: &[&str] = match c.name.as_str() {
                    "get_weather" => &["city", "unit"],
                    _ => &["timezone"],
                };
                for k in keys {
                    assert!(
                        args.get(k).is_some(),
                        "{syntax:?}: {} lacks {k}: {}",
                        c.name,
                        c.arguments
                    );
                }
            }
        }
    }
}
