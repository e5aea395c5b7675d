//! One build's settings and what a build gives back.

use std::path::PathBuf;
use std::time::Duration;

use snapsign::image_build::call::Request;

/// One build's settings: the core's request, which the builder component
/// receives (the WIT `build-request` is its image, field for field; a
/// sandbox wait of 0 s goes as 1 s), and what only the host uses.
#[derive(Clone)]
pub struct BuildOptions {
    /// What to build and against which platform: the platform API, the
    /// token, the template, the Dockerfile, the overrides, the scope, the
    /// build arguments.
    pub request: Request,
    /// Lifecycle namespace (the host's proxy backend builds its lifecycle
    /// URL with it; the component needs none).
    pub namespace: String,
    /// Build context directory (preopened read-only).
    pub context_dir: PathBuf,
    /// Whether the context goes gzipped (by default, only to a sandbox on another machine).
    pub compression: crate::sandbox_exec::Compression,
    /// Extra hosts the guest may reach (e.g. the store, to abort uploads).
    pub allow_hosts: Vec<String>,
    /// Guest linear memory limit.
    pub max_memory_bytes: usize,
    /// Wall-clock limit of the whole build.
    pub timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
    /// Cancels the build (Ctrl-C): its sandbox calls stop and it cleans up
    /// (wit/protocol.md §5.10). Keep a clone to cancel with.
    pub cancel: crate::sandbox_exec::Cancel,
}

#[cfg(test)]
impl BuildOptions {
    /// Settings for unit tests: the API at `api_url`, small limits, nothing optional.
    pub(crate) fn for_tests(api_url: &str) -> Self {
        BuildOptions {
            request: Request::new(api_url, "t", "n", ""),
            namespace: "ns".into(),
            context_dir: ".".into(),
            compression: Default::default(),
            allow_hosts: Vec::new(),
            max_memory_bytes: 1 << 20,
            timeout: Duration::from_secs(1),
            cache_dir: ".".into(),
            cancel: Default::default(),
        }
    }
}

impl std::fmt::Debug for BuildOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Every field; the request's own Debug leaves out the token and build argument values.
        let BuildOptions {
            request,
            namespace,
            context_dir,
            compression,
            allow_hosts,
            max_memory_bytes,
            timeout,
            cache_dir,
            cancel,
        } = self;
        f.debug_struct("BuildOptions")
            .field("request", request)
            .field("namespace", namespace)
            .field("context_dir", context_dir)
            .field("compression", compression)
            .field("allow_hosts", allow_hosts)
            .field("max_memory_bytes", max_memory_bytes)
            .field("timeout", timeout)
            .field("cache_dir", cache_dir)
            .field("cancel", cancel)
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
        let mut request = Request::new("http://127.0.0.1:1", "sst1.very-secret-token", "img", "FROM scratch\n");
        request.build_args = vec![("PASSWORD".into(), "hunter2-secret".into())];
        let options = BuildOptions {
            request,
            context_dir: "/ctx".into(),
            allow_hosts: vec!["127.0.0.1:9000".into()],
            ..BuildOptions::for_tests("http://127.0.0.1:1")
        };
        let text = format!("{options:?} {options:#?}");
        assert!(!text.contains("very-secret-token") && !text.contains("hunter2-secret"), "{text}");
        assert!(text.contains("PASSWORD"), "build argument names are shown: {text}");
        for shown in ["FROM scratch", "builder_memory_mb", "/ctx", "namespace", "compression: Auto"] {
            assert!(text.contains(shown), "{shown}: {text}");
        }
        assert!(text.contains("token: \"<redacted>\"") && text.contains("127.0.0.1:9000") && text.contains("img"));
    }
}
