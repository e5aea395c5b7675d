//! Images the tests make with the `tar` crate: `docker save` archives, OCI
//! layouts (directory and tar), rootfs tarballs, and hostile layers.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use serde_json::json;
use tar::{EntryType, Header};

use super::oci::{self, sha256_digest};
use super::*;
use crate::tree::Owner;

/// One entry of a synthesized layer.
enum E<'a> {
    Dir(&'a str, u32),
    File(&'a str, &'a [u8], u32),
    Owned(&'a str, &'a [u8], u64, u64),
    Symlink(&'a str, &'a str),
    Hard(&'a str, &'a str),
    Whiteout(&'a str),
    Fifo(&'a str),
}

/// A header whose name bytes are written as given (the tar crate's setters refuse `..`).
fn header(kind: EntryType, name: &str, mode: u32, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    let bytes = name.as_bytes();
    assert!(bytes.len() < 100, "test names fit the old header");
    h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
    h
}

fn layer(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        let (mut h, data): (Header, &[u8]) = match *e {
            E::Dir(p, mode) => (header(EntryType::Directory, p, mode, 0), b""),
            E::File(p, data, mode) => (header(EntryType::Regular, p, mode, data.len() as u64), data),
            E::Owned(p, data, uid, gid) => {
                let mut h = header(EntryType::Regular, p, 0o640, data.len() as u64);
                h.set_uid(uid);
                h.set_gid(gid);
                (h, data)
            }
            E::Symlink(p, target) => {
                let mut h = header(EntryType::Symlink, p, 0o777, 0);
                h.set_link_name(target).unwrap();
                (h, b"")
            }
            E::Hard(p, target) => {
                let mut h = header(EntryType::Link, p, 0o644, 0);
                let t = target.as_bytes();
                h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
                (h, b"")
            }
            E::Whiteout(p) => (header(EntryType::Regular, p, 0o644, 0), b""),
            E::Fifo(p) => (header(EntryType::Fifo, p, 0o644, 0), b""),
        };
        h.set_cksum();
        b.append(&h, data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

fn zstd(bytes: &[u8]) -> Vec<u8> {
    zstd::encode_all(bytes, 1).unwrap()
}

/// A tar of `(name, bytes)` files.
fn tar_of(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = Header::new_gnu();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, name, data.as_slice()).unwrap();
    }
    b.into_inner().unwrap()
}

fn config_json(diff_ids: &[String], architecture: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "architecture": architecture, "os": "linux",
        "config": {"Env": ["PATH=/usr/bin:/bin", "GREETING=hi"], "Cmd": ["/bin/sh", "-c", "echo $GREETING"],
                   "WorkingDir": "/srv", "User": "app", "ExposedPorts": {"8080/tcp": {}},
                   "Labels": {"org.example": "yes"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }))
    .unwrap()
}

/// The two layers of the whiteout test: the second deletes a file of the
/// first and makes a directory opaque.
fn two_layers() -> (Vec<u8>, Vec<u8>) {
    let first = layer(&[
        E::Dir("etc/", 0o755),
        E::File("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644),
        E::File("etc/gone", b"delete me", 0o644),
        E::Dir("opt/", 0o755),
        E::Dir("opt/keep/", 0o750),
        E::File("opt/keep/a", b"lower a", 0o644),
        E::Dir("opt/keep/sub/", 0o755),
        E::File("opt/keep/sub/b", b"lower b", 0o644),
        E::File("bin/tool", b"#!/bin/sh\necho tool\n", 0o755),
        E::Hard("bin/tool2", "bin/tool"),
        E::Symlink("bin/sh", "/usr/bin/dash"),
        E::Owned("home/app/.profile", b"export A=1\n", 1000, 1000),
        E::Fifo("run/fifo"),
    ]);
    let second = layer(&[
        E::Whiteout("etc/.wh.gone"),
        E::File("opt/keep/new", b"upper", 0o600),
        E::Whiteout("opt/keep/.wh..wh..opq"),
        E::File("etc/added", b"kept: same layer", 0o644),
        E::Whiteout("etc/.wh.added"),
        E::File("bin/tool", b"#!/bin/sh\necho tool v2\n", 0o755),
    ]);
    (first, second)
}

fn docker_archive(path: &Path, layers: &[Vec<u8>], diff_ids: &[String]) {
    let config = config_json(diff_ids, "amd64");
    let config_name = format!("{}.json", &sha256_digest(&config)[7..]);
    let mut files = vec![(config_name.clone(), config)];
    let mut names = Vec::new();
    for (i, bytes) in layers.iter().enumerate() {
        names.push(format!("layer{i}/layer.tar"));
        files.push((names[i].clone(), bytes.clone()));
    }
    let manifest = json!([{"Config": config_name, "RepoTags": ["example/app:1"], "Layers": names}]);
    files.insert(0, ("manifest.json".into(), serde_json::to_vec(&manifest).unwrap()));
    fs::write(path, tar_of(&files)).unwrap();
}

#[test]
fn a_docker_save_archive_applies_with_whiteouts_and_an_opaque_directory() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_layers();
    let diff_ids = [sha256_digest(&first), sha256_digest(&second)];
    let archive = dir.path().join("saved"); // no extension: the content tells
    // The second layer gzip-compressed: found by its magic bytes, checked against its diff_id uncompressed.
    docker_archive(&archive, &[first, gzip(&second)], &diff_ids);

    let image = open(&archive).unwrap();
    assert_eq!(image.format, Format::DockerArchive);
    assert_eq!(image.layers.len(), 2);
    assert_eq!(image.config.workdir, "/srv");
    assert_eq!(image.config.user, "app");
    assert_eq!(image.config.env_map()["GREETING"], "hi");
    assert!(image.notes.is_empty(), "{:?}", image.notes);

    let mut tree = Tree::create(dir.path().join("tree")).unwrap();
    let stats = apply(&image, &mut tree).unwrap();
    let exists = |rel: &str| fs::symlink_metadata(tree.host(rel)).is_ok();
    assert!(!exists("etc/gone"), "the whiteout deleted the first layer's file");
    assert!(exists("etc/passwd"));
    assert!(!exists("opt/keep/a") && !exists("opt/keep/sub"), "the opaque directory lost the lower contents");
    assert_eq!(fs::read(tree.host("opt/keep/new")).unwrap(), b"upper", "what the same layer added stays");
    assert_eq!(fs::read(tree.host("etc/added")).unwrap(), b"kept: same layer");
    assert_eq!(fs::metadata(tree.host("opt/keep")).unwrap().permissions().mode() & 0o7777, 0o750);
    assert_eq!(fs::metadata(tree.host("opt/keep/new")).unwrap().permissions().mode() & 0o7777, 0o600);
    // The replaced file is new; its hard link from the first layer keeps the old content.
    assert_eq!(fs::read(tree.host("bin/tool")).unwrap(), b"#!/bin/sh\necho tool v2\n");
    assert_eq!(fs::read(tree.host("bin/tool2")).unwrap(), b"#!/bin/sh\necho tool\n");
    assert_eq!(fs::read_link(tree.host("bin/sh")).unwrap(), Path::new("/usr/bin/dash"));
    assert_eq!(tree.owner("home/app/.profile"), Owner { uid: 1000, gid: 1000 });
    assert!(!exists("run/fifo"));
    assert_eq!(stats.layers, 2);
    assert_eq!(stats.skipped_specials, 1);
    assert_eq!((stats.whiteouts, stats.opaque_dirs, stats.hard_links, stats.symlinks), (1, 1, 1, 1));
    assert!(stats.notes.iter().any(|n| n.contains("/run/fifo")), "{:?}", stats.notes);
    // The applied tree is one a snapshot can hold.
    assert!(tree.specials().unwrap().is_empty());
}

#[test]
fn a_docker_save_layer_that_does_not_match_its_diff_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = two_layers();
    let wrong = [sha256_digest(&first), sha256_digest(b"something else")];
    let archive = dir.path().join("saved.tar");
    docker_archive(&archive, &[first, second], &wrong);
    let image = open(&archive).unwrap();
    let mut tree = Tree::create(dir.path().join("tree")).unwrap();
    let err = format!("{:#}", apply(&image, &mut tree).unwrap_err());
    assert!(err.contains("apply layer 2 (layer1/layer.tar)"), "{err}");
    assert!(err.contains(&format!("the config's rootfs.diff_ids says {}", wrong[1])), "{err}");
}

struct Blob {
    media_type: &'static str,
    bytes: Vec<u8>,
}

impl Blob {
    fn descriptor(&self) -> serde_json::Value {
        json!({"mediaType": self.media_type, "digest": sha256_digest(&self.bytes), "size": self.bytes.len()})
    }

    fn write(&self, layout: &Path) {
        let path = layout.join("blobs/sha256").join(&sha256_digest(&self.bytes)[7..]);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, &self.bytes).unwrap();
    }
}

/// An OCI layout whose index.json names an image index of two platforms
/// (arm64 first); the amd64 manifest has zstd layers and a config with
/// Env, Cmd, WorkingDir and User. Returns the amd64 manifest's digest.
fn oci_layout(layout: &Path) -> String {
    let (first, second) = two_layers();
    let diff_ids = [sha256_digest(&first), sha256_digest(&second)];
    let layers = [
        Blob { media_type: "application/vnd.oci.image.layer.v1.tar+zstd", bytes: zstd(&first) },
        Blob { media_type: "application/vnd.oci.image.layer.v1.tar", bytes: second },
    ];
    let config = Blob { media_type: oci::OCI_CONFIG, bytes: config_json(&diff_ids, "amd64") };
    let arm_config = Blob { media_type: oci::OCI_CONFIG, bytes: config_json(&diff_ids, "arm64") };
    let manifest = |config: &Blob| Blob {
        media_type: oci::OCI_MANIFEST,
        bytes: serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": oci::OCI_MANIFEST, "config": config.descriptor(),
            "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
        }))
        .unwrap(),
    };
    let (amd, arm) = (manifest(&config), manifest(&arm_config));
    let with_platform = |blob: &Blob, arch: &str| {
        let mut d = blob.descriptor();
        d["platform"] = json!({"os": "linux", "architecture": arch});
        d
    };
    let index = Blob {
        media_type: oci::OCI_INDEX,
        bytes: serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": oci::OCI_INDEX,
            "manifests": [with_platform(&arm, "arm64"), with_platform(&amd, "amd64")],
        }))
        .unwrap(),
    };
    for blob in layers.iter().chain([&config, &arm_config, &amd, &arm, &index]) {
        blob.write(layout);
    }
    let mut top = index.descriptor();
    top["annotations"] = json!({oci::REF_NAME_ANNOTATION: "example.com/team/base:1.2"});
    fs::write(layout.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::write(layout.join("index.json"), serde_json::to_vec(&json!({"schemaVersion": 2, "manifests": [top]})).unwrap())
        .unwrap();
    sha256_digest(&amd.bytes)
}

/// `tar -C dir -c .` of every file under `dir`.
fn tar_dir(dir: &Path, out: &Path) {
    let mut b = tar::Builder::new(fs::File::create(out).unwrap());
    b.mode(tar::HeaderMode::Deterministic);
    b.append_dir_all(".", dir).unwrap();
    b.into_inner().unwrap().flush().unwrap();
}

fn check_applied_oci(image: &Image, dir: &Path, name: &str) {
    let mut tree = Tree::create(dir.join(name)).unwrap();
    let stats = apply(image, &mut tree).unwrap();
    assert_eq!(stats.layers, 2);
    assert!(!tree.host("etc/gone").exists());
    assert_eq!(fs::read(tree.host("opt/keep/new")).unwrap(), b"upper");
    assert!(!tree.host("opt/keep/a").exists());
}

#[test]
fn an_oci_layout_directory_and_its_tar_keep_the_config_and_pick_linux_amd64() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let amd64 = oci_layout(&layout);
    let packed = dir.path().join("layout.tar");
    tar_dir(&layout, &packed);
    let packed_gz = dir.path().join("layout.bin");
    fs::write(&packed_gz, gzip(&fs::read(&packed).unwrap())).unwrap();

    for (path, name) in [(&layout, "from-dir"), (&packed, "from-tar"), (&packed_gz, "from-tar-gz")] {
        let image = open(path).unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert_eq!(image.format, Format::OciLayout);
        assert_eq!(image.manifest_digest.as_deref(), Some(amd64.as_str()), "{name}");
        assert_eq!(image.config.env, ["PATH=/usr/bin:/bin", "GREETING=hi"]);
        assert_eq!(image.config.cmd.as_deref().unwrap(), ["/bin/sh", "-c", "echo $GREETING"]);
        assert_eq!(image.config.workdir, "/srv");
        assert_eq!(image.config.user, "app");
        assert!(image.config.exposed_ports.contains("8080/tcp"));
        assert_eq!(image.platform.as_ref().unwrap().to_string(), "linux/amd64");
        assert!(image.notes.iter().any(|n| n.contains("picked linux/amd64 of the 2 manifests")), "{:?}", image.notes);
        assert_eq!(image.layers[0].media_type.as_deref(), Some("application/vnd.oci.image.layer.v1.tar+zstd"));
        check_applied_oci(&image, dir.path(), name);
    }
    // By name and by digest too; an unknown one names what there is.
    assert!(open_selected(&layout, "example.com/team/base:1.2").is_ok());
    let err = format!("{:#}", open_selected(&layout, "other:1").unwrap_err());
    assert!(err.contains("index.json has no image other:1; it has: sha256:"), "{err}");
    assert!(err.contains("(example.com/team/base:1.2)"), "{err}");
}

#[test]
fn an_index_without_linux_amd64_names_the_platforms_it_has() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    oci_layout(&layout);
    // Rewrite the index blob without the amd64 entry; index.json points at the new one.
    let index_json: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let top = index_json["manifests"][0]["digest"].as_str().unwrap();
    let mut index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("blobs/sha256").join(&top[7..])).unwrap()).unwrap();
    index["manifests"].as_array_mut().unwrap().pop();
    let blob = Blob { media_type: oci::OCI_INDEX, bytes: serde_json::to_vec(&index).unwrap() };
    blob.write(&layout);
    fs::write(layout.join("index.json"), serde_json::to_vec(&json!({"manifests": [blob.descriptor()]})).unwrap())
        .unwrap();
    let err = format!("{:#}", open(&layout).unwrap_err());
    assert!(err.contains("has no manifest for linux/amd64; it has: linux/arm64"), "{err}");
}

#[test]
fn a_tampered_blob_is_refused_naming_it_and_both_digests() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    oci_layout(&layout);
    let (_, second) = two_layers();
    let blob = format!("blobs/sha256/{}", &sha256_digest(&second)[7..]);
    let mut bytes = fs::read(layout.join(&blob)).unwrap();
    let at = bytes.windows(5).position(|w| w == b"upper").unwrap();
    bytes[at] = b'U';
    fs::write(layout.join(&blob), &bytes).unwrap();
    let err = format!("{:#}", open(&layout).unwrap_err());
    assert!(err.contains(&format!("layer 2 {blob} does not match its descriptor")), "{err}");
    assert!(err.contains(&format!("the descriptor says {}", sha256_digest(&second))), "{err}");
    assert!(err.contains(&format!("the blob is {}", sha256_digest(&bytes))), "{err}");

    // A tampered config (Cmd changed) is caught the same way.
    let layout = dir.path().join("layout2");
    oci_layout(&layout);
    let config = config_json(
        &{
            let (a, b) = two_layers();
            [sha256_digest(&a), sha256_digest(&b)]
        },
        "amd64",
    );
    let path = layout.join("blobs/sha256").join(&sha256_digest(&config)[7..]);
    fs::write(&path, String::from_utf8(config).unwrap().replace("echo", "rm -rf")).unwrap();
    let err = format!("{:#}", open(&layout).unwrap_err());
    assert!(err.contains("the config blobs/sha256/") && err.contains("does not match its descriptor"), "{err}");
}

#[test]
fn a_plain_rootfs_tarball_is_one_layer_with_an_empty_config() {
    let dir = tempfile::tempdir().unwrap();
    let rootfs = layer(&[
        E::Dir("./", 0o755),
        E::Dir("./bin/", 0o755),
        E::File("./bin/hello", b"#!/bin/sh\necho hello\n", 0o755),
        E::File("/etc/hostname", b"box\n", 0o644), // absolute: made relative
        E::File("usr/share/doc/x/README", b"parents are implied\n", 0o644),
    ]);
    for (name, bytes) in [("rootfs.tar", rootfs.clone()), ("rootfs.tgz", gzip(&rootfs)), ("rootfs", zstd(&rootfs))] {
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let image = open(&path).unwrap();
        assert_eq!(image.format, Format::RootfsTar, "{name}");
        assert_eq!(image.config, ImageConfig::default());
        assert_eq!(image.layers.len(), 1);
        let mut tree = Tree::create(dir.path().join(format!("tree-{name}"))).unwrap();
        let stats = apply(&image, &mut tree).unwrap();
        assert_eq!(fs::read(tree.host("bin/hello")).unwrap(), b"#!/bin/sh\necho hello\n");
        assert_eq!(fs::metadata(tree.host("bin/hello")).unwrap().mode() & 0o777, 0o755);
        assert_eq!(fs::read(tree.host("etc/hostname")).unwrap(), b"box\n");
        assert!(tree.host("usr/share/doc/x/README").is_file());
        assert_eq!(stats.files, 3);
    }
    // Junk is not an image.
    let junk = dir.path().join("junk");
    fs::write(&junk, b"hello, not a tar").unwrap();
    let err = format!("{:#}", open(&junk).unwrap_err());
    assert!(err.contains("is not a tar archive"), "{err}");
    let err = format!("{:#}", open(dir.path()).unwrap_err());
    assert!(err.contains("neither an OCI image layout"), "{err}");
}

/// A rootfs tarball of one hostile layer, applied over a tree of `base`.
fn apply_hostile(dir: &Path, name: &str, base: &[E], hostile: &[E]) -> (Tree, anyhow::Result<ApplyStats>) {
    let path = dir.join(format!("{name}.tar"));
    let mut tree = Tree::create(dir.join(name)).unwrap();
    if !base.is_empty() {
        fs::write(&path, layer(base)).unwrap();
        apply(&open(&path).unwrap(), &mut tree).unwrap();
    }
    fs::write(&path, layer(hostile)).unwrap();
    let result = apply(&open(&path).unwrap(), &mut tree);
    (tree, result)
}

#[test]
fn hostile_layers_cannot_escape_the_tree_or_write_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let outside = dir.path().join("outside");
    fs::create_dir(&outside).unwrap();
    fs::write(outside.join("victim"), "untouched").unwrap();
    let outside_str = outside.to_str().unwrap().to_owned();

    // `..` in a path.
    let (_, result) = apply_hostile(dir.path(), "dots", &[], &[E::File("../escape", b"x", 0o644)]);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("entry ../escape has a .. component; refused"), "{err}");
    assert!(!dir.path().join("escape").exists());

    // A symlink to a host directory, then a file through it (same layer, and across layers).
    let through = [E::Symlink("link", &outside_str), E::File("link/victim", b"pwned", 0o644)];
    let (_, result) = apply_hostile(dir.path(), "through", &[], &through);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("entry link/victim would be written through the symlink /link; refused"), "{err}");
    let base = [E::Symlink("etc", "../../outside")];
    let (_, result) = apply_hostile(dir.path(), "across", &base, &[E::File("etc/victim", b"pwned", 0o644)]);
    assert!(format!("{:#}", result.unwrap_err()).contains("through the symlink /etc; refused"));
    // A directory entry or a whiteout below a symlink does not touch the target either.
    let (_, result) = apply_hostile(dir.path(), "dir-through", &base, &[E::Dir("etc/sub/", 0o755)]);
    assert!(result.is_err());
    let (_, result) = apply_hostile(dir.path(), "wh-through", &base, &[E::Whiteout("etc/.wh.victim")]);
    result.unwrap();
    assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "untouched");
    assert!(!outside.join("sub").exists());

    // A file over a symlink replaces the symlink; the target is not written.
    let base = [E::Symlink("victim", &format!("{outside_str}/victim"))];
    let (tree, result) = apply_hostile(dir.path(), "over", &base, &[E::File("victim", b"mine", 0o644)]);
    result.unwrap();
    assert_eq!(fs::read(tree.host("victim")).unwrap(), b"mine");
    assert!(!fs::symlink_metadata(tree.host("victim")).unwrap().file_type().is_symlink());
    assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "untouched");

    // Hard links only to what is in the tree: not to a host path, not through a symlink.
    let (_, result) = apply_hostile(dir.path(), "hard-abs", &[], &[E::Hard("x", &format!("{outside_str}/victim"))]);
    let err = format!("{:#}", result.unwrap_err());
    assert!(err.contains("which is not in the tree"), "{err}");
    let base = [E::Symlink("out", &outside_str)];
    let (_, result) = apply_hostile(dir.path(), "hard-through", &base, &[E::Hard("x", "out/victim")]);
    assert!(format!("{:#}", result.unwrap_err()).contains("which is not in the tree"));
    let (_, result) = apply_hostile(dir.path(), "hard-dots", &[], &[E::Hard("x", "../outside/victim")]);
    assert!(format!("{:#}", result.unwrap_err()).contains("has a .. component; refused"));
    assert_eq!(fs::read_to_string(outside.join("victim")).unwrap(), "untouched");
    assert_eq!(fs::read_dir(&outside).unwrap().count(), 1);
}

#[test]
fn size_limits_fail_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.tar");
    fs::write(&path, layer(&[E::File("a", &[7; 3000], 0o644), E::File("b", &[7; 3000], 0o644)])).unwrap();
    let image = open(&path).unwrap();
    let mut tree = Tree::create(dir.path().join("t1")).unwrap();
    let limits = ApplyLimits { max_entry_bytes: 2048, max_total_bytes: 1 << 20 };
    let err = format!("{:#}", apply_with(&image, &mut tree, &limits).unwrap_err());
    assert!(err.contains("entry a is 3000 bytes, more than the 2048 allowed for one file"), "{err}");
    let mut tree = Tree::create(dir.path().join("t2")).unwrap();
    let limits = ApplyLimits { max_entry_bytes: 4096, max_total_bytes: 5000 };
    let err = format!("{:#}", apply_with(&image, &mut tree, &limits).unwrap_err());
    assert!(err.contains("entry b (3000 bytes) takes the image's files past the 5000 bytes allowed"), "{err}");
}

#[test]
fn a_layout_of_several_images_asks_which() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    oci_layout(&layout);
    let mut index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let mut second = index["manifests"][0].clone();
    second["annotations"] = json!({oci::REF_NAME_ANNOTATION: "example.com/other:2"});
    index["manifests"].as_array_mut().unwrap().push(second);
    fs::write(layout.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    let err = format!("{:#}", open(&layout).unwrap_err());
    assert!(err.contains("index.json holds 2 images; choose one by digest or name"), "{err}");
    assert!(err.contains("example.com/team/base:1.2") && err.contains("example.com/other:2"), "{err}");
    let image = open_selected(&layout, "example.com/other:2").unwrap();
    assert_eq!(image.config.workdir, "/srv");
}
