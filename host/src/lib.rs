//! The snapsign host: the `snapsign` CLI, the embedded dev stack and the
//! third-party host tooling, on top of the runtime (`snapsign-runtime`,
//! re-exported here under the same module names).
//!
//! - [`dev`]: the dev stack (platform emulator, local sandboxes, state);
//! - [`store`]: the embedded S3-compatible store;
//! - [`registry`]: pulling base images over the OCI distribution API into a cache;
//! - [`hosts`]: the signer on third-party hosts (wasmtime serve, jco, wasmCloud);
//! - [`bench`]: the benchmarks;
//! - [`progress`]: `snapsign build`'s live progress, plain lines and `--json` events;
//! - from the runtime: [`engine`], [`guest`], [`outbound`], [`cancel`],
//!   [`sandbox_exec`], [`image_build`], [`pack`], [`signer`], [`serve`].

pub use snapsign_runtime::{cancel, engine, guest, image_build, outbound, pack, sandbox_exec, serve, signer};

pub mod bench;
pub mod demo;
pub mod dev;
pub mod hosts;
pub mod progress;
pub mod registry;
pub mod store;
pub mod templates;
