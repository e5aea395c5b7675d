//! A small rootfs made of this machine's own programs and the libraries
//! `ldd` names for them: the base image of the RUN tests and of
//! `snapsign bench run-steps`, made without fetching anything.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, Result, anyhow};

/// The programs the RUN tests use.
pub const TEST_PROGRAMS: [&str; 13] =
    ["sh", "bash", "cat", "ls", "id", "rm", "touch", "mkdir", "sleep", "chown", "chmod", "echo", "mkfifo"];

/// Writes a rootfs under `dir`: each program as `bin/<name>` (mode 0755),
/// its libraries at their own absolute paths, `etc/passwd` and `etc/group`
/// with root and `app` (1000:1000, also in group `staff` 50), and `tmp` (1777).
pub fn write(dir: &Path, programs: &[&str]) -> Result<()> {
    let bin = dir.join("bin");
    fs::create_dir_all(&bin).with_context(|| format!("create {}", bin.display()))?;
    for name in programs {
        let program = find(name)?;
        let target = bin.join(name);
        fs::copy(&program, &target).with_context(|| format!("copy {} into the rootfs", program.display()))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        for library in libraries(&program)? {
            let target = dir.join(library.strip_prefix("/").unwrap_or(&library));
            if target.exists() {
                continue;
            }
            fs::create_dir_all(target.parent().expect("a library path has a directory"))?;
            fs::copy(&library, &target).with_context(|| format!("copy {}", library.display()))?;
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755))?;
        }
    }
    fs::create_dir_all(dir.join("etc"))?;
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")?;
    fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:app\napp:x:1000:\n")?;
    fs::create_dir_all(dir.join("tmp"))?;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    Ok(())
}

fn find(name: &str) -> Result<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{name} is not on this machine (Debian's coreutils, bash and dash have it)"))
}

/// The absolute library paths `ldd` prints for `program`.
fn libraries(program: &Path) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(program).output().context("run ldd (Debian: libc-bin)")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}
