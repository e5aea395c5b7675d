//! The embedded dev stack: the platform emulator (platform-api, sandbox
//! lifecycle, sandbox proxy) over local sandboxes, with the store and the
//! signer, all on loopback in one process.

pub mod emulator;
pub mod faults;
pub mod http;
pub mod images;
pub mod lifecycle;
pub mod platform;
pub mod proxy;
pub mod recover;
pub mod shape;
pub mod stack;
pub mod state;

pub use emulator::Emulator;
pub use faults::Faults;
pub use recover::Recovered;
pub use shape::PrepareShape;
pub use stack::{DevConfig, DevStack};
