//! The whole flow driven from literal answers, one test per fault of the
//! dev stack's fault matrix (host/dev-stack/src/faults.rs) and per prepare shape.
//! Each test asserts the calls the flow asks for, in order, and its outcome.

use std::collections::VecDeque;
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::image_build::call::{Answer, BuildError, Call, Endpoint, Event, Exit, Request, SandboxError, Scope};

const ID: &str = "sbx-1";
const URI: &str = "s3://snapshots/builds/default/sandbox-template-builds/build-1/snap-1.tlsnap";
const ABORT: &str = "http://store/snapshots/abort?uploadId=u-1";
/// The abort URL of a refresh_upload answer.
const FRESH_ABORT: &str = "http://store/snapshots/abort?uploadId=u-1&fresh";
const BUILDER: &str = "/usr/local/bin/tl-rootfs-build";
const DECORATION: &str = " (builder sandbox: sbx-1, build: build-1)";

fn request(dockerfile: &str) -> Request {
    Request { sandbox_wait_secs: 1, ..Request::new("http://api/", "sst1.tok", "base", dockerfile) }
}

fn new_shape() -> Value {
    json!({"buildId": "build-1", "snapshotId": "snap-1", "snapshotRelPath": "sandbox-template-builds/build-1/snap-1.tlsnap",
           "rootfsNodeKind": "base",
           "builder": {"image": "tensorlake/rootfs-builder", "command": "tl-rootfs-build", "cpus": 1, "memoryMb": 1024, "diskMb": 2048},
           "runtimeContract": {"guestRuntimeLayout": "embedded"}})
}

fn multipart(uri: Option<&str>) -> Value {
    let mut answer = json!({"kind": "s3_multipart", "uploadId": "u-1", "partSizeBytes": 67108864, "maxParts": 160,
        "completeUrl": "http://store/snapshots/complete?uploadId=u-1", "abortUrl": ABORT, "expiresAt": "2026-11-28T23:00:00Z",
        "partUrls": [{"partNumber": 1, "url": "http://store/snapshots/part?partNumber=1"}]});
    if let Some(uri) = uri {
        answer["uri"] = json!(uri);
    }
    answer
}

fn metadata(uri: &str) -> Value {
    json!({"snapshot_id": "snap-1", "snapshot_uri": uri, "snapshot_format_version": "snapsign_tar_zstd_v1",
           "snapshot_size_bytes": 1234, "rootfs_disk_bytes": 10737418240u64, "rootfs_node_kind": "base"})
}

/// The platform, the sandbox and the proxy as literal answers; tests change one field each.
struct World {
    lookups: VecDeque<Result<(u16, String), String>>,
    prepared: Value,
    prepare_status: u16,
    statuses: VecDeque<Result<String, SandboxError>>,
    probes: VecDeque<Result<Exit, SandboxError>>,
    put_answer: (u16, Value),
    builder_exit: Exit,
    /// Builder exits before `builder_exit`.
    builder_exits: VecDeque<Exit>,
    /// The environment of each builder run.
    builder_envs: Vec<Vec<(String, String)>>,
    /// The answer to refresh_upload.
    refresh_answer: (u16, Value),
    metadata: Value,
    complete: (u16, String),
    /// Answers to complete before `complete` (a transport error as `Err`).
    completes: VecDeque<Result<(u16, String), String>>,
    /// Answers to get_blob sign requests before the signed read.
    sign_gets: VecDeque<Result<(u16, String), String>>,
    abort: (u16, String),
    /// Answers to aborts before `abort`.
    aborts: VecDeque<(u16, String)>,
    dmesg: Vec<String>,
    df: Vec<String>,
    delete: Result<(), SandboxError>,
    /// What the flow sent: spec.json, prepare and complete bodies, sign requests.
    spec: Option<Value>,
    prepare_body: Option<Value>,
    complete_body: Option<Value>,
    sign_bodies: Vec<Value>,
    platform_auth: Vec<String>,
    /// The host cancels the build when the flow makes this call (a label):
    /// it and every later sandbox call but delete answer `cancelled`.
    cancel_at: Option<&'static str>,
    cancelled: bool,
    /// The `only` of the context upload, once asked for.
    upload_only: Option<Option<Vec<String>>>,
    /// Whether the host gzipped the context it uploaded.
    context_gzipped: bool,
    /// The arguments of each `tar` run.
    tar_args: Vec<Vec<String>>,
}

impl World {
    fn new() -> Self {
        World {
            lookups: VecDeque::new(),
            prepared: new_shape(),
            prepare_status: 200,
            statuses: VecDeque::new(),
            probes: VecDeque::new(),
            put_answer: (200, multipart(Some(URI))),
            builder_exit: Exit { code: 0, oom_killed: false, last_error: None },
            builder_exits: VecDeque::new(),
            builder_envs: Vec::new(),
            refresh_answer: (200, {
                let mut fresh = multipart(Some(URI));
                fresh["abortUrl"] = json!(FRESH_ABORT);
                fresh["partUrls"][0]["url"] = json!("http://store/snapshots/part?partNumber=1&fresh");
                fresh
            }),
            metadata: metadata(URI),
            complete: (200, r#"{"id":"tmpl-1","name":"base"}"#.into()),
            completes: VecDeque::new(),
            sign_gets: VecDeque::new(),
            abort: (204, String::new()),
            aborts: VecDeque::new(),
            dmesg: vec!["[ 0.1] booted".into()],
            df: vec![
                "Filesystem 1024-blocks Used Available Capacity Mounted on".into(),
                "/dev/vda 100 10 90 10% /".into(),
            ],
            delete: Ok(()),
            spec: None,
            prepare_body: None,
            complete_body: None,
            sign_bodies: Vec::new(),
            platform_auth: Vec::new(),
            cancel_at: None,
            cancelled: false,
            upload_only: None,
            context_gzipped: true,
            tar_args: Vec::new(),
        }
    }

    /// What the host answers a sandbox call once the build is cancelled.
    fn cancelled_answer(&mut self, call: &Call) -> Option<Answer> {
        let now = !self.cancelled && self.cancel_at.is_some_and(|at| label(call).starts_with(at));
        self.cancelled |= now;
        if !self.cancelled {
            return None;
        }
        let e = SandboxError::Cancelled("Ctrl-C".into());
        Some(match call {
            Call::Create { .. } => Answer::Created(Err(e)),
            Call::Status { .. } => Answer::Status(Err(e)),
            Call::Proxy { .. } => Answer::Proxy(Err(e)),
            Call::Run { .. } => Answer::Exit(Err(e)),
            Call::RunCaptured { .. } => Answer::Captured(Err(e)),
            Call::UploadContext { .. } => Answer::Uploaded(Err(e)),
            Call::WriteFile { .. } => Answer::Done(Err(e)),
            Call::ReadFile { .. } => Answer::File(Err(e)),
            // As the host's outbound policy: a sign request or a complete in flight
            // is let finish; later, only the abort's DELETE still goes out.
            Call::Http { url, .. } if now && (url.ends_with("/blob/sign") || url.ends_with("/complete")) => {
                return None;
            }
            Call::Http { method, url, .. } if *method != "DELETE" => Answer::Http(Err(format!(
                "{url}: InternalError(Some({:?}))",
                crate::image_build::call::CANCELLED_BY_HOST
            ))),
            Call::Http { .. } | Call::Sleep(_) | Call::Delete { .. } => return None,
        })
    }

    fn http(&mut self, method: &str, url: &str, headers: &[(String, String)], body: &[u8]) -> (u16, String) {
        let json = || serde_json::from_slice::<Value>(body).unwrap();
        if url.starts_with("http://api/") {
            let auth = headers.iter().find(|(k, _)| k == "authorization").map(|(_, v)| v.clone());
            self.platform_auth.push(auth.unwrap_or_default());
        }
        match (method, url) {
            ("GET", u) if u.contains("/by-name/") => unreachable!("lookups are answered in answer()"),
            ("POST", "http://api/platform/v1/sandbox-template-builds") => {
                self.prepare_body = Some(json());
                (self.prepare_status, self.prepared.to_string())
            }
            ("POST", "http://api/platform/v1/sandbox-template-builds/build-1/complete") => {
                self.complete_body = Some(json());
                self.complete.clone()
            }
            ("POST", "http://proxy/api/v1/blob/sign") => {
                assert!(headers.contains(&("x-tensorlake-sandbox-id".into(), ID.into())), "{headers:?}");
                let body = json();
                self.sign_bodies.push(body.clone());
                if body["op"]["kind"] == "put_artifact" {
                    let (status, answer) = &self.put_answer;
                    (*status, answer.to_string())
                } else if body["op"]["kind"] == "refresh_upload" {
                    let (status, answer) = &self.refresh_answer;
                    (*status, answer.to_string())
                } else {
                    let uri = body["target"]["uri"].as_str().unwrap();
                    (200, json!({"kind": "single_get", "uri": uri, "method": "GET", "url": format!("http://store/get/{uri}")}).to_string())
                }
            }
            ("DELETE", ABORT | FRESH_ABORT) => self.aborts.pop_front().unwrap_or_else(|| self.abort.clone()),
            other => panic!("unexpected HTTP call {other:?}"),
        }
    }

    fn answer(&mut self, call: &Call) -> Answer {
        if let Some(answer) = self.cancelled_answer(call) {
            return answer;
        }
        match call {
            Call::Http { method, url, .. } if *method == "GET" && url.contains("/by-name/") => {
                Answer::Http(self.lookups.pop_front().expect("a lookup answer").map(|(s, t)| (s, t.into_bytes())))
            }
            Call::Http { url, .. } if url.ends_with("/complete") && !self.completes.is_empty() => {
                Answer::Http(self.completes.pop_front().expect("checked").map(|(s, t)| (s, t.into_bytes())))
            }
            Call::Http { url, body, .. }
                if url.ends_with("/blob/sign")
                    && !self.sign_gets.is_empty()
                    && serde_json::from_slice::<Value>(body).unwrap()["op"]["kind"] == "get_blob" =>
            {
                Answer::Http(self.sign_gets.pop_front().expect("checked").map(|(s, t)| (s, t.into_bytes())))
            }
            Call::Http { method, url, headers, body } => {
                let (status, text) = self.http(method, url, headers, body);
                Answer::Http(Ok((status, text.into_bytes())))
            }
            Call::Create { .. } => Answer::Created(Ok(ID.into())),
            Call::Status { .. } => Answer::Status(self.statuses.pop_front().unwrap_or(Ok("running".into()))),
            Call::Sleep(_) => Answer::Slept,
            Call::Proxy { .. } => Answer::Proxy(Ok(Endpoint {
                base_url: "http://proxy/".into(),
                headers: vec![("x-tensorlake-sandbox-id".into(), ID.into())],
            })),
            Call::Run { process, .. } if process.command == "/bin/true" => {
                Answer::Exit(self.probes.pop_front().unwrap_or(Ok(Exit {
                    code: 0,
                    oom_killed: false,
                    last_error: None,
                })))
            }
            Call::Run { process, .. } if process.command == BUILDER => {
                self.builder_envs.push(process.env.clone());
                Answer::Exit(Ok(self.builder_exits.pop_front().unwrap_or_else(|| self.builder_exit.clone())))
            }
            Call::Run { process, .. } => {
                if process.command == "tar" {
                    self.tar_args.push(process.args.clone());
                }
                Answer::Exit(Ok(Exit { code: 0, oom_killed: false, last_error: None }))
            }
            Call::RunCaptured { process, .. } => Answer::Captured(Ok(if process.args[1].starts_with("dmesg") {
                self.dmesg.clone()
            } else {
                self.df.clone()
            })),
            Call::UploadContext { only, .. } => {
                self.upload_only = Some(only.clone());
                Answer::Uploaded(Ok(self.context_gzipped))
            }
            Call::WriteFile { contents, .. } => {
                self.spec = Some(serde_json::from_slice(contents).unwrap());
                Answer::Done(Ok(()))
            }
            Call::ReadFile { .. } => Answer::File(Ok(self.metadata.to_string().into_bytes())),
            Call::Delete { .. } => Answer::Done(self.delete.clone()),
        }
    }
}

/// A call as the tests name it.
fn label(call: &Call) -> String {
    match call {
        Call::Http { method, url, body, .. } if url.ends_with("/blob/sign") => {
            let body: Value = serde_json::from_slice(body).unwrap();
            format!("{method} {url} {}", body["op"]["kind"].as_str().unwrap())
        }
        Call::Http { method, url, .. } => format!("{method} {url}"),
        Call::Create { image, .. } => format!("create {image}"),
        Call::Status { id } => format!("status {id}"),
        Call::Sleep(d) => format!("sleep {}ms", d.as_millis()),
        Call::Proxy { id } => format!("proxy {id}"),
        Call::Run { process, log, .. } => format!("run {}{}", process.command, if *log { " (logged)" } else { "" }),
        Call::RunCaptured { process, .. } => {
            format!("diagnose {}", if process.args[1].starts_with("dmesg") { "dmesg" } else { "df" })
        }
        Call::UploadContext { path, .. } => format!("upload-context {path}"),
        Call::WriteFile { path, .. } => format!("write {path}"),
        Call::ReadFile { path, .. } => format!("read {path}"),
        Call::Delete { id } => format!("delete {id}"),
    }
}

struct Run {
    calls: Vec<String>,
    events: Vec<Event>,
    outcome: Result<String, BuildError>,
}

impl Run {
    fn warnings(&self) -> Vec<&str> {
        self.events.iter().filter_map(|e| if let Event::Warning(w) = e { Some(w.as_str()) } else { None }).collect()
    }

    fn failure(&self) -> &str {
        match &self.outcome {
            Err(BuildError::Failed(m)) => m,
            other => panic!("expected a build failure, got {other:?}"),
        }
    }
}

/// Drives the flow to its end; each call takes 1 ms of the clock, a sleep its duration.
fn drive(request: Request, world: &mut World) -> Run {
    let mut now = Duration::from_secs(100);
    let mut flow = Flow::new(request, now);
    let (mut calls, mut events, mut answer) = (Vec::new(), Vec::new(), Answer::Start);
    for _ in 0..1000 {
        let step = flow.step(answer, now);
        events.extend(step.events);
        match step.next {
            Next::Finished(outcome) => return Run { calls, events, outcome },
            Next::Call(call) => {
                calls.push(label(&call));
                now += if let Call::Sleep(d) = call { d } else { Duration::from_millis(1) };
                answer = world.answer(&call);
            }
        }
    }
    panic!("the flow did not finish in 1000 steps: {calls:#?}");
}

const PREPARE: &str = "POST http://api/platform/v1/sandbox-template-builds";
const COMPLETE: &str = "POST http://api/platform/v1/sandbox-template-builds/build-1/complete";
const SIGN_PUT: &str = "POST http://proxy/api/v1/blob/sign put_artifact";
const SIGN_GET: &str = "POST http://proxy/api/v1/blob/sign get_blob";

fn calls(list: &[&[&str]]) -> Vec<String> {
    list.iter().flat_map(|part| part.iter().map(|s| (*s).to_owned())).collect()
}

const START: &[&str] = &[PREPARE, "create tensorlake/rootfs-builder", "status sbx-1", "run /bin/true"];
const SETUP: &[&str] = &[
    "run mkdir",
    "run chmod",
    "upload-context /var/lib/tensorlake/rootfs-builder/build/context.tar",
    "run mkdir",
    "run tar",
    "run rm",
    "write /var/lib/tensorlake/rootfs-builder/build/spec.json",
    "run /usr/local/bin/tl-rootfs-build (logged)",
];
const READ_METADATA: &[&str] = &["read /var/lib/tensorlake/rootfs-builder/build/metadata.json"];
const ABORT_CALL: &[&str] = &["DELETE http://store/snapshots/abort?uploadId=u-1"];
const DIAGNOSE: &[&str] = &["diagnose dmesg", "diagnose df"];
const DELETE: &[&str] = &["delete sbx-1"];

/// The unpack reads the archive as the host sent it: `tar -xzf` a gzip
/// tar, `tar -xf` a plain one (a sandbox on the host's machine).
#[test]
fn the_unpack_reads_the_context_as_the_host_sent_it() {
    for (gzipped, flags) in [(true, "-xzf"), (false, "-xf")] {
        let mut world = World::new();
        world.context_gzipped = gzipped;
        let run = drive(request("FROM scratch\nCOPY a /a\n"), &mut world);
        assert!(run.outcome.is_ok(), "{:?}", run.outcome);
        let build = "/var/lib/tensorlake/rootfs-builder/build";
        let archive = format!("{build}/context.tar");
        let context = format!("{build}/context");
        assert_eq!(world.tar_args, [vec![flags, archive.as_str(), "-C", context.as_str()]], "gzipped {gzipped}");
    }
}

#[test]
fn new_shape_base_build_signs_splices_and_completes_with_the_signed_uri() {
    let mut world = World::new();
    let run = drive(request("FROM scratch\nCOPY a /a\n"), &mut world);
    assert_eq!(run.outcome, Ok(r#"{"id":"tmpl-1","name":"base"}"#.into()));
    assert_eq!(world.upload_only, Some(Some(vec!["a".to_owned()])), "only what COPY reads is sent");
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, &[COMPLETE], DELETE]);
    assert_eq!(run.calls, expected);
    let stages: Vec<&str> =
        run.events.iter().filter_map(|e| if let Event::Stage(s) = e { Some(s.as_str()) } else { None }).collect();
    assert_eq!(stages[..8], ["plan", "prepare", "sandbox", "sign", "upload", "build", "complete", "cleanup"]);
    assert!(stages[8].starts_with("done in "), "{stages:?}");
    assert!(run.warnings().is_empty(), "{:?}", run.warnings());
    // The builder's metadata is reported once, as it was read.
    let reported: Vec<Value> = run
        .events
        .iter()
        .filter_map(|e| if let Event::Metadata(json) = e { serde_json::from_str(json).ok() } else { None })
        .collect();
    assert_eq!(reported, [world.metadata.clone()]);
    // Every platform call carries the bearer token.
    assert_eq!(world.platform_auth, ["Bearer sst1.tok", "Bearer sst1.tok"]);
    let prepare = world.prepare_body.unwrap();
    assert_eq!((prepare["rootfsNodeKind"].as_str(), &prepare["parentTemplate"]), (Some("base"), &Value::Null));
    // The sign request asks for the default 10 GiB rootfs in 64 MiB parts (§5.7).
    assert_eq!(
        world.sign_bodies,
        [json!({"target": {"kind": "artifact", "rel_path": "sandbox-template-builds/build-1/snap-1.tlsnap"},
                "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 160, "part_size_bytes": 67108864}}})]
    );
    let spec = world.spec.unwrap();
    assert_eq!(spec["snapshotUri"], URI);
    assert_eq!(spec["upload"], multipart(Some(URI)));
    assert_eq!(spec["runtimeContract"]["guestRuntimeLayout"], "embedded", "unknown fields pass through");
    assert_eq!(spec["contextDir"], "/var/lib/tensorlake/rootfs-builder/build/context");
    assert_eq!((spec["baseImage"].as_str(), spec["rootfsDiskBytes"].as_u64()), (Some("scratch"), Some(10737418240)));
    let complete = world.complete_body.unwrap();
    assert_eq!((complete["snapshotUri"].as_str(), complete["snapshotSizeBytes"].as_u64()), (Some(URI), Some(1234)));
}

#[test]
fn legacy_shape_signs_nothing_and_completes_with_the_prepared_uri() {
    let mut world = World::new();
    world.prepared = json!({"buildId": "build-1", "snapshotId": "snap-1", "snapshotUri": "s3://legacy/snap-1.tlsnap",
        "rootfsNodeKind": "base", "upload": {"kind": "single_put", "method": "PUT", "url": "http://store/put", "headers": {}},
        "builder": {"image": "tensorlake/rootfs-builder", "command": "tl-rootfs-build", "cpus": 1, "memoryMb": 1024, "diskMb": 2048}});
    world.metadata = metadata("s3://legacy/snap-1.tlsnap");
    let run = drive(request("FROM scratch\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    assert_eq!(run.calls, calls(&[START, SETUP, READ_METADATA, &[COMPLETE], DELETE]));
    assert!(world.sign_bodies.is_empty());
    let spec = world.spec.unwrap();
    assert_eq!(spec["upload"]["url"], "http://store/put", "the platform's upload is left as it was");
    assert_eq!(world.complete_body.unwrap()["snapshotUri"], "s3://legacy/snap-1.tlsnap");
}

#[test]
fn both_fields_shape_replaces_the_stale_snapshot_uri_with_the_signed_one() {
    let mut world = World::new();
    world.prepared["snapshotUri"] = json!("s3://stale/old.tlsnap");
    let run = drive(request("FROM scratch\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, &[COMPLETE], DELETE]));
    assert_eq!(world.spec.unwrap()["snapshotUri"], URI);
    assert_eq!(world.complete_body.unwrap()["snapshotUri"], URI);
}

/// The parent snapshot a diff build on `other/base` gets.
const PARENT_URI: &str = "s3://snapshots/builds/other/sandbox-template-builds/b0/s0.tlsnap";

/// A world where `other/base` is a public template and prepare answers a diff on it.
fn diff_world() -> (World, &'static str) {
    let mut world = World::new();
    world
        .lookups
        .push_back(Ok((200, json!({"id": "t-0", "name": "base", "snapshotId": "s0", "public": true}).to_string())));
    world.prepared["rootfsNodeKind"] = json!("diff");
    world.prepared["parent"] = json!({"parentManifestUri": PARENT_URI, "rootfsDiskBytes": 2147483648u64});
    world.metadata["rootfs_node_kind"] = json!("diff");
    world.metadata["parent_manifest_uri"] = json!(PARENT_URI);
    (world, PARENT_URI)
}

#[test]
fn diff_build_looks_up_the_parent_and_signs_its_download() {
    let (mut world, parent_uri) = diff_world();
    let run = drive(request("FROM other/base\nCOPY b /b\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let lookup = "GET http://api/platform/v1/sandbox-templates/by-name/other%2Fbase";
    let expected =
        calls(&[&[lookup], START, &["proxy sbx-1", SIGN_PUT, SIGN_GET], SETUP, READ_METADATA, &[COMPLETE], DELETE]);
    assert_eq!(run.calls, expected);
    let prepare = world.prepare_body.unwrap();
    assert_eq!(prepare["rootfsNodeKind"], "diff");
    assert_eq!(
        prepare["parentTemplate"],
        json!({"templateId": "t-0", "name": "base", "reference": "other/base", "snapshotId": "s0", "public": true})
    );
    // The parent's size sizes the rootfs: 2 GiB is 32 parts.
    assert_eq!(world.sign_bodies[0]["op"]["multipart_hint"]["max_parts"], 32);
    assert_eq!(
        world.sign_bodies[1],
        json!({"target": {"kind": "blob", "uri": parent_uri}, "op": {"kind": "get_blob"}})
    );
    let spec = world.spec.unwrap();
    assert_eq!(spec["parent"]["download"]["url"], format!("http://store/get/{parent_uri}"));
    assert_eq!(world.complete_body.unwrap()["parentManifestUri"], parent_uri);
}

#[test]
fn templates_named_by_copy_from_and_earlier_froms_are_sent_as_additional_local_images() {
    let mut world = World::new();
    let found = |id: &str, name: &str| Ok((200, json!({"id": id, "name": name, "snapshotId": "s"}).to_string()));
    world.lookups.push_back(found("t-1", "builder"));
    world.lookups.push_back(Ok((404, "{}".to_owned())));
    world.lookups.push_back(found("t-2", "tools"));
    let dockerfile = "FROM builder AS build\nRUN make\nFROM scratch\nCOPY --from=build /out /out\n\
                      COPY --from=registry.example/img:1 /x /x\nCOPY --from=team/tools /t /t\n";
    let run = drive(request(dockerfile), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let looked_up: Vec<&String> = run.calls.iter().filter(|c| c.starts_with("GET http://api")).collect();
    assert_eq!(looked_up.len(), 3, "{looked_up:?}");
    let prepare = world.prepare_body.unwrap();
    assert_eq!(prepare["rootfsNodeKind"], "base");
    // The stage alias is not looked up; the image that is not a template (404) is not sent.
    assert_eq!(
        prepare["additionalLocalImages"],
        json!([{"templateId": "t-1", "name": "builder", "reference": "builder", "snapshotId": "s", "public": false},
               {"templateId": "t-2", "name": "tools", "reference": "team/tools", "snapshotId": "s", "public": false}])
    );
}

#[test]
fn durable_additional_local_images_are_signed_and_local_ones_are_not() {
    let mut world = World::new();
    world.prepared["additionalLocalImages"] = json!([
        {"reference": "a", "snapshotUri": "s3://snapshots/builds/default/a.tlsnap"},
        {"reference": "cas", "snapshotUri": "file:///var/lib/builder/cas.tlsnap"},
        {"reference": "done", "snapshotUri": "s3://snapshots/d", "download": {"kind": "single_get", "url": "kept"}},
        {"reference": "b", "snapshotUri": "s3://snapshots/builds/default/b.tlsnap"}
    ]);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let expected =
        calls(&[START, &["proxy sbx-1", SIGN_PUT, SIGN_GET, SIGN_GET], SETUP, READ_METADATA, &[COMPLETE], DELETE]);
    assert_eq!(run.calls, expected);
    let signed: Vec<&Value> = world.sign_bodies[1..].iter().map(|b| &b["target"]["uri"]).collect();
    assert_eq!(signed, ["s3://snapshots/builds/default/a.tlsnap", "s3://snapshots/builds/default/b.tlsnap"]);
    let images = &world.spec.unwrap()["additionalLocalImages"];
    assert_eq!(images[0]["download"]["url"], "http://store/get/s3://snapshots/builds/default/a.tlsnap");
    assert!(images[1].get("download").is_none());
    assert_eq!(images[2]["download"]["url"], "kept");
    assert_eq!(images[3]["download"]["url"], "http://store/get/s3://snapshots/builds/default/b.tlsnap");
}

#[test]
fn pending_502s_and_lifecycle_502_while_pending_are_retried_until_running() {
    let mut world = World::new();
    let mut request = request("FROM scratch\n");
    request.sandbox_wait_secs = 10;
    let gateway = || Err(SandboxError::Transient("HTTP 502: PROXY_ERROR Failed to proxy request".into()));
    world.statuses = VecDeque::from([gateway(), Ok("pending".into()), gateway(), gateway()]);
    world.probes = VecDeque::from([
        Err(SandboxError::Transient("HTTP 502".into())),
        Ok(Exit { code: 1, oom_killed: false, last_error: None }),
    ]);
    let run = drive(request, &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let wait: Vec<&str> = [["status sbx-1", "sleep 250ms"]; 4].concat();
    let probe: Vec<&str> = [["run /bin/true", "sleep 250ms"]; 2].concat();
    let start =
        calls(&[&[PREPARE, "create tensorlake/rootfs-builder"], &wait, &["status sbx-1"], &probe, &["run /bin/true"]]);
    assert_eq!(run.calls[..start.len()], start[..]);
    assert_eq!(run.calls.last().map(String::as_str), Some("delete sbx-1"));
}

#[test]
fn a_sandbox_that_never_runs_fails_at_the_deadline_without_diagnostics() {
    let mut world = World::new();
    world.statuses = std::iter::repeat_with(|| Ok("pending".to_owned())).take(100).collect();
    let run = drive(request("FROM scratch\n"), &mut world);
    // Polls at 1, 252, 503, 754 and 1005 ms after create: the last is past the 1 s deadline.
    let wait: Vec<&str> = [["status sbx-1", "sleep 250ms"]; 4].concat();
    assert_eq!(run.calls, calls(&[&[PREPARE, "create tensorlake/rootfs-builder"], &wait, &["status sbx-1"], DELETE]));
    assert_eq!(run.failure(), format!("Sandbox sbx-1 did not reach 'running' within 1s{DECORATION}"));
}

#[test]
fn a_proxy_that_never_answers_fails_at_the_same_deadline() {
    let mut world = World::new();
    world.probes = std::iter::repeat_with(|| Err(SandboxError::Transient("HTTP 502".into()))).take(100).collect();
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls.iter().filter(|c| *c == "run /bin/true").count(), 5);
    assert_eq!(run.calls.last().map(String::as_str), Some("delete sbx-1"));
    assert!(!run.calls.iter().any(|c| c.starts_with("diagnose")), "never ready: no diagnostics");
    assert_eq!(run.failure(), format!("Sandbox sbx-1 is running but its proxy did not answer within 1s{DECORATION}"));
}

#[test]
fn a_terminated_sandbox_fails_naming_sandbox_and_build_and_is_deleted() {
    let mut world = World::new();
    world.statuses = VecDeque::from([Ok("pending".into()), Ok("terminated".into())]);
    let run = drive(request("FROM scratch\n"), &mut world);
    let start = [PREPARE, "create tensorlake/rootfs-builder", "status sbx-1", "sleep 250ms", "status sbx-1"];
    assert_eq!(run.calls, calls(&[&start, DELETE]));
    assert_eq!(run.failure(), format!("sandbox gone: Sandbox sbx-1 terminated before reaching 'running'{DECORATION}"));
}

#[test]
fn a_refused_status_call_fails_at_once() {
    let mut world = World::new();
    world.statuses = VecDeque::from([Err(SandboxError::Denied("HTTP 403".into()))]);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[&[PREPARE, "create tensorlake/rootfs-builder", "status sbx-1"], DELETE]));
    assert_eq!(run.failure(), format!("sandbox access denied: HTTP 403{DECORATION}"));
}

#[test]
fn a_failed_sign_fails_the_build_with_diagnostics_and_nothing_to_abort() {
    let mut world = World::new();
    world.put_answer = (502, json!({"code": "PROXY_ERROR", "message": "sign failed (fault)"}));
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], DIAGNOSE, DELETE]));
    assert_eq!(
        run.failure(),
        format!(
            r#"dataplane sign request failed (HTTP 502): {{"code":"PROXY_ERROR","message":"sign failed (fault)"}}{DECORATION}"#
        )
    );
}

#[test]
fn a_sign_answer_without_uri_fails_before_the_builder_and_aborts_the_upload() {
    let mut world = World::new();
    world.put_answer = (200, multipart(None));
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], ABORT_CALL, DIAGNOSE, DELETE]));
    assert_eq!(run.failure(), format!("dataplane signed upload response is missing uri{DECORATION}"));
    assert_eq!(run.warnings(), ["aborted the multipart upload of build build-1"]);
}

#[test]
fn a_store_part_failure_fails_the_builder_and_the_flow_aborts_what_is_left() {
    let mut world = World::new();
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: None };
    // The reference builder aborted the upload itself: the store no longer knows it.
    world.abort = (404, "<Error><Code>NoSuchUpload</Code></Error>".into());
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, ABORT_CALL, DIAGNOSE, DELETE]));
    assert_eq!(run.failure(), format!("Command '{BUILDER}' failed with exit code 1{DECORATION}"));
    assert_eq!(
        run.warnings(),
        ["abort of the multipart upload answered HTTP 404: <Error><Code>NoSuchUpload</Code></Error>"]
    );
}

#[test]
fn a_builder_that_exits_nonzero_fails_aborts_and_reads_no_metadata() {
    let mut world = World::new();
    world.builder_exit = Exit { code: 3, oom_killed: false, last_error: None };
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, ABORT_CALL, DIAGNOSE, DELETE]));
    assert_eq!(run.failure(), format!("Command '{BUILDER}' failed with exit code 3{DECORATION}"));
    assert!(world.complete_body.is_none());
}

#[test]
fn a_builder_killed_for_memory_gets_memory_advice() {
    let mut world = World::new();
    world.builder_exit = Exit { code: -9, oom_killed: true, last_error: None };
    world.dmesg = vec!["[ 9.1] Out of memory: Killed process 42 (tl-rootfs-build)".into()];
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, ABORT_CALL, DIAGNOSE, DELETE]));
    assert_eq!(
        run.failure(),
        format!(
            "Command '{BUILDER}' failed with exit code -9 (process was killed by the kernel OOM killer)\n\
             The builder sandbox ran out of memory: retry with a larger --builder-memory-mb.{DECORATION}"
        )
    );
}

#[test]
fn a_full_disk_in_df_gets_disk_advice() {
    let mut world = World::new();
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: None };
    world.df[1] = "/dev/vda 100 97 3 97% /var/lib/tensorlake/rootfs-builder/build".into();
    let run = drive(request("FROM scratch\n"), &mut world);
    assert!(run.failure().contains("\nThe builder sandbox's disk is full (97% used)"), "{}", run.failure());
}

#[test]
fn metadata_missing_a_field_fails_before_complete_and_aborts() {
    let mut world = World::new();
    world.metadata.as_object_mut().unwrap().remove("snapshot_size_bytes");
    let run = drive(request("FROM scratch\n"), &mut world);
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, ABORT_CALL, DIAGNOSE, DELETE]);
    assert_eq!(run.calls, expected);
    assert_eq!(run.failure(), format!("rootfs builder metadata is missing numeric snapshot_size_bytes{DECORATION}"));
}

#[test]
fn metadata_with_another_uri_fails_naming_both() {
    let mut world = World::new();
    world.metadata = metadata("s3://elsewhere/x.tlsnap");
    let run = drive(request("FROM scratch\n"), &mut world);
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, ABORT_CALL, DIAGNOSE, DELETE]);
    assert_eq!(run.calls, expected);
    assert_eq!(
        run.failure(),
        format!(
            "rootfs builder metadata snapshot_uri s3://elsewhere/x.tlsnap did not match dataplane signed uri {URI}{DECORATION}"
        )
    );
}

#[test]
fn a_failed_complete_aborts_the_upload_and_registers_nothing() {
    let mut world = World::new();
    world.complete = (500, r#"{"code":"complete_failed","message":"fault"}"#.into());
    let run = drive(request("FROM scratch\n"), &mut world);
    let expected =
        calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, &[COMPLETE], ABORT_CALL, DIAGNOSE, DELETE]);
    assert_eq!(run.calls, expected);
    assert_eq!(
        run.failure(),
        format!(
            r#"failed to complete sandbox image build (HTTP 500): {{"code":"complete_failed","message":"fault"}}{DECORATION}"#
        )
    );
}

/// The platform answers a repeated complete of the same body with the same
/// template, so an answer lost on the way is asked for again, with backoff.
#[test]
fn a_lost_complete_answer_is_asked_for_again_and_the_build_succeeds() {
    let mut world = World::new();
    world.completes = VecDeque::from([Err("connection reset by peer".into()), Ok((503, "busy".into()))]);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.outcome, Ok(r#"{"id":"tmpl-1","name":"base"}"#.into()));
    let retried = [COMPLETE, "sleep 250ms", COMPLETE, "sleep 500ms", COMPLETE];
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, &retried, DELETE]);
    assert_eq!(run.calls, expected);
    assert_eq!(
        run.warnings(),
        [
            "complete did not answer (connection reset by peer); asking again in 250ms",
            "complete did not answer (HTTP 503: busy); asking again in 500ms"
        ]
    );
}

#[test]
fn complete_unanswered_five_times_fails_aborts_and_cleans_up() {
    let mut world = World::new();
    world.completes = (0..COMPLETE_ATTEMPTS).map(|_| Ok((502, "bad gateway".to_owned()))).collect();
    let run = drive(request("FROM scratch\n"), &mut world);
    let retried = [
        COMPLETE,
        "sleep 250ms",
        COMPLETE,
        "sleep 500ms",
        COMPLETE,
        "sleep 1000ms",
        COMPLETE,
        "sleep 2000ms",
        COMPLETE,
    ];
    let expected =
        calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, READ_METADATA, &retried, ABORT_CALL, DIAGNOSE, DELETE]);
    assert_eq!(run.calls, expected);
    assert_eq!(
        run.failure(),
        format!("failed to complete sandbox image build after 5 attempts: HTTP 502: bad gateway{DECORATION}")
    );
}

#[test]
fn a_refused_lookup_is_an_auth_failure_before_any_sandbox() {
    let mut world = World::new();
    world.lookups.push_back(Ok((401, r#"{"code":"unauthorized"}"#.into())));
    let run = drive(request("FROM base\n"), &mut world);
    assert_eq!(run.calls, ["GET http://api/platform/v1/sandbox-templates/by-name/base"]);
    assert_eq!(
        run.outcome,
        Err(BuildError::Auth(r#"template lookup for 'base' refused (HTTP 401): {"code":"unauthorized"}"#.into()))
    );
}

#[test]
fn a_private_template_of_another_namespace_fails_the_build_not_the_credentials() {
    let mut world = World::new();
    let refusal = r#"{"code":"template_private","message":"template other/base is private"}"#;
    world.lookups.push_back(Ok((403, refusal.into())));
    let run = drive(request("FROM other/base\n"), &mut world);
    assert_eq!(run.calls, ["GET http://api/platform/v1/sandbox-templates/by-name/other%2Fbase"]);
    assert_eq!(
        run.outcome,
        Err(BuildError::Failed(format!("FROM other/base: the platform refused it (HTTP 403): {refusal}")))
    );
}

/// The calls with each sleep (only retries sleep in these runs) checked
/// against its bounds and named by the attempt it follows; the count starts
/// again at each new call.
fn with_retries(calls: &[String]) -> Vec<String> {
    let (mut attempt, mut last) = (0u32, "");
    let mut named = Vec::new();
    for call in calls {
        if let Some(ms) = call.strip_prefix("sleep ").and_then(|c| c.strip_suffix("ms")) {
            let (ms, cap) = (ms.parse::<u128>().unwrap(), RETRY_BASE.as_millis() << attempt);
            assert!((cap / 2..cap).contains(&ms), "pause {ms}ms after attempt {attempt} not in [{}, {cap})", cap / 2);
            named.push(format!("retry after attempt {attempt}"));
            attempt += 1;
            continue;
        }
        if call != last {
            (attempt, last) = (0, call);
        }
        named.push(call.clone());
    }
    named
}

#[test]
fn a_lookup_that_fails_in_passing_is_asked_again_with_jittered_backoff() {
    let lookup = "GET http://api/platform/v1/sandbox-templates/by-name/base";
    let mut world = World::new();
    world.lookups = VecDeque::from([
        Err("connection refused".into()),
        Ok((503, "busy".into())),
        Ok((504, "gateway timeout".into())),
        Ok((404, String::new())),
    ]);
    let run = drive(request("FROM base\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    assert_eq!(
        with_retries(&run.calls[..8]),
        [
            lookup,
            "retry after attempt 0",
            lookup,
            "retry after attempt 1",
            lookup,
            "retry after attempt 2",
            lookup,
            PREPARE
        ]
    );
    let warnings = run.warnings();
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].starts_with("template lookup for 'base' failed (connection refused); asking again in "));
    assert!(warnings[1].starts_with("template lookup for 'base' failed (HTTP 503: busy); asking again in "));
    assert_eq!(world.prepare_body.unwrap()["rootfsNodeKind"], "base", "404: not a template, a base build");

    // Four failures: the build fails before any sandbox exists.
    let mut world = World::new();
    world.lookups = (0..RETRY_ATTEMPTS).map(|i| Err(format!("connection reset {i}"))).collect();
    let run = drive(request("FROM base\n"), &mut world);
    assert_eq!(run.calls.iter().filter(|c| *c == lookup).count(), RETRY_ATTEMPTS as usize);
    assert!(run.calls.iter().all(|c| c == lookup || c.starts_with("sleep")), "{:?}", run.calls);
    assert_eq!(
        run.outcome,
        Err(BuildError::Failed("template lookup for 'base' failed 4 times: connection reset 3".into()))
    );

    // An answer that is not a passing failure stands: one lookup.
    let mut world = World::new();
    world.lookups = VecDeque::from([Ok((500, "internal".into()))]);
    let run = drive(request("FROM base\n"), &mut world);
    assert_eq!(run.calls, [lookup]);
    assert!(run.outcome.is_err());
}

#[test]
fn a_parent_read_whose_signing_fails_in_passing_is_signed_again_and_the_build_succeeds() {
    let (mut world, parent_uri) = diff_world();
    let busy = r#"{"code":"signer_busy"}"#;
    world.sign_gets = VecDeque::from([Ok((503, busy.into())), Err("connection reset".into())]);
    let run = drive(request("FROM other/base\nCOPY b /b\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let lookup = "GET http://api/platform/v1/sandbox-templates/by-name/other%2Fbase";
    let signs =
        ["proxy sbx-1", SIGN_PUT, SIGN_GET, "retry after attempt 0", SIGN_GET, "retry after attempt 1", SIGN_GET];
    let expected = calls(&[&[lookup], START, &signs, SETUP, READ_METADATA, &[COMPLETE], DELETE]);
    assert_eq!(with_retries(&run.calls), expected);
    assert_eq!(world.spec.unwrap()["parent"]["download"]["url"], format!("http://store/get/{parent_uri}"));
    assert_eq!(world.sign_bodies.iter().filter(|b| b["op"]["kind"] == "put_artifact").count(), 1);
}

#[test]
fn retry_pauses_grow_stay_in_their_bounds_and_spread() {
    for attempt in 0..RETRY_ATTEMPTS {
        let cap = RETRY_BASE * 2u32.pow(attempt);
        let pauses: Vec<Duration> = (0..200u64).map(|e| retry_backoff(attempt, e * 1_000_003)).collect();
        assert!(pauses.iter().all(|p| *p >= cap / 2 && *p < cap), "attempt {attempt}: {pauses:?}");
        let distinct: std::collections::BTreeSet<_> = pauses.iter().collect();
        assert!(distinct.len() > 150, "attempt {attempt}: only {} distinct pauses of 200", distinct.len());
    }
}

#[test]
fn a_refused_prepare_is_an_auth_failure_and_a_bad_dockerfile_a_usage_error() {
    let mut world = World::new();
    world.prepare_status = 403;
    world.prepared = json!({"code": "forbidden"});
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, [PREPARE]);
    assert_eq!(
        run.outcome,
        Err(BuildError::Auth(r#"failed to prepare sandbox image build (HTTP 403): {"code":"forbidden"}"#.into()))
    );
    let run = drive(request("# no FROM here\n"), &mut World::new());
    assert!(run.calls.is_empty());
    assert_eq!(run.outcome, Err(BuildError::Usage("the Dockerfile has no FROM instruction".into())));
}

#[test]
fn failing_abort_and_delete_are_warnings_and_the_first_failure_stands() {
    let mut world = World::new();
    world.builder_exit = Exit { code: 2, oom_killed: false, last_error: None };
    world.abort = (403, "AccessDenied".into());
    world.delete = Err(SandboxError::Gone("HTTP 404".into()));
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, ABORT_CALL, DIAGNOSE, DELETE]));
    assert_eq!(run.failure(), format!("Command '{BUILDER}' failed with exit code 2{DECORATION}"));
    assert_eq!(
        run.warnings(),
        [
            "abort of the multipart upload answered HTTP 403: AccessDenied",
            "Failed to terminate rootfs builder sandbox sbx-1 during cleanup: sandbox gone: HTTP 404"
        ]
    );
}

#[test]
fn an_answer_that_does_not_fit_the_step_fails_and_still_deletes_the_sandbox() {
    let mut flow = Flow::new(request("FROM scratch\n"), Duration::ZERO);
    let at = Duration::ZERO;
    assert!(matches!(flow.step(Answer::Start, at).next, Next::Call(Call::Http { .. })));
    let prepared = Answer::Http(Ok((200, new_shape().to_string().into_bytes())));
    assert!(matches!(flow.step(prepared, at).next, Next::Call(Call::Create { .. })));
    assert!(matches!(flow.step(Answer::Created(Ok(ID.into())), at).next, Next::Call(Call::Status { .. })));
    let next = flow.step(Answer::Slept, at).next;
    assert_eq!(next, Next::Call(Call::Delete { id: ID.into() }));
    let Next::Finished(Err(BuildError::Failed(message))) = flow.step(Answer::Done(Ok(())), at).next else {
        panic!("expected a failure")
    };
    assert!(message.contains("does not fit step Status") && message.ends_with(DECORATION), "{message}");
    assert!(matches!(flow.step(Answer::Start, at).next, Next::Finished(Err(_))));
}

#[test]
fn a_from_arg_with_a_default_is_looked_up_and_one_without_is_a_warning() {
    let mut world = World::new();
    world.lookups.push_back(Ok((404, r#"{"code":"not_found"}"#.into())));
    let run = drive(request("\u{feff}ARG BASE=other/base\r\nFROM $BASE\r\nCOPY b /b\r\n"), &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    assert_eq!(run.calls[0], "GET http://api/platform/v1/sandbox-templates/by-name/other%2Fbase");
    assert_eq!(world.prepare_body.unwrap()["baseImage"], "other/base");
    let mut world = World::new();
    let run = drive(request("ARG BASE\nFROM $BASE\nCOPY b /b\n"), &mut world);
    assert_eq!(run.calls[0], PREPARE, "no lookup");
    assert_eq!(
        run.warnings(),
        ["Dockerfile line 2: FROM $BASE is not looked up as a template: ARG BASE has no value \
          (no default before the first FROM and no build argument)"]
    );
    assert_eq!(world.prepare_body.unwrap()["baseImage"], "$BASE");
}

/// PAT mode: the organization and project go into every platform path (one
/// segment each) and, as headers, with every platform call.
#[test]
fn pat_mode_scopes_the_platform_paths_and_sends_the_scope_headers() {
    let mut pat = request("FROM base\n");
    pat.scope = Some(Scope { organization: "org 1".into(), project: "p/2".into() });
    let mut flow = Flow::new(pat, Duration::from_secs(100));
    let scoped = "http://api/platform/v1/organizations/org%201/projects/p%2F2";
    let expect_call = |next: Next, method: &str, url: &str| match next {
        Next::Call(Call::Http { method: m, url: u, headers, .. }) => {
            assert_eq!((m, u.as_str()), (method, url));
            for (name, value) in [("x-forwarded-organization-id", "org 1"), ("x-forwarded-project-id", "p/2")] {
                assert!(headers.contains(&(name.to_owned(), value.to_owned())), "{name} missing: {headers:?}");
            }
            assert!(headers.contains(&("authorization".to_owned(), "Bearer sst1.tok".to_owned())));
        }
        other => panic!("expected {method} {url}, got {other:?}"),
    };
    let step = flow.step(Answer::Start, Duration::from_secs(100));
    expect_call(step.next, "GET", &format!("{scoped}/sandbox-templates/by-name/base"));
    let step = flow.step(Answer::Http(Ok((404, Vec::new()))), Duration::from_secs(100));
    expect_call(step.next, "POST", &format!("{scoped}/sandbox-template-builds"));

    // API-key mode: no scope in the path, no scope headers.
    let mut flow = Flow::new(request("FROM scratch\n"), Duration::from_secs(100));
    match flow.step(Answer::Start, Duration::from_secs(100)).next {
        Next::Call(Call::Http { url, headers, .. }) => {
            assert_eq!(url, PREPARE.trim_start_matches("POST "));
            assert!(headers.iter().all(|(name, _)| !name.starts_with("x-forwarded")), "{headers:?}");
        }
        other => panic!("{other:?}"),
    }
}

fn cancellation(run: &Run) -> &str {
    match &run.outcome {
        Err(BuildError::Cancelled(m)) => m,
        other => panic!("expected a cancelled build, got {other:?}"),
    }
}

#[test]
fn a_build_cancelled_while_the_builder_runs_aborts_the_upload_and_deletes_the_sandbox_without_diagnostics() {
    let mut world = World::new();
    world.cancel_at = Some("run /usr/local/bin/tl-rootfs-build");
    let run = drive(request("FROM scratch\n"), &mut world);
    // No diagnostics: nothing failed, the user stopped it. The sandbox goes first (its builder
    // may still be writing parts), then the upload.
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, DELETE, ABORT_CALL]));
    assert_eq!(
        cancellation(&run),
        format!(
            "the build was cancelled during its build stage (Ctrl-C); cleaned up: deleted builder sandbox sbx-1, \
             aborted the snapshot's multipart upload{DECORATION}"
        )
    );
    assert!(world.complete_body.is_none(), "nothing is completed");
}

#[test]
fn a_build_cancelled_before_its_sandbox_exists_creates_none_and_says_nothing_was_left() {
    let mut world = World::new();
    world.cancel_at = Some("create ");
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, [PREPARE, "create tensorlake/rootfs-builder"]);
    assert_eq!(
        cancellation(&run),
        "the build was cancelled during its sandbox stage (Ctrl-C); nothing was left to clean up"
    );
}

#[test]
fn a_build_cancelled_while_its_sandbox_starts_deletes_it_and_names_what_could_not_be_cleaned() {
    let mut world = World::new();
    world.cancel_at = Some("status ");
    world.delete = Err(SandboxError::Transient("HTTP 502".into()));
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[&START[..3], DELETE]));
    let said = cancellation(&run);
    assert!(
        said.starts_with("the build was cancelled during its sandbox stage (Ctrl-C); left behind: builder sandbox sbx-1 (its delete failed: transient sandbox error: HTTP 502)"),
        "{said}"
    );

    // Cancelled during the context upload: the signed upload is aborted too.
    let mut world = World::new();
    world.cancel_at = Some("upload-context ");
    world.abort = (403, "expired".into());
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], &SETUP[..3], DELETE, ABORT_CALL]));
    let said = cancellation(&run);
    assert!(
        said.contains("during its upload stage")
            && said.contains("cleaned up: deleted builder sandbox sbx-1; left behind: the snapshot's multipart upload (its abort answered HTTP 403)"),
        "{said}"
    );
}

#[test]
fn a_build_that_failed_finishes_its_cleanup_when_cancelled_during_diagnostics() {
    let mut world = World::new();
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: None };
    world.cancel_at = Some("diagnose dmesg");
    let run = drive(request("FROM scratch\n"), &mut world);
    // The failure stands; the diagnostics answer cancelled and the sandbox is still deleted.
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, ABORT_CALL, DIAGNOSE, DELETE]));
    assert!(
        run.failure().starts_with("Command '/usr/local/bin/tl-rootfs-build' failed with exit code 1"),
        "{}",
        run.failure()
    );
}

#[test]
fn build_arguments_reach_the_lookups_prepare_and_spec_json_through_the_dockerfiles_args() {
    let (mut world, _) = diff_world();
    let mut r = request("ARG BASE=scratch\nFROM $BASE\nARG GREETING\nENV G=$GREETING\n");
    r.build_args =
        vec![("BASE".into(), "other/base".into()), ("GREETING".into(), "hi $there".into()), ("X".into(), "1".into())];
    let run = drive(r, &mut world);
    assert!(run.outcome.is_ok(), "{:?}", run.outcome);
    let lookup = "GET http://api/platform/v1/sandbox-templates/by-name/other%2Fbase";
    assert_eq!(run.calls[0], lookup, "the FROM is looked up with the argument");
    let sent =
        "ARG BASE=scratch BASE=\"other/base\"\nFROM $BASE\nARG GREETING GREETING=\"hi \\$there\"\nENV G=$GREETING\n";
    let prepare = world.prepare_body.unwrap();
    assert_eq!(prepare["dockerfile"], sent);
    assert_eq!(prepare["rootfsNodeKind"], "diff", "a template named by the argument is the parent");
    assert_eq!(world.spec.unwrap()["dockerfile"], sent);
    assert_eq!(run.warnings(), ["build arguments not declared by any ARG, so not used: X"]);

    // A value an ARG cannot hold is a usage error before any call.
    let mut world = World::new();
    let mut r = request("FROM scratch\nARG A\n");
    r.build_args = vec![("A".into(), "x\nRUN evil".into())];
    let run = drive(r, &mut world);
    assert!(run.calls.is_empty(), "{:?}", run.calls);
    assert!(matches!(&run.outcome, Err(BuildError::Usage(m)) if m.contains("build argument A")), "{:?}", run.outcome);
}

#[test]
fn a_failed_builder_s_last_error_line_is_in_the_failure() {
    let mut world = World::new();
    let said =
        "error: spec.dockerfile line 2: COPY missing.txt /x: source missing.txt does not exist in the build context";
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: Some(format!("{said}\n")) };
    let run = drive(request("FROM scratch\nCOPY missing.txt /x\n"), &mut world);
    assert!(
        run.failure().starts_with(&format!(
            "Command '/usr/local/bin/tl-rootfs-build' failed with exit code 1: {said} (builder sandbox: sbx-1"
        )),
        "{}",
        run.failure()
    );
    // Killed (here by the OOM killer), its last stderr line is older news and is not quoted.
    let mut world = World::new();
    world.builder_exit = Exit { code: -9, oom_killed: true, last_error: Some("Uploading part 3".into()) };
    let run = drive(request("FROM scratch\n"), &mut world);
    assert!(!run.failure().contains("Uploading part 3"), "{}", run.failure());
}

#[test]
fn a_build_cancelled_while_a_platform_request_is_in_flight_ends_before_any_sandbox() {
    let mut world = World::new();
    world.cancel_at = Some(PREPARE);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, [PREPARE]);
    assert_eq!(
        cancellation(&run),
        format!(
            "the build was cancelled during its prepare stage ({}); nothing was left to clean up",
            crate::image_build::call::CANCELLED_BY_HOST
        )
    );

    // During the sign request: it is let finish (it may create the upload), so the
    // sandbox is deleted and the upload it signed is aborted.
    let mut world = World::new();
    world.cancel_at = Some(SIGN_PUT);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT, "run mkdir"], DELETE, ABORT_CALL]));
    let said = cancellation(&run);
    assert!(
        said.contains("cleaned up: deleted builder sandbox sbx-1, aborted the snapshot's multipart upload"),
        "{said}"
    );

    // While complete is asked for again after a lost answer: the platform may have
    // registered the build, and the message says so.
    let mut world = World::new();
    world.completes.push_back(Err("connection reset".into()));
    world.cancel_at = Some("sleep ");
    let run = drive(request("FROM scratch\n"), &mut world);
    let said = cancellation(&run);
    assert!(said.contains("during its complete stage"), "{said}");
    assert!(said.contains("an earlier complete went unanswered, so the platform may have registered it"), "{said}");
    assert!(world.complete_body.is_none(), "the retry was not sent");
}

const SIGN_REFRESH: &str = "POST http://proxy/api/v1/blob/sign refresh_upload";
const RESUME: &[&str] = &[
    SIGN_REFRESH,
    "write /var/lib/tensorlake/rootfs-builder/build/spec.json",
    "run /usr/local/bin/tl-rootfs-build (logged)",
];

fn interrupted() -> Exit {
    let line = "interrupted: the signed URL of part 2 expired with 1 of 2 parts of multipart upload u-1 up";
    Exit { code: 75, oom_killed: false, last_error: Some(line.into()) }
}

#[test]
fn expired_part_urls_are_signed_again_for_the_same_upload_and_the_builder_resumes() {
    let mut world = World::new();
    world.builder_exits = VecDeque::from([interrupted()]);
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.outcome, Ok(r#"{"id":"tmpl-1","name":"base"}"#.into()));
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, RESUME, READ_METADATA, &[COMPLETE], DELETE]);
    assert_eq!(run.calls, expected);
    // Fresh URLs of the same upload of the same object, for the same parts.
    let refresh = &world.sign_bodies[1];
    assert_eq!(refresh["target"], json!({"kind": "blob", "uri": URI}));
    assert_eq!(refresh["op"]["upload_id"], "u-1");
    assert_eq!(refresh["op"]["multipart_hint"], world.sign_bodies[0]["op"]["multipart_hint"]);
    // spec.json carries them; the first run may be interrupted, the second resumes.
    let spec = world.spec.as_ref().unwrap();
    assert_eq!(spec["upload"]["abortUrl"], FRESH_ABORT);
    assert_eq!(spec["upload"]["partUrls"][0]["url"], "http://store/snapshots/part?partNumber=1&fresh");
    let has = |env: &[(String, String)], name: &str| env.iter().any(|(k, v)| k == name && v == "1");
    let (first, second) = (&world.builder_envs[0], &world.builder_envs[1]);
    assert!(has(first, command::BUILDER_RESUMABLE_ENV) && !has(first, command::BUILDER_RESUME_ENV), "{first:?}");
    assert!(has(second, command::BUILDER_RESUMABLE_ENV) && has(second, command::BUILDER_RESUME_ENV), "{second:?}");
    assert_eq!(run.warnings().len(), 1);
    assert!(run.warnings()[0].starts_with("interrupted: the signed URL of part 2 expired"), "{:?}", run.warnings());
    assert!(run.warnings()[0].ends_with("asking the signer for fresh URLs of the same upload (refresh 1 of 3)"));
}

#[test]
fn a_builder_interrupted_more_than_three_times_fails_and_aborts_with_the_fresh_abort_url() {
    let mut world = World::new();
    world.builder_exit = interrupted();
    let run = drive(request("FROM scratch\n"), &mut world);
    let resumed = [RESUME, RESUME, RESUME].concat();
    let aborted = ["DELETE http://store/snapshots/abort?uploadId=u-1&fresh"];
    let expected = calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, &resumed, &aborted, DIAGNOSE, DELETE]);
    assert_eq!(run.calls, expected);
    assert!(run.failure().starts_with(&format!("Command '{BUILDER}' failed with exit code 75: interrupted:")));
    assert!(run.failure().contains("; gave up after 3 refreshes of the upload's URLs"), "{}", run.failure());
}

/// The abort URL expires with the part URLs: answered 403 "Request has
/// expired", the flow asks once for a fresh one (the sandbox's proxy still
/// lives) and aborts with it; a refusal of that leaves the upload, said.
#[test]
fn an_expired_abort_url_is_signed_again_once_and_the_upload_aborted_with_the_fresh_one() {
    let expired = "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>";
    let mut world = World::new();
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: Some("error: COPY failed".into()) };
    world.aborts = VecDeque::from([(403, expired.to_owned())]);
    let run = drive(request("FROM scratch\n"), &mut world);
    let aborts = [ABORT_CALL[0], SIGN_REFRESH, "DELETE http://store/snapshots/abort?uploadId=u-1&fresh"];
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, &aborts, DIAGNOSE, DELETE]));
    assert_eq!(world.sign_bodies[1]["op"]["multipart_hint"]["max_parts"], 1);
    assert!(run.warnings().iter().any(|w| w.contains("abort URL of the multipart upload expired")));
    assert!(run.warnings().iter().any(|w| w.starts_with("aborted the multipart upload")), "{:?}", run.warnings());

    // The fresh one refused too: said, and asked for only once.
    let mut world = World::new();
    world.builder_exit = Exit { code: 1, oom_killed: false, last_error: None };
    world.aborts = VecDeque::from([(403, expired.to_owned())]);
    world.refresh_answer = (404, json!({"code": "no_such_upload"}));
    let run = drive(request("FROM scratch\n"), &mut world);
    assert_eq!(run.calls, calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, &aborts[..2], DIAGNOSE, DELETE]));
    assert!(run.warnings().iter().any(|w| w.contains("no fresh one was signed")), "{:?}", run.warnings());
}

#[test]
fn a_refresh_answer_for_another_upload_or_a_refused_one_fails_the_build_and_aborts_the_first_upload() {
    for (answer, says) in [
        ((200, multipart(Some("s3://snapshots/builds/default/other.tlsnap"))), "not Some(\"u-1\") of Some("),
        (
            (404, json!({"code": "no_such_upload"})),
            "fresh URLs for the upload: dataplane sign request failed (HTTP 404)",
        ),
    ] {
        let mut world = World::new();
        world.builder_exits = VecDeque::from([interrupted()]);
        world.refresh_answer = answer;
        let run = drive(request("FROM scratch\n"), &mut world);
        let expected =
            calls(&[START, &["proxy sbx-1", SIGN_PUT], SETUP, &[SIGN_REFRESH], ABORT_CALL, DIAGNOSE, DELETE]);
        assert_eq!(run.calls, expected);
        assert!(run.failure().contains(says), "{says}: {}", run.failure());
        assert!(world.complete_body.is_none());
    }
}
