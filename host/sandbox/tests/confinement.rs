//! What a sandboxed process can and cannot reach.

mod common;

use std::path::Path;

use common::*;
use snapsign_sandbox::ProcessSpec;

#[tokio::test(flavor = "multi_thread")]
async fn a_process_cannot_write_outside_its_sandbox() {
    let dir = scratch();
    let outside = scratch();
    let boxes = sandboxes(dir.path(), None);
    let a = boxes.create("sbx-a").unwrap();
    let b = boxes.create("sbx-b").unwrap();
    let host_target = outside.path().join("escape");
    let b_host_dir = b.host_path("/tmp").unwrap();
    let attempts = [
        "touch /usr/x".to_owned(),
        "touch /etc/x".to_owned(),
        "touch /x".to_owned(),
        "touch /usr/local/bin/x".to_owned(),
        format!("touch {}", host_target.display()),
        format!("mkdir -p {0} && touch {0}/planted", b_host_dir.display()),
        format!("touch {}/planted", dir.path().display()),
        // Root in the sandbox cannot undo its mounts either.
        "mount -o remount,bind,rw /usr && touch /usr/x".to_owned(),
        "umount /usr && touch /usr/x".to_owned(),
        "mount -t tmpfs none /usr && touch /usr/x".to_owned(),
    ];
    // A host path under /tmp, /var, /root or /home (where a checkout may live)
    // names the sandbox's own area inside, so writing there may succeed
    // harmlessly; the host-side checks below are what prove nothing escaped.
    let private =
        |attempt: &str| ["/tmp/", "/var/", "/root/", "/home/"].iter().any(|area| attempt.contains(&format!(" {area}")));
    for user in [root_sh as fn(&str) -> ProcessSpec, sh] {
        for attempt in &attempts {
            let (lines, info) = run(&a, user(attempt)).await;
            if !private(attempt) {
                assert_ne!(info.exit_code, Some(0), "{attempt} succeeded: {lines:?}");
            }
        }
    }
    assert!(!Path::new("/usr/x").exists() && !Path::new("/etc/x").exists() && !Path::new("/x").exists());
    assert!(!host_target.exists());
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    assert_eq!(std::fs::read_dir(&b_host_dir).unwrap().count(), 0, "wrote into another sandbox");
    assert!(!dir.path().join("planted").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_cannot_read_another_sandbox_nor_see_the_host_directories() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let a = boxes.create("sbx-a").unwrap();
    let b = boxes.create("sbx-b").unwrap();
    run_ok(&a, root_sh("echo secret-a > /tmp/secret && echo secret-a > /var/x && echo secret-a > /root/x")).await;
    assert_eq!(run_ok(&a, sh("cat /tmp/secret")).await, ["secret-a"]);

    let a_dir = a.dir().display().to_string();
    let script = format!(
        "cat /tmp/secret /var/x /root/x; ls {a_dir} {root}; cat {a_dir}/fs/tmp/secret; ls /; find / -xdev -name secret; exit 0",
        root = dir.path().display()
    );
    for spec in [root_sh(&script), sh(&script)] {
        let (lines, _) = run(&b, spec).await;
        assert!(!lines.iter().any(|l| l.contains("secret-a")), "sandbox b read a's files: {lines:?}");
        let listing: Vec<&str> = lines.iter().filter_map(|l| l.strip_prefix("stdout:")).collect();
        assert!(!listing.iter().any(|l| l.contains("sbx-a") || l.contains("fs")), "{listing:?}");
        assert!(lines.iter().filter(|l| l.starts_with("stderr:")).count() >= 6, "each read failed: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn root_is_uid_0_and_the_sandbox_user_is_not() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-ids").unwrap();
    assert_eq!(run_ok(&sandbox, root_sh("id -u; id -g")).await, ["0", "0"]);
    let user = run_ok(&sandbox, sh("id -u; id -g")).await;
    assert_eq!(user, [snapsign_sandbox::SANDBOX_UID.to_string(), snapsign_sandbox::SANDBOX_UID.to_string()]);
    assert_ne!(user[0], "0");
    assert_eq!(run_ok(&sandbox, sh("hostname")).await, ["sbx-ids"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_root_is_not_host_root() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-root").unwrap();
    run_ok(&sandbox, root_sh("touch /tmp/made-by-root")).await;
    let owner = std::os::unix::fs::MetadataExt::uid(
        &std::fs::metadata(sandbox.host_path("/tmp/made-by-root").unwrap()).unwrap(),
    );
    // Sandbox root is a host uid of the sandbox's own range as root; rootless,
    // the user's own uid. Never host root.
    let root = sandbox.host_uid(0).unwrap();
    assert_eq!(owner, root, "files of sandbox root belong to the sandbox's own host uid");
    assert_ne!(root, 0);
    if host_is_root() {
        assert!(root >= snapsign_sandbox::FIRST_HOST_UID, "{root}");
    } else {
        assert_eq!(root, my_uid(), "rootless, sandbox root is this user");
    }
    // It owns nothing of the host: not the device nodes it sees, not /etc/shadow.
    let probes = "chmod 666 /dev/null && echo CHMOD; head -c1 /etc/shadow >/dev/null && echo SHADOW; \
                  unshare -U true && echo USERNS; echo done";
    let (lines, _) = run(&sandbox, root_sh(probes)).await;
    assert!(lines.contains(&"stdout:done".to_owned()), "{lines:?}");
    assert!(!lines.contains(&"stdout:CHMOD".to_owned()), "changed a host device node: {lines:?}");
    assert!(!lines.contains(&"stdout:USERNS".to_owned()), "made a user namespace: {lines:?}");
    if Path::new("/etc/shadow").exists() {
        assert!(!lines.contains(&"stdout:SHADOW".to_owned()), "read the host's /etc/shadow: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_host_environment_does_not_leak_into_the_sandbox() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-env").unwrap();
    // Every /proc/*/environ of the sandbox: its pid 1's included.
    let lines = run_ok(&sandbox, root_sh("cat /proc/[0-9]*/environ | tr '\\0' '\\n' | cut -d= -f1 | sort -u")).await;
    let host: Vec<String> =
        std::env::vars().map(|(k, _)| k).filter(|k| k != "PATH" && k != "HOME" && k != "PWD").collect();
    assert!(!host.is_empty());
    for name in &lines {
        assert!(!host.contains(name), "host variable {name} is visible in the sandbox: {lines:?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_builder_binary_runs_inside_from_usr_local_bin() {
    let dir = scratch();
    let tool = dir.path().join("fake-builder.sh");
    std::fs::write(&tool, "#!/bin/sh\necho builder-ran \"$@\"; id -u\n").unwrap();
    // Owner-only: the sandboxes get a copy they may execute.
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let boxes = sandboxes(&dir.path().join("boxes"), Some(tool.clone()));
    let sandbox = boxes.create("sbx-builder").unwrap();
    let help = ProcessSpec {
        command: snapsign_sandbox::BUILDER_PATH.into(),
        args: vec!["--help".into()],
        ..Default::default()
    };
    assert_eq!(run_ok(&sandbox, help).await, ["builder-ran --help", "1000"]);
    let spec = ProcessSpec {
        command: "tl-rootfs-build".into(),
        args: vec!["--spec".into(), "x".into()],
        user: Some("root".into()),
        working_dir: Some("/tmp".into()),
        ..Default::default()
    };
    assert_eq!(run_ok(&sandbox, spec).await, ["builder-ran --spec x", "0"]);
    let (_, replaced) = run(&sandbox, root_sh("echo evil > /usr/local/bin/tl-rootfs-build")).await;
    assert_ne!(replaced.exit_code, Some(0));
    assert!(std::fs::read_to_string(&tool).unwrap().contains("builder-ran"));

    // A world-executable builder works the same.
    std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let boxes = sandboxes(&dir.path().join("boxes2"), Some(tool));
    let sandbox = boxes.create("sbx-builder").unwrap();
    let help = ProcessSpec {
        command: snapsign_sandbox::BUILDER_PATH.into(),
        args: vec!["--help".into()],
        ..Default::default()
    };
    assert_eq!(run_ok(&sandbox, help).await, ["builder-ran --help", "1000"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_kills_every_process_and_removes_the_directory() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-del").unwrap();
    // A long sleep, and one left running in the background of an exited shell.
    // Unique to this test run, so that concurrent runs do not see each other's.
    let marker = format!("sleep 1000.{}", std::process::id());
    let long = sandbox.start(sh(&format!("{marker}1"))).unwrap();
    let background = sandbox.start(root_sh(&format!("{marker}2 & echo started; wait"))).unwrap();
    use futures_util::StreamExt;
    assert_eq!(within(sandbox.follow(background.pid).unwrap().next()).await.unwrap().line, "started");
    eventually("both sleeps run", || host_processes_with(&marker).len() == 2).await;
    let host_dir = sandbox.dir().to_owned();
    assert!(host_dir.exists());

    assert!(within(boxes.delete("sbx-del")).await.unwrap());
    assert!(!host_dir.exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "nothing left in root_dir");
    assert_eq!(sandbox.process(long.pid).unwrap().status, "signaled");
    assert_eq!(host_processes_with(&marker), Vec::<String>::new());
    assert!(boxes.get("sbx-del").is_none());
    assert!(sandbox.start(sh("true")).unwrap_err().to_string().contains("being deleted"));
    assert!(!within(boxes.delete("sbx-del")).await.unwrap());

    // The id is free again, with a fresh directory.
    let again = boxes.create("sbx-del").unwrap();
    assert_eq!(run_ok(&again, sh("ls -A /tmp /var")).await, ["/tmp:", "", "/var:"]);
    assert!(boxes.create("sbx-del").unwrap_err().to_string().contains("already exists"));
    assert!(boxes.create("Bad_Id").unwrap_err().to_string().contains("'Bad_Id'"));
}

/// Where user namespaces are refused (here: `user.max_user_namespaces` is 0
/// in the user namespace this test re-runs itself in, as an ordinary uid),
/// detection fails with an error naming the setting and the command that
/// enables it, then root and --allow-unconfined. This test runs itself
/// again inside that namespace (`SNAPSIGN_REFUSAL_CHILD`), where it checks
/// the error; outside, it makes the namespace and checks the child's verdict.
#[test]
fn refused_user_namespaces_give_an_error_naming_the_setting_and_the_command() {
    if std::env::var_os("SNAPSIGN_REFUSAL_CHILD").is_some() {
        // SAFETY: geteuid cannot fail.
        assert_ne!(unsafe { libc::geteuid() }, 0, "the child runs as an ordinary uid");
        assert_eq!(
            snapsign_sandbox::probe_user_namespaces(),
            snapsign_sandbox::UsernsProbe::CloneRefused(libc::ENOSPC)
        );
        let err = snapsign_sandbox::Confinement::detect(false).unwrap_err().to_string();
        for needle in [
            "user.max_user_namespaces = 0",
            "sudo sysctl -w user.max_user_namespaces=",
            "run as root",
            "--allow-unconfined",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        println!("REFUSAL: {err}");
        assert_eq!(snapsign_sandbox::Confinement::detect(true).unwrap(), snapsign_sandbox::Confinement::Unconfined);
        return;
    }
    // The child: a user namespace of its own where this uid is 1000 and no
    // further user namespace may be made; made in pre_exec from prepared bytes.
    let uid_map = format!("1000 {} 1\n", my_uid()).into_bytes();
    // SAFETY: getegid cannot fail.
    let gid_map = format!("1000 {} 1\n", unsafe { libc::getegid() }).into_bytes();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", "refused_user_namespaces_give_an_error_naming_the_setting_and_the_command", "--nocapture"])
        .env("SNAPSIGN_REFUSAL_CHILD", "1");
    let write = |path: &std::ffi::CStr, bytes: &[u8]| -> bool {
        // SAFETY: open/write/close on a NUL-terminated path and a live slice.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY);
            let ok = fd >= 0 && libc::write(fd, bytes.as_ptr().cast(), bytes.len()) == bytes.len() as isize;
            libc::close(fd);
            ok
        }
    };
    // SAFETY: the closure makes system calls on data prepared before the fork.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, move || {
            if libc::unshare(libc::CLONE_NEWUSER) != 0
                || !write(c"/proc/self/setgroups", b"deny")
                || !write(c"/proc/self/uid_map", &uid_map)
                || !write(c"/proc/self/gid_map", &gid_map)
                || !write(c"/proc/sys/user/max_user_namespaces", b"0")
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    let out = child.output().expect("run this test again in a user namespace without user namespaces");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("REFUSAL: ") && stdout.contains("1 passed"), "{stdout}");
    println!("{}", stdout.lines().find(|l| l.starts_with("REFUSAL: ")).unwrap_or_default());
}

/// A file of the host user that runs the sandboxes (rootless: the very uid
/// of sandbox root) is out of reach: not by its path, not through pid 1's
/// root or descriptors, not by entering pid 1's namespaces.
#[tokio::test(flavor = "multi_thread")]
async fn the_host_users_own_files_are_out_of_reach() {
    let dir = scratch();
    let outside = scratch();
    let secret = outside.path().join("host-secret");
    std::fs::write(&secret, "host-secret-contents\n").unwrap();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-reach").unwrap();
    let path = secret.display();
    let script = format!(
        "cat {path}; cat /proc/1/root{path}; ls /proc/1/fd /proc/1/root; nsenter -t 1 -m cat {path}; \
         cat /proc/1/environ; echo x >> {path}; exit 0"
    );
    for spec in [root_sh(&script), sh(&script)] {
        let (lines, _) = run(&sandbox, spec).await;
        assert!(!lines.iter().any(|l| l.contains("host-secret-contents")), "{lines:?}");
        assert!(lines.iter().filter(|l| l.starts_with("stderr:")).count() >= 6, "each attempt failed: {lines:?}");
    }
    assert_eq!(std::fs::read_to_string(&secret).unwrap(), "host-secret-contents\n");
}
