//! The sign request parser, validator and the whole decision (`handle`) on
//! arbitrary bodies and headers. Checks, besides "no panic":
//! - strict JSON reads what serde_json reads, or refuses a duplicate key;
//! - an error answer signs nothing and is `{code, message, request_id}`;
//! - an accepted artifact lands under `prefix/namespace/` with a clean key;
//! - a signed answer needs a token that verifies.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use snapsign::signer::{self, Incoming, SIGN_PATH, SignError, SignerConfig, Step};

const KEY: &str = "fuzz-token-key-0123456789abcdef01234";
const NOW: i64 = 1_800_000_000;

fn config() -> &'static SignerConfig {
    static CONFIG: std::sync::OnceLock<SignerConfig> = std::sync::OnceLock::new();
    CONFIG.get_or_init(|| {
        SignerConfig::from_vars(
            [
                ("SNAPSIGN_BUCKET", "snaps"),
                ("SNAPSIGN_KEY_PREFIX", "builds"),
                ("SNAPSIGN_S3_ENDPOINT", "http://127.0.0.1:9000"),
                ("SNAPSIGN_S3_ADDRESSING", "path"),
                ("SNAPSIGN_ACCESS_KEY_ID", "AKID"),
                ("SNAPSIGN_SECRET_ACCESS_KEY", "SECRET"),
                ("SNAPSIGN_TOKEN_KEY", KEY),
                ("SNAPSIGN_SHARED_PREFIXES", "public"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        )
        .expect("fuzz config is valid")
    })
}

const NAMESPACES: [&str; 3] = ["team-a", "team-b", "a.b_c-d"];

fn bearer(index: usize) -> &'static str {
    static TOKENS: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    &TOKENS.get_or_init(|| {
        NAMESPACES
            .iter()
            .map(|ns| format!("Bearer {}", snapsign::token::mint(KEY.as_bytes(), ns, NOW + 60).unwrap()))
            .collect()
    })[index]
}

fn check_error(body: &str) {
    assert!(!body.contains("X-Amz-"), "signed on an error path: {body}");
    let json: Value = serde_json::from_str(body).expect("error bodies are JSON");
    assert!(json["code"].is_string() && json["message"].is_string() && json["request_id"] == "fuzz", "{body}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else { return };

    // Strict JSON against serde_json.
    match (signer::request::strict_json(body), serde_json::from_slice::<Value>(body)) {
        (Ok(ours), Ok(theirs)) => assert_eq!(ours, theirs),
        // A duplicate may come before a later syntax error.
        (Err(SignError::DuplicateKey { .. }), _) => {}
        (Err(SignError::MalformedJson(_)), Err(_)) => {}
        (ours, theirs) => panic!("strict {ours:?} vs serde_json {theirs:?}"),
    }
    let parsed = signer::request::parse(body);

    let config = config();
    let namespace = NAMESPACES[usize::from(selector % 3)];
    let verifies = selector & 0x30 != 0x30;
    let authorization = if verifies {
        bearer(usize::from(selector % 3)).to_owned()
    } else {
        format!("Bearer {}", String::from_utf8_lossy(&body[..body.len().min(40)]))
    };
    let incoming = Incoming {
        method: if selector & 0x40 == 0 { "POST" } else { "PUT" },
        path: if selector & 0x80 == 0 { SIGN_PATH } else { "/api/v1/blob" },
        authorization: Some(&authorization),
        body,
        request_id: "fuzz",
    };
    let routed = selector & 0xc0 == 0;
    match signer::handle(config, &mut signer::Memo::default(), &incoming, jiff::Timestamp::from_second(NOW).unwrap()) {
        Step::Respond(answer) if answer.status == 200 => {
            assert!(verifies && routed, "signed without a verified token or route");
            let request = parsed.expect("an answered request parsed");
            let json: Value = serde_json::from_str(&answer.body).expect("answers are JSON");
            let uri = json["uri"].as_str().expect("answers name their uri");
            if let snapsign::wire::Target::Artifact { rel_path } = &request.target {
                assert_eq!(uri, format!("s3://snaps/builds/{namespace}/{rel_path}"));
                assert!(signer::validate::rel_path(rel_path).is_ok());
            } else {
                let key = uri.strip_prefix("s3://snaps/").expect("only this bucket");
                assert!(key.starts_with(&format!("builds/{namespace}/")) || key.starts_with("public/"), "{uri}");
                assert!(!key.split('/').any(|s| s.is_empty() || s == "." || s == ".."), "{uri}");
            }
        }
        Step::Respond(answer) => {
            check_error(&answer.body);
            if let (true, true, Err(e)) = (verifies, routed, &parsed) {
                assert_eq!(answer.status, e.status());
            }
        }
        Step::CreateMultipartUpload(pending) => {
            assert!(verifies && routed && parsed.is_ok());
            assert!(pending.uri().starts_with(&format!("s3://snaps/builds/{namespace}/")));
            let detail = format!("{}: refused", pending.store_url);
            check_error(&pending.unreachable(&detail).body);
        }
    }
});
