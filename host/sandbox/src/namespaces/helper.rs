//! Short-lived helper processes: [`run_helper`] forks one, which runs a
//! body of system calls (in [`super::child::helper_main`]) and answers over
//! a socket pair with a byte, descriptors, or the step that failed.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use anyhow::{Context, Result, bail};

use super::child::holder::FAILED;
use super::child::{Control, errno, helper_main};

/// Runs `body` in a forked helper process and returns the descriptors it
/// sent with [`super::child::send_fds`]. `body` runs in the child: system calls on data
/// prepared before, no allocation; on failure it returns the index of the
/// failed step in `steps` (errno set).
pub(super) fn run_helper(
    what: &str,
    steps: &[&str],
    body: &dyn Fn(RawFd) -> Result<(), usize>,
) -> Result<Vec<OwnedFd>> {
    match helper(what, body)? {
        Ok(fds) => Ok(fds),
        Err((step, code)) => bail!(
            "{what}: '{}' failed ({})",
            steps.get(step).copied().unwrap_or("a step"),
            std::io::Error::from_raw_os_error(code)
        ),
    }
}

/// [`run_helper`], its failure left as (index of the failed step, errno).
pub(super) fn helper(
    what: &str,
    body: &dyn Fn(RawFd) -> Result<(), usize>,
) -> Result<Result<Vec<OwnedFd>, (usize, i32)>> {
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
        helper_main(body, child.as_raw_fd());
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
        (1, b'K') => Ok(Ok(fds)),
        (9, FAILED) => {
            let step = u32::from_le_bytes(data[1..5].try_into().expect("4 bytes")) as usize;
            let code = i32::from_le_bytes(data[5..9].try_into().expect("4 bytes"));
            Ok(Err((step, code)))
        }
        _ => bail!("{what}: the helper process ended without an answer (wait status {status})"),
    }
}
