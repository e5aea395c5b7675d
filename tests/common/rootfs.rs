//! A small rootfs made of this machine's own programs and the libraries
//! `ldd` names for them, for tests whose Dockerfiles RUN commands: nothing
//! is fetched. Shared by the host's tests and the reference builder's.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The programs a RUN test uses.
pub const PROGRAMS: [&str; 12] =
    ["sh", "bash", "cat", "ls", "id", "rm", "touch", "mkdir", "sleep", "chown", "chmod", "echo"];

/// Writes a rootfs under `dir`: each program as `bin/<name>` (mode 0755),
/// its libraries at their own absolute paths, `etc/passwd` and `etc/group`
/// with root and `app` (1000:1000, also in group `staff` 50), and `tmp` (1777).
pub fn write(dir: &Path) {
    fs::create_dir_all(dir.join("bin")).unwrap();
    for name in PROGRAMS {
        let program = find(name);
        let target = dir.join("bin").join(name);
        fs::copy(&program, &target).unwrap_or_else(|e| panic!("copy {} into the test rootfs: {e}", program.display()));
        fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        for library in libraries(&program) {
            let target = dir.join(library.strip_prefix("/").unwrap());
            if target.exists() {
                continue;
            }
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::copy(&library, &target).unwrap_or_else(|e| panic!("copy {}: {e}", library.display()));
            fs::set_permissions(&target, fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    fs::create_dir_all(dir.join("etc")).unwrap();
    fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n")
        .unwrap();
    fs::write(dir.join("etc/group"), "root:x:0:\nstaff:x:50:app\napp:x:1000:\n").unwrap();
    fs::create_dir_all(dir.join("tmp")).unwrap();
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
}

fn find(name: &str) -> PathBuf {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{name} is not on this machine (Debian's coreutils, bash and dash have it)"))
}

/// The absolute library paths `ldd` prints for `program`.
fn libraries(program: &Path) -> Vec<PathBuf> {
    let output = Command::new("ldd").arg(program).output().expect("run ldd");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, right)) => right.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}
