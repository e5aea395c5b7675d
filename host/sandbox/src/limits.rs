//! Resource limits of a sandbox (wit/protocol.md §3.3 `resources`), enforced by
//! the strongest mechanism the kernel offers here:
//!
//! | limit | with cgroups (v1 or v2) | without |
//! |---|---|---|
//! | memory | memory controller: limit = `memory_mb` + `disk_mb` (the disk is RAM), a real OOM kill, reported per process | `RLIMIT_AS` = the same per process: allocations fail, nothing is OOM-killed |
//! | processes | pids controller: `pids.max` | `RLIMIT_NPROC` (always set: each sandbox has host uids of its own) |
//! | CPU | cpu controller: CFS quota of `cpus` × period | not limited |
//!
//! Disk (`disk_mb`) is a size-limited tmpfs and needs no cgroup. The
//! controllers are found in `/proc/self/mountinfo`; a sandbox's groups are
//! made under this process's own group of each hierarchy (v1:
//! `snapsign-sandbox-{slot}`, removed with the sandbox, so nothing is left
//! in a group this process was given; v2: `snapsign-sandboxes/{slot}`, as a
//! v2 group that enables controllers for its children may hold no process).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Processes (threads included) a sandbox may have at once when nothing else is asked.
pub const DEFAULT_PIDS: u32 = 512;

/// What one sandbox may use. `None`: not limited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// CPUs (`resources.cpus`): a CFS quota of this many CPUs.
    pub cpus: Option<f64>,
    /// Memory in MiB (`resources.memory_mb`).
    pub memory_mb: Option<u64>,
    /// Writable disk in MiB (`resources.disk_mb`): `/var`, `/tmp`, `/root`
    /// and `/home` together; writes past it fail with ENOSPC.
    pub disk_mb: Option<u64>,
    /// Processes and threads at once.
    pub pids: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { cpus: None, memory_mb: None, disk_mb: None, pids: DEFAULT_PIDS }
    }
}

impl Limits {
    /// The limits a create request's `resources` asks for (wit/protocol.md
    /// §3.3); absent values are not limited, invalid ones refused.
    pub fn from_request(resources: &Resources) -> anyhow::Result<Limits> {
        let mut limits = Limits::default();
        if let Some(cpus) = resources.cpus {
            if !(cpus.is_finite() && cpus > 0.0 && cpus <= 1024.0) {
                anyhow::bail!("resources.cpus is {cpus}; send a number of CPUs above 0 (e.g. 1.5)");
            }
            limits.cpus = Some(cpus);
        }
        if let Some(mb) = resources.memory_mb {
            if !(1..=(1 << 30)).contains(&mb) {
                anyhow::bail!("resources.memory_mb is {mb}; send a positive number of MiB");
            }
            limits.memory_mb = Some(mb as u64);
        }
        if let Some(mb) = resources.disk_mb {
            if !(1..=(1 << 30)).contains(&mb) {
                anyhow::bail!("resources.disk_mb is {mb}; send a positive number of MiB");
            }
            limits.disk_mb = Some(mb);
        }
        Ok(limits)
    }

    /// Bytes the memory controller allows: memory plus the RAM-backed disk.
    pub(crate) fn memory_bytes(&self) -> Option<u64> {
        self.memory_mb.map(|m| (m + self.disk_mb.unwrap_or(0)).saturating_mul(1 << 20))
    }
}

/// The create request's `resources` (wit/protocol.md §3.3).
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct Resources {
    /// CPUs.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory, MiB.
    #[serde(default)]
    pub memory_mb: Option<i64>,
    /// Disk, MiB.
    #[serde(default)]
    pub disk_mb: Option<u64>,
}

/// The cgroup controllers this process can use for sandboxes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Cgroups {
    /// cgroup v1: this process's own group in each hierarchy found, where sandbox groups go.
    V1 {
        /// `/sys/fs/cgroup/memory/…`
        memory: Option<PathBuf>,
        /// `/sys/fs/cgroup/pids/…`
        pids: Option<PathBuf>,
        /// `/sys/fs/cgroup/cpu/…`
        cpu: Option<PathBuf>,
    },
    /// cgroup v2: the parent of sandbox groups, with these controllers enabled for them.
    V2 {
        /// `…/snapsign-sandboxes`
        parent: PathBuf,
        /// memory, pids, cpu (those enabled).
        controllers: Vec<String>,
    },
    /// None usable: only rlimits.
    #[default]
    None,
}

impl Cgroups {
    /// Finds the controllers and prepares their `snapsign-sandboxes` groups.
    pub fn detect() -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let v1 = detect_v1(&mountinfo, &own);
        if let Cgroups::V1 { memory: Some(_), .. } = &v1 {
            return v1;
        }
        match detect_v2(&mountinfo, &own) {
            Ok(Some(v2)) => v2,
            Ok(None) => v1,
            Err(e) => {
                tracing::warn!("cgroup v2 is mounted but unusable for sandboxes: {e:#}");
                v1
            }
        }
    }

    /// As an ordinary user: a delegated cgroup v2 subtree (this process's
    /// own group, from `/proc/self/cgroup`, when this user may write it, as
    /// systemd's `Delegate=yes` gives), else none (rlimits). cgroup v1 is
    /// never delegated to a user and is not tried.
    pub fn detect_delegated() -> Cgroups {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        match detect_v2_delegated(&mountinfo, &own) {
            Ok(found) => found.unwrap_or(Cgroups::None),
            Err(e) => {
                tracing::info!("no delegated cgroup v2 subtree for sandboxes ({e:#}); limits fall back to rlimits");
                Cgroups::None
            }
        }
    }

    /// Which mechanism enforces each limit, for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V1 { memory, pids, cpu } => {
                format!("cgroup v1 (memory: {}, pids: {}, cpu: {})", memory.is_some(), pids.is_some(), cpu.is_some())
            }
            Cgroups::V2 { controllers, .. } => format!("cgroup v2 ({})", controllers.join(", ")),
            Cgroups::None => "no cgroups (rlimits only)".into(),
        }
    }

    /// True when a memory limit is a real memory controller limit (an OOM kill), not an rlimit.
    pub fn has_memory(&self) -> bool {
        match self {
            Cgroups::V1 { memory, .. } => memory.is_some(),
            Cgroups::V2 { controllers, .. } => controllers.iter().any(|c| c == "memory"),
            Cgroups::None => false,
        }
    }

    pub(crate) fn has(&self, name: &str) -> bool {
        match self {
            Cgroups::V1 { memory, pids, cpu } => match name {
                "memory" => memory.is_some(),
                "pids" => pids.is_some(),
                _ => cpu.is_some(),
            },
            Cgroups::V2 { controllers, .. } => controllers.iter().any(|c| c == name),
            Cgroups::None => false,
        }
    }
}

/// Splits a mountinfo line into (mount point, fs type, super options).
fn mount_fields(line: &str) -> Option<(&str, &str, &str)> {
    let (left, right) = line.split_once(" - ")?;
    let point = left.split(' ').nth(4)?;
    let mut right = right.split(' ');
    let fstype = right.next()?;
    let _source = right.next()?;
    Some((point, fstype, right.next().unwrap_or("")))
}

/// This process's group path in the hierarchy whose controllers include `name`
/// (v1, `N:memory:/path`) or in v2 (`0::/path`, `name` empty).
fn own_group<'a>(own: &'a str, name: &str) -> Option<&'a str> {
    own.lines().find_map(|line| {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let matches = if name.is_empty() { controllers.is_empty() } else { controllers.split(',').any(|c| c == name) };
        matches.then_some(path)
    })
}

/// `dir` when this process may make groups in it.
fn writable(dir: PathBuf) -> Option<PathBuf> {
    // Unique per call: detections run concurrently (one per `Sandboxes`), and
    // a shared name made one fail with EEXIST and lose its controller.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!("snapsign-probe-{}-{n}", std::process::id()));
    match std::fs::create_dir(&probe).and_then(|()| std::fs::remove_dir(&probe)) {
        Ok(()) => Some(dir),
        Err(e) => {
            tracing::warn!(
                "cannot create cgroups in {}: {e}; that controller's limit falls back to an rlimit",
                dir.display()
            );
            None
        }
    }
}

fn detect_v1(mountinfo: &str, own: &str) -> Cgroups {
    let find = |name: &str| -> Option<PathBuf> {
        let point = mountinfo.lines().filter_map(mount_fields).find_map(|(point, fstype, options)| {
            (fstype == "cgroup" && options.split(',').any(|o| o == name)).then_some(point)
        })?;
        let group = own_group(own, name)?;
        writable(Path::new(point).join(group.trim_start_matches('/')))
    };
    let (memory, pids, cpu) = (find("memory"), find("pids"), find("cpu"));
    if memory.is_none() && pids.is_none() && cpu.is_none() {
        return Cgroups::None;
    }
    if let Some(memory) = &memory {
        // Older kernels may default to a flat hierarchy, where a sandbox's limit would not cover its processes' groups.
        if std::fs::read_to_string(memory.join("memory.use_hierarchy")).is_ok_and(|v| v.trim() != "1") {
            tracing::warn!("memory.use_hierarchy is off in {}: memory limits may not hold", memory.display());
        }
    }
    Cgroups::V1 { memory, pids, cpu }
}

/// This process's own cgroup v2 group, as a directory and as its path in
/// the hierarchy, when a cgroup2 hierarchy is mounted.
fn own_v2_group(mountinfo: &str, own: &str) -> Option<(std::path::PathBuf, String)> {
    let point = mountinfo
        .lines()
        .filter_map(mount_fields)
        .find_map(|(point, fstype, _)| (fstype == "cgroup2").then_some(point))?;
    let group = own_group(own, "")?;
    Some((Path::new(point).join(group.trim_start_matches('/')), group.to_string()))
}

fn detect_v2(mountinfo: &str, own: &str) -> Result<Option<Cgroups>> {
    let Some((base, _)) = own_v2_group(mountinfo, own) else { return Ok(None) };
    let available = std::fs::read_to_string(base.join("cgroup.controllers")).unwrap_or_default();
    let wanted: Vec<String> = ["memory", "pids", "cpu"]
        .into_iter()
        .filter(|c| available.split_whitespace().any(|a| a == *c))
        .map(String::from)
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let enable = wanted.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
    // Allowed only where `base` holds no process itself (or is the root): a
    // delegated group whose leaf holds this process cannot host sandboxes.
    std::fs::write(base.join("cgroup.subtree_control"), &enable)
        .with_context(|| format!("enable {enable} in {}/cgroup.subtree_control", base.display()))?;
    let parent = base.join("snapsign-sandboxes");
    std::fs::create_dir_all(&parent).with_context(|| format!("create cgroup {}", parent.display()))?;
    std::fs::write(parent.join("cgroup.subtree_control"), &enable)
        .with_context(|| format!("enable {enable} in {}/cgroup.subtree_control", parent.display()))?;
    Ok(Some(Cgroups::V2 { parent, controllers: wanted }))
}

/// A delegated v2 group: usable when this user may write its
/// `cgroup.subtree_control`. A v2 group that holds processes cannot enable
/// controllers for children, so this process first moves itself into a
/// leaf `snapsign-host` below it (allowed within a delegated subtree).
fn detect_v2_delegated(mountinfo: &str, own: &str) -> Result<Option<Cgroups>> {
    let Some((base, group)) = own_v2_group(mountinfo, own) else { return Ok(None) };
    let control = base.join("cgroup.subtree_control");
    // SAFETY: access(2) on a NUL-terminated path.
    let path = std::ffi::CString::new(control.as_os_str().as_encoded_bytes()).context("cgroup path has a NUL")?;
    if unsafe { libc::access(path.as_ptr(), libc::W_OK) } != 0 {
        anyhow::bail!("{} is not writable by this user (not delegated)", control.display());
    }
    let procs = std::fs::read_to_string(base.join("cgroup.procs")).unwrap_or_default();
    if !procs.trim().is_empty() {
        let leaf = base.join("snapsign-host");
        if !leaf.exists() {
            std::fs::create_dir(&leaf).with_context(|| format!("create cgroup {}", leaf.display()))?;
        }
        // Every process of the group must leave it; this one is ours, others are not.
        for pid in procs.lines() {
            std::fs::write(leaf.join("cgroup.procs"), pid)
                .with_context(|| format!("move process {pid} into {}", leaf.display()))?;
        }
    }
    detect_v2(mountinfo, &format!("0::{}\n", group))
}

/// "what holds memory, pids, cpu and disk" for the log line at start.
pub(crate) fn mechanisms(confinement: &crate::Confinement, cgroups: &Cgroups) -> String {
    let asked = Limits { cpus: Some(1.0), memory_mb: Some(1), disk_mb: Some(1), ..Limits::default() };
    let e = Enforcement::new(confinement, cgroups, &asked, None);
    format!("memory: {}; pids: {}; cpu: {}; disk: {}", e.memory, e.pids, e.cpu, e.disk)
}

/// Which mechanism holds each limit of one sandbox: its create answer says
/// it, and a limit asked for that nothing holds here is named in `not_held`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Enforcement {
    /// `memory_mb`.
    pub memory: String,
    /// The process count.
    pub pids: String,
    /// `cpus`.
    pub cpu: String,
    /// `disk_mb`.
    pub disk: String,
    /// `timeout_secs`.
    pub timeout: String,
    /// Limits asked for that are not held (`memory`, `cpu`…): named, never silently dropped.
    pub not_held: Vec<String>,
    /// Rootless: how the sandbox's ids map to host ids (subordinate ids or
    /// one uid, [`crate::RootlessIds::describe`]); empty (and left out) otherwise.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub identities: String,
}

impl Enforcement {
    /// For a sandbox with `limits` and `timeout` on a host with `cgroups`.
    pub fn new(
        confinement: &crate::Confinement,
        cgroups: &Cgroups,
        limits: &Limits,
        timeout: Option<std::time::Duration>,
    ) -> Enforcement {
        let version = if matches!(cgroups, Cgroups::V2 { .. }) { "cgroup v2" } else { "cgroup v1" };
        let mut not_held = Vec::new();
        let unconfined = matches!(confinement, crate::Confinement::Unconfined);
        let mut held = |name: &str, asked: bool, how: String| -> String {
            if !asked {
                return "not asked".into();
            }
            // The timeout is this process's own timer: it holds in every mode.
            let unconfined = unconfined && name != "timeout";
            if unconfined || how.starts_with("not held") {
                not_held.push(name.to_owned());
                if unconfined {
                    return "not held: the sandbox is unconfined".into();
                }
            }
            how
        };
        let memory = held(
            "memory",
            limits.memory_mb.is_some(),
            if cgroups.has("memory") {
                format!("{version} memory controller (memory plus disk, an OOM kill past it)")
            } else {
                "RLIMIT_AS per process (allocations past it fail; no OOM kill; not a sum over processes)".into()
            },
        );
        let pids = held(
            "pids",
            true,
            if cgroups.has("pids") {
                format!("{version} pids controller ({} processes and threads)", limits.pids)
            } else {
                format!(
                    "RLIMIT_NPROC ({} processes and threads, counted per user namespace: this sandbox's)",
                    limits.pids
                )
            },
        );
        let cpu = held(
            "cpu",
            limits.cpus.is_some(),
            if cgroups.has("cpu") {
                format!("{version} cpu controller (CFS quota)")
            } else {
                "not held: no cpu controller here (an rlimit bounds CPU seconds, not a rate)".into()
            },
        );
        let disk = held("disk", limits.disk_mb.is_some(), "size-limited tmpfs (ENOSPC past it; RAM-backed)".into());
        let timeout = held(
            "timeout",
            timeout.is_some(),
            "the sandbox is deleted once the timeout passed without activity".into(),
        );
        Enforcement { memory, pids, cpu, disk, timeout, not_held, identities: String::new() }
    }
}

/// The groups of one sandbox (named after its uid slot, unique on the machine).
#[derive(Debug)]
pub(crate) struct SandboxGroups {
    /// Every group directory made, sandbox groups first.
    dirs: Vec<PathBuf>,
    /// Where per-process groups go (memory: the OOM kill count of one process).
    process_parent: Option<PathBuf>,
    /// Groups each process joins besides its own process group (v1 pids and cpu).
    shared: Vec<PathBuf>,
    v2: bool,
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value} to {}", path.display()))
}

fn fresh(dir: &Path) -> Result<()> {
    if dir.exists() {
        // Left by a process that died without deleting its sandbox.
        remove_tree(dir);
    }
    std::fs::create_dir(dir).with_context(|| format!("create cgroup {}", dir.display()))
}

/// Removes a group and its child groups (empty ones: the kernel refuses the rest).
pub(crate) fn remove_tree(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    // A group whose last process just died may stay busy for a moment.
    for _ in 0..50 {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => std::thread::sleep(std::time::Duration::from_millis(2)),
            _ => return,
        }
    }
    tracing::warn!("cgroup {} is still busy; left in place", dir.display());
}

impl SandboxGroups {
    /// Makes the groups of sandbox slot `name` with `limits` applied.
    pub(crate) fn create(cgroups: &Cgroups, name: &str, limits: &Limits) -> Result<SandboxGroups> {
        let mut groups = SandboxGroups { dirs: Vec::new(), process_parent: None, shared: Vec::new(), v2: false };
        for (asked, controller, fallback) in [
            (limits.memory_bytes().is_some(), "memory", "RLIMIT_AS per process, no OOM kill"),
            (limits.cpus.is_some(), "cpu", "no CPU limit"),
            (true, "pids", "RLIMIT_NPROC only"),
        ] {
            // Without any cgroup the start said so once (Sandboxes::describe); a missing one is worth a warning.
            if asked && !cgroups.has(controller) && *cgroups != Cgroups::None {
                tracing::warn!(
                    sandbox_group = name,
                    "no {controller} controller here ({}): {fallback}",
                    cgroups.describe()
                );
            }
        }
        match cgroups {
            // Only the hierarchies with a limit to enforce: each one a process joins costs a migration.
            Cgroups::V1 { memory, pids, cpu } => {
                let name = format!("snapsign-sandbox-{name}");
                let name = name.as_str();
                let memory = memory.as_ref().filter(|_| limits.memory_bytes().is_some());
                let cpu = cpu.as_ref().filter(|_| limits.cpus.is_some());
                if let Some(parent) = memory {
                    let dir = parent.join(name);
                    fresh(&dir)?;
                    groups.dirs.push(dir.clone());
                    let bytes = limits.memory_bytes().unwrap_or(u64::MAX);
                    write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
                    groups.process_parent = Some(dir);
                }
                if let Some(parent) = pids {
                    let dir = parent.join(name);
                    fresh(&dir)?;
                    groups.dirs.push(dir.clone());
                    write(&dir.join("pids.max"), &limits.pids.to_string())?;
                    groups.shared.push(dir);
                }
                if let Some(parent) = cpu {
                    let dir = parent.join(name);
                    fresh(&dir)?;
                    groups.dirs.push(dir.clone());
                    if let Some(cpus) = limits.cpus {
                        write(&dir.join("cpu.cfs_period_us"), "100000")?;
                        write(&dir.join("cpu.cfs_quota_us"), &cpu_quota(cpus).to_string())?;
                    }
                    groups.shared.push(dir);
                }
            }
            Cgroups::V2 { parent, controllers } => {
                let dir = parent.join(name);
                fresh(&dir)?;
                groups.dirs.push(dir.clone());
                groups.v2 = true;
                if cgroups.has("memory")
                    && let Some(bytes) = limits.memory_bytes()
                {
                    write(&dir.join("memory.max"), &bytes.to_string())?;
                    // No swapping around the limit: over it is an OOM kill, as in a VM without swap.
                    let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                }
                if cgroups.has("pids") {
                    write(&dir.join("pids.max"), &limits.pids.to_string())?;
                }
                if cgroups.has("cpu")
                    && let Some(cpus) = limits.cpus
                {
                    write(&dir.join("cpu.max"), &format!("{} 100000", cpu_quota(cpus)))?;
                }
                let enable = controllers.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(" ");
                write(&dir.join("cgroup.subtree_control"), &enable)?;
                groups.process_parent = Some(dir);
            }
            Cgroups::None => {}
        }
        Ok(groups)
    }

    /// Makes the group of process `pid` and returns the `cgroup.procs` files
    /// its launcher writes itself into before starting it.
    pub(crate) fn for_process(&self, pid: i64) -> Result<(Option<PathBuf>, Vec<PathBuf>)> {
        let mut procs: Vec<PathBuf> = self.shared.iter().map(|d| d.join("cgroup.procs")).collect();
        let own = match &self.process_parent {
            Some(parent) => {
                let dir = parent.join(format!("p{pid}"));
                std::fs::create_dir(&dir).with_context(|| format!("create cgroup {}", dir.display()))?;
                procs.push(dir.join("cgroup.procs"));
                Some(dir)
            }
            None => None,
        };
        Ok((own, procs))
    }

    /// OOM kills recorded in a process's own group (see [`SandboxGroups::for_process`]).
    pub(crate) fn oom_kills(&self, own: &Path) -> u64 {
        let (file, key) = if self.v2 { ("memory.events", "oom_kill") } else { ("memory.oom_control", "oom_kill") };
        std::fs::read_to_string(own.join(file))
            .ok()
            .and_then(|text| text.lines().find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok())))
            .unwrap_or(0)
    }

    /// Removes every group (after every process ended).
    pub(crate) fn remove(&self) {
        for dir in &self.dirs {
            remove_tree(dir);
        }
    }
}

fn cpu_quota(cpus: f64) -> u64 {
    // The kernel's minimum quota is 1 ms.
    ((cpus * 100_000.0).round() as u64).max(1000)
}

/// SIGKILL to every process in the cgroup `dir` (v2: `cgroup.kill`; v1: each
/// pid of `cgroup.procs`), repeated while members remain (one may fork as it
/// dies). Returns how many were signalled; 0 when the group is gone.
pub(crate) fn kill_members(dir: &Path) -> usize {
    let kill_file = dir.join("cgroup.kill");
    let mut killed = 0;
    for _ in 0..8 {
        let members: Vec<i32> = std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if members.is_empty() {
            break;
        }
        if kill_file.exists() && std::fs::write(&kill_file, "1").is_ok() {
            killed += members.len();
        } else {
            for pid in &members {
                // SAFETY: kill(2) of a member of a cgroup made for this process.
                unsafe { libc::kill(*pid, libc::SIGKILL) };
            }
            killed += members.len();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_v1_hierarchies_and_this_process_groups() {
        let mountinfo = "30 24 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n\
                         31 24 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
                         32 24 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct";
        let own = "4:memory:/process_api/abc\n1:cpu,cpuacct:/\n0::/";
        let points: Vec<_> = mountinfo.lines().filter_map(mount_fields).collect();
        assert_eq!(points[0], ("/sys/fs/cgroup/memory", "cgroup", "rw,memory"));
        assert_eq!(points[1].1, "cgroup2");
        assert_eq!(own_group(own, "memory"), Some("/process_api/abc"));
        assert_eq!(own_group(own, "cpu"), Some("/"));
        assert_eq!(own_group(own, "pids"), None);
        assert_eq!(own_group(own, ""), Some("/"));
    }

    #[test]
    fn limits_come_from_the_request_and_nonsense_is_refused() {
        let asked = Resources { cpus: Some(2.0), memory_mb: Some(4096), disk_mb: Some(30720) };
        let limits = Limits::from_request(&asked).unwrap();
        assert_eq!((limits.cpus, limits.memory_mb, limits.disk_mb), (Some(2.0), Some(4096), Some(30720)));
        assert_eq!(limits.pids, DEFAULT_PIDS);
        assert_eq!(Limits::from_request(&Resources::default()).unwrap(), Limits::default());
        for (bad, field) in [
            (Resources { cpus: Some(0.0), ..Resources::default() }, "cpus"),
            (Resources { cpus: Some(f64::NAN), ..Resources::default() }, "cpus"),
            (Resources { memory_mb: Some(-1), ..Resources::default() }, "memory_mb"),
            (Resources { disk_mb: Some(0), ..Resources::default() }, "disk_mb"),
        ] {
            let err = Limits::from_request(&bad).unwrap_err().to_string();
            assert!(err.contains(field), "{err}");
        }
    }

    #[test]
    fn a_delegated_v2_group_holding_processes_hands_them_to_a_leaf_then_enables_controllers() {
        // A stand-in for a delegated group (plain files behave as the kernel's do here).
        let fs = tempfile::tempdir().unwrap();
        let group = fs.path().join("user.slice/user-1000.slice/app.scope");
        std::fs::create_dir_all(&group).unwrap();
        std::fs::write(group.join("cgroup.controllers"), "cpuset cpu io memory pids\n").unwrap();
        std::fs::write(group.join("cgroup.subtree_control"), "").unwrap();
        std::fs::write(group.join("cgroup.procs"), "4242\n").unwrap();
        let mountinfo = format!("35 24 0:30 / {} rw - cgroup2 cgroup2 rw", fs.path().display());
        let own = "0::/user.slice/user-1000.slice/app.scope\n";
        let found = detect_v2_delegated(&mountinfo, own).unwrap().unwrap();
        let parent = group.join("snapsign-sandboxes");
        assert_eq!(
            found,
            Cgroups::V2 { parent: parent.clone(), controllers: vec!["memory".into(), "pids".into(), "cpu".into()] }
        );
        assert_eq!(std::fs::read_to_string(group.join("snapsign-host/cgroup.procs")).unwrap(), "4242");
        assert_eq!(std::fs::read_to_string(group.join("cgroup.subtree_control")).unwrap(), "+memory +pids +cpu");
        assert_eq!(std::fs::read_to_string(parent.join("cgroup.subtree_control")).unwrap(), "+memory +pids +cpu");
        // No cgroup2 mounted: no delegated group.
        assert_eq!(detect_v2_delegated("", own).unwrap(), None);
    }

    #[test]
    fn each_limit_names_what_holds_it_and_what_none_holds_is_listed() {
        use crate::Confinement;
        let asked = Limits { cpus: Some(1.0), memory_mb: Some(64), disk_mb: Some(8), pids: 40 };
        let timeout = Some(std::time::Duration::from_secs(5));
        let rlimits = Enforcement::new(&Confinement::Rootless, &Cgroups::None, &asked, timeout);
        assert!(rlimits.memory.starts_with("RLIMIT_AS"), "{rlimits:?}");
        assert!(rlimits.pids.starts_with("RLIMIT_NPROC (40 "), "{rlimits:?}");
        assert!(rlimits.cpu.starts_with("not held"), "{rlimits:?}");
        assert!(rlimits.disk.contains("tmpfs") && rlimits.timeout.contains("deleted"), "{rlimits:?}");
        assert_eq!(rlimits.not_held, ["cpu"]);
        let v2 = Cgroups::V2 { parent: "/x".into(), controllers: vec!["memory".into(), "pids".into(), "cpu".into()] };
        let cgroups = Enforcement::new(&Confinement::Rootless, &v2, &asked, None);
        assert!(
            cgroups.memory.starts_with("cgroup v2 memory") && cgroups.cpu.starts_with("cgroup v2 cpu"),
            "{cgroups:?}"
        );
        assert_eq!((cgroups.not_held.len(), cgroups.timeout.as_str()), (0, "not asked"));
        let bare = Enforcement::new(&Confinement::Rootless, &Cgroups::None, &Limits::default(), None);
        assert_eq!((bare.memory.as_str(), bare.cpu.as_str(), bare.not_held.len()), ("not asked", "not asked", 0));
        let unconfined = Enforcement::new(&Confinement::Unconfined, &Cgroups::None, &asked, timeout);
        assert_eq!(unconfined.not_held, ["memory", "pids", "cpu", "disk"]);
        assert!(unconfined.timeout.contains("deleted"), "{unconfined:?}");
    }

    #[test]
    fn memory_covers_the_ram_backed_disk_and_quotas_have_a_floor() {
        let limits = Limits { memory_mb: Some(64), disk_mb: Some(16), ..Limits::default() };
        assert_eq!(limits.memory_bytes(), Some(80 << 20));
        assert_eq!(Limits::default().memory_bytes(), None);
        assert_eq!(cpu_quota(2.0), 200_000);
        assert_eq!(cpu_quota(0.001), 1000);
    }
}
