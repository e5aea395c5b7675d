//! The dev stack's sandboxes keep the create request's promises: resources
//! (processes, memory with a real OOM kill reported by the process API,
//! disk), timeout_secs, and a network of their own; and the host answers a
//! health request within 1 s while a sandbox runs into each limit.

mod common;

use std::time::{Duration, Instant};

use common::dev::{Api, start_stack};
use reqwest::Method;
use serde_json::{Value, json};

/// Every wait here ends by this deadline.
const DEADLINE: Duration = Duration::from_secs(60);

async fn create(api: &Api, body: Value) -> String {
    create_answer(api, body).await.0
}

/// The new sandbox's id and its create answer (with `limits`: what holds each limit here).
async fn create_answer(api: &Api, body: Value) -> (String, Value) {
    let (status, created) = api.send(api.http.post(api.lifecycle("")).json(&body)).await;
    assert_eq!(status, 200, "{created}");
    let id = created["sandbox_id"].as_str().unwrap().to_owned();
    api.wait_running(&id).await;
    (id, created)
}

/// A health request to the sandbox proxy answers 200 within 1 s.
async fn assert_responsive(api: &Api, id: &str, during: &str) {
    let started = Instant::now();
    let request = api.proxy(Method::GET, id, "/api/v1/health").timeout(Duration::from_secs(5));
    let (status, body) = api.send(request).await;
    let took = started.elapsed();
    assert_eq!(status, 200, "health during {during}: {body}");
    assert!(took < Duration::from_secs(1), "health took {took:?} during {during}");
}

async fn start(api: &Api, id: &str, script: &str, root: bool) -> i64 {
    let mut spec = json!({"command": "/bin/sh", "args": ["-c", script]});
    if root {
        spec["user"] = json!("root");
    }
    let (status, started) = api.send(api.proxy(Method::POST, id, "/api/v1/processes").json(&spec)).await;
    assert_eq!(status, 200, "{started}");
    started["pid"].as_i64().unwrap()
}

/// Polls the process until it ended, checking the host answers health in time meanwhile.
async fn finish(api: &Api, id: &str, pid: i64, during: &str) -> Value {
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "{during}: process {pid} still running after {DEADLINE:?}");
        assert_responsive(api, id, during).await;
        let (status, info) = api.send(api.proxy(Method::GET, id, &format!("/api/v1/processes/{pid}"))).await;
        assert_eq!(status, 200, "{info}");
        if info["status"] != "running" {
            return info;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn stdout(events: &[Value]) -> Vec<String> {
    events.iter().filter(|e| e["stream"] == "stdout").filter_map(|e| e["line"].as_str().map(str::to_owned)).collect()
}

fn all_lines(events: &[Value]) -> Vec<String> {
    events.iter().filter_map(|e| e["line"].as_str().map(str::to_owned)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn each_resource_stops_at_its_limit_while_the_host_stays_responsive() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |c| c.pending = Duration::ZERO).await;
    let api = Api::new(&stack);
    let resources = json!({"cpus": 1.0, "memory_mb": 64, "disk_mb": 16});

    // A fork bomb (bounded: 3000 sleeps that end by themselves) stops at the process limit.
    // (With 64 MiB, 500 sleeping shells would meet the memory limit first.)
    let bombed = create(&api, json!({"resources": {"cpus": 1.0, "memory_mb": 1024}})).await;
    let bomb = "i=0; while [ $i -lt 3000 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; echo all-started";
    let pid = start(&api, &bombed, bomb, false).await;
    let info = finish(&api, &bombed, pid, "a fork bomb").await;
    let events = api.follow(&bombed, pid).await;
    assert!(!stdout(&events).contains(&"all-started".to_owned()), "3000 processes started: {info}");
    assert!(all_lines(&events).iter().any(|l| l.contains("fork")), "{info} {events:?}");
    assert_ne!(info["exit_code"], 0, "{info}");

    // A memory hog is OOM-killed, and the process API says so; where no memory controller
    // is delegated (an ordinary user here) its allocation fails under RLIMIT_AS instead. The
    // create answer says which, and names the limits nothing holds (cpu without a controller).
    let (hogged, answer) = create_answer(&api, json!({"resources": resources})).await;
    let limits = &answer["limits"];
    let memory = limits["memory"].as_str().unwrap_or_default();
    assert!(limits["disk"].as_str().unwrap_or_default().contains("tmpfs"), "{answer}");
    assert!(limits["pids"].as_str().unwrap_or_default().contains("512"), "{answer}");
    let cpu_held = !limits["cpu"].as_str().unwrap_or_default().starts_with("not held");
    assert_eq!(limits["not_held"], if cpu_held { json!([]) } else { json!(["cpu"]) }, "{answer}");
    let pid = start(&api, &hogged, "head -c 1G /dev/zero | tail -n 1 | wc -c", false).await;
    let info = finish(&api, &hogged, pid, "a memory hog").await;
    if memory.contains("memory controller") {
        assert_eq!((&info["status"], &info["oom_killed"]), (&json!("oom_killed"), &json!(true)), "{info}");
    } else {
        assert!(memory.starts_with("RLIMIT_AS"), "{answer}");
        let events = api.follow(&hogged, pid).await;
        assert!(all_lines(&events).iter().any(|l| l.contains("memory exhausted")), "{info} {events:?}");
        assert_eq!((&info["status"], &info["oom_killed"]), (&json!("exited"), &json!(false)), "{info}");
        assert!(!stdout(&events).contains(&(1u64 << 30).to_string()), "held 1 GiB: {events:?}");
    }

    // A disk filler gets ENOSPC at disk_mb.
    let filled = create(&api, json!({"resources": resources})).await;
    let pid = start(&api, &filled, "dd if=/dev/zero of=/var/fill bs=1M count=64; wc -c < /var/fill", true).await;
    let info = finish(&api, &filled, pid, "a disk filler").await;
    let events = api.follow(&filled, pid).await;
    assert!(all_lines(&events).iter().any(|l| l.contains("No space left on device")), "{events:?}");
    let written: u64 = stdout(&events).last().unwrap().trim().parse().unwrap();
    assert!(written <= 16 << 20, "{written} bytes on a 16 MiB disk");
    assert_eq!(info["oom_killed"], false, "{info}");

    for id in [&bombed, &hogged, &filled] {
        let (status, _) = api.send(api.http.delete(api.lifecycle(&format!("/{id}")))).await;
        assert_eq!(status, 200);
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_idle_past_timeout_secs_is_terminated_and_activity_renews_it() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |c| c.pending = Duration::ZERO).await;
    let api = Api::new(&stack);
    let body = json!({"resources": {"cpus": 1.0, "memory_mb": 256}, "timeout_secs": 2});
    let idle = create(&api, body.clone()).await;
    let busy = create(&api, body).await;
    let sleeper = start(&api, &idle, "sleep 100", false).await;
    // `busy` sees a proxy request every 250 ms; `idle` none (lifecycle GETs are not activity).
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "sandbox {idle} was never terminated");
        assert_responsive(&api, &busy, "a timeout").await;
        let (status, info) = api.send(api.http.get(api.lifecycle(&format!("/{idle}")))).await;
        assert_eq!(status, 200, "{info}");
        if info["status"] == "terminated" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (status, _) = api.send(api.proxy(Method::GET, &idle, &format!("/api/v1/processes/{sleeper}"))).await;
    assert_eq!(status, 404, "the terminated sandbox's processes are gone");
    let (status, info) = api.send(api.http.get(api.lifecycle(&format!("/{busy}")))).await;
    assert_eq!((status, &info["status"]), (200, &json!("running")), "{info}");
    let (_, done) = api.run(&busy, "/bin/echo", &["alive"], false).await;
    assert_eq!(done["exit_code"], 0);
    for id in [&idle, &busy] {
        let (status, _) = api.send(api.http.delete(api.lifecycle(&format!("/{id}")))).await;
        assert_eq!(status, 200);
    }
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_reaches_only_the_store_and_the_proxy_not_another_sandbox_nor_other_ports() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |c| c.pending = Duration::ZERO).await;
    let api = Api::new(&stack);
    let a = create(&api, json!({"resources": {"cpus": 1.0, "memory_mb": 256}})).await;
    let b = create(&api, json!({"resources": {"cpus": 1.0, "memory_mb": 256}})).await;

    // A listener inside b, on b's own loopback.
    let listen = "perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"127.0.0.1:7777\",Listen=>1,ReuseAddr=>1) or die \"listen: $!\"; $|=1; print \"up\\n\"; while ($c=$s->accept) { print $c \"from-b\\n\"; close $c }'";
    let server = start(&api, &b, listen, false).await;
    let deadline = Instant::now() + DEADLINE;
    loop {
        assert!(Instant::now() < deadline, "b's listener never came up");
        let (_, info) = api.send(api.proxy(Method::GET, &b, &format!("/api/v1/processes/{server}"))).await;
        assert_eq!(info["status"], "running", "b's listener ended: {info}");
        // 127.0.0.1:7777 listening (state 0A) in b's /proc/net/tcp.
        let (events, _) = api.run(&b, "/bin/cat", &["/proc/net/tcp"], false).await;
        if all_lines(&events).iter().any(|l| l.contains("0100007F:1E61 00000000:0000 0A")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let connect = |port: u16| {
        format!(
            "if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo reached-{port}; else echo refused-{port}; fi 2>/dev/null"
        )
    };
    let outcome = |events: Vec<Value>| stdout(&events).last().cloned().unwrap_or_default();
    let (events, _) = api.run(&b, "/bin/bash", &["-c", &connect(7777)], false).await;
    assert_eq!(outcome(events), "reached-7777", "b reaches its own listener");
    let (events, _) = api.run(&a, "/bin/bash", &["-c", &connect(7777)], false).await;
    assert_eq!(outcome(events), "refused-7777", "a reached a listener inside b");
    assert_responsive(&api, &a, "connections between sandboxes").await;

    // The store and the sandbox proxy are forwarded; the signer (a host port not on the policy) is not.
    for (addr, reached) in [(stack.store.addr(), true), (stack.emulator.addr(), true), (stack.signer.addr(), false)] {
        let (events, _) = api.run(&a, "/bin/bash", &["-c", &connect(addr.port())], false).await;
        let want = format!("{}-{}", if reached { "reached" } else { "refused" }, addr.port());
        assert_eq!(outcome(events), want, "{addr}");
    }
    // Only lo and no route (inspected, no packet sent anywhere).
    let (events, _) = api
        .run(
            &a,
            "/bin/sh",
            &["-c", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; tail -n +2 /proc/net/route | wc -l"],
            false,
        )
        .await;
    assert_eq!(stdout(&events), ["lo", "0"]);

    // A policy can add a loopback port, and a non-loopback destination is refused at create.
    let (status, refused) = api
        .send(
            api.http
                .post(api.lifecycle(""))
                .json(&json!({"network": {"allow_internet_access": false, "allow_out": ["10.0.0.1:80"]}})),
        )
        .await;
    assert_eq!(status, 400, "{refused}");
    assert!(refused.to_string().contains("10.0.0.1:80"), "{refused}");
    let c =
        create(&api, json!({"network": {"allow_out": [format!("127.0.0.1:{}", stack.signer.addr().port())]}})).await;
    let (events, _) = api.run(&c, "/bin/bash", &["-c", &connect(stack.signer.addr().port())], false).await;
    assert_eq!(outcome(events), format!("reached-{}", stack.signer.addr().port()));
    stack.shutdown().await;
}
