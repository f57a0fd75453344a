//! Errors as OpenAI's API returns them: a status and `{"error": {"message", "type",
//! "param", "code"}}`.

use gemma3_engine::EngineError;
use gemma3_model::ModelError;
use gemma3_text::TextError;

/// Seconds a client is asked to wait when the queue is full.
pub const RETRY_AFTER_SECS: u64 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON, a bad field, a prompt that does not fit: 400.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<&'static str>,
    },
    /// A prompt (with the new tokens asked for) longer than the context: 400 with
    /// OpenAI's code `context_length_exceeded`.
    #[error("{message}")]
    ContextOverflow {
        message: String,
        param: Option<&'static str>,
    },
    #[error("Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.")]
    Unauthorized,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("the request body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    /// The queue is full, or the model is still loading: 503.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad(message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: None,
        }
    }

    pub fn bad_param(param: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            message: message.into(),
            param: Some(param),
        }
    }

    /// The HTTP status OpenAI's API answers this error with.
    pub fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest { .. } | ApiError::ContextOverflow { .. } => 400,
            ApiError::Unauthorized => 401,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::TooLarge { .. } => 413,
            ApiError::Unavailable(_) => 503,
            ApiError::Internal(_) => 500,
        }
    }

    /// Seconds a client should wait before retrying, for errors worth a retry.
    pub fn retry_after(&self) -> Option<u64> {
        matches!(self, ApiError::Unavailable(_)).then_some(RETRY_AFTER_SECS)
    }

    /// OpenAI's error `type` and `code`.
    pub fn kind(&self) -> (&'static str, Option<&'static str>) {
        match self {
            ApiError::BadRequest { .. } => ("invalid_request_error", None),
            ApiError::ContextOverflow { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            ApiError::Unauthorized => ("invalid_request_error", Some("invalid_api_key")),
            ApiError::NotFound(_) => ("invalid_request_error", Some("not_found")),
            ApiError::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            ApiError::TooLarge { .. } => ("invalid_request_error", Some("request_too_large")),
            ApiError::Unavailable(_) => ("server_error", Some("service_unavailable")),
            ApiError::Internal(_) => ("server_error", None),
        }
    }

    /// The OpenAI-shaped body.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind();
        let param = match self {
            ApiError::BadRequest { param, .. } | ApiError::ContextOverflow { param, .. } => *param,
            _ => None,
        };
        serde_json::json!({
            "error": {
                "message": self.to_string(),
                "type": kind,
                "param": param,
                "code": code,
            }
        })
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::ContextOverflow { .. }
            | EngineError::Model(ModelError::ContextOverflow { .. }) => ApiError::ContextOverflow {
                message: e.to_string(),
                param: Some("messages"),
            },
            EngineError::Input(_)
            | EngineError::BadImage(_)
            | EngineError::Tokenizer(_)
            | EngineError::Grammar(_)
            | EngineError::Text(TextError::Input(_) | TextError::Tokenizer(_)) => {
                ApiError::bad(e.to_string())
            }
            EngineError::Model(ModelError::Input(_) | ModelError::TokenOutOfVocab { .. }) => {
                ApiError::bad(e.to_string())
            }
            _ => ApiError::Internal(e.to_string()),
        }
    }
}
