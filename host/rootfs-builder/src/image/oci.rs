//! The JSON documents of OCI images and `docker save` archives: descriptors,
//! image indexes (and Docker manifest lists), image manifests, the image
//! config, and the choice of a platform. Shared with the host's registry
//! client (`snapsign_dev_stack::registry`), which caches pulls as an OCI layout.

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::snapshot::ImageConfig;

pub const OCI_LAYOUT_FILE: &str = "oci-layout";
pub const OCI_INDEX_FILE: &str = "index.json";
pub const DOCKER_MANIFEST_FILE: &str = "manifest.json";
pub const OCI_LAYOUT_VERSION: &str = "1.0.0";

pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// The manifest media types a registry is asked for (`Accept`).
pub const MANIFEST_MEDIA_TYPES: [&str; 4] = [OCI_INDEX, OCI_MANIFEST, DOCKER_MANIFEST_LIST, DOCKER_MANIFEST];

/// `org.opencontainers.image.ref.name`: the name an index.json entry is known by.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// containerd's (and Docker 25's) full image name annotation.
pub const CONTAINERD_NAME_ANNOTATION: &str = "io.containerd.image.name";

/// The platform this builder runs images for.
pub const WANTED_OS: &str = "linux";
pub const WANTED_ARCHITECTURE: &str = "amd64";

/// Largest manifest, index or config accepted (they are read whole).
pub const MAX_JSON_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// A content descriptor (`mediaType`, `digest`, `size`, ...).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The name this entry is known by in an index.json, if any.
    pub fn ref_name(&self) -> Option<&str> {
        self.annotations
            .get(REF_NAME_ANNOTATION)
            .or_else(|| self.annotations.get(CONTAINERD_NAME_ANNOTATION))
            .map(String::as_str)
    }

    /// `sha256:abc… (name, linux/amd64)` for messages.
    pub fn describe(&self) -> String {
        let mut extra = Vec::new();
        if let Some(name) = self.ref_name() {
            extra.push(name.to_owned());
        }
        if let Some(platform) = &self.platform {
            extra.push(platform.to_string());
        }
        if extra.is_empty() { self.digest.clone() } else { format!("{} ({})", self.digest, extra.join(", ")) }
    }
}

/// An image index (`index.json`, a registry's index or Docker manifest list),
/// or an image manifest: the two are told apart by `mediaType`, else by shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    #[serde(default)]
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
}

/// A manifest document as fetched: an index or an image manifest.
#[derive(Debug, Clone)]
pub enum ManifestKind {
    Index(Index),
    Image(Manifest),
}

/// Parses a manifest or an index, by `mediaType`, else by shape (OCI allows
/// `mediaType` to be absent). Docker schema 1 manifests are refused.
pub fn parse_manifest(bytes: &[u8]) -> Result<ManifestKind> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Probe {
        #[serde(default)]
        schema_version: u32,
        #[serde(default)]
        media_type: Option<String>,
        #[serde(default)]
        manifests: Option<serde_json::Value>,
        #[serde(default)]
        config: Option<serde_json::Value>,
    }
    let probe: Probe = serde_json::from_slice(bytes).map_err(|e| anyhow!("not a manifest (JSON): {e}"))?;
    if probe.schema_version == 1 {
        bail!("a Docker schema 1 manifest, which is not supported (push the image again with a current client)");
    }
    let is_index = match probe.media_type.as_deref() {
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(other) if probe.manifests.is_none() && probe.config.is_none() => {
            bail!("media type {other} is neither an image manifest nor an index")
        }
        _ => probe.manifests.is_some() && probe.config.is_none(),
    };
    if is_index {
        Ok(ManifestKind::Index(serde_json::from_slice(bytes).map_err(|e| anyhow!("not an image index: {e}"))?))
    } else {
        Ok(ManifestKind::Image(serde_json::from_slice(bytes).map_err(|e| anyhow!("not an image manifest: {e}"))?))
    }
}

/// True for a manifest media type that is an index (OCI or Docker list).
pub fn is_index_media_type(media_type: &str) -> bool {
    media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
}

/// The entry of `index` for linux/amd64. An index of one entry without a
/// platform is that entry. Otherwise the error names the platforms there are.
pub fn select_platform<'a>(index: &'a Index, what: &str) -> Result<&'a Descriptor> {
    let wanted = |p: &Platform| p.os == WANTED_OS && p.architecture == WANTED_ARCHITECTURE;
    if let Some(found) = index.manifests.iter().find(|d| d.platform.as_ref().is_some_and(wanted)) {
        return Ok(found);
    }
    if let [only] = index.manifests.as_slice()
        && only.platform.is_none()
    {
        return Ok(only);
    }
    if index.manifests.is_empty() {
        bail!("{what} lists no manifests");
    }
    let choices: Vec<String> = index
        .manifests
        .iter()
        .map(|d| d.platform.as_ref().map_or_else(|| format!("{} (no platform)", d.digest), Platform::to_string))
        .collect();
    bail!("{what} has no manifest for {WANTED_OS}/{WANTED_ARCHITECTURE}; it has: {}", choices.join(", "))
}

/// `sha256:<hex>` → the hex part, checked: only sha256 is supported.
pub fn sha256_hex(digest: &str) -> Result<&str> {
    let Some((algorithm, hex)) = digest.split_once(':') else { bail!("digest {digest:?} has no algorithm") };
    if algorithm != "sha256" {
        bail!("digest {digest} uses {algorithm}; only sha256 is supported");
    }
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        bail!("digest {digest:?} is not 64 lower-case hex digits");
    }
    Ok(hex)
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The image config document (OCI `application/vnd.oci.image.config.v1+json`,
/// Docker's `application/vnd.docker.container.image.v1+json`): the fields
/// the builder keeps.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub config: Option<ContainerConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default)]
    pub env: Option<Vec<String>>,
    #[serde(default)]
    pub cmd: Option<Vec<String>>,
    #[serde(default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    pub stop_signal: Option<String>,
    /// Docker's `SHELL` (not in the OCI spec).
    #[serde(default)]
    pub shell: Option<Vec<String>>,
}

impl ConfigFile {
    pub fn parse(bytes: &[u8]) -> Result<ConfigFile> {
        serde_json::from_slice(bytes).map_err(|e| anyhow!("not an image config: {e}"))
    }

    pub fn platform(&self) -> Platform {
        Platform { architecture: self.architecture.clone(), os: self.os.clone(), variant: self.variant.clone() }
    }

    /// The builder's view of `config`.
    pub fn image_config(&self) -> ImageConfig {
        let Some(c) = &self.config else { return ImageConfig::default() };
        let mut out = ImageConfig::default();
        for entry in c.env.iter().flatten() {
            match entry.split_once('=') {
                Some((key, value)) => out.set_env(key, value),
                None => out.set_env(entry, ""),
            }
        }
        out.workdir = c.working_dir.clone().unwrap_or_default();
        out.user = c.user.clone().unwrap_or_default();
        out.cmd = c.cmd.clone();
        out.entrypoint = c.entrypoint.clone();
        out.labels = c.labels.clone().unwrap_or_default();
        out.exposed_ports = c
            .exposed_ports
            .iter()
            .flatten()
            .map(|(port, _)| if port.contains('/') { port.clone() } else { format!("{port}/tcp") })
            .collect();
        out.volumes = c.volumes.iter().flatten().map(|(v, _)| v.clone()).collect();
        out.stop_signal = c.stop_signal.clone().filter(|s| !s.is_empty());
        out.shell = c.shell.clone().unwrap_or_default();
        out
    }
}

/// One image of a `docker save` archive's manifest.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct DockerArchiveImage {
    pub config: String,
    #[serde(default)]
    pub repo_tags: Option<Vec<String>>,
    #[serde(default)]
    pub layers: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_maps_onto_the_builders_image_config() {
        let json = br#"{"architecture":"amd64","os":"linux","config":{
            "Env":["PATH=/usr/bin","A=1=2","B"],"Cmd":["bash"],"Entrypoint":null,"WorkingDir":"/srv",
            "User":"app:staff","ExposedPorts":{"80/tcp":{},"53/udp":{},"8080":{}},"Labels":{"k":"v"},
            "Volumes":{"/data":{}},"StopSignal":"SIGQUIT","Shell":["/bin/bash","-c"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]}}"#;
        let file = ConfigFile::parse(json).unwrap();
        let config = file.image_config();
        assert_eq!(config.env, ["PATH=/usr/bin", "A=1=2", "B="]);
        assert_eq!(config.cmd.as_deref(), Some(&["bash".to_owned()][..]));
        assert_eq!(config.entrypoint, None);
        assert_eq!(config.workdir, "/srv");
        assert_eq!(config.user, "app:staff");
        assert_eq!(config.exposed_ports.iter().collect::<Vec<_>>(), ["53/udp", "80/tcp", "8080/tcp"]);
        assert_eq!(config.labels["k"], "v");
        assert_eq!(config.volumes.iter().collect::<Vec<_>>(), ["/data"]);
        assert_eq!(config.stop_signal.as_deref(), Some("SIGQUIT"));
        assert_eq!(config.shell, ["/bin/bash", "-c"]);
        assert_eq!(file.platform().to_string(), "linux/amd64");
        assert_eq!(file.rootfs.unwrap().diff_ids, ["sha256:aa"]);
        // A config without `config` (FROM scratch with nothing set) is the default.
        assert_eq!(ConfigFile::parse(b"{}").unwrap().image_config(), ImageConfig::default());
    }

    #[test]
    fn platform_choice_names_what_there_is() {
        let entry = |arch: &str| Descriptor {
            digest: format!("sha256:{arch}"),
            platform: Some(Platform { os: "linux".into(), architecture: arch.into(), variant: None }),
            ..Default::default()
        };
        let index = Index { manifests: vec![entry("arm64"), entry("amd64")], ..Default::default() };
        assert_eq!(select_platform(&index, "x").unwrap().digest, "sha256:amd64");
        let index = Index { manifests: vec![entry("arm64"), entry("s390x")], ..Default::default() };
        let err = select_platform(&index, "the index of debian:12").unwrap_err().to_string();
        assert_eq!(err, "the index of debian:12 has no manifest for linux/amd64; it has: linux/arm64, linux/s390x");
        let single = Index {
            manifests: vec![Descriptor { digest: "sha256:x".into(), ..Default::default() }],
            ..Default::default()
        };
        assert_eq!(select_platform(&single, "x").unwrap().digest, "sha256:x");
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let index = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert!(matches!(parse_manifest(index).unwrap(), ManifestKind::Index(_)));
        let manifest = br#"{"schemaVersion":2,"config":{"digest":"sha256:a","size":1},"layers":[]}"#;
        assert!(matches!(parse_manifest(manifest).unwrap(), ManifestKind::Image(_)));
        let list = format!(r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[]}}"#);
        assert!(matches!(parse_manifest(list.as_bytes()).unwrap(), ManifestKind::Index(_)));
        let err = parse_manifest(br#"{"schemaVersion":1,"fsLayers":[]}"#).unwrap_err().to_string();
        assert!(err.contains("schema 1"), "{err}");
        assert!(sha256_hex("sha512:00").is_err());
        assert!(sha256_hex(&sha256_digest(b"")).is_ok());
    }
}
