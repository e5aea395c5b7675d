//! RUN: a command with the tree being built as `/`, writable, confined.
//!
//! Where it runs: inside the builder's own sandbox, in namespaces the step
//! makes for itself (a *nested confinement*). The builder is root of its
//! sandbox's user namespace, which owns the network, ipc and uts namespaces
//! and may make new mount and pid namespaces; the sandbox forbids new user
//! namespaces, and a step needs none. So a step needs nothing from the host
//! and nothing more than the builder already has. Each step gets:
//!
//! - a new **mount** namespace whose root is the tree (`pivot_root`, the old
//!   root detached): the builder's spec.json (signed URLs, the parent's
//!   download URL), its context and work files are not in it;
//! - a new **pid** namespace in which the command is pid 1, with a fresh
//!   `/proc`: the builder's processes are not visible, and when the command
//!   ends the kernel ends everything it left running in the background;
//! - a new **network** namespace with only loopback: the store, the sandbox
//!   proxy and the forwarded ports of the builder's sandbox are out of reach
//!   (local sandboxes never have egress, so no resolv.conf is provided);
//! - new **ipc** and **uts** namespaces (hostname `buildkitsandbox`, as
//!   BuildKit names its steps);
//! - a `/dev` of its own (tmpfs with null, zero, full, random, urandom, tty
//!   bound from the sandbox, `shm`, and the `fd`/`std*` links);
//! - as root, only Docker's default capabilities (the rest leave the bounding
//!   set); as another USER, none;
//! - only descriptors 0 (`/dev/null`), 1 and 2 (the build log), and an
//!   environment made of the image's ENV and the stage's ARGs, nothing of the
//!   builder's.
//!
//! The sandbox's own limits (memory, processes, disk, time) hold the step,
//! since it runs inside it. Outside a sandbox (`--allow-unconfined`, or the
//! builder run by hand as an ordinary user) the step first makes a user
//! namespace mapping this user to root, so it still runs, as root only.
//!
//! The builder starts the step by executing itself (`/proc/self/exe`, named
//! `tl-rootfs-build`, with the hidden command [`INTERNAL_COMMAND`]): a fresh
//! single-threaded process that makes the namespaces ([`confine`]), so
//! nothing runs between fork and exec in this (threaded) process.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

pub mod confine;

/// The hidden first argument that makes `tl-rootfs-build` a step's confiner.
pub const INTERNAL_COMMAND: &str = "__run-step";

/// The descriptor on which the confiner reports why a step could not start.
const STATUS_FD: i32 = 3;

/// The longest piece of a step's output printed as one log line.
const MAX_LINE_BYTES: u64 = 64 * 1024;

/// Exit status of a confiner that could not start the command (the reason is on [`STATUS_FD`]).
const SETUP_FAILED: i32 = 125;

/// What the confiner is told: everything a step runs with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confined {
    /// The tree, as a path of the builder.
    pub root: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<String>,
    /// Absolute, inside the tree.
    pub workdir: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// How a step ended when it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Code(i32),
    Signal(i32),
}

/// The mount points a step needs in the tree, made for the step when the
/// image lacks them and removed afterwards when the step left them empty.
struct MountPoints {
    made: Vec<PathBuf>,
}

impl MountPoints {
    fn make(root: &Path) -> Result<MountPoints> {
        let mut made = Vec::new();
        for name in ["proc", "dev"] {
            let path = root.join(name);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => bail!(
                    "/{name} in the image is not a directory; RUN mounts the step's /{name} there, \
                     so remove or rename it first"
                ),
                Err(_) => {
                    fs::create_dir(&path).with_context(|| format!("create /{name} in the tree for RUN"))?;
                    made.push(path);
                }
            }
        }
        Ok(MountPoints { made })
    }
}

impl Drop for MountPoints {
    fn drop(&mut self) {
        // Only an empty directory goes: what a step wrote there stays in the image.
        for path in &self.made {
            let _ = fs::remove_dir(path);
        }
    }
}

/// Runs one step, printing its output lines as they come; `Ok` tells how
/// the command ended, `Err` that it could not start (the reason).
pub fn run(step: &Confined) -> Result<Ended> {
    let _points = MountPoints::make(&step.root)?;
    let json = serde_json::to_string(step).expect("a step serializes");
    let (out_read, out_write) = std::io::pipe().context("make the step's output pipe")?;
    let (mut status_read, status_write) = std::io::pipe().context("make the step's status pipe")?;
    let status_fd = status_write.as_raw_fd();
    let mut command = Command::new("/proc/self/exe");
    command
        .arg0("tl-rootfs-build")
        .arg(INTERNAL_COMMAND)
        .arg(json)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(out_write.try_clone().context("share the step's output pipe")?)
        .stderr(out_write);
    // SAFETY: dup2 is async-signal-safe; it runs between fork and exec on a
    // descriptor opened before the fork.
    unsafe {
        command.pre_exec(move || {
            if libc::dup2(status_fd, STATUS_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().context("start the RUN step (execute /proc/self/exe)")?;
    drop(command);
    drop(status_write);
    let mut lines = BufReader::new(out_read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // A line longer than this is printed in pieces, so a step cannot make the builder hold its output.
        if (&mut lines).take(MAX_LINE_BYTES).read_until(b'\n', &mut line).context("read the step's output")? == 0 {
            break;
        }
        let text = String::from_utf8_lossy(&line);
        println!("{}", text.trim_end_matches(['\n', '\r']));
    }
    let status = child.wait().context("wait for the RUN step")?;
    let mut reason = String::new();
    let _ = (&mut status_read).take(64 * 1024).read_to_string(&mut reason);
    let reason = reason.trim();
    if status.code() == Some(SETUP_FAILED) && !reason.is_empty() {
        return Err(anyhow!("{reason}"));
    }
    if !reason.is_empty() {
        println!("note: the step's confiner said: {reason}");
    }
    match (status.code(), status.signal()) {
        (Some(code), _) => Ok(Ended::Code(code)),
        (None, Some(signal)) => Ok(Ended::Signal(signal)),
        _ => Err(anyhow!("the RUN step ended with {status}")),
    }
}

/// `tl-rootfs-build __run-step <json>`: confine and execute; returns the exit status.
pub fn internal_main(args: &[String]) -> u8 {
    let Some(step) = args.first().and_then(|json| serde_json::from_str::<Confined>(json).ok()) else {
        eprintln!("error: {INTERNAL_COMMAND} is the builder's own, started for a RUN step; not for use by hand");
        return 2;
    };
    let code = confine::run(&step, STATUS_FD, SETUP_FAILED);
    u8::try_from(code).unwrap_or(1)
}
