//! snapsign's pure core: SigV4 presigning, caller tokens and the signer's
//! policy. No I/O and no clock: callers pass responses and `now` in. The
//! components (`src/bin/`) are thin shells around it, and the host uses it
//! natively (token minting, configuration checks, benchmarks). [`wire`] is
//! the one model of what they exchange.

pub mod image_build;
pub mod presign;
pub mod signer;
pub mod token;
pub mod wire;
