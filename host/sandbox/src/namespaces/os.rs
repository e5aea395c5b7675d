//! Small helpers of the host side (never called after a fork): pipes,
//! namespace descriptors, a guard that kills a half-started child, paths as
//! C strings.

use std::ffi::CString;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use anyhow::{Context, Result};

/// `path` as a C string; an error when it holds a NUL byte.
pub(super) fn c(path: impl AsRef<Path>) -> Result<CString> {
    let path = path.as_ref();
    CString::new(path.as_os_str().as_bytes()).with_context(|| format!("path {} has a NUL byte", path.display()))
}

/// A close-on-exec pipe: (read end, write end).
pub(super) fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 into a local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("create a pipe");
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// A descriptor of namespace `name` of process `pid`.
pub(super) fn open_ns(pid: libc::pid_t, name: &str) -> Result<OwnedFd> {
    let path = format!("/proc/{pid}/ns/{name}");
    let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
    Ok(file.into())
}

/// Kills and reaps a half-started holder.
pub(super) struct KillOnError(pub(super) libc::pid_t);

impl Drop for KillOnError {
    fn drop(&mut self) {
        // SAFETY: kill and reap our own child.
        unsafe {
            libc::kill(self.0, libc::SIGKILL);
            libc::waitpid(self.0, std::ptr::null_mut(), 0);
        }
    }
}
