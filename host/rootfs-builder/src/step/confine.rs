//! The confiner of one RUN step (see [`super`]): a fresh, single-threaded
//! `tl-rootfs-build __run-step` process that makes the step's namespaces,
//! forks the step's pid 1 into them, and exits with its status.
//!
//! The forked child builds the step's root (its own `/proc` and `/dev` in
//! the tree), pivots into it, takes the step's identity and executes the
//! command. The parent is single-threaded, so the child may allocate.
//! Failures before the exec are written to the status descriptor and end
//! with the setup-failed status, so the builder can tell them from the
//! command's own exit codes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use super::Confined;

/// Device nodes bound from the builder's `/dev` into the step's.
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

/// The hostname a step sees (BuildKit's).
const HOSTNAME: &str = "buildkitsandbox";

/// Docker's default capabilities: CHOWN, DAC_OVERRIDE, FOWNER, FSETID, KILL,
/// SETGID, SETUID, SETPCAP, NET_BIND_SERVICE, NET_RAW, SYS_CHROOT, MKNOD,
/// AUDIT_WRITE, SETFCAP. Every other capability leaves a root step's bounding set.
const KEPT_CAPABILITIES: [u32; 14] = [0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31];

/// Confines and runs `step`; returns the exit status for this process.
pub fn run(step: &Confined, status_fd: i32, setup_failed: i32) -> i32 {
    let report = |message: String| {
        write_all(status_fd, message.as_bytes());
        setup_failed
    };
    let only_root = match enter_namespaces() {
        Ok(only_root) => only_root,
        Err(message) => return report(message),
    };
    if only_root && (step.uid != 0 || step.gid != 0) {
        return report(format!(
            "USER {}:{}: this builder is not root of a sandbox (it runs unconfined as uid {}), so a step can \
             run only as root; run the build in a snapsign sandbox to use another USER",
            step.uid,
            step.gid,
            // SAFETY: getuid cannot fail.
            unsafe { libc::getuid() }
        ));
    }
    // SAFETY: this process is single-threaded (a fresh exec of the builder), so the
    // child may do anything; it never returns from `init`.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return report(format!("fork the step's pid 1: {}", io::Error::last_os_error()));
    }
    if pid == 0 {
        let message = init(step, only_root);
        write_all(status_fd, message.as_bytes());
        // SAFETY: _exit ends the child without running the parent's exit handlers twice.
        unsafe { libc::_exit(setup_failed) };
    }
    // SAFETY: closing our copy; the child keeps its own until it executes.
    unsafe { libc::close(status_fd) };
    wait(pid)
}

/// Makes the step's mount, pid, network, ipc and uts namespaces. When this
/// process may not (not root of its user namespace), it first makes a user
/// namespace mapping its one uid and gid to root: `Ok(true)`.
fn enter_namespaces() -> Result<bool, String> {
    let flags = libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
    // SAFETY: unshare only changes this process's namespaces.
    if unsafe { libc::unshare(flags) } == 0 {
        return Ok(false);
    }
    let first = io::Error::last_os_error();
    if first.raw_os_error() != Some(libc::EPERM) {
        return Err(format!("RUN needs namespaces: unshare(mount, pid, net, ipc, uts): {first}"));
    }
    // SAFETY: getuid/getgid cannot fail; unshare as above.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        let second = io::Error::last_os_error();
        return Err(format!(
            "RUN needs namespaces: this builder (uid {uid}) may not make them (unshare: {first}) nor a user \
             namespace to make them in ({second}); run the build in a snapsign sandbox, as root, or as a \
             user allowed unprivileged user namespaces"
        ));
    }
    for (file, text) in [
        ("/proc/self/setgroups", "deny".to_owned()),
        ("/proc/self/uid_map", format!("0 {uid} 1")),
        ("/proc/self/gid_map", format!("0 {gid} 1")),
    ] {
        std::fs::write(file, text).map_err(|e| format!("RUN: write {file} of the step's user namespace: {e}"))?;
    }
    // SAFETY: as above, now as root of the new user namespace.
    if unsafe { libc::unshare(flags) } != 0 {
        return Err(format!(
            "RUN needs namespaces: unshare(mount, pid, net, ipc, uts) in a user namespace of its own: {}",
            io::Error::last_os_error()
        ));
    }
    Ok(true)
}

/// Waits for the step's pid 1 and turns its end into this process's status.
fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child into a local.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if r < 0 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 1;
        }
    }
    if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) }
}

/// pid 1 of the step: root, identity, exec. Returns only the reason it failed.
fn init(step: &Confined, only_root: bool) -> String {
    match prepare(step, only_root) {
        Err(message) => message,
        Ok(()) => {
            let error = Command::new(&step.argv[0])
                .args(&step.argv[1..])
                .env_clear()
                .envs(step.env.iter().map(|e| e.split_once('=').unwrap_or((e, ""))))
                .exec();
            let path = step.env.iter().find_map(|e| e.strip_prefix("PATH=")).unwrap_or("");
            format!("RUN: execute {}: {error} (PATH={path}, in the image being built)", step.argv[0])
        }
    }
}

fn prepare(step: &Confined, only_root: bool) -> Result<(), String> {
    // SAFETY: prctl on this process: die with the confiner.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) };
    make_root(&step.root)?;
    // SAFETY: sethostname with a pointer and length of a live slice.
    if unsafe { libc::sethostname(HOSTNAME.as_ptr().cast(), HOSTNAME.len()) } != 0 {
        return Err(format!("RUN: set the step's hostname: {}", io::Error::last_os_error()));
    }
    snapsign_sandbox::raise_loopback()
        .map_err(|errno| format!("RUN: raise lo in the step's network: {}", io::Error::from_raw_os_error(errno)))?;
    for cap in 0..64u32 {
        if !KEPT_CAPABILITIES.contains(&cap) {
            // SAFETY: prctl on this process; EINVAL past the kernel's last capability is fine.
            unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong) };
        }
    }
    become_user(step, only_root)?;
    std::env::set_current_dir(&step.workdir)
        .map_err(|e| format!("RUN: enter the working directory {} as uid {}: {e}", step.workdir, step.uid))?;
    // Every descriptor but 0, 1 and 2 closes when the command executes: the status
    // descriptor, and whatever the builder's own caller let it inherit.
    // SAFETY: close_range with the CLOEXEC flag only marks descriptors of this process.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, libc::CLOSE_RANGE_CLOEXEC as libc::c_uint) } != 0 {
        return Err(format!("RUN: close the builder's descriptors: {}", io::Error::last_os_error()));
    }
    Ok(())
}

/// setgroups, setgid, setuid. A user namespace whose setgroups is denied
/// (a rootless sandbox) keeps the groups it has, and says so when the step
/// asked for more than its primary group; an id the namespace does not map
/// is an error saying which.
fn become_user(step: &Confined, only_root: bool) -> Result<(), String> {
    let denied = only_root || std::fs::read_to_string("/proc/self/setgroups").is_ok_and(|s| s.trim() == "deny");
    let unmapped = |what: &str, id: u32| {
        let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
        let one_uid = map.lines().count() == 1 && map.split_whitespace().nth(2) == Some("1");
        let why = if one_uid {
            "this sandbox maps only uid 0: it is a rootless sandbox without subordinate ids, where every step runs \
             as root (docs/sandbox-modes.md)"
        } else {
            "this sandbox's user namespace does not map it"
        };
        format!("RUN: become {what} {id}: {} ({why})", io::Error::last_os_error())
    };
    // SAFETY: identity calls with values and a live slice; each result is checked.
    unsafe {
        if denied {
            if step.groups.iter().any(|g| *g != step.gid) {
                eprintln!(
                    "note: supplementary groups {:?} are not set: this sandbox's user namespace denies setgroups",
                    step.groups
                );
            }
        } else if libc::setgroups(step.groups.len(), step.groups.as_ptr()) != 0 {
            return Err(format!("RUN: set the groups {:?}: {}", step.groups, io::Error::last_os_error()));
        }
        if libc::setgid(step.gid) != 0 {
            return Err(unmapped("gid", step.gid));
        }
        if libc::setuid(step.uid) != 0 {
            return Err(unmapped("uid", step.uid));
        }
        libc::umask(0o022);
    }
    Ok(())
}

fn cstr(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| format!("RUN: {} has a NUL byte", path.display()))
}

fn sys(what: &str, result: libc::c_int) -> Result<(), String> {
    if result == 0 { Ok(()) } else { Err(format!("RUN: {what}: {}", io::Error::last_os_error())) }
}

/// Turns the tree into the step's `/`: private mounts, the tree bound on
/// itself, a fresh `/proc` and `/dev` in it, `pivot_root`, the old root detached.
fn make_root(root: &Path) -> Result<(), String> {
    let none = std::ptr::null::<libc::c_char>();
    let rootc = cstr(root)?;
    let at = |rel: &str| cstr(&root.join(rel));
    // SAFETY: mount(2)/umount2(2)/pivot_root(2) with NUL-terminated strings that live
    // through each call; this process is alone in its new mount namespace.
    unsafe {
        sys(
            "make the mounts private",
            libc::mount(none, c"/".as_ptr(), none, libc::MS_REC | libc::MS_PRIVATE, none.cast()),
        )?;
        sys(
            &format!("bind the tree {} on itself", root.display()),
            libc::mount(rootc.as_ptr(), rootc.as_ptr(), none, libc::MS_BIND | libc::MS_REC, none.cast()),
        )?;
        let proc_dir = at("proc")?;
        sys(
            "mount /proc",
            libc::mount(
                c"proc".as_ptr(),
                proc_dir.as_ptr(),
                c"proc".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                none.cast(),
            ),
        )?;
        let dev = at("dev")?;
        sys(
            "mount a tmpfs on /dev",
            libc::mount(
                c"tmpfs".as_ptr(),
                dev.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=0755,size=1024k".as_ptr().cast(),
            ),
        )?;
        for device in DEVICES {
            let host = format!("/dev/{device}");
            if !Path::new(&host).exists() {
                continue;
            }
            let target = root.join("dev").join(device);
            std::fs::File::create(&target).map_err(|e| format!("RUN: create {}: {e}", target.display()))?;
            let (src, dst) = (cstr(Path::new(&host))?, cstr(&target)?);
            sys(&format!("bind {host}"), libc::mount(src.as_ptr(), dst.as_ptr(), none, libc::MS_BIND, none.cast()))?;
        }
        for (link, target) in [
            ("fd", "/proc/self/fd"),
            ("stdin", "/proc/self/fd/0"),
            ("stdout", "/proc/self/fd/1"),
            ("stderr", "/proc/self/fd/2"),
        ] {
            std::os::unix::fs::symlink(target, root.join("dev").join(link))
                .map_err(|e| format!("RUN: link /dev/{link}: {e}"))?;
        }
        let shm = at("dev/shm")?;
        sys("make /dev/shm", libc::mkdir(shm.as_ptr(), 0o1777))?;
        sys(
            "mount a tmpfs on /dev/shm",
            libc::mount(
                c"tmpfs".as_ptr(),
                shm.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                c"mode=1777,size=65536k".as_ptr().cast(),
            ),
        )?;
        sys("enter the tree", libc::chdir(rootc.as_ptr()))?;
        sys("pivot into the tree", libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int)?;
        sys("detach the builder's root", libc::umount2(c".".as_ptr(), libc::MNT_DETACH))?;
        sys("enter /", libc::chdir(c"/".as_ptr()))?;
    }
    Ok(())
}

fn write_all(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: write from a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}
