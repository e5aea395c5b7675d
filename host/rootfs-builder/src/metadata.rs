//! metadata.json, the builder's answer to the build client (wit/protocol.md §5.8, §14),
//! written from the core's wire model with the injected faults applied.

use serde_json::Value;
use snapsign::wire::Metadata;
pub use snapsign::wire::metadata::FIELDS;

use crate::snapshot::FORMAT_VERSION;

/// What the build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Built {
    pub snapshot_id: String,
    /// `None` when the spec named no URI at all (the client then falls back to its own).
    pub snapshot_uri: Option<String>,
    pub snapshot_size_bytes: u64,
    pub rootfs_disk_bytes: u64,
    pub rootfs_node_kind: String,
    /// Only for diff builds.
    pub parent_manifest_uri: Option<String>,
    pub sha256: String,
}

impl Built {
    /// The metadata's JSON object as written (see [`crate::faults::Faults::metadata_json`] for injected faults).
    pub fn json(&self) -> Value {
        Value::Object(self.metadata().to_json())
    }

    /// The metadata this builder writes (no CAS fields: it has no CAS branch).
    pub fn metadata(&self) -> Metadata {
        Metadata {
            snapshot_id: Some(self.snapshot_id.clone()),
            snapshot_uri: self.snapshot_uri.clone(),
            snapshot_format_version: Some(FORMAT_VERSION.into()),
            snapshot_size_bytes: Some(self.snapshot_size_bytes),
            rootfs_disk_bytes: Some(self.rootfs_disk_bytes),
            rootfs_node_kind: Some(self.rootfs_node_kind.clone()),
            parent_manifest_uri: self.parent_manifest_uri.clone(),
            rootfs_format: None,
            image_size_bytes: None,
            sha256: Some(self.sha256.clone()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    /// A diff build's result.
    pub(crate) fn diff() -> Built {
        Built {
            snapshot_id: "snap-2".into(),
            snapshot_uri: Some("s3://b/child.tlsnap".into()),
            snapshot_size_bytes: 1234,
            rootfs_disk_bytes: 10737418240,
            rootfs_node_kind: "diff".into(),
            parent_manifest_uri: Some("s3://b/parent.tlsnap".into()),
            sha256: "ab".repeat(32),
        }
    }

    #[test]
    fn carries_every_field_the_client_reads() {
        assert_eq!(
            diff().json(),
            json!({"snapshot_id": "snap-2", "snapshot_uri": "s3://b/child.tlsnap",
                   "snapshot_format_version": "snapsign_tar_zstd_v1", "snapshot_size_bytes": 1234,
                   "rootfs_disk_bytes": 10737418240u64, "rootfs_node_kind": "diff",
                   "parent_manifest_uri": "s3://b/parent.tlsnap", "sha256": "ab".repeat(32)})
        );
        let base = Built { rootfs_node_kind: "base".into(), parent_manifest_uri: None, snapshot_uri: None, ..diff() };
        let value = base.json();
        assert!(value.get("parent_manifest_uri").is_none());
        assert!(value.get("snapshot_uri").is_none());
    }

    #[test]
    fn what_is_written_reads_back_through_the_clients_reader() {
        assert_eq!(Metadata::read(&diff().json()).unwrap(), diff().metadata());
    }
}
