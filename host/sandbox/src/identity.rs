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

/// Ids of a rootless sandbox besides sandbox root (this user's own uid):
/// uids and gids 1..=[`SUBORDINATE_IDS`] inside.
pub const SUBORDINATE_IDS: u32 = UIDS_PER_SANDBOX - 1;

/// Whether rootless sandboxes may use this user's subordinate ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SubordinateIds {
    /// Where `newuidmap`, `newgidmap` and a range in `/etc/subuid` and
    /// `/etc/subgid` exist (see [`RootlessIds`]); otherwise one uid.
    #[default]
    WhereAvailable,
    /// Always this user's one uid (what a machine without them gets).
    Never,
}

/// How the ids of a rootless sandbox map to host ids (chosen once, at start).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootlessIds {
    /// This user's one uid is sandbox root and, through a nested user
    /// namespace, the sandbox user; nothing else is mapped. `why`: what was
    /// missing for subordinate ids.
    OneUid { why: String },
    /// Sandbox root is this user's own uid (and gid); uids 1..=65535 inside
    /// are the subordinate uids `uid_start..`, gids 1..=65535 the
    /// subordinate gids `gid_start..`; mapped by `newuidmap`/`newgidmap`.
    /// Every sandbox of this process uses the same ids.
    Subordinate { uid_start: u32, gid_start: u32 },
}

impl RootlessIds {
    /// For the log line and each create answer.
    pub fn describe(&self) -> String {
        match self {
            RootlessIds::OneUid { why } => format!(
                "one uid: this user's host uid is sandbox root and the sandbox user, no other uid is mapped ({why})"
            ),
            RootlessIds::Subordinate { uid_start, gid_start } => format!(
                "subordinate ids: sandbox root is this user's host uid, uids 1..65535 are host uids {uid_start}..{} \
                 and gids 1..65535 host gids {gid_start}..{} (newuidmap, newgidmap; shared by this user's sandboxes)",
                uid_start + SUBORDINATE_IDS - 1,
                gid_start + SUBORDINATE_IDS - 1
            ),
        }
    }
}

/// The first range of at least [`SUBORDINATE_IDS`] ids of `user` (its name or
/// its number) in the contents of `/etc/subuid` or `/etc/subgid`; its start.
pub(crate) fn subordinate_start(contents: &str, name: &str, id: u32) -> Option<u32> {
    contents.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        if owner != name && owner.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        (count >= SUBORDINATE_IDS && start.checked_add(SUBORDINATE_IDS).is_some()).then_some(start)
    })
}

/// The name of host user `uid`, from the password database.
fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: getpwuid_r into a zeroed passwd and a buffer of the size passed.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut result = std::ptr::null_mut();
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points to a NUL-terminated string in `buf`.
    Some(unsafe { std::ffi::CStr::from_ptr(pwd.pw_name) }.to_string_lossy().into_owned())
}

/// Where `tool` is installed: the directories of `PATH`, then the usual ones.
pub(crate) fn find_tool(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .filter(|d| !d.is_empty())
        .chain(["/usr/bin", "/bin", "/usr/sbin", "/sbin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file())
}

/// This user's subordinate ids and the tools that map them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SubIds {
    /// This user's uid and gid: sandbox root.
    pub uid: u32,
    pub gid: u32,
    /// First subordinate uid and gid: uid and gid 1 inside.
    pub uid_start: u32,
    pub gid_start: u32,
    pub newuidmap: PathBuf,
    pub newgidmap: PathBuf,
}

impl SubIds {
    pub(crate) fn mode(&self) -> RootlessIds {
        RootlessIds::Subordinate { uid_start: self.uid_start, gid_start: self.gid_start }
    }

    /// Host uid of `inside` (0..=65535).
    pub(crate) fn host_uid(&self, inside: u32) -> Option<u32> {
        match inside {
            0 => Some(self.uid),
            1..=SUBORDINATE_IDS => Some(self.uid_start + inside - 1),
            _ => None,
        }
    }
}

/// What this user has for subordinate ids: `newuidmap` and `newgidmap`, and
/// a range of at least 65535 ids in `/etc/subuid` and `/etc/subgid`; or why not.
pub(crate) fn find_subordinate_ids(uid: u32, gid: u32) -> std::result::Result<SubIds, String> {
    let tools = (find_tool("newuidmap"), find_tool("newgidmap"));
    let (Some(newuidmap), Some(newgidmap)) = tools else {
        return Err("newuidmap or newgidmap is not installed; install Debian's uidmap (shadow-utils elsewhere)".into());
    };
    let name = user_name(uid).ok_or_else(|| format!("uid {uid} has no entry in the password database"))?;
    // Both files name the user (by name or uid), as newuidmap and newgidmap look them up.
    let start = |file: &str| -> std::result::Result<u32, String> {
        let contents = std::fs::read_to_string(file).unwrap_or_default();
        subordinate_start(&contents, &name, uid).ok_or_else(|| {
            format!(
                "{file} gives {name} (uid {uid}) no range of {SUBORDINATE_IDS} ids or more; add one with: sudo \
                 usermod --add-subuids 165536-231071 --add-subgids 165536-231071 {name}"
            )
        })
    };
    let (uid_start, gid_start) = (start("/etc/subuid")?, start("/etc/subgid")?);
    Ok(SubIds { uid, gid, uid_start, gid_start, newuidmap, newgidmap })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subordinate_range_is_found_by_name_or_uid_and_must_hold_65535_ids() {
        let file = "# comment\nother:100000:65536\nsnapsign-ci:165536:65536\n1003:300000:131072\nsmall:400000:1000\n";
        assert_eq!(subordinate_start(file, "snapsign-ci", 1002), Some(165_536));
        assert_eq!(subordinate_start(file, "someone", 1003), Some(300_000));
        assert_eq!(subordinate_start(file, "small", 1004), None, "1000 ids are too few");
        assert_eq!(subordinate_start(file, "nobody-here", 1005), None);
        assert_eq!(subordinate_start("", "snapsign-ci", 1002), None);
        let ids = SubIds {
            uid: 1002,
            gid: 1002,
            uid_start: 165_536,
            gid_start: 165_536,
            newuidmap: "newuidmap".into(),
            newgidmap: "newgidmap".into(),
        };
        assert_eq!(
            [0, 1, SANDBOX_UID, SUBORDINATE_IDS, UIDS_PER_SANDBOX].map(|id| ids.host_uid(id)),
            [Some(1002), Some(165_536), Some(166_535), Some(231_070), None]
        );
    }

    #[test]
    fn a_uid_without_a_password_entry_gets_no_subordinate_ids() {
        // uid 3999999999 has no password entry.
        let err = find_subordinate_ids(3_999_999_999, 3_999_999_999).unwrap_err();
        assert!(err.contains("uid 3999999999 has no entry in the password database"), "{err}");
    }

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
