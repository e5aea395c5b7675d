//! The snapsign host: a wasmtime embedding that runs the snapsign
//! components with limits, and the embedded servers of the dev stack.
//!
//! - [`engine`]: engine, pooling allocator, epoch deadlines, compiled cache;
//! - [`guest`]: one guest's WASI context and Store, shared by the runtimes;
//! - [`outbound`]: the outbound HTTP allow-list guests get;
//! - [`cancel`]: cancelling a build from outside its guest;
//! - [`sandbox_exec`]: the `sandbox-exec` capability and its backends;
//! - [`image_build`]: the builder component runner;
//! - [`pack`]: build contexts as gzip tars, compressed on every core;
//! - [`signer`]: `serve-signer`, the signer component behind wasi:http;
//! - [`store`]: the embedded S3-compatible store;
//! - [`serve`]: the HTTP server loop they share;
//! - [`hosts`]: the signer on third-party hosts (wasmtime serve, jco, wasmCloud);
//! - [`registry`]: pulling base images over the OCI distribution API into a cache.

pub mod bench;
pub mod cancel;
pub mod demo;
pub mod dev;
pub mod engine;
pub mod guest;
pub mod hosts;
pub mod image_build;
pub mod outbound;
pub mod pack;
pub mod registry;
pub mod sandbox_exec;
pub mod serve;
pub mod signer;
pub mod store;
pub mod templates;
