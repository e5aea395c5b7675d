//! One local sandbox: a directory holding its writable areas, its
//! processes, and file access by in-sandbox path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::io::AsyncRead;

use crate::bwrap::{Identity, Launch, RootEntry};
use crate::confinement::Confinement;
use crate::files::{self, BUILDER_DIR, BUILDER_PATH};
use crate::process::{self, OutputEvent, Process, ProcessInfo, ProcessSpec};

/// How every sandbox of a [`crate::Sandboxes`] runs its processes.
#[derive(Debug)]
pub(crate) struct Host {
    pub confinement: Confinement,
    pub identity: Identity,
    pub layout: Vec<RootEntry>,
    pub builder: Option<PathBuf>,
}

#[derive(Default)]
struct Processes {
    list: Vec<Arc<Process>>,
    /// Set by [`Sandbox::close`]: no process starts after it.
    closed: bool,
}

/// A sandbox. Shared (`Arc`) between the proxy's handlers; `Send + Sync`.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    fs: PathBuf,
    host: Arc<Host>,
    processes: Mutex<Processes>,
    extra_env: Mutex<BTreeMap<String, String>>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("processes", &lock(&self.processes).list.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Sandbox {
    pub(crate) fn create(id: &str, dir: PathBuf, host: Arc<Host>) -> Result<Self> {
        if dir.exists() {
            tracing::warn!(sandbox = id, "removing the stale directory {} of an earlier sandbox {id}", dir.display());
            std::fs::remove_dir_all(&dir).with_context(|| format!("remove stale {}", dir.display()))?;
        }
        let fs = files::create_areas(&dir, host.identity.owner(), host.builder.as_deref())
            .with_context(|| format!("create the directories of sandbox {id} in {}", dir.display()))?;
        Ok(Sandbox {
            id: id.to_owned(),
            dir,
            fs,
            host,
            processes: Mutex::new(Processes::default()),
            extra_env: Mutex::new(BTreeMap::new()),
        })
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host directory holding the sandbox (`root_dir/{id}`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Environment added to every process started from now on, over the
    /// spec's own (the emulator's fault injection). Replaces the previous one.
    pub fn set_process_env(&self, env: BTreeMap<String, String>) {
        *lock(&self.extra_env) = env;
    }

    /// Maps an absolute in-sandbox path under `/var`, `/tmp`, `/root` or
    /// `/home` to its host file. Refuses relative paths, `.` and `..`
    /// components, and paths elsewhere.
    ///
    /// The host path may pass through symlinks the sandbox made, which may
    /// point anywhere on the host: do not open it blindly. The file methods
    /// of [`Sandbox`] resolve paths without ever leaving the sandbox's areas.
    pub fn host_path(&self, sandbox_path: &str) -> Result<PathBuf> {
        let (area, rel) = files::split(&self.id, sandbox_path)?;
        Ok(self.fs.join(area).join(rel))
    }

    /// Starts a process and returns at once, its status `running`. Call it
    /// within a Tokio runtime: tasks collect the output and the exit status.
    pub fn start(&self, spec: ProcessSpec) -> Result<ProcessInfo> {
        let id = &self.id;
        if spec.command.is_empty() {
            bail!("sandbox {id}: process command is empty; send the executable to run");
        }
        let user = process::user(id, &spec)?;
        let env = process::environment(id, user, &spec.env, &lock(&self.extra_env))?;
        let working_dir = spec.working_dir.as_deref().unwrap_or("/");
        if !working_dir.starts_with('/') {
            bail!("sandbox {id}: working_dir '{working_dir}' is relative; send an absolute path");
        }
        let command = match &self.host.confinement {
            Confinement::Bwrap { path } => {
                let launch = Launch {
                    hostname: id,
                    layout: &self.host.layout,
                    user,
                    working_dir,
                    env: &env,
                    command: &spec.command,
                    args: &spec.args,
                };
                self.host.identity.command(path, &self.fs, &launch)?
            }
            Confinement::Unconfined => self.unconfined(&spec, &env, working_dir)?,
        };
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);

        // Under the lock: pids follow start order, and `close` cannot miss a process.
        let mut processes = lock(&self.processes);
        if processes.closed {
            bail!("sandbox {id} is being deleted; create a new sandbox to run '{}'", spec.command);
        }
        let mut child = command.spawn().with_context(|| format!("sandbox {id}: start '{}'", spec.command))?;
        let pid = processes.list.len() as i64 + 1;
        let process = Process::new(pid, &spec, child.id().map(|pid| pid as i32));
        processes.list.push(process.clone());
        drop(processes);

        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(process.clone().collect(stdout.expect("stdout is piped"), "stdout"));
        tokio::spawn(process.clone().collect(stderr.expect("stderr is piped"), "stderr"));
        let waiter = process.clone();
        tokio::spawn(async move { waiter.finish(child.wait().await) });
        tracing::debug!(sandbox = %id, pid, command = %spec.command, ?user, "process started");
        Ok(process.info())
    }

    /// Unconfined: the command runs on the host, in the host directory of
    /// `working_dir` (`/` is the sandbox's `fs` directory), with `env`, as
    /// this process's user whatever `user` says. No other path is remapped,
    /// except that the builder's path runs the installed builder.
    fn unconfined(
        &self,
        spec: &ProcessSpec,
        env: &BTreeMap<String, String>,
        working_dir: &str,
    ) -> Result<std::process::Command> {
        let builder = self.fs.join(BUILDER_DIR).join("tl-rootfs-build");
        let program =
            if self.host.builder.is_some() && (spec.command == BUILDER_PATH || spec.command == "tl-rootfs-build") {
                builder.into_os_string()
            } else {
                spec.command.clone().into()
            };
        let cwd = if working_dir.trim_end_matches('/').is_empty() {
            self.fs.clone()
        } else {
            self.host_path(working_dir)
                .context("unconfined sandboxes only map working directories under their areas")?
        };
        let mut cmd = std::process::Command::new(program);
        cmd.args(&spec.args).env_clear().envs(env).current_dir(cwd);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
        Ok(cmd)
    }

    fn find(&self, pid: i64) -> Option<Arc<Process>> {
        let index = usize::try_from(pid).ok()?.checked_sub(1)?;
        lock(&self.processes).list.get(index).cloned()
    }

    /// Every process, exited ones included, in start order; `command` and
    /// `args` as they were sent.
    pub fn list(&self) -> Vec<ProcessInfo> {
        lock(&self.processes).list.iter().map(|p| p.info()).collect()
    }

    /// One process's status.
    pub fn process(&self, pid: i64) -> Option<ProcessInfo> {
        self.find(pid).map(|p| p.info())
    }

    /// All output of `pid` from its first line, then live lines; ends once
    /// the process has ended and its output is drained. Each call starts
    /// from the beginning; any number may run at once.
    pub fn follow(&self, pid: i64) -> Option<BoxStream<'static, OutputEvent>> {
        self.find(pid).map(|p| p.follow().boxed())
    }

    /// Waits for `pid` to end.
    pub async fn wait(&self, pid: i64) -> Option<ProcessInfo> {
        let process = self.find(pid)?;
        Some(process.wait().await)
    }

    /// Sends `signal` to the process (with bubblewrap: to bwrap, which takes
    /// the whole sandboxed process tree down with it). With `mark_oom` the
    /// process is reported as killed by the kernel OOM killer: a simulation
    /// for the emulator's fault switch, no memory limit is involved. Does
    /// nothing once the process has ended.
    pub fn kill(&self, pid: i64, signal: i32, mark_oom: bool) -> Result<()> {
        let id = &self.id;
        if !(1..=64).contains(&signal) {
            bail!("sandbox {id}: {signal} is not a signal number; send one of 1..=64 (9 is SIGKILL)");
        }
        let process = self
            .find(pid)
            .ok_or_else(|| anyhow!("sandbox {id} has no process {pid}; list them with GET /api/v1/processes"))?;
        process.signal(signal, mark_oom);
        Ok(())
    }

    /// Stops new processes from starting and returns every process.
    pub(crate) fn close(&self) -> Vec<Arc<Process>> {
        let mut processes = lock(&self.processes);
        processes.closed = true;
        processes.list.clone()
    }

    /// Kills `processes` (from [`Sandbox::close`]) and waits until they
    /// ended and their output closed, which with bubblewrap means every
    /// process of their pid namespace is gone.
    pub(crate) async fn kill_all(&self, processes: Vec<Arc<Process>>) {
        for process in &processes {
            process.signal(libc::SIGKILL, false);
        }
        for process in processes {
            if tokio::time::timeout(Duration::from_secs(10), process.wait_drained()).await.is_err() {
                tracing::warn!(
                    sandbox = %self.id,
                    pid = process.pid(),
                    "process or its output did not end within 10 s of SIGKILL"
                );
            }
        }
    }

    fn area_file(&self, path: &str) -> Result<(PathBuf, PathBuf)> {
        let (area, rel) = files::split(&self.id, path)?;
        if rel.as_os_str().is_empty() {
            bail!("sandbox {}: {path} is a directory; name a file under it", self.id);
        }
        Ok((self.fs.join(area), rel))
    }

    /// Streams `body` into the file at `path` (created, or truncated),
    /// creating missing parent directories, all owned by the sandbox's user;
    /// returns the bytes written.
    pub async fn write_file(&self, path: &str, mut body: impl AsyncRead + Unpin) -> Result<u64> {
        let (area, rel) = self.area_file(path)?;
        let owner = self.host.identity.owner();
        let file = tokio::task::spawn_blocking(move || files::create_file(&area, &rel, owner))
            .await?
            .map_err(files::explain)
            .with_context(|| format!("sandbox {}: create file {path}", self.id))?;
        let mut file = tokio::fs::File::from_std(file);
        let written = tokio::io::copy(&mut body, &mut file)
            .await
            .with_context(|| format!("sandbox {}: write file {path}", self.id))?;
        tokio::io::AsyncWriteExt::flush(&mut file)
            .await
            .with_context(|| format!("sandbox {}: write file {path}", self.id))?;
        Ok(written)
    }

    /// Opens the file at `path` for reading.
    pub async fn read_file(&self, path: &str) -> Result<tokio::fs::File> {
        let (area, rel) = self.area_file(path)?;
        let file = tokio::task::spawn_blocking(move || files::open_file(&area, &rel))
            .await?
            .map_err(files::explain)
            .with_context(|| format!("sandbox {}: read file {path}", self.id))?;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Deletes the file at `path` (a symlink itself, not its target).
    pub async fn delete_file(&self, path: &str) -> Result<()> {
        let (area, rel) = self.area_file(path)?;
        tokio::task::spawn_blocking(move || files::remove_file(&area, &rel))
            .await?
            .map_err(files::explain)
            .with_context(|| format!("sandbox {}: delete file {path}", self.id))
    }
}
