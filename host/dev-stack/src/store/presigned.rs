//! Rules on the raw HTTP request, applied before s3s parses it, because
//! s3s does not tell its `S3` implementation which headers were signed.
//!
//! - **Unsigned x-amz-* headers are refused** (S3: 403 AccessDenied "There
//!   were headers present in the request which were not signed", with
//!   `HeadersNotSigned`). A presigned URL signs `host` only; an added
//!   `x-amz-copy-source`, `x-amz-meta-*` or `x-amz-website-redirect-location`
//!   would otherwise change what the request does.
//! - **No copy through a presigned URL**: CopyObject and UploadPartCopy
//!   (`x-amz-copy-source`) are refused even when signed. A URL grants its own
//!   object; a copy would read another one. (Stricter than S3, on purpose.)
//! - **Unsigned object attributes are not kept**: on a presigned request an
//!   unsigned `Content-Type`, `Content-Encoding`, `Content-Disposition`,
//!   `Content-Language`, `Cache-Control` or `Expires` is dropped before the
//!   store sees it, so it is neither stored nor served back. (S3 would keep
//!   it; refusing it would break clients such as curl that add a
//!   Content-Type by themselves.)
//! - **A PUT says its length**: a body sent with `Transfer-Encoding`
//!   (chunked, no `Content-Length`) is refused as S3 refuses it (501
//!   NotImplemented naming the header), so a client that streams without a
//!   length fails here as it would against S3.

use http::HeaderMap;
use http::header::{AUTHORIZATION, HeaderName};

/// Object attributes a presigned request may set only by signing them.
const ATTRIBUTE_HEADERS: [&str; 6] =
    ["content-type", "content-encoding", "content-disposition", "content-language", "cache-control", "expires"];

/// A request refused before s3s, answered with S3's XML error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// S3 error code.
    pub code: &'static str,
    /// S3-style message.
    pub message: String,
    /// The `HeadersNotSigned` element, when that is the reason.
    pub headers_not_signed: Option<String>,
    /// The `Header` element (S3's NotImplemented names the header).
    pub header: Option<&'static str>,
}

impl Refusal {
    /// HTTP status: S3's 403, or 501 for what S3 does not implement.
    pub fn status(&self) -> u16 {
        if self.code == "NotImplemented" { 501 } else { 403 }
    }

    /// `<Error>` XML as S3 sends it.
    pub fn xml(&self) -> String {
        let mut xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<Error><Code>{}</Code><Message>{}</Message>",
            self.code,
            escape(&self.message)
        );
        if let Some(headers) = &self.headers_not_signed {
            xml.push_str(&format!("<HeadersNotSigned>{}</HeadersNotSigned>", escape(headers)));
        }
        if let Some(header) = self.header {
            xml.push_str(&format!("<Header>{header}</Header>"));
        }
        xml.push_str("</Error>");
        xml
    }
}

/// How a request is signed, as s3s will check it.
#[derive(Debug, PartialEq, Eq)]
enum Signing {
    /// SigV4 query parameters (a presigned URL): the headers it signed.
    Presigned(Vec<String>),
    /// SigV2 query parameters: every x-amz-* header is part of what it signs.
    PresignedV2,
    /// SigV4 `Authorization` header: the headers it signed.
    Header(Vec<String>),
    /// SigV2 `Authorization` header: every x-amz-* header is signed.
    HeaderV2,
    /// Nothing: s3s refuses it, and so do the rules here if it carries x-amz-*.
    Anonymous,
}

/// Applies the rules to a request's query and headers. On success, returns
/// the attribute headers it dropped (for the log).
pub fn check(query: Option<&str>, headers: &mut HeaderMap) -> Result<Vec<HeaderName>, Refusal> {
    let signing = signing(query, headers)?;
    let signed: &[String] = match &signing {
        Signing::Presigned(signed) | Signing::Header(signed) => signed,
        // s3s would refuse it too, but only after it read a POST form's file
        // (up to 5 GB in memory): refused here, before any of the body.
        Signing::Anonymous => {
            return Err(Refusal {
                code: "AccessDenied",
                message: "Signature is required: this store serves no anonymous request; \
                          use a presigned URL or sign the request with SigV4"
                    .into(),
                headers_not_signed: None,
                header: None,
            });
        }
        Signing::PresignedV2 | Signing::HeaderV2 => &[],
    };
    let all_amz_signed = matches!(signing, Signing::PresignedV2 | Signing::HeaderV2);
    let is_signed = |name: &str| signed.iter().any(|s| s == name);

    if !all_amz_signed {
        // S3 tolerates an unsigned x-amz-content-sha256: it only makes s3s check the body's hash.
        let mut unsigned: Vec<&str> = headers
            .keys()
            .map(HeaderName::as_str)
            .filter(|n| n.starts_with("x-amz-") && *n != "x-amz-content-sha256" && !is_signed(n))
            .collect();
        unsigned.sort_unstable();
        unsigned.dedup();
        if !unsigned.is_empty() {
            return Err(Refusal {
                code: "AccessDenied",
                message: "There were headers present in the request which were not signed".into(),
                headers_not_signed: Some(unsigned.join(", ")),
                header: None,
            });
        }
    }

    let presigned = matches!(signing, Signing::Presigned(_) | Signing::PresignedV2);
    if presigned && headers.contains_key("x-amz-copy-source") {
        return Err(Refusal {
            code: "AccessDenied",
            message: "a presigned URL grants access to its own object only: CopyObject and UploadPartCopy \
                      (x-amz-copy-source) are refused; copy with the store's credentials instead"
                .into(),
            headers_not_signed: None,
            header: None,
        });
    }

    let mut dropped = Vec::new();
    if presigned {
        for name in ATTRIBUTE_HEADERS {
            if !all_amz_signed && !is_signed(name) && headers.remove(name).is_some() {
                dropped.push(HeaderName::from_static(name));
            }
        }
        if all_amz_signed {
            // SigV2 signs Content-Type (and Content-MD5) but none of the others.
            for name in ATTRIBUTE_HEADERS.into_iter().skip(1) {
                if headers.remove(name).is_some() {
                    dropped.push(HeaderName::from_static(name));
                }
            }
        }
    }
    Ok(dropped)
}

/// A PUT (an object or a part) must say its length: S3 answers a body sent
/// with `Transfer-Encoding` (chunked) 501 NotImplemented, naming the header.
pub fn check_length(method: &http::Method, headers: &HeaderMap) -> Result<(), Refusal> {
    if method != http::Method::PUT || !headers.contains_key(http::header::TRANSFER_ENCODING) {
        return Ok(());
    }
    Err(Refusal {
        code: "NotImplemented",
        message: "A header you provided implies functionality that is not implemented: send the body with a \
                  Content-Length, not with Transfer-Encoding"
            .into(),
        headers_not_signed: None,
        header: Some("Transfer-Encoding"),
    })
}

fn signing(query: Option<&str>, headers: &HeaderMap) -> Result<Signing, Refusal> {
    let pairs: Vec<(String, String)> = query
        .map(|q| url::form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
        .unwrap_or_default();
    let has = |name: &str| pairs.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if has("X-Amz-Signature") || has("X-Amz-Credential") || has("X-Amz-SignedHeaders") {
        let lists: Vec<&str> = pairs
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case("X-Amz-SignedHeaders"))
            .map(|(_, v)| v.as_str())
            .collect();
        let [list] = lists.as_slice() else {
            return Err(Refusal {
                code: "AccessDenied",
                message: format!(
                    "a presigned URL needs exactly one X-Amz-SignedHeaders parameter; this one has {}",
                    lists.len()
                ),
                headers_not_signed: None,
                header: None,
            });
        };
        return Ok(Signing::Presigned(split_list(list)));
    }
    if has("Signature") && has("AWSAccessKeyId") {
        return Ok(Signing::PresignedV2);
    }
    let authorization = headers.get_all(AUTHORIZATION).iter().filter_map(|v| v.to_str().ok()).collect::<Vec<_>>();
    match authorization.as_slice() {
        [] => Ok(Signing::Anonymous),
        [value] if value.starts_with("AWS4-HMAC-SHA256") => {
            let list = value
                .split(',')
                .filter_map(|part| part.trim().strip_prefix("SignedHeaders="))
                .next()
                .unwrap_or_default();
            Ok(Signing::Header(split_list(list)))
        }
        [value] if value.starts_with("AWS ") => Ok(Signing::HeaderV2),
        // Unknown or repeated Authorization: s3s refuses it; sign nothing here.
        _ => Ok(Signing::Header(Vec::new())),
    }
}

fn split_list(list: &str) -> Vec<String> {
    list.split(';').map(|h| h.trim().to_ascii_lowercase()).filter(|h| !h.is_empty()).collect()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PRESIGNED: &str = "X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F20260101%2Fus-east-1%2Fs3%2Faws4_request\
        &X-Amz-Date=20260101T000000Z&X-Amz-Expires=600&X-Amz-SignedHeaders=host&X-Amz-Signature=00";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs.iter().map(|(k, v)| (HeaderName::from_static(k), v.parse().unwrap())).collect()
    }

    #[test]
    fn presigned_request_with_unsigned_amz_headers_is_refused_naming_them() {
        let mut h = headers(&[
            ("x-amz-copy-source", "/snapshots/builds/b/secret"),
            ("x-amz-meta-a", "1"),
            ("x-amz-website-redirect-location", "/x"),
        ]);
        let refusal = check(Some(PRESIGNED), &mut h).unwrap_err();
        assert_eq!(refusal.code, "AccessDenied");
        assert_eq!(refusal.message, "There were headers present in the request which were not signed");
        assert_eq!(
            refusal.headers_not_signed.as_deref(),
            Some("x-amz-copy-source, x-amz-meta-a, x-amz-website-redirect-location")
        );
        assert!(refusal.xml().contains("<HeadersNotSigned>x-amz-copy-source, x-amz-meta-a"));
    }

    #[test]
    fn signed_amz_headers_pass_but_a_signed_copy_source_does_not() {
        let query = PRESIGNED.replace("SignedHeaders=host", "SignedHeaders=host%3Bx-amz-meta-a%3Bx-amz-copy-source");
        let mut h = headers(&[("x-amz-meta-a", "1"), ("x-amz-content-sha256", "UNSIGNED-PAYLOAD")]);
        assert_eq!(check(Some(&query), &mut h), Ok(vec![]));
        let mut h = headers(&[("x-amz-copy-source", "/b/k")]);
        let refusal = check(Some(&query), &mut h).unwrap_err();
        assert!(refusal.message.contains("CopyObject and UploadPartCopy"), "{}", refusal.message);
    }

    #[test]
    fn unsigned_attributes_are_dropped_from_presigned_requests_only() {
        let mut h = headers(&[("content-type", "text/html"), ("cache-control", "no-store"), ("content-length", "3")]);
        let dropped = check(Some(PRESIGNED), &mut h).unwrap();
        assert_eq!(dropped, vec![HeaderName::from_static("content-type"), HeaderName::from_static("cache-control")]);
        assert!(h.get("content-type").is_none() && h.get("content-length").is_some());

        let signed = PRESIGNED.replace("SignedHeaders=host", "SignedHeaders=content-type%3Bhost");
        let mut h = headers(&[("content-type", "text/plain")]);
        assert_eq!(check(Some(&signed), &mut h), Ok(vec![]));
        assert_eq!(h["content-type"], "text/plain");

        let auth = "AWS4-HMAC-SHA256 Credential=AK/20260101/us-east-1/s3/aws4_request, \
                    SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=00";
        let mut h = headers(&[
            ("authorization", auth),
            ("x-amz-date", "20260101T000000Z"),
            ("x-amz-content-sha256", "UNSIGNED-PAYLOAD"),
            ("content-type", "text/html"),
        ]);
        assert_eq!(check(None, &mut h), Ok(vec![]), "header-signed requests keep their attributes");
        h.insert("x-amz-copy-source", "/b/k".parse().unwrap());
        assert_eq!(check(None, &mut h).unwrap_err().headers_not_signed.as_deref(), Some("x-amz-copy-source"));
    }

    #[test]
    fn a_request_without_a_signature_is_refused_before_its_body() {
        // A POST form upload, as s3s would read whole before refusing it.
        let mut h = headers(&[("content-type", "multipart/form-data; boundary=x")]);
        let refusal = check(None, &mut h).unwrap_err();
        assert_eq!((refusal.status(), refusal.code), (403, "AccessDenied"));
        assert!(refusal.message.contains("Signature is required"), "{}", refusal.message);
        assert!(check(Some("uploads"), &mut headers(&[])).is_err());
    }

    #[test]
    fn anonymous_and_ambiguous_requests_sign_nothing() {
        let mut h = headers(&[("x-amz-acl", "public-read")]);
        assert!(check(None, &mut h).is_err());
        let twice = format!("{PRESIGNED}&X-Amz-SignedHeaders=host%3Bx-amz-acl");
        assert!(check(Some(&twice), &mut h).unwrap_err().message.contains("exactly one"));
    }
}
