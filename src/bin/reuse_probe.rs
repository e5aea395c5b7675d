//! A test fixture, never shipped: a wasi:http handler that is leaky on
//! purpose. It keeps the last request's `authorization` header and body in a
//! static and returns them in its next answer, as the worst guest bug would.
//! serve-signer's tests run it to show that what one caller leaves in a
//! reused instance never reaches another caller's request.

use std::sync::Mutex;

use wasip2::exports::http::incoming_handler::Guest;
use wasip2::http::types::{IncomingRequest, ResponseOutparam};

#[path = "shell/incoming.rs"]
mod incoming;

/// What the previous request on this instance carried.
static LAST: Mutex<String> = Mutex::new(String::new());

/// What pre-initialization left (serve-signer's snapshot); a `preinit?` body answers it.
static PREINIT: Mutex<String> = Mutex::new(String::new());

/// Pre-initialization, as the signer offers it: reads the environment. With
/// `PROBE_PREINIT=stderr` it also writes to stderr, which the host must refuse.
#[unsafe(export_name = "snapsign-preinit")]
pub extern "C" fn preinit() {
    wit_bindgen::rt::run_ctors_once();
    if std::env::var("PROBE_PREINIT").is_ok_and(|mode| mode == "stderr") {
        eprintln!("pre-initializing");
    }
    *PREINIT.lock().unwrap() = format!("pre-initialized with {} variables", std::env::vars().count());
}

struct Probe;

wasip2::http::proxy::export!(Probe);

impl Guest for Probe {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let request = incoming::Request::new(request);
        if (request.method.as_str(), request.path.as_str()) != ("POST", "/probe") {
            return incoming::respond(out, 404, &[], b"POST /probe only");
        }
        let caller = request.header("authorization").unwrap_or_default();
        let text = match request.body(64 * 1024, None) {
            Ok(incoming::Body::Read(bytes)) => String::from_utf8_lossy(&bytes).into_owned(),
            Ok(incoming::Body::TooLarge) => return incoming::fail(out, "body too large".into()),
            Err(e) => return incoming::fail(out, e),
        };
        if text == "trap" {
            // A request that kills the instance: the host must not reuse it.
            std::process::abort();
        }
        let previous = std::mem::replace(&mut *LAST.lock().unwrap(), format!("{caller}|{text}"));
        match text.as_str() {
            // Keeps the outparam and never answers: the host must end the request itself.
            "forget" => std::mem::forget(out),
            // A 40 MB answer, for the slow-reader test.
            "big" => incoming::respond(out, 200, &[("content-type", "text/plain")], &vec![b'x'; 40 << 20]),
            // Answers in full, then dies: the answer stands, the instance must go.
            "answer-then-trap" => {
                incoming::respond(out, 200, &[("content-type", "text/plain")], previous.as_bytes());
                std::process::abort();
            }
            // Holds its instance for 3 s before answering, for the concurrency tests.
            "sleep" => {
                wasip2::clocks::monotonic_clock::subscribe_duration(3_000_000_000).block();
                incoming::respond(out, 200, &[("content-type", "text/plain")], previous.as_bytes());
            }
            // What pre-initialization left, and the previous request.
            "preinit?" => {
                let answer = format!("{}|{previous}", PREINIT.lock().unwrap());
                incoming::respond(out, 200, &[("content-type", "text/plain")], answer.as_bytes())
            }
            // Answers as a signer refusing the token.
            "refuse" => incoming::respond(out, 401, &[("content-type", "text/plain")], b"refused"),
            // Answers as the signer refusing a method or path, before it reads the token.
            "unrouted" => incoming::respond(out, 405, &[("content-type", "text/plain")], b"method not allowed"),
            _ => incoming::respond(out, 200, &[("content-type", "text/plain")], previous.as_bytes()),
        }
    }
}

/// Never called: hosts call `handle`. A binary crate needs a `main`.
fn main() {
    unreachable!("this component serves wasi:http; hosts call its incoming handler, not main")
}
