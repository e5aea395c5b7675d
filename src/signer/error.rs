//! Every way a sign request fails, with its HTTP status and JSON body.

use std::fmt;

use serde_json::json;

use crate::token::TokenError;

/// A failed sign request. Nothing is signed when one of these is answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignError {
    /// No route at this path.
    NotFound { path: String },
    /// The route exists, the method does not.
    MethodNotAllowed { method: String },
    /// No `Authorization: Bearer` header.
    MissingToken,
    /// The bearer token did not verify.
    BadToken(TokenError),
    /// The body is over the limit.
    BodyTooLarge { limit: usize },
    /// The body is not JSON.
    MalformedJson(String),
    /// An object in the body names the same key twice (JSON leaves the meaning open: refused).
    DuplicateKey { field: String },
    /// A required field is absent or null.
    MissingField(&'static str),
    /// A field has the wrong JSON type or an invalid value.
    InvalidField { field: &'static str, problem: String },
    /// A `kind` this signer does not know.
    UnknownKind { field: &'static str, value: String },
    /// The caller tried to choose its namespace.
    NamespaceField,
    /// Target and op do not go together.
    UnsupportedCombination { target: &'static str, op: &'static str },
    /// `rel_path` is not a clean relative path.
    InvalidRelPath { rel_path: String, problem: String },
    /// A blob URI is unparsable or has another scheme.
    InvalidUri { uri: String, problem: String },
    /// A blob in a bucket this signer does not serve.
    ForeignBucket { uri: String, bucket: String },
    /// A blob outside the caller's namespace and the shared prefixes.
    OutsideNamespace { uri: String, namespace: String },
    /// refresh_upload of an upload the store does not know for that object
    /// (never made, completed, aborted, or another object's).
    NoSuchUpload { uri: String, upload_id: String },
    /// The store refused CreateMultipartUpload (or ListParts): its status, its S3 error
    /// code, and the whole story for the log.
    StoreFailed { action: &'static str, status: u16, s3_code: Option<String>, detail: String },
    /// The store could not be reached (the detail is for the log).
    StoreUnreachable { action: &'static str, detail: String },
    /// The signer's own configuration is broken (the detail is for the log).
    Misconfigured(String),
}

impl SignError {
    /// HTTP status to answer with.
    pub fn status(&self) -> u16 {
        use SignError::*;
        match self {
            NotFound { .. } => 404,
            MethodNotAllowed { .. } => 405,
            MissingToken | BadToken(_) => 401,
            BodyTooLarge { .. } => 413,
            MalformedJson(_)
            | DuplicateKey { .. }
            | MissingField(_)
            | InvalidField { .. }
            | UnknownKind { .. }
            | NamespaceField
            | UnsupportedCombination { .. }
            | InvalidRelPath { .. }
            | InvalidUri { .. } => 400,
            ForeignBucket { .. } | OutsideNamespace { .. } => 403,
            NoSuchUpload { .. } => 404,
            StoreFailed { .. } | StoreUnreachable { .. } => 502,
            Misconfigured(_) => 500,
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        use SignError::*;
        match self {
            NotFound { .. } => "not_found",
            MethodNotAllowed { .. } => "method_not_allowed",
            MissingToken => "missing_token",
            BadToken(TokenError::Expired { .. }) => "expired_token",
            BadToken(_) => "invalid_token",
            BodyTooLarge { .. } => "body_too_large",
            MalformedJson(_) => "malformed_json",
            DuplicateKey { .. } => "duplicate_key",
            MissingField(_) => "missing_field",
            InvalidField { .. } => "invalid_field",
            UnknownKind { .. } => "unknown_kind",
            NamespaceField => "namespace_not_allowed",
            UnsupportedCombination { .. } => "unsupported_combination",
            InvalidRelPath { .. } => "invalid_rel_path",
            InvalidUri { .. } => "invalid_uri",
            ForeignBucket { .. } => "foreign_bucket",
            OutsideNamespace { .. } => "outside_namespace",
            NoSuchUpload { .. } => "no_such_upload",
            StoreFailed { .. } => "store_failed",
            StoreUnreachable { .. } => "store_unreachable",
            Misconfigured(_) => "signer_misconfigured",
        }
    }

    /// What only the operator's log gets: details a caller must not see
    /// (store answers, connection errors, configuration).
    pub fn log_detail(&self) -> Option<&str> {
        use SignError::*;
        match self {
            StoreFailed { detail, .. } | StoreUnreachable { detail, .. } | Misconfigured(detail) => Some(detail),
            _ => None,
        }
    }

    /// The JSON body `{code, message, request_id}`. The message is the
    /// `Display` text, which never carries a URL, a backtrace or a secret.
    pub fn body(&self, request_id: &str) -> String {
        let mut message = self.to_string();
        if self.log_detail().is_some() {
            message.push_str(&format!("; the signer's log has the details under request id {request_id}"));
        }
        json!({"code": self.code(), "message": message, "request_id": request_id}).to_string()
    }
}

impl fmt::Display for SignError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use SignError::*;
        match self {
            NotFound { path } => write!(f, "no route {path}; the signer serves POST /api/v1/blob/sign"),
            MethodNotAllowed { method } => write!(f, "method {method} is not allowed; use POST"),
            MissingToken => write!(f, "missing 'Authorization: Bearer <token>'; mint one with `snapsign token`"),
            BadToken(e) => write!(f, "{e}"),
            BodyTooLarge { limit } => write!(f, "request body is over {limit} bytes"),
            MalformedJson(e) => write!(f, "request body is not valid JSON: {e}"),
            DuplicateKey { field } => write!(f, "field '{field}' appears more than once; send each field once"),
            MissingField(field) => write!(f, "request is missing field '{field}'"),
            InvalidField { field, problem } => write!(f, "field '{field}' {problem}"),
            UnknownKind { field, value } => write!(f, "unknown {field} '{value}'"),
            NamespaceField => {
                write!(f, "field 'namespace' is not accepted: the namespace comes from the bearer token")
            }
            UnsupportedCombination { target, op } => write!(
                f,
                "target kind '{target}' cannot be used with op '{op}'; use artifact+put_artifact, blob+get_blob or \
                 blob+refresh_upload"
            ),
            InvalidRelPath { rel_path, problem } => write!(f, "rel_path {rel_path:?} {problem}"),
            InvalidUri { uri, problem } => write!(f, "uri {uri:?} {problem}"),
            NoSuchUpload { uri, upload_id } => write!(
                f,
                "the store has no open multipart upload {upload_id:?} of {uri:?} (completed, aborted, expired or \
                 never made); sign a new upload with put_artifact"
            ),
            ForeignBucket { uri, bucket } => {
                write!(f, "uri {uri:?} is not in bucket '{bucket}', the only bucket this signer signs for")
            }
            OutsideNamespace { uri, namespace } => write!(
                f,
                "uri {uri:?} is outside namespace '{namespace}' and every shared prefix; ask its owner to share it"
            ),
            StoreFailed { action, status, s3_code: Some(code), .. } => {
                write!(f, "store refused {action}: HTTP {status}, S3 error code {code}")
            }
            StoreFailed { action, status, s3_code: None, .. } if (200..300).contains(status) => {
                write!(f, "store answered {action} with HTTP {status} but no UploadId")
            }
            StoreFailed { action, status, s3_code: None, .. } => {
                write!(f, "store refused {action}: HTTP {status}, without an S3 error code")
            }
            StoreUnreachable { action, .. } => {
                write!(f, "store did not answer {action} (no connection or no answer); retry later")
            }
            Misconfigured(_) => write!(f, "signer is misconfigured; its operator must fix its environment"),
        }
    }
}

impl std::error::Error for SignError {}
