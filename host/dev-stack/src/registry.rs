//! Pulling images over the OCI distribution API into a cache that is an
//! OCI image layout, so the reference builder's
//! [`image::open`](snapsign_rootfs_builder::image::open) reads it.
//!
//! - References are normalised as Docker does (`debian:bookworm-slim` is
//!   `docker.io/library/debian:bookworm-slim`, the default tag is `latest`,
//!   `host:port/name:tag`, `name@sha256:…`).
//! - The cache (`PullOptions::cache_dir`) is one OCI layout: `oci-layout`,
//!   `index.json` (one entry per reference pulled, named by the
//!   `org.opencontainers.image.ref.name` annotation) and `blobs/sha256/…`.
//!   A blob is written to a temporary file, checked against the sha256 and
//!   size of its descriptor, then renamed into place: what is in `blobs/` is
//!   always whole and right. Pulls into one cache take turns (a lock file).
//! - A reference by digest whose manifest, config and layers are cached is
//!   answered from the cache without a request. A tag costs one manifest
//!   request; blobs already cached are not fetched again.
//! - An index (multi-platform image) gives its linux/amd64 manifest; only
//!   that platform's blobs are fetched.
//! - Credentials come from the Docker config (`$DOCKER_CONFIG/config.json`,
//!   else `~/.docker/config.json`): `auths.<registry>.auth` (base64
//!   `user:password`, or `username`/`password`), or `identitytoken`, which is
//!   sent as a bearer token as it is. Credential helpers (`credsStore`,
//!   `credHelpers`) are not run.
//! - Registries are reached over https, except 127.0.0.1, localhost and
//!   `[::1]` (any port) and [`PullOptions::insecure_registries`]: plain http.
//!
//! The client is the `oci-client` crate (rustls with ring, the provider the
//! rest of the host already links).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use futures_util::StreamExt as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use sha2::{Digest as _, Sha256};
use snapsign_rootfs_builder::image::{self, Image, oci};
use tokio::io::AsyncWriteExt as _;

use oci::{Descriptor, Index, ManifestKind};

/// How to pull.
#[derive(Debug, Clone)]
pub struct PullOptions {
    /// The OCI layout the images are kept in (created when missing).
    pub cache_dir: PathBuf,
    /// The Docker config with credentials; `None`: `$DOCKER_CONFIG/config.json`,
    /// else `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
    /// Registries (`host:port` or `host`) reached over plain HTTP. 127.0.0.1,
    /// localhost and `[::1]` always are.
    pub insecure_registries: Vec<String>,
    /// A registry (`host:port`) Docker Hub images are pulled from instead of
    /// docker.io, as Docker's `registry-mirrors` (a pull-through cache, an
    /// offline machine); its own credentials apply. Images keep their
    /// docker.io names in the cache.
    pub mirror: Option<String>,
}

impl PullOptions {
    pub fn new(cache_dir: impl Into<PathBuf>) -> PullOptions {
        PullOptions { cache_dir: cache_dir.into(), docker_config: None, insecure_registries: Vec::new(), mirror: None }
    }

    /// The Docker config file used for credentials.
    pub fn docker_config_path(&self) -> Option<PathBuf> {
        if let Some(path) = &self.docker_config {
            return Some(path.clone());
        }
        if let Some(dir) = std::env::var_os("DOCKER_CONFIG") {
            return Some(Path::new(&dir).join("config.json"));
        }
        std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker/config.json"))
    }
}

/// What a pull gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pulled {
    /// The reference, normalised (`docker.io/library/debian:bookworm-slim`).
    pub reference: String,
    /// The registry host contacted (`index.docker.io` for docker.io).
    pub registry: String,
    /// The digest the reference resolves to: an image manifest, or an index.
    pub digest: String,
    /// The linux/amd64 image manifest (= `digest` unless that is an index).
    pub manifest_digest: String,
    /// The OCI layout holding it (the cache directory).
    pub layout_dir: PathBuf,
    /// Bytes of manifests and blobs fetched.
    pub fetched_bytes: u64,
    /// Blobs (config, layers) fetched, and those the cache already had.
    pub fetched_blobs: u64,
    pub cached_blobs: u64,
    /// Manifest and blob requests made; the client's authentication round
    /// trips (`GET /v2/`, a token server) are not counted.
    pub requests: u64,
}

impl Pulled {
    /// The image as the reference builder reads it.
    pub fn open(&self) -> Result<Image> {
        image::open_selected(&self.layout_dir, &self.reference)
    }
}

/// Docker's normalisation of `reference` (the error names what is wrong).
pub fn normalise(reference: &str) -> Result<Reference> {
    let parsed: Reference = reference
        .parse()
        .map_err(|e| anyhow!("{reference:?} is not an image reference ([registry/]name[:tag][@sha256:digest]): {e}"))?;
    if let Some(digest) = parsed.digest() {
        oci::sha256_hex(digest).with_context(|| format!("the reference {reference}"))?;
    }
    Ok(parsed)
}

/// `reference` (a Docker Hub image) at `mirror`: the same repository, tag and digest.
fn mirrored(reference: &Reference, mirror: &str) -> Reference {
    let (registry, repository) = (mirror.to_owned(), reference.repository().to_owned());
    match (reference.tag(), reference.digest()) {
        (_, Some(digest)) => Reference::with_digest(registry, repository, digest.to_owned()),
        (tag, None) => Reference::with_tag(registry, repository, tag.unwrap_or("latest").to_owned()),
    }
}

/// The normalised text of a reference: `registry/repository[:tag][@digest]`;
/// a tag next to a digest is dropped, as the digest decides.
fn reference_name(reference: &Reference) -> String {
    match reference.digest() {
        Some(digest) => format!("{}/{}@{digest}", reference.registry(), reference.repository()),
        None => reference.whole(),
    }
}

/// Pulls `reference` into `options.cache_dir` (see the module docs).
pub async fn pull(reference: &str, options: &PullOptions) -> Result<Pulled> {
    let parsed = normalise(reference)?;
    let name = reference_name(&parsed);
    // From here `parsed` is where the bytes come from: the mirror, for a Docker Hub image.
    let parsed = match &options.mirror {
        Some(mirror) if parsed.registry() == "docker.io" => mirrored(&parsed, mirror),
        _ => parsed,
    };
    let registry = parsed.resolve_registry().to_owned();
    let cache = Cache::open(&options.cache_dir).await?;
    let mut pulled = Pulled {
        reference: name.clone(),
        registry: registry.clone(),
        digest: String::new(),
        manifest_digest: String::new(),
        layout_dir: options.cache_dir.clone(),
        fetched_bytes: 0,
        fetched_blobs: 0,
        cached_blobs: 0,
        requests: 0,
    };

    if let Some(digest) = parsed.digest()
        && let Some((top, manifest_digest, blobs)) = cache.complete(digest)?
    {
        cache.record(&top, &name)?;
        pulled.digest = digest.to_owned();
        pulled.manifest_digest = manifest_digest;
        pulled.cached_blobs = blobs;
        return Ok(pulled);
    }

    let config_path = options.docker_config_path();
    let credentials = Credentials::find(config_path.as_deref(), parsed.registry())?;
    let plain = is_plain_http(&registry, &options.insecure_registries);
    let remote = Remote { client: client(&registry, plain), reference: &parsed, name: &name, plain, credentials };

    // The manifest the reference names: one request.
    let (bytes, _) = remote.manifest(&parsed, "the manifest").await?;
    pulled.requests += 1;
    pulled.fetched_bytes += bytes.len() as u64;
    let top_digest = oci::sha256_digest(&bytes);
    if let Some(wanted) = parsed.digest()
        && wanted != top_digest
    {
        bail!("pull {name}: the registry {registry} sent a manifest whose sha256 is {top_digest}, not {wanted}");
    }
    let kind = oci::parse_manifest(&bytes).with_context(|| format!("pull {name}: the manifest {top_digest}"))?;
    let top = Descriptor {
        media_type: media_type_of(&kind),
        digest: top_digest.clone(),
        size: bytes.len() as u64,
        ..Default::default()
    };
    cache.store(&top, &bytes)?;

    let (manifest_digest, manifest) = match kind {
        ManifestKind::Image(manifest) => (top_digest.clone(), manifest),
        ManifestKind::Index(index) => {
            let chosen = oci::select_platform(&index, &format!("the image index of {name} ({top_digest})"))?.clone();
            let bytes = match cache.read_verified(&chosen)? {
                Some(bytes) => bytes,
                None => {
                    let by_digest = parsed.clone_with_digest(chosen.digest.clone());
                    let (bytes, _) = remote.manifest(&by_digest, "the linux/amd64 manifest").await?;
                    pulled.requests += 1;
                    pulled.fetched_bytes += bytes.len() as u64;
                    cache.store(&chosen, &bytes).with_context(|| format!("pull {name} from {registry}"))?;
                    bytes.to_vec()
                }
            };
            match oci::parse_manifest(&bytes).with_context(|| format!("pull {name}: manifest {}", chosen.digest))? {
                ManifestKind::Image(manifest) => (chosen.digest, manifest),
                ManifestKind::Index(_) => {
                    bail!("pull {name}: the index {top_digest} names another index for linux/amd64")
                }
            }
        }
    };

    for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
        if cache.has(blob) {
            pulled.cached_blobs += 1;
            continue;
        }
        let size = remote.blob(blob, &cache).await?;
        pulled.requests += 1;
        pulled.fetched_blobs += 1;
        pulled.fetched_bytes += size;
    }
    cache.record(&top, &name)?;
    pulled.digest = top_digest;
    pulled.manifest_digest = manifest_digest;
    tracing::info!(
        reference = %pulled.reference,
        digest = %pulled.digest,
        fetched_bytes = pulled.fetched_bytes,
        fetched_blobs = pulled.fetched_blobs,
        cached_blobs = pulled.cached_blobs,
        "pulled"
    );
    Ok(pulled)
}

fn media_type_of(kind: &ManifestKind) -> String {
    match kind {
        ManifestKind::Index(index) => index.media_type.clone().unwrap_or_else(|| oci::OCI_INDEX.to_owned()),
        ManifestKind::Image(manifest) => manifest.media_type.clone().unwrap_or_else(|| oci::OCI_MANIFEST.to_owned()),
    }
}

/// 127.0.0.1, localhost and [::1] (any port), and the insecure registries.
pub fn is_plain_http(registry: &str, insecure: &[String]) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => registry.rsplit_once(':').map_or(registry, |(host, _)| host),
    };
    matches!(host, "127.0.0.1" | "localhost" | "::1")
        || insecure.iter().any(|i| i == registry || i == host || i.trim_start_matches("http://") == registry)
}

fn client(registry: &str, plain: bool) -> Client {
    // reqwest's rustls needs a process-wide provider; ring is the one the host links.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let protocol = if plain { ClientProtocol::HttpsExcept(vec![registry.to_owned()]) } else { ClientProtocol::Https };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(std::time::Duration::from_secs(30)),
        read_timeout: Some(std::time::Duration::from_secs(120)),
        ..Default::default()
    })
}

/// The credentials for one registry, and where they came from.
struct Credentials {
    auth: RegistryAuth,
    /// `auths."127.0.0.1:5000" in /root/.docker/config.json`
    source: Option<String>,
    /// The config file that was (or would be) read.
    config_path: Option<PathBuf>,
    /// A credential helper the config names, which is not run.
    helper: Option<String>,
}

impl Credentials {
    /// Looks `registry` (as in the reference: `docker.io`, `host:port`) up in the Docker config.
    fn find(config_path: Option<&Path>, registry: &str) -> Result<Credentials> {
        let mut found = Credentials {
            auth: RegistryAuth::Anonymous,
            source: None,
            config_path: config_path.map(Path::to_owned),
            helper: None,
        };
        let Some(path) = config_path else { return Ok(found) };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("read the Docker config {}", path.display())),
        };
        let config: DockerConfig = serde_json::from_str(&text)
            .with_context(|| format!("parse the Docker config {} (credentials for {registry})", path.display()))?;
        let wanted = config_key(registry);
        for (key, entry) in &config.auths {
            if config_key(key) != wanted {
                continue;
            }
            let source = format!("auths.{key:?} in {}", path.display());
            if let Some(token) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
                found.auth = RegistryAuth::Bearer(token.to_owned());
            } else if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
                use base64::Engine as _;
                let decoded = base64::engine::general_purpose::STANDARD
                    .decode(auth.trim())
                    .ok()
                    .and_then(|d| String::from_utf8(d).ok())
                    .ok_or_else(|| anyhow!("{source}: auth is not base64 of user:password"))?;
                let (user, password) =
                    decoded.split_once(':').ok_or_else(|| anyhow!("{source}: auth is not base64 of user:password"))?;
                found.auth = RegistryAuth::Basic(user.to_owned(), password.to_owned());
            } else if let (Some(user), Some(password)) = (&entry.username, &entry.password) {
                found.auth = RegistryAuth::Basic(user.clone(), password.clone());
            } else {
                continue;
            }
            found.source = Some(source);
            return Ok(found);
        }
        found.helper = config
            .cred_helpers
            .iter()
            .find(|(key, _)| config_key(key) == wanted)
            .map(|(_, helper)| helper.clone())
            .or(config.creds_store);
        Ok(found)
    }
}

#[derive(serde::Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(serde::Deserialize, Default)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    identitytoken: Option<String>,
}

/// A Docker config `auths` key as a registry host: scheme and path dropped,
/// Docker Hub's names made one (`https://index.docker.io/v1/` is `docker.io`).
fn config_key(key: &str) -> String {
    let key = key.trim_start_matches("https://").trim_start_matches("http://");
    let host = key.split('/').next().unwrap_or_default().to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => "docker.io".to_owned(),
        _ => host,
    }
}

/// One registry, for one reference.
struct Remote<'a> {
    client: Client,
    reference: &'a Reference,
    name: &'a str,
    plain: bool,
    credentials: Credentials,
}

impl Remote<'_> {
    async fn manifest(&self, reference: &Reference, what: &str) -> Result<(bytes::Bytes, String)> {
        self.client
            .pull_manifest_raw(reference, &self.credentials.auth, &oci::MANIFEST_MEDIA_TYPES)
            .await
            .map_err(|e| self.error(e, what))
    }

    /// Fetches a blob into the cache, checked; returns its size.
    async fn blob(&self, descriptor: &Descriptor, cache: &Cache) -> Result<u64> {
        let what = format!("the blob {}", descriptor.digest);
        let final_path = cache.blob_path(&descriptor.digest)?;
        let mut stream = self
            .client
            .pull_blob_stream(self.reference, descriptor.digest.as_str())
            .await
            .map_err(|e| self.error(e, &what))?;
        let temp = TempFile::new(cache.temp_path(&descriptor.digest));
        let mut file =
            tokio::fs::File::create(&temp.0).await.with_context(|| format!("create {}", temp.0.display()))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        // The client checks digests too, and ends the stream with an error on a
        // mismatch: what was read is judged here first, to say which blob and how.
        let mut stream_error = None;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    stream_error = Some(e);
                    break;
                }
            };
            size += chunk.len() as u64;
            if size > descriptor.size {
                bail!(
                    "pull {}: {what} from {} is longer than the {} bytes its descriptor says; nothing was kept",
                    self.name,
                    self.registry(),
                    descriptor.size
                );
            }
            hasher.update(&chunk);
            file.write_all(&chunk).await.with_context(|| format!("write {}", temp.0.display()))?;
        }
        file.flush().await.with_context(|| format!("write {}", temp.0.display()))?;
        drop(file);
        let actual = format!("sha256:{}", hex::encode(hasher.finalize()));
        if size == descriptor.size && actual != descriptor.digest {
            bail!(
                "pull {}: {what} from {} does not match its descriptor: its {size} bytes are {actual}, not {}; \
                 nothing was kept",
                self.name,
                self.registry(),
                descriptor.digest
            );
        }
        if let Some(e) = stream_error {
            bail!("pull {}: reading {what} from {}: {e}; nothing was kept", self.name, self.registry());
        }
        if size != descriptor.size {
            bail!(
                "pull {}: {what} from {} ended after {size} of the {} bytes its descriptor says; nothing was kept",
                self.name,
                self.registry(),
                descriptor.size
            );
        }
        temp.keep(&final_path)?;
        Ok(size)
    }

    fn registry(&self) -> &str {
        self.reference.resolve_registry()
    }

    /// An error naming the reference, the registry, the HTTP status and what to do.
    fn error(&self, error: OciDistributionError, what: &str) -> anyhow::Error {
        let registry = self.reference.registry();
        let name = self.name;
        let host = self.registry();
        let head = format!("pull {name}: {what} from the registry {host}");
        let config = self.credentials.config_path.as_ref().map_or_else(
            || "the Docker config ($DOCKER_CONFIG/config.json or ~/.docker/config.json)".to_owned(),
            |p| p.display().to_string(),
        );
        let login = |status: &str| match &self.credentials.source {
            Some(source) => anyhow!(
                "{head}: {status}: the credentials from {source} were refused; log in again (docker login {registry}) \
                 or fix them there"
            ),
            None => {
                let helper = self.credentials.helper.as_ref().map_or_else(String::new, |h| {
                    format!(" ({config} names the credential helper {h:?}, which snapsign does not run)")
                });
                anyhow!(
                    "{head}: {status}: log in: docker login {registry}, or add auths.{registry:?} to {config}{helper}"
                )
            }
        };
        match error {
            OciDistributionError::UnauthorizedError { .. } => login("HTTP 401 Unauthorized"),
            OciDistributionError::AuthenticationFailure(reason) => {
                login(&format!("the token server refused ({})", reason.chars().take(200).collect::<String>()))
            }
            OciDistributionError::ServerError { code, message, .. } => {
                let message: String = message.chars().take(300).collect();
                let hint = match code {
                    404 => "; check the name and tag",
                    429 => "; the registry limits requests: wait, or log in",
                    500.. => "; the registry failed, try again later",
                    _ => "",
                };
                anyhow!("{head}: HTTP {code}: {}{hint}", message.trim())
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let codes: Vec<String> =
                    envelope.errors.iter().map(|e| format!("{:?}: {}", e.code, e.message)).collect();
                let first = envelope.errors.first().map(|e| &e.code);
                // The status the distribution spec gives each error code.
                let (status, hint) = match first {
                    Some(OciErrorCode::Unauthorized) => return login("HTTP 401 Unauthorized"),
                    Some(OciErrorCode::Denied) => {
                        ("HTTP 403", format!("; the account may not pull {name}: docker login {registry}"))
                    }
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NotFound,
                    ) => ("HTTP 404", "; check the name and tag".to_owned()),
                    Some(OciErrorCode::Toomanyrequests) => {
                        ("HTTP 429", "; the registry limits requests: wait, or log in".to_owned())
                    }
                    _ => ("HTTP 4xx", String::new()),
                };
                anyhow!("{head}: {status} ({}){hint}", codes.join("; "))
            }
            OciDistributionError::RequestError(e) => {
                let scheme = if self.plain { "http" } else { "https" };
                let mut chain = e.to_string();
                let mut source = std::error::Error::source(&e);
                while let Some(s) = source {
                    chain.push_str(": ");
                    chain.push_str(&s.to_string());
                    source = s.source();
                }
                let hint = if self.plain {
                    String::new()
                } else {
                    format!("; if {host} serves plain HTTP, list it in the insecure registries")
                };
                anyhow!("{head}: cannot reach {scheme}://{host}: {chain}{hint}")
            }
            other => anyhow!("{head}: {other}"),
        }
    }
}

/// A temporary file removed unless kept.
struct TempFile(PathBuf);

impl TempFile {
    fn new(path: PathBuf) -> TempFile {
        TempFile(path)
    }

    fn keep(self, to: &Path) -> Result<()> {
        std::fs::rename(&self.0, to).with_context(|| format!("move {} to {}", self.0.display(), to.display()))?;
        std::mem::forget(self);
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The cache: an OCI layout, locked while one pull uses it.
struct Cache {
    dir: PathBuf,
    _lock: std::fs::File,
}

impl Cache {
    async fn open(dir: &Path) -> Result<Cache> {
        let dir = dir.to_owned();
        tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(dir.join("blobs/sha256"))
                .with_context(|| format!("create the image cache {}", dir.display()))?;
            let lock_path = dir.join(".lock");
            let lock = std::fs::File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
            lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
            let layout = dir.join(oci::OCI_LAYOUT_FILE);
            if !layout.exists() {
                write_atomically(
                    &layout,
                    format!("{{\"imageLayoutVersion\":\"{}\"}}", oci::OCI_LAYOUT_VERSION).as_bytes(),
                )?;
            }
            if !dir.join(oci::OCI_INDEX_FILE).exists() {
                write_index(&dir, &Index { schema_version: 2, ..Default::default() })?;
            }
            Ok(Cache { dir, _lock: lock })
        })
        .await
        .context("open the image cache")?
    }

    fn blob_path(&self, digest: &str) -> Result<PathBuf> {
        Ok(self.dir.join(image::blob_path(digest)?))
    }

    fn temp_path(&self, digest: &str) -> PathBuf {
        use std::sync::atomic::{AtomicU64, Ordering};
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let hex = digest.rsplit(':').next().unwrap_or_default();
        self.dir.join(format!(
            "blobs/sha256/.tmp-{hex}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }

    /// True when the blob is there with the descriptor's size (it was checked before it was kept).
    fn has(&self, descriptor: &Descriptor) -> bool {
        self.blob_path(&descriptor.digest)
            .ok()
            .and_then(|p| std::fs::symlink_metadata(p).ok())
            .is_some_and(|m| m.is_file() && m.len() == descriptor.size)
    }

    /// A small blob read back and checked, if it is there.
    fn read_verified(&self, descriptor: &Descriptor) -> Result<Option<Vec<u8>>> {
        if !self.has(descriptor) {
            return Ok(None);
        }
        let path = self.blob_path(&descriptor.digest)?;
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        Ok((oci::sha256_digest(&bytes) == descriptor.digest).then_some(bytes))
    }

    /// Keeps `bytes` as the blob `descriptor` names, after checking them.
    fn store(&self, descriptor: &Descriptor, bytes: &[u8]) -> Result<()> {
        let actual = oci::sha256_digest(bytes);
        if actual != descriptor.digest || bytes.len() as u64 != descriptor.size {
            bail!(
                "{} bytes with sha256 {actual} do not match the descriptor ({} bytes, {}); nothing was kept",
                bytes.len(),
                descriptor.size,
                descriptor.digest
            );
        }
        if self.has(descriptor) {
            return Ok(());
        }
        let temp = TempFile::new(self.temp_path(&descriptor.digest));
        std::fs::write(&temp.0, bytes).with_context(|| format!("write {}", temp.0.display()))?;
        temp.keep(&self.blob_path(&descriptor.digest)?)
    }

    /// When the manifest `digest` and everything it needs (for linux/amd64)
    /// is cached: its descriptor, the image manifest's digest and the number
    /// of config and layer blobs.
    fn complete(&self, digest: &str) -> Result<Option<(Descriptor, String, u64)>> {
        let path = self.blob_path(digest)?;
        let Ok(bytes) = std::fs::read(&path) else { return Ok(None) };
        if oci::sha256_digest(&bytes) != digest {
            return Ok(None);
        }
        let Ok(kind) = oci::parse_manifest(&bytes) else { return Ok(None) };
        let top = Descriptor {
            media_type: media_type_of(&kind),
            digest: digest.to_owned(),
            size: bytes.len() as u64,
            ..Default::default()
        };
        let (manifest_digest, manifest) = match kind {
            ManifestKind::Image(manifest) => (digest.to_owned(), manifest),
            ManifestKind::Index(index) => {
                let Ok(chosen) = oci::select_platform(&index, "the index") else { return Ok(None) };
                let Some(bytes) = self.read_verified(chosen)? else { return Ok(None) };
                match oci::parse_manifest(&bytes) {
                    Ok(ManifestKind::Image(manifest)) => (chosen.digest.clone(), manifest),
                    _ => return Ok(None),
                }
            }
        };
        let blobs: Vec<&Descriptor> = std::iter::once(&manifest.config).chain(&manifest.layers).collect();
        if blobs.iter().all(|b| self.has(b)) { Ok(Some((top, manifest_digest, blobs.len() as u64))) } else { Ok(None) }
    }

    /// Names `top` in index.json as `name` (replacing what the name meant before).
    fn record(&self, top: &Descriptor, name: &str) -> Result<()> {
        let path = self.dir.join(oci::OCI_INDEX_FILE);
        let bytes = std::fs::read(&path).with_context(|| format!("read {}", path.display()))?;
        let mut index: Index = serde_json::from_slice(&bytes)
            .with_context(|| format!("parse {} (the image cache's index)", path.display()))?;
        let mut entry = top.clone();
        entry.annotations.insert(oci::REF_NAME_ANNOTATION.to_owned(), name.to_owned());
        if index.manifests.contains(&entry) {
            return Ok(());
        }
        index.manifests.retain(|d| d.ref_name() != Some(name));
        index.manifests.push(entry);
        index.schema_version = 2;
        index.media_type = Some(oci::OCI_INDEX.to_owned());
        write_index(&self.dir, &index)
    }
}

fn write_index(dir: &Path, index: &Index) -> Result<()> {
    let json = serde_json::to_vec_pretty(index).expect("the index serializes");
    write_atomically(&dir.join(oci::OCI_INDEX_FILE), &json)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = TempFile::new(path.with_extension(format!("tmp-{}", std::process::id())));
    std::fs::write(&temp.0, bytes).with_context(|| format!("write {}", temp.0.display()))?;
    temp.keep(path)
}

#[cfg(test)]
mod tests;
