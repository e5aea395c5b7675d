//! The dev stack driven over HTTP as a client of wit/protocol.md would: the
//! platform emulator, local sandboxes, the store and the signer.

mod common;

use common::dev::{Api, start_stack};
use reqwest::Method;
use serde_json::{Value, json};
use snapsign_dev_stack::Faults;

const SCRATCH: &str = "FROM scratch\nCOPY hello.txt /hello.txt\n";

#[tokio::test(flavor = "multi_thread")]
async fn prepare_answers_in_legacy_new_and_both_shapes_and_lookup_404s_unknown_names() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);

    let (status, new) = api.prepare("base", SCRATCH, None, None).await;
    assert_eq!(status, 200, "{new}");
    let rel = new["snapshotRelPath"].as_str().unwrap();
    assert!(rel.starts_with("sandbox-template-builds/build-") && rel.ends_with(".tlsnap"), "{rel}");
    assert!(new.get("snapshotUri").is_none() && new.get("upload").is_none(), "{new}");
    for field in ["buildId", "snapshotId", "rootfsNodeKind", "builder", "runtimeContract"] {
        assert!(new.get(field).is_some(), "prepare lacks {field}: {new}");
    }
    assert_eq!(new["builder"]["command"], "tl-rootfs-build");

    let (_, legacy) = api.prepare("base", SCRATCH, None, Some("legacy")).await;
    assert!(legacy.get("snapshotRelPath").is_none());
    let uri = legacy["snapshotUri"].as_str().unwrap();
    assert!(uri.starts_with("s3://snapshots/builds/default/sandbox-template-builds/"), "{uri}");
    assert_eq!(legacy["upload"]["kind"], "single_put");
    assert!(legacy["upload"]["url"].as_str().unwrap().contains("X-Amz-Signature="));

    let (_, both) = api.prepare("base", SCRATCH, None, Some("both")).await;
    assert!(both["snapshotRelPath"].is_string() && both["snapshotUri"].as_str().unwrap().contains("/stale/"), "{both}");

    let (status, bad) = api.prepare("base", SCRATCH, None, Some("sideways")).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_header")));
    let (status, missing) = api.prepare("child", "FROM base\n", Some("no-such-template"), None).await;
    assert_eq!((status, missing["code"].as_str()), (400, Some("unknown_parent")), "{missing}");
    // The request is read as the wire model's PrepareRequest: a field at
    // fault is named, and what the official client may leave out is optional.
    let builds = "/platform/v1/sandbox-template-builds";
    let lean = json!({"name": "lean", "dockerfile": SCRATCH, "rootfsNodeKind": "base"});
    let (status, answer) = api.post(builds, lean.clone()).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["additionalLocalImages"], json!([]), "always answered, empty when none were asked");
    for (change, code, named) in [
        (json!({"public": "yes"}), "invalid_field", "public: invalid type"),
        (json!({"parentTemplate": {"templateId": 7}}), "invalid_field", "parentTemplate.templateId: invalid type"),
        (json!({"dockerfile": null}), "invalid_field", "dockerfile: invalid type"),
        (json!({"name": ""}), "missing_field", "field 'name' is required"),
        (json!({"rootfsNodeKind": "diff"}), "missing_field", "a diff build needs parentTemplate"),
        (
            json!({"additionalLocalImages": [{"reference": "tools"}]}),
            "unknown_local_image",
            "additionalLocalImages entry 'tools' is not a registered template",
        ),
    ] {
        let mut body = lean.clone();
        body.as_object_mut().unwrap().extend(change.as_object().unwrap().clone());
        let (status, answer) = api.post(builds, body).await;
        assert_eq!((status, answer["code"].as_str()), (400, Some(code)), "{change}: {answer}");
        assert!(answer["message"].as_str().unwrap().contains(named), "{change}: {answer}");
    }
    let (status, answer) = api.post(builds, json!(["not", "an", "object"])).await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("invalid_body")), "{answer}");
    let (status, answer) = api.post(builds, json!({"name": "x", "rootfsNodeKind": "base"})).await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("missing_field")), "{answer}");
    assert!(answer["message"].as_str().unwrap().contains("missing field `dockerfile`"), "{answer}");
    let (status, json) = api.get("/platform/v1/sandbox-templates/by-name/tensorlake%2Fpython%3A3.12").await;
    assert_eq!((status, json["code"].as_str()), (404, Some("template_not_found")));
    // PAT mode: the path's scope must come as headers too, the same one.
    let pat = format!("{}/platform/v1/organizations/o/projects/p/sandbox-templates/by-name/x", api.base);
    let scoped = |org: &str, project: &str| {
        api.http.get(&pat).header("x-forwarded-organization-id", org).header("x-forwarded-project-id", project)
    };
    let (status, json) = api.send(scoped("o", "p")).await;
    assert_eq!((status, json["code"].as_str()), (404, Some("template_not_found")), "{json}");
    let (status, json) = api.send(api.http.get(&pat)).await;
    assert_eq!((status, json["code"].as_str()), (401, Some("unauthorized")), "{json}");
    assert!(json["message"].as_str().unwrap().starts_with("Organization ID and project ID are required"), "{json}");
    let (status, json) = api.send(scoped("o", "other")).await;
    assert_eq!((status, json["code"].as_str()), (403, Some("scope_mismatch")), "{json}");
    // No token at all.
    let anonymous = reqwest::get(format!("{}/platform/v1/sandbox-templates/by-name/x", api.base)).await.unwrap();
    assert_eq!(anonymous.status(), 401);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pending_sandbox_answers_200_pending_its_proxy_502_then_runs_and_delete_tears_it_down() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |c| c.pending = std::time::Duration::from_secs(2)).await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    let (status, info) = api.send(api.http.get(api.lifecycle(&format!("/{id}")))).await;
    assert_eq!((status, info["status"].as_str(), info["id"].as_str()), (200, Some("pending"), Some(id.as_str())));
    assert!(info.get("sandbox_id").is_none(), "one id field (the public client refuses two): {info}");
    assert_eq!(info["resources"]["disk_mb"], info["resources"]["ephemeral_disk_mb"], "{info}");
    assert!(info["resources"]["disk_mb"].is_u64(), "{info}");
    let (status, early) = api.send(api.proxy(Method::GET, &id, "/api/v1/health")).await;
    assert_eq!((status, early["code"].as_str()), (502, Some("PROXY_ERROR")), "the proxy is not ready yet");
    assert!(early["message"].as_str().unwrap().contains("Failed to proxy request"), "{early}");
    let waited = api.wait_running(&id).await;
    assert!(waited.pending >= 1 && waited.transient == 0, "{waited:?}");
    let (status, health) = api.send(api.proxy(Method::GET, &id, "/api/v1/health")).await;
    assert_eq!((status, &health), (200, &json!({"healthy": true})));
    let (status, info) = api.send(api.http.get(api.lifecycle(&format!("/{id}")))).await;
    assert_eq!((status, info["status"].as_str()), (200, Some("running")));
    assert_eq!((info["namespace"].as_str(), info["resources"]["memory_mb"].as_i64()), (Some("default"), Some(1024)));

    let sandbox_dir = dir.path().join("sandboxes").join(&id);
    assert!(sandbox_dir.exists());
    let (status, _) = api.send(api.http.delete(api.lifecycle(&format!("/{id}")))).await;
    assert_eq!(status, 200);
    assert!(!sandbox_dir.exists(), "delete removes the sandbox");
    let (status, _) = api.send(api.http.get(api.lifecycle(&format!("/{id}")))).await;
    assert_eq!(status, 404);
    // Another namespace's path is refused.
    let (status, _) = api.send(api.http.get(format!("{}/v1/namespaces/other/sandboxes/{id}", api.base))).await;
    assert_eq!(status, 403);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_faults_answer_502_while_pending_and_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |c| {
        c.faults.lifecycle_502_while_pending = true;
        c.faults.pending_502s = 3;
    })
    .await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    let waited = api.wait_running(&id).await;
    assert_eq!(waited.pending, 0, "no 200 pending under the seed-era gateway fault: {waited:?}");
    assert!(waited.transient >= 4, "502s while pending, then the 3 extra ones: {waited:?}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_stream_over_sse_with_replay_and_report_their_exit() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    api.wait_running(&id).await;

    let (events, info) = api.run(&id, "/bin/sh", &["-c", "echo one; echo two >&2; exit 7"], false).await;
    let lines: Vec<(&str, &str)> =
        events.iter().map(|e| (e["stream"].as_str().unwrap(), e["line"].as_str().unwrap())).collect();
    assert!(lines.contains(&("stdout", "one")) && lines.contains(&("stderr", "two")), "{lines:?}");
    assert!(events.iter().all(|e| e["timestamp"].is_number()));
    assert_eq!((info["exit_code"].as_i64(), info["status"].as_str()), (Some(7), Some("exited")));
    let pid = info["pid"].as_i64().unwrap();
    assert_eq!(api.follow(&id, pid).await, events, "a second follow replays from the start");

    let (status, list) = api.send(api.proxy(Method::GET, &id, "/api/v1/processes")).await;
    assert_eq!(status, 200);
    let listed = &list["processes"][0];
    assert_eq!(
        (listed["command"].as_str(), &listed["args"]),
        (Some("/bin/sh"), &json!(["-c", "echo one; echo two >&2; exit 7"]))
    );

    let (_, root) = api.run(&id, "/usr/bin/id", &["-u"], true).await;
    assert_eq!(root["exit_code"], 0);

    // One-shot run: Started, Output, Exited events.
    let response = api
        .proxy(Method::POST, &id, "/api/v1/processes/run")
        .bearer_auth(&api.token)
        .json(&json!({"command": "/bin/sh", "args": ["-lc", "echo diag"], "user": "root", "timeout": 5}))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let frames: Vec<Value> =
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect();
    assert!(frames[0]["pid"].is_i64() && frames[0]["started_at"].is_number(), "{frames:?}");
    assert!(frames.iter().any(|f| f["line"] == "diag"));
    assert_eq!(frames.last().unwrap()["exit_code"], 0);
    stack.shutdown().await;
}

/// Host pids of processes whose command line holds `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(marker))
        })
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// A one-shot run ends everything it started, when it ends and when it
/// times out: children left in the background (holding its output or not,
/// in its process group or in a session of their own) do not outlive it.
#[tokio::test(flavor = "multi_thread")]
async fn a_one_shot_run_ends_its_background_children_when_it_ends_or_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    api.wait_running(&id).await;
    let run = |script: &'static str, timeout: f64| {
        let request = api
            .proxy(Method::POST, &id, "/api/v1/processes/run")
            .bearer_auth(&api.token)
            .json(&json!({"command": "/bin/sh", "args": ["-c", script], "timeout": timeout}));
        async move {
            let text = request.send().await.unwrap().text().await.unwrap();
            text.lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .map(|d| serde_json::from_str(d).unwrap())
                .collect::<Vec<Value>>()
        }
    };
    // Ends at once; one child holds the output (so the run times out), one does not, one left the group.
    let frames = run("sleep 4101 & sleep 4102 >/dev/null 2>&1 & setsid sleep 4103 >/dev/null 2>&1 & exit 0", 1.0).await;
    assert!(frames.last().unwrap().get("exit_code").is_some(), "the run reports its end: {frames:?}");
    for marker in ["sleep 4101", "sleep 4102"] {
        assert_eq!(processes_with(marker), Vec::<String>::new(), "{marker} outlived its run");
    }
    // What left the process group is found through the process's own cgroup; a rootless
    // sandbox without a delegated cgroup has none, and that child lives until the sandbox ends.
    let per_process_cgroup = stack.sandbox_mode.contains("cgroup");
    assert_eq!(processes_with("sleep 4103").is_empty(), per_process_cgroup, "{}", stack.sandbox_mode);
    // A run that ends by itself with a quiet background child: that child ends too.
    let frames = run("sleep 4104 >/dev/null 2>&1 & echo done", 5.0).await;
    assert!(frames.iter().any(|f| f["line"] == "done"), "{frames:?}");
    assert_eq!(processes_with("sleep 4104"), Vec::<String>::new(), "sleep 4104 outlived its run");
    stack.shutdown().await;
    assert_eq!(processes_with("sleep 4103"), Vec::<String>::new(), "deleting the sandbox ends everything in it");
}

#[tokio::test(flavor = "multi_thread")]
async fn files_round_trip_through_the_proxy_and_sign_goes_to_the_signer() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    api.wait_running(&id).await;
    let path = "/var/lib/tensorlake/rootfs-builder/build/spec.json";
    api.put_file(&id, path, b"{\"spec\": true}".to_vec()).await;
    let (events, _) = api.run(&id, "/bin/cat", &[path], false).await;
    assert_eq!(events[0]["line"], "{\"spec\": true}");
    assert_eq!(api.get_file(&id, path).await.as_deref(), Some(&b"{\"spec\": true}"[..]));
    let del = api
        .proxy(Method::DELETE, &id, "/api/v1/files")
        .query(&[("path", path)])
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap();
    assert!(del.status().is_success());
    let gone = api.send(api.proxy(Method::GET, &id, "/api/v1/files").query(&[("path", path)])).await;
    assert_eq!(gone.0, 404, "a deleted file is gone: {}", gone.1);

    let sign = json!({"target": {"kind": "artifact", "rel_path": "projects/p/sandbox-template-builds/b/s.tlsnap"},
                      "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 67108864}}});
    let (status, signed) = api.send(api.proxy(Method::POST, &id, "/api/v1/blob/sign").json(&sign)).await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["uri"], "s3://snapshots/builds/default/projects/p/sandbox-template-builds/b/s.tlsnap");
    assert_eq!(signed["partUrls"].as_array().unwrap().len(), 2);
    stack.shutdown().await;
}

/// Uploads `bytes` through the legacy presigned PUT of `prepared`.
async fn upload_legacy(api: &Api, prepared: &Value, bytes: &[u8]) {
    let response = api.http.put(prepared["upload"]["url"].as_str().unwrap()).body(bytes.to_vec()).send().await.unwrap();
    assert_eq!(response.status(), 200);
}

fn completion(prepared: &Value, size: usize) -> Value {
    json!({"snapshotId": prepared["snapshotId"], "snapshotUri": prepared["snapshotUri"],
           "snapshotFormatVersion": "snapsign_tar_zstd_v1", "snapshotSizeBytes": size,
           "rootfsDiskBytes": 10737418240u64, "rootfsNodeKind": "base"})
}

#[tokio::test(flavor = "multi_thread")]
async fn complete_checks_the_object_registers_once_and_the_template_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let (_, prepared) = api.prepare("base-image", SCRATCH, None, Some("legacy")).await;
    let build = prepared["buildId"].as_str().unwrap().to_owned();
    let complete = format!("/platform/v1/sandbox-template-builds/{build}/complete");

    let (status, missing) = api.post(&complete, completion(&prepared, 5)).await;
    assert_eq!((status, missing["code"].as_str()), (400, Some("object_missing")), "{missing}");
    upload_legacy(&api, &prepared, b"snapshot-bytes").await;
    let (status, wrong) = api.post(&complete, completion(&prepared, 999)).await;
    assert_eq!((status, wrong["code"].as_str()), (400, Some("size_mismatch")));
    assert!(wrong["message"].as_str().unwrap().contains("999") && wrong["message"].as_str().unwrap().contains("14"));
    let mut elsewhere = completion(&prepared, 14);
    elsewhere["snapshotUri"] = json!("s3://snapshots/builds/default/other.tlsnap");
    let (status, wrong_uri) = api.post(&complete, elsewhere).await;
    assert_eq!((status, wrong_uri["code"].as_str()), (400, Some("wrong_snapshot_uri")));
    let mut no_size = completion(&prepared, 14);
    no_size.as_object_mut().unwrap().remove("snapshotSizeBytes");
    let (status, _) = api.post(&complete, no_size).await;
    assert_eq!(status, 400);
    let (status, lookup) = api.get("/platform/v1/sandbox-templates/by-name/base-image").await;
    assert_eq!(status, 404, "nothing registered by failed completions: {lookup}");

    let (status, template) = api.post(&complete, completion(&prepared, 14)).await;
    assert_eq!(status, 200, "{template}");
    assert!(template["id"].as_str().unwrap().starts_with("tpl-"));
    // A client retrying after a lost answer: the same body answers the same template.
    let (status, again) = api.post(&complete, completion(&prepared, 14)).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again, template);
    // Another body is not the same completion.
    let mut other = completion(&prepared, 14);
    other["rootfsDiskBytes"] = json!(1u64 << 20);
    let (status, conflict) = api.post(&complete, other).await;
    assert_eq!((status, conflict["code"].as_str()), (409, Some("already_completed")), "{conflict}");
    let message = conflict["message"].as_str().unwrap();
    assert!(message.contains("rootfsDiskBytes 10737418240") && message.contains("says 1048576"), "{message}");
    stack.shutdown().await;

    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let (status, found) = api.get("/platform/v1/sandbox-templates/by-name/base-image").await;
    assert_eq!(status, 200, "template survives a restart: {found}");
    assert_eq!(
        (found["id"].as_str(), found["snapshotId"].as_str()),
        (template["id"].as_str(), prepared["snapshotId"].as_str())
    );
    assert_eq!(found["snapshotSizeBytes"], 14);
    // The build client reads the same answer through the wire model's lookup view.
    let read: snapsign::wire::TemplateFound = serde_json::from_value(found.clone()).unwrap();
    assert_eq!(
        (read.id.as_str(), read.name.as_str(), read.public),
        (template["id"].as_str().unwrap(), "base-image", false)
    );
    // A diff build now gets the parent block.
    let (status, child) = api.prepare("child", "FROM base-image\n", Some("base-image"), None).await;
    assert_eq!(status, 200, "{child}");
    assert_eq!(child["rootfsNodeKind"], "diff");
    assert_eq!(child["parent"]["parentManifestUri"], prepared["snapshotUri"]);
    assert_eq!(child["parent"]["rootfsDiskBytes"], 10737418240u64);
    assert_eq!(child["parent"]["snapshotSha256"].as_str().unwrap().len(), 64);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn each_platform_fault_switch_fails_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let set = |faults: Faults| {
        let request = api.http.put(format!("{}/_snapsign/faults", api.base)).json(&faults);
        api.send_as(&stack.admin_token, request)
    };

    assert_eq!(set(Faults { terminate_sandbox: true, ..Faults::default() }).await.0, 200);
    let id = api.create_sandbox().await;
    // The fault terminates the sandbox once it would run: wait for that, bounded.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (status, info) = api.send(api.http.get(api.lifecycle(&format!("/{id}")))).await;
        assert_eq!(status, 200, "{info}");
        match info["status"].as_str() {
            Some("terminated") => break,
            Some("pending") => {}
            other => panic!("sandbox {id} went to {other:?} instead of terminated: {info}"),
        }
        assert!(std::time::Instant::now() < deadline, "sandbox {id} was never terminated: {info}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    set(Faults::default()).await;
    api.wait_running(&id).await;
    let sign = json!({"target": {"kind": "artifact", "rel_path": "s.tlsnap"},
                      "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 5242880}}});
    set(Faults { sign_fail: true, ..Faults::default() }).await;
    let (status, failed) = api.send(api.proxy(Method::POST, &id, "/api/v1/blob/sign").json(&sign)).await;
    assert_eq!((status, failed["code"].as_str()), (502, Some("sign_failed")));

    set(Faults { sign_without_uri: true, ..Faults::default() }).await;
    let (status, no_uri) = api.send(api.proxy(Method::POST, &id, "/api/v1/blob/sign").json(&sign)).await;
    assert_eq!(status, 200);
    assert!(no_uri.get("uri").is_none() && no_uri["uploadId"].is_string(), "{no_uri}");

    set(Faults { store_fail_part: Some(2), ..Faults::default() }).await;
    let (_, signed) = api.send(api.proxy(Method::POST, &id, "/api/v1/blob/sign").json(&sign)).await;
    let part = |n: usize| signed["partUrls"][n]["url"].as_str().unwrap().to_owned();
    assert_eq!(api.http.put(part(0)).body(vec![0u8; 5242880]).send().await.unwrap().status(), 200);
    let second = api.http.put(part(1)).body(vec![1u8; 100]).send().await.unwrap();
    assert_eq!(second.status(), 500);
    assert!(second.text().await.unwrap().contains("injected fault"));

    set(Faults { complete_fail: true, ..Faults::default() }).await;
    let (_, prepared) = api.prepare("faulty", SCRATCH, None, Some("legacy")).await;
    upload_legacy(&api, &prepared, b"abc").await;
    let complete = format!("/platform/v1/sandbox-template-builds/{}/complete", prepared["buildId"].as_str().unwrap());
    let (status, failed) = api.post(&complete, completion(&prepared, 3)).await;
    assert_eq!((status, failed["code"].as_str()), (500, Some("injected_fault")));
    let (status, _) = api.get("/platform/v1/sandbox-templates/by-name/faulty").await;
    assert_eq!(status, 404, "a failed complete registers nothing");
    let unknown = api.http.put(format!("{}/_snapsign/faults", api.base)).json(&json!({"nope": 1}));
    let (status, bad) = api.send_as(&stack.admin_token, unknown).await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_faults")));
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_faults_endpoint_is_for_the_operator_only() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let url = format!("{}/_snapsign/faults", api.base);
    let evil = Faults { complete_fail: true, ..Faults::default() };
    // A namespace token (any tenant's) can neither set nor read the switches.
    let (status, refused) = api.send(api.http.put(&url).json(&evil)).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("operator_only")), "{refused}");
    let (status, _) = api.send(api.http.get(&url)).await;
    assert_eq!(status, 403);
    // No token at all, or a forged one.
    assert_eq!(reqwest::get(&url).await.unwrap().status(), 401);
    let (status, _) = api.send_as("ssadm.0000", api.http.put(&url).json(&evil)).await;
    assert_eq!(status, 403);
    assert_eq!(stack.platform.faults(), Faults::default(), "nothing was switched");
    // The operator can.
    let (status, set) = api.send_as(&stack.admin_token, api.http.put(&url).json(&evil)).await;
    assert_eq!((status, set["complete_fail"].as_bool()), (200, Some(true)));
    let (status, read) = api.send_as(&stack.admin_token, api.http.get(&url)).await;
    assert_eq!((status, read["complete_fail"].as_bool()), (200, Some(true)));
    stack.shutdown().await;
}

/// Checks the object a build left in the store against its metadata.json.
async fn assert_object_matches_metadata(stack: &snapsign_dev_stack::DevStack, built: &common::dev::Built) {
    assert_eq!(built.builder_exit["exit_code"], 0, "builder failed: {:#?}", built.builder_lines);
    let uri = built.metadata["snapshot_uri"].as_str().expect("metadata names the snapshot");
    let (size, sha256) = stack.platform.platform_api().object_digest(uri).await.map_err(|e| e.message).unwrap();
    assert_eq!(Some(size), built.metadata["snapshot_size_bytes"].as_u64(), "{uri}");
    assert_eq!(Some(sha256.as_str()), built.metadata["sha256"].as_str(), "{uri}");
    assert_eq!(built.complete.0, 200, "complete: {}", built.complete.1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_builder_uploads_by_single_put_multipart_and_diff_and_metadata_matches_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let hello: &[u8] = b"hello\n";
    let dockerfile = "FROM scratch\nCOPY hello.txt /hello.txt\nCMD [\"/hello\"]\n";

    let legacy = api.build("legacy-put", dockerfile, &[("hello.txt", hello)], None, "legacy", 256).await;
    assert_eq!(legacy.spec["upload"]["kind"], "single_put");
    assert_object_matches_metadata(&stack, &legacy).await;
    assert!(legacy.builder_lines.iter().any(|l| l.contains("one PUT")), "{:#?}", legacy.builder_lines);

    let multipart = api.build("base", dockerfile, &[("hello.txt", hello)], None, "new", 256).await;
    assert_eq!(multipart.spec["upload"]["kind"], "s3_multipart");
    assert_eq!(multipart.spec["upload"]["partUrls"].as_array().unwrap().len(), 4, "256 MiB / 64 MiB parts");
    assert_eq!(multipart.metadata["snapshot_uri"], multipart.spec["snapshotUri"]);
    assert_object_matches_metadata(&stack, &multipart).await;

    let more: &[u8] = b"more\n";
    let diff = api
        .build("child", "FROM base\nCOPY more.txt /more.txt\n", &[("more.txt", more)], Some("base"), "new", 256)
        .await;
    assert_eq!(diff.spec["parent"]["download"]["kind"], "single_get");
    assert_eq!(diff.metadata["rootfs_node_kind"], "diff");
    assert_eq!(diff.metadata["parent_manifest_uri"], multipart.metadata["snapshot_uri"]);
    assert_object_matches_metadata(&stack, &diff).await;
    assert_eq!(diff.complete.1["parentManifestUri"], multipart.metadata["snapshot_uri"]);
    stack.shutdown().await;
}

/// Every file under `dir` whose name contains `needle`.
fn files_named(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(files_named(&path, needle));
        } else if entry.file_name().to_string_lossy().contains(needle) {
            found.push(path);
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stack_killed_mid_build_fails_the_build_and_aborts_its_upload_at_restart() {
    let data = tempfile::tempdir().unwrap();
    let mut dev = common::process::DevProcess::start(data.path(), &["--pending-ms", "100"]);
    let api = Api {
        http: reqwest::Client::new(),
        base: dev.api.clone(),
        token: dev.token.clone(),
        namespace: "default".into(),
    };
    let (status, prepared) = api.prepare("doomed", SCRATCH, None, Some("new")).await;
    assert_eq!(status, 200, "{prepared}");
    let build_id = prepared["buildId"].as_str().unwrap().to_owned();
    let sandbox = api.create_sandbox().await;
    api.wait_running(&sandbox).await;
    let rel = prepared["snapshotRelPath"].as_str().unwrap();
    let sign = json!({"target": {"kind": "artifact", "rel_path": rel},
                      "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 2, "part_size_bytes": 5242880}}});
    let (status, signed) = api.send(api.proxy(Method::POST, &sandbox, "/api/v1/blob/sign").json(&sign)).await;
    assert_eq!(status, 200, "{signed}");
    let upload_id = signed["uploadId"].as_str().unwrap().to_owned();
    let part = |n: usize| signed["partUrls"][n]["url"].as_str().unwrap().to_owned();
    let first = api.http.put(part(0)).body(vec![7u8; 5 << 20]).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert!(!files_named(&data.path().join("store"), &upload_id).is_empty(), "the part is on disk before the kill");

    // The stack dies mid-build, as `kill -9` or a power cut would do it.
    dev.stop(9);
    // Same store address, so the old part URLs (signed for that host) address it.
    let store = dev.store.trim_start_matches("http://").to_owned();
    let mut dev = common::process::DevProcess::start(data.path(), &["--store-listen", &store]);
    assert!(
        dev.banner.iter().any(|l| l.contains("recovered") && l.contains(&build_id)),
        "the restart says what it cleaned: {:#?}",
        dev.banner
    );
    let minting = format!("snapsign token --namespace NS --data-dir {}", data.path().display());
    assert!(dev.banner.iter().any(|l| l.contains(&minting)), "the banner says how to mint a token: {:#?}", dev.banner);
    // The upload is gone: no part file left, and its part URLs no longer take bytes.
    assert!(files_named(&data.path().join("store"), &upload_id).is_empty(), "parts and record removed");
    let late = api.http.put(part(1)).body(vec![8u8; 1024]).send().await.unwrap();
    assert!(!late.status().is_success(), "an aborted upload takes no part: {}", late.status());
    // The build can no longer complete, and says why.
    let api = Api { base: dev.api.clone(), ..api };
    let complete = format!("/platform/v1/sandbox-template-builds/{build_id}/complete");
    let (status, refused) = api.post(&complete, json!({})).await;
    assert_eq!((status, refused["code"].as_str()), (409, Some("build_failed")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains(&upload_id), "{refused}");
    // No sandbox survives the dead stack.
    let sandboxes = data.path().join("sandboxes");
    assert!(std::fs::read_dir(&sandboxes).map(|d| d.count()).unwrap_or(0) == 0, "sandboxes cleaned");

    dev.stop(15);
    let state = snapsign_dev_stack::state::State::open(&data.path().join("state.db")).unwrap();
    let build = state.build(&build_id).unwrap().unwrap();
    assert_eq!(build.state, "failed");
    assert!(build.failure.as_deref().unwrap().contains("interrupted"), "{build:?}");
    assert!(state.open_uploads(&build_id).unwrap().is_empty());
    assert!(state.prepared_builds().unwrap().is_empty(), "a second restart has nothing to do");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_signer_refuses_at_sign_time_exactly_the_keys_the_store_cannot_hold() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let id = api.create_sandbox().await;
    api.wait_running(&id).await;
    let limit = snapsign_dev_stack::store::max_key_bytes("snapshots");
    let room = limit - "builds/default/".len();
    let sign = |rel: String| {
        let body = json!({"target": {"kind": "artifact", "rel_path": rel}, "op": {"kind": "put_artifact"}});
        api.send(api.proxy(Method::POST, &id, "/api/v1/blob/sign").json(&body))
    };
    // The longest key the store holds is signed, and the store takes it.
    let (status, signed) = sign("k".repeat(room)).await;
    assert_eq!(status, 200, "{signed}");
    let put = api.http.put(signed["url"].as_str().unwrap()).body("fits").send().await.unwrap();
    assert_eq!(put.status(), 200);
    // One byte more is refused before anything is signed.
    let (status, refused) = sign("k".repeat(room + 1)).await;
    assert_eq!((status, refused["code"].as_str()), (400, Some("invalid_rel_path")), "{refused}");
    assert!(refused["message"].as_str().unwrap().contains(&format!("at most {limit} bytes")), "{refused}");
    assert!(!refused.to_string().contains("X-Amz-Signature"), "{refused}");
    stack.shutdown().await;
}

/// Registers `name` through a legacy prepare, its upload and complete; a
/// diff on `parent` (a template name) when given.
async fn register(api: &Api, name: &str, parent: Option<&str>) -> Value {
    let dockerfile = parent.map(|p| format!("FROM {p}\n")).unwrap_or_else(|| SCRATCH.to_owned());
    let (status, prepared) = api.prepare(name, &dockerfile, parent, Some("legacy")).await;
    assert_eq!(status, 200, "{prepared}");
    upload_legacy(api, &prepared, b"snapshot-bytes").await;
    let mut body = completion(&prepared, 14);
    if parent.is_some() {
        body["rootfsNodeKind"] = json!("diff");
        body["parentManifestUri"] = prepared["parent"]["parentManifestUri"].clone();
    }
    let build = prepared["buildId"].as_str().unwrap();
    let (status, template) = api.post(&format!("/platform/v1/sandbox-template-builds/{build}/complete"), body).await;
    assert_eq!(status, 200, "{template}");
    template
}

/// `snapsign templates ls | describe | rm` against the emulator: pages,
/// another namespace kept out, and a parent refused while a diff is built on it.
#[tokio::test(flavor = "multi_thread")]
async fn templates_are_listed_by_page_described_and_removed_children_first() {
    let dir = tempfile::tempdir().unwrap();
    let stack = start_stack(dir.path(), |_| {}).await;
    let api = Api::new(&stack);
    let base = register(&api, "base-image", None).await;
    let child = register(&api, "child", Some("base-image")).await;
    let other = register(&api, "another", None).await;

    // Pages of one, by name, through nextCursor.
    let (status, page) = api.get("/platform/v1/sandbox-templates?limit=1").await;
    assert_eq!(status, 200, "{page}");
    assert_eq!((page["items"][0]["name"].as_str(), page["nextCursor"].as_str()), (Some("another"), Some("another")));
    let (_, page) = api.get("/platform/v1/sandbox-templates?limit=2&cursor=another").await;
    let names: Vec<&str> = page["items"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!((names, page["nextCursor"].clone()), (vec!["base-image", "child"], Value::Null));
    let (status, bad) = api.get("/platform/v1/sandbox-templates?limit=0").await;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_limit")), "{bad}");

    // The CLI's client: every page, the lookup, the removal.
    let client = snapsign_host::templates::Templates::new(&stack.api_url(), &stack.token, None).unwrap();
    let all = client.list().await.unwrap();
    assert_eq!(all.iter().map(|t| &t["id"]).collect::<Vec<_>>(), [&other["id"], &base["id"], &child["id"]]);
    assert_eq!(client.describe("child").await.unwrap()["id"], child["id"]);

    // Another namespace sees nothing of these private templates and removes nothing.
    let stranger =
        snapsign_host::templates::Templates::new(&stack.api_url(), &stack.token_for("other").unwrap(), None).unwrap();
    assert!(stranger.list().await.unwrap().is_empty());
    let id = base["id"].as_str().unwrap();
    let (status, hidden) = api
        .send_as(
            &stack.token_for("other").unwrap(),
            api.http.delete(format!("{}/platform/v1/sandbox-templates/{id}", api.base)),
        )
        .await;
    assert_eq!((status, hidden["code"].as_str()), (404, Some("template_not_found")), "{hidden}");

    // The parent stays while a diff template is built on it.
    let refused = client.remove("base-image").await.unwrap_err().to_string();
    assert!(refused.contains("HTTP 409") && refused.contains("template_in_use"), "{refused}");
    assert!(refused.contains("yours: child"), "{refused}");
    assert_eq!(client.describe("base-image").await.unwrap()["id"], base["id"], "still registered");

    // The same through the command line.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
            .arg("templates")
            .args(args)
            .args(["--api-url", &stack.api_url(), "--token", &stack.token])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, err) = cli(&["ls", "--json"]);
    assert_eq!(code, Some(0), "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 3, "{out}");
    let (code, out, _) = cli(&["ls"]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("NAME") && out.contains("child") && out.contains("diff"), "{out}");
    let (code, out, _) = cli(&["describe", "child", "--json"]);
    assert_eq!((code, serde_json::from_str::<Value>(&out).unwrap()["id"].clone()), (Some(0), child["id"].clone()));
    let (code, _, err) = cli(&["rm", "base-image"]);
    assert_eq!(code, Some(1));
    assert!(err.starts_with("error: remove template 'base-image'") && err.contains("template_in_use"), "{err}");

    // Children first, then the parent: gone from lookups and lists.
    assert_eq!(client.remove("child").await.unwrap()["id"], child["id"]);
    assert_eq!(client.remove("base-image").await.unwrap()["id"], base["id"]);
    let (status, _) = api.get("/platform/v1/sandbox-templates/by-name/base-image").await;
    assert_eq!(status, 404);
    let gone = client.remove("base-image").await.unwrap_err().to_string();
    assert!(gone.contains("HTTP 404"), "{gone}");
    assert_eq!(client.list().await.unwrap().len(), 1);
    stack.shutdown().await;
}

/// Logs written to a pipe or a file carry no colour codes; on a terminal they would.
#[test]
fn logs_written_to_a_pipe_carry_no_colour_codes() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut store = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["store", "--listen", "127.0.0.1:0", "--bucket", "logs", "--dir"])
        .arg(dir.path())
        .env("SNAPSIGN_ACCESS_KEY_ID", "AKIDLOGS")
        .env("SNAPSIGN_SECRET_ACCESS_KEY", "logs-secret")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = std::io::BufReader::new(store.stderr.take().unwrap());
    let mut lines = Vec::new();
    for line in stderr.lines().map_while(Result::ok) {
        let listening = line.contains("S3 store listening");
        lines.push(line);
        if listening {
            break;
        }
    }
    let _ = store.kill();
    let _ = store.wait();
    assert!(lines.last().is_some_and(|l| l.contains("S3 store listening")), "{lines:#?}");
    assert!(lines.iter().all(|l| !l.contains('\u{1b}')), "escape codes in piped logs: {lines:?}");
}
