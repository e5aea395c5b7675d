//! Embedding the runtime without the dev stack: serve the signer component
//! from your own program, as `snapsign serve-signer` does.
//!
//! ```sh
//! export SNAPSIGN_BUCKET=snapshots SNAPSIGN_S3_ENDPOINT=http://127.0.0.1:9000 SNAPSIGN_S3_ADDRESSING=path \
//!   SNAPSIGN_ACCESS_KEY_ID=… SNAPSIGN_SECRET_ACCESS_KEY=… SNAPSIGN_TOKEN_KEY=…
//! cargo run -p snapsign-runtime --example embed
//! ```
//!
//! It depends on `snapsign-runtime` alone: no emulator, store or CLI.

use std::time::Duration;

use snapsign_runtime::engine::{self, EngineLimits};
use snapsign_runtime::signer::{self, DEFAULT_MAX_INSTANCE_REUSE, SignerServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // The component reads its configuration (`SNAPSIGN_*`, docs/signer.md) from the environment it is given.
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("SNAPSIGN_")).collect();
    let config = SignerServerConfig {
        listen: "127.0.0.1:0".parse()?,
        env,
        limits: EngineLimits { max_concurrency: 8, ..EngineLimits::default() },
        request_timeout: Duration::from_secs(30),
        cache_dir: engine::default_cache_dir(),
        max_instance_reuse: DEFAULT_MAX_INSTANCE_REUSE,
        preinit: true,
    };
    // Refuses a configuration the component would refuse, naming the variable.
    let (server, _host) = signer::start(&config).await?;
    println!("signer listening on {}{}; Ctrl-C stops it", server.url(), signer::SIGN_PATH);
    tokio::signal::ctrl_c().await?;
    server.shutdown().await;
    Ok(())
}
