//! What a sandbox's root is made of: this host's layout of `/bin`, `/lib*`
//! and the like, and the [`Step`]s that build the root, all made before the
//! holder is cloned (the holder runs them with [`super::child::holder`]).

use std::ffi::CString;
use std::path::Path;

use anyhow::Result;

use super::os::c;
use super::spec::{HolderSpec, RootEntry};
use crate::identity::SANDBOX_UID;

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// One step of building the sandbox's root, with its paths as host paths
/// before the pivot.
pub(super) enum Step {
    Mkdir(CString, u32),
    File(CString),
    Symlink {
        target: CString,
        path: CString,
    },
    Tmpfs {
        dst: CString,
        options: CString,
        flags: libc::c_ulong,
    },
    Proc(CString),
    /// `extra`: flags the source mount has that a user namespace may not
    /// drop (rootless: noexec of a host mount is locked).
    Bind {
        src: CString,
        dst: CString,
        readonly: bool,
        extra: libc::c_ulong,
    },
    RemountReadonly(CString),
    Chmod(CString, u32),
    /// chown to this uid and gid (of the holder's user namespace).
    Chown(CString, u32),
    /// Opens the directory (O_PATH) and keeps it in the holder's `DISK_FD` for the host.
    OpenDisk(CString),
}
impl Step {
    pub(super) fn describe(&self) -> String {
        let s = |c: &CString| c.to_string_lossy().into_owned();
        match self {
            Step::Mkdir(p, _) => format!("mkdir {}", s(p)),
            Step::File(p) => format!("create {}", s(p)),
            Step::Symlink { target, path } => format!("symlink {} -> {}", s(path), s(target)),
            Step::Tmpfs { dst, .. } => format!("mount tmpfs on {}", s(dst)),
            Step::Proc(p) => format!("mount proc on {}", s(p)),
            Step::Bind { src, dst, readonly, .. } => {
                format!("bind {} on {}{}", s(src), s(dst), if *readonly { " read-only" } else { "" })
            }
            Step::RemountReadonly(p) => format!("remount {} read-only", s(p)),
            Step::Chmod(p, mode) => format!("chmod {mode:o} {}", s(p)),
            Step::Chown(p, id) => format!("chown {id}:{id} {}", s(p)),
            Step::OpenDisk(p) => format!("open the disk {}", s(p)),
        }
    }
}

/// Flags of the mount holding `path` that a bind of it in a user namespace
/// must keep (the kernel locks them); none as root.
fn locked_flags(path: &Path, rootless: bool) -> libc::c_ulong {
    if !rootless {
        return 0;
    }
    let Ok(path) = c(path) else { return 0 };
    // SAFETY: statvfs into a zeroed local.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return 0;
    }
    if stat.f_flag & libc::ST_NOEXEC != 0 { libc::MS_NOEXEC } else { 0 }
}

/// The steps that build a sandbox root at `root` from its areas in `fs`.
/// Rootless with a disk, the holder first mounts the disk on `fs` and makes
/// the areas in it (the host cannot mount).
pub(super) fn root_steps(spec: &HolderSpec) -> Result<Vec<Step>> {
    let (root, fs, areas, builder_dir, layout) = (spec.root, spec.fs, spec.areas, spec.builder_dir, spec.layout);
    let rootless = spec.rootless.is_some();
    let at = |p: &str| c(root.join(p.trim_start_matches('/')));
    let mut steps = Vec::new();
    if let (true, Some(mb)) = (rootless, spec.disk_mb) {
        let options = format!("size={}m,mode=0755", mb.max(1));
        steps.push(Step::Tmpfs { dst: c(fs)?, options: c(options)?, flags: libc::MS_NOSUID | libc::MS_NODEV });
        for area in areas {
            steps.push(Step::Mkdir(c(fs.join(area))?, 0o755));
            steps.push(Step::Chmod(c(fs.join(area))?, if *area == "tmp" { 0o1777 } else { 0o755 }));
        }
        steps.push(Step::OpenDisk(c(fs)?));
    }
    if spec.subids.is_some() {
        // The sandbox user's home is its own (the host cannot chown to a subordinate uid).
        steps.push(Step::Chown(c(fs.join("home"))?, SANDBOX_UID));
    }
    steps.push(Step::Tmpfs {
        dst: c(root)?,
        options: c("mode=0755,size=1m")?,
        flags: libc::MS_NOSUID | libc::MS_NODEV,
    });
    let ro_bind = |steps: &mut Vec<Step>, src: &str| -> Result<()> {
        steps.push(Step::Mkdir(at(src)?, 0o755));
        let extra = locked_flags(Path::new(src), rootless);
        steps.push(Step::Bind { src: c(src)?, dst: at(src)?, readonly: true, extra });
        Ok(())
    };
    ro_bind(&mut steps, "/usr")?;
    for entry in layout {
        match entry {
            RootEntry::Symlink { target, path } => steps.push(Step::Symlink { target: c(target)?, path: at(path)? }),
            RootEntry::Bind(path) => ro_bind(&mut steps, path)?,
        }
    }
    ro_bind(&mut steps, "/etc")?;
    steps.push(Step::Mkdir(at("/proc")?, 0o555));
    steps.push(Step::Proc(at("/proc")?));
    steps.push(Step::Mkdir(at("/dev")?, 0o755));
    steps.push(Step::Tmpfs {
        dst: at("/dev")?,
        options: c("mode=0755,size=64k")?,
        flags: libc::MS_NOSUID | libc::MS_NOEXEC,
    });
    for device in DEVICES {
        let host = format!("/dev/{device}");
        if Path::new(&host).exists() {
            steps.push(Step::File(at(&host)?));
            steps.push(Step::Bind { src: c(&host)?, dst: at(&host)?, readonly: false, extra: 0 });
        }
    }
    for (link, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        steps.push(Step::Symlink { target: c(target)?, path: at(&format!("/dev/{link}"))? });
    }
    for area in areas {
        steps.push(Step::Mkdir(at(area)?, 0o755));
        let extra = locked_flags(fs, rootless && spec.disk_mb.is_none());
        steps.push(Step::Bind { src: c(fs.join(area))?, dst: at(area)?, readonly: false, extra });
    }
    if Path::new("/usr/local/bin").is_dir() {
        let extra = locked_flags(builder_dir, rootless);
        steps.push(Step::Bind { src: c(builder_dir)?, dst: at("/usr/local/bin")?, readonly: true, extra });
    }
    steps.push(Step::RemountReadonly(c(root)?));
    Ok(steps)
}
