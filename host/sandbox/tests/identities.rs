//! Who sandbox root and the sandbox user are on the host, and what the host
//! process does with files they own: as root (a range of host uids per
//! sandbox), as an ordinary user with subordinate ids (this user as root,
//! its subordinate range as uids 1..65535: `newuidmap`), and as an ordinary
//! user forced to one uid. CI runs these as root and as `snapsign-ci`, who
//! has a subordinate range (`.ci/run`); as an ordinary user without one (or
//! without `newuidmap`) the subordinate-id tests fail, naming what is missing.

mod common;

use std::path::Path;

use common::*;
use snapsign_sandbox::{RootlessIds, SANDBOX_UID, Sandboxes, SubordinateIds};
use tokio::io::AsyncReadExt;

/// This user's name, as `/etc/subuid` names it.
fn my_name() -> String {
    let out = std::process::Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The first subordinate uid of this user in `/etc/subuid` and how many ids
/// it has in both `/etc/subuid` and `/etc/subgid` (the smaller), failing the
/// test (with what to do) when it has none.
fn my_subordinate_uids() -> (u32, u32) {
    let name = my_name();
    let range = |file: &str| -> Option<(u32, u32)> {
        std::fs::read_to_string(file).unwrap_or_default().lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            let count = f.get(2)?.parse::<u32>().ok()?;
            (f.len() == 3 && (f[0] == name || f[0] == my_uid().to_string()) && count >= 65_535)
                .then(|| Some((f[1].parse().ok()?, count)))?
        })
    };
    match (range("/etc/subuid"), range("/etc/subgid")) {
        (Some((start, uids)), Some((_, gids))) => (start, uids.min(gids)),
        _ => panic!(
            "user {name} (uid {}) has no range of 65535 ids in /etc/subuid and /etc/subgid; add one with: sudo \
             usermod --add-subuids 165536-231071 --add-subgids 165536-231071 {name} (and install uidmap)",
            my_uid()
        ),
    }
}

/// The sandboxes these tests make: as root, ranges; as an ordinary user,
/// subordinate ids, which must have been chosen (failing with why not).
fn with_subordinate_ids(root: &Path) -> Sandboxes {
    let boxes = sandboxes(root, None);
    if !host_is_root() {
        let (start, count) = my_subordinate_uids();
        match boxes.rootless_ids() {
            // A block per sandbox where the range holds two (CI's user has 32), else one shared.
            Some(RootlessIds::Subordinate { uid_start, ranges, .. }) => {
                assert_eq!((*uid_start, *ranges), (start, count / 65_535), "from {start}, {count} ids")
            }
            other => panic!(
                "as uid {} with subordinate uids from {start} in /etc/subuid, rootless sandboxes use {other:?}; \
                 expected subordinate ids (is newuidmap installed? `apt-get install uidmap`)",
                my_uid()
            ),
        }
    }
    boxes
}

/// Host uid of the process whose command line starts with `marker` (from its /proc/PID/status).
fn host_uid_of_process(marker: &str) -> u32 {
    let found = host_processes_with(marker);
    assert_eq!(found.len(), 1, "one process {marker}: {found:?}");
    let pid = found[0].split(':').next().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid = status.lines().find_map(|l| l.strip_prefix("Uid:")).unwrap();
    let ids: Vec<u32> = uid.split_whitespace().map(|n| n.parse().unwrap()).collect();
    assert!(ids.iter().all(|id| *id == ids[0]), "real, effective, saved and fs uid differ: {uid}");
    ids[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn sandbox_root_and_the_sandbox_user_are_different_host_uids() {
    let dir = scratch();
    let boxes = with_subordinate_ids(dir.path());
    let sandbox = boxes.create("sbx-two-ids").unwrap();
    let (root, user) = (sandbox.host_uid(0).unwrap(), sandbox.host_uid(SANDBOX_UID).unwrap());
    assert_ne!(root, user, "sandbox root and the sandbox user are one host uid");
    assert_ne!(root, 0);
    if !host_is_root() {
        let (start, _) = my_subordinate_uids();
        assert_eq!(root, my_uid(), "rootless, sandbox root is this user");
        // Uid 1 inside is the first id of the sandbox's block (block n starts n × 65535 after the start).
        let first = sandbox.host_uid(1).unwrap();
        assert_eq!((first - start) % 65_535, 0, "uid 1 is {first}, not the start of a block from {start}");
        assert_eq!(user, first + SANDBOX_UID - 1);
        assert_eq!(sandbox.host_uid(65_535), Some(first + 65_534));
        assert_eq!(sandbox.host_uid(65_536), None);
        // Said once at start and in each create answer.
        assert!(boxes.describe().contains("identities: subordinate ids"), "{}", boxes.describe());
        let answer = serde_json::to_value(sandbox.enforcement()).unwrap();
        let said = answer["identities"].as_str().unwrap_or_default();
        assert!(said.starts_with("subordinate ids") && said.contains(&first.to_string()), "{answer}");
    }
    // Files each made, as the host sees them.
    run_ok(&sandbox, root_sh("touch /tmp/by-root")).await;
    run_ok(&sandbox, sh("touch /tmp/by-user")).await;
    assert_eq!(owner(&sandbox.host_path("/tmp/by-root").unwrap()).0, root);
    assert_eq!(owner(&sandbox.host_path("/tmp/by-user").unwrap()).0, user);
    // The user's home is the user's.
    assert_eq!(owner(&sandbox.host_path("/home").unwrap()).0, user);
    // Processes, as the host sees them.
    let marker = format!("sleep 1001.{}", std::process::id());
    let long = sandbox.start(sh(&format!("exec {marker}1"))).unwrap();
    let root_long = sandbox.start(root_sh(&format!("exec {marker}2"))).unwrap();
    eventually("both sleeps run", || host_processes_with(&marker).len() == 2).await;
    assert_eq!(host_uid_of_process(&format!("{marker}1")), user);
    assert_eq!(host_uid_of_process(&format!("{marker}2")), root);
    for pid in [long.pid, root_long.pid] {
        sandbox.kill(pid, libc::SIGKILL, false).unwrap();
    }
    // Inside: the ids the image expects, supplementary groups dropped.
    assert_eq!(run_ok(&sandbox, sh("id -u; id -g; id -G")).await, ["1000", "1000", "1000"]);
    assert_eq!(run_ok(&sandbox, root_sh("id -u; id -g; id -G")).await, ["0", "0", "0"]);
    assert!(within(boxes.delete("sbx-two-ids")).await.unwrap());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sandbox_user_cannot_write_nor_read_a_0600_file_of_root_and_root_can_chown_to_any_uid() {
    let dir = scratch();
    let boxes = with_subordinate_ids(dir.path());
    let sandbox = boxes.create("sbx-0600").unwrap();
    run_ok(&sandbox, root_sh("echo root-secret > /tmp/secret && chmod 0600 /tmp/secret")).await;
    let (lines, info) = run(&sandbox, sh("cat /tmp/secret; echo tampered > /tmp/secret; kill -9 1")).await;
    assert_ne!(info.exit_code, Some(0), "{lines:?}");
    assert!(!lines.iter().any(|l| l.contains("root-secret")), "the sandbox user read root's 0600 file: {lines:?}");
    let denied = lines.iter().filter(|l| l.contains("Permission denied") || l.contains("Operation not permitted"));
    assert!(denied.count() >= 3, "cat, the write and the kill of pid 1 were refused: {lines:?}");
    assert_eq!(run_ok(&sandbox, root_sh("cat /tmp/secret")).await, ["root-secret"]);

    // chown to another owner, and becoming another uid, work inside.
    let script = "touch /tmp/given && chown 4242:4343 /tmp/given && stat -c %u:%g /tmp/given; \
                  setpriv --reuid 4242 --regid 4242 --clear-groups id -u";
    assert_eq!(run_ok(&sandbox, root_sh(script)).await, ["4242:4343", "4242"]);
    let given = owner(&sandbox.host_path("/tmp/given").unwrap());
    assert_eq!(given.0, sandbox.host_uid(4242).unwrap(), "uid 4242 inside is its own host uid");
    assert_ne!(given.0, sandbox.host_uid(0).unwrap());
    // A uid past the range is not mapped.
    let (lines, _) = run(&sandbox, root_sh("chown 70000 /tmp/given && echo CHOWNED; exit 0")).await;
    assert!(!lines.contains(&"stdout:CHOWNED".to_owned()), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_file_api_writes_as_the_sandbox_user_and_reads_and_deletes_files_of_any_uid() {
    let dir = scratch();
    let boxes = with_subordinate_ids(dir.path());
    let sandbox = boxes.create("sbx-api").unwrap();
    let user = sandbox.host_uid(SANDBOX_UID).unwrap();
    // Written through the API: the file and the parents it made are the sandbox user's.
    assert_eq!(sandbox.write_file("/home/a/b/context.txt", &b"from the api\n"[..]).await.unwrap(), 13);
    for path in ["/home/a", "/home/a/b", "/home/a/b/context.txt"] {
        assert_eq!(owner(&sandbox.host_path(path).unwrap()), (user, user), "{path}");
    }
    let out = run_ok(&sandbox, sh("cat /home/a/b/context.txt && echo more >> /home/a/b/context.txt && echo ok"));
    assert_eq!(out.await, ["from the api", "ok"]);
    // Into a directory the sandbox user made mode 0700.
    run_ok(&sandbox, sh("mkdir -m 0700 /tmp/private")).await;
    sandbox.write_file("/tmp/private/in", &b"x"[..]).await.unwrap();
    assert_eq!(run_ok(&sandbox, sh("cat /tmp/private/in")).await, ["x"]);

    // Read through the API: 0600 files of root, of the sandbox user and of uid 4242 in a 0700 directory.
    let made = "echo of-root > /root/secret && chmod 600 /root/secret && \
                mkdir -m 0700 /var/other && echo of-4242 > /var/other/secret && chmod 600 /var/other/secret && \
                chown -R 4242:4242 /var/other";
    run_ok(&sandbox, root_sh(made)).await;
    run_ok(&sandbox, sh("echo of-user > /tmp/private/secret && chmod 600 /tmp/private/secret")).await;
    for (path, text) in
        [("/root/secret", "of-root\n"), ("/tmp/private/secret", "of-user\n"), ("/var/other/secret", "of-4242\n")]
    {
        let mut read = String::new();
        let file = sandbox.read_file(path).await;
        file.unwrap_or_else(|e| panic!("read {path}: {e:#}")).read_to_string(&mut read).await.unwrap();
        assert_eq!(read, text, "{path}");
    }
    // Deleted through the API, from directories of the sandbox user and of uid 4242.
    sandbox.delete_file("/tmp/private/secret").await.unwrap();
    sandbox.delete_file("/var/other/secret").await.unwrap();
    assert_eq!(
        run_ok(&sandbox, root_sh("ls -A /tmp/private /var/other")).await,
        ["/tmp/private:", "in", "", "/var/other:"]
    );
    // Still no way out through a symlink, for the helper either.
    run_ok(&sandbox, sh("ln -s /etc/hostname /tmp/out")).await;
    let err = sandbox.read_file("/tmp/out").await.unwrap_err();
    assert!(format!("{err:#}").contains("leads out of the sandbox"), "{err:#}");
    assert!(sandbox.write_file("/tmp/out", &b"x"[..]).await.is_err());

    // The same on a sandbox's own disk (rootless, a tmpfs its holder mounted).
    let spec = snapsign_sandbox::SandboxSpec {
        limits: snapsign_sandbox::Limits { disk_mb: Some(16), ..Default::default() },
        ..Default::default()
    };
    let disk = boxes.create_with("sbx-api-disk", spec).unwrap();
    disk.write_file("/home/d/f", &b"on the disk\n"[..]).await.unwrap();
    let disk_user = disk.host_uid(SANDBOX_UID).unwrap();
    assert_eq!(owner(&disk.host_path("/home/d/f").unwrap()), (disk_user, disk_user));
    if matches!(boxes.rootless_ids(), Some(RootlessIds::Subordinate { ranges: 2.., .. })) || host_is_root() {
        assert_ne!(disk_user, user, "each sandbox's user is its own host uid, for the file API too");
    }
    run_ok(&disk, root_sh("echo of-root > /root/s && chmod 600 /root/s && chown 4242 /root/s")).await;
    let mut read = String::new();
    disk.read_file("/root/s").await.unwrap().read_to_string(&mut read).await.unwrap();
    assert_eq!(read, "of-root\n");
    assert_eq!(run_ok(&disk, sh("cat /home/d/f")).await, ["on the disk"]);
    assert!(within(boxes.delete("sbx-api-disk")).await.unwrap());
}

/// What deleting must remove: files and directories of root, of the sandbox
/// user and of other uids, directories of mode 000, deep trees.
const LITTER: &str = "mkdir -p /var/deep/a/b/c && echo x > /var/deep/a/b/c/f && chown -R 4242:4242 /var/deep && \
     chmod 000 /var/deep/a/b; mkdir /tmp/locked && echo y > /tmp/locked/f && chmod 000 /tmp/locked; \
     mkdir /root/r && touch /root/r/f && chmod 0 /root/r/f /root/r";

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_sandbox_leaves_nothing_even_files_of_other_uids_and_mode_000_directories() {
    let dir = scratch();
    let boxes = with_subordinate_ids(dir.path());
    let sandbox = boxes.create("sbx-litter").unwrap();
    run_ok(&sandbox, root_sh(LITTER)).await;
    run_ok(
        &sandbox,
        sh("mkdir -p /home/u/v && echo z > /home/u/v/f && chmod 600 /home/u/v/f && chmod 000 /home/u/v /home/u"),
    )
    .await;
    sandbox.write_file("/home/api/file", &b"api"[..]).await.unwrap();
    let deep = sandbox.host_path("/var/deep/a").unwrap();
    assert_eq!(owner(&deep).0, sandbox.host_uid(4242).unwrap());
    let host_dir = sandbox.dir().to_owned();
    assert!(within(boxes.delete("sbx-litter")).await.unwrap());
    assert!(!host_dir.exists(), "{} is left: {:?}", host_dir.display(), tree(&host_dir));
    let left = tree(dir.path());
    assert!(left.is_empty(), "left in root_dir after delete: {left:?}");

    // A sandbox never deleted: dropped with its `Sandboxes`, rootless its directory goes
    // (as root it stays until a create with its id, or root, removes it).
    let sandbox = boxes.create("sbx-dropped").unwrap();
    run_ok(&sandbox, root_sh(LITTER)).await;
    let dropped_dir = sandbox.dir().to_owned();
    drop((sandbox, boxes));
    assert_eq!(dropped_dir.exists(), host_is_root(), "{:?}", tree(&dropped_dir));
    // One whose process stopped without dropping anything (forgotten here): made again with
    // its id, the stale directory goes.
    let boxes = with_subordinate_ids(dir.path());
    let sandbox = boxes.create("sbx-litter").unwrap();
    run_ok(&sandbox, root_sh(LITTER)).await;
    let stale_dir = sandbox.dir().to_owned();
    std::mem::forget(sandbox);
    std::mem::forget(boxes);
    assert!(stale_dir.exists());
    let boxes = with_subordinate_ids(dir.path());
    let again = boxes.create("sbx-litter").unwrap();
    assert_eq!(run_ok(&again, root_sh("ls -A /var /tmp /root")).await, ["/root:", "", "/tmp:", "", "/var:"]);
    assert!(within(boxes.delete("sbx-litter")).await.unwrap());
    if host_is_root() {
        std::fs::remove_dir_all(&dropped_dir).unwrap();
    }
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
}

/// Where subordinate ids are not used (a machine without `newuidmap` or a
/// range; forced here), rootless sandboxes map one uid, say so, and work:
/// processes as 0 and 1000, the file API, and a delete that leaves nothing.
/// As root the choice is ignored: a range per sandbox as always.
#[tokio::test(flavor = "multi_thread")]
async fn without_subordinate_ids_one_uid_still_works_and_is_said() {
    let dir = scratch();
    let boxes = sandboxes_with(dir.path(), None, SubordinateIds::Never);
    let sandbox = boxes.create("sbx-one").unwrap();
    if host_is_root() {
        assert_eq!(boxes.rootless_ids(), None);
        assert!(sandbox.host_uid(0).unwrap() >= snapsign_sandbox::FIRST_HOST_UID);
        assert_ne!(sandbox.host_uid(0), sandbox.host_uid(SANDBOX_UID));
    } else {
        assert!(matches!(boxes.rootless_ids(), Some(RootlessIds::OneUid { .. })), "{:?}", boxes.rootless_ids());
        assert!(boxes.describe().contains("identities: one uid"), "{}", boxes.describe());
        let answer = serde_json::to_value(sandbox.enforcement()).unwrap();
        assert!(answer["identities"].as_str().unwrap_or_default().starts_with("one uid"), "{answer}");
        assert_eq!((sandbox.host_uid(0), sandbox.host_uid(SANDBOX_UID)), (Some(my_uid()), Some(my_uid())));
        assert_eq!(sandbox.host_uid(5), None);
        let lines = run_ok(&sandbox, root_sh("cat /proc/self/uid_map; chown 4242 /tmp 2>/dev/null || echo refused"));
        let lines = lines.await;
        assert!(lines[0].split_whitespace().eq(["0", "0", "1"]), "{lines:?}");
        assert_eq!(lines[1], "refused");
    }
    assert_eq!(run_ok(&sandbox, sh("id -u")).await, ["1000"]);
    assert_eq!(run_ok(&sandbox, root_sh("id -u")).await, ["0"]);
    sandbox.write_file("/home/a/f", &b"one\n"[..]).await.unwrap();
    assert_eq!(run_ok(&sandbox, sh("cat /home/a/f && echo two >> /home/a/f && echo ok")).await, ["one", "ok"]);
    let mut read = String::new();
    sandbox.read_file("/home/a/f").await.unwrap().read_to_string(&mut read).await.unwrap();
    assert_eq!(read, "one\ntwo\n");
    // One uid cannot chown to 4242: litter of root and the user only, mode 000 included.
    run_ok(&sandbox, root_sh("mkdir -p /var/x/y && touch /var/x/y/f && chmod 000 /var/x/y /var/x")).await;
    run_ok(&sandbox, sh("mkdir /tmp/z && touch /tmp/z/f && chmod 000 /tmp/z")).await;
    assert!(within(boxes.delete("sbx-one")).await.unwrap());
    assert!(tree(dir.path()).is_empty(), "{:?}", tree(dir.path()));
}
