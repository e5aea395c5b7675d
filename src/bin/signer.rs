//! The signer component: `wasi:http/incoming-handler` serving
//! `POST /api/v1/blob/sign`. A thin shell around `snapsign::signer`: it
//! reads the body (bounded), the environment and the clock, makes the one
//! store call the core asks for, and writes the core's answer.
//!
//! Every answer carries `x-request-id` (the host's, else one made here);
//! an error's detail is written to stderr, the host's log, under that id.

use std::sync::OnceLock;

use snapsign::signer::{self, Answer, Incoming, MAX_BODY_BYTES, SignError, SignerConfig, Step};
use wstd::http::body::Body;
use wstd::http::body::util::BodyExt as _;
use wstd::http::{Error, Request, Response, StatusCode};
use wstd::time::Instant;

const REQUEST_ID_HEADER: &str = "x-request-id";
#[path = "shell/wasi_http.rs"]
mod wasi_http;

#[wstd::http_server]
async fn main(request: Request<Body>) -> Result<Response<Body>, Error> {
    let (parts, body) = request.into_parts();
    let request_id = request_id(parts.headers.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()));
    let path = parts.uri.path().to_owned();
    if let Err(e) = signer::handle::route(parts.method.as_str(), &path) {
        return respond(e.answer(&request_id), &request_id, None);
    }
    let declared = parts.headers.get("content-length").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return respond(SignError::BodyTooLarge { limit: MAX_BODY_BYTES }.answer(&request_id), &request_id, None);
    }
    let Some(bytes) = read_bounded(body).await? else {
        return respond(SignError::BodyTooLarge { limit: MAX_BODY_BYTES }.answer(&request_id), &request_id, None);
    };
    let config = match config() {
        Ok(config) => config,
        Err(e) => return respond(SignError::Misconfigured(e.clone()).answer(&request_id), &request_id, None),
    };
    let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
    let incoming =
        Incoming { method: parts.method.as_str(), path: &path, authorization, body: &bytes, request_id: &request_id };
    match signer::handle(config, &incoming, jiff::Timestamp::now()) {
        Step::Respond(answer) => respond(answer, &request_id, None),
        Step::CreateMultipartUpload(pending) => {
            match wasi_http::send("POST", &pending.store_url, &[], &[]) {
                Ok((status, body)) => {
                    let text = String::from_utf8_lossy(&body);
                    // Server-Timing reports the signing itself, for `snapsign bench`.
                    let started = Instant::now();
                    let answer = pending.finish(status, &text);
                    respond(answer, &request_id, Some(started.elapsed().as_micros()))
                }
                Err(e) => respond(pending.unreachable(&e), &request_id, None),
            }
        }
    }
}

/// The configuration, read from the environment once per instance: hosts
/// that reuse an instance (serve-signer, `wasmtime serve`) parse it and
/// decode its keys once. This is the only state kept between requests, and it
/// holds nothing a caller sent.
fn config() -> Result<&'static SignerConfig, &'static String> {
    static CONFIG: OnceLock<Result<SignerConfig, String>> = OnceLock::new();
    CONFIG.get_or_init(|| SignerConfig::from_vars(std::env::vars()).map_err(|e| e.to_string())).as_ref()
}

/// The caller's (or host's) id when it is a plain token, else a fresh random one.
fn request_id(given: Option<&str>) -> String {
    match given {
        Some(id)
            if (1..=64).contains(&id.len())
                && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) =>
        {
            id.to_owned()
        }
        _ => format!("{:016x}", wasip2::random::random::get_random_u64()),
    }
}

/// Reads at most `MAX_BODY_BYTES + 1` bytes; `None` when the body is longer.
async fn read_bounded(body: Body) -> Result<Option<Vec<u8>>, Error> {
    let mut body = body.into_boxed_body();
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if bytes.len() + data.len() > MAX_BODY_BYTES {
                return Ok(None);
            }
            bytes.extend_from_slice(&data);
        }
    }
    Ok(Some(bytes))
}

fn respond(answer: Answer, request_id: &str, sign_micros: Option<u128>) -> Result<Response<Body>, Error> {
    if let Some(line) = &answer.log {
        // One line each, bounded: the host keeps a guest's stderr per request.
        let line: String = line.chars().filter(|c| !c.is_control()).take(2000).collect();
        eprintln!("request {request_id}: {line}");
    }
    let mut response = Response::builder()
        .status(StatusCode::from_u16(answer.status)?)
        .header("content-type", "application/json")
        .header(REQUEST_ID_HEADER, request_id);
    if let Some(us) = sign_micros {
        response = response.header("server-timing", format!("sign;dur={:.3}", us as f64 / 1000.0));
    }
    Ok(response.body(Body::from(answer.body))?)
}
