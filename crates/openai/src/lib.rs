//! OpenAI's API over the engine, with no transport: request bodies read and checked
//! ([`api`]), errors in OpenAI's shape ([`error`]), images from `data:` and `http(s)` URLs
//! ([`images`]), tool calls ([`toolcalls`]), a [`Service`] that turns a request into queued
//! choices on the engine's scheduler, and the [`Pending`] reply read as one response or as
//! stream chunks ([`reply`]).
//!
//! The HTTP server and the Python module are its two front ends: both return exactly what
//! this crate builds. It knows nothing of HTTP routing, sockets, signals or Python, and
//! never prints (a request's summary goes to `tracing`).

pub mod api;
pub mod error;
pub mod images;
pub mod reply;
pub mod service;
pub mod toolcalls;

pub use error::ApiError;
pub use reply::{Chunks, Pending, Reply};
pub use service::{Service, ServiceConfig};
