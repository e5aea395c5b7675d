//! Processes: output, exit status, follow replay, list (wit/protocol.md §4.2–§4.3).

mod common;

use std::collections::BTreeMap;

use common::*;
use futures_util::StreamExt;
use snapsign_sandbox::{Confinement, ProcessSpec, Sandboxes, SandboxesConfig};

#[tokio::test(flavor = "multi_thread")]
async fn records_stdout_and_stderr_lines_in_order_with_their_stream() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-out").unwrap();
    let (lines, info) = run(&sandbox, sh("echo one; echo two >&2; printf 'three\\r\\nfour'")).await;
    assert_eq!((info.status.as_str(), info.exit_code, info.signal), ("exited", Some(0), None));
    assert!(info.ended_at.unwrap() >= info.started_at);
    let stdout: Vec<&String> = lines.iter().filter(|l| l.starts_with("stdout:")).collect();
    assert_eq!(stdout, ["stdout:one", "stdout:three", "stdout:four"]);
    assert!(lines.contains(&"stderr:two".to_owned()), "{lines:?}");
    let stamps: Vec<f64> = within(sandbox.follow(info.pid).unwrap().map(|e| e.timestamp).collect::<Vec<_>>()).await;
    assert!(stamps.windows(2).all(|w| w[0] <= w[1]) && stamps[0] >= info.started_at, "{stamps:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reports_exit_codes_and_signals() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-exit").unwrap();
    let (_, failed) = run(&sandbox, sh("exit 3")).await;
    assert_eq!((failed.status.as_str(), failed.exit_code, failed.signal), ("exited", Some(3), None));

    // A signal from inside reaches us through the launcher, as a shell would put it.
    let (_, inside) = run(&sandbox, sh("kill -9 $$")).await;
    assert_eq!((inside.status.as_str(), inside.exit_code, inside.signal), ("exited", Some(137), None));

    let sleeper = sandbox.start(sh("sleep 100")).unwrap();
    sandbox.kill(sleeper.pid, 15, false).unwrap();
    let killed = within(sandbox.wait(sleeper.pid)).await.unwrap();
    assert_eq!((killed.status.as_str(), killed.signal, killed.exit_code), ("signaled", Some(15), None));
    assert!(!killed.oom_killed);

    let oom = sandbox.start(root_sh("sleep 100")).unwrap();
    sandbox.kill(oom.pid, 9, true).unwrap();
    let oom = within(sandbox.wait(oom.pid)).await.unwrap();
    assert_eq!((oom.status.as_str(), oom.oom_killed, oom.signal, oom.exit_code), ("oom_killed", true, Some(9), None));

    // Signalling a process that ended changes nothing.
    sandbox.kill(failed.pid, 9, true).unwrap();
    assert_eq!(sandbox.process(failed.pid).unwrap(), failed);

    let err = sandbox.kill(7, 9, false).unwrap_err().to_string();
    assert!(err.contains("sandbox sbx-exit has no process 7"), "{err}");
    assert!(sandbox.kill(1, 0, false).unwrap_err().to_string().contains("not a signal"));
    assert!(sandbox.process(7).is_none() && sandbox.follow(0).is_none() && sandbox.wait(-1).await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_replays_everything_after_exit() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-replay").unwrap();
    let (lines, info) = run(&sandbox, sh("for i in 1 2 3 4 5; do echo out-$i; echo err-$i >&2; done")).await;
    assert_eq!(lines.len(), 10);
    for _ in 0..3 {
        let again: Vec<String> =
            within(sandbox.follow(info.pid).unwrap().map(|e| format!("{}:{}", e.stream, e.line)).collect()).await;
        assert_eq!(again, lines);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_follower_attached_mid_run_gets_earlier_lines_then_live_ones_like_any_other() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-live").unwrap();
    // Prints, then waits (at most 30 s) for the test to drop /tmp/go before printing again.
    let gate = "echo early; i=0; while [ ! -e /tmp/go ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done; echo late";
    let live = sandbox.start(sh(gate)).unwrap();
    let mut first = sandbox.follow(live.pid).unwrap();
    assert_eq!(within(first.next()).await.unwrap().line, "early");
    assert_eq!(sandbox.process(live.pid).unwrap().status, "running");

    let second = sandbox.follow(live.pid).unwrap();
    let third = sandbox.follow(live.pid).unwrap();
    sandbox.write_file("/tmp/go", &b""[..]).await.unwrap();
    let (rest, second, third) = within(async {
        tokio::join!(first.collect::<Vec<_>>(), second.collect::<Vec<_>>(), third.collect::<Vec<_>>())
    })
    .await;
    assert_eq!(rest.iter().map(|e| e.line.as_str()).collect::<Vec<_>>(), ["late"]);
    assert_eq!(second.iter().map(|e| e.line.as_str()).collect::<Vec<_>>(), ["early", "late"]);
    assert_eq!(second, third, "followers see identical events");
    assert_eq!(within(sandbox.wait(live.pid)).await.unwrap().exit_code, Some(0));
}

#[tokio::test(flavor = "multi_thread")]
async fn list_echoes_command_and_args_and_keeps_exited_processes_in_start_order() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-list").unwrap();
    let specs = [
        ProcessSpec { command: "/bin/true".into(), ..Default::default() },
        ProcessSpec { command: "mkdir".into(), args: vec!["-p".into(), "/tmp/a b/c".into()], ..Default::default() },
        sh("echo 'quoted \"args\"' $HOME"),
    ];
    for spec in &specs {
        run(&sandbox, spec.clone()).await;
    }
    let running = sandbox.start(sh("sleep 100")).unwrap();
    let listed = sandbox.list();
    let echoed: Vec<(i64, &str, &[String])> =
        listed.iter().map(|p| (p.pid, p.command.as_str(), p.args.as_slice())).collect();
    assert_eq!(
        echoed,
        [
            (1, "/bin/true", &specs[0].args[..]),
            (2, "mkdir", &specs[1].args[..]),
            (3, "/bin/sh", &specs[2].args[..]),
            (4, "/bin/sh", &["-c".to_owned(), "sleep 100".to_owned()][..]),
        ]
    );
    assert_eq!(listed.iter().map(|p| p.status.as_str()).collect::<Vec<_>>(), ["exited", "exited", "exited", "running"]);
    let json = serde_json::to_value(&listed[3]).unwrap();
    assert_eq!(json["exit_code"], serde_json::Value::Null);
    assert_eq!(json["ended_at"], serde_json::Value::Null);
    assert_eq!(json["stdin_writable"], false);
    sandbox.kill(running.pid, 9, false).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn environment_working_dir_and_extra_env() {
    let dir = scratch();
    let boxes = sandboxes(dir.path(), None);
    let sandbox = boxes.create("sbx-env").unwrap();
    let defaults = run_ok(&sandbox, sh("pwd; echo \"$PATH|$HOME\"; env | wc -l")).await;
    assert_eq!(defaults[..2], ["/".to_owned(), format!("{}|/home", snapsign_sandbox::DEFAULT_PATH)]);
    assert_eq!(defaults[2], "3", "only PATH, HOME and the shell's PWD: {defaults:?}");

    run_ok(&sandbox, root_sh("mkdir -p /var/lib/work")).await;
    sandbox
        .set_process_env(BTreeMap::from([("FAULT".to_owned(), "on".to_owned()), ("A".to_owned(), "extra".to_owned())]));
    let spec = ProcessSpec {
        env: BTreeMap::from([("A".to_owned(), "spec".to_owned()), ("PATH".to_owned(), "/usr/bin".to_owned())]),
        working_dir: Some("/var/lib/work".into()),
        user: Some("root".into()),
        ..sh("pwd; echo $A $FAULT $PATH $HOME")
    };
    assert_eq!(run_ok(&sandbox, spec).await, ["/var/lib/work", "extra on /usr/bin /root"]);
    sandbox.set_process_env(BTreeMap::new());
    assert_eq!(run_ok(&sandbox, sh("echo ${FAULT:-none}")).await, ["none"]);

    for (spec, complaint) in [
        (ProcessSpec { user: Some("admin".into()), ..sh("true") }, "'admin'"),
        (ProcessSpec { working_dir: Some("tmp".into()), ..sh("true") }, "relative"),
        (ProcessSpec::default(), "command is empty"),
    ] {
        let err = sandbox.start(spec).unwrap_err().to_string();
        assert!(err.contains("sandbox sbx-env") && err.contains(complaint), "{err}");
    }
    // A command that cannot run still yields a process, which fails with the reason.
    let (lines, info) = run(&sandbox, ProcessSpec { command: "no-such-tool".into(), ..Default::default() }).await;
    assert_ne!(info.exit_code, Some(0));
    assert!(lines.iter().any(|l| l.starts_with("stderr:") && l.contains("no-such-tool")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unconfined_processes_run_in_the_sandbox_directory_with_the_given_env() {
    let dir = scratch();
    let builder = dir.path().join("builder.sh");
    std::fs::write(&builder, "#!/bin/sh\necho unconfined-builder \"$@\"\n").unwrap();
    std::fs::set_permissions(&builder, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let boxes = Sandboxes::new(SandboxesConfig {
        root_dir: dir.path().join("boxes"),
        confinement: Confinement::Unconfined,
        builder_binary: Some(builder),
    })
    .unwrap();
    let sandbox = boxes.create("sbx-open").unwrap();
    let spec =
        ProcessSpec { env: BTreeMap::from([("A".to_owned(), "1".to_owned())]), ..sh("pwd; echo $A; env | wc -l") };
    let fs = std::fs::canonicalize(dir.path().join("boxes/sbx-open/fs")).unwrap();
    assert_eq!(run_ok(&sandbox, spec).await, [fs.display().to_string(), "1".into(), "4".into()]);
    let spec = ProcessSpec { working_dir: Some("/tmp".into()), ..sh("pwd") };
    assert_eq!(run_ok(&sandbox, spec).await, [fs.join("tmp").display().to_string()]);
    let builder = ProcessSpec {
        command: snapsign_sandbox::BUILDER_PATH.into(),
        args: vec!["--help".into()],
        ..Default::default()
    };
    assert_eq!(run_ok(&sandbox, builder).await, ["unconfined-builder --help"]);
    assert!(within(boxes.delete("sbx-open")).await.unwrap());
}
