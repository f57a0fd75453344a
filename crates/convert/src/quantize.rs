//! Writing GGUF files as llama.cpp would: a Hugging Face checkpoint converted as
//! `convert_hf_to_gguf.py` writes Gemma 3 (GGUF names, RMSNorm weights as `1 + w`, gemma3.*
//! metadata, the tokenizer as a SentencePiece-style token list), and any model quantized as
//! `llama-quantize` does (its per-tensor types, ggml's reference quantizers, its tensor
//! order and metadata). The same plan quantizes a checkpoint in memory at load.
//!
//! Tensors are converted one after another, each in chunks of rows spread over the thread
//! pool, and streamed to a temporary file renamed into place at the end: memory stays at
//! a few chunks whatever the model's size, and an interrupted run leaves no output file.

use crate::ConvertError;
use gemma3_formats::gguf::GgufWriter;
use gemma3_formats::quant::dequantize;
use gemma3_formats::quantize::quantize_into;
use gemma3_formats::spill::SpillWriter;
use gemma3_formats::{DType, GgufFile, HfDirectory, MetaValue, TensorData};
use gemma3_model::quantize::{quantize_order, tensor_type, ModelShape};
use gemma3_model::vision::{self, VisionConfig};
use gemma3_model::weights::{is_norm, GlobalTensor, WeightSource, LAYER_TENSORS};
use gemma3_model::{FileType, TextConfig};
use gemma3_text::{TokenType, Tokenizer};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// `general.quantization_version` that llama-quantize writes.
const QUANTIZATION_VERSION: u32 = 2;
/// Input values converted per chunk (a chunk's output is written before the next starts).
const CHUNK_VALUES: usize = 1 << 22;
/// Input values per parallel task inside a chunk.
const TASK_VALUES: usize = 1 << 16;
/// Scores llama.cpp's converter gives control and user-defined tokens.
const SPECIAL_TOKEN_SCORE: f32 = -1000.0;

/// How far a conversion has come, for progress displays.
#[derive(Clone, Debug)]
pub struct Progress<'a> {
    /// The tensor being written (its GGUF name) and its type there.
    pub tensor: &'a str,
    pub dtype: DType,
    /// 0-based index of that tensor, and how many there are.
    pub index: usize,
    pub count: usize,
    /// Bytes of the source read so far, of `total_bytes`.
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// What a finished conversion did.
#[derive(Clone, Debug, Default)]
pub struct QuantizeSummary {
    pub tensors: usize,
    /// Tensors that were stored quantized and had to be dequantized first (llama-quantize's
    /// `--allow-requantize`).
    pub requantized: usize,
    pub output_bytes: u64,
    /// Tensors per type in the output.
    pub types: BTreeMap<String, usize>,
}

/// One tensor of the output: where its values come from and what it becomes.
pub struct PlannedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub source: TensorData,
    pub target: DType,
    /// An RMSNorm weight of a Hugging Face checkpoint: stored as `1 + w`.
    pub add_one: bool,
}

impl PlannedTensor {
    /// Whether the stored bytes can be copied as they are.
    fn is_copy(&self) -> bool {
        !self.add_one && self.source.dtype == self.target
    }

    fn output_bytes(&self) -> usize {
        let rows: usize = self.shape[..self.shape.len() - 1].iter().product();
        rows * self.target.row_bytes(self.cols()).unwrap_or(0)
    }

    fn cols(&self) -> usize {
        *self.shape.last().unwrap_or(&1)
    }
}

/// A GGUF file to write: metadata in order, tensors in order.
pub struct Plan {
    pub metadata: Vec<(String, MetaValue)>,
    pub tensors: Vec<PlannedTensor>,
    /// The text model's configuration, as the written file describes it.
    pub config: TextConfig,
}

impl Plan {
    /// Plans `input` (a GGUF file or a Hugging Face directory) as a file of type `ftype`.
    pub fn for_model(input: &Path, ftype: FileType) -> Result<Plan, ConvertError> {
        if !input.exists() {
            return Err(ConvertError::Load(format!(
                "input {} does not exist (give a .gguf file or a Hugging Face model directory)",
                input.display()
            )));
        }
        if input.is_dir() {
            Plan::for_hf(&HfDirectory::open(input)?, ftype)
        } else {
            Plan::for_gguf(&GgufFile::open(input)?, ftype)
        }
    }

    /// A Hugging Face checkpoint as a file of type `ftype`: converted as llama.cpp's
    /// converter does, then (for quantized types) quantized as llama-quantize does.
    pub fn for_hf(hf: &HfDirectory, ftype: FileType) -> Result<Plan, ConvertError> {
        let plan = Plan::converted(hf, ftype)?;
        if ftype.is_quantized() {
            plan.requantized(ftype)
        } else {
            Ok(plan)
        }
    }

    /// A GGUF file requantized as llama-quantize (`--allow-requantize`) does.
    pub fn for_gguf(g: &GgufFile, ftype: FileType) -> Result<Plan, ConvertError> {
        Plan::from_gguf(g)?.requantized(ftype)
    }

    /// A GGUF file as it stands, as the input of [`requantized`](Self::requantized).
    fn from_gguf(g: &GgufFile) -> Result<Plan, ConvertError> {
        let config = TextConfig::from_gguf(g)?;
        let metadata = g
            .metadata_order
            .iter()
            .map(|k| (k.clone(), g.metadata[k].clone()))
            .collect();
        let tensors = g
            .tensors
            .iter()
            .map(|info| {
                let source = g.tensor_from_info(info)?;
                Ok(PlannedTensor {
                    name: info.name.clone(),
                    shape: source.shape.clone(),
                    target: source.dtype,
                    source,
                    add_one: false,
                })
            })
            .collect::<Result<_, ConvertError>>()?;
        Ok(Plan {
            metadata,
            tensors,
            config,
        })
    }

    /// What llama-quantize makes of this file: each tensor's type by its rules, tensors in
    /// its order, `general.quantization_version` and `general.file_type` set last.
    fn requantized(mut self, ftype: FileType) -> Result<Plan, ConvertError> {
        let model = ModelShape {
            num_layers: self.config.num_layers,
            has_output: self
                .tensors
                .iter()
                .any(|t| t.name == GlobalTensor::Output.gguf()),
        };
        for t in &mut self.tensors {
            if let Some(ty) = tensor_type(ftype, &t.name, &t.shape, model)? {
                t.target = ty;
            }
        }
        self.tensors
            .sort_by(|a, b| quantize_order(&a.name, &b.name));
        let mut w = MetaList(std::mem::take(&mut self.metadata));
        w.set(
            "general.quantization_version",
            MetaValue::U32(QUANTIZATION_VERSION),
        );
        w.set("general.file_type", MetaValue::U32(ftype.ggml_ftype()));
        self.metadata = w.0;
        Ok(self)
    }

    /// A Hugging Face checkpoint's text model as llama.cpp's converter writes it, with
    /// matrices in `ftype`'s base type when that is a float type (F32 otherwise: the
    /// converter's output that llama-quantize then reads).
    pub fn converted(hf: &HfDirectory, ftype: FileType) -> Result<Plan, ConvertError> {
        let file_type = if ftype.is_quantized() {
            FileType::F32
        } else {
            ftype
        };
        let mut config = TextConfig::from_hf_json(&hf.config)?;
        let tokenizer = Tokenizer::from_tokenizer_json(&hf.dir)?;
        let src = WeightSource::Hf(hf);
        let names = src.names()?;
        let model = ModelShape {
            num_layers: config.num_layers,
            has_output: false,
        };
        let mut tensors = Vec::new();
        let mut add = |gguf: String, source: TensorData| -> Result<(), ConvertError> {
            let target = tensor_type(file_type, &gguf, &source.shape, model)?;
            tensors.push(PlannedTensor {
                add_one: is_norm(&gguf),
                shape: source.shape.clone(),
                // Tensors kept as they are become f32, as the converter writes them.
                target: target.unwrap_or(DType::F32),
                name: gguf,
                source,
            });
            Ok(())
        };
        // The converter drops embedding rows past the tokenizer's vocabulary.
        let embed = hf.tensor(&names.global(GlobalTensor::Embed))?;
        let rows = embed.shape.first().copied().unwrap_or(0);
        let vocab = tokenizer.vocab_size();
        let embed = if vocab < rows {
            embed.first_rows(vocab)?
        } else {
            embed
        };
        config.vocab_size = embed.shape[0];
        add(GlobalTensor::Embed.gguf().into(), embed)?;
        add(
            GlobalTensor::FinalNorm.gguf().into(),
            hf.tensor(&names.global(GlobalTensor::FinalNorm))?,
        )?;
        let head = names.global(GlobalTensor::Output);
        if hf.tensors.contains_key(&head) {
            add(GlobalTensor::Output.gguf().into(), hf.tensor(&head)?)?;
        }
        // transformers' module order, as the converter meets the tensors.
        const ORDER: [&str; 13] = [
            "q",
            "k",
            "v",
            "o",
            "q_norm",
            "k_norm",
            "gate",
            "up",
            "down",
            "attn_norm",
            "post_attn_norm",
            "pre_ffn_norm",
            "post_ffn_norm",
        ];
        for i in 0..config.num_layers {
            for role in ORDER {
                let (_, gguf, _) = LAYER_TENSORS
                    .iter()
                    .find(|(r, _, _)| *r == role)
                    .expect("every role is listed");
                add(
                    format!("blk.{i}.{gguf}.weight"),
                    hf.tensor(&names.layer(i, role))?,
                )?;
            }
        }
        let metadata = gguf_metadata(hf, &config, &tokenizer, file_type)?;
        Ok(Plan {
            metadata,
            tensors,
            config,
        })
    }

    /// Source bytes the plan reads.
    pub fn input_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .map(|t| t.source.bytes().len() as u64)
            .sum()
    }

    /// How many tensors are dequantized from a quantized type to be quantized again.
    pub fn requantized_count(&self) -> usize {
        self.tensors
            .iter()
            .filter(|t| t.source.dtype.is_quantized() && !t.is_copy())
            .count()
    }

    /// Writes the plan as a GGUF file to `out`, calling `progress` after each chunk; a
    /// `false` from it stops the run with [`ConvertError::Cancelled`].
    pub fn write(
        &self,
        out: impl Write,
        progress: &mut dyn FnMut(&Progress) -> bool,
    ) -> Result<QuantizeSummary, ConvertError> {
        let mut w = GgufWriter::new();
        for (k, v) in &self.metadata {
            w.meta(k, v.clone());
        }
        for t in &self.tensors {
            w.tensor_info(&t.name, &t.shape, t.target);
        }
        let mut stream = w.start(out).map_err(io_err)?;
        let mut summary = QuantizeSummary {
            tensors: self.tensors.len(),
            requantized: self.requantized_count(),
            ..Default::default()
        };
        let total = self.input_bytes();
        let mut done = 0u64;
        for (index, t) in self.tensors.iter().enumerate() {
            convert_tensor(t, &mut |bytes, read| {
                stream.write_data(bytes).map_err(io_err)?;
                done += read;
                let p = Progress {
                    tensor: &t.name,
                    dtype: t.target,
                    index,
                    count: self.tensors.len(),
                    done_bytes: done,
                    total_bytes: total,
                };
                if progress(&p) {
                    Ok(())
                } else {
                    Err(ConvertError::Cancelled)
                }
            })?;
            summary.output_bytes += t.output_bytes() as u64;
            *summary.types.entry(t.target.to_string()).or_default() += 1;
        }
        stream.finish().map_err(io_err)?;
        Ok(summary)
    }

    /// Converts every tensor into a spill file in `dir` (see [`SpillWriter`]), under its
    /// GGUF name: the weights then live in a file map whose pages the repacking hands back,
    /// as a model file's are, rather than in memory beside their packed copies. Where the
    /// OS has no unnamed files, into memory ([`into_tensors`](Self::into_tensors)).
    pub fn into_spilled_tensors(
        self,
        dir: &std::path::Path,
    ) -> Result<BTreeMap<String, TensorData>, ConvertError> {
        // No spill file (no unnamed files here, or none can be made in `dir`): memory.
        let Ok(Some(mut w)) = SpillWriter::new(dir) else {
            return self.into_tensors();
        };
        for t in &self.tensors {
            w.tensor(&t.name, t.target, t.shape.clone(), |put| {
                convert_tensor(t, &mut |b, _| Ok(put(b)?))
            })?;
        }
        Ok(w.finish()?
            .into_iter()
            .map(|t| (t.name.clone(), t))
            .collect())
    }

    /// Converts every tensor into memory (quantization at load), under its GGUF name.
    pub fn into_tensors(self) -> Result<BTreeMap<String, TensorData>, ConvertError> {
        let mut out = BTreeMap::new();
        for t in self.tensors {
            let mut bytes = Vec::with_capacity(t.output_bytes());
            convert_tensor(&t, &mut |b, _| {
                bytes.extend_from_slice(b);
                Ok(())
            })?;
            let data = TensorData::owned(&t.name, t.target, t.shape.clone(), bytes)?;
            out.insert(t.name, data);
        }
        Ok(out)
    }
}

/// Metadata in order, with llama.cpp's set-moves-to-the-end rule.
struct MetaList(Vec<(String, MetaValue)>);

impl MetaList {
    fn push(&mut self, k: &str, v: MetaValue) {
        self.0.push((k.to_string(), v));
    }
    fn set(&mut self, k: &str, v: MetaValue) {
        self.0.retain(|(key, _)| key != k);
        self.push(k, v);
    }
}

/// The gemma3.* and tokenizer.* metadata of llama.cpp's converter for a Gemma 3 checkpoint.
fn gguf_metadata(
    hf: &HfDirectory,
    cfg: &TextConfig,
    tok: &Tokenizer,
    ftype: FileType,
) -> Result<Vec<(String, MetaValue)>, ConvertError> {
    let mut m = MetaList(Vec::new());
    let u32v = |x: usize| MetaValue::U32(x as u32);
    let name = hf
        .dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "gemma3".into());
    m.push("general.architecture", MetaValue::String("gemma3".into()));
    m.push("general.type", MetaValue::String("model".into()));
    m.push("general.name", MetaValue::String(name));
    let a = |k: &str| format!("gemma3.{k}");
    m.push(&a("context_length"), u32v(cfg.max_position_embeddings));
    m.push(&a("embedding_length"), u32v(cfg.hidden_size));
    m.push(&a("block_count"), u32v(cfg.num_layers));
    m.push(&a("feed_forward_length"), u32v(cfg.intermediate_size));
    m.push(&a("attention.head_count"), u32v(cfg.num_heads));
    m.push(&a("attention.head_count_kv"), u32v(cfg.num_kv_heads));
    m.push(
        &a("attention.layer_norm_rms_epsilon"),
        MetaValue::F32(cfg.rms_norm_eps),
    );
    m.push(&a("attention.key_length"), u32v(cfg.head_dim));
    m.push(&a("attention.value_length"), u32v(cfg.head_dim));
    m.push(&a("rope.freq_base"), MetaValue::F32(cfg.rope_theta as f32));
    if cfg.rope_linear_factor != 1.0 {
        m.push(&a("rope.scaling.type"), MetaValue::String("linear".into()));
        m.push(
            &a("rope.scaling.factor"),
            MetaValue::F32(cfg.rope_linear_factor as f32),
        );
    }
    m.push(&a("attention.sliding_window"), u32v(cfg.sliding_window));
    if let Some(c) = cfg.final_logit_softcapping {
        m.push(&a("final_logit_softcapping"), MetaValue::F32(c));
    }
    // llama.cpp implies the query scale from the size; written only where it differs from
    // head_dim (27B), for readers that take it from the file.
    if cfg.query_pre_attn_scalar != cfg.head_dim as f64 {
        m.push(
            &a("attention.query_pre_attn_scalar"),
            MetaValue::F32(cfg.query_pre_attn_scalar as f32),
        );
    }
    m.push("general.file_type", MetaValue::U32(ftype.ggml_ftype()));
    tokenizer_metadata(&mut m, tok);
    if let Some(t) = gemma3_text::chat::hf_template_source(&hf.dir)? {
        m.push("tokenizer.chat_template", MetaValue::String(t));
    }
    Ok(m.0)
}

/// The vocabulary as a SentencePiece token list: pieces, scores (normal pieces rank by id,
/// control and user-defined tokens -1000, bytes 0) and token types.
fn tokenizer_metadata(m: &mut MetaList, tok: &Tokenizer) {
    let n = tok.vocab_size() as u32;
    let types: Vec<TokenType> = (0..n)
        .map(|i| tok.token_type(i).unwrap_or(TokenType::Undefined))
        .collect();
    let first_normal = types
        .iter()
        .position(|t| *t == TokenType::Normal)
        .unwrap_or(0);
    let scores = types
        .iter()
        .enumerate()
        .map(|(i, t)| {
            MetaValue::F32(match t {
                TokenType::Normal => -((i - first_normal) as f32),
                TokenType::Byte => 0.0,
                _ => SPECIAL_TOKEN_SCORE,
            })
        })
        .collect();
    let pieces = (0..n)
        .map(|i| MetaValue::String(tok.id_to_piece(i).unwrap_or("").to_string()))
        .collect();
    m.push("tokenizer.ggml.model", MetaValue::String("llama".into()));
    m.push("tokenizer.ggml.pre", MetaValue::String("default".into()));
    m.push("tokenizer.ggml.tokens", MetaValue::Array(pieces));
    m.push("tokenizer.ggml.scores", MetaValue::Array(scores));
    m.push(
        "tokenizer.ggml.token_type",
        MetaValue::Array(
            types
                .iter()
                .map(|t| MetaValue::I32(t.to_gguf() as i32))
                .collect(),
        ),
    );
    m.push("tokenizer.ggml.bos_token_id", MetaValue::U32(tok.bos_id()));
    m.push("tokenizer.ggml.eos_token_id", MetaValue::U32(tok.eos_id()));
    if let Some(u) = tok.unk_id() {
        m.push("tokenizer.ggml.unknown_token_id", MetaValue::U32(u));
    }
    if let Some(p) = tok.pad_id() {
        m.push("tokenizer.ggml.padding_token_id", MetaValue::U32(p));
    }
    m.push(
        "tokenizer.ggml.add_bos_token",
        MetaValue::Bool(tok.add_bos()),
    );
    m.push("tokenizer.ggml.add_eos_token", MetaValue::Bool(false));
    m.push(
        "tokenizer.ggml.add_space_prefix",
        MetaValue::Bool(tok.add_space_prefix()),
    );
}

/// Streams one tensor's output bytes to `sink` in chunks of rows, with the source bytes
/// each chunk read. Rows of a chunk are converted in parallel; the source pages are handed
/// back after use.
fn convert_tensor(
    t: &PlannedTensor,
    sink: &mut dyn FnMut(&[u8], u64) -> Result<(), ConvertError>,
) -> Result<(), ConvertError> {
    let src = &t.source;
    let cols = t.cols();
    let rows = src.rows();
    let in_row = src.row_bytes();
    if t.is_copy() {
        let step = (CHUNK_VALUES / cols.max(1)).max(1) * in_row;
        for (i, piece) in src.bytes().chunks(step.max(1)).enumerate() {
            sink(piece, piece.len() as u64)?;
            src.release_byte_range(i * step..i * step + piece.len());
        }
        if src.bytes().is_empty() {
            sink(&[], 0)?;
        }
        return Ok(());
    }
    let out_row = t.target.row_bytes(cols).ok_or_else(|| {
        ConvertError::Load(format!(
            "{}: rows of {cols} values are not whole {} blocks",
            t.name, t.target
        ))
    })?;
    let chunk_rows = (CHUNK_VALUES / cols.max(1)).max(1);
    let task_rows = (TASK_VALUES / cols.max(1)).max(1);
    let round_f16 = t.add_one && src.dtype == DType::F16;
    let mut out = Vec::new();
    for first in (0..rows).step_by(chunk_rows) {
        let n = chunk_rows.min(rows - first);
        out.resize(n * out_row, 0);
        let input = &src.bytes()[first * in_row..(first + n) * in_row];
        out.par_chunks_mut(task_rows * out_row)
            .zip(input.par_chunks(task_rows * in_row))
            .for_each(|(dst, srcb)| {
                let mut vals = vec![0f32; srcb.len() / in_row * cols];
                dequantize(src.dtype, srcb, &mut vals);
                if t.add_one {
                    // The converter adds 1 in the checkpoint's precision (f16 stays f16).
                    for v in &mut vals {
                        *v += 1.0;
                        if round_f16 {
                            *v = half::f16::from_f32(*v).to_f32();
                        }
                    }
                }
                quantize_into(t.target, &vals, dst);
            });
        sink(&out, input.len() as u64)?;
        src.release_byte_range(first * in_row..(first + n) * in_row);
    }
    Ok(())
}

fn io_err(e: std::io::Error) -> ConvertError {
    ConvertError::Load(format!("writing the GGUF file: {e}"))
}

/// Writes a file through a temporary file in the same directory, renamed to `path` only
/// when `write` succeeds: an error or an interrupted run leaves no file at `path`. An
/// existing `path` is an error unless `overwrite`.
pub fn write_atomically<T>(
    path: &Path,
    overwrite: bool,
    write: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<T, ConvertError>,
) -> Result<T, ConvertError> {
    if path.exists() && !overwrite {
        return Err(ConvertError::Load(format!(
            "{} already exists (use --force to overwrite it)",
            path.display()
        )));
    }
    if path.is_dir() {
        return Err(ConvertError::Load(format!(
            "{} is a directory, not a file name",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| ConvertError::Load(format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let guard = TempFile(tmp.clone());
    let file = std::fs::File::create(&tmp)
        .map_err(|e| ConvertError::Load(format!("cannot create {}: {e}", tmp.display())))?;
    let mut buf = std::io::BufWriter::with_capacity(1 << 20, file);
    let value = write(&mut buf)?;
    let file = buf
        .into_inner()
        .map_err(|e| ConvertError::Load(format!("writing {}: {}", tmp.display(), e.error())))?;
    file.sync_all()
        .map_err(|e| ConvertError::Load(format!("writing {}: {e}", tmp.display())))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(|e| {
        ConvertError::Load(format!(
            "cannot move {} to {}: {e}",
            tmp.display(),
            path.display()
        ))
    })?;
    std::mem::forget(guard);
    Ok(value)
}

/// Removes a temporary file when dropped (an error path).
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Writes `plan` to `output` atomically (see [`write_atomically`]).
pub fn write_gguf(
    plan: &Plan,
    output: &Path,
    overwrite: bool,
    progress: &mut dyn FnMut(&Progress) -> bool,
) -> Result<QuantizeSummary, ConvertError> {
    write_atomically(output, overwrite, |f| plan.write(f, progress))
}

/// llama.cpp's mmproj GGUF for Gemma 3 from a multimodal checkpoint: `clip.*` metadata,
/// `v.*` / `mm.*` tensors in f16 (1-D tensors and the embeddings in f32, as the converter
/// keeps them), the projector norm as `1 + w`.
pub fn mmproj_plan(hf: &HfDirectory) -> Result<Plan, ConvertError> {
    let cfg = VisionConfig::from_hf_json(&hf.config)?.ok_or_else(|| {
        ConvertError::Load(format!(
            "{}: config.json has no vision_config; --mmproj needs a multimodal checkpoint",
            hf.dir.display()
        ))
    })?;
    let (tower, projector) = vision::hf_prefixes(hf)?;
    let mut tensors = Vec::new();
    for (hf_name, gguf) in vision::mmproj_names(tower, projector, cfg.num_layers) {
        let source = hf.tensor(&hf_name)?;
        let target = if source.shape.len() < 2 || gguf.contains("_embd.") {
            DType::F32
        } else {
            DType::F16
        };
        tensors.push(PlannedTensor {
            add_one: gguf == vision::SOFT_NORM_MMPROJ,
            shape: source.shape.clone(),
            name: gguf,
            source,
            target,
        });
    }
    let mut m = MetaList(Vec::new());
    let u32v = |x: usize| MetaValue::U32(x as u32);
    m.push("general.architecture", MetaValue::String("clip".into()));
    m.push("general.type", MetaValue::String("mmproj".into()));
    m.push(
        "general.file_type",
        MetaValue::U32(FileType::F16.ggml_ftype()),
    );
    m.push("clip.has_vision_encoder", MetaValue::Bool(true));
    m.push("clip.projector_type", MetaValue::String("gemma3".into()));
    m.push("clip.vision.image_size", u32v(cfg.image_size));
    m.push("clip.vision.patch_size", u32v(cfg.patch_size));
    m.push("clip.vision.embedding_length", u32v(cfg.hidden_size));
    m.push(
        "clip.vision.feed_forward_length",
        u32v(cfg.intermediate_size),
    );
    m.push("clip.vision.projection_dim", u32v(cfg.text_hidden_size));
    m.push("clip.vision.block_count", u32v(cfg.num_layers));
    m.push("clip.vision.attention.head_count", u32v(cfg.num_heads));
    m.push(
        "clip.vision.attention.layer_norm_epsilon",
        MetaValue::F32(cfg.layer_norm_eps),
    );
    let triple = |v: [f32; 3]| MetaValue::Array(v.iter().map(|&x| MetaValue::F32(x)).collect());
    m.push("clip.vision.image_mean", triple(cfg.image_mean));
    m.push("clip.vision.image_std", triple(cfg.image_std));
    m.push("clip.use_gelu", MetaValue::Bool(true));
    // Written only when the pooling window is not Gemma 3's 4 (test models).
    let kernel = cfg.pool_kernel();
    if kernel != 4 {
        m.push("clip.vision.projector.scale_factor", u32v(kernel));
    }
    Ok(Plan {
        metadata: m.0,
        tensors,
        config: TextConfig::from_hf_json(&hf.config)?,
    })
}
