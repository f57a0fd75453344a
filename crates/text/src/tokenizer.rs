//! Gemma 3 tokenizer: SentencePiece vocabularies from GGUF (as llama.cpp's SPM tokenizer reads
//! them) and Hugging Face `tokenizer.json` BPE files, behind one type.
//!
//! Encoding follows llama.cpp (`llama-vocab.cpp`): the text is first cut on special tokens
//! (`tokenizer_st_partition`), each remaining fragment has its spaces escaped to `▁`, and then
//! adjacent symbols are merged through a priority queue (`llm_tokenizer_spm_session`). The two
//! sources differ only in which pair merges first: SentencePiece takes the pair whose
//! concatenation is the highest-scoring token, BPE the pair with the lowest merge rank.

use gemma3_formats::{GgufFile, MetaValue};
use serde::Deserialize;
use serde_json::Value;
use std::borrow::Cow;
use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};
use std::path::{Path, PathBuf};

const SPACE_ESCAPE: &str = "\u{2581}";

/// What can be wrong with a tokenizer source. Messages name the file and key at fault.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{file}: tokenizer metadata key {key} is missing")]
    MissingKey { file: PathBuf, key: String },
    #[error("{file}: tokenizer metadata key {key}: {what}")]
    BadKey {
        file: PathBuf,
        key: String,
        what: String,
    },
    #[error(
        "{file}: tokenizer.ggml.model is {model:?}; only SentencePiece vocabularies (\"llama\") are supported"
    )]
    UnsupportedModel { file: PathBuf, model: String },
    #[error(transparent)]
    Read(#[from] gemma3_formats::FormatError),
    #[error("{path}: not valid JSON for a tokenizer: {err}")]
    Json {
        path: PathBuf,
        err: serde_json::Error,
    },
    #[error("{path}: {field}: {what}")]
    BadJson {
        path: PathBuf,
        field: String,
        what: String,
    },
}

/// A token's kind, as GGUF's `tokenizer.ggml.token_type` numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
    Undefined,
}

impl TokenType {
    pub fn from_gguf(v: i64) -> Self {
        match v {
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => TokenType::Undefined,
        }
    }

    /// GGUF's number for this kind.
    pub fn to_gguf(self) -> i64 {
        match self {
            TokenType::Undefined => 0,
            TokenType::Normal => 1,
            TokenType::Unknown => 2,
            TokenType::Control => 3,
            TokenType::UserDefined => 4,
            TokenType::Unused => 5,
            TokenType::Byte => 6,
        }
    }

    /// Tokens that `parse_special` gates and `skip_special` hides (llama.cpp's attr_special).
    fn is_special(self) -> bool {
        matches!(self, TokenType::Control | TokenType::Unknown)
    }
}

/// The token pieces in one string, with an open-addressing index from piece bytes to id.
/// One allocation for 262k pieces instead of two per piece, and lookups straight from a byte
/// slice of the text being tokenized.
struct Vocab {
    text: String,
    /// Piece `i` is `text[starts[i]..starts[i + 1]]`.
    starts: Vec<u32>,
    /// Token ids (or `EMPTY`) at slot `hash & mask`, linear probing.
    slots: Vec<u32>,
}

const EMPTY: u32 = u32::MAX;

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The slot is taken from the low bits; fold the better-mixed high bits into them.
    h ^ (h >> 32)
}

impl Vocab {
    fn new<S: AsRef<str>>(pieces: &[S]) -> Option<Self> {
        let total: usize = pieces.iter().map(|p| p.as_ref().len()).sum();
        if total >= u32::MAX as usize || pieces.len() >= EMPTY as usize {
            return None;
        }
        let mut text = String::with_capacity(total);
        let mut starts = Vec::with_capacity(pieces.len() + 1);
        starts.push(0);
        for p in pieces {
            text.push_str(p.as_ref());
            starts.push(text.len() as u32);
        }
        let cap = (pieces.len() * 2).next_power_of_two().max(16);
        let mut v = Vocab {
            text,
            starts,
            slots: vec![EMPTY; cap],
        };
        let mask = cap - 1;
        for id in 0..pieces.len() as u32 {
            let key = v.piece(id).as_bytes();
            if key.is_empty() {
                continue;
            }
            let mut slot = fnv1a(key) as usize & mask;
            loop {
                let held = v.slots[slot];
                if held == EMPTY {
                    v.slots[slot] = id;
                    break;
                }
                // A duplicate piece keeps its first id, as llama.cpp's token_to_id.emplace did.
                if v.piece(held).as_bytes() == key {
                    break;
                }
                slot = (slot + 1) & mask;
            }
        }
        Some(v)
    }

    fn len(&self) -> usize {
        self.starts.len() - 1
    }

    fn piece(&self, id: u32) -> &str {
        let i = id as usize;
        &self.text[self.starts[i] as usize..self.starts[i + 1] as usize]
    }

    fn lookup(&self, key: &[u8]) -> Option<u32> {
        if key.is_empty() {
            return None;
        }
        let mask = self.slots.len() - 1;
        let mut slot = fnv1a(key) as usize & mask;
        loop {
            let held = self.slots[slot];
            if held == EMPTY {
                return None;
            }
            if self.piece(held).as_bytes() == key {
                return Some(held);
            }
            slot = (slot + 1) & mask;
        }
    }
}

/// Byte trie over the special tokens; each end node holds the token's priority rank.
struct SpecialTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Default)]
struct TrieNode {
    children: Vec<(u8, u32)>,
    rank: Option<u32>,
}

impl SpecialTrie {
    fn new() -> Self {
        SpecialTrie {
            nodes: vec![TrieNode::default()],
        }
    }

    fn insert(&mut self, key: &[u8], rank: u32) {
        let mut node = 0usize;
        for &b in key {
            node = match self.nodes[node].children.iter().find(|c| c.0 == b) {
                Some(&(_, next)) => next as usize,
                None => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.push((b, next as u32));
                    next
                }
            };
        }
        self.nodes[node].rank = Some(rank);
    }

    /// Calls `f` with the rank of every special token that is a prefix of `bytes`.
    fn prefixes_of(&self, bytes: &[u8], mut f: impl FnMut(u32)) {
        let mut node = 0usize;
        for &b in bytes {
            match self.nodes[node].children.iter().find(|c| c.0 == b) {
                Some(&(_, next)) => node = next as usize,
                None => return,
            }
            if let Some(rank) = self.nodes[node].rank {
                f(rank);
            }
        }
    }
}

/// How adjacent symbols are chosen for merging.
enum Merges {
    /// SentencePiece (GGUF): the pair whose concatenation is the token with the highest score.
    Scores(Vec<f32>),
    /// BPE (tokenizer.json): (left id, right id) -> (rank, merged id); lowest rank first.
    Ranks(HashMap<(u32, u32), (u32, u32)>),
}

/// A piece of text after special-token partitioning.
enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

/// A span of the fragment being merged, linked to its neighbours (llama.cpp's llm_symbol).
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    /// Byte length; 0 once merged into the symbol on its left.
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
    id: Option<u32>,
}

/// A possible merge of `left` with the symbol after it. `size` is their total byte length
/// when the candidate was made: a candidate whose sides have changed since is stale.
struct Candidate {
    prio: f64,
    left: usize,
    right: usize,
    size: usize,
    id: u32,
}

impl Ord for Candidate {
    fn cmp(&self, other: &Self) -> Ordering {
        // Max-heap: higher priority first, then the leftmost pair.
        self.prio
            .total_cmp(&other.prio)
            .then_with(|| other.left.cmp(&self.left))
    }
}
impl PartialOrd for Candidate {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for Candidate {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Candidate {}

/// A loaded vocabulary with its encoder and decoder.
pub struct Tokenizer {
    vocab: Vocab,
    types: Vec<TokenType>,
    merges: Merges,
    /// Control, user-defined and unknown tokens, longest first: their priority order when
    /// partitioning (llama.cpp's cache_special_tokens).
    specials: Vec<u32>,
    trie: SpecialTrie,
    /// The `<0xNN>` token of each byte, for byte fallback.
    byte_ids: [Option<u32>; 256],
    bos: u32,
    eos: u32,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
    escape_whitespace: bool,
    byte_fallback: bool,
    fuse_unk: bool,
    ignore_merges: bool,
}

/// What both loaders hand to `Tokenizer::build`.
struct Parts {
    vocab: Vocab,
    types: Vec<TokenType>,
    merges: Merges,
    bos: u32,
    eos: u32,
    unk: Option<u32>,
    pad: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
    escape_whitespace: bool,
    byte_fallback: bool,
    fuse_unk: bool,
    ignore_merges: bool,
}

impl Tokenizer {
    fn build(p: Parts) -> Self {
        let vocab = p.vocab;
        let mut specials: Vec<u32> = (0..p.types.len() as u32)
            .filter(|&id| {
                let t = p.types[id as usize];
                (t.is_special() || t == TokenType::UserDefined) && !vocab.piece(id).is_empty()
            })
            .collect();
        // llama.cpp sorts by length only (std::sort, unstable); ties go by id here.
        specials.sort_by_key(|&id| std::cmp::Reverse(vocab.piece(id).len()));
        let mut trie = SpecialTrie::new();
        for (rank, &id) in specials.iter().enumerate() {
            trie.insert(vocab.piece(id).as_bytes(), rank as u32);
        }
        let mut byte_ids = [None; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            // llama.cpp's byte_to_token: the <0xNN> piece, else the byte itself as a piece.
            *slot = vocab
                .lookup(format!("<0x{b:02X}>").as_bytes())
                .or_else(|| vocab.lookup(&[b as u8]));
        }
        Tokenizer {
            vocab,
            types: p.types,
            merges: p.merges,
            specials,
            trie,
            byte_ids,
            bos: p.bos,
            eos: p.eos,
            unk: p.unk,
            pad: p.pad,
            add_bos: p.add_bos,
            add_space_prefix: p.add_space_prefix,
            escape_whitespace: p.escape_whitespace,
            byte_fallback: p.byte_fallback,
            fuse_unk: p.fuse_unk,
            ignore_merges: p.ignore_merges,
        }
    }

    /// Reads the SentencePiece vocabulary that llama.cpp reads from a GGUF file.
    pub fn from_gguf(g: &GgufFile) -> Result<Self, TokenizerError> {
        let file = &g.path;
        let missing = |key: &str| TokenizerError::MissingKey {
            file: file.clone(),
            key: key.to_string(),
        };
        let bad = |key: &str, what: String| TokenizerError::BadKey {
            file: file.clone(),
            key: key.to_string(),
            what,
        };

        const MODEL: &str = "tokenizer.ggml.model";
        let model = match g.get(MODEL) {
            None => return Err(missing(MODEL)),
            Some(v) => v
                .as_str()
                .ok_or_else(|| bad(MODEL, format!("is {}, not a string", v.summary())))?,
        };
        if model != "llama" {
            return Err(TokenizerError::UnsupportedModel {
                file: file.clone(),
                model: model.to_string(),
            });
        }

        let array = |key: &str| -> Result<&[MetaValue], TokenizerError> {
            let v = g.get(key).ok_or_else(|| missing(key))?;
            v.as_array()
                .ok_or_else(|| bad(key, format!("is {}, not an array", v.summary())))
        };
        const TOKENS: &str = "tokenizer.ggml.tokens";
        const SCORES: &str = "tokenizer.ggml.scores";
        const TYPES: &str = "tokenizer.ggml.token_type";
        let tokens = array(TOKENS)?;
        let scores = array(SCORES)?;
        let types = array(TYPES)?;
        let n = tokens.len();
        if n == 0 {
            return Err(bad(TOKENS, "is empty".into()));
        }
        for (key, len) in [(SCORES, scores.len()), (TYPES, types.len())] {
            if len != n {
                return Err(bad(key, format!("has {len} entries but {TOKENS} has {n}")));
            }
        }

        let mut pieces = Vec::with_capacity(n);
        for (i, t) in tokens.iter().enumerate() {
            let s = t.as_str().ok_or_else(|| {
                bad(
                    TOKENS,
                    format!("entry {i} is {}, not a string", t.summary()),
                )
            })?;
            // llama.cpp renames empty pieces so that they can neither match nor vanish.
            pieces.push(if s.is_empty() {
                Cow::Owned(format!("[EMPTY_{i}]"))
            } else {
                Cow::Borrowed(s)
            });
        }
        let vocab = Vocab::new(&pieces)
            .ok_or_else(|| bad(TOKENS, "is too large (4 GiB of text or 2^32 tokens)".into()))?;
        let scores = scores
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_f64().map(|x| x as f32).ok_or_else(|| {
                    bad(
                        SCORES,
                        format!("entry {i} is {}, not a number", v.summary()),
                    )
                })
            })
            .collect::<Result<Vec<f32>, _>>()?;
        let types = types
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().map(TokenType::from_gguf).ok_or_else(|| {
                    bad(
                        TYPES,
                        format!("entry {i} is {}, not an integer", v.summary()),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;

        // A key that is present must be usable; an absent one takes llama.cpp's SPM default.
        let id = |key: &str, default: Option<u32>| -> Result<Option<u32>, TokenizerError> {
            match g.get(key) {
                None => Ok(default.filter(|&d| (d as usize) < n)),
                Some(v) => match v.as_u64() {
                    Some(x) if (x as usize) < n => Ok(Some(x as u32)),
                    _ => Err(bad(
                        key,
                        format!(
                            "is {}, not a token id below the vocabulary size {n}",
                            v.summary()
                        ),
                    )),
                },
            }
        };
        let flag = |key: &str, default: bool| -> Result<bool, TokenizerError> {
            match g.get(key) {
                None => Ok(default),
                Some(v) => v
                    .as_bool()
                    .ok_or_else(|| bad(key, format!("is {}, not a bool", v.summary()))),
            }
        };
        const BOS: &str = "tokenizer.ggml.bos_token_id";
        const EOS: &str = "tokenizer.ggml.eos_token_id";
        let bos = id(BOS, Some(1))?.ok_or_else(|| missing(BOS))?;
        let eos = id(EOS, Some(2))?.ok_or_else(|| missing(EOS))?;
        Ok(Tokenizer::build(Parts {
            vocab,
            types,
            merges: Merges::Scores(scores),
            bos,
            eos,
            unk: id("tokenizer.ggml.unknown_token_id", Some(0))?,
            pad: id("tokenizer.ggml.padding_token_id", None)?,
            add_bos: flag("tokenizer.ggml.add_bos_token", true)?,
            add_space_prefix: flag("tokenizer.ggml.add_space_prefix", true)?,
            escape_whitespace: true,
            byte_fallback: true,
            fuse_unk: false,
            ignore_merges: false,
        }))
    }

    /// Reads a Hugging Face `tokenizer.json` (BPE model, SentencePiece-style normalizer), given
    /// the file or the directory holding it. `tokenizer_config.json` beside it, when present,
    /// names the BOS/EOS tokens and whether BOS is added.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, TokenizerError> {
        let file = if path.is_dir() {
            path.join("tokenizer.json")
        } else {
            path.to_path_buf()
        };
        let read = |p: &Path| gemma3_formats::read_text(p, gemma3_formats::MAX_TEXT_BYTES);
        let json = read(&file)?;
        let config_path = file.with_file_name("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read(&config_path)?)
        } else {
            None
        };
        Self::from_tokenizer_json_str(&json, config.as_deref(), &file)
    }

    /// [`from_tokenizer_json`](Self::from_tokenizer_json) on text already read: `json` is
    /// tokenizer.json, `config` tokenizer_config.json if there is one; `path` names
    /// tokenizer.json in errors (tokenizer_config.json is taken to lie beside it).
    pub fn from_tokenizer_json_str(
        json: &str,
        config: Option<&str>,
        path: &Path,
    ) -> Result<Self, TokenizerError> {
        let tokenizer: TokenizerJson =
            serde_json::from_str(json).map_err(|err| TokenizerError::Json {
                path: path.to_path_buf(),
                err,
            })?;
        let config: Option<Value> = config
            .map(|text| {
                serde_json::from_str(text).map_err(|err| TokenizerError::Json {
                    path: path.with_file_name("tokenizer_config.json"),
                    err,
                })
            })
            .transpose()?;
        tokenizer.into_tokenizer(path, config.as_ref())
    }

    /// Token ids for `text`. `parse_special` lets control tokens written in the text (such as
    /// `<start_of_turn>`) become their ids; user-defined tokens (`\n`, runs of spaces or tabs,
    /// `<start_of_image>`) are always matched, as in llama.cpp.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.push(self.bos);
        }
        let mut buf = String::new();
        let mut syms = Vec::new();
        let mut heap = BinaryHeap::new();
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => out.push(id),
                Fragment::Text(s) => {
                    buf.clear();
                    // Every text fragment starts the text or follows a special token, which is
                    // where llama.cpp adds the prefix.
                    if self.add_space_prefix {
                        buf.push_str(SPACE_ESCAPE);
                    }
                    if self.escape_whitespace {
                        for (i, part) in s.split(' ').enumerate() {
                            if i > 0 {
                                buf.push_str(SPACE_ESCAPE);
                            }
                            buf.push_str(part);
                        }
                    } else {
                        buf.push_str(s);
                    }
                    self.merge_fragment(&buf, &mut syms, &mut heap, &mut out);
                }
            }
        }
        out
    }

    /// Cuts `text` on special tokens as llama.cpp's `tokenizer_st_partition` does: token by
    /// token in priority order (longest first), each claims its non-overlapping occurrences
    /// left to right within the text not yet claimed.
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let bytes = text.as_bytes();
        let eligible = |id: u32| parse_special || !self.types[id as usize].is_special();
        // Which special tokens occur at all; only those need a search.
        let mut present = vec![false; self.specials.len()];
        let mut any = false;
        for p in 0..bytes.len() {
            self.trie.prefixes_of(&bytes[p..], |rank| {
                if eligible(self.specials[rank as usize]) {
                    present[rank as usize] = true;
                    any = true;
                }
            });
        }
        if !any {
            return if text.is_empty() {
                Vec::new()
            } else {
                vec![Fragment::Text(text)]
            };
        }

        let mut claimed = vec![false; bytes.len()];
        let mut found: Vec<(usize, usize, u32)> = Vec::new();
        for (rank, _) in present.iter().enumerate().filter(|p| *p.1) {
            let id = self.specials[rank];
            let pat = self.vocab.piece(id);
            // `from` is always a token end or 0, so a char boundary.
            let mut from = 0;
            while let Some(off) = text[from..].find(pat) {
                let (start, end) = (from + off, from + off + pat.len());
                match (start..end).rev().find(|&i| claimed[i]) {
                    None => {
                        claimed[start..end].fill(true);
                        found.push((start, end, id));
                        from = end;
                    }
                    // Any occurrence starting up to the last claimed byte overlaps it too, and
                    // none may start inside a claimed run.
                    Some(c) => {
                        from = c + 1;
                        while from < bytes.len() && claimed[from] {
                            from += 1;
                        }
                    }
                }
            }
        }
        found.sort_unstable_by_key(|f| f.0);

        let mut frags = Vec::with_capacity(found.len() * 2 + 1);
        let mut pos = 0;
        for (start, end, id) in found {
            if start > pos {
                frags.push(Fragment::Text(&text[pos..start]));
            }
            frags.push(Fragment::Token(id));
            pos = end;
        }
        if pos < text.len() {
            frags.push(Fragment::Text(&text[pos..]));
        }
        frags
    }

    /// The merge candidate for two adjacent symbols, if their pair may merge.
    fn candidate(
        &self,
        text: &str,
        syms: &[Symbol],
        left: usize,
        right: usize,
    ) -> Option<Candidate> {
        let (l, r) = (&syms[left], &syms[right]);
        let size = l.len + r.len;
        let (prio, id) = match &self.merges {
            Merges::Scores(scores) => {
                // Any token counts, whatever its type, as in llama.cpp's try_add_bigram.
                let id = self
                    .vocab
                    .lookup(&text.as_bytes()[l.start..l.start + size])?;
                // + 0.0 turns -0.0 into 0.0: the two tie under llama.cpp's `<`.
                (scores[id as usize] as f64 + 0.0, id)
            }
            Merges::Ranks(ranks) => {
                let &(rank, id) = ranks.get(&(l.id?, r.id?))?;
                (-(rank as f64), id)
            }
        };
        Some(Candidate {
            prio,
            left,
            right,
            size,
            id,
        })
    }

    /// Tokenizes one escaped fragment: one symbol per character, merged best pair first.
    fn merge_fragment(
        &self,
        text: &str,
        syms: &mut Vec<Symbol>,
        heap: &mut BinaryHeap<Candidate>,
        out: &mut Vec<u32>,
    ) {
        if text.is_empty() {
            return;
        }
        if self.ignore_merges {
            if let Some(id) = self.vocab.lookup(text.as_bytes()) {
                out.push(id);
                return;
            }
        }
        syms.clear();
        heap.clear();
        for (start, c) in text.char_indices() {
            let len = c.len_utf8();
            let i = syms.len();
            syms.push(Symbol {
                start,
                len,
                prev: i.checked_sub(1),
                next: (start + len < text.len()).then_some(i + 1),
                id: self.vocab.lookup(&text.as_bytes()[start..start + len]),
            });
        }
        for i in 1..syms.len() {
            heap.extend(self.candidate(text, syms, i - 1, i));
        }
        while let Some(c) = heap.pop() {
            let (l, r) = (syms[c.left], syms[c.right]);
            if l.len == 0 || r.len == 0 || l.len + r.len != c.size {
                continue;
            }
            syms[c.left].len = c.size;
            syms[c.left].id = Some(c.id);
            syms[c.left].next = r.next;
            syms[c.right].len = 0;
            if let Some(n) = r.next {
                syms[n].prev = Some(c.left);
            }
            if let Some(p) = l.prev {
                heap.extend(self.candidate(text, syms, p, c.left));
            }
            if let Some(n) = r.next {
                heap.extend(self.candidate(text, syms, c.left, n));
            }
        }

        // Every merged symbol is a token, so only single characters can be left without one.
        // llama.cpp's resegment() then finds no recorded merge for them (its merges always
        // span two or more characters) and falls back to bytes.
        let mut last_unk = false;
        let mut i = Some(0);
        while let Some(s) = i.map(|i| syms[i]) {
            i = s.next;
            if let Some(id) = s.id {
                out.push(id);
                last_unk = false;
                continue;
            }
            let bytes = &text.as_bytes()[s.start..s.start + s.len];
            let byte_id = |b: &u8| self.byte_ids[*b as usize];
            if self.byte_fallback && bytes.iter().all(|b| byte_id(b).is_some()) {
                out.extend(bytes.iter().filter_map(byte_id));
                last_unk = false;
            } else if let Some(unk) = self.unk {
                if !(self.fuse_unk && last_unk) {
                    out.push(unk);
                }
                last_unk = true;
            }
        }
    }

    /// Appends the bytes token `id` stands for; specials only when `!skip_special`.
    fn render(&self, id: u32, skip_special: bool, out: &mut Vec<u8>) {
        let Some(&ty) = self.types.get(id as usize) else {
            return;
        };
        let piece = self.vocab.piece(id);
        match ty {
            TokenType::Control | TokenType::Unknown if skip_special => {}
            TokenType::Control | TokenType::Unknown | TokenType::UserDefined => {
                out.extend_from_slice(piece.as_bytes())
            }
            TokenType::Normal if self.escape_whitespace => {
                let mut rest = piece;
                while let Some(i) = rest.find(SPACE_ESCAPE) {
                    out.extend_from_slice(&rest.as_bytes()[..i]);
                    out.push(b' ');
                    rest = &rest[i + SPACE_ESCAPE.len()..];
                }
                out.extend_from_slice(rest.as_bytes());
            }
            TokenType::Normal => out.extend_from_slice(piece.as_bytes()),
            TokenType::Byte => match parse_byte_piece(piece) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(piece.as_bytes()),
            },
            // llama.cpp renders unused and undefined tokens as nothing.
            TokenType::Unused | TokenType::Undefined => {}
        }
    }

    /// Text for `ids`: pieces joined, `▁` as spaces, byte tokens gathered into UTF-8 (invalid
    /// sequences become U+FFFD). Control tokens appear as their text unless `skip_special`.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        let mut ids = ids;
        // llama.cpp's detokenize: the prefix space added when encoding is taken off the first
        // piece, except after a BOS that was dropped.
        let mut strip_space = self.add_space_prefix;
        if skip_special && self.add_bos && ids.first() == Some(&self.bos) {
            strip_space = false;
            ids = &ids[1..];
        }
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        for (i, &id) in ids.iter().enumerate() {
            let start = bytes.len();
            self.render(id, skip_special, &mut bytes);
            if i == 0 && strip_space && bytes.get(start) == Some(&b' ') {
                bytes.remove(start);
            }
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// The raw bytes of one token (control tokens as their text; empty when out of range).
    pub fn piece_bytes(&self, id: u32) -> Vec<u8> {
        let mut out = Vec::new();
        self.render(id, false, &mut out);
        out
    }

    pub fn bos_id(&self) -> u32 {
        self.bos
    }
    pub fn eos_id(&self) -> u32 {
        self.eos
    }
    pub fn unk_id(&self) -> Option<u32> {
        self.unk
    }
    pub fn pad_id(&self) -> Option<u32> {
        self.pad
    }
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }
    pub fn token_to_id(&self, piece: &str) -> Option<u32> {
        self.vocab.lookup(piece.as_bytes())
    }
    /// The token's piece as stored in the vocabulary (`▁` for spaces, `<0x41>` for bytes).
    pub fn id_to_piece(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.piece(id))
    }
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
    /// Whether callers should add BOS, as the file says.
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }
    pub fn add_space_prefix(&self) -> bool {
        self.add_space_prefix
    }
    pub fn is_control(&self, id: u32) -> bool {
        self.token_type(id) == Some(TokenType::Control)
    }
}

fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// Turns generated token ids into text as they arrive, holding back the bytes of a character
/// that is not complete yet (byte-fallback tokens split characters across tokens).
#[derive(Clone, Debug, Default)]
pub struct StreamDecoder {
    buf: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The text completed by `id`: whole characters only. Control tokens add nothing.
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        tok.render(id, true, &mut self.buf);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.buf) {
                Ok(s) => {
                    out.push_str(s);
                    self.buf.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(&String::from_utf8_lossy(&self.buf[..valid]));
                    match e.error_len() {
                        // An incomplete character at the end: wait for the next token.
                        None => {
                            self.buf.drain(..valid);
                            return out;
                        }
                        // Bytes that can never become valid.
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.buf.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is held back (an unfinished character becomes U+FFFD).
    pub fn flush(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.buf).into_owned();
        self.buf.clear();
        s
    }
}

// ---- tokenizer.json --------------------------------------------------------------------

/// The largest vocabulary a tokenizer.json may define.
const MAX_VOCAB: usize = 1 << 24;
/// How many ids below the largest one may be left unnamed (holes in the vocabulary).
const MAX_UNNAMED_IDS: usize = 1 << 10;

#[derive(Deserialize)]
struct TokenizerJson {
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
    #[serde(default)]
    normalizer: Option<Value>,
    #[serde(default)]
    pre_tokenizer: Option<Value>,
    #[serde(default)]
    post_processor: Option<Value>,
    model: BpeModel,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize)]
struct BpeModel {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    vocab: HashMap<String, u32>,
    #[serde(default)]
    merges: Vec<MergeEntry>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    unk_token: Option<String>,
    #[serde(default)]
    fuse_unk: bool,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
}

/// `tokenizers` writes merges as "a b" (older) or ["a", "b"] (newer).
#[derive(Deserialize)]
#[serde(untagged)]
enum MergeEntry {
    Joined(String),
    Pair((String, String)),
}

fn type_of(v: &Value) -> &str {
    v.get("type").and_then(Value::as_str).unwrap_or("?")
}

/// A token name in tokenizer_config.json: a string or an AddedToken object.
fn config_token(v: &Value) -> Option<&str> {
    v.as_str()
        .or_else(|| v.get("content").and_then(Value::as_str))
}

impl TokenizerJson {
    fn into_tokenizer(
        self,
        path: &Path,
        config: Option<&Value>,
    ) -> Result<Tokenizer, TokenizerError> {
        let err = |field: &str, what: String| TokenizerError::BadJson {
            path: path.to_path_buf(),
            field: field.to_string(),
            what,
        };
        let m = self.model;
        if let Some(kind) = m.kind.as_deref().filter(|k| *k != "BPE") {
            return Err(err(
                "model.type",
                format!("is {kind:?}; only BPE models are supported"),
            ));
        }
        if m.dropout.is_some_and(|d| d > 0.0) {
            return Err(err("model.dropout", "BPE dropout is not supported".into()));
        }
        for (field, v) in [
            (
                "model.continuing_subword_prefix",
                &m.continuing_subword_prefix,
            ),
            ("model.end_of_word_suffix", &m.end_of_word_suffix),
        ] {
            if v.as_deref().is_some_and(|s| !s.is_empty()) {
                return Err(err(
                    field,
                    "is not supported (SentencePiece-style BPE has none)".into(),
                ));
            }
        }

        // Normalizer: the SentencePiece pair of "Prepend ▁" and "Replace ' ' with ▁".
        let (mut escape, mut prefix) = (false, false);
        let mut stack: Vec<&Value> = self.normalizer.iter().filter(|v| !v.is_null()).collect();
        while let Some(n) = stack.pop() {
            match type_of(n) {
                "Sequence" => {
                    let list = n.get("normalizers").and_then(Value::as_array);
                    stack.extend(list.into_iter().flatten());
                }
                "Replace"
                    if n.pointer("/pattern/String").and_then(Value::as_str) == Some(" ")
                        && n.get("content").and_then(Value::as_str) == Some(SPACE_ESCAPE) =>
                {
                    escape = true
                }
                "Prepend" if n.get("prepend").and_then(Value::as_str) == Some(SPACE_ESCAPE) => {
                    prefix = true
                }
                other => {
                    return Err(err(
                        "normalizer",
                        format!("{other} ({n}) is not supported; only Replace(\" \" -> \"▁\") and Prepend(\"▁\")"),
                    ))
                }
            }
        }
        // Gemma's Split on " " runs after the normalizer has replaced every space: a no-op.
        if let Some(p) = self.pre_tokenizer.as_ref().filter(|v| !v.is_null()) {
            let noop_split = type_of(p) == "Split"
                && p.pointer("/pattern/String").and_then(Value::as_str) == Some(" ");
            if !(noop_split && escape) {
                return Err(err(
                    "pre_tokenizer",
                    format!(
                        "{} is not supported (only none, or Split on \" \" after the ▁ normalizer)",
                        type_of(p)
                    ),
                ));
            }
        }

        let n = m
            .vocab
            .values()
            .chain(self.added_tokens.iter().map(|a| &a.id))
            .map(|&id| id as usize + 1)
            .max()
            .unwrap_or(0);
        if n == 0 {
            return Err(err("model.vocab", "is empty".into()));
        }
        // Real vocabularies are dense; ids far beyond the tokens named would make a tiny file
        // allocate a table of millions of empty pieces.
        let named = m.vocab.len() + self.added_tokens.len();
        if n > MAX_VOCAB || n > named.saturating_add(MAX_UNNAMED_IDS) {
            return Err(err(
                "model.vocab",
                format!(
                    "has ids up to {} but names only {named} tokens: too sparse",
                    n - 1
                ),
            ));
        }
        // Ids that nothing names stay empty and undefined.
        let mut pieces = vec![String::new(); n];
        let mut types = vec![TokenType::Undefined; n];
        for (piece, &id) in &m.vocab {
            types[id as usize] = if parse_byte_piece(piece).is_some() {
                TokenType::Byte
            } else if m.unk_token.as_deref() == Some(piece.as_str()) {
                TokenType::Unknown
            } else {
                TokenType::Normal
            };
            pieces[id as usize] = piece.clone();
        }
        for a in &self.added_tokens {
            types[a.id as usize] = if a.special {
                TokenType::Control
            } else {
                TokenType::UserDefined
            };
            pieces[a.id as usize] = a.content.clone();
        }

        let vocab_id = |s: &str| m.vocab.get(s).copied();
        let mut ranks = HashMap::with_capacity(m.merges.len());
        for (rank, entry) in m.merges.iter().enumerate() {
            let (a, b) = match entry {
                // As llama.cpp splits them: at the first space after the first byte.
                MergeEntry::Joined(s) => match s
                    .chars()
                    .next()
                    .and_then(|c| s[c.len_utf8()..].find(' ').map(|i| i + c.len_utf8()))
                {
                    Some(i) => (&s[..i], &s[i + 1..]),
                    None => {
                        return Err(err(
                            "model.merges",
                            format!("entry {rank} ({s:?}) is not \"a b\""),
                        ))
                    }
                },
                MergeEntry::Pair((a, b)) => (a.as_str(), b.as_str()),
            };
            let ids = (vocab_id(a), vocab_id(b), vocab_id(&format!("{a}{b}")));
            let (Some(l), Some(r), Some(merged)) = ids else {
                return Err(err(
                    "model.merges",
                    format!("entry {rank} ({a:?} + {b:?}) uses a token missing from model.vocab"),
                ));
            };
            ranks.insert((l, r), (rank as u32, merged));
        }

        // BOS/EOS: tokenizer_config.json names them; else the usual Gemma/Llama pieces.
        let find = |name: &str| {
            self.added_tokens
                .iter()
                .find(|a| a.content == name)
                .map(|a| a.id)
                .or_else(|| vocab_id(name))
        };
        let named = |key: &str, defaults: &[&str]| {
            let from_config = config.and_then(|c| c.get(key)).and_then(config_token);
            from_config
                .into_iter()
                .chain(defaults.iter().copied())
                .find_map(find)
        };
        let bos = named("bos_token", &["<bos>", "<s>"]).ok_or_else(|| {
            err(
                "added_tokens",
                "no BOS token (<bos> or <s>, or bos_token in tokenizer_config.json)".into(),
            )
        })?;
        let eos = named("eos_token", &["<eos>", "</s>"]).ok_or_else(|| {
            err(
                "added_tokens",
                "no EOS token (<eos> or </s>, or eos_token in tokenizer_config.json)".into(),
            )
        })?;
        let pad = named("pad_token", &["<pad>"]);
        let unk = m.unk_token.as_deref().and_then(find);
        // add_bos: the config's flag, else whether the post-processor starts with BOS.
        let add_bos = match config
            .and_then(|c| c.get("add_bos_token"))
            .and_then(Value::as_bool)
        {
            Some(b) => b,
            None => {
                self.post_processor
                    .as_ref()
                    .and_then(|p| p.pointer("/single/0/SpecialToken/id"))
                    .and_then(Value::as_str)
                    .and_then(find)
                    == Some(bos)
            }
        };

        let vocab = Vocab::new(&pieces).ok_or_else(|| err("model.vocab", "is too large".into()))?;
        Ok(Tokenizer::build(Parts {
            vocab,
            types,
            merges: Merges::Ranks(ranks),
            bos,
            eos,
            unk,
            pad,
            add_bos,
            add_space_prefix: prefix,
            escape_whitespace: escape,
            byte_fallback: m.byte_fallback,
            fuse_unk: m.fuse_unk,
            ignore_merges: m.ignore_merges,
        }))
    }
}
