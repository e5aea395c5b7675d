//! The `tl-rootfs-build` binary against an in-test fake HTTP store: what goes
//! over the wire for single_put, s3_multipart and parent downloads, and what
//! a failure prints and leaves behind.

mod fake_http;
#[path = "../../../tests/common/rootfs.rs"]
mod rootfs;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use fake_http::{FakeHttp, Recorded, Reply};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use snapsign_rootfs_builder::archive::{read_archive, write_archive};
use snapsign_rootfs_builder::sample::random;
use snapsign_rootfs_builder::snapshot::{FORMAT_VERSION, ImageConfig, SnapshotManifest};
use snapsign_rootfs_builder::tree::Tree;

struct Build {
    dir: tempfile::TempDir,
}

impl Build {
    /// A build directory with a context holding `app/blob.bin` (noise), `app/hello.txt`, `run.sh`.
    fn new() -> Build {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("build/context");
        fs::create_dir_all(ctx.join("app")).unwrap();
        fs::write(ctx.join("app/blob.bin"), random(5000, 7)).unwrap();
        fs::write(ctx.join("app/hello.txt"), "hello\n").unwrap();
        fs::write(ctx.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
        fs::set_permissions(ctx.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();
        Build { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join("build").join(rel)
    }

    /// Writes spec.json: the fields the platform and client provide, plus `extra`.
    fn spec(&self, dockerfile: &str, extra: Value) -> PathBuf {
        let mut spec = json!({
            "buildId": "build-7", "snapshotId": "snap-7", "rootfsNodeKind": "base",
            "rootfsDiskBytes": 10_485_760, "dockerfile": dockerfile,
            "contextDir": self.path("context"), "builder": {"image": "x", "command": "tl-rootfs-build"},
            "runtimeContract": {"opaque": true}
        });
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        let path = self.path("spec.json");
        fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        path
    }

    fn run(&self, fault: Option<&str>) -> Output {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tl-rootfs-build"));
        command
            .args(["builder-word", "--spec"])
            .arg(self.path("spec.json"))
            .arg("--metadata-out")
            .arg(self.metadata_path());
        command.env_remove("SNAPSIGN_BUILDER_FAULT");
        if let Some(fault) = fault {
            command.env("SNAPSIGN_BUILDER_FAULT", fault);
        }
        command.output().unwrap()
    }

    fn metadata_path(&self) -> PathBuf {
        self.path("metadata.json")
    }

    fn metadata(&self) -> Value {
        serde_json::from_slice(&fs::read(self.metadata_path()).unwrap()).unwrap()
    }

    /// No work directory is left in the build directory.
    fn assert_clean(&self) {
        let leftovers: Vec<_> = fs::read_dir(self.path(""))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".tl-rootfs-build"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Reads an uploaded archive back; returns snapshot.json and the rootfs paths.
fn open_archive(bytes: &[u8]) -> (SnapshotManifest, Vec<String>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.tar.zst");
    fs::write(&path, bytes).unwrap();
    let mut tree = Tree::create(dir.path().join("tree")).unwrap();
    let parent = read_archive(&path, Some(&mut tree)).unwrap();
    (parent.manifest, parent.index.keys().cloned().collect(), dir)
}

const DOCKERFILE: &str = "FROM scratch\nWORKDIR /srv\nCOPY app ./app/\nCOPY --chmod=0700 run.sh /usr/local/bin/run\n\
                          ENV MODE=prod\nCMD [\"/usr/local/bin/run\"]\nEXPOSE 8080\n";

fn multipart_spec(fake: &FakeHttp, part_size: u64, parts: u32) -> Value {
    let urls: Vec<Value> = (1..=parts)
        .map(|n| json!({"partNumber": n, "url": fake.url(&format!("/bucket/key?partNumber={n}&uploadId=u-1&X-Amz-Signature=secret{n}"))}))
        .collect();
    json!({"upload": {"kind": "s3_multipart", "uri": "s3://bucket/key", "uploadId": "u-1", "partSizeBytes": part_size,
                      "maxParts": parts, "partUrls": urls,
                      "completeUrl": fake.url("/bucket/key?uploadId=u-1&X-Amz-Signature=secretc"),
                      "abortUrl": fake.url("/bucket/key?uploadId=u-1&abort=1&X-Amz-Signature=secreta"),
                      "expiresAt": "2030-01-01T00:00:00Z"}})
}

/// A store fake: parts answer `"e&<n>"` ETags (one that needs XML escaping),
/// part `fail_part` answers 500, completion answers `complete`.
fn store(fail_part: Option<u32>, complete: Reply) -> FakeHttp {
    let complete = std::sync::Mutex::new(Some(complete));
    FakeHttp::start(move |request| {
        let query = request.target.split_once('?').map(|(_, q)| q).unwrap_or_default().to_owned();
        let part = query.split('&').find_map(|kv| kv.strip_prefix("partNumber=")).map(|n| n.parse::<u32>().unwrap());
        match (request.method.as_str(), part) {
            ("PUT", Some(n)) if Some(n) == fail_part => {
                Reply::status(500).with_body("<Error><Code>InternalError</Code><Message>disk on fire</Message></Error>")
            }
            ("PUT", Some(n)) => Reply::status(200).with_header("ETag", &format!("\"e&{n}\"")),
            ("POST", _) => complete.lock().unwrap().take().unwrap_or_else(|| Reply::status(500)),
            ("DELETE", _) => Reply::status(204),
            _ => Reply::status(404),
        }
    })
}

fn parts_of(requests: &[Recorded]) -> Vec<(u32, Recorded)> {
    let mut parts: Vec<(u32, Recorded)> = requests
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| {
            let n = r.target.split("partNumber=").nth(1).unwrap().split('&').next().unwrap().parse().unwrap();
            (n, r.clone())
        })
        .collect();
    parts.sort_by_key(|(n, _)| *n);
    parts
}

#[test]
fn multipart_parts_carry_their_bytes_and_completion_carries_the_returned_etags() {
    let build = Build::new();
    let fake = store(None, Reply::status(200).with_body("<CompleteMultipartUploadResult/>"));
    build.spec(DOCKERFILE, multipart_spec(&fake, 1024, 10));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));

    let requests = fake.requests();
    let parts = parts_of(&requests);
    assert!(parts.len() >= 5, "the noise spans several 1 KiB parts: {}", parts.len());
    let numbers: Vec<u32> = parts.iter().map(|(n, _)| *n).collect();
    assert_eq!(numbers, (1..=parts.len() as u32).collect::<Vec<_>>());
    let mut archive = Vec::new();
    for (i, (n, part)) in parts.iter().enumerate() {
        assert!(part.target.starts_with("/bucket/key?partNumber="), "{}", part.target);
        assert_eq!(part.header("content-length"), Some(part.body.len().to_string().as_str()));
        assert_eq!(part.header("transfer-encoding"), None, "parts are sent with a length, not chunked");
        if i + 1 < parts.len() {
            assert_eq!(part.body.len(), 1024, "part {n} is not exactly partSizeBytes");
        } else {
            assert!(!part.body.is_empty() && part.body.len() <= 1024);
        }
        archive.extend_from_slice(&part.body);
    }

    let completes: Vec<&Recorded> = requests.iter().filter(|r| r.method == "POST").collect();
    assert_eq!(completes.len(), 1);
    assert!(completes[0].target.contains("X-Amz-Signature=secretc"));
    let expected: String = (1..=parts.len())
        .map(|n| format!("<Part><PartNumber>{n}</PartNumber><ETag>&quot;e&amp;{n}&quot;</ETag></Part>"))
        .collect();
    assert_eq!(text(&completes[0].body), format!("<CompleteMultipartUpload>{expected}</CompleteMultipartUpload>"));
    assert!(requests.iter().all(|r| r.method != "DELETE"), "a successful upload is not aborted");

    let metadata = build.metadata();
    assert_eq!(
        metadata,
        json!({"snapshot_id": "snap-7", "snapshot_uri": "s3://bucket/key", "snapshot_format_version": FORMAT_VERSION,
               "snapshot_size_bytes": archive.len(), "rootfs_disk_bytes": 10_485_760, "rootfs_node_kind": "base",
               "sha256": sha256_hex(&archive)})
    );
    let (manifest, paths, dir) = open_archive(&archive);
    assert_eq!(
        paths,
        [
            "srv",
            "srv/app",
            "srv/app/blob.bin",
            "srv/app/hello.txt",
            "usr",
            "usr/local",
            "usr/local/bin",
            "usr/local/bin/run"
        ]
    );
    assert_eq!(manifest.config.cmd, Some(vec!["/usr/local/bin/run".to_owned()]));
    assert_eq!(manifest.config.env, ["MODE=prod"]);
    assert_eq!(manifest.config.workdir, "/srv");
    assert_eq!(fs::read(dir.path().join("tree/srv/app/blob.bin")).unwrap(), random(5000, 7));
    let mode = fs::metadata(dir.path().join("tree/usr/local/bin/run")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);

    let stdout = text(&output.stdout);
    assert!(stdout.contains("Step 3/7 : COPY app ./app/"), "{stdout}");
    assert!(stdout.contains(&format!("sha256 {}", sha256_hex(&archive))), "{stdout}");
    assert!(stdout.contains(&format!("Uploaded part {} in", parts.len())), "{stdout}");
    assert!(stdout.contains(&format!("({} parts)", parts.len())), "{stdout}");
    assert!(stdout.contains("ignoring arguments not meant for this builder: builder-word"), "{stdout}");
    assert!(!stdout.contains("secret"), "presigned signatures must not be logged:\n{stdout}");
    build.assert_clean();
}

#[test]
fn the_same_build_twice_uploads_the_same_bytes() {
    let build = Build::new();
    let fake = FakeHttp::start(|_| Reply::status(200));
    let spec = json!({"snapshotUri": "s3://b/k",
                      "upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}});
    build.spec(DOCKERFILE, spec.clone());
    assert_eq!(build.run(None).status.code(), Some(0));
    // A fresh build directory: other paths, other mtimes.
    let again = Build::new();
    again.spec(DOCKERFILE, spec);
    assert_eq!(again.run(None).status.code(), Some(0));
    let bodies: Vec<Vec<u8>> = fake.requests().into_iter().map(|r| r.body).collect();
    assert_eq!(bodies.len(), 2);
    assert_eq!(sha256_hex(&bodies[0]), sha256_hex(&bodies[1]));
    assert_eq!(build.metadata()["sha256"], again.metadata()["sha256"]);
}

#[test]
fn a_failing_part_aborts_the_upload_and_fails_the_build() {
    let build = Build::new();
    let fake = store(Some(2), Reply::status(200));
    build.spec(DOCKERFILE, multipart_spec(&fake, 1024, 10));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("UploadPart part 2"), "{stderr}");
    assert!(stderr.contains("answered HTTP 500: <Error><Code>InternalError</Code><Message>disk on fire"), "{stderr}");
    assert!(stderr.contains("Aborted multipart upload u-1"), "{stderr}");
    assert!(!stderr.contains("secret"), "{stderr}");
    assert_eq!(stderr.lines().filter(|l| l.starts_with("error: ")).count(), 1, "{stderr}");
    let requests = fake.requests();
    let aborts: Vec<&Recorded> = requests.iter().filter(|r| r.method == "DELETE").collect();
    assert_eq!(aborts.len(), 1);
    assert!(aborts[0].target.contains("abort=1"));
    assert!(requests.iter().all(|r| r.method != "POST"), "no completion after a failed part");
    assert!(!build.metadata_path().exists());
    build.assert_clean();
}

#[test]
fn a_completion_error_document_aborts_the_upload() {
    let build = Build::new();
    let fake = store(None, Reply::status(200).with_body("<Error><Code>InvalidPart</Code></Error>"));
    build.spec(DOCKERFILE, multipart_spec(&fake, 4096, 10));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("CompleteMultipartUpload answered HTTP 200 with an error document"), "{stderr}");
    assert!(fake.requests().iter().any(|r| r.method == "DELETE"));
    assert!(!build.metadata_path().exists());
}

#[test]
fn an_archive_needing_more_parts_than_signed_fails_and_aborts() {
    let build = Build::new();
    let fake = store(None, Reply::status(200));
    build.spec(DOCKERFILE, multipart_spec(&fake, 1024, 2));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains("parts of 1024 bytes, but spec.upload has only 2 part URLs (maxParts 2)"), "{stderr}");
    let requests = fake.requests();
    assert!(requests.iter().all(|r| r.method != "PUT"), "nothing is uploaded");
    assert_eq!(requests.iter().filter(|r| r.method == "DELETE").count(), 1);
}

#[test]
fn single_put_sends_the_whole_archive_with_the_given_headers() {
    let build = Build::new();
    let fake = FakeHttp::start(|_| Reply::status(200).with_header("ETag", "\"whole\""));
    build.spec(
        DOCKERFILE,
        json!({"snapshotUri": "s3://bucket/legacy.tlsnap",
               "upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/bucket/legacy.tlsnap?X-Amz-Signature=zzz"),
                          "headers": {"x-amz-meta-build": "build-7", "content-type": "application/octet-stream"},
                          "expiresAt": "2030-01-01T00:00:00Z"}}),
    );
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let requests = fake.requests();
    assert_eq!(requests.len(), 1);
    let put = &requests[0];
    assert_eq!((put.method.as_str(), put.path()), ("PUT", "/bucket/legacy.tlsnap"));
    assert_eq!(put.header("x-amz-meta-build"), Some("build-7"));
    assert_eq!(put.header("content-type"), Some("application/octet-stream"));
    assert_eq!(put.header("content-length"), Some(put.body.len().to_string().as_str()));
    assert_eq!(put.header("transfer-encoding"), None);
    let metadata = build.metadata();
    assert_eq!(metadata["sha256"], sha256_hex(&put.body));
    assert_eq!(metadata["snapshot_size_bytes"], put.body.len());
    assert_eq!(metadata["snapshot_uri"], "s3://bucket/legacy.tlsnap");
    let (manifest, paths, _dir) = open_archive(&put.body);
    assert_eq!(manifest.node_kind, "base");
    assert_eq!(manifest.files as usize, paths.len());
    assert!(!text(&output.stdout).contains("zzz"));
}

/// A parent archive as an earlier base build would have uploaded it.
fn parent_archive() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let mut tree = Tree::create(dir.path().join("tree")).unwrap();
    tree.make_dirs("/srv/app").unwrap();
    fs::write(tree.host("srv/app/hello.txt"), "hello\n").unwrap();
    fs::set_permissions(tree.host("srv/app/hello.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(tree.host("srv/app/old.txt"), "old\n").unwrap();
    fs::set_permissions(tree.host("srv/app/old.txt"), fs::Permissions::from_mode(0o644)).unwrap();
    let mut config = ImageConfig { workdir: "/srv".into(), cmd: Some(vec!["/old".into()]), ..Default::default() };
    config.set_env("FROM_PARENT", "yes");
    let manifest = SnapshotManifest {
        format_version: FORMAT_VERSION.into(),
        snapshot_id: "snap-parent".into(),
        node_kind: "base".into(),
        parent_manifest_uri: None,
        config,
        files: 0,
    };
    let path = dir.path().join("parent.tar.zst");
    write_archive(&path, manifest, &tree, None).unwrap();
    fs::read(path).unwrap()
}

fn diff_spec(fake: &FakeHttp, sha256: &str) -> Value {
    json!({
        "rootfsNodeKind": "diff", "snapshotUri": "s3://bucket/child.tlsnap",
        "parent": {"parentManifestUri": "s3://bucket/parent.tlsnap", "rootfsDiskBytes": 10_485_760, "snapshotSha256": sha256,
                   "download": {"kind": "single_get", "uri": "s3://bucket/parent.tlsnap", "method": "GET",
                                "url": fake.url("/bucket/parent.tlsnap?X-Amz-Signature=getsecret"), "expiresAt": "x"}},
        "upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/bucket/child.tlsnap"), "headers": {}}
    })
}

fn parent_store(parent: Vec<u8>) -> FakeHttp {
    FakeHttp::start(move |request| match request.method.as_str() {
        "GET" if request.path() == "/bucket/parent.tlsnap" => Reply::status(200).with_body(parent.clone()),
        "PUT" => Reply::status(200),
        _ => Reply::status(404),
    })
}

#[test]
fn diff_build_downloads_checks_and_extends_the_parent() {
    let parent = parent_archive();
    let fake = parent_store(parent.clone());
    let build = Build::new();
    fs::write(build.path("context/app/new.txt"), "brand new\n").unwrap();
    let dockerfile = "FROM base-template\nCOPY app/hello.txt app/\nCOPY app/new.txt /srv/app/new.txt\nENV MODE=dev\n";
    build.spec(dockerfile, diff_spec(&fake, &sha256_hex(&parent)));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));
    let requests = fake.requests();
    assert_eq!(requests[0].method, "GET");
    let upload = requests.iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, dir) = open_archive(&upload.body);
    // hello.txt was copied again with the same content and mode: not in the layer.
    assert_eq!(paths, ["srv/app/new.txt"]);
    assert_eq!(fs::read_to_string(dir.path().join("tree/srv/app/new.txt")).unwrap(), "brand new\n");
    assert_eq!(manifest.node_kind, "diff");
    assert_eq!(manifest.parent_manifest_uri.as_deref(), Some("s3://bucket/parent.tlsnap"));
    assert_eq!(manifest.config.env, ["FROM_PARENT=yes", "MODE=dev"]);
    assert_eq!(manifest.config.workdir, "/srv");
    assert_eq!(manifest.config.cmd, Some(vec!["/old".to_owned()]));
    let metadata = build.metadata();
    assert_eq!(metadata["rootfs_node_kind"], "diff");
    assert_eq!(metadata["parent_manifest_uri"], "s3://bucket/parent.tlsnap");
    assert_eq!(metadata["sha256"], sha256_hex(&upload.body));
    assert!(!text(&output.stdout).contains("getsecret"));
}

#[test]
fn a_parent_with_the_wrong_sha256_fails_naming_both_hashes() {
    let parent = parent_archive();
    let fake = parent_store(parent.clone());
    let build = Build::new();
    let wrong = "0".repeat(64);
    build.spec("FROM base-template\nCOPY run.sh /run.sh\n", diff_spec(&fake, &wrong));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&wrong) && stderr.contains(&sha256_hex(&parent)), "{stderr}");
    assert!(fake.requests().iter().all(|r| r.method != "PUT"), "nothing is uploaded");
    assert!(!build.metadata_path().exists());
    build.assert_clean();
}

#[test]
fn a_parent_that_is_not_a_snapshot_archive_is_refused() {
    let junk = b"<html>not an archive</html>".to_vec();
    let fake = parent_store(junk.clone());
    let build = Build::new();
    build.spec("FROM base-template\n", diff_spec(&fake, &sha256_hex(&junk)));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains("the parent archive s3://bucket/parent.tlsnap is not a valid snapsign_tar_zstd_v1 snapshot"),
        "{stderr}"
    );
}

#[test]
fn a_diff_build_without_parent_download_says_what_is_missing() {
    let build = Build::new();
    build.spec(
        "FROM base-template\n",
        json!({"rootfsNodeKind": "diff", "parent": {"parentManifestUri": "s3://b/p"},
               "upload": {"kind": "single_put", "url": "http://127.0.0.1:9/x"}}),
    );
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.contains(
            "FROM base-template needs parent.download in spec.json (a diff build); the platform or client did not provide it"
        ),
        "{stderr}"
    );
}

#[test]
fn a_from_arg_default_builds_on_the_parent_it_names() {
    let parent = parent_archive();
    let fake = parent_store(parent.clone());
    let build = Build::new();
    fs::write(build.path("context/app/new.txt"), "brand new\n").unwrap();
    let mut spec = diff_spec(&fake, &sha256_hex(&parent));
    // What the client sends for this Dockerfile: the substituted name it looked up.
    spec["baseImage"] = json!("base-template");
    build.spec("ARG BASE=base-template\nFROM $BASE\nCOPY app/new.txt /srv/app/new.txt\n", spec);
    let output = build.run(None);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&output.stderr));
    assert!(stdout.contains("Parent snapshot s3://bucket/parent.tlsnap (FROM base-template)"), "{stdout}");
    assert!(!stdout.contains("spec.baseImage is"), "no mismatch note: {stdout}");
    let upload = fake.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, _dir) = open_archive(&upload.body);
    assert_eq!((manifest.node_kind.as_str(), paths.as_slice()), ("diff", &["srv/app/new.txt".to_owned()][..]));
}

#[test]
fn a_from_arg_without_a_value_fails_before_any_request_naming_it() {
    let build = Build::new();
    let fake = FakeHttp::start(|_| Reply::status(200));
    build.spec(
        "ARG BASE\nFROM $BASE\nCOPY run.sh /run.sh\n",
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
    );
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert!(
        stderr.starts_with("error: spec.dockerfile: Dockerfile line 2: FROM $BASE: ARG BASE has no value")
            && stderr.trim_end().ends_with("give it a default, e.g. ARG BASE=<template>"),
        "{stderr}"
    );
    assert!(fake.requests().is_empty());
    build.assert_clean();
}

#[test]
fn a_dockerfile_with_a_byte_order_mark_and_crlf_builds_the_same_archive() {
    let archive = |dockerfile: &str| {
        let build = Build::new();
        let fake = FakeHttp::start(|_| Reply::status(200));
        build.spec(
            dockerfile,
            json!({"upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
        );
        let output = build.run(None);
        assert_eq!(output.status.code(), Some(0), "{dockerfile:?}: {}", text(&output.stderr));
        fake.requests().into_iter().find(|r| r.method == "PUT").unwrap().body
    };
    let dos = format!("\u{feff}# built on Windows\n{}", DOCKERFILE.replace("COPY app ", "COPY \\\n  app "))
        .replace('\n', "\r\n");
    assert!(dos.starts_with('\u{feff}') && dos.contains("\\\r\n"), "{dos:?}");
    let plain = archive(DOCKERFILE);
    assert_eq!(archive(&dos), plain, "same tree, config and bytes");
    let (manifest, paths, _dir) = open_archive(&plain);
    assert_eq!(manifest.config.cmd, Some(vec!["/usr/local/bin/run".to_owned()]));
    assert!(paths.contains(&"srv/app/hello.txt".to_owned()), "{paths:?}");
}

/// A build whose context holds `rootfs/` (this machine's sh, bash, coreutils
/// and their libraries) and a store fake that takes a single PUT.
fn run_build(dockerfile: &str) -> (Build, FakeHttp, Output) {
    let build = Build::new();
    rootfs::write(&build.path("context/rootfs"));
    let fake = FakeHttp::start(|_| Reply::status(200));
    build.spec(
        dockerfile,
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
    );
    let output = build.run(None);
    (build, fake, output)
}

/// No process whose command line holds `marker` is left on this machine.
fn assert_no_process_with(marker: &str) {
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            assert!(!cmdline.contains(marker), "process {:?} outlived its RUN step: {cmdline}", entry.file_name());
        }
    }
}

#[test]
fn run_steps_use_env_args_workdir_and_shell_and_what_they_change_is_the_snapshot() {
    let dockerfile = "FROM scratch\nCOPY rootfs/ /\nARG GREETING=hi\nENV TARGET=/out\nWORKDIR /work\n\
        RUN mkdir -p $TARGET && echo \"$GREETING from $(pwd) as $(id -u):$(id -g) home $HOME\" > $TARGET/said \\\n\
            && echo visible-in-the-log\n\
        RUN [\"/bin/sh\", \"-c\", \"echo exec form > /out/exec\"]\n\
        SHELL [\"/bin/bash\", \"-c\"]\nRUN echo \"${BASH_VERSION:+bash}\" > /out/shell\n\
        RUN (sleep 3017 &) ; echo started in the background\n\
        RUN rm /bin/touch && echo /proc/[0-9]* > /out/pids\n";
    let (build, fake, output) = run_build(dockerfile);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&output.stderr));
    assert!(stdout.contains("\nvisible-in-the-log\n") && stdout.contains("Step 6/11 : RUN mkdir"), "{stdout}");
    // The background sleep ended with its step: the next step's build went on, and nothing is left.
    assert_no_process_with("sleep 3017");
    let put = fake.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, dir) = open_archive(&put.body);
    let read = |rel: &str| fs::read_to_string(dir.path().join("tree").join(rel)).unwrap();
    assert_eq!(read("out/said"), "hi from /work as 0:0 home /root\n");
    assert_eq!(read("out/exec"), "exec form\n");
    assert_eq!(read("out/shell"), "bash\n");
    // Each step has a pid namespace of its own: the shell is pid 1 and alone.
    assert_eq!(read("out/pids"), "/proc/1\n");
    assert!(paths.contains(&"bin/sh".to_owned()) && !paths.contains(&"bin/touch".to_owned()), "{paths:?}");
    // The step's /proc and /dev were mount points made for it, not part of the image.
    assert!(!paths.iter().any(|p| p == "proc" || p == "dev"), "{paths:?}");
    assert_eq!(manifest.config.env, ["TARGET=/out"]);
    build.assert_clean();
}

#[test]
fn a_failing_run_fails_the_build_naming_the_step_the_command_and_the_code() {
    let (build, fake, output) =
        run_build("FROM scratch\nCOPY rootfs/ /\nRUN echo about to fail; exit 3\nCOPY run.sh /\n");
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(
        stderr.trim(),
        "error: spec.dockerfile line 3: RUN echo about to fail; exit 3: step 3/4 failed: \
         the command \"/bin/sh -c echo about to fail; exit 3\" exited with code 3"
    );
    assert!(text(&output.stdout).contains("about to fail"));
    assert!(fake.requests().is_empty(), "nothing is uploaded");
    assert!(!build.metadata_path().exists());
    build.assert_clean();
    // A command that is not in the image says so, with the PATH it searched.
    let (_, _, output) = run_build("FROM scratch\nCOPY rootfs/ /\nRUN [\"make\", \"all\"]\n");
    let stderr = text(&output.stderr);
    assert!(stderr.contains("RUN: execute make: No such file or directory"), "{stderr}");
    assert!(stderr.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "{stderr}");
}

#[test]
fn a_run_step_cannot_read_the_spec_reach_the_store_see_the_builder_or_inherit_its_environment() {
    let build = Build::new();
    rootfs::write(&build.path("context/rootfs"));
    let fake = FakeHttp::start(|_| Reply::status(200));
    let store = fake.url("/").trim_end_matches('/').rsplit(':').next().unwrap().to_owned();
    let spec = build.path("spec.json");
    let dockerfile = format!(
        "FROM scratch\nCOPY rootfs/ /\nRUN mkdir /out\n\
         RUN if cat {spec} > /out/spec; then echo READ; else echo refused; fi > /out/spec-read\n\
         RUN if bash -c 'echo x > /dev/tcp/127.0.0.1/{store}'; then echo CONNECTED; else echo refused; fi > /out/store\n\
         RUN cat /proc/1/cmdline > /out/pid1; cat /proc/net/dev > /out/netdev; ls /proc/self/fd > /out/fds\n\
         RUN bash -c export > /out/env\n",
        spec = spec.display()
    );
    build.spec(
        &dockerfile,
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k?X-Amz-Signature=topsecret"), "headers": {}}}),
    );
    let output = Command::new(env!("CARGO_BIN_EXE_tl-rootfs-build"))
        .args(["--spec"])
        .arg(&spec)
        .arg("--metadata-out")
        .arg(build.metadata_path())
        .env("BUILDER_SECRET", "do-not-leak")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let requests = fake.requests();
    assert_eq!(requests.len(), 1, "only the builder's upload reached the store");
    let (_, _, dir) = open_archive(&requests[0].body);
    let read = |rel: &str| fs::read_to_string(dir.path().join("tree/out").join(rel)).unwrap();
    assert_eq!(read("spec-read"), "refused\n");
    assert_eq!(read("spec"), "", "nothing of spec.json was read");
    assert_eq!(read("store"), "refused\n");
    assert_eq!(
        read("pid1").replace('\0', " ").trim(),
        "/bin/sh -c cat /proc/1/cmdline > /out/pid1; cat /proc/net/dev > /out/netdev; ls /proc/self/fd > /out/fds"
    );
    let interfaces: Vec<String> = read("netdev")
        .lines()
        .filter_map(|l| l.split_once(':').map(|(name, _)| name.trim().to_owned()))
        .filter(|name| !name.contains('|'))
        .collect();
    assert_eq!(interfaces, ["lo"], "the step's network has only loopback");
    let fds: Vec<String> = read("fds").lines().map(str::to_owned).collect();
    // ls's own: 0, 1 (the file), 2 and 3 (the directory it lists); nothing the builder had open.
    assert_eq!(fds, ["0", "1", "2", "3"]);
    let env = read("env");
    assert!(!env.contains("BUILDER_SECRET") && !env.contains("topsecret"), "{env}");
    let names: Vec<&str> = env.lines().filter_map(|l| l.strip_prefix("declare -x ")?.split('=').next()).collect();
    assert_eq!(names, ["HOME", "HOSTNAME", "OLDPWD", "PATH", "PWD", "SHLVL"], "{env}");
}

#[test]
fn a_diff_build_records_what_run_deleted_as_whiteouts() {
    let (_, fake, output) = run_build(
        "FROM scratch\nCOPY rootfs/ /\nRUN mkdir -p /srv/data && echo keep > /srv/keep && echo x > /srv/data/x\n",
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let parent = fake.requests().into_iter().find(|r| r.method == "PUT").unwrap().body;
    let store = parent_store(parent.clone());
    let build = Build::new();
    build.spec(
        "FROM base-template\nRUN rm /etc/group && rm -r /srv/data && echo new > /srv/new\n",
        diff_spec(&store, &sha256_hex(&parent)),
    );
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));
    let put = store.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let mut raw = tar::Archive::new(zstd::Decoder::new(put.body.as_slice()).unwrap());
    let names: Vec<String> =
        raw.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_str().unwrap().to_owned()).collect();
    // Only the change: the new file, its directory (its mtime-free entry is unchanged, so not even that),
    // and a whiteout per deleted path whose directory is still there (not one per file below /srv/data).
    assert_eq!(names, ["snapshot.json", "rootfs/etc/.wh.group", "rootfs/srv/.wh.data", "rootfs/srv/new"]);
    // Unpacked over the parent, the layer deletes what RUN deleted.
    let dir = tempfile::tempdir().unwrap();
    let (parent_path, layer_path) = (dir.path().join("p.tar.zst"), dir.path().join("l.tar.zst"));
    fs::write(&parent_path, &parent).unwrap();
    fs::write(&layer_path, &put.body).unwrap();
    let mut tree = Tree::create(dir.path().join("tree")).unwrap();
    read_archive(&parent_path, Some(&mut tree)).unwrap();
    read_archive(&layer_path, Some(&mut tree)).unwrap();
    assert!(!tree.host("etc/group").exists() && !tree.host("srv/data").exists());
    assert_eq!(fs::read_to_string(tree.host("srv/keep")).unwrap(), "keep\n");
    assert_eq!(fs::read_to_string(tree.host("srv/new")).unwrap(), "new\n");
}

#[test]
fn exit_nonzero_fault_uploads_then_exits_3_without_metadata() {
    let build = Build::new();
    let fake = FakeHttp::start(|_| Reply::status(200));
    build.spec(
        DOCKERFILE,
        json!({"snapshotUri": "s3://b/k", "upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
    );
    let output = build.run(Some("exit_nonzero"));
    assert_eq!(output.status.code(), Some(3));
    assert!(text(&output.stderr).contains("injected fault: exit_nonzero"));
    assert_eq!(fake.requests().len(), 1, "the upload happened");
    assert!(!build.metadata_path().exists());
}

#[test]
fn metadata_faults_drop_a_field_and_replace_the_uri() {
    let build = Build::new();
    let fake = FakeHttp::start(|_| Reply::status(200));
    build.spec(
        DOCKERFILE,
        json!({"snapshotUri": "s3://b/k", "upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
    );
    let output = build.run(Some("metadata_missing:rootfs_disk_bytes,metadata_uri:s3://b/elsewhere"));
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let metadata = build.metadata();
    assert!(metadata.get("rootfs_disk_bytes").is_none());
    assert_eq!(metadata["snapshot_uri"], "s3://b/elsewhere");
    let output = build.run(Some("bogus"));
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn usage_errors_exit_2_and_help_exits_0() {
    let bin = env!("CARGO_BIN_EXE_tl-rootfs-build");
    let output = Command::new(bin).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).starts_with("error: missing --spec"));
    let output = Command::new(bin).arg("--help").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert!(text(&output.stdout).starts_with("usage: tl-rootfs-build"));
    let missing = Path::new("/nonexistent/spec.json");
    let output = Command::new(bin).arg("--spec").arg(missing).args(["--metadata-out", "/tmp/m.json"]).output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        text(&output.stderr).starts_with("error: read the spec /nonexistent/spec.json"),
        "{}",
        text(&output.stderr)
    );
}

#[test]
fn a_final_stage_copies_what_a_build_stage_ran_and_unneeded_stages_are_skipped() {
    let dockerfile = "FROM scratch AS build\nCOPY rootfs/ /\nRUN mkdir /out && echo built by RUN > /out/artifact\n\
                      FROM scratch AS unused\nCOPY run.sh /\nFROM scratch AS owned\nCOPY --chown=7:8 run.sh /owned.sh\n\
                      FROM scratch\nCOPY --from=build /out/artifact /app/artifact\nCOPY --from=0 /bin/sh /bin/\n\
                      COPY --from=owned /owned.sh /\n";
    let (build, fake, output) = run_build(dockerfile);
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&output.stderr));
    assert!(stdout.contains("Stage 1/3 : build (line 1)") && stdout.contains("Stage 3/3 : 3 (line 8)"), "{stdout}");
    assert!(stdout.contains("not needed by the final stage, so not built: stage unused (line 4)"), "{stdout}");
    let put = fake.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, dir) = open_archive(&put.body);
    assert_eq!(paths, ["app", "app/artifact", "bin", "bin/sh", "owned.sh"], "only what the final stage copied");
    assert_eq!(fs::read_to_string(dir.path().join("tree/app/artifact")).unwrap(), "built by RUN\n");
    let mut raw = tar::Archive::new(zstd::Decoder::new(put.body.as_slice()).unwrap());
    let owned = raw.entries().unwrap().map(|e| e.unwrap()).find(|e| e.path().unwrap().ends_with("owned.sh")).unwrap();
    assert_eq!((owned.header().uid().unwrap(), owned.header().gid().unwrap()), (7, 8), "COPY --from keeps owners");
    assert_eq!(manifest.node_kind, "base");
    build.assert_clean();
}

#[test]
fn copy_from_a_template_downloads_and_checks_it() {
    let image = parent_archive();
    let sha = sha256_hex(&image);
    let store = FakeHttp::start(move |request| match request.method.as_str() {
        "GET" if request.path() == "/bucket/tools.tlsnap" => Reply::status(200).with_body(image.clone()),
        "PUT" => Reply::status(200),
        _ => Reply::status(404),
    });
    let build = Build::new();
    let local = |sha256: &str| {
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": store.url("/b/k"), "headers": {}},
               "additionalLocalImages": [{"reference": "team/tools", "snapshotUri": "s3://bucket/tools.tlsnap",
                   "snapshotSha256": sha256,
                   "download": {"kind": "single_get", "method": "GET", "url": store.url("/bucket/tools.tlsnap?X-Amz-Signature=s")}}]})
    };
    build.spec("FROM scratch\nCOPY --from=team/tools /srv/app/hello.txt /hello\n", local(&sha));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));
    let put = store.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (_, paths, dir) = open_archive(&put.body);
    assert_eq!(paths, ["hello"]);
    assert_eq!(fs::read_to_string(dir.path().join("tree/hello")).unwrap(), "hello\n");

    // A wrong digest fails naming both; an image the spec does not carry is named.
    build.spec("FROM scratch\nCOPY --from=team/tools /srv/app/hello.txt /hello\n", local(&"0".repeat(64)));
    let stderr = text(&build.run(None).stderr);
    assert!(stderr.contains(&"0".repeat(64)) && stderr.contains(&sha), "{stderr}");
    build.spec("FROM scratch\nCOPY --from=other/img /x /x\n", local(&sha));
    let stderr = text(&build.run(None).stderr);
    assert!(
        stderr.contains("line 2: COPY --from=other/img /x /x: other/img is not among spec.additionalLocalImages"),
        "{stderr}"
    );
    build.assert_clean();
}

#[test]
fn a_base_build_from_an_image_the_platform_supplied_holds_the_whole_tree() {
    let image = parent_archive();
    let sha = sha256_hex(&image);
    let store = FakeHttp::start(move |request| match request.method.as_str() {
        "GET" if request.path() == "/bucket/imported.tlsnap" => Reply::status(200).with_body(image.clone()),
        "PUT" => Reply::status(200),
        _ => Reply::status(404),
    });
    let build = Build::new();
    build.spec(
        "FROM registry.example:5000/team/base:1.2\nCOPY app/new.txt /srv/app/new.txt\n",
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": store.url("/b/k"), "headers": {}},
               "additionalLocalImages": [{"reference": "registry.example:5000/team/base:1.2",
                   "snapshotUri": "s3://bucket/imported.tlsnap", "snapshotSha256": sha,
                   "download": {"kind": "single_get", "method": "GET", "url": store.url("/bucket/imported.tlsnap")}}]}),
    );
    fs::write(build.path("context/app/new.txt"), "new\n").unwrap();
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));
    let put = store.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, _dir) = open_archive(&put.body);
    assert_eq!(manifest.node_kind, "base");
    assert_eq!(paths, ["srv", "srv/app", "srv/app/hello.txt", "srv/app/new.txt", "srv/app/old.txt"], "all of it");
    assert_eq!(manifest.config.env, ["FROM_PARENT=yes"], "the image's config is kept");
}

#[test]
fn a_step_cannot_make_the_builder_hold_a_huge_line_or_block_on_a_fifo() {
    let build = Build::new();
    rootfs::write(&build.path("context/rootfs"));
    let fake = FakeHttp::start(|_| Reply::status(200));
    build.spec(
        "FROM scratch\nCOPY rootfs/ /\nRUN bash -c 'printf \"%0200000d\" 0'\n\
         RUN rm /etc/passwd && mkfifo /etc/passwd\nUSER 0\nRUN echo still running\n",
        json!({"upload": {"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}}}),
    );
    let child = Command::new(env!("CARGO_BIN_EXE_tl-rootfs-build"))
        .arg("--spec")
        .arg(build.path("spec.json"))
        .arg("--metadata-out")
        .arg(build.metadata_path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(child.wait_with_output().unwrap()));
    let Ok(output) = finished.recv_timeout(std::time::Duration::from_secs(60)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        panic!("the build blocked (on the fifo at /etc/passwd?)");
    };
    let stdout = text(&output.stdout);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{stdout}\nstderr:\n{}", text(&output.stderr));
    let zeros: Vec<usize> = stdout.lines().filter(|l| l.starts_with("000")).map(str::len).collect();
    assert_eq!(zeros, [65536, 65536, 65536, 3392], "the 200,000-byte line is printed in 64 KiB pieces");
    assert!(stdout.contains("\nstill running\n"), "{stdout}");
    assert!(
        stdout.contains("note: not kept in the snapshot (not a file, directory or symlink): /etc/passwd"),
        "{stdout}"
    );
}

/// A `docker save` archive: two layers, the second deleting `etc/motd` of the first.
fn docker_save_archive() -> Vec<u8> {
    let layer = |entries: &[(&str, &[u8])]| {
        let mut tar = tar::Builder::new(Vec::new());
        for (name, data) in entries {
            let mut header = tar::Header::new_gnu();
            header.set_mode(0o755);
            header.set_size(data.len() as u64);
            tar.append_data(&mut header, name, *data).unwrap();
        }
        tar.into_inner().unwrap()
    };
    let first = layer(&[("etc/motd", b"deleted by layer 2\n"), ("bin/tool", b"#!/bin/sh\n")]);
    let second = layer(&[("etc/.wh.motd", b""), ("etc/hello", b"hello\n")]);
    let config = json!({"architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin"], "Cmd": ["/bin/tool"], "WorkingDir": "/etc"},
        "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{}", sha256_hex(&first)), format!("sha256:{}", sha256_hex(&second))]}});
    let manifest =
        json!([{"Config": "config.json", "RepoTags": ["team/base:1"], "Layers": ["l1/layer.tar", "l2/layer.tar"]}]);
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in [
        ("manifest.json", serde_json::to_vec(&manifest).unwrap()),
        ("config.json", serde_json::to_vec(&config).unwrap()),
        ("l1/layer.tar", first),
        ("l2/layer.tar", second),
    ] {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        tar.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    tar.into_inner().unwrap()
}

#[test]
fn an_import_lays_out_a_docker_save_archive_from_the_context_with_its_whiteouts_and_config() {
    let build = Build::new();
    fs::write(build.path("context/image.tar"), docker_save_archive()).unwrap();
    let fake = FakeHttp::start(|_| Reply::status(200));
    let upload = json!({"kind": "single_put", "method": "PUT", "url": fake.url("/b/k"), "headers": {}});
    build.spec("FROM scratch\n", json!({"importImageReference": "context:image.tar", "upload": upload}));
    let output = build.run(None);
    assert_eq!(output.status.code(), Some(0), "stdout:\n{}\nstderr:\n{}", text(&output.stdout), text(&output.stderr));
    let put = fake.requests().into_iter().find(|r| r.method == "PUT").unwrap();
    let (manifest, paths, dir) = open_archive(&put.body);
    assert_eq!(paths, ["bin", "bin/tool", "etc", "etc/hello"], "etc/motd was whited out by the second layer");
    assert_eq!(fs::read_to_string(dir.path().join("tree/etc/hello")).unwrap(), "hello\n");
    assert_eq!((manifest.node_kind.as_str(), manifest.config.workdir.as_str()), ("base", "/etc"));
    assert_eq!(manifest.config.cmd, Some(vec!["/bin/tool".to_owned()]));

    // Only the context: a path climbing out of it, or a registry reference, is refused.
    for (reference, says) in [
        ("context:../spec.json", "must stay inside the build context"),
        ("docker.io/library/debian:12", "a registry image is imported by the platform at prepare"),
    ] {
        build.spec("FROM scratch\n", json!({"importImageReference": reference, "upload": upload}));
        let stderr = text(&build.run(None).stderr);
        assert!(stderr.contains(says), "{reference}: {stderr}");
    }
    build.assert_clean();
}

/// Linked as `gzip` first in PATH (as the builder sandbox has it), the
/// builder is what GNU tar's `tar -xzf` runs to decompress: it unpacks a
/// multi-member stream byte for byte, and any other use of `gzip` reaches
/// the system's gzip with the same arguments.
#[test]
fn linked_as_gzip_it_decodes_for_tar_xzf_and_hands_other_uses_to_the_system_gzip() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tl-rootfs-build"), bin.join("gzip")).unwrap();
    let random = random(3 << 20, 5);
    let lines: Vec<u8> = (0..50_000).flat_map(|i| format!("line {i} of the context\n").into_bytes()).collect();
    let mut tar = tar::Builder::new(Vec::new());
    for (name, data) in [("random.bin", &random), ("text.txt", &lines)] {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, data.as_slice()).unwrap();
    }
    let tar = tar.into_inner().unwrap();
    // Two gzip members, cut mid-entry, as concatenated gzip files are.
    let mut stream = Vec::new();
    for piece in [&tar[..tar.len() / 3], &tar[tar.len() / 3..]] {
        let mut member = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        member.write_all(piece).unwrap();
        stream.extend(member.finish().unwrap());
    }
    let archive = dir.path().join("context.tar.gz");
    fs::write(&archive, &stream).unwrap();
    let out = dir.path().join("out");
    fs::create_dir(&out).unwrap();
    let path = format!("{}:/usr/bin:/bin", bin.display());
    let status = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(&out).env("PATH", &path).status().unwrap();
    assert!(status.success());
    assert!(fs::read(out.join("random.bin")).unwrap() == random);
    assert!(fs::read(out.join("text.txt")).unwrap() == lines);

    // A corrupt stream fails tar (gzip exits 1 with the reason).
    let mut broken = stream.clone();
    let at = broken.len() - 6;
    broken[at] ^= 0xff;
    fs::write(&archive, &broken).unwrap();
    let failed = Command::new("tar").arg("-xzf").arg(&archive).arg("-C").arg(&out).env("PATH", &path).output().unwrap();
    assert!(!failed.status.success());
    assert!(text(&failed.stderr).contains("gzip: stdin:"), "{}", text(&failed.stderr));

    // Compressing is not ours: the system gzip does it, and its output decodes.
    let compressed = Command::new(bin.join("gzip"))
        .args(["-c", "-n"])
        .stdin(fs::File::open(out.join("text.txt")).unwrap())
        .output()
        .unwrap();
    assert!(compressed.status.success(), "{}", text(&compressed.stderr));
    let mut back = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(compressed.stdout.as_slice()), &mut back).unwrap();
    assert!(back == lines);
}
