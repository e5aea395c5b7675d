//! The code that runs in a forked child: the holder's whole life
//! ([`holder`]), the launcher and its process until exec ([`launcher`]),
//! and a helper's ([`helper_main`], its bodies in [`helpers`]).
//!
//! The rule: a child forked from this multi-threaded process may find any
//! lock held (the allocator's included) by a thread that does not exist in
//! it, so from the fork to exec or `_exit` it makes only system calls on
//! data prepared before the fork ([`super::plan`]), with no allocation and
//! no locks. The functions here take only that prepared data (plans,
//! C strings, byte slices, raw descriptors, integers) and stack buffers;
//! the test at the end of this file fails when the source of this module
//! names an allocating or locking type, macro or method. The one helper
//! body written elsewhere is the file API's (`crate::sandbox`, run through
//! [`helpers::in_keeper`]): it is held to the same rule by review.

pub(in crate::namespaces) mod capabilities;
pub(in crate::namespaces) mod helpers;
pub(in crate::namespaces) mod holder;
pub(in crate::namespaces) mod launcher;
pub(crate) mod net;

use std::ffi::CStr;
use std::os::fd::RawFd;

use super::plan::HostStrings;
use holder::FAILED;

/// What `/proc/N/cmdline` of the holder and of a process before exec says,
/// instead of this host process's arguments (which may hold secrets).
static PROCESS_NAME: [u8; 22] = *b"snapsign-sandbox-init\0";

/// The calling thread's errno.
pub(in crate::namespaces) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Writes all of `bytes` to `fd`; for the forked side (no allocation).
pub(in crate::namespaces) fn write_all(fd: RawFd, mut bytes: &[u8]) -> bool {
    while !bytes.is_empty() {
        // SAFETY: write(2) from a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n < 0 {
            if errno() == libc::EINTR {
                continue;
            }
            return false;
        }
        bytes = &bytes[n as usize..];
    }
    true
}

/// Writes `value` to the file at `path` (open, write, close); false on failure.
pub(in crate::namespaces) fn write_file(path: &CStr, value: &[u8]) -> bool {
    // SAFETY: open/write/close on a NUL-terminated path and a live slice.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return false;
        }
        let ok = write_all(fd, value);
        libc::close(fd);
        ok
    }
}

pub(in crate::namespaces) fn read_byte(fd: RawFd) -> Option<u8> {
    let mut byte = 0u8;
    loop {
        // SAFETY: read(2) of one byte into a local.
        let n = unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) };
        if n == 1 {
            return Some(byte);
        }
        if n < 0 && errno() == libc::EINTR {
            continue;
        }
        return None;
    }
}

/// Restores every signal's default action: handlers installed by this host
/// process (Tokio's SIGCHLD, a SIGTERM handler) must not run in a forked child.
pub(in crate::namespaces) fn reset_signals() {
    // SAFETY: sigaction with a zeroed (SIG_DFL) action and an empty mask; failures for KILL/STOP are ignored.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=64 {
            libc::sigaction(signal, &action, std::ptr::null_mut());
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
    }
}

impl HostStrings {
    /// In a forked child: replaces the strings by [`PROCESS_NAME`] and zeros.
    pub(in crate::namespaces) fn wipe(&self) {
        for (start, end) in [self.args, self.env] {
            if start == 0 || end <= start {
                continue;
            }
            // SAFETY: the range is this process's own argument/environment block
            // (mapped, writable stack memory); the forked child owns its copy.
            unsafe {
                std::ptr::write_bytes(start as *mut u8, 0, end - start);
                if start == self.args.0 {
                    let n = PROCESS_NAME.len().min(end - start);
                    std::ptr::copy_nonoverlapping(PROCESS_NAME.as_ptr(), start as *mut u8, n);
                }
            }
        }
    }
}

/// Most descriptors one helper sends back.
pub(in crate::namespaces) const MAX_SENT_FDS: usize = 64;

/// Control buffer of a message carrying up to [`MAX_SENT_FDS`] descriptors.
#[repr(C, align(8))]
pub(in crate::namespaces) struct Control(pub(in crate::namespaces) [u8; 512]);

/// Sends `fds` (and one byte, `K`) over the socket `sock`; for a forked
/// helper (no allocation).
pub(crate) fn send_fds(sock: RawFd, fds: &[RawFd]) -> bool {
    if fds.len() > MAX_SENT_FDS {
        return false;
    }
    if fds.is_empty() {
        return write_all(sock, b"K");
    }
    let mut control = Control([0; 512]);
    let mut data = [b'K'];
    // SAFETY: a msghdr over local buffers; CMSG_* stay inside `control` (sized for MAX_SENT_FDS).
    unsafe {
        let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: 1 };
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        let bytes = std::mem::size_of_val(fds) as u32;
        msg.msg_control = control.0.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(bytes) as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(bytes) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr().cast::<u8>(), libc::CMSG_DATA(cmsg), bytes as usize);
        libc::sendmsg(sock, &msg, 0) == 1
    }
}

/// A forked helper's life: runs `body` with the socket `sock` to the host,
/// then exits; on failure it first sends [`FAILED`], the index of the failed
/// step and errno.
pub(in crate::namespaces) fn helper_main(body: &dyn Fn(RawFd) -> Result<(), usize>, sock: RawFd) -> ! {
    // SAFETY: system calls only, then _exit.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if let Err(step) = body(sock) {
            let mut message = [0u8; 9];
            message[0] = FAILED;
            message[1..5].copy_from_slice(&(step as u32).to_le_bytes());
            message[5..9].copy_from_slice(&errno().to_le_bytes());
            write_all(sock, &message);
            libc::_exit(1);
        }
        libc::_exit(0)
    }
}

/// The life of the process that makes the keeper namespace: it waits until
/// the host closes its end of the pipe (`wait_fd`), then exits.
pub(in crate::namespaces) fn keeper_main(wait_fd: RawFd, hold_fd: RawFd) -> ! {
    // SAFETY: system calls only, then _exit: waits until the host closes its end.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        libc::close(hold_fd);
        read_byte(wait_fd);
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    /// The code of this module: test modules, comments and string literals left out.
    fn sources() -> Vec<(&'static str, String)> {
        [
            ("child/mod.rs", include_str!("mod.rs")),
            ("child/helpers.rs", include_str!("helpers.rs")),
            ("child/holder.rs", include_str!("holder.rs")),
            ("child/launcher.rs", include_str!("launcher.rs")),
            ("child/capabilities.rs", include_str!("capabilities.rs")),
            ("child/net.rs", include_str!("net.rs")),
        ]
        .into_iter()
        .map(|(name, text)| {
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let lines = code.lines().filter(|line| !line.trim_start().starts_with("//"));
            let (mut kept, mut quoted, mut escaped) = (String::new(), false, false);
            for c in lines.collect::<Vec<_>>().join("\n").chars() {
                match (quoted, escaped, c) {
                    (true, false, '\\') => escaped = true,
                    (_, false, '"') => quoted = !quoted,
                    (true, _, _) => escaped = false,
                    (false, _, _) => kept.push(c),
                }
            }
            (name, kept)
        })
        .collect()
    }

    /// The after-fork rule, held by the source: nothing here names a type,
    /// macro or method that allocates or locks.
    #[test]
    fn the_code_run_after_a_fork_names_nothing_that_allocates_or_locks() {
        let forbidden = [
            "Vec",
            "vec",
            "String",
            "format",
            "to_string",
            "to_owned",
            "to_vec",
            "collect",
            "Box",
            "Rc",
            "Arc",
            "Mutex",
            "RwLock",
            "OnceLock",
            "lock",
            "println",
            "eprintln",
            "anyhow",
            "CString",
            "fs",
            "tracing",
            "panic",
            "unwrap",
            "expect",
            "unwrap_or_default",
        ];
        for (name, code) in sources() {
            let words = code.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'));
            let found: Vec<&str> = words.filter(|w| forbidden.contains(w)).collect();
            assert!(found.is_empty(), "{name} names {found:?}, which may allocate or lock after a fork");
        }
    }
}
