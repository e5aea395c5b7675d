//! The holder's whole life, in the cloned child: it runs the root's steps,
//! pivots, makes the sandbox's namespaces as the host answers, then reaps
//! orphans as pid 1 until killed. Everything it reads is in its
//! [`HolderPlan`] (see [`super`] for the rule).

use std::os::fd::RawFd;

use super::{errno, read_byte, reset_signals, write_all, write_file};
use crate::namespaces::plan::HolderPlan;
use crate::namespaces::root::Step;

/// Rootless: the holder's descriptor of the sandbox's disk (its tmpfs root),
/// which the host opens through `/proc/{holder}/fd/N` before the holder seals itself.
static DISK_FD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(-1);

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
            Step::Chown(path, id) => libc::lchown(path.as_ptr(), *id, *id) == 0,
            Step::OpenDisk(path) => {
                let fd = libc::open(path.as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC);
                DISK_FD.store(fd, std::sync::atomic::Ordering::Relaxed);
                fd >= 0
            }
        }
    }
}

/// Holder → host messages: a tag byte, then for failures the step index (u32) and errno (i32).
pub(in crate::namespaces) const READY_FOR_MAPS: u8 = b'M';
pub(in crate::namespaces) const DONE: u8 = b'D';
pub(in crate::namespaces) const FAILED: u8 = b'F';
/// Rootless: host → holder, the outer namespace's maps are written.
pub(in crate::namespaces) const OUTER_MAPPED: u8 = b'O';
/// Rootless: host → holder, the host holds the namespaces: seal yourself
/// (not dumpable); holder → host, sealed.
pub(in crate::namespaces) const SEAL: u8 = b'S';

/// Failure points after the root steps (their index is `steps.len() + n`).
pub(in crate::namespaces) const AFTER_STEPS: [&str; 11] = [
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
pub(in crate::namespaces) fn holder_main(plan: &HolderPlan, to_host: RawFd, from_host: RawFd) -> ! {
    let (steps, root, hostname) = (&plan.steps[..], plan.root.as_c_str(), &plan.hostname[..]);
    let (private_network, rootless, strings) = (plan.private_network, plan.rootless, &plan.strings);
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
        if private_network && super::net::raise_loopback().is_err() {
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
