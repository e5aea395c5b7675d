//! `serve-signer`: the signer component behind a wasi:http server. Compiled
//! once (cached on disk), pre-instantiated once; each request runs in an
//! instance with memory and time limits and outbound HTTP only to the
//! configured store. An instance serves one caller only: it is reused for
//! that caller's next requests (bounded, see [`instance_pool`]) or dropped.
//!
//! A request takes an instance slot only once its body is in memory: the
//! host reads it (at most [`MAX_BODY_BYTES`], within
//! [`ServeLimits::body_read_timeout`]) first, so slow senders hold a
//! connection, never a guest; the answer is read into memory as the guest
//! writes it, so slow readers do not hold one either. Every answer carries
//! `x-request-id`; error bodies are `{code, message, request_id}` and the
//! detail (traps, guest log lines) goes to the log under that id.

mod guest_log;
mod instance_pool;
mod preinit;
mod relay;

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
use wasmtime::component::Linker;
use wasmtime::{Engine, Store, StoreLimitsBuilder};
use wasmtime_wasi::WasiCtx;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::bindings::{Proxy, ProxyPre};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

use crate::engine::{self, EngineLimits, Loaded, WasmtimeResultExt};
use crate::guest::{self, GuestState};
use crate::outbound::AllowList;
use crate::serve::{self, ServeLimits, Server};
use guest_log::GuestLog;
use instance_pool::{Caller, InstancePool};
use relay::{Next as RelayNext, Relay};

/// The signer component, built by `host/runtime/build.rs` from `src/bin/signer.rs`.
pub const SIGNER_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_SIGNER_WASM"));
/// The one route the signer serves.
pub use snapsign::signer::SIGN_PATH;

/// Where the build put that component (for hosts that load it from a file).
pub const SIGNER_WASM_PATH: &str = env!("SNAPSIGN_SIGNER_WASM");

/// The header that carries a request's id, to the guest and back to the caller.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// What the guest may write to stderr in one request (its log lines).
const GUEST_LOG_BYTES: usize = 64 * 1024;

/// Requests one instance serves (for one caller) before it is dropped.
pub const DEFAULT_MAX_INSTANCE_REUSE: u32 = 1000;

/// How long an idle instance waits for its caller's next request.
const IDLE_INSTANCE_TTL: Duration = Duration::from_secs(30);

/// How long a request waits for an instance slot while `--max-concurrency`
/// requests run, before it is refused `503 signer_busy` (at most the request timeout).
const QUEUE_WAIT: Duration = Duration::from_secs(1);

/// Settings of `serve-signer`.
#[derive(Clone)]
pub struct SignerServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The guest's environment (`SNAPSIGN_*`, see docs/signer.md).
    pub env: Vec<(String, String)>,
    /// Pool size and per-instance memory.
    pub limits: EngineLimits,
    /// Wall-clock limit of one request once its body is read: waiting for an
    /// instance and running it (also its epoch deadline).
    pub request_timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
    /// Requests one instance serves, for one caller, before it is dropped;
    /// 1 runs every request in a fresh instance.
    pub max_instance_reuse: u32,
    /// Start fresh instances from a pre-initialized snapshot (`signer/preinit.rs`),
    /// made in the background at start-up (the plain component serves meanwhile).
    pub preinit: bool,
}

impl std::fmt::Debug for SignerServerConfig {
    /// The environment holds the store's secret key and the token key: only names are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let env: Vec<String> = self.env.iter().map(|(k, _)| format!("{k}=<redacted>")).collect();
        f.debug_struct("SignerServerConfig")
            .field("listen", &self.listen)
            .field("env", &env)
            .field("limits", &self.limits)
            .field("request_timeout", &self.request_timeout)
            .field("cache_dir", &self.cache_dir)
            .field("max_instance_reuse", &self.max_instance_reuse)
            .field("preinit", &self.preinit)
            .finish()
    }
}

/// Guest state of one instance: the shared guest set-up, with its stderr
/// (drained after every request) as the runtime's own data.
type Guest = GuestState<GuestLog>;

/// Request ids: a per-process random base plus a counter, so ids are unique
/// within a process and unlikely to repeat across processes.
pub struct RequestIds {
    base: u64,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        Self::new()
    }
}

impl RequestIds {
    pub fn new() -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos(),
        );
        hasher.write_u32(std::process::id());
        RequestIds { base: hasher.finish(), next: AtomicU64::new(0) }
    }

    /// The next id (16 hex digits).
    pub fn next(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}", self.base.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
    }
}

/// Where pre-initialization stands ([`SignerServerConfig::preinit`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PreinitState {
    /// Turned off: fresh instances run the component's own start-up.
    Off,
    /// Being made; fresh instances start from the plain component meanwhile.
    Pending,
    /// Fresh instances start from the snapshot.
    Ready {
        /// From the start of the run to the snapshot's component compiled.
        took: Duration,
        /// Linear memory at the snapshot, bytes.
        memory_bytes: usize,
    },
    /// Not possible for this component (the reason); the plain one serves.
    Unavailable(String),
}

/// The signer, compiled and pre-instantiated, ready to serve requests.
pub struct SignerHost {
    engine: Engine,
    /// What fresh instances are made from: the component, or its
    /// pre-initialized snapshot once that is ready.
    pre: Arc<std::sync::RwLock<ProxyPre<Guest>>>,
    preinit: tokio::sync::watch::Receiver<PreinitState>,
    /// Dropped with the host: the pre-initialization thread, waiting for
    /// the next UTC day, ends then.
    _preinit_stop: Option<std::sync::mpsc::Sender<()>>,
    env: Vec<(String, String)>,
    outbound: AllowList,
    max_memory_bytes: usize,
    request_timeout: Duration,
    body_read_timeout: Duration,
    /// How long a request waits for a slot when every slot is taken.
    queue_wait: Duration,
    /// One permit per instance the pool holds: a request waits for a permit
    /// instead of failing instantiation when every instance is busy.
    slots: Arc<Semaphore>,
    max_concurrency: u32,
    ids: RequestIds,
    /// Idle instances, each kept for the one caller it served.
    pool: InstancePool<(Store<Guest>, Proxy)>,
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
        Self::with_component(config, serve, "signer", SIGNER_WASM)
    }

    /// Serves `wasm` (any wasi:http proxy component) in the signer's place.
    fn with_component(
        config: &SignerServerConfig,
        serve: &ServeLimits,
        name: &str,
        wasm: &'static [u8],
    ) -> Result<Self> {
        let signer = SignerConfig::from_vars(config.env.iter().cloned()).context("check the signer configuration")?;
        let outbound = AllowList::new([signer.store_authority()]);
        // Room for every running request and, beside them, the idle cache:
        // a fresh instance never waits for an idle one to go (see `instance_pool`).
        let max_idle = if config.max_instance_reuse > 1 { config.limits.max_concurrency } else { 0 };
        let engine = engine::engine(EngineLimits {
            max_concurrency: config.limits.max_concurrency + max_idle,
            ..config.limits
        })?;
        let (component, loaded) = engine::load_component(&engine, name, wasm, &config.cache_dir)?;
        let mut linker = Linker::new(&engine);
        guest::add_wasi_to_linker(&mut linker)?;
        let pre = ProxyPre::new(linker.instantiate_pre(&component).anyhow().context("pre-instantiate the signer")?)
            .anyhow()
            .context("the signer does not export wasi:http/incoming-handler")?;
        tracing::info!(?loaded, bucket = %signer.bucket, store = %signer.store_authority(), "signer ready");
        let pre = Arc::new(std::sync::RwLock::new(pre));
        let (report, preinit) = tokio::sync::watch::channel(PreinitState::Off);
        let mut preinit_stop = None;
        if config.preinit {
            report.send_replace(PreinitState::Pending);
            let job = PreinitJob {
                engine: engine.clone(),
                linker,
                wasm,
                env: config.env.clone(),
                cache_dir: config.cache_dir.clone(),
                timeout: config.request_timeout,
                max_memory_bytes: config.limits.max_memory_bytes,
                into: Arc::downgrade(&pre),
            };
            let (stop, host_gone) = std::sync::mpsc::channel();
            preinit_stop = Some(stop);
            std::thread::Builder::new()
                .name("snapsign-preinit".into())
                .spawn(move || job.serve(&report, &host_gone))
                .context("start the pre-initialization thread")?;
        }
        Ok(SignerHost {
            engine,
            pre,
            preinit,
            _preinit_stop: preinit_stop,
            env: config.env.clone(),
            outbound,
            max_memory_bytes: config.limits.max_memory_bytes,
            request_timeout: config.request_timeout,
            body_read_timeout: serve.body_read_timeout,
            queue_wait: QUEUE_WAIT.min(config.request_timeout),
            slots: Arc::new(Semaphore::new(config.limits.max_concurrency as usize)),
            max_concurrency: config.limits.max_concurrency,
            ids: RequestIds::new(),
            pool: InstancePool::new(config.max_instance_reuse, max_idle as usize, IDLE_INSTANCE_TTL),
            loaded,
        })
    }

    /// Where pre-initialization stands.
    pub fn preinit_state(&self) -> PreinitState {
        let state = self.preinit.borrow().clone();
        // The thread ended without a word: only a panic does that.
        if state == PreinitState::Pending && self.preinit.has_changed().is_err() {
            return PreinitState::Unavailable("the pre-initialization thread stopped".into());
        }
        state
    }

    /// Waits until pre-initialization is no longer pending, and says how it ended.
    pub async fn preinit_settled(&self) -> PreinitState {
        let mut watch = self.preinit.clone();
        match watch.wait_for(|state| *state != PreinitState::Pending).await {
            Ok(state) => state.clone(),
            // The thread ended without a word: only a panic does that.
            Err(_) => PreinitState::Unavailable("the pre-initialization thread stopped".into()),
        }
    }

    /// Instances kept idle for their caller's next request.
    pub fn idle_instances(&self) -> usize {
        self.pool.idle_count()
    }

    /// Requests that hold an instance slot now (an answer may reach the
    /// caller just before its instance is kept or dropped).
    pub fn busy_slots(&self) -> usize {
        self.max_concurrency as usize - self.slots.available_permits()
    }

    /// A store for a fresh instance.
    fn new_store(&self) -> Store<Guest> {
        let log = GuestLog::new(GUEST_LOG_BYTES);
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.env).stderr(log.clone());
        let limits = StoreLimitsBuilder::new().memory_size(self.max_memory_bytes).instances(8).build();
        // The epoch deadline is set again for every request it serves.
        guest::store(
            &self.engine,
            GuestState::new(wasi.build(), self.outbound.clone(), limits, log),
            self.request_timeout,
        )
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
                let mut response = json_error(failure.status, failure.code, &failure.message, &id);
                if failure.status == 503 {
                    response.headers_mut().insert(http::header::RETRY_AFTER, http::HeaderValue::from_static("1"));
                }
                response
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
        check_host(&parts)?;
        let body = read_body(&parts.headers, body, self.body_read_timeout).await?;
        // The caller's own id, if any, is replaced: the log is keyed by ours.
        parts.headers.insert(REQUEST_ID_HEADER, http::HeaderValue::from_str(id).map_err(Failure::internal)?);
        let body: BufferedBody = Full::new(body).map_err(unreachable_error as fn(_) -> _);
        let request = http::Request::from_parts(parts, body);

        // One deadline for waiting for an instance and running it.
        let deadline = Instant::now() + self.request_timeout;
        // A free slot is taken at once; only a wait for one arms a timer. A
        // request is refused only when every slot stayed taken, that is when
        // `--max-concurrency` requests were running, for the whole queue wait.
        let slot = match self.slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => match tokio::time::timeout(self.queue_wait, self.slots.clone().acquire_owned()).await {
                Ok(Ok(slot)) => slot,
                Ok(Err(closed)) => return Err(Failure::internal(closed)),
                Err(_) => {
                    return Err(Failure::new(
                        503,
                        "signer_busy",
                        format!(
                            "all {} signer instances (--max-concurrency) stayed busy for {:?}; retry shortly",
                            self.max_concurrency, self.queue_wait
                        ),
                        anyhow::anyhow!("no instance slot within {:?}", self.queue_wait),
                    ));
                }
            },
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
        let caller = if self.pool.reuses() { Caller::of(request.headers()) } else { None };
        let (mut store, warm, uses) = match caller.and_then(|caller| self.pool.take(caller)) {
            Some(((store, proxy), uses)) => (store, Some(proxy), uses),
            // The pool has room for it whatever is idle (see `instance_pool`).
            None => (self.new_store(), None, 0),
        };
        let reused = warm.is_some();
        store.set_epoch_deadline(engine::deadline_ticks(deadline.saturating_duration_since(Instant::now())));
        let (guest_sender, guest_answer) = tokio::sync::oneshot::channel();
        let req =
            store.data_mut().http().new_incoming_request(Scheme::Http, request).anyhow().map_err(Failure::internal)?;
        let out = store.data_mut().http().new_response_outparam(guest_sender).anyhow().map_err(Failure::internal)?;
        // The guest runs in this request's own future, no task of its own: a
        // caller that goes away drops the request, and with it the instance.
        let exchange = self.exchange(&mut store, warm, req, out, guest_answer, &id);
        let outcome = match tokio::time::timeout_at(deadline.into(), exchange).await {
            Ok(outcome) => outcome,
            Err(_) => Err(Failure::timeout(self.request_timeout)),
        };
        for line in String::from_utf8_lossy(&store.data().data.take()).lines().filter(|l| !l.trim().is_empty()) {
            tracing::warn!(request_id = %id, "signer guest: {line}");
        }
        let status = outcome.as_ref().ok().map(|(_, response)| response.status().as_u16());
        tracing::debug!(request_id = %id, reused, uses = uses + 1, ?status, "signer instance");
        let answer = match outcome {
            Ok((proxy, response)) => {
                // Only an instance that finished cleanly with a success serves
                // its caller again: the signer answers 2xx only for a token it
                // accepted. After a trap, a timeout, an error, no answer, or
                // any other status (a refused token, or a refusal made before
                // the token was read: no proven caller) it is dropped.
                match (caller, proxy) {
                    (Some(caller), Some(proxy)) if response.status().is_success() => {
                        self.pool.give_back(caller, (store, proxy), uses + 1)
                    }
                    _ => drop(store),
                }
                Ok(response.map(full_body))
            }
            Err(failure) => {
                drop(store);
                Err(failure)
            }
        };
        // The instance is kept or gone; then its slot is free.
        drop(slot);
        answer
    }

    /// Runs the guest on one request, reading its answer into memory as the
    /// guest writes it, so the instance is free when the guest returns,
    /// whatever the caller's reading speed (a slow reader holds a connection
    /// only). Gives back the whole answer, and the instance when it may serve again.
    async fn exchange(
        &self,
        store: &mut Store<Guest>,
        warm: Option<Proxy>,
        req: wasmtime::component::Resource<HostIncomingRequest>,
        out: wasmtime::component::Resource<HostResponseOutparam>,
        mut guest_answer: tokio::sync::oneshot::Receiver<GuestAnswer>,
        id: &str,
    ) -> Result<(Option<Proxy>, http::Response<Bytes>), Failure> {
        let proxy = match warm {
            Some(proxy) => proxy,
            None => {
                let pre = self.pre.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
                pre.instantiate_async(&mut *store).await.map_err(|e| {
                    Failure::new(
                        503,
                        "signer_busy",
                        "no signer instance could be started; retry shortly".into(),
                        anyhow::Error::from(e).context("instantiate the signer"),
                    )
                })?
            }
        };
        let limit = self.max_memory_bytes;
        // What the guest set on its outparam: start reading the body, or its error.
        let answered = |set: GuestAnswer| -> Result<AnswerRead, Failure> {
            match set {
                Ok(response) => Ok(Box::pin(read_answer(response, limit))),
                Err(code) => Err(Failure::new(
                    502,
                    "guest_error",
                    "the signer ended this request with an error instead of an answer".into(),
                    anyhow::anyhow!("signer failed: {code:?}"),
                )),
            }
        };
        // The relay decides what to wait for (relay.rs); this loop performs it.
        let mut relay = Relay::new();
        let mut reading: Option<AnswerRead> = None;
        let mut read: Option<Result<http::Response<Bytes>>> = None;
        let mut called = None;
        {
            let call = proxy.wasi_http_incoming_handler().call_handle(&mut *store, req, out);
            tokio::pin!(call);
            loop {
                match relay.next() {
                    RelayNext::Done => break,
                    RelayNext::Wait { answer, body, call: running } => tokio::select! {
                        set = &mut guest_answer, if answer => match set {
                            Ok(set) => {
                                reading = Some(answered(set)?);
                                relay.answer_set();
                            }
                            Err(_) => relay.answer_missing(),
                        },
                        done = std::future::poll_fn(|cx| match reading.as_mut() {
                            Some(body) => body.as_mut().poll(cx),
                            None => std::task::Poll::Pending,
                        }), if body => {
                            read = Some(done);
                            relay.body_done();
                        }
                        result = &mut call, if running => {
                            relay.call_ended(result.is_ok());
                            called = Some(result);
                        }
                    },
                    RelayNext::CheckAnswerOnce => match guest_answer.try_recv() {
                        Ok(set) => {
                            reading = Some(answered(set)?);
                            relay.answer_set();
                        }
                        Err(_) => relay.answer_missing(),
                    },
                    RelayNext::PollBodyOnce => {
                        let mut now = std::task::Context::from_waker(std::task::Waker::noop());
                        match reading.as_mut().map(|body| body.as_mut().poll(&mut now)) {
                            Some(std::task::Poll::Ready(done)) => {
                                read = Some(done);
                                relay.body_done();
                            }
                            _ => relay.body_unfinished(),
                        }
                    }
                }
            }
        }
        let trapped = match called {
            // The epoch deadline traps the guest when it computes too long.
            Some(Err(e)) if e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt) => {
                Some(Failure::timeout(self.request_timeout))
            }
            Some(Err(e)) => Some(Failure::new(
                500,
                "signer_trap",
                "the signer stopped on an internal error while handling this request".into(),
                anyhow::Error::from(e).context("run the signer"),
            )),
            _ => None,
        };
        match (read, trapped) {
            (Some(Ok(response)), None) => Ok((Some(proxy), response)),
            // A complete answer stands (it may name an upload the store now
            // holds); the instance that failed after it is not kept.
            (Some(Ok(response)), Some(failure)) => {
                let detail = format!("{:#}", failure.detail);
                tracing::warn!(request_id = %id, code = failure.code, detail = ?detail, "the signer failed after its complete answer; its instance is dropped");
                Ok((None, response))
            }
            (_, Some(failure)) => Err(failure),
            (Some(Err(e)), None) => Err(Failure::new(
                502,
                "guest_error",
                "the signer's answer ended before its body was complete".into(),
                e,
            )),
            (None, None) => Err(Failure::new(
                502,
                "guest_error",
                "the signer returned without answering this request".into(),
                anyhow::anyhow!("the guest returned without setting its response outparam"),
            )),
        }
    }
}

/// Pre-initialization in the background: makes the snapshot, compiles it
/// and puts it in place of the plain component.
struct PreinitJob {
    engine: Engine,
    linker: Linker<Guest>,
    wasm: &'static [u8],
    env: Vec<(String, String)>,
    cache_dir: PathBuf,
    timeout: Duration,
    max_memory_bytes: usize,
    /// The host's component; gone when the host is.
    into: std::sync::Weak<std::sync::RwLock<ProxyPre<Guest>>>,
}

impl PreinitJob {
    /// Makes the snapshot, then a new one after each UTC midnight (the
    /// snapshot's signing key is its day's), until the host goes. A later
    /// run that fails keeps the snapshot serving and tries again the next day.
    fn serve(self, report: &tokio::sync::watch::Sender<PreinitState>, host_gone: &std::sync::mpsc::Receiver<()>) {
        loop {
            let state = self.run();
            let serving = matches!(*report.borrow(), PreinitState::Ready { .. });
            match state {
                PreinitState::Ready { .. } => {
                    report.send_replace(state);
                }
                // A later run failed (it logged why): the snapshot before it still serves.
                _ if serving => {}
                // The first run failed: there is nothing to refresh.
                other => {
                    report.send_replace(other);
                    return;
                }
            }
            let wait = until_next_utc_day(std::time::SystemTime::now()) + Duration::from_secs(1);
            match host_gone.recv_timeout(wait) {
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                // The host dropped its end: it is gone.
                _ => return,
            }
        }
    }

    fn run(&self) -> PreinitState {
        let started = Instant::now();
        let made =
            preinit::snapshot(&self.engine, self.wasm, &self.env, &self.cache_dir, self.timeout, self.max_memory_bytes)
                .and_then(|snapshot| {
                    let Some(snapshot) = snapshot else { return Ok(None) };
                    // Never cached on disk: the snapshot holds the configuration and derived keys.
                    let component = wasmtime::component::Component::new(&self.engine, &snapshot.component)
                        .anyhow()
                        .context("compile the pre-initialized component")?;
                    let pre = self.linker.instantiate_pre(&component).anyhow().context("pre-instantiate it")?;
                    Ok(Some((
                        ProxyPre::new(pre).anyhow().context("check its exports")?,
                        snapshot.memory_bytes,
                        snapshot.segments,
                    )))
                });
        match made {
            Ok(Some((pre, memory_bytes, segments))) => {
                let Some(into) = self.into.upgrade() else {
                    return PreinitState::Unavailable("the host stopped first".into());
                };
                *into.write().unwrap_or_else(|poisoned| poisoned.into_inner()) = pre;
                let took = started.elapsed();
                tracing::info!(
                    took_ms = took.as_millis() as u64,
                    memory_bytes,
                    segments,
                    "signer pre-initialized: fresh instances start from the snapshot"
                );
                PreinitState::Ready { took, memory_bytes }
            }
            Ok(None) => {
                let why = format!("the component exports no {}", preinit::PREINIT_EXPORT);
                tracing::info!("signer not pre-initialized: {why}");
                PreinitState::Unavailable(why)
            }
            Err(e) => {
                let why = format!("{e:#}");
                tracing::warn!(reason = %why, "signer not pre-initialized; fresh instances run the component's own start-up");
                PreinitState::Unavailable(why)
            }
        }
    }
}

/// From `now` to the next midnight UTC.
fn until_next_utc_day(now: std::time::SystemTime) -> Duration {
    const DAY: u64 = 86_400;
    let since = now.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    Duration::from_secs(DAY - since.as_secs() % DAY) - Duration::from_nanos(u64::from(since.subsec_nanos()))
}

/// Reads a guest's answer body into memory, at most `limit` bytes (an answer
/// cannot be larger than the guest's memory, which held it).
async fn read_answer(response: http::Response<HyperOutgoingBody>, limit: usize) -> Result<http::Response<Bytes>> {
    let (parts, mut body) = response.into_parts();
    let mut bytes = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|code| anyhow::anyhow!("the signer's answer body failed: {code:?}"))?;
        if let Ok(data) = frame.into_data() {
            anyhow::ensure!(bytes.len() + data.len() <= limit, "the signer's answer is over {limit} bytes");
            bytes.extend_from_slice(&data);
        }
    }
    Ok(http::Response::from_parts(parts, bytes.freeze()))
}

/// A body already in memory, as the server sends it.
fn full_body(bytes: Bytes) -> HyperOutgoingBody {
    Full::new(bytes)
        .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
        .boxed_unsync()
}

/// Reading a guest's answer body (see [`read_answer`]).
type AnswerRead = std::pin::Pin<Box<dyn Future<Output = Result<http::Response<Bytes>>> + Send>>;

/// What a guest sets on its response outparam.
type GuestAnswer = Result<http::Response<HyperOutgoingBody>, wasmtime_wasi_http::p2::bindings::http::types::ErrorCode>;

/// A request body already in memory, as the guest reads it.
type BufferedBody = http_body_util::combinators::MapErr<Full<Bytes>, fn(std::convert::Infallible) -> hyper::Error>;

fn unreachable_error(never: std::convert::Infallible) -> hyper::Error {
    match never {}
}

/// A wasi:http guest is handed the request's authority: an absolute URI's,
/// else the `Host` header's. HTTP/1.0 clients may send neither, and a `Host`
/// may hold bytes that are no text; both are the caller's error, said as such.
fn check_host(parts: &http::request::Parts) -> Result<(), Failure> {
    if parts.uri.authority().is_some() {
        return Ok(());
    }
    match parts.headers.get(http::header::HOST).map(|host| host.to_str()) {
        Some(Ok(host)) if !host.trim().is_empty() => Ok(()),
        Some(_) => Err(Failure::new(
            400,
            "bad_host",
            "the Host header is empty or not ASCII text; send the signer's address, e.g. Host: 127.0.0.1:8080".into(),
            anyhow::anyhow!("Host header empty or not text: {:?}", parts.headers.get(http::header::HOST)),
        )),
        None => Err(Failure::new(
            400,
            "missing_host",
            format!(
                "the request ({:?}) has no Host header and no absolute URI, so the signer cannot tell which \
                 address it was sent to; send Host: <the signer's address> (HTTP/1.1 requires it)",
                parts.version
            ),
            anyhow::anyhow!("no authority: {:?} {} without Host", parts.version, parts.uri),
        )),
    }
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
    serve_host(host, config.listen, limits).await
}

async fn serve_host(
    host: Arc<SignerHost>,
    listen: SocketAddr,
    limits: ServeLimits,
) -> Result<(Server, Arc<SignerHost>)> {
    // Idle instances hold what their caller left in memory: they are dropped
    // on time even when no request comes to evict them. The sweep ends with the host.
    let sweep = host.pool.idle_ttl().max(Duration::from_millis(20)) / 2;
    let weak = Arc::downgrade(&host);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(sweep).await;
            let Some(host) = weak.upgrade() else { break };
            host.pool.drop_expired();
        }
    });
    let service_host = host.clone();
    let service = hyper::service::service_fn(move |request| service_host.clone().handle(request));
    let server = serve::spawn_with("signer", listen, limits, service).await?;
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

    /// A signer environment for a store at `store_url` (the tests here never reach it).
    fn signer_env(store_url: &str) -> Vec<(String, String)> {
        [
            ("SNAPSIGN_BUCKET", "tests"),
            ("SNAPSIGN_KEY_PREFIX", "builds"),
            ("SNAPSIGN_S3_ENDPOINT", store_url),
            ("SNAPSIGN_S3_ADDRESSING", "path"),
            ("SNAPSIGN_ACCESS_KEY_ID", "AKIDTEST"),
            ("SNAPSIGN_SECRET_ACCESS_KEY", "test-secret"),
            ("SNAPSIGN_TOKEN_KEY", "test-token-key-0123456789abcdef0123456"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    /// A wasi:http handler that keeps the last request's caller and body in
    /// a static and answers with them: the worst guest bug, on purpose.
    const REUSE_PROBE_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_REUSE_PROBE_WASM"));

    struct Probe {
        server: Server,
        host: Arc<SignerHost>,
        client: reqwest::Client,
        _cache: tempfile::TempDir,
    }

    impl Probe {
        async fn start(max_instance_reuse: u32, max_concurrency: u32) -> Probe {
            Probe::start_with_ttl(max_instance_reuse, max_concurrency, IDLE_INSTANCE_TTL).await
        }

        async fn start_with_ttl(max_instance_reuse: u32, max_concurrency: u32, idle_ttl: Duration) -> Probe {
            Probe::start_full(max_instance_reuse, max_concurrency, idle_ttl, 16 << 20, QUEUE_WAIT).await
        }

        async fn start_full(
            max_instance_reuse: u32,
            max_concurrency: u32,
            idle_ttl: Duration,
            max_memory_bytes: usize,
            queue_wait: Duration,
        ) -> Probe {
            Probe::start_config(max_instance_reuse, max_concurrency, idle_ttl, max_memory_bytes, queue_wait, None).await
        }

        /// A probe whose fresh instances start from its snapshot once that
        /// is made, its pre-initialization run with `PROBE_PREINIT=mode`.
        async fn start_preinit(mode: &str) -> Probe {
            Probe::start_config(DEFAULT_MAX_INSTANCE_REUSE, 4, IDLE_INSTANCE_TTL, 16 << 20, QUEUE_WAIT, Some(mode))
                .await
        }

        async fn start_config(
            max_instance_reuse: u32,
            max_concurrency: u32,
            idle_ttl: Duration,
            max_memory_bytes: usize,
            queue_wait: Duration,
            preinit: Option<&str>,
        ) -> Probe {
            let cache = tempfile::tempdir().unwrap();
            // The probe never calls the store; the address only has to be valid.
            let mut env = signer_env("http://127.0.0.1:9");
            if let Some(mode) = preinit {
                env.push(("PROBE_PREINIT".into(), mode.into()));
            }
            let config = SignerServerConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                env,
                limits: EngineLimits { max_concurrency, max_memory_bytes },
                request_timeout: Duration::from_secs(20),
                cache_dir: cache.path().to_owned(),
                max_instance_reuse,
                preinit: preinit.is_some(),
            };
            let limits = ServeLimits::default();
            let mut host = SignerHost::with_component(&config, &limits, "reuse-probe", REUSE_PROBE_WASM).unwrap();
            host.pool.set_idle_ttl(idle_ttl);
            host.queue_wait = queue_wait;
            let (server, host) = serve_host(Arc::new(host), config.listen, limits).await.unwrap();
            Probe { server, host, client: reqwest::Client::new(), _cache: cache }
        }

        /// What the instance that served this request had seen before it.
        async fn send(&self, caller: Option<&str>, body: &str) -> (u16, String) {
            let mut request = self.client.post(format!("{}/probe", self.server.url())).body(body.to_owned());
            if let Some(caller) = caller {
                request = request.header("authorization", caller);
            }
            let response = request.send().await.unwrap();
            let answer = (response.status().as_u16(), response.text().await.unwrap());
            // The answer can arrive before its instance is back in the pool.
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.host.busy_slots() > 0 {
                assert!(Instant::now() < deadline, "the request's instance slot was never released");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            answer
        }

        async fn seen(&self, caller: Option<&str>, body: &str) -> String {
            let (status, text) = self.send(caller, body).await;
            assert_eq!(status, 200, "{text}");
            text
        }
    }

    #[tokio::test]
    async fn fresh_instances_start_from_the_snapshot_which_holds_no_request() {
        let probe = Probe::start_preinit("").await;
        // Requests served (and instances kept) while the snapshot is being made.
        for caller in ["Bearer early-1", "Bearer early-2"] {
            probe.seen(Some(caller), "early secret").await;
        }
        let state = probe.host.preinit_settled().await;
        assert!(matches!(state, PreinitState::Ready { .. }), "{state:?}");
        assert_eq!(probe.host.preinit_state(), state);
        // A new caller's instance starts from what pre-initialization left
        // (the environment, as lowered by the host: 7 + 1 variables) and
        // from nothing an earlier request carried; a caller's own instance,
        // reused, holds its own earlier request only.
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        assert_eq!(probe.seen(Some("Bearer B"), "preinit?").await, "pre-initialized with 8 variables|");
        assert_eq!(probe.seen(Some("Bearer A"), "preinit?").await, "pre-initialized with 8 variables|Bearer A|a1");
        assert_eq!(probe.seen(Some("Bearer C"), "preinit?").await, "pre-initialized with 8 variables|");
        // The snapshot holds the configuration, so it never reaches the
        // compiled cache: nothing there holds a value of the environment.
        let secret = b"test-token-key-0123456789abcdef0123456";
        for entry in std::fs::read_dir(probe._cache.path()).unwrap() {
            let bytes = std::fs::read(entry.unwrap().path()).unwrap();
            assert!(!bytes.windows(secret.len()).any(|w| w == secret), "a cached artifact holds the token key");
        }
    }

    #[tokio::test]
    async fn the_pre_initialization_thread_waiting_for_the_next_day_ends_with_its_host() {
        let probe = Probe::start_preinit("").await;
        assert!(matches!(probe.host.preinit_settled().await, PreinitState::Ready { .. }));
        let mut watch = probe.host.preinit.clone();
        watch.borrow_and_update();
        let Probe { server, host, .. } = probe;
        server.shutdown().await;
        drop(host);
        // The thread holds the sender: it is dropped once the thread ends
        // (else it would sleep until midnight, holding the engine).
        let ended = tokio::time::timeout(Duration::from_secs(10), watch.changed()).await;
        assert!(matches!(ended, Ok(Err(_))), "the pre-initialization thread outlived its host: {ended:?}");
    }

    #[test]
    fn the_snapshot_is_made_again_just_after_each_utc_midnight() {
        let at = |secs: u64, nanos: u32| std::time::UNIX_EPOCH + Duration::new(secs, nanos);
        assert_eq!(until_next_utc_day(at(86_400 * 20_000 + 86_399, 500_000_000)), Duration::from_millis(500));
        assert_eq!(until_next_utc_day(at(86_400 * 20_000, 0)), Duration::from_secs(86_400));
        assert_eq!(until_next_utc_day(at(86_400 * 20_000 + 1, 0)), Duration::from_secs(86_399));
    }

    #[tokio::test]
    async fn a_pre_initialization_that_reaches_past_the_environment_and_clocks_is_refused_and_the_plain_component_serves()
     {
        let probe = Probe::start_preinit("stderr").await;
        let PreinitState::Unavailable(why) = probe.host.preinit_settled().await else {
            panic!("a pre-initialization that wrote to stderr was taken: {:?}", probe.host.preinit_state());
        };
        assert!(why.contains("may read the environment and the wall clock only; it called wasi:cli/"), "{why}");
        assert!(!why.contains("environment@"), "the environment itself was refused: {why}");
        // The plain component serves: its pre-initialization never ran.
        assert_eq!(probe.seen(Some("Bearer A"), "preinit?").await, "|");
    }

    #[tokio::test]
    async fn an_instance_is_reused_only_for_the_caller_it_served() {
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 4).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "", "first request: fresh instance");
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "Bearer A|a1", "same caller: reused");
        let b = probe.seen(Some("Bearer B"), "b1").await;
        assert_eq!(b, "", "another caller gets a fresh instance, never A's");
        assert_eq!(probe.seen(Some("Bearer A"), "a3").await, "Bearer A|a2");
        assert_eq!(probe.seen(Some("Bearer B"), "b2").await, "Bearer B|b1");
        // A token that differs in one byte is another caller.
        assert_eq!(probe.seen(Some("Bearer a"), "a4").await, "");
        assert_eq!(probe.host.idle_instances(), 3);
        // Without a bearer token nothing is kept or reused.
        assert_eq!(probe.seen(None, "n1").await, "");
        assert_eq!(probe.seen(None, "n2").await, "", "anonymous requests never share an instance");
        for header in ["Basic QTpB", "Bearer ", "Bearer    "] {
            assert_eq!(probe.seen(Some(header), "x").await, "", "{header:?}");
            assert_eq!(probe.seen(Some(header), "y").await, "", "{header:?} is no caller");
        }
        assert_eq!(probe.host.idle_instances(), 3);
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn an_instance_that_refused_its_token_or_never_answered_is_not_kept() {
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 4).await;
        // A refused token proves no caller: two clients sending the same bad token share nothing.
        let (status, _) = probe.send(Some("Bearer junk"), "refuse").await;
        assert_eq!(status, 401);
        assert_eq!(probe.seen(Some("Bearer junk"), "j").await, "", "the refusing instance was dropped");
        // Nor does a refusal made before the token was read (the signer's
        // 404/405): any token, even junk, would otherwise keep an instance.
        let (status, _) = probe.send(Some("Bearer junk"), "unrouted").await;
        assert_eq!(status, 405);
        assert_eq!(probe.seen(Some("Bearer junk"), "j").await, "", "the instance that refused a route was kept");
        // A guest that keeps its response outparam must not hold the request open.
        let (status, text) = probe.send(Some("Bearer A"), "forget").await;
        assert_eq!(status, 502, "{text}");
        assert!(text.contains("guest_error") && text.contains("without answering"), "{text}");
        assert_eq!(probe.seen(Some("Bearer A"), "a").await, "", "the silent instance was dropped");
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_slow_reader_holds_a_connection_not_an_instance() {
        // One instance slot; a 40 MB answer is more than loopback sockets buffer.
        let probe = Probe::start_full(DEFAULT_MAX_INSTANCE_REUSE, 1, IDLE_INSTANCE_TTL, 64 << 20, QUEUE_WAIT).await;
        let held = probe
            .client
            .post(format!("{}/probe", probe.server.url()))
            .header("authorization", "Bearer A")
            .body("big")
            .send()
            .await
            .unwrap();
        assert_eq!(held.status(), 200);
        // While A's answer sits unread, B gets the only slot.
        assert_eq!(probe.send(Some("Bearer B"), "b").await, (200, String::new()));
        let body = held.bytes().await.unwrap();
        assert_eq!(body.len(), 40 << 20, "A's answer arrives whole");
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn idle_instances_are_dropped_after_their_ttl_without_traffic() {
        let probe = Probe::start_with_ttl(DEFAULT_MAX_INSTANCE_REUSE, 4, Duration::from_millis(200)).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        assert_eq!(probe.host.idle_instances(), 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe.host.idle_instances() > 0 {
            assert!(Instant::now() < deadline, "the idle instance outlived its TTL");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "", "a fresh instance after the TTL");
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn a_complete_answer_stands_when_the_guest_traps_after_it_but_the_instance_goes() {
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 4).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        let (status, text) = probe.send(Some("Bearer A"), "answer-then-trap").await;
        assert_eq!((status, text.as_str()), (200, "Bearer A|a1"), "the answer written before the trap");
        assert_eq!(probe.host.idle_instances(), 0, "the instance that trapped is gone");
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "", "the next request runs fresh");
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn an_instance_that_trapped_is_dropped_not_reused() {
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 4).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        let (status, text) = probe.send(Some("Bearer A"), "trap").await;
        assert_eq!(status, 500, "{text}");
        assert!(text.contains("signer_trap"), "{text}");
        assert_eq!(probe.host.idle_instances(), 0, "the trapped instance is gone");
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "", "the next request runs fresh");
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn reuse_is_bounded_and_can_be_turned_off() {
        let probe = Probe::start(2, 4).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "Bearer A|a1");
        assert_eq!(probe.seen(Some("Bearer A"), "a3").await, "", "dropped after 2 requests");
        probe.server.shutdown().await;

        let probe = Probe::start(1, 4).await;
        assert_eq!(probe.seen(Some("Bearer A"), "a1").await, "");
        assert_eq!(probe.seen(Some("Bearer A"), "a2").await, "", "reuse off: fresh every time");
        assert_eq!(probe.host.idle_instances(), 0);
        probe.server.shutdown().await;
    }

    #[tokio::test]
    async fn idle_instances_give_way_to_new_callers() {
        // Two pool slots: two idle instances must not lock out a third caller.
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 2).await;
        for caller in ["Bearer A", "Bearer B", "Bearer C", "Bearer D"] {
            assert_eq!(probe.seen(Some(caller), "x").await, "", "{caller}");
        }
        assert_eq!(probe.host.idle_instances(), 2, "at most the pool's size stays idle");
        assert_eq!(probe.seen(Some("Bearer D"), "y").await, "Bearer D|x", "the newest stay");
        probe.server.shutdown().await;
    }

    /// More callers than the pool has instances, fewer requests at once than
    /// `--max-concurrency`: every request is served, and by an instance that
    /// served no other caller. (Evicted idle instances once held their pool
    /// slots a moment too long, and a request was refused.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_callers_below_the_limit_are_never_refused() {
        let probe = Arc::new(Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 8).await);
        let mut clients = Vec::new();
        for client in 0..7u32 {
            let probe = probe.clone();
            clients.push(tokio::spawn(async move {
                let mut failures = Vec::new();
                for i in 0..300u32 {
                    // 150 callers in all, each coming back now and then.
                    let caller = format!("Bearer c{}", (i * 7 + client * 50) % 150);
                    let body = format!("{client}-{i}");
                    let response = probe
                        .client
                        .post(format!("{}/probe", probe.server.url()))
                        .header("authorization", &caller)
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    let status = response.status().as_u16();
                    let text = response.text().await.unwrap();
                    let own = text.is_empty() || text.starts_with(&format!("{caller}|"));
                    if status != 200 || !own {
                        failures.push(format!("{caller}: {status} {text}"));
                    }
                }
                failures
            }));
        }
        let mut failures = Vec::new();
        for client in clients {
            failures.extend(client.await.unwrap());
        }
        assert!(
            failures.is_empty(),
            "{} of 2100 requests failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
        assert!(probe.host.idle_instances() <= 8, "the idle cache stays within the pool");
    }

    /// Below the limit a request is served while others run; with
    /// `--max-concurrency` requests running it is refused, saying so.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_is_refused_only_when_every_slot_runs() {
        let probe = Arc::new(
            Probe::start_full(DEFAULT_MAX_INSTANCE_REUSE, 2, IDLE_INSTANCE_TTL, 16 << 20, Duration::from_millis(300))
                .await,
        );
        let sleep = |caller: &'static str| {
            let probe = probe.clone();
            tokio::spawn(async move {
                let response = probe
                    .client
                    .post(format!("{}/probe", probe.server.url()))
                    .header("authorization", caller)
                    .body("sleep")
                    .send()
                    .await
                    .unwrap();
                response.status().as_u16()
            })
        };
        let wait_busy = |n: usize| {
            let probe = probe.clone();
            async move {
                let deadline = Instant::now() + Duration::from_secs(10);
                while probe.host.busy_slots() < n {
                    assert!(Instant::now() < deadline, "{n} requests never ran at once");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        let first = sleep("Bearer A");
        wait_busy(1).await;
        // One of two slots runs: a third caller is served at once.
        let response =
            probe.client.post(format!("{}/probe", probe.server.url())).header("authorization", "Bearer C").body("c");
        let response = response.send().await.unwrap();
        assert_eq!(response.status(), 200);
        assert!(!first.is_finished(), "the sleeper still held its slot while C was served");
        let second = sleep("Bearer B");
        wait_busy(2).await;
        // Both slots run: the next request is refused after the queue wait.
        let refused = probe
            .client
            .post(format!("{}/probe", probe.server.url()))
            .header("authorization", "Bearer D")
            .body("d")
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 503);
        assert_eq!(refused.headers().get("retry-after").map(|v| v.as_bytes()), Some(&b"1"[..]));
        let text = refused.text().await.unwrap();
        assert!(text.contains("signer_busy") && text.contains("all 2 signer instances"), "{text}");
        assert_eq!((first.await.unwrap(), second.await.unwrap()), (200, 200));
        // Slots free again: served.
        assert_eq!(probe.send(Some("Bearer D"), "d").await.0, 200);
    }

    /// HTTP/1.0 lets a client leave out Host; the guest needs an authority.
    /// That is the caller's error (400 naming it), never the host's (500).
    #[tokio::test]
    async fn a_request_without_a_host_is_a_400_that_says_so() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let probe = Probe::start(DEFAULT_MAX_INSTANCE_REUSE, 2).await;
        let cases: [(&[u8], &str); 3] = [
            (b"POST /probe HTTP/1.0\r\nContent-Length: 1\r\n\r\nx", "missing_host"),
            (b"POST /probe HTTP/1.1\r\nHost: \xff\xfe\r\nContent-Length: 1\r\n\r\nx", "bad_host"),
            (b"POST /probe HTTP/1.1\r\nHost:\r\nContent-Length: 1\r\n\r\nx", "bad_host"),
        ];
        for (raw, code) in cases {
            let mut socket = tokio::net::TcpStream::connect(probe.server.addr()).await.unwrap();
            socket.write_all(raw).await.unwrap();
            let mut answer = Vec::new();
            tokio::time::timeout(Duration::from_secs(10), socket.read_to_end(&mut answer)).await.unwrap().unwrap();
            let answer = String::from_utf8_lossy(&answer);
            let status = answer.split(' ').nth(1).unwrap_or_default();
            assert_eq!(status, "400", "{}: {answer}", String::from_utf8_lossy(raw));
            assert!(answer.contains(code) && answer.contains("Host"), "{answer}");
        }
        // With a Host, the same request is served.
        let mut socket = tokio::net::TcpStream::connect(probe.server.addr()).await.unwrap();
        socket.write_all(b"POST /probe HTTP/1.0\r\nHost: signer\r\nContent-Length: 1\r\n\r\nx").await.unwrap();
        let mut answer = Vec::new();
        socket.read_to_end(&mut answer).await.unwrap();
        assert!(
            answer.starts_with(b"HTTP/1.0 200") || answer.starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&answer)
        );
        probe.server.shutdown().await;
    }

    #[test]
    fn debug_output_names_variables_but_not_their_values() {
        let config = SignerServerConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            env: signer_env("http://127.0.0.1:9"),
            limits: EngineLimits::default(),
            request_timeout: Duration::from_secs(1),
            cache_dir: PathBuf::from("/tmp"),
            max_instance_reuse: 1,
            preinit: false,
        };
        let printed = format!("{config:?}");
        assert!(printed.contains("SNAPSIGN_SECRET_ACCESS_KEY=<redacted>"), "{printed}");
        for (_, value) in &config.env {
            if value.len() > 8 {
                assert!(!printed.contains(value.as_str()), "{printed} shows {value}");
            }
        }
    }
}
