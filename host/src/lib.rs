//! The snapsign CLI's library: the commands' own pieces, on top of the
//! runtime (`snapsign-runtime`, re-exported here under the same module
//! names), the dev stack (`snapsign-dev-stack`) and the third-party host
//! tooling (`snapsign-foreign-hosts`).
//!
//! - [`bench`]: the benchmarks;
//! - [`progress`]: `snapsign build`'s live progress, plain lines and `--json` events;
//! - from the runtime: [`engine`], [`guest`], [`outbound`], [`cancel`],
//!   [`sandbox_exec`], [`image_build`], [`pack`], [`signer`], [`serve`].

pub use snapsign_runtime::{cancel, engine, guest, image_build, outbound, pack, sandbox_exec, serve, signer};

pub mod bench;
pub mod demo;
pub mod progress;
pub mod templates;
