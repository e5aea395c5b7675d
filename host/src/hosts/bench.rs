//! `snapsign bench hosts`: get_blob requests per second and latency on each
//! host of the signer, one after the other in one run, with the same client
//! (N keep-alive HTTP/1 connections on loopback, bounded in time), on the
//! same machine; the native core with no wasm is the ceiling.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

use super::{Tools, launch};
use crate::engine::EngineLimits;
use crate::signer::SignerServerConfig;

use crate::bench::{TOKEN_KEY, env};
const GET_BLOB: &str =
    r#"{"target":{"kind":"blob","uri":"s3://bench/builds/ns/bench/s.tlsnap"},"op":{"kind":"get_blob"}}"#;
/// No run sends more than this many requests, whatever the duration.
const MAX_REQUESTS: usize = 2_000_000;
/// A connection that fails more often than this fails the run.
const MAX_RECONNECTS: usize = 100_000;

/// The bench's settings.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub seconds: f64,
    pub warmup_seconds: f64,
    pub concurrency: usize,
    pub tools_dir: std::path::PathBuf,
}

/// One host's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    pub host: String,
    pub requests: usize,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_answer: Option<Duration>,
    /// Connections the host closed under the client (each one reopened).
    pub reconnects: usize,
}

/// Sends get_blob from `concurrency` connections for `duration`; every
/// answer must be 200.
pub async fn load(
    sign_url: &str,
    host_header: Option<&str>,
    token: &str,
    concurrency: usize,
    duration: Duration,
) -> Result<(usize, Vec<Duration>, Duration, usize)> {
    let uri: http::Uri = sign_url.parse().with_context(|| format!("parse {sign_url}"))?;
    let authority = uri.authority().context("sign URL has no host")?.to_string();
    let host = host_header.unwrap_or(&authority).to_owned();
    // Origin-form request target (`POST /path`), as browsers and proxies send it.
    let uri: http::Uri = uri.path_and_query().context("sign URL has no path")?.as_str().parse()?;
    let started = Instant::now();
    let deadline = started + duration;
    let per_worker = MAX_REQUESTS / concurrency.max(1);
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (uri, authority, host, token) = (uri.clone(), authority.clone(), host.clone(), token.to_owned());
        workers.push(tokio::spawn(async move {
            let connect = || async {
                let stream =
                    tokio::net::TcpStream::connect(&authority).await.with_context(|| format!("connect {authority}"))?;
                stream.set_nodelay(true)?;
                let (sender, connection) =
                    hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream)).await?;
                tokio::spawn(connection);
                Ok::<_, anyhow::Error>(sender)
            };
            let mut sender = connect().await?;
            let mut latencies = Vec::with_capacity(4096);
            // A host that closes kept-alive connections costs a reconnect, counted.
            let mut reconnects = 0usize;
            while Instant::now() < deadline && latencies.len() < per_worker {
                let request = http::Request::post(uri.clone())
                    .header("host", &host)
                    .header("authorization", format!("Bearer {token}"))
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(GET_BLOB.as_bytes())))?;
                let sent = Instant::now();
                let response = match sender.ready().await {
                    Ok(()) => sender.send_request(request).await,
                    Err(e) => Err(e),
                };
                let response = match response {
                    Ok(response) => response,
                    Err(e) if reconnects < MAX_RECONNECTS => {
                        tracing::debug!("reconnecting after: {e}");
                        reconnects += 1;
                        sender = connect().await?;
                        continue;
                    }
                    Err(e) => {
                        return Err(
                            anyhow::Error::from(e).context(format!("send get_blob ({reconnects} reconnects already)"))
                        );
                    }
                };
                let status = response.status();
                let body = response.into_body().collect().await.context("read the answer")?.to_bytes();
                latencies.push(sent.elapsed());
                if status != 200 {
                    bail!("get_blob answered {status}: {}", String::from_utf8_lossy(&body));
                }
            }
            Ok::<_, anyhow::Error>((latencies, reconnects))
        }));
    }
    let mut all = Vec::new();
    let mut reconnects = 0;
    for worker in workers {
        let (latencies, again) = worker.await.context("bench worker panicked")??;
        all.extend(latencies);
        reconnects += again;
    }
    Ok((all.len(), all, started.elapsed(), reconnects))
}

async fn measure(
    host: &str,
    sign_url: &str,
    host_header: Option<&str>,
    token: &str,
    options: &BenchOptions,
    first_answer: Option<Duration>,
) -> Result<Figures> {
    load(sign_url, host_header, token, options.concurrency, Duration::from_secs_f64(options.warmup_seconds))
        .await
        .with_context(|| format!("warm up {host}"))?;
    let (count, mut latencies, elapsed, reconnects) =
        load(sign_url, host_header, token, options.concurrency, Duration::from_secs_f64(options.seconds))
            .await
            .with_context(|| format!("load {host}"))?;
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    let figures = Figures {
        host: host.to_owned(),
        requests: count,
        per_second: count as f64 / elapsed.as_secs_f64(),
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        first_answer,
        reconnects,
    };
    eprintln!("  {host}: {:.0} req/s, {reconnects} reconnects", figures.per_second);
    Ok(figures)
}

/// Runs the benchmark and prints the table.
pub async fn run(options: &BenchOptions) -> Result<Vec<Figures>> {
    let work = std::env::temp_dir().join(format!("snapsign-bench-hosts-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = run_in(options, &work).await;
    let _ = std::fs::remove_dir_all(&work);
    let figures = result?;
    print_table(options, &figures);
    Ok(figures)
}

async fn run_in(options: &BenchOptions, work: &Path) -> Result<Vec<Figures>> {
    let tools = Tools::new(&options.tools_dir);
    // Install everything first so no download lands inside a measurement.
    for tool in [super::WASMTIME, super::WASH, super::JCO] {
        tools.get(tool)?;
    }
    let wasm = super::signer_wasm(tools.dir())?;
    let store = crate::bench::store(work).await?;
    let env = env(&store.url());
    let token = snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns", jiff::Timestamp::now().as_second() + 3600)?;
    let mut figures = Vec::new();
    eprintln!(
        "snapsign bench hosts: {} s per host after {} s warm-up, {} connections",
        options.seconds, options.warmup_seconds, options.concurrency
    );

    let started = Instant::now();
    let native = super::native::start(env.clone(), "127.0.0.1:0".parse()?).await?;
    let url = format!("{}{}", native.url(), snapsign::signer::SIGN_PATH);
    launch::wait_for_signer(&url, None, launch::START_TIMEOUT, None).await?;
    let first = started.elapsed();
    figures.push(measure("native core (hyper, no wasm)", &url, None, &token, options, Some(first)).await?);
    native.shutdown().await;

    // Reuse on (the default) and off (a fresh instance per request, as before reuse) side by side.
    for (host, max_instance_reuse) in
        [("snapsign serve-signer", crate::signer::DEFAULT_MAX_INSTANCE_REUSE), ("snapsign serve-signer, no reuse", 1)]
    {
        let started = Instant::now();
        let (signer, _) = crate::signer::start(&SignerServerConfig {
            listen: "127.0.0.1:0".parse()?,
            env: env.clone(),
            limits: EngineLimits::default(),
            request_timeout: Duration::from_secs(30),
            cache_dir: work.join("compiled"),
            max_instance_reuse,
        })
        .await?;
        let url = format!("{}{}", signer.url(), snapsign::signer::SIGN_PATH);
        launch::wait_for_signer(&url, None, launch::START_TIMEOUT, None).await?;
        let first = started.elapsed();
        figures.push(measure(host, &url, None, &token, options, Some(first)).await?);
        signer.shutdown().await;
    }

    // wasmtime serve reuses p2 instances only when asked, and then across callers.
    let reuse = crate::signer::DEFAULT_MAX_INSTANCE_REUSE.to_string();
    for host in ["wasmtime serve", "wasmtime serve, reuse across callers", "wash dev", "jco serve"] {
        let served = match host {
            "wasmtime serve" => launch::wasmtime_serve(&tools, &wasm, &env).await?,
            "wasmtime serve, reuse across callers" => {
                launch::wasmtime_serve_with(&tools, &wasm, &env, &["--max-instance-reuse-count", &reuse]).await?
            }
            "wash dev" => launch::wash_dev(&tools, &wasm, &env, work).await?,
            _ => launch::jco_serve(&tools, &wasm, &env, work).await?,
        };
        let result = measure(
            host,
            &served.sign_url(),
            served.host_header.as_deref(),
            &token,
            options,
            Some(served.first_answer),
        )
        .await
        .with_context(|| format!("{host}'s last output:\n{}", served.process.tail(20)));
        drop(served);
        figures.push(result?);
    }
    store.shutdown().await;
    Ok(figures)
}

fn print_table(options: &BenchOptions, figures: &[Figures]) {
    let ceiling = figures.first().map_or(1.0, |f| f.per_second);
    println!(
        "snapsign bench hosts ({} build, get_blob, {} connections, {} s per host)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        options.concurrency,
        options.seconds
    );
    println!("| host | req/s | × native | p50 ms | p99 ms | requests | reconnects | start to first answer |");
    println!("|---|---|---|---|---|---|---|---|");
    for f in figures {
        let first = f.first_answer.map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        println!(
            "| {} | {:.0} | {:.2} | {:.3} | {:.3} | {} | {} | {first} |",
            f.host,
            f.per_second,
            f.per_second / ceiling,
            f.p50_ms,
            f.p99_ms,
            f.requests,
            f.reconnects
        );
    }
}
