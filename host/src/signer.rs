//! `serve-signer`: the signer component behind a wasi:http server. Compiled
//! once (cached on disk), pre-instantiated once, a fresh store per request
//! with memory and time limits, outbound HTTP only to the configured store.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use snapsign::signer::SignerConfig;
use wasmtime::component::{Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};
use wasmtime_wasi_http::p2::bindings::ProxyPre;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;
use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use crate::engine::{self, EngineLimits, Loaded, WasmtimeResultExt};
use crate::outbound::AllowList;
use crate::serve::{self, Server};

/// The signer component, built by `host/build.rs` from `src/bin/signer.rs`.
pub const SIGNER_WASM: &[u8] = include_bytes!(env!("SNAPSIGN_SIGNER_WASM"));

/// Settings of `serve-signer`.
#[derive(Debug, Clone)]
pub struct SignerServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The guest's environment (`SNAPSIGN_*`, see the README).
    pub env: Vec<(String, String)>,
    /// Pool size and per-instance memory.
    pub limits: EngineLimits,
    /// Wall-clock limit of one request (also its epoch deadline).
    pub request_timeout: Duration,
    /// Compiled-component cache.
    pub cache_dir: PathBuf,
}

/// Per-request guest state.
struct Guest {
    wasi: WasiCtx,
    http: WasiHttpCtx,
    table: ResourceTable,
    outbound: AllowList,
    limits: StoreLimits,
}

impl WasiView for Guest {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl WasiHttpView for Guest {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView { ctx: &mut self.http, table: &mut self.table, hooks: &mut self.outbound }
    }
}

/// The signer, compiled and pre-instantiated, ready to serve requests.
pub struct SignerHost {
    engine: Engine,
    pre: ProxyPre<Guest>,
    env: Vec<(String, String)>,
    outbound: AllowList,
    max_memory_bytes: usize,
    request_timeout: Duration,
    /// How the component was loaded (compiled or from cache).
    pub loaded: Loaded,
}

impl SignerHost {
    /// Checks the configuration, compiles (or loads) and pre-instantiates the signer.
    pub fn new(config: &SignerServerConfig) -> Result<Self> {
        let signer = SignerConfig::from_vars(config.env.iter().cloned()).context("check the signer configuration")?;
        let outbound = AllowList::new([signer.store_authority()]);
        let engine = engine::engine(config.limits)?;
        let (component, loaded) = engine::load_component(&engine, "signer", SIGNER_WASM, &config.cache_dir)?;
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).anyhow().context("link WASI")?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker).anyhow().context("link WASI HTTP")?;
        let pre = ProxyPre::new(linker.instantiate_pre(&component).anyhow().context("pre-instantiate the signer")?)
            .anyhow()
            .context("the signer does not export wasi:http/incoming-handler")?;
        tracing::info!(?loaded, bucket = %signer.bucket, store = %signer.store_authority(), "signer ready");
        Ok(SignerHost {
            engine,
            pre,
            env: config.env.clone(),
            outbound,
            max_memory_bytes: config.limits.max_memory_bytes,
            request_timeout: config.request_timeout,
            loaded,
        })
    }

    /// Serves one HTTP request with a fresh instance.
    pub async fn handle(
        self: Arc<Self>,
        request: http::Request<Incoming>,
    ) -> Result<http::Response<HyperOutgoingBody>> {
        let started = Instant::now();
        let (method, path) = (request.method().clone(), request.uri().path().to_owned());
        let response = match self.clone().run_guest(request).await {
            Ok(response) => response,
            Err(failure) => {
                tracing::error!(%method, %path, "signer request failed: {:#}", failure.error);
                json_error(failure.status, failure.code, &format!("{:#}", failure.error))
            }
        };
        tracing::info!(%method, %path, status = response.status().as_u16(), elapsed_us = started.elapsed().as_micros() as u64, "sign request");
        Ok(response)
    }

    async fn run_guest(
        self: Arc<Self>,
        request: http::Request<Incoming>,
    ) -> Result<http::Response<HyperOutgoingBody>, Failure> {
        let mut wasi = WasiCtx::builder();
        wasi.envs(&self.env).inherit_stderr();
        let guest = Guest {
            wasi: wasi.build(),
            http: WasiHttpCtx::new(),
            table: ResourceTable::new(),
            outbound: self.outbound.clone(),
            limits: StoreLimitsBuilder::new().memory_size(self.max_memory_bytes).instances(8).build(),
        };
        let mut store = Store::new(&self.engine, guest);
        store.limiter(|g| &mut g.limits);
        store.set_epoch_deadline(engine::deadline_ticks(self.request_timeout));
        store.epoch_deadline_trap();

        let (sender, receiver) = tokio::sync::oneshot::channel();
        let req =
            store.data_mut().http().new_incoming_request(Scheme::Http, request).anyhow().map_err(Failure::internal)?;
        let out = store.data_mut().http().new_response_outparam(sender).anyhow().map_err(Failure::internal)?;
        let pre = self.pre.clone();
        let timeout = self.request_timeout;
        let task = tokio::spawn(async move {
            let run = async {
                let proxy = pre.instantiate_async(&mut store).await.map_err(|e| Failure {
                    status: 503,
                    code: "signer_busy",
                    error: anyhow::Error::from(e).context("instantiate the signer"),
                })?;
                proxy.wasi_http_incoming_handler().call_handle(&mut store, req, out).await.map_err(|e| {
                    // The epoch deadline traps the guest when it computes too long.
                    let interrupted = e.downcast_ref::<wasmtime::Trap>() == Some(&wasmtime::Trap::Interrupt);
                    let (status, code) = if interrupted { (504, "signer_timeout") } else { (500, "signer_trap") };
                    Failure { status, code, error: anyhow::Error::from(e).context("run the signer") }
                })
            };
            match tokio::time::timeout(timeout, run).await {
                Ok(result) => result,
                Err(_) => Err(Failure {
                    status: 504,
                    code: "signer_timeout",
                    error: anyhow::anyhow!("signer did not finish within {timeout:?}"),
                }),
            }
        });
        match receiver.await {
            Ok(Ok(response)) => Ok(response),
            Ok(Err(code)) => {
                Err(Failure { status: 502, code: "guest_error", error: anyhow::anyhow!("signer failed: {code:?}") })
            }
            Err(_) => Err(match task.await {
                Ok(Ok(())) => Failure::internal(anyhow::anyhow!("signer returned without setting a response")),
                Ok(Err(failure)) => failure,
                Err(e) => Failure::internal(anyhow::Error::from(e).context("signer task panicked")),
            }),
        }
    }
}

struct Failure {
    status: u16,
    code: &'static str,
    error: anyhow::Error,
}

impl Failure {
    fn internal(error: impl Into<anyhow::Error>) -> Self {
        Failure { status: 500, code: "host_error", error: error.into() }
    }
}

fn json_error(status: u16, code: &str, message: &str) -> http::Response<HyperOutgoingBody> {
    let body = serde_json::json!({"code": code, "message": message}).to_string();
    http::Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(
            Full::new(Bytes::from(body))
                .map_err(|never: std::convert::Infallible| -> wasmtime_wasi_http::Error { match never {} })
                .boxed_unsync(),
        )
        .expect("static response parts are valid")
}

/// Starts serving the signer on `config.listen`.
pub async fn start(config: &SignerServerConfig) -> Result<(Server, Arc<SignerHost>)> {
    let host = Arc::new(SignerHost::new(config)?);
    let service_host = host.clone();
    let service = hyper::service::service_fn(move |request| service_host.clone().handle(request));
    let server = serve::spawn("signer", config.listen, service).await?;
    tracing::info!(url = %server.url(), "signer listening");
    Ok((server, host))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signer must run on any wasi:http host: it may import only what
    /// `wasmtime serve -S cli` (the proxy world plus wasi:cli) provides.
    #[test]
    fn signer_imports_nothing_a_standard_wasi_http_host_lacks() {
        let engine = Engine::default();
        let component = wasmtime::component::Component::new(&engine, SIGNER_WASM).unwrap();
        let ty = component.component_type();
        let imports: Vec<String> = ty.imports(&engine).map(|(name, _)| name.to_owned()).collect();
        assert!(imports.iter().any(|i| i.starts_with("wasi:http/outgoing-handler@0.2")), "{imports:?}");
        for import in &imports {
            let standard = ["wasi:http/", "wasi:io/", "wasi:clocks/", "wasi:random/", "wasi:cli/"];
            assert!(standard.iter().any(|p| import.starts_with(p)), "non-standard import {import}");
        }
        let exports: Vec<String> = ty.exports(&engine).map(|(name, _)| name.to_owned()).collect();
        assert!(exports.iter().any(|e| e.starts_with("wasi:http/incoming-handler@0.2")), "{exports:?}");
    }
}
