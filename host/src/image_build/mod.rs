//! `sandbox-exec` and the builder component: a build runs as the builder
//! component with wasi:http (outbound allow-list), the build context as one
//! read-only preopen, and the `sandbox-exec` capability over a backend.

pub mod backend;
pub mod local_backend;
pub mod proxy_backend;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::component::{HasSelf, Linker, Resource, ResourceTable};
use wasmtime::{Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use self::backend::{FileSink, SandboxBackend, SandboxError};
use crate::engine::{self, EngineLimits, WasmtimeResultExt};
use crate::outbound::AllowList;
use snapsign::presign::authority;

/// The builder component, built by `host/build.rs` from `src/bin/builder.rs`.
pub const BUILDER_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_BUILDER_WASM"));

pub(crate) mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "builder",
        imports: { default: async },
        exports: { default: async },
        with: { "snapsign:components/sandbox-exec.file-writer": super::backend::FileSink },
    });
}

use bindings::exports::snapsign::components::build::{BuildError, BuildRequest};
use bindings::snapsign::components::{events, sandbox_exec, types};

/// What the build reports as it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildEvent {
    /// A stage started.
    Stage(String),
    /// Context upload: bytes sent (and total once known, else 0).
    Upload(u64, u64),
    /// A builder log line: stream, text.
    Log(String, String),
    /// A warning.
    Warning(String),
}

/// Where events go.
pub type EventFn = Arc<dyn Fn(BuildEvent) + Send + Sync>;

/// Per-build guest state.
pub struct BuildState<B: SandboxBackend> {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: AllowList,
    limits: StoreLimits,
    backend: Arc<B>,
    events: EventFn,
    /// Time spent in logged process runs (the builder itself), for the benchmark.
    builder_time: Duration,
}

impl<B: SandboxBackend> WasiView for BuildState<B> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl<B: SandboxBackend> WasiHttpView for BuildState<B> {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

impl<B: SandboxBackend> types::Host for BuildState<B> {}

impl<B: SandboxBackend> events::Host for BuildState<B> {
    async fn emit(&mut self, event: events::Event) {
        (self.events)(match event {
            events::Event::Stage(s) => BuildEvent::Stage(s),
            events::Event::UploadProgress((sent, total)) => BuildEvent::Upload(sent, total),
            events::Event::Log((stream, line)) => BuildEvent::Log(stream, line),
            events::Event::Warning(w) => BuildEvent::Warning(w),
        })
    }
}

impl<B: SandboxBackend> sandbox_exec::Host for BuildState<B> {
    async fn create(
        &mut self,
        image: String,
        resources: types::Resources,
        timeout_secs: i64,
    ) -> Result<types::Sandbox, SandboxError> {
        let (id, status) = self.backend.create(&image, resources, timeout_secs).await?;
        tracing::info!(sandbox = %id, "builder sandbox created");
        Ok(types::Sandbox { id, status })
    }

    async fn status(&mut self, id: String) -> Result<String, SandboxError> {
        self.backend.status(&id).await
    }

    async fn proxy(&mut self, id: String) -> Result<types::ProxyEndpoint, SandboxError> {
        self.backend.proxy(&id)
    }

    async fn run(
        &mut self,
        id: String,
        spec: types::ProcessSpec,
        log_output: bool,
    ) -> Result<types::ExitStatus, SandboxError> {
        let events = self.events.clone();
        let mut sink = |stream: &str, line: &str| {
            if log_output {
                events(BuildEvent::Log(stream.to_owned(), line.to_owned()));
            }
        };
        let started = Instant::now();
        let result = self.backend.run(&id, spec, &mut sink).await;
        if log_output {
            self.builder_time += started.elapsed();
        }
        result
    }

    async fn run_captured(
        &mut self,
        id: String,
        spec: types::ProcessSpec,
        timeout_secs: u32,
    ) -> Result<(types::ExitStatus, Vec<String>), SandboxError> {
        let mut lines = Vec::new();
        let mut sink = |stream: &str, line: &str| {
            if stream != "stderr" {
                lines.push(line.to_owned());
            }
        };
        let limit = Duration::from_secs(u64::from(timeout_secs.max(1)));
        let exit = tokio::time::timeout(limit, self.backend.run(&id, spec, &mut sink))
            .await
            .map_err(|_| SandboxError::Failed(format!("diagnostic process did not finish within {limit:?}")))??;
        Ok((exit, lines))
    }

    async fn write_file(&mut self, id: String, path: String, contents: Vec<u8>) -> Result<(), SandboxError> {
        self.backend.write_file(&id, &path, contents).await
    }

    async fn open_file_writer(&mut self, id: String, path: String) -> Result<Resource<FileSink>, SandboxError> {
        let sink = self.backend.open_file(&id, &path).await?;
        self.table.push(sink).map_err(|e| SandboxError::Failed(format!("too many open files: {e}")))
    }

    async fn read_file(&mut self, id: String, path: String) -> Result<Vec<u8>, SandboxError> {
        self.backend.read_file(&id, &path).await
    }

    async fn delete(&mut self, id: String) -> Result<(), SandboxError> {
        self.backend.delete(&id).await
    }
}

impl<B: SandboxBackend> sandbox_exec::HostFileWriter for BuildState<B> {
    async fn write(&mut self, writer: Resource<FileSink>, chunk: Vec<u8>) -> Result<(), SandboxError> {
        let sink = self.table.get_mut(&writer).map_err(|e| SandboxError::Failed(format!("file writer: {e}")))?;
        sink.write(chunk).await
    }

    async fn finish(&mut self, writer: Resource<FileSink>) -> Result<u64, SandboxError> {
        let sink = self.table.get_mut(&writer).map_err(|e| SandboxError::Failed(format!("file writer: {e}")))?;
        sink.finish().await
    }

    async fn drop(&mut self, writer: Resource<FileSink>) -> wasmtime::Result<()> {
        self.table.delete(writer)?;
        Ok(())
    }
}

/// One build's settings.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Platform API base URL.
    pub api_url: String,
    /// Bearer token (platform, lifecycle, proxy).
    pub token: String,
    /// Lifecycle namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Dockerfile text.
    pub dockerfile: String,
    /// Build context directory (preopened read-only).
    pub context_dir: PathBuf,
    /// Rootfs size, MiB.
    pub disk_mb: Option<u64>,
    /// Builder sandbox CPU override.
    pub builder_cpus: Option<f64>,
    /// Builder sandbox memory override, MiB.
    pub builder_memory_mb: Option<i64>,
    /// Builder sandbox disk override, MiB.
    pub builder_disk_mb: Option<u64>,
    /// Register as public.
    pub public: bool,
    /// Deadline for the sandbox to run and answer.
    pub sandbox_wait: Duration,
    /// Extra hosts the guest may reach (e.g. the store, to abort uploads).
    pub allow_hosts: Vec<String>,
    /// Guest linear memory limit.
    pub max_memory_bytes: usize,
    /// Wall-clock limit of the whole build.
    pub timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
}

/// How a build failed, as the component said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildFailure {
    /// Bad request (flags, Dockerfile).
    Usage(String),
    /// Credentials refused.
    Auth(String),
    /// The build failed.
    Failed(String),
}

impl std::fmt::Display for BuildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildFailure::Usage(m) | BuildFailure::Auth(m) | BuildFailure::Failed(m) => write!(f, "{m}"),
        }
    }
}

/// Timings of one run, for the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct RunTimings {
    /// Loading the component (compile or cache).
    pub load: Duration,
    /// WASI context (with the preopen) and Store creation.
    pub setup: Duration,
    /// Instantiation of the pre-instantiated component.
    pub instantiate: Duration,
    /// The export call (the whole build).
    pub run: Duration,
    /// Of `run`, the builder process (start to exit, as the host saw it).
    pub builder: Duration,
}

/// Runs one build with the `proxy` backend against `options.api_url`.
pub async fn run(
    options: &BuildOptions,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    let (backend, outbound) = proxy_backend(options);
    run_with(options, backend, outbound, events).await
}

/// The `proxy` backend for `options.api_url`, and the allow-list it feeds
/// (the platform, the extra hosts, and each sandbox proxy it learns of).
pub fn proxy_backend(options: &BuildOptions) -> (Arc<proxy_backend::ProxyBackend>, AllowList) {
    let outbound = AllowList::new(authority(&options.api_url).into_iter().chain(options.allow_hosts.iter().cloned()));
    let backend =
        proxy_backend::ProxyBackend::new(&options.api_url, &options.token, &options.namespace, outbound.clone());
    (Arc::new(backend), outbound)
}

/// Runs one build with the `local` backend: sandboxes under `sandboxes_dir`
/// running `builder`, sign calls straight to `signer_url`; the loopback
/// `allow_hosts` (e.g. the store) are forwarded into the sandboxes.
pub async fn run_local(
    options: &BuildOptions,
    sandboxes_dir: &std::path::Path,
    builder: PathBuf,
    allow_unconfined: bool,
    signer_url: &str,
    signer_token: &str,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    let sandboxes = snapsign_sandbox::Sandboxes::new(snapsign_sandbox::SandboxesConfig {
        root_dir: sandboxes_dir.to_owned(),
        confinement: snapsign_sandbox::Confinement::detect(allow_unconfined)?,
        builder_binary: Some(builder),
    })?;
    let ports: Vec<u16> = options.allow_hosts.iter().filter_map(|h| snapsign_sandbox::loopback_port(h)).collect();
    sandboxes.grant_ports(&ports);
    let backend = Arc::new(local_backend::LocalBackend::new(Arc::new(sandboxes), signer_url, signer_token));
    let allowed = [authority(&options.api_url), authority(signer_url)];
    let outbound = AllowList::new(allowed.into_iter().flatten().chain(options.allow_hosts.iter().cloned()));
    run_with(options, backend, outbound, events).await
}

/// The builder component compiled and pre-instantiated once, for any
/// number of builds over backends of type `B` (a fresh Store per build).
pub struct BuilderRuntime<B: SandboxBackend> {
    engine: wasmtime::Engine,
    pre: bindings::BuilderPre<BuildState<B>>,
    max_memory_bytes: usize,
    /// How long loading (compile or cache) and pre-instantiation took.
    pub load: Duration,
}

impl<B: SandboxBackend> BuilderRuntime<B> {
    /// Loads the builder component (from `cache_dir` when compiled before) and pre-instantiates it.
    pub fn new(max_memory_bytes: usize, cache_dir: &std::path::Path) -> Result<Self> {
        let started = Instant::now();
        let engine = engine::engine(EngineLimits { max_concurrency: 4, max_memory_bytes })?;
        let (component, _) = engine::load_component(&engine, "builder", BUILDER_WASM, cache_dir)?;
        let mut linker: Linker<BuildState<B>> = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).anyhow().context("link WASI")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).anyhow().context("link WASI HTTP")?;
        bindings::Builder::add_to_linker::<_, HasSelf<BuildState<B>>>(&mut linker, |s| s)
            .anyhow()
            .context("link sandbox-exec")?;
        let pre = bindings::BuilderPre::new(
            linker.instantiate_pre(&component).anyhow().context("pre-instantiate the builder")?,
        )
        .anyhow()
        .context("the builder does not export snapsign:components/build")?;
        Ok(BuilderRuntime { engine, pre, max_memory_bytes, load: started.elapsed() })
    }

    /// Runs one build.
    pub async fn run(
        &self,
        options: &BuildOptions,
        backend: Arc<B>,
        outbound: AllowList,
        events: EventFn,
    ) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
        let (engine, pre, load) = (&self.engine, &self.pre, self.load);
        let max_memory_bytes = options.max_memory_bytes.min(self.max_memory_bytes);
        let instantiating = Instant::now();
        let mut wasi = WasiCtx::builder();
        wasi.inherit_stderr();
        wasi.preopened_dir(&options.context_dir, "/context", FsPerms::ReadOnly)
            .anyhow()
            .with_context(|| format!("open the build context {}", options.context_dir.display()))?;
        let state = BuildState {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound,
            limits: StoreLimitsBuilder::new().memory_size(max_memory_bytes).instances(8).build(),
            backend,
            events,
            builder_time: Duration::ZERO,
        };
        let mut store = Store::new(engine, state);
        store.limiter(|s| &mut s.limits);
        store.set_epoch_deadline(engine::deadline_ticks(options.timeout));
        store.epoch_deadline_trap();
        let setup = instantiating.elapsed();
        let instantiating = Instant::now();
        let builder = pre.instantiate_async(&mut store).await.anyhow().context("instantiate the builder")?;
        let instantiate = instantiating.elapsed();

        let request = BuildRequest {
            api_url: options.api_url.clone(),
            token: options.token.clone(),
            namespace: options.namespace.clone(),
            name: options.name.clone(),
            dockerfile: options.dockerfile.clone(),
            disk_mb: options.disk_mb,
            builder_cpus: options.builder_cpus,
            builder_memory_mb: options.builder_memory_mb,
            builder_disk_mb: options.builder_disk_mb,
            public: options.public,
            sandbox_wait_secs: options.sandbox_wait.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
        };
        let running = Instant::now();
        let call = builder.snapsign_components_build().call_run(&mut store, &request);
        let outcome = tokio::time::timeout(options.timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("the build did not finish within {:?}", options.timeout))?
            .anyhow()
            .context("run the builder component")?;
        let timings =
            RunTimings { load, setup, instantiate, run: running.elapsed(), builder: store.data().builder_time };
        let outcome = match outcome {
            Ok(text) => Ok(serde_json::from_str(&text).context("the registered template is not JSON")?),
            Err(BuildError::Usage(m)) => Err(BuildFailure::Usage(m)),
            Err(BuildError::Auth(m)) => Err(BuildFailure::Auth(m)),
            Err(BuildError::Failed(m)) => Err(BuildFailure::Failed(m)),
        };
        Ok((outcome, timings))
    }
}

/// Runs one build over any backend (loading the component for it).
pub async fn run_with<B: SandboxBackend>(
    options: &BuildOptions,
    backend: Arc<B>,
    outbound: AllowList,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    BuilderRuntime::new(options.max_memory_bytes, &options.cache_dir)?.run(options, backend, outbound, events).await
}

/// Prints events to stderr: stages, builder log lines, upload progress every 8 MiB, warnings.
pub fn progress_printer() -> EventFn {
    let last = std::sync::Mutex::new(0u64);
    Arc::new(move |event| match event {
        BuildEvent::Stage(stage) => eprintln!("==> {stage}"),
        BuildEvent::Log(stream, line) => eprintln!("  [builder {stream}] {line}"),
        BuildEvent::Warning(warning) => eprintln!("warning: {warning}"),
        BuildEvent::Upload(sent, total) => {
            let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
            if total > 0 {
                eprintln!("  context uploaded: {total} bytes (gzip tar)");
            } else if sent >= *last + (8 << 20) {
                *last = sent;
                eprintln!("  context upload: {:.1} MiB sent", sent as f64 / 1048576.0);
            }
        }
    })
}
