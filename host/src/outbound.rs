//! Outbound HTTP policy for guests: an allow-list of `host:port`
//! authorities, plugged in through wasi-http's hooks.

use std::sync::Arc;

use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiBody, WasiHttpHooks};

/// Lets a guest reach only the listed authorities. The embedder fixes the
/// list when the guest starts; nothing can widen it afterwards (no
/// capability or backend holds a way to).
#[derive(Debug, Clone)]
pub struct AllowList {
    allowed: Arc<[String]>,
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
        AllowList { allowed: allowed.into() }
    }

    /// Whether a request to `authority` over `https` (or http) may go out.
    pub fn permits(&self, authority: &str, https: bool) -> bool {
        let wanted = normalise(authority, https);
        self.allowed.contains(&wanted)
    }
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
        if !self.permits(&authority, https) {
            tracing::warn!(%authority, method = %request.method(), "guest request denied by the outbound allow-list");
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        }
        let default = wasmtime_wasi_http::default_hooks();
        default.send_request(request, options, fut)
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
}
