//! The sandbox proxy (wit/protocol.md §4): processes, files, health, and
//! `POST /api/v1/blob/sign` forwarded to the signer with a token for the
//! sandbox's namespace. Routed by `Host: {id}.local` or `X-Tensorlake-Sandbox-Id`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};
use snapsign::wire::{Op, S3Multipart, SignRequest, Target, Upload};
use snapsign_sandbox::{ProcessSpec, Sandbox};

use super::http::{ApiError, Body, channel_body, namespace, query_param, read_json, sse, sse_frame};
use super::lifecycle::{LifecycleApi, SandboxRecord, pending_error};
use super::shared::Shared;

/// The sandbox proxy's handler: it reaches the sandboxes the lifecycle API
/// made, and forwards sign requests to the signer.
pub struct ProxyApi {
    shared: Arc<Shared>,
    lifecycle: Arc<LifecycleApi>,
    /// Where sign requests go.
    signer_url: String,
    health_checks: AtomicU64,
}

/// The sandbox a proxy request is for.
fn sandbox_id(request: &Request<Incoming>) -> Option<String> {
    if let Some(id) = request.headers().get("x-tensorlake-sandbox-id").and_then(|v| v.to_str().ok()) {
        return Some(id.trim().to_owned());
    }
    let host = request.headers().get(http::header::HOST)?.to_str().ok()?;
    let host = host.split(':').next()?;
    host.strip_suffix(".local").map(str::to_owned)
}

fn is_builder(command: &str) -> bool {
    command.rsplit('/').next() == Some("tl-rootfs-build")
}

impl ProxyApi {
    pub(crate) fn new(shared: Arc<Shared>, lifecycle: Arc<LifecycleApi>, signer_url: String) -> Self {
        ProxyApi { shared, lifecycle, signer_url, health_checks: AtomicU64::new(0) }
    }

    /// How many `GET /api/v1/health` it answered.
    pub(crate) fn health_checks(&self) -> u64 {
        self.health_checks.load(Ordering::SeqCst)
    }

    /// Serves one request under `/api/v1/`.
    pub(crate) async fn handle(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let sandbox = match self.admit(&request) {
            Ok(found) => found,
            Err(error) => {
                // Drain what the client sends before refusing, so it reads the answer, not a reset.
                let (_, body) = request.into_parts();
                let _ = http_body_util::Limited::new(body, 64 << 20).collect().await;
                return Err(error);
            }
        };
        // Any proxy request is activity: it renews the sandbox's timeout (as the build's health pings do).
        sandbox.renew();
        let (id, record) = (sandbox.id().to_owned(), self.record_of(&sandbox)?);
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let segments: Vec<String> = path.trim_start_matches("/api/v1/").split('/').map(str::to_owned).collect();
        let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
        match (&method, segments.as_slice()) {
            (&Method::GET, ["health"]) => {
                self.health_checks.fetch_add(1, Ordering::SeqCst);
                Ok(super::http::json(StatusCode::OK, &json!({"healthy": true})))
            }
            (&Method::POST, ["blob", "sign"]) => self.forward_sign(&record.namespace, request).await,
            (&Method::POST, ["processes"]) => {
                let spec = process_spec(read_json(request).await?)?;
                Ok(super::http::json(StatusCode::OK, &self.start_process(&sandbox, spec)?))
            }
            (&Method::GET, ["processes"]) => {
                Ok(super::http::json(StatusCode::OK, &json!({"processes": sandbox.list()})))
            }
            (&Method::GET, ["processes", pid]) => {
                let pid = parse_pid(&id, pid)?;
                let info = sandbox.process(pid).ok_or_else(|| no_process(&id, pid))?;
                Ok(super::http::json(StatusCode::OK, &info))
            }
            (&Method::GET, ["processes", pid, "output", "follow"]) => {
                let pid = parse_pid(&id, pid)?;
                let mut events = sandbox.follow(pid).ok_or_else(|| no_process(&id, pid))?;
                let (tx, rx) = tokio::sync::mpsc::channel(64);
                tokio::spawn(async move {
                    while let Some(event) = events.next().await {
                        if tx.send(Ok(sse_frame(&event))).await.is_err() {
                            break;
                        }
                    }
                });
                Ok(sse(channel_body(rx)))
            }
            (&Method::POST, ["processes", "run"]) => {
                let body = read_json(request).await?;
                let timeout = body.get("timeout").and_then(Value::as_f64).unwrap_or(30.0).clamp(0.1, 3600.0);
                let spec = process_spec(body)?;
                self.run_once(sandbox, spec, Duration::from_secs_f64(timeout))
            }
            (&Method::PUT, ["files"]) => {
                let file = query_param(request.uri(), "path").ok_or_else(missing_path)?;
                let stream = request.into_body().into_data_stream().map_err(std::io::Error::other);
                let reader = tokio_util::io::StreamReader::new(stream);
                let written = sandbox
                    .write_file(&file, reader)
                    .await
                    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "write_failed", format!("{e:#}")))?;
                tracing::debug!(sandbox = %id, path = %file, written, "file written");
                Ok(Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(super::http::full(Bytes::new()))
                    .expect("valid"))
            }
            (&Method::GET, ["files"]) => {
                let file = query_param(request.uri(), "path").ok_or_else(missing_path)?;
                let handle = sandbox
                    .read_file(&file)
                    .await
                    .map_err(|e| ApiError::not_found("file_not_found", format!("{e:#}")))?;
                let stream = tokio_util::io::ReaderStream::new(handle).map_ok(hyper::body::Frame::data);
                let body = http_body_util::StreamBody::new(stream).boxed_unsync();
                Ok(Response::builder()
                    .status(StatusCode::OK)
                    .header("content-type", "application/octet-stream")
                    .body(body)
                    .expect("valid"))
            }
            (&Method::DELETE, ["files"]) => {
                let file = query_param(request.uri(), "path").ok_or_else(missing_path)?;
                sandbox
                    .delete_file(&file)
                    .await
                    .map_err(|e| ApiError::not_found("file_not_found", format!("{e:#}")))?;
                Ok(Response::builder()
                    .status(StatusCode::NO_CONTENT)
                    .body(super::http::full(Bytes::new()))
                    .expect("valid"))
            }
            _ => Err(ApiError::not_found("no_route", format!("no proxy route {method} {path}"))),
        }
    }

    /// The sandbox a proxy request may use (its namespace is the token's, and it runs).
    fn admit(&self, request: &Request<Incoming>) -> Result<Arc<Sandbox>, ApiError> {
        let id = sandbox_id(request).ok_or_else(|| {
            ApiError::bad_request(
                "no_sandbox",
                "proxy request names no sandbox: send X-Tensorlake-Sandbox-Id or Host: {id}.local",
            )
        })?;
        let caller = namespace(request.headers(), self.shared.signer.token_key())?;
        self.lifecycle.record(&caller, &id)?;
        if !self.lifecycle.running(&id, false) {
            return Err(pending_error(&id));
        }
        self.lifecycle
            .sandboxes
            .get(&id)
            .ok_or_else(|| ApiError::not_found("sandbox_not_found", format!("sandbox {id} has no local sandbox")))
    }

    fn record_of(&self, sandbox: &Sandbox) -> Result<SandboxRecord, ApiError> {
        self.lifecycle
            .record_by_id(sandbox.id())
            .ok_or_else(|| ApiError::not_found("sandbox_not_found", format!("sandbox {} was deleted", sandbox.id())))
    }

    fn start_process(&self, sandbox: &Sandbox, spec: ProcessSpec) -> Result<snapsign_sandbox::ProcessInfo, ApiError> {
        let faults = self.shared.faults();
        let builder = is_builder(&spec.command);
        // A real OOM kill where the sandbox has a memory controller: the builder uses memory until killed.
        let real_oom = builder && faults.builder_oom && self.lifecycle.sandboxes.cgroups().has_memory();
        let mut entries: Vec<String> = faults.builder_env().into_iter().collect();
        if real_oom {
            entries.push("allocate".into());
        }
        let mut env = std::collections::BTreeMap::new();
        if builder && !entries.is_empty() {
            env.insert("SNAPSIGN_BUILDER_FAULT".to_owned(), entries.join(","));
        }
        sandbox.set_process_env(env);
        let command = spec.command.clone();
        let info = sandbox.start(spec).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "start_failed",
                format!("start {command} in sandbox {}: {e:#}", sandbox.id()),
            )
        })?;
        if builder && faults.builder_oom && !real_oom {
            tracing::warn!(sandbox = %sandbox.id(), pid = info.pid, "injected fault: builder killed as by the OOM killer (simulated: no memory controller here)");
            sandbox.kill(info.pid, 9, true).map_err(ApiError::internal)?;
        }
        Ok(info)
    }

    fn run_once(
        &self,
        sandbox: Arc<Sandbox>,
        spec: ProcessSpec,
        timeout: Duration,
    ) -> Result<Response<Body>, ApiError> {
        let info = self.start_process(&sandbox, spec)?;
        let pid = info.pid;
        let mut events = sandbox.follow(pid).ok_or_else(|| no_process(sandbox.id(), pid))?;
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            let _ = tx.send(Ok(sse_frame(&json!({"pid": pid, "started_at": info.started_at})))).await;
            let drain = async {
                while let Some(event) = events.next().await {
                    if tx.send(Ok(sse_frame(&event))).await.is_err() {
                        return;
                    }
                }
            };
            if tokio::time::timeout(timeout, drain).await.is_err() {
                let _ = sandbox.kill(pid, 9, false);
            }
            // A one-shot run ends with everything it started (children left in the background
            // would otherwise hold the sandbox's process limit, or its output, for good).
            let ended = {
                let sandbox = sandbox.clone();
                tokio::task::spawn_blocking(move || sandbox.end_all_of(pid)).await
            };
            if let Ok(Ok(n)) = ended
                && n > 0
            {
                tracing::debug!(sandbox = %sandbox.id(), pid, ended = n, "one-shot run: ended the processes it left behind");
            }
            if let Some(done) = sandbox.wait(pid).await {
                let exited = json!({"exit_code": done.exit_code, "signal": done.signal, "oom_killed": done.oom_killed});
                let _ = tx.send(Ok(sse_frame(&exited))).await;
            }
        });
        Ok(sse(channel_body(rx)))
    }

    async fn forward_sign(&self, namespace: &str, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let faults = self.shared.faults();
        let body = http_body_util::Limited::new(request.into_body(), snapsign::signer::MAX_BODY_BYTES + 1)
            .collect()
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "body_too_large", format!("sign request body: {e}"))
            })?
            .to_bytes();
        // After reading the body: a client still sending it would see a reset, not the 502.
        if faults.sign_fail {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "sign_failed",
                "injected fault: the dataplane signer failed",
            ));
        }
        let claims = snapsign::token::Claims {
            read: self.read_grant(namespace, &body)?,
            ..snapsign::token::Claims::new(namespace, jiff::Timestamp::now().as_second() + 300)
        };
        let token = snapsign::token::mint_claims(self.shared.signer.token_key(), &claims)
            .map_err(|e| ApiError::internal(anyhow::anyhow!("mint a signer token for {namespace}: {e}")))?;
        let response = self
            .shared
            .http
            .post(format!("{}{}", self.signer_url, snapsign::signer::SIGN_PATH))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "PROXY_ERROR",
                    format!("Failed to proxy request to the signer: {e}"),
                )
            })?;
        let status = response.status();
        let mut bytes = response.bytes().await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "PROXY_ERROR",
                format!("Failed to proxy request: signer answer: {e}"),
            )
        })?;
        if faults.sign_without_uri
            && status.is_success()
            && let Ok(mut answer) = serde_json::from_slice::<Upload>(&bytes)
        {
            match &mut answer {
                Upload::SinglePut(put) => put.uri = None,
                Upload::S3Multipart(multipart) => multipart.uri = None,
            }
            tracing::warn!("injected fault: dropped uri from the signer's answer");
            bytes = Bytes::from(serde_json::to_vec(&answer).expect("answers serialize"));
        }
        if status.is_success() {
            self.note_upload(namespace, &bytes)?;
        }
        Ok(Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(super::http::full(bytes))
            .expect("valid"))
    }

    /// Remembers the multipart upload the signer created for one of this
    /// namespace's prepared builds, so a restart can abort it if the stack
    /// dies before the build ends.
    fn note_upload(&self, namespace: &str, answer: &[u8]) -> Result<(), ApiError> {
        let Ok(Upload::S3Multipart(S3Multipart { uri: Some(uri), upload_id, .. })) =
            serde_json::from_slice::<Upload>(answer)
        else {
            return Ok(());
        };
        let uri = uri.as_str();
        if let Some(build) = self.shared.state.build_by_snapshot_uri(uri)?
            && build.namespace == namespace
            && build.state == "prepared"
        {
            self.shared.state.record_upload(&super::state::UploadRecord {
                upload_id,
                build_id: build.id,
                uri: uri.to_owned(),
            })?;
        }
        Ok(())
    }

    /// The read grant a forwarded sign request gets: the one object it asks
    /// to `get_blob` when that object is the snapshot of another namespace's
    /// public template (wit/protocol.md §11). Everything else: no grant, so
    /// the signer's namespace rule decides.
    fn read_grant(&self, namespace: &str, body: &[u8]) -> Result<Vec<String>, ApiError> {
        // The signer's own parser: a request it would refuse gets no grant.
        let Ok(SignRequest { target: Target::Blob { uri }, op: Op::GetBlob }) = snapsign::signer::request::parse(body)
        else {
            return Ok(Vec::new());
        };
        let uri = uri.as_str();
        Ok(match self.shared.state.template_by_snapshot_uri(uri)? {
            Some(template) if template.public && template.namespace != namespace => {
                tracing::info!(%namespace, template = %template.id, owner = %template.namespace, "read grant for a public template");
                vec![uri.to_owned()]
            }
            _ => Vec::new(),
        })
    }
}

fn process_spec(body: Value) -> Result<ProcessSpec, ApiError> {
    serde_json::from_value(body).map_err(|e| {
        ApiError::bad_request(
            "invalid_process",
            format!("process request needs command (string) and args (strings): {e}"),
        )
    })
}

fn parse_pid(id: &str, pid: &str) -> Result<i64, ApiError> {
    pid.parse().map_err(|_| ApiError::bad_request("invalid_pid", format!("'{pid}' is not a pid of sandbox {id}")))
}

fn no_process(id: &str, pid: i64) -> ApiError {
    ApiError::not_found("process_not_found", format!("sandbox {id} has no process {pid}"))
}

fn missing_path() -> ApiError {
    ApiError::bad_request("missing_path", "files routes need ?path=<absolute path in the sandbox>")
}
