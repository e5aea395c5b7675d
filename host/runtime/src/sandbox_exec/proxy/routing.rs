//! The sandbox proxy's URL and routing headers (wit/protocol.md §4.1).

use super::ProxyBackend;
use crate::sandbox_exec::backend::{Endpoint, SandboxError};

impl ProxyBackend {
    /// Base URL and headers for calls to sandbox `id`'s proxy.
    pub(super) fn endpoint(&self, id: &str) -> Result<Endpoint, SandboxError> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned().unwrap_or_default();
        let base = known
            .sandbox_url
            .or_else(|| std::env::var("TENSORLAKE_SANDBOX_PROXY_URL").ok())
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| {
                SandboxError::Failed(
                    "server response did not include sandbox_url; refusing to derive a proxy URL".into(),
                )
            })?;
        let mut headers = vec![
            ("authorization".to_owned(), format!("Bearer {}", self.token)),
            ("x-tensorlake-sandbox-id".to_owned(), id.to_owned()),
        ];
        if let Some(hint) = known.routing_hint {
            headers.push(("x-tensorlake-route-hint".to_owned(), hint));
        }
        headers.extend(self.scope.iter().flat_map(|s| s.headers()));
        Ok(Endpoint { base_url: base, headers })
    }

    /// A request to `path` on sandbox `id`'s proxy, routed (no auth yet).
    pub(super) fn proxy_request(
        &self,
        id: &str,
        method: reqwest::Method,
        path: &str,
    ) -> Result<reqwest::RequestBuilder, SandboxError> {
        let endpoint = self.endpoint(id)?;
        let mut request = self.http.request(method, format!("{}{path}", endpoint.base_url));
        for (name, value) in endpoint.headers {
            if name != "authorization" {
                request = request.header(name, value);
            }
        }
        if self.localhost {
            request = request.header("host", format!("{id}.local"));
        }
        Ok(request)
    }
}
