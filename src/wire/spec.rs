//! spec.json as the builder reads it (wit/protocol.md §5.6, §14): the
//! prepare answer with the client's splices and fields. Only these fields are
//! read; every other field is ignored.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::prepare::{LocalImage, Parent};
use super::sign::Upload;

/// What the reference builder reads of spec.json.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    /// The Dockerfile text.
    pub dockerfile: String,
    /// The unpacked build context (relative paths are relative to spec.json).
    pub context_dir: String,
    /// The snapshot's id.
    pub snapshot_id: String,
    /// Where the snapshot goes (the signed uri in the new shape).
    #[serde(default)]
    pub snapshot_uri: Option<String>,
    /// `base` or `diff`.
    pub rootfs_node_kind: String,
    /// The rootfs size the build may fill.
    pub rootfs_disk_bytes: u64,
    /// The build's id (for the log).
    #[serde(default)]
    pub build_id: Option<String>,
    /// The final FROM, as the client saw it.
    #[serde(default)]
    pub base_image: Option<String>,
    /// Set on image imports, which route to a different builder (§5.6).
    #[serde(default)]
    pub import_image_reference: Option<String>,
    /// The parent of a diff build, with its `download`.
    #[serde(default)]
    pub parent: Option<Parent>,
    /// Where the archive goes.
    #[serde(default)]
    pub upload: Option<Upload>,
    /// Templates the Dockerfile names besides the parent, each with its `download`.
    #[serde(default)]
    pub additional_local_images: Vec<LocalImage>,
}

impl Spec {
    /// Parses spec.json.
    pub fn from_json(text: &str) -> Result<Spec, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// `snapshotUri`, or failing that the `uri` of the upload block.
    pub fn snapshot_uri(&self) -> Option<&str> {
        self.snapshot_uri.as_deref().or_else(|| self.upload.as_ref().and_then(Upload::uri))
    }
}

/// The fields the build client writes into the prepare answer to make
/// spec.json (§5.6), over any of the same name; [`Spec`] reads them back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientFields<'a> {
    /// The Dockerfile text.
    pub dockerfile: &'a str,
    /// Where the context is unpacked in the sandbox.
    pub context_dir: &'a str,
    /// The final FROM, as the client saw it.
    pub base_image: &'a str,
    /// The rootfs size the build may fill.
    pub rootfs_disk_bytes: u64,
    /// An image import's reference (`context:<path>`), when this build is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub import_image_reference: Option<&'a str>,
}

impl ClientFields<'_> {
    /// Writes these fields into `spec`, replacing the prepare answer's own.
    pub fn write_into(&self, spec: &mut Map<String, Value>) {
        if let Value::Object(fields) = serde_json::to_value(self).expect("client fields serialize") {
            spec.extend(fields);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_fields_written_into_a_prepare_answer_read_back_as_the_spec() {
        let mut spec: Map<String, Value> = serde_json::from_str(
            r#"{"buildId":"b","snapshotId":"s","rootfsNodeKind":"base","rootfsDiskBytes":1,"baseImage":"stale"}"#,
        )
        .unwrap();
        let fields = ClientFields {
            dockerfile: "FROM scratch\n",
            context_dir: "/build/context",
            base_image: "scratch",
            rootfs_disk_bytes: 2048,
            import_image_reference: None,
        };
        fields.write_into(&mut spec);
        let read = Spec::from_json(&Value::Object(spec).to_string()).unwrap();
        assert_eq!(
            (read.dockerfile.as_str(), read.context_dir.as_str(), read.base_image.as_deref(), read.rootfs_disk_bytes),
            (fields.dockerfile, fields.context_dir, Some(fields.base_image), fields.rootfs_disk_bytes)
        );
        assert_eq!((read.build_id.as_deref(), read.snapshot_id.as_str()), (Some("b"), "s"));
    }
    use crate::wire::sign::{Download, PartUrl};

    #[test]
    fn legacy_single_put_spec_parses_and_unknown_fields_are_ignored() {
        let spec = Spec::from_json(
            r#"{
              "buildId": "build-1", "snapshotId": "snapshot-1", "snapshotUri": "s3://bucket/snapshot.tlsnap",
              "rootfsNodeKind": "base", "rootfsDiskBytes": 10737418240,
              "builder": {"image":"tensorlake/rootfs-builder","command":"tl-rootfs-build","cpus":2,"memoryMb":4096,"diskMb":30720},
              "upload": {"kind":"single_put","method":"PUT","url":"http://127.0.0.1:1/up?X-Amz-Signature=abc",
                         "headers":{"x-amz-meta-a":"1"},"expiresAt":"2026-05-12T00:00:00Z","somethingNew":1},
              "runtimeContract": {"guestRuntimeLayout":"embedded"},
              "dockerfile": "FROM scratch\n", "contextDir": "/var/lib/tensorlake/rootfs-builder/build/context",
              "baseImage": "scratch", "dockerConfigJson": "{}"
            }"#,
        )
        .unwrap();
        assert_eq!(spec.build_id.as_deref(), Some("build-1"));
        assert_eq!(spec.rootfs_disk_bytes, 10737418240);
        assert_eq!(spec.snapshot_uri(), Some("s3://bucket/snapshot.tlsnap"));
        let Some(Upload::SinglePut(put)) = &spec.upload else { panic!("{:?}", spec.upload) };
        assert_eq!(put.method, "PUT");
        assert_eq!(put.headers["x-amz-meta-a"], "1");
        assert!(spec.parent.is_none());
    }

    #[test]
    fn dataplane_multipart_spec_with_parent_parses() {
        let spec = Spec::from_json(
            r#"{
              "buildId": "b", "snapshotId": "s", "snapshotRelPath": "p/s.tlsnap", "rootfsNodeKind": "diff",
              "rootfsDiskBytes": 1048576, "dockerfile": "FROM base\n", "contextDir": "/ctx",
              "parent": {"parentManifestUri": "s3://bucket/parent.tlsnap", "rootfsDiskBytes": 1048576,
                         "snapshotSha256": "ab12",
                         "download": {"kind":"single_get","uri":"s3://bucket/parent.tlsnap","method":"GET",
                                      "url":"http://127.0.0.1:1/parent","expiresAt":"x"}},
              "upload": {"kind":"s3_multipart","uri":"s3://dataplane/final.tlsnap","uploadId":"upload-1",
                         "partSizeBytes":5242880,"maxParts":3,
                         "partUrls":[{"partNumber":1,"url":"http://h/1"},{"partNumber":2,"url":"http://h/2"}],
                         "completeUrl":"http://h/c","abortUrl":"http://h/a","expiresAt":"x"}
            }"#,
        )
        .unwrap();
        // No snapshotUri: the upload's uri stands in.
        assert_eq!(spec.snapshot_uri(), Some("s3://dataplane/final.tlsnap"));
        let parent = spec.parent.as_ref().unwrap();
        assert_eq!(parent.snapshot_sha256.as_deref(), Some("ab12"));
        let Some(Download::SingleGet(get)) = &parent.download else { panic!() };
        assert_eq!(get.url, "http://127.0.0.1:1/parent");
        let Some(Upload::S3Multipart(m)) = &spec.upload else { panic!() };
        assert_eq!((m.upload_id.as_str(), m.part_size_bytes, m.max_parts), ("upload-1", 5242880, Some(3)));
        assert_eq!(m.part_urls[1], PartUrl { part_number: 2, url: "http://h/2".into() });
        assert_eq!(m.abort_url.as_deref(), Some("http://h/a"));
    }

    #[test]
    fn missing_required_fields_and_unknown_upload_kinds_are_named() {
        let err =
            Spec::from_json(r#"{"snapshotId":"s","rootfsNodeKind":"base","rootfsDiskBytes":1,"contextDir":"/c"}"#)
                .unwrap_err()
                .to_string();
        assert!(err.contains("missing field `dockerfile`"), "{err}");
        let err = Spec::from_json(
            r#"{"dockerfile":"","contextDir":"/c","snapshotId":"s","rootfsNodeKind":"base","rootfsDiskBytes":1,
                "upload":{"kind":"gcs_resumable","url":"x"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown variant `gcs_resumable`"), "{err}");
    }
}
