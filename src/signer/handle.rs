//! The signer's decisions, free of I/O and clocks: a request and `now` in,
//! either an answer or the one store call to make (CreateMultipartUpload).

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::Serialize;

use super::config::SignerConfig;
use super::error::SignError;
use super::memo::Memo;
use super::{request, validate};
use crate::presign::{Method, ObjectUrl, Presigner};
use crate::wire::sign::{
    Download, MultipartHint, Op, S3Multipart, SingleGet, SinglePut, Target, Upload, s3_multipart_json,
};

/// The one route the signer serves.
pub const SIGN_PATH: &str = "/api/v1/blob/sign";
/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// An incoming HTTP request, as the glue read it.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    /// HTTP method.
    pub method: &'a str,
    /// Request path without query.
    pub path: &'a str,
    /// `Authorization` header value, if any.
    pub authorization: Option<&'a str>,
    /// Body (at most `MAX_BODY_BYTES + 1` bytes read).
    pub body: &'a [u8],
    /// The id error bodies and log lines carry (the host's `x-request-id`).
    pub request_id: &'a str,
}

/// A finished HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
    /// For the operator's log: status, code and the detail the caller does not get.
    pub log: Option<String>,
}

impl SignError {
    /// The error as an answer to the request `request_id`, with a log line
    /// when it holds detail the caller does not get.
    pub fn answer(&self, request_id: &str) -> Answer {
        let log = self.log_detail().map(|detail| format!("{} {}: {self}: {detail}", self.status(), self.code()));
        Answer { status: self.status(), body: self.body(request_id), log }
    }
}

/// What the glue does next.
#[derive(Debug)]
pub enum Step {
    /// Send this answer.
    Respond(Answer),
    /// Send `store_method` (empty body) to `store_url`, then call
    /// [`PendingUpload::finish`] with the store's answer.
    StoreCall(Box<PendingUpload>),
}

/// The one store call a multipart answer waits for: CreateMultipartUpload
/// (put_artifact), or ListParts of the upload (refresh_upload: does the
/// store know it for this object?).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    Create,
    Refresh { upload_id: String },
}

/// A multipart upload waiting for the store's answer.
pub struct PendingUpload {
    /// `POST` (CreateMultipartUpload) or `GET` (ListParts).
    pub store_method: &'static str,
    /// Presigned URL of the store call.
    pub store_url: String,
    pending: Pending,
    uri: String,
    object: ObjectUrl,
    hint: MultipartHint,
    presigner: Presigner,
    expires_at: String,
    request_id: String,
}

impl std::fmt::Debug for PendingUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpload")
            .field("uri", &self.uri)
            .field("pending", &self.pending)
            .field("hint", &self.hint)
            .finish_non_exhaustive()
    }
}

fn ok(signed: &impl Serialize) -> Answer {
    Answer { status: 200, body: serde_json::to_string(signed).expect("answers serialize"), log: None }
}

impl PendingUpload {
    /// The canonical URI the upload will create.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn action(&self) -> &'static str {
        match self.pending {
            Pending::Create => "CreateMultipartUpload",
            Pending::Refresh { .. } => "ListParts",
        }
    }

    /// Turns the store's answer to its call into the signer's answer.
    pub fn finish(self, store_status: u16, store_body: &str) -> Answer {
        let s3_code = s3_error_code(store_body);
        // NoSuchUpload, or a bare 404 (a store that sends no error document); not NoSuchBucket.
        if let Pending::Refresh { upload_id } = &self.pending
            && (s3_code.as_deref() == Some("NoSuchUpload") || (store_status == 404 && s3_code.is_none()))
        {
            return SignError::NoSuchUpload { uri: self.uri.clone(), upload_id: upload_id.clone() }
                .answer(&self.request_id);
        }
        if !(200..300).contains(&store_status) || s3_code.is_some() {
            let detail = s3_error_detail(store_body);
            return SignError::StoreFailed { action: self.action(), status: store_status, s3_code, detail }
                .answer(&self.request_id);
        }
        let upload_id = match &self.pending {
            Pending::Refresh { upload_id } => upload_id.clone(),
            Pending::Create => match rusty_s3::actions::CreateMultipartUpload::parse_response(store_body) {
                Ok(parsed) => parsed.upload_id().to_owned(),
                Err(e) => {
                    return SignError::StoreFailed {
                        action: self.action(),
                        status: store_status,
                        s3_code: None,
                        detail: format!("answer has no UploadId ({e}): {}", crate::wire::excerpt(store_body)),
                    }
                    .answer(&self.request_id);
                }
            },
        };
        let (p, object) = (&self.presigner, &self.object);
        let head = S3Multipart {
            uri: Some(self.uri.clone()),
            upload_id: upload_id.clone(),
            part_size_bytes: self.hint.part_size_bytes,
            max_parts: Some(self.hint.max_parts),
            complete_url: p.presign(Method::Post, object, &[("uploadId", &upload_id)]),
            abort_url: Some(p.presign(Method::Delete, object, &[("uploadId", &upload_id)])),
            expires_at: Some(self.expires_at.clone()),
            headers: BTreeMap::new(),
            part_urls: [],
        };
        // A part URL is the complete URL plus `partNumber=N&` (up to 17 bytes); its JSON
        // frame adds 36 at most: reserve it all, so the 4 MB body is never copied to grow.
        let capacity = (self.hint.max_parts as usize + 3) * (head.complete_url.len() + 64);
        let body = s3_multipart_json(head, capacity, |emit| {
            p.each_upload_part_url(object, &upload_id, self.hint.max_parts, emit)
        });
        Answer { status: 200, body, log: None }
    }

    /// The store could not be reached at all; `detail` goes to the log only.
    pub fn unreachable(self, detail: &str) -> Answer {
        SignError::StoreUnreachable { action: self.action(), detail: detail.to_owned() }.answer(&self.request_id)
    }
}

fn xml_element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let end = body[start..].find(&format!("</{name}>"))?;
    Some(&body[start..start + end])
}

/// The `<Code>` of an S3 error document, when it looks like one (letters, digits, dots).
fn s3_error_code(body: &str) -> Option<String> {
    xml_element(body, "Code")
        .map(str::trim)
        .filter(|c| (1..=64).contains(&c.len()) && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'))
        .map(str::to_owned)
}

/// `Code: Message` of an S3 error document, else an excerpt of the body.
fn s3_error_detail(body: &str) -> String {
    match (xml_element(body, "Code"), xml_element(body, "Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ => crate::wire::excerpt(body),
    }
}

/// Checks method and path.
pub fn route(method: &str, path: &str) -> Result<(), SignError> {
    if path != SIGN_PATH {
        return Err(SignError::NotFound { path: path.to_owned() });
    }
    if method != "POST" {
        return Err(SignError::MethodNotAllowed { method: method.to_owned() });
    }
    Ok(())
}

/// Decides what to do with one request; `memo` is what the shell keeps
/// between requests (a fresh one gives the same answer).
pub fn handle(config: &SignerConfig, memo: &mut Memo, incoming: &Incoming<'_>, now: Timestamp) -> Step {
    match decide(config, memo, incoming, now) {
        Ok(step) => step,
        Err(e) => Step::Respond(e.answer(incoming.request_id)),
    }
}

fn decide(config: &SignerConfig, memo: &mut Memo, incoming: &Incoming<'_>, now: Timestamp) -> Result<Step, SignError> {
    route(incoming.method, incoming.path)?;
    if incoming.body.len() > MAX_BODY_BYTES {
        return Err(SignError::BodyTooLarge { limit: MAX_BODY_BYTES });
    }
    let bearer = incoming
        .authorization
        .and_then(|h| h.strip_prefix("Bearer ").or_else(|| h.strip_prefix("bearer ")))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(SignError::MissingToken)?;
    let claims = memo.claims(config, bearer, now.as_second()).map_err(SignError::BadToken)?;
    let request = request::parse(incoming.body)?;

    let expires_at = Timestamp::from_second(now.as_second() + i64::from(config.url_ttl_secs))
        .expect("now + at most 7 days is a valid timestamp")
        .to_string();
    let presigner = memo.presigner(config, now);

    match (request.target, request.op) {
        (Target::Artifact { rel_path }, Op::PutArtifact { multipart_hint }) => {
            validate::rel_path(&rel_path)
                .map_err(|problem| SignError::InvalidRelPath { rel_path: rel_path.clone(), problem })?;
            let (key, uri) = config.artifact(&claims.namespace, &rel_path);
            // The store's limit (SNAPSIGN_MAX_KEY_BYTES, at most S3's 1,024): a
            // key it cannot hold is refused here, before anything is signed.
            if key.len() > config.max_key_bytes {
                return Err(SignError::InvalidRelPath {
                    problem: format!(
                        "makes the {}-byte key '{key}'; the store holds keys of at most {} bytes, so shorten the rel_path to {} bytes or less",
                        key.len(),
                        config.max_key_bytes,
                        config.max_key_bytes.saturating_sub(key.len() - rel_path.len()),
                    ),
                    rel_path,
                });
            }
            let object = config.endpoint.object(&config.bucket, &key);
            match multipart_hint {
                None => Ok(Step::Respond(ok(&Upload::<()>::SinglePut(SinglePut {
                    uri: Some(uri),
                    method: Method::Put.as_str().into(),
                    url: presigner.presign(Method::Put, &object, &[]),
                    headers: BTreeMap::new(),
                    expires_at: Some(expires_at),
                })))),
                Some(hint) => Ok(Step::StoreCall(Box::new(PendingUpload {
                    store_method: "POST",
                    store_url: presigner.presign(Method::Post, &object, &[("uploads", "")]),
                    pending: Pending::Create,
                    uri,
                    object,
                    hint,
                    presigner,
                    expires_at,
                    request_id: incoming.request_id.to_owned(),
                }))),
            }
        }
        (Target::Blob { uri }, Op::GetBlob) => {
            let parsed =
                validate::s3_uri(&uri).map_err(|problem| SignError::InvalidUri { uri: uri.clone(), problem })?;
            if parsed.bucket != config.bucket {
                return Err(SignError::ForeignBucket { uri, bucket: config.bucket.clone() });
            }
            // Own namespace, a shared prefix, or an exact URI the platform granted
            // in the token (another namespace's public template, wit/protocol.md §11).
            let readable = config.in_namespace(&claims.namespace, parsed.key)
                || config.shared_prefixes.iter().any(|p| parsed.key.starts_with(p))
                || claims.read.contains(&uri);
            if !readable {
                return Err(SignError::OutsideNamespace { uri, namespace: claims.namespace });
            }
            let object = config.endpoint.object(&config.bucket, parsed.key);
            Ok(Step::Respond(ok(&Download::SingleGet(SingleGet {
                url: presigner.presign(Method::Get, &object, &[]),
                uri: Some(uri),
                method: Method::Get.as_str().into(),
                headers: BTreeMap::new(),
                expires_at: Some(expires_at),
            }))))
        }
        // Fresh URLs for an upload already open (its URLs expired): the
        // caller's own namespace only (not a shared prefix, not a read
        // grant: those give reads), and only an upload the store knows for
        // this very object, which ListParts on the object's key checks.
        (Target::Blob { uri }, Op::RefreshUpload { upload_id, multipart_hint }) => {
            let parsed =
                validate::s3_uri(&uri).map_err(|problem| SignError::InvalidUri { uri: uri.clone(), problem })?;
            if parsed.bucket != config.bucket {
                return Err(SignError::ForeignBucket { uri, bucket: config.bucket.clone() });
            }
            if !config.in_namespace(&claims.namespace, parsed.key) {
                return Err(SignError::OutsideNamespace { uri, namespace: claims.namespace });
            }
            let object = config.endpoint.object(&config.bucket, parsed.key);
            Ok(Step::StoreCall(Box::new(PendingUpload {
                store_method: "GET",
                store_url: presigner.presign(Method::Get, &object, &[("uploadId", &upload_id), ("max-parts", "1")]),
                pending: Pending::Refresh { upload_id },
                uri,
                object,
                hint: multipart_hint,
                presigner,
                expires_at,
                request_id: incoming.request_id.to_owned(),
            })))
        }
        _ => unreachable!("request::parse admits only artifact+put_artifact, blob+get_blob and blob+refresh_upload"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::signer::config::vars;
    use crate::token;

    const KEY: &str = "0123456789abcdef0123456789abcdef";

    fn config() -> SignerConfig {
        SignerConfig::from_vars(
            [
                (vars::BUCKET, "snaps"),
                (vars::KEY_PREFIX, "builds"),
                (vars::S3_ENDPOINT, "http://127.0.0.1:9000"),
                (vars::S3_ADDRESSING, "path"),
                (vars::ACCESS_KEY_ID, "AKID"),
                (vars::SECRET_ACCESS_KEY, "SECRET"),
                (vars::TOKEN_KEY, KEY),
                (vars::SHARED_PREFIXES, "public"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .unwrap()
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    /// One sign request with `token` against `config`, at [`now`].
    fn sign(config: &SignerConfig, token: &str, body: &str) -> Step {
        let auth = format!("Bearer {token}");
        let incoming = Incoming {
            method: "POST",
            path: SIGN_PATH,
            authorization: Some(&auth),
            body: body.as_bytes(),
            request_id: "req-1",
        };
        handle(config, &mut Memo::default(), &incoming, now())
    }

    fn run(body: &str) -> Step {
        sign(&config(), &token::mint(KEY.as_bytes(), "team-a", 1_800_000_600).unwrap(), body)
    }

    fn answer(step: Step) -> (u16, Value) {
        match step {
            Step::Respond(a) => (a.status, serde_json::from_str(&a.body).unwrap()),
            Step::StoreCall(p) => panic!("unexpected store call for {}", p.uri),
        }
    }

    #[test]
    fn composes_uri_from_prefix_namespace_and_rel_path() {
        let (status, body) = answer(run(
            r#"{"target":{"kind":"artifact","rel_path":"snapshots/abc.tlsnap"},"op":{"kind":"put_artifact"}}"#,
        ));
        assert_eq!(status, 200);
        assert_eq!(body["kind"], "single_put");
        assert_eq!(body["uri"], "s3://snaps/builds/team-a/snapshots/abc.tlsnap");
        assert_eq!(body["method"], "PUT");
        assert_eq!(body["expiresAt"], "2027-01-15T09:00:00Z");
        assert!(
            body["url"]
                .as_str()
                .unwrap()
                .starts_with("http://127.0.0.1:9000/snaps/builds/team-a/snapshots/abc.tlsnap?X-Amz-")
        );
    }

    #[test]
    fn a_rel_path_naming_another_namespace_stays_in_the_callers() {
        let (_, body) =
            answer(run(r#"{"target":{"kind":"artifact","rel_path":"team-b/x"},"op":{"kind":"put_artifact"}}"#));
        assert_eq!(body["uri"], "s3://snaps/builds/team-a/team-b/x");
    }

    #[test]
    fn multipart_asks_the_store_then_signs_every_part() {
        let Step::StoreCall(pending) = run(
            r#"{"target":{"kind":"artifact","rel_path":"s.tlsnap"},"op":{"kind":"put_artifact","multipart_hint":{"max_parts":3,"part_size_bytes":5242880}}}"#,
        ) else {
            panic!("expected a store call")
        };
        assert!(pending.store_url.starts_with("http://127.0.0.1:9000/snaps/builds/team-a/s.tlsnap?X-Amz-"));
        assert!(pending.store_url.contains("&uploads=&X-Amz-Signature="));
        let xml = r#"<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>snaps</Bucket><Key>k</Key><UploadId>up-1</UploadId></InitiateMultipartUploadResult>"#;
        let a = pending.finish(200, xml);
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            (a.status, body["kind"].as_str(), body["uploadId"].as_str()),
            (200, Some("s3_multipart"), Some("up-1"))
        );
        assert_eq!(body["partSizeBytes"], 5242880);
        let parts = body["partUrls"].as_array().unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2]["partNumber"], 3);
        assert!(parts[2]["url"].as_str().unwrap().contains("partNumber=3&uploadId=up-1&X-Amz-Signature="));
        assert!(body["completeUrl"].as_str().unwrap().contains("uploadId=up-1"));
        assert!(body["abortUrl"].as_str().unwrap().contains("uploadId=up-1"));
    }

    fn refresh(uri: &str, upload_id: &str) -> String {
        serde_json::to_string(&crate::wire::SignRequest::refresh_upload(
            uri,
            upload_id,
            MultipartHint { max_parts: 3, part_size_bytes: 5_242_880 },
        ))
        .unwrap()
    }

    #[test]
    fn refresh_upload_checks_the_upload_at_the_store_then_signs_fresh_urls_for_it() {
        let own = "s3://snaps/builds/team-a/sandbox-template-builds/b-1/s.tlsnap";
        let Step::StoreCall(pending) = run(&refresh(own, "up/1+x")) else { panic!("expected a store call") };
        // ListParts of that upload on that object's key: S3 knows an upload id only under its key.
        assert_eq!(pending.store_method, "GET");
        let url = pending.store_url.clone();
        assert!(
            url.starts_with("http://127.0.0.1:9000/snaps/builds/team-a/sandbox-template-builds/b-1/s.tlsnap?X-Amz-")
        );
        assert!(url.contains("&max-parts=1&uploadId=up%2F1%2Bx&X-Amz-Signature="), "{url}");
        let a = pending.finish(200, "<ListPartsResult><UploadId>up/1+x</UploadId></ListPartsResult>");
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!(
            (a.status, body["kind"].as_str(), body["uploadId"].as_str()),
            (200, Some("s3_multipart"), Some("up/1+x"))
        );
        assert_eq!(body["uri"], own);
        assert_eq!(body["expiresAt"], "2027-01-15T09:00:00Z");
        let parts = body["partUrls"].as_array().unwrap();
        assert_eq!(parts.len(), 3);
        assert!(parts[1]["url"].as_str().unwrap().contains("partNumber=2&uploadId=up%2F1%2Bx&X-Amz-Signature="));
        assert!(body["abortUrl"].as_str().unwrap().contains("uploadId=up%2F1%2Bx"));
        // An upload the store does not know there (another object's, completed, aborted): 404, nothing signed.
        let Step::StoreCall(pending) = run(&refresh(own, "up-2")) else { panic!("expected a store call") };
        let a = pending.finish(404, "<Error><Code>NoSuchUpload</Code><Message>gone</Message></Error>");
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!((a.status, body["code"].as_str()), (404, Some("no_such_upload")));
        assert!(body["message"].as_str().unwrap().contains("\"up-2\""), "{body}");
        assert!(!a.body.contains("X-Amz-"), "{}", a.body);
        // A 404 that is not NoSuchUpload (the bucket is gone) is the store's failure, not the caller's.
        let Step::StoreCall(pending) = run(&refresh(own, "up-4")) else { panic!("expected a store call") };
        let a = pending.finish(404, "<Error><Code>NoSuchBucket</Code></Error>");
        assert_eq!(a.status, 502, "{}", a.body);
        let Step::StoreCall(pending) = run(&refresh(own, "up-5")) else { panic!("expected a store call") };
        let a = pending.unreachable("connection refused");
        assert!(a.body.contains("store did not answer ListParts"), "{}", a.body);
        // Any other refusal names ListParts.
        let Step::StoreCall(pending) = run(&refresh(own, "up-3")) else { panic!("expected a store call") };
        let a = pending.finish(403, "<Error><Code>AccessDenied</Code></Error>");
        assert_eq!(a.status, 502);
        assert!(a.body.contains("store refused ListParts: HTTP 403, S3 error code AccessDenied"), "{}", a.body);
    }

    #[test]
    fn refresh_upload_is_refused_outside_the_callers_own_namespace_before_the_store_is_asked() {
        // Another namespace, a shared prefix (readable, not writable), another bucket, a key that climbs out.
        for (uri, code) in [
            ("s3://snaps/builds/team-b/sandbox-template-builds/b-1/s.tlsnap", "outside_namespace"),
            ("s3://snaps/public/s.tlsnap", "outside_namespace"),
            ("s3://snaps/builds/team-a-evil/s.tlsnap", "outside_namespace"),
            ("s3://other/builds/team-a/s.tlsnap", "foreign_bucket"),
            ("s3://snaps/builds/team-a/../team-b/s.tlsnap", "invalid_uri"),
        ] {
            let (status, body) = answer(run(&refresh(uri, "up-1")));
            assert_eq!(body["code"], code, "{uri}: {body}");
            assert!(matches!(status, 400 | 403), "{uri}: {status}");
        }
        // A read grant in the token gives reads, not uploads.
        let granted = "s3://snaps/builds/team-b/s.tlsnap";
        let claims = token::Claims { read: vec![granted.into()], ..token::Claims::new("team-a", 1_800_000_600) };
        let token = token::mint_claims(KEY.as_bytes(), &claims).unwrap();
        let (status, body) = answer(sign(&config(), &token, &refresh(granted, "up-1")));
        assert_eq!((status, body["code"].as_str()), (403, Some("outside_namespace")));
        // Malformed requests name their field.
        for (body, field) in [
            (
                r#"{"target":{"kind":"blob","uri":"s3://snaps/builds/team-a/s"},"op":{"kind":"refresh_upload","multipart_hint":{"max_parts":1,"part_size_bytes":5242880}}}"#,
                "op.upload_id",
            ),
            (
                r#"{"target":{"kind":"blob","uri":"s3://snaps/builds/team-a/s"},"op":{"kind":"refresh_upload","upload_id":"a b","multipart_hint":{"max_parts":1,"part_size_bytes":5242880}}}"#,
                "op.upload_id",
            ),
            (
                r#"{"target":{"kind":"blob","uri":"s3://snaps/builds/team-a/s"},"op":{"kind":"refresh_upload","upload_id":"u"}}"#,
                "op.multipart_hint",
            ),
        ] {
            let (status, answer) = answer(run(body));
            assert_eq!(status, 400, "{answer}");
            assert!(answer["message"].as_str().unwrap().contains(field), "{field}: {answer}");
        }
        let (_, answer) = answer(run(
            r#"{"target":{"kind":"artifact","rel_path":"s"},"op":{"kind":"refresh_upload","upload_id":"u","multipart_hint":{"max_parts":1,"part_size_bytes":5242880}}}"#,
        ));
        assert_eq!(answer["code"], "unsupported_combination");
    }

    #[test]
    fn store_failures_are_502_with_what_the_store_said() {
        let Step::StoreCall(pending) = run(
            r#"{"target":{"kind":"artifact","rel_path":"s"},"op":{"kind":"put_artifact","multipart_hint":{"max_parts":1,"part_size_bytes":5242880}}}"#,
        ) else {
            panic!("expected a store call")
        };
        let a = pending.finish(
            404,
            "<Error><Code>NoSuchBucket</Code><Message>The specified bucket does not exist</Message></Error>",
        );
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!((a.status, body["code"].as_str()), (502, Some("store_failed")));
        assert_eq!(body["request_id"], "req-1");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("HTTP 404, S3 error code NoSuchBucket"), "{message}");
        assert!(message.contains("request id req-1"), "{message}");
        assert!(!a.body.contains("X-Amz-Signature"));
        // The store's own words go to the log, not to the caller.
        assert!(!message.contains("does not exist"), "{message}");
        assert!(a.log.as_deref().unwrap().contains("NoSuchBucket: The specified bucket does not exist"));
    }

    #[test]
    fn an_unreachable_store_is_a_502_whose_detail_stays_in_the_log() {
        let Step::StoreCall(pending) = run(
            r#"{"target":{"kind":"artifact","rel_path":"s"},"op":{"kind":"put_artifact","multipart_hint":{"max_parts":1,"part_size_bytes":5242880}}}"#,
        ) else {
            panic!("expected a store call")
        };
        let detail = format!("{}: ConnectionRefused", pending.store_url);
        let a = pending.unreachable(&detail);
        let body: Value = serde_json::from_str(&a.body).unwrap();
        assert_eq!((a.status, body["code"].as_str()), (502, Some("store_unreachable")));
        assert!(!a.body.contains("X-Amz-") && !a.body.contains("127.0.0.1"), "{}", a.body);
        assert!(a.log.as_deref().unwrap().contains("ConnectionRefused"));
    }

    #[test]
    fn get_blob_only_in_own_namespace_or_shared_prefixes() {
        let get = |uri: &str| {
            answer(run(&format!(r#"{{"target":{{"kind":"blob","uri":"{uri}"}},"op":{{"kind":"get_blob"}}}}"#)))
        };
        let (status, body) = get("s3://snaps/builds/team-a/parent.tlsnap");
        assert_eq!((status, body["kind"].as_str(), body["method"].as_str()), (200, Some("single_get"), Some("GET")));
        assert_eq!(get("s3://snaps/public/base.tlsnap").0, 200);
        for (uri, status, code) in [
            ("s3://snaps/builds/team-b/parent.tlsnap", 403, "outside_namespace"),
            ("s3://snaps/builds/team-a-evil/x", 403, "outside_namespace"),
            ("s3://snaps/publicity/x", 403, "outside_namespace"),
            ("s3://other/builds/team-a/x", 403, "foreign_bucket"),
            ("gs://snaps/builds/team-a/x", 400, "invalid_uri"),
            ("s3://snaps/builds/team-a/../team-b/x", 400, "invalid_uri"),
        ] {
            let (s, body) = get(uri);
            assert_eq!((s, body["code"].as_str()), (status, Some(code)), "{uri}");
            assert!(body["message"].as_str().unwrap().contains(uri), "{uri}: {body}");
        }
    }

    #[test]
    fn get_blob_outside_the_namespace_needs_an_exact_grant_in_the_token() {
        let granted = "s3://snaps/builds/team-b/pub.tlsnap";
        let claims = token::Claims { read: vec![granted.into()], ..token::Claims::new("team-a", 1_800_000_300) };
        let token = token::mint_claims(KEY.as_bytes(), &claims).unwrap();
        let get = |uri: &str| {
            let body = format!(r#"{{"target":{{"kind":"blob","uri":"{uri}"}},"op":{{"kind":"get_blob"}}}}"#);
            answer(sign(&config(), &token, &body))
        };
        let (status, body) = get(granted);
        assert_eq!((status, body["uri"].as_str()), (200, Some(granted)));
        assert!(body["url"].as_str().unwrap().contains("/snaps/builds/team-b/pub.tlsnap?"));
        // Only that object: not its neighbours, not a longer key, not another bucket.
        for uri in [
            "s3://snaps/builds/team-b/pub.tlsnap2",
            "s3://snaps/builds/team-b/other.tlsnap",
            "s3://snaps/builds/team-b/pub.tlsnap/x",
        ] {
            assert_eq!(get(uri).1["code"].as_str(), Some("outside_namespace"), "{uri}");
        }
        // A grant is for reading only: put_artifact still composes under the caller's namespace.
        let put = r#"{"target":{"kind":"artifact","rel_path":"x.tlsnap"},"op":{"kind":"put_artifact"}}"#;
        assert_eq!(answer(sign(&config(), &token, put)).1["uri"].as_str(), Some("s3://snaps/builds/team-a/x.tlsnap"));
    }

    #[test]
    fn a_key_longer_than_the_store_holds_is_refused_at_sign_time() {
        let mut config = config();
        config.max_key_bytes = 40;
        let token = token::mint(KEY.as_bytes(), "team-a", 1_800_000_600).unwrap();
        let put = |rel: &str| {
            let body =
                format!(r#"{{"target":{{"kind":"artifact","rel_path":"{rel}"}},"op":{{"kind":"put_artifact"}}}}"#);
            answer(sign(&config, &token, &body))
        };
        // "builds/team-a/" is 14 bytes: 26 bytes of rel_path fit, 27 do not.
        assert_eq!(put(&"a".repeat(26)).0, 200);
        let (status, refused) = put(&"a".repeat(27));
        assert_eq!((status, refused["code"].as_str()), (400, Some("invalid_rel_path")), "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("at most 40 bytes"), "{refused}");
        assert!(!refused.to_string().contains("X-Amz-Signature"));
    }

    #[test]
    fn authentication_comes_before_everything_else() {
        let body = br#"{"target":{"kind":"artifact","rel_path":"a"},"op":{"kind":"put_artifact"}}"#;
        let expired = format!("Bearer {}", token::mint(KEY.as_bytes(), "team-a", 1_800_000_000).unwrap());
        let other_key = format!("Bearer {}", token::mint(&[7u8; 32], "team-a", 1_900_000_000).unwrap());
        for (auth, code) in [
            (None, "missing_token"),
            (Some("Basic abc"), "missing_token"),
            (Some(expired.as_str()), "expired_token"),
            (Some(other_key.as_str()), "invalid_token"),
        ] {
            let incoming = Incoming { method: "POST", path: SIGN_PATH, authorization: auth, body, request_id: "req-1" };
            let (status, json) = answer(handle(&config(), &mut Memo::default(), &incoming, now()));
            assert_eq!((status, json["code"].as_str()), (401, Some(code)));
        }
        let incoming = Incoming { method: "GET", path: SIGN_PATH, authorization: None, body, request_id: "req-1" };
        assert_eq!(answer(handle(&config(), &mut Memo::default(), &incoming, now())).0, 405);
        let incoming =
            Incoming { method: "POST", path: "/api/v1/blob", authorization: None, body, request_id: "req-1" };
        assert_eq!(answer(handle(&config(), &mut Memo::default(), &incoming, now())).0, 404);
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let incoming =
            Incoming { method: "POST", path: SIGN_PATH, authorization: None, body: &big, request_id: "req-1" };
        assert_eq!(answer(handle(&config(), &mut Memo::default(), &incoming, now())).0, 413);
    }

    #[test]
    fn rel_path_traversal_is_refused_before_signing() {
        for rel in ["../team-b/x", "/builds/team-b/x", "a/./b", "a//b", "a\\\\b", "%2e%2e/x", "a\\u0001b"] {
            let (status, body) = answer(run(&format!(
                r#"{{"target":{{"kind":"artifact","rel_path":"{rel}"}},"op":{{"kind":"put_artifact"}}}}"#
            )));
            assert_eq!((status, body["code"].as_str()), (400, Some("invalid_rel_path")), "{rel}");
            assert!(!body.to_string().contains("X-Amz-Signature"));
        }
    }

    mod properties {
        use proptest::prelude::*;
        use serde_json::{Value, json};

        use super::*;

        fn percent_decode(path: &str) -> Vec<u8> {
            let bytes = path.as_bytes();
            let mut out = Vec::with_capacity(bytes.len());
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'%' && i + 2 < bytes.len() {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 3;
                } else {
                    out.push(bytes[i]);
                    i += 1;
                }
            }
            out
        }

        /// Paths built from the pieces traversal attacks use.
        fn hostile_rel_path() -> impl Strategy<Value = String> {
            let segment = prop_oneof![
                4 => "[a-z0-9-]{1,6}",
                1 => Just("..".to_owned()),
                1 => Just(".".to_owned()),
                1 => Just(String::new()),
                1 => "%2[eEfF]|%5[cC]|%00|%25",
                1 => "[\\\\\u{0}-\u{1f}\u{7f}]",
                1 => "[.]{1,4}[a-z]{0,2}",
                1 => any::<String>().prop_map(|s| s.chars().take(8).collect::<String>()),
            ];
            (prop::bool::weighted(0.1), prop::collection::vec(segment, 1..8))
                .prop_map(|(absolute, segments)| format!("{}{}", if absolute { "/" } else { "" }, segments.join("/")))
        }

        fn namespace() -> impl Strategy<Value = String> {
            "[a-zA-Z0-9._-]{1,20}".prop_filter("valid namespace", |ns| token::valid_namespace(ns))
        }

        fn run_as(namespace: &str, body: &str) -> Step {
            sign(&config(), &token::mint(KEY.as_bytes(), namespace, 1_800_000_600).unwrap(), body)
        }

        /// The words a sign request is made of, and some that are not.
        fn word() -> impl Strategy<Value = String> {
            prop_oneof![
                Just("target".to_owned()),
                Just("op".to_owned()),
                Just("kind".to_owned()),
                Just("rel_path".to_owned()),
                Just("uri".to_owned()),
                Just("namespace".to_owned()),
                Just("multipart_hint".to_owned()),
                Just("max_parts".to_owned()),
                Just("part_size_bytes".to_owned()),
                Just("artifact".to_owned()),
                Just("blob".to_owned()),
                Just("put_artifact".to_owned()),
                Just("get_blob".to_owned()),
                Just("s3://snaps/builds/team-a/x".to_owned()),
                Just("s3://snaps/builds/team-b/x".to_owned()),
                Just("s3://snaps/public/x".to_owned()),
                Just("s3://other/builds/team-a/x".to_owned()),
                Just("s3://snaps/builds/team-a/../team-b/x".to_owned()),
                hostile_rel_path(),
                any::<String>(),
            ]
        }

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                prop_oneof![
                    Just(0u64),
                    Just(1),
                    Just(10_000),
                    Just(10_001),
                    Just(5_242_880),
                    Just(5_368_709_121),
                    any::<u64>()
                ]
                .prop_map(Value::from),
                any::<f64>().prop_map(Value::from),
                word().prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 24, 5, |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::vec((word(), inner), 0..5)
                        .prop_map(|fields| Value::Object(fields.into_iter().collect())),
                ]
            })
        }

        /// Request bodies shaped like sign requests, with every part open to attack.
        fn shaped_body() -> impl Strategy<Value = String> {
            let hint = prop_oneof![
                Just(Value::Null),
                (any::<u64>(), any::<u64>()).prop_map(|(p, s)| json!({"max_parts": p, "part_size_bytes": s})),
                (1u64..=10_000, 5_242_880u64..=5_368_709_120)
                    .prop_map(|(p, s)| json!({"max_parts": p, "part_size_bytes": s})),
                json_value(),
            ];
            // Mostly well-formed kinds and fields, so the deeper steps (policy,
            // the store call, its answer) are reached, not only the parser.
            let either = |valid: &'static [&'static str]| prop_oneof![3 => prop::sample::select(valid).prop_map(str::to_owned), 1 => word()];
            let location = prop_oneof![
                3 => hostile_rel_path(),
                2 => prop::sample::select(&[
                    "s3://snaps/builds/team-a/x",
                    "s3://snaps/builds/team-b/x",
                    "s3://snaps/public/x",
                    "s3://other/builds/team-a/x",
                ][..]).prop_map(str::to_owned),
                1 => word(),
            ];
            (
                either(&["artifact", "blob"]),
                location,
                either(&["put_artifact", "get_blob"]),
                either(&["rel_path", "uri"]),
                hint,
                prop::option::of(json_value()),
            )
                .prop_map(|(target_kind, location, op_kind, field, hint, extra)| {
                    let mut body = json!({
                        "target": {"kind": target_kind, field: location},
                        "op": {"kind": op_kind, "multipart_hint": hint},
                    });
                    if let Some(extra) = extra {
                        body["extra"] = extra;
                    }
                    body.to_string()
                })
        }

        fn body() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                3 => shaped_body().prop_map(String::into_bytes),
                1 => json_value().prop_map(|v| v.to_string().into_bytes()),
                // The same key twice, the second one hostile.
                1 => (shaped_body(), hostile_rel_path()).prop_map(|(b, rel)| {
                    b.replacen("\"kind\":", &format!("\"rel_path\":{},\"kind\":", Value::from(rel)), 1).into_bytes()
                }),
                1 => prop::collection::vec(any::<u8>(), 0..200),
            ]
        }

        /// (Authorization header, whether it verifies)
        fn authorization() -> impl Strategy<Value = (Option<String>, bool)> {
            prop_oneof![
                3 => namespace().prop_map(|ns| {
                    (Some(format!("Bearer {}", token::mint(KEY.as_bytes(), &ns, 1_800_000_600).unwrap())), true)
                }),
                1 => namespace().prop_map(|ns| {
                    (Some(format!("Bearer {}", token::mint(KEY.as_bytes(), &ns, 1_799_999_999).unwrap())), false)
                }),
                1 => namespace().prop_map(|ns| {
                    (Some(format!("Bearer {}", token::mint(&[9u8; 32], &ns, 1_800_000_600).unwrap())), false)
                }),
                1 => "[ -~]{0,80}".prop_map(|t| (Some(format!("Bearer {t}")), false)),
                1 => Just((None, false)),
            ]
        }

        fn assert_signs_nothing(answer: &Answer) -> Result<(), TestCaseError> {
            prop_assert!(!answer.body.contains("X-Amz-"), "signed on an error path: {}", answer.body);
            let json: Value = serde_json::from_str(&answer.body).unwrap();
            prop_assert!(json["code"].is_string() && json["message"].is_string(), "{}", answer.body);
            prop_assert_eq!(json["request_id"].as_str(), Some("req-1"));
            Ok(())
        }

        proptest! {
            // No regression files: the repository's top level is fixed; a failure prints its input.
            #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

            /// Every rel_path the signer accepts composes to a key under
            /// `prefix/namespace/`, and the URL names exactly that key.
            #[test]
            fn every_accepted_rel_path_stays_under_the_callers_namespace(ns in namespace(), rel in hostile_rel_path()) {
                let body = json!({"target": {"kind": "artifact", "rel_path": rel}, "op": {"kind": "put_artifact"}});
                let Step::Respond(answer) = run_as(&ns, &body.to_string()) else {
                    panic!("no store call without a multipart hint");
                };
                if answer.status != 200 {
                    assert_signs_nothing(&answer)?;
                    let json: Value = serde_json::from_str(&answer.body).unwrap();
                    prop_assert_eq!(json["code"].as_str(), Some("invalid_rel_path"));
                    return Ok(());
                }
                let json: Value = serde_json::from_str(&answer.body).unwrap();
                let key = format!("builds/{ns}/{rel}");
                let uri = format!("s3://snaps/{key}");
                prop_assert_eq!(json["uri"].as_str(), Some(uri.as_str()));
                let url = json["url"].as_str().unwrap();
                let path = url.strip_prefix("http://127.0.0.1:9000").unwrap().split('?').next().unwrap();
                let decoded = String::from_utf8(percent_decode(path)).unwrap();
                prop_assert_eq!(&decoded, &format!("/snaps/{key}"));
                let under = decoded.strip_prefix(&format!("/snaps/builds/{ns}/")).unwrap();
                for segment in under.split('/') {
                    prop_assert!(!matches!(segment, "" | "." | ".."), "segment {segment:?} in {decoded}");
                }
                prop_assert!(!rel.contains('\\') && !rel.chars().any(char::is_control));
                prop_assert!(!rel.to_ascii_lowercase().contains("%2e") && !rel.to_ascii_lowercase().contains("%2f"));
            }

            /// Whatever the store answers CreateMultipartUpload (or when it is
            /// unreachable), an error answer signs nothing.
            #[test]
            fn no_store_answer_makes_an_error_carry_a_signature(
                ns in namespace(),
                max_parts in 1u64..=50,
                store_status in prop_oneof![Just(200u16), 100u16..600],
                store_body in prop_oneof![
                    Just(String::new()),
                    "<Error><Code>[A-Za-z]{1,20}</Code><Message>[ -~]{0,40}</Message></Error>",
                    "<Error><Code>[ -~]{0,80}</Code></Error>",
                    Just("<InitiateMultipartUploadResult><UploadId>u-1</UploadId></InitiateMultipartUploadResult>".to_owned()),
                    any::<String>(),
                ],
            ) {
                let body = json!({"target": {"kind": "artifact", "rel_path": "s.tlsnap"},
                    "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": max_parts, "part_size_bytes": 5_242_880}}});
                let Step::StoreCall(pending) = run_as(&ns, &body.to_string()) else {
                    panic!("a valid multipart request asks the store");
                };
                let store_url = pending.store_url.clone();
                let answer = pending.finish(store_status, &store_body);
                if answer.status == 200 {
                    prop_assert!((200..300).contains(&store_status));
                    prop_assert!(answer.body.contains("X-Amz-Signature="));
                } else {
                    assert_signs_nothing(&answer)?;
                }
                let Step::StoreCall(again) = run_as(&ns, &body.to_string()) else {
                    panic!("the same request decided differently");
                };
                // The transport error names the presigned URL; only the log may see it.
                let answer = again.unreachable(&format!("{store_url}: {store_body}"));
                assert_signs_nothing(&answer)?;
                prop_assert!(!answer.body.contains("127.0.0.1"), "{}", answer.body);
            }

            /// Whatever is sent, an error answer signs nothing; a signed answer
            /// needs a token that verifies.
            #[test]
            fn nothing_is_signed_on_any_error_path(
                (authorization, verifies) in authorization(),
                method in prop_oneof![4 => Just("POST".to_owned()), 1 => "[A-Z]{1,7}"],
                path in prop_oneof![4 => Just(SIGN_PATH.to_owned()), 1 => "/[a-z/]{0,20}"],
                body in body(),
                store_status in prop_oneof![Just(200u16), 100u16..600],
                store_body in prop_oneof![
                    Just(String::new()),
                    "<Error><Code>[A-Za-z]{1,20}</Code><Message>[ -~]{0,40}</Message></Error>",
                    Just("<InitiateMultipartUploadResult><UploadId>u-1</UploadId></InitiateMultipartUploadResult>".to_owned()),
                    any::<String>(),
                ],
            ) {
                let incoming = Incoming {
                    method: &method,
                    path: &path,
                    authorization: authorization.as_deref(),
                    body: &body,
                    request_id: "req-1",
                };
                match handle(&config(), &mut Memo::default(), &incoming, now()) {
                    Step::Respond(answer) if answer.status == 200 => {
                        prop_assert!(verifies, "signed for a token that does not verify: {}", answer.body);
                        prop_assert!(answer.body.contains("X-Amz-Signature="));
                    }
                    Step::Respond(answer) => assert_signs_nothing(&answer)?,
                    Step::StoreCall(pending) => {
                        prop_assert!(verifies);
                        let store_url = pending.store_url.clone();
                        let answer = pending.finish(store_status, &store_body);
                        if answer.status == 200 {
                            prop_assert!((200..300).contains(&store_status));
                        } else {
                            assert_signs_nothing(&answer)?;
                        }
                        // The transport error names the URL; the caller must not see it.
                        let Step::StoreCall(again) = handle(&config(), &mut Memo::default(), &incoming, now()) else {
                            panic!("the same request decided differently");
                        };
                        let answer = again.unreachable(&format!("{store_url}: connection refused"));
                        assert_signs_nothing(&answer)?;
                    }
                }
            }
        }
    }
}
