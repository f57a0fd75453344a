//! A model's conversations: its chat template applied to messages, whether it is made for
//! chatting, and the ids of a rendered prompt.

use crate::load::Model;
use crate::EngineError;
use gemma3_text::{ChatMessage, TemplateOrigin};

impl Model {
    /// The prompt ids of a conversation, rendered with the model's chat template (and, with
    /// images, expanded to the image tokens as for [`Model::generate`]).
    pub fn chat_prompt(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        Ok(self
            .chat_template()?
            .render(messages, add_generation_prompt)?)
    }

    /// Whether the model is made for conversations: its file carries a chat template (an
    /// instruction-tuned checkpoint), or it came from Ollama with a template. Front ends
    /// wrap a plain prompt in the template for such models, as Ollama does.
    pub fn is_instruction_tuned(&self) -> bool {
        let own = self
            .chat_template()
            .map(|t| t.origin == TemplateOrigin::Model)
            .unwrap_or(true);
        let ollama = self
            .origin
            .as_ref()
            .and_then(|r| r.ollama.as_ref())
            .is_some_and(|o| o.template.is_some());
        own || ollama
    }

    /// The system message the model brings (Ollama's system layer), used when none is
    /// given.
    pub fn default_system(&self) -> Option<&str> {
        self.origin
            .as_ref()
            .and_then(|r| r.ollama.as_ref())
            .and_then(|o| o.system.as_deref())
    }

    /// Whether a rendered chat prompt already starts with the BOS token (most templates
    /// print it), so tokenizing must not add another.
    pub fn starts_with_bos(&self, text: &str) -> bool {
        self.tokenizer
            .id_to_piece(self.tokenizer.bos_id())
            .is_some_and(|bos| !bos.is_empty() && text.starts_with(bos))
    }

    /// Token ids of a rendered chat prompt (special tokens parsed; BOS added only when the
    /// template did not print it).
    pub fn encode_chat(&self, text: &str) -> Vec<u32> {
        let bos = !self.starts_with_bos(text) && self.tokenizer.add_bos();
        self.tokenizer.encode(text, bos, true)
    }
}
