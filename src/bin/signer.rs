//! The signer component: `wasi:http/incoming-handler` serving
//! `POST /api/v1/blob/sign`. A thin shell around `snapsign::signer`: it
//! reads the body (bounded), the environment and the clock, makes the one
//! store call the core asks for, and writes the core's answer.
//!
//! Every answer carries `x-request-id` (the host's, else one made here);
//! an error's detail is written to stderr, the host's log, under that id.

use std::sync::OnceLock;
use std::time::Instant;

use snapsign::signer::{self, Answer, Incoming, MAX_BODY_BYTES, SignError, SignerConfig, Step};
use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

const REQUEST_ID_HEADER: &str = "x-request-id";
#[path = "shell/incoming.rs"]
mod incoming;
#[path = "shell/wasi_http.rs"]
mod wasi_http;

struct Signer;

wasip2::http::proxy::export!(Signer);

impl Guest for Signer {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let request = incoming::Request::new(request);
        let request_id = request_id(request.header(REQUEST_ID_HEADER).as_deref());
        match serve(request, &request_id) {
            Ok((answer, sign_micros)) => respond(out, answer, &request_id, sign_micros),
            Err(detail) => {
                eprintln!("request {request_id}: {detail}");
                incoming::fail(out, detail);
            }
        }
    }
}

/// The core's answer to `request`, and how long signing took when it called the store.
fn serve(request: incoming::Request, request_id: &str) -> Result<(Answer, Option<u128>), String> {
    let (method, path) = (request.method.clone(), request.path.clone());
    if let Err(e) = signer::handle::route(&method, &path) {
        return Ok((e.answer(request_id), None));
    }
    let too_large = || Ok((SignError::BodyTooLarge { limit: MAX_BODY_BYTES }.answer(request_id), None));
    let declared = request.header("content-length").and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return too_large();
    }
    let authorization = request.header("authorization");
    let bytes = match request.body(MAX_BODY_BYTES, declared)? {
        incoming::Body::Read(bytes) => bytes,
        incoming::Body::TooLarge => return too_large(),
    };
    let config = match config() {
        Ok(config) => config,
        Err(e) => return Ok((SignError::Misconfigured(e.clone()).answer(request_id), None)),
    };
    let incoming =
        Incoming { method: &method, path: &path, authorization: authorization.as_deref(), body: &bytes, request_id };
    let step = MEMO.with_borrow_mut(|memo| signer::handle(config, memo, &incoming, jiff::Timestamp::now()));
    Ok(match step {
        Step::Respond(answer) => (answer, None),
        Step::StoreCall(pending) => match wasi_http::send(pending.store_method, &pending.store_url, &[], &[]) {
            Ok((status, body)) => {
                let text = String::from_utf8_lossy(&body);
                // Server-Timing reports the signing itself, for `snapsign bench`.
                let started = Instant::now();
                let answer = pending.finish(status, &text);
                (answer, Some(started.elapsed().as_micros()))
            }
            Err(e) => (pending.unreachable(&e), None),
        },
    })
}

thread_local! {
    /// What the instance keeps between requests besides its configuration
    /// (`snapsign::signer::Memo`): the day's signing key and the second's
    /// presigner (nothing a caller sent), and the last accepted token (hit
    /// only by the same whole token, its lifetime checked every time;
    /// serve-signer keeps an instance for one caller only).
    static MEMO: std::cell::RefCell<signer::Memo> = std::cell::RefCell::default();
}

/// Pre-initialization, for hosts that snapshot an instance (the wizer
/// approach; serve-signer does): reads the configuration and derives the
/// day's signing key, so instances made from the snapshot start with both.
/// A core export only, outside the component's world: other hosts never see
/// it and the handler does the same work on its first request. It calls
/// nothing but the environment and the wall clock, and touches no resource, so
/// the snapshot holds no handle and nothing a caller sent.
#[unsafe(export_name = "snapsign-preinit")]
pub extern "C" fn preinit() {
    // As the handler does first: the snapshot is taken after the constructors.
    wit_bindgen::rt::run_ctors_once();
    if let Ok(config) = config() {
        MEMO.with_borrow_mut(|memo| {
            memo.presigner(config, jiff::Timestamp::now());
        });
    }
}

/// The configuration, read from the environment once per instance: hosts
/// that reuse an instance (serve-signer, `wasmtime serve`) parse it and
/// decode its keys once.
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

fn respond(out: ResponseOutparam, answer: Answer, request_id: &str, sign_micros: Option<u128>) {
    if let Some(line) = &answer.log {
        // One line each, bounded: the host keeps a guest's stderr per request.
        let line: String = line.chars().filter(|c| !c.is_control()).take(2000).collect();
        eprintln!("request {request_id}: {line}");
    }
    let timing = sign_micros.map(|us| format!("sign;dur={:.3}", us as f64 / 1000.0));
    let mut headers = vec![("content-type", "application/json"), (REQUEST_ID_HEADER, request_id)];
    if let Some(timing) = &timing {
        headers.push(("server-timing", timing));
    }
    incoming::respond(out, answer.status, &headers, answer.body.as_bytes());
}

/// Never called: hosts call `handle`. A binary crate needs a `main`.
fn main() {
    unreachable!("this component serves wasi:http; hosts call its incoming handler, not main")
}
