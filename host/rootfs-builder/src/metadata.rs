//! metadata.json, the builder's answer to the build client (wit/protocol.md §5.8).

use serde_json::{Map, Value, json};

use crate::faults::Faults;
use crate::snapshot::FORMAT_VERSION;

/// Every field this builder writes.
pub const FIELDS: &[&str] = &[
    "snapshot_id",
    "snapshot_uri",
    "snapshot_format_version",
    "snapshot_size_bytes",
    "rootfs_disk_bytes",
    "rootfs_node_kind",
    "parent_manifest_uri",
    "sha256",
];

/// What the build produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
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

/// The JSON object, with the injected faults applied.
pub fn metadata_json(metadata: &Metadata, faults: &Faults) -> Value {
    let mut object = Map::new();
    object.insert("snapshot_id".into(), json!(metadata.snapshot_id));
    if let Some(uri) = faults.metadata_uri.as_ref().or(metadata.snapshot_uri.as_ref()) {
        object.insert("snapshot_uri".into(), json!(uri));
    }
    object.insert("snapshot_format_version".into(), json!(FORMAT_VERSION));
    object.insert("snapshot_size_bytes".into(), json!(metadata.snapshot_size_bytes));
    object.insert("rootfs_disk_bytes".into(), json!(metadata.rootfs_disk_bytes));
    object.insert("rootfs_node_kind".into(), json!(metadata.rootfs_node_kind));
    if let Some(parent) = &metadata.parent_manifest_uri {
        object.insert("parent_manifest_uri".into(), json!(parent));
    }
    object.insert("sha256".into(), json!(metadata.sha256));
    for field in &faults.metadata_missing {
        object.remove(field);
    }
    Value::Object(object)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff() -> Metadata {
        Metadata {
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
            metadata_json(&diff(), &Faults::default()),
            json!({"snapshot_id": "snap-2", "snapshot_uri": "s3://b/child.tlsnap",
                   "snapshot_format_version": "snapsign_tar_zstd_v1", "snapshot_size_bytes": 1234,
                   "rootfs_disk_bytes": 10737418240u64, "rootfs_node_kind": "diff",
                   "parent_manifest_uri": "s3://b/parent.tlsnap", "sha256": "ab".repeat(32)})
        );
        let base =
            Metadata { rootfs_node_kind: "base".into(), parent_manifest_uri: None, snapshot_uri: None, ..diff() };
        let value = metadata_json(&base, &Faults::default());
        assert!(value.get("parent_manifest_uri").is_none());
        assert!(value.get("snapshot_uri").is_none());
    }

    #[test]
    fn faults_drop_a_field_or_replace_the_uri() {
        let faults = Faults {
            metadata_missing: vec!["rootfs_disk_bytes".into()],
            metadata_uri: Some("s3://b/elsewhere".into()),
            ..Faults::default()
        };
        let value = metadata_json(&diff(), &faults);
        assert!(value.get("rootfs_disk_bytes").is_none());
        assert_eq!(value["snapshot_uri"], "s3://b/elsewhere");
        assert_eq!(value["snapshot_size_bytes"], 1234);
    }
}
