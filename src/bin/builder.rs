//! The builder component: runs one sandbox image build (PROTOCOL.md §0)
//! with the dataplane-signed URI. Decisions come from `snapsign::build`;
//! this shell sequences the calls: platform and sign over wasi:http,
//! sandbox mechanics through the host's `sandbox-exec`.

use std::io::Write;
use std::time::{Duration, Instant};

use ::snapsign::build::{command, complete, decorate, diagnose, plan, sizing, splice};
use serde_json::{Map, Value, json};

mod bindings {
    wit_bindgen::generate!({ world: "builder", path: "wit", pub_export_macro: true });
}

use bindings::exports::snapsign::components::build::{BuildError, BuildRequest, Guest};
use bindings::snapsign::components::events::{Event, emit};
use bindings::snapsign::components::sandbox_exec as sx;
use bindings::snapsign::components::types::{ProcessSpec, Resources, SandboxError};

struct Component;

impl Guest for Component {
    fn run(request: BuildRequest) -> Result<String, BuildError> {
        wstd::runtime::block_on(run(request))
    }
}

bindings::export!(Component with_types_in bindings);

fn main() {}

/// Uploads the gzip tar of the context in chunks of this size.
const CHUNK: usize = 256 * 1024;
/// The build context, preopened read-only by the host.
const CONTEXT_DIR: &str = "/context";

fn stage(name: &str) {
    emit(&Event::Stage(name.to_owned()));
}

fn failed(message: impl Into<String>) -> BuildError {
    BuildError::Failed(message.into())
}

fn sandbox_error(e: &SandboxError) -> String {
    match e {
        SandboxError::Transient(m) => format!("transient sandbox error: {m}"),
        SandboxError::Gone(m) => format!("sandbox gone: {m}"),
        SandboxError::Denied(m) => format!("sandbox access denied: {m}"),
        SandboxError::Failed(m) => m.clone(),
    }
}

/// An HTTP exchange: status and body text.
async fn call(
    method: &str,
    url: &str,
    headers: &[(String, String)],
    body: Option<&Value>,
) -> Result<(u16, String), String> {
    let mut headers = headers.to_vec();
    let bytes = match body {
        Some(json) => {
            headers.push(("content-type".into(), "application/json".into()));
            json.to_string().into_bytes()
        }
        None => Vec::new(),
    };
    let (status, bytes) = ::snapsign::wasi_http::send(method, url, &headers, &bytes)?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

struct Platform {
    api: String,
    auth: Vec<(String, String)>,
}

impl Platform {
    async fn lookup(&self, reference: &str) -> Result<Option<Value>, BuildError> {
        let encoded: String = reference
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let url = format!("{}/platform/v1/sandbox-templates/by-name/{encoded}", self.api);
        // A lookup is idempotent: one retry when the connection itself failed.
        let (status, text) = match call("GET", &url, &self.auth, None).await {
            Ok(answer) => answer,
            Err(first) => {
                emit(&Event::Warning(format!("template lookup for '{reference}' failed ({first}); retrying once")));
                call("GET", &url, &self.auth, None).await.map_err(failed)?
            }
        };
        match status {
            200 => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| failed(format!("template lookup for '{reference}': {e}"))),
            404 => Ok(None),
            // Another namespace's private template: a refusal of the reference, not of the credentials.
            403 if text.contains("template_private") => {
                Err(failed(format!("FROM {reference}: the platform refused it (HTTP 403): {text}")))
            }
            401 | 403 => {
                Err(BuildError::Auth(format!("template lookup for '{reference}' refused (HTTP {status}): {text}")))
            }
            _ => Err(failed(format!("template lookup for '{reference}' failed (HTTP {status}): {text}"))),
        }
    }
}

/// What cleanup needs to know once the sandbox exists.
struct Live {
    sandbox: String,
    build_id: String,
    abort_url: Option<String>,
    /// The sandbox answered: failures from here on get diagnostics.
    ready: bool,
}

async fn run(request: BuildRequest) -> Result<String, BuildError> {
    let started = Instant::now();
    let platform = Platform {
        api: request.api_url.trim_end_matches('/').to_owned(),
        auth: vec![("authorization".into(), format!("Bearer {}", request.token))],
    };

    stage("plan");
    let plan = plan::plan(&request.dockerfile).map_err(|e| BuildError::Usage(e.to_string()))?;
    let parent = match &plan.final_lookup {
        Some(reference) => platform.lookup(reference).await?,
        None => None,
    };
    for other in &plan.other_lookups {
        platform.lookup(other).await?;
    }
    let template_ref = |t: &Value, reference: &str| {
        json!({"templateId": t["id"], "name": t["name"], "reference": reference, "snapshotId": t["snapshotId"],
               "public": t["public"].as_bool().unwrap_or(false)})
    };
    let parent_template = parent.as_ref().map(|t| template_ref(t, &plan.base_image));

    stage("prepare");
    let prepare_body = json!({
        "name": request.name, "dockerfile": request.dockerfile, "baseImage": plan.base_image, "public": request.public,
        "rootfsNodeKind": if parent_template.is_some() { "diff" } else { "base" },
        "parentTemplate": parent_template, "additionalLocalImages": [],
    });
    let url = format!("{}/platform/v1/sandbox-template-builds", platform.api);
    let (status, text) = call("POST", &url, &platform.auth, Some(&prepare_body)).await.map_err(failed)?;
    if status == 401 || status == 403 {
        return Err(BuildError::Auth(format!("failed to prepare sandbox image build (HTTP {status}): {text}")));
    }
    if !(200..300).contains(&status) {
        return Err(failed(format!("failed to prepare sandbox image build (HTTP {status}): {text}")));
    }
    let raw: Value = serde_json::from_str(&text).map_err(|e| failed(format!("prepare answer is not JSON: {e}")))?;
    let prepared = splice::Prepared::parse(raw).map_err(|e| failed(e.to_string()))?;
    let is_diff = prepared.parent.is_some();
    let rootfs_bytes = sizing::rootfs_disk_bytes(request.disk_mb, is_diff, prepared.parent.as_ref().and_then(|p| p.1))
        .map_err(|e| BuildError::Usage(e.to_string()))?;
    let b = &prepared.builder;
    let resources = sizing::resources(
        rootfs_bytes,
        (b.cpus, b.memory_mb, b.disk_mb),
        request.builder_cpus,
        request.builder_memory_mb,
        request.builder_disk_mb,
    );
    let invocation = command::builder_invocation(&b.command).map_err(|e| failed(e.to_string()))?;

    stage("sandbox");
    let created = sx::create(
        &b.image,
        Resources { cpus: resources.cpus, memory_mb: resources.memory_mb, disk_mb: resources.disk_mb },
        300,
    )
    .map_err(|e| failed(format!("create the builder sandbox: {}", sandbox_error(&e))))?;
    let mut live =
        Live { sandbox: created.id.clone(), build_id: prepared.build_id.clone(), abort_url: None, ready: false };
    let result =
        in_sandbox(&request, &platform, &prepared, &plan.base_image, rootfs_bytes, invocation, &mut live).await;
    if let (Err(_), Some(abort)) = (&result, &live.abort_url) {
        match call("DELETE", abort, &[], None).await {
            Ok((status, _)) if (200..300).contains(&status) => {
                emit(&Event::Warning(format!("aborted the multipart upload of build {}", live.build_id)))
            }
            Ok((status, text)) => {
                emit(&Event::Warning(format!("abort of the multipart upload answered HTTP {status}: {text}")))
            }
            Err(e) => emit(&Event::Warning(format!("cannot abort the multipart upload: {e}"))),
        }
    }
    let result = match result {
        Err(BuildError::Failed(message)) if live.ready => Err(BuildError::Failed(diagnosed(&live.sandbox, &message))),
        other => other,
    };
    stage("cleanup");
    if let Err(e) = sx::delete(&live.sandbox) {
        emit(&Event::Warning(format!(
            "Failed to terminate rootfs builder sandbox {} during cleanup: {}",
            live.sandbox,
            sandbox_error(&e)
        )));
    }
    let registered = result.map_err(|e| match e {
        BuildError::Failed(m) => BuildError::Failed(decorate(&m, &live.sandbox, &live.build_id)),
        BuildError::Auth(m) => BuildError::Auth(decorate(&m, &live.sandbox, &live.build_id)),
        BuildError::Usage(m) => BuildError::Usage(decorate(&m, &live.sandbox, &live.build_id)),
    })?;
    emit(&Event::Stage(format!("done in {:.1} s", started.elapsed().as_secs_f64())));
    Ok(registered)
}

/// The failure with advice from the sandbox's dmesg and df (PROTOCOL.md §5.9).
fn diagnosed(id: &str, failure: &str) -> String {
    let mut outputs = Vec::new();
    for script in diagnose::COMMANDS {
        let process = spec("/bin/sh", &["-lc", script], true);
        outputs.push(sx::run_captured(id, &process, 5).map(|(_, lines)| lines).unwrap_or_default());
    }
    diagnose::with_advice(failure, &diagnose::advice(failure, &outputs[0], &outputs[1]))
}

/// Retries `attempt` while it is not ready or fails transiently, until
/// `deadline` (then fails with `what`); any other error fails at once.
async fn until_ready<T>(
    deadline: Instant,
    what: &str,
    mut attempt: impl FnMut() -> Result<Option<T>, SandboxError>,
) -> Result<T, BuildError> {
    loop {
        match attempt() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) | Err(SandboxError::Transient(_)) if Instant::now() < deadline => {
                wstd::task::sleep(wstd::time::Duration::from_millis(250)).await;
            }
            Ok(None) | Err(SandboxError::Transient(_)) => return Err(failed(what)),
            Err(e) => return Err(failed(sandbox_error(&e))),
        }
    }
}

fn spec(command: &str, args: &[&str], root: bool) -> ProcessSpec {
    ProcessSpec {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        working_dir: None,
        as_root: root,
    }
}

fn run_ok(id: &str, process: ProcessSpec, log: bool) -> Result<(), BuildError> {
    let name = process.command.clone();
    let exit = sx::run(id, &process, log).map_err(|e| failed(format!("run '{name}': {}", sandbox_error(&e))))?;
    if exit.code != 0 || exit.oom_killed {
        let oom = if exit.oom_killed { " (process was killed by the kernel OOM killer)" } else { "" };
        return Err(failed(format!("Command '{name}' failed with exit code {}{oom}", exit.code)));
    }
    Ok(())
}

async fn sign(endpoint: &sx::ProxyEndpoint, body: Value) -> Result<Value, BuildError> {
    let url = format!("{}/api/v1/blob/sign", endpoint.base_url.trim_end_matches('/'));
    let (status, text) = call("POST", &url, &endpoint.headers, Some(&body)).await.map_err(failed)?;
    if !(200..300).contains(&status) {
        return Err(failed(format!("dataplane sign request failed (HTTP {status}): {text}")));
    }
    serde_json::from_str(&text).map_err(|e| failed(format!("dataplane sign answer is not JSON: {e}")))
}

#[allow(clippy::too_many_arguments)]
async fn in_sandbox(
    request: &BuildRequest,
    platform: &Platform,
    prepared: &splice::Prepared,
    base_image: &str,
    rootfs_bytes: u64,
    (program, args): (String, Vec<String>),
    live: &mut Live,
) -> Result<String, BuildError> {
    let id = live.sandbox.clone();
    let wait = u64::from(request.sandbox_wait_secs.max(1));
    let deadline = Instant::now() + Duration::from_secs(wait);
    let not_running = format!("Sandbox {id} did not reach 'running' within {wait}s");
    until_ready(deadline, &not_running, || match sx::status(&id)?.as_str() {
        "running" => Ok(Some(())),
        "terminated" => Err(SandboxError::Gone(format!("Sandbox {id} terminated before reaching 'running'"))),
        _ => Ok(None),
    })
    .await?;
    let not_answering = format!("Sandbox {id} is running but its proxy did not answer within {wait}s");
    until_ready(deadline, &not_answering, || {
        let exit = sx::run(&id, &spec("/bin/true", &[], false), false)?;
        Ok((exit.code == 0).then_some(()))
    })
    .await?;

    live.ready = true;
    let mut spec_json: Map<String, Value> = prepared.raw.clone();
    let mut signed_uri = None;
    if let Some(rel_path) = &prepared.snapshot_rel_path {
        stage("sign");
        let endpoint = sx::proxy(&id).map_err(|e| failed(format!("sandbox proxy endpoint: {}", sandbox_error(&e))))?;
        let hint = sizing::multipart_hint(rootfs_bytes);
        let answer = sign(
            &endpoint,
            json!({"target": {"kind": "artifact", "rel_path": rel_path},
                                            "op": {"kind": "put_artifact", "multipart_hint": hint}}),
        )
        .await?;
        if answer.get("kind").and_then(Value::as_str) == Some("s3_multipart") {
            live.abort_url = answer.get("abortUrl").and_then(Value::as_str).map(str::to_owned);
        }
        signed_uri = Some(splice::splice_upload(&mut spec_json, answer).map_err(|e| failed(e.to_string()))?);
        if let Some((parent_uri, _)) = &prepared.parent {
            let read =
                sign(&endpoint, json!({"target": {"kind": "blob", "uri": parent_uri}, "op": {"kind": "get_blob"}}))
                    .await?;
            splice::splice_parent_download(&mut spec_json, read).map_err(|e| failed(e.to_string()))?;
        }
        for (index, uri) in splice::local_images_to_sign(&spec_json) {
            let read =
                sign(&endpoint, json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}})).await?;
            splice::splice_local_image(&mut spec_json, index, read);
        }
    }

    stage("upload");
    let build_dir = command::BUILD_DIR;
    run_ok(&id, spec("mkdir", &["-p", build_dir], true), false)?;
    run_ok(&id, spec("chmod", &["0777", build_dir], true), false)?;
    let archive = format!("{build_dir}/context.tar.gz");
    let context = format!("{build_dir}/context");
    upload_context(&id, &archive)?;
    run_ok(&id, spec("mkdir", &["-p", &context], false), false)?;
    run_ok(&id, spec("tar", &["-xzf", &archive, "-C", &context], false), false)?;
    run_ok(&id, spec("rm", &["-f", &archive], false), false)?;
    spec_json.insert("dockerfile".into(), json!(request.dockerfile));
    spec_json.insert("contextDir".into(), json!(context));
    spec_json.insert("baseImage".into(), json!(base_image));
    spec_json.insert("rootfsDiskBytes".into(), json!(rootfs_bytes));
    let spec_bytes = serde_json::to_vec_pretty(&Value::Object(spec_json)).expect("JSON");
    sx::write_file(&id, &format!("{build_dir}/spec.json"), &spec_bytes)
        .map_err(|e| failed(format!("write spec.json: {}", sandbox_error(&e))))?;

    stage("build");
    let builder = ProcessSpec {
        command: program,
        args,
        env: vec![("PATH".into(), command::BUILDER_PATH_ENV.into())],
        working_dir: Some(build_dir.into()),
        as_root: true,
    };
    run_ok(&id, builder, true)?;

    stage("complete");
    let metadata = sx::read_file(&id, &format!("{build_dir}/metadata.json"))
        .map_err(|e| failed(format!("read metadata.json: {}", sandbox_error(&e))))?;
    let metadata: Value =
        serde_json::from_slice(&metadata).map_err(|e| failed(format!("metadata.json is not JSON: {e}")))?;
    let body = complete::completion(prepared, signed_uri.as_deref(), &metadata, rootfs_bytes)
        .map_err(|e| failed(e.to_string()))?;
    let url = format!("{}/platform/v1/sandbox-template-builds/{}/complete", platform.api, prepared.build_id);
    let (status, text) = call("POST", &url, &platform.auth, Some(&body)).await.map_err(failed)?;
    if !(200..300).contains(&status) {
        return Err(failed(format!("failed to complete sandbox image build (HTTP {status}): {text}")));
    }
    live.abort_url = None; // completed: nothing left to abort
    serde_json::from_str::<Value>(&text).map_err(|e| failed(format!("complete answer is not JSON: {e}")))?;
    Ok(text)
}

/// Streams chunks to the sandbox file, reporting progress.
struct Upload {
    writer: sx::FileWriter,
    buffer: Vec<u8>,
    sent: u64,
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.writer.write(&self.buffer).map_err(|e| std::io::Error::other(sandbox_error(&e)))?;
        self.sent += self.buffer.len() as u64;
        emit(&Event::UploadProgress((self.sent, 0)));
        self.buffer.clear();
        Ok(())
    }
}

fn upload_context(id: &str, path: &str) -> Result<(), BuildError> {
    let writer =
        sx::open_file_writer(id, path).map_err(|e| failed(format!("upload the context: {}", sandbox_error(&e))))?;
    let upload = Upload { writer, buffer: Vec::with_capacity(CHUNK), sent: 0 };
    let gz = flate2::write::GzEncoder::new(upload, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    append_tree(&mut tar, std::path::Path::new(CONTEXT_DIR), "")
        .map_err(|e| failed(format!("archive the build context: {e}")))?;
    let mut upload =
        tar.into_inner().and_then(|gz| gz.finish()).map_err(|e| failed(format!("archive the build context: {e}")))?;
    upload.flush().map_err(|e| failed(format!("upload the context: {e}")))?;
    let written = upload.writer.finish().map_err(|e| failed(format!("upload the context: {}", sandbox_error(&e))))?;
    emit(&Event::UploadProgress((written, written)));
    Ok(())
}

/// Appends `dir` under `prefix`, sorted, with deterministic headers. WASI
/// has no permission bits, so files get 0644 and directories 0755.
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &std::path::Path, prefix: &str) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let kind = entry.file_type()?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            append_tree(tar, &entry.path(), &path)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &path, target)?;
        } else {
            let file = std::fs::File::open(entry.path())?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(file.metadata()?.len());
            tar.append_data(&mut header, &path, file)?;
        }
    }
    Ok(())
}
