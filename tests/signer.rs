//! End-to-end: the signer component in the host (`serve-signer`), over real
//! HTTP on loopback, against the real S3-compatible store (s3s, SigV4 checked).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use snapsign::presign::{Addressing, Credentials, Endpoint, Method, Presigner};
use snapsign_host::engine::EngineLimits;

const MIB: usize = 1024 * 1024;

fn put_artifact(rel_path: &str, max_parts: u64, part_size: u64) -> Value {
    json!({"target": {"kind": "artifact", "rel_path": rel_path},
           "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": max_parts, "part_size_bytes": part_size}}})
}

fn get_blob(uri: &str) -> Value {
    json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}})
}

fn bytes_of(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) ^ (i >> 12) as u8).collect()
}

async fn put(http: &reqwest::Client, url: &str, body: Vec<u8>) -> reqwest::Response {
    http.put(url).body(body).send().await.expect("reach the store")
}

#[tokio::test(flavor = "multi_thread")]
async fn multipart_upload_of_12_mib_in_3_parts_round_trips_through_the_store() {
    round_trip_12_mib(Stack::start().await).await;
}

/// The same from instances made from the pre-initialized snapshot: its
/// configuration and signing key are the ones the store checks.
#[tokio::test(flavor = "multi_thread")]
async fn a_pre_initialized_signer_signs_urls_the_store_accepts() {
    round_trip_12_mib(Stack::start_preinitialized().await).await;
}

async fn round_trip_12_mib(stack: Stack) {
    let (status, signed) = stack.sign("team-a", put_artifact("snapshots/abc.tlsnap", 3, 5 * MIB as u64)).await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!(signed["kind"], "s3_multipart");
    assert_eq!(signed["uri"], "s3://snaps/builds/team-a/snapshots/abc.tlsnap");
    assert_eq!(signed["partSizeBytes"], 5 * MIB);
    let parts = signed["partUrls"].as_array().unwrap();
    assert_eq!(parts.len(), 3);
    assert_eq!(stack.open_uploads().len(), 1, "CreateMultipartUpload reached the store");

    let data = bytes_of(12 * MIB, 7);
    let mut etags = Vec::new();
    for (i, chunk) in data.chunks(5 * MIB).enumerate() {
        assert_eq!(parts[i]["partNumber"], i + 1);
        let response = put(&stack.http, parts[i]["url"].as_str().unwrap(), chunk.to_vec()).await;
        assert_eq!(response.status(), 200, "part {}: {}", i + 1, response.text().await.unwrap());
        etags.push(response.headers()["etag"].to_str().unwrap().to_owned());
    }
    let bucket =
        rusty_s3::Bucket::new(stack.store.url().parse().unwrap(), rusty_s3::UrlStyle::Path, BUCKET, "us-east-1")
            .unwrap();
    let completion = rusty_s3::actions::CompleteMultipartUpload::new(
        &bucket,
        None,
        "unused",
        "unused",
        etags.iter().map(String::as_str),
    )
    .body();
    let response = stack.http.post(signed["completeUrl"].as_str().unwrap()).body(completion).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let text = response.text().await.unwrap();
    assert!(text.contains("-3"), "multipart ETag names 3 parts: {text}");
    assert!(stack.open_uploads().is_empty());

    let (status, read) = stack.sign("team-a", get_blob("s3://snaps/builds/team-a/snapshots/abc.tlsnap")).await;
    assert_eq!(status, 200, "{read}");
    assert_eq!((read["kind"].as_str(), read["method"].as_str()), (Some("single_get"), Some("GET")));
    let body = stack.http.get(read["url"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(body.status(), 200);
    assert!(body.bytes().await.unwrap() == data, "object bytes differ from what was uploaded");
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_url_discards_the_upload_at_the_store() {
    let stack = Stack::start().await;
    let (status, signed) = stack.sign("team-a", put_artifact("snapshots/aborted.tlsnap", 2, 5 * MIB as u64)).await;
    assert_eq!(status, 200, "{signed}");
    let part1 = signed["partUrls"][0]["url"].as_str().unwrap();
    assert_eq!(put(&stack.http, part1, bytes_of(5 * MIB, 1)).await.status(), 200);
    assert_eq!(stack.open_uploads().len(), 1);

    let response = stack.http.delete(signed["abortUrl"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(stack.open_uploads().is_empty(), "store still holds the upload: {:?}", stack.open_uploads());
    let part2 = signed["partUrls"][1]["url"].as_str().unwrap();
    let late = put(&stack.http, part2, bytes_of(MIB, 2)).await;
    assert!(late.status().is_client_error(), "part upload after abort got {}", late.status());
    let completion =
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>x</ETag></Part></CompleteMultipartUpload>";
    let complete = stack.http.post(signed["completeUrl"].as_str().unwrap()).body(completion).send().await.unwrap();
    assert!(!complete.status().is_success(), "completing an aborted upload succeeded");
}

#[tokio::test(flavor = "multi_thread")]
async fn single_put_without_hint_and_the_store_refuses_tampered_expired_and_foreign_key_urls() {
    let stack = Stack::start().await;
    let body = json!({"target": {"kind": "artifact", "rel_path": "one/put.bin"}, "op": {"kind": "put_artifact"}});
    let (status, signed) = stack.sign("team-a", body).await;
    assert_eq!(status, 200, "{signed}");
    assert_eq!((signed["kind"].as_str(), signed["method"].as_str()), (Some("single_put"), Some("PUT")));
    assert_eq!(signed["headers"], json!({}));
    let url = signed["url"].as_str().unwrap().to_owned();

    // One flipped hex digit of the signature.
    let at = url.len() - 1;
    let flipped = if &url[at..] == "0" { "1" } else { "0" };
    let tampered = format!("{}{flipped}", &url[..at]);
    let refused = put(&stack.http, &tampered, b"x".to_vec()).await;
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("SignatureDoesNotMatch"));

    // A signature made for another key, pasted onto this one's URL.
    let (_, other) = stack
        .sign(
            "team-a",
            json!({"target": {"kind": "artifact", "rel_path": "one/other.bin"}, "op": {"kind": "put_artifact"}}),
        )
        .await;
    let other_sig = other["url"].as_str().unwrap().rsplit_once("X-Amz-Signature=").unwrap().1;
    let swapped = format!("{}X-Amz-Signature={other_sig}", url.rsplit_once("X-Amz-Signature=").unwrap().0);
    let refused = put(&stack.http, &swapped, b"x".to_vec()).await;
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("SignatureDoesNotMatch"));

    // The same core, signing as of two hours ago with a one-minute lifetime.
    let credentials =
        Credentials { access_key_id: ACCESS_KEY.into(), secret_access_key: SECRET_KEY.into(), session_token: None };
    let past = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() - 7200).unwrap();
    let endpoint = Endpoint::parse(&stack.store.url(), Addressing::Path).unwrap();
    let expired = Presigner::new(&credentials, "us-east-1", past, 60).presign(
        Method::Put,
        &endpoint.object(BUCKET, "builds/team-a/one/put.bin"),
        &[],
    );
    let refused = put(&stack.http, &expired, b"x".to_vec()).await;
    assert_eq!(refused.status(), 403);
    assert!(refused.text().await.unwrap().contains("expired"));

    // The untouched URL works, and only it.
    assert_eq!(put(&stack.http, &url, b"payload".to_vec()).await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_requests_get_their_status_and_a_json_error_and_sign_nothing() {
    let stack = Stack::start().await;
    let token = stack.token("team-a");
    let expired =
        snapsign::token::mint(TOKEN_KEY.as_bytes(), "team-a", jiff::Timestamp::now().as_second() - 1).unwrap();
    let forged = snapsign::token::mint(b"some-other-key-0123456789abcdef0123", "team-a", i64::MAX / 2).unwrap();
    let good = put_artifact("s.tlsnap", 2, 64 * MIB as u64).to_string();
    let traversal = |rel: &str| put_artifact(rel, 2, 64 * MIB as u64).to_string();

    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        ("malformed JSON", Some(&token), "{\"target\":".into(), 400, "malformed_json"),
        ("duplicate key", Some(&token), r#"{"target":{"kind":"artifact","rel_path":"mine","rel_path":"../team-b/x"},"op":{"kind":"put_artifact"}}"#.into(), 400, "duplicate_key"),
        ("unknown target kind", Some(&token), json!({"target":{"kind":"bucket","uri":"s3://snaps/x"},"op":{"kind":"get_blob"}}).to_string(), 400, "unknown_kind"),
        ("unknown op kind", Some(&token), json!({"target":{"kind":"artifact","rel_path":"x"},"op":{"kind":"delete_artifact"}}).to_string(), 400, "unknown_kind"),
        ("missing target", Some(&token), json!({"op":{"kind":"get_blob"}}).to_string(), 400, "missing_field"),
        ("missing rel_path", Some(&token), json!({"target":{"kind":"artifact"},"op":{"kind":"put_artifact"}}).to_string(), 400, "missing_field"),
        ("missing part size", Some(&token), json!({"target":{"kind":"artifact","rel_path":"x"},"op":{"kind":"put_artifact","multipart_hint":{"max_parts":2}}}).to_string(), 400, "missing_field"),
        ("namespace field", Some(&token), json!({"namespace":"team-b","target":{"kind":"artifact","rel_path":"x"},"op":{"kind":"put_artifact"}}).to_string(), 400, "namespace_not_allowed"),
        ("dot-dot", Some(&token), traversal("../team-b/s.tlsnap"), 400, "invalid_rel_path"),
        ("inner dot-dot", Some(&token), traversal("a/../../team-b/s"), 400, "invalid_rel_path"),
        ("absolute", Some(&token), traversal("/builds/team-b/s"), 400, "invalid_rel_path"),
        ("empty segment", Some(&token), traversal("a//b"), 400, "invalid_rel_path"),
        ("dot segment", Some(&token), traversal("a/./b"), 400, "invalid_rel_path"),
        ("trailing slash", Some(&token), traversal("a/"), 400, "invalid_rel_path"),
        ("backslash", Some(&token), traversal("..\\team-b\\s"), 400, "invalid_rel_path"),
        ("control char", Some(&token), traversal("a\u{1}b"), 400, "invalid_rel_path"),
        ("encoded dots", Some(&token), traversal("%2e%2e/team-b/s"), 400, "invalid_rel_path"),
        ("encoded slash", Some(&token), traversal("a%2F..%2Fb"), 400, "invalid_rel_path"),
        ("too long", Some(&token), traversal(&"a".repeat(513)), 400, "invalid_rel_path"),
        ("max_parts 0", Some(&token), put_artifact("s", 0, 64 * MIB as u64).to_string(), 400, "invalid_field"),
        ("max_parts 10001", Some(&token), put_artifact("s", 10001, 64 * MIB as u64).to_string(), 400, "invalid_field"),
        ("part too small", Some(&token), put_artifact("s", 2, 1024).to_string(), 400, "invalid_field"),
        ("foreign bucket", Some(&token), get_blob("s3://other-bucket/builds/team-a/x").to_string(), 403, "foreign_bucket"),
        ("another namespace's blob", Some(&token), get_blob("s3://snaps/builds/team-b/parent.tlsnap").to_string(), 403, "outside_namespace"),
        ("gs uri", Some(&token), get_blob("gs://snaps/builds/team-a/x").to_string(), 400, "invalid_uri"),
        ("missing token", None, good.clone(), 401, "missing_token"),
        ("expired token", Some(&expired), good.clone(), 401, "expired_token"),
        ("forged token", Some(&forged), good.clone(), 401, "invalid_token"),
        ("garbage token", Some("not-a-token"), good.clone(), 401, "invalid_token"),
        ("oversized body", Some(&token), format!("{{\"pad\":\"{}\"}}", "x".repeat(70 * 1024)), 413, "body_too_large"),
    ];
    for (what, token, body, status, code) in cases {
        let (got, json) = stack.sign_raw(token, body).await;
        assert_eq!((got, json["code"].as_str()), (status, Some(code)), "{what}: {json}");
        let message = json["message"].as_str().unwrap_or_default();
        assert!(!message.is_empty(), "{what}: empty message");
        assert!(!json.to_string().contains("X-Amz-"), "{what}: signed something: {json}");
    }
    // Wrong method and path.
    let response = stack.http.get(stack.sign_url()).send().await.unwrap();
    assert_eq!(response.status(), 405);
    let response = stack.http.post(format!("{}/api/v1/blob/other", stack.signer.url())).send().await.unwrap();
    assert_eq!(response.status(), 404);
    assert!(stack.open_uploads().is_empty(), "a refused request created an upload: {:?}", stack.open_uploads());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rel_path_naming_another_namespace_is_signed_inside_the_callers() {
    let stack = Stack::start().await;
    let body = json!({"target": {"kind": "artifact", "rel_path": "team-b/s.tlsnap"}, "op": {"kind": "put_artifact"}});
    let (status, signed) = stack.sign("team-a", body).await;
    assert_eq!(status, 200);
    assert_eq!(signed["uri"], "s3://snaps/builds/team-a/team-b/s.tlsnap");
    assert!(signed["url"].as_str().unwrap().contains("/snaps/builds/team-a/team-b/s.tlsnap?"));
    let (status, shared) = stack.sign("team-b", get_blob("s3://snaps/public/base.tlsnap")).await;
    assert_eq!((status, shared["kind"].as_str()), (200, Some("single_get")), "shared prefixes are readable");
}

#[tokio::test(flavor = "multi_thread")]
async fn store_failing_create_multipart_upload_is_a_502_naming_what_the_store_said() {
    let stack = Stack::start_with(
        |mut env| {
            // A secret the store does not know: it refuses the signature.
            env.retain(|(k, _)| k != "SNAPSIGN_SECRET_ACCESS_KEY");
            env.push(("SNAPSIGN_SECRET_ACCESS_KEY".into(), "not-the-store-secret".into()));
            env
        },
        EngineLimits::default(),
        Duration::from_secs(30),
    )
    .await;
    let (status, json) = stack.sign("team-a", put_artifact("s.tlsnap", 2, 64 * MIB as u64)).await;
    assert_eq!((status, json["code"].as_str()), (502, Some("store_failed")), "{json}");
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("HTTP 403") && message.contains("SignatureDoesNotMatch"), "{message}");
    assert!(!json.to_string().contains("X-Amz-"));

    // Nothing listens: the store is unreachable.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let signer = start_signer(signer_env(&dead, BUCKET), EngineLimits::default(), Duration::from_secs(30)).await;
    let response = stack
        .http
        .post(format!("{}/api/v1/blob/sign", signer.url()))
        .bearer_auth(stack.token("team-a"))
        .body(put_artifact("s.tlsnap", 2, 64 * MIB as u64).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["code"], "store_unreachable", "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_part_urls_are_signed_and_each_is_distinct() {
    let stack = Stack::start().await;
    let (status, signed) = stack.sign("team-a", put_artifact("big.tlsnap", 10_000, 64 * MIB as u64)).await;
    assert_eq!(status, 200, "{signed}");
    let parts = signed["partUrls"].as_array().unwrap();
    assert_eq!(parts.len(), 10_000);
    let distinct: std::collections::HashSet<&str> = parts.iter().map(|p| p["url"].as_str().unwrap()).collect();
    assert_eq!(distinct.len(), 10_000);
    assert_eq!(parts[9_999]["partNumber"], 10_000);
    // The last one is accepted by the store (a part under 5 MiB is fine as the upload's last).
    let last = put(&stack.http, parts[9_999]["url"].as_str().unwrap(), b"tail".to_vec()).await;
    assert_eq!(last.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_over_the_memory_limit_fails_cleanly_and_the_next_small_one_works() {
    // 10,000 part URLs need several MiB of guest memory; 3 MiB is not enough.
    let stack = Stack::start_with(
        |env| env,
        EngineLimits { max_concurrency: 4, max_memory_bytes: 3 * MIB },
        Duration::from_secs(30),
    )
    .await;
    let (status, json) = stack.sign("team-a", put_artifact("big.tlsnap", 10_000, 64 * MIB as u64)).await;
    assert!(status >= 500, "expected a failure, got {status}: {json}");
    assert!(json["code"].as_str().is_some_and(|c| c.starts_with("signer_")), "{json}");
    let (status, json) = stack.sign("team-a", get_blob("s3://snaps/builds/team-a/x")).await;
    assert_eq!(status, 200, "{json}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_that_never_answers_hits_the_request_time_limit() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", silent.local_addr().unwrap());
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let signer =
        start_signer(signer_env(&endpoint, BUCKET), EngineLimits::default(), Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let token = snapsign::token::mint(TOKEN_KEY.as_bytes(), "team-a", jiff::Timestamp::now().as_second() + 60).unwrap();
    let response = reqwest::Client::new()
        .post(format!("{}/api/v1/blob/sign", signer.url()))
        .bearer_auth(token)
        .body(put_artifact("s.tlsnap", 2, 64 * MIB as u64).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let json: Value = response.json().await.unwrap();
    assert_eq!(json["code"], "signer_timeout", "{json}");
    assert!(started.elapsed() < Duration::from_secs(20));
    holder.abort();
}

fn read_listen_line(child: &mut std::process::Child) -> String {
    read_listen_line_then(child).0
}

/// The address serve-signer printed, and the lines it prints after it.
fn read_listen_line_then(child: &mut std::process::Child) -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = rx.recv_timeout(left).expect("serve-signer printed its address in time");
        if let Some(url) = line.strip_prefix("signer listening on ") {
            return (url.to_owned(), rx);
        }
    }
}

#[test]
fn serve_signer_says_when_fresh_instances_start_from_the_snapshot() {
    for (flags, expected) in [
        (&[][..], "signer pre-initialization: ready in "),
        (&["--no-preinit"][..], "signer pre-initialization: off (--no-preinit)"),
    ] {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
            .args(["serve-signer", "--listen", "127.0.0.1:0", "--cache-dir"])
            .arg(cache_dir())
            .args(flags)
            .envs(signer_env("http://127.0.0.1:9", BUCKET))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let (_, lines) = read_listen_line_then(&mut child);
        let line = lines.recv_timeout(Duration::from_secs(120));
        let _ = child.kill();
        let _ = child.wait();
        let line = line.expect("serve-signer said how pre-initialization ended");
        assert!(line.starts_with(expected), "{flags:?}: {line}");
        if flags.is_empty() {
            assert!(line.ends_with("KiB snapshot"), "{line}");
        }
    }
}

/// serve-signer with its open-files limit set to `soft` and `hard` before it starts.
fn serve_signer_with_files_limit(soft: u64, hard: u64) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"));
    command
        .args(["serve-signer", "--listen", "127.0.0.1:0", "--no-preinit", "--cache-dir"])
        .arg(cache_dir())
        .envs(signer_env("http://127.0.0.1:9", BUCKET))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit { rlim_cur: soft, rlim_max: hard };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn().unwrap()
}

/// The soft and hard "Max open files" of a running process.
fn open_files_limit(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<u64> = line.split_whitespace().filter_map(|f| f.parse().ok()).collect();
    (fields[0], fields[1])
}

#[test]
fn serve_signer_raises_its_open_files_limit_and_warns_when_the_hard_limit_is_too_low() {
    let mut hard = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut hard) }, 0);
    let hard = hard.rlim_max;
    // A soft limit below the connection table's 1024, as many shells start programs.
    let mut child = serve_signer_with_files_limit(256, hard);
    read_listen_line(&mut child);
    let raised = open_files_limit(child.id());
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(raised, (hard, hard), "the soft limit was not raised to the hard one");

    // A hard limit below the table: the operator is told, by name and number.
    let mut child = serve_signer_with_files_limit(256, 256);
    read_listen_line(&mut child);
    let _ = child.kill();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("may open only 256 files"), "{stderr}");
    assert!(stderr.contains("--max-connections"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_signer_command_serves_then_stops_cleanly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(&dir.path().join("store")).await;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["serve-signer", "--listen", "127.0.0.1:0", "--cache-dir"])
        .arg(cache_dir())
        .envs(signer_env(&store.url(), BUCKET))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = read_listen_line(&mut child);
    let token = snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns-1", jiff::Timestamp::now().as_second() + 60).unwrap();
    let response = reqwest::Client::new()
        .post(format!("{url}/api/v1/blob/sign"))
        .bearer_auth(token)
        .body(get_blob("s3://snaps/builds/ns-1/x").to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let status = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(exit) = child.try_wait().unwrap() {
            break exit;
        }
        assert!(std::time::Instant::now() < deadline, "serve-signer did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(exit.success(), "{exit:?}");
}

#[test]
fn serve_signer_refuses_to_start_without_configuration_and_names_the_variable() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["serve-signer", "--listen", "127.0.0.1:0"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("SNAPSIGN_CACHE_DIR", cache_dir())
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("SNAPSIGN_BUCKET is not set"), "{stderr}");
}

#[test]
fn token_command_mints_a_token_the_signer_verifies() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["token", "--namespace", "team-z", "--ttl-secs", "120"])
        .env("SNAPSIGN_TOKEN_KEY", TOKEN_KEY)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let token = String::from_utf8(output.stdout).unwrap();
    let claims =
        snapsign::token::verify(TOKEN_KEY.as_bytes(), token.trim(), jiff::Timestamp::now().as_second(), 7200).unwrap();
    assert_eq!(claims.namespace, "team-z");
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_snapsign"))
        .args(["token", "--namespace", "../x", "--key", TOKEN_KEY])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid namespace '../x'"));
}
