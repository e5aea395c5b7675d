//! End-to-end: the builder component in the host, against the dev stack
//! (platform emulator, local sandboxes, the reference builder, the
//! store and the signer), all on loopback.

mod common;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::dev::start_stack;
use serde_json::{Value, json};
use snapsign_dev_stack::{DevConfig, DevStack, Faults, PrepareShape};
use snapsign_host::image_build::{BuildEvent, BuildFailure, BuildOptions};
use snapsign_host::sandbox_exec::Compression;

fn options(stack: &DevStack, name: &str, dockerfile: &str, context: &Path) -> BuildOptions {
    let mut options = stack.build_options(name, dockerfile, context);
    options.request.sandbox_wait_secs = 30;
    options.timeout = Duration::from_secs(300);
    options.cache_dir = common::cache_dir();
    options
}

struct Run {
    outcome: Result<Value, BuildFailure>,
    events: Vec<BuildEvent>,
}

async fn build(options: &BuildOptions) -> Run {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let (outcome, _) = snapsign_host::image_build::run(options, Arc::new(move |e| sink.lock().unwrap().push(e)))
        .await
        .expect("the host runs the builder component");
    let events = events.lock().unwrap().clone();
    Run { outcome, events }
}

fn context(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

async fn stack_with(dir: &Path, edit: impl FnOnce(&mut DevConfig)) -> DevStack {
    start_stack(dir, edit).await
}

fn open_uploads(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir.join("store"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
        .collect()
}

async fn lookup(stack: &DevStack, name: &str) -> u16 {
    let url = format!("{}/platform/v1/sandbox-templates/by-name/{name}", stack.api_url());
    reqwest::Client::new().get(url).bearer_auth(&stack.token).send().await.unwrap().status().as_u16()
}

const BASE: &str = "FROM scratch\nCOPY hello.txt /etc/hello.txt\nENV GREETING=hi\nCMD [\"/bin/sh\"]\n";

#[tokio::test(flavor = "multi_thread")]
async fn base_then_diff_build_through_the_new_shape_with_parent_download() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[("hello.txt", b"hello from the base image\n")]);
    let run = build(&options(&stack, "base", BASE, ctx.path())).await;
    let base = run.outcome.unwrap_or_else(|e| panic!("base build failed: {e}\n{:#?}", run.events));
    assert!(base["id"].as_str().unwrap().starts_with("tpl-"));
    let uri = base["snapshotUri"].as_str().unwrap();
    assert!(uri.starts_with("s3://snapshots/builds/default/sandbox-template-builds/build-"), "signed uri: {uri}");
    assert_eq!(base["rootfsNodeKind"], "base");
    assert!(
        run.events.iter().any(|e| matches!(e, BuildEvent::Log(_, line) if line.contains("COPY"))),
        "builder log streamed"
    );
    for stage in ["prepare", "sandbox", "sign", "upload", "build", "complete"] {
        assert!(run.events.contains(&BuildEvent::Stage(stage.into())), "stage {stage} reported");
    }
    // The builder's metadata reaches the embedder as an event; its sha256 is the stored object's.
    let metadata: Vec<serde_json::Value> = run
        .events
        .iter()
        .filter_map(|e| if let BuildEvent::Metadata(json) = e { serde_json::from_str(json).ok() } else { None })
        .collect();
    assert_eq!(metadata.len(), 1, "one metadata event: {:#?}", run.events);
    let (size, sha256) = stack.platform.platform_api().object_digest(uri).await.unwrap();
    assert_eq!(metadata[0]["sha256"].as_str(), Some(sha256.as_str()), "{}", metadata[0]);
    assert_eq!(metadata[0]["snapshot_size_bytes"].as_u64(), Some(size), "{}", metadata[0]);
    assert!(stack.platform.live_sandboxes().is_empty(), "builder sandbox deleted");

    let child_ctx = context(&[("more.txt", b"added by the child\n")]);
    let child = build(&options(&stack, "child", "FROM base\nCOPY more.txt /etc/more.txt\n", child_ctx.path())).await;
    let child = child.outcome.unwrap_or_else(|e| panic!("diff build failed: {e}\n{:#?}", child.events));
    assert_eq!(child["rootfsNodeKind"], "diff");
    assert_eq!(child["parentManifestUri"], base["snapshotUri"]);
    assert!(open_uploads(dir.path()).is_empty());
    stack.shutdown().await;
}

/// PAT mode end to end: the platform calls go to the org/project paths with
/// the scope headers (the emulator refuses them otherwise), and the template
/// is then listed through the same scope.
#[tokio::test(flavor = "multi_thread")]
async fn a_pat_mode_build_registers_through_the_scoped_platform_paths() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[("hello.txt", b"hello from the base image\n")]);
    let scope = snapsign::image_build::call::Scope { organization: "org-1".into(), project: "proj-1".into() };
    let mut opts = options(&stack, "scoped", BASE, ctx.path());
    opts.request.scope = Some(scope.clone());
    let run = build(&opts).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("PAT build failed: {e}\n{:#?}", run.events));
    assert_eq!(template["name"], "scoped");
    // Prepare and complete came on the scoped paths, with the headers.
    assert!(stack.platform.scoped_requests() >= 2, "{} scoped requests", stack.platform.scoped_requests());
    let client = snapsign_host::templates::Templates::new(&stack.api_url(), &stack.token, Some(scope)).unwrap();
    assert_eq!(client.describe("scoped").await.unwrap()["id"], template["id"]);
    // The same paths without the headers are refused, naming what is missing.
    let unscoped = format!("{}/platform/v1/organizations/org-1/projects/proj-1/sandbox-templates", stack.api_url());
    let response = reqwest::Client::new().get(unscoped).bearer_auth(&stack.token).send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(response.text().await.unwrap().contains("Organization ID and project ID are required"));
    assert!(stack.platform.live_sandboxes().is_empty(), "builder sandbox deleted");
    stack.shutdown().await;
}

/// The client and the reference builder read a Dockerfile through one front end
/// (src/image_build/dockerfile): a global ARG default in FROM names the parent
/// template, a byte-order mark and CRLF change nothing, and an ARG without a
/// value is a warning at lookup and a named failure in the builder.
#[tokio::test(flavor = "multi_thread")]
async fn a_from_arg_default_and_a_byte_order_mark_build_on_the_template_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[("hello.txt", b"hello from the base image\n"), ("more.txt", b"added by the child\n")]);
    let run = build(&options(&stack, "base", BASE, ctx.path())).await;
    let base = run.outcome.unwrap_or_else(|e| panic!("base build failed: {e}\n{:#?}", run.events));

    let argued = "ARG BASE=base\nFROM $BASE\nCOPY more.txt /etc/more.txt\n";
    let run = build(&options(&stack, "argued", argued, ctx.path())).await;
    let child = run.outcome.unwrap_or_else(|e| panic!("ARG/FROM build failed: {e}\n{:#?}", run.events));
    assert_eq!(child["rootfsNodeKind"], "diff", "a diff of the template the ARG names");
    assert_eq!(child["parentManifestUri"], base["snapshotUri"]);
    let warnings: Vec<_> = run.events.iter().filter(|e| matches!(e, BuildEvent::Warning(_))).collect();
    assert!(warnings.is_empty(), "{warnings:?}");

    let marked =
        "\u{feff}# saved by an editor that writes a BOM\r\nFROM base\r\nCOPY \\\r\n  more.txt /etc/more.txt\r\n";
    let run = build(&options(&stack, "marked", marked, ctx.path())).await;
    let child = run.outcome.unwrap_or_else(|e| panic!("BOM/CRLF build failed: {e}\n{:#?}", run.events));
    assert_eq!(child["rootfsNodeKind"], "diff");
    assert_eq!(child["parentManifestUri"], base["snapshotUri"]);

    let unset = "ARG BASE\nFROM $BASE\nCOPY more.txt /etc/more.txt\n";
    let run = build(&options(&stack, "unset", unset, ctx.path())).await;
    assert!(
        run.events.contains(&BuildEvent::Warning(
            "Dockerfile line 2: FROM $BASE is not looked up as a template: ARG BASE has no value \
             (no default before the first FROM and no build argument)"
                .into()
        )),
        "{:#?}",
        run.events
    );
    assert!(matches!(run.outcome, Err(BuildFailure::Failed(_))), "{:?}", run.outcome);
    let said = |needle: &str| run.events.iter().any(|e| matches!(e, BuildEvent::Log(_, line) if line.contains(needle)));
    assert!(said("Dockerfile line 2: FROM $BASE: ARG BASE has no value"), "{:#?}", run.events);
    assert_eq!(lookup(&stack, "unset").await, 404);
    assert!(stack.platform.live_sandboxes().is_empty());
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn legacy_shape_is_unchanged_and_both_fields_let_the_signed_uri_win() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| c.shape = PrepareShape::Legacy).await;
    let ctx = context(&[("hello.txt", b"legacy\n")]);
    let run = build(&options(&stack, "legacy", BASE, ctx.path())).await;
    let legacy = run.outcome.unwrap_or_else(|e| panic!("legacy build failed: {e}\n{:#?}", run.events));
    assert!(!run.events.contains(&BuildEvent::Stage("sign".into())), "legacy builds do not sign");
    assert!(legacy["snapshotUri"].as_str().unwrap().starts_with("s3://snapshots/builds/default/"));
    stack.shutdown().await;

    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| c.shape = PrepareShape::Both).await;
    let run = build(&options(&stack, "both", BASE, ctx.path())).await;
    let both = run.outcome.unwrap_or_else(|e| panic!("both-fields build failed: {e}\n{:#?}", run.events));
    let uri = both["snapshotUri"].as_str().unwrap();
    assert!(!uri.contains("/stale/"), "the signed uri wins over the stale snapshotUri: {uri}");
    stack.shutdown().await;
}

/// `--build-arg`: the values reach the planner (a FROM names the parent
/// through one) and the reference builder (a stage's ARG), in the new and
/// the legacy prepare shape.
#[tokio::test(flavor = "multi_thread")]
async fn build_arguments_reach_the_from_lookup_and_the_builders_args_in_both_prepare_shapes() {
    let dockerfile = "ARG BASE=scratch\nFROM $BASE\nARG DIR=default-dir\nCOPY hello.txt /$DIR/hello.txt\n";
    for shape in [PrepareShape::New, PrepareShape::Legacy] {
        let dir = tempfile::tempdir().unwrap();
        let stack = stack_with(dir.path(), |c| c.shape = shape).await;
        let ctx = context(&[("hello.txt", b"built with arguments\n")]);
        let base = build(&options(&stack, "args-base", BASE, ctx.path())).await;
        base.outcome.unwrap_or_else(|e| panic!("{shape:?}: base build failed: {e}\n{:#?}", base.events));
        let mut opts = options(&stack, "args-child", dockerfile, ctx.path());
        opts.request.build_args = vec![("BASE".into(), "args-base".into()), ("DIR".into(), "from arg $x".into())];
        let run = build(&opts).await;
        let child = run.outcome.unwrap_or_else(|e| panic!("{shape:?}: build failed: {e}\n{:#?}", run.events));
        assert_eq!(child["rootfsNodeKind"], "diff", "{shape:?}: FROM $BASE found the template the argument names");
        let (_, _out, tree) = stored_snapshot(dir.path(), child["snapshotUri"].as_str().unwrap());
        let copied = std::fs::read_to_string(tree.host("from arg $x/hello.txt"));
        assert_eq!(copied.unwrap_or_else(|e| panic!("{shape:?}: {e}")), "built with arguments\n");
        assert!(!tree.host("default-dir").exists(), "{shape:?}: the default is replaced");
        stack.shutdown().await;
    }
}

/// The bytes of the context upload (the last progress event's total).
fn context_bytes(events: &[BuildEvent]) -> u64 {
    events
        .iter()
        .rev()
        .find_map(|e| if let BuildEvent::Upload(_, total) = e { Some(*total) } else { None })
        .expect("upload progress reported")
}

/// Only what COPY and ADD read leaves the machine (an unreferenced file that
/// would fill the builder's disk stays here), also across long paths and
/// escaping symlinks; a source through a symlink sends the whole context.
#[tokio::test(flavor = "multi_thread")]
async fn only_the_files_copy_reads_are_sent_unless_a_symlink_leads_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let unused = snapsign_rootfs_builder::sample::random(4 << 20, 7);
    let deep = vec!["d".repeat(60); 6].join("/");
    let ctx = context(&[("hello.txt", b"sent\n"), ("unused.bin", &unused), (&format!("{deep}/deep.txt"), b"deep\n")]);
    std::os::unix::fs::symlink("/etc/passwd", ctx.path().join("escape")).unwrap();
    std::os::unix::fs::symlink("hello.txt", ctx.path().join("link.txt")).unwrap();

    let dockerfile = format!("FROM scratch\nCOPY hello.txt /hello.txt\nCOPY {deep}/deep.txt /deep.txt\n");
    let run = build(&options(&stack, "narrow", &dockerfile, ctx.path())).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("narrow build failed: {e}\n{:#?}", run.events));
    assert!(
        context_bytes(&run.events) < 64 << 10,
        "the 4 MiB unreferenced file was sent: {} bytes",
        context_bytes(&run.events)
    );
    let (_, _out, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(tree.host("hello.txt")).unwrap(), "sent\n");
    assert_eq!(std::fs::read_to_string(tree.host("deep.txt")).unwrap(), "deep\n", "a 360-byte path arrives");

    // COPY follows a symlink that stays in the context, so its target must be there: all is sent.
    let run = build(&options(&stack, "through-link", "FROM scratch\nCOPY link.txt /l.txt\n", ctx.path())).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("symlink build failed: {e}\n{:#?}", run.events));
    assert!(context_bytes(&run.events) > 4 << 20, "the whole context: {} bytes", context_bytes(&run.events));
    let (_, _out, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(tree.host("l.txt")).unwrap(), "sent\n");
    stack.shutdown().await;
}

/// Builds `dockerfile` as namespace `namespace` (its own token), in `shape`.
async fn build_as(stack: &DevStack, namespace: &str, name: &str, dockerfile: &str, public: bool, shape: &str) -> Run {
    let ctx = context(&[("hello.txt", format!("{namespace}/{name}\n").as_bytes())]);
    let mut options = options(stack, name, dockerfile, ctx.path());
    options.namespace = namespace.into();
    options.request.token = stack.token_for(namespace).unwrap();
    options.request.public = public;
    stack.platform.set_shape(PrepareShape::parse(shape).unwrap());
    build(&options).await
}

#[tokio::test(flavor = "multi_thread")]
async fn another_namespaces_public_template_is_a_parent_in_both_shapes_and_a_private_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    // Docker Hub names go to a closed loopback port, not to the internet.
    let stack = stack_with(dir.path(), |c| c.registry_mirror = Some("127.0.0.1:1".into())).await;
    let published = build_as(&stack, "other", "pub-base", BASE, true, "new").await;
    let published = published.outcome.unwrap_or_else(|e| panic!("public base: {e}\n{:#?}", published.events));
    let secret = build_as(&stack, "other", "secret-base", BASE, false, "new").await;
    let secret = secret.outcome.unwrap_or_else(|e| panic!("private base: {e}"));
    let secret_uri = secret["snapshotUri"].as_str().unwrap();

    // FROM other/pub-base: a diff build on it, new shape (the proxy grants the
    // one read) and legacy shape (the platform presigns the read itself).
    for shape in ["new", "legacy"] {
        let name = format!("child-{shape}");
        let run =
            build_as(&stack, "default", &name, "FROM other/pub-base\nCOPY hello.txt /etc/child.txt\n", false, shape)
                .await;
        let child =
            run.outcome.unwrap_or_else(|e| panic!("{shape}: diff on a public template: {e}\n{:#?}", run.events));
        assert_eq!((child["rootfsNodeKind"].as_str(), child["namespace"].as_str()), (Some("diff"), Some("default")));
        assert_eq!(child["parentManifestUri"], published["snapshotUri"], "{shape}");
        assert!(child["snapshotUri"].as_str().unwrap().starts_with("s3://snapshots/builds/default/"), "{child}");
    }

    // FROM pub-base (the bare name) from another namespace: it is no template there and no
    // image to pull, and the error names the public template the user most likely meant.
    let run = build_as(&stack, "default", "bare", "FROM pub-base\nCOPY hello.txt /x\n", false, "new").await;
    let error = run.outcome.expect_err("a bare name of another namespace's template is not found").to_string();
    assert!(
        error.contains(
            "There is no template 'pub-base' in namespace 'default', but a public one of that name: \
                        write FROM other/pub-base"
        ),
        "{error}"
    );
    // A private template of that name elsewhere is never named.
    let run = build_as(&stack, "default", "bare-secret", "FROM secret-base\n", false, "new").await;
    let error = run.outcome.expect_err("no template secret-base here").to_string();
    assert!(error.contains("image_pull_failed") && !error.contains("There is no template"), "{error}");

    // FROM other/secret-base: refused before anything is prepared, in both shapes.
    for shape in ["new", "legacy"] {
        let run = build_as(&stack, "default", "thief", "FROM other/secret-base\n", false, shape).await;
        let failure = run.outcome.expect_err("a private template of another namespace is not a parent");
        let message = failure.to_string();
        assert!(message.contains("template_private") && message.contains("other/secret-base"), "{shape}: {message}");
        assert!(!run.events.contains(&BuildEvent::Stage("sandbox".into())), "{shape}: no sandbox was made");
    }
    assert_eq!(lookup(&stack, "thief").await, 404, "nothing registered");

    // Straight to the platform, past the lookup: prepare refuses the parent by id and by reference.
    let api = common::dev::Api::new(&stack);
    for shape in ["new", "legacy", "both"] {
        for parent in [
            serde_json::json!({"templateId": secret["id"], "name": "secret-base"}),
            serde_json::json!({"reference": "other/secret-base", "name": "secret-base"}),
        ] {
            let body = serde_json::json!({"name": "thief", "dockerfile": "FROM other/secret-base\n",
                "baseImage": "other/secret-base", "public": false, "rootfsNodeKind": "diff", "parentTemplate": parent});
            let request = api.http.post(format!("{}/platform/v1/sandbox-template-builds", api.base));
            let (status, refused) = api.send(request.header("x-snapsign-prepare-shape", shape).json(&body)).await;
            assert_eq!((status, refused["code"].as_str()), (403, Some("template_private")), "{shape}: {refused}");
        }
    }
    // And the signer gives no read of the private snapshot through a sandbox's proxy.
    let sandbox = api.create_sandbox().await;
    api.wait_running(&sandbox).await;
    let sign = |uri: &str| {
        let body = serde_json::json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}});
        api.send(api.proxy(reqwest::Method::POST, &sandbox, "/api/v1/blob/sign").json(&body))
    };
    let (status, refused) = sign(secret_uri).await;
    assert_eq!((status, refused["code"].as_str()), (403, Some("outside_namespace")), "{refused}");
    let (status, granted) = sign(published["snapshotUri"].as_str().unwrap()).await;
    assert_eq!((status, granted["kind"].as_str()), (200, Some("single_get")), "{granted}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sandbox_pending_with_502s_then_running_still_builds() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| {
        c.faults.lifecycle_502_while_pending = true;
        c.faults.pending_502s = 4;
    })
    .await;
    let ctx = context(&[("hello.txt", b"patience\n")]);
    let run = build(&options(&stack, "patient", BASE, ctx.path())).await;
    run.outcome.unwrap_or_else(|e| panic!("build failed: {e}"));
    stack.shutdown().await;
}

/// Runs a build under `faults` and checks the failure is clean.
async fn failing(faults: Faults, expect: &str) -> Run {
    failing_with(faults, |_| {}, expect).await
}

async fn failing_with(faults: Faults, edit: impl FnOnce(&mut BuildOptions), expect: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| c.faults = faults).await;
    let ctx = context(&[("hello.txt", b"doomed\n")]);
    let mut opts = options(&stack, "doomed", BASE, ctx.path());
    edit(&mut opts);
    let run = build(&opts).await;
    let Err(BuildFailure::Failed(message)) = &run.outcome else {
        panic!("expected a build failure containing {expect:?}, got {:?}", run.outcome)
    };
    assert!(message.contains(expect), "{message:?} should contain {expect:?}");
    assert!(message.contains("(builder sandbox: sbx-") && message.contains(", build: build-"), "{message}");
    assert!(stack.platform.live_sandboxes().is_empty(), "sandbox left behind after: {message}");
    assert!(open_uploads(dir.path()).is_empty(), "multipart upload left open after: {message}");
    assert_eq!(lookup(&stack, "doomed").await, 404, "a template was registered after: {message}");
    stack.shutdown().await;
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn each_fault_ends_in_a_clear_error_with_nothing_left_behind() {
    failing(Faults { terminate_sandbox: true, ..Faults::default() }, "terminated before reaching 'running'").await;
    failing(Faults { sign_fail: true, ..Faults::default() }, "dataplane sign request failed (HTTP 502)").await;
    let run = failing(
        Faults { sign_without_uri: true, ..Faults::default() },
        "dataplane signed upload response is missing uri",
    )
    .await;
    assert!(!run.events.contains(&BuildEvent::Stage("build".into())), "the builder never ran");
    assert!(!run.events.iter().any(|e| matches!(e, BuildEvent::Log(..))), "the builder never ran");
    // Without --allow-host for the store the upload is still aborted (the host admits the
    // DELETE of the abort URL the signer gave), and nothing warns that it could not be.
    let run = failing_with(
        Faults { sign_without_uri: true, ..Faults::default() },
        |o| o.allow_hosts.clear(),
        "dataplane signed upload response is missing uri",
    )
    .await;
    let warnings: Vec<&String> =
        run.events.iter().filter_map(|e| if let BuildEvent::Warning(w) = e { Some(w) } else { None }).collect();
    assert!(warnings.iter().any(|w| w.starts_with("aborted the multipart upload")), "{warnings:?}");
    assert!(!warnings.iter().any(|w| w.contains("cannot abort")), "{warnings:?}");
    failing(Faults { store_fail_part: Some(1), ..Faults::default() }, "failed with exit code").await;
    failing(Faults { builder_exit_nonzero: true, ..Faults::default() }, "failed with exit code 3").await;
    // A real OOM kill: the builder uses memory past its sandbox's 64 MiB (+ 256 MiB RAM-backed disk).
    let oom = failing_with(
        Faults { builder_oom: true, ..Faults::default() },
        |o| (o.request.builder_memory_mb, o.request.builder_disk_mb) = (Some(64), Some(64)),
        "(process was killed by the kernel OOM killer)",
    )
    .await;
    let Err(BuildFailure::Failed(message)) = &oom.outcome else { unreachable!() };
    assert!(
        message.contains("ran out of memory: retry with a larger --builder-memory-mb"),
        "diagnostics advise: {message}"
    );
    failing(
        Faults { metadata_missing_field: Some("rootfs_disk_bytes".into()), ..Faults::default() },
        "rootfs builder metadata is missing numeric rootfs_disk_bytes",
    )
    .await;
    failing(
        Faults { metadata_uri: Some("s3://snapshots/elsewhere.tlsnap".into()), ..Faults::default() },
        "did not match dataplane signed uri",
    )
    .await;
    failing(Faults { complete_fail: true, ..Faults::default() }, "failed to complete sandbox image build (HTTP 500")
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_context_larger_than_the_guest_memory_limit_is_streamed() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let mut big = vec![0u8; 40 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in big.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let ctx = context(&[("blob.bin", &big)]);
    let mut opts = options(&stack, "big", "FROM scratch\nCOPY blob.bin /blob.bin\n", ctx.path());
    opts.max_memory_bytes = 24 << 20;
    let run = build(&opts).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("big build failed: {e}"));
    assert!(template["snapshotSizeBytes"].as_u64().unwrap() > 30 << 20, "{template}");
    stack.shutdown().await;
}

/// The host packs the context (`upload-directory`). To the dev stack's
/// sandboxes, on this machine, it goes as a plain tar (`tar -xf`); with
/// `--compress-context always`, gzipped: random blocks stored, text
/// deflated, on every core, and the sandbox's `tar -xzf` unpacks it through
/// the builder's `gzip -d`. Either way every byte and permission bit arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_context_of_random_and_text_files_arrives_byte_for_byte_with_its_permission_bits() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let random = snapsign_rootfs_builder::sample::random(5 << 20, 7);
    let text: Vec<u8> = (0..120_000)
        .flat_map(|i| format!("line {i}: the quick brown fox builds a sandbox image\n").into_bytes())
        .collect();
    let ctx = context(&[
        ("data/random.bin", &random),
        ("data/text.txt", &text),
        ("data/deep/er/small.txt", b"small\n"),
        ("run.sh", b"#!/bin/sh\necho hi\n"),
        ("empty", b""),
    ]);
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(ctx.path().join("run.sh"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(ctx.path().join("data/text.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::symlink("data/text.txt", ctx.path().join("link")).unwrap();
    let raw = (random.len() + text.len()) as u64;
    for compression in [Compression::Auto, Compression::Always] {
        let mut opts = options(&stack, "mixed", "FROM scratch\nCOPY . /ctx/\n", ctx.path());
        opts.compression = compression;
        let run = build(&opts).await;
        let template = run.outcome.unwrap_or_else(|e| panic!("{compression:?}: {e}\n{:#?}", run.events));
        let sent = run
            .events
            .iter()
            .rev()
            .find_map(|e| if let BuildEvent::Upload(sent, total) = e { Some((*sent, *total)) } else { None })
            .expect("upload progress reported");
        assert_eq!(sent.0, sent.1, "the last progress event has the total");
        if compression == Compression::Always {
            // The random part goes stored (a little over its size), the text deflated (far under).
            assert!(sent.1 > random.len() as u64 && sent.1 < raw - text.len() as u64 / 2, "sent {} of {raw}", sent.1);
        } else {
            // Plain: every byte, plus the tar's headers and padding.
            assert!(sent.1 > raw && sent.1 < raw + 64 * 1024, "sent {} of {raw}", sent.1);
        }

        let (_, _keep, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
        let read = |rel: &str| std::fs::read(tree.host(rel)).unwrap_or_else(|e| panic!("/{rel}: {e}"));
        assert!(read("ctx/data/random.bin") == random, "{compression:?}: random bytes changed on the way");
        assert!(read("ctx/data/text.txt") == text, "{compression:?}: text changed on the way");
        assert_eq!(read("ctx/data/deep/er/small.txt"), b"small\n");
        assert_eq!(read("ctx/empty"), b"");
        let modes: std::collections::BTreeMap<String, u32> =
            tree.entries().unwrap().into_iter().map(|e| (e.rel, e.mode & 0o777)).collect();
        assert_eq!(modes["ctx/run.sh"], 0o750);
        assert_eq!(modes["ctx/data/text.txt"], 0o600);
        assert_eq!(std::fs::read_link(tree.host("ctx/link")).unwrap(), Path::new("data/text.txt"));
    }
    stack.shutdown().await;
}

/// Part URLs that expire during the upload (the stack presigns for 5 s, and
/// the builder waits 6 s before each part after the first): the builder
/// stops with the upload open and its archive kept, the client asks the
/// signer for fresh URLs of the same upload (`refresh_upload`), the builder
/// resumes, and the build registers the snapshot it wrote, with no upload
/// left open.
#[tokio::test(flavor = "multi_thread")]
async fn with_urls_that_expire_during_the_upload_the_build_finishes_through_fresh_urls() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |config| {
        config.url_ttl_secs = Some(5);
        config.faults = Faults { builder_delay_parts_ms: Some(6000), ..Faults::default() };
    })
    .await;
    // Incompressible and over one 64 MiB part: two parts.
    let random = snapsign_rootfs_builder::sample::random(70 << 20, 21);
    let ctx = context(&[("big.bin", &random)]);
    let run = build(&options(&stack, "expiring", "FROM scratch\nCOPY big.bin /big.bin\n", ctx.path())).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("build failed: {e}\n{:#?}", run.events));
    let refreshed: Vec<&String> = run
        .events
        .iter()
        .filter_map(|e| match e {
            BuildEvent::Warning(w) if w.contains("fresh URLs of the same upload") => Some(w),
            _ => None,
        })
        .collect();
    assert!(!refreshed.is_empty(), "no refresh: {:#?}", run.events);
    assert!(refreshed[0].contains("expired"), "{refreshed:?}");
    let logged = |needle: &str| run.events.iter().any(|e| matches!(e, BuildEvent::Log(_, l) if l.contains(needle)));
    assert!(logged("Resuming multipart upload"), "{:#?}", run.events);
    let (_, _keep, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
    assert!(std::fs::read(tree.host("big.bin")).unwrap() == random, "the snapshot does not hold what was copied");
    assert_eq!(lookup(&stack, "expiring").await, 200);
    assert!(open_uploads(dir.path()).is_empty(), "{:?}", open_uploads(dir.path()));
    stack.shutdown().await;
}

/// `.dockerignore` with Docker's semantics: what it leaves out never reaches
/// the sandbox (so `COPY . /app/` cannot copy it), exceptions reach inside
/// left-out directories, and the Dockerfile and `.dockerignore` are still sent.
#[tokio::test(flavor = "multi_thread")]
async fn dockerignore_keeps_matched_files_on_the_machine_as_docker_does() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ignore =
        "# not for the image\nnode_modules\n!node_modules/keep.js\n**/*.env\n/.git\nDockerfile\n.dockerignore\n";
    let ctx = context(&[
        (".dockerignore", ignore.as_bytes()),
        ("Dockerfile", b"FROM scratch\nCOPY . /app/\n"),
        ("node_modules/big/index.js", b"module"),
        ("node_modules/keep.js", b"kept"),
        ("config/prod.env", b"TOKEN=secret"),
        ("local.env", b"TOKEN=secret"),
        (".git/HEAD", b"ref: refs/heads/main"),
        ("src/app.py", b"print('hi')"),
    ]);
    let run = build(&options(&stack, "ignored", "FROM scratch\nCOPY . /app/\n", ctx.path())).await;
    let template = run.outcome.unwrap_or_else(|e| panic!("build failed: {e}\n{:#?}", run.events));
    let (_, _keep, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
    let mut files: Vec<String> = tree
        .entries()
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == snapsign_rootfs_builder::tree::Kind::File)
        .map(|e| e.rel)
        .collect();
    files.sort();
    assert_eq!(files, ["app/.dockerignore", "app/Dockerfile", "app/node_modules/keep.js", "app/src/app.py"]);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn usage_and_auth_errors_are_told_apart() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[]);
    let run = build(&options(&stack, "x", "COPY a b\n", ctx.path())).await;
    assert!(matches!(&run.outcome, Err(BuildFailure::Usage(m)) if m.contains("no FROM")), "{:?}", run.outcome);
    let mut bad = options(&stack, "x", BASE, ctx.path());
    bad.request.token = "sst1.forged.token".into();
    let run = build(&bad).await;
    assert!(matches!(&run.outcome, Err(BuildFailure::Auth(_))), "{:?}", run.outcome);
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_local_backend_builds_in_sandboxes_of_its_own() {
    use snapsign_host::outbound::AllowList;
    use snapsign_host::sandbox_exec::local::LocalBackend;
    use snapsign_sandbox::{Confinement, Sandboxes, SandboxesConfig};

    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let boxes = Arc::new(
        Sandboxes::new(SandboxesConfig {
            root_dir: dir.path().join("local-sandboxes"),
            confinement: Confinement::detect(false).unwrap(),
            builder_binary: Some(env!("CARGO_BIN_EXE_snapsign").into()),
        })
        .unwrap(),
    );
    // The builder reaches the store through the port forwarded into its sandbox.
    boxes.grant_ports(&[stack.store.addr().port()]);
    let backend = Arc::new(LocalBackend::new(boxes.clone(), &stack.signer.url(), &stack.token));
    let ctx = context(&[("hello.txt", b"built by the local backend\n")]);
    let opts = options(&stack, "local", BASE, ctx.path());
    let outbound = AllowList::new([
        stack.emulator.addr().to_string(),
        stack.signer.addr().to_string(),
        stack.store.addr().to_string(),
    ]);
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = events.clone();
    let (outcome, timings) =
        snapsign_host::image_build::run_with(&opts, backend, outbound, Arc::new(move |e| sink.lock().unwrap().push(e)))
            .await
            .unwrap();
    let template = outcome.unwrap_or_else(|e| panic!("local build failed: {e}\n{:#?}", events.lock().unwrap()));
    assert!(template["snapshotUri"].as_str().unwrap().starts_with("s3://snapshots/builds/default/"));
    assert!(timings.builder > Duration::ZERO && timings.run >= timings.builder);
    assert!(stack.platform.live_sandboxes().is_empty(), "no emulator sandbox was used");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("local-sandboxes")).unwrap().collect();
    assert!(left.is_empty(), "local sandbox deleted after the build");
    stack.shutdown().await;
}

fn cli(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(args)
        .envs(env.iter().copied())
        .env("SNAPSIGN_CACHE_DIR", common::cache_dir())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn snapsign_build_prints_json_and_its_exit_codes_tell_failures_apart() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[("hello.txt", b"from the CLI\n"), ("Dockerfile", BASE.as_bytes())]);
    let dockerfile = ctx.path().join("Dockerfile").display().to_string();
    let context_dir = ctx.path().display().to_string();
    let (api, token, store) = (stack.api_url(), stack.token.clone(), stack.store.addr().to_string());
    let in_context = context_dir.clone();
    let run = move |name: &'static str, token: String, dockerfile: String| {
        let (api, store, context_dir) = (api.clone(), store.clone(), in_context.clone());
        tokio::task::spawn_blocking(move || {
            cli(
                &[
                    "build",
                    "--name",
                    name,
                    "-f",
                    &dockerfile,
                    "--context",
                    &context_dir,
                    "--disk-mb",
                    "256",
                    "--allow-host",
                    &store,
                    "--json",
                ],
                &[("SNAPSIGN_API_URL", &api), ("SNAPSIGN_API_TOKEN", &token)],
            )
        })
    };
    // --json: one JSON object a line on stdout (NDJSON), the result last.
    let lines = |output: &std::process::Output| -> Vec<Value> {
        let text = String::from_utf8_lossy(&output.stdout).into_owned();
        text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))).collect()
    };
    let ok = run("cli-image", token.clone(), dockerfile.clone()).await.unwrap();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    let events = lines(&ok);
    let result = events.last().unwrap();
    assert_eq!((&result["event"], &result["template"]["name"]), (&json!("result"), &json!("cli-image")), "{events:#?}");
    let stages: Vec<&str> =
        events.iter().filter(|e| e["event"] == "stage").filter_map(|e| e["stage"].as_str()).collect();
    assert_eq!(stages[..8], ["plan", "prepare", "sandbox", "sign", "upload", "build", "complete", "cleanup"]);
    assert!(
        events.iter().any(|e| e["event"] == "log" && e["line"].as_str().unwrap().starts_with("Step 1/")),
        "{events:#?}"
    );
    let upload = events.iter().rfind(|e| e["event"] == "upload").expect("upload progress");
    assert!(upload["totalBytes"].as_u64().unwrap() > 0 && upload["sentBytes"] == upload["totalBytes"], "{upload}");
    assert_eq!(events.iter().filter(|e| e["event"] == "metadata").count(), 1, "{events:#?}");
    let stderr = String::from_utf8_lossy(&ok.stderr);
    assert!(!stderr.contains("==> build"), "with --json the progress goes to stdout only: {stderr}");

    let error_line = |output: &std::process::Output| lines(output).last().cloned().unwrap();
    let missing = run("x", token.clone(), "/no/such/Dockerfile".into()).await.unwrap();
    assert_eq!(missing.status.code(), Some(2), "{}", String::from_utf8_lossy(&missing.stderr));
    let said = error_line(&missing);
    assert_eq!((&said["event"], &said["kind"], &said["exitCode"]), (&json!("error"), &json!("usage"), &json!(2)));
    assert!(said["message"].as_str().unwrap().contains("/no/such/Dockerfile"), "{said}");
    let refused = run("x", "sst1.not.valid".into(), dockerfile.clone()).await.unwrap();
    assert_eq!(refused.status.code(), Some(3), "{}", String::from_utf8_lossy(&refused.stderr));
    assert_eq!(error_line(&refused)["kind"], "auth");
    stack.platform.set_faults(Faults { builder_exit_nonzero: true, ..Faults::default() });
    let failed = run("y", token, dockerfile.clone()).await.unwrap();
    assert_eq!(failed.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&failed.stderr).contains("(builder sandbox: sbx-"));
    let said = error_line(&failed);
    assert_eq!((&said["kind"], &said["exitCode"]), (&json!("failed"), &json!(1)));
    assert!(said["message"].as_str().unwrap().contains("(builder sandbox: sbx-"), "{said}");
    stack.platform.set_faults(Faults::default());

    // The host itself failing (here: a memory limit below the component's own) ends the stream too.
    let (api, token_) = (stack.api_url(), stack.token.clone());
    let (file, dir_) = (dockerfile.clone(), context_dir.clone());
    let tiny = tokio::task::spawn_blocking(move || {
        let args = ["build", "--name", "tiny", "-f", &file, "--context", &dir_, "--max-memory-mb", "1", "--json"];
        cli(&args, &[("SNAPSIGN_API_URL", &api), ("SNAPSIGN_API_TOKEN", &token_)])
    })
    .await
    .unwrap();
    assert_eq!(tiny.status.code(), Some(1), "{}", String::from_utf8_lossy(&tiny.stderr));
    let said = error_line(&tiny);
    assert_eq!((&said["kind"], &said["exitCode"]), (&json!("failed"), &json!(1)), "{said}");
    assert!(said["message"].as_str().unwrap().contains("raise --max-memory-mb"), "{said}");

    // Without --json, on a pipe: plain lines, no escape codes.
    let (api, token, store) = (stack.api_url(), stack.token.clone(), stack.store.addr().to_string());
    let args = ["build", "--name", "plain-image", "-f", &dockerfile, "--context", &context_dir];
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["--disk-mb", "256", "--allow-host", &store].map(String::from));
    let env = [("SNAPSIGN_API_URL", api.clone()), ("SNAPSIGN_API_TOKEN", token.clone())];
    let plain = {
        let (args, env) = (args.clone(), env.clone());
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cli(&args, &env.iter().map(|(k, v)| (*k, v.as_str())).collect::<Vec<_>>())
        })
        .await
        .unwrap()
    };
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(plain.status.success(), "{stderr}");
    assert!(stderr.contains("==> build\n") && stderr.contains("[builder stdout] Step 1/"), "{stderr}");
    assert!(!stderr.contains('\u{1b}') && !stderr.contains('\r'), "escape codes on a pipe: {stderr:?}");

    // On a terminal (a pty from `script`): the same lines, drawn live around a spinner.
    args[2] = "tty-image".into();
    let command = std::iter::once(env!("CARGO_BIN_EXE_snapsign").to_owned()).chain(args).collect::<Vec<_>>().join(" ");
    let tty = tokio::task::spawn_blocking(move || {
        std::process::Command::new("script")
            .args(["-q", "-e", "-c", &command, "/dev/null"])
            .envs(env)
            .env("TERM", "xterm")
            .env("SNAPSIGN_CACHE_DIR", common::cache_dir())
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{shown}");
    assert!(shown.contains("==> build") && shown.contains("Image 'tty-image' registered"), "{shown}");
    assert!(shown.contains("\u{1b}["), "a terminal gets the live view (cursor control): {shown:?}");
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_backend_pings_health_while_a_silent_process_runs() {
    use snapsign_host::sandbox_exec::proxy::ProxyBackend;
    use snapsign_host::sandbox_exec::{Process, Resources, SandboxBackend};

    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| c.pending = Duration::ZERO).await;
    let backend =
        ProxyBackend::new(&stack.api_url(), &stack.token, &stack.namespace).with_keepalive(Duration::from_millis(100));
    let id = backend.create("img", Resources { cpus: 1.0, memory_mb: 64, disk_mb: 64 }, 60).await.unwrap().id;
    assert_eq!(backend.status(&id).await.unwrap(), "running");
    let spec = Process {
        command: "/bin/sh".into(),
        args: vec!["-c".into(), "sleep 1; echo done".into()],
        env: vec![],
        working_dir: None,
        as_root: false,
    };
    let before = stack.platform.health_checks();
    let mut lines = Vec::new();
    let exit = backend.run(&id, spec, &mut |_, line| lines.push(line.to_owned())).await.unwrap();
    assert_eq!((exit.code, lines.as_slice()), (0, &["done".to_owned()][..]));
    let pings = stack.platform.health_checks() - before;
    assert!(pings >= 5, "expected keepalive pings during a 1 s silent run, saw {pings}");
    // Pings stop when the run ends: its keepalive task is gone (aborted with the run).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while backend.keepalives_running() > 0 {
        assert!(std::time::Instant::now() < deadline, "the keepalive task outlived its run");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    backend.delete(&id).await.unwrap();
    stack.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_backend_reads_a_file_only_up_to_the_limit_it_is_given() {
    use snapsign_host::sandbox_exec::proxy::ProxyBackend;
    use snapsign_host::sandbox_exec::{Resources, SandboxBackend, SandboxError};

    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |c| c.pending = Duration::ZERO).await;
    let backend = ProxyBackend::new(&stack.api_url(), &stack.token, &stack.namespace);
    let id = backend.create("img", Resources { cpus: 1.0, memory_mb: 64, disk_mb: 64 }, 60).await.unwrap().id;
    assert_eq!(backend.status(&id).await.unwrap(), "running");
    backend.write_file(&id, "/tmp/hundred", vec![b'x'; 100]).await.unwrap();
    assert_eq!(backend.read_file(&id, "/tmp/hundred", 100).await.unwrap(), vec![b'x'; 100]);
    let refused = backend.read_file(&id, "/tmp/hundred", 99).await;
    assert!(
        matches!(&refused, Err(SandboxError::Failed(m)) if m.contains("/tmp/hundred") && m.contains("99-byte read limit")),
        "{refused:?}"
    );
    backend.delete(&id).await.unwrap();
    stack.shutdown().await;
}

/// The README's first command: `snapsign demo` builds a base, a diff and a
/// legacy image on the embedded stack, verifies each stored object against
/// the builder's declared metadata, and leaves nothing in its temp dir.
#[test]
fn the_demo_builds_and_verifies_three_images_and_cleans_up() {
    let tmp = tempfile::tempdir().unwrap();
    let output = cli(&["demo"], &[("TMPDIR", tmp.path().to_str().unwrap())]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "demo failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}", output.status);
    assert_eq!(stdout.matches("as metadata.json declared").count(), 3, "{stdout}");
    assert!(stdout.contains("3 images built, registered and verified"), "{stdout}");
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the demo left {left:?} behind");
}

/// A stored snapshot, unpacked: its manifest, its raw entry names and the tree.
fn stored_snapshot(dir: &Path, uri: &str) -> (Vec<String>, tempfile::TempDir, snapsign_rootfs_builder::tree::Tree) {
    let key = uri.strip_prefix("s3://snapshots/").expect("a dev-stack snapshot uri");
    let bytes = std::fs::read(dir.join("store/snapshots").join(key)).expect("the object is in the store");
    let mut raw = tar::Archive::new(zstd::Decoder::new(bytes.as_slice()).unwrap());
    let names = raw.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_str().unwrap().to_owned()).collect();
    let out = tempfile::tempdir().unwrap();
    let path = out.path().join("snapshot.tar.zst");
    std::fs::write(&path, &bytes).unwrap();
    let mut tree = snapsign_rootfs_builder::tree::Tree::create(out.path().join("tree")).unwrap();
    snapsign_rootfs_builder::archive::read_archive(&path, Some(&mut tree)).unwrap();
    (names, out, tree)
}

/// A base image with this machine's sh, bash and coreutils (`--chmod` makes
/// every file executable, libraries included, whatever their bits on the host).
const RUN_BASE: &str = "FROM scratch\nCOPY --chmod=755 rootfs/ /\nENV GREETING=hello\nWORKDIR /srv\n\
    RUN echo \"$GREETING from $(pwd) as $(id -u)\" > made-by-run && echo base > /etc/motd && echo ran-in-the-sandbox\n\
    RUN if cat /var/lib/tensorlake/rootfs-builder/build/spec.json; then echo READ; else echo refused; fi > spec-read\n\
    RUN if bash -c 'echo x > /dev/tcp/127.0.0.1/STORE_PORT'; then echo CONNECTED; else echo refused; fi > store\n\
    RUN echo /proc/[0-9]* > pids && cat /proc/net/dev > netdev && chmod 1777 /tmp\n";

#[tokio::test(flavor = "multi_thread")]
async fn run_steps_build_in_the_builder_sandbox_and_diffs_record_deletions() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = tempfile::tempdir().unwrap();
    common::rootfs::write(&ctx.path().join("rootfs"));
    // The builder sandbox reaches the store through a forwarded port (it uploads there), so a
    // refusal is the step's own network.
    let store_port = stack.store.addr().port().to_string();
    let dockerfile = RUN_BASE.replace("STORE_PORT", &store_port);
    let run = build(&options(&stack, "run-base", &dockerfile, ctx.path())).await;
    let base = run.outcome.unwrap_or_else(|e| panic!("the RUN build failed: {e}\n{:#?}", run.events));
    assert!(
        run.events.iter().any(|e| matches!(e, BuildEvent::Log(_, line) if line == "ran-in-the-sandbox")),
        "a step's output is streamed as builder log lines: {:#?}",
        run.events
    );
    let (_, _out, tree) = stored_snapshot(dir.path(), base["snapshotUri"].as_str().unwrap());
    let read = |rel: &str| std::fs::read_to_string(tree.host(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(read("srv/made-by-run"), "hello from /srv as 0\n");
    assert_eq!(read("etc/motd"), "base\n");
    assert_eq!(read("srv/spec-read"), "refused\n", "a step cannot read the builder's spec.json");
    assert_eq!(read("srv/store"), "refused\n", "a step cannot connect to the store");
    assert_eq!(read("srv/pids"), "/proc/1\n", "a step sees no process of the builder or the host");
    let netdev = read("srv/netdev");
    let interfaces: Vec<&str> =
        netdev.lines().filter_map(|l| l.split_once(':')).map(|(n, _)| n.trim()).filter(|n| !n.contains('|')).collect();
    assert_eq!(interfaces, ["lo"], "a step's network has only loopback");

    // A diff build deletes a file of the base: its snapshot holds only the change, the deletion included.
    let child = build(&options(
        &stack,
        "run-child",
        "FROM run-base\nRUN rm /etc/motd && echo child > /srv/child\n",
        ctx.path(),
    ))
    .await;
    let child = child.outcome.unwrap_or_else(|e| panic!("the diff RUN build failed: {e}\n{:#?}", child.events));
    assert_eq!(child["rootfsNodeKind"], "diff");
    let (names, _out, _) = stored_snapshot(dir.path(), child["snapshotUri"].as_str().unwrap());
    assert_eq!(names, ["snapshot.json", "rootfs/etc/.wh.motd", "rootfs/srv/child"]);

    // A diff of that diff: the builder lays out every layer below its parent, so RUN finds the
    // base's shell and sees the parent's deletion; the new layer holds only its own change.
    let grandchild =
        "FROM run-child\nRUN test ! -e /etc/motd && cat /srv/child > /srv/grandchild && rm /srv/made-by-run\n";
    let run = build(&options(&stack, "run-grandchild", grandchild, ctx.path())).await;
    let done = run.outcome.unwrap_or_else(|e| panic!("the diff of a diff failed: {e}\n{:#?}", run.events));
    assert_eq!(done["parentManifestUri"], child["snapshotUri"]);
    let (names, _out, tree) = stored_snapshot(dir.path(), done["snapshotUri"].as_str().unwrap());
    assert_eq!(names, ["snapshot.json", "rootfs/srv/.wh.made-by-run", "rootfs/srv/grandchild"]);
    assert_eq!(std::fs::read_to_string(tree.host("srv/grandchild")).unwrap(), "child\n");

    // Two stages: the build stage (FROM a template) runs a command, the final one copies its output,
    // and a file straight from a registered template.
    let staged = "FROM run-base AS build\nRUN mkdir /out && echo compiled > /out/app\n\
                  FROM scratch\nCOPY --from=build /out/app /app\nCOPY --from=run-base /etc/motd /motd\n";
    let run = build(&options(&stack, "run-staged", staged, ctx.path())).await;
    let done = run.outcome.unwrap_or_else(|e| panic!("the two-stage build failed: {e}\n{:#?}", run.events));
    assert_eq!(done["rootfsNodeKind"], "base");
    let (names, _out, tree) = stored_snapshot(dir.path(), done["snapshotUri"].as_str().unwrap());
    assert_eq!(names, ["snapshot.json", "rootfs/app", "rootfs/motd"]);
    assert_eq!(std::fs::read_to_string(tree.host("app")).unwrap(), "compiled\n");
    assert_eq!(std::fs::read_to_string(tree.host("motd")).unwrap(), "base\n");

    // A failing step fails the build naming the line, the command and the code; nothing is left.
    let failed =
        build(&options(&stack, "run-fails", "FROM run-base\nCOPY rootfs/etc/passwd /x\nRUN exit 7\n", ctx.path()))
            .await;
    let error = failed.outcome.expect_err("RUN exit 7 fails the build").to_string();
    assert!(error.contains("failed with exit code 1"), "{error}");
    let said = "error: spec.dockerfile line 3: RUN exit 7: step 3/3 failed: \
                the command \"/bin/sh -c exit 7\" exited with code 7";
    assert!(
        failed.events.iter().any(|e| matches!(e, BuildEvent::Log(_, line) if line == said)),
        "the builder's log names the step: {:#?}",
        failed.events
    );
    // The build's own error carries the builder's reason, not only the exit code.
    assert!(error.contains(&format!("failed with exit code 1: {said} (builder sandbox: sbx-")), "{error}");
    assert_eq!(lookup(&stack, "run-fails").await, 404, "no template for a failed build");
    assert!(stack.platform.live_sandboxes().is_empty(), "builder sandboxes deleted");
    assert!(open_uploads(dir.path()).is_empty(), "no upload left open");

    // USER: a step runs as the image's user where the sandbox maps a uid range (as root, or
    // rootless with the user's subordinate ids); a rootless sandbox of one uid says it cannot.
    let user = "FROM run-base\nUSER app\nWORKDIR /tmp\n\
                RUN id -u > uid && id -G > groups && if touch /etc/app-was-here; then echo WROTE; else echo refused; fi > etc-write\n";
    let as_user = build(&options(&stack, "run-user", user, ctx.path())).await;
    if !stack.sandbox_mode.contains("identities: one uid") {
        let done = as_user.outcome.unwrap_or_else(|e| panic!("the USER build failed: {e}\n{:#?}", as_user.events));
        let (_, _out, tree) = stored_snapshot(dir.path(), done["snapshotUri"].as_str().unwrap());
        let read = |rel: &str| std::fs::read_to_string(tree.host(rel)).unwrap();
        assert_eq!(read("tmp/uid"), "1000\n");
        assert_eq!(read("tmp/groups"), "1000 50\n");
        assert_eq!(read("tmp/etc-write"), "refused\n", "app may not write root's /etc");
        let owner = tree.owner("tmp/uid");
        assert_eq!((owner.uid, owner.gid), (1000, 1000), "the snapshot records who made the file");
    } else {
        as_user.outcome.expect_err("a rootless sandbox of one uid has no uid 1000");
        let logged =
            |needle: &str| as_user.events.iter().any(|e| matches!(e, BuildEvent::Log(_, l) if l.contains(needle)));
        assert!(
            logged("RUN: become gid 1000: Invalid argument (os error 22) (this sandbox maps only uid 0"),
            "{:#?}",
            as_user.events
        );
    }
    stack.shutdown().await;
}

/// A Dockerfile FROM a registry image: the platform (the emulator) pulls and
/// imports it, the builder starts from it (layers, whiteouts, config), RUN
/// steps run in it, and a second build from the same digest makes no
/// registry request (the registry is stopped before it).
#[tokio::test(flavor = "multi_thread")]
async fn a_dockerfile_from_a_registry_image_builds_and_the_same_digest_is_not_pulled_again() {
    let dir = tempfile::tempdir().unwrap();
    let tools = snapsign_foreign_hosts::Tools::new(
        Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("hosts-cache"),
    );
    let (registry_process, registry) =
        snapsign_foreign_hosts::launch::oci_registry(&tools, &dir.path().join("registry"))
            .await
            .expect("start a registry");
    let image = common::registry::test_image(&dir.path().join("image"));
    common::registry::push(&registry, &image).await;

    let stack = stack_with(dir.path(), |_| {}).await;
    let ctx = context(&[("note.txt", b"from the context\n")]);
    let dockerfile = format!(
        "FROM {registry}/team/base:1.2\nUSER root\nCOPY note.txt /srv/note.txt\n\
         RUN echo \"$GREETING from $(pwd)\" > from-run && rm /etc/hello && ls /opt/lower > lower\n"
    );
    let run = build(&options(&stack, "from-registry", &dockerfile, ctx.path())).await;
    let done = run.outcome.unwrap_or_else(|e| panic!("the build FROM a registry image failed: {e}\n{:#?}", run.events));
    assert_eq!(done["rootfsNodeKind"], "base", "a registry image is not a template: the snapshot holds it all");
    let (names, out, tree) = stored_snapshot(dir.path(), done["snapshotUri"].as_str().unwrap());
    let read = |rel: &str| std::fs::read_to_string(tree.host(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(read("srv/from-run"), "hello from /srv\n", "the image's Env and WorkingDir reach RUN");
    assert_eq!(read("srv/note.txt"), "from the context\n");
    assert_eq!(read("srv/lower"), "b\n", "layer 2 made /opt/lower opaque");
    assert!(names.contains(&"rootfs/bin/bash".to_owned()), "the image's first layer is there");
    for gone in ["etc/motd", "etc/hello"] {
        assert!(!tree.host(gone).exists(), "{gone}: deleted by a whiteout or by RUN");
    }
    let config = snapsign_rootfs_builder::archive::read_archive(&out.path().join("snapshot.tar.zst"), None)
        .unwrap()
        .manifest
        .config;
    assert_eq!(config.cmd, Some(vec!["/bin/sh".to_owned(), "-c".to_owned(), "echo $GREETING".to_owned()]));
    assert_eq!((config.workdir.as_str(), config.user.as_str()), ("/srv", "root"), "the image's config, then USER");
    assert_eq!(config.env, ["PATH=/bin", "GREETING=hello"]);

    // `snapsign import`: the registry reference, and an OCI layout on disk (the pull cache is one).
    let layout = snapsign_dev_stack::registry::pull(
        &format!("{registry}/team/base:1.2"),
        &snapsign_dev_stack::registry::PullOptions::new(dir.path().join("layout")),
    )
    .await
    .unwrap()
    .layout_dir;
    let (api, token) = (stack.api_url(), stack.token.clone());
    for (image, name) in
        [(format!("{registry}/team/base:1.2"), "imported-ref"), (layout.display().to_string(), "imported-layout")]
    {
        let (api, token) = (api.clone(), token.clone());
        let out = tokio::task::spawn_blocking(move || {
            cli(
                &["import", &image, "--name", name, "--json"],
                &[("SNAPSIGN_API_URL", &api), ("SNAPSIGN_API_TOKEN", &token)],
            )
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{name}: {}", String::from_utf8_lossy(&out.stderr));
        // --json: NDJSON events, the result last.
        let last = String::from_utf8_lossy(&out.stdout).lines().last().map(str::to_owned).unwrap_or_default();
        let result: serde_json::Value = serde_json::from_str(&last).unwrap();
        assert_eq!(result["event"], "result", "{result}");
        let template = &result["template"];
        assert_eq!((template["name"].as_str(), template["rootfsNodeKind"].as_str()), (Some(name), Some("base")));
        let (_, out, tree) = stored_snapshot(dir.path(), template["snapshotUri"].as_str().unwrap());
        assert!(tree.host("bin/sh").exists() && !tree.host("etc/motd").exists(), "{name}: layers and whiteout");
        let config = snapsign_rootfs_builder::archive::read_archive(&out.path().join("snapshot.tar.zst"), None)
            .unwrap()
            .manifest
            .config;
        assert_eq!((config.workdir.as_str(), config.user.as_str()), ("/srv", "app"), "{name}: the image's config");
    }

    // A path that is not there is a usage error that says so (not a pull of "./no-such.tar").
    let out = cli(&["import", "./no-such.tar", "--api-url", &api, "--token", &token], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("./no-such.tar does not exist"), "{out:?}");

    // The same digest again, with the registry gone: imported once, nothing pulled.
    drop(registry_process);
    let digest = image.manifest.digest();
    let again = format!("FROM {registry}/team/base@{digest}\nUSER root\nRUN echo again > /again\n");
    let run = build(&options(&stack, "from-digest", &again, ctx.path())).await;
    let done = run.outcome.unwrap_or_else(|e| panic!("the second build pulled again: {e}\n{:#?}", run.events));
    let (_, _out, tree) = stored_snapshot(dir.path(), done["snapshotUri"].as_str().unwrap());
    assert_eq!(std::fs::read_to_string(tree.host("again")).unwrap(), "again\n");

    // A reference that is neither a template nor pullable fails at prepare, naming it.
    let run = build(&options(&stack, "nowhere", &format!("FROM {registry}/team/missing:1\n"), ctx.path())).await;
    let error = run.outcome.expect_err("a missing image fails the build").to_string();
    assert!(error.contains("image_pull_failed") && error.contains("team/missing:1"), "{error}");
    assert!(stack.platform.live_sandboxes().is_empty());
    stack.shutdown().await;
}

/// Ctrl-C during `snapsign build`: the build stops while its RUN step
/// sleeps, the upload is aborted, the builder sandbox deleted, nothing is
/// registered, and the CLI says what it cleaned and exits 130.
#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_during_snapsign_build_aborts_the_upload_deletes_the_sandbox_and_exits_130() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let (mut child, rx, mut said) = build_until_its_run_step_runs(&stack, "cancelled");
    assert_eq!(stack.platform.live_sandboxes().len(), 1, "the builder sandbox runs the step");
    assert_eq!(open_uploads(dir.path()).len(), 1, "the snapshot's upload is open");

    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let status = wait_for_exit(&mut child, &said).await;
    said.extend(rx.iter());
    let said = said.join("\n");
    assert_eq!(status.code(), Some(130), "{said}");
    assert!(said.contains("cancelling the build: stopping it and cleaning up"), "{said}");
    assert!(
        said.contains("error: the build was cancelled during its build stage")
            && said.contains("cleaned up: deleted builder sandbox sbx-")
            && said.contains(", aborted the snapshot's multipart upload"),
        "{said}"
    );
    assert!(stack.platform.live_sandboxes().is_empty(), "the builder sandbox is deleted");
    assert!(open_uploads(dir.path()).is_empty(), "the upload is aborted: {:?}", open_uploads(dir.path()));
    assert_eq!(lookup(&stack, "cancelled").await, 404, "nothing is registered");
    stack.shutdown().await;
}

/// A second signal while the first one's cleanup runs (SIGINT, then
/// SIGTERM a moment later: two of one kind could merge into one) exits at
/// once, 130, naming the builder sandbox it leaves behind.
#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_during_the_cleanup_exits_at_once_naming_the_sandbox_left_behind() {
    let dir = tempfile::tempdir().unwrap();
    let stack = stack_with(dir.path(), |_| {}).await;
    let (mut child, rx, mut said) = build_until_its_run_step_runs(&stack, "abandoned");
    let live = stack.platform.live_sandboxes();
    assert_eq!(live.len(), 1, "the builder sandbox runs the step");
    let pid = child.id() as i32;
    // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    std::thread::sleep(Duration::from_millis(1));
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let status = wait_for_exit(&mut child, &said).await;
    said.extend(rx.iter());
    let said = said.join("\n");
    assert_eq!(status.code(), Some(130), "{said}");
    let left = format!("exiting without cleaning up; left behind: builder sandbox {}", live[0]);
    assert!(said.contains(&left), "{left}\n{said}");
    assert!(said.contains("the snapshot's multipart upload if one was signed and not yet aborted"), "{said}");
    assert!(!said.contains("cleaned up:"), "the cleanup did not finish: {said}");
    assert_eq!(lookup(&stack, "abandoned").await, 404, "nothing is registered");
    stack.shutdown().await;
}

/// `snapsign build` of a Dockerfile whose RUN step sleeps, as a child
/// process, once the step has started: the child, its stderr lines to come
/// and those so far.
fn build_until_its_run_step_runs(
    stack: &DevStack,
    name: &str,
) -> (std::process::Child, std::sync::mpsc::Receiver<String>, Vec<String>) {
    use std::io::BufRead;
    use std::process::Stdio;
    let ctx = tempfile::tempdir().unwrap();
    common::rootfs::write(&ctx.path().join("rootfs"));
    let dockerfile = ctx.path().join("Dockerfile");
    std::fs::write(&dockerfile, "FROM scratch\nCOPY --chmod=755 rootfs/ /\nRUN echo step-started && sleep 600\n")
        .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["build", "--name", name, "--disk-mb", "256", "-f"])
        .arg(&dockerfile)
        .arg("--context")
        .arg(ctx.path())
        .args(["--allow-host", &stack.store.addr().to_string()])
        .env("SNAPSIGN_API_URL", stack.api_url())
        .env("SNAPSIGN_API_TOKEN", &stack.token)
        .env("SNAPSIGN_CACHE_DIR", common::cache_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut said = Vec::new();
    let started = std::time::Instant::now();
    while !said.last().is_some_and(|line: &String| line.ends_with("] step-started")) {
        let left = Duration::from_secs(240).saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok(line) => said.push(line),
            Err(e) => {
                let _ = child.kill();
                panic!("the RUN step did not start ({e}): {said:#?}");
            }
        }
    }
    (child, rx, said)
}

/// The child's exit status, killing it (and failing) after 60 s.
async fn wait_for_exit(child: &mut std::process::Child, said: &[String]) -> std::process::ExitStatus {
    let waited = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if waited.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("snapsign build did not end within 60 s of the signal: {said:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
