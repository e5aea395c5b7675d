//! How processes are confined: Linux namespaces made by this process (no
//! helper binary, no system package) — as root, or as an ordinary user
//! through unprivileged user namespaces — or (only when the operator
//! accepted it) nothing at all.

use anyhow::{Result, bail};

/// The confinement of every process of every sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Confinement {
    /// As root: own user (a host uid range per sandbox), mount, pid,
    /// network, ipc and uts namespaces; only the sandbox's own directories
    /// writable; the limits of [`crate::Limits`]. See the crate documentation.
    Namespaces,
    /// As an ordinary user: the same namespaces, root layout, descriptor
    /// hygiene and private network, made through unprivileged user
    /// namespaces. The user's own host uid is sandbox root; the other uids
    /// are its subordinate ids where it has them, else the sandbox user
    /// [`crate::SANDBOX_UID`] is the same one uid ([`crate::RootlessIds`]);
    /// limits come from what the machine delegates (a cgroup v2 subtree, else
    /// rlimits). See `docs/sandbox-modes.md`.
    Rootless,
    /// Processes run directly on the host, as the host process's user and
    /// with the host's filesystem and network; only the working directory is
    /// mapped to the sandbox's directory. No limits. Only when the operator
    /// said so.
    Unconfined,
}

impl Confinement {
    /// [`Confinement::Namespaces`] when this process is root; otherwise
    /// [`Confinement::Rootless`] when unprivileged user namespaces work here
    /// (probed); otherwise an error naming the setting that refuses them and
    /// the command that enables it, unless `allow_unconfined`: then
    /// [`Confinement::Unconfined`] and a warning.
    pub fn detect(allow_unconfined: bool) -> Result<Confinement> {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            return Ok(Confinement::Namespaces);
        }
        let probe = probe_user_namespaces();
        detect_as(false, probe, &UsernsSettings::read(), allow_unconfined)
    }

    /// One line for logs and the docs' table: the mode and its identities.
    pub fn describe(&self) -> &'static str {
        match self {
            Confinement::Namespaces => "root: namespaces, a host uid range per sandbox",
            Confinement::Rootless => "rootless: unprivileged user namespaces",
            Confinement::Unconfined => "UNCONFINED: processes run directly on this host",
        }
    }

    /// True for the two confined modes.
    pub fn is_confined(&self) -> bool {
        !matches!(self, Confinement::Unconfined)
    }
}

/// What trying to make an unprivileged user namespace (with mount, pid and
/// network namespaces in it) gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsernsProbe {
    /// It worked, and the new namespace's root could change mounts.
    Works,
    /// clone(CLONE_NEWUSER | …) failed with this errno.
    CloneRefused(i32),
    /// The namespace was made, but its root could not use its capabilities
    /// (this errno from a mount call): AppArmor's restriction does that.
    NoCapabilities(i32),
}

/// The kernel settings that govern unprivileged user namespaces (`None`: absent here).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsernsSettings {
    /// `kernel.unprivileged_userns_clone` (Debian and Ubuntu kernels).
    pub unprivileged_userns_clone: Option<i64>,
    /// `user.max_user_namespaces`.
    pub max_user_namespaces: Option<i64>,
    /// `kernel.apparmor_restrict_unprivileged_userns` (Ubuntu 23.10+).
    pub apparmor_restrict_unprivileged_userns: Option<i64>,
}

impl UsernsSettings {
    /// Reads them from `/proc/sys`.
    pub fn read() -> UsernsSettings {
        let read = |path: &str| std::fs::read_to_string(path).ok().and_then(|v| v.trim().parse().ok());
        UsernsSettings {
            unprivileged_userns_clone: read("/proc/sys/kernel/unprivileged_userns_clone"),
            max_user_namespaces: read("/proc/sys/user/max_user_namespaces"),
            apparmor_restrict_unprivileged_userns: read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns"),
        }
    }
}

/// Tries, in a short-lived child, to make a user namespace with mount, pid
/// and network namespaces and to change a mount in it. Makes only system
/// calls in the child (safe in a multi-threaded process, and in a
/// `pre_exec` closure).
pub fn probe_user_namespaces() -> UsernsProbe {
    let flags = libc::CLONE_NEWUSER | libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWNET | libc::SIGCHLD;
    // SAFETY: a fork-like clone; the child only makes system calls and _exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return UsernsProbe::CloneRefused(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    if pid == 0 {
        // SAFETY: system calls only, then _exit.
        unsafe {
            let null = std::ptr::null::<libc::c_char>();
            let rc = libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null());
            libc::_exit(if rc == 0 { 0 } else { (*libc::__errno_location()).clamp(1, 125) })
        }
    }
    let mut status = 0;
    // SAFETY: waitpid of our own child.
    while unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) } < 0
        && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
    {}
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        UsernsProbe::Works
    } else if libc::WIFEXITED(status) {
        UsernsProbe::NoCapabilities(libc::WEXITSTATUS(status))
    } else {
        UsernsProbe::NoCapabilities(libc::EPERM)
    }
}

/// Why user namespaces are refused here and the one command that enables
/// them, from a failed probe and the settings read.
pub fn refusal(probe: UsernsProbe, settings: &UsernsSettings) -> String {
    let errno = match probe {
        UsernsProbe::Works => 0,
        UsernsProbe::CloneRefused(e) | UsernsProbe::NoCapabilities(e) => e,
    };
    let error = std::io::Error::from_raw_os_error(errno);
    let cause = if settings.max_user_namespaces == Some(0) || probe == UsernsProbe::CloneRefused(libc::ENOSPC) {
        format!(
            "user namespaces are disabled by user.max_user_namespaces = {} (making one failed: {error}); enable them \
             with: sudo sysctl -w user.max_user_namespaces=65536",
            settings.max_user_namespaces.map_or("its limit".into(), |v| v.to_string())
        )
    } else if settings.unprivileged_userns_clone == Some(0) {
        format!(
            "unprivileged user namespaces are disabled by kernel.unprivileged_userns_clone = 0 (making one failed: \
             {error}); enable them with: sudo sysctl -w kernel.unprivileged_userns_clone=1"
        )
    } else if settings.apparmor_restrict_unprivileged_userns == Some(1)
        || matches!(probe, UsernsProbe::NoCapabilities(_))
    {
        format!(
            "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns = {}): \
             one was made but its root could not change a mount ({error}); enable them with: sudo sysctl -w \
             kernel.apparmor_restrict_unprivileged_userns=0 (or give this binary an AppArmor profile with \
             'userns,')",
            settings.apparmor_restrict_unprivileged_userns.map_or("absent".into(), |v| v.to_string())
        )
    } else {
        format!(
            "making an unprivileged user namespace failed ({error}) although kernel.unprivileged_userns_clone, \
             user.max_user_namespaces and AppArmor allow it: a seccomp filter or a container runtime refuses \
             clone(CLONE_NEWUSER); allow it there (e.g. run the container with --security-opt seccomp=unconfined)"
        )
    };
    format!(
        "local sandboxes of an ordinary user are confined with unprivileged user namespaces, but {cause}; or run \
         as root (nothing needs installing), or pass --allow-unconfined to run sandbox processes directly on this \
         host without any confinement"
    )
}

/// [`Confinement::detect`] for a process that is root or not, with this probe result.
pub(crate) fn detect_as(
    root: bool,
    probe: UsernsProbe,
    settings: &UsernsSettings,
    allow_unconfined: bool,
) -> Result<Confinement> {
    if root {
        return Ok(Confinement::Namespaces);
    }
    if probe == UsernsProbe::Works {
        return Ok(Confinement::Rootless);
    }
    let why = refusal(probe, settings);
    if allow_unconfined {
        tracing::warn!(
            "{why}. Sandbox processes will run UNCONFINED, directly on this host with this process's user and \
             rights, because unconfined sandboxes were allowed"
        );
        return Ok(Confinement::Unconfined);
    }
    bail!("{why}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_gets_namespaces_a_user_rootless_and_unconfined_only_when_told() {
        let none = UsernsSettings::default();
        for allow in [false, true] {
            assert_eq!(
                detect_as(true, UsernsProbe::CloneRefused(libc::EPERM), &none, allow).unwrap(),
                Confinement::Namespaces
            );
            assert_eq!(detect_as(false, UsernsProbe::Works, &none, allow).unwrap(), Confinement::Rootless);
        }
        let refused = UsernsProbe::CloneRefused(libc::EPERM);
        let err = detect_as(false, refused, &none, false).unwrap_err().to_string();
        assert!(err.contains("root") && err.contains("--allow-unconfined"), "{err}");
        assert_eq!(detect_as(false, refused, &none, true).unwrap(), Confinement::Unconfined);
    }

    #[test]
    fn a_refusal_names_the_setting_and_the_command_that_enables_it() {
        let cases = [
            (
                UsernsProbe::CloneRefused(libc::ENOSPC),
                UsernsSettings { max_user_namespaces: Some(0), ..Default::default() },
                "sudo sysctl -w user.max_user_namespaces=65536",
            ),
            (
                UsernsProbe::CloneRefused(libc::EPERM),
                UsernsSettings {
                    unprivileged_userns_clone: Some(0),
                    max_user_namespaces: Some(9),
                    ..Default::default()
                },
                "sudo sysctl -w kernel.unprivileged_userns_clone=1",
            ),
            (
                UsernsProbe::NoCapabilities(libc::EPERM),
                UsernsSettings { apparmor_restrict_unprivileged_userns: Some(1), ..Default::default() },
                "sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0",
            ),
            (UsernsProbe::CloneRefused(libc::EPERM), UsernsSettings::default(), "seccomp"),
        ];
        for (probe, settings, command) in cases {
            let message = refusal(probe, &settings);
            assert!(message.contains(command), "{probe:?}: {message}");
            assert!(message.contains("run as root") && message.contains("--allow-unconfined"), "{message}");
        }
    }
}
