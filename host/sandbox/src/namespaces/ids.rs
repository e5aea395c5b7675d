//! Rootless user and group ids: the maps of a sandbox's outer and inner
//! user namespaces (`newuidmap`/`newgidmap`, or one uid), and the *keeper*
//! namespace in which this user's sandbox files are chowned, read
//! ([`in_keeper`]) and removed ([`remove_tree`]).

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;

use anyhow::{Context, Result, bail};

use super::child::{helpers, keeper_main};
use super::helper::{helper, run_helper};
use super::os::{KillOnError, c, open_ns, pipe};
use crate::identity::{Extent, SUBORDINATE_IDS, SubIds};

/// Rootless: writes the maps of the sandbox's user namespace `inner`
/// (sandbox root is root of `outer`, i.e. this user), from a helper that
/// joined `outer` (the only place allowed to write them), then makes in
/// `inner` the sandbox user's namespace ([`crate::SANDBOX_UID`] as sandbox
/// root) and returns it.
pub(super) fn map_rootless(id: &str, holder: libc::pid_t, outer: &OwnedFd, inner: &OwnedFd) -> Result<OwnedFd> {
    let uid_map = c(format!("/proc/{holder}/uid_map"))?;
    let gid_map = c(format!("/proc/{holder}/gid_map"))?;
    let user_map = format!("{} 0 1\n", crate::identity::SANDBOX_UID).into_bytes();
    let (outer, inner) = (outer.as_raw_fd(), inner.as_raw_fd());
    let body = |sock: RawFd| helpers::map_rootless(outer, (&uid_map, &gid_map), inner, &user_map, sock);
    let mut fds = run_helper(&format!("sandbox {id}: map its user namespaces"), &helpers::MAP_ROOTLESS_STEPS, &body)?;
    fds.pop().ok_or_else(|| anyhow::anyhow!("sandbox {id}: the helper mapping its user namespaces sent nothing"))
}

/// Rootless: maps the user namespace of `pid`, a child of this process
/// made with CLONE_NEWUSER: this user's uid and gid as 0, and with `subids`
/// the ids of the extent as 1.. (by `newuidmap` and `newgidmap`, which
/// check `/etc/subuid` and `/etc/subgid`); without, only 0 (written here).
pub(super) fn map_outer(pid: libc::pid_t, (uid, gid): (u32, u32), subids: Option<(&SubIds, Extent)>) -> Result<()> {
    let Some((ids, extent)) = subids else {
        for (file, value) in
            [("setgroups", "deny".to_owned()), ("uid_map", format!("0 {uid} 1")), ("gid_map", format!("0 {gid} 1"))]
        {
            let path = format!("/proc/{pid}/{file}");
            std::fs::write(&path, &value).with_context(|| format!("write {path} ({value})"))?;
        }
        return Ok(());
    };
    for (tool, own, start, file) in
        [(&ids.newuidmap, uid, extent.uid_start, "/etc/subuid"), (&ids.newgidmap, gid, extent.gid_start, "/etc/subgid")]
    {
        let args = [pid as u32, 0, own, 1, 1, start, extent.count].map(|n| n.to_string());
        let run = std::process::Command::new(tool).args(&args).stdin(std::process::Stdio::null()).output();
        let out = run.with_context(|| format!("run {}", tool.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} failed ({}): {}; check this user's range in {file} and that {} is set-uid root (or has \
                 cap_setuid/cap_setgid)",
                tool.display(),
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim(),
                tool.display()
            );
        }
    }
    Ok(())
}

/// Rootless with subordinate ids: maps every id of `outer` (0..=65535) into
/// the sandbox's user namespace (of `holder`) one to one, from a helper
/// that joined `outer`. The sandbox user needs no namespace of its own.
pub(super) fn map_all_of_outer(id: &str, holder: libc::pid_t, outer: &OwnedFd) -> Result<()> {
    let uid_map = c(format!("/proc/{holder}/uid_map"))?;
    let gid_map = c(format!("/proc/{holder}/gid_map"))?;
    // One line per extent of the outer map (a line may not span two of them).
    let map = format!("0 0 1\n1 1 {SUBORDINATE_IDS}\n").into_bytes();
    let outer = outer.as_raw_fd();
    let body = |sock: RawFd| helpers::map_all_of_outer(outer, (&uid_map, &gid_map), &map, sock);
    run_helper(&format!("sandbox {id}: map its user namespace"), &helpers::MAP_ALL_OF_OUTER_STEPS, &body).map(drop)
}

/// Rootless: a user namespace that maps what every rootless sandbox's outer
/// one maps (this user as 0; with `subids` all its blocks from 1), held by
/// its descriptor alone. Root there, a helper may chown, read and remove
/// any file of this user's sandboxes ([`in_keeper`], [`remove_tree`]).
pub(crate) fn keeper_namespace(owner: (u32, u32), subids: Option<&SubIds>) -> Result<OwnedFd> {
    let (wait_end, hold_end) = pipe()?;
    let (wait_fd, hold_fd) = (wait_end.as_raw_fd(), hold_end.as_raw_fd());
    let flags = libc::CLONE_NEWUSER | libc::SIGCHLD;
    // SAFETY: a fork-like clone; the child only makes system calls and _exits.
    let pid = unsafe { libc::syscall(libc::SYS_clone, flags as libc::c_ulong, 0usize, 0usize, 0usize, 0usize) };
    if pid < 0 {
        return Err(std::io::Error::last_os_error())
            .context("make a user namespace for this user's sandbox files (needs unprivileged user namespaces)");
    }
    if pid == 0 {
        keeper_main(wait_fd, hold_fd);
    }
    let pid = pid as libc::pid_t;
    // Dropped last: kills and reaps the child once its namespace is held by a descriptor.
    let _reap = KillOnError(pid);
    drop(wait_end);
    map_outer(pid, owner, subids.map(|ids| (ids, ids.all())))
        .context("map the user namespace for this user's sandbox files")?;
    let ns = open_ns(pid, "user")?;
    drop(hold_end);
    Ok(ns)
}

/// Runs `body` in a helper that joined the user namespace `keeper` (as its
/// root: capabilities over every file whose owner it maps); the helper's
/// descriptors sent with [`super::child::send_fds`], or the errno of the failed step.
pub(crate) fn in_keeper(
    what: &str,
    keeper: &OwnedFd,
    body: &dyn Fn(RawFd) -> Result<(), i32>,
) -> Result<std::io::Result<Vec<OwnedFd>>> {
    let keeper = keeper.as_raw_fd();
    let run = |sock: RawFd| helpers::in_keeper(keeper, body, sock);
    Ok(match helper(what, &run)? {
        Ok(fds) => Ok(fds),
        Err((0, code)) => {
            bail!("{what}: join this user's sandbox namespace: {}", std::io::Error::from_raw_os_error(code))
        }
        Err((_, code)) => Err(crate::files::io_error(code)),
    })
}

/// Removes `path` and everything under it as root of the user namespace
/// `keeper` (which maps every owner a sandbox can give a file: directories
/// of subordinate uids and mode 000 included), with `rm -rf`.
pub(crate) fn remove_tree(path: &Path, keeper: &OwnedFd) -> Result<()> {
    if std::fs::symlink_metadata(path).is_err() {
        return Ok(());
    }
    let rm =
        crate::identity::find_tool("rm").ok_or_else(|| anyhow::anyhow!("remove {}: rm not found", path.display()))?;
    let fd = keeper.as_raw_fd();
    let mut cmd = std::process::Command::new(&rm);
    cmd.args(["-rf", "--one-file-system", "--"]).arg(path).env_clear().stdin(std::process::Stdio::null());
    // SAFETY: the child only joins `keeper` (setns, no allocation); its root keeps its capabilities
    // there through exec.
    unsafe { cmd.pre_exec(move || helpers::join_user_namespace(fd)) };
    let out = cmd
        .output()
        .with_context(|| format!("remove {}: run {} in this user's sandbox namespace", path.display(), rm.display()))?;
    if !out.status.success() || std::fs::symlink_metadata(path).is_ok() {
        bail!(
            "remove {}: {} -rf as root of this user's sandbox namespace left it ({}): {}; remove it with: \
             sudo rm -rf {0}",
            path.display(),
            rm.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A range this user does not own: newuidmap refuses it (root too: root
    /// is not exempt), and the error names the tool, its arguments and the
    /// file to check, which is what `Sandboxes::new` reports before it falls
    /// back to one uid.
    #[test]
    fn a_range_newuidmap_refuses_gives_an_error_naming_the_tool_and_the_file() {
        let Some(newuidmap) = crate::identity::find_tool("newuidmap") else {
            panic!("newuidmap is not installed; install Debian's uidmap (CI does)");
        };
        // SAFETY: geteuid and getegid cannot fail.
        let owner = unsafe { (libc::geteuid(), libc::getegid()) };
        let ids = SubIds {
            uid: owner.0,
            gid: owner.1,
            uid_start: 4_000_000_000,
            gid_start: 4_000_000_000,
            ranges: 2,
            newuidmap: newuidmap.clone(),
            newgidmap: newuidmap.with_file_name("newgidmap"),
        };
        let err = format!("{:#}", keeper_namespace(owner, Some(&ids)).unwrap_err());
        for needle in [newuidmap.to_str().unwrap(), "1 1 4000000000 131070", "/etc/subuid", "failed"] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
        // Without subordinate ids, this user's one uid maps (no tool needed).
        keeper_namespace(owner, None).expect("a user namespace of one uid");
    }
}
