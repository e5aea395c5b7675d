//! What the host asks of a sandbox's namespaces, as plain Rust values: the
//! holder's [`HolderSpec`] (with this host's root layout, [`RootEntry`]) and
//! a process's [`Launch`]. [`super::plan`] turns them into what a forked
//! child reads.

use std::path::{Path, PathBuf};

use crate::identity::{SubIds, User};

/// What the holder needs, prepared before the clone.
pub(crate) struct HolderSpec<'a> {
    pub id: &'a str,
    /// Empty directory that becomes the sandbox's `/`.
    pub root: &'a Path,
    /// The sandbox's areas directory (`fs/`).
    pub fs: &'a Path,
    pub areas: &'a [&'a str],
    pub builder_dir: &'a Path,
    pub layout: &'a [RootEntry],
    /// Host uid (and gid) of uid 0 inside (as root).
    pub base_uid: u32,
    /// A network namespace of its own (else the host's).
    pub private_network: bool,
    /// Rootless: this user's host uid and gid, mapped to sandbox root.
    pub rootless: Option<(u32, u32)>,
    /// Rootless: the disk the holder mounts on `fs` (MiB).
    pub disk_mb: Option<u64>,
    /// Rootless with subordinate ids: uids 1..=65535 inside are these, block
    /// [`SubIds::extent`] of the sandbox.
    pub subids: Option<(&'a SubIds, u32)>,
}

/// One process to start in a sandbox.
pub(crate) struct Launch {
    /// For `ps` on the host and errors: the command as sent.
    pub display: String,
    pub user: User,
    pub working_dir: String,
    pub env: Vec<(String, String)>,
    /// Executable, absolute or looked up in the `PATH` of `env`.
    pub command: String,
    pub args: Vec<String>,
    /// `cgroup.procs` files the launcher joins (the process inherits them).
    pub cgroup_procs: Vec<PathBuf>,
    /// (resource, limit) applied to the process.
    pub rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
}

/// How this host lays out `/bin`, `/sbin` and `/lib*`: symlinks into `/usr`
/// (merged /usr) are recreated, directories are bound read-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootEntry {
    Symlink { target: PathBuf, path: String },
    Bind(String),
}

pub(crate) fn host_layout() -> Vec<RootEntry> {
    ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(path).ok()?;
            if meta.file_type().is_symlink() {
                Some(RootEntry::Symlink { target: std::fs::read_link(path).ok()?, path: path.to_owned() })
            } else if meta.is_dir() {
                Some(RootEntry::Bind(path.to_owned()))
            } else {
                None
            }
        })
        .collect()
}
