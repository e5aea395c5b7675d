//! How processes are confined: Linux namespaces made by this process (no
//! helper binary, no system package), or (only when the operator accepted
//! it) nothing at all.

use anyhow::{Result, bail};

/// The confinement of every process of every sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// Own user (a host uid range per sandbox), mount, pid, network, ipc and
    /// uts namespaces; only the sandbox's own directories writable; the
    /// limits of [`crate::Limits`]. Needs root. See the crate documentation.
    Namespaces,
    /// Processes run directly on the host, as the host process's user and
    /// with the host's filesystem and network; only the working directory is
    /// mapped to the sandbox's directory. No limits. Only when the operator
    /// said so.
    Unconfined,
}

impl Confinement {
    /// Namespaces when this process is root. Otherwise an error that says
    /// what to do, unless `allow_unconfined`: then [`Confinement::Unconfined`]
    /// and a warning.
    pub fn detect(allow_unconfined: bool) -> Result<Confinement> {
        // SAFETY: geteuid cannot fail.
        detect_as(unsafe { libc::geteuid() } == 0, allow_unconfined)
    }
}

/// [`Confinement::detect`] for a process that is root or not.
pub(crate) fn detect_as(root: bool, allow_unconfined: bool) -> Result<Confinement> {
    match (root, allow_unconfined) {
        (true, _) => Ok(Confinement::Namespaces),
        (false, true) => {
            tracing::warn!(
                "this process is not root, so local sandboxes cannot be confined: sandbox processes will run \
                 UNCONFINED, directly on this host with this process's user and rights, because unconfined \
                 sandboxes were allowed"
            );
            Ok(Confinement::Unconfined)
        }
        (false, false) => bail!(
            "local sandboxes are confined with Linux namespaces, a host uid range per sandbox and cgroups, which \
             needs root: run as root (nothing needs installing), or pass --allow-unconfined to run sandbox \
             processes directly on this host without any confinement"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_run_unconfined_unless_told() {
        let err = detect_as(false, false).unwrap_err().to_string();
        assert!(err.contains("root") && err.contains("--allow-unconfined"), "{err}");
        assert_eq!(detect_as(false, true).unwrap(), Confinement::Unconfined);
        assert_eq!(detect_as(true, false).unwrap(), Confinement::Namespaces);
        assert_eq!(detect_as(true, true).unwrap(), Confinement::Namespaces);
    }
}
