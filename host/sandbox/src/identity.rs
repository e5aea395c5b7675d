//! Host identities of a sandbox: a range of [`UIDS_PER_SANDBOX`] host uids
//! (and gids) of its own, mapped to uids 0.. in its user namespace, so that
//! sandbox root, the sandbox user and every other sandbox are different host
//! users. A range is held with a lock file for as long as the sandbox lives,
//! so two snapsign processes on one machine never hand out the same range.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// First host uid of the ranges: inside the block systemd sets aside for
/// containers (524288..=1879048191), away from its low end where
/// systemd-nspawn allocates.
pub const FIRST_HOST_UID: u32 = 1_073_741_824;

/// Uids (and gids) per sandbox: 0..65535 inside.
pub const UIDS_PER_SANDBOX: u32 = 65_536;

/// Ranges that fit below the end of the container block.
const SLOTS: u32 = (1_879_048_191 - FIRST_HOST_UID + 1) / UIDS_PER_SANDBOX;

/// uid/gid of the sandbox user inside a sandbox (processes without `user: "root"`).
pub const SANDBOX_UID: u32 = 1000;

/// Who a process runs as inside its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User {
    /// uid 0: every capability, all bounded by the sandbox's own user namespace.
    Root,
    /// [`SANDBOX_UID`], no capabilities.
    Sandbox,
}

impl User {
    /// The uid inside.
    pub(crate) fn uid(self) -> u32 {
        match self {
            User::Root => 0,
            User::Sandbox => SANDBOX_UID,
        }
    }

    pub(crate) fn home(self) -> &'static str {
        match self {
            User::Root => "/root",
            User::Sandbox => "/home",
        }
    }
}

/// A host uid range held for one sandbox; released when dropped.
#[derive(Debug)]
pub(crate) struct UidRange {
    /// Host uid of uid 0 inside.
    pub base: u32,
    /// Holds the range: an flock on `locks/{slot}`, released with the descriptor.
    _lock: File,
}

impl UidRange {
    /// Host uid of `uid` inside.
    pub(crate) fn host(&self, inside: u32) -> u32 {
        self.base + inside
    }

    /// Takes a free range, starting the search at a slot derived from `hint`
    /// (spreads concurrent processes apart; any free slot will do).
    pub(crate) fn take(locks: &Path, hint: u64) -> Result<UidRange> {
        for step in 0..SLOTS {
            let slot = ((hint + u64::from(step)) % u64::from(SLOTS)) as u32;
            let path = locks.join(slot.to_string());
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .with_context(|| format!("open uid range lock {}", path.display()))?;
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(UidRange { base: FIRST_HOST_UID + slot * UIDS_PER_SANDBOX, _lock: file });
            }
        }
        bail!("all {SLOTS} host uid ranges for sandboxes are in use (locks in {}); delete sandboxes", locks.display())
    }
}

/// Where the range locks live: shared by every snapsign process of the machine.
pub(crate) fn lock_dir() -> Result<PathBuf> {
    let dir = if Path::new("/run").is_dir() {
        PathBuf::from("/run/snapsign-sandbox/uids")
    } else {
        std::env::temp_dir().join("snapsign-sandbox-uids")
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("create uid range lock dir {}", dir.display()))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_exclusive_and_inside_the_container_block() {
        let dir = tempfile::tempdir().unwrap();
        let a = UidRange::take(dir.path(), 7).unwrap();
        let b = UidRange::take(dir.path(), 7).unwrap();
        assert_ne!(a.base, b.base);
        for range in [&a, &b] {
            assert!(range.base >= 524_288 && range.host(UIDS_PER_SANDBOX - 1) <= 1_879_048_191, "{range:?}");
        }
        assert_ne!(a.host(0), a.host(SANDBOX_UID));
        let freed = a.base;
        drop(a);
        assert_eq!(UidRange::take(dir.path(), 7).unwrap().base, freed, "a dropped range is free again");
    }
}
