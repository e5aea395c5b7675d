//! The prepare answer (`POST …/sandbox-template-builds`, wit/protocol.md
//! §2.4): the fields the build client types. The dev stack writes it with
//! this type; the build flow reads it, and passes the raw object on as
//! spec.json (§5.6), unknown fields included. What the client passes through
//! unread (`upload`, `parent.download`, …) stays untyped here, so a shape
//! only the platform's builder knows still passes.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::sign::Download;

/// A prepared build, as the client types it; everything else rides in `rest`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Prepared {
    /// The build's id (the complete path).
    pub build_id: String,
    /// The snapshot's id (completion fallback).
    pub snapshot_id: String,
    /// `base` or `diff`.
    pub rootfs_node_kind: String,
    /// The legacy destination (or a stale one in the both-fields shape).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_uri: Option<String>,
    /// The new-shape marker: the client asks the dataplane to sign this path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_rel_path: Option<String>,
    /// The builder sandbox and command.
    pub builder: Builder,
    /// The parent of a diff build; its `download` passes through unread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<Parent<Value>>,
    /// Everything the client passes through unread (`upload`, `runtimeContract`, `additionalLocalImages`, …).
    #[serde(flatten)]
    pub rest: Map<String, Value>,
}

/// The prepared `builder` block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Builder {
    /// Sandbox image.
    pub image: String,
    /// Shell words of the builder command.
    pub command: String,
    /// CPUs.
    pub cpus: f64,
    /// Memory, MiB.
    pub memory_mb: i64,
    /// Disk, MiB.
    pub disk_mb: u64,
}

/// The `parent` block of a diff build: in the prepare answer (`D` is then
/// opaque JSON) and in spec.json (`D` is the typed [`Download`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Parent<D = Download> {
    /// The parent snapshot's URI (get_blob target).
    pub parent_manifest_uri: String,
    /// The parent's rootfs size, the default size of a diff build (§5.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rootfs_disk_bytes: Option<u64>,
    /// snapsign's own field: hex sha256 of the parent archive, checked by the reference builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_sha256: Option<String>,
    /// How to fetch the parent (presigned by the legacy platform, or spliced by the client).
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub download: Option<D>,
    /// snapsign's own field: the parent's own parents, oldest first, when the
    /// parent is itself a diff: a diff snapshot holds one layer, and the
    /// builder lays them all out (each `download` signed like the parent's).
    #[serde(default = "Vec::new", skip_serializing_if = "Vec::is_empty")]
    pub ancestors: Vec<Ancestor<D>>,
}

/// One of [`Parent::ancestors`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ancestor<D = Download> {
    /// The snapshot's URI (get_blob target).
    pub snapshot_uri: String,
    /// Hex sha256 of the snapshot, checked by the reference builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_sha256: Option<String>,
    /// How to fetch it.
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub download: Option<D>,
}

/// One `additionalLocalImages` entry of a prepare answer (`D` opaque JSON)
/// and of spec.json (`D` the typed [`Download`]): a template the Dockerfile
/// names besides the final FROM (an earlier stage's FROM, `COPY --from=`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalImage<D = Download> {
    /// The reference the Dockerfile wrote.
    pub reference: String,
    /// The template's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    /// Its snapshot's URI (get_blob target in the new shape).
    pub snapshot_uri: String,
    /// snapsign's own field: hex sha256 of the snapshot, checked by the reference builder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_sha256: Option<String>,
    /// How to fetch it (presigned by the legacy platform, or spliced by the client).
    #[serde(default = "Option::default", skip_serializing_if = "Option::is_none")]
    pub download: Option<D>,
}

/// The prepare request (`POST …/sandbox-template-builds`, wit/protocol.md
/// §2.3): the build flow writes it, the dev stack reads it. Both keys of a
/// base build's parent are sent (`rootfsNodeKind: "base"`, `parentTemplate:
/// null`); the fields the official client may leave out read as empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PrepareRequest {
    /// The template's name (plain: other namespaces say `owner/name`).
    pub name: String,
    /// The Dockerfile's text.
    pub dockerfile: String,
    /// The final FROM after `ARG` substitution (`scratch`, or a reference).
    #[serde(default)]
    pub base_image: String,
    /// Whether other namespaces may build FROM the template.
    #[serde(default)]
    pub public: bool,
    /// `diff` exactly when the final FROM resolved to a template, else `base`.
    pub rootfs_node_kind: String,
    /// The template a diff build starts from, as the lookup found it.
    #[serde(default)]
    pub parent_template: Option<TemplateRef>,
    /// Templates the build needs besides its parent (earlier FROMs,
    /// `COPY --from=`), as the lookups found them.
    #[serde(default)]
    pub additional_local_images: Vec<TemplateRef>,
}

/// A template as a lookup answers it (`GET …/sandbox-templates/by-name/…`,
/// wit/protocol.md §2.2): the fields the build client reads. The dev stack
/// answers with its whole record (§2.6), of which these are a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateFound {
    /// The template's id.
    pub id: String,
    /// The template's name.
    pub name: String,
    /// The template's snapshot.
    pub snapshot_id: String,
    /// Whether other namespaces may build on it (default false).
    #[serde(default)]
    pub public: bool,
    /// The snapshot's format, when the platform says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_format_version: Option<String>,
}

impl TemplateFound {
    /// The prepare request's `parentTemplate` for this template, found by `reference`.
    pub fn as_parent(&self, reference: &str) -> TemplateRef {
        TemplateRef {
            template_id: Some(self.id.clone()),
            name: Some(self.name.clone()),
            reference: Some(reference.to_owned()),
            snapshot_id: Some(self.snapshot_id.clone()),
            public: self.public,
        }
    }
}

/// A template as the prepare request names it (`parentTemplate`, from the
/// §2.2 lookup): by `templateId`, else by `reference` (or `name`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TemplateRef {
    /// The template's id.
    #[serde(default)]
    pub template_id: Option<String>,
    /// The template's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The reference the Dockerfile wrote (`name` or `owner/name`).
    #[serde(default)]
    pub reference: Option<String>,
    /// The template's snapshot.
    #[serde(default)]
    pub snapshot_id: Option<String>,
    /// Whether the template is public.
    #[serde(default)]
    pub public: bool,
}

/// A prepare answer that is not a prepared build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedError(pub String);

impl std::fmt::Display for PreparedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "prepare answer {}", self.0)
    }
}

impl std::error::Error for PreparedError {}

impl Prepared {
    /// Reads the typed view of prepare's JSON answer.
    pub fn parse(value: &Value) -> Result<Self, PreparedError> {
        if !value.is_object() {
            return Err(PreparedError("is not a JSON object".into()));
        }
        Prepared::deserialize(value).map_err(|e| PreparedError(format!("is not a prepared build: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// wit/protocol.md §2.4's new-shape answer, with its sha256 filled in.
    const NEW_SHAPE: &str = r#"{"buildId":"build-7","snapshotId":"snap-7","rootfsNodeKind":"diff","snapshotRelPath":"sandbox-template-builds/build-7/snap-7.tlsnap","builder":{"image":"snapsign/rootfs-builder","command":"tl-rootfs-build","cpus":2.0,"memoryMb":1024,"diskMb":2048},"parent":{"parentManifestUri":"s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap","rootfsDiskBytes":10737418240,"snapshotSha256":"0a1b"},"runtimeContract":{"emulator":"snapsign dev","guestRuntimeLayout":"embedded"}}"#;

    #[test]
    fn the_new_shape_round_trips_byte_for_byte() {
        let prepared = Prepared::parse(&serde_json::from_str(NEW_SHAPE).unwrap()).unwrap();
        assert_eq!(prepared.snapshot_rel_path.as_deref(), Some("sandbox-template-builds/build-7/snap-7.tlsnap"));
        assert_eq!(prepared.parent.as_ref().unwrap().rootfs_disk_bytes, Some(10737418240));
        assert_eq!(prepared.builder.memory_mb, 1024);
        assert_eq!(prepared.rest["runtimeContract"]["guestRuntimeLayout"], "embedded");
        assert_eq!(serde_json::to_string(&prepared).unwrap(), NEW_SHAPE);
    }

    #[test]
    fn the_legacy_shape_passes_its_upload_and_parent_download_through() {
        let legacy = json!({"buildId": "b", "snapshotId": "s", "rootfsNodeKind": "diff", "snapshotUri": "s3://b/k",
            "builder": {"image": "i", "command": "c", "cpus": 2, "memoryMb": 1, "diskMb": 1},
            "upload": {"kind": "single_put", "uri": "s3://b/k", "method": "PUT", "url": "http://h/k", "headers": {}},
            "parent": {"parentManifestUri": "s3://b/p", "download": {"kind": "single_get", "url": "http://h/p"}}});
        let prepared = Prepared::parse(&legacy).unwrap();
        assert_eq!(prepared.builder.cpus, 2.0);
        assert_eq!(prepared.rest["upload"], legacy["upload"]);
        assert_eq!(prepared.parent.unwrap().download.as_ref(), Some(&legacy["parent"]["download"]));
        // Kinds only the platform's builder knows pass too: the client does not read them.
        let mut future = legacy.clone();
        future["upload"] = json!({"kind": "gcs_resumable", "sessionUrl": "https://storage/x"});
        future["parent"]["download"] = json!({"kind": "gcs_get"});
        assert!(Prepared::parse(&future).is_ok());
    }

    /// wit/protocol.md §2.3's example.
    const REQUEST: &str = r#"{"name":"app","dockerfile":"FROM default/base\nCOPY app /app\n","baseImage":"default/base","public":false,"rootfsNodeKind":"diff","parentTemplate":{"templateId":"tpl-1","name":"base","reference":"default/base","snapshotId":"snap-1","public":true},"additionalLocalImages":[]}"#;

    #[test]
    fn the_prepare_request_round_trips_and_a_base_build_sends_a_null_parent() {
        let request: PrepareRequest = serde_json::from_str(REQUEST).unwrap();
        assert_eq!(request.parent_template.as_ref().unwrap().reference.as_deref(), Some("default/base"));
        assert_eq!(serde_json::to_string(&request).unwrap(), REQUEST);
        let base = PrepareRequest { rootfs_node_kind: "base".into(), parent_template: None, ..request };
        let value = serde_json::to_value(&base).unwrap();
        assert_eq!((&value["parentTemplate"], &value["additionalLocalImages"]), (&Value::Null, &json!([])));
        // What a client may leave out reads as empty; what it must send is named.
        let lean: PrepareRequest =
            serde_json::from_value(json!({"name": "a", "dockerfile": "FROM scratch", "rootfsNodeKind": "base"}))
                .unwrap();
        assert_eq!((lean.public, lean.parent_template, lean.base_image.as_str()), (false, None, ""));
        let err = serde_json::from_value::<PrepareRequest>(json!({"name": "a", "rootfsNodeKind": "base"})).unwrap_err();
        assert!(err.to_string().contains("missing field `dockerfile`"), "{err}");
    }

    #[test]
    fn a_missing_or_mistyped_field_is_named() {
        let err = Prepared::parse(&json!({"buildId": "b"})).unwrap_err().to_string();
        assert!(err.starts_with("prepare answer is not a prepared build: missing field"), "{err}");
        let no_snapshot = json!({"buildId": "b", "rootfsNodeKind": "base",
            "builder": {"image": "i", "command": "c", "cpus": 1, "memoryMb": 1, "diskMb": 1}});
        assert!(Prepared::parse(&no_snapshot).unwrap_err().to_string().contains("`snapshotId`"));
        let bad_cpus = json!({"buildId": "b", "snapshotId": "s", "rootfsNodeKind": "base",
            "builder": {"image": "i", "command": "c", "cpus": "two", "memoryMb": 1, "diskMb": 1}});
        assert!(Prepared::parse(&bad_cpus).unwrap_err().to_string().contains("\"two\""));
        assert_eq!(Prepared::parse(&json!([1])).unwrap_err().to_string(), "prepare answer is not a JSON object");
    }
}
