//! bubblewrap: the command line of one confined process (a pure function of
//! its [`Launch`]), and the host identity bwrap runs as ([`Identity`]).

use std::collections::BTreeMap;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::files::{self, AREAS, BUILDER_DIR};

/// Host uid and gid of every confined process when the host process is root
/// (`user: "root"` and the sandbox user alike): an id no account uses, from
/// the range systemd sets aside for containers (524288..=1879048191), so that
/// nothing the sandbox does is done as host root.
pub const HOST_UID: u32 = 1_879_000_000;

/// Where a root host process shows bwrap a sandbox's areas: its `fs`
/// directory is bound here in a mount namespace private to that one bwrap,
/// because bwrap, running as [`HOST_UID`], must be able to walk the path of
/// every directory it binds, and `root_dir` may sit under directories only
/// root may enter (a 0700 temp dir, `/root`).
const PORTAL: &CStr = c"/run";

/// uid/gid of the sandbox user inside a sandbox (processes without `user: "root"`).
pub const SANDBOX_UID: u32 = 1000;

/// Who a process runs as inside its sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum User {
    /// uid 0, with every capability, all of them bounded by the sandbox's own user namespace.
    Root,
    /// [`SANDBOX_UID`], no capabilities.
    Sandbox,
}

impl User {
    pub(crate) fn uid(self) -> u32 {
        match self {
            User::Root => 0,
            User::Sandbox => SANDBOX_UID,
        }
    }

    pub(crate) fn home(self) -> &'static str {
        match self {
            User::Root => "/root",
            User::Sandbox => "/home",
        }
    }
}

/// How one top-level path of the host's `/` that lives in `/usr` appears
/// inside: as the symlink it is on a merged-/usr host (Debian 12: `/bin ->
/// usr/bin`), or bound read-only when it is a directory of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RootEntry {
    /// `--symlink target path`.
    Symlink {
        /// Where the link points.
        target: PathBuf,
        /// The link (`/bin`).
        path: String,
    },
    /// `--ro-bind path path`.
    Bind(String),
}

/// Reads how this host lays out `/bin`, `/sbin` and `/lib*`.
pub(crate) fn host_layout() -> Vec<RootEntry> {
    ["/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
        .into_iter()
        .filter_map(|path| {
            let meta = std::fs::symlink_metadata(path).ok()?;
            if meta.file_type().is_symlink() {
                Some(RootEntry::Symlink { target: std::fs::read_link(path).ok()?, path: path.to_owned() })
            } else if meta.is_dir() {
                Some(RootEntry::Bind(path.to_owned()))
            } else {
                None
            }
        })
        .collect()
}

/// Everything bwrap's command line says about one process.
#[derive(Debug)]
pub(crate) struct Launch<'a> {
    /// Hostname inside (the sandbox id).
    pub hostname: &'a str,
    /// From [`host_layout`].
    pub layout: &'a [RootEntry],
    /// Who it runs as.
    pub user: User,
    /// Absolute, inside.
    pub working_dir: &'a str,
    /// The whole environment.
    pub env: &'a BTreeMap<String, String>,
    /// Executable: absolute, or looked up in the `PATH` of `env`.
    pub command: &'a str,
    /// Its arguments.
    pub args: &'a [String],
}

/// bwrap's arguments for `launch`, with the sandbox's `fs` directory at `fs`.
///
/// `--share-net`: the dev stack's builder must reach the object store on the
/// host's 127.0.0.1. bubblewrap cannot narrow a shared network namespace to
/// loopback; the machines this runs on have no other network.
/// `--disable-userns` makes bwrap finish in a nested user namespace, which
/// locks every mount it made: even root inside cannot remount `/usr`
/// read-write or uncover anything.
pub(crate) fn args(launch: &Launch, fs: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    macro_rules! push {
        ($($item:expr),+ $(,)?) => { $( out.push(AsRef::<OsStr>::as_ref(&$item).to_owned()); )+ };
    }
    push!("--unshare-all", "--share-net", "--unshare-user", "--disable-userns", "--die-with-parent");
    push!("--new-session", "--clearenv", "--hostname", launch.hostname, "--ro-bind", "/usr", "/usr");
    for entry in launch.layout {
        match entry {
            RootEntry::Symlink { target, path } => {
                push!("--symlink", target, path);
            }
            RootEntry::Bind(path) => {
                push!("--ro-bind", path, path);
            }
        }
    }
    push!("--ro-bind", "/etc", "/etc", "--proc", "/proc", "--dev", "/dev");
    for area in AREAS {
        push!("--bind", fs.join(area), format!("/{area}"));
    }
    push!("--ro-bind", fs.join(BUILDER_DIR), "/usr/local/bin");
    // The rest of `/` is bwrap's tmpfs: read-only, so only the areas take writes.
    push!("--remount-ro", "/");
    let id = launch.user.uid().to_string();
    push!("--uid", id, "--gid", id);
    if launch.user == User::Root {
        push!("--cap-add", "ALL");
    }
    push!("--chdir", launch.working_dir);
    for (key, value) in launch.env {
        push!("--setenv", key, value);
    }
    push!("--", launch.command);
    for arg in launch.args {
        push!(arg);
    }
    out
}

/// The host identity bwrap runs as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Identity {
    /// As this process. For an unprivileged host process that is the
    /// standard bubblewrap setup. For a root host process it is the fallback
    /// when [`Identity::HostUser`] does not work on the machine: sandbox
    /// processes are then host root inside their user namespace; with their
    /// mounts locked they still cannot write outside their sandbox's
    /// directories, but they own what host root owns among the few host
    /// inodes they see writable (the `/dev` nodes).
    Caller,
    /// (Root host processes.) bwrap runs as [`HOST_UID`]; sandbox
    /// directories are owned by it and reached through [`PORTAL`].
    HostUser,
}

impl Identity {
    /// Host owner of sandbox files, when it is not this process's user.
    pub(crate) fn owner(self) -> Option<u32> {
        match self {
            Identity::Caller => None,
            Identity::HostUser => Some(HOST_UID),
        }
    }

    /// The bwrap command for `launch` in the sandbox whose `fs` directory is `fs`.
    pub(crate) fn command(self, bwrap: &Path, fs: &Path, launch: &Launch) -> Result<std::process::Command> {
        let mut cmd = std::process::Command::new(bwrap);
        // bwrap's own environment shows in the sandbox's /proc/1/environ.
        cmd.env_clear().stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        match self {
            Identity::Caller => {
                cmd.args(args(launch, fs));
            }
            Identity::HostUser => {
                cmd.args(args(launch, Path::new(OsStr::from_bytes(PORTAL.to_bytes()))));
                let fs = CString::new(fs.as_os_str().as_bytes())
                    .with_context(|| format!("sandbox directory {} has a NUL byte", fs.display()))?;
                // SAFETY: the closure runs between fork and exec; it only makes
                // system calls (no allocation, no locks).
                unsafe { cmd.pre_exec(move || enter_portal(&fs, HOST_UID)) };
            }
        }
        Ok(cmd)
    }

    /// Finds the identity that works here, by running a process of each user
    /// in a scratch sandbox at `scratch`: [`Identity::HostUser`] when this
    /// process is root, else (or when that fails, with a warning) [`Identity::Caller`].
    pub(crate) fn choose(bwrap: &Path, layout: &[RootEntry], scratch: &Path) -> Result<Identity> {
        // SAFETY: geteuid cannot fail.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            match probe(Identity::HostUser, bwrap, layout, scratch) {
                Ok(()) => return Ok(Identity::HostUser),
                Err(e) => tracing::warn!(
                    "bubblewrap cannot run sandboxes as host uid {HOST_UID} here ({e:#}); sandbox processes \
                     will run as host root inside their user namespace, which confines them less \
                     (they can change the modes of the /dev nodes they see)"
                ),
            }
        }
        probe(Identity::Caller, bwrap, layout, scratch)
            .with_context(|| format!("bubblewrap ({}) cannot start sandbox processes on this host", bwrap.display()))?;
        Ok(Identity::Caller)
    }
}

/// In the forked child: a private mount namespace with the sandbox's areas
/// at [`PORTAL`], then drop to `uid`.
fn enter_portal(fs: &CString, uid: u32) -> std::io::Result<()> {
    fn check(rc: libc::c_int) -> std::io::Result<()> {
        if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
    }
    let null = std::ptr::null::<libc::c_char>();
    // SAFETY: plain system calls on NUL-terminated strings that outlive them.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        // Private first, or the bind below would propagate to the host's namespace.
        check(libc::mount(null, c"/".as_ptr(), null, libc::MS_REC | libc::MS_PRIVATE, std::ptr::null()))?;
        check(libc::mount(fs.as_ptr(), PORTAL.as_ptr(), null, libc::MS_BIND, std::ptr::null()))?;
        check(libc::setgroups(0, std::ptr::null()))?;
        check(libc::setresgid(uid, uid, uid))?;
        check(libc::setresuid(uid, uid, uid))?;
    }
    Ok(())
}

fn probe(identity: Identity, bwrap: &Path, layout: &[RootEntry], scratch: &Path) -> Result<()> {
    if scratch.exists() {
        std::fs::remove_dir_all(scratch).with_context(|| format!("remove {}", scratch.display()))?;
    }
    let fs = files::create_areas(scratch, identity.owner(), None)?;
    let result = (|| {
        for user in [User::Root, User::Sandbox] {
            let env = BTreeMap::from([("PATH".to_owned(), crate::process::DEFAULT_PATH.to_owned())]);
            let launch = Launch {
                hostname: "probe",
                layout,
                user,
                working_dir: "/",
                env: &env,
                command: "/bin/sh",
                args: &["-c".into(), "id -u".into()],
            };
            let child = identity.command(bwrap, &fs, &launch)?.spawn();
            let child = child.with_context(|| match identity {
                Identity::Caller => format!("start {}", bwrap.display()),
                Identity::HostUser => format!(
                    "start {} as uid {HOST_UID} with the sandbox directories bound at {} in a private mount namespace",
                    bwrap.display(),
                    PORTAL.to_string_lossy()
                ),
            })?;
            let output = wait_with_deadline(child, Duration::from_secs(20))?;
            let stdout = String::from_utf8_lossy(&output.stdout);
            if !output.status.success() || stdout.trim() != user.uid().to_string() {
                bail!(
                    "a probe process as uid {} {}, printed '{}' and said: {}",
                    user.uid(),
                    output.status,
                    stdout.trim(),
                    String::from_utf8_lossy(&output.stderr).trim()
                );
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

fn wait_with_deadline(mut child: std::process::Child, limit: Duration) -> Result<std::process::Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("a probe process did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child.wait_with_output()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(args: &[OsString]) -> Vec<&str> {
        args.iter().map(|a| a.to_str().unwrap()).collect()
    }

    #[test]
    fn command_line_for_the_sandbox_user() {
        let env = BTreeMap::from([("HOME".to_owned(), "/home".to_owned()), ("PATH".to_owned(), "/usr/bin".to_owned())]);
        let layout =
            [RootEntry::Symlink { target: "usr/bin".into(), path: "/bin".into() }, RootEntry::Bind("/lib64".into())];
        let args = args(
            &Launch {
                hostname: "sbx-1",
                layout: &layout,
                user: User::Sandbox,
                working_dir: "/tmp",
                env: &env,
                command: "tar",
                args: &["-xzf".into(), "/tmp/a b.tgz".into()],
            },
            Path::new("/srv/boxes/sbx-1/fs"),
        );
        let expected = "--unshare-all --share-net --unshare-user --disable-userns --die-with-parent --new-session \
            --clearenv --hostname sbx-1 --ro-bind /usr /usr --symlink usr/bin /bin --ro-bind /lib64 /lib64 \
            --ro-bind /etc /etc --proc /proc --dev /dev --bind /srv/boxes/sbx-1/fs/var /var \
            --bind /srv/boxes/sbx-1/fs/tmp /tmp --bind /srv/boxes/sbx-1/fs/root /root \
            --bind /srv/boxes/sbx-1/fs/home /home --ro-bind /srv/boxes/sbx-1/fs/usr-local-bin /usr/local/bin \
            --remount-ro / --uid 1000 --gid 1000 --chdir /tmp --setenv HOME /home --setenv PATH /usr/bin -- tar -xzf";
        let mut want: Vec<&str> = expected.split_whitespace().collect();
        want.push("/tmp/a b.tgz");
        assert_eq!(strings(&args), want);
    }

    #[test]
    fn root_gets_uid_0_and_capabilities_bounded_by_its_namespace() {
        let env = BTreeMap::new();
        let args = args(
            &Launch {
                hostname: "h",
                layout: &[],
                user: User::Root,
                working_dir: "/",
                env: &env,
                command: "/usr/local/bin/tl-rootfs-build",
                args: &[],
            },
            Path::new("/run"),
        );
        let args = strings(&args);
        let tail = &args[args.iter().position(|a| *a == "--uid").unwrap()..];
        assert_eq!(
            tail,
            ["--uid", "0", "--gid", "0", "--cap-add", "ALL", "--chdir", "/", "--", "/usr/local/bin/tl-rootfs-build"]
        );
        assert!(args.windows(3).any(|w| w == ["--bind", "/run/var", "/var"]));
    }
}
