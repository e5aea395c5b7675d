//! Small HTTP helpers the emulator's handlers share: one body type, bounded
//! JSON bodies, JSON answers, `{code, message}` errors, bearer-token namespaces.

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde::Serialize;
use serde_json::Value;

/// Every emulator response body.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A JSON answer.
pub fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let bytes = serde_json::to_vec(value).expect("answers serialize");
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(full(bytes))
        .expect("static response parts are valid")
}

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An error answer `{code, message}`.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Stable code.
    pub code: &'static str,
    /// What failed, with which value, and what to do.
    pub message: String,
}

impl ApiError {
    /// Builds an error.
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into() }
    }

    /// 400 with `code`.
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// 404 with `code`.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    /// 500 from an internal failure.
    pub fn internal(error: anyhow::Error) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", format!("{error:#}"))
    }

    /// The response.
    pub fn into_response(self) -> Response<Body> {
        json(self.status, &serde_json::json!({"code": self.code, "message": self.message}))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(error: anyhow::Error) -> Self {
        ApiError::internal(error)
    }
}

/// The bearer token of a request, if any.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    value.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty())
}

/// The namespace a request's token grants, verified with `key`.
pub fn namespace(headers: &HeaderMap, key: &[u8]) -> Result<String, ApiError> {
    let token = bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <token>'; use the token `snapsign dev` printed",
        )
    })?;
    snapsign::token::verify(key, token, jiff::Timestamp::now().as_second(), snapsign::token::DEFAULT_MAX_TTL_SECS)
        .map(|claims| claims.namespace)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
}

/// The value of query parameter `name`.
pub fn query_param(uri: &http::Uri, name: &str) -> Option<String> {
    url::form_urlencoded::parse(uri.query()?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// A streaming body fed by a channel of chunks (SSE, files).
pub fn channel_body(rx: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>) -> Body {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item.map(hyper::body::Frame::data), rx))
    });
    http_body_util::StreamBody::new(stream).boxed_unsync()
}

/// One SSE frame carrying `value` as its data.
pub fn sse_frame(value: &impl Serialize) -> Bytes {
    Bytes::from(format!("data: {}\n\n", serde_json::to_string(value).expect("events serialize")))
}

/// A `text/event-stream` response over `body`.
pub fn sse(body: Body) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-cache")
        .body(body)
        .expect("static response parts are valid")
}

/// Largest JSON body the platform and lifecycle routes read.
const MAX_JSON_BODY: usize = 1 << 20;

/// Reads a body of at most [`MAX_JSON_BODY`] bytes.
pub(crate) async fn read_body(body: Incoming) -> Result<bytes::Bytes, ApiError> {
    Ok(http_body_util::Limited::new(body, MAX_JSON_BODY)
        .collect()
        .await
        .map_err(|e| ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("request body: {e}")))?
        .to_bytes())
}

/// Parses a JSON body.
pub(crate) fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("malformed_json", format!("request body is not JSON: {e}")))
}

/// Reads a JSON body of at most [`MAX_JSON_BODY`] bytes.
pub(crate) async fn read_json(request: Request<Incoming>) -> Result<Value, ApiError> {
    parse_json(&read_body(request.into_body()).await?)
}
