//! `snapsign bench import`: pulling and importing an image from a registry
//! on loopback (Debian's docker-registry, from the hosts' tool cache) as
//! `snapsign dev` does for `FROM <image>`: pull into a fresh cache, lay the
//! layers into a tree, write the base snapshot. Beside it, the floor: `tar
//! -xzf` of the same layer. Figures, not tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use oci_client::Reference;
use oci_client::client::{Client, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use snapsign_rootfs_builder::archive::write_archive;
use snapsign_rootfs_builder::image::oci;
use snapsign_rootfs_builder::snapshot::{FORMAT_VERSION, SnapshotManifest};
use snapsign_rootfs_builder::tree::Tree;

use snapsign_dev_stack::registry::{PullOptions, pull};
use snapsign_foreign_hosts::Tools;

/// Runs `rounds` rounds of import and floor on an image of about `megabytes` MB
/// (half random bytes, half text, in one gzip layer).
pub async fn run(megabytes: usize, rounds: usize, tools_dir: Option<PathBuf>) -> Result<()> {
    if rounds == 0 || megabytes == 0 {
        bail!("--rounds and --mb must be at least 1");
    }
    let scratch = super::Scratch::new("import")?;
    let tools = Tools::new(tools_dir.unwrap_or_else(Tools::default_dir));
    let (_registry_process, registry) =
        snapsign_foreign_hosts::launch::oci_registry(&tools, &scratch.0.join("registry"))
            .await
            .context("start a registry")?;
    let layer_path = scratch.0.join("layer.tar.gz");
    let made = {
        let layer_path = layer_path.clone();
        tokio::task::spawn_blocking(move || make_layer(&layer_path, megabytes)).await??
    };
    let reference = format!("{registry}/bench/image:1");
    push(&registry, &reference, &layer_path, &made).await?;
    println!(
        "image {reference}: {} files, {:.1} MB in one gzip layer of {:.1} MB; {rounds} rounds",
        made.files,
        made.tar_bytes as f64 / 1e6,
        made.gzip_bytes as f64 / 1e6
    );
    let (mut pulls, mut lays, mut writes, mut totals, mut floors) = (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let dir = scratch.0.join(format!("round-{round}"));
        let started = Instant::now();
        let pulled = pull(&reference, &PullOptions::new(dir.join("cache"))).await?;
        let pulled_at = started.elapsed();
        let (laid, written) = {
            let dir = dir.clone();
            tokio::task::spawn_blocking(move || -> Result<(Duration, Duration)> {
                let started = Instant::now();
                let image = pulled.open()?;
                let mut tree = Tree::create(dir.join("tree"))?;
                snapsign_rootfs_builder::image::apply(&image, &mut tree)?;
                let laid = started.elapsed();
                let started = Instant::now();
                let manifest = SnapshotManifest {
                    format_version: FORMAT_VERSION.into(),
                    snapshot_id: "bench".into(),
                    node_kind: "base".into(),
                    parent_manifest_uri: None,
                    config: image.config.clone(),
                    files: 0,
                };
                write_archive(&dir.join("snapshot.tar.zst"), manifest, &tree, None)?;
                Ok((laid, started.elapsed()))
            })
            .await??
        };
        let floor_dir = dir.join("floor");
        std::fs::create_dir_all(&floor_dir)?;
        let started = Instant::now();
        let status = Command::new("tar").arg("-xzf").arg(&layer_path).arg("-C").arg(&floor_dir).status()?;
        if !status.success() {
            bail!("tar -xzf failed: {status}");
        }
        floors.push(started.elapsed());
        pulls.push(pulled_at);
        lays.push(laid);
        writes.push(written);
        totals.push(pulled_at + laid + written);
        let _ = std::fs::remove_dir_all(&dir);
    }
    println!("{:<44} {:>9} {:>9} {:>9}", "", "min", "median", "max");
    for (name, times) in [
        ("pull into a fresh cache (verified)", &pulls),
        ("lay the layer into a tree", &lays),
        ("write the base snapshot (tar + zstd)", &writes),
        ("import, all three", &totals),
        ("floor: tar -xzf of the same layer", &floors),
    ] {
        let mut sorted = times.clone();
        sorted.sort();
        let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
        println!(
            "{name:<44} {:>9} {:>9} {:>9}",
            ms(sorted[0]),
            ms(sorted[sorted.len() / 2]),
            ms(sorted[sorted.len() - 1])
        );
    }
    Ok(())
}

struct Made {
    files: usize,
    tar_bytes: u64,
    gzip_bytes: u64,
    diff_id: String,
}

/// One gzip layer: `megabytes` files of 1 MB, every other one random bytes, the rest text.
fn make_layer(path: &Path, megabytes: usize) -> Result<Made> {
    use std::io::Write;
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..megabytes {
        let data: Vec<u8> = if i % 2 == 0 {
            snapsign_rootfs_builder::sample::random(1 << 20, 0x9e37_79b9_7f4a_7c15 ^ i as u64)
        } else {
            format!("line {i} of a text file that compresses well\n").repeat(1 << 20).into_bytes()[..1 << 20].to_vec()
        };
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, format!("data/file-{i:03}"), data.as_slice())?;
    }
    let tar = tar.into_inner()?;
    let diff_id = oci::sha256_digest(&tar);
    let mut gzip = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gzip.write_all(&tar)?;
    let gzip = gzip.finish()?;
    std::fs::write(path, &gzip).with_context(|| format!("write {}", path.display()))?;
    Ok(Made { files: megabytes, tar_bytes: tar.len() as u64, gzip_bytes: gzip.len() as u64, diff_id })
}

/// Pushes the layer, a config and a manifest as `reference`.
async fn push(registry: &str, reference: &str, layer_path: &Path, made: &Made) -> Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.to_owned()]),
        ..Default::default()
    });
    let tag: Reference = reference.parse()?;
    client.store_auth_if_needed(tag.resolve_registry(), &RegistryAuth::Anonymous).await;
    let layer = std::fs::read(layer_path)?;
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [made.diff_id]},
    }))?;
    let descriptor = |media_type: &str, bytes: &[u8]| serde_json::json!({"mediaType": media_type, "digest": oci::sha256_digest(bytes), "size": bytes.len()});
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST,
        "config": descriptor(oci::OCI_CONFIG, &config),
        "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
    }))?;
    client.push_blob(&tag, layer.clone(), &oci::sha256_digest(&layer)).await.context("push the layer")?;
    client.push_blob(&tag, config.clone(), &oci::sha256_digest(&config)).await.context("push the config")?;
    let content_type = http::HeaderValue::from_static(oci::OCI_MANIFEST);
    client.push_manifest_raw(&tag, manifest, content_type).await.context("push the manifest")?;
    Ok(())
}
