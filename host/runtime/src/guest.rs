//! One guest's context and Store, shared by the component runtimes (the
//! builder and the signer): WASI, wasi:http behind the
//! outbound allow-list, one resource table, store limits, the epoch
//! deadline. What a runtime adds (its capabilities) rides in `data`.

use std::time::Duration;

use anyhow::{Context, Result};
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::engine::{self, WasmtimeResultExt};
use crate::outbound::AllowList;

/// A guest's Store data: the WASI parts every component gets, plus `data`.
pub struct GuestState<D> {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    /// The guest's resources (WASI's and the runtime's capabilities').
    pub table: ResourceTable,
    outbound: AllowList,
    limits: PeakLimits,
    /// The runtime's own state (its capabilities).
    pub data: D,
}

impl<D> GuestState<D> {
    /// A guest with `wasi`, outbound HTTP limited to `outbound`, and `limits`.
    pub fn new(wasi: WasiCtx, outbound: AllowList, limits: StoreLimits, data: D) -> Self {
        let limits = PeakLimits { inner: limits, peak_memory: 0 };
        GuestState { wasi, http: WasiHttpCtx::new(), table: ResourceTable::new(), outbound, limits, data }
    }

    /// The largest linear memory the guest grew to, bytes (what it held at its peak).
    pub fn peak_memory(&self) -> usize {
        self.limits.peak_memory
    }
}

/// The guest's limits, remembering the largest memory granted.
struct PeakLimits {
    inner: StoreLimits,
    peak_memory: usize,
}

impl wasmtime::ResourceLimiter for PeakLimits {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        let granted = self.inner.memory_growing(current, desired, maximum)?;
        if granted {
            self.peak_memory = self.peak_memory.max(desired);
        }
        Ok(granted)
    }

    fn memory_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.memory_grow_failed(error)
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        self.inner.table_growing(current, desired, maximum)
    }

    fn table_grow_failed(&mut self, error: wasmtime::Error) -> wasmtime::Result<()> {
        self.inner.table_grow_failed(error)
    }

    fn instances(&self) -> usize {
        self.inner.instances()
    }

    fn tables(&self) -> usize {
        self.inner.tables()
    }

    fn memories(&self) -> usize {
        self.inner.memories()
    }
}

impl<D: Send> WasiView for GuestState<D> {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl<D: Send> WasiHttpView for GuestState<D> {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// Adds WASI p2 and outgoing wasi:http to `linker`.
pub fn add_wasi_to_linker<D: Send + 'static>(linker: &mut Linker<GuestState<D>>) -> Result<()> {
    wasmtime_wasi::p2::add_to_linker_async(linker).anyhow().context("link WASI")?;
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker).anyhow().context("link WASI HTTP")?;
    Ok(())
}

/// A Store for one guest: its limits enforced, trapping once `timeout` of epochs passed.
pub fn store<D: Send + 'static>(engine: &Engine, state: GuestState<D>, timeout: Duration) -> Store<GuestState<D>> {
    let mut store = Store::new(engine, state);
    store.limiter(|s| &mut s.limits);
    store.set_epoch_deadline(engine::deadline_ticks(timeout));
    store.epoch_deadline_trap();
    store
}
