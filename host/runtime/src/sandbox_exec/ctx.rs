//! The capability's state (owned by the embedder), the view the generated
//! `Host` traits are implemented on, and `add_to_linker`, in the shape of
//! wasmtime-wasi's `WasiCtx` / `WasiCtxView` / `add_to_linker_async`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::{HasData, Linker, ResourceTable};

use super::backend::SandboxBackend;
use super::bindings::snapsign::components::{sandbox_exec, types};
pub use crate::cancel::Cancel;
use crate::outbound::AllowList;

/// What one guest may do through `sandbox-exec`, whatever the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxExecLimits {
    /// Sandboxes created and not yet deleted (a build uses one).
    pub max_sandboxes: usize,
    /// File writers open at once.
    pub max_open_writers: usize,
    /// Largest file `read-file` returns (metadata.json is a few KiB).
    pub max_read_bytes: u64,
    /// Largest `write-file` (spec.json with 10,000 part URLs is a few MiB).
    pub max_write_bytes: usize,
    /// Stdout `run-captured` keeps (diagnostics); more is cut.
    pub max_captured_bytes: usize,
}

impl Default for SandboxExecLimits {
    fn default() -> Self {
        SandboxExecLimits {
            max_sandboxes: 4,
            max_open_writers: 8,
            max_read_bytes: 64 << 20,
            max_write_bytes: 64 << 20,
            max_captured_bytes: 1 << 20,
        }
    }
}

/// Receives output lines of `run` calls made with `log-output`: (stream, line).
pub type OutputFn = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// Receives `upload-directory` progress: bytes sent, and the total once known (else 0).
pub type ProgressFn = Arc<dyn Fn(u64, u64) + Send + Sync>;

/// Whether `upload-directory` gzips what it sends (`snapsign build --compress-context`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Compression {
    /// Gzip for a sandbox on another machine, a plain tar for one on this
    /// machine ([`super::backend::SandboxBackend::on_this_machine`]).
    #[default]
    Auto,
    /// Always gzip.
    Always,
    /// Never: always a plain tar.
    Never,
}

impl std::str::FromStr for Compression {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Compression::Auto),
            "always" => Ok(Compression::Always),
            "never" => Ok(Compression::Never),
            other => Err(format!("{other:?} is not one of auto, always, never")),
        }
    }
}

impl Compression {
    /// The encoding for a sandbox that is (or is not) on this machine.
    pub fn encoding(self, on_this_machine: bool) -> crate::pack::Encoding {
        match (self, on_this_machine) {
            (Compression::Always, _) | (Compression::Auto, false) => crate::pack::Encoding::Gzip,
            (Compression::Never, _) | (Compression::Auto, true) => crate::pack::Encoding::Tar,
        }
    }
}

/// Per-guest state of `sandbox-exec`: the backend, the limits, the
/// outbound policy proxy endpoints are checked against, and what the guest
/// created. The embedder builds it when the build starts.
pub struct SandboxExecCtx {
    pub(super) backend: Arc<dyn SandboxBackend>,
    pub(super) limits: SandboxExecLimits,
    pub(super) outbound: AllowList,
    pub(super) on_output: Option<OutputFn>,
    pub(super) on_progress: Option<ProgressFn>,
    /// Directories `upload-directory` may pack: (the guest's path, the host's).
    pub(super) directories: Vec<(String, std::path::PathBuf)>,
    /// Whether `upload-directory` gzips.
    pub(super) compression: Compression,
    /// This guest's sandboxes, the ownership check's record. The
    /// [`Cancel`] keeps a second one for whoever cancels; it is not used
    /// for ownership, since an embedder may share one `Cancel` between builds.
    pub(super) sandboxes: HashSet<String>,
    pub(super) cancel: Cancel,
    pub(super) open_writers: usize,
    pub(super) logged_run_time: Duration,
}

impl SandboxExecCtx {
    /// Sandboxes from `backend`; proxy endpoints must be reachable under
    /// `outbound`, the policy the embedder gave the guest's wasi:http (the
    /// capability reads it, it never widens it).
    pub fn new(backend: Arc<dyn SandboxBackend>, outbound: AllowList) -> Self {
        SandboxExecCtx {
            backend,
            limits: SandboxExecLimits::default(),
            outbound,
            on_output: None,
            on_progress: None,
            directories: Vec::new(),
            compression: Compression::Auto,
            sandboxes: HashSet::new(),
            cancel: Cancel::new(),
            open_writers: 0,
            logged_run_time: Duration::ZERO,
        }
    }

    /// Replaces the default limits.
    pub fn with_limits(mut self, limits: SandboxExecLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Cancels through `cancel` (the embedder keeps a clone to call
    /// [`Cancel::cancel`] on).
    pub fn with_cancel(mut self, cancel: Cancel) -> Self {
        self.cancel = cancel;
        self
    }

    /// Where the output of `run` calls made with `log-output` goes.
    pub fn with_output(mut self, on_output: OutputFn) -> Self {
        self.on_output = Some(on_output);
        self
    }

    /// Where `upload-directory` reports its progress.
    pub fn with_progress(mut self, on_progress: ProgressFn) -> Self {
        self.on_progress = Some(on_progress);
        self
    }

    /// Lets `upload-directory` pack `host_dir`, which the guest names
    /// `guest_path` (the path it was preopened at); no other directory is packed.
    pub fn with_directory(mut self, guest_path: &str, host_dir: std::path::PathBuf) -> Self {
        self.directories.push((guest_path.trim_end_matches('/').to_owned(), host_dir));
        self
    }

    /// Whether `upload-directory` gzips ([`Compression::Auto`] unless set).
    pub fn with_compression(mut self, compression: Compression) -> Self {
        self.compression = compression;
        self
    }

    /// Time spent in `run` calls made with `log-output` (the builder itself).
    pub fn logged_run_time(&self) -> Duration {
        self.logged_run_time
    }

    /// Sandboxes the guest created and has not deleted.
    pub fn live_sandboxes(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.sandboxes.iter().cloned().collect();
        ids.sort();
        ids
    }
}

impl std::fmt::Debug for SandboxExecCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxExecCtx")
            .field("limits", &self.limits)
            .field("sandboxes", &self.sandboxes)
            .field("open_writers", &self.open_writers)
            .finish_non_exhaustive()
    }
}

/// A borrow of the capability's state and the guest's resource table; the
/// generated `Host` traits are implemented on it.
pub struct SandboxExecView<'a> {
    /// The capability's state.
    pub ctx: &'a mut SandboxExecCtx,
    /// The guest's resource table (file writers live there).
    pub table: &'a mut ResourceTable,
}

/// The [`HasData`] marker whose data is a [`SandboxExecView`].
pub struct SandboxExec;

impl HasData for SandboxExec {
    type Data<'a> = SandboxExecView<'a>;
}

/// Adds `snapsign:components/sandbox-exec` (and its `types`) to `linker`;
/// `getter` borrows the view out of the store's data.
pub fn add_to_linker<T: Send + 'static>(
    linker: &mut Linker<T>,
    getter: fn(&mut T) -> SandboxExecView<'_>,
) -> wasmtime::Result<()> {
    types::add_to_linker::<T, SandboxExec>(linker, getter)?;
    sandbox_exec::add_to_linker::<T, SandboxExec>(linker, getter)?;
    Ok(())
}
