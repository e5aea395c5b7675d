//! A test fixture, never shipped: a wasi:http handler that is leaky on
//! purpose. It keeps the last request's `authorization` header and body in a
//! static and returns them in its next answer, as the worst guest bug would.
//! serve-signer's tests run it to show that what one caller leaves in a
//! reused instance never reaches another caller's request.

use std::sync::Mutex;

use wstd::http::body::Body;
use wstd::http::{Error, Request, Response};

/// What the previous request on this instance carried.
static LAST: Mutex<String> = Mutex::new(String::new());

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, Error> {
    let (parts, mut body) = request.into_parts();
    let caller = parts.headers.get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let text = body.str_contents().await?.to_owned();
    if text == "trap" {
        // A request that kills the instance: the host must not reuse it.
        std::process::abort();
    }
    let previous = std::mem::replace(&mut *LAST.lock().unwrap(), format!("{caller}|{text}"));
    Ok(Response::builder().header("content-type", "text/plain").body(Body::from(previous))?)
}
