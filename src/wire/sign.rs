//! `POST /api/v1/blob/sign` (wit/protocol.md §4.7, §9): the request the
//! build client sends and the answers the signer gives. The builder component
//! writes the request, the signer reads it (through its validating parser,
//! `signer::request::parse`, which names the field at fault) and writes the
//! answer; the dev stack presigns the legacy shape's blocks with the same
//! types, and the reference builder reads them back from spec.json.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most parts S3 allows in one multipart upload.
pub const MAX_PARTS: u32 = 10_000;
/// S3's smallest part (but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// S3's largest part.
pub const MAX_PART_SIZE: u64 = 5 * 1024 * 1024 * 1024;
/// S3's largest object.
pub const MAX_OBJECT_SIZE: u64 = 5 * 1024 * 1024 * 1024 * 1024;

/// A sign request: what to sign for, and what to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SignRequest {
    /// What to sign for.
    pub target: Target,
    /// What to sign.
    pub op: Op,
}

impl SignRequest {
    /// `put_artifact` of `rel_path`, multipart when `hint` is given.
    pub fn put_artifact(rel_path: &str, hint: Option<MultipartHint>) -> Self {
        SignRequest {
            target: Target::Artifact { rel_path: rel_path.to_owned() },
            op: Op::PutArtifact { multipart_hint: hint },
        }
    }

    /// `get_blob` of the object `uri`.
    pub fn get_blob(uri: &str) -> Self {
        SignRequest { target: Target::Blob { uri: uri.to_owned() }, op: Op::GetBlob }
    }

    /// `refresh_upload`: fresh URLs for the open multipart upload
    /// `upload_id` of the object `uri`, for parts as `hint` says.
    pub fn refresh_upload(uri: &str, upload_id: &str, hint: MultipartHint) -> Self {
        SignRequest {
            target: Target::Blob { uri: uri.to_owned() },
            op: Op::RefreshUpload { upload_id: upload_id.to_owned(), multipart_hint: hint },
        }
    }
}

/// What to sign for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// A path relative to the caller's namespace.
    Artifact { rel_path: String },
    /// A full object URI.
    Blob { uri: String },
}

/// What to sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Op {
    /// Upload a new artifact, multipart when hinted (`null` or absent: one PUT).
    PutArtifact { multipart_hint: Option<MultipartHint> },
    /// Read a blob.
    GetBlob,
    /// Fresh part, complete and abort URLs for an upload already open on
    /// the blob (its URLs expired): only in the caller's namespace, only an
    /// upload the store knows for that object (wit/protocol.md §4.8).
    RefreshUpload { upload_id: String, multipart_hint: MultipartHint },
}

/// The caller's multipart hint: part URLs to sign (1..=[`MAX_PARTS`]) of
/// `part_size_bytes` each ([`MIN_PART_SIZE`]..=[`MAX_PART_SIZE`]), at most
/// [`MAX_OBJECT_SIZE`] in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultipartHint {
    /// Part URLs to sign.
    pub max_parts: u32,
    /// Bytes per part.
    pub part_size_bytes: u64,
}

/// A put_artifact answer, and what the reference builder reads as
/// `spec.upload`: one PUT, or an S3 multipart upload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Upload<P = Vec<PartUrl>> {
    /// One PUT of the whole object.
    SinglePut(SinglePut),
    /// CreateMultipartUpload done; the part URLs, CompleteMultipartUpload and AbortMultipartUpload.
    S3Multipart(S3Multipart<P>),
}

impl<P> Upload<P> {
    /// The object URI the upload creates, when the answer names it.
    pub fn uri(&self) -> Option<&str> {
        match self {
            Upload::SinglePut(put) => put.uri.as_deref(),
            Upload::S3Multipart(multipart) => multipart.uri.as_deref(),
        }
    }
}

/// `single_put`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SinglePut {
    /// The object URI (`s3://bucket/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `PUT` (the default when absent).
    #[serde(default = "put")]
    pub method: String,
    /// The presigned URL.
    pub url: String,
    /// Headers the request must carry (always sent, `{}` when none).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

fn put() -> String {
    "PUT".into()
}

fn get() -> String {
    "GET".into()
}

/// `s3_multipart`; `P` is the part list (a `Vec<PartUrl>` when read, a
/// streaming writer in the signer, which writes up to 10,000 URLs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct S3Multipart<P = Vec<PartUrl>> {
    /// The object URI (`s3://bucket/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// The store's UploadId.
    pub upload_id: String,
    /// Bytes per part (all but the last).
    pub part_size_bytes: u64,
    /// How many part URLs were signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parts: Option<u32>,
    /// Presigned CompleteMultipartUpload (`POST` the XML there).
    pub complete_url: String,
    /// Presigned AbortMultipartUpload (`DELETE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_url: Option<String>,
    /// RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Extra headers for every part PUT (the signer sends none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// Presigned UploadPart URLs, numbered from 1.
    pub part_urls: P,
}

/// One presigned UploadPart URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartUrl {
    /// 1-based part number.
    pub part_number: u32,
    /// Presigned `PUT`.
    pub url: String,
}

/// An `s3_multipart` answer as JSON text, its part URLs written straight into
/// the text as `each` makes them, calling `emit(part_number, url)` in order:
/// no list, and no allocation or JSON escaping per part, for up to 10,000 URLs
/// (presigned URLs hold only percent-encoded bytes and a parsed host; checked
/// in debug builds). The bytes are those of serializing [`Upload::S3Multipart`]
/// with the list (tested); `capacity` is the expected size.
pub fn s3_multipart_json(
    head: S3Multipart<[PartUrl; 0]>,
    capacity: usize,
    each: impl FnOnce(&mut dyn FnMut(u32, &str)),
) -> String {
    let head = serde_json::to_string(&Upload::S3Multipart(head)).expect("answers serialize");
    let stem = head.strip_suffix("[]}").expect("partUrls is the last field of an s3_multipart answer");
    let mut body = String::with_capacity(capacity.max(head.len()));
    body.push_str(stem);
    body.push('[');
    let mut first = true;
    each(&mut |part_number, url| {
        debug_assert!(!url.contains(['"', '\\']) && !url.contains(char::is_control), "{url}");
        if !first {
            body.push(',');
        }
        first = false;
        let _ = write!(body, "{{\"partNumber\":{part_number},\"url\":\"{url}\"}}");
    });
    body.push_str("]}");
    body
}

/// A get_blob answer, and what the reference builder reads as
/// `spec.parent.download`: only `single_get` exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Download {
    /// One GET of the whole object.
    SingleGet(SingleGet),
}

/// `single_get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SingleGet {
    /// The object URI (`s3://bucket/key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// `GET` (the default when absent).
    #[serde(default = "get")]
    pub method: String,
    /// The presigned URL.
    pub url: String,
    /// Headers the request must carry (the signer sends none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// What the build client itself reads of a put_artifact answer (§4.7): the
/// `uri`, and the `abortUrl` of an `s3_multipart` answer. The answer goes to
/// the builder verbatim, so a kind this model does not know still passes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UploadHead {
    /// `uri`, when it is a string.
    pub uri: Option<String>,
    /// `abortUrl` of an `s3_multipart` answer.
    pub abort_url: Option<String>,
    /// `uploadId` of an `s3_multipart` answer.
    pub upload_id: Option<String>,
}

impl UploadHead {
    /// Reads the head of a put_artifact answer.
    pub fn read(answer: &Value) -> Self {
        let text = |field: &str| answer.get(field).and_then(Value::as_str).map(str::to_owned);
        let multipart = answer.get("kind").and_then(Value::as_str) == Some("s3_multipart");
        UploadHead {
            uri: text("uri"),
            abort_url: if multipart { text("abortUrl") } else { None },
            upload_id: if multipart { text("uploadId") } else { None },
        }
    }
}

/// `s3://{bucket}/{key}`: the one place an object URI is composed.
pub fn object_uri(bucket: &str, key: &str) -> String {
    format!("s3://{bucket}/{key}")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// wit/protocol.md §4.7's two request examples.
    const PUT_REQUEST: &str = r#"{"target":{"kind":"artifact","rel_path":"sandbox-template-builds/build-7/snap-7.tlsnap"},"op":{"kind":"put_artifact","multipart_hint":{"max_parts":160,"part_size_bytes":67108864}}}"#;
    const GET_REQUEST: &str = r#"{"target":{"kind":"blob","uri":"s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap"},"op":{"kind":"get_blob"}}"#;
    /// wit/protocol.md §9's answers, with the elided parts filled in.
    const SINGLE_PUT: &str = r#"{"kind":"single_put","uri":"s3://snapshots/builds/default/x.tlsnap","method":"PUT","url":"http://127.0.0.1:9000/snapshots/builds/default/x.tlsnap?X-Amz-Signature=ab","headers":{},"expiresAt":"2026-11-28T22:00:00Z"}"#;
    const S3_MULTIPART: &str = r#"{"kind":"s3_multipart","uri":"s3://snapshots/builds/default/x.tlsnap","uploadId":"up-1","partSizeBytes":67108864,"maxParts":2,"completeUrl":"http://127.0.0.1:9000/snapshots/x?uploadId=up-1&X-Amz-Signature=c","abortUrl":"http://127.0.0.1:9000/snapshots/x?uploadId=up-1&X-Amz-Signature=d","expiresAt":"2026-11-28T22:00:00Z","partUrls":[{"partNumber":1,"url":"http://127.0.0.1:9000/snapshots/x?partNumber=1&uploadId=up-1"},{"partNumber":2,"url":"http://127.0.0.1:9000/snapshots/x?partNumber=2&uploadId=up-1"}]}"#;
    const SINGLE_GET: &str = r#"{"kind":"single_get","uri":"s3://snapshots/builds/default/x.tlsnap","method":"GET","url":"http://127.0.0.1:9000/snapshots/builds/default/x.tlsnap?X-Amz-Signature=ef","expiresAt":"2026-11-28T22:00:00Z"}"#;

    #[test]
    fn requests_write_the_protocol_examples_byte_for_byte() {
        let put = SignRequest::put_artifact(
            "sandbox-template-builds/build-7/snap-7.tlsnap",
            Some(MultipartHint { max_parts: 160, part_size_bytes: 67108864 }),
        );
        assert_eq!(serde_json::to_string(&put).unwrap(), PUT_REQUEST);
        let get = SignRequest::get_blob("s3://snapshots/builds/default/sandbox-template-builds/build-3/snap-3.tlsnap");
        assert_eq!(serde_json::to_string(&get).unwrap(), GET_REQUEST);
        let single = SignRequest::put_artifact("a", None);
        assert_eq!(
            serde_json::to_value(&single).unwrap(),
            json!({"target": {"kind": "artifact", "rel_path": "a"}, "op": {"kind": "put_artifact", "multipart_hint": null}})
        );
    }

    #[test]
    fn every_answer_round_trips_byte_for_byte() {
        for text in [SINGLE_PUT, S3_MULTIPART] {
            let upload: Upload = serde_json::from_str(text).unwrap();
            assert_eq!(serde_json::to_string(&upload).unwrap(), text);
            assert_eq!(upload.uri(), Some("s3://snapshots/builds/default/x.tlsnap"));
        }
        let download: Download = serde_json::from_str(SINGLE_GET).unwrap();
        assert_eq!(serde_json::to_string(&download).unwrap(), SINGLE_GET);
        let Upload::S3Multipart(multipart) = serde_json::from_str::<Upload>(S3_MULTIPART).unwrap() else { panic!() };
        assert_eq!(multipart.part_urls[1].part_number, 2);
        assert_eq!(multipart.max_parts, Some(2));
    }

    #[test]
    fn readers_take_defaults_and_ignore_unknown_fields_but_refuse_unknown_kinds() {
        let put: Upload = serde_json::from_str(r#"{"kind":"single_put","url":"http://h/k","somethingNew":1}"#).unwrap();
        let Upload::SinglePut(put) = put else { panic!() };
        assert_eq!((put.method.as_str(), put.uri, put.headers.len()), ("PUT", None, 0));
        let Download::SingleGet(get) = serde_json::from_str(r#"{"kind":"single_get","url":"http://h/k"}"#).unwrap();
        assert_eq!(get.method, "GET");
        let err = serde_json::from_str::<Upload>(r#"{"kind":"gcs_resumable","url":"x"}"#).unwrap_err();
        assert!(err.to_string().contains("unknown variant `gcs_resumable`"), "{err}");
        let err = serde_json::from_str::<Download>(SINGLE_PUT).unwrap_err();
        assert!(err.to_string().contains("unknown variant `single_put`"), "{err}");
        let err = serde_json::from_str::<Upload>(r#"{"kind":"s3_multipart","uploadId":"u"}"#).unwrap_err();
        assert!(err.to_string().contains("missing field `partSizeBytes`"), "{err}");
    }

    #[test]
    fn part_urls_written_straight_in_are_what_serde_writes() {
        let Upload::S3Multipart(read) = serde_json::from_str::<Upload>(S3_MULTIPART).unwrap() else { panic!() };
        let head = S3Multipart {
            uri: read.uri.clone(),
            upload_id: read.upload_id.clone(),
            part_size_bytes: read.part_size_bytes,
            max_parts: read.max_parts,
            complete_url: read.complete_url.clone(),
            abort_url: read.abort_url.clone(),
            expires_at: read.expires_at.clone(),
            headers: BTreeMap::new(),
            part_urls: [],
        };
        let urls = read.part_urls.clone();
        let written = s3_multipart_json(head.clone(), 0, |emit| urls.iter().for_each(|p| emit(p.part_number, &p.url)));
        assert_eq!(written, S3_MULTIPART);
        assert_eq!(written, serde_json::to_string(&Upload::S3Multipart(read)).unwrap());
        let none = s3_multipart_json(head, 0, |_| {});
        assert!(none.ends_with(r#""partUrls":[]}"#), "{none}");
        assert!(serde_json::from_str::<Upload>(&none).is_ok());
    }

    #[test]
    fn the_client_reads_uri_and_the_multipart_abort_url_of_any_answer() {
        let multipart: Value = serde_json::from_str(S3_MULTIPART).unwrap();
        let head = UploadHead::read(&multipart);
        assert_eq!(head.uri.as_deref(), Some("s3://snapshots/builds/default/x.tlsnap"));
        assert_eq!(head.abort_url.as_deref(), multipart["abortUrl"].as_str());
        let single: Value = serde_json::from_str(SINGLE_PUT).unwrap();
        assert_eq!(UploadHead::read(&single).abort_url, None);
        // A kind this model does not know: the uri still counts.
        assert_eq!(
            UploadHead::read(&json!({"kind": "gcs_resumable", "uri": "gs://b/k"})).uri.as_deref(),
            Some("gs://b/k")
        );
        assert_eq!(UploadHead::read(&json!({"kind": "s3_multipart", "uri": 7})), UploadHead::default());
    }

    #[test]
    fn object_uris_are_bucket_then_key() {
        assert_eq!(object_uri("snapshots", "builds/default/x.tlsnap"), "s3://snapshots/builds/default/x.tlsnap");
    }
}
