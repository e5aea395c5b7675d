//! Shared set-up for the end-to-end tests: the real store and the real
//! signer component in the real host, on 127.0.0.1:0, stopped on drop.
#![allow(dead_code)]

pub mod dev;
pub mod process;
pub mod registry;
pub mod rootfs;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use snapsign_dev_stack::store::{self, StoreConfig};
use snapsign_host::engine::EngineLimits;
use snapsign_host::serve::Server;
use snapsign_host::signer::{self, DEFAULT_MAX_INSTANCE_REUSE, SignerServerConfig};

pub const BUCKET: &str = "snaps";
pub const ACCESS_KEY: &str = "AKIDSNAPSIGNTEST";
pub const SECRET_KEY: &str = "snapsign-test-secret-key";
pub const TOKEN_KEY: &str = "test-token-key-0123456789abcdef0123";
pub const PREFIX: &str = "builds";

pub fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// Compiled components are cached once for every test binary.
pub fn cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("compiled")
}

pub struct Stack {
    pub dir: tempfile::TempDir,
    pub store: Server,
    pub signer: Server,
    pub http: reqwest::Client,
}

pub fn signer_env(endpoint: &str, bucket: &str) -> Vec<(String, String)> {
    [
        ("SNAPSIGN_BUCKET", bucket),
        ("SNAPSIGN_KEY_PREFIX", PREFIX),
        ("SNAPSIGN_S3_ENDPOINT", endpoint),
        ("SNAPSIGN_S3_ADDRESSING", "path"),
        ("SNAPSIGN_ACCESS_KEY_ID", ACCESS_KEY),
        ("SNAPSIGN_SECRET_ACCESS_KEY", SECRET_KEY),
        ("SNAPSIGN_TOKEN_KEY", TOKEN_KEY),
        ("SNAPSIGN_SHARED_PREFIXES", "public"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub async fn start_store(root: &Path) -> Server {
    store::start(&StoreConfig {
        root: root.to_owned(),
        listen: loopback(),
        access_key_id: ACCESS_KEY.into(),
        secret_access_key: SECRET_KEY.into(),
        buckets: vec![BUCKET.into()],
        faults: Default::default(),
        abort_incomplete_after: store::DEFAULT_ABORT_INCOMPLETE_AFTER,
    })
    .await
    .expect("start the store")
}

pub async fn start_signer(env: Vec<(String, String)>, limits: EngineLimits, timeout: Duration) -> Server {
    start_signer_under(env, limits, timeout, snapsign_host::serve::ServeLimits::default()).await
}

/// [`start_signer`] with the server's own limits (head, idle, body deadlines, connection caps).
pub async fn start_signer_under(
    env: Vec<(String, String)>,
    limits: EngineLimits,
    timeout: Duration,
    serve: snapsign_host::serve::ServeLimits,
) -> Server {
    let config = SignerServerConfig {
        listen: loopback(),
        env,
        limits,
        request_timeout: timeout,
        cache_dir: cache_dir(),
        max_instance_reuse: DEFAULT_MAX_INSTANCE_REUSE,
        // A few requests each: the snapshot's compile would cost more than it saves.
        preinit: false,
    };
    signer::start_with(&config, serve).await.expect("start the signer").0
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(|env| env, EngineLimits::default(), Duration::from_secs(30)).await
    }

    pub async fn start_with(
        edit: impl FnOnce(Vec<(String, String)>) -> Vec<(String, String)>,
        limits: EngineLimits,
        timeout: Duration,
    ) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let store = start_store(&dir.path().join("store")).await;
        let signer = start_signer(edit(signer_env(&store.url(), BUCKET)), limits, timeout).await;
        Stack { dir, store, signer, http: reqwest::Client::new() }
    }

    /// A stack whose signer runs every request in a fresh instance made
    /// from its pre-initialized snapshot (waited for).
    pub async fn start_preinitialized() -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let store = start_store(&dir.path().join("store")).await;
        let config = SignerServerConfig {
            listen: loopback(),
            env: signer_env(&store.url(), BUCKET),
            limits: EngineLimits::default(),
            request_timeout: Duration::from_secs(30),
            cache_dir: cache_dir(),
            max_instance_reuse: 1,
            preinit: true,
        };
        let (signer, host) = signer::start(&config).await.expect("start the signer");
        let state = host.preinit_settled().await;
        assert!(matches!(state, signer::PreinitState::Ready { .. }), "{state:?}");
        Stack { dir, store, signer, http: reqwest::Client::new() }
    }

    pub fn store_root(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// Multipart uploads the store holds open (s3s-fs keeps one `.upload-<id>.json` each).
    pub fn open_uploads(&self) -> Vec<String> {
        std::fs::read_dir(self.store_root())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(".upload-") && n.ends_with(".json"))
            .collect()
    }

    pub fn token(&self, namespace: &str) -> String {
        let exp = jiff::Timestamp::now().as_second() + 600;
        snapsign::token::mint(TOKEN_KEY.as_bytes(), namespace, exp).unwrap()
    }

    pub fn sign_url(&self) -> String {
        format!("{}/api/v1/blob/sign", self.signer.url())
    }

    /// POSTs `body` to the signer with `token`; returns status and JSON.
    pub async fn sign_raw(&self, token: Option<&str>, body: impl Into<reqwest::Body>) -> (u16, serde_json::Value) {
        let mut request = self.http.post(self.sign_url()).body(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("reach the signer");
        let status = response.status().as_u16();
        assert_eq!(
            response.headers().get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/json"),
            "status {status}"
        );
        let request_id = response.headers().get("x-request-id").map(|v| v.to_str().unwrap().to_owned());
        assert!(request_id.is_some(), "status {status}: no x-request-id");
        let text = response.text().await.unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
        if status >= 400 {
            assert_eq!(json["request_id"].as_str(), request_id.as_deref(), "error body and header name one request");
        }
        (status, json)
    }

    pub async fn sign(&self, namespace: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.sign_raw(Some(&self.token(namespace)), body.to_string()).await
    }
}
