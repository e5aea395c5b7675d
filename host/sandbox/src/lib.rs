//! Local sandboxes for snapsign's dev stack and its `local` sandbox-exec
//! backend: a sandbox is a directory on this host (`root_dir/{id}/`); its
//! processes run under bubblewrap, and a platform emulator serves them as
//! the sandbox proxy API of PROTOCOL.md §4 (processes, output replay, files).
//!
//! Inside a sandbox: `/usr` and `/etc` read-only from the host (`/bin`,
//! `/lib`… as the host lays them out), a fresh `/proc` and `/dev`, the
//! sandbox's own writable `/var`, `/tmp`, `/root` and `/home` ([`AREAS`]),
//! the builder binary read-only at [`BUILDER_PATH`], and nothing else
//! writable. Processes get their own mount, pid, ipc, uts, cgroup and user
//! namespaces, cannot make more user namespaces, see none of the host's
//! environment, and run as uid 0 (`user: "root"`) or [`SANDBOX_UID`].
//!
//! On the host, when this process is root, bwrap and everything in the
//! sandbox run as the unused uid [`HOST_UID`], so that even a sandbox's root
//! owns nothing of the host. The file methods of [`Sandbox`] never follow
//! a symlink out of the sandbox.
//!
//! Network: processes share the host's network namespace (`--share-net`),
//! because the dev stack's builder must reach the object store on the host's
//! 127.0.0.1. bubblewrap cannot limit a shared namespace to loopback; on the
//! machines this runs on, loopback is the only network there is.
//!
//! Not confined: CPU, memory and disk use (no limits are applied), and
//! [`Confinement::Unconfined`], which the operator must ask for.

mod bwrap;
mod confinement;
mod files;
mod process;
mod sandbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result, bail};

pub use bwrap::{HOST_UID, SANDBOX_UID};
pub use confinement::Confinement;
pub use files::{AREAS, BUILDER_PATH};
pub use process::{DEFAULT_PATH, MAX_LINE_BYTES, MAX_OUTPUT_BYTES, OutputEvent, ProcessInfo, ProcessSpec};
pub use sandbox::Sandbox;

use bwrap::Identity;
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

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Sandboxes {
    /// Prepares `root_dir` and, with bubblewrap, checks by running a process
    /// that it works here (and as which host user, see [`HOST_UID`]).
    pub fn new(config: SandboxesConfig) -> Result<Self> {
        let root_dir = config.root_dir;
        std::fs::create_dir_all(&root_dir).with_context(|| format!("create sandboxes dir {}", root_dir.display()))?;
        if let Some(builder) = config.builder_binary.as_ref().filter(|b| !b.is_file()) {
            bail!("builder binary {} is not a file; build it or fix the path", builder.display());
        }
        // Left by a run that stopped in the middle of deleting or probing.
        for entry in std::fs::read_dir(&root_dir).with_context(|| format!("list {}", root_dir.display()))? {
            let path = entry?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(".trash-")) {
                std::fs::remove_dir_all(&path).with_context(|| format!("remove {}", path.display()))?;
            }
        }
        let layout = bwrap::host_layout();
        let identity = match &config.confinement {
            Confinement::Bwrap { path } => Identity::choose(path, &layout, &root_dir.join(".probe"))?,
            Confinement::Unconfined => Identity::Caller,
        };
        tracing::debug!(?identity, root_dir = %root_dir.display(), "local sandboxes ready");
        let host = Host { confinement: config.confinement, identity, layout, builder: config.builder_binary };
        Ok(Sandboxes { inner: Arc::new(Inner { root_dir, host: Arc::new(host), live: Mutex::new(HashMap::new()) }) })
    }

    fn live(&self) -> MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.inner.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How processes are confined.
    pub fn confinement(&self) -> &Confinement {
        &self.inner.host.confinement
    }

    /// Creates sandbox `id` (`[a-z0-9-]{1,64}`).
    pub fn create(&self, id: &str) -> Result<Arc<Sandbox>> {
        if !valid_id(id) {
            bail!("sandbox id '{id}' is not 1 to 64 of a-z, 0-9 and '-'; pick another id");
        }
        let mut live = self.live();
        if live.contains_key(id) {
            bail!("sandbox {id} already exists; delete it first or pick another id");
        }
        let sandbox = Arc::new(Sandbox::create(id, self.inner.root_dir.join(id), self.inner.host.clone())?);
        live.insert(id.to_owned(), sandbox.clone());
        Ok(sandbox)
    }

    /// A live sandbox.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.live().get(id).cloned()
    }

    /// Kills every process of sandbox `id` (bwrap and, with it, everything
    /// in the sandbox) and removes its directory; false when unknown.
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
        sandbox.kill_all(processes).await;
        tokio::fs::remove_dir_all(&trash)
            .await
            .with_context(|| format!("delete sandbox {id}: remove {}", trash.display()))?;
        Ok(true)
    }
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
    fn handles_are_shareable_across_tasks() {
        fn is<T: Send + Sync + 'static>() {}
        is::<Sandboxes>();
        is::<Sandbox>();
        is::<Arc<Sandbox>>();
    }
}
