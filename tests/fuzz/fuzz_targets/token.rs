//! The token parser (`snapsign::token::verify`), on arbitrary text and on
//! arbitrary payloads carrying a valid MAC (so the claims parser behind the
//! MAC is reached). A token that verifies names a valid namespace, has not
//! expired, and mints back to a token with the same claims.
#![no_main]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, KeyInit, Mac};
use libfuzzer_sys::fuzz_target;
use sha2::Sha256;
use snapsign::token;

const KEY: &[u8] = b"fuzz-token-key-0123456789abcdef01234";
const NOW: i64 = 1_800_000_000;
/// The signer's default bound on a token's lifetime (7 days).
const MAX_TTL: i64 = 604_800;

fn signed(payload: &[u8]) -> String {
    let signed = format!("sst1.{}", URL_SAFE_NO_PAD.encode(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(KEY).unwrap();
    mac.update(signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes()))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let text = if mode & 1 == 0 { String::from_utf8_lossy(rest).into_owned() } else { signed(rest) };
    if let Ok(claims) = token::verify(KEY, &text, NOW, MAX_TTL) {
        assert!(token::valid_namespace(&claims.namespace), "{claims:?}");
        assert!(claims.expires_at > NOW && claims.expires_at - NOW <= MAX_TTL, "{claims:?}");
        let again = token::mint_claims(KEY, &claims).unwrap();
        assert_eq!(token::verify(KEY, &again, NOW, MAX_TTL).unwrap(), claims);
        // Another key never accepts it.
        assert!(token::verify(b"another-key-0123456789abcdef0123456", &text, NOW, MAX_TTL).is_err());
    }
});
