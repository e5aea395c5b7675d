//! Helpers of the tests that run real processes in real sandboxes (namespaces, cgroups).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use snapsign_sandbox::{Confinement, ProcessInfo, ProcessSpec, Sandbox, Sandboxes, SandboxesConfig, SubordinateIds};

/// Every wait of these tests ends by this deadline.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Sandboxes under `root`, confined with namespaces: as root
/// ([`Confinement::Namespaces`]) or as an ordinary user
/// ([`Confinement::Rootless`]); these tests run both ways (see `.ci/run`).
pub fn sandboxes(root: &Path, builder: Option<PathBuf>) -> Sandboxes {
    sandboxes_with(root, builder, SubordinateIds::WhereAvailable)
}

/// [`sandboxes`], saying whether rootless sandboxes may use subordinate ids.
pub fn sandboxes_with(root: &Path, builder: Option<PathBuf>, subordinate: SubordinateIds) -> Sandboxes {
    let confinement = Confinement::detect(false).expect("these tests run sandboxes confined with namespaces");
    let expected = if host_is_root() { Confinement::Namespaces } else { Confinement::Rootless };
    assert_eq!(confinement, expected);
    let config = SandboxesConfig { root_dir: root.to_owned(), confinement, builder_binary: builder };
    Sandboxes::new_with(config, subordinate).unwrap()
}

/// Owner uid and gid of a host file, not following a symlink.
pub fn owner(path: &Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    (meta.uid(), meta.gid())
}

/// Every path under `dir` (itself excluded), read as the host sees it.
pub fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            found.push(entry.path());
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                found.extend(tree(&entry.path()));
            }
        }
    }
    found
}

/// This test process's host uid.
pub fn my_uid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}

/// `/bin/sh -c script` as the sandbox user.
pub fn sh(script: &str) -> ProcessSpec {
    ProcessSpec { command: "/bin/sh".into(), args: vec!["-c".into(), script.into()], ..Default::default() }
}

/// `/bin/sh -c script` as root.
pub fn root_sh(script: &str) -> ProcessSpec {
    ProcessSpec { user: Some("root".into()), ..sh(script) }
}

/// Runs `spec` to its end: its output as `stream:line`, and its final status.
pub async fn run(sandbox: &Sandbox, spec: ProcessSpec) -> (Vec<String>, ProcessInfo) {
    let info = sandbox.start(spec).unwrap();
    assert_eq!(info.status, "running");
    let lines = within(sandbox.follow(info.pid).unwrap().map(|e| format!("{}:{}", e.stream, e.line)).collect()).await;
    let done = within(sandbox.wait(info.pid)).await.unwrap();
    (lines, done)
}

/// Runs `spec` and returns its stdout lines, failing unless it exits 0.
pub async fn run_ok(sandbox: &Sandbox, spec: ProcessSpec) -> Vec<String> {
    let (lines, info) = run(sandbox, spec).await;
    assert_eq!((info.status.as_str(), info.exit_code), ("exited", Some(0)), "{lines:?}");
    lines.into_iter().filter_map(|l| l.strip_prefix("stdout:").map(str::to_owned)).collect()
}

/// Awaits `future`, failing the test after [`DEADLINE`].
pub async fn within<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(DEADLINE, future).await.expect("finished before the deadline")
}

/// Polls `check` every 10 ms until it holds, failing the test after [`DEADLINE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "not within {DEADLINE:?}: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A temporary directory that is not also a path inside sandboxes (as
/// anything under the host's /tmp would be: /tmp is an area there).
pub fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// True when this test process is root.
pub fn host_is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Processes on the host whose command line starts with `marker` (`pid: cmdline`),
/// to show that nothing a sandbox started outlives it.
pub fn host_processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.starts_with(marker) {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}
