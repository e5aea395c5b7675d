//! Pulls from a real registry on loopback (Debian's docker-registry, from
//! the hosts' tool cache) through a counting proxy: by tag, from the cache
//! by digest, a two-platform index, and a Docker Hub name through a mirror.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use hyper::Request;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use snapsign_dev_stack::registry::{PullOptions, pull};
use snapsign_foreign_hosts::Tools;
use snapsign_rootfs_builder::image::{
    self,
    oci::{Descriptor, Index},
};
use snapsign_rootfs_builder::tree::Tree;

#[path = "common/registry.rs"]
mod test_registry;
use test_registry::{TestImage, push, test_image};

fn options(cache: &Path, work: &Path) -> PullOptions {
    PullOptions {
        cache_dir: cache.to_owned(),
        // No credentials: not the machine's own Docker config.
        docker_config: Some(work.join("no-docker-config.json")),
        insecure_registries: Vec::new(),
        mirror: None,
    }
}

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

/// Debian's docker-registry on loopback with the test image pushed as
/// `team/base:1.2`, behind a counting proxy.
async fn registry_with_test_image(
    work: &Path,
) -> (snapsign_foreign_hosts::process::HostProcess, TestImage, CountingProxy) {
    let (registry, upstream) = snapsign_foreign_hosts::launch::oci_registry(&tools(), &work.join("registry"))
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
