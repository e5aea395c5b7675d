//! The platform emulator: one loopback server that speaks platform-api,
//! the sandbox lifecycle API and the sandbox proxy (wit/protocol.md §0–§4,
//! §8). The router here sends each request to its API's handler
//! ([`PlatformApi`], [`LifecycleApi`], [`ProxyApi`]); they share only
//! [`Shared`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};
use snapsign::signer::SignerConfig;
use snapsign_sandbox::Sandboxes;

use super::faults::Faults;
use super::http::{ApiError, Body, namespace, parse_json, read_body};
use super::lifecycle::LifecycleApi;
use super::platform::PlatformApi;
use super::proxy::ProxyApi;
use super::recover::Recovered;
use super::shape::PrepareShape;
use super::shared::Shared;
use super::state::State;
use crate::store::StoreFaults;
use snapsign::image_build::routes::{ORGANIZATIONS, PLATFORM, PROJECTS, V1};

/// The platform emulator: a router over one handler per API (platform-api,
/// sandbox lifecycle, sandbox proxy) and the operator's routes.
pub struct Emulator {
    shared: Arc<Shared>,
    platform: PlatformApi,
    lifecycle: Arc<LifecycleApi>,
    proxy: ProxyApi,
    admin_token: String,
}

/// What the emulator is built over.
pub struct EmulatorConfig {
    /// Templates, builds and sandboxes (SQLite).
    pub state: State,
    /// The signer's configuration (its keys, bucket and URL lifetime).
    pub signer: SignerConfig,
    /// Where the proxy forwards sign requests.
    pub signer_url: String,
    /// The local sandboxes the lifecycle API makes.
    pub sandboxes: Sandboxes,
    /// How long a new sandbox stays pending.
    pub pending: Duration,
    /// The prepare shape answered when a request does not pick one.
    pub shape: PrepareShape,
    /// Fault switches at start.
    pub faults: Faults,
    /// The store's own fault switch (a part number it refuses).
    pub store_faults: Arc<StoreFaults>,
    /// The operator's token (`/_snapsign/…`).
    pub admin_token: String,
}

impl Emulator {
    /// Builds the emulator's handlers over their shared state.
    pub fn new(config: EmulatorConfig) -> Self {
        let EmulatorConfig { state, signer, signer_url, sandboxes, pending, shape, faults, store_faults, admin_token } =
            config;
        let shared = Arc::new(Shared::new(state, signer, faults, store_faults));
        let lifecycle = Arc::new(LifecycleApi::new(shared.clone(), sandboxes, pending));
        Emulator {
            platform: PlatformApi::new(shared.clone(), shape),
            proxy: ProxyApi::new(shared.clone(), lifecycle.clone(), signer_url),
            lifecycle,
            shared,
            admin_token,
        }
    }

    /// Sets the emulator's own URL once it listens (before serving).
    pub fn set_base_url(&self, url: String) {
        self.shared.set_base_url(url);
    }

    /// The emulator's own URL (also every sandbox's `sandbox_url`).
    pub fn base_url(&self) -> &str {
        self.shared.base_url()
    }

    /// The platform-api handler (templates, builds, images, recovery).
    pub fn platform_api(&self) -> &PlatformApi {
        &self.platform
    }

    /// The lifecycle handler (the local sandboxes).
    pub fn lifecycle_api(&self) -> &LifecycleApi {
        &self.lifecycle
    }

    /// The signer's configuration the emulator signs with.
    pub fn signer(&self) -> &SignerConfig {
        &self.shared.signer
    }

    /// The current fault switches.
    pub fn faults(&self) -> Faults {
        self.shared.faults()
    }

    /// Replaces the fault switches.
    pub fn set_faults(&self, faults: Faults) {
        self.shared.set_faults(faults);
    }

    /// How many `GET /api/v1/health` the proxy answered (keepalive pings).
    pub fn health_checks(&self) -> u64 {
        self.proxy.health_checks()
    }

    /// How many platform requests came on PAT-mode (org/project) paths with their scope headers.
    pub fn scoped_requests(&self) -> u64 {
        self.platform.scoped_requests()
    }

    /// Changes the default prepare shape.
    pub fn set_shape(&self, shape: PrepareShape) {
        self.platform.set_shape(shape);
    }

    /// Fails every build a previous run left `prepared` and cleans up after it.
    pub async fn recover_interrupted_builds(&self) -> anyhow::Result<Recovered> {
        super::recover::interrupted_builds(&self.shared).await
    }

    /// Ids of the sandboxes that exist now.
    pub fn live_sandboxes(&self) -> Vec<String> {
        self.lifecycle.live_sandboxes()
    }

    /// Serves one request.
    pub async fn route(
        self: Arc<Self>,
        request: Request<Incoming>,
    ) -> Result<Response<Body>, std::convert::Infallible> {
        let started = Instant::now();
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let response = match self.dispatch(request).await {
            Ok(response) => response,
            Err(error) => {
                // A pending sandbox's 502 PROXY_ERROR is expected, not worth a warning.
                if error.status.is_server_error() && error.code != "PROXY_ERROR" {
                    tracing::warn!(%method, %path, status = error.status.as_u16(), "{}", error.message);
                }
                error.into_response()
            }
        };
        tracing::debug!(%method, %path, status = response.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64);
        Ok(response)
    }

    async fn dispatch(&self, request: Request<Incoming>) -> Result<Response<Body>, ApiError> {
        let path = request.uri().path().to_owned();
        if path.starts_with("/api/v1/") {
            return self.proxy.handle(request).await;
        }
        let method = request.method().clone();
        // Read the (bounded) body before any check: answering early and
        // closing on an unread body makes clients see a reset, not the answer.
        let (parts, body) = request.into_parts();
        let body = read_body(body).await?;
        let headers = &parts.headers;
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        // PAT mode puts organizations/{org}/projects/{proj} after /platform/v1; same handlers.
        let (platform, scope): (Option<Vec<&str>>, _) = match segments.as_slice() {
            [PLATFORM, V1, ORGANIZATIONS, org, PROJECTS, project, rest @ ..] => {
                (Some(rest.to_vec()), Some((*org, *project)))
            }
            [PLATFORM, V1, rest @ ..] => (Some(rest.to_vec()), None),
            _ => (None, None),
        };
        let key = self.shared.signer.token_key();
        if let Some(rest) = platform {
            let ns = namespace(headers, key)?;
            if let Some((org, project)) = scope {
                check_scope(headers, org, project)?;
                self.platform.count_scoped();
            }
            return self.platform.handle(&ns, &method, &rest, headers, &parts.uri, &body).await;
        }
        match (&method, segments.as_slice()) {
            (_, ["_snapsign", ..]) if !operator(headers, &self.admin_token)? => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "operator_only",
                format!(
                    "{path} is for the stack's operator: send the admin token `snapsign dev` printed, not a namespace token"
                ),
            )),
            (&Method::GET, ["_snapsign", "faults"]) => Ok(super::http::json(StatusCode::OK, &self.faults())),
            (&Method::PUT, ["_snapsign", "faults"]) => {
                let faults: Faults = serde_json::from_value(parse_json(&body)?)
                    .map_err(|e| ApiError::bad_request("invalid_faults", format!("fault switches: {e}")))?;
                self.set_faults(faults.clone());
                Ok(super::http::json(StatusCode::OK, &faults))
            }
            (_, ["v1", "namespaces", ns, "sandboxes", rest @ ..]) => {
                let caller = namespace(headers, key)?;
                if *ns != caller {
                    return Err(ApiError::new(
                        StatusCode::FORBIDDEN,
                        "forbidden",
                        format!("token is for namespace '{caller}', not '{ns}'"),
                    ));
                }
                self.lifecycle.handle(&caller, &method, &body, rest).await
            }
            (_, ["sandboxes", rest @ ..]) => {
                let caller = namespace(headers, key)?;
                self.lifecycle.handle(&caller, &method, &body, rest).await
            }
            _ => Err(ApiError::not_found("no_route", format!("no route {method} {path}"))),
        }
    }
}

/// A PAT-mode request (org/project in its path) must carry the same
/// organization and project in `X-Forwarded-Organization-Id` and
/// `X-Forwarded-Project-Id`, as the platform's SDK sends them
/// (wit/protocol.md §2.1): 401 without them, 403 when they name another.
fn check_scope(headers: &http::HeaderMap, org: &str, project: &str) -> Result<(), ApiError> {
    use snapsign::image_build::call::{ORGANIZATION_HEADER, PROJECT_HEADER};
    let decode = |segment: &str| percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned();
    let (org, project) = (decode(org), decode(project));
    let sent = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match (sent(ORGANIZATION_HEADER), sent(PROJECT_HEADER)) {
        (Some(sent_org), Some(sent_project)) if sent_org == org && sent_project == project => Ok(()),
        (Some(sent_org), Some(sent_project)) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "scope_mismatch",
            format!(
                "the path names organization '{org}' and project '{project}', the headers \
                 '{sent_org}' and '{sent_project}'; send the same scope in both"
            ),
        )),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Organization ID and project ID are required for sandbox image builds with PAT authentication: \
             send X-Forwarded-Organization-Id and X-Forwarded-Project-Id with the request",
        )),
    }
}

/// Whether the request carries the operator's admin token (compared in
/// constant time); 401 when it carries no token at all.
fn operator(headers: &http::HeaderMap, admin_token: &str) -> Result<bool, ApiError> {
    let token = super::http::bearer(headers).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <admin token>'; use the admin token `snapsign dev` printed",
        )
    })?;
    let (given, wanted) = (Sha256::digest(token.as_bytes()), Sha256::digest(admin_token.as_bytes()));
    Ok(!admin_token.is_empty() && given.iter().zip(wanted.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0)
}
