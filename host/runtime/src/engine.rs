//! The wasmtime engine every guest runs on: pooling allocator, epoch
//! interruption, and an on-disk cache of compiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, Module, PoolingAllocationConfig};

/// How often the epoch advances; deadlines are counted in these ticks.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Bytes of each freed table slot that are zeroed in place and stay
/// resident, instead of being returned to the kernel: enough for the tables
/// of our components (a few hundred entries each). Returning them costs an
/// `madvise` (a TLB shootdown across the host's threads) when an instance is
/// dropped and a page fault when the next one fills its table.
pub const TABLE_KEEP_RESIDENT: usize = 16 << 10;

/// Bytes of each freed linear memory reset in place (to zero or the
/// component's data) and kept resident, instead of `madvise`: the next
/// instance in the slot starts without page faults, and no TLB shootdown
/// crosses the host's threads. With the kernel's `PAGEMAP_SCAN` (Linux 6.7+,
/// used where present) only the pages the instance wrote are reset;
/// without it, the lowest `MEMORY_KEEP_RESIDENT` bytes are.
pub const MEMORY_KEEP_RESIDENT: usize = 4 << 20;

/// Limits that size the engine's instance pool.
#[derive(Debug, Clone, Copy)]
pub struct EngineLimits {
    /// Instances that may run at once.
    pub max_concurrency: u32,
    /// Linear memory of one instance, bytes.
    pub max_memory_bytes: usize,
}

impl Default for EngineLimits {
    fn default() -> Self {
        EngineLimits { max_concurrency: 32, max_memory_bytes: 64 << 20 }
    }
}

/// Builds the engine and starts its epoch ticker (which ends with the engine).
pub fn engine(limits: EngineLimits) -> Result<Engine> {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(limits.max_concurrency)
        .total_core_instances(limits.max_concurrency * 4)
        .total_memories(limits.max_concurrency * 2)
        .total_tables(limits.max_concurrency * 4)
        .total_stacks(limits.max_concurrency)
        .max_memory_size(limits.max_memory_bytes)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .linear_memory_keep_resident(MEMORY_KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto);
    let mut config = Config::new();
    config.epoch_interruption(true).allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    // `SNAPSIGN_PROFILE=perfmap` writes /tmp/perf-<pid>.map, so `perf report`
    // names guest functions (docs/figures.md, "Profiling").
    if std::env::var_os("SNAPSIGN_PROFILE").is_some_and(|v| v == "perfmap") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    let engine = Engine::new(&config).anyhow().context("create the wasmtime engine")?;
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("snapsign-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                std::thread::sleep(EPOCH_TICK);
            }
        })
        .context("start the epoch ticker")?;
    Ok(engine)
}

/// Epoch ticks in `timeout` (at least one).
pub fn deadline_ticks(timeout: Duration) -> u64 {
    (timeout.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64
}

/// Where compiled components are cached: `$SNAPSIGN_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/snapsign`, else `~/.cache/snapsign`, else a temp dir.
pub fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SNAPSIGN_CACHE_DIR") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&dir).join("snapsign");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return Path::new(&home).join(".cache").join("snapsign");
    }
    std::env::temp_dir().join("snapsign-cache")
}

/// How a component was obtained, for logs and benchmarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Compiled now (and written to the cache).
    Compiled(Duration),
    /// Read from the cache.
    Cached(Duration),
}

/// Loads `wasm` compiled for `engine`, from `cache_dir` when it holds a
/// compatible artifact, else compiling it and caching the result.
pub fn load_component(engine: &Engine, name: &str, wasm: &[u8], cache_dir: &Path) -> Result<(Component, Loaded)> {
    load_cached(engine, name, wasm, cache_dir)
}

/// [`load_component`] for a core module.
pub fn load_module(engine: &Engine, name: &str, wasm: &[u8], cache_dir: &Path) -> Result<(Module, Loaded)> {
    load_cached(engine, name, wasm, cache_dir)
}

/// What the compiled cache holds: components and core modules.
trait Compiled: Sized {
    /// "component" or "module", for messages.
    const KIND: &str;
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self>;
    /// # Safety
    /// `file` must be an artifact `serialize` wrote for a compatible engine.
    unsafe fn deserialize_file(engine: &Engine, file: &Path) -> wasmtime::Result<Self>;
    fn serialize(&self) -> wasmtime::Result<Vec<u8>>;
}

impl Compiled for Component {
    const KIND: &str = "component";
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Component::new(engine, wasm)
    }
    unsafe fn deserialize_file(engine: &Engine, file: &Path) -> wasmtime::Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe { Component::deserialize_file(engine, file) }
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Component::serialize(self)
    }
}

impl Compiled for Module {
    const KIND: &str = "module";
    fn compile(engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Self> {
        Module::new(engine, wasm)
    }
    unsafe fn deserialize_file(engine: &Engine, file: &Path) -> wasmtime::Result<Self> {
        // SAFETY: forwarded from the caller.
        unsafe { Module::deserialize_file(engine, file) }
    }
    fn serialize(&self) -> wasmtime::Result<Vec<u8>> {
        Module::serialize(self)
    }
}

fn load_cached<T: Compiled>(engine: &Engine, name: &str, wasm: &[u8], cache_dir: &Path) -> Result<(T, Loaded)> {
    let started = Instant::now();
    let mut compat = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut compat);
    let digest = Sha256::digest(wasm);
    let file = cache_dir.join(format!("{name}-{}-{:016x}.cwasm", hex::encode(&digest[..12]), compat.finish()));
    if file.exists() {
        // SAFETY: the file is an artifact this host serialized into its own
        // cache directory, named by the hash of the wasm and of the engine's
        // settings; wasmtime checks the header and version on load.
        match unsafe { T::deserialize_file(engine, &file) } {
            Ok(compiled) => return Ok((compiled, Loaded::Cached(started.elapsed()))),
            Err(e) => tracing::warn!(path = %file.display(), "discarding unusable compiled cache entry: {e:#}"),
        }
    }
    let compiled = T::compile(engine, wasm).anyhow().with_context(|| format!("compile the {name} {}", T::KIND))?;
    let took = started.elapsed();
    if let Err(e) = write_cache(&compiled, &file) {
        tracing::warn!(path = %file.display(), "cannot cache the compiled {name} {}: {e:#}", T::KIND);
    }
    Ok((compiled, Loaded::Compiled(took)))
}

fn write_cache<T: Compiled>(compiled: &T, file: &Path) -> Result<()> {
    let dir = file.parent().context("cache path has a parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("create cache dir {}", dir.display()))?;
    let bytes = compiled.serialize().anyhow().with_context(|| format!("serialize the compiled {}", T::KIND))?;
    // One name per writer: two threads of a process may write the same entry.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = file.with_extension(format!("tmp{}-{n}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, file).with_context(|| format!("rename into {}", file.display()))?;
    Ok(())
}

/// Turns wasmtime's own error type into `anyhow`, so shells can add context.
pub trait WasmtimeResultExt<T> {
    /// The same result with an `anyhow::Error`.
    fn anyhow(self) -> Result<T>;
}

impl<T> WasmtimeResultExt<T> for wasmtime::Result<T> {
    fn anyhow(self) -> Result<T> {
        self.map_err(anyhow::Error::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::{self, GuestState};
    use crate::outbound::AllowList;

    /// A wasi:http component with tables of its own (the reuse probe of the signer's tests).
    const PROBE_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_REUSE_PROBE_WASM"));

    #[tokio::test]
    async fn a_dropped_instance_leaves_its_tables_zeroed_and_resident() {
        let cache = tempfile::tempdir().unwrap();
        let engine = engine(EngineLimits { max_concurrency: 1, max_memory_bytes: 16 << 20 }).unwrap();
        let (component, _) = load_component(&engine, "probe", PROBE_WASM, cache.path()).unwrap();
        let tables = component.resources_required().expect("no imported modules").num_tables as usize;
        assert!(tables > 0, "the probe has no table to reset");
        let mut linker = wasmtime::component::Linker::new(&engine);
        guest::add_wasi_to_linker(&mut linker).unwrap();
        let pre = linker.instantiate_pre(&component).unwrap();
        let metrics = engine.pooling_allocator_metrics().expect("the engine pools instances");
        for round in 0..2 {
            let state = GuestState::new(
                wasmtime_wasi::WasiCtx::builder().build(),
                AllowList::new(Vec::<String>::new()),
                wasmtime::StoreLimitsBuilder::new().build(),
                (),
            );
            let mut store = guest::store(&engine, state, Duration::from_secs(5));
            pre.instantiate_async(&mut store).await.unwrap();
            assert_eq!(metrics.tables(), tables, "round {round}: tables in use");
            drop(store);
            assert_eq!(metrics.tables(), 0, "round {round}: tables still in use after the drop");
            let resident = metrics.unused_table_bytes_resident();
            assert!(
                resident > 0 && resident <= tables * TABLE_KEEP_RESIDENT,
                "round {round}: {resident} bytes of freed tables resident"
            );
        }
    }
}
