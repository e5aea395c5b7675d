//! The `snapsign` command line: clap types only (the commands run in `commands`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(name = "snapsign", version, about = "Dataplane-signed sandbox image builds as WASI components")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the whole flow on the embedded dev stack: a base, a diff and a legacy build, each verified.
    Demo {
        /// Run sandbox processes unconfined when this process is not root (no confinement, no limits at all).
        #[arg(long)]
        allow_unconfined: bool,
    },
    /// Serve the signer component (POST /api/v1/blob/sign) over HTTP.
    ///
    /// The guest's configuration is every SNAPSIGN_* variable of this
    /// process's environment, overridden by --env (see docs/signer.md).
    ServeSigner(ServeSignerArgs),
    /// Build a sandbox image: prepare, builder sandbox, dataplane signing, build, complete.
    ///
    /// Exit codes: 0 registered, 1 build failed, 2 usage error, 3 credentials refused.
    Build(BuildArgs),
    /// Register a base template from an image: a registry reference (the
    /// platform pulls it) or a `docker save` archive, an OCI image layout
    /// (directory or tar) or a rootfs tarball (the builder lays it out),
    /// through the same prepare, sign, upload and complete as a build.
    Import(ImportArgs),
    /// List, describe and remove the templates of your namespace on the platform.
    Templates {
        #[command(subcommand)]
        what: TemplatesWhat,
    },
    /// Run the dev stack: store, signer, platform emulator and local sandboxes on loopback.
    Dev(DevArgs),
    /// Mint a bearer token for a namespace, signed with SNAPSIGN_TOKEN_KEY.
    Token(TokenArgs),
    /// Deploy the signer component onto a distributed host.
    Deploy {
        #[command(subcommand)]
        target: snapsign_foreign_hosts::cli::Deploy,
    },
    /// Print benchmark figures (run with --release).
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Serve the embedded S3-compatible store (SigV4 checked, multipart uploads).
    Store(StoreArgs),
}

// `snapsign serve-signer`.
#[derive(Args)]
pub struct ServeSignerArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: SocketAddr,
    /// Extra guest environment, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Linear memory limit of one request's instance, MiB.
    #[arg(long, default_value_t = 64)]
    pub max_memory_mb: usize,
    /// Wall-clock limit of one request, seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout_secs: u64,
    /// Requests served at once. Up to as many idle instances are kept
    /// beside them for their callers (the pool holds both). A request that
    /// finds all running waits up to 1 s, then gets 503 signer_busy.
    #[arg(long, default_value_t = 32)]
    pub max_concurrency: u32,
    /// Compiled-component cache [default: $SNAPSIGN_CACHE_DIR, ~/.cache/snapsign].
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Requests one instance serves before it is dropped; an instance only
    /// ever serves one caller (one Authorization header). 1 = a fresh
    /// instance per request.
    #[arg(long, default_value_t = snapsign_host::signer::DEFAULT_MAX_INSTANCE_REUSE, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_instance_reuse: u32,
    /// Start every fresh instance from the component's own start-up instead
    /// of a pre-initialized snapshot (made in the background at start-up,
    /// about a second of CPU; see docs/signer.md).
    #[arg(long)]
    pub no_preinit: bool,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Where builder sandboxes come from (variants undocumented on purpose:
/// the `--backend` help says it, and keeps the short help form).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Backend {
    Proxy,
    Local,
}

/// Where a build or an import goes: the platform and the caller's credentials.
#[derive(Args)]
pub struct PlatformArgs {
    /// Platform API URL.
    #[arg(long, env = "SNAPSIGN_API_URL")]
    pub api_url: String,
    /// Bearer token for the platform, lifecycle and proxy.
    #[arg(long, env = "SNAPSIGN_API_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Sandbox namespace.
    #[arg(long, env = "SNAPSIGN_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// PAT mode: the organization the token acts in (with --project). The
    /// platform paths become /platform/v1/organizations/ORG/projects/PROJECT/…
    /// and X-Forwarded-Organization-Id / X-Forwarded-Project-Id go with every
    /// request; without both, API-key mode.
    #[arg(long, env = "SNAPSIGN_ORGANIZATION_ID")]
    pub organization: Option<String>,
    /// PAT mode: the project the token acts in (with --organization).
    #[arg(long, env = "SNAPSIGN_PROJECT_ID")]
    pub project: Option<String>,
}

impl PlatformArgs {
    /// PAT mode's scope when both --organization and --project are given,
    /// none when neither is; one without the other is a usage error.
    pub fn scope(&self) -> Result<Option<snapsign::image_build::call::Scope>, String> {
        let given = |v: &Option<String>| v.as_deref().map(str::trim).filter(|v| !v.is_empty()).map(str::to_owned);
        // Both also travel as header values: printable ASCII only.
        for (flag, value) in [("--organization", &self.organization), ("--project", &self.project)] {
            if let Some(bad) = given(value).filter(|v| !v.bytes().all(|b| b.is_ascii_graphic() || b == b' ')) {
                return Err(format!("{flag} {bad:?} has characters an HTTP header cannot carry; pass the id as shown"));
            }
        }
        match (given(&self.organization), given(&self.project)) {
            (Some(organization), Some(project)) => {
                Ok(Some(snapsign::image_build::call::Scope { organization, project }))
            }
            (None, None) => Ok(None),
            _ => Err("Organization ID and project ID are required for sandbox image builds with PAT \
                      authentication: pass both --organization and --project (or SNAPSIGN_ORGANIZATION_ID and \
                      SNAPSIGN_PROJECT_ID), or neither for an API key"
                .to_owned()),
        }
    }
}

// `snapsign templates`.
#[derive(Subcommand)]
pub enum TemplatesWhat {
    /// Your namespace's templates, by name.
    Ls {
        #[command(flatten)]
        platform: PlatformArgs,
        /// Print them as a JSON array (only that) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// One template: NAME of yours, or NAMESPACE/NAME of another namespace's public one.
    Describe {
        name: String,
        #[command(flatten)]
        platform: PlatformArgs,
        /// Print it as JSON (only that) on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Remove a template of yours. Refused while a diff template is built on it.
    Rm {
        name: String,
        #[command(flatten)]
        platform: PlatformArgs,
        /// Print the removed template as JSON (only that) on stdout.
        #[arg(long)]
        json: bool,
    },
}

// `snapsign build`.
#[derive(Args)]
pub struct BuildArgs {
    /// The Dockerfile.
    #[arg(long, short = 'f', default_value = "Dockerfile")]
    pub dockerfile: PathBuf,
    /// The build context directory.
    #[arg(long, default_value = ".")]
    pub context: PathBuf,
    /// Template name to register.
    #[arg(long)]
    pub name: String,
    /// A build argument: every ARG that declares NAME takes VALUE; NAME alone
    /// takes its value from the environment (unset there: not set). Repeatable.
    #[arg(long = "build-arg", value_name = "NAME[=VALUE]")]
    pub build_args: Vec<String>,
    /// Rootfs size, MiB [default: the parent's for diff builds, else 10240].
    #[arg(long)]
    pub disk_mb: Option<u64>,
    /// Builder sandbox CPUs [default: the platform's].
    #[arg(long)]
    pub builder_cpus: Option<f64>,
    /// Builder sandbox memory, MiB [default: the platform's].
    #[arg(long)]
    pub builder_memory_mb: Option<i64>,
    /// Builder sandbox disk, MiB [default: the platform's].
    #[arg(long)]
    pub builder_disk_mb: Option<u64>,
    /// Register the template as public.
    #[arg(long)]
    pub public: bool,
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// Extra host[:port] the build may reach besides the platform and its sandbox proxies (repeatable).
    #[arg(long = "allow-host")]
    pub allow_hosts: Vec<String>,
    /// Seconds to wait for the builder sandbox to run and answer.
    #[arg(long, default_value_t = 120)]
    pub sandbox_wait_secs: u64,
    /// Gzip the context: `auto` for a builder sandbox on another machine only
    /// (one on this machine gets the plain tar, which unpacks faster than
    /// gzip saves), `always`, or `never`.
    #[arg(long, value_name = "auto|always|never", default_value = "auto")]
    pub compress_context: snapsign_host::sandbox_exec::Compression,
    /// Guest memory limit, MiB.
    #[arg(long, default_value_t = 256)]
    pub max_memory_mb: usize,
    /// Whole-build time limit, seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// Stream the build's events on stdout as one JSON object a line (NDJSON),
    /// ending with `{"event":"result","template":…}` or `{"event":"error",…}`.
    #[arg(long)]
    pub json: bool,
    /// Where builder sandboxes come from: `proxy` (the platform's lifecycle API and
    /// sandbox proxy) or `local` (sandboxes on this machine: namespaces, limits, private network).
    #[arg(long, value_enum, default_value_t = Backend::Proxy)]
    pub backend: Backend,
    /// local backend: the signer sign calls go to.
    #[arg(long, env = "SNAPSIGN_SIGNER_URL")]
    pub signer_url: Option<String>,
    /// local backend: bearer token for the signer (`snapsign token`).
    #[arg(long, env = "SNAPSIGN_SIGNER_TOKEN", hide_env_values = true)]
    pub signer_token: Option<String>,
    /// local backend: directory for sandboxes [default: a temporary directory].
    #[arg(long)]
    pub sandboxes_dir: Option<PathBuf>,
    /// local backend: run sandbox processes unconfined when this process is not root (no confinement).
    #[arg(long)]
    pub allow_unconfined: bool,
}

// `snapsign import`.
#[derive(Args)]
pub struct ImportArgs {
    /// A registry reference (`127.0.0.1:5000/team/base:1.2`, `name@sha256:…`) or a path
    /// to a `docker save` archive, an OCI image layout (directory or tar) or a rootfs tarball.
    pub image: String,
    /// Template name [default: the image's last path segment, without tag, digest or extension].
    #[arg(long)]
    pub name: Option<String>,
    /// Rootfs size, MiB [default: 10240].
    #[arg(long)]
    pub disk_mb: Option<u64>,
    /// Register the template as public.
    #[arg(long)]
    pub public: bool,
    #[command(flatten)]
    pub platform: PlatformArgs,
    /// Whole-import time limit, seconds.
    #[arg(long, default_value_t = 3600)]
    pub timeout_secs: u64,
    /// Stream the build's events on stdout as one JSON object a line (NDJSON),
    /// ending with `{"event":"result","template":…}` or `{"event":"error",…}`.
    #[arg(long)]
    pub json: bool,
}

/// The dev stack's default prepare answer shape (`snapsign_dev_stack::PrepareShape`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PrepareShape {
    New,
    Legacy,
    Both,
}

impl From<PrepareShape> for snapsign_dev_stack::PrepareShape {
    fn from(shape: PrepareShape) -> Self {
        match shape {
            PrepareShape::New => snapsign_dev_stack::PrepareShape::New,
            PrepareShape::Legacy => snapsign_dev_stack::PrepareShape::Legacy,
            PrepareShape::Both => snapsign_dev_stack::PrepareShape::Both,
        }
    }
}

// `snapsign dev`.
#[derive(Args)]
pub struct DevArgs {
    /// Store data, state database and secrets (kept across restarts)
    /// [default: $XDG_DATA_HOME/snapsign/dev or ~/.local/share/snapsign/dev].
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Emulator address (platform-api, lifecycle, sandbox proxy).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Store address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub store_listen: SocketAddr,
    /// Signer address.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub signer_listen: SocketAddr,
    /// Namespace of the printed token.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Default prepare answer shape: new, legacy or both (per request: header X-Snapsign-Prepare-Shape).
    #[arg(long, value_enum, default_value_t = PrepareShape::New)]
    pub prepare_shape: PrepareShape,
    /// How long a new sandbox stays pending (answering 502 PROXY_ERROR), milliseconds.
    #[arg(long, default_value_t = 1000)]
    pub pending_ms: u64,
    /// Fault switches as JSON, e.g. '{"sign_fail":true}' (see docs/dev-stack.md).
    #[arg(long)]
    pub faults: Option<String>,
    /// Run sandbox processes unconfined when this process is not root (no confinement, no limits at all).
    #[arg(long)]
    pub allow_unconfined: bool,
    /// Abort the store's incomplete multipart uploads this many seconds after they began.
    #[arg(long, default_value_t = 86_400)]
    pub abort_incomplete_uploads_after_secs: u64,
    /// A registry reached over plain HTTP when a Dockerfile FROMs one of its
    /// images (127.0.0.1 and localhost always are); repeatable.
    #[arg(long = "insecure-registry", value_name = "HOST:PORT")]
    pub insecure_registries: Vec<String>,
    /// Registry credentials (Docker's config.json)
    /// [default: $DOCKER_CONFIG/config.json or ~/.docker/config.json].
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
    /// Pull Docker Hub images (`FROM debian`) from this registry instead of
    /// docker.io, as Docker's registry-mirrors: a pull-through cache or an
    /// offline machine's own registry.
    #[arg(long, value_name = "HOST:PORT")]
    pub registry_mirror: Option<String>,
    /// Lifetime of presigned URLs, seconds (5..=604800) [default: the
    /// signer's, 3600]. Builds sign expired multipart URLs again; reads
    /// and single PUTs must outlive the build.
    #[arg(long, value_name = "SECS")]
    pub url_ttl_secs: Option<u32>,
}

// `snapsign token`.
#[derive(Args)]
pub struct TokenArgs {
    /// The namespace the token grants.
    #[arg(long)]
    pub namespace: String,
    /// Lifetime in seconds.
    #[arg(long, default_value_t = 3600)]
    pub ttl_secs: i64,
    /// The signing key (at least 32 bytes).
    #[arg(long, env = "SNAPSIGN_TOKEN_KEY", hide_env_values = true)]
    pub key: Option<String>,
    /// Instead of --key: the data directory of a `snapsign dev` stack, whose
    /// key signs the token (it wins over --key and SNAPSIGN_TOKEN_KEY).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

// `snapsign store`.
#[derive(Args)]
pub struct StoreArgs {
    /// Data directory (one sub-directory per bucket).
    #[arg(long)]
    pub dir: PathBuf,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Access key id the store accepts.
    #[arg(long, env = "SNAPSIGN_ACCESS_KEY_ID")]
    pub access_key_id: String,
    /// Its secret.
    #[arg(long, env = "SNAPSIGN_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub secret_access_key: String,
    /// Buckets to create (repeatable).
    #[arg(long = "bucket")]
    pub buckets: Vec<String>,
    /// Abort incomplete multipart uploads this many seconds after they began
    /// (S3's AbortIncompleteMultipartUpload lifecycle rule).
    #[arg(long, default_value_t = 86_400)]
    pub abort_incomplete_uploads_after_secs: u64,
}

/// What a server tolerates from its clients (see `serve::ServeLimits`).
#[derive(Args)]
pub struct ServeArgs {
    /// Seconds a request's head may take to arrive (from the connection opening, or its first byte).
    #[arg(long, default_value_t = 10)]
    pub header_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit idle between requests.
    #[arg(long, default_value_t = 30)]
    pub idle_timeout_secs: u64,
    /// Seconds a request body may take to arrive, before the request takes an instance.
    #[arg(long, default_value_t = 10)]
    pub body_timeout_secs: u64,
    /// Open connections allowed from one client IP (behind a proxy every client shares one).
    #[arg(long, default_value_t = 256)]
    pub max_connections_per_ip: usize,
    /// Open connections allowed in total.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
}

impl ServeArgs {
    pub fn limits(&self) -> snapsign_host::serve::ServeLimits {
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
pub enum BenchWhat {
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
    Hosts(snapsign_foreign_hosts::cli::BenchHosts),
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
        /// Passed to both servers: 1 measures the fresh-instance path (every
        /// request a new instance), as most callers of a busy dataplane see it.
        #[arg(long)]
        max_instance_reuse: Option<u32>,
    },
    /// serve-signer under steady mixed traffic from many callers and slow
    /// clients: RSS and fds every 10 s, answers by status, p50/p99 per minute.
    Soak {
        /// How long to run.
        #[arg(long, default_value_t = 30.0)]
        minutes: f64,
        /// Distinct caller tokens.
        #[arg(long, default_value_t = 1000)]
        callers: usize,
        /// Concurrent request senders.
        #[arg(long, default_value_t = 8)]
        concurrency: usize,
        /// Requests per second, all senders together.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Connections that send their request head one byte every 500 ms.
        #[arg(long, default_value_t = 16)]
        slow_clients: usize,
    },
    /// Pulling and importing an image from a loopback registry as `snapsign
    /// dev` does for FROM <image>, beside `tar -xzf` of the same layer.
    Import {
        /// Image size, MB (half random bytes, half text, one gzip layer).
        #[arg(long, default_value_t = 50)]
        mb: usize,
        /// Rounds.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Where the registry (Debian's docker-registry) is installed [default: the hosts' tool cache].
        #[arg(long)]
        tools_dir: Option<PathBuf>,
    },
    /// What a Dockerfile RUN step costs beyond its command (entering and
    /// leaving the confined rootfs), beside the floor and buildah.
    RunSteps {
        /// RUN steps to measure (after 3 to warm up).
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// The buildah to compare with (default: buildah on PATH, if any).
        #[arg(long)]
        buildah: Option<PathBuf>,
        /// `RUN true` lines in buildah's Dockerfile.
        #[arg(long, default_value_t = 20)]
        buildah_steps: usize,
    },
    /// One build of a large generated context on the dev stack, stage by
    /// stage, beside the native floor (tar | zstd -3, one PUT) and buildah
    /// bud + push of the same context, with peak memory.
    Data {
        /// Context size, MB (two thirds random bytes in 2 MB files, one third text in 1 MB files).
        #[arg(long, default_value_t = 300)]
        context_mb: usize,
        /// Builds, each beside a floor run.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The buildah to compare with (default: buildah on PATH; without one the bench stops before it starts).
        #[arg(long)]
        buildah: Option<PathBuf>,
        /// Run without buildah (no peer figure).
        #[arg(long, conflicts_with = "buildah")]
        no_peer: bool,
        /// How the context goes to the builder sandbox (on this machine): `auto`
        /// (a plain tar), `always` (gzipped) or `never`.
        #[arg(long, value_name = "auto|always|never", default_value = "auto")]
        compress_context: snapsign_host::sandbox_exec::Compression,
    },
    /// Orchestration overhead of demo builds, warm instantiation and cold start.
    Build {
        /// Builds to run (the first only warms the cache).
        #[arg(long, default_value_t = 11)]
        rounds: usize,
        /// Instantiations measured back to back, each in a fresh Store, after the builds.
        #[arg(long, default_value_t = 1000)]
        instantiations: usize,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn platform(organization: Option<&str>, project: Option<&str>) -> PlatformArgs {
        PlatformArgs {
            api_url: "http://127.0.0.1:1".into(),
            token: "t".into(),
            namespace: "default".into(),
            organization: organization.map(str::to_owned),
            project: project.map(str::to_owned),
        }
    }

    #[test]
    fn pat_mode_needs_both_the_organization_and_the_project() {
        let scope = platform(Some("o"), Some("p")).scope().unwrap().unwrap();
        assert_eq!((scope.organization.as_str(), scope.project.as_str()), ("o", "p"));
        assert_eq!(platform(None, None).scope(), Ok(None), "neither: API-key mode");
        for half in [platform(Some("o"), None), platform(None, Some("p")), platform(Some("o"), Some(" "))] {
            let error = half.scope().unwrap_err();
            assert!(error.starts_with("Organization ID and project ID are required"), "{error}");
            assert!(error.contains("--organization and --project"), "{error}");
        }
        let error = platform(Some("o\nX-Evil: 1"), Some("p")).scope().unwrap_err();
        assert!(
            error.starts_with("--organization \"o\\nX-Evil: 1\" has characters an HTTP header cannot carry"),
            "{error}"
        );
    }
}
