//! The launcher (the `pre_exec` of a spawned child) and the process it
//! forks, until exec: both read only their [`LaunchPlan`] (see [`super`]
//! for the rule).

use super::capabilities::{CAP_SYS_RESOURCE, limit_capabilities};
use super::{errno, reset_signals, write_all, write_file};
use crate::namespaces::plan::LaunchPlan;

impl LaunchPlan {
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
    pub(in crate::namespaces) fn run(&self) -> std::io::Result<()> {
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
            // Rootless with one uid, setgroups is denied (the kernel's rule for an unprivileged
            // gid map): the process keeps this user's supplementary groups, unmapped inside.
            // With subordinate ids (newgidmap allows setgroups) they are dropped, as by root.
            if (libc::setgroups(0, std::ptr::null()) != 0 && self.outer < 0)
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
