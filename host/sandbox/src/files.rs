//! A sandbox's directories on the host, and file access by in-sandbox path
//! (wit/protocol.md §4.5) that never leaves them.
//!
//! The sandbox controls what is in its areas, symlinks included, while this
//! process (often root) does the reading and writing. So every open
//! resolves the path with `openat2(RESOLVE_BENEATH)` from the area's
//! directory: a symlink that points out of the area (`/var/x -> /etc/shadow`)
//! makes the call fail instead of reaching the host file.

use std::ffi::{CStr, CString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The in-sandbox directories a sandbox may write, each a directory of its
/// own on the host (`root_dir/{id}/fs/{area}`), bound at `/{area}` inside.
pub const AREAS: [&str; 4] = ["var", "tmp", "root", "home"];

/// Host directory (beside `fs/`, off the sandbox's disk) bound read-only at `/usr/local/bin` inside.
pub(crate) const BUILDER_DIR: &str = "usr-local-bin";

/// Where the builder binary appears inside every sandbox.
pub const BUILDER_PATH: &str = "/usr/local/bin/tl-rootfs-build";

/// Host owners of a sandbox's areas: its root, and its user (who owns
/// `/home` and what the file API writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Owners {
    pub root: u32,
    pub user: u32,
}

/// Creates a sandbox's directory `dir` with its `fs/` areas (on a tmpfs of
/// `disk_mb` MiB when given, so that writes past it fail with ENOSPC; owned
/// by `owners` when given) and, when given, the builder binary; returns `fs/`.
pub(crate) fn create_areas(
    dir: &Path,
    owners: Option<Owners>,
    builder: Option<&Path>,
    disk_mb: Option<u64>,
) -> Result<PathBuf> {
    // 0700: what the sandbox writes (set-uid files included) stays out of other host users' reach.
    make_dir(dir, 0o700, None)?;
    let fs = dir.join("fs");
    make_dir(&fs, 0o755, None)?;
    if let Some(mb) = disk_mb {
        mount_disk(&fs, mb)?;
    }
    for area in AREAS {
        let (mode, owner) = match area {
            "tmp" => (0o1777, owners.map(|o| o.root)),
            "home" => (0o755, owners.map(|o| o.user)),
            _ => (0o755, owners.map(|o| o.root)),
        };
        make_dir(&fs.join(area), mode, owner)?;
    }
    let bin = dir.join(BUILDER_DIR);
    make_dir(&bin, 0o755, None)?;
    if let Some(builder) = builder {
        install_builder(builder, &bin.join("tl-rootfs-build"))?;
        // The builder is also the sandbox's `gzip -d` (tl-rootfs-build's `gunzip`), found first in PATH.
        let gzip = bin.join("gzip");
        std::os::unix::fs::symlink("tl-rootfs-build", &gzip)
            .with_context(|| format!("link {} to the builder", gzip.display()))?;
    }
    Ok(fs)
}

/// The sandbox's disk: a tmpfs of `mb` MiB on `fs` (RAM-backed: the memory
/// limit counts it, see [`crate::Limits`]).
fn mount_disk(fs: &Path, mb: u64) -> Result<()> {
    let target = c_path(fs)?;
    let options = CString::new(format!("size={}m,mode=0755", mb.max(1))).expect("no NUL");
    // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            c"snapsign-sandbox".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NODEV | libc::MS_NOSUID,
            options.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| {
            format!("mount a {mb} MiB tmpfs on {} for the sandbox's disk (needs root)", fs.display())
        });
    }
    Ok(())
}

/// Detaches the sandbox's disk mounted on `fs`, if any (what was on it is gone).
pub(crate) fn unmount_disk(fs: &Path) {
    if let Ok(target) = c_path(fs) {
        // SAFETY: umount2 on a NUL-terminated path; EINVAL when nothing is mounted there.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
}

fn make_dir(path: &Path, mode: u32, owner: Option<u32>) -> Result<()> {
    std::fs::create_dir(path).with_context(|| format!("create {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("set the mode of {}", path.display()))?;
    if let Some(uid) = owner {
        std::os::unix::fs::chown(path, Some(uid), Some(uid))
            .with_context(|| format!("hand {} to uid {uid}", path.display()))?;
    }
    Ok(())
}

/// A hard link when the binary is world-executable (no copy of a large
/// binary per sandbox), else a copy with mode 0755.
fn install_builder(builder: &Path, dest: &Path) -> Result<()> {
    let meta = std::fs::metadata(builder).with_context(|| format!("read builder binary {}", builder.display()))?;
    if meta.permissions().mode() & 0o005 == 0o005 && std::fs::hard_link(builder, dest).is_ok() {
        return Ok(());
    }
    std::fs::copy(builder, dest)
        .with_context(|| format!("copy builder binary {} to {}", builder.display(), dest.display()))?;
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("make {} executable", dest.display()))
}

/// Splits an absolute in-sandbox path into its area and the path below it.
/// Refuses relative paths, `.` and `..`, and paths outside the areas.
pub(crate) fn split(id: &str, path: &str) -> Result<(&'static str, PathBuf)> {
    if !path.starts_with('/') {
        bail!("sandbox {id}: path '{path}' is relative; send an absolute path such as /tmp/file");
    }
    if path.split('/').any(|segment| segment == "." || segment == "..") {
        bail!("sandbox {id}: path '{path}' has a '.' or '..' component; send it without them");
    }
    let mut parts = Path::new(path).components().filter(|c| *c != Component::RootDir);
    let area = parts.next().and_then(|c| AREAS.iter().find(|a| c.as_os_str() == **a));
    let Some(area) = area else {
        bail!(
            "sandbox {id}: path '{path}' is outside the writable areas (/{}); use a path under one",
            AREAS.join(", /")
        );
    };
    Ok((area, parts.collect()))
}

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Opens an area's own directory (created by us, so trusted).
pub(crate) fn open_area(path: &Path) -> io::Result<OwnedFd> {
    let path = c_path(path)?;
    // SAFETY: open(2) on a NUL-terminated path; the result is a fresh descriptor we own.
    let fd = check(unsafe {
        libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
    })?;
    // SAFETY: fd was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `struct open_how` of openat2(2).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// The errno-like code of "not a regular file" ([`io_error`] makes it an `InvalidInput` error).
const NOT_REGULAR: i32 = 100_000;

/// An error of a [`FilePlan`] operation (an errno, or [`NOT_REGULAR`]) as an `io::Error`.
pub(crate) fn io_error(code: i32) -> io::Error {
    if code == NOT_REGULAR {
        io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")
    } else {
        io::Error::from_raw_os_error(code)
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)
}

/// openat2(2) of `path` under `dir`, never resolving outside `dir`; no allocation.
fn open_beneath(dir: libc::c_int, path: &CStr, flags: libc::c_int, mode: u32) -> Result<OwnedFd, i32> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC) as u64,
        mode: mode.into(),
        resolve: libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS,
    };
    for _ in 0..16 {
        // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and an open_how of the size passed.
        let fd = unsafe { libc::syscall(libc::SYS_openat2, dir, path.as_ptr(), &how, std::mem::size_of::<OpenHow>()) };
        if fd >= 0 {
            // SAFETY: fd was just opened and is owned by nobody else.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) });
        }
        let err = last_errno();
        // EAGAIN: a concurrent rename made the kernel unsure; try again.
        if err != libc::EAGAIN {
            return Err(err);
        }
    }
    Err(libc::EAGAIN)
}

/// Clears O_NONBLOCK (opened with it so that a FIFO cannot block us) once
/// the descriptor is known to be a regular file; no allocation.
fn regular_file(fd: OwnedFd) -> Result<OwnedFd, i32> {
    // SAFETY: fstat into a zeroed local, fcntl on a descriptor we own.
    unsafe {
        let mut stat: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut stat) != 0 {
            return Err(last_errno());
        }
        if stat.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Err(NOT_REGULAR);
        }
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0 {
            return Err(last_errno());
        }
    }
    Ok(fd)
}

/// One file operation of the file API, its paths made C strings beforehand:
/// its methods allocate nothing, so that a forked helper (rootless with
/// subordinate ids, see `Sandbox::write_file`) may run them.
pub(crate) struct FilePlan {
    area: CString,
    /// Each parent directory of `rel` from the top: the path of the one
    /// holding it (`.` for the area) and its name.
    parents: Vec<(CString, CString)>,
    /// `rel` (`.` when empty).
    rel: CString,
    /// The directory holding `rel` (`.` for the area), and `rel`'s name.
    parent: CString,
    name: Option<CString>,
}

impl FilePlan {
    /// The plan for `rel` under the area directory `area`.
    pub(crate) fn new(area: &Path, rel: &Path) -> io::Result<FilePlan> {
        let dot = |p: &Path| if p.as_os_str().is_empty() { c_path(Path::new(".")) } else { c_path(p) };
        let mut parents = Vec::new();
        let mut done = PathBuf::new();
        for part in rel.parent().into_iter().flat_map(Path::components) {
            parents.push((dot(&done)?, c_path(Path::new(part.as_os_str()))?));
            done.push(part);
        }
        Ok(FilePlan {
            area: c_path(area)?,
            parents,
            rel: dot(rel)?,
            parent: dot(rel.parent().unwrap_or(Path::new("")))?,
            name: rel.file_name().map(|n| c_path(Path::new(n))).transpose()?,
        })
    }

    /// The area's own directory (created by us, so trusted).
    fn area(&self) -> Result<OwnedFd, i32> {
        let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
        // SAFETY: open(2) on a NUL-terminated path; the result is a fresh descriptor we own.
        let fd = unsafe { libc::open(self.area.as_ptr(), flags) };
        if fd < 0 {
            return Err(last_errno());
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Opens the file for reading.
    pub(crate) fn open(&self) -> Result<OwnedFd, i32> {
        let dir = self.area()?;
        regular_file(open_beneath(dir.as_raw_fd(), &self.rel, libc::O_RDONLY | libc::O_NONBLOCK, 0)?)
    }

    /// Creates or truncates the file, with its missing parent directories,
    /// all owned by `owner` (uid and gid) when given.
    pub(crate) fn create(&self, owner: Option<u32>) -> Result<OwnedFd, i32> {
        let dir = self.area()?;
        for (done, name) in &self.parents {
            let parent = open_beneath(dir.as_raw_fd(), done, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            // SAFETY: mkdirat/fchownat relative to a directory we hold, on a single NUL-terminated
            // name; neither follows a symlink in that name.
            unsafe {
                if libc::mkdirat(parent.as_raw_fd(), name.as_ptr(), 0o755) == 0 {
                    if let Some(uid) = owner {
                        let flags = libc::AT_SYMLINK_NOFOLLOW;
                        if libc::fchownat(parent.as_raw_fd(), name.as_ptr(), uid, uid, flags) != 0 {
                            return Err(last_errno());
                        }
                    }
                } else if last_errno() != libc::EEXIST {
                    return Err(last_errno());
                }
            }
        }
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_NONBLOCK;
        let file = regular_file(open_beneath(dir.as_raw_fd(), &self.rel, flags, 0o644)?)?;
        if let Some(uid) = owner {
            // SAFETY: fchown on a descriptor we own.
            if unsafe { libc::fchown(file.as_raw_fd(), uid, uid) } != 0 {
                return Err(last_errno());
            }
        }
        Ok(file)
    }

    /// Removes the file (or symlink).
    pub(crate) fn remove(&self) -> Result<(), i32> {
        let name = self.name.as_ref().ok_or(libc::EINVAL)?;
        let dir = self.area()?;
        let parent = open_beneath(dir.as_raw_fd(), &self.parent, libc::O_PATH | libc::O_DIRECTORY, 0)?;
        // SAFETY: unlinkat relative to a directory we hold; it does not follow a symlink in `name`.
        if unsafe { libc::unlinkat(parent.as_raw_fd(), name.as_ptr(), 0) } != 0 {
            return Err(last_errno());
        }
        Ok(())
    }
}

/// Opens `rel` under the area `area` for reading.
pub(crate) fn open_file(area: &Path, rel: &Path) -> io::Result<File> {
    FilePlan::new(area, rel)?.open().map(File::from).map_err(io_error)
}

/// Creates or truncates `rel` under `area`, with its missing parent
/// directories, all owned by `owner` when given.
pub(crate) fn create_file(area: &Path, rel: &Path, owner: Option<u32>) -> io::Result<File> {
    FilePlan::new(area, rel)?.create(owner).map(File::from).map_err(io_error)
}

/// Removes the file (or symlink) `rel` under `area`.
pub(crate) fn remove_file(area: &Path, rel: &Path) -> io::Result<()> {
    FilePlan::new(area, rel)?.remove().map_err(io_error)
}

/// Says what an I/O error of the file API means for the caller.
pub(crate) fn explain(e: io::Error) -> anyhow::Error {
    match e.raw_os_error() {
        Some(libc::EXDEV) => anyhow::anyhow!("{e}: a symlink on the way leads out of the sandbox's area; not followed"),
        Some(libc::ENOSYS) => {
            anyhow::anyhow!("{e}: this kernel lacks openat2 (Linux 5.6+), needed for safe file access")
        }
        _ => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_paths_under_the_writable_areas() {
        assert_eq!(split("s", "/var/lib/x/spec.json").unwrap(), ("var", PathBuf::from("lib/x/spec.json")));
        assert_eq!(split("s", "/tmp//a/").unwrap(), ("tmp", PathBuf::from("a")));
        assert_eq!(split("s", "/home").unwrap(), ("home", PathBuf::new()));
    }

    #[test]
    fn refuses_relative_dotted_and_outside_paths_naming_the_sandbox() {
        for bad in [
            "relative/x",
            "var/x",
            "",
            "/var/../etc/passwd",
            "/var/./x",
            "/tmp/..",
            "/usr/bin/sh",
            "/etc/x",
            "/",
            "/variable/x",
        ] {
            let err = split("sbx-9", bad).unwrap_err().to_string();
            assert!(err.starts_with("sandbox sbx-9: path '"), "{bad}: {err}");
        }
    }

    #[test]
    fn file_access_does_not_follow_symlinks_out_of_the_area() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("var");
        std::fs::create_dir(&area).unwrap();
        std::fs::write(dir.path().join("host-secret"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("host-secret"), area.join("abs")).unwrap();
        std::os::unix::fs::symlink("../host-secret", area.join("rel")).unwrap();
        std::os::unix::fs::symlink("..", area.join("up")).unwrap();
        for link in ["abs", "rel", "up/host-secret"] {
            let err = open_file(&area, Path::new(link)).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EXDEV), "{link}: {err}");
            assert!(create_file(&area, Path::new(link), None).is_err(), "{link}");
        }
        assert!(create_file(&area, Path::new("up/new-dir/x"), None).is_err());
        assert!(!dir.path().join("new-dir").exists());
        assert_eq!(std::fs::read_to_string(dir.path().join("host-secret")).unwrap(), "secret");
        // Removing a link removes the link, not what it points to.
        remove_file(&area, Path::new("abs")).unwrap();
        assert!(dir.path().join("host-secret").exists());
    }

    #[test]
    fn follows_symlinks_that_stay_in_the_area_and_refuses_fifos() {
        let dir = tempfile::tempdir().unwrap();
        let area = dir.path().join("tmp");
        std::fs::create_dir_all(area.join("real")).unwrap();
        std::os::unix::fs::symlink("real", area.join("link")).unwrap();
        std::io::Write::write_all(&mut create_file(&area, Path::new("link/deep/f"), None).unwrap(), b"hi").unwrap();
        assert_eq!(std::fs::read_to_string(area.join("real/deep/f")).unwrap(), "hi");
        let fifo = c_path(&area.join("fifo")).unwrap();
        // SAFETY: mkfifo on a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert_eq!(open_file(&area, Path::new("fifo")).unwrap_err().kind(), io::ErrorKind::InvalidInput);
    }
}
