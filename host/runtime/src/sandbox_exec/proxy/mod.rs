//! The `proxy` sandbox backend: a remote platform's lifecycle API and
//! sandbox proxy over HTTP (wit/protocol.md §3–§4). Transient failures
//! (§5.1) come back as such; retries are the component's business.
//!
//! - [`lifecycle`]: create, status, delete (§3);
//! - [`routing`]: the proxy URL and routing headers (§4.1);
//! - [`processes`]: start-or-recover, follow, terminal status, keepalive (§4.2–§4.3, §5.4);
//! - [`files`]: whole, streamed and read files (§4.5);
//! - [`sse`]: the `text/event-stream` parser the output follow reads.

mod files;
mod lifecycle;
mod processes;
mod routing;
pub mod sse;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use snapsign::image_build::transient::is_transient;

use super::backend::{Created, Endpoint, Exit, FileSink, LineSink, Process, Resources, SandboxBackend, SandboxError};

pub use lifecycle::lifecycle_base;
pub use processes::KEEPALIVE_INTERVAL;

/// What create and GET told about a sandbox's proxy (wit/protocol.md §4.1).
#[derive(Debug, Clone, Default)]
struct Known {
    sandbox_url: Option<String>,
    routing_hint: Option<String>,
}

/// Lifecycle and proxy of one platform, for one token and namespace. It
/// holds no outbound policy: the embedder sets that before the build starts.
pub struct ProxyBackend {
    http: reqwest::Client,
    token: String,
    /// PAT mode's scope headers, sent with every lifecycle and proxy request.
    scope: Option<snapsign::image_build::call::Scope>,
    lifecycle: String,
    localhost: bool,
    known: Mutex<HashMap<String, Known>>,
    keepalive: Duration,
    /// Keepalive tasks alive now (each ends with its run).
    keepalives: Arc<AtomicUsize>,
}

impl std::fmt::Debug for ProxyBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyBackend").field("lifecycle", &self.lifecycle).field("token", &"<redacted>").finish()
    }
}

fn is_local(host: &str) -> bool {
    host == "localhost" || host == "127.0.0.1"
}

/// `host[:port]` of a URL, as the outbound policy names it (the core's one rule).
pub use snapsign::presign::authority;

fn classify(what: &str, status: u16, body: &str) -> SandboxError {
    let message = format!("{what} failed (HTTP {status}): {}", body.trim());
    match status {
        _ if is_transient(status, body) => SandboxError::Transient(message),
        401 | 403 => SandboxError::Denied(message),
        404 | 410 => SandboxError::Gone(message),
        _ => SandboxError::Failed(message),
    }
}

fn http_error(what: &str, e: reqwest::Error) -> SandboxError {
    // Timeouts are transient (wit/protocol.md §5.1); other client errors are not.
    if e.is_timeout() {
        SandboxError::Transient(format!("{what}: {e}"))
    } else {
        SandboxError::Failed(format!("{what}: {e}"))
    }
}

/// The client of lifecycle and proxy requests, sending `headers` with each.
fn http_client(headers: reqwest::header::HeaderMap) -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .default_headers(headers)
        .build()
        .expect("HTTP client")
}

impl ProxyBackend {
    /// A backend for `api_url`'s lifecycle API and the sandbox proxies it names.
    pub fn new(api_url: &str, token: &str, namespace: &str) -> Self {
        let localhost = url::Url::parse(api_url).ok().and_then(|u| u.host_str().map(is_local)).unwrap_or(false);
        ProxyBackend {
            http: http_client(reqwest::header::HeaderMap::new()),
            token: token.to_owned(),
            scope: None,
            lifecycle: lifecycle_base(api_url, namespace),
            localhost,
            known: Mutex::new(HashMap::new()),
            keepalive: KEEPALIVE_INTERVAL,
            keepalives: Arc::default(),
        }
    }

    /// PAT mode: `scope`'s headers go with every lifecycle and proxy request
    /// (as the platform's SDK sends them, wit/protocol.md §2.1), the
    /// proxy endpoint handed to the guest included.
    pub fn with_scope(mut self, scope: Option<snapsign::image_build::call::Scope>) -> Self {
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in scope.iter().flat_map(|s| s.headers()) {
            match (reqwest::header::HeaderName::try_from(name), reqwest::header::HeaderValue::try_from(value)) {
                (Ok(name), Ok(value)) => drop(headers.insert(name, value)),
                // The CLI refuses such values; an embedder's is left out
                // here, and the platform's own check then refuses the request.
                _ => tracing::warn!("a PAT scope value is not a valid HTTP header value; not sent"),
            }
        }
        self.http = http_client(headers);
        self.scope = scope;
        self
    }

    /// Keepalive tasks still alive: 0 once every run has ended.
    pub fn keepalives_running(&self) -> usize {
        self.keepalives.load(Ordering::SeqCst)
    }

    /// Changes the keepalive interval (tests use a short one).
    pub fn with_keepalive(mut self, interval: Duration) -> Self {
        self.keepalive = interval;
        self
    }

    /// The authority of the proxy URL this backend falls back to when the
    /// platform names none (`TENSORLAKE_SANDBOX_PROXY_URL`, wit/protocol.md §4.1).
    pub fn fallback_proxy_authority() -> Option<String> {
        std::env::var("TENSORLAKE_SANDBOX_PROXY_URL").ok().and_then(|u| authority(u.trim()))
    }

    async fn send(&self, what: &str, request: reqwest::RequestBuilder) -> Result<String, SandboxError> {
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| http_error(what, e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| http_error(what, e))?;
        if (200..300).contains(&status) { Ok(text) } else { Err(classify(what, status, &text)) }
    }
}

#[async_trait::async_trait]
impl SandboxBackend for ProxyBackend {
    async fn create(&self, image: &str, resources: Resources, timeout_secs: i64) -> Result<Created, SandboxError> {
        self.create_sandbox(image, resources, timeout_secs).await
    }

    async fn status(&self, id: &str) -> Result<String, SandboxError> {
        self.sandbox_status(id).await
    }

    fn proxy(&self, id: &str) -> Result<Endpoint, SandboxError> {
        self.endpoint(id)
    }

    async fn run(&self, id: &str, spec: Process, sink: &mut LineSink<'_>) -> Result<Exit, SandboxError> {
        self.run_process(id, spec, sink).await
    }

    async fn write_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError> {
        self.put_file(id, path, contents).await
    }

    async fn open_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError> {
        self.stream_file(id, path).await
    }

    async fn read_file(&self, id: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SandboxError> {
        self.get_file(id, path, max_bytes).await
    }

    async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        self.delete_sandbox(id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_answers_for_the_component() {
        assert!(matches!(classify("get", 502, ""), SandboxError::Transient(_)));
        assert!(matches!(classify("get", 400, "sandbox not running"), SandboxError::Transient(_)));
        assert!(matches!(classify("get", 401, ""), SandboxError::Denied(_)));
        assert!(matches!(classify("get", 404, ""), SandboxError::Gone(_)));
        assert!(matches!(classify("get", 500, "boom"), SandboxError::Failed(m) if m.contains("HTTP 500")));
    }

    /// PAT mode: the scope headers go with lifecycle requests and with the
    /// proxy endpoint the guest signs through; API-key mode sends none.
    #[tokio::test]
    async fn pat_mode_sends_the_scope_headers_to_the_lifecycle_and_the_proxy() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = format!("http://{}", listener.local_addr().unwrap());
        let server = tokio::spawn(async move {
            let mut heads = Vec::new();
            for _ in 0..2 {
                let (mut socket, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = socket.read(&mut buf).await.unwrap();
                    head.extend_from_slice(&buf[..n]);
                }
                let body = r#"{"sandbox_id":"sbx-1","status":"pending","sandbox_url":"http://127.0.0.1:1"}"#;
                let answer =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
                socket.write_all(answer.as_bytes()).await.unwrap();
                heads.push(String::from_utf8_lossy(&head).to_lowercase());
            }
            heads
        });
        let scope = snapsign::image_build::call::Scope { organization: "org-1".into(), project: "proj-2".into() };
        let pat = ProxyBackend::new(&api, "t", "ns").with_scope(Some(scope));
        let resources = Resources { cpus: 1.0, memory_mb: 1024, disk_mb: 2048 };
        pat.create("image", resources, 60).await.unwrap();
        let endpoint = pat.endpoint("sbx-1").unwrap();
        for header in [("x-forwarded-organization-id", "org-1"), ("x-forwarded-project-id", "proj-2")] {
            assert!(endpoint.headers.contains(&(header.0.to_owned(), header.1.to_owned())), "{:?}", endpoint.headers);
        }
        let key = ProxyBackend::new(&api, "t", "ns");
        key.create("image", resources, 60).await.unwrap();
        assert!(key.endpoint("sbx-1").unwrap().headers.iter().all(|(name, _)| !name.starts_with("x-forwarded")));
        let heads = server.await.unwrap();
        assert!(heads[0].contains("x-forwarded-organization-id: org-1"), "{}", heads[0]);
        assert!(heads[0].contains("x-forwarded-project-id: proj-2"), "{}", heads[0]);
        assert!(!heads[1].contains("x-forwarded"), "{}", heads[1]);
    }

    #[test]
    fn debug_hides_the_token() {
        let backend = ProxyBackend::new("http://127.0.0.1:1", "secret-token-value", "ns");
        let text = format!("{backend:?}");
        assert!(!text.contains("secret-token-value") && text.contains("<redacted>"), "{text}");
    }
}
