//! How processes are confined: bubblewrap, or (only when the operator
//! accepted it) nothing at all.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The confinement of every process of every sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// bubblewrap at this path: own mount, pid, ipc, uts, cgroup and user
    /// namespaces, only the sandbox's own directories writable. The network
    /// namespace is the host's: see the crate documentation.
    Bwrap {
        /// The `bwrap` executable.
        path: PathBuf,
    },
    /// Processes run directly on the host, as the host process's user and
    /// with the host's filesystem; only the working directory is mapped to
    /// the sandbox's directory, no other path is. For machines without
    /// bubblewrap, and only when the operator said so.
    Unconfined,
}

impl Confinement {
    /// Finds `bwrap` on `PATH`. When it is missing: an error that says what to
    /// do, unless `allow_unconfined`, in which case [`Confinement::Unconfined`]
    /// and a warning.
    pub fn detect(allow_unconfined: bool) -> Result<Confinement> {
        detect_in(std::env::var_os("PATH").as_deref().map(Path::new), allow_unconfined)
    }
}

/// [`Confinement::detect`] over an explicit search path (`PATH` syntax).
pub(crate) fn detect_in(search: Option<&Path>, allow_unconfined: bool) -> Result<Confinement> {
    let found = search.and_then(|paths| {
        std::env::split_paths(paths.as_os_str()).map(|dir| dir.join("bwrap")).find(|p| is_executable(p))
    });
    match found {
        Some(path) => Ok(Confinement::Bwrap { path }),
        None if allow_unconfined => {
            tracing::warn!(
                "bubblewrap (bwrap) is not on PATH: sandbox processes will run UNCONFINED, directly on this \
                 host with this process's user and rights, because unconfined sandboxes were allowed"
            );
            Ok(Confinement::Unconfined)
        }
        None => bail!(
            "bubblewrap (bwrap) is not on PATH, so local sandboxes cannot be confined. Install it \
             (e.g. apt-get install bubblewrap), or pass --allow-unconfined to run sandbox processes \
             directly on this host without any confinement"
        ),
    }
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
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
        assert!(detect_in(None, false).is_err());
    }

    #[test]
    fn finds_an_executable_bwrap_on_the_search_path() {
        let empty = tempfile::tempdir().unwrap();
        let with = tempfile::tempdir().unwrap();
        let bwrap = with.path().join("bwrap");
        std::fs::write(&bwrap, "").unwrap();
        let search = std::env::join_paths([empty.path(), with.path()]).unwrap();
        // Not executable: not a bwrap.
        assert!(detect_in(Some(Path::new(&search)), false).is_err());
        std::fs::set_permissions(&bwrap, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert_eq!(detect_in(Some(Path::new(&search)), false).unwrap(), Confinement::Bwrap { path: bwrap });
    }
}
