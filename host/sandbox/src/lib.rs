//! Local sandboxes for snapsign's dev stack and its `local` sandbox-exec
//! backend: a sandbox is a directory on this host (`root_dir/{id}/`); its
//! processes are confined with Linux namespaces made by this process (no
//! helper binary, nothing to install; see `namespaces/mod.rs`), and a platform
//! emulator serves them as the sandbox proxy API of wit/protocol.md §4
//! (processes, output replay, files).
//!
//! Inside a sandbox: `/usr` and `/etc` read-only from the host (`/bin`,
//! `/lib`… as the host lays them out), a fresh `/proc` and a minimal `/dev`,
//! the sandbox's own writable `/var`, `/tmp`, `/root` and `/home` ([`AREAS`]),
//! the builder binary read-only at [`BUILDER_PATH`], and nothing else
//! writable; no process can change a mount. Processes share the sandbox's
//! pid, mount, network, ipc, uts and user namespaces, cannot make more user
//! namespaces, see none of the host's environment nor any of its
//! descriptors (only 0, 1 and 2), and run as uid 0 (`user: "root"`) or
//! [`SANDBOX_UID`].
//!
//! Identities: each sandbox has a range of host uids of its own
//! ([`UIDS_PER_SANDBOX`] from [`FIRST_HOST_UID`] up): sandbox root is one
//! host uid, the sandbox user another, and no two sandboxes share one, so a
//! sandbox's root owns nothing of the host nor of another sandbox. The file
//! methods of [`Sandbox`] never follow a symlink out of the sandbox.
//!
//! Limits ([`Limits`], from the create request's `resources`): memory,
//! processes and CPU by cgroups (v1 or v2, whichever this kernel offers this
//! process), with rlimits where a controller is missing; disk by a
//! size-limited tmpfs. A real OOM kill is reported as `oom_killed`. A
//! sandbox with a timeout is deleted once it passed without activity.
//!
//! Network ([`Network`], from the create request's `network`): a namespace
//! of its own with only `lo`, and the allowed host loopback ports forwarded
//! in (see `network.rs`).
//!
//! As an ordinary user ([`Confinement::Rootless`], chosen when unprivileged
//! user namespaces work here) the same namespaces, root layout, descriptor
//! hygiene and network are made through an outer user namespace (this
//! user's uid as 0) that owns the mount and pid namespaces. Sandbox root is
//! this user's host uid; where `newuidmap` and a subordinate range exist,
//! uids 1..65535 (the sandbox user among them) are the user's subordinate
//! ids, else the sandbox user is the same one uid ([`RootlessIds`]); each
//! sandbox's own mount tree keeps sandboxes apart; limits come from a delegated cgroup
//! v2 subtree, else rlimits ([`Sandbox::enforcement`] says which). See
//! `docs/sandbox-modes.md` for the modes and what each gives up.
//!
//! [`Confinement::Unconfined`], which the operator must ask for, confines
//! and limits nothing.

mod confinement;
mod files;
mod identity;
mod limits;
mod namespaces;
mod network;
mod process;
mod sandbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

pub use confinement::{Confinement, UsernsProbe, UsernsSettings, probe_user_namespaces, refusal};
pub use files::{AREAS, BUILDER_PATH};
pub use identity::{FIRST_HOST_UID, RootlessIds, SANDBOX_UID, SUBORDINATE_IDS, SubordinateIds, UIDS_PER_SANDBOX};
pub use limits::{Cgroups, DEFAULT_PIDS, Enforcement, Limits, Resources};
pub use namespaces::raise_loopback;
pub use network::{Network, NetworkPolicy, loopback_port};
pub use process::{DEFAULT_PATH, MAX_LINE_BYTES, MAX_OUTPUT_BYTES, OutputEvent, ProcessInfo, ProcessSpec};
pub use sandbox::{CreateRequest, Sandbox, SandboxSpec};

use sandbox::Host;

/// Settings shared by all sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxesConfig {
    /// Every sandbox lives in `root_dir/{id}/`; created when missing.
    pub root_dir: PathBuf,
    /// How processes are confined.
    pub confinement: Confinement,
    /// Installed read-only at [`BUILDER_PATH`] in every sandbox.
    pub builder_binary: Option<PathBuf>,
}

/// The sandboxes of this host. Cheap to clone (clones share the sandboxes);
/// `Send + Sync`.
#[derive(Clone)]
pub struct Sandboxes {
    inner: Arc<Inner>,
}

struct Inner {
    root_dir: PathBuf,
    host: Arc<Host>,
    /// Host loopback ports every sandbox reaches ([`Sandboxes::grant_ports`]).
    granted: Mutex<Vec<u16>>,
    live: Mutex<HashMap<String, Arc<Sandbox>>>,
}

impl std::fmt::Debug for Sandboxes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<String> = self.live().keys().cloned().collect();
        ids.sort();
        f.debug_struct("Sandboxes")
            .field("root_dir", &self.inner.root_dir)
            .field("host", &self.inner.host)
            .field("sandboxes", &ids)
            .finish()
    }
}

fn describe(host: &Host) -> String {
    let ids = host.ids.as_ref().map(|ids| format!("; identities: {}", ids.describe())).unwrap_or_default();
    format!(
        "{}{ids}; limits held by {}",
        host.confinement.describe(),
        limits::mechanisms(&host.confinement, &host.cgroups)
    )
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Sandboxes {
    /// Prepares `root_dir`, and with [`Confinement::Namespaces`] checks
    /// this process is root and finds the cgroup controllers it may use.
    /// Rootless, uses this user's subordinate ids where it has them
    /// ([`RootlessIds`]).
    pub fn new(config: SandboxesConfig) -> Result<Self> {
        Sandboxes::new_with(config, SubordinateIds::WhereAvailable)
    }

    /// [`Sandboxes::new`], saying whether rootless sandboxes may use
    /// subordinate ids ([`SubordinateIds::Never`]: one uid, as on a machine
    /// without them). Root ignores it: each sandbox has a range of its own.
    pub fn new_with(config: SandboxesConfig, subordinate: SubordinateIds) -> Result<Self> {
        let root_dir = config.root_dir;
        std::fs::create_dir_all(&root_dir).with_context(|| format!("create sandboxes dir {}", root_dir.display()))?;
        if let Some(builder) = config.builder_binary.as_ref().filter(|b| !b.is_file()) {
            bail!("builder binary {} is not a file; build it or fix the path", builder.display());
        }
        let (cgroups, uid_locks, rootless) = match config.confinement {
            Confinement::Namespaces => {
                namespaces::check_privileges()?;
                (Cgroups::detect(), identity::lock_dir()?, None)
            }
            // SAFETY: geteuid and getegid cannot fail.
            Confinement::Rootless => {
                (Cgroups::detect_delegated(), PathBuf::new(), Some(unsafe { (libc::geteuid(), libc::getegid()) }))
            }
            Confinement::Unconfined => (Cgroups::None, PathBuf::new(), None),
        };
        let (ids, subids, keeper) = match rootless {
            Some(owner) => {
                let (ids, subids, keeper) = rootless_ids(owner, subordinate)?;
                (Some(ids), subids, Some(keeper))
            }
            None => (None, None, None),
        };
        // With two blocks of subordinate ids or more, each sandbox locks one of its own (in a
        // directory held open). Where the lock directory is refused, they share one, said.
        let (mut ids, mut subids, mut uid_locks, mut locks_dir) = (ids, subids, uid_locks, None);
        if let (Some(found), Some((uid, _))) = (subids.as_mut(), rootless)
            && found.ranges > 1
        {
            match identity::user_lock_dir(uid) {
                Ok((held, through)) => (uid_locks, locks_dir) = (through, Some(held)),
                Err(e) => {
                    tracing::warn!("sandboxes share one block of subordinate ids: {e:#}");
                    found.ranges = 1;
                    ids = Some(found.mode());
                }
            }
        }
        let subids = subids;
        let host = Host {
            confinement: config.confinement,
            layout: namespaces::host_layout(),
            builder: config.builder_binary,
            cgroups,
            uid_locks,
            rootless,
            ids,
            subids,
            keeper,
            _locks_dir: locks_dir,
        };
        // Chosen once, said once: the identities and which mechanism holds each limit of every sandbox made here.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| tracing::info!("local sandboxes: {}", describe(&host)));
        tracing::debug!(confinement = ?host.confinement, ids = ?host.ids, limits = %host.cgroups.describe(), root_dir = %root_dir.display(), "local sandboxes ready");
        // Left by a run that stopped in the middle of deleting.
        for entry in std::fs::read_dir(&root_dir).with_context(|| format!("list {}", root_dir.display()))? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".trash-")) {
                files::unmount_disk(&path.join("fs"));
                host.remove_dir(&path)?;
            }
        }
        Ok(Sandboxes {
            inner: Arc::new(Inner {
                root_dir,
                host: Arc::new(host),
                granted: Mutex::new(Vec::new()),
                live: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Host loopback ports forwarded into every sandbox made from now on
    /// (the dev stack's store and sandbox proxy), besides those its policy adds.
    pub fn grant_ports(&self, ports: &[u16]) {
        *self.inner.granted.lock().unwrap_or_else(|p| p.into_inner()) = ports.to_vec();
    }

    /// The [`SandboxSpec`] for a create request: its limits, its network
    /// (with the granted ports) and its timeout; refuses what it cannot honour.
    pub fn spec_for(&self, request: &CreateRequest) -> Result<SandboxSpec> {
        let limits = Limits::from_request(&request.resources.clone().unwrap_or_default())?;
        let granted = self.inner.granted.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let network = Network::from_policy(&request.network.clone().unwrap_or_default(), &granted)?;
        let timeout = match request.timeout_secs {
            None => None,
            Some(secs) if secs > 0 => Some(std::time::Duration::from_secs(secs as u64)),
            Some(secs) => bail!("timeout_secs is {secs}; send a positive number of seconds, or none for no timeout"),
        };
        Ok(SandboxSpec { limits, network, timeout })
    }

    /// The mode, its identities and what holds each limit, in one line
    /// (logged once at start; the demo prints it).
    pub fn describe(&self) -> String {
        describe(&self.inner.host)
    }

    /// Rootless: how sandbox ids map to host ids here (`None` as root or unconfined).
    pub fn rootless_ids(&self) -> Option<&RootlessIds> {
        self.inner.host.ids.as_ref()
    }

    /// The cgroup controllers that enforce limits here ([`Cgroups::None`]: rlimits only).
    pub fn cgroups(&self) -> &Cgroups {
        &self.inner.host.cgroups
    }

    fn live(&self) -> MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How processes are confined.
    pub fn confinement(&self) -> &Confinement {
        &self.inner.host.confinement
    }

    /// Creates sandbox `id` (`[a-z0-9-]{1,64}`) with default limits, no
    /// forwarded port and no timeout.
    pub fn create(&self, id: &str) -> Result<Arc<Sandbox>> {
        self.create_with(id, SandboxSpec::default())
    }

    /// Creates sandbox `id` with `spec`. Call it inside a Tokio runtime, from
    /// a thread that outlives the sandbox (a runtime worker, not a
    /// `spawn_blocking` thread): its processes die with that thread.
    pub fn create_with(&self, id: &str, spec: SandboxSpec) -> Result<Arc<Sandbox>> {
        if !valid_id(id) {
            bail!("sandbox id '{id}' is not 1 to 64 of a-z, 0-9 and '-'; pick another id");
        }
        let mut live = self.live();
        if live.contains_key(id) {
            bail!("sandbox {id} already exists; delete it first or pick another id");
        }
        let sandbox = Arc::new(Sandbox::create(id, self.inner.root_dir.join(id), self.inner.host.clone(), spec)?);
        live.insert(id.to_owned(), sandbox.clone());
        drop(live);
        if sandbox.deadline().is_some() {
            self.expire_when_idle(&sandbox)?;
        }
        Ok(sandbox)
    }

    /// Deletes `sandbox` once its timeout passed without [`Sandbox::renew`].
    fn expire_when_idle(&self, sandbox: &Arc<Sandbox>) -> Result<()> {
        let runtime = tokio::runtime::Handle::try_current()
            .with_context(|| format!("sandbox {}: a timeout needs a Tokio runtime", sandbox.id()))?;
        let (weak, inner) = (Arc::downgrade(sandbox), Arc::downgrade(&self.inner));
        runtime.spawn(async move {
            loop {
                let Some(deadline) = weak.upgrade().and_then(|s| s.deadline()) else { return };
                tokio::time::sleep_until(deadline.into()).await;
                let (Some(sandbox), Some(inner)) = (weak.upgrade(), inner.upgrade()) else { return };
                if sandbox.deadline().is_some_and(|d| d > std::time::Instant::now()) {
                    continue;
                }
                let sandboxes = Sandboxes { inner };
                // Only if `id` is still this sandbox (not deleted and made again).
                if !sandboxes.get(sandbox.id()).is_some_and(|live| Arc::ptr_eq(&live, &sandbox)) {
                    return;
                }
                tracing::info!(sandbox = %sandbox.id(), timeout = ?sandbox.spec().timeout, "sandbox timed out without activity; deleting it");
                if let Err(e) = sandboxes.delete(sandbox.id()).await {
                    tracing::warn!(sandbox = %sandbox.id(), "deleting the timed-out sandbox failed: {e:#}");
                }
                return;
            }
        });
        Ok(())
    }

    /// A live sandbox.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.live().get(id).cloned()
    }

    /// Kills every process of sandbox `id`, releases what it held (its
    /// namespaces, groups, forwarded ports, disk and uid range) and removes
    /// its directory; false when unknown.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        let (sandbox, processes, trash) = {
            let mut live = self.live();
            let Some(sandbox) = live.remove(id) else { return Ok(false) };
            let processes = sandbox.close();
            // Out of the way at once, so that a new sandbox with this id gets a fresh directory.
            let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
            let trash = self.inner.root_dir.join(format!(".trash-{id}-{}", stamp.as_nanos()));
            std::fs::rename(sandbox.dir(), &trash)
                .with_context(|| format!("delete sandbox {id}: move {} aside", sandbox.dir().display()))?;
            (sandbox, processes, trash)
        };
        sandbox.kill_all(processes, &trash).await;
        let host = self.inner.host.clone();
        tokio::task::spawn_blocking(move || host.remove_dir(&trash))
            .await?
            .with_context(|| format!("delete sandbox {id}"))?;
        Ok(true)
    }
}

/// Rootless: subordinate ids where `subordinate` allows them and this user
/// has them (else one uid, saying why), and the namespace mapped as every
/// sandbox's outer one that the host's file operations use.
fn rootless_ids(
    owner: (u32, u32),
    subordinate: SubordinateIds,
) -> Result<(RootlessIds, Option<identity::SubIds>, std::os::fd::OwnedFd)> {
    let found = match subordinate {
        SubordinateIds::Never => Err("subordinate ids not used, as configured".to_owned()),
        SubordinateIds::WhereAvailable => identity::find_subordinate_ids(owner.0, owner.1),
    };
    let why = match found {
        Ok(subids) => match namespaces::keeper_namespace(owner, Some(&subids)) {
            Ok(keeper) => return Ok((subids.mode(), Some(subids), keeper)),
            // Refused by newuidmap (a range it does not accept, a tool not set-uid): say so, and use one uid.
            Err(e) => format!("{e:#}"),
        },
        Err(why) => why,
    };
    let keeper = namespaces::keeper_namespace(owner, None)?;
    Ok((RootlessIds::OneUid { why }, None, keeper))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_short_lowercase_words() {
        for good in ["a", "sbx-1", "0", &"x".repeat(64)] {
            assert!(valid_id(good), "{good}");
        }
        for bad in ["", "Sbx", "sbx_1", "a/b", "..", ".trash-x", &"x".repeat(65), "é"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn a_create_request_becomes_limits_a_network_with_the_granted_ports_and_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let boxes = Sandboxes::new(SandboxesConfig {
            root_dir: dir.path().to_owned(),
            confinement: Confinement::Unconfined,
            builder_binary: None,
        })
        .unwrap();
        boxes.grant_ports(&[9000, 9001]);
        let request: CreateRequest = serde_json::from_str(
            r#"{"resources":{"cpus":2.0,"memory_mb":4096,"disk_mb":30720},"timeout_secs":300,
                "network":{"allow_internet_access":false,"allow_out":["localhost:7000"],"deny_out":["127.0.0.1:9001"]}}"#,
        )
        .unwrap();
        let spec = boxes.spec_for(&request).unwrap();
        assert_eq!(
            (spec.limits.cpus, spec.limits.memory_mb, spec.limits.disk_mb),
            (Some(2.0), Some(4096), Some(30720))
        );
        assert_eq!(spec.network, Network::Private { ports: vec![7000, 9000] });
        assert_eq!(spec.timeout, Some(std::time::Duration::from_secs(300)));
        let bare = boxes.spec_for(&CreateRequest::default()).unwrap();
        assert_eq!(
            (bare.limits, bare.network, bare.timeout),
            (Limits::default(), Network::Private { ports: vec![9000, 9001] }, None)
        );
        let bad = CreateRequest { timeout_secs: Some(0), ..CreateRequest::default() };
        assert!(boxes.spec_for(&bad).unwrap_err().to_string().contains("timeout_secs is 0"));
    }

    #[test]
    fn handles_are_shareable_across_tasks() {
        fn is<T: Send + Sync + 'static>() {}
        is::<Sandboxes>();
        is::<Sandbox>();
        is::<Arc<Sandbox>>();
    }
}
