//! The embedded S3-compatible store: s3s (SigV4 checked, presigned URLs
//! included) over s3s-fs (objects as files), served on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use http_body_util::{Either, Full};

use anyhow::{Context, Result, anyhow};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

use crate::serve::{self, Server};

/// Settings of the embedded store.
#[derive(Clone)]
pub struct StoreConfig {
    /// Directory holding one sub-directory per bucket.
    pub root: PathBuf,
    /// Where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// The one access key the store accepts.
    pub access_key_id: String,
    /// Its secret.
    pub secret_access_key: String,
    /// Buckets to create if missing.
    pub buckets: Vec<String>,
    /// Injected failures (the dev stack's fault switches).
    pub faults: Arc<StoreFaults>,
}

/// Failures the store can be told to inject.
#[derive(Debug, Default)]
pub struct StoreFaults {
    fail_upload_part: AtomicU32,
}

impl StoreFaults {
    /// Makes UploadPart of part `part` answer 500 (None: no fault).
    pub fn fail_upload_part(&self, part: Option<u32>) {
        self.fail_upload_part.store(part.unwrap_or(0), Ordering::SeqCst);
    }

    fn failing(&self, request: &http::Request<hyper::body::Incoming>) -> Option<u32> {
        let part = self.fail_upload_part.load(Ordering::SeqCst);
        let query = request.uri().query()?;
        let asked = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "partNumber")?.1;
        (part != 0 && request.method() == http::Method::PUT && asked == part.to_string().as_str()).then_some(part)
    }
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("root", &self.root)
            .field("listen", &self.listen)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("buckets", &self.buckets)
            .finish()
    }
}

/// Creates `bucket` under `root` unless it exists.
pub fn ensure_bucket(root: &Path, bucket: &str) -> Result<()> {
    if !snapsign::signer::config::valid_bucket(bucket) {
        return Err(anyhow!("'{bucket}' is not a valid S3 bucket name"));
    }
    let dir = root.join(bucket);
    std::fs::create_dir_all(&dir).with_context(|| format!("create bucket directory {}", dir.display()))
}

/// Starts the store; it serves until the returned [`Server`] stops.
pub async fn start(config: &StoreConfig) -> Result<Server> {
    std::fs::create_dir_all(&config.root).with_context(|| format!("create store root {}", config.root.display()))?;
    for bucket in &config.buckets {
        ensure_bucket(&config.root, bucket)?;
    }
    let fs = s3s_fs::FileSystem::new(&config.root)
        .map_err(|e| anyhow!("open store root {}: {e:?}", config.root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    builder.set_auth(SimpleAuth::from_single(config.access_key_id.clone(), config.secret_access_key.clone()));
    let s3 = builder.build();
    let faults = config.faults.clone();
    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (s3, faults) = (s3.clone(), faults.clone());
        async move {
            if let Some(part) = faults.failing(&request) {
                tracing::warn!(part, "store: injected UploadPart failure");
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>\
                     <Message>injected fault: UploadPart {part} fails</Message></Error>"
                );
                let response = http::Response::builder().status(500).header("content-type", "application/xml");
                return Ok(response.body(Either::Right(Full::new(Bytes::from(body)))).expect("valid response"));
            }
            hyper::service::Service::call(&s3, request).await.map(|r| r.map(Either::Left))
        }
    });
    let server = serve::spawn("store", config.listen, service).await?;
    tracing::info!(url = %server.url(), root = %config.root.display(), "S3 store listening");
    Ok(server)
}
