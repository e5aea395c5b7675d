//! The builder component runner: a build runs as the builder component
//! (world `builder`) in a guest of its own ([`crate::guest`]: wasi:http
//! behind the outbound allow-list, the build context as one read-only
//! preopen), with the `sandbox-exec` capability ([`crate::sandbox_exec`])
//! over a backend, and its `events` reported as [`BuildEvent`]s.

mod backends;
mod options;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use wasmtime::StoreLimitsBuilder;
use wasmtime::component::{HasSelf, Linker};
use wasmtime_wasi::{FsPerms, WasiCtx};

pub use self::backends::{proxy_backend, proxy_outbound, run, run_local, run_with};
pub use self::options::{BuildFailure, BuildOptions, RunTimings};
use crate::engine::{self, EngineLimits, WasmtimeResultExt};
use crate::guest::{self, GuestState};
use crate::outbound::AllowList;
use crate::sandbox_exec::{self, SandboxBackend, SandboxExecCtx, SandboxExecView};

const WASM_PAGE: usize = 64 << 10;

/// The builder component, built by `host/runtime/build.rs` from `src/bin/builder.rs`.
pub const BUILDER_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_BUILDER_WASM"));

mod bindings {
    wasmtime::component::bindgen!({
        path: "../../wit",
        world: "builder",
        imports: { default: async },
        exports: { default: async },
        with: {
            "snapsign:components/types": crate::sandbox_exec::bindings::snapsign::components::types,
            "snapsign:components/sandbox-exec": crate::sandbox_exec::bindings::snapsign::components::sandbox_exec,
        },
    });
}

use bindings::exports::snapsign::components::build::{BuildError, BuildRequest};
use bindings::snapsign::components::events;

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
    /// The builder's metadata.json (JSON text), read before completion.
    Metadata(String),
}

/// Where events go.
pub type EventFn = Arc<dyn Fn(BuildEvent) + Send + Sync>;

/// The builder runtime's part of a guest: its capability and where events go.
pub struct BuildData {
    sandbox: SandboxExecCtx,
    events: EventFn,
}

type BuildGuest = GuestState<BuildData>;

impl events::Host for BuildData {
    async fn emit(&mut self, event: events::Event) {
        (self.events)(match event {
            events::Event::Stage(s) => BuildEvent::Stage(s),
            events::Event::UploadProgress((sent, total)) => BuildEvent::Upload(sent, total),
            events::Event::Log((stream, line)) => BuildEvent::Log(stream, line),
            events::Event::Warning(w) => BuildEvent::Warning(w),
            events::Event::Metadata(json) => BuildEvent::Metadata(json),
        })
    }
}

fn sandbox_exec_view(guest: &mut BuildGuest) -> SandboxExecView<'_> {
    SandboxExecView { ctx: &mut guest.data.sandbox, table: &mut guest.table }
}

/// The builder component compiled and pre-instantiated once, for any
/// number of builds (a fresh Store per build).
pub struct BuilderRuntime {
    engine: wasmtime::Engine,
    pre: bindings::BuilderPre<BuildGuest>,
    max_memory_bytes: usize,
    /// The builder's initial linear memory (set by its link settings in `build.rs`).
    initial_memory_bytes: usize,
    /// How long loading (compile or cache) and pre-instantiation took.
    pub load: Duration,
}

impl BuilderRuntime {
    /// Loads the builder component (from `cache_dir` when compiled before) and pre-instantiates it.
    pub fn new(max_memory_bytes: usize, cache_dir: &std::path::Path) -> Result<Self> {
        let started = Instant::now();
        // The pool's slots are at least 16 MiB, so a limit below what the component
        // needs is refused by name when a build's Store is made (the Store holds the
        // limit), not as a pooling-allocator error while compiling.
        let slot = max_memory_bytes.max(16 << 20);
        let engine = engine::engine(EngineLimits { max_concurrency: 4, max_memory_bytes: slot })?;
        let (component, _) = engine::load_component(&engine, "builder", BUILDER_WASM, cache_dir)?;
        let initial_memory_bytes = component
            .resources_required()
            .and_then(|r| r.max_initial_memory_size)
            .map_or(0, |pages| pages as usize * WASM_PAGE);
        let mut linker: Linker<BuildGuest> = Linker::new(&engine);
        guest::add_wasi_to_linker(&mut linker)?;
        sandbox_exec::add_to_linker(&mut linker, sandbox_exec_view).anyhow().context("link sandbox-exec")?;
        events::add_to_linker::<_, HasSelf<BuildData>>(&mut linker, |guest| &mut guest.data)
            .anyhow()
            .context("link events")?;
        let pre = bindings::BuilderPre::new(
            linker.instantiate_pre(&component).anyhow().context("pre-instantiate the builder")?,
        )
        .anyhow()
        .context("the builder does not export snapsign:components/build")?;
        Ok(BuilderRuntime { engine, pre, max_memory_bytes, initial_memory_bytes, load: started.elapsed() })
    }

    /// A fresh Store for one build: its own WASI context (the build context as
    /// the only preopen), `sandbox-exec` over `backend`, outbound HTTP limited
    /// to `outbound`, the memory limit and the epoch deadline of `options`.
    fn store(
        &self,
        options: &BuildOptions,
        backend: Arc<dyn SandboxBackend>,
        outbound: AllowList,
        events: EventFn,
    ) -> Result<wasmtime::Store<BuildGuest>> {
        let max_memory_bytes = options.max_memory_bytes.min(self.max_memory_bytes);
        if max_memory_bytes < self.initial_memory_bytes {
            anyhow::bail!(
                "the guest memory limit of {max_memory_bytes} bytes is below the builder component's initial memory \
                 of {} bytes: raise --max-memory-mb to at least {} MiB",
                self.initial_memory_bytes,
                self.initial_memory_bytes.div_ceil(1 << 20)
            );
        }
        let mut wasi = WasiCtx::builder();
        wasi.inherit_stderr();
        wasi.preopened_dir(&options.context_dir, "/context", FsPerms::ReadOnly)
            .anyhow()
            .with_context(|| format!("open the build context {}", options.context_dir.display()))?;
        let (logs, progress) = (events.clone(), events.clone());
        let sandbox = SandboxExecCtx::new(backend, outbound.clone())
            .with_output(Arc::new(move |stream, line| logs(BuildEvent::Log(stream.to_owned(), line.to_owned()))))
            .with_progress(Arc::new(move |sent, total| progress(BuildEvent::Upload(sent, total))))
            .with_directory("/context", options.context_dir.clone())
            .with_compression(options.compression)
            .with_cancel(options.cancel.clone());
        let limits = StoreLimitsBuilder::new().memory_size(max_memory_bytes).instances(8).build();
        // The guest's own HTTP stops with the build too (wit/protocol.md §5.10).
        let builds = snapsign::image_build::call::builds_url(&snapsign::image_build::call::platform_base(
            &options.request.api_url,
            options.request.scope.as_ref(),
        ));
        let outbound = outbound.with_cancel(options.cancel.clone(), format!("{builds}/"));
        let state = GuestState::new(wasi.build(), outbound, limits, BuildData { sandbox, events });
        Ok(guest::store(&self.engine, state, options.timeout))
    }

    /// Instantiates the builder `rounds` times back to back, each in a fresh
    /// Store as [`BuilderRuntime::run`] makes one, and calls nothing; returns
    /// how long each instantiation took. For the benchmark: it shows the cost
    /// with the host's caches warm, next to the once-per-build figure.
    pub async fn instantiate_back_to_back(
        &self,
        options: &BuildOptions,
        backend: Arc<dyn SandboxBackend>,
        outbound: AllowList,
        rounds: usize,
    ) -> Result<Vec<Duration>> {
        let mut samples = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let mut store = self.store(options, backend.clone(), outbound.clone(), Arc::new(|_| {}))?;
            let started = Instant::now();
            self.pre.instantiate_async(&mut store).await.anyhow().context("instantiate the builder")?;
            samples.push(started.elapsed());
        }
        Ok(samples)
    }

    /// Runs one build over `backend`; the guest reaches only `outbound`.
    pub async fn run(
        &self,
        options: &BuildOptions,
        backend: Arc<dyn SandboxBackend>,
        outbound: AllowList,
        events: EventFn,
    ) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
        let instantiating = Instant::now();
        let mut store = self.store(options, backend, outbound, events)?;
        let setup = instantiating.elapsed();
        let instantiating = Instant::now();
        let builder = self.pre.instantiate_async(&mut store).await.anyhow().context("instantiate the builder")?;
        let instantiate = instantiating.elapsed();

        let request = wit_request(&options.request);
        let running = Instant::now();
        let call = builder.snapsign_components_build().call_run(&mut store, &request);
        let outcome = tokio::time::timeout(options.timeout, call)
            .await
            .map_err(|_| anyhow::anyhow!("the build did not finish within {:?}", options.timeout))?
            .anyhow()
            .context("run the builder component")?;
        let timings = RunTimings {
            load: self.load,
            setup,
            instantiate,
            run: running.elapsed(),
            builder: store.data().data.sandbox.logged_run_time(),
            guest_memory_peak: store.data().peak_memory(),
        };
        let outcome = match outcome {
            Ok(text) => Ok(serde_json::from_str(&text).context("the registered template is not JSON")?),
            Err(BuildError::Usage(m)) => Err(BuildFailure::Usage(m)),
            Err(BuildError::Auth(m)) => Err(BuildFailure::Auth(m)),
            Err(BuildError::Failed(m)) => Err(BuildFailure::Failed(m)),
            Err(BuildError::Cancelled(m)) => Err(BuildFailure::Cancelled(m)),
        };
        Ok((outcome, timings))
    }
}

/// The core's request as the WIT `build-request` the component receives:
/// the one place the two meet on the host's side (the component maps it
/// back in `src/bin/builder.rs`).
fn wit_request(r: &snapsign::image_build::call::Request) -> BuildRequest {
    BuildRequest {
        api_url: r.api_url.clone(),
        token: r.token.clone(),
        name: r.name.clone(),
        dockerfile: r.dockerfile.clone(),
        disk_mb: r.disk_mb,
        builder_cpus: r.builder_cpus,
        builder_memory_mb: r.builder_memory_mb,
        builder_disk_mb: r.builder_disk_mb,
        public: r.public,
        sandbox_wait_secs: r.sandbox_wait_secs.max(1),
        import_reference: r.import_reference.clone(),
        scope: r.scope.as_ref().map(|s| bindings::exports::snapsign::components::build::Scope {
            organization: s.organization.clone(),
            project: s.project.clone(),
        }),
        build_args: r.build_args.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox_exec::fake::FakeBackend;

    fn options(max_memory_bytes: usize) -> BuildOptions {
        BuildOptions {
            max_memory_bytes,
            timeout: Duration::from_secs(5),
            ..BuildOptions::for_tests("http://127.0.0.1:9")
        }
    }

    #[test]
    fn the_builder_has_one_memory_sized_for_a_build_without_growing() {
        let cache = tempfile::tempdir().unwrap();
        let runtime = BuilderRuntime::new(64 << 20, cache.path()).unwrap();
        let needs = runtime.pre.instance_pre().component().resources_required().expect("no imported modules");
        // One memory: no WASI preview1 adapter with a memory of its own.
        assert_eq!(needs.num_memories, 1, "memories of the builder");
        // A grown memory is shrunk back (an mprotect) at the next
        // instantiation in its pool slot; a build of examples/base peaks
        // under 2 MiB, so it starts with 4 MiB (build.rs).
        assert_eq!(runtime.initial_memory_bytes, 4 << 20, "initial memory of the builder");
    }

    #[tokio::test]
    async fn a_memory_limit_below_the_builders_initial_memory_is_refused_by_name() {
        let cache = tempfile::tempdir().unwrap();
        let runtime = BuilderRuntime::new(64 << 20, cache.path()).unwrap();
        let backend = Arc::new(FakeBackend::new("http://127.0.0.1:9"));
        let outbound = AllowList::new(Vec::<String>::new());
        let error = runtime
            .instantiate_back_to_back(&options(3 << 20), backend.clone(), outbound.clone(), 1)
            .await
            .unwrap_err();
        let text = format!("{error:#}");
        assert!(text.contains("--max-memory-mb to at least 4 MiB") && text.contains("3145728 bytes"), "{text}");
        // At the initial size itself the builder instantiates.
        let samples = runtime.instantiate_back_to_back(&options(4 << 20), backend, outbound, 2).await.unwrap();
        assert_eq!(samples.len(), 2);
    }
}
