//! The backend and the outbound policy of a build, set before it starts:
//! `proxy` (the platform's lifecycle API and sandbox proxy) or `local`
//! (sandboxes on this machine, sign calls straight to a signer).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;

use super::{BuildFailure, BuildOptions, BuilderRuntime, EventFn, RunTimings};
use crate::outbound::AllowList;
use crate::sandbox_exec::local::LocalBackend;
use crate::sandbox_exec::proxy::{self, ProxyBackend};

/// What the guest may reach with the `proxy` backend, known before the
/// build starts: the platform, the lifecycle host (the sandbox routing host
/// derived from it, wit/protocol.md §3.1), `TENSORLAKE_SANDBOX_PROXY_URL`
/// if set, and the extra hosts. A sandbox proxy elsewhere is refused by
/// `sandbox-exec`'s `proxy` with a message naming `--allow-host`.
pub fn proxy_outbound(options: &BuildOptions) -> AllowList {
    let lifecycle = proxy::lifecycle_base(&options.request.api_url, &options.namespace);
    let known = [
        proxy::authority(&options.request.api_url),
        proxy::authority(&lifecycle),
        ProxyBackend::fallback_proxy_authority(),
    ];
    AllowList::new(known.into_iter().flatten().chain(options.allow_hosts.iter().cloned()))
}

/// The `proxy` backend for `options.request.api_url`, and the outbound policy of the build.
pub fn proxy_backend(options: &BuildOptions) -> (Arc<ProxyBackend>, AllowList) {
    let backend = ProxyBackend::new(&options.request.api_url, &options.request.token, &options.namespace)
        .with_scope(options.request.scope.clone());
    (Arc::new(backend), proxy_outbound(options))
}

/// Runs one build with the `proxy` backend against `options.request.api_url`.
pub async fn run(
    options: &BuildOptions,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    let (backend, outbound) = proxy_backend(options);
    run_with(options, backend, outbound, events).await
}

/// Runs one build with the `local` backend: sandboxes under `sandboxes_dir`
/// running `builder`, sign calls straight to `signer_url`; the loopback
/// `allow_hosts` (e.g. the store) are forwarded into the sandboxes.
pub async fn run_local(
    options: &BuildOptions,
    sandboxes_dir: &Path,
    builder: PathBuf,
    allow_unconfined: bool,
    signer_url: &str,
    signer_token: &str,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    let sandboxes = snapsign_sandbox::Sandboxes::new(snapsign_sandbox::SandboxesConfig {
        root_dir: sandboxes_dir.to_owned(),
        confinement: snapsign_sandbox::Confinement::detect(allow_unconfined)?,
        builder_binary: Some(builder),
    })?;
    let ports: Vec<u16> = options.allow_hosts.iter().filter_map(|h| snapsign_sandbox::loopback_port(h)).collect();
    sandboxes.grant_ports(&ports);
    let backend = Arc::new(LocalBackend::new(Arc::new(sandboxes), signer_url, signer_token));
    let allowed = [proxy::authority(&options.request.api_url), proxy::authority(signer_url)];
    let outbound = AllowList::new(allowed.into_iter().flatten().chain(options.allow_hosts.iter().cloned()));
    run_with(options, backend, outbound, events).await
}

/// Runs one build over any backend (loading the component for it).
pub async fn run_with(
    options: &BuildOptions,
    backend: Arc<dyn crate::sandbox_exec::SandboxBackend>,
    outbound: AllowList,
    events: EventFn,
) -> Result<(Result<serde_json::Value, BuildFailure>, RunTimings)> {
    BuilderRuntime::new(options.max_memory_bytes, &options.cache_dir)?.run(options, backend, outbound, events).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(api_url: &str, allow_hosts: &[&str]) -> BuildOptions {
        BuildOptions {
            allow_hosts: allow_hosts.iter().map(|h| h.to_string()).collect(),
            ..BuildOptions::for_tests(api_url)
        }
    }

    #[test]
    fn the_proxy_policy_is_the_platform_its_sandbox_host_and_the_extra_hosts() {
        let policy = proxy_outbound(&options("https://api.eu.example.com", &["127.0.0.1:9000"]));
        assert!(policy.permits("api.eu.example.com", true));
        assert!(policy.permits("sandbox.eu.example.com", true));
        assert!(policy.permits("127.0.0.1:9000", false));
        assert!(!policy.permits("sbx-1.sandbox.eu.example.com", true));
        assert!(!policy.permits("example.com", true));
        let local = proxy_outbound(&options("http://127.0.0.1:8080", &[]));
        assert!(local.permits("127.0.0.1:8080", false));
        assert!(!local.permits("127.0.0.1:8081", false));
    }
}
