//! The signer core (`snapsign::signer`) as a plain native hyper handler, no
//! wasm: the ceiling `snapsign bench hosts` compares the hosts against. Its
//! configuration is parsed once at start; a component parses it per request.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use snapsign::signer::{self, Answer, Incoming, MAX_BODY_BYTES, SignError, SignerConfig, Step};

use snapsign_runtime::serve::{self, Server};

/// Serves the core on `listen` until the returned server stops.
pub async fn start(env: Vec<(String, String)>, listen: SocketAddr) -> Result<Server> {
    let config = Arc::new(SignerConfig::from_vars(env).context("check the signer configuration")?);
    let store = reqwest::Client::new();
    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (config, store) = (config.clone(), store.clone());
        async move { Ok::<_, std::convert::Infallible>(respond(handle(&config, &store, request).await)) }
    });
    serve::spawn("native signer", listen, service).await
}

async fn handle(
    config: &SignerConfig,
    store: &reqwest::Client,
    request: http::Request<hyper::body::Incoming>,
) -> Answer {
    // Request ids as serve-signer makes them, so the ceiling does the same work.
    static IDS: std::sync::OnceLock<snapsign_runtime::signer::RequestIds> = std::sync::OnceLock::new();
    let request_id = IDS.get_or_init(snapsign_runtime::signer::RequestIds::new).next();
    let (parts, body) = request.into_parts();
    let Ok(body) = Limited::new(body, MAX_BODY_BYTES).collect().await.map(|b| b.to_bytes()) else {
        return SignError::BodyTooLarge { limit: MAX_BODY_BYTES }.answer(&request_id);
    };
    let authorization = parts.headers.get("authorization").and_then(|v| v.to_str().ok());
    let incoming = Incoming {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        authorization,
        body: &body,
        request_id: &request_id,
    };
    thread_local! {
        // The shell's memo, one per worker thread (no lock between them).
        static MEMO: std::cell::RefCell<signer::Memo> = std::cell::RefCell::default();
    }
    let step = MEMO.with_borrow_mut(|memo| signer::handle(config, memo, &incoming, jiff::Timestamp::now()));
    match step {
        Step::Respond(answer) => answer,
        Step::StoreCall(pending) => {
            match store.request(pending.store_method.parse().expect("POST or GET"), &pending.store_url).send().await {
                Ok(response) => {
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap_or_default();
                    pending.finish(status, &text)
                }
                Err(e) => pending.unreachable(&e.to_string()),
            }
        }
    }
}

fn respond(answer: Answer) -> http::Response<Full<Bytes>> {
    http::Response::builder()
        .status(answer.status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.body)))
        .expect("status and header are valid")
}
