//! `snapsign dev`: the store, the signer and the platform emulator with
//! local sandboxes, on loopback, in one process.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use snapsign::signer::SignerConfig;
use snapsign_sandbox::{Confinement, Sandboxes, SandboxesConfig};

use super::emulator::{Emulator, EmulatorConfig};
use super::faults::Faults;
use super::shape::PrepareShape;
use super::state::State;
use crate::store::{StoreConfig, StoreFaults};
use snapsign_runtime::engine::EngineLimits;
use snapsign_runtime::serve::{self, Server};
use snapsign_runtime::signer::SignerServerConfig;

/// The bucket the dev stack stores snapshots in.
pub const BUCKET: &str = "snapshots";
/// The key prefix before the namespace.
pub const KEY_PREFIX: &str = "builds";

/// Settings of the dev stack.
#[derive(Debug, Clone)]
pub struct DevConfig {
    /// Store data, state database, sandboxes, secrets (survives restarts).
    pub data_dir: PathBuf,
    /// Emulator address (platform-api, lifecycle and proxy).
    pub listen: SocketAddr,
    /// Store address.
    pub store_listen: SocketAddr,
    /// Signer address.
    pub signer_listen: SocketAddr,
    /// Namespace of the printed token.
    pub namespace: String,
    /// Default prepare shape (per request: header `X-Snapsign-Prepare-Shape`).
    pub shape: PrepareShape,
    /// How long a new sandbox stays pending.
    pub pending: Duration,
    /// Fault switches at start.
    pub faults: Faults,
    /// Run sandboxes unconfined when they cannot be confined (not root).
    pub allow_unconfined: bool,
    /// The executable installed as /usr/local/bin/tl-rootfs-build in sandboxes.
    pub builder_binary: PathBuf,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
    /// The store aborts multipart uploads older than this (S3's AbortIncompleteMultipartUpload).
    pub abort_incomplete_uploads_after: Duration,
    /// Registries reached over plain HTTP besides loopback ones (for Dockerfiles FROM their images).
    pub insecure_registries: Vec<String>,
    /// Registry credentials (Docker's config.json); `None`: Docker's default place.
    pub docker_config: Option<PathBuf>,
    /// Where Docker Hub images are pulled from instead of docker.io (`host:port`).
    pub registry_mirror: Option<String>,
    /// Lifetime of the URLs the signer and the emulator presign, seconds
    /// (`SNAPSIGN_URL_TTL_SECS`); `None`: the signer's default.
    pub url_ttl_secs: Option<u32>,
}

impl DevConfig {
    /// Defaults: ports chosen by the OS, namespace `default`, new shape, 1 s pending.
    pub fn new(data_dir: PathBuf, builder_binary: PathBuf) -> Self {
        let any: SocketAddr = "127.0.0.1:0".parse().expect("literal address");
        DevConfig {
            data_dir,
            listen: any,
            store_listen: any,
            signer_listen: any,
            namespace: "default".into(),
            shape: PrepareShape::New,
            pending: Duration::from_secs(1),
            faults: Faults::default(),
            allow_unconfined: false,
            builder_binary,
            cache_dir: snapsign_runtime::engine::default_cache_dir(),
            abort_incomplete_uploads_after: crate::store::DEFAULT_ABORT_INCOMPLETE_AFTER,
            insecure_registries: Vec::new(),
            docker_config: None,
            registry_mirror: None,
            url_ttl_secs: None,
        }
    }
}

/// Credentials generated on first start and kept in the data directory.
#[derive(Serialize, Deserialize)]
struct Secrets {
    access_key_id: String,
    secret_access_key: String,
    token_key: String,
    /// The operator's credential for `/_snapsign/*` (absent in data dirs
    /// made before it existed: then it is generated and saved).
    #[serde(default)]
    admin_token: String,
}

/// 32 bytes from the operating system's generator, as hex. No fallback: a
/// secret from a guessable seed is worse than no stack at all.
fn random_hex() -> Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("read the operating system's random generator for the stack's secrets")?;
    Ok(hex::encode(bytes))
}

/// Writes `secrets.json` readable by its owner only: a private temporary
/// file renamed over it, so a crash never leaves it empty or half written.
fn write_secrets(path: &Path, secrets: &Secrets) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let tmp = path.with_extension(format!("json.tmp{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
        // A leftover temporary file keeps its old mode: set it explicitly.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        file.write_all(&serde_json::to_vec_pretty(secrets)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().with_context(|| format!("write {} (through {})", path.display(), tmp.display()))
}

/// The key a stack with `data_dir` signs namespace tokens with, for
/// `snapsign token --data-dir` (a second namespace's token): read from its
/// `secrets.json`, never made.
pub fn token_key(data_dir: &Path) -> Result<String> {
    let path = data_dir.join("secrets.json");
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!("read {}: is {} the data directory of a snapsign dev stack?", path.display(), data_dir.display())
    })?;
    let secrets: Secrets = serde_json::from_str(&text).with_context(|| format!("read {}", path.display()))?;
    Ok(secrets.token_key)
}

/// The stack's secrets: read from `data_dir/secrets.json`, or made and saved
/// when there is none. Any other failure to read it is an error, never a
/// silent replacement (that would void every token already issued).
fn secrets(data_dir: &Path) -> Result<Secrets> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = data_dir.join("secrets.json");
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut secrets: Secrets = serde_json::from_str(&text)
                .with_context(|| format!("read {}; delete it to start afresh", path.display()))?;
            let mode =
                std::fs::metadata(&path).with_context(|| format!("stat {}", path.display()))?.permissions().mode();
            if mode & 0o077 != 0 {
                // Written by an older snapsign under the umask: make it private now.
                tracing::warn!(path = %path.display(), mode = format!("{:o}", mode & 0o777), "secrets file was readable by others; setting it to 0600");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                    .with_context(|| format!("make {} private (chmod 600)", path.display()))?;
            }
            if secrets.admin_token.is_empty() {
                secrets.admin_token = format!("ssadm.{}", random_hex()?);
                write_secrets(&path, &secrets)?;
            }
            Ok(secrets)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let secrets = Secrets {
                access_key_id: format!("AKIDDEV{}", &random_hex()?[..13].to_uppercase()),
                secret_access_key: random_hex()?,
                token_key: random_hex()?,
                admin_token: format!("ssadm.{}", random_hex()?),
            };
            write_secrets(&path, &secrets)?;
            Ok(secrets)
        }
        Err(e) => Err(e).with_context(|| {
            format!("read {}; fix its permissions or move it away (a new one voids issued tokens)", path.display())
        }),
    }
}

/// The running dev stack.
pub struct DevStack {
    /// The S3-compatible store.
    pub store: Server,
    /// serve-signer.
    pub signer: Server,
    /// The emulator (platform-api, lifecycle, sandbox proxy).
    pub emulator: Server,
    /// The emulator's state and switches.
    pub platform: Arc<Emulator>,
    /// A token for `namespace`, valid 24 h.
    pub token: String,
    /// The namespace of `token`.
    pub namespace: String,
    /// The operator's credential for `/_snapsign/faults` (no namespace token is).
    pub admin_token: String,
    /// What this start cleaned up after a previous run that died.
    pub recovered: super::Recovered,
    /// How local sandboxes are confined here and what holds their limits (chosen once at start).
    pub sandbox_mode: String,
}

impl DevStack {
    /// Starts everything; nothing is left running if a step fails.
    pub async fn start(config: &DevConfig) -> Result<DevStack> {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("create data dir {}", config.data_dir.display()))?;
        let secrets = secrets(&config.data_dir)?;
        let confinement = Confinement::detect(config.allow_unconfined)?;
        let sandboxes_dir = config.data_dir.join("sandboxes");
        if sandboxes_dir.exists() {
            // Sandboxes never outlive the stack that made them.
            std::fs::remove_dir_all(&sandboxes_dir).with_context(|| format!("clear {}", sandboxes_dir.display()))?;
        }
        let sandboxes = Sandboxes::new(SandboxesConfig {
            root_dir: sandboxes_dir,
            confinement,
            builder_binary: Some(config.builder_binary.clone()),
        })?;
        let state = State::open(&config.data_dir.join("state.db"))?;
        for stale in state.live_sandboxes()? {
            state.put_sandbox(&stale, "", "", "deleted")?;
        }

        let store_faults = Arc::new(StoreFaults::default());
        let store = crate::store::start(&StoreConfig {
            root: config.data_dir.join("store"),
            listen: config.store_listen,
            access_key_id: secrets.access_key_id.clone(),
            secret_access_key: secrets.secret_access_key.clone(),
            buckets: vec![BUCKET.into()],
            faults: store_faults.clone(),
            abort_incomplete_after: config.abort_incomplete_uploads_after,
        })
        .await?;
        let env: Vec<(String, String)> = [
            ("SNAPSIGN_BUCKET", BUCKET),
            ("SNAPSIGN_KEY_PREFIX", KEY_PREFIX),
            ("SNAPSIGN_S3_ENDPOINT", &store.url()),
            ("SNAPSIGN_S3_ADDRESSING", "path"),
            ("SNAPSIGN_ACCESS_KEY_ID", &secrets.access_key_id),
            ("SNAPSIGN_SECRET_ACCESS_KEY", &secrets.secret_access_key),
            ("SNAPSIGN_TOKEN_KEY", &secrets.token_key),
            // The signer refuses keys this store cannot hold (KeyTooLongError) at sign time.
            ("SNAPSIGN_MAX_KEY_BYTES", &crate::store::max_key_bytes(BUCKET).to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .chain(config.url_ttl_secs.map(|ttl| ("SNAPSIGN_URL_TTL_SECS".to_owned(), ttl.to_string())))
        .collect();
        let signer_config = SignerConfig::from_vars(env.clone())?;
        let (signer, _) = snapsign_runtime::signer::start(&SignerServerConfig {
            listen: config.signer_listen,
            env,
            limits: EngineLimits::default(),
            request_timeout: Duration::from_secs(30),
            cache_dir: config.cache_dir.clone(),
            max_instance_reuse: snapsign_runtime::signer::DEFAULT_MAX_INSTANCE_REUSE,
            // A dev stack signs a few calls per build: the snapshot's compile
            // (about a second of CPU) would cost more than it saves.
            preinit: false,
        })
        .await?;

        let sandbox_mode = sandboxes.describe();
        let granted = sandboxes.clone();
        let platform = Arc::new(Emulator::new(EmulatorConfig {
            state,
            signer: signer_config,
            signer_url: signer.url(),
            sandboxes,
            pending: config.pending,
            shape: config.shape,
            faults: config.faults.clone(),
            store_faults,
            admin_token: secrets.admin_token.clone(),
        }));
        platform.platform_api().set_store_root(config.data_dir.join("store"));
        // Registry images a Dockerfile FROMs: pulled into data_dir/images (an OCI layout, by digest).
        let images = config.data_dir.join("images");
        let _ = std::fs::remove_dir_all(images.join("work")); // what an import interrupted by a kill left
        platform.platform_api().set_image_settings(super::images::ImageSettings {
            pull: crate::registry::PullOptions {
                cache_dir: images.join("oci"),
                docker_config: config.docker_config.clone(),
                insecure_registries: config.insecure_registries.clone(),
                mirror: config.registry_mirror.clone(),
            },
            work_dir: images.join("work"),
        });
        let recovered = platform.recover_interrupted_builds().await.unwrap_or_else(|e| {
            tracing::warn!("cannot clean up after the previous run yet (next start tries again): {e:#}");
            super::Recovered::default()
        });
        let routed = platform.clone();
        let service = hyper::service::service_fn(move |request| routed.clone().route(request));
        let emulator = serve::spawn("emulator", config.listen, service).await?;
        platform.set_base_url(emulator.url());
        // A sandbox reaches the store (uploads) and the sandbox proxy, nothing else of this host.
        granted.grant_ports(&[store.addr().port(), emulator.addr().port()]);
        let token = snapsign::token::mint(
            secrets.token_key.as_bytes(),
            &config.namespace,
            jiff::Timestamp::now().as_second() + 24 * 3600,
        )?;
        tracing::info!(api = %emulator.url(), store = %store.url(), signer = %signer.url(), "dev stack ready");
        Ok(DevStack {
            store,
            signer,
            emulator,
            platform,
            token,
            namespace: config.namespace.clone(),
            admin_token: secrets.admin_token,
            recovered,
            sandbox_mode,
        })
    }

    /// A token for another namespace (24 h), as the platform would issue
    /// to another tenant.
    pub fn token_for(&self, namespace: &str) -> Result<String> {
        let expires = jiff::Timestamp::now().as_second() + 24 * 3600;
        Ok(snapsign::token::mint(self.platform.signer().token_key(), namespace, expires)?)
    }

    /// The platform API URL (`api_url` of a build).
    pub fn api_url(&self) -> String {
        self.emulator.url()
    }

    /// Options for a build against this stack: its token and namespace, a
    /// 256 MiB rootfs, the store admitted (so an unfinished upload can be aborted).
    pub fn build_options(
        &self,
        name: &str,
        dockerfile: &str,
        context: &Path,
    ) -> snapsign_runtime::image_build::BuildOptions {
        use snapsign_runtime::image_build::BuildOptions;
        let request = snapsign::image_build::call::Request::new(&self.api_url(), &self.token, name, dockerfile);
        BuildOptions {
            request: snapsign::image_build::call::Request { disk_mb: Some(256), ..request },
            namespace: self.namespace.clone(),
            context_dir: context.to_owned(),
            compression: Default::default(),
            allow_hosts: vec![self.store.addr().to_string()],
            max_memory_bytes: 128 << 20,
            timeout: Duration::from_secs(600),
            cache_dir: snapsign_runtime::engine::default_cache_dir(),
            cancel: Default::default(),
        }
    }

    /// Deletes every sandbox and stops the servers.
    pub async fn shutdown(self) {
        self.platform.lifecycle_api().delete_all_sandboxes().await;
        self.emulator.shutdown().await;
        self.signer.shutdown().await;
        self.store.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn secrets_are_random_private_to_the_owner_and_kept() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let first = secrets(a.path()).unwrap();
        let mode = std::fs::metadata(a.path().join("secrets.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "secrets.json is readable by its owner only");
        let again = secrets(a.path()).unwrap();
        assert_eq!(
            (first.token_key.as_str(), first.admin_token.as_str()),
            (again.token_key.as_str(), again.admin_token.as_str())
        );
        let other = secrets(b.path()).unwrap();
        assert_ne!(first.token_key, other.token_key, "two stacks never share a key");
        // A file an older version left readable by others is made private, keeping its secrets.
        std::fs::set_permissions(a.path().join("secrets.json"), std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(secrets(a.path()).unwrap().token_key, first.token_key);
        let mode = std::fs::metadata(a.path().join("secrets.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "made private on read");
        // Unreadable is an error, not a reason to make new secrets.
        std::fs::remove_file(b.path().join("secrets.json")).unwrap();
        std::fs::create_dir(b.path().join("secrets.json")).unwrap();
        let error = format!("{:#}", secrets(b.path()).err().expect("a directory is not a secrets file"));
        assert!(error.contains("secrets.json"), "{error}");
        assert_ne!(first.secret_access_key, first.token_key, "each secret is drawn on its own");
        assert_eq!(first.token_key.len(), 64, "32 random bytes");
    }
}
