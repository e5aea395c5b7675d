//! The embedded dev stack: the platform emulator (platform-api, sandbox
//! lifecycle, sandbox proxy) over local sandboxes, with the store and the
//! signer, all on loopback in one process.
//!
//! - [`stack`]: the whole stack as `snapsign dev` runs it;
//! - [`emulator`] and its handlers: the platform's three APIs;
//! - [`store`]: the embedded S3-compatible store;
//! - [`registry`]: pulling base images over the OCI distribution API into a cache;
//! - [`fixture`]: the store and signer settings the benchmarks share.

mod access;
pub mod emulator;
pub mod faults;
pub mod fixture;
pub mod http;
pub mod images;
pub mod lifecycle;
pub mod platform;
pub mod proxy;
pub mod recover;
pub mod registry;
pub mod shape;
mod shared;
pub mod stack;
pub mod state;
pub mod store;

pub use emulator::Emulator;
pub use faults::Faults;
pub use recover::Recovered;
pub use shape::PrepareShape;
pub use stack::{DevConfig, DevStack};
