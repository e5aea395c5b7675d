//! `snapsign:components/sandbox-exec`, the capability the host lends the
//! builder component, in the shape of wasmtime's capability crates: a
//! private bindgen ([`bindings`]), a state type the embedder owns
//! ([`SandboxExecCtx`]), a view that implements the generated `Host` traits
//! ([`SandboxExecView`], in `host`), and [`add_to_linker`]. Backends sit
//! behind [`SandboxBackend`]: [`proxy`] (a remote platform), [`local`]
//! (sandboxes on this machine), `fake` (in memory, built for unit tests only).

pub mod backend;
pub(crate) mod bindings;
mod ctx;
#[cfg(test)]
pub mod fake;
mod host;
pub mod local;
pub mod proxy;
#[cfg(test)]
mod tests;
mod upload;

pub use backend::{Created, Endpoint, Exit, FileSink, LineSink, Process, Resources, SandboxBackend, SandboxError};
pub use ctx::{
    Cancel, Compression, OutputFn, SandboxExec, SandboxExecCtx, SandboxExecLimits, SandboxExecView, add_to_linker,
};
