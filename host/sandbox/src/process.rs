//! One process of a sandbox: the JSON shapes of wit/protocol.md §4.2–§4.3, its
//! status, and every output line kept so that each follower replays from
//! the start (§4.3 item 3).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Result, bail};
use futures_util::Stream;
use serde::{Deserialize, Deserializer, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::watch;

use crate::identity::User;

/// Output kept per process, counting 64 bytes per line besides its text; past it,
/// lines are dropped after one marker line.
pub const MAX_OUTPUT_BYTES: usize = 16 << 20;

/// What keeping one line costs besides its text, so that a flood of empty
/// lines is capped too.
const LINE_OVERHEAD: usize = 64;

/// Longest line kept whole; a longer one is cut into lines of this size.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// `PATH` when a process sets none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A process to start: the JSON of `POST /api/v1/processes` (wit/protocol.md
/// §4.2). Other keys (`timeout` of §4.4, `name`) are ignored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ProcessSpec {
    /// Executable, absolute or looked up in `PATH`; echoed as sent by `list`.
    pub command: String,
    /// Arguments; echoed as sent by `list`.
    #[serde(default)]
    pub args: Vec<String>,
    /// Environment on top of the sandbox defaults (`PATH`, `HOME`).
    #[serde(default, deserialize_with = "null_as_empty")]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory inside the sandbox; `/` when absent.
    #[serde(default)]
    pub working_dir: Option<String>,
    /// `"root"` runs as uid 0; absent runs as the sandbox user (uid 1000).
    #[serde(default)]
    pub user: Option<String>,
}

fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::deserialize(d)?.unwrap_or_default())
}

/// A process's status, serialized as wit/protocol.md §4.2's `ProcessInfo`
/// (absent values as `null`).
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
    /// Exit code, once exited on its own.
    pub exit_code: Option<i64>,
    /// Signal number, once killed by a signal sent by [`crate::Sandbox::kill`]
    /// or by the kernel's OOM killer (9). A process killed by a signal from
    /// inside the sandbox is reported as exit code 128 + signal, as a shell would.
    pub signal: Option<i64>,
    /// The kernel's OOM killer killed this process or one of its
    /// descendants at the sandbox's memory limit (or, only where no memory
    /// controller exists, [`crate::Sandbox::kill`] with `mark_oom` simulated it).
    pub oom_killed: bool,
    /// Always false: processes get no stdin.
    pub stdin_writable: bool,
    /// Unix seconds, once ended.
    pub ended_at: Option<f64>,
}

/// One output line: the `data:` of the follow stream (wit/protocol.md §4.3).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputEvent {
    /// The text, without its line ending (lossy UTF-8).
    pub line: String,
    /// Unix seconds when it was read.
    pub timestamp: f64,
    /// `stdout` or `stderr`.
    pub stream: String,
}

pub(crate) fn now() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or_default()
}

/// Who `spec` runs as.
pub(crate) fn user(id: &str, spec: &ProcessSpec) -> Result<User> {
    match spec.user.as_deref() {
        None => Ok(User::Sandbox),
        Some("root") => Ok(User::Root),
        Some(other) => {
            bail!("sandbox {id}: user '{other}' is unknown; send \"root\", or no user for the sandbox user")
        }
    }
}

/// The whole environment of a process: the defaults, then the spec's, then
/// `extra` (the sandbox's [`crate::Sandbox::set_process_env`]).
pub(crate) fn environment(
    id: &str,
    user: User,
    spec: &BTreeMap<String, String>,
    extra: &BTreeMap<String, String>,
) -> Result<BTreeMap<String, String>> {
    let mut env =
        BTreeMap::from([("PATH".to_owned(), DEFAULT_PATH.to_owned()), ("HOME".to_owned(), user.home().to_owned())]);
    for (key, value) in spec.iter().chain(extra) {
        if key.is_empty() || key.contains(['=', '\0']) {
            bail!("sandbox {id}: environment variable name '{key}' is empty or has '=' or NUL; rename it");
        }
        if value.contains('\0') {
            bail!("sandbox {id}: environment variable {key} has a NUL byte in its value; remove it");
        }
        env.insert(key.clone(), value.clone());
    }
    Ok(env)
}

struct State {
    info: ProcessInfo,
    lines: Vec<OutputEvent>,
    bytes: usize,
    open_streams: u8,
    oom: bool,
}

/// A running or finished process.
pub(crate) struct Process {
    state: Mutex<State>,
    /// Bumped on every change; followers and waiters watch it.
    tick: watch::Sender<u64>,
    /// Host process group of the child (its launcher, or the command when unconfined).
    group: Option<i32>,
    /// The process's own cgroup (memory or pids), where one is made per process: it holds
    /// every process it starts, including those that left its process group.
    cgroup: Option<std::path::PathBuf>,
}

impl Process {
    pub(crate) fn new(
        pid: i64,
        spec: &ProcessSpec,
        group: Option<i32>,
        cgroup: Option<std::path::PathBuf>,
    ) -> Arc<Self> {
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
            state: Mutex::new(State { info, lines: Vec::new(), bytes: 0, open_streams: 2, oom: false }),
            tick: watch::channel(0).0,
            group,
            cgroup,
        })
    }

    /// Host process group of the child, if it has one.
    pub(crate) fn group(&self) -> Option<i32> {
        self.group
    }

    /// The process's own cgroup, if one was made for it.
    pub(crate) fn cgroup(&self) -> Option<&std::path::Path> {
        self.cgroup.as_deref()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn bump(&self) {
        self.tick.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub(crate) fn info(&self) -> ProcessInfo {
        self.lock().info.clone()
    }

    pub(crate) fn pid(&self) -> i64 {
        self.lock().info.pid
    }

    /// Sends `signal` to the process group while the process runs; false
    /// when it had already ended (then nothing is sent).
    pub(crate) fn signal(&self, signal: i32, mark_oom: bool) -> bool {
        let mut state = self.lock();
        if state.info.status != "running" {
            return false;
        }
        state.oom |= mark_oom;
        if let Some(group) = self.group {
            // SAFETY: kill(2) of the process group we created. The lock keeps `finish` from
            // recording the end meanwhile; only the moment between the kernel reaping the
            // child and `finish` is uncovered, and the group id cannot be reused that fast.
            unsafe { libc::kill(-group, signal) };
        }
        true
    }

    /// Appends one line, unless the output is over [`MAX_OUTPUT_BYTES`].
    fn record(&self, bytes: &[u8], stream: &'static str) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.strip_suffix('\r').unwrap_or(&text);
        let mut state = self.lock();
        if state.bytes > MAX_OUTPUT_BYTES {
            return;
        }
        state.bytes += text.len() + LINE_OVERHEAD;
        let line = if state.bytes > MAX_OUTPUT_BYTES {
            format!("[snapsign-sandbox: output over {MAX_OUTPUT_BYTES} bytes; later lines dropped]")
        } else {
            text.to_owned()
        };
        state.lines.push(OutputEvent { line, timestamp: now(), stream: stream.into() });
        drop(state);
        self.bump();
    }

    /// Reads `reader` line by line into the log until it closes.
    pub(crate) async fn collect(self: Arc<Self>, reader: impl AsyncRead + Unpin, stream: &'static str) {
        let mut reader = BufReader::with_capacity(64 << 10, reader);
        let mut line = Vec::new();
        loop {
            match next_line(&mut reader, &mut line).await {
                Ok(true) => self.record(&line, stream),
                Ok(false) => break,
                Err(e) => {
                    tracing::warn!(pid = self.pid(), stream, "reading output failed: {e}");
                    break;
                }
            }
        }
        self.lock().open_streams -= 1;
        self.bump();
    }

    /// Records how the process ended; `oom_killed`: its group counted an OOM kill.
    pub(crate) fn finish(&self, status: std::io::Result<std::process::ExitStatus>, oom_killed: bool) {
        use std::os::unix::process::ExitStatusExt;
        let mut state = self.lock();
        let oom = state.oom || oom_killed;
        let info = &mut state.info;
        info.ended_at = Some(now());
        match status {
            Ok(status) => {
                info.exit_code = status.code().map(i64::from);
                info.signal = status.signal().map(i64::from);
            }
            Err(e) => {
                tracing::warn!(pid = info.pid, "waiting for the process failed: {e}");
                info.exit_code = Some(-1);
            }
        }
        info.oom_killed = oom;
        if oom_killed && info.exit_code == Some(128 + i64::from(libc::SIGKILL)) {
            // The launcher reports the kill as 137; it was the kernel's SIGKILL.
            (info.exit_code, info.signal) = (None, Some(i64::from(libc::SIGKILL)));
        }
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

    /// Every line from the first, then live ones, until the process ended
    /// and both its streams closed.
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
                    if state.info.status != "running" && state.open_streams == 0 {
                        return None;
                    }
                    // Seen: only changes after this point wake us.
                    rx.borrow_and_update();
                }
                rx.changed().await.ok()?;
            }
        })
    }

    /// Resolves once the process ended.
    pub(crate) async fn wait(&self) -> ProcessInfo {
        self.wait_until(|state| state.info.status != "running").await
    }

    /// Resolves once the process ended and its output streams closed, i.e.
    /// nothing that inherited them is left.
    pub(crate) async fn wait_drained(&self) -> ProcessInfo {
        self.wait_until(|state| state.info.status != "running" && state.open_streams == 0).await
    }

    async fn wait_until(&self, done: impl Fn(&State) -> bool) -> ProcessInfo {
        let mut rx = self.tick.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let state = self.lock();
                if done(&state) {
                    return state.info.clone();
                }
            }
            if rx.changed().await.is_err() {
                return self.info();
            }
        }
    }
}

/// Reads one line into `line` (without the `\n`), cutting lines longer than
/// [`MAX_LINE_BYTES`]; false at the end of the stream.
async fn next_line(reader: &mut (impl AsyncBufReadExt + Unpin), line: &mut Vec<u8>) -> std::io::Result<bool> {
    line.clear();
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(!line.is_empty());
        }
        let room = MAX_LINE_BYTES - line.len();
        match available.iter().position(|&b| b == b'\n') {
            Some(end) if end <= room => {
                line.extend_from_slice(&available[..end]);
                reader.consume(end + 1);
                return Ok(true);
            }
            _ => {
                let take = available.len().min(room);
                line.extend_from_slice(&available[..take]);
                reader.consume(take);
                if line.len() == MAX_LINE_BYTES {
                    return Ok(true);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;

    #[test]
    fn process_info_serializes_as_the_protocol_example() {
        let spec = ProcessSpec { command: "/usr/local/bin/tl-rootfs-build".into(), ..Default::default() };
        let process = Process::new(42, &spec, None, None);
        let mut info = process.info();
        info.started_at = 1234567890.123;
        assert_eq!(
            serde_json::to_string(&info).unwrap(),
            r#"{"pid":42,"status":"running","command":"/usr/local/bin/tl-rootfs-build","args":[],"started_at":1234567890.123,"exit_code":null,"signal":null,"oom_killed":false,"stdin_writable":false,"ended_at":null}"#
        );
        let event = OutputEvent { line: "Step 1/3".into(), timestamp: 1715000000.1, stream: "stdout".into() };
        assert_eq!(
            serde_json::to_string(&event).unwrap(),
            r#"{"line":"Step 1/3","timestamp":1715000000.1,"stream":"stdout"}"#
        );
    }

    #[test]
    fn process_spec_reads_the_protocol_request() {
        let spec: ProcessSpec = serde_json::from_str(
            r#"{"command":"/usr/local/bin/tl-rootfs-build",
                "args":["--spec","/var/lib/tensorlake/rootfs-builder/build/spec.json"],
                "env":{"PATH":"/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                "working_dir":"/var/lib/tensorlake/rootfs-builder/build","user":"root","timeout":5}"#,
        )
        .unwrap();
        assert_eq!(spec.args.len(), 2);
        assert_eq!(spec.env["PATH"], DEFAULT_PATH);
        assert_eq!(spec.user.as_deref(), Some("root"));
        let bare: ProcessSpec = serde_json::from_str(r#"{"command":"/bin/true","args":[],"env":null}"#).unwrap();
        assert_eq!(bare, ProcessSpec { command: "/bin/true".into(), ..Default::default() });
        assert!(serde_json::from_str::<ProcessSpec>(r#"{"args":[]}"#).is_err());
    }

    #[test]
    fn environment_layers_defaults_spec_and_extra() {
        let spec = BTreeMap::from([("PATH".to_owned(), "/bin".to_owned()), ("A".to_owned(), "spec".to_owned())]);
        let extra = BTreeMap::from([("A".to_owned(), "extra".to_owned())]);
        let env = environment("s", User::Sandbox, &spec, &extra).unwrap();
        assert_eq!(
            env,
            BTreeMap::from([
                ("A".into(), "extra".into()),
                ("HOME".into(), "/home".into()),
                ("PATH".into(), "/bin".into())
            ])
        );
        assert_eq!(environment("s", User::Root, &BTreeMap::new(), &BTreeMap::new()).unwrap()["HOME"], "/root");
        let bad = BTreeMap::from([("A=B".to_owned(), "x".to_owned())]);
        assert!(environment("sbx-2", User::Root, &bad, &BTreeMap::new()).unwrap_err().to_string().contains("A=B"));
        let spec = ProcessSpec { user: Some("nobody".into()), ..Default::default() };
        assert!(user("sbx-2", &spec).unwrap_err().to_string().contains("'nobody'"));
    }

    #[tokio::test]
    async fn lines_are_cut_at_the_limit_and_output_is_capped_with_a_marker() {
        let mut input = vec![b'a'; MAX_LINE_BYTES + 10];
        input.extend_from_slice(b"\r\nlast");
        let process = Process::new(1, &ProcessSpec::default(), None, None);
        process.clone().collect(&input[..], "stdout").await;
        let lines: Vec<String> = process.lock().lines.iter().map(|e| e.line.clone()).collect();
        assert_eq!(lines.iter().map(String::len).collect::<Vec<_>>(), [MAX_LINE_BYTES, 10, 4]);
        assert_eq!(lines[2], "last");

        let big = "x".repeat(1000) + "\n";
        let input = big.repeat(MAX_OUTPUT_BYTES / 1000 + 5);
        let process = Process::new(2, &ProcessSpec::default(), None, None);
        process.clone().collect(input.as_bytes(), "stderr").await;
        let state = process.lock();
        assert!(state.lines.last().unwrap().line.contains("later lines dropped"));
        assert_eq!(state.lines.len(), MAX_OUTPUT_BYTES / (1000 + LINE_OVERHEAD) + 1);
    }

    #[tokio::test]
    async fn follow_ends_only_when_ended_and_drained() {
        let process = Process::new(1, &ProcessSpec::default(), None, None);
        process.record(b"one", "stdout");
        let mut follower = Box::pin(process.follow());
        assert_eq!(follower.next().await.unwrap().line, "one");
        process.finish(Ok(std::os::unix::process::ExitStatusExt::from_raw(0)), false);
        process.record(b"two", "stderr");
        process.lock().open_streams = 1;
        process.bump();
        assert_eq!(follower.next().await.unwrap().line, "two");
        let pending = tokio::time::timeout(std::time::Duration::from_millis(50), follower.next()).await;
        assert!(pending.is_err(), "a stream is still open");
        process.lock().open_streams = 0;
        process.bump();
        assert_eq!(follower.next().await, None);
        assert_eq!(process.wait().await.exit_code, Some(0));
    }
}
