//! Processes in a sandbox: start-or-recover, follow with replay, terminal
//! status (wit/protocol.md §4.2–§4.3), and health pings while one runs (§5.4).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::{Value, json};

use super::{ProxyBackend, classify, http_error, sse};
use crate::sandbox_exec::backend::{Exit, LineSink, Process, SandboxError};

/// Start attempts of a process (wit/protocol.md §4.3).
const START_ATTEMPTS: usize = 3;
/// Follow/get failures tolerated before giving up.
const REATTACH_ATTEMPTS: usize = 10;
/// Health pings while a process runs keep the sandbox's lifetime budget fresh (wit/protocol.md §5.4).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(120);
/// Longest event-stream line or event the follow accepts (a builder log line is far shorter).
const MAX_EVENT_BYTES: usize = 1 << 20;

/// Waits between retries: doubling from `first` up to `max`, reset on progress.
#[derive(Debug)]
struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
}

impl Backoff {
    fn new(first: Duration, max: Duration) -> Self {
        Backoff { first, next: first, max }
    }

    /// The next pause, doubling the one after.
    fn delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.delay()).await;
    }

    fn reset(&mut self) {
        self.next = self.first;
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

/// Counts a keepalive task from its spawn until it is dropped.
struct KeepaliveCount(Arc<AtomicUsize>);

impl KeepaliveCount {
    fn enter(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        KeepaliveCount(count.clone())
    }
}

impl Drop for KeepaliveCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The terminal status in a process answer, or `None` while it runs.
fn exit_status(info: &Value) -> Option<Exit> {
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
    code.map(|code| Exit { code, oom_killed: oom, last_error: None })
}

impl ProxyBackend {
    /// Pings `GET /api/v1/health` every interval until dropped; results are ignored.
    fn keepalive(&self, id: &str) -> Option<tokio::task::JoinHandle<()>> {
        let request = self.proxy_request(id, reqwest::Method::GET, "/api/v1/health").ok()?.bearer_auth(&self.token);
        let interval = self.keepalive;
        let alive = KeepaliveCount::enter(&self.keepalives);
        Some(tokio::spawn(async move {
            // Dropped when the task ends or is aborted.
            let _alive = alive;
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

    async fn start(&self, id: &str, payload: &Value) -> Result<i64, SandboxError> {
        let mut last = None;
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
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
                        backoff.wait().await;
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
        let what = "follow process output";
        let request = self
            .proxy_request(id, reqwest::Method::GET, &format!("/api/v1/processes/{pid}/output/follow"))?
            .header("accept", "text/event-stream")
            .bearer_auth(&self.token);
        let response = request.send().await.map_err(|e| http_error(what, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.text().await.unwrap_or_default();
            return Err(classify(what, status, &text));
        }
        let content_type =
            response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        if !content_type.contains("text/event-stream") {
            return Err(SandboxError::Failed(format!(
                "expected text/event-stream response, got content-type: {content_type}"
            )));
        }
        let mut seen = 0usize;
        let mut parser = sse::Parser::new(MAX_EVENT_BYTES);
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| http_error(what, e))?;
            let events = parser.feed(&chunk).map_err(|e| SandboxError::Failed(format!("{what}: {e}")))?;
            for event in events {
                let Ok(event) = serde_json::from_str::<Value>(&event.data) else { continue };
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

    pub(super) async fn run_process(
        &self,
        id: &str,
        spec: Process,
        sink: &mut LineSink<'_>,
    ) -> Result<Exit, SandboxError> {
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
        let _stop = AbortOnDrop(self.keepalive(id));
        let mut delivered = 0usize;
        let mut failures = 0usize;
        // The follow stream waits for output and the end; the pause only
        // spaces out reattaches to a stream that keeps ending early.
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(1));
        loop {
            match self.follow(id, pid, delivered, sink).await {
                Ok(seen) => {
                    if seen > delivered {
                        backoff.reset();
                    }
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
                    backoff.wait().await;
                    continue;
                }
            };
            if let Some(exit) = exit_status(&info) {
                return Ok(exit);
            }
            tracing::info!(
                sandbox = id,
                pid,
                "Process output stream ended before process {pid} exited; reattaching..."
            );
            backoff.wait().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_terminal_status_the_way_the_client_does() {
        let status = |v: Value| exit_status(&v).map(|e| (e.code, e.oom_killed));
        assert_eq!(status(json!({"status": "running"})), None);
        assert_eq!(status(json!({"status": "exited", "exit_code": 3})), Some((3, false)));
        assert_eq!(status(json!({"status": "signaled", "signal": 15})), Some((-15, false)));
        assert_eq!(status(json!({"status": "oom_killed"})), Some((-9, true)));
        assert_eq!(
            status(json!({"status": "exited", "managed": {"last_exit": {"oom_killed": true}}})),
            Some((-9, true))
        );
        assert_eq!(status(json!({"status": "exited"})), Some((0, false)));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let delays: Vec<u128> = (0..5).map(|_| backoff.delay().as_millis()).collect();
        assert_eq!(delays, [50, 100, 200, 300, 300]);
        backoff.reset();
        assert_eq!(backoff.delay(), Duration::from_millis(50));
    }
}
