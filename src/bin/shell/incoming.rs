//! The serving half of the components' wasi:http shell: read an incoming
//! request and write one answer, with plain blocking calls (a handful of host
//! calls per request, no async reactor). Included with `#[path]` by the
//! components that serve; it is I/O, so it stays out of the core library.

use wasip2::http::types::{
    ErrorCode, Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasip2::io::streams::StreamError;

/// What a request's body read ended with.
pub enum Body {
    /// The whole body.
    Read(Vec<u8>),
    /// More than the limit was sent; reading stopped there.
    TooLarge,
}

/// The parts of an incoming request a handler reads.
pub struct Request {
    pub method: String,
    /// Path without query.
    pub path: String,
    headers: Fields,
    request: IncomingRequest,
}

impl Request {
    pub fn new(request: IncomingRequest) -> Request {
        let method = match request.method() {
            Method::Get => "GET".to_owned(),
            Method::Head => "HEAD".to_owned(),
            Method::Post => "POST".to_owned(),
            Method::Put => "PUT".to_owned(),
            Method::Delete => "DELETE".to_owned(),
            Method::Connect => "CONNECT".to_owned(),
            Method::Options => "OPTIONS".to_owned(),
            Method::Trace => "TRACE".to_owned(),
            Method::Patch => "PATCH".to_owned(),
            Method::Other(other) => other,
        };
        let mut path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        if let Some(query) = path.find('?') {
            path.truncate(query);
        }
        let headers = request.headers();
        Request { method, path, headers, request }
    }

    /// The first value of header `name` (lower case), when it is UTF-8.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).into_iter().next().and_then(|value| String::from_utf8(value).ok())
    }

    /// Reads the body, at most `limit` bytes. An error names what failed.
    /// `declared` is the request's `content-length`: once that many bytes
    /// are in, the read that would only report the end is skipped.
    pub fn body(self, limit: usize, declared: Option<u64>) -> Result<Body, String> {
        let body = self.request.consume().map_err(|()| "the request body was taken twice".to_owned())?;
        let mut bytes = Vec::with_capacity(declared.map_or(0, |len| len.min(limit as u64) as usize));
        let stream = body.stream().map_err(|()| "the request body stream was taken twice".to_owned())?;
        while declared.is_none_or(|len| (bytes.len() as u64) < len) {
            match stream.blocking_read(64 * 1024) {
                Ok(chunk) => {
                    if bytes.len() + chunk.len() > limit {
                        return Ok(Body::TooLarge);
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    return Err(format!("reading the request body: {}", e.to_debug_string()));
                }
            }
        }
        // Dropped, not finished: nobody reads trailers, and `finish` would
        // hand back one more resource to drop.
        drop(stream);
        drop(body);
        Ok(Body::Read(bytes))
    }
}

/// Answers with `status`, `headers` and `body`.
pub fn respond(out: ResponseOutparam, status: u16, headers: &[(&str, &str)], body: &[u8]) {
    let fields: Vec<(String, Vec<u8>)> =
        headers.iter().map(|(name, value)| ((*name).to_owned(), value.as_bytes().to_vec())).collect();
    let fields = match Fields::from_list(&fields) {
        Ok(fields) => fields,
        Err(e) => return fail(out, format!("response header refused: {e:?}")),
    };
    let response = OutgoingResponse::new(fields);
    // 200 is every new response's status: one host call fewer on the common answer.
    if status != 200 && response.set_status_code(status).is_err() {
        return fail(out, format!("status {status} refused"));
    }
    let Ok(outgoing) = response.body() else {
        return fail(out, "response body taken twice".to_owned());
    };
    ResponseOutparam::set(out, Ok(response));
    if let Ok(stream) = outgoing.write() {
        // At most 4096 bytes per blocking write, as wasi:io asks.
        for chunk in body.chunks(4096) {
            if stream.blocking_write_and_flush(chunk).is_err() {
                // The caller went away: nothing is left to tell it.
                return;
            }
        }
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

/// Ends the exchange with an error instead of an answer.
pub fn fail(out: ResponseOutparam, message: String) {
    ResponseOutparam::set(out, Err(ErrorCode::InternalError(Some(message))));
}
