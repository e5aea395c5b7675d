//! The signer's decisions, free of I/O and clocks: a request and `now` in,
//! either an answer or the one store call to make (CreateMultipartUpload).

use std::fmt::Write as _;

use jiff::Timestamp;
use serde::Serialize;

use super::config::SignerConfig;
use super::error::SignError;
use super::request::{MultipartHint, Op, SignBlobRequest, Target};
use super::validate;
use crate::presign::{Method, ObjectUrl, Presigner};
use crate::token;

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
}

/// A finished HTTP answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// JSON body.
    pub body: String,
}

impl From<SignError> for Answer {
    fn from(e: SignError) -> Self {
        Answer { status: e.status(), body: e.body() }
    }
}

/// What the glue does next.
#[derive(Debug)]
pub enum Step {
    /// Send this answer.
    Respond(Answer),
    /// POST (empty body) to `store_url`, then call [`PendingUpload::finish`].
    CreateMultipartUpload(Box<PendingUpload>),
}

/// A multipart upload waiting for the store's CreateMultipartUpload answer.
pub struct PendingUpload {
    /// Presigned CreateMultipartUpload URL.
    pub store_url: String,
    uri: String,
    object: ObjectUrl,
    hint: MultipartHint,
    presigner: Presigner,
    expires_at: String,
}

impl std::fmt::Debug for PendingUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingUpload").field("uri", &self.uri).field("hint", &self.hint).finish_non_exhaustive()
    }
}

#[derive(Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Signed<'a> {
    /// Everything but `partUrls`, which [`PendingUpload::finish`] appends.
    #[serde(rename_all = "camelCase")]
    S3Multipart {
        uri: &'a str,
        upload_id: &'a str,
        part_size_bytes: u64,
        max_parts: u32,
        complete_url: String,
        abort_url: String,
        expires_at: &'a str,
    },
    #[serde(rename_all = "camelCase")]
    SinglePut {
        uri: &'a str,
        method: &'a str,
        url: String,
        headers: serde_json::Map<String, serde_json::Value>,
        expires_at: &'a str,
    },
    #[serde(rename_all = "camelCase")]
    SingleGet { uri: &'a str, method: &'a str, url: String, expires_at: &'a str },
}

fn ok(signed: &Signed<'_>) -> Answer {
    Answer { status: 200, body: serde_json::to_string(signed).expect("answers serialize") }
}

impl PendingUpload {
    /// The canonical URI the upload will create.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Turns the store's answer to CreateMultipartUpload into the signer's answer.
    pub fn finish(self, store_status: u16, store_body: &str) -> Answer {
        if !(200..300).contains(&store_status) {
            return SignError::StoreFailed { status: store_status, detail: s3_error_detail(store_body) }.into();
        }
        let upload_id = match rusty_s3::actions::CreateMultipartUpload::parse_response(store_body) {
            Ok(parsed) => parsed.upload_id().to_owned(),
            Err(e) => {
                return SignError::StoreFailed {
                    status: store_status,
                    detail: format!("answer has no UploadId ({e}): {}", excerpt(store_body)),
                }
                .into();
            }
        };
        let p = &self.presigner;
        let head = serde_json::to_string(&Signed::S3Multipart {
            uri: &self.uri,
            upload_id: &upload_id,
            part_size_bytes: self.hint.part_size_bytes,
            max_parts: self.hint.max_parts,
            complete_url: p.presign(Method::Post, &self.object, &[("uploadId", &upload_id)]),
            abort_url: p.presign(Method::Delete, &self.object, &[("uploadId", &upload_id)]),
            expires_at: &self.expires_at,
        })
        .expect("answers serialize");
        // Up to 10,000 URLs: written straight into the body. They need no
        // JSON escaping: every part of them is percent-encoded or a parsed host.
        let mut body = String::with_capacity(head.len() + self.hint.max_parts as usize * (head.len() / 2 + 48));
        body.push_str(&head[..head.len() - 1]);
        body.push_str(",\"partUrls\":[");
        p.each_upload_part_url(&self.object, &upload_id, self.hint.max_parts, |part, url| {
            debug_assert!(!url.contains(['"', '\\']) && !url.contains(char::is_control));
            if part > 1 {
                body.push(',');
            }
            let _ = write!(body, "{{\"partNumber\":{part},\"url\":\"{url}\"}}");
        });
        body.push_str("]}");
        Answer { status: 200, body }
    }

    /// The store could not be reached at all.
    pub fn unreachable(self, detail: &str) -> Answer {
        SignError::StoreUnreachable { detail: detail.to_owned() }.into()
    }
}

fn excerpt(body: &str) -> String {
    let trimmed = body.trim();
    match trimmed.char_indices().nth(300) {
        Some((i, _)) => format!("{}…", &trimmed[..i]),
        None => trimmed.to_owned(),
    }
}

fn xml_element<'a>(body: &'a str, name: &str) -> Option<&'a str> {
    let start = body.find(&format!("<{name}>"))? + name.len() + 2;
    let end = body[start..].find(&format!("</{name}>"))?;
    Some(&body[start..start + end])
}

/// `Code: Message` of an S3 error document, else an excerpt of the body.
fn s3_error_detail(body: &str) -> String {
    match (xml_element(body, "Code"), xml_element(body, "Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code.to_owned(),
        _ if body.trim().is_empty() => "(empty body)".into(),
        _ => excerpt(body),
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

/// Decides what to do with one request.
pub fn handle(config: &SignerConfig, incoming: &Incoming<'_>, now: Timestamp) -> Step {
    match decide(config, incoming, now) {
        Ok(step) => step,
        Err(e) => Step::Respond(e.into()),
    }
}

fn decide(config: &SignerConfig, incoming: &Incoming<'_>, now: Timestamp) -> Result<Step, SignError> {
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
    let claims = token::verify(&config.token_key, bearer, now.as_second(), config.token_max_ttl_secs)
        .map_err(SignError::BadToken)?;
    let request = SignBlobRequest::parse(incoming.body)?;

    let expires_at = Timestamp::from_second(now.as_second() + i64::from(config.url_ttl_secs))
        .expect("now + at most 7 days is a valid timestamp")
        .to_string();
    let presigner = Presigner::new(&config.credentials, &config.region, now, config.url_ttl_secs);

    match (request.target, request.op) {
        (Target::Artifact { rel_path }, Op::PutArtifact { multipart_hint }) => {
            validate::rel_path(&rel_path)
                .map_err(|problem| SignError::InvalidRelPath { rel_path: rel_path.clone(), problem })?;
            let key = format!("{}{rel_path}", config.namespace_prefix(&claims.namespace));
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
            let uri = format!("s3://{}/{key}", config.bucket);
            let object = config.endpoint.object(&config.bucket, &key);
            match multipart_hint {
                None => Ok(Step::Respond(ok(&Signed::SinglePut {
                    uri: &uri,
                    method: "PUT",
                    url: presigner.presign(Method::Put, &object, &[]),
                    headers: serde_json::Map::new(),
                    expires_at: &expires_at,
                }))),
                Some(hint) => Ok(Step::CreateMultipartUpload(Box::new(PendingUpload {
                    store_url: presigner.presign(Method::Post, &object, &[("uploads", "")]),
                    uri,
                    object,
                    hint,
                    presigner,
                    expires_at,
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
            let own = config.namespace_prefix(&claims.namespace);
            let readable = parsed.key.starts_with(&own)
                || config.shared_prefixes.iter().any(|p| parsed.key.starts_with(p))
                || claims.read.contains(&uri);
            if !readable {
                return Err(SignError::OutsideNamespace { uri, namespace: claims.namespace });
            }
            let object = config.endpoint.object(&config.bucket, parsed.key);
            Ok(Step::Respond(ok(&Signed::SingleGet {
                uri: &uri,
                method: "GET",
                url: presigner.presign(Method::Get, &object, &[]),
                expires_at: &expires_at,
            })))
        }
        _ => unreachable!("SignBlobRequest::parse admits only artifact+put_artifact and blob+get_blob"),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;
    use crate::signer::config::vars;

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

    fn run(body: &str) -> Step {
        let auth = format!("Bearer {}", token::mint(KEY.as_bytes(), "team-a", 1_800_000_600).unwrap());
        let incoming = Incoming { method: "POST", path: SIGN_PATH, authorization: Some(&auth), body: body.as_bytes() };
        handle(&config(), &incoming, now())
    }

    fn answer(step: Step) -> (u16, Value) {
        match step {
            Step::Respond(a) => (a.status, serde_json::from_str(&a.body).unwrap()),
            Step::CreateMultipartUpload(p) => panic!("unexpected store call for {}", p.uri),
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
        let Step::CreateMultipartUpload(pending) = run(
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

    #[test]
    fn store_failures_are_502_with_what_the_store_said() {
        let Step::CreateMultipartUpload(pending) = run(
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
        assert!(
            body["message"].as_str().unwrap().contains("HTTP 404): NoSuchBucket: The specified bucket does not exist")
        );
        assert!(!a.body.contains("X-Amz-Signature"));
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
        let auth = format!("Bearer {}", token::mint_claims(KEY.as_bytes(), &claims).unwrap());
        let get = |uri: &str| {
            let body = format!(r#"{{"target":{{"kind":"blob","uri":"{uri}"}},"op":{{"kind":"get_blob"}}}}"#);
            let incoming =
                Incoming { method: "POST", path: SIGN_PATH, authorization: Some(&auth), body: body.as_bytes() };
            answer(handle(&config(), &incoming, now()))
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
        let incoming = Incoming { method: "POST", path: SIGN_PATH, authorization: Some(&auth), body: put.as_bytes() };
        assert_eq!(
            answer(handle(&config(), &incoming, now())).1["uri"].as_str(),
            Some("s3://snaps/builds/team-a/x.tlsnap")
        );
    }

    #[test]
    fn a_key_longer_than_the_store_holds_is_refused_at_sign_time() {
        let mut config = config();
        config.max_key_bytes = 40;
        let auth = format!("Bearer {}", token::mint(KEY.as_bytes(), "team-a", 1_800_000_600).unwrap());
        let sign = |rel: &str| {
            let body =
                format!(r#"{{"target":{{"kind":"artifact","rel_path":"{rel}"}},"op":{{"kind":"put_artifact"}}}}"#);
            let incoming =
                Incoming { method: "POST", path: SIGN_PATH, authorization: Some(&auth), body: body.as_bytes() };
            answer(handle(&config, &incoming, now()))
        };
        // "builds/team-a/" is 14 bytes: 26 bytes of rel_path fit, 27 do not.
        assert_eq!(sign(&"a".repeat(26)).0, 200);
        let (status, refused) = sign(&"a".repeat(27));
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
            let incoming = Incoming { method: "POST", path: SIGN_PATH, authorization: auth, body };
            let (status, json) = answer(handle(&config(), &incoming, now()));
            assert_eq!((status, json["code"].as_str()), (401, Some(code)));
        }
        let incoming = Incoming { method: "GET", path: SIGN_PATH, authorization: None, body };
        assert_eq!(answer(handle(&config(), &incoming, now())).0, 405);
        let incoming = Incoming { method: "POST", path: "/api/v1/blob", authorization: None, body };
        assert_eq!(answer(handle(&config(), &incoming, now())).0, 404);
        let big = vec![b' '; MAX_BODY_BYTES + 1];
        let incoming = Incoming { method: "POST", path: SIGN_PATH, authorization: None, body: &big };
        assert_eq!(answer(handle(&config(), &incoming, now())).0, 413);
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
}
