//! Files in a sandbox: whole writes, streamed writes, bounded reads (wit/protocol.md §4.5).

use futures_util::StreamExt;

use super::{ProxyBackend, classify, http_error};
use crate::sandbox_exec::backend::{FileSink, SandboxError, too_large};

impl ProxyBackend {
    pub(super) async fn put_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError> {
        let request =
            self.proxy_request(id, reqwest::Method::PUT, "/api/v1/files")?.query(&[("path", path)]).body(contents);
        self.send(&format!("write {path}"), request).await.map(drop)
    }

    pub(super) async fn stream_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError> {
        let (tx, stream) = FileSink::channel();
        let request = self
            .proxy_request(id, reqwest::Method::PUT, "/api/v1/files")?
            .query(&[("path", path)])
            .body(reqwest::Body::wrap_stream(stream))
            .bearer_auth(&self.token);
        let what = format!("write {path}");
        let response = tokio::spawn(async move {
            let response = request.send().await.map_err(|e| http_error(&what, e))?;
            let status = response.status().as_u16();
            let text = response.text().await.unwrap_or_default();
            if (200..300).contains(&status) { Ok(()) } else { Err(classify(&what, status, &text)) }
        });
        Ok(FileSink::new(tx, response))
    }

    pub(super) async fn get_file(&self, id: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SandboxError> {
        let what = format!("read {path}");
        let request = self
            .proxy_request(id, reqwest::Method::GET, "/api/v1/files")?
            .query(&[("path", path)])
            .bearer_auth(&self.token);
        let response = request.send().await.map_err(|e| http_error(&what, e))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let text = response.text().await.unwrap_or_default();
            return Err(classify(&what, status, &text));
        }
        if response.content_length().is_some_and(|len| len > max_bytes) {
            return Err(too_large(id, path, max_bytes));
        }
        // Read as it comes, so a body without (or lying about) its length stops at the limit.
        let mut bytes = Vec::new();
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| http_error(&what, e))?;
            if (bytes.len() + chunk.len()) as u64 > max_bytes {
                return Err(too_large(id, path, max_bytes));
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(bytes)
    }
}
