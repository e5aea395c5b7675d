//! The HTTP client (plain HTTP to the dev stack's store on loopback) and the
//! redaction that keeps presigned signatures out of the build log.

use std::io::Read;
use std::time::Duration;

use ureq::Agent;
use ureq::http::Response;

/// A blocking client: statuses are answers (not errors), no redirects (a
/// presigned URL never redirects), and every phase has a timeout.
pub fn agent() -> Agent {
    let config = Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .user_agent(format!("tl-rootfs-build/{} (snapsign)", env!("CARGO_PKG_VERSION")))
        .timeout_connect(Some(Duration::from_secs(10)))
        .timeout_send_request(Some(Duration::from_secs(30)))
        .timeout_send_body(Some(Duration::from_secs(600)))
        .timeout_recv_response(Some(Duration::from_secs(300)))
        .timeout_recv_body(Some(Duration::from_secs(600)))
        .build();
    Agent::new_with_config(config)
}

/// A URL without its query (where presigned URLs carry `X-Amz-Signature`).
pub use snapsign::presign::redact_query as redact_url;

/// Redacts the query of every `http://` / `https://` URL inside `text`.
pub fn scrub_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = ["http://", "https://"].iter().filter_map(|s| rest.find(s)).min() {
        out.push_str(&rest[..start]);
        let tail = &rest[start..];
        let end =
            tail.find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '<' | '>' | '`')).unwrap_or(tail.len());
        out.push_str(&redact_url(&tail[..end]));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// This builder speaks plain HTTP only (no TLS in the build): refuse anything
/// else up front, before building for nothing.
pub fn check_plain_http(field: &str, url: &str) -> Result<(), String> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") => Ok(()),
        Some("https") => Err(format!(
            "{field} is an https URL ({}); the reference builder speaks plain HTTP only \
             (the dev stack's store listens on loopback)",
            redact_url(url)
        )),
        _ => Err(format!("{field} is not an http:// URL: {}", redact_url(url))),
    }
}

/// Up to 64 KiB of a response body as text (for error excerpts and small answers).
pub fn body_text(response: &mut Response<ureq::Body>) -> String {
    let mut bytes = Vec::new();
    let _ = response.body_mut().as_reader().take(64 * 1024).read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presigned_queries_never_reach_the_log() {
        let url = "http://127.0.0.1:9000/b/k?uploadId=1&X-Amz-Signature=deadbeef";
        assert_eq!(redact_url(url), "http://127.0.0.1:9000/b/k?<query redacted>");
        let text = format!("error: PUT {url} failed; see \"{url}\" and https://x/y?sig=1.");
        let scrubbed = scrub_urls(&text);
        assert!(!scrubbed.contains("deadbeef") && !scrubbed.contains("sig=1"), "{scrubbed}");
        assert_eq!(scrub_urls("no urls here"), "no urls here");
        assert_eq!(scrub_urls("s3://b/k stays"), "s3://b/k stays");
        // Scrubbing text that already holds redacted URLs changes nothing.
        let once = scrub_urls(&text);
        assert_eq!(scrub_urls(&once), once);
    }

    #[test]
    fn only_plain_http_urls_are_accepted() {
        assert_eq!(check_plain_http("spec.upload.url", "http://127.0.0.1:1/k?a=b"), Ok(()));
        let err = check_plain_http("spec.upload.url", "https://s3.example/k?X-Amz-Signature=s").unwrap_err();
        assert!(err.starts_with("spec.upload.url is an https URL (https://s3.example/k?<query redacted>)"), "{err}");
        assert!(check_plain_http("spec.upload.completeUrl", "ftp://x").unwrap_err().contains("not an http:// URL"));
    }
}
