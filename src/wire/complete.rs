//! The completion request (`POST …/sandbox-template-builds/{buildId}/complete`,
//! wit/protocol.md §2.6): the build flow writes it, the dev stack reads it.

use serde::{Deserialize, Serialize};

/// What a finished build registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CompleteRequest {
    /// The snapshot's id.
    pub snapshot_id: String,
    /// Where the snapshot is (§5.8's rule).
    pub snapshot_uri: String,
    /// The archive format.
    pub snapshot_format_version: String,
    /// The archive's size.
    pub snapshot_size_bytes: u64,
    /// The rootfs size.
    pub rootfs_disk_bytes: u64,
    /// `base` or `diff`.
    pub rootfs_node_kind: String,
    /// The parent of a diff build (omitted when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_manifest_uri: Option<String>,
    /// `cas-streaming` on the CAS branch only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_format: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// wit/protocol.md §2.6's example.
    const EXAMPLE: &str = r#"{"snapshotId":"snap-7","snapshotUri":"s3://snapshots/builds/default/sandbox-template-builds/build-7/snap-7.tlsnap","snapshotFormatVersion":"snapsign_tar_zstd_v1","snapshotSizeBytes":1234,"rootfsDiskBytes":10737418240,"rootfsNodeKind":"diff","parentManifestUri":"s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap"}"#;

    #[test]
    fn the_example_round_trips_byte_for_byte_and_absent_fields_are_omitted() {
        let request: CompleteRequest = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(request.snapshot_size_bytes, 1234);
        assert_eq!(serde_json::to_string(&request).unwrap(), EXAMPLE);
        let base = CompleteRequest { parent_manifest_uri: None, rootfs_node_kind: "base".into(), ..request };
        let text = serde_json::to_string(&base).unwrap();
        assert!(!text.contains("parentManifestUri") && !text.contains("rootfsFormat"), "{text}");
        let err = serde_json::from_str::<CompleteRequest>(r#"{"snapshotId":"s"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `snapshotUri`"), "{err}");
    }
}
