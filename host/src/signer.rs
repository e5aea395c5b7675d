//! `serve-signer`: the signer component behind a wasi:http server. Compiled
//! once (cached on disk), pre-instantiated once, a fresh store per request
//! with memory and time limits, outbound HTTP only to the configured store.
//!
//! A request takes an instance slot only once its body is in memory: the
//! host reads it (at most [`MAX_BODY_BYTES`], within
//! [`ServeLimits::body_read_timeout`]) first, so slow senders hold a
//! connection, never a guest. Every answer carries `x-request-id`; error
//! bodies are `{code, message, request_id}` and the detail (traps, guest
//! log lines) goes to the log under that id.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use snapsign::signer::{MAX_BODY_BYTES, SignerConfig};
use tokio::sync::Semaphore;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::engine::{self, EngineLimits, Loaded, WasmtimeResultExt};
use crate::outbound::AllowList;
use crate::serve::{self, ServeLimits, Server};

/// The signer component, built by `host/build.rs` from `src/bin/signer.rs`.
pub const SIGNER_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_SIGNER_WASM"));

/// The header that carries a request's id, to the guest and back to the caller.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the guest may write to stderr in one request (its log lines).
const GUEST_LOG_BYTES: usize = 64 * 1024;

/// Settings of `serve-signer`.
#[derive(Debug, Clone)]
pub struct SignerServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The guest's environment (`SNAPSIGN_*`, see the README).
    pub env: Vec<(String, String)>,
    /// Pool size and per-instance memory.
    pub limits: EngineLimits,
    /// Wall-clock limit of one request once its body is read: waiting for an
    /// instance and running it (also its epoch deadline).
    pub request_timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
}

/// Per-request guest state.
struct Guest {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: AllowList,
    limits: StoreLimits,
}

impl WasiView for Guest {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Guest {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// Request ids: a per-process random base plus a counter, so ids are unique
/// within a process and unlikely to repeat across processes.
pub(crate) struct RequestIds {
    base: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        hasher.write_u32(std::process::id());
        RequestIds { base: hasher.finish(), next: AtomicU64::new(0) }
    }

    pub(crate) fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}", self.base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }
}

/// The signer, compiled and pre-instantiated, ready to serve requests.
pub struct SignerHost {
    engine: Engine,
    pre: ProxyPre<Guest>,
    env: Vec<(String, String)>,
    outbound: AllowList,
    max_memory_bytes: usize,
    request_timeout: Duration,
    body_read_timeout: Duration,
    /// One permit per instance the pool holds: a request waits for a permit
    /// instead of failing instantiation when every instance is busy.
    slots: Arc<Semaphore>,
    max_concurrency: u32,
    ids: RequestIds,
    /// How the component was loaded (compiled or from cache).
    pub loaded: Loaded,
}

impl SignerHost {
    /// Checks the configuration, compiles (or loads) and pre-instantiates the signer.
    pub fn new(config: &SignerServerConfig) -> Result<Self> {
        Self::with_limits(config, &ServeLimits::default())
    }

    /// [`SignerHost::new`] with the body deadline of `serve`.
    pub fn with_limits(config: &SignerServerConfig, serve: &ServeLimits) -> Result<Self> {
        let signer = SignerConfig::from_vars(config.env.iter().cloned()).context("check the signer configuration")?;
        let outbound = AllowList::new([signer.store_authority()]);
        let engine = engine::engine(config.limits)?;
        let (component, loaded) = engine::load_component(&engine, "signer", SIGNER_WASM, &config.cache_dir)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).anyhow().context("link WASI")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).anyhow().context("link WASI HTTP")?;
        let pre = ProxyPre::new(linker.instantiate_pre(&component).anyhow().context("pre-instantiate the signer")?)
            .anyhow()
            .context("the signer does not export wasi:http/incoming-handler")?;
        tracing::info!(?loaded, bucket = %signer.bucket, store = %signer.store_authority(), "signer ready");
        Ok(SignerHost {
            engine,
            pre,
            env: config.env.clone(),
            outbound,
            max_memory_bytes: config.limits.max_memory_bytes,
            request_timeout: config.request_timeout,
            body_read_timeout: serve.body_read_timeout,
            slots: Arc::new(Semaphore::new(config.limits.max_concurrency as usize)),
            max_concurrency: config.limits.max_concurrency,
            ids: RequestIds::new(),
            loaded,
        })
    }

    /// Serves one HTTP request: reads its body, then runs a fresh instance on it.
    pub async fn handle(
        self: Arc<Self>,
        request: http::Request<Incoming>,
    ) -> Result<http::Response<HyperOutgoingBody>> {
        let started = Instant::now();
        let id = self.ids.next();
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let mut response = match self.clone().serve(request, &id).await {
            Ok(response) => response,
            Err(failure) => {
                // One line (newlines escaped): the detail may be a trap with its wasm backtrace.
                let detail = format!("{:#}", failure.detail);
                tracing::warn!(request_id = %id, %method, %path, code = failure.code, detail = ?detail, "signer request failed");
                json_error(failure.status, failure.code, &failure.message, &id)
            }
        };
        if let Ok(value) = http::HeaderValue::from_str(&id) {
            response.headers_mut().insert(REQUEST_ID_HEADER, value);
        }
        tracing::info!(request_id = %id, %method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "sign request");
        Ok(response)
    }

    async fn serve(
        self: Arc<Self>,
        request: http::Request<Incoming>,
        id: &str,
    ) -> Result<http::Response<HyperOutgoingBody>, Failure> {
        let (mut parts, body) = request.into_parts();
        let body = read_body(&parts.headers, body, self.body_read_timeout).await?;
        // The caller's own id, if any, is replaced: the log is keyed by ours.
        parts.headers.insert(REQUEST_ID_HEADER, http::HeaderValue::from_str(id).map_err(Failure::internal)?);
        let body: BufferedBody = Full::new(body).map_err(unreachable_error as fn(_) -> _);
        let request = http::Request::from_parts(parts, body);

        // One deadline for waiting for an instance and running it.
        let deadline = Instant::now() + self.request_timeout;
        let slot = match tokio::time::timeout_at(deadline.into(), self.slots.clone().acquire_owned()).await {
            Ok(Ok(slot)) => slot,
            Ok(Err(closed)) => return Err(Failure::internal(closed)),
            Err(_) => {
                return Err(Failure::new(
                    503,
                    "signer_busy",
                    format!(
                        "all {} signer instances stayed busy for {:?}; retry shortly",
                        self.max_concurrency, self.request_timeout
                    ),
                    anyhow::anyhow!("no instance slot within {:?}", self.request_timeout),
                ));
            }
        };
        self.run_guest(request, id.to_owned(), slot, deadline).await
    }

    async fn run_guest(
        self: Arc<Self>,
        request: http::Request<BufferedBody>,
        id: String,
        slot: tokio::sync::OwnedSemaphorePermit,
        deadline: Instant,
    ) -> Result<http::Response<HyperOutgoingBody>, Failure> {
        let left = deadline.saturating_duration_since(Instant::now());
        let log = MemoryOutputPipe::new(GUEST_LOG_BYTES);
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.env).stderr(log.clone());
        let guest = Guest {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: self.outbound.clone(),
            limits: StoreLimitsBuilder::new().memory_size(self.max_memory_bytes).instances(8).build(),
        };
        let mut store = Store::new(&self.engine, guest);
        store.limiter(|g| &mut g.limits);
        store.set_epoch_deadline(engine::deadline_ticks(left));
        store.epoch_deadline_trap();

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req =
            store.data_mut().http().new_incoming_request(Scheme::Http, request).anyhow().map_err(Failure::internal)?;
        let out = store.data_mut().http().new_response_outparam(sender).anyhow().map_err(Failure::internal)?;
        let pre = self.pre.clone();
        let timeout = self.request_timeout;
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await.map_err(|e| {
                    Failure::new(
                        503,
                        "signer_busy",
                        "no signer instance could be started; retry shortly".into(),
                        anyhow::Error::from(e).context("instantiate the signer"),
                    )
                })?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await.map_err(|e| {
                    // The epoch deadline traps the guest when it computes too long.
                    if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) {
                        Failure::timeout(timeout)
                    } else {
                        Failure::new(
                            500,
                            "signer_trap",
                            "the signer stopped on an internal error while handling this request".into(),
                            anyhow::Error::from(e).context("run the signer"),
                        )
                    }
                })
            };
            let result = match tokio::time::timeout_at(deadline.into(), run).await {
                Ok(result) => result,
                Err(_) => Err(Failure::timeout(timeout)),
            };
            // The instance is gone with the store; then its slot is free.
            drop(store);
            drop(slot);
            for line in String::from_utf8_lossy(&log.contents()).lines().filter(|l| !l.trim().is_empty()) {
                tracing::warn!(request_id = %task_id, "signer guest: {line}");
            }
            result
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => Err(Failure::new(
                502,
                "guest_error",
                "the signer ended this request with an error instead of an answer".into(),
                anyhow::anyhow!("signer failed: {code:?}"),
            )),
            Err(_) => Err(match task.await {
                Ok(Ok(())) => Failure::internal(anyhow::anyhow!("signer returned without setting a response")),
                Ok(Err(failure)) => failure,
                Err(e) => Failure::internal(anyhow::Error::from(e).context("signer task panicked")),
            }),
        }
    }
}

/// A request body already in memory, as the guest reads it.
type BufferedBody = http_body_util::combinators::MapErr<Full<Bytes>, fn(std::convert::Infallible) -> hyper::Error>;

fn unreachable_error(never: std::convert::Infallible) -> hyper::Error {
    match never {}
}

/// Reads the whole body, at most [`MAX_BODY_BYTES`], within `deadline`.
async fn read_body(headers: &http::HeaderMap, mut body: Incoming, deadline: Duration) -> Result<Bytes, Failure> {
    let too_large = || {
        Failure::new(
            413,
            "body_too_large",
            format!("request body is over {MAX_BODY_BYTES} bytes"),
            anyhow::anyhow!("body over {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers.get(http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
        return Err(too_large());
    }
    let read = async {
        let mut bytes = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                Failure::new(
                    400,
                    "body_unreadable",
                    "the request body could not be read; send it again".into(),
                    anyhow::Error::from(e).context("read the request body"),
                )
            })?;
            if let Ok(data) = frame.into_data() {
                if bytes.len() + data.len() > MAX_BODY_BYTES {
                    return Err(too_large());
                }
                bytes.extend_from_slice(&data);
            }
        }
        Ok(bytes.freeze())
    };
    match tokio::time::timeout(deadline, read).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new(
            408,
            "body_timeout",
            format!("the request body did not arrive within {deadline:?}; send it at once"),
            anyhow::anyhow!("body not read within {deadline:?}"),
        )),
    }
}

/// A request the host answers itself: what the caller reads, and the detail for the log.
struct Failure {
    status: u16,
    code: &'static str,
    message: String,
    detail: anyhow::Error,
}

impl Failure {
    fn new(status: u16, code: &'static str, message: String, detail: anyhow::Error) -> Self {
        Failure { status, code, message, detail }
    }

    fn internal(error: impl Into<anyhow::Error>) -> Self {
        Failure::new(500, "host_error", "the signer host failed on this request".into(), error.into())
    }

    fn timeout(timeout: Duration) -> Self {
        Failure::new(
            504,
            "signer_timeout",
            format!("the signer did not finish within {timeout:?}"),
            anyhow::anyhow!("signer did not finish within {timeout:?}"),
        )
    }
}

fn json_error(status: u16, code: &str, message: &str, request_id: &str) -> http::Response<HyperOutgoingBody> {
    let message = format!("{message}; the signer's log has the details under request id {request_id}");
    let body = serde_json::json!({"code": code, "message": message, "request_id": request_id}).to_string();
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
                .boxed_unsync(),
        )
        .expect("static response parts are valid")
}

/// Starts serving the signer on `config.listen` with [`ServeLimits::default`].
pub async fn start(config: &SignerServerConfig) -> Result<(Server, Arc<SignerHost>)> {
    start_with(config, ServeLimits::default()).await
}

/// Starts serving the signer on `config.listen` under `limits`.
pub async fn start_with(config: &SignerServerConfig, limits: ServeLimits) -> Result<(Server, Arc<SignerHost>)> {
    let host = Arc::new(SignerHost::with_limits(config, &limits)?);
    let service_host = host.clone();
    let service = hyper::service::service_fn(move |request| service_host.clone().handle(request));
    let server = serve::spawn_with("signer", config.listen, limits, service).await?;
    tracing::info!(url = %server.url(), "signer listening");
    Ok((server, host))
}

/// The signer's guest environment: every `SNAPSIGN_*` variable of this
/// process except the host's own (`SNAPSIGN_CACHE_DIR`, `SNAPSIGN_HOSTS_CACHE`),
/// overridden by `--env K=V` pairs. Shared by `serve-signer` and `deploy`.
pub fn guest_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("SNAPSIGN_") && k != "SNAPSIGN_CACHE_DIR" && k != "SNAPSIGN_HOSTS_CACHE")
        .collect();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            anyhow::bail!("--env '{pair}' is not KEY=VALUE; pass it as --env SNAPSIGN_BUCKET=snapshots");
        };
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signer must run on any wasi:http host: it may import only what
    /// `wasmtime serve -S cli` (the proxy world plus wasi:cli) provides.
    #[test]
    fn signer_imports_nothing_a_standard_wasi_http_host_lacks() {
        let engine = Engine::default();
        let component = wasmtime::component::Component::new(&engine, SIGNER_WASM).unwrap();
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&engine).map(|(name, _)| name.to_owned()).collect();
        assert!(imports.iter().any(|i| i.starts_with("wasi:http/outgoing-handler@0.2")), "{imports:?}");
        for import in &imports {
            let standard = ["wasi:http/", "wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:cli/"];
            assert!(standard.iter().any(|p| import.starts_with(p)), "non-standard import {import}");
        }
        let exports: Vec<String> = ty.exports(&engine).map(|(name, _)| name.to_owned()).collect();
        assert!(exports.iter().any(|e| e.starts_with("wasi:http/incoming-handler@0.2")), "{exports:?}");
    }
}
