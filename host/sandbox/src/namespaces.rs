//! In-process confinement with Linux namespaces: no helper binary.
//!
//! Each sandbox has a *holder*: a process cloned from this one into a new
//! pid namespace (it is pid 1 there and reaps orphans) and a new mount
//! namespace, both owned by the host's user namespace, so that nothing in
//! the sandbox can change a mount. The holder builds the sandbox's root
//! (read-only `/usr`, `/etc`, a fresh `/proc`, a minimal `/dev`, the
//! writable areas, everything else read-only), pivots into it, then makes
//! the sandbox's user namespace (host uids `range.base..+65536` as 0..65535;
//! the host writes the maps), and in it the network, uts and ipc
//! namespaces, raises `lo`, and forbids further user namespaces
//! (`user.max_user_namespaces = 0`, which sandbox root cannot raise: its
//! processes lack CAP_SYS_RESOURCE).
//!
//! A process of the sandbox is started by a *launcher* forked from this
//! process (what Tokio sees as the child): it joins the holder's
//! namespaces except the user one, moves itself into the process's cgroups,
//! and forks the process, which joins the user namespace, takes its uid,
//! closes every descriptor but 0, 1 and 2, and executes the command. The
//! launcher waits and exits with the process's status (128 + signal when
//! it was killed). Killing the holder ends every process of the sandbox.
//!
//! Rootless (an ordinary user), the holder is cloned into a new *outer*
//! user namespace too (the host writes its maps: this user's uid and gid as
//! 0), which owns the pid and mount namespaces; the sandbox's user namespace
//! is made below it and mapped `0 0 1` (sandbox root = this user) by a
//! helper forked from the host that joined the outer namespace (only a
//! process there may write those maps); the same helper makes, below the
//! sandbox's namespace, the sandbox user's (`1000 0 1`). The holder mounts
//! the disk itself and hands it over through `/proc/{holder}/fd`, then
//! makes itself non-dumpable (sandbox root is the same host uid). A
//! launcher joins the outer namespace first (its capabilities over the
//! others come from there) and is non-dumpable; forwarded ports are opened
//! in the sandbox's network namespace by such a helper too.
//!
//! Everything between fork and exec (or the holder's whole life) makes only
//! system calls on data prepared before the fork: no allocation, no locks.

use std::ffi::{CStr, CString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};

use crate::identity::{UIDS_PER_SANDBOX, User};

/// Device nodes bound from the host into the sandbox's `/dev`.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// What `/proc/N/cmdline` of the holder and of a process before exec says,
/// instead of this host process's arguments (which may hold secrets).
static PROCESS_NAME: [u8; 22] = *b"snapsign-sandbox-init\0";

const CAP_SYS_RESOURCE: u32 = 24;

/// One step of building the sandbox's root, with its paths as host paths
/// before the pivot.
enum Step {
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
    /// Opens the directory (O_PATH) and keeps it in [`DISK_FD`] for the host.
    OpenDisk(CString),
}

/// Rootless: the holder's descriptor of the sandbox's disk (its tmpfs root),
/// which the host opens through `/proc/{holder}/fd/N` before the holder seals itself.
static DISK_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

impl Step {
    fn describe(&self) -> String {
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
            Step::OpenDisk(p) => format!("open the disk {}", s(p)),
        }
    }
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

fn c(path: impl AsRef<Path>) -> Result<CString> {
    let path = path.as_ref();
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("path {} has a NUL byte", path.display()))
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
fn root_steps(spec: &HolderSpec) -> Result<Vec<Step>> {
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

/// The namespaces of one sandbox, held by descriptors and by its holder process.
pub(crate) struct Holder {
    pid: libc::pid_t,
    pidfd: OwnedFd,
    /// The sandbox's user namespace (sandbox root's).
    user: OwnedFd,
    /// Rootless: the outer user namespace that owns the mount and pid
    /// namespaces (this user's uid as 0), which a launcher joins first.
    outer: Option<OwnedFd>,
    /// Rootless: the nested user namespace of the sandbox user (its uid
    /// [`crate::SANDBOX_UID`] is sandbox root's, the one host uid).
    sandbox_user: Option<OwnedFd>,
    /// Rootless with a disk: the disk (tmpfs) the holder mounted.
    disk: Option<OwnedFd>,
    mnt: OwnedFd,
    pid_ns: OwnedFd,
    net: Option<Arc<OwnedFd>>,
    uts: OwnedFd,
    ipc: OwnedFd,
    reaped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder").field("pid", &self.pid).finish_non_exhaustive()
    }
}

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
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes all of `bytes` to `fd`; for the forked side (no allocation).
fn write_all(fd: RawFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: write(2) from a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// Writes `value` to the file at `path` (open, write, close); false on failure.
fn write_file(path: &CStr, value: &[u8]) -> bool {
    // SAFETY: open/write/close on a NUL-terminated path and a live slice.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let ok = write_all(fd, value);
        libc::close(fd);
        ok
    }
}

fn read_byte(fd: RawFd) -> Option<u8> {
    let mut byte = 0u8;
    loop {
        // SAFETY: read(2) of one byte into a local.
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            return Some(byte);
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

/// Restores every signal's default action: handlers installed by this host
/// process (Tokio's SIGCHLD, a SIGTERM handler) must not run in a forked child.
fn reset_signals() {
    // SAFETY: sigaction with a zeroed (SIG_DFL) action and an empty mask; failures for KILL/STOP are ignored.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=64 {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

/// Where this process's arguments and environment strings are
/// (`/proc/self/stat` fields 48 to 51): a forked copy overwrites its own
/// copy of them, or the sandbox would read the host's in `/proc/N/cmdline`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HostStrings {
    args: (usize, usize),
    env: (usize, usize),
}

impl HostStrings {
    /// Read once: they do not move.
    fn find_cached() -> HostStrings {
        static FOUND: std::sync::OnceLock<HostStrings> = std::sync::OnceLock::new();
        *FOUND.get_or_init(HostStrings::find)
    }

    fn find() -> HostStrings {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<usize> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect())
            .unwrap_or_default();
        // Field 3 (state) is the first after the name; 48..=51 are arg_start, arg_end, env_start, env_end.
        let at = |n: usize| fields.get(n - 3).copied().unwrap_or(0);
        HostStrings { args: (at(48), at(49)), env: (at(50), at(51)) }
    }

    /// In a forked child: replaces the strings by [`PROCESS_NAME`] and zeros.
    fn wipe(&self) {
        for (start, end) in [self.args, self.env] {
            if start == 0 || end <= start {
                continue;
            }
            // SAFETY: the range is this process's own argument/environment block
            // (mapped, writable stack memory); the forked child owns its copy.
            unsafe {
                std::ptr::write_bytes(start as *mut u8, 0, end - start);
                if start == self.args.0 {
                    let n = PROCESS_NAME.len().min(end - start);
                    std::ptr::copy_nonoverlapping(PROCESS_NAME.as_ptr(), start as *mut u8, n);
                }
            }
        }
    }
}

/// Runs one root-building step; false (errno set) on failure.
fn run_step(step: &Step) -> bool {
    let null = std::ptr::null::<libc::c_char>();
    let none = std::ptr::null::<libc::c_void>();
    // SAFETY: system calls on NUL-terminated strings prepared before the fork.
    unsafe {
        match step {
            Step::Mkdir(path, mode) => libc::mkdir(path.as_ptr(), *mode) == 0 || errno() == libc::EEXIST,
            Step::File(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC, 0o666);
                fd >= 0 && libc::close(fd) == 0
            }
            Step::Symlink { target, path } => libc::symlink(target.as_ptr(), path.as_ptr()) == 0,
            Step::Tmpfs { dst, options, flags } => {
                libc::mount(c"tmpfs".as_ptr(), dst.as_ptr(), c"tmpfs".as_ptr(), *flags, options.as_ptr().cast()) == 0
            }
            Step::Proc(dst) => {
                let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                libc::mount(c"proc".as_ptr(), dst.as_ptr(), c"proc".as_ptr(), flags, none) == 0
            }
            Step::Bind { src, dst, readonly, extra } => {
                if libc::mount(src.as_ptr(), dst.as_ptr(), null, libc::MS_BIND | libc::MS_REC, none) != 0 {
                    return false;
                }
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_NOSUID | libc::MS_NODEV | *extra;
                let flags = if *readonly { flags | libc::MS_RDONLY } else { flags };
                // Device nodes keep their mount's flags (nodev would make /dev/null unusable).
                if !*readonly && src.to_bytes().starts_with(b"/dev/") {
                    return true;
                }
                libc::mount(null, dst.as_ptr(), null, flags, none) == 0
            }
            Step::RemountReadonly(path) => {
                let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
                libc::mount(null, path.as_ptr(), null, flags, none) == 0
            }
            Step::Chmod(path, mode) => libc::chmod(path.as_ptr(), *mode) == 0,
            Step::OpenDisk(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
                DISK_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
                fd >= 0
            }
        }
    }
}

/// Holder → host messages: a tag byte, then for failures the step index (u32) and errno (i32).
const READY_FOR_MAPS: u8 = b'M';
const DONE: u8 = b'D';
const FAILED: u8 = b'F';
/// Rootless: host → holder, the outer namespace's maps are written.
const OUTER_MAPPED: u8 = b'O';
/// Rootless: host → holder, the host holds the namespaces: seal yourself
/// (not dumpable); holder → host, sealed.
const SEAL: u8 = b'S';

/// Failure points after the root steps (their index is `steps.len() + n`).
const AFTER_STEPS: [&str; 11] = [
    "make / private",
    "enter the new root (pivot_root)",
    "detach the old root",
    "create the user namespace",
    "wait for the uid maps",
    "create the network, uts and ipc namespaces",
    "set the hostname",
    "raise lo",
    "forbid nested user namespaces",
    "wait for the outer uid maps",
    "seal the holder",
];

/// The holder's whole life, in the cloned child. Never returns.
fn holder_main(
    steps: &[Step],
    root: &CStr,
    hostname: &[u8],
    (private_network, rootless): (bool, bool),
    strings: HostStrings,
    to_host: RawFd,
    from_host: RawFd,
) -> ! {
    let fail = |index: usize| -> ! {
        let code = errno();
        let mut message = [0u8; 9];
        message[0] = FAILED;
        message[1..5].copy_from_slice(&(index as u32).to_le_bytes());
        message[5..9].copy_from_slice(&code.to_le_bytes());
        write_all(to_host, &message);
        // SAFETY: leaving the forked child without running this process's exit handlers.
        unsafe { libc::_exit(1) }
    };
    let n = steps.len();
    // SAFETY: system calls only, on data prepared before the clone.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        reset_signals();
        // Nothing of the host's descriptors stays open in the sandbox's pid 1.
        let (low, high) = (to_host.min(from_host) as u32, to_host.max(from_host) as u32);
        if low > 0 {
            libc::syscall(libc::SYS_close_range, 0u32, low - 1, 0u32);
        }
        if high > low + 1 {
            libc::syscall(libc::SYS_close_range, low + 1, high - 1, 0u32);
        }
        libc::syscall(libc::SYS_close_range, high + 1, u32::MAX, 0u32);
        strings.wipe();
        if rootless {
            // Nothing can be made in a user namespace before its maps are written (by the host).
            if read_byte(from_host) != Some(OUTER_MAPPED) {
                fail(n + 9);
            }
        } else {
            // Not dumpable: sandbox root may not read this process's memory or environment.
            // (Rootless: at the end, once the host opened what it needs through /proc.)
            libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
        }
        let null = std::ptr::null::<libc::c_char>();
        if libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()) != 0 {
            fail(n);
        }
        for (index, step) in steps.iter().enumerate() {
            if !run_step(step) {
                fail(index);
            }
        }
        if libc::chdir(root.as_ptr()) != 0 || libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) != 0 {
            fail(n + 1);
        }
        if libc::umount2(c".".as_ptr(), libc::MNT_DETACH) != 0 || libc::chdir(c"/".as_ptr()) != 0 {
            fail(n + 2);
        }
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            fail(n + 3);
        }
        let mut ready = [READY_FOR_MAPS, 0, 0, 0, 0];
        if rootless {
            ready[1..].copy_from_slice(&DISK_FD.load(std::sync::atomic::Ordering::Relaxed).to_le_bytes());
        }
        let ready = if rootless { &ready[..] } else { &ready[..1] };
        if !write_all(to_host, ready) || read_byte(from_host) != Some(READY_FOR_MAPS) {
            fail(n + 4);
        }
        let flags = libc::CLONE_NEWUTS | libc::CLONE_NEWIPC | if private_network { libc::CLONE_NEWNET } else { 0 };
        if libc::unshare(flags) != 0 {
            fail(n + 5);
        }
        if libc::sethostname(hostname.as_ptr().cast(), hostname.len()) != 0 {
            fail(n + 6);
        }
        if private_network && !raise_loopback() {
            fail(n + 7);
        }
        if !write_file(c"/proc/sys/user/max_user_namespaces", b"0") {
            fail(n + 8);
        }
        write_all(to_host, &[DONE]);
        if rootless {
            if read_byte(from_host) != Some(SEAL) {
                fail(n + 10);
            }
            let disk = DISK_FD.load(std::sync::atomic::Ordering::Relaxed);
            if disk >= 0 {
                libc::close(disk);
            }
            // Sandbox root is this same host uid: it must not read nor trace this process.
            libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
            write_all(to_host, &[SEAL]);
        }
        libc::close(to_host);
        libc::close(from_host);
        // pid 1: reap whatever is orphaned into this namespace, until killed.
        let mut chld: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut chld);
        libc::sigaddset(&mut chld, libc::SIGCHLD);
        libc::sigprocmask(libc::SIG_BLOCK, &chld, std::ptr::null_mut());
        loop {
            while libc::waitpid(-1, std::ptr::null_mut(), libc::WNOHANG) > 0 {}
            libc::sigwaitinfo(&chld, std::ptr::null_mut());
        }
    }
}

/// Sets IFF_UP on `lo` of the current network namespace.
fn raise_loopback() -> bool {
    // SAFETY: a socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return false;
        }
        let mut request: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            request.ifr_name[i] = *b as libc::c_char;
        }
        let mut ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut request) == 0;
        if ok {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            ok = libc::ioctl(sock, libc::SIOCSIFFLAGS, &request) == 0;
        }
        libc::close(sock);
        ok
    }
}

fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("create a pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn open_ns(pid: libc::pid_t, name: &str) -> Result<OwnedFd> {
    let path = format!("/proc/{pid}/ns/{name}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    Ok(file.into())
}

impl Holder {
    /// Clones the holder and waits until the sandbox's namespaces are ready.
    ///
    /// Call it from a thread that outlives the sandbox (a runtime worker):
    /// the holder dies with that thread (PR_SET_PDEATHSIG), as it must with
    /// this process.
    pub(crate) fn start(spec: &HolderSpec) -> Result<Holder> {
        let id = spec.id;
        let steps = root_steps(spec)?;
        let root = c(spec.root)?;
        let hostname = spec.id.as_bytes().to_vec();
        let strings = HostStrings::find_cached();
        let rootless = spec.rootless.is_some();
        let (from_holder, to_host) = pipe()?;
        let (from_host, to_holder) = pipe()?;
        let user = if rootless { libc::CLONE_NEWUSER } else { 0 };
        let flags = user | libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD;
        // SAFETY: a fork-like clone (no new stack: the child runs on a copy of
        // this one); the child only runs `holder_main`, which never returns.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
        if pid < 0 {
            let needs = if rootless { "needs unprivileged user namespaces" } else { "needs root" };
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("sandbox {id}: clone a process into new pid and mount namespaces ({needs})"));
        }
        if pid == 0 {
            holder_main(
                &steps,
                &root,
                &hostname,
                (spec.private_network, rootless),
                strings,
                to_host.as_raw_fd(),
                from_host.as_raw_fd(),
            );
        }
        let pid = pid as libc::pid_t;
        drop((to_host, from_host));
        // SAFETY: pidfd_open of our own child, which cannot be reaped before we wait for it.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let guard = KillOnError(pid);
        if pidfd < 0 {
            return Err(std::io::Error::last_os_error()).context("pidfd_open of the sandbox holder");
        }
        // SAFETY: a fresh descriptor we own.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) };
        let fail = |what: &str| -> anyhow::Error {
            let mut rest = [0u8; 8];
            for byte in &mut rest {
                *byte = read_byte(from_holder.as_raw_fd()).unwrap_or(0);
            }
            let index = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let code = i32::from_le_bytes(rest[4..].try_into().expect("4 bytes"));
            let step = steps
                .get(index)
                .map(Step::describe)
                .or_else(|| AFTER_STEPS.get(index - steps.len()).map(|s| s.to_string()))
                .unwrap_or_else(|| format!("step {index}"));
            anyhow::anyhow!(
                "sandbox {id}: setting up its namespaces failed at '{step}' ({}) {what}",
                std::io::Error::from_raw_os_error(code)
            )
        };
        let ended = |when: &str| anyhow::anyhow!("sandbox {id}: its holder process ended {when}");
        let outer = match spec.rootless {
            Some((uid, gid)) => {
                // This user's one uid and gid become root of the outer namespace, which owns
                // the mount and pid namespaces (sandbox root never has capabilities there).
                let outer = open_ns(pid, "user")?;
                for (file, value) in [
                    ("setgroups", "deny".to_owned()),
                    ("uid_map", format!("0 {uid} 1")),
                    ("gid_map", format!("0 {gid} 1")),
                ] {
                    let path = format!("/proc/{pid}/{file}");
                    std::fs::write(&path, &value).with_context(|| format!("sandbox {id}: write {path} ({value})"))?;
                }
                if !write_all(to_holder.as_raw_fd(), &[OUTER_MAPPED]) {
                    return Err(ended("before its outer uid maps were written"));
                }
                Some(outer)
            }
            None => None,
        };
        match read_byte(from_holder.as_raw_fd()) {
            Some(READY_FOR_MAPS) => {}
            Some(FAILED) => return Err(fail("")),
            _ => return Err(ended("while setting up the namespaces")),
        }
        let (mut sandbox_user, mut disk) = (None, None);
        match &outer {
            None => {
                let map = format!("0 {} {UIDS_PER_SANDBOX}\n", spec.base_uid);
                for file in ["uid_map", "gid_map"] {
                    let path = format!("/proc/{pid}/{file}");
                    std::fs::write(&path, &map)
                        .with_context(|| format!("sandbox {id}: write {path} ({})", map.trim()))?;
                }
            }
            Some(outer) => {
                let mut fd = [0u8; 4];
                for byte in &mut fd {
                    *byte = read_byte(from_holder.as_raw_fd()).ok_or_else(|| ended("while setting up its disk"))?;
                }
                let fd = i32::from_le_bytes(fd);
                if fd >= 0 {
                    let path = format!("/proc/{pid}/fd/{fd}");
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                        .open(&path)
                        .with_context(|| format!("sandbox {id}: open its disk through {path}"))?;
                    disk = Some(OwnedFd::from(file));
                }
                let inner = open_ns(pid, "user")?;
                sandbox_user = Some(map_rootless(id, pid, outer, &inner)?);
            }
        }
        if !write_all(to_holder.as_raw_fd(), &[READY_FOR_MAPS]) {
            return Err(ended("before its uid maps were written"));
        }
        match read_byte(from_holder.as_raw_fd()) {
            Some(DONE) => {}
            Some(FAILED) => return Err(fail("")),
            _ => return Err(ended("while setting up the namespaces")),
        }
        let (user, mnt, pid_ns) = (open_ns(pid, "user")?, open_ns(pid, "mnt")?, open_ns(pid, "pid")?);
        let net = if spec.private_network { Some(Arc::new(open_ns(pid, "net")?)) } else { None };
        let (uts, ipc) = (open_ns(pid, "uts")?, open_ns(pid, "ipc")?);
        if rootless {
            if !write_all(to_holder.as_raw_fd(), &[SEAL]) {
                return Err(ended("before it was sealed"));
            }
            match read_byte(from_holder.as_raw_fd()) {
                Some(SEAL) => {}
                Some(FAILED) => return Err(fail("")),
                _ => return Err(ended("while sealing itself")),
            }
        }
        std::mem::forget(guard);
        Ok(Holder {
            pid,
            pidfd,
            user,
            outer,
            sandbox_user,
            disk,
            mnt,
            pid_ns,
            net,
            uts,
            ipc,
            reaped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The sandbox's pid namespace as (device, inode), to tell its processes from others.
    pub(crate) fn pid_ns_id(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        let file = std::fs::File::from(self.pid_ns.try_clone().ok()?);
        file.metadata().ok().map(|m| (m.dev(), m.ino()))
    }

    /// The sandbox's network namespace, when it has its own.
    pub(crate) fn net(&self) -> Option<&Arc<OwnedFd>> {
        self.net.as_ref()
    }

    /// Rootless: the outer user namespace (joined before the others).
    pub(crate) fn outer(&self) -> Option<&OwnedFd> {
        self.outer.as_ref()
    }

    /// Rootless with a disk: the holder's disk (its tmpfs root), taken once.
    pub(crate) fn take_disk(&mut self) -> Option<OwnedFd> {
        self.disk.take()
    }

    /// Kills the holder, which ends every process in the sandbox's pid
    /// namespace, and reaps it. Blocks until they are gone.
    pub(crate) fn kill(&self) {
        if self.reaped.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        // SAFETY: pidfd_send_signal on our child's pidfd, then waitpid of that child (not yet reaped: `reaped`).
        unsafe {
            libc::syscall(libc::SYS_pidfd_send_signal, self.pidfd.as_raw_fd(), libc::SIGKILL, 0usize, 0u32);
            let mut status = 0;
            while libc::waitpid(self.pid, &mut status, 0) < 0 && errno() == libc::EINTR {}
        }
    }

    /// A command that runs `launch` in this sandbox: the launcher joins the
    /// namespaces and forks the process (see the module documentation).
    pub(crate) fn command(&self, launch: Launch) -> std::process::Command {
        let mut cmd = std::process::Command::new(&launch.display);
        cmd.env_clear().process_group(0);
        let mut joins = Vec::new();
        if let Some(net) = &self.net {
            joins.push((net.as_raw_fd(), libc::CLONE_NEWNET));
        }
        joins.push((self.uts.as_raw_fd(), libc::CLONE_NEWUTS));
        joins.push((self.ipc.as_raw_fd(), libc::CLONE_NEWIPC));
        joins.push((self.pid_ns.as_raw_fd(), libc::CLONE_NEWPID));
        // Last: after it, paths resolve in the sandbox.
        joins.push((self.mnt.as_raw_fd(), libc::CLONE_NEWNS));
        let user_ns = match (&self.sandbox_user, launch.user) {
            (Some(sandbox_user), User::Sandbox) => sandbox_user.as_raw_fd(),
            _ => self.user.as_raw_fd(),
        };
        let outer = self.outer.as_ref().map_or(-1, |o| o.as_raw_fd());
        let prepared = Prepared::new(launch, joins, user_ns, outer);
        // SAFETY: the closure only makes system calls on `prepared` (see `Prepared::run`).
        unsafe { cmd.pre_exec(move || prepared.run()) };
        cmd
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Kills and reaps a half-started holder.
struct KillOnError(libc::pid_t);

impl Drop for KillOnError {
    fn drop(&mut self) {
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
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

/// [`Launch`] as NUL-terminated strings and pointer arrays, ready before the fork.
struct Prepared {
    strings: HostStrings,
    joins: Vec<(RawFd, libc::c_int)>,
    user_ns: RawFd,
    /// Rootless: the outer user namespace, joined first (-1: none).
    outer: RawFd,
    uid: u32,
    root: bool,
    cgroup_procs: Vec<CString>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    cwd: CString,
    candidates: Vec<CString>,
    _argv: Vec<CString>,
    argv: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    /// `snapsign-sandbox: cannot run 'cmd': `
    cannot_run: Vec<u8>,
    /// `snapsign-sandbox: cannot enter working directory 'dir': `
    cannot_chdir: Vec<u8>,
    cannot_enter: Vec<u8>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct,
// which is moved whole into the pre_exec closure and never mutated.
unsafe impl Send for Prepared {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for Prepared {}

fn lossless(s: &str) -> CString {
    // Callers checked for NUL bytes (process::environment, ProcessSpec); a stray one ends the string.
    CString::new(s.split('\0').next().unwrap_or_default()).expect("no NUL")
}

impl Prepared {
    fn new(launch: Launch, joins: Vec<(RawFd, libc::c_int)>, user_ns: RawFd, outer: RawFd) -> Prepared {
        let path = launch.env.iter().find(|(k, _)| k == "PATH").map(|(_, v)| v.as_str()).unwrap_or("");
        let candidates: Vec<CString> = if launch.command.contains('/') {
            vec![lossless(&launch.command)]
        } else {
            path.split(':')
                .filter(|dir| !dir.is_empty())
                .map(|dir| lossless(&format!("{}/{}", dir.trim_end_matches('/'), launch.command)))
                .collect()
        };
        let argv_strings: Vec<CString> =
            std::iter::once(&launch.command).chain(&launch.args).map(|a| lossless(a)).collect();
        let env_strings: Vec<CString> = launch.env.iter().map(|(k, v)| lossless(&format!("{k}={v}"))).collect();
        let pointers = |strings: &[CString]| {
            strings.iter().map(|s| s.as_ptr()).chain(std::iter::once(std::ptr::null())).collect::<Vec<_>>()
        };
        Prepared {
            strings: HostStrings::find_cached(),
            joins,
            user_ns,
            outer,
            uid: launch.user.uid(),
            root: launch.user == User::Root,
            cgroup_procs: launch.cgroup_procs.iter().map(|p| lossless(&p.to_string_lossy())).collect(),
            rlimits: launch.rlimits,
            cwd: lossless(&launch.working_dir),
            candidates,
            argv: pointers(&argv_strings),
            _argv: argv_strings,
            envp: pointers(&env_strings),
            _envp: env_strings,
            cannot_run: format!("snapsign-sandbox: cannot run '{}': ", launch.command).into_bytes(),
            cannot_chdir: format!("snapsign-sandbox: cannot enter working directory '{}': ", launch.working_dir)
                .into_bytes(),
            cannot_enter: b"snapsign-sandbox: cannot enter the sandbox: ".to_vec(),
        }
    }

    /// Reports `what` and errno on stderr and ends the forked process with `code`.
    fn die(&self, what: &[u8], code: i32) -> ! {
        let err = errno();
        write_all(2, what);
        write_all(2, error_text(err));
        write_all(2, b"\n");
        // SAFETY: leaving a forked child without running exit handlers.
        unsafe { libc::_exit(code) }
    }

    /// The launcher (in the pre_exec of the spawned child). Never returns:
    /// it exits with the process's status, or 126 when it cannot start it.
    fn run(&self) -> std::io::Result<()> {
        reset_signals();
        // SAFETY: system calls on data prepared before the fork.
        unsafe {
            for procs in &self.cgroup_procs {
                if !write_file(procs, b"0") {
                    self.die(&self.cannot_enter, 126);
                }
            }
            if self.outer >= 0 {
                // Rootless: capabilities over the namespaces come from their owner, the outer
                // user namespace. This copy of the host process is not dumpable: sandbox root
                // (the same host uid) may not read it, nor the process before its exec.
                libc::prctl(libc::PR_SET_DUMPABLE, 0 as libc::c_ulong);
                if libc::setns(self.outer, libc::CLONE_NEWUSER) != 0 {
                    self.die(&self.cannot_enter, 126);
                }
            }
            for (fd, kind) in &self.joins {
                if libc::setns(*fd, *kind) != 0 {
                    self.die(&self.cannot_enter, 126);
                }
            }
            let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize);
            if child < 0 {
                self.die(&self.cannot_enter, 126);
            }
            if child == 0 {
                self.process();
            }
            // Nothing of the host stays open here either (the spawn's error pipe included).
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut status = 0;
            loop {
                let r = libc::waitpid(child as libc::pid_t, &mut status, 0);
                if r < 0 && errno() == libc::EINTR {
                    continue;
                }
                break;
            }
            let code = if libc::WIFEXITED(status) {
                libc::WEXITSTATUS(status)
            } else if libc::WIFSIGNALED(status) {
                128 + libc::WTERMSIG(status)
            } else {
                1
            };
            libc::_exit(code)
        }
    }

    /// The process itself, in the sandbox's pid namespace: takes its user and executes the command.
    fn process(&self) -> ! {
        // SAFETY: system calls on data prepared before the fork.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            self.strings.wipe();
            // The first victim of the OOM killer, before its launcher (a copy of this host
            // process, whose shared pages count as its size) and before anything of the host.
            write_file(c"/proc/self/oom_score_adj", b"1000");
            for (resource, limit) in &self.rlimits {
                let value = libc::rlimit { rlim_cur: *limit, rlim_max: *limit };
                libc::setrlimit(*resource, &value);
            }
            if libc::setns(self.user_ns, libc::CLONE_NEWUSER) != 0 {
                self.die(&self.cannot_enter, 126);
            }
            // Sandbox root must not raise user.max_user_namespaces (nor other ucount limits).
            libc::prctl(libc::PR_CAPBSET_DROP, CAP_SYS_RESOURCE as libc::c_ulong);
            let id = self.uid;
            // Rootless, setgroups is denied (the kernel's rule for an unprivileged gid map):
            // the process keeps this user's supplementary groups, unmapped inside.
            if (self.outer < 0 && libc::setgroups(0, std::ptr::null()) != 0)
                || libc::setresgid(id, id, id) != 0
                || libc::setresuid(id, id, id) != 0
            {
                self.die(&self.cannot_enter, 126);
            }
            // Root keeps every capability of its namespace but CAP_SYS_RESOURCE; the user
            // none (leaving the unmapped host root for a non-root uid does not clear them).
            let keep = if self.root { !(1u64 << CAP_SYS_RESOURCE) } else { 0 };
            if !limit_capabilities(keep) {
                self.die(&self.cannot_enter, 126);
            }
            if libc::chdir(self.cwd.as_ptr()) != 0 {
                self.die(&self.cannot_chdir, 126);
            }
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
            let mut reason = libc::ENOENT;
            for candidate in &self.candidates {
                libc::execve(candidate.as_ptr(), self.argv.as_ptr(), self.envp.as_ptr());
                let err = errno();
                if err != libc::ENOENT && err != libc::ENOTDIR {
                    reason = err;
                }
            }
            *libc::__errno_location() = reason;
            self.die(&self.cannot_run, if reason == libc::ENOENT { 127 } else { 126 })
        }
    }
}

/// Most descriptors one helper sends back.
const MAX_SENT_FDS: usize = 64;

/// Control buffer of a message carrying up to [`MAX_SENT_FDS`] descriptors.
#[repr(C, align(8))]
struct Control([u8; 512]);

/// Sends `fds` (and one byte, `K`) over the socket `sock`; for a forked
/// helper (no allocation).
fn send_fds(sock: RawFd, fds: &[RawFd]) -> bool {
    if fds.len() > MAX_SENT_FDS {
        return false;
    }
    let mut control = Control([0; 512]);
    let mut data = [b'K'];
    // SAFETY: a msghdr over local buffers; CMSG_* stay inside `control` (sized for MAX_SENT_FDS).
    unsafe {
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let bytes = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(bytes) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), bytes as usize);
        libc::sendmsg(sock, &msg, 0) == 1
    }
}

/// Runs `body` in a forked helper process and returns the descriptors it
/// sent with [`send_fds`]. `body` runs in the child: system calls on data
/// prepared before, no allocation; on failure it returns the index of the
/// failed step in `steps` (errno set).
fn run_helper(what: &str, steps: &[&str], body: &dyn Fn(RawFd) -> Result<(), usize>) -> Result<Vec<OwnedFd>> {
    let mut pair = [0; 2];
    // SAFETY: socketpair into a local array.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, pair.as_mut_ptr()) } != 0
    {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("{what}: create a socket pair"));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    let (host, child) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // SAFETY: a fork-like clone; the child runs `body` (system calls only) and _exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("{what}: fork a helper process"));
    }
    if pid == 0 {
        // SAFETY: system calls only, then _exit.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
            if let Err(step) = body(child.as_raw_fd()) {
                let mut message = [0u8; 9];
                message[0] = FAILED;
                message[1..5].copy_from_slice(&(step as u32).to_le_bytes());
                message[5..9].copy_from_slice(&errno().to_le_bytes());
                write_all(child.as_raw_fd(), &message);
                libc::_exit(1);
            }
            libc::_exit(0)
        }
    }
    drop(child);
    let mut status = 0;
    // SAFETY: waitpid of our own child.
    while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) } < 0 && errno() == libc::EINTR {}
    let mut data = [0u8; 9];
    let mut control = Control([0; 512]);
    // SAFETY: recvmsg into local buffers; descriptors are taken from the control message the kernel filled.
    let (n, fds) = unsafe {
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = control.0.len() as _;
        let n = libc::recvmsg(host.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC);
        let mut fds = Vec::new();
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let count = ((*cmsg).cmsg_len as usize - libc::CMSG_LEN(0) as usize) / std::mem::size_of::<RawFd>();
                let first = libc::CMSG_DATA(cmsg).cast::<RawFd>();
                for i in 0..count {
                    fds.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(first.add(i))));
                }
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
        (n, fds)
    };
    match (n, data[0]) {
        (1, b'K') => Ok(fds),
        (9, FAILED) => {
            let step = u32::from_le_bytes(data[1..5].try_into().expect("4 bytes")) as usize;
            let code = i32::from_le_bytes(data[5..9].try_into().expect("4 bytes"));
            bail!(
                "{what}: '{}' failed ({})",
                steps.get(step).copied().unwrap_or("a step"),
                std::io::Error::from_raw_os_error(code)
            )
        }
        _ => bail!("{what}: the helper process ended without an answer (wait status {status})"),
    }
}

/// Rootless: writes the maps of the sandbox's user namespace `inner`
/// (sandbox root is root of `outer`, i.e. this user), from a helper that
/// joined `outer` (the only place allowed to write them), then makes in
/// `inner` the sandbox user's namespace ([`crate::SANDBOX_UID`] as sandbox
/// root) and returns it.
fn map_rootless(id: &str, holder: libc::pid_t, outer: &OwnedFd, inner: &OwnedFd) -> Result<OwnedFd> {
    let uid_map = c(format!("/proc/{holder}/uid_map"))?;
    let gid_map = c(format!("/proc/{holder}/gid_map"))?;
    let user_map = format!("{} 0 1\n", crate::identity::SANDBOX_UID).into_bytes();
    let (outer, inner) = (outer.as_raw_fd(), inner.as_raw_fd());
    let steps = [
        "join the outer user namespace",
        "write the sandbox's uid_map (0 0 1)",
        "write the sandbox's gid_map (0 0 1)",
        "join the sandbox's user namespace",
        "create the sandbox user's namespace",
        "write its uid_map",
        "write its gid_map",
        "open it",
        "send it",
    ];
    let body = |sock: RawFd| -> Result<(), usize> {
        // SAFETY: system calls on data prepared before the fork.
        unsafe {
            if libc::setns(outer, libc::CLONE_NEWUSER) != 0 {
                return Err(0);
            }
            if !write_file(&uid_map, b"0 0 1\n") {
                return Err(1);
            }
            if !write_file(&gid_map, b"0 0 1\n") {
                return Err(2);
            }
            if libc::setns(inner, libc::CLONE_NEWUSER) != 0 {
                return Err(3);
            }
            if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                return Err(4);
            }
            if !write_file(c"/proc/self/uid_map", &user_map) {
                return Err(5);
            }
            if !write_file(c"/proc/self/gid_map", &user_map) {
                return Err(6);
            }
            let fd = libc::open(c"/proc/self/ns/user".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(7);
            }
            if !send_fds(sock, &[fd]) {
                return Err(8);
            }
            Ok(())
        }
    };
    let mut fds = run_helper(&format!("sandbox {id}: map its user namespaces"), &steps, &body)?;
    fds.pop().ok_or_else(|| anyhow::anyhow!("sandbox {id}: the helper mapping its user namespaces sent nothing"))
}

/// Rootless: listening sockets on `127.0.0.1:port` for each port, made in
/// the network namespace `net` by a helper that joined `outer` (a thread of
/// this process may not enter a namespace owned by another user namespace).
pub(crate) fn listen_in(outer: &OwnedFd, net: &OwnedFd, ports: &[u16]) -> Result<Vec<std::net::TcpListener>> {
    if ports.len() > MAX_SENT_FDS {
        bail!("{} forwarded ports asked; at most {MAX_SENT_FDS} can be forwarded into one sandbox", ports.len());
    }
    let (outer, net) = (outer.as_raw_fd(), net.as_raw_fd());
    let addresses: Vec<libc::sockaddr_in> = ports
        .iter()
        .map(|port| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be() },
            sin_zero: [0; 8],
        })
        .collect();
    let steps = ["join the outer user namespace", "enter the network namespace", "listen on a port", "send them"];
    let body = |sock: RawFd| -> Result<(), usize> {
        let mut fds = [-1 as RawFd; MAX_SENT_FDS];
        // SAFETY: system calls on data prepared before the fork.
        unsafe {
            if libc::setns(outer, libc::CLONE_NEWUSER) != 0 {
                return Err(0);
            }
            if libc::setns(net, libc::CLONE_NEWNET) != 0 {
                return Err(1);
            }
            for (slot, address) in fds.iter_mut().zip(&addresses) {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                let on: libc::c_int = 1;
                let size = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
                if fd < 0
                    || libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR, (&on as *const libc::c_int).cast(), 4)
                        != 0
                    || libc::bind(fd, (address as *const libc::sockaddr_in).cast(), size) != 0
                    || libc::listen(fd, 128) != 0
                {
                    return Err(2);
                }
                *slot = fd;
            }
            if !send_fds(sock, &fds[..addresses.len()]) {
                return Err(3);
            }
            Ok(())
        }
    };
    let fds = run_helper(&format!("listen on 127.0.0.1:{ports:?}"), &steps, &body)?;
    if fds.len() != ports.len() {
        bail!("the helper listening on ports {ports:?} sent {} sockets", fds.len());
    }
    fds.into_iter()
        .map(|fd| {
            let listener = std::net::TcpListener::from(fd);
            listener.set_nonblocking(true).context("make the listener non-blocking")?;
            Ok(listener)
        })
        .collect()
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Keeps only the capabilities in the mask `keep` in the effective,
/// permitted and inheritable sets.
fn limit_capabilities(keep: u64) -> bool {
    let mut header = CapHeader { version: 0x2008_0522, pid: 0 };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget/capset with a v3 header and two data words.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) != 0 {
            return false;
        }
        for (word, mask) in data.iter_mut().zip([keep as u32, (keep >> 32) as u32]) {
            word.effective &= mask;
            word.permitted &= mask;
            word.inheritable &= mask;
        }
        libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) == 0
    }
}

/// A fixed text for the errors a launch meets (strerror may allocate).
fn error_text(code: i32) -> &'static [u8] {
    match code {
        libc::ENOENT => b"No such file or directory",
        libc::EACCES => b"Permission denied",
        libc::ENOEXEC => b"Exec format error",
        libc::ENOTDIR => b"Not a directory",
        libc::EPERM => b"Operation not permitted",
        libc::ENOMEM => b"Out of memory",
        libc::EAGAIN => b"Resource temporarily unavailable (process limit?)",
        libc::E2BIG => b"Argument list too long",
        libc::EINVAL => b"Invalid argument",
        libc::ETXTBSY => b"Text file busy",
        _ => b"system error",
    }
}

/// Whether this process may make sandboxes here (root, with namespaces).
pub(crate) fn check_privileges() -> Result<()> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "local sandboxes are confined with Linux namespaces, uid ranges and cgroups, which need root; run as \
             root, or pass --allow-unconfined to run sandbox processes directly on this host without any confinement"
        );
    }
    Ok(())
}
