//! The splices the new path makes into the prepared spec, which stays
//! opaque JSON (wit/protocol.md §2.4, §4.7, §5.6); its typed view is
//! [`crate::wire::Prepared`].

use serde_json::{Map, Value};

use crate::wire::{PreparedError, UploadHead};

/// A sign answer without `uri`, which must fail the build before the builder runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MissingUri;

impl std::fmt::Display for MissingUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "dataplane signed upload response is missing uri")
    }
}

impl std::error::Error for MissingUri {}

/// Splices a put_artifact answer: `spec.snapshotUri = uri`, `spec.upload = answer`; returns the uri.
pub fn splice_upload(spec: &mut Map<String, Value>, answer: Value) -> Result<String, MissingUri> {
    let uri = UploadHead::read(&answer).uri.ok_or(MissingUri)?;
    spec.insert("snapshotUri".into(), Value::String(uri.clone()));
    spec.insert("upload".into(), answer);
    Ok(uri)
}

/// Splices a get_blob answer for the parent into `spec.parent.download`.
pub fn splice_parent_download(spec: &mut Map<String, Value>, answer: Value) -> Result<(), PreparedError> {
    let parent = spec
        .get_mut("parent")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| PreparedError("prepared parent is not a JSON object".into()))?;
    parent.insert("download".into(), answer);
    Ok(())
}

/// Where a signed read besides the parent's goes in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadSlot {
    /// `parent.ancestors[i].download` (snapsign's own field).
    Ancestor(usize),
    /// `additionalLocalImages[i].download`.
    LocalImage(usize),
}

/// The reads to sign besides the parent's, with their URIs: each
/// `parent.ancestors` entry, then each `additionalLocalImages` entry, that
/// has a string `snapshotUri` not starting with `file://` and no `download` yet.
pub fn reads_to_sign(spec: &Map<String, Value>) -> Vec<(ReadSlot, String)> {
    let unsigned = |list: Option<&Value>| -> Vec<(usize, String)> {
        let Some(Value::Array(items)) = list else { return Vec::new() };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                let uri = item.get("snapshotUri")?.as_str()?;
                (!uri.starts_with("file://") && item.get("download").is_none()).then(|| (i, uri.to_owned()))
            })
            .collect()
    };
    let ancestors = unsigned(spec.get("parent").and_then(|p| p.get("ancestors")));
    let images = unsigned(spec.get("additionalLocalImages"));
    ancestors
        .into_iter()
        .map(|(i, uri)| (ReadSlot::Ancestor(i), uri))
        .chain(images.into_iter().map(|(i, uri)| (ReadSlot::LocalImage(i), uri)))
        .collect()
}

/// Splices a get_blob answer into the slot's `download`.
pub fn splice_read(spec: &mut Map<String, Value>, slot: ReadSlot, answer: Value) {
    let item = match slot {
        ReadSlot::Ancestor(i) => spec.get_mut("parent").and_then(|p| p.get_mut("ancestors")).and_then(|a| a.get_mut(i)),
        ReadSlot::LocalImage(i) => spec.get_mut("additionalLocalImages").and_then(|v| v.get_mut(i)),
    };
    if let Some(Value::Object(item)) = item {
        item.insert("download".into(), answer);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::wire::Prepared;

    fn new_shape() -> Value {
        json!({"buildId": "build-1", "snapshotId": "snapshot-1", "snapshotRelPath": "projects/p/sandbox-template-builds/b/s.tlsnap",
               "rootfsNodeKind": "diff",
               "builder": {"image": "tensorlake/rootfs-builder", "command": "tl-rootfs-build", "cpus": 2, "memoryMb": 4096, "diskMb": 30720},
               "parent": {"parentManifestUri": "s3://bucket/parent.tlsnap", "rootfsDiskBytes": 21474836480u64},
               "additionalLocalImages": [{"reference": "a", "snapshotUri": "gs://bucket/a.tlsnap"},
                                         {"reference": "cas", "snapshotUri": "file:///var/lib/builder/cas.tlsnap"},
                                         {"reference": "done", "snapshotUri": "s3://b/d", "download": {"kind": "single_get"}}],
               "futureField": {"kept": true}})
    }

    fn raw(value: Value) -> Map<String, Value> {
        let Value::Object(map) = value else { panic!("an object") };
        map
    }

    #[test]
    fn the_typed_view_reads_legacy_and_new_shapes() {
        let legacy = json!({"buildId": "build-1", "snapshotId": "snapshot-1", "snapshotUri": "s3://bucket/snapshot.tlsnap",
            "rootfsNodeKind": "base", "builder": {"image": "i", "command": "tl-rootfs-build", "cpus": 2, "memoryMb": 4096, "diskMb": 30720},
            "upload": {"kind": "single_put", "method": "PUT", "url": "https://example/upload", "headers": {}, "expiresAt": "2026-05-12T00:00:00Z"},
            "runtimeContract": {"guestRuntimeLayout": "embedded"}});
        let p = Prepared::parse(&legacy).unwrap();
        assert_eq!(
            (p.snapshot_uri.as_deref(), p.snapshot_rel_path.as_deref()),
            (Some("s3://bucket/snapshot.tlsnap"), None)
        );
        assert_eq!(p.rest["runtimeContract"]["guestRuntimeLayout"], "embedded");
        let p = Prepared::parse(&new_shape()).unwrap();
        assert_eq!(p.snapshot_uri, None);
        let parent = p.parent.unwrap();
        assert_eq!(
            (parent.parent_manifest_uri.as_str(), parent.rootfs_disk_bytes),
            ("s3://bucket/parent.tlsnap", Some(21474836480))
        );
        assert_eq!(p.builder.disk_mb, 30720);
        assert_eq!(p.rest["futureField"]["kept"], true);
        assert!(Prepared::parse(&json!({"buildId": "b"})).unwrap_err().to_string().contains("missing field"));
    }

    #[test]
    fn signed_uri_overrides_a_stale_snapshot_uri_and_a_missing_uri_errors() {
        let mut spec = raw(new_shape());
        spec.insert("snapshotUri".into(), json!("s3://stale/old.tlsnap"));
        let answer = json!({"kind": "s3_multipart", "uri": "s3://dataplane/final.tlsnap", "uploadId": "upload-1", "partSizeBytes": 67108864, "partUrls": []});
        assert_eq!(splice_upload(&mut spec, answer.clone()).unwrap(), "s3://dataplane/final.tlsnap");
        assert_eq!(spec["snapshotUri"], "s3://dataplane/final.tlsnap");
        assert_eq!(spec["upload"], answer);
        let mut untouched = spec.clone();
        assert_eq!(splice_upload(&mut untouched, json!({"kind": "s3_multipart"})), Err(MissingUri));
        assert_eq!(untouched, spec, "nothing spliced on error");
    }

    #[test]
    fn parent_and_durable_local_images_get_downloads() {
        let mut spec = raw(new_shape());
        splice_parent_download(&mut spec, json!({"kind": "single_get"})).unwrap();
        assert_eq!(spec["parent"]["download"]["kind"], "single_get");
        assert_eq!(reads_to_sign(&spec), [(ReadSlot::LocalImage(0), "gs://bucket/a.tlsnap".to_owned())]);
        splice_read(&mut spec, ReadSlot::LocalImage(0), json!({"kind": "single_get", "url": "u"}));
        assert_eq!(spec["additionalLocalImages"][0]["download"]["url"], "u");
        // The parent's own parents (snapsign's field) are signed first, oldest first.
        spec["parent"]["ancestors"] =
            json!([{"snapshotUri": "s3://b/root.tlsnap"}, {"snapshotUri": "s3://b/mid.tlsnap"}]);
        let reads = reads_to_sign(&spec);
        assert_eq!(
            reads,
            [
                (ReadSlot::Ancestor(0), "s3://b/root.tlsnap".to_owned()),
                (ReadSlot::Ancestor(1), "s3://b/mid.tlsnap".to_owned())
            ]
        );
        splice_read(&mut spec, ReadSlot::Ancestor(1), json!({"url": "m"}));
        assert_eq!(spec["parent"]["ancestors"][1]["download"]["url"], "m");
        assert_eq!(reads_to_sign(&spec).len(), 1, "a read already signed is not signed again");
        let mut no_parent = serde_json::Map::new();
        assert!(splice_parent_download(&mut no_parent, json!({})).is_err());
    }
}
