//! AWS Signature Version 4 query-string presigning for S3
//! (<https://docs.aws.amazon.com/AmazonS3/latest/API/sigv4-query-string-auth.html>).
//!
//! A [`Presigner`] is made once per request, for one `now`: it derives the
//! signing key and hashes the parts of the string to sign that every URL
//! shares. [`Presigner::upload_part_urls`] goes further and reuses the
//! SHA-256 state of the canonical request prefix that all `UploadPart` URLs of
//! one upload share, so each extra part costs a few hash blocks. Every URL it
//! makes is checked in the tests against AWS's published example and against
//! `rusty_s3::signing::sign`, which derives everything anew per URL.

use std::fmt;
use std::fmt::Write as _;

use hmac::{Hmac, KeyInit, Mac};
use jiff::Timestamp;
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// `url` without its query, where a presigned URL carries its signature:
/// for error messages and logs. A URL without a query (or with an empty
/// one) is shown as it is.
pub fn redact_query(url: &str) -> String {
    match url.split_once('?') {
        Some((base, query)) if !query.is_empty() => format!("{base}?<query redacted>"),
        _ => url.to_owned(),
    }
}

/// S3's longest accepted `X-Amz-Expires` (7 days).
pub const MAX_EXPIRES_SECS: u32 = 604_800;

/// How bucket names appear in URLs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// `https://endpoint/{bucket}/{key}` (the only style an IP or localhost endpoint can use).
    Path,
    /// `https://{bucket}.endpoint/{key}` (AWS's default).
    VirtualHost,
}

/// An HTTP method a presigned URL is valid for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Put,
    Post,
    Delete,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Put => "PUT",
            Method::Post => "POST",
            Method::Delete => "DELETE",
        }
    }
}

/// Why an S3 endpoint was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// Not a URL at all.
    Unparsable(String),
    /// Only `http` and `https` endpoints can be presigned for.
    Scheme(String),
    /// A virtual-host URL needs a DNS name and a bucket that is a DNS label.
    VirtualHost(String),
}

impl fmt::Display for EndpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointError::Unparsable(e) => write!(f, "is not a URL ({e})"),
            EndpointError::Scheme(s) => write!(f, "has scheme '{s}'; use http:// or https://"),
            EndpointError::VirtualHost(why) => {
                write!(f, "cannot use virtual-host addressing: {why}; use path addressing")
            }
        }
    }
}

/// An S3 endpoint with its addressing style.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    scheme: String,
    /// `host[:port]` as sent in the `Host` header (default ports omitted).
    authority: String,
    /// Path prefix of the endpoint without trailing `/` (usually empty).
    path_prefix: String,
    addressing: Addressing,
}

/// The URL parts of one object: what SigV4 signs and what the URL is made of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectUrl {
    /// `scheme://authority`
    pub origin: String,
    /// `host[:port]`, the one signed header.
    pub host: String,
    /// Percent-encoded absolute path (the canonical URI).
    pub path: String,
}

impl Endpoint {
    /// Parses `http(s)://host[:port][/prefix]`.
    pub fn parse(endpoint: &str, addressing: Addressing) -> Result<Self, EndpointError> {
        let url = url::Url::parse(endpoint).map_err(|e| EndpointError::Unparsable(e.to_string()))?;
        let scheme = url.scheme().to_owned();
        if scheme != "http" && scheme != "https" {
            return Err(EndpointError::Scheme(scheme));
        }
        let authority = url_authority(&url).ok_or_else(|| EndpointError::Unparsable("no host".into()))?;
        if addressing == Addressing::VirtualHost && !matches!(url.host(), Some(url::Host::Domain(_))) {
            return Err(EndpointError::VirtualHost(format!(
                "'{}' is an IP address",
                url.host_str().unwrap_or_default()
            )));
        }
        let path_prefix = url.path().trim_end_matches('/').to_owned();
        Ok(Endpoint { scheme, authority, path_prefix, addressing })
    }

    /// The addressing style.
    pub fn addressing(&self) -> Addressing {
        self.addressing
    }

    /// The `host[:port]` requests for `bucket` go to (what an outbound allow-list must admit).
    pub fn authority_for(&self, bucket: &str) -> String {
        match self.addressing {
            Addressing::Path => self.authority.clone(),
            Addressing::VirtualHost => format!("{bucket}.{}", self.authority),
        }
    }

    /// The URL parts of `key` in `bucket`. Keys are percent-encoded per
    /// segment; `/` separates segments.
    pub fn object(&self, bucket: &str, key: &str) -> ObjectUrl {
        let host = self.authority_for(bucket);
        let mut path = String::with_capacity(self.path_prefix.len() + bucket.len() + key.len() + 2);
        path.push_str(&self.path_prefix);
        if self.addressing == Addressing::Path {
            path.push('/');
            uri_encode(bucket, false, &mut path);
        }
        path.push('/');
        uri_encode(key, true, &mut path);
        ObjectUrl { origin: format!("{}://{host}", self.scheme), host, path }
    }
}

/// Access key, secret and optional session token. `Debug` shows only the key id.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The access key id (`AKIA…`), public.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// A session token of temporary credentials (`X-Amz-Security-Token`).
    pub session_token: Option<String>,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &self.session_token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Presigns S3 requests for one region, one set of credentials and one instant.
#[derive(Clone)]
pub struct Presigner {
    /// `X-Amz-*` query parameters every URL carries, encoded and sorted.
    std_query: String,
    /// HMAC keyed with the derived signing key, already fed the string-to-sign
    /// lines that do not depend on the request.
    sts_prefix: HmacSha256,
}

/// The SigV4 signing key of one secret, day and region, as an HMAC state
/// ready to be fed a string to sign. A plain value: deriving it takes four
/// HMACs, so a shell that signs often keeps the last one
/// ([`crate::signer::Memo`]) and hands it to [`Presigner::with_key`].
#[derive(Clone)]
pub struct SigningKey {
    secret: String,
    /// The UTC day it signs for, in days since the Unix epoch.
    day: i64,
    region: String,
    keyed: HmacSha256,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey").field("day", &self.day).field("region", &self.region).finish_non_exhaustive()
    }
}

/// The UTC day of `now`, in days since the Unix epoch: what names a signing key.
fn unix_day(now: Timestamp) -> i64 {
    now.as_second().div_euclid(86_400)
}

impl SigningKey {
    /// Derives the key of `now`'s UTC day in `region`.
    pub fn derive(credentials: &Credentials, region: &str, now: Timestamp) -> Self {
        let day = now.strftime("%Y%m%d").to_string();
        let mut key = hmac(format!("AWS4{}", credentials.secret_access_key).as_bytes(), day.as_bytes());
        key = hmac(&key, region.as_bytes());
        key = hmac(&key, b"s3");
        key = hmac(&key, b"aws4_request");
        SigningKey {
            secret: credentials.secret_access_key.clone(),
            day: unix_day(now),
            region: region.to_owned(),
            keyed: HmacSha256::new_from_slice(&key).expect("HMAC takes keys of any length"),
        }
    }

    /// Whether this is the key of `now`'s UTC day in `region` for these credentials.
    pub fn is_for(&self, credentials: &Credentials, region: &str, now: Timestamp) -> bool {
        self.day == unix_day(now) && self.region == region && self.secret == credentials.secret_access_key
    }
}

impl Presigner {
    /// Derives the signing key for `now`'s date and prepares the shared query.
    pub fn new(credentials: &Credentials, region: &str, now: Timestamp, expires_secs: u32) -> Self {
        let key = SigningKey::derive(credentials, region, now);
        Self::derive(credentials, region, now, expires_secs, &key)
    }

    /// [`Presigner::new`] with the signing key of `now`'s day taken from
    /// `key`; a key of another day, region or secret is not used (one is
    /// derived instead), so the URLs are always [`Presigner::new`]'s.
    pub fn with_key(
        credentials: &Credentials,
        region: &str,
        now: Timestamp,
        expires_secs: u32,
        key: &SigningKey,
    ) -> Self {
        if key.is_for(credentials, region, now) {
            Self::derive(credentials, region, now, expires_secs, key)
        } else {
            Self::new(credentials, region, now, expires_secs)
        }
    }

    fn derive(credentials: &Credentials, region: &str, now: Timestamp, expires_secs: u32, key: &SigningKey) -> Self {
        let amz_date = amz_date(now);
        let day = &amz_date[..8];
        let scope = format!("{day}/{region}/s3/aws4_request");

        debug_assert!(key.is_for(credentials, region, now));
        let mut sts_prefix = key.keyed.clone();
        sts_prefix.update(b"AWS4-HMAC-SHA256\n");
        sts_prefix.update(amz_date.as_bytes());
        sts_prefix.update(b"\n");
        sts_prefix.update(scope.as_bytes());
        sts_prefix.update(b"\n");

        // Sorted by name: every X-Amz-* name sorts before the lowercase names
        // of S3 sub-resources (partNumber, uploadId, uploads).
        let mut std_query = String::with_capacity(256);
        std_query.push_str("X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=");
        uri_encode(&format!("{}/{scope}", credentials.access_key_id), false, &mut std_query);
        let _ = write!(std_query, "&X-Amz-Date={amz_date}&X-Amz-Expires={expires_secs}");
        if let Some(token) = credentials.session_token.as_deref().filter(|t| !t.is_empty()) {
            std_query.push_str("&X-Amz-Security-Token=");
            uri_encode(token, false, &mut std_query);
        }
        std_query.push_str("&X-Amz-SignedHeaders=host");
        Presigner { std_query, sts_prefix }
    }

    /// Presigns `method` on `object` with extra sub-resource parameters
    /// (names must start with a lowercase letter, as all S3 ones do).
    pub fn presign(&self, method: Method, object: &ObjectUrl, params: &[(&str, &str)]) -> String {
        let mut params: Vec<(&str, &str)> = params.to_vec();
        params.sort_unstable();
        let mut query = self.std_query.clone();
        for (name, value) in params {
            debug_assert!(name.starts_with(|c: char| c.is_ascii_lowercase()));
            query.push('&');
            uri_encode(name, false, &mut query);
            query.push('=');
            uri_encode(value, false, &mut query);
        }
        let mut creq = Sha256::new();
        for piece in [method.as_str(), "\n", &object.path, "\n", &query, "\nhost:", &object.host] {
            creq.update(piece.as_bytes());
        }
        creq.update(b"\n\nhost\nUNSIGNED-PAYLOAD");
        let signature = self.signature(&creq.finalize());
        let mut url = String::with_capacity(object.origin.len() + object.path.len() + query.len() + 84);
        for piece in [&object.origin, &object.path, "?", &query, "&X-Amz-Signature="] {
            url.push_str(piece);
        }
        url.push_str(std::str::from_utf8(&signature).expect("hex is ASCII"));
        url
    }

    /// Presigned `UploadPart` URLs for parts `1..=parts` of `upload_id`.
    pub fn upload_part_urls(&self, object: &ObjectUrl, upload_id: &str, parts: u32) -> Vec<String> {
        let mut urls = Vec::with_capacity(parts as usize);
        self.each_upload_part_url(object, upload_id, parts, |_, url| urls.push(url.to_owned()));
        urls
    }

    /// Calls `f(part_number, url)` with the presigned `UploadPart` URL of
    /// each part `1..=parts`, reusing one buffer (no allocation per part).
    pub fn each_upload_part_url(&self, object: &ObjectUrl, upload_id: &str, parts: u32, mut f: impl FnMut(u32, &str)) {
        let mut encoded_id = String::with_capacity(upload_id.len() * 3);
        uri_encode(upload_id, false, &mut encoded_id);

        // Canonical request: everything before the part number is shared.
        let mut shared = Sha256::new();
        for piece in ["PUT\n", &object.path, "\n", &self.std_query, "&partNumber="] {
            shared.update(piece.as_bytes());
        }
        let tail = format!("&uploadId={encoded_id}\nhost:{}\n\nhost\nUNSIGNED-PAYLOAD", object.host);
        let mut url = format!("{}{}?{}&partNumber=", object.origin, object.path, self.std_query);
        let head_len = url.len();
        let url_tail = format!("&uploadId={encoded_id}&X-Amz-Signature=");

        let mut number = [0u8; 10];
        for part in 1..=parts {
            let digits = itoa(part, &mut number);
            let mut creq = shared.clone();
            creq.update(digits.as_bytes());
            creq.update(tail.as_bytes());
            let signature = self.signature(&creq.finalize());
            url.truncate(head_len);
            url.push_str(digits);
            url.push_str(&url_tail);
            url.push_str(std::str::from_utf8(&signature).expect("hex is ASCII"));
            f(part, &url);
        }
    }

    /// Hex signature of the string to sign ending in `creq_hash`.
    fn signature(&self, creq_hash: &[u8]) -> [u8; 64] {
        let mut mac = self.sts_prefix.clone();
        mac.update(&hex(creq_hash));
        hex(&mac.finalize().into_bytes())
    }
}

/// `now` as SigV4's `X-Amz-Date`, `%Y%m%dT%H%M%SZ` in UTC. A fresh signer
/// instance makes one per request, so the common years (1000 to 9999) are
/// written from the civil date directly (Hinnant's `civil_from_days`),
/// without `strftime`'s formatting machinery; other years go through `strftime`.
fn amz_date(now: Timestamp) -> String {
    let seconds = now.as_second();
    let (days, of_day) = (seconds.div_euclid(86_400), seconds.rem_euclid(86_400));
    // Days since 0000-03-01, in 400-year eras of 146,097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 { shifted_month + 3 } else { shifted_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    if !(1000..=9999).contains(&year) {
        return now.strftime("%Y%m%dT%H%M%SZ").to_string();
    }
    let mut out = [0u8; 16];
    let mut put = |at: usize, width: usize, mut value: i64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(4, 2, month);
    put(6, 2, day);
    put(9, 2, of_day / 3_600);
    put(11, 2, of_day / 60 % 60);
    put(13, 2, of_day % 60);
    out[8] = b'T';
    out[15] = b'Z';
    String::from_utf8(out.to_vec()).expect("digits, T and Z are ASCII")
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// Lowercase hex of a 32-byte digest.
fn hex(bytes: &[u8]) -> [u8; 64] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (i, b) in bytes.iter().take(32).enumerate() {
        out[2 * i] = DIGITS[(b >> 4) as usize];
        out[2 * i + 1] = DIGITS[(b & 15) as usize];
    }
    out
}

fn itoa(mut n: u32, buf: &mut [u8; 10]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).expect("digits are ASCII")
}

/// The `host[:port]` of a URL as its `Host` header names it (a scheme's
/// default port left out): what outbound allow-lists admit and what
/// requests are sent to. `None` for a URL without a host.
pub fn url_authority(url: &url::Url) -> Option<String> {
    let host = url.host_str()?;
    Some(match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    })
}

/// [`url_authority`] of a URL given as text; `None` when it does not parse.
pub fn authority(url: &str) -> Option<String> {
    url_authority(&url::Url::parse(url).ok()?)
}

/// SigV4's URI encoding: every byte but `A-Za-z0-9-_.~` as `%XX` (uppercase),
/// and `/` kept when encoding a path.
pub fn uri_encode(input: &str, keep_slash: bool, out: &mut String) {
    const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
    for &b in input.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(DIGITS[(b >> 4) as usize] as char);
            out.push(DIGITS[(b & 15) as usize] as char);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aws_example_credentials() -> Credentials {
        Credentials {
            access_key_id: "AKIAIOSFODNN7EXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }
    }

    /// AWS's published presigned-URL example ("Example: Presigned URL", 2013-05-24, GET test.txt).
    #[test]
    fn matches_aws_published_presigned_url_example() {
        let endpoint = Endpoint::parse("https://s3.amazonaws.com", Addressing::VirtualHost).unwrap();
        let object = endpoint.object("examplebucket", "test.txt");
        let now = Timestamp::from_second(1_369_353_600).unwrap();
        let url =
            Presigner::new(&aws_example_credentials(), "us-east-1", now, 86400).presign(Method::Get, &object, &[]);
        assert_eq!(
            url,
            "https://examplebucket.s3.amazonaws.com/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request\
             &X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
        );
    }

    fn oracle(
        creds: &Credentials,
        region: &str,
        now: Timestamp,
        expires: u32,
        method: rusty_s3::Method,
        url: &str,
        query: &[(&str, &str)],
    ) -> String {
        let url: url::Url = url.parse().unwrap();
        let mut query = query.to_vec();
        query.sort_unstable();
        rusty_s3::signing::sign(
            &now,
            method,
            url,
            &creds.access_key_id,
            &creds.secret_access_key,
            creds.session_token.as_deref(),
            region,
            u64::from(expires),
            query.into_iter(),
            std::iter::empty(),
        )
        .to_string()
    }

    #[test]
    fn agrees_with_rusty_s3_for_every_method_style_and_token() {
        let now = Timestamp::from_second(1_790_000_123).unwrap();
        let cases = [
            ("http://127.0.0.1:9000", Addressing::Path, None),
            ("https://s3.eu-west-1.amazonaws.com", Addressing::VirtualHost, Some("FwoGZXIvYXdzE+/=token")),
            ("http://minio.local:9000/s3", Addressing::Path, Some("tok en")),
        ];
        for (endpoint, addressing, token) in cases {
            let creds = Credentials {
                access_key_id: "AKID".into(),
                secret_access_key: "secret/key+value".into(),
                session_token: token.map(str::to_owned),
            };
            let endpoint = Endpoint::parse(endpoint, addressing).unwrap();
            let object = endpoint.object("snap-bucket", "pre fix/ns-1/snapshots/a b+c.tlsnap");
            let presigner = Presigner::new(&creds, "eu-west-1", now, 900);
            let plain = format!("{}{}", object.origin, object.path);
            for (ours, theirs, params) in [
                (Method::Get, rusty_s3::Method::Get, vec![]),
                (Method::Put, rusty_s3::Method::Put, vec![]),
                (Method::Post, rusty_s3::Method::Post, vec![("uploadId", "u/1+2")]),
                (Method::Delete, rusty_s3::Method::Delete, vec![("uploadId", "u/1+2")]),
                (Method::Post, rusty_s3::Method::Post, vec![("uploads", "")]),
            ] {
                assert_eq!(
                    presigner.presign(ours, &object, &params),
                    oracle(&creds, "eu-west-1", now, 900, theirs, &plain, &params),
                    "{ours:?} {params:?} on {plain}"
                );
            }
        }
    }

    #[test]
    fn a_kept_signing_key_signs_like_a_fresh_one_and_a_wrong_one_is_not_used() {
        let object = Endpoint::parse("http://127.0.0.1:9000", Addressing::Path).unwrap().object("b", "k/x");
        let mut rotated = aws_example_credentials();
        rotated.secret_access_key = "another-secret".into();
        let day1: Timestamp = "2026-11-28T23:59:59Z".parse().unwrap();
        let day2: Timestamp = "2026-11-29T00:00:01Z".parse().unwrap();
        let creds = aws_example_credentials();
        let kept = SigningKey::derive(&creds, "us-east-1", day1);
        assert!(kept.is_for(&creds, "us-east-1", "2026-11-28T00:00:00Z".parse().unwrap()));
        for (credentials, region, now, right) in [
            (&creds, "us-east-1", day1, true),
            (&creds, "us-east-1", day2, false),
            (&creds, "eu-west-1", day1, false),
            (&rotated, "us-east-1", day1, false),
        ] {
            assert_eq!(kept.is_for(credentials, region, now), right, "{region} at {now}");
            let with_kept =
                Presigner::with_key(credentials, region, now, 3600, &kept).presign(Method::Get, &object, &[]);
            let fresh = Presigner::new(credentials, region, now, 3600).presign(Method::Get, &object, &[]);
            assert_eq!(with_kept, fresh, "{region} at {now}");
        }
    }

    #[test]
    fn part_urls_equal_one_by_one_presigning() {
        let creds = aws_example_credentials();
        let now = Timestamp::from_second(1_790_000_000).unwrap();
        let endpoint = Endpoint::parse("http://localhost:4566", Addressing::Path).unwrap();
        let object = endpoint.object("b", "p/ns/s.tlsnap");
        let presigner = Presigner::new(&creds, "us-east-1", now, 3600);
        let urls = presigner.upload_part_urls(&object, "upload/id=1", 12);
        assert_eq!(urls.len(), 12);
        for (i, url) in urls.iter().enumerate() {
            let n = (i + 1).to_string();
            let params = [("partNumber", n.as_str()), ("uploadId", "upload/id=1")];
            assert_eq!(url, &presigner.presign(Method::Put, &object, &params));
            let plain = format!("{}{}", object.origin, object.path);
            assert_eq!(url, &oracle(&creds, "us-east-1", now, 3600, rusty_s3::Method::Put, &plain, &params));
        }
    }

    #[test]
    fn encodes_keys_per_segment_and_bucket_as_one_segment() {
        let endpoint = Endpoint::parse("http://127.0.0.1:9000/", Addressing::Path).unwrap();
        let object = endpoint.object("bkt", "a/b c/ü~.x");
        assert_eq!(object.path, "/bkt/a/b%20c/%C3%BC~.x");
        assert_eq!(object.host, "127.0.0.1:9000");
        let virt = Endpoint::parse("https://s3.amazonaws.com:443", Addressing::VirtualHost).unwrap();
        assert_eq!(virt.authority_for("bkt"), "bkt.s3.amazonaws.com");
        assert_eq!(virt.object("bkt", "k").path, "/k");
    }

    #[test]
    fn authorities_keep_explicit_ports_and_drop_default_ones() {
        assert_eq!(authority("http://127.0.0.1:41234/api?x=1").as_deref(), Some("127.0.0.1:41234"));
        assert_eq!(authority("https://api.example.com:443/v1").as_deref(), Some("api.example.com"));
        assert_eq!(authority("http://Example.COM:8080").as_deref(), Some("example.com:8080"));
        assert_eq!(authority("http://[::1]:9000/").as_deref(), Some("[::1]:9000"));
        assert_eq!(authority("file:///tmp/x"), None);
        assert_eq!(authority("not a url"), None);
    }

    #[test]
    fn refuses_endpoints_it_cannot_sign_for() {
        assert!(matches!(Endpoint::parse("ftp://x", Addressing::Path), Err(EndpointError::Scheme(_))));
        assert!(matches!(Endpoint::parse("not a url", Addressing::Path), Err(EndpointError::Unparsable(_))));
        assert!(matches!(
            Endpoint::parse("http://127.0.0.1:9000", Addressing::VirtualHost),
            Err(EndpointError::VirtualHost(_))
        ));
    }

    #[test]
    fn credentials_debug_hides_secrets() {
        let creds = Credentials { session_token: Some("tok".into()), ..aws_example_credentials() };
        let shown = format!("{creds:?}");
        assert!(shown.contains("AKIAIOSFODNN7EXAMPLE"));
        assert!(!shown.contains("wJalr") && !shown.contains("tok\""));
    }

    #[test]
    fn amz_date_at_the_calendars_edges() {
        for (at, expected) in [
            ("1969-12-31T23:59:59Z", "19691231T235959Z"),
            ("1970-01-01T00:00:00Z", "19700101T000000Z"),
            ("2000-02-29T12:34:56Z", "20000229T123456Z"),
            ("2100-02-28T23:59:59Z", "21000228T235959Z"),
            ("2100-03-01T00:00:00Z", "21000301T000000Z"),
            ("2026-12-31T23:59:59Z", "20261231T235959Z"),
            ("1000-01-01T00:00:00Z", "10000101T000000Z"),
            ("9999-12-30T21:59:59Z", "99991230T215959Z"),
            ("0999-12-31T23:59:59Z", "09991231T235959Z"),
        ] {
            let now: Timestamp = at.parse().unwrap();
            assert_eq!(amz_date(now), expected, "{at}");
        }
    }

    mod properties {
        use proptest::prelude::*;

        use super::*;

        /// Key segments as the signer can produce them: any characters, but
        /// never `.` or `..` (which URL parsers, rusty-s3's included, fold away).
        fn key() -> impl Strategy<Value = String> {
            let segment = prop_oneof![
                "[a-zA-Z0-9._~-]{1,12}",
                "[ -~]{1,12}",
                any::<String>().prop_map(|s| s.chars().filter(|c| *c != '/').take(12).collect::<String>()),
            ];
            prop::collection::vec(segment, 1..6)
                .prop_map(|segments| segments.join("/"))
                .prop_filter("no dot segment", |key| !key.split('/').any(|s| s == "." || s == ".."))
        }

        fn credentials() -> impl Strategy<Value = Credentials> {
            ("[A-Z0-9]{4,20}", "[ -~]{1,40}", prop::option::of("[ -~]{1,60}")).prop_map(|(id, secret, token)| {
                Credentials { access_key_id: id, secret_access_key: secret, session_token: token }
            })
        }

        fn endpoint() -> impl Strategy<Value = (String, Addressing)> {
            prop_oneof![
                (1u16..65535, "(/[a-z0-9]{1,6}){0,2}")
                    .prop_map(|(port, prefix)| (format!("http://127.0.0.1:{port}{prefix}"), Addressing::Path)),
                "[a-z]{1,8}(\\.[a-z]{1,8}){0,2}".prop_map(|host| (format!("https://{host}"), Addressing::VirtualHost)),
                "[a-z]{1,8}".prop_map(|host| (format!("http://{host}.local:9000"), Addressing::Path)),
            ]
        }

        fn method() -> impl Strategy<Value = (Method, rusty_s3::Method)> {
            prop_oneof![
                Just((Method::Get, rusty_s3::Method::Get)),
                Just((Method::Put, rusty_s3::Method::Put)),
                Just((Method::Post, rusty_s3::Method::Post)),
                Just((Method::Delete, rusty_s3::Method::Delete)),
            ]
        }

        proptest! {
            // No regression files: the repository's top level is fixed; a failure prints its input.
            #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

            /// `X-Amz-Date` written by hand is `strftime`'s, over jiff's whole range.
            #[test]
            fn amz_date_is_strftimes(second in prop_oneof![
                Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
                // 1900 to 2200, where signing happens.
                -2_208_988_800i64..7_258_118_400,
            ]) {
                let now = Timestamp::from_second(second).unwrap();
                prop_assert_eq!(amz_date(now), now.strftime("%Y%m%dT%H%M%SZ").to_string());
            }

            /// Every URL `presign` makes is the one rusty-s3 makes for the same inputs.
            #[test]
            fn presign_equals_rusty_s3(
                creds in credentials(),
                (endpoint, addressing) in endpoint(),
                // S3's naming rules: no `xn--` prefix (a host label that
                // starts so must be valid punycode, which the oracle's URL parser checks).
                bucket in "[a-z0-9][a-z0-9-]{2,20}".prop_filter("S3 bucket names do not start with xn--", |b| !b.starts_with("xn--")),
                key in key(),
                region in "[a-z]{2}-[a-z]{4,9}-[1-9]",
                seconds in 946_684_800i64..4_102_444_800,
                expires in 1u32..=MAX_EXPIRES_SECS,
                (ours, theirs) in method(),
                params in prop::collection::vec(
                    prop_oneof![
                        any::<String>().prop_map(|v| ("uploadId", v)),
                        (1u32..=10_000).prop_map(|n| ("partNumber", n.to_string())),
                        Just(("uploads", String::new())),
                    ],
                    0..3,
                ),
            ) {
                let mut params: Vec<(&str, String)> = params;
                params.sort();
                params.dedup_by(|a, b| a.0 == b.0);
                let params: Vec<(&str, &str)> = params.iter().map(|(n, v)| (*n, v.as_str())).collect();
                let endpoint = Endpoint::parse(&endpoint, addressing).unwrap();
                let object = endpoint.object(&bucket, &key);
                let now = Timestamp::from_second(seconds).unwrap();
                let url = Presigner::new(&creds, &region, now, expires).presign(ours, &object, &params);
                let plain = format!("{}{}", object.origin, object.path);
                prop_assert_eq!(url, oracle(&creds, &region, now, expires, theirs, &plain, &params));
            }

            /// Every UploadPart URL equals rusty-s3's, for any upload id and part count.
            #[test]
            fn part_urls_equal_rusty_s3(
                creds in credentials(),
                key in key(),
                upload_id in any::<String>(),
                parts in 1u32..40,
                seconds in 946_684_800i64..4_102_444_800,
            ) {
                let endpoint = Endpoint::parse("http://127.0.0.1:9000", Addressing::Path).unwrap();
                let object = endpoint.object("bkt", &key);
                let now = Timestamp::from_second(seconds).unwrap();
                let plain = format!("{}{}", object.origin, object.path);
                let presigner = Presigner::new(&creds, "us-east-1", now, 3600);
                let mut seen = 0;
                presigner.each_upload_part_url(&object, &upload_id, parts, |part, url| {
                    let n = part.to_string();
                    let params = [("partNumber", n.as_str()), ("uploadId", upload_id.as_str())];
                    assert_eq!(url, oracle(&creds, "us-east-1", now, 3600, rusty_s3::Method::Put, &plain, &params));
                    seen += 1;
                });
                prop_assert_eq!(seen, parts);
            }
        }
    }
}
