//! Host identities of a sandbox: a range of [`UIDS_PER_SANDBOX`] host uids
//! (and gids) of its own, mapped to uids 0.. in its user namespace, so that
//! sandbox root, the sandbox user and every other sandbox are different host
//! users. A range is held with a lock file for as long as the sandbox lives,
//! so two snapsign processes on one machine never hand out the same range.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

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
        let (slot, lock) = take_slot(locks, SLOTS, hint).ok_or_else(|| {
            anyhow::anyhow!(
                "all {SLOTS} host uid ranges for sandboxes are in use (locks in {}); delete sandboxes",
                locks.display()
            )
        })??;
        Ok(UidRange { base: FIRST_HOST_UID + slot * UIDS_PER_SANDBOX, _lock: lock })
    }
}

/// Locks a free slot of `slots` in `locks` (an flock on `locks/{slot}`, held
/// by the returned file), starting at `hint`; `None` when all are held.
fn take_slot(locks: &Path, slots: u32, hint: u64) -> Option<Result<(u32, File)>> {
    for step in 0..slots {
        let slot = ((hint + u64::from(step)) % u64::from(slots)) as u32;
        let path = locks.join(slot.to_string());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("open uid range lock {}", path.display()));
        let file = match file {
            Ok(file) => file,
            Err(e) => return Some(Err(e)),
        };
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(Ok((slot, file)));
        }
    }
    None
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

/// Rootless: the directory where this user's processes lock their blocks
/// of subordinate ids, `/tmp/snapsign-sandbox-subids-UID` (one fixed place,
/// whatever the environment, so every snapsign process of the user finds
/// the same locks), held open: the returned path names it through the
/// descriptor (`/proc/self/fd/N`), so a later rename or replacement of the
/// path changes nothing. It must be this user's and writable by nobody else,
/// or another user could make two sandboxes share a block by swapping lock
/// files; `/tmp` is sticky, so once made it stays this user's.
pub(crate) fn user_lock_dir(uid: u32) -> Result<(std::os::fd::OwnedFd, PathBuf)> {
    user_lock_dir_in(Path::new("/tmp"), uid)
}

fn user_lock_dir_in(base: &Path, uid: u32) -> Result<(std::os::fd::OwnedFd, PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = base.join(format!("snapsign-sandbox-subids-{uid}"));
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e).with_context(|| format!("create subordinate id lock dir {}", dir.display())),
    }
    let refused = |what: String| {
        anyhow::anyhow!(
            "subordinate id lock dir {} {what}: it must be a directory of uid {uid} that only it may write; \
             another user may have made it first (remove it as root)",
            dir.display()
        )
    };
    let opened = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&dir)
        .map_err(|e| refused(format!("cannot be opened as a directory ({e})")))?;
    let meta = opened.metadata().with_context(|| format!("inspect {}", dir.display()))?;
    if meta.uid() != uid || meta.mode() & 0o022 != 0 {
        return Err(refused(format!("has owner {} and mode {:o}", meta.uid(), meta.mode() & 0o7777)));
    }
    let fd = std::os::fd::OwnedFd::from(opened);
    let through = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    Ok((fd, through))
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
    /// are [`SUBORDINATE_IDS`] subordinate uids from `uid_start`, gids
    /// 1..=65535 subordinate gids from `gid_start`; mapped by
    /// `newuidmap`/`newgidmap`. The user's ranges hold `ranges` such blocks:
    /// with two or more, each sandbox holds one of its own (block `n` starts
    /// `n` × 65535 after the start) while it lives; with one, every sandbox
    /// of this user shares it.
    Subordinate { uid_start: u32, gid_start: u32, ranges: u32 },
}

impl RootlessIds {
    /// For the log line.
    pub fn describe(&self) -> String {
        match self {
            RootlessIds::OneUid { why } => format!(
                "one uid: this user's host uid is sandbox root and the sandbox user, no other uid is mapped ({why})"
            ),
            RootlessIds::Subordinate { uid_start, gid_start, ranges: 1 } => format!(
                "subordinate ids: sandbox root is this user's host uid, uids 1..65535 are host uids {uid_start}..{} \
                 and gids 1..65535 host gids {gid_start}..{} (newuidmap, newgidmap), shared by this user's \
                 sandboxes: give this user {} ids or more in /etc/subuid and /etc/subgid for a range per sandbox",
                uid_start + SUBORDINATE_IDS - 1,
                gid_start + SUBORDINATE_IDS - 1,
                2 * SUBORDINATE_IDS
            ),
            RootlessIds::Subordinate { uid_start, gid_start, ranges } => format!(
                "subordinate ids: sandbox root is this user's host uid, uids 1..65535 are {SUBORDINATE_IDS} host \
                 uids of the sandbox's own, one of {ranges} ranges in host uids {uid_start}..{} (gids from \
                 {gid_start}; newuidmap, newgidmap)",
                uid_start + ranges * SUBORDINATE_IDS - 1,
            ),
        }
    }
}

/// The first range of at least [`SUBORDINATE_IDS`] ids of `user` (its name or
/// its number) in the contents of `/etc/subuid` or `/etc/subgid`: its start
/// and how many ids it holds (as many as fit below 2^32).
pub(crate) fn subordinate_range(contents: &str, name: &str, id: u32) -> Option<(u32, u32)> {
    contents.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (owner, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        if owner != name && owner.parse::<u32>().ok() != Some(id) {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        let count = count.min(u32::MAX - start);
        (count >= SUBORDINATE_IDS).then_some((start, count))
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
    /// First subordinate uid and gid: uid and gid 1 inside (of range 0).
    pub uid_start: u32,
    pub gid_start: u32,
    /// Blocks of [`SUBORDINATE_IDS`] in both ranges: with two or more, a
    /// block per sandbox ([`SubIds::take`]); with one, shared.
    pub ranges: u32,
    pub newuidmap: PathBuf,
    pub newgidmap: PathBuf,
}

/// Host ids mapped to 1.. in a user namespace: `count` uids from
/// `uid_start`, as many gids from `gid_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub uid_start: u32,
    pub gid_start: u32,
    pub count: u32,
}

/// The block of subordinate ids a rootless sandbox holds while it lives
/// (with one block, the shared one and no lock).
#[derive(Debug)]
pub(crate) struct SubRange {
    pub index: u32,
    _lock: Option<File>,
}

impl SubIds {
    pub(crate) fn mode(&self) -> RootlessIds {
        RootlessIds::Subordinate { uid_start: self.uid_start, gid_start: self.gid_start, ranges: self.ranges }
    }

    /// Host ids of block `index`: uids 1..=65535 of the sandbox holding it.
    pub(crate) fn extent(&self, index: u32) -> Extent {
        let offset = index * SUBORDINATE_IDS;
        Extent { uid_start: self.uid_start + offset, gid_start: self.gid_start + offset, count: SUBORDINATE_IDS }
    }

    /// Every block: what the keeper namespace maps, so that its root may
    /// handle files of any sandbox of this user.
    pub(crate) fn all(&self) -> Extent {
        Extent { uid_start: self.uid_start, gid_start: self.gid_start, count: self.ranges * SUBORDINATE_IDS }
    }

    /// Host uid of `inside` (0..=65535) in the sandbox holding block `index`.
    pub(crate) fn host_uid(&self, index: u32, inside: u32) -> Option<u32> {
        match inside {
            0 => Some(self.uid),
            1..=SUBORDINATE_IDS => Some(self.extent(index).uid_start + inside - 1),
            _ => None,
        }
    }

    /// Uid (and gid) in the keeper namespace ([`SubIds::all`]) of `inside`
    /// in the sandbox holding block `index`.
    pub(crate) fn keeper_uid(&self, index: u32, inside: u32) -> u32 {
        if inside == 0 { 0 } else { index * SUBORDINATE_IDS + inside }
    }

    /// A block for a new sandbox, held until the returned value drops: a
    /// free one of the user's blocks (locked in `locks`, shared by every
    /// process of this user), or with one block that one.
    pub(crate) fn take(&self, locks: &Path, hint: u64) -> Result<SubRange> {
        if self.ranges < 2 {
            return Ok(SubRange { index: 0, _lock: None });
        }
        let (index, lock) = take_slot(locks, self.ranges, hint).ok_or_else(|| {
            anyhow::anyhow!(
                "all {} ranges of {SUBORDINATE_IDS} subordinate ids of uid {} (in /etc/subuid and /etc/subgid) are \
                 held by running sandboxes (locks in {}): delete a sandbox, or give this user more ids (sudo \
                 usermod --add-subuids FIRST-LAST --add-subgids FIRST-LAST NAME)",
                self.ranges,
                self.uid,
                locks.display()
            )
        })??;
        Ok(SubRange { index, _lock: Some(lock) })
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
    let start = |file: &str| -> std::result::Result<(u32, u32), String> {
        let contents = std::fs::read_to_string(file).unwrap_or_default();
        subordinate_range(&contents, &name, uid).ok_or_else(|| {
            format!(
                "{file} gives {name} (uid {uid}) no range of {SUBORDINATE_IDS} ids or more; add one with: sudo \
                 usermod --add-subuids 165536-231071 --add-subgids 165536-231071 {name}"
            )
        })
    };
    let ((uid_start, uids), (gid_start, gids)) = (start("/etc/subuid")?, start("/etc/subgid")?);
    let ranges = uids.min(gids) / SUBORDINATE_IDS;
    Ok(SubIds { uid, gid, uid_start, gid_start, ranges, newuidmap, newgidmap })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subordinate_range_is_found_by_name_or_uid_and_must_hold_65535_ids() {
        let file = "# comment\nother:100000:65536\nsnapsign-ci:165536:65536\n1003:300000:131072\nsmall:400000:1000\n\
                    edge:4294900000:100000\n";
        assert_eq!(subordinate_range(file, "snapsign-ci", 1002), Some((165_536, 65_536)));
        assert_eq!(subordinate_range(file, "someone", 1003), Some((300_000, 131_072)));
        assert_eq!(subordinate_range(file, "small", 1004), None, "1000 ids are too few");
        assert_eq!(subordinate_range(file, "edge", 1006), Some((4_294_900_000, 67_295)), "cut at 2^32");
        assert_eq!(subordinate_range(file, "nobody-here", 1005), None);
        assert_eq!(subordinate_range("", "snapsign-ci", 1002), None);
    }

    fn ids(ranges: u32) -> SubIds {
        SubIds {
            uid: 1002,
            gid: 1003,
            uid_start: 165_536,
            gid_start: 265_536,
            ranges,
            newuidmap: "newuidmap".into(),
            newgidmap: "newgidmap".into(),
        }
    }

    #[test]
    fn each_block_of_subordinate_ids_is_its_own_host_uids_and_the_keeper_maps_them_all() {
        let ids = ids(3);
        assert_eq!(
            [0, 1, SANDBOX_UID, SUBORDINATE_IDS, UIDS_PER_SANDBOX].map(|id| ids.host_uid(0, id)),
            [Some(1002), Some(165_536), Some(166_535), Some(231_070), None]
        );
        assert_eq!(ids.host_uid(2, 0), Some(1002), "sandbox root is this user in every block");
        assert_eq!(ids.host_uid(2, 1), Some(165_536 + 2 * 65_535));
        assert_eq!(ids.host_uid(2, SUBORDINATE_IDS), Some(165_536 + 3 * 65_535 - 1), "the last id of the range");
        assert_eq!(ids.extent(1), Extent { uid_start: 231_071, gid_start: 331_071, count: 65_535 });
        assert_eq!(ids.all(), Extent { uid_start: 165_536, gid_start: 265_536, count: 3 * 65_535 });
        // The keeper maps this user as 0 and all blocks from 1: the same host uid either way.
        for (index, inside) in [(0, SANDBOX_UID), (1, 1), (2, SANDBOX_UID), (2, SUBORDINATE_IDS)] {
            let keeper = ids.keeper_uid(index, inside);
            assert_eq!(ids.all().uid_start + keeper - 1, ids.host_uid(index, inside).unwrap(), "{index} {inside}");
        }
        assert_eq!(ids.keeper_uid(2, 0), 0);
    }

    #[test]
    fn blocks_are_held_one_per_sandbox_until_dropped_and_a_single_block_is_shared() {
        let dir = tempfile::tempdir().unwrap();
        let two = ids(2);
        let a = two.take(dir.path(), 5).unwrap();
        let b = two.take(dir.path(), 5).unwrap();
        assert_ne!(a.index, b.index);
        let err = format!("{:#}", two.take(dir.path(), 5).unwrap_err());
        for needle in ["all 2 ranges of 65535 subordinate ids of uid 1002", "held by running sandboxes", "usermod"] {
            assert!(err.contains(needle), "{needle}: {err}");
        }
        let freed = b.index;
        drop(b);
        assert_eq!(two.take(dir.path(), 5).unwrap().index, freed, "a dropped block is free again");
        // One block: every sandbox gets it, no lock.
        let one = ids(1);
        let (c, d) = (one.take(dir.path(), 5).unwrap(), one.take(dir.path(), 5).unwrap());
        assert_eq!((c.index, d.index), (0, 0));
        assert!(one.mode().describe().contains("shared by this user's sandboxes"));
        assert!(two.mode().describe().contains("of the sandbox's own, one of 2 ranges in host uids 165536..296605"));
    }

    #[test]
    fn the_lock_dir_of_subordinate_ids_must_be_this_users_alone_and_is_held_open() {
        let dir = tempfile::tempdir().unwrap();
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        let path = dir.path().join(format!("snapsign-sandbox-subids-{uid}"));
        let (held, through) = user_lock_dir_in(dir.path(), uid).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o700);
        assert_eq!(through, PathBuf::from(format!("/proc/self/fd/{}", held.as_raw_fd())));
        // Locks go through the descriptor: the directory as it was opened, wherever its name goes.
        let moved = dir.path().join("moved");
        std::fs::rename(&path, &moved).unwrap();
        let (slot, _lock) = take_slot(&through, 2, 0).unwrap().unwrap();
        assert!(moved.join(slot.to_string()).exists(), "the lock is in the directory held open");
        drop(held);
        // Writable by others, or a symlink: refused, naming it.
        std::fs::create_dir(&path).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        let err = format!("{:#}", user_lock_dir_in(dir.path(), uid).unwrap_err());
        assert!(err.contains("has owner") && err.contains("mode 777") && err.contains("only it may write"), "{err}");
        std::fs::remove_dir(&path).unwrap();
        std::os::unix::fs::symlink(&moved, &path).unwrap();
        let err = format!("{:#}", user_lock_dir_in(dir.path(), uid).unwrap_err());
        assert!(err.contains("cannot be opened as a directory"), "{err}");
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
