//! `snapsign bench sign`: what signing costs, natively and in the component,
//! and what serve-signer sustains on loopback. Figures, not tests.

pub mod data;
pub mod import;
pub mod run_steps;
pub mod soak;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snapsign::signer::{self, Incoming, SIGN_PATH, SignerConfig, Step};

use crate::engine::EngineLimits;
use crate::signer::SignerServerConfig;
use snapsign_dev_stack::fixture::{TOKEN_KEY, env, store};

const PARTS: u32 = 10_000;

fn put_body() -> String {
    format!(
        r#"{{"target":{{"kind":"artifact","rel_path":"bench/s.tlsnap"}},"op":{{"kind":"put_artifact","multipart_hint":{{"max_parts":{PARTS},"part_size_bytes":67108864}}}}}}"#
    )
}

/// Refuses counts of zero, which would leave nothing to measure.
fn at_least_one(counts: &[(&str, usize)]) -> Result<()> {
    for (flag, count) in counts {
        anyhow::ensure!(*count > 0, "{flag} 0 leaves nothing to measure; pass {flag} 1 or more");
    }
    Ok(())
}

/// Median and p99 of samples, in milliseconds; zeros when there are none.
fn stats(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (0.0, 0.0);
    }
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
    (at(0.5), at(0.99))
}

/// The store's answer to CreateMultipartUpload, as s3s sends it.
const CREATE_ANSWER: &str = r#"<?xml version="1.0" encoding="UTF-8"?><InitiateMultipartUploadResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Bucket>bench</Bucket><Key>builds/ns/bench/s.tlsnap</Key><UploadId>5f0b2c9e-0a51-4d9e-8a43-0d3f8f1f6a10</UploadId></InitiateMultipartUploadResult>"#;

fn native_sign(config: &SignerConfig, token: &str, rounds: usize) -> Result<Vec<Duration>> {
    let auth = format!("Bearer {token}");
    let body = put_body();
    let mut samples = Vec::with_capacity(rounds);
    let mut memo = signer::Memo::default();
    for _ in 0..rounds {
        let incoming = Incoming {
            method: "POST",
            path: SIGN_PATH,
            authorization: Some(&auth),
            body: body.as_bytes(),
            request_id: "bench",
        };
        let Step::StoreCall(pending) = signer::handle(config, &mut memo, &incoming, jiff::Timestamp::now()) else {
            bail!("native core did not ask for CreateMultipartUpload");
        };
        let started = Instant::now();
        let answer = pending.finish(200, CREATE_ANSWER);
        samples.push(started.elapsed());
        if answer.status != 200 {
            bail!("native signing failed: {}", answer.body);
        }
    }
    Ok(samples)
}

/// Runs the signing benchmark and prints its figures.
pub async fn sign(rounds: usize, requests: usize, concurrency: usize) -> Result<()> {
    at_least_one(&[("--rounds", rounds), ("--requests", requests), ("--concurrency", concurrency)])?;
    let dir = tempfile_dir()?;
    let store = store(&dir).await?;
    let env = env(&store.url());
    let config = SignerConfig::from_vars(env.clone())?;
    let token = snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns", jiff::Timestamp::now().as_second() + 3600)?;

    let native = native_sign(&config, &token, rounds)?;
    let (native_median, _) = stats(native);

    let (server, host) = crate::signer::start(&SignerServerConfig {
        listen: "127.0.0.1:0".parse()?,
        env,
        limits: EngineLimits::default(),
        request_timeout: Duration::from_secs(30),
        cache_dir: dir.join("cache"),
        max_instance_reuse: crate::signer::DEFAULT_MAX_INSTANCE_REUSE,
        preinit: true,
    })
    .await?;
    let url = format!("{}{SIGN_PATH}", server.url());
    let client = reqwest::Client::new();
    let mut guest = Vec::with_capacity(rounds);
    let mut whole = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let started = Instant::now();
        let response = client.post(&url).bearer_auth(&token).body(put_body()).send().await?;
        let timing = response.headers().get("server-timing").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let status = response.status();
        let body = response.bytes().await?;
        whole.push(started.elapsed());
        if status != 200 {
            bail!("signer answered {status}: {}", String::from_utf8_lossy(&body));
        }
        let ms: f64 = timing
            .as_deref()
            .and_then(|t| t.strip_prefix("sign;dur="))
            .and_then(|v| v.parse().ok())
            .context("signer answer has no Server-Timing sign;dur=")?;
        guest.push(Duration::from_secs_f64(ms / 1e3));
    }
    let (guest_median, _) = stats(guest);
    let (whole_median, whole_p99) = stats(whole);

    let mut latency = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let response = client.post(&url).bearer_auth(&token).body(GET_BODY).send().await?;
        let status = response.status();
        response.bytes().await?;
        latency.push(started.elapsed());
        if status != 200 {
            bail!("get_blob answered {status}");
        }
    }
    let (get_median, get_p99) = stats(latency);

    let rps = load(&client, &url, &token, requests, concurrency).await?;

    println!(
        "snapsign bench sign ({} build of the host, {rounds} rounds)",
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!("  component load: {:?}", host.loaded);
    println!("  put_artifact, {PARTS} part URLs signed, native core:     median {native_median:8.2} ms");
    println!(
        "  put_artifact, {PARTS} part URLs signed, in component:    median {guest_median:8.2} ms  (x{:.2} native)",
        guest_median / native_median
    );
    println!(
        "  put_artifact, {PARTS} parts, whole request via serve-signer: median {whole_median:8.2} ms  p99 {whole_p99:8.2} ms"
    );
    println!(
        "  get_blob via serve-signer (instance reused per caller): median {get_median:8.3} ms  p99 {get_p99:8.3} ms  ({requests} sequential)"
    );
    println!("  get_blob throughput, {concurrency} concurrent loopback clients: {rps:8.0} req/s");
    server.shutdown().await;
    store.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A `serve-signer` child process, killed on drop.
struct SignerProcess {
    child: std::process::Child,
    url: String,
}

impl SignerProcess {
    fn start(
        binary: &std::path::Path,
        env: &[(String, String)],
        cache_dir: &std::path::Path,
        max_instance_reuse: Option<u32>,
    ) -> Result<Self> {
        use std::io::BufRead;
        let mut command = std::process::Command::new(binary);
        command.args(["serve-signer", "--listen", "127.0.0.1:0", "--cache-dir"]).arg(cache_dir);
        if let Some(uses) = max_instance_reuse {
            command.arg("--max-instance-reuse").arg(uses.to_string());
        }
        let mut child = command
            .envs(env.iter().cloned())
            // Both servers log at the same level: the figures measure serving, not logging.
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {} serve-signer", binary.display()))?;
        let stdout = child.stdout.take().context("serve-signer stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(120);
        let url = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match rx.recv_timeout(left) {
                Ok(line) => line,
                Err(_) => {
                    let _ = child.kill();
                    bail!("{} serve-signer printed no address within 120 s", binary.display());
                }
            };
            if let Some(url) = line.strip_prefix("signer listening on ") {
                break url.to_owned();
            }
        };
        // Measure only once the snapshot serves: until then fresh instances
        // run the component's start-up, and the snapshot's compile shares the CPU.
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(state) = line.strip_prefix("signer pre-initialization: ") {
                        println!("  {}: pre-initialization {state}", binary.display());
                        break;
                    }
                }
                Err(_) => {
                    println!(
                        "  {}: said nothing of pre-initialization within 120 s (an older build?); its figures may include it",
                        binary.display()
                    );
                    break;
                }
            }
        }
        Ok(SignerProcess { child, url })
    }
}

impl Drop for SignerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const GET_BODY: &str =
    r#"{"target":{"kind":"blob","uri":"s3://bench/builds/ns/bench/s.tlsnap"},"op":{"kind":"get_blob"}}"#;

async fn sequential(client: &reqwest::Client, url: &str, token: &str, requests: usize) -> Result<Vec<Duration>> {
    let mut latency = Vec::with_capacity(requests);
    for _ in 0..requests {
        let started = Instant::now();
        let response = client.post(url).bearer_auth(token).body(GET_BODY).send().await?;
        let status = response.status();
        response.bytes().await?;
        latency.push(started.elapsed());
        if status != 200 {
            bail!("get_blob answered {status}");
        }
    }
    Ok(latency)
}

async fn load(client: &reqwest::Client, url: &str, token: &str, requests: usize, concurrency: usize) -> Result<f64> {
    let per_worker = requests / concurrency.max(1);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (client, url, token) = (client.clone(), url.to_owned(), token.to_owned());
        workers.push(tokio::spawn(async move {
            for _ in 0..per_worker {
                let response = client.post(&url).bearer_auth(&token).body(GET_BODY).send().await?;
                if !response.status().is_success() {
                    bail!("get_blob under load answered {}", response.status());
                }
                response.bytes().await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for worker in workers {
        worker.await??;
    }
    Ok((per_worker * concurrency.max(1)) as f64 / started.elapsed().as_secs_f64())
}

/// `snapsign bench serve`: get_blob latency and throughput through
/// `serve-signer` processes started from `this` binary and, when given, a
/// `baseline` binary, measured in alternating rounds of one run so that both
/// see the same machine.
pub async fn serve(
    this: std::path::PathBuf,
    baseline: Option<std::path::PathBuf>,
    rounds: usize,
    requests: usize,
    concurrency: usize,
    max_instance_reuse: Option<u32>,
) -> Result<()> {
    at_least_one(&[("--rounds", rounds), ("--requests", requests), ("--concurrency", concurrency)])?;
    let dir = tempfile_dir()?;
    let store = store(&dir).await?;
    let env = env(&store.url());
    let token = snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns", jiff::Timestamp::now().as_second() + 3600)?;
    let mut servers = Vec::new();
    if let Some(baseline) = &baseline {
        servers.push((
            "baseline",
            baseline.clone(),
            SignerProcess::start(baseline, &env, &dir.join("cache-baseline"), max_instance_reuse)?,
        ));
    }
    servers.push((
        "this build",
        this.clone(),
        SignerProcess::start(&this, &env, &dir.join("cache-this"), max_instance_reuse)?,
    ));

    let client = reqwest::Client::new();
    let mut latency: Vec<Vec<Duration>> = vec![Vec::new(); servers.len()];
    let mut throughput: Vec<Vec<f64>> = vec![Vec::new(); servers.len()];
    // The server process's CPU per request, over all runs: unlike req/s it
    // leaves out the bench client, which shares the machine.
    let mut cpu: Vec<Duration> = vec![Duration::ZERO; servers.len()];
    for (_, _, server) in &servers {
        let url = format!("{}{SIGN_PATH}", server.url);
        sequential(&client, &url, &token, 200).await.context("warm up")?;
    }
    for round in 0..rounds.max(1) {
        // Alternate who goes first, so drift on the machine hits both alike.
        let mut order: Vec<usize> = (0..servers.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let url = format!("{}{SIGN_PATH}", servers[i].2.url);
            let before = process_cpu(servers[i].2.child.id());
            latency[i].extend(sequential(&client, &url, &token, requests).await?);
            throughput[i].push(load(&client, &url, &token, requests, concurrency).await?);
            cpu[i] += process_cpu(servers[i].2.child.id()).saturating_sub(before);
        }
    }

    println!(
        "snapsign bench serve ({} build of the bench client, {} rounds of {requests} sequential get_blob requests and {requests} from {concurrency} concurrent clients per server)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        rounds.max(1)
    );
    if let Some(uses) = max_instance_reuse {
        println!("  both servers run with --max-instance-reuse {uses}");
    }
    for (label, binary, _) in &servers {
        println!("  {label}: {}", binary.display());
    }
    let served = (2 * requests * rounds.max(1)) as f64;
    let figures: Vec<ServeFigures> = latency
        .into_iter()
        .zip(throughput)
        .zip(&cpu)
        .map(|((samples, mut rps), cpu)| {
            let (p50, p99) = stats(samples);
            rps.sort_by(f64::total_cmp);
            ServeFigures { p50, p99, rps: rps[rps.len() / 2], cpu_us: cpu.as_secs_f64() * 1e6 / served }
        })
        .collect();
    let header: Vec<String> = servers.iter().map(|(label, _, _)| format!("{label:>14}")).collect();
    println!("  {:<38}{}{}", "", header.join(""), if servers.len() == 2 { "        change" } else { "" });
    let row = |name: &str, unit: &str, pick: &dyn Fn(&ServeFigures) -> f64, digits: usize| {
        let cells: Vec<String> = figures.iter().map(|f| format!("{:>10.digits$} {unit:<3}", pick(f))).collect();
        let change = match figures.as_slice() {
            [before, after] => format!("    {:+7.1} %", (pick(after) / pick(before) - 1.0) * 100.0),
            _ => String::new(),
        };
        println!("  {name:<38}{}{change}", cells.join(""));
    };
    // Without the kernel's schedstat there is no figure rather than a zero.
    if figures.iter().all(|f| f.cpu_us > 0.0) {
        row("server CPU per request (all runs)", "µs", &|f| f.cpu_us, 1);
    }
    row("get_blob latency p50 (sequential)", "ms", &|f| f.p50, 3);
    row("get_blob latency p99 (sequential)", "ms", &|f| f.p99, 3);
    row(&format!("get_blob throughput ({concurrency} clients, median)"), "r/s", &|f| f.rps, 0);
    drop(servers);
    store.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One server's figures in `bench serve`.
struct ServeFigures {
    /// Sequential latency, ms.
    p50: f64,
    p99: f64,
    /// Median throughput of the load runs.
    rps: f64,
    /// The server process's CPU per request, µs.
    cpu_us: f64,
}

/// CPU time (user and system) `pid` has used so far, summed over its
/// threads from /proc (nanoseconds; a thread that has exited is left out,
/// and serve-signer's threads live as long as it does).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return Duration::ZERO };
    let nanos: u64 = tasks
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("schedstat")).ok())
        .filter_map(|stat| stat.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("snapsign-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    Ok(dir)
}

/// `snapsign bench build`: orchestration overhead of demo builds (total minus
/// the builder process), warm instantiation, and a cold start from the cache.
pub async fn build(rounds: usize, instantiations: usize, builder: std::path::PathBuf) -> Result<()> {
    at_least_one(&[("--rounds", rounds), ("--instantiations", instantiations)])?;
    use crate::image_build::{BuilderRuntime, proxy_backend};
    use snapsign_dev_stack::{DevConfig, DevStack};

    let dir = tempfile_dir()?;
    let mut config = DevConfig::new(dir.join("dev"), builder);
    config.pending = Duration::ZERO;
    config.cache_dir = dir.join("cache");
    let stack = DevStack::start(&config).await?;
    let context = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/base");
    let dockerfile = std::fs::read_to_string(context.join("Dockerfile"))?;
    let mut overhead = Vec::new();
    let mut instantiate = Vec::new();
    let mut setup = Vec::new();
    let mut total = Vec::new();
    let mut cold = Vec::new();
    // Loaded and pre-instantiated once, as a long-running host would.
    let runtime = BuilderRuntime::new(128 << 20, &config.cache_dir)?;
    for round in 0..rounds.max(1) {
        let mut options = stack.build_options(&format!("bench-{round}"), &dockerfile, &context);
        options.cache_dir = config.cache_dir.clone();
        let (backend, outbound) = proxy_backend(&options);
        let (outcome, timings) = runtime.run(&options, backend, outbound, std::sync::Arc::new(|_| {})).await?;
        outcome.map_err(|e| anyhow::anyhow!("bench build failed: {e}"))?;
        if round == 0 {
            continue; // the first round compiles the component
        }
        total.push(timings.run);
        overhead.push(timings.run.saturating_sub(timings.builder));
        instantiate.push(timings.instantiate);
        setup.push(timings.setup);
    }
    // The same instantiation back to back, host caches warm: what
    // instantiation itself costs, apart from the cold caches of a once-per-build call.
    let options = stack.build_options("bench-instantiate", &dockerfile, &context);
    let (backend, outbound) = proxy_backend(&options);
    let back_to_back = runtime.instantiate_back_to_back(&options, backend, outbound, instantiations).await?;
    // A cold start: a new engine loading the compiled component from the cache.
    for _ in 0..10 {
        let started = Instant::now();
        let cold_runtime = BuilderRuntime::new(128 << 20, &config.cache_dir)?;
        cold.push(started.elapsed());
        drop(cold_runtime);
    }
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    let (total_median, _) = stats(total);
    let (overhead_median, overhead_p99) = stats(overhead);
    let (instantiate_median, _) = stats(instantiate);
    let (setup_median, _) = stats(setup);
    let (back_to_back_median, back_to_back_p99) = stats(back_to_back);
    let (cold_median, _) = stats(cold);
    println!(
        "snapsign bench build ({} build of the host, {} measured rounds of examples/base on the dev stack)",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        rounds.max(2) - 1
    );
    println!("  whole build (export call):                        median {total_median:8.1} ms");
    println!(
        "  orchestration overhead (total minus the builder): median {overhead_median:8.1} ms  p99 {overhead_p99:8.1} ms"
    );
    println!("  component instantiate, warm (pre-instantiated, pooling):  median {:8.1} µs", instantiate_median * 1e3);
    println!(
        "  component instantiate, {instantiations} back to back (fresh Store each, no build between): median {:8.1} µs  p99 {:8.1} µs",
        back_to_back_median * 1e3,
        back_to_back_p99 * 1e3
    );
    println!("  per-build WASI context (context preopen) and Store:       median {:8.1} µs", setup_median * 1e3);
    println!(
        "  cold start from the compiled cache (engine, deserialize, link, pre-instantiate): median {cold_median:8.2} ms"
    );
    println!(
        "  cold start to the first guest instruction (that + Store + instantiate):          about  {:8.2} ms",
        cold_median + (setup_median + instantiate_median)
    );
    Ok(())
}

/// `name` on PATH.
pub(crate) fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(name)).find(|p| p.is_file())
}

/// buildah's storage options for a bench: vfs, in a root of its own under `dir`.
pub(crate) fn buildah_storage(dir: &std::path::Path) -> Vec<String> {
    vec![
        "--root".to_owned(),
        dir.join("buildah-root").display().to_string(),
        "--runroot".to_owned(),
        dir.join("buildah-runroot").display().to_string(),
        "--storage-driver".to_owned(),
        "vfs".to_owned(),
    ]
}

/// A bench's scratch directory under the system's temporary directory, removed when dropped.
pub(crate) struct Scratch(pub(crate) std::path::PathBuf);

impl Scratch {
    pub(crate) fn new(bench: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("snapsign-bench-{bench}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(Scratch(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn zero_counts_are_refused_before_anything_starts() {
        let error = sign(0, 10, 1).await.unwrap_err().to_string();
        assert!(error.contains("--rounds 0"), "{error}");
        let error = serve("snapsign".into(), None, 1, 0, 1, None).await.unwrap_err().to_string();
        assert!(error.contains("--requests 0"), "{error}");
        let error = build(0, 1, "tl-rootfs-build".into()).await.unwrap_err().to_string();
        assert!(error.contains("--rounds 0"), "{error}");
        let error = build(1, 0, "tl-rootfs-build".into()).await.unwrap_err().to_string();
        assert!(error.contains("--instantiations 0"), "{error}");
        assert_eq!(stats(Vec::new()), (0.0, 0.0));
        let data = |context_mb, rounds, buildah: Option<&str>, no_peer| data::DataOptions {
            context_mb,
            rounds,
            buildah: buildah.map(Into::into),
            no_peer,
            builder: "tl-rootfs-build".into(),
            compression: Default::default(),
        };
        let error = data::run(data(2, 1, None, true)).await.unwrap_err().to_string();
        assert!(error.contains("--context-mb must be at least 3"), "{error}");
        let error = data::run(data(300, 0, None, true)).await.unwrap_err().to_string();
        assert!(error.contains("--rounds must be at least 1"), "{error}");
        let error = data::run(data(300, 1, Some("/nonexistent/buildah"), false)).await.unwrap_err().to_string();
        assert!(error.contains("--buildah /nonexistent/buildah is not a file"), "{error}");
    }
}
