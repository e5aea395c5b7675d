//! The command-line faces of this crate: `snapsign deploy wasmcloud` and
//! `snapsign bench hosts` (main.rs only dispatches to them).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use clap::{Args, Subcommand};

use super::wasmcloud::{self, DeployOptions};
use super::{Tools, launch};

/// Where to deploy the signer.
#[derive(Debug, Subcommand)]
pub enum Deploy {
    /// Place the signer on N hosts of a wasmCloud lattice through its NATS workload API.
    ///
    /// The configuration is every SNAPSIGN_* variable of this process's
    /// environment, overridden by --env; the store (SNAPSIGN_S3_ENDPOINT) is
    /// the workload's allowed outbound host. Joins the lattice at --nats, or
    /// with --local-lattice starts one on 127.0.0.1 (nats-server, an OCI
    /// registry and --hosts `wash host`s) and keeps it until Ctrl-C.
    Wasmcloud(DeployArgs),
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// NATS of the lattice, e.g. nats://127.0.0.1:4222 (not with --local-lattice).
    #[arg(long, required_unless_present = "local_lattice")]
    nats: Option<String>,
    /// OCI registry the hosts pull from, host:port over plain HTTP (not with --local-lattice).
    #[arg(long, required_unless_present = "local_lattice")]
    registry: Option<String>,
    /// Start nats-server, a registry and --hosts `wash host`s on 127.0.0.1, deploy, and serve until Ctrl-C.
    #[arg(long, conflicts_with_all = ["nats", "registry", "host_ids"])]
    local_lattice: bool,
    /// Number of hosts to place the signer on.
    #[arg(long, default_value_t = 1)]
    hosts: usize,
    /// Use these hosts (by id) instead of waiting for heartbeats (repeatable).
    #[arg(long = "host-id")]
    host_ids: Vec<String>,
    /// Extra guest environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Another host:port the signer may call besides the store (repeatable).
    #[arg(long = "allow-host")]
    allow_hosts: Vec<String>,
    /// Host header that routes requests to the signer.
    #[arg(long, default_value = "signer.local")]
    http_host: String,
    /// Workload ids are PREFIX-1, PREFIX-2, ...
    #[arg(long, default_value = "snapsign-signer")]
    workload_prefix: String,
    /// Seconds to wait for host heartbeats (hosts send one every 15 s).
    #[arg(long, default_value_t = 17)]
    discover_secs: u64,
    /// Print the deployment as JSON on stdout (only that).
    #[arg(long)]
    json: bool,
    /// Where the pinned tools are installed [default: $SNAPSIGN_HOSTS_CACHE, ~/.cache/snapsign/hosts].
    #[arg(long)]
    tools_dir: Option<PathBuf>,
}

/// `snapsign bench hosts`.
#[derive(Debug, Args)]
pub struct BenchHosts {
    /// Seconds of load per host.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Seconds of warm-up per host before measuring.
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Where the pinned tools are installed [default: $SNAPSIGN_HOSTS_CACHE, ~/.cache/snapsign/hosts].
    #[arg(long)]
    tools_dir: Option<PathBuf>,
    /// Rounds over all hosts (each host measured once per round, in turn; all stay up between rounds).
    #[arg(long, default_value_t = 1)]
    rounds: usize,
    /// Measure only these hosts (comma-separated) after the native ceiling, which always runs [default: all].
    #[arg(long, value_delimiter = ',')]
    only: Vec<super::load::BenchHost>,
    /// Distinct caller tokens, sent in turn (1: one tenant; 1000: many
    /// tenants, each signing now and then); several (`1,1000`) measure each in turn.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    callers: Vec<usize>,
}

/// Runs `snapsign bench hosts`.
pub async fn bench_hosts(args: BenchHosts) -> Result<()> {
    if args.seconds <= 0.0 || args.seconds > 600.0 || args.concurrency == 0 || args.concurrency > 1024 {
        bail!("--seconds must be in (0, 600] and --concurrency in 1..=1024");
    }
    if let Some(bad) = args.callers.iter().find(|&&n| n == 0 || n > 100_000) {
        bail!("--callers must be in 1..=100000 (got {bad})");
    }
    let options = super::load::BenchOptions {
        seconds: args.seconds,
        warmup_seconds: args.warmup_seconds.max(0.0),
        concurrency: args.concurrency,
        tools_dir: args.tools_dir.unwrap_or_else(Tools::default_dir),
        rounds: args.rounds,
        only: args.only,
        callers: 1,
    };
    for callers in args.callers {
        super::load::run(&super::load::BenchOptions { callers, ..options.clone() }).await?;
    }
    Ok(())
}

/// Runs `snapsign deploy ...`.
pub async fn deploy(command: Deploy) -> Result<()> {
    let Deploy::Wasmcloud(args) = command;
    let tools = Tools::new(args.tools_dir.clone().unwrap_or_else(Tools::default_dir));
    let wash = tools.get(super::WASH)?;
    let wasm = super::signer_wasm(tools.dir())?;
    let env = snapsign_runtime::signer::guest_env(&args.env)?;
    let work = std::env::temp_dir().join(format!("snapsign-deploy-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    // With --local-lattice these live until Ctrl-C; dropping them stops them.
    let mut lattice = Vec::new();
    let (nats_url, registry) = if args.local_lattice {
        let (nats, nats_url) = launch::nats_server(&tools).await?;
        let (registry, registry_addr) = launch::oci_registry(&tools, &work.join("registry")).await?;
        lattice.push(nats);
        lattice.push(registry);
        for n in 1..=args.hosts {
            let (host, url) = launch::wash_host(&tools, &format!("host{n}"), &nats_url, &work).await?;
            eprintln!("wash host host{n} serving HTTP on {url}");
            lattice.push(host);
        }
        (nats_url, registry_addr)
    } else {
        (args.nats.clone().unwrap_or_default(), args.registry.clone().unwrap_or_default())
    };

    let mut options = DeployOptions::new(&nats_url, &registry, args.hosts, env);
    options.host_ids = args.host_ids;
    options.extra_allowed_hosts = args.allow_hosts;
    options.http_host = args.http_host;
    options.workload_prefix = args.workload_prefix;
    options.discover_timeout = Duration::from_secs(args.discover_secs);
    let deployment = wasmcloud::deploy(&options, &wash, &wasm, &work).await;
    let deployment = match deployment {
        Ok(d) => d,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&work);
            return Err(e);
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&deployment)?);
    } else {
        print!("{deployment}");
    }
    if args.local_lattice {
        eprintln!("lattice on NATS {nats_url}, registry {registry}; Ctrl-C stops it");
        wait_for_stop().await;
        drop(lattice);
    }
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

async fn wait_for_stop() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! { _ = tokio::signal::ctrl_c() => {}, _ = term.recv() => {} }
}
