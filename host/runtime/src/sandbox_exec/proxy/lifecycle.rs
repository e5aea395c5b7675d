//! Sandbox lifecycle: create, status, delete (wit/protocol.md §3).

use serde_json::{Value, json};

use super::{Known, ProxyBackend, classify, http_error, is_local};
use crate::sandbox_exec::backend::{Created, Resources, SandboxError};

/// The lifecycle base URL (wit/protocol.md §3.1–§3.2), with its path prefix.
pub fn lifecycle_base(api_url: &str, namespace: &str) -> String {
    let api = api_url.trim_end_matches('/');
    match url::Url::parse(api) {
        Ok(url) if url.host_str().is_some_and(is_local) => format!("{api}/v1/namespaces/{namespace}/sandboxes"),
        Ok(url) => match url.host_str().and_then(|h| h.strip_prefix("api.")) {
            Some(rest) => format!("{}://sandbox.{rest}/sandboxes", url.scheme()),
            None => "https://sandbox.tensorlake.ai/sandboxes".into(),
        },
        Err(_) => "https://sandbox.tensorlake.ai/sandboxes".into(),
    }
}

impl ProxyBackend {
    pub(super) async fn create_sandbox(
        &self,
        image: &str,
        resources: Resources,
        timeout_secs: i64,
    ) -> Result<Created, SandboxError> {
        let body = json!({"image": image, "resources": {"cpus": resources.cpus, "memory_mb": resources.memory_mb,
                          "disk_mb": resources.disk_mb}, "timeout_secs": timeout_secs});
        let request = self.http.post(&self.lifecycle).json(&body);
        let response = request.bearer_auth(&self.token).send().await.map_err(|e| http_error("create sandbox", e))?;
        let status = response.status().as_u16();
        let text = response.text().await.map_err(|e| http_error("create sandbox", e))?;
        // 504 still carries the created sandbox (wit/protocol.md §3.3).
        if !(200..300).contains(&status) && status != 504 {
            return Err(classify("create sandbox", status, &text));
        }
        let created: Value = serde_json::from_str(&text)
            .map_err(|e| SandboxError::Failed(format!("create sandbox answer is not JSON ({e}): {text}")))?;
        let id = created["sandbox_id"]
            .as_str()
            .ok_or_else(|| SandboxError::Failed(format!("create sandbox answer has no sandbox_id: {text}")))?;
        let known = Known {
            sandbox_url: created["sandbox_url"].as_str().map(str::to_owned),
            routing_hint: created["routing_hint"].as_str().map(str::to_owned),
        };
        self.known.lock().unwrap_or_else(|p| p.into_inner()).insert(id.to_owned(), known);
        Ok(Created { id: id.to_owned(), status: created["status"].as_str().unwrap_or("pending").to_owned() })
    }

    pub(super) async fn sandbox_status(&self, id: &str) -> Result<String, SandboxError> {
        let text = self.send(&format!("get sandbox {id}"), self.http.get(format!("{}/{id}", self.lifecycle))).await?;
        let info = snapsign::image_build::sandbox_info::parse(id, &text).map_err(SandboxError::Failed)?;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let entry = known.entry(id.to_owned()).or_default();
        if entry.sandbox_url.is_none() {
            entry.sandbox_url = info.sandbox_url;
        }
        if entry.routing_hint.is_none() {
            entry.routing_hint = info.routing_hint;
        }
        Ok(info.status)
    }

    pub(super) async fn delete_sandbox(&self, id: &str) -> Result<(), SandboxError> {
        let result =
            self.send(&format!("delete sandbox {id}"), self.http.delete(format!("{}/{id}", self.lifecycle))).await;
        if result.is_ok() {
            self.known.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        }
        result.map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_base_follows_the_protocol() {
        assert_eq!(lifecycle_base("http://127.0.0.1:8080/", "ns"), "http://127.0.0.1:8080/v1/namespaces/ns/sandboxes");
        assert_eq!(lifecycle_base("https://api.tensorlake.ai", "ns"), "https://sandbox.tensorlake.ai/sandboxes");
        assert_eq!(
            lifecycle_base("https://api.eu.example.com:8443/x", "ns"),
            "https://sandbox.eu.example.com/sandboxes"
        );
        assert_eq!(lifecycle_base("https://platform.example", "ns"), "https://sandbox.tensorlake.ai/sandboxes");
    }
}
