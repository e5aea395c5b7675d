//! How processes are confined: bubblewrap, or (only when the operator
//! accepted it) nothing at all.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The confinement of every process of every sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// bubblewrap at this path: own mount, pid, ipc, uts and user namespaces;
    /// only the sandbox's own directories are writable.
    Bwrap {
        /// The `bwrap` executable.
        path: PathBuf,
    },
    /// Processes run directly on the host, as the host user, with the host's
    /// filesystem. Paths are not remapped. For machines without bubblewrap,
    /// and only when the operator said so.
    Unconfined,
}

impl Confinement {
    /// Finds `bwrap` on `PATH`. Without it: an error, unless `allow_unconfined`.
    pub fn detect(allow_unconfined: bool) -> Result<Confinement> {
        detect_in(std::env::var_os("PATH").as_deref().map(Path::new), allow_unconfined)
    }
}

fn detect_in(search: Option<&Path>, allow_unconfined: bool) -> Result<Confinement> {
    let found = search
        .map(|paths| std::env::split_paths(paths.as_os_str()).map(|dir| dir.join("bwrap")).find(|p| p.is_file()))
        .unwrap_or_default();
    match found {
        Some(path) => Ok(Confinement::Bwrap { path }),
        None if allow_unconfined => {
            tracing::warn!(
                "bubblewrap (bwrap) is not installed: sandbox processes will run UNCONFINED on this host, \
                 with your user's rights, as you asked (--allow-unconfined)"
            );
            Ok(Confinement::Unconfined)
        }
        None => bail!(
            "bubblewrap (bwrap) is not on PATH, so local sandboxes cannot be confined. Install it \
             (apt-get install bubblewrap), or pass --allow-unconfined to run sandbox processes \
             directly on this host without any confinement"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_run_unconfined_unless_told() {
        let empty = tempfile::tempdir().unwrap();
        let err = detect_in(Some(empty.path()), false).unwrap_err().to_string();
        assert!(err.contains("bwrap") && err.contains("--allow-unconfined"), "{err}");
        assert_eq!(detect_in(Some(empty.path()), true).unwrap(), Confinement::Unconfined);
        let with = tempfile::tempdir().unwrap();
        std::fs::write(with.path().join("bwrap"), "").unwrap();
        assert_eq!(
            detect_in(Some(with.path()), false).unwrap(),
            Confinement::Bwrap { path: with.path().join("bwrap") }
        );
    }
}
