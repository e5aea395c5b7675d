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
    /// Run the whole flow on the embedded dev stack: a base, a diff and a legacy build, each verified.
    Demo {
        /// Run sandbox processes unconfined when this process is not root (no confinement, no limits at all).
        #[arg(long)]
        allow_unconfined: bool,
    },
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
        /// Requests one instance serves before it is dropped; an instance only
        /// ever serves one caller (one Authorization header). 1 = a fresh
        /// instance per request.
        #[arg(long, default_value_t = signer::DEFAULT_MAX_INSTANCE_REUSE, value_parser = clap::value_parser!(u32).range(1..))]
        max_instance_reuse: u32,
        #[command(flatten)]
        serve: ServeArgs,
    },
    /// Build a sandbox image: prepare, builder sandbox, dataplane signing, build, complete.
    ///
    /// Exit codes: 0 registered, 1 build failed, 2 usage error, 3 credentials refused.
    Build {
        /// The Dockerfile.
        #[arg(long, short = 'f', default_value = "Dockerfile")]
        dockerfile: PathBuf,
        /// The build context directory.
        #[arg(long, default_value = ".")]
        context: PathBuf,
        /// Template name to register.
        #[arg(long)]
        name: String,
        /// Rootfs size, MiB [default: the parent's for diff builds, else 10240].
        #[arg(long)]
        disk_mb: Option<u64>,
        /// Builder sandbox CPUs [default: the platform's].
        #[arg(long)]
        builder_cpus: Option<f64>,
        /// Builder sandbox memory, MiB [default: the platform's].
        #[arg(long)]
        builder_memory_mb: Option<i64>,
        /// Builder sandbox disk, MiB [default: the platform's].
        #[arg(long)]
        builder_disk_mb: Option<u64>,
        /// Register the template as public.
        #[arg(long)]
        public: bool,
        /// Platform API URL.
        #[arg(long, env = "SNAPSIGN_API_URL")]
        api_url: String,
        /// Bearer token for the platform, lifecycle and proxy.
        #[arg(long, env = "SNAPSIGN_API_TOKEN", hide_env_values = true)]
        token: String,
        /// Sandbox namespace.
        #[arg(long, env = "SNAPSIGN_NAMESPACE", default_value = "default")]
        namespace: String,
        /// Extra host[:port] the build may reach besides the platform and its sandbox proxies (repeatable).
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
        /// Seconds to wait for the builder sandbox to run and answer.
        #[arg(long, default_value_t = 120)]
        sandbox_wait_secs: u64,
        /// Guest memory limit, MiB.
        #[arg(long, default_value_t = 256)]
        max_memory_mb: usize,
        /// Whole-build time limit, seconds.
        #[arg(long, default_value_t = 3600)]
        timeout_secs: u64,
        /// Print the registered template as JSON (only that) on stdout.
        #[arg(long)]
        json: bool,
        /// Where builder sandboxes come from: `proxy` (the platform's lifecycle API and
        /// sandbox proxy) or `local` (sandboxes on this machine: namespaces, limits, private network).
        #[arg(long, default_value = "proxy")]
        backend: String,
        /// local backend: the signer sign calls go to.
        #[arg(long, env = "SNAPSIGN_SIGNER_URL")]
        signer_url: Option<String>,
        /// local backend: bearer token for the signer (`snapsign token`).
        #[arg(long, env = "SNAPSIGN_SIGNER_TOKEN", hide_env_values = true)]
        signer_token: Option<String>,
        /// local backend: directory for sandboxes [default: a temporary directory].
        #[arg(long)]
        sandboxes_dir: Option<PathBuf>,
        /// local backend: run sandbox processes unconfined when this process is not root (no confinement).
        #[arg(long)]
        allow_unconfined: bool,
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
        /// Run sandbox processes unconfined when this process is not root (no confinement, no limits at all).
        #[arg(long)]
        allow_unconfined: bool,
        /// Abort the store's incomplete multipart uploads this many seconds after they began.
        #[arg(long, default_value_t = 86_400)]
        abort_incomplete_uploads_after_secs: u64,
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
    /// Deploy the signer component onto a distributed host.
    Deploy {
        #[command(subcommand)]
        target: snapsign_host::hosts::cli::Deploy,
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
        /// Abort incomplete multipart uploads this many seconds after they began
        /// (S3's AbortIncompleteMultipartUpload lifecycle rule).
        #[arg(long, default_value_t = 86_400)]
        abort_incomplete_uploads_after_secs: u64,
    },
}

/// What a server tolerates from its clients (see `serve::ServeLimits`).
#[derive(clap::Args)]
struct ServeArgs {
    /// Seconds a request's head may take to arrive (from the connection opening, or its first byte).
    #[arg(long, default_value_t = 10)]
    header_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle between requests.
    #[arg(long, default_value_t = 30)]
    idle_timeout_secs: u64,
    /// Seconds a request body may take to arrive, before the request takes an instance.
    #[arg(long, default_value_t = 10)]
    body_timeout_secs: u64,
    /// Open connections allowed from one client IP (behind a proxy every client shares one).
    #[arg(long, default_value_t = 256)]
    max_connections_per_ip: usize,
    /// Open connections allowed in total.
    #[arg(long, default_value_t = 1024)]
    max_connections: usize,
}

impl ServeArgs {
    fn limits(&self) -> snapsign_host::serve::ServeLimits {
        snapsign_host::serve::ServeLimits {
            header_read_timeout: Duration::from_secs(self.header_timeout_secs),
            idle_timeout: Duration::from_secs(self.idle_timeout_secs),
            body_read_timeout: Duration::from_secs(self.body_timeout_secs),
            max_connections_per_ip: self.max_connections_per_ip,
            max_connections: self.max_connections,
        }
    }
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
    /// get_blob throughput and latency on every host of the signer, native ceiling included.
    Hosts(snapsign_host::hosts::cli::BenchHosts),
    /// get_blob latency and throughput through serve-signer processes: this
    /// binary and, side by side, a --baseline binary (e.g. an older build).
    Serve {
        /// Another snapsign binary to measure in the same run, in alternating rounds.
        #[arg(long)]
        baseline: Option<PathBuf>,
        /// Rounds per server (each: a sequential latency run and a concurrent load run).
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// get_blob requests per run.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// Concurrent clients in the load runs.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
    },
    /// Orchestration overhead of demo builds, warm instantiation and cold start.
    Build {
        /// Builds to run (the first only warms the cache).
        #[arg(long, default_value_t = 11)]
        rounds: usize,
    },
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

async fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Command::Build {
            dockerfile,
            context,
            name,
            disk_mb,
            builder_cpus,
            builder_memory_mb,
            builder_disk_mb,
            public,
            api_url,
            token,
            namespace,
            allow_hosts,
            sandbox_wait_secs,
            max_memory_mb,
            timeout_secs,
            json,
            backend,
            signer_url,
            signer_token,
            sandboxes_dir,
            allow_unconfined,
        } => {
            let text = match std::fs::read_to_string(&dockerfile) {
                Ok(text) => text,
                Err(e) => {
                    eprintln!("error: cannot read the Dockerfile {}: {e}; pass --dockerfile", dockerfile.display());
                    return Ok(ExitCode::from(2));
                }
            };
            if !context.is_dir() {
                eprintln!("error: the build context {} is not a directory; pass --context", context.display());
                return Ok(ExitCode::from(2));
            }
            let options = snapsign_host::image_build::BuildOptions {
                api_url,
                token,
                namespace,
                name: name.clone(),
                dockerfile: text,
                context_dir: context,
                disk_mb,
                builder_cpus,
                builder_memory_mb,
                builder_disk_mb,
                public,
                sandbox_wait: Duration::from_secs(sandbox_wait_secs),
                allow_hosts,
                max_memory_bytes: max_memory_mb << 20,
                timeout: Duration::from_secs(timeout_secs),
                cache_dir: engine::default_cache_dir(),
            };
            let printer = snapsign_host::image_build::progress_printer();
            let (outcome, _) = match backend.as_str() {
                "proxy" => snapsign_host::image_build::run(&options, printer).await?,
                "local" => {
                    let (Some(url), Some(token)) = (signer_url, signer_token) else {
                        eprintln!(
                            "error: --backend local needs --signer-url and --signer-token (or SNAPSIGN_SIGNER_URL/TOKEN)"
                        );
                        return Ok(ExitCode::from(2));
                    };
                    let dir = sandboxes_dir.unwrap_or_else(|| {
                        std::env::temp_dir().join(format!("snapsign-sandboxes-{}", std::process::id()))
                    });
                    let builder =
                        std::env::current_exe().context("find this executable (installed as the sandbox builder)")?;
                    let result = snapsign_host::image_build::run_local(
                        &options,
                        &dir,
                        builder,
                        allow_unconfined,
                        &url,
                        &token,
                        printer,
                    )
                    .await;
                    let _ = std::fs::remove_dir(&dir);
                    result?
                }
                other => {
                    eprintln!("error: --backend '{other}' is not proxy or local");
                    return Ok(ExitCode::from(2));
                }
            };
            return Ok(match outcome {
                Ok(template) => {
                    if json {
                        println!("{}", serde_json::to_string_pretty(&template)?);
                    } else {
                        println!("Image '{name}' registered ({})", template["id"].as_str().unwrap_or("-"));
                    }
                    ExitCode::SUCCESS
                }
                Err(failure) => {
                    eprintln!("error: {failure}");
                    match failure {
                        snapsign_host::image_build::BuildFailure::Usage(_) => ExitCode::from(2),
                        snapsign_host::image_build::BuildFailure::Auth(_) => ExitCode::from(3),
                        snapsign_host::image_build::BuildFailure::Failed(_) => ExitCode::from(1),
                    }
                }
            });
        }
        Command::ServeSigner {
            listen,
            env,
            max_memory_mb,
            timeout_secs,
            max_concurrency,
            cache_dir,
            max_instance_reuse,
            serve,
        } => {
            let config = signer::SignerServerConfig {
                listen,
                env: snapsign_host::signer::guest_env(&env)?,
                limits: EngineLimits { max_concurrency, max_memory_bytes: max_memory_mb << 20 },
                request_timeout: Duration::from_secs(timeout_secs),
                cache_dir: cache_dir.unwrap_or_else(engine::default_cache_dir),
                max_instance_reuse,
            };
            let (server, _host) = signer::start_with(&config, serve.limits()).await?;
            println!("signer listening on {}", server.url());
            wait_for_stop().await;
            tracing::info!("stopping the signer");
            server.shutdown().await;
        }
        Command::Demo { allow_unconfined } => {
            let builder = std::env::current_exe().context("find this executable (installed as the sandbox builder)")?;
            snapsign_host::demo::run(builder, allow_unconfined).await?
        }
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
            abort_incomplete_uploads_after_secs,
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
            config.abort_incomplete_uploads_after = Duration::from_secs(abort_incomplete_uploads_after_secs);
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
            println!("  admin token   {}   (operator only: PUT /_snapsign/faults)", stack.admin_token);
            println!();
            println!(
                "  export SNAPSIGN_API_URL={} SNAPSIGN_NAMESPACE={} SNAPSIGN_API_TOKEN={}",
                stack.api_url(),
                stack.namespace,
                stack.token
            );
            for build in &stack.recovered.builds {
                println!(
                    "  recovered     {build} was left prepared by a stack that died: marked failed, its upload aborted"
                );
            }
            println!("Ctrl-C stops the stack and deletes its sandboxes.");
            wait_for_stop().await;
            stack.shutdown().await;
        }
        Command::Token { namespace, ttl_secs, key } => {
            if key.len() < snapsign::token::MIN_KEY_LEN {
                bail!("the token key is {} bytes; use at least {}", key.len(), snapsign::token::MIN_KEY_LEN);
            }
            if !(1..=366 * 24 * 3600).contains(&ttl_secs) {
                bail!("--ttl-secs {ttl_secs} is out of range; use 1..={}", 366 * 24 * 3600);
            }
            if ttl_secs > snapsign::token::DEFAULT_MAX_TTL_SECS {
                eprintln!(
                    "warning: a signer refuses tokens that live longer than SNAPSIGN_TOKEN_MAX_TTL_SECS ({} s unless set)",
                    snapsign::token::DEFAULT_MAX_TTL_SECS
                );
            }
            let expires = jiff::Timestamp::now().as_second() + ttl_secs;
            let token = snapsign::token::mint(key.as_bytes(), &namespace, expires).context("mint the token")?;
            println!("{token}");
        }
        Command::Bench { what: BenchWhat::Sign { rounds, requests, concurrency } } => {
            snapsign_host::bench::sign(rounds, requests, concurrency).await?;
        }
        Command::Bench { what: BenchWhat::Hosts(args) } => snapsign_host::hosts::cli::bench_hosts(args).await?,
        Command::Deploy { target } => snapsign_host::hosts::cli::deploy(target).await?,
        Command::Bench { what: BenchWhat::Serve { baseline, rounds, requests, concurrency } } => {
            let this = std::env::current_exe().context("find this executable")?;
            snapsign_host::bench::serve(this, baseline, rounds, requests, concurrency).await?;
        }
        Command::Bench { what: BenchWhat::Build { rounds } } => {
            let builder = std::env::current_exe().context("find this executable (installed as the sandbox builder)")?;
            snapsign_host::bench::build(rounds, builder).await?;
        }
        Command::Store {
            dir,
            listen,
            access_key_id,
            secret_access_key,
            buckets,
            abort_incomplete_uploads_after_secs,
        } => {
            let config = store::StoreConfig {
                root: dir,
                listen,
                access_key_id,
                secret_access_key,
                buckets,
                faults: Default::default(),
                abort_incomplete_after: Duration::from_secs(abort_incomplete_uploads_after_secs),
            };
            let server = store::start(&config).await?;
            println!("store listening on {}", server.url());
            wait_for_stop().await;
            server.shutdown().await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    // Installed in sandboxes as /usr/local/bin/tl-rootfs-build: be the reference builder.
    let argv0 = std::env::args().next().unwrap_or_default();
    if std::path::Path::new(&argv0).file_name().is_some_and(|n| n == "tl-rootfs-build") {
        return snapsign_rootfs_builder::run_cli(std::env::args().skip(1).collect());
    }
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
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
