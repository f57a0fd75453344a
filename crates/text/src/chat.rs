//! Chat templates: a conversation (system, user and assistant messages, text and images)
//! rendered to the prompt text the model was trained on. The model's own Jinja template is
//! used when its file carries one (GGUF `tokenizer.chat_template`; Hugging Face
//! `chat_template.jinja` or `tokenizer_config.json`), rendered with minijinja the way
//! transformers renders it (`trim_blocks`, `lstrip_blocks`, `raise_exception`,
//! `strftime_now`, `tojson`, Python's string methods); otherwise a built-in template that
//! formats Gemma 3's turns the same way: the system text joins the first user turn, and
//! each image becomes `<start_of_image>`. `serve`, `chat` and `generate --chat` all use this.

use crate::TextError;
use gemma3_formats::MAX_TEXT_BYTES;
use minijinja::{Environment, ErrorKind, Value};
use serde::Serialize;

/// Gemma 3's turn format as a template: `<start_of_turn>user\n…<end_of_turn>\n`, the
/// assistant's turns as `model`, the system message prefixed to the first user turn.
const GEMMA3_TEMPLATE: &str = r#"{{- bos_token -}}
{%- set ns = namespace(prefix="", messages=messages) -%}
{%- if messages and messages[0].role == "system" -%}
  {%- if messages[0].content is string -%}
    {%- set ns.prefix = messages[0].content ~ "\n\n" -%}
  {%- else -%}
    {%- set ns.prefix = messages[0].content[0].text ~ "\n\n" -%}
  {%- endif -%}
  {%- set ns.messages = messages[1:] -%}
{%- endif -%}
{%- for message in ns.messages -%}
  {%- if (message.role == "user") != (loop.index0 % 2 == 0) -%}
    {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") -}}
  {%- endif -%}
  {{- "<start_of_turn>" ~ ("model" if message.role == "assistant" else message.role) ~ "\n" -}}
  {{- ns.prefix if loop.first else "" -}}
  {%- if message.content is string -%}
    {{- message.content | trim -}}
  {%- else -%}
    {%- for part in message.content -%}
      {%- if part.type == "image" -%}
        {{- "<start_of_image>" -}}
      {%- elif part.type == "text" -%}
        {{- part.text | trim -}}
      {%- endif -%}
    {%- endfor -%}
  {%- endif -%}
  {{- "<end_of_turn>\n" -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- "<start_of_turn>model\n" -}}
{%- endif -%}
"#;

/// Rendering budget (minijinja fuel): generous for any real conversation, finite for a
/// template or input that would loop.
const RENDER_FUEL: u64 = 5_000_000;

/// Stack of the thread a template renders on. A template can nest a value as deep as its
/// fuel allows (`{% set ns.x = [ns.x] %}` in a loop), and minijinja prints and drops
/// values recursively: 100000 levels overflowed a default 8 MB stack (found by the
/// chat_template fuzz target). Nesting to the fuel's limit needed 64-256 MB in the fuzz
/// build; only the pages touched are ever backed by memory.
const RENDER_STACK_BYTES: usize = 1 << 30;

/// The roles a conversation may use ("developer" is OpenAI's newer name for "system";
/// "tool" carries a function's result).
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];

/// One message of a conversation.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: ChatContent,
    /// An assistant's function calls, as templates read them (transformers' shape:
    /// `{"type": "function", "id", "function": {"name", "arguments": {…}}}`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    /// A tool message: the call it answers, and the function's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    pub fn text(role: &str, text: &str) -> Self {
        ChatMessage {
            role: role.into(),
            content: ChatContent::Text(text.into()),
            ..Default::default()
        }
    }

    /// The message's text (its text parts joined, for parts).
    pub fn text_content(&self) -> String {
        match &self.content {
            ChatContent::Text(t) => t.clone(),
            ChatContent::Parts(ps) => ps
                .iter()
                .filter_map(|p| match p {
                    ChatPart::Text { text } => Some(text.as_str()),
                    ChatPart::Image => None,
                })
                .collect::<Vec<_>>()
                .join(""),
        }
    }
}

/// A message's content: text, or parts (text and images in order).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(untagged)]
pub enum ChatContent {
    Text(String),
    Parts(Vec<ChatPart>),
}

impl Default for ChatContent {
    fn default() -> Self {
        ChatContent::Text(String::new())
    }
}

/// A part of a message; an image part stands where its image goes (the caller supplies
/// the images in order).
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ChatPart {
    Text { text: String },
    Image,
}

impl ChatContent {
    /// How many images the content places.
    pub fn images(&self) -> usize {
        match self {
            ChatContent::Text(_) => 0,
            ChatContent::Parts(p) => p.iter().filter(|p| matches!(p, ChatPart::Image)).count(),
        }
    }
}

/// Where a template came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TemplateOrigin {
    /// The model file's own template.
    Model,
    /// Gemma 3's format, built in (the model carries no template).
    BuiltIn,
}

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    pub origin: TemplateOrigin,
    bos: String,
    eos: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChatTemplate({:?})", self.origin)
    }
}

impl ChatTemplate {
    /// Gemma 3's format.
    pub fn gemma3(bos: &str, eos: &str) -> Self {
        Self::compile(
            GEMMA3_TEMPLATE.to_string(),
            TemplateOrigin::BuiltIn,
            bos,
            eos,
        )
        .expect("the built-in template compiles")
    }

    /// A model's own Jinja template.
    pub fn from_source(source: &str, bos: &str, eos: &str) -> Result<Self, TextError> {
        Self::compile(source.to_string(), TemplateOrigin::Model, bos, eos)
    }

    /// The model's own template when it has one (`source` not blank), else Gemma 3's;
    /// either prints the tokenizer's BOS and EOS pieces.
    pub fn for_tokenizer(source: Option<&str>, tok: &crate::Tokenizer) -> Result<Self, TextError> {
        let piece = |id: u32| tok.id_to_piece(id).unwrap_or("").to_string();
        let (bos, eos) = (piece(tok.bos_id()), piece(tok.eos_id()));
        match source {
            Some(s) if !s.trim().is_empty() => ChatTemplate::from_source(s, &bos, &eos),
            _ => Ok(ChatTemplate::gemma3(&bos, &eos)),
        }
    }

    fn compile(
        source: String,
        origin: TemplateOrigin,
        bos: &str,
        eos: &str,
    ) -> Result<Self, TextError> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks.
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("the default delimiters are valid"),
        );
        env.set_fuel(Some(RENDER_FUEL));
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<Value, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function(
            "strftime_now",
            |fmt: String| -> Result<String, minijinja::Error> {
                let now = jiff::Zoned::now();
                jiff::fmt::strtime::format(fmt.as_str(), &now).map_err(|e| {
                    minijinja::Error::new(ErrorKind::InvalidOperation, format!("strftime_now: {e}"))
                })
            },
        );
        env.add_template_owned("chat", source.clone())
            .map_err(|e| TextError::Input(format!("the chat template does not compile: {e}")))?;
        Ok(ChatTemplate {
            env,
            source,
            origin,
            bos: bos.into(),
            eos: eos.into(),
        })
    }

    /// The template's Jinja text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the template reads a `tools` list (as transformers'
    /// `apply_chat_template(tools=...)` passes it): its format for tool calls is then the
    /// model's own.
    pub fn uses_tools(&self) -> bool {
        self.env
            .get_template("chat")
            .is_ok_and(|t| t.undeclared_variables(false).contains("tools"))
    }

    /// The prompt text of `messages`; with `add_generation_prompt`, ending where the
    /// model's reply begins. Roles must be system (or developer), user, assistant or tool.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TextError> {
        self.render_with_tools(messages, add_generation_prompt, None)
    }

    /// [`render`](Self::render), passing the template a `tools` list (OpenAI's
    /// `[{"type": "function", "function": {...}}]`) when given.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&serde_json::Value>,
    ) -> Result<String, TextError> {
        if let Some(m) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
            return Err(TextError::Input(format!(
                "unknown message role {:?} (expected system, user, assistant or tool)",
                m.role
            )));
        }
        let messages: Vec<ChatMessage> = messages
            .iter()
            .map(|m| ChatMessage {
                role: if m.role == "developer" {
                    "system".into()
                } else {
                    m.role.clone()
                },
                ..m.clone()
            })
            .collect();
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| TextError::Input(format!("chat template: {e}")))?;
        let mut ctx = minijinja::context! {
            messages => Value::from(minijinja::value::Serde(&messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        };
        // Only a request with tools defines `tools` (templates test `tools is defined`).
        if let Some(t) = tools {
            ctx = minijinja::context! { tools => Value::from(minijinja::value::Serde(t)), ..ctx };
        }
        // The error is turned into text on the rendering thread too: minijinja's errors
        // keep the template's variables (for debugging), deep values included.
        let render = || {
            tmpl.render(ctx.clone()).map_err(|e| {
                let msg = match e.kind() {
                    ErrorKind::InvalidOperation => {
                        e.detail().unwrap_or("invalid operation").to_string()
                    }
                    _ => e.to_string(),
                };
                TextError::Input(format!(
                    "the chat template rejected the conversation: {msg}"
                ))
            })
        };
        std::thread::scope(|scope| {
            match std::thread::Builder::new()
                .name("chat-template".into())
                .stack_size(RENDER_STACK_BYTES)
                .spawn_scoped(scope, render)
            {
                Ok(thread) => thread.join().unwrap_or_else(|_| {
                    Err(TextError::Input(
                        "the chat template's renderer panicked".into(),
                    ))
                }),
                // No room for the stack (strict overcommit): render here, as before.
                Err(_) => render(),
            }
        })
    }
}

/// The template text a model directory carries: `chat_template.jinja`, else
/// `tokenizer_config.json`'s `chat_template` (a string, or a list of named templates of
/// which "default" is taken).
pub fn hf_template_source(dir: &std::path::Path) -> Result<Option<String>, TextError> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return Ok(Some(gemma3_formats::read_text(&jinja, MAX_TEXT_BYTES)?));
    }
    let cfg = dir.join("tokenizer_config.json");
    if !cfg.is_file() {
        return Ok(None);
    }
    let text = gemma3_formats::read_text(&cfg, MAX_TEXT_BYTES)?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| TextError::Load(format!("{}: invalid JSON: {e}", cfg.display())))?;
    Ok(match v.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template"))
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma() -> ChatTemplate {
        ChatTemplate::gemma3("<bos>", "<eos>")
    }

    #[test]
    fn deeply_nested_values_do_not_overflow_the_stack() {
        // Found by the chat_template fuzz target: a list nested 100000 deep took the
        // process down with a stack overflow when minijinja dropped (or printed) it.
        let nest = |inner: u32, tail: &str| {
            format!(
                "{{% set ns = namespace(x=[]) %}}{{% for i in range({inner}) %}}{{% for j in range(10) %}}\
                 {{% set ns.x = [ns.x] %}}{{% endfor %}}{{% endfor %}}{tail}"
            )
        };
        let msgs = [ChatMessage::text("user", "Hi")];
        let t = ChatTemplate::from_source(&nest(10_000, "done"), "", "").unwrap();
        assert_eq!(t.render(&msgs, false).unwrap(), "done");
        let t = ChatTemplate::from_source(&nest(10_000, "{{ ns.x|length }}"), "", "").unwrap();
        assert_eq!(t.render(&msgs, false).unwrap(), "1");
        // Nesting until the fuel runs out ends in an error, not a crash.
        let t = ChatTemplate::from_source(&nest(1_000_000, ""), "", "").unwrap();
        assert!(t.render(&msgs, false).is_err());
    }

    #[test]
    fn renders_gemma_turns() {
        let msgs = vec![
            ChatMessage::text("system", "Be brief."),
            ChatMessage::text("user", "  Hi! "),
            ChatMessage::text("assistant", "Hello."),
            ChatMessage::text("user", "Bye"),
        ];
        assert_eq!(
            gemma().render(&msgs, true).unwrap(),
            "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
        );
        assert_eq!(
            gemma().render(&msgs[1..2], false).unwrap(),
            "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
        );
    }

    #[test]
    fn images_become_markers() {
        let msgs = vec![ChatMessage {
            role: "user".into(),
            content: ChatContent::Parts(vec![
                ChatPart::Image,
                ChatPart::Text {
                    text: "What is this?".into(),
                },
            ]),
            ..Default::default()
        }];
        assert_eq!(
            gemma().render(&msgs, true).unwrap(),
            "<bos><start_of_turn>user\n<start_of_image>What is this?<end_of_turn>\n<start_of_turn>model\n"
        );
    }

    #[test]
    fn bad_conversations_are_errors() {
        let e = gemma()
            .render(&[ChatMessage::text("assistant", "x")], true)
            .unwrap_err();
        assert!(e.to_string().contains("must alternate"), "{e}");
        let e = gemma()
            .render(&[ChatMessage::text("robot", "x")], true)
            .unwrap_err();
        assert!(
            e.to_string().contains("unknown message role \"robot\""),
            "{e}"
        );
    }

    #[test]
    fn model_templates_get_transformers_helpers() {
        // trim_blocks/lstrip_blocks, Python string methods, tojson, strftime_now.
        let src = "{% for m in messages %}\n  {{ m.role.upper() }}:{{ m.content.strip() | tojson }}\n{% endfor %}{{ strftime_now('%Y')|length }}";
        let t = ChatTemplate::from_source(src, "<bos>", "<eos>").unwrap();
        let out = t
            .render(&[ChatMessage::text("user", " a ")], false)
            .unwrap();
        assert_eq!(out, "  USER:\"a\"\n4");
        assert!(ChatTemplate::from_source("{% for %}", "", "").is_err());
        let looping = ChatTemplate::from_source(
            "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
            "",
            "",
        )
        .unwrap();
        assert!(looping.render(&[], false).is_err());
    }
}
