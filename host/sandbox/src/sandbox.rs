//! One local sandbox: a directory holding its writable filesystem areas,
//! its processes, and file access by in-sandbox path.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::io::AsyncRead;

use crate::confinement::Confinement;
use crate::process::{OutputEvent, Process, ProcessInfo, ProcessSpec};

/// The in-sandbox directories a sandbox may write; each is a directory of its own on the host.
pub const WRITABLE_AREAS: &[&str] = &["var", "tmp", "root", "home"];
/// `PATH` when a process sets none.
pub const DEFAULT_PATH: &str = "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where the reference builder appears inside.
pub const BUILDER_PATH: &str = "/usr/local/bin/tl-rootfs-build";
/// uid/gid of the sandbox user (processes without `user: "root"`).
pub const SANDBOX_UID: u32 = 1000;

/// A sandbox. Shared (`Arc`) between the proxy's handlers.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    confinement: Confinement,
    builder: Option<PathBuf>,
    processes: Mutex<Vec<Arc<Process>>>,
    extra_env: Mutex<BTreeMap<String, String>>,
}

impl Sandbox {
    pub(crate) fn create(id: &str, dir: PathBuf, confinement: Confinement, builder: Option<PathBuf>) -> Result<Self> {
        for area in WRITABLE_AREAS.iter().chain(&["usr-local-bin"]) {
            let path = dir.join("fs").join(area);
            std::fs::create_dir_all(&path).with_context(|| format!("create {} for sandbox {id}", path.display()))?;
        }
        // Sticky and world-writable, as /tmp is, so the sandbox user can use it.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join("fs/tmp"), std::fs::Permissions::from_mode(0o1777))?;
        Ok(Sandbox {
            id: id.to_owned(),
            dir,
            confinement,
            builder,
            processes: Mutex::new(Vec::new()),
            extra_env: Mutex::new(BTreeMap::new()),
        })
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host directory holding the sandbox.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Environment added to every process started from now on (fault injection).
    pub fn set_process_env(&self, env: BTreeMap<String, String>) {
        *self.extra_env.lock().unwrap_or_else(|p| p.into_inner()) = env;
    }

    /// Maps an absolute in-sandbox path to its host file. Only paths under
    /// the writable areas map; `.`/`..` components are refused.
    pub fn host_path(&self, path: &str) -> Result<PathBuf> {
        if !path.starts_with('/') {
            bail!("sandbox {}: path '{path}' is not absolute", self.id);
        }
        if path.split('/').any(|segment| segment == "." || segment == "..") {
            bail!("sandbox {}: path '{path}' has a '.' or '..' component", self.id);
        }
        let mut parts = Vec::new();
        for component in Path::new(path).components() {
            match component {
                Component::RootDir => {}
                Component::Normal(part) => parts.push(part),
                _ => bail!("sandbox {}: path '{path}' has a '.' or '..' component", self.id),
            }
        }
        let Some(area) = parts.first().and_then(|a| a.to_str()).filter(|a| WRITABLE_AREAS.contains(a)) else {
            bail!("sandbox {}: path '{path}' is outside the writable areas (/{})", self.id, WRITABLE_AREAS.join(", /"));
        };
        let mut host = self.dir.join("fs").join(area);
        host.extend(&parts[1..]);
        Ok(host)
    }

    fn processes(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Process>>> {
        self.processes.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn command(&self, spec: &ProcessSpec) -> Result<tokio::process::Command> {
        let root = spec.user.as_deref() == Some("root");
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        env.insert("PATH".into(), DEFAULT_PATH.into());
        env.insert("HOME".into(), if root { "/root".into() } else { "/home".into() });
        env.extend(spec.env.clone());
        env.extend(self.extra_env.lock().unwrap_or_else(|p| p.into_inner()).clone());
        let workdir = spec.working_dir.clone().unwrap_or_else(|| "/".into());
        let mut cmd = match &self.confinement {
            Confinement::Bwrap { path } => {
                let fs = self.dir.join("fs");
                let mut cmd = tokio::process::Command::new(path);
                cmd.args(["--unshare-all", "--unshare-user", "--share-net", "--die-with-parent", "--new-session"]);
                cmd.args(["--clearenv", "--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]);
                for (link, target) in
                    [("/bin", "usr/bin"), ("/sbin", "usr/sbin"), ("/lib", "usr/lib"), ("/lib64", "usr/lib64")]
                {
                    if Path::new("/usr").join(&target[4..]).exists() {
                        cmd.args(["--symlink", target, link]);
                    }
                }
                cmd.args(["--proc", "/proc", "--dev", "/dev"]);
                for area in WRITABLE_AREAS {
                    cmd.arg("--bind").arg(fs.join(area)).arg(format!("/{area}"));
                }
                cmd.arg("--bind").arg(fs.join("usr-local-bin")).arg("/usr/local/bin");
                if let Some(builder) = &self.builder {
                    cmd.arg("--ro-bind").arg(builder).arg(BUILDER_PATH);
                }
                let id = if root { 0 } else { SANDBOX_UID };
                cmd.args(["--uid", &id.to_string(), "--gid", &id.to_string(), "--chdir", &workdir]);
                for (key, value) in &env {
                    cmd.args(["--setenv", key, value]);
                }
                cmd.arg("--").arg(&spec.command).args(&spec.args);
                cmd
            }
            Confinement::Unconfined => {
                let mut cmd = tokio::process::Command::new(&spec.command);
                cmd.args(&spec.args).env_clear().envs(&env);
                cmd.current_dir(self.host_path(&workdir).unwrap_or_else(|_| self.dir.join("fs")));
                cmd
            }
        };
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true).process_group(0);
        Ok(cmd)
    }

    /// Starts a process; returns at once with its status `running`.
    pub fn start(&self, spec: ProcessSpec) -> Result<ProcessInfo> {
        if spec.command.is_empty() {
            bail!("sandbox {}: process command is empty", self.id);
        }
        let mut child =
            self.command(&spec)?.spawn().with_context(|| format!("sandbox {}: start '{}'", self.id, spec.command))?;
        let group = child.id().map(|pid| pid as i32);
        let mut processes = self.processes();
        let process = Process::new(processes.len() as i64 + 1, &spec, group);
        processes.push(process.clone());
        drop(processes);
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(process.clone().collect(stdout.expect("piped stdout"), "stdout"));
        tokio::spawn(process.clone().collect(stderr.expect("piped stderr"), "stderr"));
        let waiter = process.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            waiter.finish(status);
        });
        tracing::debug!(sandbox = %self.id, pid = process.info().pid, command = %spec.command, "process started");
        Ok(process.info())
    }

    fn find(&self, pid: i64) -> Option<Arc<Process>> {
        self.processes().iter().find(|p| p.info().pid == pid).cloned()
    }

    /// Every process, exited ones included, in start order.
    pub fn list(&self) -> Vec<ProcessInfo> {
        self.processes().iter().map(|p| p.info()).collect()
    }

    /// One process's status.
    pub fn process(&self, pid: i64) -> Option<ProcessInfo> {
        self.find(pid).map(|p| p.info())
    }

    /// All output of `pid` from the start, then live, until it ended.
    pub fn follow(&self, pid: i64) -> Option<BoxStream<'static, OutputEvent>> {
        self.find(pid).map(|p| p.follow().boxed())
    }

    /// Waits for `pid` to end.
    pub async fn wait(&self, pid: i64) -> Option<ProcessInfo> {
        let process = self.find(pid)?;
        Some(process.wait().await)
    }

    /// Sends `signal` to the process's whole group. With `mark_oom` the
    /// process is reported as killed by the OOM killer (a simulation).
    pub fn kill(&self, pid: i64, signal: i32, mark_oom: bool) -> Result<()> {
        let process = self.find(pid).ok_or_else(|| anyhow!("sandbox {} has no process {pid}", self.id))?;
        if mark_oom {
            process.mark_oom();
        }
        if let Some(group) = process.group {
            // SAFETY: kill(2) with a negative pid signals a process group we created.
            unsafe { libc::kill(-group, signal) };
        }
        Ok(())
    }

    /// Kills every process still running and waits for them.
    pub(crate) async fn kill_all(&self) {
        let processes: Vec<Arc<Process>> = self.processes().clone();
        for process in &processes {
            if let (Some(group), "running") = (process.group, process.info().status.as_str()) {
                // SAFETY: as in `kill`.
                unsafe { libc::kill(-group, libc::SIGKILL) };
            }
        }
        for process in processes {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), process.wait()).await;
        }
    }

    /// Writes `body` to `path`, creating parent directories; returns the byte count.
    pub async fn write_file(&self, path: &str, mut body: impl AsyncRead + Unpin) -> Result<u64> {
        let host = self.host_path(path)?;
        if let Some(parent) = host.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .with_context(|| format!("sandbox {}: create parent of {path}", self.id))?;
        }
        let mut file =
            tokio::fs::File::create(&host).await.with_context(|| format!("sandbox {}: create {path}", self.id))?;
        let written = tokio::io::copy(&mut body, &mut file)
            .await
            .with_context(|| format!("sandbox {}: write {path}", self.id))?;
        tokio::io::AsyncWriteExt::flush(&mut file).await?;
        Ok(written)
    }

    /// Opens `path` for reading.
    pub async fn read_file(&self, path: &str) -> Result<tokio::fs::File> {
        let host = self.host_path(path)?;
        tokio::fs::File::open(&host).await.with_context(|| format!("sandbox {}: no readable file {path}", self.id))
    }

    /// Deletes `path`.
    pub async fn delete_file(&self, path: &str) -> Result<()> {
        let host = self.host_path(path)?;
        tokio::fs::remove_file(&host).await.with_context(|| format!("sandbox {}: delete {path}", self.id))
    }
}
