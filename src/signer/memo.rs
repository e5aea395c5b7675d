//! What a signer shell may keep between requests to skip repeated work.
//!
//! The core holds no state between calls. A shell that serves many requests
//! (the component's instance, the native handler's worker thread) owns a
//! [`Memo`] and passes it to [`super::handle`]; it holds plain values only,
//! and a clone is a real copy:
//! - the last accepted token and its claims, hit only by the same whole
//!   token (compared in constant time) under the same key, its lifetime
//!   checked again at every `now`;
//! - the day's SigV4 signing key (four HMACs to derive);
//! - the last presigner, reused within the same second for the same
//!   credentials, region and URL lifetime (it depends on nothing else and
//!   holds nothing a caller sent).
//!
//! Every answer is the one a fresh `Memo` gives: the tests below check it.

use jiff::Timestamp;

use super::config::SignerConfig;
use crate::presign::{Credentials, Presigner, SigningKey};
use crate::token::{self, Claims, TokenError};

/// Work kept between requests by one shell; see the module.
#[derive(Clone, Default)]
pub struct Memo {
    /// (token key, token, claims) of the last accepted token.
    token: Option<(Vec<u8>, String, Claims)>,
    key: Option<SigningKey>,
    presigner: Option<MadeFor>,
}

/// A presigner and what it was made from.
#[derive(Clone)]
struct MadeFor {
    second: i64,
    credentials: Credentials,
    region: String,
    expires_secs: u32,
    presigner: Presigner,
}

impl std::fmt::Debug for Memo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Memo(<redacted>)")
    }
}

impl Memo {
    /// `config.verify_token(token, now)`, skipping the MAC and JSON when
    /// `token` is the last one accepted under the same key.
    pub fn claims(&mut self, config: &SignerConfig, token: &str, now: i64) -> Result<Claims, TokenError> {
        if let Some((key, accepted, claims)) = &self.token
            && key.as_slice() == config.token_key()
            && token::same_bytes(accepted.as_bytes(), token.as_bytes())
        {
            token::check_lifetime(claims, now, config.token_max_ttl_secs)?;
            return Ok(claims.clone());
        }
        let claims = config.verify_token(token, now)?;
        self.token = Some((config.token_key().to_vec(), token.to_owned(), claims.clone()));
        Ok(claims)
    }

    /// `config.presigner(now)`, reusing the last presigner within its second
    /// and the signing key within its day.
    pub fn presigner(&mut self, config: &SignerConfig, now: Timestamp) -> Presigner {
        let (credentials, region, expires_secs) = (&config.credentials, config.region.as_str(), config.url_ttl_secs);
        let second = now.as_second();
        if let Some(made) = &self.presigner
            && made.second == second
            && made.expires_secs == expires_secs
            && made.region == region
            && made.credentials == *credentials
        {
            return made.presigner.clone();
        }
        let key = match self.key.take() {
            Some(key) if key.is_for(credentials, region, now) => key,
            _ => SigningKey::derive(credentials, region, now),
        };
        let presigner = Presigner::with_key(credentials, region, now, expires_secs, &key);
        self.key = Some(key);
        self.presigner = Some(MadeFor {
            second,
            credentials: credentials.clone(),
            region: region.to_owned(),
            expires_secs,
            presigner: presigner.clone(),
        });
        presigner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;

    use crate::presign::{Addressing, Endpoint, Method};

    const KEY: &str = "memo-test-token-key-0123456789abcdef";

    fn config(vars: &[(&str, &str)]) -> SignerConfig {
        let mut env: Vec<(String, String)> = [
            ("SNAPSIGN_BUCKET", "snaps"),
            ("SNAPSIGN_S3_ENDPOINT", "http://127.0.0.1:9000"),
            ("SNAPSIGN_S3_ADDRESSING", "path"),
            ("SNAPSIGN_ACCESS_KEY_ID", "AKIDMEMO"),
            ("SNAPSIGN_SECRET_ACCESS_KEY", "memo-secret"),
            ("SNAPSIGN_TOKEN_KEY", KEY),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for (k, v) in vars {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        }
        SignerConfig::from_vars(env).unwrap()
    }

    #[test]
    fn the_last_accepted_token_is_still_checked_for_lifetime_and_only_the_same_token_under_the_same_key_hits() {
        let config = config(&[("SNAPSIGN_TOKEN_MAX_TTL_SECS", "3600")]);
        let mut memo = Memo::default();
        let token = token::mint(KEY.as_bytes(), "team-a", 2_000).unwrap();
        assert_eq!(memo.claims(&config, &token, 1_000).unwrap(), Claims::new("team-a", 2_000));
        // Accepted before, but its lifetime is judged at every `now`.
        assert_eq!(memo.claims(&config, &token, 2_000), Err(TokenError::Expired { expired_at: 2_000 }));
        let short = self::config(&[("SNAPSIGN_TOKEN_MAX_TTL_SECS", "999")]);
        assert_eq!(
            memo.claims(&short, &token, 1_000),
            Err(TokenError::TooLong { expires_at: 2_000, max_ttl_secs: 999 })
        );
        assert_eq!(memo.claims(&config, &token, 1_999).unwrap(), Claims::new("team-a", 2_000));
        // One byte off in the tag, the payload, or one byte more: verified afresh, and refused.
        let mut tag_off = token.clone().into_bytes();
        let last = tag_off.len() - 1;
        tag_off[last] = if tag_off[last] == b'A' { b'B' } else { b'A' };
        assert_eq!(memo.claims(&config, std::str::from_utf8(&tag_off).unwrap(), 1_000), Err(TokenError::BadSignature));
        let (signed, tag) = token.rsplit_once('.').unwrap();
        let other_payload = format!(
            "sst1.{}.{tag}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"ns":"team-b","exp":2000}"#)
        );
        assert_eq!(memo.claims(&config, &other_payload, 1_000), Err(TokenError::BadSignature));
        let longer = format!("{signed}.{tag}A");
        assert!(memo.claims(&config, &longer, 1_000).is_err(), "a token one byte longer was accepted");
        // Another caller's good token replaces it; the first still verifies afresh.
        let other = token::mint(KEY.as_bytes(), "team-b", 2_000).unwrap();
        assert_eq!(memo.claims(&config, &other, 1_000).unwrap().namespace, "team-b");
        assert_eq!(memo.claims(&config, &token, 1_000).unwrap().namespace, "team-a");
        // The memo of an accepted token under another key: refused there.
        let rekeyed = self::config(&[("SNAPSIGN_TOKEN_KEY", "another-token-key-0123456789abcdef012")]);
        assert_eq!(memo.claims(&rekeyed, &token, 1_000), Err(TokenError::BadSignature));
        // A clone is a copy: it holds the same token, and still checks it.
        let mut copy = memo.clone();
        assert_eq!(copy.claims(&config, &token, 2_000), Err(TokenError::Expired { expired_at: 2_000 }));
    }

    #[test]
    fn a_kept_presigner_signs_like_a_fresh_one_for_the_same_inputs_only() {
        let mut memo = Memo::default();
        let object = Endpoint::parse("http://127.0.0.1:9000", Addressing::Path).unwrap().object("b", "k/x");
        let second: Timestamp = "2026-11-29T23:59:59Z".parse().unwrap();
        let next_day: Timestamp = "2026-11-30T00:00:00Z".parse().unwrap();
        let mut seen = std::collections::HashSet::new();
        for (vars, now) in [
            (&[][..], second),
            (&[], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60")], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60"), ("SNAPSIGN_ACCESS_KEY_ID", "AKIDOTHER")], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60"), ("SNAPSIGN_SESSION_TOKEN", "session/token=1")], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60"), ("SNAPSIGN_SECRET_ACCESS_KEY", "another-secret")], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60"), ("SNAPSIGN_REGION", "eu-west-1")], second),
            (&[("SNAPSIGN_URL_TTL_SECS", "60"), ("SNAPSIGN_REGION", "eu-west-1")], next_day),
        ] {
            let config = config(vars);
            let kept = memo.presigner(&config, now).presign(Method::Get, &object, &[]);
            let fresh = config.presigner(now).presign(Method::Get, &object, &[]);
            assert_eq!(kept, fresh, "{vars:?} at {now}");
            seen.insert(kept);
        }
        // Every change of input made another URL (the first two inputs are the same).
        assert_eq!(seen.len(), 7);
    }
}
