//! A test image pushed to a registry on loopback: this machine's programs
//! (`host_rootfs`) in a first layer, a second that deletes and hides some of
//! it (a whiteout, an opaque directory), an amd64 config with Env, Cmd,
//! WorkingDir and User, and a two-platform index. Shared by the registry's
//! unit tests and the end-to-end tests of `FROM <registry image>`.
#![allow(dead_code)]

use std::fs;
use std::path::Path;

use oci_client::Reference;
use oci_client::client::{Client, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use serde_json::json;
use snapsign_rootfs_builder::host_rootfs;
use snapsign_rootfs_builder::image::oci;

pub struct Blob {
    pub media_type: &'static str,
    pub bytes: Vec<u8>,
}

impl Blob {
    pub fn json(media_type: &'static str, value: serde_json::Value) -> Blob {
        Blob { media_type, bytes: serde_json::to_vec(&value).unwrap() }
    }

    pub fn digest(&self) -> String {
        oci::sha256_digest(&self.bytes)
    }

    pub fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": self.digest(), "size": self.bytes.len()})
    }
}

/// The test image: this machine's sh/bash/coreutils with an /etc/motd and
/// /opt/lower/a (layer 1, tar+zstd), then a layer deleting /etc/motd with a
/// whiteout, making /opt/lower opaque and adding /etc/hello (layer 2, tar).
pub struct TestImage {
    pub layers: Vec<Blob>,
    pub config: Blob,
    pub manifest: Blob,
    pub arm_config: Blob,
    pub arm_manifest: Blob,
    pub index: Blob,
}

pub fn test_image(work: &Path) -> TestImage {
    let root = work.join("rootfs");
    host_rootfs::write(&root, &host_rootfs::TEST_PROGRAMS).expect("make the image's rootfs");
    fs::write(root.join("etc/motd"), "deleted by layer 2\n").unwrap();
    fs::create_dir_all(root.join("opt/lower")).unwrap();
    fs::write(root.join("opt/lower/a"), "hidden by layer 2\n").unwrap();
    let mut first = tar::Builder::new(Vec::new());
    first.mode(tar::HeaderMode::Deterministic);
    first.follow_symlinks(false);
    first.append_dir_all(".", &root).unwrap();
    let first = first.into_inner().unwrap();

    let mut second = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("etc/.wh.motd", &b""[..]),
        ("opt/lower/.wh..wh..opq", b""),
        ("opt/lower/b", b"layer 2's own\n"),
        ("etc/hello", b"hello from layer 2\n"),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        second.append_data(&mut header, name, data).unwrap();
    }
    let second = second.into_inner().unwrap();
    let diff_ids = [oci::sha256_digest(&first), oci::sha256_digest(&second)];
    let layers = vec![
        Blob {
            media_type: "application/vnd.oci.image.layer.v1.tar+zstd",
            bytes: zstd::encode_all(first.as_slice(), 3).unwrap(),
        },
        Blob { media_type: "application/vnd.oci.image.layer.v1.tar", bytes: second },
    ];
    let config_for = |arch: &str| {
        Blob::json(
            oci::OCI_CONFIG,
            json!({
                "architecture": arch, "os": "linux",
                "config": {"Env": ["PATH=/bin", "GREETING=hello"], "Cmd": ["/bin/sh", "-c", "echo $GREETING"],
                           "WorkingDir": "/srv", "User": "app"},
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }),
        )
    };
    let manifest_for = |config: &Blob| {
        Blob::json(
            oci::OCI_MANIFEST,
            json!({"schemaVersion": 2, "mediaType": oci::OCI_MANIFEST, "config": config.descriptor(),
                   "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>()}),
        )
    };
    let (config, arm_config) = (config_for("amd64"), config_for("arm64"));
    let (manifest, arm_manifest) = (manifest_for(&config), manifest_for(&arm_config));
    let platform = |blob: &Blob, arch: &str| {
        let mut d = blob.descriptor();
        d["platform"] = json!({"os": "linux", "architecture": arch});
        d
    };
    let index = Blob::json(
        oci::OCI_INDEX,
        json!({"schemaVersion": 2, "mediaType": oci::OCI_INDEX,
               "manifests": [platform(&arm_manifest, "arm64"), platform(&manifest, "amd64")]}),
    );
    TestImage { layers, config, manifest, arm_config, arm_manifest, index }
}

/// Pushes the image as `team/base:1.2` and the two-platform index as `team/base:multi`.
pub async fn push(registry: &str, image: &TestImage) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = Client::new(ClientConfig {
        protocol: ClientProtocol::HttpsExcept(vec![registry.to_owned()]),
        ..Default::default()
    });
    let auth = RegistryAuth::Anonymous;
    let tag: Reference = format!("{registry}/team/base:1.2").parse().unwrap();
    client.store_auth_if_needed(tag.resolve_registry(), &auth).await;
    for blob in image.layers.iter().chain([&image.config, &image.arm_config]) {
        client.push_blob(&tag, blob.bytes.clone(), &blob.digest()).await.unwrap();
    }
    let content_type = |blob: &Blob| http::HeaderValue::from_static(blob.media_type);
    client.push_manifest_raw(&tag, image.manifest.bytes.clone(), content_type(&image.manifest)).await.unwrap();
    let arm = tag.clone_with_digest(image.arm_manifest.digest());
    client.push_manifest_raw(&arm, image.arm_manifest.bytes.clone(), content_type(&image.arm_manifest)).await.unwrap();
    let multi: Reference = format!("{registry}/team/base:multi").parse().unwrap();
    client.push_manifest_raw(&multi, image.index.bytes.clone(), content_type(&image.index)).await.unwrap();
}
