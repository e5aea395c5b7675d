//! Attacks on `serve-signer` over real loopback TCP (issue 8): slow and idle
//! clients, connection floods, and error bodies that must not leak. The
//! signer is the real component in the real host, against the real store.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};
use snapsign_host::engine::EngineLimits;
use snapsign_host::serve::{ServeLimits, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

const MIB: u64 = 1024 * 1024;

/// Everything the host logs in this test binary, for the request-id checks.
fn captured_log() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        tracing_subscriber::fmt()
            .with_env_filter("snapsign_host=info,snapsign_runtime=info")
            .with_ansi(false)
            .with_writer(move || LogWriter(sink.clone()))
            .init();
        log
    })
}

struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The log lines that name `request_id`, waited for (the guest's lines are logged as its task ends).
async fn log_lines_of(request_id: &str, containing: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&captured_log().lock().unwrap()).into_owned();
        let lines: Vec<&str> = text.lines().filter(|l| l.contains(request_id)).collect();
        if lines.iter().any(|l| l.contains(containing)) {
            return lines.join("\n");
        }
        assert!(Instant::now() < deadline, "no log line for request {request_id} contains {containing:?}:\n{text}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn get_blob(uri: &str) -> String {
    json!({"target": {"kind": "blob", "uri": uri}, "op": {"kind": "get_blob"}}).to_string()
}

fn token(namespace: &str) -> String {
    snapsign::token::mint(TOKEN_KEY.as_bytes(), namespace, jiff::Timestamp::now().as_second() + 600).unwrap()
}

fn raw_request(addr: SocketAddr, body: &str) -> Vec<u8> {
    let mut request = Vec::new();
    write!(
        request,
        "POST /api/v1/blob/sign HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        token("team-a"),
        body.len()
    )
    .unwrap();
    request
}

/// Reads one HTTP/1.1 response (head and a content-length body) off `stream`.
async fn read_response(stream: &mut TcpStream) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        let n = stream.read(&mut chunk).await.expect("read the response head");
        assert!(n > 0, "connection closed before a response head: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status: u16 = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let length: usize =
        headers.iter().find(|(k, _)| k == "content-length").map(|(_, v)| v.parse().unwrap()).unwrap_or(0);
    let mut body = buf[head_end..].to_vec();
    while body.len() < length {
        let n = stream.read(&mut chunk).await.expect("read the response body");
        assert!(n > 0, "connection closed inside the body");
        body.extend_from_slice(&chunk[..n]);
    }
    (status, headers, body)
}

/// Waits until the server closes `stream` (EOF or reset); returns how long that took.
async fn closed_by_server(stream: &mut TcpStream, within: Duration) -> Duration {
    let started = Instant::now();
    let mut chunk = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(within.saturating_sub(started.elapsed()), stream.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("the server kept the connection open for {within:?}"));
        match read {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => continue, // a response (e.g. 408) before the close
        }
    }
}

async fn wait_for_open_connections(server: &Server, at_most: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while server.open_connections() > at_most {
        assert!(
            Instant::now() < deadline,
            "{} connections still open after {within:?} (expected at most {at_most})",
            server.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 8, attack 2: 32 slow senders took every instance slot; 64 slow or
/// idle clients must now leave every legitimate request its answer.
#[tokio::test(flavor = "multi_thread")]
async fn sixty_four_slow_clients_leave_legitimate_get_blob_requests_answered() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(&dir.path().join("store")).await;
    // The shipped defaults: 32 instances, 10 s header and body deadlines, 256 connections per IP.
    let server = start_signer_under(
        signer_env(&store.url(), BUCKET),
        EngineLimits::default(),
        Duration::from_secs(30),
        ServeLimits::default(),
    )
    .await;
    let addr = server.addr();
    let attack_for = Duration::from_secs(4);
    let attack_ends = Instant::now() + attack_for;

    // 40 clients send a complete head announcing 8 KiB, then one body byte every 300 ms;
    // 12 send a head one byte every 300 ms; 12 connect and send nothing.
    let mut attackers = Vec::new();
    for i in 0..64 {
        let mut stream = TcpStream::connect(addr).await.expect("connect an attacker");
        attackers.push(tokio::spawn(async move {
            match i % 16 {
                0..10 => {
                    let head = format!(
                        "POST /api/v1/blob/sign HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer x\r\ncontent-length: 8192\r\n\r\n"
                    );
                    stream.write_all(head.as_bytes()).await?;
                    while Instant::now() < attack_ends {
                        stream.write_all(b"{").await?;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
                10..13 => {
                    for byte in b"POST /api/v1/blob/sign HTTP/1.1\r\nx-pad: ".iter().chain(std::iter::repeat(&b'a')) {
                        if Instant::now() >= attack_ends {
                            break;
                        }
                        stream.write_all(&[*byte]).await?;
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                }
                _ => tokio::time::sleep_until(attack_ends.into()).await,
            }
            Ok::<_, std::io::Error>(stream)
        }));
    }
    wait_for_open_connections_at_least(&server, 64, Duration::from_secs(10)).await;

    // Legitimate callers: 4 at a time, back to back, while the attack runs.
    let http = reqwest::Client::new();
    let deadline = Duration::from_secs(5);
    let mut callers = Vec::new();
    for worker in 0..4 {
        let (http, url) = (http.clone(), format!("{}/api/v1/blob/sign", server.url()));
        callers.push(tokio::spawn(async move {
            let mut answered = Vec::new();
            while Instant::now() < attack_ends {
                let started = Instant::now();
                let call = http
                    .post(&url)
                    .bearer_auth(token("team-a"))
                    .body(get_blob(&format!("s3://snaps/builds/team-a/w{worker}")))
                    .send();
                let response = tokio::time::timeout(deadline, call)
                    .await
                    .unwrap_or_else(|_| panic!("a legitimate request waited over {deadline:?}"))
                    .expect("reach the signer");
                let status = response.status().as_u16();
                let body = response.text().await.unwrap();
                answered.push((status, started.elapsed(), body));
            }
            answered
        }));
    }
    let mut answered = Vec::new();
    for caller in callers {
        answered.extend(caller.await.unwrap());
    }
    assert!(server.open_connections() >= 64, "the attackers were cut off before the legitimate stream ended");
    for attacker in attackers {
        // Each attacker still held its connection (the server may cut slow heads only after 10 s).
        let _ = attacker.await.unwrap();
    }
    assert!(answered.len() >= 20, "only {} legitimate requests were answered in {attack_for:?}", answered.len());
    for (status, took, body) in &answered {
        assert_eq!(*status, 200, "a legitimate request got {status} after {took:?}: {body}");
        assert!(*took < deadline);
    }
}

async fn wait_for_open_connections_at_least(server: &Server, at_least: usize, within: Duration) {
    let deadline = Instant::now() + within;
    while server.open_connections() < at_least {
        assert!(Instant::now() < deadline, "only {} of {at_least} connections opened", server.open_connections());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn short_limits() -> ServeLimits {
    ServeLimits {
        header_read_timeout: Duration::from_millis(600),
        idle_timeout: Duration::from_millis(900),
        body_read_timeout: Duration::from_millis(600),
        ..ServeLimits::default()
    }
}

/// Issue 8, attack 2 (second half): 500 idle or half-sent connections stayed open for 90 s.
#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_half_sent_heads_and_stalled_bodies_are_closed_after_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(&dir.path().join("store")).await;
    let limits = short_limits();
    let server =
        start_signer_under(signer_env(&store.url(), BUCKET), EngineLimits::default(), Duration::from_secs(30), limits)
            .await;
    let addr = server.addr();
    let within = Duration::from_secs(10);

    // Connected, nothing sent: the first head is due header_read_timeout after the connection opens.
    let mut silent = TcpStream::connect(addr).await.unwrap();
    // A head that never ends, one byte every 100 ms.
    let mut trickling = TcpStream::connect(addr).await.unwrap();
    let (mut trickle_read, mut trickle_write) = trickling.split();
    let trickle = async {
        for byte in b"POST /api/v1/blob/sign HTTP/1.1\r\nx-pad: ".iter().chain(std::iter::repeat(&b'a')) {
            if trickle_write.write_all(&[*byte]).await.is_err() {
                break; // the server closed it
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let trickle_closed = async {
        let mut chunk = [0u8; 64];
        tokio::time::timeout(within, async {
            loop {
                match trickle_read.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("a trickled head kept its connection open");
    };
    let silent_closed = closed_by_server(&mut silent, within);
    let (silent_after, ()) = tokio::select! {
        both = async { tokio::join!(silent_closed, trickle_closed) } => both,
        () = trickle => panic!("the trickle ended without the server closing the connection"),
    };
    assert!(silent_after >= Duration::from_millis(500), "a silent connection was closed after only {silent_after:?}");

    // A kept-alive connection after one answered request: closed once idle_timeout passes.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(&raw_request(addr, &get_blob("s3://snaps/builds/team-a/x"))).await.unwrap();
    let (status, _, body) = read_response(&mut kept).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let idle_after = closed_by_server(&mut kept, within).await;
    assert!(idle_after >= Duration::from_millis(800), "an idle connection was closed after only {idle_after:?}");

    // A body that stalls: 408 body_timeout with a request id, and no instance was taken for it.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/blob/sign HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\ncontent-length: 100\r\n\r\n{{\"tar",
        token("team-a")
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    let (status, headers, body) = tokio::time::timeout(within, read_response(&mut stalled)).await.unwrap();
    let json: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!((status, json["code"].as_str()), (408, Some("body_timeout")), "{json}");
    let header_id = headers.iter().find(|(k, _)| k == "x-request-id").map(|(_, v)| v.clone());
    assert_eq!(json["request_id"].as_str(), header_id.as_deref());
    closed_by_server(&mut stalled, within).await;

    wait_for_open_connections(&server, 0, within).await;
}

fn connect_from(source: &str, to: SocketAddr) -> impl std::future::Future<Output = TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    async move { socket.connect(to).await.expect("connect on loopback") }
}

/// Connections are bounded per client address and in total; a refused one
/// gets a 503 `too_many_connections`, at a full table the connection silent
/// longest gives way to a newcomer, and a freed place serves again.
#[tokio::test(flavor = "multi_thread")]
async fn connections_are_bounded_per_client_address_and_in_total() {
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(&dir.path().join("store")).await;
    let limits = ServeLimits {
        max_connections_per_ip: 3,
        max_connections: 5,
        header_read_timeout: Duration::from_secs(30),
        ..ServeLimits::default()
    };
    let server =
        start_signer_under(signer_env(&store.url(), BUCKET), EngineLimits::default(), Duration::from_secs(30), limits)
            .await;
    let addr = server.addr();
    let refused = |mut stream: TcpStream, bound: &'static str| async move {
        let (status, _, body) = read_response(&mut stream).await;
        let json: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!((status, json["code"].as_str()), (503, Some("too_many_connections")), "{json}");
        assert!(json["message"].as_str().unwrap().contains(bound), "{json}");
    };

    // Both addresses are loopback (127.0.0.0/8): nothing leaves the machine.
    let mut from_one = Vec::new();
    for _ in 0..3 {
        from_one.push(connect_from("127.0.0.1", addr).await);
    }
    wait_for_open_connections_at_least(&server, 3, Duration::from_secs(5)).await;
    refused(connect_from("127.0.0.1", addr).await, "this client address").await;
    let other_a = connect_from("127.0.0.2", addr).await;
    let mut other_b = connect_from("127.0.0.2", addr).await;
    wait_for_open_connections_at_least(&server, 5, Duration::from_secs(5)).await;
    // The table is full, of connections that sent nothing: a newcomer is not
    // refused; the connection that waited longest for a request head (the
    // first from 127.0.0.1) is closed to make room.
    let mut newcomer = connect_from("127.0.0.3", addr).await;
    closed_by_server(&mut from_one[0], Duration::from_secs(5)).await;
    newcomer.write_all(&raw_request(addr, &get_blob("s3://snaps/builds/team-a/x"))).await.unwrap();
    assert_eq!(read_response(&mut newcomer).await.0, 200);

    // The other address is served on its held connection, and a freed place takes a new one.
    other_b.write_all(&raw_request(addr, &get_blob("s3://snaps/builds/team-a/x"))).await.unwrap();
    assert_eq!(read_response(&mut other_b).await.0, 200);
    drop(from_one.pop());
    wait_for_open_connections(&server, 4, Duration::from_secs(5)).await;
    let mut again = connect_from("127.0.0.1", addr).await;
    again.write_all(&raw_request(addr, &get_blob("s3://snaps/builds/team-a/x"))).await.unwrap();
    assert_eq!(read_response(&mut again).await.0, 200);
    drop(other_a);
}

fn assert_clean(what: &str, json: &Value) {
    let text = json.to_string();
    for leak in ["X-Amz-", "http://", "127.0.0.1", "wasm backtrace", "wasm-function", "\\n", "error while executing"] {
        assert!(!text.contains(leak), "{what}: the error body leaks {leak:?}: {text}");
    }
    assert!(json["code"].is_string() && json["message"].is_string(), "{what}: {text}");
}

/// Issue 8, finding 5: error bodies carried a wasm backtrace and a presigned
/// URL. Now callers get `{code, message, request_id}`; the detail is in the
/// log under that id.
#[tokio::test(flavor = "multi_thread")]
async fn error_bodies_hold_code_message_and_request_id_and_the_detail_is_logged_under_that_id() {
    captured_log();
    let http = reqwest::Client::new();
    let post = |url: String, body: String| {
        let http = http.clone();
        async move {
            let response = http
                .post(format!("{url}/api/v1/blob/sign"))
                .bearer_auth(token("team-a"))
                // A caller's own id is replaced: the log is keyed by the host's.
                .header("x-request-id", "caller-chosen")
                .body(body)
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            let id = response.headers()["x-request-id"].to_str().unwrap().to_owned();
            let json: Value = response.json().await.unwrap();
            assert_ne!(id, "caller-chosen");
            assert_eq!(json["request_id"].as_str(), Some(id.as_str()), "{json}");
            (status, json, id)
        }
    };
    let multipart = |rel: &str| {
        json!({"target": {"kind": "artifact", "rel_path": rel},
               "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": 10_000, "part_size_bytes": 64 * MIB}}})
        .to_string()
    };

    // A guest trap (out of memory for 10,000 part URLs): no backtrace for the caller, all of it in the log.
    let dir = tempfile::tempdir().unwrap();
    let store = start_store(&dir.path().join("store")).await;
    let small = start_signer_under(
        signer_env(&store.url(), BUCKET),
        EngineLimits { max_concurrency: 4, max_memory_bytes: 3 << 20 },
        Duration::from_secs(30),
        ServeLimits::default(),
    )
    .await;
    let (status, json, id) = post(small.url(), multipart("big.tlsnap")).await;
    assert_eq!((status, json["code"].as_str()), (500, Some("signer_trap")), "{json}");
    assert_clean("trap", &json);
    log_lines_of(&id, "wasm backtrace").await;

    // The store refuses CreateMultipartUpload (a secret it does not know):
    // the caller reads the status and S3's code, the log has the store's words.
    let mut env = signer_env(&store.url(), BUCKET);
    env.retain(|(k, _)| k != "SNAPSIGN_SECRET_ACCESS_KEY");
    env.push(("SNAPSIGN_SECRET_ACCESS_KEY".into(), "not-the-store-secret".into()));
    let refused =
        start_signer_under(env, EngineLimits::default(), Duration::from_secs(30), ServeLimits::default()).await;
    let (status, json, id) = post(refused.url(), multipart("s.tlsnap")).await;
    assert_eq!((status, json["code"].as_str()), (502, Some("store_failed")), "{json}");
    assert_clean("store refused", &json);
    let message = json["message"].as_str().unwrap();
    assert!(message.contains("HTTP 403") && message.contains("SignatureDoesNotMatch"), "{message}");
    let logged = log_lines_of(&id, "SignatureDoesNotMatch: ").await;
    assert!(!logged.contains("X-Amz-Signature="), "a presigned URL reached the log: {logged}");

    // Nothing listens where the store should be.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let unreachable = start_signer_under(
        signer_env(&dead, BUCKET),
        EngineLimits::default(),
        Duration::from_secs(30),
        ServeLimits::default(),
    )
    .await;
    let (status, json, id) = post(unreachable.url(), multipart("s.tlsnap")).await;
    assert_eq!((status, json["code"].as_str()), (502, Some("store_unreachable")), "{json}");
    assert_clean("store unreachable", &json);
    let logged = log_lines_of(&id, "store_unreachable").await;
    assert!(logged.contains("<query redacted>") && !logged.contains("X-Amz-Signature="), "{logged}");

    // Errors the caller can fix keep their full message, with the id.
    let (status, json, _) = post(small.url(), "{\"target\":".into()).await;
    assert_eq!((status, json["code"].as_str()), (400, Some("malformed_json")));
    assert_clean("malformed", &json);
}
