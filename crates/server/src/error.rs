//! OpenAI-shaped errors as HTTP responses: the status, `Retry-After` on a 503, and the
//! `{"error": {...}}` body that `gemma3_openai::ApiError` builds.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use gemma3_engine::EngineError;
pub use gemma3_openai::ApiError;

/// An [`ApiError`] answered over HTTP.
#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<EngineError> for HttpError {
    fn from(e: EngineError) -> Self {
        HttpError(e.into())
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, axum::Json(self.0.body())).into_response();
        if let Some(secs) = self.0.retry_after() {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}
