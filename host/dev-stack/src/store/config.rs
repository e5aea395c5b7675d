//! Settings of the embedded store and the failures it can be told to inject.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

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
    /// Incomplete multipart uploads older than this are aborted (S3's
    /// AbortIncompleteMultipartUpload lifecycle rule); default 24 h.
    pub abort_incomplete_after: Duration,
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

    pub(super) fn failing(&self, request: &http::Request<hyper::body::Incoming>) -> Option<u32> {
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
            .field("abort_incomplete_after", &self.abort_incomplete_after)
            .finish()
    }
}
