//! `snapshot.json`, the first entry of every snapshot archive, and the image
//! config it carries. Format: see the crate docs (`snapsign_tar_zstd_v1`).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The archive format this builder writes and accepts as a parent.
pub const FORMAT_VERSION: &str = "snapsign_tar_zstd_v1";

/// Name of the manifest entry, always first in the archive.
pub const MANIFEST_ENTRY: &str = "snapshot.json";

/// Prefix of every rootfs entry in the archive.
pub const ROOTFS_PREFIX: &str = "rootfs/";

/// The image config recorded by ENV, WORKDIR, USER, CMD, ENTRYPOINT, LABEL,
/// EXPOSE (and SHELL, VOLUME, STOPSIGNAL), inherited by diff builds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct ImageConfig {
    /// `KEY=value` entries in the order they were first set.
    pub env: Vec<String>,
    /// Absolute path; empty means `/`.
    pub workdir: String,
    pub user: String,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub labels: BTreeMap<String, String>,
    /// `port/proto`, e.g. `8080/tcp`.
    pub exposed_ports: BTreeSet<String>,
    /// The shell used for shell-form CMD/ENTRYPOINT; empty means `/bin/sh -c`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub shell: Vec<String>,
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub volumes: BTreeSet<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
}

impl ImageConfig {
    /// Sets `key` in `env`, replacing an earlier value in place.
    pub fn set_env(&mut self, key: &str, value: &str) {
        let entry = format!("{key}={value}");
        match self.env.iter_mut().find(|e| e.split_once('=').map(|(k, _)| k) == Some(key)) {
            Some(existing) => *existing = entry,
            None => self.env.push(entry),
        }
    }

    /// The env entries as a map (for substitution).
    pub fn env_map(&self) -> BTreeMap<String, String> {
        self.env
            .iter()
            .map(|e| match e.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (e.clone(), String::new()),
            })
            .collect()
    }

    /// The working directory, `/` when unset.
    pub fn workdir_or_root(&self) -> &str {
        if self.workdir.is_empty() { "/" } else { &self.workdir }
    }

    /// The shell prefix for shell-form commands.
    pub fn shell_or_default(&self) -> Vec<String> {
        if self.shell.is_empty() { vec!["/bin/sh".into(), "-c".into()] } else { self.shell.clone() }
    }
}

/// The content of `snapshot.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotManifest {
    pub format_version: String,
    pub snapshot_id: String,
    /// `base` (the whole tree) or `diff` (only what changed over the parent).
    pub node_kind: String,
    pub parent_manifest_uri: Option<String>,
    pub config: ImageConfig,
    /// Number of entries under `rootfs/` in the archive.
    pub files: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_json_has_the_documented_field_names() {
        let mut config = ImageConfig::default();
        config.set_env("PATH", "/bin");
        config.set_env("A", "1");
        config.set_env("PATH", "/usr/bin");
        config.exposed_ports.insert("80/tcp".into());
        let manifest = SnapshotManifest {
            format_version: FORMAT_VERSION.into(),
            snapshot_id: "snap-1".into(),
            node_kind: "base".into(),
            parent_manifest_uri: None,
            config,
            files: 2,
        };
        let json = serde_json::to_value(&manifest).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "formatVersion": "snapsign_tar_zstd_v1", "snapshotId": "snap-1", "nodeKind": "base",
                "parentManifestUri": null, "files": 2,
                "config": {"env": ["PATH=/usr/bin", "A=1"], "workdir": "", "user": "", "cmd": null, "entrypoint": null,
                           "labels": {}, "exposedPorts": ["80/tcp"]}
            })
        );
        let back: SnapshotManifest = serde_json::from_value(json).unwrap();
        assert_eq!(back, manifest);
    }

    #[test]
    fn config_fields_missing_from_an_older_parent_default() {
        let config: ImageConfig = serde_json::from_str(r#"{"env":["A=1"],"future":true}"#).unwrap();
        assert_eq!(config.env_map()["A"], "1");
        assert_eq!(config.workdir_or_root(), "/");
        assert_eq!(config.shell_or_default(), ["/bin/sh", "-c"]);
    }
}
