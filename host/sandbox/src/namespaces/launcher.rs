//! Starting one process in a sandbox: a [`Launch`] becomes a
//! [`std::process::Command`] whose `pre_exec` is the launcher
//! ([`super::child::launcher`]), reading a [`LaunchPlan`] made here before
//! the spawn forks.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;

use super::holder::Holder;
use super::plan::LaunchPlan;
use super::spec::Launch;
use crate::identity::User;

impl Holder {
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
        let plan = LaunchPlan::new(launch, joins, user_ns, outer);
        // SAFETY: the closure only makes system calls on `plan` (see `child::launcher`).
        unsafe { cmd.pre_exec(move || plan.run()) };
        cmd
    }
}
