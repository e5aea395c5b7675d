//! One build's settings and what a build gives back.

use std::path::PathBuf;
use std::time::Duration;

/// One build's settings.
#[derive(Clone)]
pub struct BuildOptions {
    /// Platform API base URL.
    pub api_url: String,
    /// Bearer token (platform, lifecycle, proxy).
    pub token: String,
    /// Lifecycle namespace.
    pub namespace: String,
    /// Template name.
    pub name: String,
    /// Dockerfile text.
    pub dockerfile: String,
    /// Build context directory (preopened read-only).
    pub context_dir: PathBuf,
    /// Rootfs size, MiB.
    pub disk_mb: Option<u64>,
    /// Builder sandbox CPU override.
    pub builder_cpus: Option<f64>,
    /// Builder sandbox memory override, MiB.
    pub builder_memory_mb: Option<i64>,
    /// Builder sandbox disk override, MiB.
    pub builder_disk_mb: Option<u64>,
    /// Register as public.
    pub public: bool,
    /// Deadline for the sandbox to run and answer.
    pub sandbox_wait: Duration,
    /// Extra hosts the guest may reach (e.g. the store, to abort uploads).
    pub allow_hosts: Vec<String>,
    /// Guest linear memory limit.
    pub max_memory_bytes: usize,
    /// Wall-clock limit of the whole build.
    pub timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
    /// An image import: spec.json's `importImageReference` (`context:<path>`, an
    /// image in the build context the builder lays out; `snapsign import PATH`).
    pub import_reference: Option<String>,
    /// PAT mode's organization and project (platform paths, and headers to
    /// the platform, the lifecycle API and the proxy); `None`: API-key mode.
    pub scope: Option<snapsign::image_build::call::Scope>,
    /// Cancels the build (Ctrl-C): its sandbox calls stop and it cleans up
    /// (wit/protocol.md §5.10). Keep a clone to cancel with.
    pub cancel: crate::sandbox_exec::Cancel,
    /// Build arguments (`--build-arg NAME=value`), in order.
    pub build_args: Vec<(String, String)>,
}

#[cfg(test)]
impl BuildOptions {
    /// Settings for unit tests: the API at `api_url`, small limits, nothing optional.
    pub(crate) fn for_tests(api_url: &str) -> Self {
        BuildOptions {
            api_url: api_url.into(),
            token: "t".into(),
            namespace: "ns".into(),
            name: "n".into(),
            dockerfile: String::new(),
            context_dir: ".".into(),
            disk_mb: None,
            builder_cpus: None,
            builder_memory_mb: None,
            builder_disk_mb: None,
            public: false,
            sandbox_wait: Duration::from_secs(1),
            allow_hosts: Vec::new(),
            max_memory_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
            cache_dir: ".".into(),
            import_reference: None,
            scope: None,
            cancel: Default::default(),
            build_args: Vec::new(),
        }
    }
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field but the token, which never reaches a log.
        let BuildOptions {
            api_url,
            token: _,
            namespace,
            name,
            dockerfile,
            context_dir,
            disk_mb,
            builder_cpus,
            builder_memory_mb,
            builder_disk_mb,
            public,
            sandbox_wait,
            allow_hosts,
            max_memory_bytes,
            timeout,
            cache_dir,
            import_reference,
            scope,
            cancel,
            build_args,
        } = self;
        f.debug_struct("BuildOptions")
            .field("api_url", api_url)
            .field("token", &"<redacted>")
            .field("namespace", namespace)
            .field("name", name)
            .field("dockerfile", dockerfile)
            .field("context_dir", context_dir)
            .field("disk_mb", disk_mb)
            .field("builder_cpus", builder_cpus)
            .field("builder_memory_mb", builder_memory_mb)
            .field("builder_disk_mb", builder_disk_mb)
            .field("public", public)
            .field("sandbox_wait", sandbox_wait)
            .field("allow_hosts", allow_hosts)
            .field("max_memory_bytes", max_memory_bytes)
            .field("timeout", timeout)
            .field("cache_dir", cache_dir)
            .field("import_reference", import_reference)
            .field("scope", scope)
            .field("cancel", cancel)
            // Names only: a value may be a secret.
            .field("build_args", &build_args.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .finish()
    }
}

/// How a build failed, as the component said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildFailure {
    /// Bad request (flags, Dockerfile).
    Usage(String),
    /// Credentials refused.
    Auth(String),
    /// The build failed.
    Failed(String),
    /// The build was cancelled; the message says what was cleaned up.
    Cancelled(String),
}

impl std::fmt::Display for BuildFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildFailure::Usage(m) | BuildFailure::Auth(m) | BuildFailure::Failed(m) | BuildFailure::Cancelled(m) => {
                write!(f, "{m}")
            }
        }
    }
}

/// Timings of one run, for the benchmark.
#[derive(Debug, Clone, Copy)]
pub struct RunTimings {
    /// Loading the component (compile or cache).
    pub load: Duration,
    /// WASI context (with the preopen) and Store creation.
    pub setup: Duration,
    /// Instantiation of the pre-instantiated component.
    pub instantiate: Duration,
    /// The export call (the whole build).
    pub run: Duration,
    /// Of `run`, the builder process (start to exit, as the host saw it).
    pub builder: Duration,
    /// The largest the component's linear memory grew, bytes.
    pub guest_memory_peak: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_prints_every_setting_but_the_token() {
        let options = BuildOptions {
            api_url: "http://127.0.0.1:1".into(),
            token: "sst1.very-secret-token".into(),
            name: "img".into(),
            dockerfile: "FROM scratch\n".into(),
            context_dir: "/ctx".into(),
            disk_mb: Some(256),
            allow_hosts: vec!["127.0.0.1:9000".into()],
            ..BuildOptions::for_tests("http://127.0.0.1:1")
        };
        let text = format!("{options:?} {options:#?}");
        assert!(!text.contains("very-secret-token"), "{text}");
        assert!(text.contains("token: \"<redacted>\"") && text.contains("127.0.0.1:9000") && text.contains("img"));
    }
}
