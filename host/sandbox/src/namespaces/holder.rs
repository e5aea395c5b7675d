//! The host side of a sandbox's holder: cloning it (its life is
//! [`super::child::holder`]), answering it until the sandbox's namespaces
//! are ready, holding those namespaces by descriptors, and killing it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Arc;

use anyhow::{Context, Result};

use super::child::holder::{AFTER_STEPS, DONE, FAILED, OUTER_MAPPED, READY_FOR_MAPS, SEAL, holder_main};
use super::child::{errno, read_byte, write_all};
use super::ids::{map_all_of_outer, map_outer, map_rootless};
use super::os::{KillOnError, open_ns, pipe};
use super::plan::HolderPlan;
use super::root::Step;
use super::spec::HolderSpec;
use crate::identity::UIDS_PER_SANDBOX;

/// The namespaces of one sandbox, held by descriptors and by its holder process.
pub(crate) struct Holder {
    pub(super) pid: libc::pid_t,
    pub(super) pidfd: OwnedFd,
    /// The sandbox's user namespace (sandbox root's).
    pub(super) user: OwnedFd,
    /// Rootless: the outer user namespace that owns the mount and pid
    /// namespaces (this user's uid as 0), which a launcher joins first.
    pub(super) outer: Option<OwnedFd>,
    /// Rootless with one uid: the nested user namespace of the sandbox user
    /// (its uid [`crate::SANDBOX_UID`] is sandbox root's, the one host uid).
    /// With subordinate ids the sandbox user is uid 1000 of `user` itself.
    pub(super) sandbox_user: Option<OwnedFd>,
    /// Rootless with a disk: the disk (tmpfs) the holder mounted.
    pub(super) disk: Option<OwnedFd>,
    pub(super) mnt: OwnedFd,
    pub(super) pid_ns: OwnedFd,
    pub(super) net: Option<Arc<OwnedFd>>,
    pub(super) uts: OwnedFd,
    pub(super) ipc: OwnedFd,
    pub(super) reaped: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holder").field("pid", &self.pid).finish_non_exhaustive()
    }
}

impl Holder {
    /// Clones the holder and waits until the sandbox's namespaces are ready.
    ///
    /// Call it from a thread that outlives the sandbox (a runtime worker):
    /// the holder dies with that thread (PR_SET_PDEATHSIG), as it must with
    /// this process.
    pub(crate) fn start(spec: &HolderSpec) -> Result<Holder> {
        let id = spec.id;
        let plan = HolderPlan::new(spec)?;
        let (steps, rootless) = (&plan.steps, plan.rootless);
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
            holder_main(&plan, to_host.as_raw_fd(), from_host.as_raw_fd());
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
        // The holder's next message: `expected`, or its failure, or nothing (it ended `when`).
        let answer = |expected: u8, when: &str| -> Result<()> {
            match read_byte(from_holder.as_raw_fd()) {
                Some(tag) if tag == expected => Ok(()),
                Some(FAILED) => Err(fail("")),
                _ => Err(ended(when)),
            }
        };
        let outer = match spec.rootless {
            Some((uid, gid)) => {
                // This user's uid and gid become root of the outer namespace, which owns
                // the mount and pid namespaces (sandbox root never has capabilities there).
                let outer = open_ns(pid, "user")?;
                map_outer(pid, (uid, gid), spec.subids.map(|(ids, index)| (ids, ids.extent(index))))
                    .with_context(|| format!("sandbox {id}: map its user namespace"))?;
                if !write_all(to_holder.as_raw_fd(), &[OUTER_MAPPED]) {
                    return Err(ended("before its outer uid maps were written"));
                }
                Some(outer)
            }
            None => None,
        };
        answer(READY_FOR_MAPS, "while setting up the namespaces")?;
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
                if spec.subids.is_some() {
                    map_all_of_outer(id, pid, outer)?;
                } else {
                    sandbox_user = Some(map_rootless(id, pid, outer, &inner)?);
                }
            }
        }
        if !write_all(to_holder.as_raw_fd(), &[READY_FOR_MAPS]) {
            return Err(ended("before its uid maps were written"));
        }
        answer(DONE, "while setting up the namespaces")?;
        let (user, mnt, pid_ns) = (open_ns(pid, "user")?, open_ns(pid, "mnt")?, open_ns(pid, "pid")?);
        let net = if spec.private_network { Some(Arc::new(open_ns(pid, "net")?)) } else { None };
        let (uts, ipc) = (open_ns(pid, "uts")?, open_ns(pid, "ipc")?);
        if rootless {
            if !write_all(to_holder.as_raw_fd(), &[SEAL]) {
                return Err(ended("before it was sealed"));
            }
            answer(SEAL, "while sealing itself")?;
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
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}
