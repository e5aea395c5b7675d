//! Limits, identities, descriptors and the network of a sandbox, tried from
//! inside by real processes.

mod common;

use std::io::{Read, Write};
use std::time::Duration;

use common::*;
use snapsign_sandbox::{
    Limits, Network, ProcessSpec, RootlessIds, SANDBOX_UID, SUBORDINATE_IDS, SandboxSpec, Sandboxes,
};

fn spec(limits: Limits) -> SandboxSpec {
    SandboxSpec { limits, ..SandboxSpec::default() }
}

fn bash(script: &str) -> ProcessSpec {
    ProcessSpec { command: "/bin/bash".into(), args: vec!["-c".into(), script.into()], ..Default::default() }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_process_has_only_descriptors_0_1_and_2() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    // Descriptors this test process holds without close-on-exec must not reach the sandbox either.
    let leaked = std::fs::File::open("/etc/hostname").unwrap();
    // SAFETY: fcntl on a descriptor we own, clearing FD_CLOEXEC.
    unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&leaked), libc::F_SETFD, 0) };
    let sandbox = boxes.create("sbx-fds").unwrap();
    for spec in [sh("ls /proc/$$/fd"), root_sh("ls /proc/$$/fd")] {
        assert_eq!(run_ok(&sandbox, spec).await, ["0", "1", "2"]);
    }
    // pid 1 of the sandbox (a copy of this process) holds nothing of the host either.
    let lines = run_ok(&sandbox, root_sh("ls /proc/1/fd 2>/dev/null | wc -l; tr '\\0' ' ' < /proc/1/cmdline")).await;
    assert_eq!(lines[0], "0", "pid 1 has (or shows) descriptors: {lines:?}");
    assert_eq!(lines[1].trim(), "snapsign-sandbox-init", "pid 1 shows the host's command line: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_user_cannot_write_roots_files_and_as_root_sandboxes_share_no_uid() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let a = boxes.create("sbx-uid-a").unwrap();
    let b = boxes.create("sbx-uid-b").unwrap();
    run_ok(&a, root_sh("echo root-secret > /var/secret && chmod 0600 /var/secret && echo open > /tmp/shared")).await;
    let (lines, info) =
        run(&a, sh("echo tampered > /var/secret; cat /var/secret; rm -f /var/secret; echo x >> /tmp/shared")).await;
    assert_ne!(info.exit_code, Some(0), "{lines:?}");
    assert!(
        lines.iter().filter(|l| l.contains("Permission denied") || l.contains("Operation not permitted")).count() >= 3,
        "{lines:?}"
    );
    assert_eq!(run_ok(&a, root_sh("cat /var/secret /tmp/shared")).await, ["root-secret", "open"]);

    let (root_a, user_a) = (a.host_uid(0).unwrap(), a.host_uid(snapsign_sandbox::SANDBOX_UID).unwrap());
    let (root_b, user_b) = (b.host_uid(0).unwrap(), b.host_uid(snapsign_sandbox::SANDBOX_UID).unwrap());
    assert_ne!(root_a, user_a, "sandbox root and the sandbox user are different host uids");
    let meta = std::fs::metadata(a.host_path("/var/secret").unwrap()).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), root_a);
    if !host_is_root() {
        return rootless_identities(&a, &b, &boxes).await;
    }
    let range_b = root_b..root_b + snapsign_sandbox::UIDS_PER_SANDBOX;
    assert!(!range_b.contains(&root_a) && !range_b.contains(&user_a), "a's uids fall in b's range");
    assert_ne!(user_a, user_b);
    // Inside b, a's root is nobody: b's root cannot even map it.
    let lines = run_ok(&b, root_sh(&format!("cat /proc/self/uid_map; chown {root_a} /tmp 2>&1 || echo refused"))).await;
    assert!(lines[0].split_whitespace().eq(["0", &root_b.to_string(), "65536"]), "{lines:?}");
    assert_eq!(lines.last().map(String::as_str), Some("refused"), "{lines:?}");
}

/// Rootless with subordinate ids (one uid: `tests/identities.rs`): sandbox
/// root is this user, uids 1..65535 a block of its subordinate ids. With two
/// blocks or more (CI gives its user 32) each sandbox holds its own; with
/// one, every sandbox of this user shares it (what that gives up:
/// `docs/sandbox-modes.md`). Either way sandboxes are kept apart by their
/// mount trees and namespaces.
async fn rootless_identities(a: &snapsign_sandbox::Sandbox, b: &snapsign_sandbox::Sandbox, boxes: &Sandboxes) {
    let me = my_uid();
    for sandbox in [a, b] {
        assert_eq!(sandbox.host_uid(0), Some(me));
    }
    let (user_a, user_b) = (a.host_uid(SANDBOX_UID).unwrap(), b.host_uid(SANDBOX_UID).unwrap());
    let Some(RootlessIds::Subordinate { ranges, .. }) = boxes.rootless_ids() else {
        panic!("rootless with subordinate ids expected: {:?}", boxes.rootless_ids())
    };
    if *ranges > 1 {
        // Blocks apart: no uid of a (1..65535) is a uid of b.
        let block_b = b.host_uid(1).unwrap()..=b.host_uid(SUBORDINATE_IDS).unwrap();
        for inside in [1, SANDBOX_UID, 4242, SUBORDINATE_IDS] {
            assert!(!block_b.contains(&a.host_uid(inside).unwrap()), "a's uid {inside} is in b's block {block_b:?}");
        }
        // What a's user makes is owned on the host by a uid no process of b can have.
        run_ok(a, sh("echo user-a-secret > /tmp/mine && chmod 0600 /tmp/mine")).await;
        assert_eq!(owner(&a.host_path("/tmp/mine").unwrap()).0, user_a);
        assert_ne!(user_a, user_b, "each sandbox's user is its own host uid");
        assert!(a.enforcement().identities.contains("this sandbox's own"), "{:?}", a.enforcement());
    } else {
        assert_eq!(user_b, user_a, "the sandboxes share the one block");
    }
    // Root maps itself and a block, nothing else.
    let lines = run_ok(a, root_sh("cat /proc/self/uid_map")).await;
    let map: Vec<Vec<&str>> = lines.iter().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(map, [vec!["0", "0", "1"], vec!["1", "1", "65535"]], "{lines:?}");
    // Kept apart anyway: b cannot reach a's files, they are not in its mount tree.
    let (lines, _) = run(b, root_sh(&format!("cat /var/secret {}/fs/var/secret; exit 0", a.dir().display()))).await;
    assert!(!lines.iter().any(|l| l.contains("root-secret")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fork_bomb_stops_at_the_process_limit() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create_with("sbx-forks", spec(Limits { pids: 40, ..Limits::default() })).unwrap();
    // Up to 300 background sleeps (bounded); the shell stops at the first fork that fails.
    let marker = format!("sleep 60.{}", std::process::id());
    let bomb = format!("i=0; while [ $i -lt 300 ]; do {marker} >/dev/null 2>&1 & i=$((i+1)); done; echo all-started");
    let (lines, _) = run(&sandbox, sh(&bomb)).await;
    assert!(!lines.contains(&"stdout:all-started".to_owned()), "300 processes started: {lines:?}");
    assert!(lines.iter().any(|l| l.contains("fork")), "{lines:?}");
    let running = host_processes_with(&marker).len();
    assert!((20..40).contains(&running), "{running} processes in a sandbox limited to 40");
    assert!(within(boxes.delete("sbx-forks")).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_hog_is_oom_killed_and_reported() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    // Root here always has a memory controller; an ordinary user only where one is delegated.
    assert!(boxes.cgroups().has_memory() || !host_is_root(), "this machine offers root a memory controller");
    if !boxes.cgroups().has_memory() {
        // rlimits: the hog's allocation fails; it is not killed, and not reported as OOM-killed.
        let sandbox = boxes.create_with("sbx-hog", spec(Limits { memory_mb: Some(32), ..Limits::default() })).unwrap();
        let (lines, info) = run(&sandbox, sh("head -c 256M /dev/zero | tail -n 1 | wc -c")).await;
        assert!(lines.iter().any(|l| l.contains("memory exhausted")), "{lines:?}");
        assert_eq!((info.status.as_str(), info.oom_killed), ("exited", false), "{info:?}");
        return;
    }
    let sandbox = boxes.create_with("sbx-hog", spec(Limits { memory_mb: Some(32), ..Limits::default() })).unwrap();
    // `tail` keeps the whole (newline-free) line in memory: 256 MiB, far past 32.
    let (_, info) = run(&sandbox, sh("head -c 256M /dev/zero | tail -n 1 | wc -c")).await;
    assert_eq!((info.status.as_str(), info.oom_killed), ("oom_killed", true), "{info:?}");
    // A process within the limit is not.
    let (_, fine) = run(&sandbox, sh("head -c 8M /dev/zero | tail -n 1 | wc -c")).await;
    assert_eq!((fine.status.as_str(), fine.oom_killed, fine.exit_code), ("exited", false, Some(0)));
}

/// Asked for 64 MiB, a sandbox cannot hold 512 MiB: with a memory
/// controller the hog is OOM-killed; with rlimits only (rootless here) its
/// allocation fails. Either way the create answer names the mechanism.
#[tokio::test(flavor = "multi_thread")]
async fn asked_64_mib_cannot_hold_512_mib() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create_with("sbx-512", spec(Limits { memory_mb: Some(64), ..Limits::default() })).unwrap();
    let held = sandbox.enforcement();
    let hog = "head -c 512M /dev/zero | tail -n 1 | wc -c";
    let (lines, info) = run(&sandbox, sh(hog)).await;
    assert!(!lines.contains(&format!("stdout:{}", 512 << 20)), "held 512 MiB: {lines:?}");
    if boxes.cgroups().has_memory() {
        assert!(held.memory.contains("memory controller"), "{held:?}");
        assert_eq!((info.status.as_str(), info.oom_killed), ("oom_killed", true), "{info:?}");
    } else {
        assert!(held.memory.starts_with("RLIMIT_AS"), "{held:?}");
        assert!(lines.iter().any(|l| l.contains("memory exhausted") || l.contains("Cannot allocate")), "{lines:?}");
        // A direct allocation fails too, and nothing was OOM-killed.
        let (lines, _) = run(&sandbox, sh("perl -e '$x = \"a\" x (512 << 20); print \"held\\n\"'")).await;
        assert!(!lines.contains(&"stdout:held".to_owned()), "{lines:?}");
        assert!(!info.oom_killed);
    }
    assert!(held.not_held.is_empty(), "{held:?}");
    // Within the limit all is well.
    assert_eq!(run_ok(&sandbox, sh("head -c 8M /dev/zero | tail -n 1 | wc -c")).await, [(8 << 20).to_string()]);
}

/// With pids limited (to 512, the default), a sandbox cannot start 700 processes.
#[tokio::test(flavor = "multi_thread")]
async fn with_pids_limited_700_processes_cannot_start() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create_with("sbx-700", spec(Limits::default())).unwrap();
    let held = sandbox.enforcement();
    assert!(held.pids.contains(&snapsign_sandbox::DEFAULT_PIDS.to_string()), "{held:?}");
    let marker = format!("sleep 61.{}", std::process::id());
    let bomb = format!("i=0; while [ $i -lt 700 ]; do {marker} >/dev/null 2>&1 & i=$((i+1)); done; echo all-started");
    let (lines, _) = run(&sandbox, sh(&bomb)).await;
    assert!(
        !lines.contains(&"stdout:all-started".to_owned()),
        "700 processes started: {:?}",
        &lines[..3.min(lines.len())]
    );
    let running = host_processes_with(&marker).len();
    assert!(running < 700 && running > 100, "{running} processes");
    // Another sandbox of the same host user is not starved by this one.
    let other = boxes.create("sbx-700-other").unwrap();
    assert_eq!(run_ok(&other, sh("echo fine")).await, ["fine"]);
    assert!(within(boxes.delete("sbx-700")).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn writes_past_disk_mb_fail_with_enospc() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes
        .create_with("sbx-disk", spec(Limits { disk_mb: Some(8), memory_mb: Some(64), ..Limits::default() }))
        .unwrap();
    let (lines, info) = run(&sandbox, sh("dd if=/dev/zero of=/tmp/fill bs=1M count=20 2>&1; wc -c < /tmp/fill")).await;
    assert!(lines.iter().any(|l| l.contains("No space left on device")), "{lines:?}");
    let written: u64 = lines.last().and_then(|l| l.strip_prefix("stdout:")).unwrap().trim().parse().unwrap();
    assert!(written <= 8 << 20, "{written} bytes on an 8 MiB disk");
    assert_eq!(info.exit_code, Some(0));
    // The disk is the sandbox's alone: not in the host's mount table (nothing to clean up if the host dies).
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(sandbox.dir().to_str().unwrap()), "{mounts}");
    // The areas share the disk, and the file API meets the same limit.
    let err = sandbox.write_file("/home/more", &vec![1u8; 1 << 20][..]).await.unwrap_err();
    assert!(format!("{err:#}").contains("No space left on device"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_past_its_timeout_is_deleted_unless_renewed() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let timeout = Some(Duration::from_millis(600));
    let renewed = boxes.create_with("sbx-renewed", SandboxSpec { timeout, ..SandboxSpec::default() }).unwrap();
    let idle = boxes.create_with("sbx-idle", SandboxSpec { timeout, ..SandboxSpec::default() }).unwrap();
    let sleeper = idle.start(sh("sleep 100")).unwrap();
    for _ in 0..12 {
        renewed.renew();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eventually("the idle sandbox is deleted", || boxes.get("sbx-idle").is_none()).await;
    assert_eq!(within(idle.wait(sleeper.pid)).await.unwrap().status, "signaled");
    assert!(!idle.dir().exists());
    assert!(boxes.get("sbx-renewed").is_some(), "renewed every 100 ms, it must live on");
    assert_eq!(run_ok(&renewed, sh("echo alive")).await, ["alive"]);
}

/// A loopback listener on the host that answers each connection with `reply`.
fn host_listener(reply: &'static str) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Serves a bounded number of connections, then stops by itself.
        for stream in listener.incoming().take(16).flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut byte = [0u8; 64];
            let _ = stream.read(&mut byte);
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn the_network_is_lo_plus_the_forwarded_ports_and_nothing_else() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let allowed = host_listener("allowed\n");
    let other = host_listener("other\n");
    let a = boxes
        .create_with(
            "sbx-net-a",
            SandboxSpec { network: Network::Private { ports: vec![allowed] }, ..SandboxSpec::default() },
        )
        .unwrap();
    let b = boxes.create_with("sbx-net-b", SandboxSpec::default()).unwrap();
    let talk = |port: u16| {
        format!("if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo hi >&3; head -n 1 <&3; else echo refused-{port}; fi")
    };
    assert_eq!(run_ok(&a, bash(&talk(allowed))).await.last().unwrap(), "allowed");
    assert_eq!(
        run_ok(&a, bash(&format!("{} 2>/dev/null", talk(other)))).await.last().unwrap(),
        &format!("refused-{other}")
    );
    // b forwards nothing: even the port a reaches is closed to b.
    assert_eq!(
        run_ok(&b, bash(&format!("{} 2>/dev/null", talk(allowed)))).await.last().unwrap(),
        &format!("refused-{allowed}")
    );

    // A listener inside b is not reachable from a (each has its own lo).
    let listen = "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"127.0.0.1:7777\",Listen=>1,ReuseAddr=>1) or die; print \"up\\n\"; $|=1; $c=$s->accept; print $c \"from-b\\n\"; close $c'";
    let server = b.start(sh(listen)).unwrap();
    use futures_util::StreamExt;
    assert_eq!(within(b.follow(server.pid).unwrap().next()).await.unwrap().line, "up");
    assert_eq!(run_ok(&a, bash(&format!("{} 2>/dev/null", talk(7777)))).await.last().unwrap(), "refused-7777");
    assert_eq!(run_ok(&b, bash(&talk(7777))).await.last().unwrap(), "from-b", "b reaches its own listener");

    // Only lo, no route anywhere, and the host's sockets are not visible (inspected, no packet sent).
    let lines = run_ok(&a, sh("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; echo routes; tail -n +2 /proc/net/route; echo tcp; cat /proc/net/tcp")).await;
    let at = |word: &str| lines.iter().position(|l| l == word).unwrap();
    assert_eq!(lines[..at("routes")], ["lo"], "{lines:?}");
    assert_eq!(at("tcp") - at("routes"), 1, "a route exists: {lines:?}");
    let other_hex = format!(":{other:04X}");
    assert!(!lines.iter().any(|l| l.contains(&other_hex)), "the host's listener is visible: {lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cpus_become_a_cfs_quota_that_throttles_a_busy_loop() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create_with("sbx-cpu", spec(Limits { cpus: Some(0.2), ..Limits::default() })).unwrap();
    let held = sandbox.enforcement();
    if !host_is_root() && held.cpu.starts_with("not held") {
        // No cpu controller for an ordinary user here: the limit is named as not held, not dropped.
        assert_eq!(held.not_held, ["cpu"], "{held:?}");
        assert!(held.cpu.starts_with("not held"), "{held:?}");
        return;
    }
    assert!(held.cpu.contains("cpu controller") && held.not_held.is_empty(), "{held:?}");
    // This machine's cpu controller is cgroup v1; the sandbox's group sits under this process's own.
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let own = own
        .lines()
        .find_map(|l| l.split(':').nth(1).filter(|c| c.split(',').any(|c| c == "cpu")).and(l.split(':').nth(2)));
    let own = own.expect("this test reads a cgroup v1 cpu hierarchy, which this machine lacks");
    let group =
        format!("/sys/fs/cgroup/cpu{}/snapsign-sandbox-{}", own.trim_end_matches('/'), sandbox.host_uid(0).unwrap());
    let quota = std::fs::read_to_string(format!("{group}/cpu.cfs_quota_us")).unwrap();
    assert_eq!(quota.trim(), "20000", "0.2 CPU = 20 ms per 100 ms");
    run(&sandbox, sh("timeout 1 sh -c 'while :; do :; done'")).await;
    let stat = std::fs::read_to_string(format!("{group}/cpu.stat")).unwrap();
    let throttled: u64 = stat.lines().find_map(|l| l.strip_prefix("nr_throttled ")).unwrap().parse().unwrap();
    assert!(throttled > 0, "a busy loop under 0.2 CPU was never throttled: {stat}");
}
