//! The bodies of the helpers forked by `ids` and `ports` (run by
//! [`super::helper_main`]), and the `pre_exec` of `rm` in the keeper
//! namespace. Each reads only what its caller prepared; on failure a body
//! returns the index of the failed step in its `*_STEPS` (errno set).

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::{MAX_SENT_FDS, send_fds, write_file};

/// The steps of [`map_rootless`], by index.
pub(in crate::namespaces) const MAP_ROOTLESS_STEPS: [&str; 9] = [
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

/// Rootless with one uid: joins `outer`, writes `0 0 1` to the sandbox's
/// `(uid_map, gid_map)`, then in the sandbox's user namespace `inner` makes
/// the sandbox user's, maps it with `user_map` and sends it.
pub(in crate::namespaces) fn map_rootless(
    outer: RawFd,
    (uid_map, gid_map): (&CStr, &CStr),
    inner: RawFd,
    user_map: &[u8],
    sock: RawFd,
) -> Result<(), usize> {
    write_sandbox_maps(outer, (uid_map, gid_map), b"0 0 1\n")?;
    // SAFETY: system calls on data prepared before the fork.
    unsafe {
        if libc::setns(inner, libc::CLONE_NEWUSER) != 0 {
            return Err(3);
        }
        if libc::unshare(libc::CLONE_NEWUSER) != 0 {
            return Err(4);
        }
        if !write_file(c"/proc/self/uid_map", user_map) {
            return Err(5);
        }
        if !write_file(c"/proc/self/gid_map", user_map) {
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
}

/// The steps of [`map_all_of_outer`], by index.
pub(in crate::namespaces) const MAP_ALL_OF_OUTER_STEPS: [&str; 4] = [
    "join the outer user namespace",
    "write the sandbox's uid_map (0 0 1, 1 1 65535)",
    "write the sandbox's gid_map (0 0 1, 1 1 65535)",
    "answer",
];

/// Rootless with subordinate ids: joins `outer` and writes `map` to the
/// sandbox's `(uid_map, gid_map)`.
pub(in crate::namespaces) fn map_all_of_outer(
    outer: RawFd,
    (uid_map, gid_map): (&CStr, &CStr),
    map: &[u8],
    sock: RawFd,
) -> Result<(), usize> {
    write_sandbox_maps(outer, (uid_map, gid_map), map)?;
    if !send_fds(sock, &[]) {
        return Err(3);
    }
    Ok(())
}

/// Steps 0 to 2 of both map helpers: joins `outer` and writes `map` to the
/// sandbox's `(uid_map, gid_map)`.
fn write_sandbox_maps(outer: RawFd, (uid_map, gid_map): (&CStr, &CStr), map: &[u8]) -> Result<(), usize> {
    // SAFETY: setns on a descriptor the caller holds open.
    if unsafe { libc::setns(outer, libc::CLONE_NEWUSER) } != 0 {
        return Err(0);
    }
    if !write_file(uid_map, map) {
        return Err(1);
    }
    if !write_file(gid_map, map) {
        return Err(2);
    }
    Ok(())
}

/// The steps of [`listen`], by index.
pub(in crate::namespaces) const LISTEN_STEPS: [&str; 4] =
    ["join the outer user namespace", "enter the network namespace", "listen on a port", "send them"];

/// Joins `outer` and the network namespace `net`, listens on each of
/// `addresses` (at most [`MAX_SENT_FDS`]) and sends the sockets.
pub(in crate::namespaces) fn listen(
    outer: RawFd,
    net: RawFd,
    addresses: &[libc::sockaddr_in],
    sock: RawFd,
) -> Result<(), usize> {
    let mut fds = [-1 as RawFd; MAX_SENT_FDS];
    // SAFETY: system calls on data prepared before the fork.
    unsafe {
        if libc::setns(outer, libc::CLONE_NEWUSER) != 0 {
            return Err(0);
        }
        if libc::setns(net, libc::CLONE_NEWNET) != 0 {
            return Err(1);
        }
        for (slot, address) in fds.iter_mut().zip(addresses) {
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
}

/// Joins the user namespace `keeper`, then runs the caller's `body` (the
/// file API's, held to the same rule); step 0 is the join, 1 the body.
pub(in crate::namespaces) fn in_keeper(
    keeper: RawFd,
    body: &dyn Fn(RawFd) -> Result<(), i32>,
    sock: RawFd,
) -> Result<(), usize> {
    // SAFETY: setns, then the caller's system calls; errno carries the failure.
    unsafe {
        if libc::setns(keeper, libc::CLONE_NEWUSER) != 0 {
            return Err(0);
        }
        if let Err(code) = body(sock) {
            *libc::__errno_location() = code;
            return Err(1);
        }
    }
    Ok(())
}

/// Joins the user namespace `fd` (the `pre_exec` of `rm` in the keeper namespace).
pub(in crate::namespaces) fn join_user_namespace(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: setns on a descriptor the caller holds open.
    if unsafe { libc::setns(fd, libc::CLONE_NEWUSER) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
