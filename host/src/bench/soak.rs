//! `snapsign bench soak`: serve-signer under hours-like traffic, watched from
//! outside. A serve-signer process (this binary) signs for the bench store;
//! workers send mixed sign requests (get_blob, and put_artifact with 1 to 160
//! parts whose uploads are then aborted through their own abort URL) from
//! many callers at a steady rate, while slow clients dribble request heads.
//! Every 10 s it prints the process's RSS and open descriptors and the
//! answers by status; every minute, that minute's p50 and p99. A figure, not
//! a test: it fails only when an answer is not 200 (or the process dies).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snapsign::signer::SIGN_PATH;
use tokio::io::AsyncWriteExt;

use super::{SignerProcess, TOKEN_KEY, env, store, tempfile_dir};

/// The soak's settings.
#[derive(Debug, Clone)]
pub struct SoakOptions {
    pub minutes: f64,
    /// Distinct caller tokens (one namespace), picked at random per request.
    pub callers: usize,
    /// Concurrent request senders.
    pub concurrency: usize,
    /// Requests per second, all senders together.
    pub rate: u32,
    /// Connections that send their request head one byte every 500 ms.
    pub slow_clients: usize,
}

/// What the senders saw, shared with the reporter.
#[derive(Default)]
struct Seen {
    /// Answers by status (0: no answer: connection error).
    statuses: BTreeMap<u16, u64>,
    /// This minute's latencies.
    minute: Vec<Duration>,
    /// The first few failures, for the report.
    failures: Vec<String>,
}

/// One line of the process's state.
struct Sample {
    at: Duration,
    rss_kib: u64,
    fds: usize,
}

/// A tiny deterministic generator (xorshift64*): the same mix in every run.
struct Mix(u64);

impl Mix {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn read_sample(pid: u32, at: Duration) -> Result<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status: has serve-signer (pid {pid}) exited?"))?;
    let rss_kib = snapsign_rootfs_builder::status_kib(&status, "VmRSS")
        .with_context(|| format!("no VmRSS line in /proc/{pid}/status"))?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok(Sample { at, rss_kib, fds })
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3
}

/// Runs the soak with `this` binary as serve-signer.
pub async fn run(this: std::path::PathBuf, options: SoakOptions) -> Result<()> {
    if !(options.minutes > 0.0 && options.minutes <= 24.0 * 60.0) {
        bail!("--minutes must be in (0, 1440] (got {})", options.minutes);
    }
    if options.callers == 0 || options.concurrency == 0 || options.rate == 0 {
        bail!("--callers, --concurrency and --rate must be at least 1");
    }
    let dir = tempfile_dir()?;
    let store = store(&dir).await?;
    let env = env(&store.url());
    let server = SignerProcess::start(&this, &env, &dir.join("cache"), None)?;
    let pid = server.child.id();
    let url = format!("{}{SIGN_PATH}", server.url);
    let expiry = jiff::Timestamp::now().as_second() + 48 * 3600;
    let tokens: Arc<Vec<String>> = Arc::new(
        (0..options.callers as i64)
            .map(|i| snapsign::token::mint(TOKEN_KEY.as_bytes(), "ns", expiry + i).map(|t| format!("Bearer {t}")))
            .collect::<Result<_, _>>()?,
    );
    println!(
        "snapsign bench soak: {} min, {} callers, {} senders at {} req/s in all, {} slow clients; serve-signer pid {pid} at {}",
        options.minutes, options.callers, options.concurrency, options.rate, options.slow_clients, server.url
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(options.minutes * 60.0);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(30)).build()?;
    let mut tasks = Vec::new();
    let interval = Duration::from_secs_f64(options.concurrency as f64 / options.rate as f64);
    for sender in 0..options.concurrency {
        let (client, url, tokens, seen) = (client.clone(), url.clone(), tokens.clone(), seen.clone());
        tasks.push(tokio::spawn(async move {
            let mut mix = Mix(0x9e37_79b9_7f4a_7c15 ^ (sender as u64 + 1));
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            while Instant::now() < deadline {
                tick.tick().await;
                let token = &tokens[mix.below(tokens.len() as u64) as usize];
                let (body, put) = if mix.below(10) < 7 {
                    let n = mix.below(1000);
                    (format!(r#"{{"target":{{"kind":"blob","uri":"s3://bench/builds/ns/soak/{n}.tlsnap"}},"op":{{"kind":"get_blob"}}}}"#), false)
                } else {
                    let parts = 1 + mix.below(160);
                    let n = mix.next();
                    (format!(r#"{{"target":{{"kind":"artifact","rel_path":"soak/{n:x}.tlsnap"}},"op":{{"kind":"put_artifact","multipart_hint":{{"max_parts":{parts},"part_size_bytes":67108864}}}}}}"#), true)
                };
                let sent = Instant::now();
                let answer = async {
                    let response = client.post(&url).header("authorization", token).body(body).send().await?;
                    let status = response.status().as_u16();
                    let text = response.text().await?;
                    Ok::<_, anyhow::Error>((status, text))
                }
                .await;
                let latency = sent.elapsed();
                let (status, text) = answer.unwrap_or_else(|e| (0, format!("{e:#}")));
                // The upload was created at the store: abort it, as a finished build would complete it.
                let mut abort_failed = None;
                if put && status == 200 {
                    let abort = serde_json::from_str::<serde_json::Value>(&text)
                        .ok()
                        .and_then(|v| v.get("abortUrl").and_then(|u| u.as_str()).map(str::to_owned));
                    match abort {
                        Some(abort) => match client.delete(&abort).send().await {
                            Ok(r) if r.status().is_success() => {}
                            Ok(r) => abort_failed = Some(format!("abort answered {}", r.status())),
                            Err(e) => abort_failed = Some(format!("abort failed: {e}")),
                        },
                        None => abort_failed = Some("put_artifact answer without abortUrl".into()),
                    }
                }
                let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
                *seen.statuses.entry(status).or_default() += 1;
                seen.minute.push(latency);
                if (status != 200 || abort_failed.is_some()) && seen.failures.len() < 10 {
                    let why = abort_failed.unwrap_or_else(|| text.chars().take(300).collect());
                    seen.failures.push(format!("{status}: {why}"));
                }
            }
        }));
    }
    let addr: std::net::SocketAddr =
        server.url.trim_start_matches("http://").parse().context("serve-signer address")?;
    for _ in 0..options.slow_clients {
        tasks.push(tokio::spawn(async move {
            let head = format!("POST {SIGN_PATH} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 2\r\n\r\n{{}}");
            while Instant::now() < deadline {
                let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                // One byte every 500 ms until the server cuts the connection off.
                for byte in head.as_bytes() {
                    if Instant::now() >= deadline || stream.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }));
    }

    let mut samples = Vec::new();
    let mut minutes: Vec<(f64, f64, usize)> = Vec::new();
    let mut next_minute = started + Duration::from_secs(60);
    println!("{:>6}  {:>9}  {:>4}  answers by status", "t (s)", "RSS (MiB)", "fds");
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10).min(deadline.saturating_duration_since(Instant::now()))).await;
        let sample = read_sample(pid, started.elapsed())?;
        let now = Instant::now();
        let (statuses, minute) = {
            let mut seen = seen.lock().unwrap_or_else(|p| p.into_inner());
            let minute =
                if now >= next_minute || now >= deadline { Some(std::mem::take(&mut seen.minute)) } else { None };
            (seen.statuses.clone(), minute)
        };
        println!(
            "{:>6.0}  {:>9.1}  {:>4}  {}",
            sample.at.as_secs_f64(),
            sample.rss_kib as f64 / 1024.0,
            sample.fds,
            statuses.iter().map(|(s, n)| format!("{s}: {n}")).collect::<Vec<_>>().join(", ")
        );
        samples.push(sample);
        if let Some(mut minute) = minute {
            minute.sort();
            let (p50, p99) = (percentile(&minute, 0.5), percentile(&minute, 0.99));
            println!(
                "        minute {}: {} answers, p50 {p50:.2} ms, p99 {p99:.2} ms",
                minutes.len() + 1,
                minute.len()
            );
            minutes.push((p50, p99, minute.len()));
            next_minute += Duration::from_secs(60);
        }
    }
    for task in tasks {
        task.abort();
    }
    drop(server);
    store.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);

    let seen = seen.lock().unwrap_or_else(|p| p.into_inner());
    let total: u64 = seen.statuses.values().sum();
    let errors: u64 = seen.statuses.iter().filter(|(s, _)| **s != 200).map(|(_, n)| n).sum();
    // After warm-up: the first minute is left out of the flatness figures.
    let settled: Vec<&Sample> = samples.iter().filter(|s| s.at >= Duration::from_secs(60)).collect();
    let settled = if settled.is_empty() { samples.iter().collect() } else { settled };
    let range = |f: &dyn Fn(&Sample) -> f64| {
        let values: Vec<f64> = settled.iter().map(|s| f(s)).collect();
        (values.iter().cloned().fold(f64::INFINITY, f64::min), values.iter().cloned().fold(0.0, f64::max))
    };
    let (rss_min, rss_max) = range(&|s| s.rss_kib as f64 / 1024.0);
    let (fds_min, fds_max) = range(&|s| s.fds as f64);
    let p99s: Vec<f64> = minutes.iter().map(|m| m.1).collect();
    println!("summary: {total} answers, {errors} not 200 (abort failures: {})", seen.failures.len());
    println!("  RSS after the first minute: {rss_min:.1}–{rss_max:.1} MiB; open fds: {fds_min}–{fds_max}");
    if let (Some(first), Some(last)) = (p99s.first(), p99s.last()) {
        let worst = p99s.iter().cloned().fold(0.0, f64::max);
        println!("  p99 per minute: first {first:.2} ms, last {last:.2} ms, worst {worst:.2} ms");
    }
    if !seen.failures.is_empty() {
        bail!("the soak saw failures (first {}): {:#?}", seen.failures.len(), seen.failures);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_deterministic_and_spread() {
        let (mut a, mut b) = (Mix(7), Mix(7));
        let first: Vec<u64> = (0..100).map(|_| a.below(160)).collect();
        assert_eq!(first, (0..100).map(|_| b.below(160)).collect::<Vec<_>>());
        assert!(first.iter().any(|&n| n < 16) && first.iter().any(|&n| n > 144), "{first:?}");
    }

    #[tokio::test]
    async fn nonsense_settings_are_refused_before_anything_starts() {
        let options = SoakOptions { minutes: 0.0, callers: 1, concurrency: 1, rate: 1, slow_clients: 0 };
        let e = run("/nonexistent".into(), options.clone()).await.unwrap_err().to_string();
        assert!(e.contains("--minutes"), "{e}");
        let e = run("/nonexistent".into(), SoakOptions { minutes: 1.0, rate: 0, ..options }).await.unwrap_err();
        assert!(e.to_string().contains("--rate"), "{e}");
    }
}
