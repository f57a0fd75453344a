//! The OpenAI request bodies this server reads, and their translation into engine options.
//! Unknown fields are ignored (clients send many); fields whose value is wrong, or features
//! this server does not offer, are 400s that name the field.

use crate::error::ApiError;
use gemma3_engine::tools::{Tool, ToolChoice, Tools};
use gemma3_engine::{Draft, GenerateOptions, Grammar, Lookup, SamplingParams};
use gemma3_text::chat::{ChatContent, ChatMessage, ChatPart};
use serde::Deserialize;
use serde_json::Value;

/// The most choices one request may ask for (`n`, times the prompts of a completion).
pub const MAX_CHOICES: usize = 16;
/// The most alternatives per token in logprobs (OpenAI's limit).
pub const MAX_TOP_LOGPROBS: usize = 20;
/// The most stop strings a request may give.
pub const MAX_STOP_STRINGS: usize = 16;
/// The longest new-token count a request may ask for (the model card's output length).
pub const MAX_NEW_TOKENS: usize = 8192;

/// Sampling and length fields shared by chat and completions.
#[derive(Debug, Default, Deserialize)]
pub struct GenParams {
    pub max_tokens: Option<u64>,
    pub max_completion_tokens: Option<u64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub min_p: Option<f32>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(alias = "repeat_penalty")]
    pub repetition_penalty: Option<f32>,
    pub seed: Option<u64>,
    pub stop: Option<Value>,
    pub n: Option<usize>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// vLLM's and llama-server's extension: keep generating through end-of-sequence.
    #[serde(default)]
    pub ignore_eos: bool,
    pub response_format: Option<Value>,
    pub tools: Option<Value>,
    pub tool_choice: Option<Value>,
    pub parallel_tool_calls: Option<bool>,
    /// Extensions (as vLLM's `guided_grammar`/`guided_regex`): a Lark grammar, a regex.
    pub grammar: Option<String>,
    pub regex: Option<String>,
    /// Extension: `false` turns speculative decoding off for this request (the output is
    /// the same either way).
    pub speculative: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub model: Option<String>,
    pub messages: Vec<MessageIn>,
    #[serde(flatten)]
    pub params: GenParams,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<usize>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    #[serde(default)]
    pub content: Value,
    /// An assistant's earlier function calls.
    pub tool_calls: Option<Value>,
    /// A tool message: the call it answers, and (some clients) the function's name.
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub model: Option<String>,
    pub prompt: Value,
    #[serde(flatten)]
    pub params: GenParams,
    #[serde(default)]
    pub echo: bool,
    pub logprobs: Option<usize>,
    pub suffix: Option<String>,
    pub best_of: Option<usize>,
}

/// A message's content with its images as URLs (fetched and decoded by the caller).
pub struct Conversation {
    pub messages: Vec<ChatMessage>,
    pub image_urls: Vec<String>,
}

/// Reads `messages`: string content or parts (`text`, `image_url`).
pub fn conversation(messages: &[MessageIn]) -> Result<Conversation, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_param(
            "messages",
            "messages must not be empty",
        ));
    }
    let mut out = Conversation {
        messages: Vec::with_capacity(messages.len()),
        image_urls: vec![],
    };
    for (i, m) in messages.iter().enumerate() {
        if !gemma3_text::chat::ROLES.contains(&m.role.as_str()) {
            return Err(ApiError::bad_param(
                "messages",
                format!(
                    "messages[{i}].role is {:?}; expected system, developer, user, assistant or tool",
                    m.role
                ),
            ));
        }
        let content = match &m.content {
            Value::String(s) => ChatContent::Text(s.clone()),
            Value::Null if m.role == "assistant" || m.role == "tool" => {
                ChatContent::Text(String::new())
            }
            Value::Array(parts) => {
                let mut ps = Vec::with_capacity(parts.len());
                for (j, p) in parts.iter().enumerate() {
                    ps.push(part(p, i, j, &mut out.image_urls)?);
                }
                ChatContent::Parts(ps)
            }
            other => {
                return Err(ApiError::bad_param(
                    "messages",
                    format!(
                        "messages[{i}].content must be a string or a list of parts, not {}",
                        kind(other)
                    ),
                ))
            }
        };
        let tool_calls = match &m.tool_calls {
            None | Some(Value::Null) => None,
            Some(v) if m.role == "assistant" => Some(tool_calls_in(v, i)?),
            Some(_) => {
                return Err(ApiError::bad_param(
                    "messages",
                    format!("messages[{i}] has tool_calls but only assistant messages make calls"),
                ))
            }
        };
        out.messages.push(ChatMessage {
            role: m.role.clone(),
            content,
            tool_calls,
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        });
    }
    Ok(out)
}

/// An assistant message's `tool_calls`, in the shape templates read (transformers'):
/// `arguments` parsed from its JSON text into an object.
fn tool_calls_in(v: &Value, i: usize) -> Result<Vec<Value>, ApiError> {
    let bad = |m: String| ApiError::bad_param("messages", format!("messages[{i}].tool_calls{m}"));
    let list = v.as_array().ok_or_else(|| bad(" must be a list".into()))?;
    list.iter()
        .enumerate()
        .map(|(j, c)| {
            let f = c
                .get("function")
                .ok_or_else(|| bad(format!("[{j}] has no \"function\"")))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("[{j}].function has no \"name\"")))?;
            let args = match f.get("arguments") {
                Some(Value::String(s)) => serde_json::from_str::<Value>(s)
                    .map_err(|e| bad(format!("[{j}].function.arguments is not JSON ({e})")))?,
                Some(v @ Value::Object(_)) => v.clone(),
                None | Some(Value::Null) => Value::Object(Default::default()),
                Some(_) => {
                    return Err(bad(format!(
                        "[{j}].function.arguments must be a JSON object's text"
                    )))
                }
            };
            Ok(serde_json::json!({
                "id": c.get("id").cloned().unwrap_or(Value::Null),
                "type": "function",
                "function": {"name": name, "arguments": args},
            }))
        })
        .collect()
}

fn part(p: &Value, i: usize, j: usize, urls: &mut Vec<String>) -> Result<ChatPart, ApiError> {
    let at = || format!("messages[{i}].content[{j}]");
    let ty = p
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_param("messages", format!("{} has no \"type\"", at())))?;
    match ty {
        "text" => {
            let text = p.get("text").and_then(Value::as_str).ok_or_else(|| {
                ApiError::bad_param("messages", format!("{} has no \"text\" string", at()))
            })?;
            Ok(ChatPart::Text { text: text.into() })
        }
        "image_url" => {
            let url = match p.get("image_url") {
                Some(Value::String(s)) => s.clone(),
                Some(o) => o
                    .get("url")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .ok_or_else(|| {
                        ApiError::bad_param(
                            "messages",
                            format!("{}.image_url has no \"url\"", at()),
                        )
                    })?,
                None => {
                    return Err(ApiError::bad_param(
                        "messages",
                        format!("{} has no \"image_url\"", at()),
                    ))
                }
            };
            urls.push(url);
            Ok(ChatPart::Image)
        }
        other => Err(ApiError::bad_param(
            "messages",
            format!(
                "{} has type {other:?}; gemma3 reads \"text\" and \"image_url\" parts",
                at()
            ),
        )),
    }
}

/// A completion's prompts: text (one or several) or token ids (one list or several).
pub enum Prompts {
    Texts(Vec<String>),
    Ids(Vec<Vec<u32>>),
}

pub fn prompts(v: &Value) -> Result<Prompts, ApiError> {
    let bad = |m: String| ApiError::bad_param("prompt", m);
    let id = |x: &Value| -> Result<u32, ApiError> {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| {
                bad(format!(
                    "token ids must be integers from 0 to {}, got {x}",
                    u32::MAX
                ))
            })
    };
    match v {
        Value::String(s) => Ok(Prompts::Texts(vec![s.clone()])),
        Value::Array(a) if a.is_empty() => Err(bad("prompt must not be empty".into())),
        Value::Array(a) if a.iter().all(Value::is_string) => Ok(Prompts::Texts(
            a.iter().map(|s| s.as_str().unwrap_or_default().to_string()).collect(),
        )),
        Value::Array(a) if a.iter().all(Value::is_number) => {
            Ok(Prompts::Ids(vec![a.iter().map(id).collect::<Result<_, _>>()?]))
        }
        Value::Array(a) if a.iter().all(Value::is_array) => Ok(Prompts::Ids(
            a.iter()
                .map(|l| {
                    l.as_array()
                        .map(|l| l.iter().map(id).collect::<Result<Vec<_>, _>>())
                        .unwrap_or_else(|| Ok(vec![]))
                })
                .collect::<Result<_, _>>()?,
        )),
        Value::Null => Err(bad("prompt is required".into())),
        other => Err(bad(format!(
            "prompt must be a string, a list of strings, a list of token ids or a list of such lists, not {}",
            kind(other)
        ))),
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// What the server's configuration brings to each request.
pub struct Defaults<'a> {
    pub sampling: &'a SamplingParams,
    /// The server's speculative decoding (None: off).
    pub lookup: Option<&'a Lookup>,
    /// The server's draft model (None: none; prompt lookup if `lookup`).
    pub draft: Option<&'a Draft>,
    /// A fresh seed for requests that give none.
    pub seed: u64,
}

impl GenParams {
    /// What the output must follow: `response_format` (`text`, `json_object`,
    /// `json_schema`), or the `grammar` / `regex` extensions; at most one of them.
    pub fn constraint(&self) -> Result<Option<Grammar>, ApiError> {
        let mut found: Vec<(&str, Grammar)> = Vec::new();
        if let Some(rf) = self.response_format.as_ref().filter(|v| !v.is_null()) {
            if let Some(g) = response_format(rf)? {
                found.push(("response_format", g));
            }
        }
        if let Some(g) = &self.grammar {
            found.push(("grammar", Grammar::Lark(g.clone())));
        }
        if let Some(r) = &self.regex {
            found.push(("regex", Grammar::Regex(r.clone())));
        }
        match found.len() {
            0 | 1 => Ok(found.pop().map(|(_, g)| g)),
            _ => Err(ApiError::bad(format!(
                "give at most one of response_format, grammar and regex (got {})",
                found.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            ))),
        }
    }

    /// The request's tools and how they may be used (None without tools).
    pub fn tools(&self) -> Result<Option<Tools>, ApiError> {
        let list = match &self.tools {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::Array(a)) if a.is_empty() => return Ok(None),
            Some(Value::Array(a)) => a,
            Some(_) => return Err(ApiError::bad_param("tools", "tools must be a list")),
        };
        let mut tools = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            let bad = |m: &str| ApiError::bad_param("tools", format!("tools[{i}]{m}"));
            if t.get("type").and_then(Value::as_str).unwrap_or("function") != "function" {
                return Err(bad(".type must be \"function\""));
            }
            let f = t
                .get("function")
                .ok_or_else(|| bad(" has no \"function\""))?;
            let name = f
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(".function has no \"name\""))?;
            let parameters = match f.get("parameters") {
                None | Some(Value::Null) => serde_json::json!({"type": "object", "properties": {}}),
                Some(p) => p.clone(),
            };
            tools.push(Tool {
                name: name.to_string(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                parameters,
            });
        }
        let choice = match &self.tool_choice {
            None | Some(Value::Null) => ToolChoice::Auto,
            Some(Value::String(s)) => match s.as_str() {
                "none" => ToolChoice::None,
                "auto" => ToolChoice::Auto,
                "required" => ToolChoice::Required,
                other => {
                    return Err(ApiError::bad_param(
                        "tool_choice",
                        format!("tool_choice {other:?} is not one of none, auto, required"),
                    ))
                }
            },
            Some(v) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(n) => ToolChoice::Named(n.to_string()),
                None => {
                    return Err(ApiError::bad_param(
                        "tool_choice",
                        "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                    ))
                }
            },
        };
        let tools = Tools {
            tools,
            choice,
            parallel: self.parallel_tool_calls.unwrap_or(true),
        };
        tools
            .check()
            .map_err(|e| ApiError::bad_param("tools", e.to_string()))?;
        Ok(Some(tools))
    }

    /// Choices per prompt.
    pub fn n(&self) -> Result<usize, ApiError> {
        match self.n.unwrap_or(1) {
            0 => Err(ApiError::bad_param("n", "n must be at least 1")),
            n if n > MAX_CHOICES => Err(ApiError::bad_param(
                "n",
                format!("n must be at most {MAX_CHOICES}"),
            )),
            n => Ok(n),
        }
    }

    /// The new-token limit asked for, if any (`max_completion_tokens` wins).
    pub fn max_tokens(&self) -> Result<Option<usize>, ApiError> {
        match self.max_completion_tokens.or(self.max_tokens) {
            None => Ok(None),
            Some(n) if n as usize > MAX_NEW_TOKENS || n > usize::MAX as u64 => {
                Err(ApiError::bad_param(
                    "max_tokens",
                    format!("max_tokens is {n}; the most gemma3 generates is {MAX_NEW_TOKENS}"),
                ))
            }
            Some(n) => Ok(Some(n as usize)),
        }
    }

    pub fn stop_strings(&self) -> Result<Vec<String>, ApiError> {
        let list = match &self.stop {
            None | Some(Value::Null) => vec![],
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str().map(str::to_string).ok_or_else(|| {
                        ApiError::bad_param("stop", "stop must be a string or a list of strings")
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(ApiError::bad_param(
                    "stop",
                    "stop must be a string or a list of strings",
                ))
            }
        };
        if list.len() > MAX_STOP_STRINGS {
            return Err(ApiError::bad_param(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings"),
            ));
        }
        Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// Sampling settings: the request's, over the server's defaults.
    pub fn sampling(&self, d: &Defaults<'_>) -> Result<SamplingParams, ApiError> {
        let mut s = d.sampling.clone();
        if let Some(t) = self.temperature {
            s.temperature = t;
        }
        if let Some(p) = self.top_p {
            s.top_p = p;
        }
        if let Some(k) = self.top_k {
            // OpenAI-style clients send -1 or 0 for "no limit".
            s.top_k = if k <= 0 { 0 } else { k as usize };
        }
        if let Some(m) = self.min_p {
            s.min_p = m;
        }
        if let Some(p) = self.presence_penalty {
            s.presence_penalty = p;
        }
        if let Some(p) = self.frequency_penalty {
            s.frequency_penalty = p;
        }
        if let Some(p) = self.repetition_penalty {
            s.repetition_penalty = p;
        }
        s.seed = self.seed.unwrap_or(d.seed);
        s.validate().map_err(ApiError::bad)?;
        Ok(s)
    }

    /// Engine options for one choice (`choice` offsets the seed, so the choices of one
    /// request differ while the request stays reproducible).
    pub fn options(
        &self,
        d: &Defaults<'_>,
        max_new: usize,
        logprobs: Option<usize>,
        choice: usize,
    ) -> Result<GenerateOptions, ApiError> {
        let mut sampling = self.sampling(d)?;
        sampling.seed = sampling.seed.wrapping_add(choice as u64);
        Ok(GenerateOptions {
            max_new_tokens: max_new,
            sampling,
            stop_strings: self.stop_strings()?,
            ignore_eos: self.ignore_eos,
            logprobs,
            lookup: match self.speculative {
                Some(false) => None,
                _ => d.lookup.cloned(),
            },
            draft: match self.speculative {
                Some(false) => None,
                _ => d.draft.cloned(),
            },
            ..Default::default()
        })
    }
}

/// OpenAI's `response_format`: `text` (None), `json_object`, or `json_schema`
/// (`{"json_schema": {"name", "schema", "strict"}}`).
fn response_format(rf: &Value) -> Result<Option<Grammar>, ApiError> {
    let bad = |m: String| ApiError::bad_param("response_format", m);
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Grammar::JsonObject)),
        Some("json_schema") => {
            let js = rf
                .get("json_schema")
                .ok_or_else(|| bad("a json_schema response_format needs \"json_schema\"".into()))?;
            match js.get("schema") {
                Some(s @ (Value::Object(_) | Value::Bool(_))) => {
                    Ok(Some(Grammar::JsonSchema(s.clone())))
                }
                // OpenAI: no schema means any JSON.
                None | Some(Value::Null) => Ok(Some(Grammar::JsonObject)),
                Some(_) => Err(bad("json_schema.schema must be a JSON schema object".into())),
            }
        }
        Some(other) => Err(bad(format!(
            "response_format type {other:?} is not one of text, json_object, json_schema"
        ))),
        None => Err(bad("response_format needs a \"type\"".into())),
    }
}

pub fn check_top_logprobs(n: usize, param: &'static str) -> Result<usize, ApiError> {
    if n > MAX_TOP_LOGPROBS {
        return Err(ApiError::bad_param(
            param,
            format!("{param} must be at most {MAX_TOP_LOGPROBS}"),
        ));
    }
    Ok(n)
}
