//! Local sandboxes for snapsign's dev stack and its `local` sandbox-exec
//! backend: a sandbox is a directory on this host; its processes run under
//! bubblewrap with only the sandbox's own directories writable (`/var`,
//! `/tmp`, `/root`, `/home`), `/usr` and `/etc` read-only, their own pid,
//! ipc, uts and user namespaces, and every output line kept for replay.
//!
//! Network: processes share the host's network namespace (`--share-net`),
//! because the dev stack's builder must reach the store on the host's
//! 127.0.0.1. bubblewrap cannot limit a shared namespace to loopback; on the
//! machines this runs on, loopback is the only network there is.

mod confinement;
mod process;
mod sandbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, bail};

pub use confinement::Confinement;
pub use process::{MAX_OUTPUT_BYTES, OutputEvent, ProcessInfo, ProcessSpec};
pub use sandbox::{BUILDER_PATH, DEFAULT_PATH, SANDBOX_UID, Sandbox, WRITABLE_AREAS};

/// Settings shared by all sandboxes.
#[derive(Debug, Clone)]
pub struct SandboxesConfig {
    /// Every sandbox lives in `root_dir/{id}/`.
    pub root_dir: PathBuf,
    /// How processes are confined.
    pub confinement: Confinement,
    /// Installed read-only at [`BUILDER_PATH`] in every sandbox.
    pub builder_binary: Option<PathBuf>,
}

/// The sandboxes of this host.
pub struct Sandboxes {
    config: SandboxesConfig,
    live: Mutex<HashMap<String, Arc<Sandbox>>>,
}

fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

impl Sandboxes {
    /// Prepares `root_dir`.
    pub fn new(config: SandboxesConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.root_dir)
            .with_context(|| format!("create sandboxes dir {}", config.root_dir.display()))?;
        if let Some(builder) = config.builder_binary.as_ref().filter(|b| !b.is_file()) {
            bail!("builder binary {} does not exist", builder.display());
        }
        Ok(Sandboxes { config, live: Mutex::new(HashMap::new()) })
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Sandbox>>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How processes are confined.
    pub fn confinement(&self) -> &Confinement {
        &self.config.confinement
    }

    /// Creates sandbox `id` (`[a-z0-9-]{1,64}`).
    pub fn create(&self, id: &str) -> Result<Arc<Sandbox>> {
        if !valid_id(id) {
            bail!("sandbox id '{id}' is not 1..=64 of a-z, 0-9 and '-'");
        }
        let mut live = self.live();
        if live.contains_key(id) {
            bail!("sandbox {id} already exists");
        }
        let sandbox = Arc::new(Sandbox::create(
            id,
            self.config.root_dir.join(id),
            self.config.confinement.clone(),
            self.config.builder_binary.clone(),
        )?);
        live.insert(id.to_owned(), sandbox.clone());
        Ok(sandbox)
    }

    /// A live sandbox.
    pub fn get(&self, id: &str) -> Option<Arc<Sandbox>> {
        self.live().get(id).cloned()
    }

    /// Kills its processes and removes its directory; false when unknown.
    pub async fn delete(&self, id: &str) -> Result<bool> {
        let Some(sandbox) = self.live().remove(id) else { return Ok(false) };
        sandbox.kill_all().await;
        let dir = sandbox.dir().to_owned();
        tokio::fs::remove_dir_all(&dir).await.with_context(|| format!("remove sandbox {id} at {}", dir.display()))?;
        Ok(true)
    }
}
