//! Outbound HTTP policy for guests: an allow-list of `host:port`
//! authorities, plugged in through wasi-http's hooks.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

use http_body_util::{BodyExt, Full, Limited};
use snapsign::image_build::call::CANCELLED_BY_HOST;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

use crate::cancel::Cancel;

fn cancelled() -> HttpError {
    HttpError::InternalError(Some(CANCELLED_BY_HOST.to_owned()))
}

/// The largest sign answer read for its abort URL (10,000 part URLs are a few MiB).
const MAX_SIGN_ANSWER: usize = 32 << 20;

/// Lets a guest reach only the listed authorities (and, with a [`Cancel`],
/// stops its requests when the build is cancelled). The embedder fixes the
/// list when the guest starts; nothing can widen it afterwards (no
/// capability or backend holds a way to), with one narrow exception: the
/// `abortUrl` of a sign answer from a sandbox's sign endpoint (the one
/// `sandbox-exec.proxy` handed the guest, `POST {proxy}/api/v1/blob/sign`)
/// may be sent once as a `DELETE`, that exact URL only, so a failed build
/// aborts its upload wherever the store is (wit/protocol.md §5.6).
#[derive(Debug, Clone)]
pub struct AllowList {
    allowed: Arc<[String]>,
    /// The sign endpoints `sandbox-exec.proxy` handed out (full URLs).
    sign_endpoints: Arc<Mutex<HashSet<String>>>,
    aborts: Arc<Mutex<HashSet<String>>>,
    cancel: Option<Cancel>,
    /// The URL prefix of the platform's builds (`{platform}/sandbox-template-builds/`):
    /// a complete under it in flight when the build is cancelled is let finish.
    builds: Option<String>,
}

fn normalise(authority: &str, https: bool) -> String {
    let authority = authority.to_ascii_lowercase();
    let has_port = authority.rsplit_once(':').is_some_and(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    if has_port { authority } else { format!("{authority}:{}", if https { 443 } else { 80 }) }
}

impl AllowList {
    /// Allows exactly these `host[:port]` authorities (no port means 80 or 443).
    pub fn new<I: IntoIterator<Item = S>, S: AsRef<str>>(authorities: I) -> Self {
        let allowed: Vec<String> = authorities
            .into_iter()
            .flat_map(|a| {
                let a = a.as_ref().to_owned();
                if a.contains(':') {
                    vec![normalise(&a, false)]
                } else {
                    vec![normalise(&a, false), normalise(&a, true)]
                }
            })
            .collect();
        AllowList {
            allowed: allowed.into(),
            sign_endpoints: Arc::default(),
            aborts: Arc::default(),
            cancel: None,
            builds: None,
        }
    }

    /// The same policy, whose requests stop when `cancel` fires: one in
    /// flight then fails, and later ones fail at once, except a `DELETE`
    /// (the upload's abort, a cancelled build's cleanup). The error names
    /// [`CANCELLED_BY_HOST`], which the build flow reads as cancellation.
    /// `builds` is the platform's builds URL prefix
    /// (`{platform}/sandbox-template-builds/`): a complete under it already
    /// in flight is let finish, as the build's commit point.
    pub fn with_cancel(&self, cancel: Cancel, builds: String) -> Self {
        AllowList { cancel: Some(cancel), builds: Some(builds), ..self.clone() }
    }

    /// Whether a request to `authority` over `https` (or http) may go out.
    pub fn permits(&self, authority: &str, https: bool) -> bool {
        let wanted = normalise(authority, https);
        self.allowed.contains(&wanted)
    }

    /// Whether `method url` may go out: an admitted authority, or the
    /// `DELETE` of an abort URL a sign answer gave this guest.
    /// An admitted abort URL is used once.
    fn admits(&self, method: &http::Method, url: impl FnOnce() -> String, authority: &str, https: bool) -> bool {
        self.permits(authority, https)
            || (method == http::Method::DELETE && self.aborts.lock().unwrap_or_else(|p| p.into_inner()).remove(&url()))
    }

    /// Notes the sign endpoint of a sandbox proxy at `base_url` (called by
    /// `sandbox-exec.proxy` as it hands the endpoint to the guest): only
    /// answers from there admit an abort URL.
    pub(crate) fn note_sign_endpoint(&self, base_url: &str) {
        let url = format!("{}{}", base_url.trim_end_matches('/'), snapsign::signer::SIGN_PATH);
        self.sign_endpoints.lock().unwrap_or_else(|p| p.into_inner()).insert(url);
    }

    fn is_sign_endpoint(&self, method: &http::Method, uri: &http::Uri) -> bool {
        if method != http::Method::POST {
            return false;
        }
        let endpoints = self.sign_endpoints.lock().unwrap_or_else(|p| p.into_inner());
        !endpoints.is_empty() && endpoints.contains(&without_query(uri))
    }

    /// Whether `method uri` is a platform complete (with a cancel, see [`AllowList::with_cancel`]).
    fn is_complete(&self, method: &http::Method, uri: &http::Uri) -> bool {
        method == http::Method::POST
            && uri.path().ends_with("/complete")
            && self.builds.as_deref().is_some_and(|builds| without_query(uri).starts_with(builds))
    }

    /// Notes the `abortUrl` of a sign answer's JSON, if it has one and it
    /// looks like what a signer hands out: a presigned S3 AbortMultipartUpload
    /// (an `uploadId` and a SigV4 `X-Amz-Signature` in its query), so an
    /// answer that merely echoes a guest's input admits nothing.
    fn admit_abort_of(&self, answer: &[u8]) {
        let Ok(json) = serde_json::from_slice::<serde_json::Value>(answer) else { return };
        let Some(url) = json.get("abortUrl").and_then(|u| u.as_str()) else { return };
        let Ok(parsed) = url::Url::parse(url) else { return };
        let has = |name: &str| parsed.query_pairs().any(|(k, v)| k == name && !v.is_empty());
        if matches!(parsed.scheme(), "http" | "https") && has("uploadId") && has("X-Amz-Signature") {
            self.aborts.lock().unwrap_or_else(|p| p.into_inner()).insert(url.to_owned());
        }
    }
}

/// `scheme://authority/path` of `uri`.
fn without_query(uri: &http::Uri) -> String {
    format!("{}://{}{}", uri.scheme_str().unwrap_or("http"), uri.authority().map_or("", |a| a.as_str()), uri.path())
}

type IoFuture = Pin<Box<dyn Future<Output = Result<(), HttpError>> + Send>>;

/// Reads a sign answer whole (at most [`MAX_SIGN_ANSWER`]) while its
/// connection's I/O future runs, notes its abort URL, and hands the guest
/// the same answer.
async fn read_sign_answer(
    list: AllowList,
    response: http::Response<WasiBody>,
    io: IoFuture,
) -> Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>), HttpError> {
    let (parts, body) = response.into_parts();
    let mut io = Some(io);
    let mut collect = std::pin::pin!(Limited::new(body, MAX_SIGN_ANSWER).collect());
    // The body arrives only while the connection's I/O is driven: poll both until the body is in.
    let collected = std::future::poll_fn(|cx| {
        if let Poll::Ready(done) = collect.as_mut().poll(cx) {
            return Poll::Ready(done.map_err(|e| HttpError::InternalError(Some(format!("read the sign answer: {e}")))));
        }
        if let Some(running) = io.as_mut()
            && let Poll::Ready(result) = running.as_mut().poll(cx)
        {
            io = None;
            if let Err(e) = result {
                return Poll::Ready(Err(e));
            }
            return collect
                .as_mut()
                .poll(cx)
                .map(|done| done.map_err(|e| HttpError::InternalError(Some(format!("read the sign answer: {e}")))));
        }
        Poll::Pending
    })
    .await?;
    let bytes = collected.to_bytes();
    if parts.status.is_success() {
        list.admit_abort_of(&bytes);
    }
    let body = Full::new(bytes).map_err(|never| match never {}).boxed_unsync();
    let io: Box<dyn Future<Output = Result<(), HttpError>> + Send> = Box::new(async move {
        match io {
            Some(running) => running.await,
            None => Ok(()),
        }
    });
    Ok((http::Response::from_parts(parts, body), io))
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (http::Response<WasiBody>, Box<dyn Future<Output = Result<(), HttpError>> + Send>),
                HttpError,
            >,
        > + Send,
>;

impl WasiHttpHooks for AllowList {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        fut: Box<dyn Future<Output = Result<(), HttpError>> + Send>,
    ) -> SendFuture {
        let uri = request.uri();
        let https = uri.scheme_str() == Some("https");
        let authority = uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default();
        if !self.admits(request.method(), || uri.to_string(), &authority, https) {
            tracing::warn!(%authority, method = %request.method(), "guest request denied by the outbound allow-list");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let signing = self.is_sign_endpoint(request.method(), uri);
        // A cancelled build sends only its cleanup (the abort's DELETE); a request
        // in flight when it is cancelled stops, but for two that make
        // something, let finish as a sandbox create is: a sign request (it may
        // create the upload, whose abort URL the cleanup then needs) and a
        // platform complete (the build's commit point).
        let stop = match &self.cancel {
            Some(cancel) if cancel.is_cancelled() => {
                if request.method() != http::Method::DELETE {
                    return Box::new(async { Err(cancelled()) });
                }
                None
            }
            Some(_) if signing || self.is_complete(request.method(), uri) => None,
            other => other.clone(),
        };
        let default = wasmtime_wasi_http::default_hooks();
        let sent = default.send_request(request, options, fut);
        let list = self.clone();
        let exchange = async move {
            let (response, io) = Box::into_pin(sent).await?;
            if signing {
                return read_sign_answer(list, response, Box::into_pin(io)).await;
            }
            Ok((response, io))
        };
        match stop {
            None => Box::new(exchange),
            Some(cancel) => Box::new(async move {
                tokio::select! {
                    biased;
                    () = cancel.cancelled() => Err(cancelled()),
                    done = exchange => done,
                }
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_only_listed_authorities_with_default_ports() {
        let list = AllowList::new(["127.0.0.1:9000", "s3.amazonaws.com"]);
        assert!(list.permits("127.0.0.1:9000", false));
        assert!(!list.permits("127.0.0.1:9001", false));
        assert!(!list.permits("127.0.0.1", false));
        assert!(list.permits("S3.amazonaws.com", true));
        assert!(list.permits("s3.amazonaws.com:443", true));
        assert!(!list.permits("evil.example", true));
        assert!(!list.permits("s3.amazonaws.com.evil.example", true));
    }

    #[test]
    fn a_sign_answers_abort_url_admits_that_one_delete_and_nothing_else() {
        let list = AllowList::new(["127.0.0.1:9000"]);
        list.note_sign_endpoint("http://127.0.0.1:9000/");
        let sign = |path: &str| http::Uri::try_from(format!("http://127.0.0.1:9000{path}")).unwrap();
        assert!(list.is_sign_endpoint(&http::Method::POST, &sign("/api/v1/blob/sign")));
        assert!(
            !list.is_sign_endpoint(&http::Method::POST, &sign("/other/api/v1/blob/sign")),
            "only the endpoint handed out"
        );
        assert!(!list.is_sign_endpoint(&http::Method::GET, &sign("/api/v1/blob/sign")));
        let abort = "http://127.0.0.1:7000/snapshots/k?uploadId=u-1&X-Amz-Signature=00";
        let delete = http::Method::DELETE;
        assert!(!list.admits(&delete, || abort.to_owned(), "127.0.0.1:7000", false), "not before the answer");
        list.admit_abort_of(format!(r#"{{"kind": "s3_multipart", "abortUrl": "{abort}"}}"#).as_bytes());
        // A clone (the capability's, the hooks') sees the same admission.
        let seen = list.clone();
        assert!(seen.admits(&delete, || abort.to_owned(), "127.0.0.1:7000", false));
        assert!(!seen.admits(&http::Method::GET, || abort.to_owned(), "127.0.0.1:7000", false), "only a DELETE");
        assert!(!seen.admits(&http::Method::PUT, || abort.to_owned(), "127.0.0.1:7000", false));
        let other = "http://127.0.0.1:7000/snapshots/other?uploadId=u-2";
        assert!(!seen.admits(&delete, || other.to_owned(), "127.0.0.1:7000", false), "only that URL");
        assert!(!seen.admits(&delete, || abort.to_owned(), "127.0.0.1:7000", false), "once: the DELETE above used it");
        assert!(!seen.permits("127.0.0.1:7000", false), "the authority itself stays closed");
        list.admit_abort_of(b"not json");
        list.admit_abort_of(br#"{"abortUrl": 7}"#);
        // An echo of anything else is not a presigned abort: not admitted.
        list.admit_abort_of(br#"{"abortUrl": "http://evil.example/leak?data=secret"}"#);
        list.admit_abort_of(br#"{"abortUrl": "http://evil.example/x?uploadId=1&X-Amz-Signature="}"#);
        list.admit_abort_of(br#"{"abortUrl": "file:///etc/passwd?uploadId=1&X-Amz-Signature=00"}"#);
        assert!(list.aborts.lock().unwrap().is_empty(), "none of those was admitted");
    }

    fn request(method: http::Method, url: &str) -> http::Request<WasiBody> {
        let body = Full::new(bytes::Bytes::new()).map_err(|never| match never {}).boxed_unsync();
        http::Request::builder().method(method).uri(url).body(body).unwrap()
    }

    fn no_error() -> Box<dyn Future<Output = Result<(), HttpError>> + Send> {
        Box::new(async { Ok(()) })
    }

    fn is_cancelled(result: &Result<impl Sized, HttpError>) -> bool {
        matches!(result, Err(HttpError::InternalError(Some(m))) if m == CANCELLED_BY_HOST)
    }

    /// A server on loopback that answers a DELETE with 204 and never answers anything else.
    async fn silent_but_for_deletes() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = vec![0u8; 4096];
                    let n = conn.read(&mut head).await.unwrap_or(0);
                    if head[..n].starts_with(b"DELETE") {
                        let _ = conn.write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n").await;
                    }
                    // Held open, silent.
                    tokio::time::sleep(std::time::Duration::from_secs(600)).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_cancelled_build_s_requests_stop_but_its_abort_delete_still_goes_out() {
        let addr = silent_but_for_deletes().await;
        let cancel = Cancel::new();
        let builds = format!("http://{addr}/platform/v1/sandbox-template-builds/");
        let mut list = AllowList::new([addr.to_string()]).with_cancel(cancel.clone(), builds.clone());
        let url = format!("http://{addr}/platform/v1/sandbox-template-builds");

        // In flight when the build is cancelled: stopped, with the error the flow reads.
        let pending = Box::into_pin(list.send_request(request(http::Method::POST, &url), None, no_error()));
        let canceller = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            canceller.cancel();
        });
        assert!(is_cancelled(&pending.await), "the request in flight stops");

        // Afterwards: refused at once, except the DELETE of the cleanup.
        let later = Box::into_pin(list.send_request(request(http::Method::GET, &url), None, no_error())).await;
        assert!(is_cancelled(&later), "a later request is refused");
        let abort = format!("http://{addr}/snapshots/k?uploadId=u-1");
        let deleted = Box::into_pin(list.send_request(request(http::Method::DELETE, &abort), None, no_error())).await;
        let (response, _io) = deleted.expect("the abort goes out after the cancel");
        assert_eq!(response.status(), 204);

        // A platform complete in flight is the build's commit point: it is let finish.
        let cancel = Cancel::new();
        let mut list = AllowList::new([addr.to_string()]).with_cancel(cancel.clone(), builds.clone());
        let complete = format!("{builds}b-1/complete");
        let pending = Box::into_pin(list.send_request(request(http::Method::POST, &complete), None, no_error()));
        cancel.cancel();
        let waited = tokio::time::timeout(std::time::Duration::from_millis(300), pending).await;
        assert!(waited.is_err(), "the complete in flight is still waiting for its answer, not stopped");
        // Only the platform's: a `/complete` elsewhere stops like any request.
        let cancel = Cancel::new();
        let mut list = AllowList::new([addr.to_string()]).with_cancel(cancel.clone(), builds);
        let elsewhere = format!("http://{addr}/other/b-1/complete");
        let pending = Box::into_pin(list.send_request(request(http::Method::POST, &elsewhere), None, no_error()));
        cancel.cancel();
        assert!(is_cancelled(&pending.await), "not the platform's complete: stopped");
    }
}
