//! One process of a sandbox: its status (PROTOCOL.md §4.2 `ProcessInfo`),
//! and every output line kept so that each follower replays from the start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

/// Output kept per process; past it, lines are dropped with one marker line.
pub const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// A process to start (the JSON of `POST /api/v1/processes`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ProcessSpec {
    /// Executable, as sent (also what `list` echoes).
    pub command: String,
    /// Arguments, as sent.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment added to the sandbox defaults.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory inside the sandbox (default `/`).
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `"root"` runs as root; absent runs as the sandbox user.
    #[serde(default)]
    pub user: Option<String>,
}

/// A process's status as the proxy reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProcessInfo {
    /// Per-sandbox process number (1, 2, …), not a host pid.
    pub pid: i64,
    /// `running`, `exited`, `signaled` or `oom_killed`.
    pub status: String,
    /// Command as sent.
    pub command: String,
    /// Arguments as sent.
    pub args: Vec<String>,
    /// Unix seconds.
    pub started_at: f64,
    /// Exit code once exited normally.
    pub exit_code: Option<i64>,
    /// Signal number once killed by a signal.
    pub signal: Option<i64>,
    /// Killed as by the OOM killer (simulated by [`crate::Sandbox::kill`] with `mark_oom`).
    pub oom_killed: bool,
    /// Always false: stdin is not offered.
    pub stdin_writable: bool,
    /// Unix seconds, once ended.
    pub ended_at: Option<f64>,
}

/// One output line (`data:` of the follow stream).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputEvent {
    /// The text, without the newline (lossy UTF-8).
    pub line: String,
    /// Unix seconds when it was read.
    pub timestamp: f64,
    /// `stdout` or `stderr`.
    pub stream: String,
}

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

struct State {
    info: ProcessInfo,
    lines: Vec<OutputEvent>,
    bytes: usize,
    open_streams: u8,
}

/// A running or finished process.
pub(crate) struct Process {
    state: Mutex<State>,
    tick: watch::Sender<u64>,
    pub(crate) group: Option<i32>,
    oom: AtomicBool,
}

impl Process {
    pub(crate) fn new(pid: i64, spec: &ProcessSpec, group: Option<i32>) -> Arc<Self> {
        let info = ProcessInfo {
            pid,
            status: "running".into(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            started_at: now(),
            exit_code: None,
            signal: None,
            oom_killed: false,
            stdin_writable: false,
            ended_at: None,
        };
        Arc::new(Process {
            state: Mutex::new(State { info, lines: Vec::new(), bytes: 0, open_streams: 2 }),
            tick: watch::channel(0).0,
            group,
            oom: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.tick.send_modify(|n| *n += 1);
    }

    pub(crate) fn info(&self) -> ProcessInfo {
        self.lock().info.clone()
    }

    pub(crate) fn mark_oom(&self) {
        self.oom.store(true, Ordering::SeqCst);
    }

    /// Reads `reader` line by line into the log.
    pub(crate) async fn collect(self: Arc<Self>, reader: impl AsyncRead + Unpin, stream: &'static str) {
        let mut reader = BufReader::new(reader);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(buf.strip_suffix(b"\n").unwrap_or(&buf));
                    let line = text.strip_suffix('\r').unwrap_or(&text).to_owned();
                    let mut state = self.lock();
                    if state.bytes <= MAX_OUTPUT_BYTES {
                        state.bytes += line.len();
                        let line = if state.bytes > MAX_OUTPUT_BYTES {
                            format!("[snapsign: output over {MAX_OUTPUT_BYTES} bytes; later lines dropped]")
                        } else {
                            line
                        };
                        state.lines.push(OutputEvent { line, timestamp: now(), stream: stream.into() });
                    }
                    drop(state);
                    self.bump();
                }
            }
        }
        self.lock().open_streams -= 1;
        self.bump();
    }

    /// Records how the process ended.
    pub(crate) fn finish(&self, status: std::io::Result<std::process::ExitStatus>) {
        use std::os::unix::process::ExitStatusExt;
        let oom = self.oom.load(Ordering::SeqCst);
        let mut state = self.lock();
        let info = &mut state.info;
        info.ended_at = Some(now());
        match status {
            Ok(status) => {
                info.exit_code = status.code().map(i64::from);
                info.signal = status.signal().map(i64::from);
            }
            Err(e) => {
                tracing::warn!(pid = info.pid, "waiting for process failed: {e}");
                info.exit_code = Some(-1);
            }
        }
        info.oom_killed = oom;
        info.status = if oom {
            "oom_killed"
        } else if info.signal.is_some() {
            "signaled"
        } else {
            "exited"
        }
        .into();
        drop(state);
        self.bump();
    }

    fn done(state: &State) -> bool {
        state.info.status != "running" && state.open_streams == 0
    }

    /// Every line from the first, then live ones, until the process ended
    /// and its output is drained.
    pub(crate) fn follow(self: &Arc<Self>) -> impl Stream<Item = OutputEvent> + Send + 'static + use<> {
        let rx = self.tick.subscribe();
        futures_util::stream::unfold((self.clone(), rx, 0usize), |(process, mut rx, next)| async move {
            loop {
                {
                    let state = process.lock();
                    if let Some(event) = state.lines.get(next) {
                        let event = event.clone();
                        drop(state);
                        return Some((event, (process, rx, next + 1)));
                    }
                    if Self::done(&state) {
                        return None;
                    }
                }
                rx.changed().await.ok()?;
            }
        })
    }

    /// Resolves once the process ended.
    pub(crate) async fn wait(self: &Arc<Self>) -> ProcessInfo {
        let mut rx = self.tick.subscribe();
        loop {
            let info = self.info();
            if info.status != "running" {
                return info;
            }
            if rx.changed().await.is_err() {
                return self.info();
            }
        }
    }
}
