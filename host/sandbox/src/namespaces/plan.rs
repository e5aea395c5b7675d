//! The data a forked child reads, prepared before the fork: NUL-terminated
//! strings, pointer arrays into them, raw descriptors and integers. The
//! holder lives on a [`HolderPlan`]; a launcher and its process on a
//! [`LaunchPlan`]. [`super::child`] only reads them.

use std::ffi::CString;
use std::os::fd::RawFd;

use anyhow::Result;

use super::os::c;
use super::root::{Step, root_steps};
use super::spec::{HolderSpec, Launch};
use crate::identity::User;

/// Where this process's arguments and environment strings are
/// (`/proc/self/stat` fields 48 to 51): a forked copy overwrites its own
/// copy of them, or the sandbox would read the host's in `/proc/N/cmdline`.
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct HostStrings {
    pub(super) args: (usize, usize),
    pub(super) env: (usize, usize),
}

impl HostStrings {
    /// Read once: they do not move.
    pub(super) fn find_cached() -> HostStrings {
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
}

/// What the holder reads in its whole life, made before the clone.
pub(super) struct HolderPlan {
    /// The steps that build the sandbox's root, run in order.
    pub(super) steps: Vec<Step>,
    /// The new root (a host path before the pivot).
    pub(super) root: CString,
    pub(super) hostname: Vec<u8>,
    pub(super) private_network: bool,
    pub(super) rootless: bool,
    pub(super) strings: HostStrings,
}

impl HolderPlan {
    pub(super) fn new(spec: &HolderSpec) -> Result<HolderPlan> {
        Ok(HolderPlan {
            steps: root_steps(spec)?,
            root: c(spec.root)?,
            hostname: spec.id.as_bytes().to_vec(),
            private_network: spec.private_network,
            rootless: spec.rootless.is_some(),
            strings: HostStrings::find_cached(),
        })
    }
}

/// What the launcher and the process read until exec: [`Launch`] as
/// NUL-terminated strings and pointer arrays, ready before the fork.
pub(super) struct LaunchPlan {
    pub(super) strings: HostStrings,
    pub(super) joins: Vec<(RawFd, libc::c_int)>,
    pub(super) user_ns: RawFd,
    /// Rootless: the outer user namespace, joined first (-1: none).
    pub(super) outer: RawFd,
    pub(super) uid: u32,
    pub(super) root: bool,
    pub(super) cgroup_procs: Vec<CString>,
    pub(super) rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    pub(super) cwd: CString,
    pub(super) candidates: Vec<CString>,
    _argv: Vec<CString>,
    pub(super) argv: Vec<*const libc::c_char>,
    _envp: Vec<CString>,
    pub(super) envp: Vec<*const libc::c_char>,
    /// `snapsign-sandbox: cannot run 'cmd': `
    pub(super) cannot_run: Vec<u8>,
    /// `snapsign-sandbox: cannot enter working directory 'dir': `
    pub(super) cannot_chdir: Vec<u8>,
    pub(super) cannot_enter: Vec<u8>,
}

// SAFETY: the raw pointers point into the CStrings owned by the same struct,
// which is moved whole into the pre_exec closure and never mutated.
unsafe impl Send for LaunchPlan {}
// SAFETY: as above; shared access only reads.
unsafe impl Sync for LaunchPlan {}

fn lossless(s: &str) -> CString {
    // Callers checked for NUL bytes (process::environment, ProcessSpec); a stray one ends the string.
    CString::new(s.split('\0').next().unwrap_or_default()).expect("no NUL")
}

impl LaunchPlan {
    pub(super) fn new(launch: Launch, joins: Vec<(RawFd, libc::c_int)>, user_ns: RawFd, outer: RawFd) -> LaunchPlan {
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
        LaunchPlan {
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
}
