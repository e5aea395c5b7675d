//! Files by in-sandbox path (wit/protocol.md §4.5), shared with the processes.

mod common;

use common::*;
use tokio::io::AsyncReadExt;

async fn read_to_string(sandbox: &snapsign_sandbox::Sandbox, path: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    sandbox.read_file(path).await?.read_to_string(&mut text).await?;
    Ok(text)
}

#[tokio::test(flavor = "multi_thread")]
async fn files_round_trip_between_the_api_and_processes() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-files").unwrap();
    let build = "/var/lib/tensorlake/rootfs-builder/build";
    run_ok(&sandbox, root_sh(&format!("mkdir -p {build} && chmod 0777 {build}"))).await;
    let spec = format!("{build}/spec.json");
    assert_eq!(sandbox.write_file(&spec, &b"{\"x\":1}\n"[..]).await.unwrap(), 8);
    assert_eq!(run_ok(&sandbox, sh(&format!("cat {spec}"))).await, ["{\"x\":1}"]);
    // The same file on the host.
    assert_eq!(std::fs::read_to_string(sandbox.host_path(&spec).unwrap()).unwrap(), "{\"x\":1}\n");

    let metadata = format!("{build}/metadata.json");
    run_ok(&sandbox, root_sh(&format!("echo '{{\"ok\":true}}' > {metadata}"))).await;
    assert_eq!(read_to_string(&sandbox, &metadata).await.unwrap(), "{\"ok\":true}\n");

    // Parents are created, and the sandbox user may then use them.
    let deep = "/home/a/b/c/context.tar.gz";
    let big = vec![7u8; 3 << 20];
    assert_eq!(sandbox.write_file(deep, &big[..]).await.unwrap(), big.len() as u64);
    let out = run_ok(&sandbox, sh(&format!("wc -c < {deep}; touch /home/a/b/mine && echo ok; rm {deep} && echo rm")));
    assert_eq!(out.await, [big.len().to_string(), "ok".into(), "rm".into()]);
    assert!(sandbox.read_file(deep).await.is_err());

    sandbox.write_file("/tmp/out.txt", &b"old contents, longer"[..]).await.unwrap();
    sandbox.write_file("/tmp/out.txt", &b"new"[..]).await.unwrap();
    assert_eq!(read_to_string(&sandbox, "/tmp/out.txt").await.unwrap(), "new");
    sandbox.delete_file("/tmp/out.txt").await.unwrap();
    let err = read_to_string(&sandbox, "/tmp/out.txt").await.unwrap_err();
    assert!(format!("{err:#}").contains("sandbox sbx-files: read file /tmp/out.txt"), "{err:#}");
    assert_eq!(run_ok(&sandbox, sh("ls -A /tmp")).await, Vec::<String>::new());
    assert!(sandbox.delete_file("/tmp/out.txt").await.is_err());
    assert!(sandbox.read_file("/tmp").await.is_err(), "an area is not a file");
    assert!(sandbox.read_file("/var/lib").await.is_err(), "a directory is not a file");
}

#[tokio::test(flavor = "multi_thread")]
async fn host_path_refuses_relative_dotted_and_outside_paths() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-paths").unwrap();
    let tmp = sandbox.host_path("/tmp/x/y").unwrap();
    assert!(tmp.starts_with(dir.path().join("sbx-paths")) && tmp.ends_with("tmp/x/y"), "{}", tmp.display());
    for bad in [
        "relative/x",
        "tmp/x",
        "/var/../etc/passwd",
        "/tmp/../../sbx-other/fs/tmp/x",
        "/var/./x",
        "/usr/bin/sh",
        "/etc/passwd",
        "/",
        "/proc/1/root",
    ] {
        let err = sandbox.host_path(bad).unwrap_err().to_string();
        assert!(err.contains("sandbox sbx-paths") && err.contains(bad), "{bad}: {err}");
        assert!(sandbox.write_file(bad, &b"x"[..]).await.is_err(), "{bad}");
        assert!(sandbox.read_file(bad).await.is_err(), "{bad}");
        assert!(sandbox.delete_file(bad).await.is_err(), "{bad}");
    }
    assert!(!dir.path().join("sbx-other").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn file_api_does_not_follow_a_sandbox_symlink_to_the_host() {
    let dir = scratch();
    let outside = scratch();
    let target = outside.path().join("host-file");
    std::fs::write(&target, "host contents").unwrap();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-links").unwrap();
    let host = outside.path().display();
    run_ok(&sandbox, sh(&format!("ln -s {host}/host-file /tmp/file; ln -s {host} /tmp/dir; ln -s ../../.. /tmp/up")))
        .await;
    for path in ["/tmp/file", "/tmp/dir/host-file", "/tmp/up/etc/hostname"] {
        let err = sandbox.read_file(path).await.unwrap_err();
        assert!(format!("{err:#}").contains("leads out of the sandbox"), "{path}: {err:#}");
    }
    assert!(sandbox.write_file("/tmp/file", &b"changed"[..]).await.is_err());
    assert!(sandbox.write_file("/tmp/dir/new", &b"new"[..]).await.is_err());
    assert!(sandbox.write_file("/tmp/dir/sub/new", &b"new"[..]).await.is_err());
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "host contents");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 1);
    // Deleting the link deletes the link.
    sandbox.delete_file("/tmp/file").await.unwrap();
    assert!(target.exists());
}
