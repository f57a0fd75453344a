//! Constrained decoding: a reply that must follow a JSON schema, be any JSON object, match a
//! regular expression or a Lark grammar. Built on llguidance: one parser factory per model
//! (the token trie of its tokenizer, made once), one matcher per sequence.
//!
//! The mask stays off the critical path: a sequence samples as usual, then asks the matcher
//! whether that one token may come next (cheap); only when it may not is the full mask
//! computed, the refused tokens taken out of the logits and the token sampled again (as
//! llama.cpp samples with a grammar). Greedy decoding thus gets the best allowed token and a
//! sampled one a draw from the allowed tokens' distribution, with penalties, top-k/p and
//! temperature acting on them. With log-probabilities asked for, the mask is applied first,
//! so the log-probabilities are those of the allowed distribution. Sequences sample in
//! parallel, so the masks of a batch are computed in parallel too.

use crate::EngineError;
use gemma3_text::{TokenType, Tokenizer};
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory, TokenParser};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

/// Grammars kept compiled, most recent first: a request's choices, the server's check
/// before queuing and an agent that sends the same schema every time compile it once.
const COMPILED_KEPT: usize = 32;

/// What a reply must follow.
#[derive(Clone, Debug, PartialEq)]
pub enum Grammar {
    /// A JSON Schema (what llguidance supports of draft 2020-12: `$ref`/`$defs`, `anyOf`,
    /// `oneOf`, `pattern`, numeric bounds, `minItems`/`maxItems`, `enum`/`const`, ...).
    JsonSchema(Value),
    /// Any JSON object (OpenAI's `json_object`).
    JsonObject,
    /// A regular expression the whole reply matches.
    Regex(String),
    /// A Lark grammar in llguidance's dialect (`start:` rule; `%json {…}` embeds a schema).
    Lark(String),
    /// A tool-call grammar (Lark) that may end after any complete call: the reply ends as
    /// soon as the model, at a point where the grammar could end, wants a token the grammar
    /// refuses (it wants to leave the call syntax; forcing it on would make it call again
    /// and again until it runs out of tokens).
    ToolCalls(String),
}

/// How constrained JSON is written: `", "` and `": "` between items and keys, no other
/// whitespace. Free whitespace lets a small model loop on spaces and newlines until it runs
/// out of tokens; these separators are the ones models write most.
///
/// `oneOf` is read as `anyOf` (llguidance's `coerce_one_of`): real schemas use it for
/// alternatives that do not overlap, where the two agree.
pub fn json_format() -> Value {
    json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": ",
           "coerce_one_of": true})
}

/// The largest integer a JSON reader keeps exactly (2^53 - 1).
const JSON_SAFE_INTEGER: i64 = (1 << 53) - 1;

/// Bounds every `integer` and `number` with no bound of its own to ±(2^53 - 1), the
/// integers JSON readers keep exactly: a small model that starts repeating a digit must
/// then close the number, instead of writing digits until it runs out of tokens. Constants, enums, defaults and
/// examples are data and are left alone.
pub(crate) fn bound_integers(schema: &mut Value) {
    match schema {
        Value::Object(o) => {
            let numeric = |t: &Value| t == "integer" || t == "number";
            let integer = match o.get("type") {
                Some(t @ Value::String(_)) => numeric(t),
                Some(Value::Array(ts)) => ts.iter().any(numeric),
                _ => false,
            };
            if integer {
                if !o.contains_key("minimum") && !o.contains_key("exclusiveMinimum") {
                    o.insert("minimum".into(), json!(-JSON_SAFE_INTEGER));
                }
                if !o.contains_key("maximum") && !o.contains_key("exclusiveMaximum") {
                    o.insert("maximum".into(), json!(JSON_SAFE_INTEGER));
                }
            }
            for (k, v) in o.iter_mut() {
                if !matches!(k.as_str(), "const" | "enum" | "default" | "examples") {
                    bound_integers(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(bound_integers),
        _ => {}
    }
}

impl Grammar {
    fn top_level(&self) -> TopLevelGrammar {
        match self {
            Grammar::JsonSchema(s) => {
                let mut s = s.clone();
                bound_integers(&mut s);
                if let Some(o) = s.as_object_mut() {
                    o.entry("x-guidance").or_insert_with(json_format);
                }
                TopLevelGrammar::from_json_schema(s)
            }
            Grammar::JsonObject => TopLevelGrammar::from_json_schema(
                json!({"type": "object", "x-guidance": json_format()}),
            ),
            Grammar::Regex(r) => TopLevelGrammar::from_regex(r),
            Grammar::Lark(g) | Grammar::ToolCalls(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }
}

/// A model's tokens as llguidance sees them: each token's bytes (control and unused tokens
/// as llguidance's special-token form, so that no text can produce them), with `<eos>` and
/// `<end_of_turn>` both ending a reply.
struct TokenBytes {
    trie: TokTrie,
}

impl TokenizerEnv for TokenBytes {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.greedy_tokenize(s)
    }

    /// Greedy tokenization is not SentencePiece's: llguidance must not force tokens from it.
    fn tokenize_is_canonical(&self) -> bool {
        false
    }
}

/// Compiles grammars for one model (shared by all its sequences).
pub struct Constraints {
    factory: ParserFactory,
    /// Recently compiled grammars, each a fresh parser to clone.
    compiled: Mutex<VecDeque<(Grammar, TokenParser)>>,
    /// Tokens the grammar knows (the tokenizer's); logits beyond are never allowed.
    vocab: usize,
    eos: Vec<u32>,
}

impl Constraints {
    /// The factory for `tok`'s vocabulary; `eos` are the ids that end a reply.
    pub fn new(tok: &Tokenizer, eos: &[u32]) -> Result<Constraints, EngineError> {
        let vocab = tok.vocab_size();
        let words: Vec<Vec<u8>> = (0..vocab as u32)
            .map(|id| {
                let text = matches!(
                    tok.token_type(id),
                    Some(TokenType::Normal | TokenType::Byte | TokenType::UserDefined)
                );
                let bytes = tok.piece_bytes(id);
                match text && !bytes.is_empty() {
                    true => bytes,
                    false => {
                        let mut w = vec![TokTrie::SPECIAL_TOKEN_MARKER];
                        w.extend_from_slice(tok.id_to_piece(id).unwrap_or("").as_bytes());
                        w
                    }
                }
            })
            .collect();
        let mut eos: Vec<u32> = eos
            .iter()
            .copied()
            .filter(|&t| (t as usize) < vocab)
            .collect();
        if eos.is_empty() {
            eos.push(tok.eos_id());
        }
        let mut info = TokRxInfo::new(vocab as u32, eos[0]);
        info.tok_bos = Some(tok.bos_id());
        info.tok_end_of_turn = tok.token_to_id("<end_of_turn>");
        let trie = TokTrie::from(&info, &words).with_eos_tokens(&eos);
        let env: TokEnv = Arc::new(TokenBytes { trie });
        let mut factory = ParserFactory::new_simple(&env)
            .map_err(|e| EngineError::Load(format!("building the grammar engine: {e}")))?;
        // The library never prints: compile errors come back as values.
        factory.quiet();
        Ok(Constraints {
            factory,
            compiled: Mutex::new(VecDeque::new()),
            vocab,
            eos,
        })
    }

    /// Compiles `g` for one sequence; a grammar or schema that cannot be compiled is an
    /// error naming llguidance's reason.
    pub fn matcher(&self, g: &Grammar) -> Result<Constraint, EngineError> {
        let matcher = Matcher::new(Ok(self.parser(g)?));
        if let Some(e) = matcher.get_error() {
            return Err(EngineError::Grammar(grammar_error(g, &e)));
        }
        Ok(Constraint {
            matcher,
            vocab: self.vocab,
            eos: self.eos.clone(),
            masks: 0,
            end_when_refused: matches!(g, Grammar::ToolCalls(_)),
        })
    }
}

impl Constraints {
    /// A fresh parser for `g`: a copy of the compiled one kept, or compiled now (outside
    /// the lock, so other sequences do not wait for it) and kept.
    fn parser(&self, g: &Grammar) -> Result<TokenParser, EngineError> {
        let lock = || self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut kept = lock();
            if let Some(i) = kept.iter().position(|(k, _)| k == g) {
                let entry = kept.remove(i).expect("the position is inside");
                let parser = entry.1.deep_clone();
                kept.push_front(entry);
                return Ok(parser);
            }
        }
        let parser = self
            .factory
            .create_parser(g.top_level())
            .map_err(|e| EngineError::Grammar(grammar_error(g, &e.to_string())))?;
        let mut kept = lock();
        kept.push_front((g.clone(), parser.deep_clone()));
        kept.truncate(COMPILED_KEPT);
        Ok(parser)
    }
}

fn grammar_error(g: &Grammar, reason: &str) -> String {
    let what = match g {
        Grammar::JsonSchema(_) => "the JSON schema",
        Grammar::JsonObject => "the JSON object grammar",
        Grammar::Regex(_) => "the regular expression",
        Grammar::Lark(_) => "the grammar",
        Grammar::ToolCalls(_) => "the tool-call grammar",
    };
    format!("{what} cannot be used to constrain the output: {reason}")
}

/// One sequence's place in its grammar.
pub struct Constraint {
    matcher: Matcher,
    vocab: usize,
    eos: Vec<u32>,
    /// Full masks computed so far (the cheap check refused the sampled token).
    masks: usize,
    /// End the reply, where the grammar can end, rather than mask a refused token.
    end_when_refused: bool,
}

impl Constraint {
    /// Whether `tok` may come next (an end-of-reply token when the grammar can end here).
    pub fn allows(&mut self, tok: u32) -> bool {
        if self.eos.contains(&tok) {
            return self.matcher.is_accepting().unwrap_or(false);
        }
        (tok as usize) < self.vocab && self.matcher.validate_tokens(&[tok]).unwrap_or(0) == 1
    }

    /// How many of `toks`, in order from here, the grammar would take (without moving):
    /// guesses past that could never be accepted. An end-of-reply token ends the count.
    pub fn valid_prefix(&mut self, toks: &[u32]) -> usize {
        let n = toks
            .iter()
            .position(|t| self.eos.contains(t) || *t as usize >= self.vocab)
            .unwrap_or(toks.len());
        self.matcher.validate_tokens(&toks[..n]).unwrap_or(0)
    }

    /// Takes every token the grammar refuses out of `logits`, and out of `also` unless it
    /// is empty (sets them to -inf).
    pub fn mask(&mut self, logits: &mut [f32], also: &mut [f32]) -> Result<(), EngineError> {
        self.masks += 1;
        let mask: SimpleVob = self
            .matcher
            .compute_mask()
            .map_err(|e| EngineError::Grammar(format!("the output constraint failed: {e}")))?;
        for row in [logits, also] {
            let n = self.vocab.min(row.len());
            for (i, l) in row[..n].iter_mut().enumerate() {
                if !mask.is_allowed(i as u32) {
                    *l = f32::NEG_INFINITY;
                }
            }
            row[n..].fill(f32::NEG_INFINITY);
        }
        if mask.num_set() == 0 {
            return Err(EngineError::Grammar(
                "the output constraint allows no token here".into(),
            ));
        }
        Ok(())
    }

    /// Moves past `tok` (one `allows` accepted).
    pub fn consume(&mut self, tok: u32) -> Result<(), EngineError> {
        if self.eos.contains(&tok) {
            return Ok(());
        }
        self.matcher
            .consume_token(tok)
            .map_err(|e| EngineError::Grammar(format!("the output constraint failed: {e}")))
    }

    /// The token that ends the reply here, when the grammar ends replies the model wants to
    /// take elsewhere ([`Grammar::ToolCalls`]) and can end at this point.
    pub fn end_instead(&mut self) -> Option<u32> {
        let can_end = self.end_when_refused && self.matcher.is_accepting().unwrap_or(false);
        can_end.then(|| self.eos[0])
    }

    /// Whether the grammar is complete and nothing more may follow.
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }

    /// How many full masks were computed.
    pub fn masks_computed(&self) -> usize {
        self.masks
    }
}
