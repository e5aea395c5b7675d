//! Cancelling a build from outside its guest (Ctrl-C; wit/protocol.md
//! §5.10), shared by the capability (`sandbox-exec` calls answer
//! `cancelled`) and the outbound HTTP policy (requests in flight stop).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;

/// Cancels a guest's sandbox work from outside (Ctrl-C; wit/protocol.md
/// §5.10): the pending `sandbox-exec` call returns `cancelled`, and later
/// ones do at once, except `delete`, so the guest runs its cleanup. Clones
/// share one state, which also tells which sandboxes the guest still holds,
/// for a user who will not wait for the cleanup.
#[derive(Clone, Default)]
pub struct Cancel {
    token: CancellationToken,
    held: Arc<Mutex<BTreeSet<String>>>,
}

impl Cancel {
    /// A handle that has not cancelled anything yet.
    pub fn new() -> Self {
        Cancel::default()
    }

    /// Cancels: every holder of a clone sees it.
    pub fn cancel(&self) {
        self.token.cancel();
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Resolves once [`Cancel::cancel`] was called.
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// Sandboxes the guest created and has not deleted, sorted.
    pub fn held_sandboxes(&self) -> Vec<String> {
        self.held.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    pub(crate) fn hold(&self, id: &str, held: bool) {
        let mut set = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }
}

impl std::fmt::Debug for Cancel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cancel").field("cancelled", &self.is_cancelled()).field("held", &self.held_sandboxes()).finish()
    }
}
