//! The snapsign runtime: a wasmtime embedding that runs the snapsign
//! components with limits. What an embedder depends on; the dev stack
//! (`snapsign-dev-stack`), the third-party host tooling (`snapsign-foreign-hosts`)
//! and the CLI (`snapsign-host`) sit on top.
//!
//! - [`engine`]: engine, pooling allocator, epoch deadlines, compiled cache;
//! - [`guest`]: one guest's WASI context and Store, shared by the runtimes;
//! - [`outbound`]: the outbound HTTP allow-list guests get;
//! - [`cancel`]: cancelling a build from outside its guest;
//! - [`sandbox_exec`]: the `sandbox-exec` capability and its backends;
//! - [`image_build`]: the builder component runner;
//! - [`pack`]: build contexts as tars, plain or gzipped on every core;
//! - [`signer`]: `serve-signer`, the signer component behind wasi:http;
//! - [`serve`]: the HTTP server loop the servers share.

pub mod cancel;
pub mod engine;
pub mod guest;
pub mod image_build;
pub mod outbound;
pub mod pack;
pub mod sandbox_exec;
pub mod serve;
pub mod signer;
