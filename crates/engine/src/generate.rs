//! The generation loop: prefill the prompt as one batch, then decode token by token with
//! the KV cache, sampling each next token and streaming text as soon as it is whole UTF-8
//! and cannot be the start of a stop string.

use crate::load::Model;
use crate::request::{GenerateOptions, Generation};
use crate::sequence::{Batch, SeqImages, Sequence};
use crate::EngineError;
use gemma3_model::{ImageInputs, KvCache, MAX_BATCH};

/// The smallest default context, however little memory the machine reports.
const MIN_DEFAULT_CONTEXT: usize = 4096;

/// The memory this process could still take, in bytes: what the OS reports available
/// (Linux's MemAvailable, macOS's and Windows' own counters, through `sysinfo`), or the
/// room left under this process's cgroup memory limit when that is smaller (a container's
/// limit). None where the OS reports nothing.
pub fn available_memory() -> Option<usize> {
    let mut sys = sysinfo::System::new().ok()?;
    sys.refresh_memory_specifics(sysinfo::MemoryRefreshKind::nothing().with_ram());
    let host = usize::try_from(sys.available_memory()).ok()?;
    if host == 0 {
        return None;
    }
    // In a container the limit is its cgroup's, not the host's free memory (Linux only).
    let room = sys
        .cgroup_limits()
        .and_then(|c| usize::try_from(c.free_memory).ok());
    Some(room.map_or(host, |room| room.min(host)))
}

/// A model with a cache sized for one context, reusable across requests: a prompt that
/// shares a prefix with the previous request (a chat's history) reuses its keys and values.
pub struct Generator<'m> {
    pub model: &'m Model,
    batch: Batch,
    /// The cache and the tokens it holds, between requests.
    cache: Option<(KvCache, Vec<u32>)>,
    context: usize,
}

impl<'m> Generator<'m> {
    pub fn new(model: &'m Model, context: usize) -> Self {
        Generator {
            model,
            batch: Batch::new(model, MAX_BATCH),
            cache: Some((model.text.new_cache(context, MAX_BATCH), Vec::new())),
            context,
        }
    }

    /// Forgets the cached prefix (the next request is computed from scratch).
    pub fn forget(&mut self) {
        if let Some((c, t)) = &mut self.cache {
            c.clear();
            t.clear();
        }
    }

    pub fn context(&self) -> usize {
        self.context
    }

    /// Generates from prompt ids; `on_text` receives each piece of printable text and
    /// returns false to stop.
    pub fn generate_ids(
        &mut self,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.generate_ids_with(prompt, None, opts, on_text)
    }

    /// [`generate_ids`](Self::generate_ids) with the rows that replace the prompt's image
    /// soft tokens (see [`Model::encode_image_views`]).
    pub fn generate_ids_with(
        &mut self,
        prompt: &[u32],
        images: Option<ImageInputs<'_>>,
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        let (cache, cached) = match self.cache.take() {
            Some(c) => c,
            None => (
                self.model.text.new_cache(self.context, MAX_BATCH),
                Vec::new(),
            ),
        };
        let images = images.map(|im| SeqImages {
            image_token: im.image_token,
            embeds: im.embeds.to_vec(),
        });
        let mut seq = Sequence::new(self.model, prompt.to_vec(), images, opts, cache, cached)?;
        let result = loop {
            if let Err(e) = self.batch.step(self.model, &mut [&mut seq]) {
                break Err(e);
            }
            let u = seq.take_update();
            if !u.text.is_empty() && !on_text(&u.text) {
                seq.cancel();
                break Ok(());
            }
            if u.finished.is_some() {
                break Ok(());
            }
        };
        let out = seq.generation().clone();
        self.cache = Some(seq.into_cache());
        result.map(|()| out)
    }
}

impl Model {
    /// Tokenizes `prompt` and generates, streaming text to `on_text`. With
    /// `opts.images`, each image is encoded by the vision tower and shown where its
    /// `<start_of_image>` marker is.
    pub fn generate(
        &self,
        prompt: &str,
        opts: &GenerateOptions,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        let ctx = self.context(opts.context)?;
        if opts.images.is_empty() {
            let mut ids = self.encode_prompt(prompt, opts.add_bos, opts.parse_special);
            if opts.truncate_left {
                // Running to the end of the context, keep at most half of it for the prompt
                // (as llama.cpp does when it cuts one).
                let reserve = match opts.stop_at_context {
                    true => opts.max_new_tokens.min(ctx / 2),
                    false => opts.max_new_tokens,
                };
                self.truncate_left(&mut ids, reserve, ctx)?;
            }
            return Generator::new(self, ctx).generate_ids(&ids, opts, on_text);
        }
        // Fail before the (slow) image encoding when the prompt cannot fit.
        let needed = match opts.stop_at_context {
            true => 1,
            false => opts.max_new_tokens,
        };
        let p = self.prompt_inputs(
            prompt,
            &opts.images,
            opts.pan_and_scan.as_ref(),
            opts.add_bos,
            opts.parse_special,
            Some((needed, ctx)),
        )?;
        let image_secs = p.image_secs;
        let inputs = p.images.as_ref().map(|im| ImageInputs {
            image_token: im.image_token,
            embeds: &im.embeds,
        });
        let mut g = Generator::new(self, ctx).generate_ids_with(&p.ids, inputs, opts, on_text)?;
        g.image_secs = image_secs;
        Ok(g)
    }

    /// Runs `ids` (with the rows of their image soft tokens) through the model in one go
    /// and hands every position's logits, in order, to `on_row`: `gemma3 logits` and the
    /// Python module's `logits`.
    pub fn logits(
        &self,
        ids: &[u32],
        images: Option<ImageInputs<'_>>,
        on_row: &mut (dyn FnMut(usize, &[f32]) + Send),
    ) -> Result<(), EngineError> {
        if ids.is_empty() {
            return Err(EngineError::Input("no tokens to run".into()));
        }
        let ctx = self.context(None)?;
        if ids.len() > ctx {
            return Err(EngineError::Input(format!(
                "{} tokens exceed the context of {ctx}",
                ids.len()
            )));
        }
        let mut cache = self.text.new_cache(ctx, MAX_BATCH);
        let mut ws = gemma3_model::Workspace::new(&self.text.cfg, MAX_BATCH);
        self.text.forward_with(
            ids,
            images,
            &mut cache,
            &mut ws,
            gemma3_model::Logits::All,
            on_row,
            None,
        )?;
        Ok(())
    }

    pub fn encode_prompt(
        &self,
        prompt: &str,
        add_bos: Option<bool>,
        parse_special: bool,
    ) -> Vec<u32> {
        let bos = add_bos.unwrap_or(self.tokenizer.add_bos());
        self.tokenizer.encode(prompt, bos, parse_special)
    }

    /// The context of a sequence: `explicit` when given (at least 1 and at most the
    /// model's trained length), else the model's own setting (Ollama's `num_ctx`) or the
    /// trained length (32K for 270M and 1B, 128K for the larger models), capped so that a
    /// full KV cache takes at most half of the memory available now. The cache grows with use, so a long context costs nothing unused.
    pub fn context(&self, explicit: Option<usize>) -> Result<usize, EngineError> {
        let trained = self.text.cfg.max_position_embeddings;
        match explicit {
            Some(0) => Err(EngineError::Input(
                "the context size must be at least 1 token".into(),
            )),
            Some(c) if c > trained => Err(EngineError::Input(format!(
                "a context of {c} tokens is beyond the model's trained context of {trained}"
            ))),
            Some(c) => Ok(c),
            None => {
                // Ollama's num_ctx, when the model came with one.
                let wanted = self.default_context().unwrap_or(trained).min(trained);
                let Some(avail) = available_memory() else {
                    return Ok(wanted);
                };
                let cache = self.text.new_cache(wanted, MAX_BATCH);
                let per_token = cache.bytes_at(wanted).div_ceil(wanted).max(1);
                let fits = (avail / 2 / per_token).max(MIN_DEFAULT_CONTEXT);
                Ok(wanted.min(fits))
            }
        }
    }

    /// Drops the oldest tokens of `ids` (keeping a leading BOS) so that they and `max_new`
    /// new tokens fit a context of `ctx`.
    pub fn truncate_left(
        &self,
        ids: &mut Vec<u32>,
        max_new: usize,
        ctx: usize,
    ) -> Result<(), EngineError> {
        let room = ctx.saturating_sub(max_new.max(1));
        if ids.len() <= room {
            return Ok(());
        }
        let keep_bos = usize::from(ids.first() == Some(&self.tokenizer.bos_id()));
        if room <= keep_bos {
            return Err(EngineError::ContextOverflow {
                prompt: ids.len(),
                max_new,
                context: ctx,
                model_max: self.text.cfg.max_position_embeddings,
            });
        }
        let cut = ids.len() - room;
        ids.drain(keep_bos..keep_bos + cut);
        Ok(())
    }
}
