//! Real processes in real bubblewrap sandboxes.

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use snapsign_sandbox::{Confinement, ProcessSpec, Sandboxes, SandboxesConfig};

fn sandboxes(root: &std::path::Path, builder: Option<std::path::PathBuf>) -> Sandboxes {
    let confinement = Confinement::detect(false).expect("these tests need bubblewrap (apt-get install bubblewrap)");
    Sandboxes::new(SandboxesConfig { root_dir: root.to_owned(), confinement, builder_binary: builder }).unwrap()
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec { command: "/bin/sh".into(), args: vec!["-c".into(), script.into()], ..Default::default() }
}

fn root_sh(script: &str) -> ProcessSpec {
    ProcessSpec { user: Some("root".into()), ..sh(script) }
}

async fn run(sandbox: &snapsign_sandbox::Sandbox, spec: ProcessSpec) -> (Vec<String>, snapsign_sandbox::ProcessInfo) {
    let info = sandbox.start(spec).unwrap();
    let lines = tokio::time::timeout(Duration::from_secs(30), sandbox.follow(info.pid).unwrap().collect::<Vec<_>>())
        .await
        .expect("process output ends in time");
    let done = sandbox.wait(info.pid).await.unwrap();
    (lines.into_iter().map(|e| format!("{}:{}", e.stream, e.line)).collect(), done)
}

#[tokio::test(flavor = "multi_thread")]
async fn output_exit_codes_signals_and_replaying_follow() {
    let dir = tempfile::tempdir().unwrap();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-out").unwrap();
    let (lines, info) = run(&sandbox, sh("echo one; echo two >&2; echo three; exit 3")).await;
    assert_eq!(info.exit_code, Some(3));
    assert_eq!(info.status, "exited");
    assert!(lines.contains(&"stdout:one".into()) && lines.contains(&"stderr:two".into()), "{lines:?}");
    let out: Vec<&String> = lines.iter().filter(|l| l.starts_with("stdout")).collect();
    assert_eq!(out, ["stdout:one", "stdout:three"]);
    // Following again after exit replays everything.
    let again: Vec<String> =
        sandbox.follow(info.pid).unwrap().map(|e| format!("{}:{}", e.stream, e.line)).collect().await;
    assert_eq!(again, lines);

    let (_, ok) = run(&sandbox, sh("true")).await;
    assert_eq!((ok.exit_code, ok.status.as_str()), (Some(0), "exited"));

    // A follower attached mid-run gets earlier lines, then live ones; two followers agree.
    let live = sandbox.start(sh("echo early; sleep 0.5; echo late")).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (a, b) = tokio::join!(
        sandbox.follow(live.pid).unwrap().map(|e| e.line).collect::<Vec<_>>(),
        sandbox.follow(live.pid).unwrap().map(|e| e.line).collect::<Vec<_>>()
    );
    assert_eq!(a, ["early", "late"]);
    assert_eq!(a, b);

    let sleeper = sandbox.start(sh("sleep 100")).unwrap();
    sandbox.kill(sleeper.pid, 15, false).unwrap();
    let killed = sandbox.wait(sleeper.pid).await.unwrap();
    assert_eq!((killed.status.as_str(), killed.signal, killed.exit_code), ("signaled", Some(15), None));
    let oom = sandbox.start(sh("sleep 100")).unwrap();
    sandbox.kill(oom.pid, 9, true).unwrap();
    let oom = sandbox.wait(oom.pid).await.unwrap();
    assert_eq!((oom.status.as_str(), oom.oom_killed), ("oom_killed", true));

    let listed = sandbox.list();
    assert_eq!(listed.len(), 5, "exited processes stay listed");
    assert_eq!(listed[0].command, "/bin/sh");
    assert_eq!(listed[0].args, ["-c", "echo one; echo two >&2; echo three; exit 3"]);
    assert!(boxes.delete("sbx-out").await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn files_round_trip_between_the_api_and_processes() {
    let dir = tempfile::tempdir().unwrap();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-files").unwrap();
    let (_, made) = run(
        &sandbox,
        root_sh(
            "mkdir -p /var/lib/tensorlake/rootfs-builder/build && chmod 0777 /var/lib/tensorlake/rootfs-builder/build",
        ),
    )
    .await;
    assert_eq!(made.exit_code, Some(0));
    let path = "/var/lib/tensorlake/rootfs-builder/build/spec.json";
    let written = sandbox.write_file(path, &b"{\"x\":1}\n"[..]).await.unwrap();
    assert_eq!(written, 8);
    let (lines, info) = run(&sandbox, sh(&format!("cat {path}; echo made > /tmp/out.txt"))).await;
    assert_eq!(info.exit_code, Some(0));
    assert_eq!(lines, ["stdout:{\"x\":1}"]);
    let mut out = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut sandbox.read_file("/tmp/out.txt").await.unwrap(), &mut out)
        .await
        .unwrap();
    assert_eq!(out, "made\n");
    sandbox.delete_file("/tmp/out.txt").await.unwrap();
    assert!(sandbox.read_file("/tmp/out.txt").await.is_err());
    for bad in ["relative/x", "/var/../etc/passwd", "/usr/bin/sh", "/etc/passwd", "/var/./x"] {
        assert!(sandbox.host_path(bad).is_err(), "{bad}");
    }
    let (ids, _) = run(&sandbox, root_sh("id -u")).await;
    assert_eq!(ids, ["stdout:0"]);
    let (ids, _) = run(&sandbox, sh("id -u")).await;
    assert_eq!(ids, [format!("stdout:{}", snapsign_sandbox::SANDBOX_UID)]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_cannot_write_outside_its_sandbox_nor_read_another() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let boxes = sandboxes(dir.path(), None);
    let a = boxes.create("sbx-a").unwrap();
    let b = boxes.create("sbx-b").unwrap();
    let (_, wrote) = run(&a, root_sh("echo secret-a > /tmp/secret && echo secret-a > /var/x")).await;
    assert_eq!(wrote.exit_code, Some(0));

    let target = outside.path().join("escape");
    let b_dir = dir.path().join("sbx-b/fs/tmp/planted");
    let script = format!(
        "touch /usr/x; touch /etc/x; touch {}; touch {}; touch /x; cat /tmp/secret; cat /var/x; ls {}; exit 0",
        target.display(),
        b_dir.display(),
        dir.path().display()
    );
    let (lines, _) = run(&b, root_sh(&script)).await;
    assert!(!lines.iter().any(|l| l.contains("secret-a")), "sandbox b read a's files: {lines:?}");
    assert!(!target.exists(), "wrote outside its sandbox");
    assert!(!b_dir.exists(), "reached its own host directory by host path");
    assert!(!std::path::Path::new("/usr/x").exists() && !std::path::Path::new("/etc/x").exists());
    assert!(lines.iter().filter(|l| l.starts_with("stderr:")).count() >= 5, "each attempt failed: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builder_binary_runs_inside_and_delete_kills_and_removes() {
    let dir = tempfile::tempdir().unwrap();
    let tool = dir.path().join("fake-builder.sh");
    std::fs::write(&tool, "#!/bin/sh\necho builder-ran \"$@\"\n").unwrap();
    std::os::unix::fs::PermissionsExt::set_mode(&mut std::fs::metadata(&tool).unwrap().permissions(), 0o755);
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let boxes = sandboxes(&dir.path().join("boxes"), Some(tool));
    let sandbox = boxes.create("sbx-builder").unwrap();
    let spec = ProcessSpec {
        command: "tl-rootfs-build".into(),
        args: vec!["--spec".into(), "x".into()],
        env: BTreeMap::from([("MARK".into(), "1".into())]),
        user: Some("root".into()),
        working_dir: Some("/tmp".into()),
    };
    let (lines, info) = run(&sandbox, spec).await;
    assert_eq!(info.exit_code, Some(0), "{lines:?}");
    assert_eq!(lines, ["stdout:builder-ran --spec x"]);

    let long = sandbox.start(sh("sleep 1000")).unwrap();
    let host_dir = dir.path().join("boxes/sbx-builder");
    assert!(host_dir.exists());
    tokio::time::timeout(Duration::from_secs(20), boxes.delete("sbx-builder")).await.unwrap().unwrap();
    assert!(!host_dir.exists());
    assert_eq!(sandbox.process(long.pid).unwrap().status, "signaled");
    assert!(!boxes.delete("sbx-builder").await.unwrap());
    assert!(boxes.create("Bad_Id").is_err());
}
