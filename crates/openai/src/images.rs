//! Images of chat requests: `data:` URLs always; `http(s)` URLs only when the server allows
//! them, with a size limit and a timeout; `file:` and anything else never.

use crate::error::ApiError;
use base64::Engine as _;
use futures_util::StreamExt;
use gemma3_engine::Image;
use std::time::Duration;

/// Largest encoded image a request may carry or the server may fetch.
pub const MAX_IMAGE_BYTES: usize = 20 << 20;
/// How long fetching one image URL may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// Where images may come from.
#[derive(Clone)]
pub struct ImageSource {
    /// A client for `http(s)` URLs, when allowed.
    pub http: Option<reqwest::Client>,
    /// The most pixels a decoded image may have.
    pub max_pixels: u64,
}

impl ImageSource {
    pub fn new(allow_urls: bool, max_pixels: u64) -> Self {
        ImageSource {
            max_pixels,
            http: allow_urls.then(|| {
                reqwest::Client::builder()
                    .timeout(FETCH_TIMEOUT)
                    .redirect(reqwest::redirect::Policy::limited(3))
                    .build()
                    .expect("building the HTTP client")
            }),
        }
    }

    /// Decodes fetched image bytes (on a blocking thread: decoding is CPU work).
    pub async fn decode(&self, bytes: Vec<u8>, index: usize) -> Result<Image, ApiError> {
        let max_pixels = self.max_pixels;
        tokio::task::spawn_blocking(move || Image::decode_limited(&bytes, max_pixels))
            .await
            .map_err(|e| ApiError::Internal(format!("image decoding stopped: {e}")))?
            .map_err(|e| ApiError::bad_param("messages", format!("image {}: {e}", index + 1)))
    }

    /// The encoded bytes behind an image URL.
    pub async fn fetch(&self, url: &str) -> Result<Vec<u8>, ApiError> {
        let bad = |m: String| ApiError::bad_param("messages", m);
        let Some((scheme, rest)) = url.split_once(':') else {
            return Err(bad(
                "image_url must be a URL (data:image/png;base64,...), it has no scheme".into(),
            ));
        };
        let scheme = scheme.to_ascii_lowercase();
        match scheme.as_str() {
            "data" => decode_data_url(rest).map_err(bad),
            "http" | "https" => {
                let Some(client) = &self.http else {
                    return Err(bad(
                        "image URLs over http(s) are not allowed on this server (start it with --allow-image-urls), send the image as a data: URL".into(),
                    ));
                };
                fetch_limited(client, url).await.map_err(bad)
            }
            _ => Err(bad(format!(
                "image_url must be a data: URL{} (got a {scheme}: URL)",
                if self.http.is_some() {
                    " or http(s)"
                } else {
                    ""
                }
            ))),
        }
    }
}

/// `data:[<type>][;base64],<payload>`, given what follows `data:`.
fn decode_data_url(rest: &str) -> Result<Vec<u8>, String> {
    let (meta, payload) = rest
        .split_once(',')
        .ok_or("a data: URL needs a ',' before its payload")?;
    if !meta.ends_with(";base64") {
        return Err("image data: URLs must be base64 (data:image/png;base64,...)".into());
    }
    if payload.len() / 4 * 3 > MAX_IMAGE_BYTES {
        return Err(format!("the image is larger than {MAX_IMAGE_BYTES} bytes"));
    }
    let payload: String = payload
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(payload.as_bytes())
        .map_err(|e| format!("the image's base64 data is invalid: {e}"))
}

async fn fetch_limited(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, String> {
    let resp = client
        .get(url)
        .send()
        .await
        .map_err(|e| format!("fetching {url}: {e}"))?;
    if !resp.status().is_success() {
        return Err(format!("fetching {url}: HTTP {}", resp.status()));
    }
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_IMAGE_BYTES as u64)
    {
        return Err(format!("{url} is larger than {MAX_IMAGE_BYTES} bytes"));
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("fetching {url}: {e}"))?;
        if body.len() + chunk.len() > MAX_IMAGE_BYTES {
            return Err(format!("{url} is larger than {MAX_IMAGE_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fetch(url: &str) -> Result<Vec<u8>, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(
            ImageSource::new(false, gemma3_engine::image::DEFAULT_MAX_IMAGE_PIXELS).fetch(url),
        )
        .map_err(|e| e.to_string())
    }

    #[test]
    fn image_urls_without_a_scheme_or_payload_are_errors() {
        // Found by the server_request fuzz target: "data" without a colon panicked.
        for (url, needle) in [
            ("data", "has no scheme"),
            ("", "has no scheme"),
            ("data:", "needs a ','"),
            ("DATA:image/png,abc", "must be base64"),
            ("data:image/png;base64,!!", "base64 data is invalid"),
            ("file:/etc/passwd", "must be a data: URL"),
        ] {
            let err = fetch(url).unwrap_err();
            assert!(err.contains(needle), "{url:?}: {err}");
        }
        assert_eq!(fetch("data:image/png;base64,aGk=").unwrap(), b"hi");
    }
}
