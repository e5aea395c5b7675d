//! Pulls from a fake registry on loopback that wants HTTP basic auth, and
//! the pure parts (names, credentials). Pulls from a real registry are in
//! tests/registry.rs.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use super::*;

#[path = "../../../../tests/common/registry.rs"]
mod test_registry;
use test_registry::Blob;

fn options(cache: &Path, work: &Path) -> PullOptions {
    PullOptions {
        cache_dir: cache.to_owned(),
        // No credentials: not the machine's own Docker config.
        docker_config: Some(work.join("no-docker-config.json")),
        insecure_registries: Vec::new(),
        mirror: None,
    }
}

/// A registry that wants `Authorization: <accepted>` and answers 401 with
/// `WWW-Authenticate: Basic` otherwise; it serves `content` by path and
/// records the Authorization header of every request.
struct FakeRegistry {
    addr: String,
    seen: Arc<Mutex<Vec<Option<String>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeRegistry {
    async fn start(accepted: Vec<String>, content: HashMap<String, (String, Vec<u8>)>) -> FakeRegistry {
        FakeRegistry::start_on("127.0.0.1:0", accepted, content).await
    }

    async fn start_on(bind: &str, accepted: Vec<String>, content: HashMap<String, (String, Vec<u8>)>) -> FakeRegistry {
        let listener = tokio::net::TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let shared = Arc::new((accepted, content));
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let (seen, shared) = (seen.clone(), shared.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                            let (seen, shared) = (seen.clone(), shared.clone());
                            async move { Ok::<_, Infallible>(fake_answer(&request, &seen, &shared.0, &shared.1)) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        FakeRegistry { addr, seen, task }
    }
}

fn fake_answer(
    request: &Request<Incoming>,
    seen: &Mutex<Vec<Option<String>>>,
    accepted: &[String],
    content: &HashMap<String, (String, Vec<u8>)>,
) -> Response<Full<Bytes>> {
    let authorization = request.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    seen.lock().unwrap().push(authorization.clone());
    let json = |status: u16, code: &str| {
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .header("www-authenticate", "Basic realm=\"fake\"")
            .body(Full::new(Bytes::from(format!(r#"{{"errors":[{{"code":"{code}","message":"{code}"}}]}}"#))))
            .unwrap()
    };
    if !authorization.as_ref().is_some_and(|a| accepted.contains(a)) {
        return json(401, "UNAUTHORIZED");
    }
    match content.get(request.uri().path()) {
        Some((content_type, bytes)) => Response::builder()
            .header("content-type", content_type.as_str())
            .header("docker-content-digest", oci::sha256_digest(bytes))
            .body(Full::new(Bytes::from(bytes.clone())))
            .unwrap(),
        None => json(404, "MANIFEST_UNKNOWN"),
    }
}

/// A one-layer image served at `/v2/team/app/…:1.0`; its manifest digest.
fn small_image() -> (HashMap<String, (String, Vec<u8>)>, String) {
    let mut layer = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_gnu();
    header.set_mode(0o644);
    header.set_size(6);
    layer.append_data(&mut header, "etc/secret-base", &b"hello\n"[..]).unwrap();
    let layer = Blob { media_type: "application/vnd.oci.image.layer.v1.tar", bytes: layer.into_inner().unwrap() };
    let config = Blob::json(
        oci::OCI_CONFIG,
        json!({"architecture": "amd64", "os": "linux", "config": {"Env": ["A=1"]},
               "rootfs": {"type": "layers", "diff_ids": [layer.digest()]}}),
    );
    let manifest = Blob::json(
        oci::OCI_MANIFEST,
        json!({"schemaVersion": 2, "mediaType": oci::OCI_MANIFEST, "config": config.descriptor(),
               "layers": [layer.descriptor()]}),
    );
    let mut content = HashMap::new();
    for blob in [&layer, &config] {
        content
            .insert(format!("/v2/team/app/blobs/{}", blob.digest()), (blob.media_type.to_owned(), blob.bytes.clone()));
    }
    content.insert("/v2/team/app/manifests/1.0".to_owned(), (oci::OCI_MANIFEST.to_owned(), manifest.bytes.clone()));
    (content, manifest.digest())
}

#[tokio::test]
async fn a_registry_wanting_basic_auth_gets_the_docker_config_credentials() {
    use base64::Engine as _;
    let work = tempfile::tempdir().unwrap();
    let (content, digest) = small_image();
    let basic = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode("alice:s3cret"));
    let fake = FakeRegistry::start(vec![basic.clone(), "Bearer id-token-1".to_owned()], content).await;
    let reference = format!("{}/team/app:1.0", fake.addr);
    let config_path = work.path().join("docker/config.json");
    let mut options = options(&work.path().join("cache"), work.path());
    options.docker_config = Some(config_path.clone());

    // No credentials: a 401 that says how to log in.
    let err = format!("{:#}", pull(&reference, &options).await.unwrap_err());
    assert!(err.contains(&format!("pull {reference}: the manifest from the registry {}", fake.addr)), "{err}");
    assert!(err.contains("HTTP 401 Unauthorized"), "{err}");
    assert!(err.contains(&format!("log in: docker login {}", fake.addr)), "{err}");
    assert!(err.contains(&format!("add auths.\"{}\" to {}", fake.addr, config_path.display())), "{err}");
    assert!(fake.seen.lock().unwrap().iter().all(Option::is_none), "nothing was sent without credentials");

    // Wrong ones: refused, and the error says where they came from.
    fs::create_dir_all(config_path.parent().unwrap()).unwrap();
    let write_config = |entry: serde_json::Value| {
        fs::write(&config_path, serde_json::to_vec(&json!({"auths": {(fake.addr.clone()): entry}})).unwrap()).unwrap()
    };
    let encode = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    write_config(json!({"auth": encode("alice:wrong")}));
    let err = format!("{:#}", pull(&reference, &options).await.unwrap_err());
    assert!(
        err.contains(&format!(
            "the credentials from auths.\"{}\" in {} were refused",
            fake.addr,
            config_path.display()
        )),
        "{err}"
    );

    // The right ones: sent as basic auth, and the pull works.
    fake.seen.lock().unwrap().clear();
    write_config(json!({"auth": encode("alice:s3cret")}));
    let pulled = pull(&reference, &options).await.unwrap();
    assert_eq!(pulled.digest, digest);
    assert_eq!(pulled.requests, 3);
    let seen = fake.seen.lock().unwrap().clone();
    assert!(seen.iter().filter(|a| a.as_deref() == Some(basic.as_str())).count() >= 3, "{seen:?}");
    assert_eq!(pulled.open().unwrap().config.env, ["A=1"]);

    // An identitytoken is sent as a bearer token.
    fake.seen.lock().unwrap().clear();
    write_config(json!({"identitytoken": "id-token-1"}));
    let mut fresh = options.clone();
    fresh.cache_dir = work.path().join("cache2");
    pull(&reference, &fresh).await.unwrap();
    assert!(fake.seen.lock().unwrap().iter().all(|a| a.as_deref() == Some("Bearer id-token-1")));
}

#[test]
fn references_are_normalised_as_docker_does() {
    let name = |r: &str| reference_name(&normalise(r).unwrap());
    assert_eq!(name("debian:bookworm-slim"), "docker.io/library/debian:bookworm-slim");
    assert_eq!(name("debian"), "docker.io/library/debian:latest");
    assert_eq!(name("team/app"), "docker.io/team/app:latest");
    assert_eq!(name("registry:5000/team/base:1.2"), "registry:5000/team/base:1.2");
    assert_eq!(name("localhost/app"), "localhost/app:latest");
    let digest = format!("sha256:{}", "a".repeat(64));
    assert_eq!(name(&format!("ghcr.io/o/app:1@{digest}")), format!("ghcr.io/o/app@{digest}"));
    assert_eq!(normalise("debian").unwrap().resolve_registry(), "index.docker.io");
    let err = normalise("Not A Reference").unwrap_err().to_string();
    assert!(err.contains("is not an image reference"), "{err}");
    assert!(normalise("app@sha256:abc").is_err());
}

#[test]
fn loopback_and_listed_registries_are_plain_http() {
    let insecure = vec!["registry.lan:5000".to_owned()];
    assert!(is_plain_http("127.0.0.1:5000", &[]));
    assert!(is_plain_http("localhost:1234", &[]));
    assert!(is_plain_http("localhost", &[]));
    assert!(is_plain_http("[::1]:5000", &[]));
    assert!(is_plain_http("registry.lan:5000", &insecure));
    assert!(!is_plain_http("registry.lan:5001", &insecure));
    assert!(!is_plain_http("index.docker.io", &insecure));
}

#[test]
fn docker_hub_credentials_are_found_under_any_of_its_names() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode("bob:pw");
    fs::write(
        &path,
        serde_json::to_vec(&json!({"auths": {"https://index.docker.io/v1/": {"auth": auth}}, "credsStore": "desktop"}))
            .unwrap(),
    )
    .unwrap();
    let found = Credentials::find(Some(&path), "docker.io").unwrap();
    assert!(matches!(found.auth, RegistryAuth::Basic(ref u, ref p) if u == "bob" && p == "pw"));
    let other = Credentials::find(Some(&path), "ghcr.io").unwrap();
    assert!(matches!(other.auth, RegistryAuth::Anonymous));
    assert_eq!(other.helper.as_deref(), Some("desktop"));
    fs::write(&path, "{not json").unwrap();
    let err = format!("{:#}", Credentials::find(Some(&path), "docker.io").err().unwrap());
    assert!(err.contains("parse the Docker config"), "{err}");
}

#[tokio::test]
async fn a_blob_that_does_not_match_its_digest_is_not_kept() {
    let work = tempfile::tempdir().unwrap();
    let (mut content, _) = small_image();
    // The registry sends a tampered layer (with a Docker-Content-Digest header that matches the tampering).
    let layer_path = content.keys().find(|k| k.contains("/blobs/") && content[*k].0.contains("layer")).unwrap().clone();
    let layer_digest = layer_path.rsplit('/').next().unwrap().to_owned();
    let tampered = content.get_mut(&layer_path).unwrap();
    let at = tampered.1.windows(6).position(|w| w == b"hello\n").unwrap();
    tampered.1[at] = b'j';
    let fake = FakeRegistry::start(vec!["Bearer t".to_owned()], content).await;
    let config_path = work.path().join("config.json");
    fs::write(
        &config_path,
        serde_json::to_vec(&json!({"auths": {(fake.addr.clone()): {"identitytoken": "t"}}})).unwrap(),
    )
    .unwrap();
    let cache = work.path().join("cache");
    let mut options = options(&cache, work.path());
    options.docker_config = Some(config_path);
    let reference = format!("{}/team/app:1.0", fake.addr);
    let err = format!("{:#}", pull(&reference, &options).await.unwrap_err());
    assert!(err.contains(&format!("pull {reference}: ")) && err.contains(&layer_digest), "{err}");
    assert!(err.contains("does not match its descriptor") && err.contains("nothing was kept"), "{err}");
    let kept: Vec<String> = fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    assert!(!kept.iter().any(|n| layer_digest.ends_with(n.as_str()) || n.starts_with('.')), "{kept:?}");
    // Nothing names the image either.
    let index: Index = serde_json::from_slice(&fs::read(cache.join("index.json")).unwrap()).unwrap();
    assert!(index.manifests.is_empty());
}

#[tokio::test]
async fn other_registries_are_https_unless_listed_insecure() {
    let work = tempfile::tempdir().unwrap();
    let (content, digest) = small_image();
    // 127.0.0.2 is loopback, but not one of the names that are plain HTTP by default.
    let fake = FakeRegistry::start_on("127.0.0.2:0", vec!["Bearer t".to_owned()], content).await;
    let config_path = work.path().join("config.json");
    fs::write(
        &config_path,
        serde_json::to_vec(&json!({"auths": {(fake.addr.clone()): {"identitytoken": "t"}}})).unwrap(),
    )
    .unwrap();
    let mut options = options(&work.path().join("cache"), work.path());
    options.docker_config = Some(config_path);
    let reference = format!("{}/team/app:1.0", fake.addr);
    // Over https (rustls), to a plain-HTTP server: the TLS handshake fails and the error says what to do.
    let err = format!("{:#}", pull(&reference, &options).await.unwrap_err());
    assert!(err.contains(&format!("cannot reach https://{}", fake.addr)), "{err}");
    assert!(err.contains("list it in the insecure registries"), "{err}");
    assert!(fake.seen.lock().unwrap().is_empty(), "no HTTP request got through");
    // Listed as insecure: plain HTTP.
    options.insecure_registries = vec![fake.addr.clone()];
    assert_eq!(pull(&reference, &options).await.unwrap().digest, digest);
}
