//! `snapsign demo`: the embedded stack on loopback (S3-compatible store and
//! the signer component in the host), and one artifact taken through it:
//! signed as a multipart upload, uploaded in parts, completed, read back
//! through a get_blob URL and checked byte for byte.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::engine::{self, EngineLimits};
use crate::signer::SignerServerConfig;
use crate::store::StoreConfig;

const MIB: usize = 1024 * 1024;

fn step(n: u32, text: &str) {
    println!("[{n}/6] {text}");
}

async fn sign(client: &reqwest::Client, url: &str, token: &str, body: Value) -> Result<(u16, Value)> {
    let response = client.post(url).bearer_auth(token).json(&body).send().await.context("reach the signer")?;
    let status = response.status().as_u16();
    let json = response.json().await.context("read the signer's JSON answer")?;
    Ok((status, json))
}

/// Runs the demo in a temporary directory and prints what happens.
pub async fn run() -> Result<()> {
    let started = Instant::now();
    let dir = std::env::temp_dir().join(format!("snapsign-demo-{}", std::process::id()));
    let result = run_in(&dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    println!("demo finished in {:.2} s", started.elapsed().as_secs_f64());
    Ok(())
}

async fn run_in(dir: &std::path::Path) -> Result<()> {
    let (access, secret) = ("AKIDSNAPSIGNDEMO", "snapsign-demo-secret");
    let token_key = format!("demo-{:032x}", rand_seed());
    step(1, "starting the embedded S3-compatible store (SigV4 verified) on 127.0.0.1");
    let store = crate::store::start(&StoreConfig {
        root: dir.join("store"),
        listen: "127.0.0.1:0".parse()?,
        access_key_id: access.into(),
        secret_access_key: secret.into(),
        buckets: vec!["snapshots".into()],
        faults: Default::default(),
    })
    .await?;
    println!("      store  {}", store.url());

    step(2, "starting serve-signer: the signer component in wasmtime, outbound HTTP allowed only to the store");
    let env: Vec<(String, String)> = [
        ("SNAPSIGN_BUCKET", "snapshots"),
        ("SNAPSIGN_KEY_PREFIX", "builds"),
        ("SNAPSIGN_S3_ENDPOINT", &store.url()),
        ("SNAPSIGN_S3_ADDRESSING", "path"),
        ("SNAPSIGN_ACCESS_KEY_ID", access),
        ("SNAPSIGN_SECRET_ACCESS_KEY", secret),
        ("SNAPSIGN_TOKEN_KEY", &token_key),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let (signer, host) = crate::signer::start(&SignerServerConfig {
        listen: "127.0.0.1:0".parse()?,
        env,
        limits: EngineLimits::default(),
        request_timeout: Duration::from_secs(30),
        cache_dir: engine::default_cache_dir(),
    })
    .await?;
    println!("      signer {}/api/v1/blob/sign  ({:?})", signer.url(), host.loaded);
    let url = format!("{}/api/v1/blob/sign", signer.url());
    let token = snapsign::token::mint(token_key.as_bytes(), "demo", jiff::Timestamp::now().as_second() + 600)?;
    let client = reqwest::Client::new();

    step(3, "namespace 'demo' asks to upload snapshots/rootfs.tlsnap: 12 MiB in 5 MiB parts");
    let request = json!({"target": {"kind": "artifact", "rel_path": "snapshots/rootfs.tlsnap"},
                         "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 3, "part_size_bytes": 5 * MIB}}});
    let (status, signed) = sign(&client, &url, &token, request).await?;
    ensure!(status == 200, "signer answered {status}: {signed}");
    let uri = signed["uri"].as_str().context("answer has a uri")?.to_owned();
    println!("      canonical uri {uri}  (composed by the signer)  uploadId {}", signed["uploadId"]);

    step(4, "uploading the parts to their presigned URLs, then completing through completeUrl");
    let data: Vec<u8> = (0..12 * MIB).map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[1]).collect();
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (i, chunk) in data.chunks(5 * MIB).enumerate() {
        let part_url = signed["partUrls"][i]["url"].as_str().context("part URL")?;
        let response = client.put(part_url).body(chunk.to_vec()).send().await?;
        ensure!(response.status().is_success(), "part {} refused: {}", i + 1, response.status());
        let etag = response.headers().get("etag").and_then(|v| v.to_str().ok()).context("part ETag")?.to_owned();
        println!("      part {} ({} bytes) ETag {etag}", i + 1, chunk.len());
        xml.push_str(&format!("<Part><PartNumber>{}</PartNumber><ETag>{etag}</ETag></Part>", i + 1));
    }
    xml.push_str("</CompleteMultipartUpload>");
    let complete = client.post(signed["completeUrl"].as_str().context("completeUrl")?).body(xml).send().await?;
    let status = complete.status();
    let text = complete.text().await?;
    ensure!(status.is_success() && !text.contains("<Error>"), "completion refused ({status}): {text}");

    step(5, "reading it back through a get_blob URL and comparing sha256");
    let (status, read) =
        sign(&client, &url, &token, json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}}))
            .await?;
    ensure!(status == 200, "signer answered {status}: {read}");
    let body = client.get(read["url"].as_str().context("get URL")?).send().await?.bytes().await?;
    let (want, got) = (hex::encode(Sha256::digest(&data)), hex::encode(Sha256::digest(&body)));
    if want != got {
        bail!("object in the store differs: sha256 {got}, uploaded {want}");
    }
    println!("      {} bytes, sha256 {got}  (matches)", body.len());

    step(6, "another namespace asking for that object is refused");
    let other = snapsign::token::mint(token_key.as_bytes(), "intruder", jiff::Timestamp::now().as_second() + 600)?;
    let (status, refused) =
        sign(&client, &url, &other, json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}}))
            .await?;
    ensure!(status == 403, "expected 403, got {status}: {refused}");
    println!("      {status} {}: {}", refused["code"], refused["message"]);

    signer.shutdown().await;
    store.shutdown().await;
    Ok(())
}

fn rand_seed() -> u128 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    nanos ^ (u128::from(std::process::id()) << 64)
}
