//! The completion request, from metadata.json, the prepared spec and the
//! signed uri (wit/protocol.md §2.6, §5.8).

use serde_json::Value;

use crate::wire::{CompleteRequest, Metadata, Prepared};

/// Snapshot format of the CAS-streaming branch.
pub const CAS_FORMAT: &str = "content_addressed_streaming_v1";

/// Why no completion can be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompleteError {
    /// metadata's snapshot_uri differs from the dataplane-signed uri.
    UriMismatch { metadata: String, signed: String },
    /// No uri from any source.
    NoSnapshotUri,
    /// A required metadata field is missing (or not a number).
    MissingField { field: &'static str, numeric: bool },
    /// A diff build with no parent manifest from metadata or prepare.
    NoParentManifest,
    /// metadata.json is not a JSON object.
    NotAnObject,
}

impl std::fmt::Display for CompleteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CompleteError::UriMismatch { metadata, signed } => {
                write!(f, "rootfs builder metadata snapshot_uri {metadata} did not match dataplane signed uri {signed}")
            }
            CompleteError::NoSnapshotUri => write!(f, "rootfs build completed without snapshot_uri"),
            CompleteError::MissingField { field, numeric } => {
                write!(f, "rootfs builder metadata is missing {}{field}", if *numeric { "numeric " } else { "" })
            }
            CompleteError::NoParentManifest => write!(f, "rootfs diff build completed without parent_manifest_uri"),
            CompleteError::NotAnObject => write!(f, "rootfs builder metadata is not a JSON object"),
        }
    }
}

impl std::error::Error for CompleteError {}

/// The completion URI: signed first (metadata must agree), then metadata, then prepared.
pub fn snapshot_uri(
    signed: Option<&str>,
    metadata: Option<&str>,
    prepared: Option<&str>,
) -> Result<String, CompleteError> {
    match (signed, metadata, prepared) {
        (Some(s), Some(m), _) if s != m => Err(CompleteError::UriMismatch { metadata: m.into(), signed: s.into() }),
        (Some(s), _, _) => Ok(s.into()),
        (None, Some(m), _) if !m.is_empty() => Ok(m.into()),
        (None, _, Some(p)) if !p.is_empty() => Ok(p.into()),
        _ => Err(CompleteError::NoSnapshotUri),
    }
}

/// The `POST …/complete` body.
pub fn completion(
    prepared: &Prepared,
    signed_uri: Option<&str>,
    metadata: &Value,
    computed_rootfs_bytes: u64,
) -> Result<CompleteRequest, CompleteError> {
    let meta = Metadata::read(metadata).map_err(|_| CompleteError::NotAnObject)?;
    let number =
        |value: Option<u64>, field: &'static str| value.ok_or(CompleteError::MissingField { field, numeric: true });
    let uri = snapshot_uri(signed_uri, meta.snapshot_uri.as_deref(), prepared.snapshot_uri.as_deref())?;
    let snapshot_id = meta.snapshot_id.unwrap_or_else(|| prepared.snapshot_id.clone());
    let node_kind = meta.rootfs_node_kind.unwrap_or_else(|| prepared.rootfs_node_kind.clone());
    let cas = meta.rootfs_format.as_deref() == Some("cas-streaming");
    let (format, size, disk) = if cas {
        (CAS_FORMAT.to_owned(), number(meta.image_size_bytes, "image_size_bytes")?, computed_rootfs_bytes)
    } else {
        let format = meta
            .snapshot_format_version
            .ok_or(CompleteError::MissingField { field: "snapshot_format_version", numeric: false })?;
        (
            format,
            number(meta.snapshot_size_bytes, "snapshot_size_bytes")?,
            number(meta.rootfs_disk_bytes, "rootfs_disk_bytes")?,
        )
    };
    let parent = meta.parent_manifest_uri.or_else(|| {
        (node_kind == "diff").then(|| prepared.parent.as_ref().map(|p| p.parent_manifest_uri.clone())).flatten()
    });
    if node_kind == "diff" && parent.is_none() {
        return Err(CompleteError::NoParentManifest);
    }
    Ok(CompleteRequest {
        snapshot_id,
        snapshot_uri: uri,
        snapshot_format_version: format,
        snapshot_size_bytes: size,
        rootfs_disk_bytes: disk,
        rootfs_node_kind: node_kind,
        parent_manifest_uri: parent,
        rootfs_format: cas.then(|| "cas-streaming".to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// The completion as the JSON the platform receives.
    fn completion_json(
        prepared: &Prepared,
        signed_uri: Option<&str>,
        metadata: &Value,
        computed_rootfs_bytes: u64,
    ) -> Result<Value, CompleteError> {
        completion(prepared, signed_uri, metadata, computed_rootfs_bytes).map(|c| serde_json::to_value(c).unwrap())
    }

    fn prepared(kind: &str, uri: Option<&str>, parent: bool) -> Prepared {
        let mut v = json!({"buildId": "build-1", "snapshotId": "snapshot-1", "rootfsNodeKind": kind,
            "builder": {"image": "i", "command": "c", "cpus": 1, "memoryMb": 1, "diskMb": 1}});
        if let Some(uri) = uri {
            v["snapshotUri"] = json!(uri);
        }
        if parent {
            v["parent"] = json!({"parentManifestUri": "s3://bucket/parent.tlsnap"});
        }
        Prepared::parse(&v).unwrap()
    }

    fn meta() -> Value {
        json!({"snapshot_id": "snapshot-1", "snapshot_uri": "s3://bucket/child.tlsnap", "snapshot_format_version": "durable_archive_v1",
               "snapshot_size_bytes": 1234, "rootfs_disk_bytes": 10737418240u64, "rootfs_node_kind": "diff",
               "parent_manifest_uri": "s3://bucket/parent.tlsnap"})
    }

    #[test]
    fn uri_rule_signed_then_metadata_then_prepared_never_empty() {
        assert_eq!(snapshot_uri(Some("s3://s"), Some("s3://s"), Some("s3://stale")), Ok("s3://s".into()));
        assert_eq!(snapshot_uri(Some("s3://s"), None, Some("s3://stale")), Ok("s3://s".into()));
        let mismatch = snapshot_uri(Some("s3://s"), Some("s3://m"), None).unwrap_err();
        assert_eq!(
            mismatch.to_string(),
            "rootfs builder metadata snapshot_uri s3://m did not match dataplane signed uri s3://s"
        );
        assert_eq!(snapshot_uri(None, Some("s3://m"), Some("s3://p")), Ok("s3://m".into()));
        assert_eq!(snapshot_uri(None, None, Some("s3://p")), Ok("s3://p".into()));
        assert_eq!(snapshot_uri(None, Some(""), Some("")), Err(CompleteError::NoSnapshotUri));
        assert_eq!(snapshot_uri(None, None, None), Err(CompleteError::NoSnapshotUri));
    }

    #[test]
    fn builds_the_protocol_example_completion() {
        let body =
            completion_json(&prepared("diff", None, true), Some("s3://bucket/child.tlsnap"), &meta(), 0).unwrap();
        assert_eq!(
            body,
            json!({"snapshotId": "snapshot-1", "snapshotUri": "s3://bucket/child.tlsnap", "snapshotFormatVersion": "durable_archive_v1",
                   "snapshotSizeBytes": 1234, "rootfsDiskBytes": 10737418240u64, "rootfsNodeKind": "diff",
                   "parentManifestUri": "s3://bucket/parent.tlsnap"})
        );
    }

    #[test]
    fn camel_case_numeric_strings_fallbacks_and_missing_fields() {
        let m = json!({"snapshotUri": "s3://m", "snapshotFormatVersion": "v", "snapshotSizeBytes": "77", "rootfsDiskBytes": 5});
        let body = completion_json(&prepared("base", Some("s3://p"), false), None, &m, 0).unwrap();
        assert_eq!((body["snapshotUri"].as_str(), body["snapshotSizeBytes"].as_u64()), (Some("s3://m"), Some(77)));
        assert_eq!(body["snapshotId"], "snapshot-1", "falls back to prepare");
        assert!(body.get("parentManifestUri").is_none(), "omitted when absent");
        let mut m = meta();
        m.as_object_mut().unwrap().remove("rootfs_disk_bytes");
        let err = completion_json(&prepared("diff", None, true), Some("s3://bucket/child.tlsnap"), &m, 0).unwrap_err();
        assert_eq!(err.to_string(), "rootfs builder metadata is missing numeric rootfs_disk_bytes");
        // Snake key present but null hides the camel one.
        let m = json!({"snapshot_uri": null, "snapshotUri": "s3://camel", "snapshot_format_version": "v", "snapshot_size_bytes": 1, "rootfs_disk_bytes": 1});
        assert_eq!(
            completion_json(&prepared("base", Some("s3://p"), false), None, &m, 0).unwrap()["snapshotUri"],
            "s3://p"
        );
    }

    #[test]
    fn diff_builds_need_a_parent_manifest_and_cas_switches_fields() {
        let mut m = meta();
        m.as_object_mut().unwrap().remove("parent_manifest_uri");
        let from_prepare =
            completion_json(&prepared("diff", None, true), Some("s3://bucket/child.tlsnap"), &m, 0).unwrap();
        assert_eq!(from_prepare["parentManifestUri"], "s3://bucket/parent.tlsnap");
        assert_eq!(
            completion_json(&prepared("diff", None, false), Some("s3://bucket/child.tlsnap"), &m, 0),
            Err(CompleteError::NoParentManifest)
        );
        let cas = json!({"rootfs_format": "cas-streaming", "image_size_bytes": 99, "rootfs_node_kind": "base"});
        let body = completion_json(&prepared("base", Some("s3://p"), false), None, &cas, 4096).unwrap();
        assert_eq!(
            (
                body["snapshotFormatVersion"].as_str(),
                body["snapshotSizeBytes"].as_u64(),
                body["rootfsDiskBytes"].as_u64(),
                body["rootfsFormat"].as_str()
            ),
            (Some(CAS_FORMAT), Some(99), Some(4096), Some("cas-streaming"))
        );
    }
}
