//! The signer's configuration, read from its environment (one variable per
//! setting, all documented in docs/signer.md, "Configuration").

use std::collections::BTreeMap;
use std::fmt;

use jiff::Timestamp;

use crate::presign::{Addressing, Credentials, Endpoint, MAX_EXPIRES_SECS, Presigner};
use crate::token::{Claims, DEFAULT_MAX_TTL_SECS, MIN_KEY_LEN, TokenError, TokenKey};

/// Shortest URL lifetime accepted, in seconds (tests use it). A build signs
/// its multipart URLs again when they expire (wit/protocol.md §5.12), but
/// not its reads nor a single PUT: a lifetime shorter than a build's
/// slowest step fails builds.
pub const MIN_URL_TTL_SECS: u32 = 5;
/// URL lifetime when `SNAPSIGN_URL_TTL_SECS` is unset.
pub const DEFAULT_URL_TTL_SECS: u32 = 3600;

/// Environment variable names.
pub mod vars {
    pub const REGION: &str = "SNAPSIGN_REGION";
    pub const BUCKET: &str = "SNAPSIGN_BUCKET";
    pub const KEY_PREFIX: &str = "SNAPSIGN_KEY_PREFIX";
    pub const S3_ENDPOINT: &str = "SNAPSIGN_S3_ENDPOINT";
    pub const S3_ADDRESSING: &str = "SNAPSIGN_S3_ADDRESSING";
    pub const ACCESS_KEY_ID: &str = "SNAPSIGN_ACCESS_KEY_ID";
    pub const SECRET_ACCESS_KEY: &str = "SNAPSIGN_SECRET_ACCESS_KEY";
    pub const SESSION_TOKEN: &str = "SNAPSIGN_SESSION_TOKEN";
    pub const URL_TTL_SECS: &str = "SNAPSIGN_URL_TTL_SECS";
    pub const TOKEN_KEY: &str = "SNAPSIGN_TOKEN_KEY";
    pub const SHARED_PREFIXES: &str = "SNAPSIGN_SHARED_PREFIXES";
    pub const TOKEN_MAX_TTL_SECS: &str = "SNAPSIGN_TOKEN_MAX_TTL_SECS";
    pub const MAX_KEY_BYTES: &str = "SNAPSIGN_MAX_KEY_BYTES";
}

/// A missing or invalid setting: names the variable, the value and the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// What is wrong with it and what to set instead.
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.var, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// Everything the signer needs to know. `Debug` redacts the secrets.
#[derive(Clone)]
pub struct SignerConfig {
    /// SigV4 region (`SNAPSIGN_REGION`, default `us-east-1`).
    pub region: String,
    /// The one bucket artifacts go to (`SNAPSIGN_BUCKET`).
    pub bucket: String,
    /// Key prefix before the namespace, without slashes at the ends (`SNAPSIGN_KEY_PREFIX`).
    pub key_prefix: String,
    /// The S3 endpoint and addressing style.
    pub endpoint: Endpoint,
    /// Store credentials.
    pub credentials: Credentials,
    /// Lifetime of presigned URLs, seconds.
    pub url_ttl_secs: u32,
    /// Key that verifies caller tokens (read it with [`SignerConfig::token_key`]:
    /// the verifier below is made from it once).
    token_key: Vec<u8>,
    /// Key prefixes (ending in `/`) every namespace may read with get_blob.
    pub shared_prefixes: Vec<String>,
    /// Longest lifetime a caller token may have left (`SNAPSIGN_TOKEN_MAX_TTL_SECS`, default 7 days).
    pub token_max_ttl_secs: i64,
    /// Longest object key the store holds (`SNAPSIGN_MAX_KEY_BYTES`, default S3's 1,024).
    pub max_key_bytes: usize,
    /// `token_key` with its HMAC state prepared once.
    token_verifier: TokenKey,
}

impl fmt::Debug for SignerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SignerConfig")
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("key_prefix", &self.key_prefix)
            .field("endpoint", &self.endpoint)
            .field("credentials", &self.credentials)
            .field("url_ttl_secs", &self.url_ttl_secs)
            .field("token_key", &"<redacted>")
            .field("shared_prefixes", &self.shared_prefixes)
            .field("token_max_ttl_secs", &self.token_max_ttl_secs)
            .field("max_key_bytes", &self.max_key_bytes)
            .finish()
    }
}

fn err(var: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError { var, problem: problem.into() }
}

/// S3 bucket naming rules (3..=63 of lowercase letters, digits, `.` and `-`,
/// starting and ending with a letter or digit).
pub fn valid_bucket(name: &str) -> bool {
    (3..=63).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..")
}

impl SignerConfig {
    /// Reads the configuration from environment pairs (e.g. `std::env::vars()`).
    pub fn from_vars(vars: impl IntoIterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let env: BTreeMap<String, String> = vars.into_iter().filter(|(k, _)| k.starts_with("SNAPSIGN_")).collect();
        let get = |var: &str| env.get(var).map(|v| v.trim()).filter(|v| !v.is_empty());
        let required =
            |var: &'static str, what: &str| get(var).ok_or_else(|| err(var, format!("is not set; set it to {what}")));

        let region = get(vars::REGION).unwrap_or("us-east-1").to_owned();
        if !region.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(err(vars::REGION, format!("'{region}' is not a region name like us-east-1")));
        }
        let bucket = required(vars::BUCKET, "the bucket artifacts are stored in")?.to_owned();
        if !valid_bucket(&bucket) {
            return Err(err(vars::BUCKET, format!("'{bucket}' is not a valid S3 bucket name")));
        }
        let key_prefix = get(vars::KEY_PREFIX).unwrap_or("").trim_matches('/').to_owned();
        if !key_prefix.is_empty() {
            super::validate::key_segments(&key_prefix)
                .map_err(|why| err(vars::KEY_PREFIX, format!("'{key_prefix}' is not a clean key prefix: {why}")))?;
        }
        let addressing = match get(vars::S3_ADDRESSING).unwrap_or("virtual") {
            "path" => Addressing::Path,
            "virtual" | "virtual-host" => Addressing::VirtualHost,
            other => return Err(err(vars::S3_ADDRESSING, format!("is '{other}'; use 'path' or 'virtual'"))),
        };
        let endpoint_url = required(vars::S3_ENDPOINT, "the store's URL, e.g. https://s3.us-east-1.amazonaws.com")?;
        let endpoint = Endpoint::parse(endpoint_url, addressing)
            .map_err(|e| err(vars::S3_ENDPOINT, format!("'{endpoint_url}' {e}")))?;
        let credentials = Credentials {
            access_key_id: required(vars::ACCESS_KEY_ID, "the store's access key id")?.to_owned(),
            secret_access_key: required(vars::SECRET_ACCESS_KEY, "the store's secret access key")?.to_owned(),
            session_token: get(vars::SESSION_TOKEN).map(str::to_owned),
        };
        let url_ttl_secs = match get(vars::URL_TTL_SECS) {
            None => DEFAULT_URL_TTL_SECS,
            Some(v) => v.parse::<u32>().ok().filter(|s| (MIN_URL_TTL_SECS..=MAX_EXPIRES_SECS).contains(s)).ok_or_else(
                || err(vars::URL_TTL_SECS, format!("is '{v}'; use seconds in {MIN_URL_TTL_SECS}..={MAX_EXPIRES_SECS}")),
            )?,
        };
        let token_key = required(vars::TOKEN_KEY, "the secret that verifies caller tokens")?.as_bytes().to_vec();
        if token_key.len() < MIN_KEY_LEN {
            return Err(err(vars::TOKEN_KEY, format!("is {} bytes; use at least {MIN_KEY_LEN}", token_key.len())));
        }
        let mut shared_prefixes = Vec::new();
        for prefix in get(vars::SHARED_PREFIXES).unwrap_or("").split(',').map(|p| p.trim().trim_matches('/')) {
            if prefix.is_empty() {
                continue;
            }
            super::validate::key_segments(prefix).map_err(|why| {
                err(vars::SHARED_PREFIXES, format!("entry '{prefix}' is not a clean key prefix: {why}"))
            })?;
            shared_prefixes.push(format!("{prefix}/"));
        }
        let token_max_ttl_secs = match get(vars::TOKEN_MAX_TTL_SECS) {
            None => DEFAULT_MAX_TTL_SECS,
            Some(v) => v.parse::<i64>().ok().filter(|s| (60..=366 * 24 * 3600).contains(s)).ok_or_else(|| {
                err(vars::TOKEN_MAX_TTL_SECS, format!("is '{v}'; use seconds in 60..={}", 366 * 24 * 3600))
            })?,
        };
        let max_key_bytes = match get(vars::MAX_KEY_BYTES) {
            None => super::validate::MAX_KEY_LEN,
            Some(v) => {
                v.parse::<usize>().ok().filter(|n| (1..=super::validate::MAX_KEY_LEN).contains(n)).ok_or_else(|| {
                    err(vars::MAX_KEY_BYTES, format!("is '{v}'; use bytes in 1..={}", super::validate::MAX_KEY_LEN))
                })?
            }
        };
        Ok(SignerConfig {
            region,
            bucket,
            key_prefix,
            endpoint,
            credentials,
            url_ttl_secs,
            token_verifier: TokenKey::new(&token_key),
            token_key,
            shared_prefixes,
            token_max_ttl_secs,
            max_key_bytes,
        })
    }

    /// The key caller tokens are signed with (the dev stack mints with it).
    pub fn token_key(&self) -> &[u8] {
        &self.token_key
    }

    /// Verifies a caller token at `now` (unix seconds) under `token_key`.
    pub fn verify_token(&self, token: &str, now: i64) -> Result<Claims, TokenError> {
        self.token_verifier.verify(token, now, self.token_max_ttl_secs)
    }

    /// A presigner for `now` (its signing key derived afresh; [`super::Memo`] keeps one).
    pub fn presigner(&self, now: Timestamp) -> Presigner {
        Presigner::new(&self.credentials, &self.region, now, self.url_ttl_secs)
    }

    /// The key prefix (ending in `/`) of `namespace`'s artifacts.
    pub fn namespace_prefix(&self, namespace: &str) -> String {
        if self.key_prefix.is_empty() { format!("{namespace}/") } else { format!("{}/{namespace}/", self.key_prefix) }
    }

    /// Whether `key` lies under [`SignerConfig::namespace_prefix`] of
    /// `namespace` (checked without composing the prefix).
    pub fn in_namespace(&self, namespace: &str, key: &str) -> bool {
        let rest = match self.key_prefix.as_str() {
            "" => Some(key),
            prefix => key.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('/')),
        };
        rest.and_then(|rest| rest.strip_prefix(namespace)).is_some_and(|rest| rest.starts_with('/'))
    }

    /// The key and the `s3://` URI of `namespace`'s artifact at `rel_path`
    /// (wit/protocol.md §9): composed here only, for the signer and the dev
    /// stack's prepare alike.
    pub fn artifact(&self, namespace: &str, rel_path: &str) -> (String, String) {
        let key = format!("{}{rel_path}", self.namespace_prefix(namespace));
        let uri = crate::wire::object_uri(&self.bucket, &key);
        (key, uri)
    }

    /// The `host[:port]` the signer sends CreateMultipartUpload to.
    pub fn store_authority(&self) -> String {
        self.endpoint.authority_for(&self.bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn base() -> Vec<(String, String)> {
        [
            (vars::BUCKET, "snapshots"),
            (vars::S3_ENDPOINT, "http://127.0.0.1:9000"),
            (vars::S3_ADDRESSING, "path"),
            (vars::ACCESS_KEY_ID, "AKID"),
            (vars::SECRET_ACCESS_KEY, "SECRET"),
            (vars::TOKEN_KEY, "k".repeat(32).as_str()),
            ("HOME", "/root"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn with(var: &str, value: &str) -> Result<SignerConfig, ConfigError> {
        let mut env = base();
        env.retain(|(k, _)| k != var);
        env.push((var.to_owned(), value.to_owned()));
        SignerConfig::from_vars(env)
    }

    #[test]
    fn reads_defaults_and_normalises_prefixes() {
        let mut env = base();
        env.push((vars::KEY_PREFIX.into(), "/builds/v1/".into()));
        env.push((vars::SHARED_PREFIXES.into(), "public/images, /base/".into()));
        let c = SignerConfig::from_vars(env).unwrap();
        assert_eq!((c.region.as_str(), c.url_ttl_secs), ("us-east-1", 3600));
        assert_eq!(c.namespace_prefix("ns"), "builds/v1/ns/");
        assert_eq!(
            c.artifact("ns", "sandbox-template-builds/b-1/s-1.tlsnap"),
            (
                "builds/v1/ns/sandbox-template-builds/b-1/s-1.tlsnap".to_owned(),
                "s3://snapshots/builds/v1/ns/sandbox-template-builds/b-1/s-1.tlsnap".to_owned()
            )
        );
        assert_eq!(c.shared_prefixes, vec!["public/images/", "base/"]);
        assert_eq!(c.store_authority(), "127.0.0.1:9000");
        assert!(!format!("{c:?}").contains("SECRET"));
    }

    #[test]
    fn in_namespace_agrees_with_the_composed_prefix() {
        let prefixed = with(vars::KEY_PREFIX, "builds/v1").unwrap();
        let bare = SignerConfig::from_vars(base()).unwrap();
        let keys = [
            "builds/v1/ns/x",
            "builds/v1/ns/",
            "builds/v1/ns",
            "builds/v1/nsx/y",
            "builds/v1/n/s/y",
            "builds/v1ns/x",
            "builds/ns/x",
            "ns/x",
            "nsx/y",
            "other/ns/x",
            "",
        ];
        for config in [&prefixed, &bare] {
            for key in keys {
                let composed = key.starts_with(&config.namespace_prefix("ns"));
                assert_eq!(config.in_namespace("ns", key), composed, "{key} under {:?}", config.key_prefix);
            }
        }
        assert!(prefixed.in_namespace("ns", "builds/v1/ns/x") && bare.in_namespace("ns", "ns/x"));
        assert!(!prefixed.in_namespace("ns", "ns/x") && !bare.in_namespace("ns", "nsx/y"));
    }

    #[test]
    fn names_the_variable_at_fault() {
        let missing = SignerConfig::from_vars(base().into_iter().filter(|(k, _)| k != vars::BUCKET)).unwrap_err();
        assert_eq!(missing.var, vars::BUCKET);
        assert_eq!(with(vars::URL_TTL_SECS, "604801").unwrap_err().var, vars::URL_TTL_SECS);
        assert_eq!(with(vars::URL_TTL_SECS, "4").unwrap_err().var, vars::URL_TTL_SECS);
        assert_eq!(with(vars::URL_TTL_SECS, "5").unwrap().url_ttl_secs, 5);
        assert_eq!(with(vars::URL_TTL_SECS, "604800").unwrap().url_ttl_secs, 604800);
        assert_eq!(with(vars::TOKEN_KEY, "short").unwrap_err().var, vars::TOKEN_KEY);
        assert_eq!(with(vars::BUCKET, "Not_A_Bucket").unwrap_err().var, vars::BUCKET);
        assert_eq!(with(vars::S3_ADDRESSING, "sideways").unwrap_err().var, vars::S3_ADDRESSING);
        assert_eq!(with(vars::S3_ADDRESSING, "virtual").unwrap_err().var, vars::S3_ENDPOINT);
        assert_eq!(with(vars::KEY_PREFIX, "a/../b").unwrap_err().var, vars::KEY_PREFIX);
        assert_eq!(with(vars::TOKEN_MAX_TTL_SECS, "forever").unwrap_err().var, vars::TOKEN_MAX_TTL_SECS);
        assert_eq!(with(vars::TOKEN_MAX_TTL_SECS, "59").unwrap_err().var, vars::TOKEN_MAX_TTL_SECS);
        assert_eq!(with(vars::TOKEN_MAX_TTL_SECS, "86400").unwrap().token_max_ttl_secs, 86400);
        assert_eq!(SignerConfig::from_vars(base()).unwrap().token_max_ttl_secs, DEFAULT_MAX_TTL_SECS);
        assert_eq!(SignerConfig::from_vars(base()).unwrap().max_key_bytes, 1024);
        assert_eq!(with(vars::MAX_KEY_BYTES, "126").unwrap().max_key_bytes, 126);
        assert_eq!(with(vars::MAX_KEY_BYTES, "1025").unwrap_err().var, vars::MAX_KEY_BYTES);
        assert_eq!(with(vars::MAX_KEY_BYTES, "0").unwrap_err().var, vars::MAX_KEY_BYTES);
    }
}
