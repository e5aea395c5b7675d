//! The `proxy` sandbox backend: a remote platform's lifecycle API and
//! sandbox proxy over HTTP (wit/protocol.md §3–§4). Transient failures
//! (§5.1) come back as such; retries are the component's business.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};
use snapsign::image_build::transient::is_transient;

use super::backend::{
    ExitStatus, FileSink, LineSink, ProcessSpec, ProxyEndpoint, Resources, SandboxBackend, SandboxError,
};
use crate::outbound::AllowList;

/// Start attempts of a process (wit/protocol.md §4.3).
const START_ATTEMPTS: usize = 3;
/// Follow/get failures tolerated before giving up.
const REATTACH_ATTEMPTS: usize = 10;
/// Health pings while a process runs keep the sandbox's lifetime budget fresh (wit/protocol.md §5.4).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Default)]
struct Known {
    sandbox_url: Option<String>,
    routing_hint: Option<String>,
}

/// Lifecycle and proxy of one platform, for one token and namespace.
pub struct ProxyBackend {
    http: reqwest::Client,
    token: String,
    lifecycle: String,
    localhost: bool,
    known: Mutex<HashMap<String, Known>>,
    outbound: AllowList,
    keepalive: Duration,
}

fn is_local(host: &str) -> bool {
    host == "localhost" || host == "127.0.0.1"
}

/// The lifecycle base URL (wit/protocol.md §3.1–§3.2), with its path prefix.
pub fn lifecycle_base(api_url: &str, namespace: &str) -> String {
    let api = api_url.trim_end_matches('/');
    match url::Url::parse(api) {
        Ok(url) if url.host_str().is_some_and(is_local) => format!("{api}/v1/namespaces/{namespace}/sandboxes"),
        Ok(url) => match url.host_str().and_then(|h| h.strip_prefix("api.")) {
            Some(rest) => format!("{}://sandbox.{rest}/sandboxes", url.scheme()),
            None => "https://sandbox.tensorlake.ai/sandboxes".into(),
        },
        Err(_) => "https://sandbox.tensorlake.ai/sandboxes".into(),
    }
}

fn classify(what: &str, status: u16, body: &str) -> SandboxError {
    let message = format!("{what} failed (HTTP {status}): {}", body.trim());
    match status {
        _ if is_transient(status, body) => SandboxError::Transient(message),
        401 | 403 => SandboxError::Denied(message),
        404 | 410 => SandboxError::Gone(message),
        _ => SandboxError::Failed(message),
    }
}

fn http_error(what: &str, e: reqwest::Error) -> SandboxError {
    // Timeouts are transient (wit/protocol.md §5.1); other client errors are not.
    if e.is_timeout() {
        SandboxError::Transient(format!("{what}: {e}"))
    } else {
        SandboxError::Failed(format!("{what}: {e}"))
    }
}

impl ProxyBackend {
    /// A backend for `api_url`; sandbox proxies it learns of are admitted to `outbound`.
    pub fn new(api_url: &str, token: &str, namespace: &str, outbound: AllowList) -> Self {
        let localhost = url::Url::parse(api_url).ok().and_then(|u| u.host_str().map(is_local)).unwrap_or(false);
        ProxyBackend {
            http: reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).build().expect("HTTP client"),
            token: token.to_owned(),
            lifecycle: lifecycle_base(api_url, namespace),
            localhost,
            known: Mutex::new(HashMap::new()),
            outbound,
            keepalive: KEEPALIVE_INTERVAL,
        }
    }

    /// Changes the keepalive interval (tests use a short one).
    pub fn with_keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// Pings `GET /api/v1/health` every interval until dropped; results are ignored.
    fn keepalive(&self, id: &str) -> Option<tokio::task::JoinHandle<()>> {
        let request = self.proxy_request(id, reqwest::Method::GET, "/api/v1/health").ok()?.bearer_auth(&self.token);
        let interval = self.keepalive;
        Some(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            ticks.tick().await; // the first tick is immediate: skip it
            loop {
                ticks.tick().await;
                if let Some(ping) = request.try_clone() {
                    let _ = ping.send().await;
                }
            }
        }))
    }

    fn known(&self, id: &str) -> Known {
        self.known.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().unwrap_or_default()
    }

    async fn send(&self, what: &str, request: reqwest::RequestBuilder) -> Result<String, SandboxError> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| http_error(what, e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| http_error(what, e))?;
        if (200..300).contains(&status) { Ok(text) } else { Err(classify(what, status, &text)) }
    }

    fn proxy_request(
        &self,
        id: &str,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, SandboxError> {
        let endpoint = self.endpoint(id)?;
        let mut request = self.http.request(method, format!("{}{path}", endpoint.base_url));
        for (name, value) in endpoint.headers {
            if name != "authorization" {
                request = request.header(name, value);
            }
        }
        if self.localhost {
            request = request.header("host", format!("{id}.local"));
        }
        Ok(request)
    }

    fn endpoint(&self, id: &str) -> Result<ProxyEndpoint, SandboxError> {
        let known = self.known(id);
        let base = known
            .sandbox_url
            .or_else(|| std::env::var("TENSORLAKE_SANDBOX_PROXY_URL").ok())
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                SandboxError::Failed(
                    "server response did not include sandbox_url; refusing to derive a proxy URL".into(),
                )
            })?;
        let mut headers = vec![
            ("authorization".to_owned(), format!("Bearer {}", self.token)),
            ("x-tensorlake-sandbox-id".to_owned(), id.to_owned()),
        ];
        if let Some(hint) = known.routing_hint {
            headers.push(("x-tensorlake-route-hint".to_owned(), hint));
        }
        Ok(ProxyEndpoint { base_url: base, headers })
    }

    async fn start(&self, id: &str, payload: &Value) -> Result<i64, SandboxError> {
        let mut last = None;
        for attempt in 0..START_ATTEMPTS {
            let request = self.proxy_request(id, reqwest::Method::POST, "/api/v1/processes")?.json(payload);
            match self.send("start process", request).await {
                Ok(text) => {
                    let info: Value = serde_json::from_str(&text)
                        .map_err(|e| SandboxError::Failed(format!("process start answer is not JSON: {e}")))?;
                    return info["pid"]
                        .as_i64()
                        .ok_or_else(|| SandboxError::Failed(format!("process start answer has no pid: {text}")));
                }
                Err(e @ (SandboxError::Denied(_) | SandboxError::Gone(_))) => return Err(e),
                Err(e) => {
                    // Start-or-recover: the start may have happened although its answer was lost.
                    if let Some(pid) = self.recover(id, payload).await {
                        return Ok(pid);
                    }
                    last = Some(e);
                    if attempt + 1 < START_ATTEMPTS {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
        Err(last.unwrap_or_else(|| SandboxError::Failed("start process failed".into())))
    }

    async fn recover(&self, id: &str, payload: &Value) -> Option<i64> {
        let request = self.proxy_request(id, reqwest::Method::GET, "/api/v1/processes").ok()?;
        let text = self.send("list processes", request).await.ok()?;
        let list: Value = serde_json::from_str(&text).ok()?;
        list["processes"]
            .as_array()?
            .iter()
            .filter(|p| p["command"] == payload["command"] && p["args"] == payload["args"])
            .filter_map(|p| p["pid"].as_i64())
            .max()
    }

    /// Follows output, skipping the first `skip` events (a reattach replays from the start).
    async fn follow(&self, id: &str, pid: i64, skip: usize, sink: &mut LineSink<'_>) -> Result<usize, SandboxError> {
        let request = self
            .proxy_request(id, reqwest::Method::GET, &format!("/api/v1/processes/{pid}/output/follow"))?
            .header("accept", "text/event-stream")
            .bearer_auth(&self.token);
        let response = request.send().await.map_err(|e| http_error("follow process output", e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.text().await.unwrap_or_default();
            return Err(classify("follow process output", status, &text));
        }
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if !content_type.contains("text/event-stream") {
            return Err(SandboxError::Failed(format!(
                "expected text/event-stream response, got content-type: {content_type}"
            )));
        }
        let mut seen = 0usize;
        let mut pending = String::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| http_error("follow process output", e))?;
            pending.push_str(&String::from_utf8_lossy(&chunk));
            while let Some(end) = pending.find('\n') {
                let line: String = pending.drain(..=end).collect();
                let Some(data) = line.trim_end().strip_prefix("data:") else { continue };
                let Ok(event) = serde_json::from_str::<Value>(data.trim()) else { continue };
                let Some(text) = event.get("line").and_then(Value::as_str) else { continue };
                if event.get("timestamp").is_none() {
                    continue;
                }
                seen += 1;
                if seen > skip {
                    sink(event.get("stream").and_then(Value::as_str).unwrap_or("stdout"), text);
                }
            }
        }
        Ok(seen)
    }
}

impl SandboxBackend for ProxyBackend {
    async fn create(
        &self,
        image: &str,
        resources: Resources,
        timeout_secs: i64,
    ) -> Result<(String, String), SandboxError> {
        let body = json!({"image": image, "resources": {"cpus": resources.cpus, "memory_mb": resources.memory_mb,
                          "disk_mb": resources.disk_mb}, "timeout_secs": timeout_secs});
        let request = self.http.post(&self.lifecycle).json(&body);
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| http_error("create sandbox", e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| http_error("create sandbox", e))?;
        // 504 still carries the created sandbox (wit/protocol.md §3.3).
        if !(200..300).contains(&status) && status != 504 {
            return Err(classify("create sandbox", status, &text));
        }
        let created: Value = serde_json::from_str(&text)
            .map_err(|e| SandboxError::Failed(format!("create sandbox answer is not JSON ({e}): {text}")))?;
        let id = created["sandbox_id"]
            .as_str()
            .ok_or_else(|| SandboxError::Failed(format!("create sandbox answer has no sandbox_id: {text}")))?;
        let known = Known {
            sandbox_url: created["sandbox_url"].as_str().map(str::to_owned),
            routing_hint: created["routing_hint"].as_str().map(str::to_owned),
        };
        if let Some(authority) = known.sandbox_url.as_deref().and_then(snapsign::presign::authority) {
            self.outbound.allow(&authority);
        }
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), known);
        Ok((id.to_owned(), created["status"].as_str().unwrap_or("pending").to_owned()))
    }

    async fn status(&self, id: &str) -> Result<String, SandboxError> {
        let text = self.send(&format!("get sandbox {id}"), self.http.get(format!("{}/{id}", self.lifecycle))).await?;
        let info = snapsign::image_build::sandbox_info::parse(id, &text).map_err(SandboxError::Failed)?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let entry = known.entry(id.to_owned()).or_default();
        if entry.sandbox_url.is_none() {
            entry.sandbox_url = info.sandbox_url;
        }
        if entry.routing_hint.is_none() {
            entry.routing_hint = info.routing_hint;
        }
        Ok(info.status)
    }

    fn proxy(&self, id: &str) -> Result<ProxyEndpoint, SandboxError> {
        self.endpoint(id)
    }

    async fn run(&self, id: &str, spec: ProcessSpec, sink: &mut LineSink<'_>) -> Result<ExitStatus, SandboxError> {
        let mut payload = json!({"command": spec.command, "args": spec.args});
        if !spec.env.is_empty() {
            payload["env"] = json!(spec.env.iter().cloned().collect::<HashMap<String, String>>());
        }
        if let Some(dir) = &spec.working_dir {
            payload["working_dir"] = json!(dir);
        }
        if spec.as_root {
            payload["user"] = json!("root");
        }
        let pid = self.start(id, &payload).await?;
        let keepalive = self.keepalive(id);
        let _stop = AbortOnDrop(keepalive);
        let mut delivered = 0usize;
        let mut failures = 0usize;
        loop {
            match self.follow(id, pid, delivered, sink).await {
                Ok(seen) => {
                    delivered = delivered.max(seen);
                    failures = 0;
                }
                Err(e @ (SandboxError::Denied(_) | SandboxError::Gone(_))) => return Err(e),
                Err(e) => {
                    failures += 1;
                    if failures >= REATTACH_ATTEMPTS {
                        return Err(e);
                    }
                }
            }
            let request = self.proxy_request(id, reqwest::Method::GET, &format!("/api/v1/processes/{pid}"))?;
            let info: Value = match self.send("get process", request).await {
                Ok(text) => {
                    serde_json::from_str(&text).map_err(|e| SandboxError::Failed(format!("process answer: {e}")))?
                }
                Err(e) => {
                    failures += 1;
                    if failures >= REATTACH_ATTEMPTS {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let oom = info["oom_killed"] == true
                || info["status"] == "oom_killed"
                || info["managed"]["last_exit"]["oom_killed"] == true;
            let signal = info["signal"].as_i64();
            let code = match (oom, info["exit_code"].as_i64(), signal) {
                (true, _, Some(sig)) => Some(-sig),
                (true, Some(code), None) => Some(code),
                (true, None, None) => Some(-9),
                (false, Some(code), _) => Some(code),
                (false, None, Some(sig)) => Some(-sig),
                (false, None, None) if info["status"] != "running" => Some(0),
                _ => None,
            };
            if let Some(code) = code {
                return Ok(ExitStatus { code, oom_killed: oom });
            }
            tracing::info!(
                sandbox = id,
                pid,
                "Process output stream ended before process {pid} exited; reattaching..."
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn write_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError> {
        let request =
            self.proxy_request(id, reqwest::Method::PUT, "/api/v1/files")?.query(&[("path", path)]).body(contents);
        self.send(&format!("write {path}"), request).await.map(drop)
    }

    async fn open_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        let request = self
            .proxy_request(id, reqwest::Method::PUT, "/api/v1/files")?
            .query(&[("path", path)])
            .body(reqwest::Body::wrap_stream(stream))
            .bearer_auth(&self.token);
        let what = format!("write {path}");
        let response = tokio::spawn(async move {
            let response = request.send().await.map_err(|e| http_error(&what, e))?;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) { Ok(()) } else { Err(classify(&what, status, &text)) }
        });
        Ok(FileSink::new(tx, response))
    }

    async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, SandboxError> {
        let request = self
            .proxy_request(id, reqwest::Method::GET, "/api/v1/files")?
            .query(&[("path", path)])
            .bearer_auth(&self.token);
        let response = request.send().await.map_err(|e| http_error(&format!("read {path}"), e))?;
        let status = response.status().as_u16();
        let bytes = response.bytes().await.map_err(|e| http_error(&format!("read {path}"), e))?;
        if (200..300).contains(&status) {
            Ok(bytes.to_vec())
        } else {
            Err(classify(&format!("read {path}"), status, &String::from_utf8_lossy(&bytes)))
        }
    }

    async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        self.send(&format!("delete sandbox {id}"), self.http.delete(format!("{}/{id}", self.lifecycle))).await.map(drop)
    }
}

/// Aborts the keepalive task when the run ends, however it ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = &self.0 {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_base_follows_the_protocol() {
        assert_eq!(lifecycle_base("http://127.0.0.1:8080/", "ns"), "http://127.0.0.1:8080/v1/namespaces/ns/sandboxes");
        assert_eq!(lifecycle_base("https://api.tensorlake.ai", "ns"), "https://sandbox.tensorlake.ai/sandboxes");
        assert_eq!(
            lifecycle_base("https://api.eu.example.com:8443/x", "ns"),
            "https://sandbox.eu.example.com/sandboxes"
        );
        assert_eq!(lifecycle_base("https://platform.example", "ns"), "https://sandbox.tensorlake.ai/sandboxes");
    }

    #[test]
    fn classifies_answers_for_the_component() {
        assert!(matches!(classify("get", 502, ""), SandboxError::Transient(_)));
        assert!(matches!(classify("get", 400, "sandbox not running"), SandboxError::Transient(_)));
        assert!(matches!(classify("get", 401, ""), SandboxError::Denied(_)));
        assert!(matches!(classify("get", 404, ""), SandboxError::Gone(_)));
        assert!(matches!(classify("get", 500, "boom"), SandboxError::Failed(m) if m.contains("HTTP 500")));
    }
}
