//! Caller credentials for the signer: HMAC-SHA256-signed bearer tokens that
//! carry the caller's namespace and an expiry, verifiable by the signer alone.
//!
//! Format: `sst1.<payload>.<mac>`, where `payload` is base64url (no padding)
//! of `{"ns":"<namespace>","exp":<unix seconds>}` (plus, in a read grant the
//! platform mints, `"read":["s3://bucket/key",…]`) and `mac` is base64url of
//! HMAC-SHA256(key, `sst1.<payload>`). The MAC is compared in constant time
//! (wit/protocol.md §10).

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

const VERSION: &str = "sst1";

/// Shortest token key accepted (bytes).
pub const MIN_KEY_LEN: usize = 32;

/// Longest lifetime a token may have left when it is verified, unless the
/// verifier is configured otherwise: 7 days.
pub const DEFAULT_MAX_TTL_SECS: i64 = 7 * 24 * 3600;

/// Most URIs one read grant may name.
pub const MAX_READ_GRANTS: usize = 64;

/// What a valid token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The caller's namespace; every key the signer signs for it lies under it.
    #[serde(rename = "ns")]
    pub namespace: String,
    /// Unix seconds after which the token is refused.
    #[serde(rename = "exp")]
    pub expires_at: i64,
    /// Exact object URIs outside the namespace that this token may read
    /// (`get_blob`): a short-lived grant the platform mints, e.g. for the
    /// snapshot of another namespace's public template.
    #[serde(rename = "read", default, skip_serializing_if = "Vec::is_empty")]
    pub read: Vec<String>,
}

impl Claims {
    /// Claims for `namespace` until `expires_at`, with no read grant.
    pub fn new(namespace: &str, expires_at: i64) -> Self {
        Claims { namespace: namespace.to_owned(), expires_at, read: Vec::new() }
    }
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    /// Not `sst1.<payload>.<mac>` or the payload is not the claims JSON.
    Malformed(&'static str),
    /// The MAC does not verify under the signer's key (forged or another key).
    BadSignature,
    /// The token expired at this unix time.
    Expired { expired_at: i64 },
    /// The namespace is not a valid namespace name.
    BadNamespace(String),
    /// The token's expiry lies further ahead than the verifier allows.
    TooLong { expires_at: i64, max_ttl_secs: i64 },
    /// The read grant names too many URIs.
    TooManyGrants { count: usize },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenError::Malformed(why) => write!(f, "bearer token is malformed: {why}"),
            TokenError::BadSignature => {
                write!(f, "bearer token signature does not verify; mint a token with this signer's key")
            }
            TokenError::Expired { expired_at } => {
                write!(f, "bearer token expired at unix time {expired_at}; mint a new one")
            }
            TokenError::BadNamespace(ns) => write!(f, "bearer token names an invalid namespace '{ns}'"),
            TokenError::TooLong { expires_at, max_ttl_secs } => write!(
                f,
                "bearer token expires at unix time {expires_at}, more than {max_ttl_secs} s from now; \
                 mint one with a shorter lifetime"
            ),
            TokenError::TooManyGrants { count } => {
                write!(f, "bearer token grants reads of {count} objects; at most {MAX_READ_GRANTS} are allowed")
            }
        }
    }
}

impl std::error::Error for TokenError {}

/// Valid namespace: 1..=63 of `A-Za-z0-9._-`, not `.` or `..`.
pub fn valid_namespace(ns: &str) -> bool {
    (1..=63).contains(&ns.len())
        && ns != "."
        && ns != ".."
        && ns.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn mac(key: &[u8], signed: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(signed.as_bytes());
    mac
}

/// Mints a token for `namespace` valid until `expires_at` (unix seconds).
pub fn mint(key: &[u8], namespace: &str, expires_at: i64) -> Result<String, TokenError> {
    mint_claims(key, &Claims::new(namespace, expires_at))
}

/// Mints a token carrying `claims` (a read grant included).
pub fn mint_claims(key: &[u8], claims: &Claims) -> Result<String, TokenError> {
    if !valid_namespace(&claims.namespace) {
        return Err(TokenError::BadNamespace(claims.namespace.clone()));
    }
    if claims.read.len() > MAX_READ_GRANTS {
        return Err(TokenError::TooManyGrants { count: claims.read.len() });
    }
    let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).expect("claims serialize"));
    let signed = format!("{VERSION}.{payload}");
    let tag = URL_SAFE_NO_PAD.encode(mac(key, &signed).finalize().into_bytes());
    Ok(format!("{signed}.{tag}"))
}

/// Verifies `token` under `key` at `now` (unix seconds) and returns its
/// claims. A token whose expiry lies more than `max_ttl_secs` ahead is
/// refused: a leaked token must not be good forever.
pub fn verify(key: &[u8], token: &str, now: i64, max_ttl_secs: i64) -> Result<Claims, TokenError> {
    TokenKey::new(key).verify(token, now, max_ttl_secs)
}

/// A token key with its HMAC state prepared once: [`TokenKey::verify`]
/// hashes only the token. A plain value; a shell that sees the same token
/// again keeps the last one it accepted ([`crate::signer::Memo`]).
#[derive(Clone)]
pub struct TokenKey {
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(<redacted>)")
    }
}

impl TokenKey {
    pub fn new(key: &[u8]) -> Self {
        TokenKey { keyed: Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length") }
    }

    /// [`verify`] under this key.
    pub fn verify(&self, token: &str, now: i64, max_ttl_secs: i64) -> Result<Claims, TokenError> {
        let claims = signed_claims(&self.keyed, token)?;
        check_lifetime(&claims, now, max_ttl_secs)?;
        Ok(claims)
    }
}

/// Whether `a` and `b` are equal, in a time that depends on their lengths
/// only: the bytes are folded eight at a time into one difference, which
/// alone is compared (a comparison per byte costs a barrier per byte).
pub(crate) fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (a_words, a_tail) = a.as_chunks::<8>();
    let (b_words, b_tail) = b.as_chunks::<8>();
    let mut difference = 0u64;
    for (x, y) in a_words.iter().zip(b_words) {
        difference |= u64::from_ne_bytes(*x) ^ u64::from_ne_bytes(*y);
    }
    for (x, y) in a_tail.iter().zip(b_tail) {
        difference |= u64::from(x ^ y);
    }
    bool::from(difference.ct_eq(&0))
}

/// The claims of `token` when its MAC holds and they are well formed (its lifetime unchecked).
fn signed_claims(keyed: &Hmac<Sha256>, token: &str) -> Result<Claims, TokenError> {
    let mut parts = token.split('.');
    let (Some(version), Some(payload), Some(tag), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed("expected three dot-separated parts"));
    };
    if version != VERSION {
        return Err(TokenError::Malformed("unknown version (expected sst1)"));
    }
    let tag = URL_SAFE_NO_PAD.decode(tag).map_err(|_| TokenError::Malformed("signature is not base64url"))?;
    let mut mac = keyed.clone();
    mac.update(&token.as_bytes()[..version.len() + 1 + payload.len()]);
    mac.verify_slice(&tag).map_err(|_| TokenError::BadSignature)?;
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| TokenError::Malformed("payload is not base64url"))?;
    let claims: Claims =
        serde_json::from_slice(&json).map_err(|_| TokenError::Malformed("payload is not {ns, exp} JSON"))?;
    if !valid_namespace(&claims.namespace) {
        return Err(TokenError::BadNamespace(claims.namespace));
    }
    if claims.read.len() > MAX_READ_GRANTS {
        return Err(TokenError::TooManyGrants { count: claims.read.len() });
    }
    Ok(claims)
}

/// Refuses claims that expired at `now`, or that live more than `max_ttl_secs` past it.
pub(crate) fn check_lifetime(claims: &Claims, now: i64, max_ttl_secs: i64) -> Result<(), TokenError> {
    if now >= claims.expires_at {
        return Err(TokenError::Expired { expired_at: claims.expires_at });
    }
    if claims.expires_at.saturating_sub(now) > max_ttl_secs {
        return Err(TokenError::TooLong { expires_at: claims.expires_at, max_ttl_secs });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn round_trips_namespace_and_expiry() {
        let token = mint(KEY, "team-a", 2_000).unwrap();
        assert_eq!(verify(KEY, &token, 1_999, 3600).unwrap(), Claims::new("team-a", 2_000));
    }

    #[test]
    fn read_grants_round_trip_and_are_covered_by_the_mac() {
        let claims = Claims { read: vec!["s3://b/builds/other/x.tlsnap".into()], ..Claims::new("team-a", 2_000) };
        let token = mint_claims(KEY, &claims).unwrap();
        assert_eq!(verify(KEY, &token, 1_000, 3600).unwrap(), claims);
        // Widening the grant without the key breaks the MAC.
        let (_, tag) = token.rsplit_once('.').unwrap();
        let widened = URL_SAFE_NO_PAD
            .encode(br#"{"ns":"team-a","exp":2000,"read":["s3://b/builds/other/x.tlsnap","s3://b/builds/c/y"]}"#);
        assert_eq!(verify(KEY, &format!("sst1.{widened}.{tag}"), 1_000, 3600), Err(TokenError::BadSignature));
        // A token without the claim has no grant.
        assert!(verify(KEY, &mint(KEY, "team-a", 2_000).unwrap(), 1_000, 3600).unwrap().read.is_empty());
        let many = Claims { read: vec!["s3://b/k".into(); MAX_READ_GRANTS + 1], ..Claims::new("team-a", 2_000) };
        assert_eq!(mint_claims(KEY, &many), Err(TokenError::TooManyGrants { count: MAX_READ_GRANTS + 1 }));
    }

    #[test]
    fn same_bytes_sees_a_difference_at_every_position_and_in_length() {
        let token: Vec<u8> = (0..37u8).collect();
        assert!(same_bytes(&token, &token.clone()) && same_bytes(b"", b""));
        for at in 0..token.len() {
            for flip in [1u8, 0x80] {
                let mut other = token.clone();
                other[at] ^= flip;
                assert!(!same_bytes(&token, &other), "byte {at} ^ {flip:#x}");
            }
        }
        assert!(!same_bytes(&token, &token[..36]) && !same_bytes(&token[..8], &token[..9]));
    }

    #[test]
    fn refuses_tokens_that_live_longer_than_the_maximum() {
        let forever = mint(KEY, "team-a", i64::MAX).unwrap();
        assert_eq!(
            verify(KEY, &forever, 1_000, DEFAULT_MAX_TTL_SECS),
            Err(TokenError::TooLong { expires_at: i64::MAX, max_ttl_secs: DEFAULT_MAX_TTL_SECS })
        );
        let day = mint(KEY, "team-a", 1_000 + 86_400).unwrap();
        assert!(verify(KEY, &day, 1_000, 86_400).is_ok());
        assert!(matches!(verify(KEY, &day, 1_000, 86_399), Err(TokenError::TooLong { .. })));
        // The bound is on what is left: later, the same token passes.
        assert!(verify(KEY, &day, 1_001, 86_399).is_ok());
    }

    #[test]
    fn refuses_expired_forged_and_other_key_tokens() {
        let token = mint(KEY, "team-a", 2_000).unwrap();
        assert_eq!(verify(KEY, &token, 2_000, 3600), Err(TokenError::Expired { expired_at: 2_000 }));
        assert_eq!(verify(b"another key, 32 bytes long......", &token, 0, 3600), Err(TokenError::BadSignature));
        // Same MAC, payload swapped to claim another namespace.
        let (_, tag) = token.rsplit_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"ns":"team-b","exp":2000}"#);
        assert_eq!(verify(KEY, &format!("sst1.{forged_payload}.{tag}"), 0, 3600), Err(TokenError::BadSignature));
        assert!(matches!(verify(KEY, "sst1.abc", 0, 3600), Err(TokenError::Malformed(_))));
        assert!(matches!(verify(KEY, "jwt.a.b", 0, 3600), Err(TokenError::Malformed(_))));
    }

    #[test]
    fn namespaces_are_plain_names() {
        assert!(valid_namespace("default") && valid_namespace("a.b_c-1"));
        for bad in ["", ".", "..", "a/b", "a b", "ns%2f", &"x".repeat(64)] {
            assert!(!valid_namespace(bad), "{bad}");
            assert!(mint(KEY, bad, 1).is_err());
        }
    }
}
