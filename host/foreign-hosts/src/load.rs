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
use snapsign_runtime::engine::EngineLimits;
use snapsign_runtime::signer::SignerServerConfig;

use snapsign_dev_stack::fixture::{TOKEN_KEY, env};
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
    /// Rounds over all hosts, measured in turn in each round.
    pub rounds: usize,
    /// The hosts to measure after the native ceiling (which always runs); empty: all.
    pub only: Vec<BenchHost>,
    /// Distinct caller tokens (same namespace), sent in turn: 1 is one
    /// tenant; 1,000 is a dataplane where each caller signs now and then.
    pub callers: usize,
}

/// A host `bench hosts` measures against the native ceiling.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchHost {
    /// `snapsign serve-signer` (instances reused per caller).
    ServeSigner,
    /// `snapsign serve-signer --max-instance-reuse 1`.
    ServeSignerNoReuse,
    /// `snapsign serve-signer --max-instance-reuse 1 --no-preinit`: fresh
    /// instances that run the component's own start-up.
    ServeSignerNoPreinit,
    /// `wasmtime serve`.
    Wasmtime,
    /// `wasmtime serve --max-instance-reuse-count 1000`.
    WasmtimeReuse,
    /// `wash dev` (wasmCloud).
    Wash,
    /// `jco serve` (Node).
    Jco,
}

impl BenchOptions {
    fn measures(&self, host: BenchHost) -> bool {
        self.only.is_empty() || self.only.contains(&host)
    }
}

/// One host's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    pub host: String,
    pub requests: usize,
    /// The median round's rate.
    pub per_second: f64,
    /// The median of the per-round ratios to the native ceiling.
    pub of_native: f64,
    /// Requests per second in each round.
    pub rounds: Vec<f64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub first_answer: Option<Duration>,
    /// Connections the host closed under the client (each one reopened).
    pub reconnects: usize,
}

/// Sends get_blob from `concurrency` connections for `duration`, each
/// request with the next of `tokens` in turn; every answer must be 200.
pub async fn load(
    sign_url: &str,
    host_header: Option<&str>,
    tokens: &[String],
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
    anyhow::ensure!(!tokens.is_empty(), "no caller token to send");
    let authorizations: std::sync::Arc<Vec<http::HeaderValue>> = std::sync::Arc::new(
        tokens.iter().map(|t| http::HeaderValue::from_str(&format!("Bearer {t}"))).collect::<Result<_, _>>()?,
    );
    let mut workers = Vec::new();
    for worker in 0..concurrency.max(1) {
        let (uri, authority, host, authorizations) =
            (uri.clone(), authority.clone(), host.clone(), authorizations.clone());
        // Workers start at different callers, so they rarely send the same one at once.
        let mut next = worker * authorizations.len() / concurrency.max(1);
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
                    .header("authorization", authorizations[next % authorizations.len()].clone())
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from_static(GET_BLOB.as_bytes())))?;
                next += 1;
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

/// One load run on one host.
struct Run {
    requests: usize,
    per_second: f64,
    latencies: Vec<Duration>,
    reconnects: usize,
}

async fn measure(
    host: &str,
    sign_url: &str,
    host_header: Option<&str>,
    tokens: &[String],
    options: &BenchOptions,
) -> Result<Run> {
    load(sign_url, host_header, tokens, options.concurrency, Duration::from_secs_f64(options.warmup_seconds))
        .await
        .with_context(|| format!("warm up {host}"))?;
    let (requests, latencies, elapsed, reconnects) =
        load(sign_url, host_header, tokens, options.concurrency, Duration::from_secs_f64(options.seconds))
            .await
            .with_context(|| format!("load {host}"))?;
    if requests == 0 {
        bail!("{host} answered no get_blob within the {} s of load; raise --seconds", options.seconds);
    }
    let per_second = requests as f64 / elapsed.as_secs_f64();
    eprintln!("  {host}: {per_second:.0} req/s, {reconnects} reconnects");
    Ok(Run { requests, per_second, latencies, reconnects })
}

/// A host being measured.
struct Running {
    host: &'static str,
    /// From start to the first answer (for a launched host, its first launch).
    first_answer: Option<Duration>,
    server: Serving,
}

enum Serving {
    /// In this process (the native ceiling, serve-signer): up for the whole
    /// run, idle while the others are measured.
    Here { server: snapsign_runtime::serve::Server, sign_url: String },
    /// A child process, started for its turn in each round and stopped after
    /// it, so that no other host's process runs (and idles, or not) during a
    /// measurement.
    Launched(BenchHost),
}

/// Runs the benchmark and prints the table.
pub async fn run(options: &BenchOptions) -> Result<Vec<Figures>> {
    if options.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
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
    for (tool, hosts) in [
        (super::WASMTIME, &[BenchHost::Wasmtime, BenchHost::WasmtimeReuse][..]),
        (super::WASH, &[BenchHost::Wash]),
        (super::JCO, &[BenchHost::Jco]),
    ] {
        if hosts.iter().any(|&host| options.measures(host)) {
            tools.get(tool)?;
        }
    }
    let wasm = super::signer_wasm(tools.dir())?;
    let store = snapsign_dev_stack::fixture::store(work).await?;
    let env = env(&store.url());
    // Distinct tokens of one namespace: each expiry second is another caller.
    let expiry = jiff::Timestamp::now().as_second() + 3600;
    let tokens = (0..options.callers.max(1) as i64)
        .map(|i| snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns", expiry + i))
        .collect::<Result<Vec<_>, _>>()?;
    eprintln!(
        "snapsign bench hosts: {} round(s) of {} s per host after {} s warm-up, {} connections, {} caller(s)",
        options.rounds,
        options.seconds,
        options.warmup_seconds,
        options.concurrency,
        tokens.len()
    );
    let result = async {
        let mut hosts = start_hosts(options, &env, work).await?;
        let mut runs: Vec<Vec<Run>> = hosts.iter().map(|_| Vec::new()).collect();
        for round in 0..options.rounds {
            if options.rounds > 1 {
                eprintln!("round {}", round + 1);
            }
            for (i, running) in hosts.iter_mut().enumerate() {
                let run = match &running.server {
                    Serving::Here { sign_url, .. } => measure(running.host, sign_url, None, &tokens, options).await?,
                    Serving::Launched(which) => {
                        let served = launch_host(*which, &tools, &wasm, &env, work).await?;
                        running.first_answer.get_or_insert(served.first_answer);
                        measure(running.host, &served.sign_url(), served.host_header.as_deref(), &tokens, options)
                            .await
                            .with_context(|| format!("{}'s last output:\n{}", running.host, served.process.tail(20)))?
                    }
                };
                runs[i].push(run);
            }
        }
        let figures = hosts
            .iter()
            .zip(runs)
            .map(|(running, runs)| figures(running.host, running.first_answer, runs))
            .collect::<Vec<_>>();
        for running in hosts {
            if let Serving::Here { server, .. } = running.server {
                server.shutdown().await;
            }
        }
        Ok::<_, anyhow::Error>(figures)
    }
    .await;
    store.shutdown().await;
    let mut figures: Vec<Figures> = result?;
    of_native(&mut figures);
    Ok(figures)
}

/// × native: the median of each round's ratio to that round's native figure
/// (the first host), so drift on the machine between rounds cancels out.
fn of_native(figures: &mut [Figures]) {
    let Some(native) = figures.first().map(|f| f.rounds.clone()) else { return };
    for f in figures {
        let mut ratios: Vec<f64> = f.rounds.iter().zip(&native).map(|(rate, ceiling)| rate / ceiling).collect();
        f.of_native = median(&mut ratios);
    }
}

/// Starts the native ceiling and the in-process hosts asked for, each
/// answering once; the others are launched in their turn.
async fn start_hosts(options: &BenchOptions, env: &[(String, String)], work: &Path) -> Result<Vec<Running>> {
    let mut hosts = Vec::new();
    let started = Instant::now();
    let native = super::native::start(env.to_vec(), "127.0.0.1:0".parse()?).await?;
    let sign_url = format!("{}{}", native.url(), snapsign::signer::SIGN_PATH);
    launch::wait_for_signer(&sign_url, None, launch::START_TIMEOUT, None).await?;
    hosts.push(Running {
        host: "native core (hyper, no wasm)",
        first_answer: Some(started.elapsed()),
        server: Serving::Here { server: native, sign_url },
    });

    // Reuse on (the default) and off (a fresh instance per request, as
    // before reuse), and fresh instances without the pre-initialized snapshot, side by side.
    let reuse = snapsign_runtime::signer::DEFAULT_MAX_INSTANCE_REUSE;
    for (which, host, max_instance_reuse, preinit) in [
        (BenchHost::ServeSigner, "snapsign serve-signer", reuse, true),
        (BenchHost::ServeSignerNoReuse, "snapsign serve-signer, no reuse", 1, true),
        (BenchHost::ServeSignerNoPreinit, "snapsign serve-signer, no reuse, no pre-init", 1, false),
    ] {
        if !options.measures(which) {
            continue;
        }
        let started = Instant::now();
        let (signer, signer_host) = snapsign_runtime::signer::start(&SignerServerConfig {
            listen: "127.0.0.1:0".parse()?,
            env: env.to_vec(),
            limits: EngineLimits::default(),
            request_timeout: Duration::from_secs(30),
            cache_dir: work.join("compiled"),
            max_instance_reuse,
            preinit,
        })
        .await?;
        let sign_url = format!("{}{}", signer.url(), snapsign::signer::SIGN_PATH);
        launch::wait_for_signer(&sign_url, None, launch::START_TIMEOUT, None).await?;
        let first_answer = started.elapsed();
        // Measured once the snapshot serves (it is made in the background).
        let state = signer_host.preinit_settled().await;
        if preinit && !matches!(state, snapsign_runtime::signer::PreinitState::Ready { .. }) {
            bail!("{host}: pre-initialization did not finish: {state:?}");
        }
        println!("  {host}: pre-initialization {state:?}");
        hosts.push(Running {
            host,
            first_answer: Some(first_answer),
            server: Serving::Here { server: signer, sign_url },
        });
    }
    for (which, host) in [
        (BenchHost::Wasmtime, "wasmtime serve"),
        (BenchHost::WasmtimeReuse, "wasmtime serve, reuse across callers"),
        (BenchHost::Wash, "wash dev"),
        (BenchHost::Jco, "jco serve"),
    ] {
        if options.measures(which) {
            hosts.push(Running { host, first_answer: None, server: Serving::Launched(which) });
        }
    }
    Ok(hosts)
}

/// Starts a host that runs as its own process.
async fn launch_host(
    which: BenchHost,
    tools: &Tools,
    wasm: &Path,
    env: &[(String, String)],
    work: &Path,
) -> Result<launch::Served> {
    // wasmtime serve reuses p2 instances only when asked, and then across callers.
    let reuse = snapsign_runtime::signer::DEFAULT_MAX_INSTANCE_REUSE.to_string();
    match which {
        BenchHost::Wasmtime => launch::wasmtime_serve(tools, wasm, env).await,
        BenchHost::WasmtimeReuse => {
            launch::wasmtime_serve_with(tools, wasm, env, &["--max-instance-reuse-count", &reuse]).await
        }
        BenchHost::Wash => launch::wash_dev(tools, wasm, env, work).await,
        BenchHost::Jco => launch::jco_serve(tools, wasm, env, work).await,
        BenchHost::ServeSigner | BenchHost::ServeSignerNoReuse | BenchHost::ServeSignerNoPreinit => {
            bail!("{which:?} runs in this process, not as a launched host")
        }
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// One host's figures over all rounds: the median round's rate, latency over every request.
fn figures(host: &str, first_answer: Option<Duration>, runs: Vec<Run>) -> Figures {
    let rounds: Vec<f64> = runs.iter().map(|run| run.per_second).collect();
    let per_second = median(&mut rounds.clone());
    let requests = runs.iter().map(|run| run.requests).sum();
    let reconnects = runs.iter().map(|run| run.reconnects).sum();
    let mut latencies: Vec<Duration> = runs.into_iter().flat_map(|run| run.latencies).collect();
    latencies.sort();
    let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    Figures {
        host: host.to_owned(),
        requests,
        per_second,
        of_native: 1.0,
        rounds,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
        first_answer,
        reconnects,
    }
}

fn print_table(options: &BenchOptions, figures: &[Figures]) {
    println!(
        "snapsign bench hosts ({} build, get_blob, {} connections, {} caller(s), {} round(s) of {} s per host; req/s is the median round, × native the median of per-round ratios)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        options.concurrency,
        options.callers,
        options.rounds,
        options.seconds
    );
    println!("| host | req/s | × native | p50 ms | p99 ms | requests | reconnects | start to first answer |");
    println!("|---|---|---|---|---|---|---|---|");
    for f in figures {
        let first = f.first_answer.map_or("-".to_owned(), |d| format!("{:.2} s", d.as_secs_f64()));
        println!(
            "| {} | {:.0} | {:.2} | {:.3} | {:.3} | {} | {} | {first} |",
            f.host, f.per_second, f.of_native, f.p50_ms, f.p99_ms, f.requests, f.reconnects
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(rounds: usize, only: Vec<BenchHost>) -> BenchOptions {
        BenchOptions {
            seconds: 0.1,
            warmup_seconds: 0.0,
            concurrency: 1,
            tools_dir: std::env::temp_dir().join("snapsign-bench-hosts-test-unused"),
            rounds,
            only,
            callers: 1,
        }
    }

    #[tokio::test]
    async fn zero_rounds_are_refused_before_anything_starts() {
        let e = run(&options(0, vec![])).await.expect_err("0 rounds must be refused");
        assert!(e.to_string().contains("--rounds"), "{e}");
    }

    #[tokio::test]
    async fn a_load_too_short_for_one_answer_is_an_error_naming_the_flag() {
        // A listener that accepts and never answers: connections succeed, no request completes.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/api/v1/blob/sign", listener.local_addr().unwrap());
        let _accepting = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let short = BenchOptions { seconds: 1e-9, ..options(1, vec![]) };
        let e = measure("silent host", &url, None, &["t".to_owned()], &short)
            .await
            .err()
            .expect("no answer must be an error");
        assert!(
            e.to_string().contains("silent host answered no get_blob") && e.to_string().contains("--seconds"),
            "{e}"
        );
    }

    #[test]
    fn only_limits_the_hosts_and_empty_means_all() {
        let all = options(1, vec![]);
        let some = options(1, vec![BenchHost::ServeSigner, BenchHost::Jco]);
        for host in [BenchHost::ServeSigner, BenchHost::Wasmtime, BenchHost::Wash, BenchHost::Jco] {
            assert!(all.measures(host), "{host:?}");
        }
        assert!(some.measures(BenchHost::ServeSigner) && some.measures(BenchHost::Jco));
        assert!(!some.measures(BenchHost::Wasmtime) && !some.measures(BenchHost::ServeSignerNoReuse));
    }

    #[test]
    fn the_ratio_is_the_median_of_per_round_ratios() {
        let run =
            |per_second| Run { requests: 1, per_second, latencies: vec![Duration::from_millis(1)], reconnects: 0 };
        let mut figures = [
            figures("native", None, vec![run(100.0), run(50.0), run(80.0)]),
            figures("guest", None, vec![run(60.0), run(20.0), run(40.0)]),
        ];
        of_native(&mut figures);
        assert_eq!(figures[0].per_second, 80.0);
        assert_eq!(figures[1].per_second, 40.0);
        // Per round 0.6, 0.4, 0.5: the median is 0.5 (not 40 / 80).
        assert_eq!(figures[1].of_native, 0.5);
        assert_eq!(figures[0].of_native, 1.0);
    }
}
