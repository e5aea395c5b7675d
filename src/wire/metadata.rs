//! metadata.json, the builder's answer to the build client (wit/protocol.md
//! §5.8, §14). The reference builder writes it (snake_case, only the fields it
//! has); the build flow reads it as leniently as the client does.

use serde::Serialize;
use serde_json::{Map, Value};

/// Every field of the model, in the order they are written.
pub const FIELDS: &[&str] = &[
    "snapshot_id",
    "snapshot_uri",
    "snapshot_format_version",
    "snapshot_size_bytes",
    "rootfs_disk_bytes",
    "rootfs_node_kind",
    "parent_manifest_uri",
    "rootfs_format",
    "image_size_bytes",
    "sha256",
];

/// What a build produced. Absent fields are not written.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Metadata {
    /// The snapshot's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_id: Option<String>,
    /// Where the snapshot went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_uri: Option<String>,
    /// The archive format (`snapsign_tar_zstd_v1`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_format_version: Option<String>,
    /// The archive's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_size_bytes: Option<u64>,
    /// The rootfs size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_disk_bytes: Option<u64>,
    /// `base` or `diff`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_node_kind: Option<String>,
    /// The parent of a diff build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_manifest_uri: Option<String>,
    /// `cas-streaming` for the CAS branch of completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rootfs_format: Option<String>,
    /// The CAS branch's size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size_bytes: Option<u64>,
    /// snapsign only: hex sha256 of the archive (completion omits it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// metadata.json that is not a JSON object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotAnObject;

impl std::fmt::Display for NotAnObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rootfs builder metadata is not a JSON object")
    }
}

impl std::error::Error for NotAnObject {}

fn camel(snake: &str) -> String {
    let mut out = String::with_capacity(snake.len());
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// The snake key's value; the camelCase key's only when the snake key is
/// absent (a present snake key hides the camel one, whatever its type).
fn field<'a>(meta: &'a Map<String, Value>, snake: &str) -> Option<&'a Value> {
    match meta.get(snake) {
        Some(v) => Some(v),
        None => meta.get(&camel(snake)),
    }
}

fn text(meta: &Map<String, Value>, snake: &str) -> Option<String> {
    field(meta, snake).and_then(Value::as_str).map(str::to_owned)
}

/// A non-negative integer or a decimal string.
fn number(meta: &Map<String, Value>, snake: &str) -> Option<u64> {
    match field(meta, snake)? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

impl Metadata {
    /// Reads metadata.json as the client does (§5.8): each field by its
    /// snake_case key, else its camelCase key; numbers as integers or decimal
    /// strings. A field of the wrong type reads as absent.
    pub fn read(value: &Value) -> Result<Metadata, NotAnObject> {
        let meta = value.as_object().ok_or(NotAnObject)?;
        Ok(Metadata {
            snapshot_id: text(meta, "snapshot_id"),
            snapshot_uri: text(meta, "snapshot_uri"),
            snapshot_format_version: text(meta, "snapshot_format_version"),
            snapshot_size_bytes: number(meta, "snapshot_size_bytes"),
            rootfs_disk_bytes: number(meta, "rootfs_disk_bytes"),
            rootfs_node_kind: text(meta, "rootfs_node_kind"),
            parent_manifest_uri: text(meta, "parent_manifest_uri"),
            rootfs_format: text(meta, "rootfs_format"),
            image_size_bytes: number(meta, "image_size_bytes"),
            sha256: text(meta, "sha256"),
        })
    }

    /// The JSON object written (absent fields left out).
    pub fn to_json(&self) -> Map<String, Value> {
        match serde_json::to_value(self).expect("metadata serializes") {
            Value::Object(map) => map,
            _ => unreachable!("a struct serializes to an object"),
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// wit/protocol.md §14's fields as the reference builder writes them for a diff build.
    const DIFF: &str = r#"{"snapshot_id":"snap-7","snapshot_uri":"s3://snapshots/builds/default/sandbox-template-builds/build-7/snap-7.tlsnap","snapshot_format_version":"snapsign_tar_zstd_v1","snapshot_size_bytes":1234,"rootfs_disk_bytes":10737418240,"rootfs_node_kind":"diff","parent_manifest_uri":"s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap","sha256":"abab"}"#;

    #[test]
    fn written_metadata_round_trips_byte_for_byte() {
        let read = Metadata::read(&serde_json::from_str(DIFF).unwrap()).unwrap();
        assert_eq!(read.snapshot_size_bytes, Some(1234));
        assert_eq!(read.sha256.as_deref(), Some("abab"));
        assert_eq!(serde_json::to_string(&read).unwrap(), DIFF);
    }

    #[test]
    fn fields_names_every_field_of_the_model() {
        let full = Metadata {
            snapshot_id: Some(String::new()),
            snapshot_uri: Some(String::new()),
            snapshot_format_version: Some(String::new()),
            snapshot_size_bytes: Some(0),
            rootfs_disk_bytes: Some(0),
            rootfs_node_kind: Some(String::new()),
            parent_manifest_uri: Some(String::new()),
            rootfs_format: Some(String::new()),
            image_size_bytes: Some(0),
            sha256: Some(String::new()),
        };
        let json = full.to_json();
        let mut names: Vec<&str> = json.keys().map(String::as_str).collect();
        let mut fields = FIELDS.to_vec();
        names.sort_unstable();
        fields.sort_unstable();
        assert_eq!(names, fields);
        assert_eq!(Metadata::read(&Value::Object(full.to_json())).unwrap(), full);
    }

    #[test]
    fn reads_camel_case_and_numeric_strings_as_the_client_does() {
        let m = json!({"snapshotUri": "s3://m", "snapshotFormatVersion": "v", "snapshotSizeBytes": " 77 ", "rootfsDiskBytes": 5});
        let read = Metadata::read(&m).unwrap();
        assert_eq!(
            (read.snapshot_uri.as_deref(), read.snapshot_size_bytes, read.rootfs_disk_bytes),
            (Some("s3://m"), Some(77), Some(5))
        );
        // A present snake key hides the camel one, even when it is null.
        let hidden = Metadata::read(&json!({"snapshot_uri": null, "snapshotUri": "s3://camel"})).unwrap();
        assert_eq!(hidden.snapshot_uri, None);
        let wrong = Metadata::read(&json!({"snapshot_size_bytes": -1, "rootfs_disk_bytes": "x", "sha256": 3})).unwrap();
        assert_eq!(wrong, Metadata::default());
        assert_eq!(Metadata::read(&json!([])), Err(NotAnObject));
    }
}
