//! One local sandbox: a directory holding its writable areas, its
//! processes, and file access by in-sandbox path.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::io::AsyncRead;

use crate::confinement::Confinement;
use crate::files::{self, AREAS, BUILDER_DIR, BUILDER_PATH, Owners};
use crate::identity::{SANDBOX_UID, SubIds, SubRange, UidRange};
use crate::limits::{Cgroups, Limits, SandboxGroups};
use crate::namespaces::{Holder, HolderSpec, Launch, RootEntry};
use crate::network::{Forwarders, Network};
use crate::process::{self, OutputEvent, Process, ProcessInfo, ProcessSpec};

/// Bytes a file write through the file API hands the disk at once.
const WRITE_BUFFER: usize = 1 << 20;

/// How every sandbox of a [`crate::Sandboxes`] runs its processes.
#[derive(Debug)]
pub(crate) struct Host {
    pub confinement: Confinement,
    pub layout: Vec<RootEntry>,
    pub builder: Option<PathBuf>,
    pub cgroups: Cgroups,
    /// Where host uid ranges are locked (as root), or this user's blocks of
    /// subordinate ids (rootless, with two blocks or more).
    pub uid_locks: PathBuf,
    /// Rootless: this user's host uid and gid (sandbox root).
    pub rootless: Option<(u32, u32)>,
    /// Rootless: how sandbox ids map to host ids.
    pub ids: Option<crate::RootlessIds>,
    /// Rootless with subordinate ids: them (a block of them is uids
    /// 1..=65535 inside each sandbox).
    pub subids: Option<SubIds>,
    /// Rootless: a user namespace mapped as every sandbox's outer one, whose
    /// root may chown, read and remove any file of this user's sandboxes.
    pub keeper: Option<OwnedFd>,
    /// Rootless with blocks of subordinate ids: the lock directory, held
    /// open (`uid_locks` names it through this descriptor).
    pub _locks_dir: Option<OwnedFd>,
}

impl Host {
    /// Removes a sandbox's directory `dir` and all in it. Rootless, as root
    /// of the keeper namespace: files of subordinate uids and directories
    /// of mode 000 included.
    pub(crate) fn remove_dir(&self, dir: &Path) -> Result<()> {
        match &self.keeper {
            Some(keeper) => crate::namespaces::remove_tree(dir, keeper),
            None => std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display())),
        }
    }
}

/// A file operation run as root of the keeper namespace (rootless with subordinate ids).
#[derive(Debug, Clone, Copy)]
enum KeeperOp {
    Open,
    Create,
    Remove,
}

/// Runs `op` on `plan` in a helper that is root of `host`'s keeper
/// namespace: it may create files owned by the sandbox user, open files of
/// any sandbox uid, and remove in directories of any sandbox uid. Returns
/// the file opened or created. `block`: the sandbox's block of subordinate ids.
fn in_keeper(
    host: &Host,
    block: u32,
    plan: &files::FilePlan,
    op: KeeperOp,
) -> Result<std::io::Result<Option<OwnedFd>>> {
    let keeper = host.keeper.as_ref().ok_or_else(|| anyhow!("no keeper namespace (not rootless)"))?;
    let ids = host.subids.as_ref().ok_or_else(|| anyhow!("no subordinate ids"))?;
    // The sandbox user as the keeper namespace numbers it (it maps every block).
    let user = ids.keeper_uid(block, SANDBOX_UID);
    let body = |sock: std::os::fd::RawFd| -> std::result::Result<(), i32> {
        let file = match op {
            KeeperOp::Open => Some(plan.open()?),
            KeeperOp::Create => Some(plan.create(Some(user))?),
            KeeperOp::Remove => {
                plan.remove()?;
                None
            }
        };
        let sent = match &file {
            Some(file) => crate::namespaces::send_fds(sock, &[file.as_raw_fd()]),
            None => crate::namespaces::send_fds(sock, &[]),
        };
        if sent { Ok(()) } else { Err(libc::EIO) }
    };
    let answer = crate::namespaces::in_keeper(&format!("file helper ({op:?})"), keeper, &body)?;
    Ok(answer.map(|mut fds| fds.pop()))
}

/// The file a keeper helper sent back.
fn sent_file(fd: Option<OwnedFd>) -> std::io::Result<std::fs::File> {
    fd.map(std::fs::File::from).ok_or_else(|| std::io::Error::other("the file helper sent no descriptor"))
}

/// What a sandbox is given at creation (wit/protocol.md §3.3).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SandboxSpec {
    /// `resources`: CPU, memory, disk, processes.
    pub limits: Limits,
    /// `network`, as [`Network::from_policy`] resolved it.
    pub network: Network,
    /// `timeout_secs`: the sandbox is deleted once this long passed without
    /// activity ([`Sandbox::renew`]); `None`: never.
    pub timeout: Option<Duration>,
}

/// The part of a create request (wit/protocol.md §3.3) that shapes a sandbox.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct CreateRequest {
    /// `resources{cpus, memory_mb, disk_mb}`.
    #[serde(default)]
    pub resources: Option<crate::limits::Resources>,
    /// `timeout_secs`.
    #[serde(default)]
    pub timeout_secs: Option<i64>,
    /// `network{allow_internet_access, allow_out, deny_out}`.
    #[serde(default)]
    pub network: Option<crate::network::NetworkPolicy>,
}

#[derive(Default)]
struct Processes {
    list: Vec<Arc<Process>>,
    /// Set by [`Sandbox::close`]: no process starts after it.
    closed: bool,
}

/// The namespaces, identities, groups and forwarders of a confined sandbox.
struct Jail {
    holder: Holder,
    /// As root; rootless sandboxes share this user's uid.
    uids: Option<UidRange>,
    /// Rootless with subordinate ids: the block the sandbox holds.
    block: Option<SubRange>,
    groups: Arc<SandboxGroups>,
    _forwarders: Option<Forwarders>,
}

/// A sandbox. Shared (`Arc`) between the proxy's handlers; `Send + Sync`.
pub struct Sandbox {
    id: String,
    dir: PathBuf,
    fs: PathBuf,
    host: Arc<Host>,
    spec: SandboxSpec,
    owners: Option<Owners>,
    /// Rootless with subordinate ids: the index of its block (uids 1..=65535).
    block: u32,
    jail: Mutex<Option<Jail>>,
    /// The sandbox's disk (a tmpfs no longer mounted on the host: see
    /// [`Sandbox::confine`]), reached as `/proc/self/fd/N`; held as long as
    /// this value lives, so that N never names another file meanwhile.
    _disk: Option<OwnedFd>,
    processes: Mutex<Processes>,
    extra_env: Mutex<BTreeMap<String, String>>,
    last_activity: Mutex<Instant>,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("id", &self.id)
            .field("dir", &self.dir)
            .field("spec", &self.spec)
            .field("owners", &self.owners)
            .field("processes", &lock(&self.processes).list.len())
            .finish_non_exhaustive()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // Never deleted (its `Sandboxes` went away): the holder dies with its `Jail`;
        // the disk must not stay mounted, nor the groups stay behind.
        if let Some(jail) = lock(&self.jail).take() {
            jail.holder.kill();
            jail.groups.remove();
            files::unmount_disk(&self.dir.join("fs"));
            // Rootless, its files may belong to subordinate uids that this user cannot remove
            // by hand: the directory goes now (as root, a later create with its id removes it).
            if self.host.keeper.is_some()
                && let Err(e) = self.host.remove_dir(&self.dir)
            {
                tracing::warn!(sandbox = %self.id, "removing the directory of a sandbox never deleted: {e:#}");
            }
        }
    }
}

impl Sandbox {
    pub(crate) fn create(id: &str, dir: PathBuf, host: Arc<Host>, spec: SandboxSpec) -> Result<Self> {
        if dir.exists() {
            tracing::warn!(sandbox = id, "removing the stale directory {} of an earlier sandbox {id}", dir.display());
            files::unmount_disk(&dir.join("fs"));
            host.remove_dir(&dir).with_context(|| format!("remove the stale directory of sandbox {id}"))?;
        }
        match host.confinement {
            Confinement::Unconfined => {
                let fs = files::create_areas(&dir, None, host.builder.as_deref(), None)
                    .with_context(|| format!("create the directories of sandbox {id} in {}", dir.display()))?;
                Ok(Sandbox::assemble(id, dir, fs, host, spec, None, None))
            }
            Confinement::Namespaces | Confinement::Rootless => {
                let hint = u64::from(std::process::id()) << 16
                    ^ id.bytes().fold(0u64, |h, b| h.wrapping_mul(31) + u64::from(b));
                let (uids, block, owners) = match (host.rootless, &host.subids) {
                    (Some((uid, _)), Some(ids)) => {
                        let block = ids.take(&host.uid_locks, hint).with_context(|| format!("sandbox {id}"))?;
                        let user = ids.host_uid(block.index, SANDBOX_UID).expect("1000 is a subordinate id");
                        (None, Some(block), Owners { root: uid, user })
                    }
                    (Some((uid, _)), None) => (None, None, Owners { root: uid, user: uid }),
                    (None, _) => {
                        let uids = UidRange::take(&host.uid_locks, hint)?;
                        let owners = Owners { root: uids.host(0), user: uids.host(SANDBOX_UID) };
                        (Some(uids), None, owners)
                    }
                };
                let index = block.as_ref().map_or(0, |b| b.index);
                let made = Sandbox::confine(id, &dir, &host, &spec, (uids, block), owners);
                match made {
                    Ok((fs, jail, disk)) => {
                        let mut sandbox = Sandbox::assemble(id, dir, fs, host, spec, Some(owners), Some(jail));
                        sandbox._disk = disk;
                        sandbox.block = index;
                        Ok(sandbox)
                    }
                    Err(e) => {
                        files::unmount_disk(&dir.join("fs"));
                        if let Err(left) = host.remove_dir(&dir) {
                            tracing::warn!(sandbox = id, "after a failed create: {left:#}");
                        }
                        Err(e)
                    }
                }
            }
        }
    }

    fn confine(
        id: &str,
        dir: &Path,
        host: &Host,
        spec: &SandboxSpec,
        (uids, block): (Option<UidRange>, Option<SubRange>),
        owners: Owners,
    ) -> Result<(PathBuf, Jail, Option<OwnedFd>)> {
        // Rootless: everything is this user's already, and the holder mounts the disk (the host cannot).
        let rootless = host.rootless.is_some();
        let (chown, disk_mb) = if rootless { (None, None) } else { (Some(owners), spec.limits.disk_mb) };
        let fs = files::create_areas(dir, chown, host.builder.as_deref(), disk_mb)
            .with_context(|| format!("create the directories of sandbox {id} in {}", dir.display()))?;
        let root = dir.join("root");
        std::fs::create_dir(&root).with_context(|| format!("create {}", root.display()))?;
        static SLOTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let slot = match &uids {
            Some(uids) => format!("{}", uids.base),
            None => format!("u{}-{}", std::process::id(), SLOTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)),
        };
        let groups = Arc::new(
            SandboxGroups::create(&host.cgroups, &slot, &spec.limits)
                .with_context(|| format!("sandbox {id}: create its cgroups ({})", host.cgroups.describe()))?,
        );
        let holder = Holder::start(&HolderSpec {
            id,
            root: &root,
            fs: &fs,
            areas: &AREAS,
            builder_dir: &dir.join(BUILDER_DIR),
            layout: &host.layout,
            base_uid: uids.as_ref().map_or(0, |u| u.base),
            private_network: matches!(spec.network, Network::Private { .. }),
            rootless: host.rootless,
            disk_mb: spec.limits.disk_mb,
            subids: host.subids.as_ref().map(|ids| (ids, block.as_ref().map_or(0, |b| b.index))),
        });
        let mut holder = match holder {
            Ok(holder) => holder,
            Err(e) => {
                groups.remove();
                return Err(e);
            }
        };
        let forwarders = match (&spec.network, holder.net()) {
            (Network::Private { ports }, Some(net)) => Some(crate::network::forward(id, net, holder.outer(), ports)),
            _ => None,
        }
        .transpose();
        let forwarders = match forwarders {
            Ok(f) => f,
            Err(e) => {
                holder.kill();
                groups.remove();
                return Err(e);
            }
        };
        let holder_disk = holder.take_disk();
        let jail = Jail { holder, uids, block, groups, _forwarders: forwarders };
        if spec.limits.disk_mb.is_none() {
            return Ok((fs, jail, None));
        }
        if rootless {
            // The holder's disk, reached through the descriptor it handed over.
            let disk = holder_disk.ok_or_else(|| anyhow!("sandbox {id}: its holder mounted no disk"))?;
            let through = PathBuf::from(format!("/proc/self/fd/{}", disk.as_raw_fd()));
            return Ok((through, jail, Some(disk)));
        }
        // The disk leaves the host's mount table (nothing to clean up on the host if this
        // process dies); the holder's binds and a descriptor keep it, the file API goes through it.
        let disk = files::open_area(&fs).with_context(|| format!("sandbox {id}: open its disk {}", fs.display()))?;
        files::unmount_disk(&fs);
        let through = PathBuf::from(format!("/proc/self/fd/{}", disk.as_raw_fd()));
        Ok((through, jail, Some(disk)))
    }

    fn assemble(
        id: &str,
        dir: PathBuf,
        fs: PathBuf,
        host: Arc<Host>,
        spec: SandboxSpec,
        owners: Option<Owners>,
        jail: Option<Jail>,
    ) -> Sandbox {
        Sandbox {
            id: id.to_owned(),
            dir,
            fs,
            host,
            spec,
            owners,
            block: 0,
            jail: Mutex::new(jail),
            _disk: None,
            processes: Mutex::new(Processes::default()),
            extra_env: Mutex::new(BTreeMap::new()),
            last_activity: Mutex::new(Instant::now()),
        }
    }

    /// The sandbox's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Host directory holding the sandbox (`root_dir/{id}`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// What the sandbox was given at creation.
    pub fn spec(&self) -> &SandboxSpec {
        &self.spec
    }

    /// Host uid of `uid` inside (sandbox root is 0, the sandbox user
    /// [`SANDBOX_UID`]); `None` when unconfined (everything is this process's user).
    ///
    /// Rootless, sandbox root is this user's host uid; with subordinate ids
    /// uids 1..=65535 are those ids, with one uid the sandbox user is that
    /// same uid and other uids inside are not mapped (`None`).
    pub fn host_uid(&self, uid: u32) -> Option<u32> {
        match (self.host.rootless, &self.host.subids, self.owners) {
            (_, _, None) => None,
            (Some(_), Some(ids), Some(_)) => ids.host_uid(self.block, uid),
            (Some((host, _)), None, Some(_)) => (uid == 0 || uid == SANDBOX_UID).then_some(host),
            (None, _, Some(owners)) => Some(owners.root + uid),
        }
    }

    /// Which mechanism holds each of this sandbox's limits (and which asked
    /// limit nothing holds here): what its create answer reports.
    pub fn enforcement(&self) -> crate::Enforcement {
        let mut held =
            crate::Enforcement::new(&self.host.confinement, &self.host.cgroups, &self.spec.limits, self.spec.timeout);
        held.identities = match (&self.host.ids, &self.host.subids) {
            (Some(_), Some(ids)) if ids.ranges > 1 => {
                let own = ids.extent(self.block);
                format!(
                    "subordinate ids: sandbox root is this user's host uid, uids 1..65535 are host uids {}..{} and \
                     gids 1..65535 host gids {}..{}, this sandbox's own (block {} of {}; newuidmap, newgidmap)",
                    own.uid_start,
                    own.uid_start + own.count - 1,
                    own.gid_start,
                    own.gid_start + own.count - 1,
                    self.block,
                    ids.ranges
                )
            }
            (Some(ids), _) => ids.describe(),
            (None, _) => String::new(),
        };
        held
    }

    /// Counts as activity: the timeout starts again from now.
    pub fn renew(&self) {
        *lock(&self.last_activity) = Instant::now();
    }

    /// When the sandbox expires unless renewed; `None` without a timeout.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.spec.timeout.map(|t| *lock(&self.last_activity) + t)
    }

    /// Environment added to every process started from now on, over the
    /// spec's own (the emulator's fault injection). Replaces the previous one.
    pub fn set_process_env(&self, env: BTreeMap<String, String>) {
        *lock(&self.extra_env) = env;
    }

    /// Maps an absolute in-sandbox path under `/var`, `/tmp`, `/root` or
    /// `/home` to its host file: under `root_dir/{id}/fs/`, or for a sandbox
    /// with a disk (`disk_mb`) under `/proc/self/fd/N/` (its tmpfs is not
    /// mounted on the host), valid in this process while the sandbox lives. Refuses relative paths, `.` and `..`
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
        if spec.command.contains('\0') || spec.args.iter().any(|a| a.contains('\0')) || working_dir.contains('\0') {
            bail!("sandbox {id}: the command, an argument or working_dir has a NUL byte; remove it");
        }

        // Under the lock: pids follow start order, and `close` cannot miss a process.
        let mut processes = lock(&self.processes);
        if processes.closed {
            bail!("sandbox {id} is being deleted; create a new sandbox to run '{}'", spec.command);
        }
        let pid = processes.list.len() as i64 + 1;
        let (command, group) = match self.host.confinement {
            Confinement::Namespaces | Confinement::Rootless => {
                let jail = lock(&self.jail);
                let jail = jail.as_ref().ok_or_else(|| anyhow!("sandbox {id} was terminated; create a new one"))?;
                let (own_group, cgroup_procs) = jail.groups.for_process(pid)?;
                let launch = Launch {
                    display: spec.command.clone(),
                    user,
                    working_dir: working_dir.to_owned(),
                    env: env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    command: spec.command.clone(),
                    args: spec.args.clone(),
                    cgroup_procs,
                    rlimits: self.rlimits(),
                };
                let mut command = jail.holder.command(launch);
                command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped());
                (command, own_group.map(|dir| (dir, jail.groups.clone())))
            }
            Confinement::Unconfined => (self.unconfined(&spec, &env, working_dir)?, None),
        };
        let mut command = tokio::process::Command::from(command);
        command.kill_on_drop(true);
        let spawned = command.spawn().with_context(|| format!("sandbox {id}: start '{}'", spec.command));
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                if let Some((dir, _)) = &group {
                    crate::limits::remove_tree(dir);
                }
                return Err(e);
            }
        };
        let own_cgroup = group.as_ref().map(|(dir, _)| dir.clone());
        let process = Process::new(pid, &spec, child.id().map(|pid| pid as i32), own_cgroup);
        processes.list.push(process.clone());
        drop(processes);

        // Taken now: a quick process may end before this returns.
        let info = process.info();
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        tokio::spawn(process.clone().collect(stdout.expect("stdout is piped"), "stdout"));
        tokio::spawn(process.clone().collect(stderr.expect("stderr is piped"), "stderr"));
        let waiter = process.clone();
        tokio::spawn(async move {
            let status = child.wait().await;
            let oom_killed = group.as_ref().is_some_and(|(dir, groups)| groups.oom_kills(dir) > 0);
            waiter.finish(status, oom_killed);
            if let Some((dir, _)) = group {
                // Once nothing holds its output, nothing of it runs: its group can go.
                waiter.wait_drained().await;
                let _ = tokio::task::spawn_blocking(move || crate::limits::remove_tree(&dir)).await;
            }
        });
        tracing::debug!(sandbox = %id, pid, command = %spec.command, ?user, "process started");
        Ok(info)
    }

    /// The rlimits of every process: the process bound (per sandbox, as each
    /// has its own uids), no core files, and address space in place of a
    /// missing memory controller.
    fn rlimits(&self) -> Vec<(libc::__rlimit_resource_t, u64)> {
        let limits = &self.spec.limits;
        let mut rlimits = vec![(libc::RLIMIT_NPROC, u64::from(limits.pids)), (libc::RLIMIT_CORE, 0)];
        if !self.host.cgroups.has_memory()
            && let Some(bytes) = limits.memory_bytes()
        {
            rlimits.push((libc::RLIMIT_AS, bytes));
        }
        rlimits
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
        let builder = self.dir.join(BUILDER_DIR).join("tl-rootfs-build");
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
        // SAFETY: close_range(2) only. The descriptors this process opens are close-on-exec
        // already; this also covers any that a library opened without the flag.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC);
                Ok(())
            })
        };
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

    /// Sends `signal` to the process (to its launcher and itself: the process
    /// dies with its launcher). With `mark_oom` the process is reported as
    /// killed by the kernel OOM killer: a simulation, for the emulator's
    /// fault switch where no memory controller can make a real kill. Does
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

    /// Ends everything process `pid` started, whether or not it still runs
    /// (a one-shot run that ended or timed out): SIGKILL to every member of
    /// its own cgroup, where it has one (which also holds what left its
    /// process group, e.g. by `setsid`), and to every process still in its
    /// process group inside this sandbox. Returns how many were signalled.
    /// Without a cgroup per process (rootless without a delegated cgroup),
    /// what left the process group is not found.
    pub fn end_all_of(&self, pid: i64) -> Result<usize> {
        let id = &self.id;
        let process = self
            .find(pid)
            .ok_or_else(|| anyhow!("sandbox {id} has no process {pid}; list them with GET /api/v1/processes"))?;
        let mut ended = 0;
        if let Some(dir) = process.cgroup() {
            ended += crate::limits::kill_members(dir);
        }
        if let Some(group) = process.group() {
            let pid_ns = lock(&self.jail).as_ref().and_then(|jail| jail.holder.pid_ns_id());
            ended += kill_group_in(group, pid_ns);
        }
        Ok(ended)
    }

    /// Stops new processes from starting and returns every process.
    pub(crate) fn close(&self) -> Vec<Arc<Process>> {
        let mut processes = lock(&self.processes);
        processes.closed = true;
        processes.list.clone()
    }

    /// Kills `processes` (from [`Sandbox::close`]) and everything else in
    /// the sandbox, and waits until they ended and their output closed;
    /// then releases the namespaces, groups, forwarders and uid range, and
    /// the disk mounted on `dir/fs` (`dir`: where the sandbox's directory is now).
    pub(crate) async fn kill_all(&self, processes: Vec<Arc<Process>>, dir: &Path) {
        for process in &processes {
            process.signal(libc::SIGKILL, false);
        }
        let jail = lock(&self.jail).take();
        // Killing the holder ends every process of the sandbox's pid namespace (blocking until reaped).
        let jail = match jail {
            Some(jail) => tokio::task::spawn_blocking(move || {
                jail.holder.kill();
                jail
            })
            .await
            .ok(),
            None => None,
        };
        for process in processes {
            if tokio::time::timeout(Duration::from_secs(10), process.wait_drained()).await.is_err() {
                tracing::warn!(
                    sandbox = %self.id,
                    pid = process.pid(),
                    "process or its output did not end within 10 s of SIGKILL"
                );
            }
        }
        if let Some(jail) = jail {
            let Jail { holder, uids, block, groups, _forwarders } = jail;
            drop(_forwarders);
            let _ = tokio::task::spawn_blocking(move || groups.remove()).await;
            // The uid range (or block) is free again only once nothing of the sandbox runs.
            drop((holder, uids, block));
        }
        files::unmount_disk(&dir.join("fs"));
    }

    /// Opens or creates the file at `path`: `direct` here, or `op` in a
    /// helper in the keeper namespace when sandboxes use subordinate ids.
    async fn file_op(
        &self,
        path: &str,
        what: &'static str,
        op: KeeperOp,
        direct: impl FnOnce(&Path, &Path) -> std::io::Result<std::fs::File> + Send + 'static,
    ) -> Result<std::fs::File> {
        let (area, rel) = self.area_file(path)?;
        let (host, block) = (self.host.clone(), self.block);
        let file = tokio::task::spawn_blocking(move || -> Result<std::io::Result<std::fs::File>> {
            if host.subids.is_none() {
                return Ok(direct(&area, &rel));
            }
            let plan = files::FilePlan::new(&area, &rel)?;
            Ok(in_keeper(&host, block, &plan, op)?.and_then(sent_file))
        })
        .await?
        .with_context(|| format!("sandbox {}: {what} file {path}", self.id))?
        .map_err(files::explain)
        .with_context(|| format!("sandbox {}: {what} file {path}", self.id))?;
        Ok(file)
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
        // Rootless with one uid, files are this user's already (chown to the same uid is not needed).
        let owner = self.owners.filter(|_| self.host.rootless.is_none()).map(|o| o.user);
        // With subordinate ids the file is the sandbox user's (a subordinate
        // uid): a helper that may chown makes it.
        let file = self
            .file_op(path, "create", KeeperOp::Create, move |area, rel| files::create_file(area, rel, owner))
            .await?;
        // Large writes: tokio's File does each write as a blocking-pool task,
        // and `copy` hands it 8 KiB at a time (37,500 round trips for 300 MB).
        let mut file = tokio::io::BufWriter::with_capacity(WRITE_BUFFER, tokio::fs::File::from_std(file));
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
        // With subordinate ids a helper opens it: it may read any sandbox
        // uid's files (mode 0600 of uid 1000 too).
        let file = self.file_op(path, "read", KeeperOp::Open, files::open_file).await?;
        Ok(tokio::fs::File::from_std(file))
    }

    /// Deletes the file at `path` (a symlink itself, not its target).
    pub async fn delete_file(&self, path: &str) -> Result<()> {
        let (area, rel) = self.area_file(path)?;
        let (host, block) = (self.host.clone(), self.block);
        tokio::task::spawn_blocking(move || -> Result<std::io::Result<()>> {
            if host.subids.is_none() {
                return Ok(files::remove_file(&area, &rel));
            }
            // Removed by a helper that may write in a directory of any sandbox uid.
            let plan = files::FilePlan::new(&area, &rel)?;
            Ok(in_keeper(&host, block, &plan, KeeperOp::Remove)?.map(drop))
        })
        .await?
        .with_context(|| format!("sandbox {}: delete file {path}", self.id))?
        .map_err(files::explain)
        .with_context(|| format!("sandbox {}: delete file {path}", self.id))
    }
}

/// SIGKILL to every process whose process group is `group` and, when
/// `pid_ns` is given, that lives in that pid namespace (so a reused group id
/// outside the sandbox is never hit); unconfined, only this user's. Repeats
/// while it finds some (a process may fork as it dies).
fn kill_group_in(group: i32, pid_ns: Option<(u64, u64)>) -> usize {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    let mut killed = 0;
    for _ in 0..8 {
        let mut found = 0;
        let Ok(entries) = std::fs::read_dir("/proc") else { return killed };
        for entry in entries.flatten() {
            let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
            // The fields after the command (which may hold spaces) begin past its last ')'.
            let pgrp = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(2)?.parse::<i32>().ok());
            if pgrp != Some(group) {
                continue;
            }
            let inside = match pid_ns {
                Some(ns) => std::fs::metadata(entry.path().join("ns/pid")).is_ok_and(|m| (m.dev(), m.ino()) == ns),
                None => std::fs::metadata(entry.path()).is_ok_and(|m| m.uid() == me),
            };
            if inside {
                // SAFETY: kill(2) of a process just checked to be in the sandbox and the group.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                found += 1;
            }
        }
        if found == 0 {
            break;
        }
        killed += found;
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}
