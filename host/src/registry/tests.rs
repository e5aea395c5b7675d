//! Pulls from a real registry on loopback (Debian's docker-registry, the
//! hosts' tool cache) through a counting proxy, and from a fake registry
//! that wants HTTP basic auth.

use std::collections::HashMap;
use std::convert::Infallible;
use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use snapsign_rootfs_builder::tree::Tree;

use super::*;
use crate::hosts::Tools;

#[path = "../../../tests/common/registry.rs"]
mod test_registry;
use test_registry::{Blob, TestImage, push, test_image};

/// The hosts' tool cache, `target/hosts-cache`, as tests/hosts.rs has it.
fn tools() -> Tools {
    let exe = std::env::current_exe().expect("the test binary's path");
    let target = exe.ancestors().nth(3).expect("target/debug/deps/<test>");
    Tools::new(target.join("hosts-cache"))
}

/// A loopback HTTP proxy in front of `upstream` that logs `METHOD path` of every request.
struct CountingProxy {
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl CountingProxy {
    async fn start(upstream: String) -> CountingProxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let log = Arc::new(Mutex::new(Vec::new()));
        let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http::<Incoming>();
        let task = tokio::spawn({
            let log = log.clone();
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { return };
                    let (log, client, upstream) = (log.clone(), client.clone(), upstream.clone());
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
                            let (log, client, upstream) = (log.clone(), client.clone(), upstream.clone());
                            async move {
                                let path = request.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
                                log.lock().unwrap().push(format!("{} {path}", request.method()));
                                *request.uri_mut() = format!("http://{upstream}{path}").parse().unwrap();
                                request.headers_mut().insert(http::header::HOST, upstream.parse().unwrap());
                                client.request(request).await
                            }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            }
        });
        CountingProxy { addr, log, task }
    }

    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}

impl Drop for CountingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn options(cache: &Path, work: &Path) -> PullOptions {
    PullOptions {
        cache_dir: cache.to_owned(),
        // No credentials: not the machine's own Docker config.
        docker_config: Some(work.join("no-docker-config.json")),
        insecure_registries: Vec::new(),
        mirror: None,
    }
}

/// Debian's docker-registry on loopback with the test image pushed as
/// `team/base:1.2`, behind a counting proxy.
async fn registry_with_test_image(work: &Path) -> (crate::hosts::process::HostProcess, TestImage, CountingProxy) {
    let (registry, upstream) = crate::hosts::launch::oci_registry(&tools(), &work.join("registry"))
        .await
        .expect("start Debian's docker-registry on loopback (apt-get download docker-registry)");
    let image = test_image(work);
    push(&upstream, &image).await;
    let proxy = CountingProxy::start(upstream).await;
    (registry, image, proxy)
}

/// `--registry-mirror`: a Docker Hub name is pulled from the mirror (its
/// repository and tag unchanged) and keeps its docker.io name; other
/// registries are not mirrored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_docker_hub_name_is_pulled_from_the_mirror_and_keeps_its_name() {
    let work = tempfile::tempdir().unwrap();
    let (_registry, image, proxy) = registry_with_test_image(work.path()).await;
    let mut options = options(&work.path().join("cache"), work.path());
    options.mirror = Some(proxy.addr.clone());
    let pulled = pull("team/base:1.2", &options).await.unwrap();
    assert_eq!(
        (pulled.reference.as_str(), pulled.digest.as_str()),
        ("docker.io/team/base:1.2", image.manifest.digest().as_str())
    );
    let log = proxy.take();
    assert!(log.iter().any(|l| l == "GET /v2/team/base/manifests/1.2"), "the mirror served it: {log:?}");
    // Cached under its docker.io name: by digest it comes from the cache, not the mirror.
    let by_digest = format!("team/base@{}", image.manifest.digest());
    assert_eq!(pull(&by_digest, &options).await.unwrap().requests, 0);
    // An image of another registry goes there, not to the mirror (port 1 refuses at once).
    assert!(pull("127.0.0.1:1/team/base:1.2", &options).await.is_err());
    assert!(proxy.take().is_empty(), "the mirror is for docker.io only");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_from_a_registry_by_tag_then_from_the_cache_by_digest() {
    let work = tempfile::tempdir().unwrap();
    let (_registry, image, proxy) = registry_with_test_image(work.path()).await;
    let cache = work.path().join("cache");
    let options = options(&cache, work.path());
    let by_tag = format!("{}/team/base:1.2", proxy.addr);

    // 1. By tag into an empty cache: the manifest, the config and both layers.
    let first = pull(&by_tag, &options).await.unwrap();
    assert_eq!(first.reference, by_tag);
    assert_eq!(first.digest, image.manifest.digest());
    assert_eq!(first.manifest_digest, first.digest);
    assert_eq!((first.requests, first.fetched_blobs, first.cached_blobs), (4, 3, 0));
    let sizes: u64 = image.layers.iter().chain([&image.config, &image.manifest]).map(|b| b.bytes.len() as u64).sum();
    assert_eq!(first.fetched_bytes, sizes);
    let log = proxy.take();
    let blob_gets: Vec<&String> = log.iter().filter(|l| l.contains("/blobs/")).collect();
    assert_eq!(blob_gets.len(), 3, "{log:?}");
    assert!(log.iter().any(|l| l == "GET /v2/team/base/manifests/1.2"), "{log:?}");
    assert!(log.iter().all(|l| l.starts_with("GET ")), "{log:?}");

    // The cache is an OCI layout the builder reads; applied, layer 2's whiteouts hold.
    assert!(cache.join("oci-layout").is_file());
    let opened = first.open().unwrap();
    assert_eq!(opened.format, image::Format::OciLayout);
    assert_eq!(opened.manifest_digest.as_deref(), Some(first.digest.as_str()));
    assert_eq!(opened.config.env, ["PATH=/bin", "GREETING=hello"]);
    assert_eq!(opened.config.cmd.as_deref().unwrap(), ["/bin/sh", "-c", "echo $GREETING"]);
    assert_eq!(opened.config.workdir, "/srv");
    assert_eq!(opened.config.user, "app");
    let mut tree = Tree::create(work.path().join("tree")).unwrap();
    let stats = image::apply(&opened, &mut tree).unwrap();
    assert_eq!(stats.layers, 2);
    assert!(tree.host("bin/sh").is_file() && tree.host("bin/bash").is_file());
    assert!(!tree.host("etc/motd").exists(), "the whiteout of layer 2 deleted /etc/motd");
    assert!(!tree.host("opt/lower/a").exists(), "the opaque /opt/lower hides layer 1's file");
    assert_eq!(fs::read_to_string(tree.host("opt/lower/b")).unwrap(), "layer 2's own\n");
    assert_eq!(fs::read_to_string(tree.host("etc/hello")).unwrap(), "hello from layer 2\n");
    assert_eq!(tree.lookup_user("app").unwrap().uid, 1000);

    // 2. The tag again: the manifest only, no blob.
    let again = pull(&by_tag, &options).await.unwrap();
    assert_eq!(again.digest, first.digest);
    assert_eq!((again.requests, again.fetched_blobs, again.cached_blobs), (1, 0, 3));
    assert_eq!(again.fetched_bytes, image.manifest.bytes.len() as u64, "the manifest only");
    let log = proxy.take();
    assert!(!log.iter().any(|l| l.contains("/blobs/")), "no blob is fetched again: {log:?}");
    assert_eq!(log.iter().filter(|l| l.contains("/manifests/")).count(), 1, "{log:?}");

    // 3. By digest, cached: not one request reaches the registry.
    let by_digest = format!("{}/team/base@{}", proxy.addr, first.digest);
    let cached = pull(&by_digest, &options).await.unwrap();
    assert_eq!((cached.requests, cached.fetched_bytes, cached.cached_blobs), (0, 0, 3));
    assert_eq!(cached.digest, first.digest);
    assert_eq!(proxy.take(), Vec::<String>::new(), "a cached digest makes no request at all");
    assert_eq!(cached.open().unwrap().config.workdir, "/srv");

    // 4. A two-platform index: linux/amd64 is taken; its manifest and blobs are already cached.
    let multi = pull(&format!("{}/team/base:multi", proxy.addr), &options).await.unwrap();
    assert_eq!(multi.digest, image.index.digest());
    assert_eq!(multi.manifest_digest, image.manifest.digest());
    assert_eq!((multi.requests, multi.fetched_blobs), (1, 0));
    assert!(!cache.join(image::blob_path(&image.arm_config.digest()).unwrap()).exists(), "arm64's config not fetched");
    let opened = multi.open().unwrap();
    assert_eq!(opened.manifest_digest.as_deref(), Some(image.manifest.digest().as_str()));
    proxy.take();

    // 5. An unknown tag names the reference, the registry and the status.
    let err = format!("{:#}", pull(&format!("{}/team/base:nope", proxy.addr), &options).await.unwrap_err());
    assert!(err.contains(&format!("pull {}/team/base:nope", proxy.addr)), "{err}");
    assert!(err.contains(&format!("the registry {}", proxy.addr)), "{err}");
    assert!(err.contains("HTTP 404") && err.contains("ManifestUnknown"), "{err}");

    // The cache holds only whole, named blobs and an index of what was pulled.
    let leftovers: Vec<_> = fs::read_dir(cache.join("blobs/sha256"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let index: Index = serde_json::from_slice(&fs::read(cache.join("index.json")).unwrap()).unwrap();
    let names: Vec<&str> = index.manifests.iter().filter_map(Descriptor::ref_name).collect();
    assert_eq!(names, [by_tag.as_str(), by_digest.as_str(), &format!("{}/team/base:multi", proxy.addr)]);
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
