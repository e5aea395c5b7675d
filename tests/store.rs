//! The store's rules, attacked over real HTTP on loopback with real SigV4
//! (the project's presigner, rusty-s3 where a header must be signed), with
//! the store directory checked on disk after each attack. Attack numbers
//! refer to issue 8's list.

mod common;

use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use rusty_s3::S3Action;
use s3s::crypto::{Checksum, Md5};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use snapsign::presign::{Addressing, Credentials, Endpoint, Method, Presigner};
use snapsign_dev_stack::store::{self, StoreConfig};
use snapsign_host::serve::Server;

const MIB: usize = 1024 * 1024;

/// Every file and directory under `root` with a digest of its content.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(format!("{rel}/"), String::new());
                walk(root, &path, out);
            } else {
                out.insert(rel, hex::encode(Sha256::digest(std::fs::read(&path).unwrap())));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

/// Names of the files directly under `root` starting with `prefix`.
fn root_files(root: &Path, prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect();
    names.sort();
    names
}

fn md5(bytes: &[u8]) -> [u8; 16] {
    let mut md5 = Md5::new();
    md5.update(bytes);
    md5.finalize()
}

/// S3's multipart ETag: MD5 of the parts' binary MD5s, then `-N`.
fn multipart_etag(parts: &[&[u8]]) -> String {
    let mut all = Md5::new();
    for part in parts {
        all.update(&md5(part));
    }
    format!("\"{}-{}\"", hex::encode(all.finalize()), parts.len())
}

fn completion(parts: &[(u32, &str)]) -> String {
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (number, etag) in parts {
        xml.push_str(&format!("<Part><PartNumber>{number}</PartNumber><ETag>{etag}</ETag></Part>"));
    }
    xml + "</CompleteMultipartUpload>"
}

fn xml_field(xml: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = xml.find(&open).unwrap_or_else(|| panic!("no <{name}> in {xml}")) + open.len();
    xml[start..start + xml[start..].find("</").unwrap()].to_owned()
}

/// Asserts an S3 error answer: status and `<Code>`; returns the body.
async fn s3_error(response: reqwest::Response, status: u16, code: &str) -> String {
    let got = response.status().as_u16();
    let body = response.text().await.unwrap();
    assert_eq!((got, xml_field(&body, "Code").as_str()), (status, code), "{body}");
    body
}

fn credentials() -> Credentials {
    Credentials { access_key_id: ACCESS_KEY.into(), secret_access_key: SECRET_KEY.into(), session_token: None }
}

/// Presigns requests for any store URL with the store's own credentials.
struct Sign {
    endpoint: Endpoint,
}

impl Sign {
    fn new(store_url: &str) -> Sign {
        Sign { endpoint: Endpoint::parse(store_url, Addressing::Path).unwrap() }
    }

    fn url(&self, method: Method, key: &str, params: &[(&str, &str)]) -> String {
        Presigner::new(&credentials(), "us-east-1", jiff::Timestamp::now(), 600).presign(
            method,
            &self.endpoint.object(BUCKET, key),
            params,
        )
    }

    fn part(&self, key: &str, id: &str, part: u32) -> String {
        self.url(Method::Put, key, &[("partNumber", &part.to_string()), ("uploadId", id)])
    }

    /// spec.upload for upload `id` of `key`, as the signer answers it: `parts` part URLs.
    fn multipart(&self, key: &str, id: &str, part_size: u64, parts: u32) -> snapsign::wire::S3Multipart {
        snapsign::wire::S3Multipart {
            uri: None,
            upload_id: id.to_owned(),
            part_size_bytes: part_size,
            max_parts: Some(parts),
            complete_url: self.url(Method::Post, key, &[("uploadId", id)]),
            abort_url: Some(self.url(Method::Delete, key, &[("uploadId", id)])),
            expires_at: None,
            headers: Default::default(),
            part_urls: (1..=parts)
                .map(|n| snapsign::wire::PartUrl { part_number: n, url: self.part(key, id, n) })
                .collect(),
        }
    }
}

/// Presigned S3 calls against one store.
struct Client {
    sign: Sign,
    http: reqwest::Client,
}

impl Client {
    fn new(store_url: &str) -> Client {
        Client { sign: Sign::new(store_url), http: reqwest::Client::new() }
    }

    async fn create(&self, key: &str) -> String {
        let response = self.http.post(self.sign.url(Method::Post, key, &[("uploads", "")])).send().await.unwrap();
        assert_eq!(response.status(), 200, "CreateMultipartUpload {key}");
        xml_field(&response.text().await.unwrap(), "UploadId")
    }

    async fn upload_part(&self, key: &str, id: &str, part: u32, bytes: Vec<u8>) -> String {
        let response = self.http.put(self.sign.part(key, id, part)).body(bytes).send().await.unwrap();
        assert_eq!(response.status(), 200, "UploadPart {part}");
        response.headers()["etag"].to_str().unwrap().to_owned()
    }

    async fn complete(&self, key: &str, id: &str, parts: &[(u32, &str)]) -> reqwest::Response {
        let url = self.sign.url(Method::Post, key, &[("uploadId", id)]);
        self.http.post(url).body(completion(parts)).send().await.unwrap()
    }

    async fn abort(&self, key: &str, id: &str) -> reqwest::Response {
        self.http.delete(self.sign.url(Method::Delete, key, &[("uploadId", id)])).send().await.unwrap()
    }

    async fn get(&self, key: &str) -> reqwest::Response {
        self.http.get(self.sign.url(Method::Get, key, &[])).send().await.unwrap()
    }

    async fn late_part(&self, key: &str, id: &str, part: u32) -> reqwest::Response {
        self.http.put(self.sign.part(key, id, part)).body(vec![0u8; 10]).send().await.unwrap()
    }
}

/// The store alone, in this process, with its directory.
struct Direct {
    dir: tempfile::TempDir,
    store: Server,
    client: Client,
}

impl std::ops::Deref for Direct {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl Direct {
    async fn start(abort_incomplete_after: Duration) -> Direct {
        let dir = tempfile::tempdir().unwrap();
        let store = store::start(&StoreConfig {
            root: dir.path().join("store"),
            listen: loopback(),
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: SECRET_KEY.into(),
            buckets: vec![BUCKET.into()],
            faults: Default::default(),
            abort_incomplete_after,
        })
        .await
        .expect("start the store");
        let client = Client::new(&store.url());
        Direct { dir, store, client }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("store")
    }
}

fn put_artifact(rel_path: &str, multipart: Option<(u64, u64)>) -> Value {
    let hint = multipart.map(|(parts, size)| json!({"max_parts": parts, "part_size_bytes": size}));
    json!({"target": {"kind": "artifact", "rel_path": rel_path}, "op": {"kind": "put_artifact", "multipart_hint": hint}})
}

fn get_blob(uri: &str) -> Value {
    json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}})
}

// Attack 1: namespace a adds an unsigned x-amz-copy-source to its own URLs.
#[tokio::test(flavor = "multi_thread")]
async fn a_copy_source_on_a_presigned_put_or_part_url_gets_403_and_copies_nothing() {
    let stack = Stack::start().await;
    let root = stack.store_root();
    let (status, b_put) = stack.sign("team-b", put_artifact("secret.tlsnap", None)).await;
    assert_eq!(status, 200, "{b_put}");
    let secret = b"team b's secret snapshot".to_vec();
    assert_eq!(stack.http.put(b_put["url"].as_str().unwrap()).body(secret).send().await.unwrap().status(), 200);

    let (_, a_put) = stack.sign("team-a", put_artifact("copy.tlsnap", None)).await;
    let (_, a_multi) = stack.sign("team-a", put_artifact("copy-parts.tlsnap", Some((2, 5 * MIB as u64)))).await;
    let record = stack.open_uploads().pop().expect("the multipart sign opened an upload");
    let targets = [a_put["url"].as_str().unwrap(), a_multi["partUrls"][0]["url"].as_str().unwrap()];
    let before = snapshot(&root);

    let internal = format!("/{BUCKET}/../{record}");
    for source in ["/snaps/builds/team-b/secret.tlsnap", "snaps/builds/team-b/secret.tlsnap", internal.as_str()] {
        for url in targets {
            let response = stack.http.put(url).header("x-amz-copy-source", source).send().await.unwrap();
            let body = s3_error(response, 403, "AccessDenied").await;
            assert!(body.contains("There were headers present in the request which were not signed"), "{body}");
            assert_eq!(xml_field(&body, "HeadersNotSigned"), "x-amz-copy-source");
        }
    }
    assert_eq!(snapshot(&root), before, "a refused copy changed the store directory");
    assert!(!root.join("snaps/builds/team-a/copy.tlsnap").exists());

    // a reads its own key back: nothing there, b's bytes least of all.
    let (_, read) = stack.sign("team-a", get_blob("s3://snaps/builds/team-a/copy.tlsnap")).await;
    s3_error(stack.http.get(read["url"].as_str().unwrap()).send().await.unwrap(), 404, "NoSuchKey").await;

    // Even a copy source the URL signed is refused: a presigned URL grants its own object only.
    let bucket =
        rusty_s3::Bucket::new(stack.store.url().parse().unwrap(), rusty_s3::UrlStyle::Path, BUCKET, "us-east-1")
            .unwrap();
    let creds = rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY);
    let mut action = rusty_s3::actions::PutObject::new(&bucket, Some(&creds), "builds/team-a/copy.tlsnap");
    action.headers_mut().insert("x-amz-copy-source", "/snaps/builds/team-b/secret.tlsnap");
    let url = action.sign(Duration::from_secs(600));
    let response = stack.http.put(url).header("x-amz-copy-source", "/snaps/builds/team-b/secret.tlsnap").send();
    let body = s3_error(response.await.unwrap(), 403, "AccessDenied").await;
    assert!(body.contains("CopyObject and UploadPartCopy"), "{body}");
    assert_eq!(snapshot(&root), before);
}

// Attack 5, first bullet: unsigned x-amz-meta-* and x-amz-website-redirect-location.
#[tokio::test(flavor = "multi_thread")]
async fn unsigned_amz_headers_on_a_presigned_put_are_refused_and_signed_ones_kept() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let before = snapshot(&store.root());
    let url = store.sign.url(Method::Put, "meta.bin", &[]);
    let cases: [(&[(&str, &str)], &str); 3] = [
        (&[("x-amz-meta-owner", "mallory")], "x-amz-meta-owner"),
        (&[("x-amz-website-redirect-location", "https://example.invalid/")], "x-amz-website-redirect-location"),
        (
            &[("x-amz-website-redirect-location", "/x"), ("x-amz-meta-owner", "m"), ("x-amz-acl", "public-read")],
            "x-amz-acl, x-amz-meta-owner, x-amz-website-redirect-location",
        ),
    ];
    for (headers, listed) in cases {
        let mut request = store.http.put(&url).body("payload");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let body = s3_error(request.send().await.unwrap(), 403, "AccessDenied").await;
        assert_eq!(xml_field(&body, "HeadersNotSigned"), listed);
    }
    assert_eq!(snapshot(&store.root()), before, "a refused PUT wrote to the store");
    s3_error(store.get("meta.bin").await, 404, "NoSuchKey").await;

    // The rule is about signing, not about the headers: signed, they are stored.
    let bucket =
        rusty_s3::Bucket::new(store.store.url().parse().unwrap(), rusty_s3::UrlStyle::Path, BUCKET, "us-east-1")
            .unwrap();
    let creds = rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY);
    let mut action = rusty_s3::actions::PutObject::new(&bucket, Some(&creds), "meta.bin");
    action.headers_mut().insert("x-amz-meta-owner", "alice");
    let url = action.sign(Duration::from_secs(600));
    let response = store.http.put(url).header("x-amz-meta-owner", "alice").body("payload").send().await.unwrap();
    assert_eq!(response.status(), 200);
    let got = store.get("meta.bin").await;
    assert_eq!(got.headers().get("x-amz-meta-owner").map(|v| v.to_str().unwrap()), Some("alice"));
}

/// A body of unknown length, sent chunked (reqwest sends a stream without Content-Length so).
fn chunked(bytes: &'static [u8]) -> reqwest::Body {
    reqwest::Body::wrap_stream(futures_util::stream::iter([Ok::<_, std::io::Error>(bytes::Bytes::from_static(bytes))]))
}

// S3 refuses chunked uploads to presigned URLs (e2b users hit 501s); the store does too, so a client
// that forgets Content-Length fails here first.
#[tokio::test(flavor = "multi_thread")]
async fn a_chunked_put_or_part_is_refused_501_as_s3_does_and_stores_nothing() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let before = snapshot(&store.root());
    let refused = store.http.put(store.sign.url(Method::Put, "chunked.bin", &[])).body(chunked(b"abc")).send().await;
    let body = s3_error(refused.unwrap(), 501, "NotImplemented").await;
    assert!(body.contains("<Header>Transfer-Encoding</Header>") && body.contains("Content-Length"), "{body}");
    assert_eq!(snapshot(&store.root()), before, "nothing stored");

    let id = store.create("parts.bin").await;
    let with_parts = snapshot(&store.root());
    let refused = store.http.put(store.sign.part("parts.bin", &id, 1)).body(chunked(b"part")).send().await;
    s3_error(refused.unwrap(), 501, "NotImplemented").await;
    assert_eq!(snapshot(&store.root()), with_parts, "no part stored");

    // The same bytes with their length go in.
    let etag = store.upload_part("parts.bin", &id, 1, b"part".to_vec()).await;
    assert_eq!(store.complete("parts.bin", &id, &[(1, &etag)]).await.status(), 200);
    assert_eq!(store.get("parts.bin").await.bytes().await.unwrap().as_ref(), b"part");
}

// Attack 5, first bullet: an unsigned Content-Type is not kept (the choice: drop, not refuse).
#[tokio::test(flavor = "multi_thread")]
async fn unsigned_content_type_on_a_presigned_put_is_neither_stored_nor_served() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let response = store
        .http
        .put(store.sign.url(Method::Put, "page.bin", &[]))
        .header("content-type", "text/html")
        .header("cache-control", "public, max-age=31536000")
        .header("content-disposition", "inline")
        .body("<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let got = store.get("page.bin").await;
    assert_eq!(got.status(), 200);
    let content_type = got.headers().get("content-type").map(|v| v.to_str().unwrap().to_owned());
    assert_ne!(content_type.as_deref(), Some("text/html"));
    assert!(got.headers().get("cache-control").is_none() && got.headers().get("content-disposition").is_none());
    assert_eq!(got.text().await.unwrap(), "<script>alert(1)</script>");
    for (path, _) in snapshot(&store.root()).iter().filter(|(p, d)| !d.is_empty() && !p.ends_with("page.bin")) {
        let text = std::fs::read_to_string(store.root().join(path)).unwrap_or_default();
        assert!(!text.contains("text/html") && !text.contains("max-age"), "{path} keeps an unsigned attribute: {text}");
    }

    // Signed, Content-Type is kept.
    let bucket =
        rusty_s3::Bucket::new(store.store.url().parse().unwrap(), rusty_s3::UrlStyle::Path, BUCKET, "us-east-1")
            .unwrap();
    let creds = rusty_s3::Credentials::new(ACCESS_KEY, SECRET_KEY);
    let mut action = rusty_s3::actions::PutObject::new(&bucket, Some(&creds), "typed.txt");
    action.headers_mut().insert("content-type", "text/plain");
    let url = action.sign(Duration::from_secs(600));
    let response = store.http.put(url).header("content-type", "text/plain").body("hi").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(store.get("typed.txt").await.headers()["content-type"], "text/plain");
}

// Attack 3, first two bullets.
#[tokio::test(flavor = "multi_thread")]
async fn complete_checks_every_etag_and_the_order_and_may_skip_parts_as_s3_does() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let key = "multi/object.bin";
    let id = store.create(key).await;
    let parts = [vec![1u8; 5 * MIB], vec![2u8; 5 * MIB], vec![3u8; MIB], vec![5u8; 10]];
    let mut etags = Vec::new();
    for (number, bytes) in [1, 2, 3, 5].into_iter().zip(&parts) {
        etags.push(store.upload_part(key, &id, number, bytes.clone()).await);
    }
    assert_eq!(etags[0], format!("\"{}\"", hex::encode(md5(&parts[0]))));
    let (e1, e2, e3, e5) = (etags[0].as_str(), etags[1].as_str(), etags[2].as_str(), etags[3].as_str());
    let before = snapshot(&store.root());

    let wrong = format!("\"{}\"", hex::encode(md5(b"something else")));
    let cases: [(&[(u32, &str)], &str); 6] = [
        (&[(1, e1), (2, &wrong), (3, e3)], "InvalidPart"),
        (&[(1, e1), (2, e1), (3, e3)], "InvalidPart"),
        (&[(1, e1), (4, e3)], "InvalidPart"),
        (&[(2, e2), (1, e1), (3, e3)], "InvalidPartOrder"),
        (&[(1, e1), (1, e1)], "InvalidPartOrder"),
        (&[(1, e1), (3, e3), (5, e5)], "EntityTooSmall"),
    ];
    for (listed, code) in cases {
        s3_error(store.complete(key, &id, listed).await, 400, code).await;
        assert_eq!(snapshot(&store.root()), before, "a failed complete ({code}) changed the store: {listed:?}");
    }

    // Parts 1 and 3 only: legal in S3; parts 2 and 5 are discarded.
    let response = store.complete(key, &id, &[(1, e1), (3, e3)]).await;
    assert_eq!(response.status(), 200);
    let etag = multipart_etag(&[&parts[0], &parts[2]]);
    assert_eq!(xml_field(&response.text().await.unwrap(), "ETag").replace("&quot;", "\""), etag);
    let got = store.get(key).await;
    assert_eq!(got.headers()["etag"].to_str().unwrap(), etag);
    assert!(got.bytes().await.unwrap() == [parts[0].as_slice(), parts[2].as_slice()].concat());
    assert_eq!(root_files(&store.root(), ".upload"), Vec::<String>::new(), "record or parts left");
    assert_eq!(root_files(&store.root(), ".tmp."), Vec::<String>::new());

    s3_error(store.complete(key, &id, &[(1, e1), (3, e3)]).await, 404, "NoSuchUpload").await;
    s3_error(store.abort(key, &id).await, 404, "NoSuchUpload").await;
}

// Part records: complete takes the MD5 UploadPart recorded only for the file it
// was computed from, so parts uploaded again (at once, or after the first)
// still complete only with the ETag of the bytes that stayed.
#[tokio::test(flavor = "multi_thread")]
async fn a_part_uploaded_again_completes_only_with_the_etag_of_the_bytes_that_stayed() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let key = "again/object.bin";
    let id = store.create(key).await;
    let last = store.upload_part(key, &id, 2, b"tail".to_vec()).await;
    // Eight uploads of part 1 at once, each with other bytes.
    let bodies: Vec<Vec<u8>> = (0..8u8).map(|n| vec![n; 5 * MIB]).collect();
    let uploads = bodies.iter().map(|body| store.upload_part(key, &id, 1, body.clone()));
    let etags = futures_util::future::join_all(uploads).await;
    // Only one of them is the part now: every other ETag is refused, and nothing changes.
    let before = snapshot(&store.root());
    let mut accepted = None;
    for (n, etag) in etags.iter().enumerate() {
        let response = store.complete(key, &id, &[(1, etag), (2, &last)]).await;
        if response.status() == 200 {
            accepted = Some(n);
            break;
        }
        s3_error(response, 400, "InvalidPart").await;
        assert_eq!(snapshot(&store.root()), before, "a refused complete changed the store");
    }
    let n = accepted.expect("the ETag of the part that stayed completes");
    let got = store.get(key).await.bytes().await.unwrap();
    assert!(got == [bodies[n].as_slice(), b"tail"].concat(), "the object holds the bytes of the accepted ETag");

    // Uploaded again after the first: the first ETag is refused, the second completes.
    let key = "again/second.bin";
    let id = store.create(key).await;
    let first = store.upload_part(key, &id, 1, vec![1u8; 5 * MIB]).await;
    let second = store.upload_part(key, &id, 1, vec![2u8; 5 * MIB]).await;
    let last = store.upload_part(key, &id, 2, b"tail".to_vec()).await;
    s3_error(store.complete(key, &id, &[(1, &first), (2, &last)]).await, 400, "InvalidPart").await;
    assert_eq!(store.complete(key, &id, &[(1, &second), (2, &last)]).await.status(), 200);
    assert!(store.get(key).await.bytes().await.unwrap() == [vec![2u8; 5 * MIB].as_slice(), b"tail"].concat());
}

// Attack 3, second bullet: after a failed complete, retry and abort both work.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_failed_complete_a_retry_succeeds_and_an_abort_leaves_nothing() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let retried = store.create("retried.bin").await;
    let p1 = store.upload_part("retried.bin", &retried, 1, vec![7u8; 5 * MIB]).await;
    let p2 = store.upload_part("retried.bin", &retried, 2, vec![8u8; 100]).await;
    s3_error(store.complete("retried.bin", &retried, &[(1, &p1), (2, &p1)]).await, 400, "InvalidPart").await;
    assert_eq!(store.complete("retried.bin", &retried, &[(1, &p1), (2, &p2)]).await.status(), 200);
    assert_eq!(store.get("retried.bin").await.bytes().await.unwrap().len(), 5 * MIB + 100);

    let before = snapshot(&store.root());
    let aborted = store.create("aborted.bin").await;
    let p1 = store.upload_part("aborted.bin", &aborted, 1, vec![1u8; 5 * MIB]).await;
    let p2 = store.upload_part("aborted.bin", &aborted, 2, vec![2u8; 5 * MIB]).await;
    store.upload_part("aborted.bin", &aborted, 3, vec![3u8; 10]).await;
    s3_error(store.complete("aborted.bin", &aborted, &[(1, &p1), (3, &p2)]).await, 400, "InvalidPart").await;
    assert_eq!(root_files(&store.root(), &format!(".upload_id-{aborted}")).len(), 3, "parts kept for a retry");

    assert_eq!(store.abort("aborted.bin", &aborted).await.status(), 204);
    assert_eq!(snapshot(&store.root()), before, "abort left files behind");
    s3_error(store.late_part("aborted.bin", &aborted, 2).await, 404, "NoSuchUpload").await;
    s3_error(store.complete("aborted.bin", &aborted, &[(1, &p1)]).await, 404, "NoSuchUpload").await;
    assert_eq!(snapshot(&store.root()), before, "a part sent after the abort stayed on disk");
}

/// An upload id belongs to the object it was made for, as at S3: through a
/// URL signed for another key (another tenant's, say) it is NoSuchUpload
/// for every call, and the upload and the other key are left as they were.
/// (`refresh_upload` signs URLs for a caller-named upload id on the
/// caller's own key: this is what keeps that id from reaching another key's upload.)
#[tokio::test]
async fn an_upload_id_reaches_only_the_object_it_was_made_for() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let theirs = store.create("team-b/theirs.bin").await;
    let p1 = store.upload_part("team-b/theirs.bin", &theirs, 1, vec![7u8; 5 * MIB]).await;
    let before = snapshot(&store.root());
    let mine = "team-a/mine.bin";
    s3_error(store.late_part(mine, &theirs, 2).await, 404, "NoSuchUpload").await;
    let list = store.http.get(store.sign.url(Method::Get, mine, &[("uploadId", &theirs)])).send().await.unwrap();
    s3_error(list, 404, "NoSuchUpload").await;
    s3_error(store.complete(mine, &theirs, &[(1, &p1)]).await, 404, "NoSuchUpload").await;
    s3_error(store.abort(mine, &theirs).await, 404, "NoSuchUpload").await;
    assert_eq!(snapshot(&store.root()), before, "a call through another key changed the store");
    assert_eq!(store.get(mine).await.status(), 404);
    // Through its own key it still works.
    let own = store.http.get(store.sign.url(Method::Get, "team-b/theirs.bin", &[("uploadId", &theirs)])).send();
    assert_eq!(own.await.unwrap().status(), 200);
    assert_eq!(store.complete("team-b/theirs.bin", &theirs, &[(1, &p1)]).await.status(), 200);
}

/// `snapsign store` as a child process; SIGKILLed on drop.
struct StoreProcess {
    child: Child,
    url: String,
}

impl StoreProcess {
    fn start(dir: &Path, abort_incomplete_after: Duration) -> StoreProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_snapsign"))
            .args(["store", "--listen", "127.0.0.1:0", "--bucket", BUCKET, "--abort-incomplete-uploads-after-secs"])
            .arg(abort_incomplete_after.as_secs().to_string())
            .arg("--dir")
            .arg(dir)
            .env("SNAPSIGN_ACCESS_KEY_ID", ACCESS_KEY)
            .env("SNAPSIGN_SECRET_ACCESS_KEY", SECRET_KEY)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run snapsign store");
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps reading so the store never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("store listening on ") {
                    let _ = tx.send(url.trim().to_owned());
                }
            }
        });
        let url = rx.recv_timeout(Duration::from_secs(60)).expect("snapsign store printed its address");
        StoreProcess { child, url }
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL the store");
        self.child.wait().expect("reap the store");
    }
}

impl Drop for StoreProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// Attack 3, third bullet.
#[tokio::test(flavor = "multi_thread")]
async fn a_store_killed_during_complete_keeps_the_upload_abortable_and_leaves_no_part_behind() {
    const PARTS: u32 = 8;
    const PART: usize = 32 * MIB;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let mut first = StoreProcess::start(&root, store::DEFAULT_ABORT_INCOMPLETE_AFTER);
    let client = Client::new(&first.url);
    let key = "big/snapshot.tlsnap";
    let id = client.create(key).await;
    let mut listed = Vec::new();
    for part in 1..=PARTS {
        listed.push((part, client.upload_part(key, &id, part, vec![part as u8; PART]).await));
    }
    let temp = root.join(format!(".tmp.complete-{id}.internal.part"));
    let body = completion(&listed.iter().map(|(n, e)| (*n, e.as_str())).collect::<Vec<_>>());
    let url = client.sign.url(Method::Post, key, &[("uploadId", &id)]);
    let complete = tokio::spawn(client.http.post(url).body(body).send());

    // Kill while the object is being assembled: between a quarter and half of it written.
    let total = PARTS as u64 * PART as u64;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let written = std::fs::metadata(&temp).map(|m| m.len()).unwrap_or(0);
        if written >= total / 4 {
            assert!(written < total / 2, "missed the window: {written} of {total} bytes assembled before the kill");
            break;
        }
        assert!(!root.join(BUCKET).join(key).exists(), "complete finished before the kill could happen");
        assert!(Instant::now() < deadline, "the complete never started assembling");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.kill();
    let answered = complete.await.unwrap();
    assert!(answered.is_err() || !answered.unwrap().status().is_success(), "the killed complete answered 200");
    assert!(!root.join(BUCKET).join(key).exists(), "a half-assembled object was published");
    assert!(root.join(format!(".upload-{id}.json")).exists(), "the upload record did not survive the kill");
    assert_eq!(root_files(&root, &format!(".upload_id-{id}")).len(), PARTS as usize);

    let second = StoreProcess::start(&root, store::DEFAULT_ABORT_INCOMPLETE_AFTER);
    assert!(!temp.exists(), "the restarted store kept the half-assembled file");
    let client = Client::new(&second.url);
    assert_eq!(client.abort(key, &id).await.status(), 204);
    assert_eq!(root_files(&root, ".upload"), Vec::<String>::new(), "parts or record left after abort");
    assert_eq!(root_files(&root, ".tmp."), Vec::<String>::new());
    assert_eq!(root_files(&root, ".bucket-"), Vec::<String>::new(), "the upload's attributes were left");
    s3_error(client.late_part(key, &id, 1).await, 404, "NoSuchUpload").await;
}

// Attack 3, fourth bullet.
#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_aborts_an_upload_older_than_the_configured_age() {
    let store = Direct::start(Duration::from_secs(1)).await;
    let id = store.create("abandoned.bin").await;
    store.upload_part("abandoned.bin", &id, 1, vec![9u8; MIB]).await;
    assert_eq!(root_files(&store.root(), &format!(".upload_id-{id}")).len(), 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root_files(&store.root(), ".upload").is_empty() || !root_files(&store.root(), ".bucket-").is_empty() {
        assert!(Instant::now() < deadline, "the upload was not reaped: {:?}", root_files(&store.root(), "."));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    s3_error(store.late_part("abandoned.bin", &id, 2).await, 404, "NoSuchUpload").await;
    s3_error(store.abort("abandoned.bin", &id).await, 404, "NoSuchUpload").await;
}

// Attack 3, fourth bullet: the age is honoured, and a restart reaps what an earlier run left.
#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_store_reaps_old_uploads_and_orphaned_parts_and_keeps_young_ones() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (old, young, orphan) = {
        let first = StoreProcess::start(&root, Duration::from_secs(3600));
        let client = Client::new(&first.url);
        let old = client.create("old.bin").await;
        client.upload_part("old.bin", &old, 1, vec![1u8; 1000]).await;
        let young = client.create("young.bin").await;
        client.upload_part("young.bin", &young, 1, vec![2u8; 1000]).await;
        (old, young, "0f8fad5b-d9cb-469f-a165-70867728950e")
    };
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    let backdate = |path: PathBuf| {
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(two_hours_ago).unwrap();
    };
    backdate(root.join(format!(".upload-{old}.json")));
    // A part whose record is gone, as s3s-fs's own complete used to leave them.
    let orphan_part = root.join(format!(".upload_id-{orphan}.part-1"));
    std::fs::write(&orphan_part, b"orphan").unwrap();
    backdate(orphan_part.clone());

    let second = StoreProcess::start(&root, Duration::from_secs(3600));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !root_files(&root, &format!(".upload-{old}")).is_empty()
        || !root_files(&root, &format!(".upload_id-{old}")).is_empty()
        || orphan_part.exists()
    {
        assert!(Instant::now() < deadline, "nothing reaped: {:?}", root_files(&root, "."));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = Client::new(&second.url);
    let etag = format!("\"{}\"", hex::encode(md5(&[2u8; 1000])));
    assert_eq!(client.complete("young.bin", &young, &[(1, &etag)]).await.status(), 200, "the young one was reaped");
}

// Attack 5, second bullet.
#[tokio::test(flavor = "multi_thread")]
async fn keys_longer_than_the_store_can_hold_get_400_key_too_long_and_write_nothing() {
    let store = Direct::start(Duration::from_secs(3600)).await;
    let limit = store::max_key_bytes(BUCKET);
    assert!(limit < store::S3_MAX_KEY_BYTES);
    let key_of = |len: usize| {
        let mut key = "builds/team-a/".to_owned();
        while key.len() < len {
            key.push_str(&"k".repeat((len - key.len()).min(40)));
            if key.len() < len - 1 {
                key.push('/');
            }
        }
        key
    };
    let (longest, too_long) = (key_of(limit), key_of(limit + 1));
    assert_eq!((longest.len(), too_long.len()), (limit, limit + 1));

    let before = snapshot(&store.root());
    let put = store.http.put(store.sign.url(Method::Put, &too_long, &[])).body("x").send().await.unwrap();
    let body = s3_error(put, 400, "KeyTooLongError").await;
    assert!(body.contains(&format!("up to {limit} bytes")), "{body}");
    let create = store.http.post(store.sign.url(Method::Post, &too_long, &[("uploads", "")])).send().await.unwrap();
    s3_error(create, 400, "KeyTooLongError").await;
    s3_error(store.get(&too_long).await, 400, "KeyTooLongError").await;
    assert_eq!(snapshot(&store.root()), before, "a refused key left files behind");

    // The limit is exact: the longest key works single-PUT and multipart.
    let put = store.http.put(store.sign.url(Method::Put, &longest, &[])).body("single").send().await.unwrap();
    assert_eq!(put.status(), 200);
    assert_eq!(store.get(&longest).await.text().await.unwrap(), "single");
    let id = store.create(&longest).await;
    let etag = store.upload_part(&longest, &id, 1, b"multi".to_vec()).await;
    assert_eq!(store.complete(&longest, &id, &[(1, &etag)]).await.status(), 200);
    assert_eq!(store.get(&longest).await.text().await.unwrap(), "multi");
}

// Attack 5, second bullet, at sign time.
#[tokio::test(flavor = "multi_thread")]
async fn the_signer_refuses_segments_over_255_bytes_and_keys_over_1024_bytes() {
    let stack = Stack::start().await;
    let long_segment = format!("dir/{}.tlsnap", "s".repeat(250));
    let (status, body) = stack.sign("team-a", put_artifact(&long_segment, None)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_rel_path")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("limit is 255 bytes"), "{body}");

    let long_key = format!("s3://snaps/builds/team-a/{}x", "abcdefghi/".repeat(102));
    let (status, body) = stack.sign("team-a", get_blob(&long_key)).await;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_uri")), "{body}");
    assert!(body["message"].as_str().unwrap().contains("S3's limit is 1024"), "{body}");
    assert!(stack.open_uploads().is_empty());
}

/// Part URLs that expire during the upload (signed two hours ago for a
/// minute): a resumable upload finds them expired before sending them,
/// stops with the archive finished and at most part 1 up, leaves the upload open,
/// and fresh URLs for the same upload finish it with the right object. Not
/// resumable, the URLs are sent and the store refuses them (a 403 "Request
/// has expired", or the connection closed before the body was read): the
/// upload is aborted and the error says the URL expired.
#[tokio::test(flavor = "multi_thread")]
async fn expired_part_urls_interrupt_a_resumable_upload_and_fresh_urls_for_it_finish_it() {
    use snapsign_rootfs_builder::archive::ArchiveSummary;
    use snapsign_rootfs_builder::upload::{self, Interrupted, PartOptions};
    use std::io::Write;

    let store = Direct::start(Duration::from_secs(3600)).await;
    let part_size = 5 * MIB;
    let data = snapsign_rootfs_builder::sample::random(3 * part_size + 999, 5);
    let work = tempfile::tempdir().unwrap();
    let long_ago = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 7200).unwrap();
    let stale = Presigner::new(&credentials(), "us-east-1", long_ago, 60);
    for resumable in [false, true] {
        let key = format!("builds/expiring-{resumable}.tlsnap");
        let id = store.create(&key).await;
        let mut multipart = store.sign.multipart(&key, &id, part_size as u64, 4);
        let object = store.sign.endpoint.object(BUCKET, &key);
        for part in &mut multipart.part_urls[1..] {
            let number = part.part_number.to_string();
            part.url = stale.presign(Method::Put, &object, &[("partNumber", &number), ("uploadId", &id)]);
        }
        let archive = work.path().join(format!("archive-{resumable}"));
        let (written, path) = (data.clone(), archive.clone());
        let options = PartOptions { resumable, ..Default::default() };
        let err = tokio::task::spawn_blocking(move || {
            let agent = snapsign_rootfs_builder::http::agent();
            upload::s3_multipart_overlapped(&agent, &multipart, &path.clone(), options, |observe| {
                let mut file = std::fs::File::create(&path)?;
                for (i, chunk) in written.chunks(MIB).enumerate() {
                    file.write_all(chunk)?;
                    observe(((i + 1) * MIB).min(written.len()) as u64)?;
                }
                let sha256 = hex::encode(Sha256::digest(&written));
                Ok(ArchiveSummary { sha256, size_bytes: written.len() as u64, files: 0 })
            })
        })
        .await
        .unwrap()
        .expect_err("part URLs 2 to 4 had expired");
        let list = store.http.get(store.sign.url(Method::Get, &key, &[("uploadId", &id)])).send().await.unwrap();
        if !resumable {
            assert!(format!("{err:#}").contains("expired"), "{err:#}");
            s3_error(list, 404, "NoSuchUpload").await;
            continue;
        }
        let interrupted = err.downcast_ref::<Interrupted>().unwrap_or_else(|| panic!("{err:#}")).clone();
        // No part with an expired URL went up. Part 1 (a live URL) went up if its uploader
        // started before another found its URL expired (no part starts after that): either way the
        // resume below sends what is missing.
        let up: Vec<u32> = interrupted.etags.iter().map(|(n, _)| *n).collect();
        assert!(up.is_empty() || up == [1], "{interrupted:?}");
        assert!(interrupted.expired.part > 1, "{interrupted:?}");
        assert_eq!(interrupted.summary.size_bytes, data.len() as u64);
        assert_eq!(std::fs::metadata(&archive).unwrap().len(), data.len() as u64, "the archive was finished");
        assert_eq!(list.status(), 200, "the upload stays open");
        assert_eq!(store.get(&key).await.status(), 404);

        let fresh = store.sign.multipart(&key, &id, part_size as u64, 4);
        let summary = tokio::task::spawn_blocking(move || {
            upload::resume(&snapsign_rootfs_builder::http::agent(), &fresh, &archive, interrupted)
        })
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("resume failed: {e:#}"));
        assert_eq!(summary.size_bytes, data.len() as u64);
        let got = store.get(&key).await;
        let parts: Vec<&[u8]> = data.chunks(part_size).collect();
        assert_eq!(got.headers()["etag"].to_str().unwrap(), multipart_etag(&parts));
        assert!(got.bytes().await.unwrap() == data, "the object is not what was written");
    }
}

/// The reference builder's uploader sends each part as soon as the archive
/// writer has put its bytes in the file: the writer below stops after two
/// parts until part 1 is at the store, which never happens if parts wait
/// for the whole archive. The object then has the multipart ETag of its
/// parts and the sha256 of what was written, which the store records.
#[tokio::test(flavor = "multi_thread")]
async fn parts_go_up_while_the_archive_is_written_and_the_object_has_the_right_etag_and_sha256() {
    use snapsign_rootfs_builder::archive::ArchiveSummary;
    use std::io::Write;

    let store = Direct::start(Duration::from_secs(3600)).await;
    let key = "builds/overlap.tlsnap";
    let id = store.create(key).await;
    let part_size = 5 * MIB;
    let multipart = store.sign.multipart(key, &id, part_size as u64, 4);
    let data = snapsign_rootfs_builder::sample::random(3 * part_size + 12_345, 11);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("snapshot.tar.zst");
    let part_1 = store.root().join(format!(".upload_id-{id}.part-1"));
    let (written, path) = (data.clone(), archive.clone());
    let summary = tokio::task::spawn_blocking(move || {
        let agent = snapsign_rootfs_builder::http::agent();
        snapsign_rootfs_builder::upload::s3_multipart_overlapped(
            &agent,
            &multipart,
            &archive,
            Default::default(),
            |observe| {
                let mut file = std::fs::File::create(&path)?;
                let mut sha256 = Sha256::new();
                let mut size = 0;
                for chunk in written.chunks(MIB) {
                    file.write_all(chunk)?;
                    sha256.update(chunk);
                    size += chunk.len();
                    observe(size as u64)?;
                    if size == 2 * part_size {
                        let deadline = Instant::now() + Duration::from_secs(30);
                        while std::fs::metadata(&part_1).map(|m| m.len()).ok() != Some(part_size as u64) {
                            assert!(Instant::now() < deadline, "part 1 did not go up while the archive was written");
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                Ok(ArchiveSummary { sha256: hex::encode(sha256.finalize()), size_bytes: size as u64, files: 0 })
            },
        )
    })
    .await
    .unwrap()
    .unwrap_or_else(|e| panic!("overlapped upload failed: {e:#}"));
    assert_eq!(summary.size_bytes, data.len() as u64);

    let got = store.get(key).await;
    assert_eq!(got.status(), 200);
    let parts: Vec<&[u8]> = data.chunks(part_size).collect();
    assert_eq!(parts.len(), 4);
    assert_eq!(got.headers()["etag"].to_str().unwrap(), multipart_etag(&parts));
    let body = got.bytes().await.unwrap();
    assert!(body == data, "the object is not what was written");
    let sha256 = hex::encode(Sha256::digest(&data));
    assert_eq!(summary.sha256, sha256);
    assert_eq!(store::recorded_digest(&store.root(), BUCKET, key), Some((data.len() as u64, sha256)));
    assert_eq!(root_files(&store.root(), ".upload"), Vec::<String>::new(), "record or parts left");

    // A PUT of as many bytes refused for its Content-MD5: s3s-fs has put its
    // bytes in place by then, and the record of the old ones must not stay.
    let refused = store
        .client
        .http
        .put(store.sign.url(Method::Put, key, &[]))
        .header("content-md5", "1B2M2Y8AsgTpgAmY7PhCfg==")
        .body(vec![b'y'; data.len()])
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(refused.text().await.unwrap().contains("BadDigest"));
    assert_eq!(store::recorded_digest(&store.root(), BUCKET, key), None, "a record outlived its bytes");

    // A PUT over the object replaces s3s-fs's info: no record outlives its bytes.
    let put = store.client.http.put(store.sign.url(Method::Put, key, &[])).body(b"other".to_vec()).send().await;
    assert_eq!(put.unwrap().status(), 200);
    assert_eq!(store::recorded_digest(&store.root(), BUCKET, key), None);
}

/// A part that fails to go up stops the writer early and aborts the upload:
/// nothing is left at the store.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_part_stops_the_archive_writer_and_aborts_the_upload() {
    use std::io::Write;

    let store = Direct::start(Duration::from_secs(3600)).await;
    let key = "builds/failing.tlsnap";
    let id = store.create(key).await;
    let part_size = 5 * MIB;
    // URLs for far more than is written: only the failure can stop the writer.
    let mut multipart = store.sign.multipart(key, &id, part_size as u64, 100);
    // Part 2's URL is signed for another upload id: the store refuses it.
    multipart.part_urls[1].url = store.sign.part(key, "00000000-0000-0000-0000-000000000000", 2);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("snapshot.tar.zst");
    let path = archive.clone();
    let (error, chunks_written) = tokio::task::spawn_blocking(move || {
        let agent = snapsign_rootfs_builder::http::agent();
        let mut chunks = 0;
        let result = snapsign_rootfs_builder::upload::s3_multipart_overlapped(
            &agent,
            &multipart,
            &archive,
            Default::default(),
            |observe| {
                let mut file = std::fs::File::create(&path)?;
                let chunk = vec![7u8; MIB];
                // Parts 1 to 3, then the writer waits at 15 MiB (however
                // loaded the machine, the refusal of part 2 arrives while it
                // waits): only the failure can stop it.
                for i in 1..=15u64 {
                    file.write_all(&chunk)?;
                    chunks += 1;
                    observe(i * MIB as u64)?;
                    std::thread::sleep(Duration::from_millis(2));
                }
                let waiting = std::time::Instant::now();
                while waiting.elapsed() < Duration::from_secs(60) {
                    observe(15 * MIB as u64)?;
                    std::thread::sleep(Duration::from_millis(2));
                }
                unreachable!("the writer was not stopped within 60 s of the failed part")
            },
        );
        (result.unwrap_err(), chunks)
    })
    .await
    .unwrap();
    let message = format!("{error:#}");
    // The store refuses the part (404, or a reset before the body is read).
    assert!(message.contains("UploadPart part 2"), "{message}");
    assert!(chunks_written <= 15, "the writer went on to {chunks_written} MiB after the failure");
    assert_eq!(root_files(&store.root(), ".upload"), Vec::<String>::new(), "the upload was not aborted");
}

/// A writer that panics mid-archive does not leave the part uploaders
/// waiting: the panic reaches the caller.
#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_archive_writer_ends_the_upload_instead_of_hanging_it() {
    use std::io::Write;

    let store = Direct::start(Duration::from_secs(3600)).await;
    let key = "builds/panic.tlsnap";
    let id = store.create(key).await;
    let multipart = store.sign.multipart(key, &id, 5 * MIB as u64, 4);
    let work = tempfile::tempdir().unwrap();
    let archive = work.path().join("snapshot.tar.zst");
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let agent = snapsign_rootfs_builder::http::agent();
        let path = archive.clone();
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            snapsign_rootfs_builder::upload::s3_multipart_overlapped(
                &agent,
                &multipart,
                &archive,
                Default::default(),
                |observe| {
                    std::fs::File::create(&path)?.write_all(&[1u8; 1024])?;
                    observe(1024)?;
                    panic!("the archive writer broke");
                },
            )
        }));
        let _ = done.send(outcome.is_err());
    });
    let panicked = ended.recv_timeout(Duration::from_secs(60)).expect("the upload ended instead of hanging");
    assert!(panicked, "the writer's panic reaches the caller");
}
