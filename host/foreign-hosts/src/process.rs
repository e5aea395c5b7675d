//! A third-party host as a child process: its own process group (so a host
//! that forks, like `jco serve`, is stopped whole), output kept for error
//! messages, killed when dropped (a panicking test included).

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Output lines kept for error messages.
const KEPT_LINES: usize = 400;

/// A running child process and its output.
pub struct HostProcess {
    name: String,
    child: Child,
    lines: Receiver<String>,
    kept: Arc<Mutex<VecDeque<String>>>,
}

impl std::fmt::Debug for HostProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostProcess").field("name", &self.name).field("pid", &self.child.id()).finish()
    }
}

impl HostProcess {
    /// Spawns `command` in a new process group, with stdin closed and
    /// stdout and stderr captured line by line.
    pub fn spawn(name: &str, mut command: Command) -> Result<HostProcess> {
        command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        // If this process dies without unwinding, the kernel kills the direct child.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = command.spawn().with_context(|| format!("start {name} ({:?})", command.get_program()))?;
        let (tx, lines) = mpsc::channel();
        let kept = Arc::new(Mutex::new(VecDeque::new()));
        let stdout = child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        let stderr = child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>);
        for stream in [stdout, stderr].into_iter().flatten() {
            let (tx, kept) = (tx.clone(), kept.clone());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines() {
                    let Ok(line) = line else { break };
                    let line = strip_ansi(&line);
                    {
                        let mut kept = kept.lock().unwrap_or_else(|e| e.into_inner());
                        if kept.len() == KEPT_LINES {
                            kept.pop_front();
                        }
                        kept.push_back(line.clone());
                    }
                    let _ = tx.send(line);
                }
            });
        }
        Ok(HostProcess { name: name.to_owned(), child, lines, kept })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines the process printed, for error messages.
    pub fn tail(&self, count: usize) -> String {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let skip = kept.len().saturating_sub(count);
        kept.iter().skip(skip).cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits until a line of output gives `find` a value, the process exits,
    /// or `timeout` passes.
    pub async fn wait_for_line<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        find: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.try_recv() {
                Ok(line) => {
                    if let Some(found) = find(&line) {
                        return Ok(found);
                    }
                    continue;
                }
                Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => {}
            }
            if let Some(status) = self.child.try_wait().context("poll the child")? {
                // Read what is left before giving up.
                while let Ok(line) = self.lines.try_recv() {
                    if let Some(found) = find(&line) {
                        return Ok(found);
                    }
                }
                bail!("{} exited ({status}) before printing {what}; its last output:\n{}", self.name, self.tail(30));
            }
            if Instant::now() >= deadline {
                bail!("{} did not print {what} within {timeout:?}; its last output:\n{}", self.name, self.tail(30));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Fails if the process has exited.
    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait().context("poll the child")? {
            bail!("{} exited ({status}); its last output:\n{}", self.name, self.tail(30));
        }
        Ok(())
    }

    /// Kills the whole process group and reaps the child.
    pub fn kill(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; the group is ours (process_group(0) at spawn).
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HostProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Removes terminal colour sequences (`ESC [ ... letter`) some hosts print.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A port on 127.0.0.1 that was free a moment ago, for hosts that cannot
/// bind port 0 and report it (jco). Another process could take it in between;
/// the host then fails to start and says so.
pub fn free_loopback_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("bind 127.0.0.1:0 to find a free port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_sequences_are_removed() {
        assert_eq!(strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m x=1"), "2026  INFO x=1");
    }

    #[tokio::test]
    async fn a_process_group_is_killed_on_drop_children_included() {
        let mut command = Command::new("sh");
        command.args(["-c", "sleep 300 & echo child=$!; wait"]);
        let mut process = HostProcess::spawn("sh", command).unwrap();
        let child: i32 = process
            .wait_for_line("the child pid", Duration::from_secs(10), |l| l.strip_prefix("child=")?.parse().ok())
            .await
            .unwrap();
        assert!(alive(child), "the grandchild runs");
        drop(process);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(child) {
            assert!(Instant::now() < deadline, "grandchild {child} survived the group kill");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Running, not gone and not a zombie waiting for init to reap it.
    fn alive(pid: i32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }
}
