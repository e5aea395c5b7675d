//! `snapsign`: the host CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use snapsign_host::engine::{self, EngineLimits};
use snapsign_host::{signer, store};

#[derive(Parser)]
#[command(name = "snapsign", version, about = "Dataplane-signed sandbox image builds as WASI components")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole flow on the embedded stack (store + signer) and check the result.
    Demo,
    /// Serve the signer component (POST /api/v1/blob/sign) over HTTP.
    ///
    /// The guest's configuration is every SNAPSIGN_* variable of this
    /// process's environment, overridden by --env (see the README).
    ServeSigner {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:8787")]
        listen: SocketAddr,
        /// Extra guest environment, KEY=VALUE (repeatable).
        #[arg(long = "env", value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Linear memory limit of one request's instance, MiB.
        #[arg(long, default_value_t = 64)]
        max_memory_mb: usize,
        /// Wall-clock limit of one request, seconds.
        #[arg(long, default_value_t = 30)]
        timeout_secs: u64,
        /// Requests served at once (size of the instance pool).
        #[arg(long, default_value_t = 32)]
        max_concurrency: u32,
        /// Compiled-component cache [default: $SNAPSIGN_CACHE_DIR, ~/.cache/snapsign].
        #[arg(long)]
        cache_dir: Option<PathBuf>,
    },
    /// Run the dev stack: store, signer, platform emulator and local sandboxes on loopback.
    Dev {
        /// Store data, state database and secrets (kept across restarts)
        /// [default: $XDG_DATA_HOME/snapsign/dev or ~/.local/share/snapsign/dev].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Emulator address (platform-api, lifecycle, sandbox proxy).
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Store address.
        #[arg(long, default_value = "127.0.0.1:0")]
        store_listen: SocketAddr,
        /// Signer address.
        #[arg(long, default_value = "127.0.0.1:0")]
        signer_listen: SocketAddr,
        /// Namespace of the printed token.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Default prepare answer shape: new, legacy or both (per request: header X-Snapsign-Prepare-Shape).
        #[arg(long, default_value = "new")]
        prepare_shape: String,
        /// How long a new sandbox stays pending (answering 502 PROXY_ERROR), milliseconds.
        #[arg(long, default_value_t = 1000)]
        pending_ms: u64,
        /// Fault switches as JSON, e.g. '{"sign_fail":true}' (see the README).
        #[arg(long)]
        faults: Option<String>,
        /// Run sandbox processes without bubblewrap when it is missing (no confinement at all).
        #[arg(long)]
        allow_unconfined: bool,
    },
    /// Mint a bearer token for a namespace, signed with SNAPSIGN_TOKEN_KEY.
    Token {
        /// The namespace the token grants.
        #[arg(long)]
        namespace: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
        /// The signing key (at least 32 bytes).
        #[arg(long, env = "SNAPSIGN_TOKEN_KEY", hide_env_values = true)]
        key: String,
    },
    /// Print benchmark figures (run with --release).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Serve the embedded S3-compatible store (SigV4 checked, multipart uploads).
    Store {
        /// Data directory (one sub-directory per bucket).
        #[arg(long)]
        dir: PathBuf,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9000")]
        listen: SocketAddr,
        /// Access key id the store accepts.
        #[arg(long, env = "SNAPSIGN_ACCESS_KEY_ID")]
        access_key_id: String,
        /// Its secret.
        #[arg(long, env = "SNAPSIGN_SECRET_ACCESS_KEY", hide_env_values = true)]
        secret_access_key: String,
        /// Buckets to create (repeatable).
        #[arg(long = "bucket")]
        buckets: Vec<String>,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Signing cost natively and in the component; serve-signer latency and throughput.
    Sign {
        /// Rounds of the 10,000-part signing.
        #[arg(long, default_value_t = 30)]
        rounds: usize,
        /// get_blob requests for latency and for the load run.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Concurrent clients in the load run.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
}

fn parse_env(pairs: &[String]) -> Result<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with("SNAPSIGN_")).collect();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--env '{pair}' is not KEY=VALUE");
        };
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }
    Ok(env)
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("snapsign").join("dev")
}

async fn wait_for_stop() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::ServeSigner { listen, env, max_memory_mb, timeout_secs, max_concurrency, cache_dir } => {
            let config = signer::SignerServerConfig {
                listen,
                env: parse_env(&env)?,
                limits: EngineLimits { max_concurrency, max_memory_bytes: max_memory_mb << 20 },
                request_timeout: Duration::from_secs(timeout_secs),
                cache_dir: cache_dir.unwrap_or_else(engine::default_cache_dir),
            };
            let (server, _host) = signer::start(&config).await?;
            println!("signer listening on {}", server.url());
            wait_for_stop().await;
            tracing::info!("stopping the signer");
            server.shutdown().await;
        }
        Command::Demo => snapsign_host::demo::run().await?,
        Command::Dev {
            data_dir,
            listen,
            store_listen,
            signer_listen,
            namespace,
            prepare_shape,
            pending_ms,
            faults,
            allow_unconfined,
        } => {
            use snapsign_host::dev::{DevConfig, DevStack, Faults, PrepareShape};
            let data_dir = data_dir.unwrap_or_else(default_data_dir);
            let builder = std::env::current_exe().context("find this executable (installed as the sandbox builder)")?;
            let mut config = DevConfig::new(data_dir, builder);
            config.listen = listen;
            config.store_listen = store_listen;
            config.signer_listen = signer_listen;
            config.namespace = namespace;
            config.shape = PrepareShape::parse(&prepare_shape).map_err(anyhow::Error::msg)?;
            config.pending = Duration::from_millis(pending_ms);
            config.allow_unconfined = allow_unconfined;
            if let Some(json) = faults {
                config.faults = serde_json::from_str::<Faults>(&json).context("parse --faults")?;
            }
            let stack = DevStack::start(&config).await?;
            println!("snapsign dev stack (data in {})", config.data_dir.display());
            println!("  platform api  {}   (lifecycle and sandbox proxy on the same address)", stack.api_url());
            println!("  store         {}   (bucket snapshots)", stack.store.url());
            println!("  signer        {}/api/v1/blob/sign", stack.signer.url());
            println!("  namespace     {}", stack.namespace);
            println!("  token         {}", stack.token);
            println!();
            println!(
                "  export SNAPSIGN_API_URL={} SNAPSIGN_NAMESPACE={} SNAPSIGN_API_TOKEN={}",
                stack.api_url(),
                stack.namespace,
                stack.token
            );
            println!("Ctrl-C stops the stack and deletes its sandboxes.");
            wait_for_stop().await;
            stack.shutdown().await;
        }
        Command::Token { namespace, ttl_secs, key } => {
            if key.len() < snapsign::token::MIN_KEY_LEN {
                bail!("the token key is {} bytes; use at least {}", key.len(), snapsign::token::MIN_KEY_LEN);
            }
            let expires = jiff::Timestamp::now().as_second() + ttl_secs;
            let token = snapsign::token::mint(key.as_bytes(), &namespace, expires).context("mint the token")?;
            println!("{token}");
        }
        Command::Bench { what: BenchWhat::Sign { rounds, requests, concurrency } } => {
            snapsign_host::bench::sign(rounds, requests, concurrency).await?;
        }
        Command::Store { dir, listen, access_key_id, secret_access_key, buckets } => {
            let config = store::StoreConfig {
                root: dir,
                listen,
                access_key_id,
                secret_access_key,
                buckets,
                faults: Default::default(),
            };
            let server = store::start(&config).await?;
            println!("store listening on {}", server.url());
            wait_for_stop().await;
            server.shutdown().await;
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Servers log requests by default; one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::ServeSigner { .. } | Command::Store { .. } | Command::Dev { .. } => {
            "snapsign=info,snapsign_host=info,warn"
        }
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
