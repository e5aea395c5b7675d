//! Launching each third-party host on 127.0.0.1 and waiting for its first
//! answer. Configuration reaches the signer as its environment
//! (`wasi:cli/environment`) on every host, each in its own way.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use super::process::{HostProcess, free_loopback_port};
use super::{DOCKER_REGISTRY, JCO, NATS_SERVER, Tools, WASH, WASMTIME};

/// How long a host gets from start to its first answer (compiling the
/// component included; CI machines are slow and shared).
pub const START_TIMEOUT: Duration = Duration::from_secs(120);

/// Limits given to `wasmtime serve`, the same as serve-signer's defaults.
pub const WASMTIME_MAX_MEMORY_BYTES: usize = 64 << 20;
pub const WASMTIME_TIMEOUT: &str = "30s";

/// A host serving the signer.
#[derive(Debug)]
pub struct Served {
    /// Which host (`wasmtime serve`, `jco serve`, `wash dev`).
    pub host: &'static str,
    pub process: HostProcess,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// The `Host` header that routes to the signer, where the host needs one.
    pub host_header: Option<String>,
    /// From spawning the process to the signer's first answer.
    pub first_answer: Duration,
}

impl Served {
    /// `POST` URL of the sign route.
    pub fn sign_url(&self) -> String {
        format!("{}{}", self.url, snapsign::signer::SIGN_PATH)
    }
}

/// `wasmtime serve --addr 127.0.0.1:0 -S cli --env NAME ... signer.wasm`.
/// Values go through wasmtime's own environment (`--env NAME` inherits one
/// variable), so secrets stay off the command line; the rest of the parent's
/// environment is cleared.
pub async fn wasmtime_serve(tools: &Tools, wasm: &Path, env: &[(String, String)]) -> Result<Served> {
    wasmtime_serve_with(tools, wasm, env, &[]).await
}

/// [`wasmtime_serve`] with extra `wasmtime serve` flags (the benchmark's
/// `--max-instance-reuse-count`).
pub async fn wasmtime_serve_with(
    tools: &Tools,
    wasm: &Path,
    env: &[(String, String)],
    extra: &[&str],
) -> Result<Served> {
    let wasmtime = tools.get(WASMTIME)?;
    let mut command = Command::new(&wasmtime);
    command.env_clear().envs(env.iter().cloned()).args(["serve", "--addr", "127.0.0.1:0", "-S", "cli"]);
    command.args([
        "-W",
        &format!("max-memory-size={WASMTIME_MAX_MEMORY_BYTES}"),
        "-W",
        &format!("timeout={WASMTIME_TIMEOUT}"),
    ]);
    command.args(extra);
    for (key, _) in env {
        command.args(["--env", key]);
    }
    command.arg(wasm);
    let started = Instant::now();
    let mut process = HostProcess::spawn("wasmtime serve", command)?;
    // "Serving HTTP on http://127.0.0.1:PORT/"
    let url = process
        .wait_for_line("its address", START_TIMEOUT, |line| {
            let rest = line.split_once("Serving HTTP on ")?.1;
            Some(rest.trim().trim_end_matches('/').to_owned())
        })
        .await?;
    ready("wasmtime serve", process, url, None, started).await
}

/// `jco serve --host 127.0.0.1 --port P signer.wasm`: jco transpiles the
/// component to JavaScript and serves it with Node's HTTP server. The whole
/// node environment becomes the component's: it starts with only `PATH` and
/// the signer's variables. The transpiled code goes under `work` (`--jco-dir`;
/// jco's own temporary directory would outlive a killed jco).
pub async fn jco_serve(tools: &Tools, wasm: &Path, env: &[(String, String)], work: &Path) -> Result<Served> {
    let jco = tools.get(JCO)?;
    let out = super::scratch_dir(work, "jco")?;
    let port = free_loopback_port()?;
    let mut command = Command::new(&jco);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .args(["serve", "--host", "127.0.0.1", "--port", &port.to_string(), "--jco-dir"])
        .arg(&out)
        .arg(wasm);
    let started = Instant::now();
    let mut process = HostProcess::spawn("jco serve", command)?;
    process
        .wait_for_line("'Server listening'", START_TIMEOUT, |line| line.contains("Server listening").then_some(()))
        .await?;
    ready("jco serve", process, format!("http://127.0.0.1:{port}"), None, started).await
}

/// `wash dev` in a project directory whose `.wash/config.yaml` points at the
/// prebuilt component (build command `true`), serves on `127.0.0.1:0`, and
/// gives the signer its environment as `workload.environment.config`.
/// `HOME` is `work` so wash keeps its state there.
pub async fn wash_dev(tools: &Tools, wasm: &Path, env: &[(String, String)], work: &Path) -> Result<Served> {
    let wash = tools.get(WASH)?;
    let wasm = &std::path::absolute(wasm).context("make the component path absolute")?;
    let project = super::scratch_dir(work, "wash-dev")?;
    std::fs::create_dir_all(project.join(".wash"))?;
    std::fs::write(project.join(".wash/config.yaml"), wash_dev_config(wasm, env)).context("write .wash/config.yaml")?;
    let mut command = Command::new(&wash);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &project)
        .current_dir(&project)
        .args(["dev", "--non-interactive"]);
    let started = Instant::now();
    let mut process = HostProcess::spawn("wash dev", command)?;
    let url = process.wait_for_line("its HTTP address", START_TIMEOUT, listening_addr).await?;
    ready("wash dev", process, url, None, started).await
}

/// The `wash dev` project file. Values are JSON strings, which YAML reads as
/// the same strings (quotes and escapes included).
pub fn wash_dev_config(wasm: &Path, env: &[(String, String)]) -> String {
    let quote = |s: &str| serde_json::Value::String(s.to_owned()).to_string();
    let mut yaml = format!(
        "build:\n  command: \"true\"\n  component_path: {}\nwit:\n  skip_fetch: true\ndev:\n  address: \"127.0.0.1:0\"\nworkload:\n  environment:\n    config:\n",
        quote(&wasm.display().to_string())
    );
    for (key, value) in env {
        yaml.push_str(&format!("      {}: {}\n", quote(key), quote(value)));
    }
    yaml
}

/// wash's "HTTP server listening addr=127.0.0.1:PORT" line.
fn listening_addr(line: &str) -> Option<String> {
    let rest = line.split_once("HTTP server listening addr=")?.1;
    let addr = rest.split_whitespace().next()?;
    Some(format!("http://{addr}"))
}

async fn ready(
    host: &'static str,
    mut process: HostProcess,
    url: String,
    host_header: Option<String>,
    started: Instant,
) -> Result<Served> {
    let sign_url = format!("{url}{}", snapsign::signer::SIGN_PATH);
    match wait_for_signer(&sign_url, host_header.as_deref(), START_TIMEOUT, Some(&mut process)).await {
        Ok(()) => Ok(Served { host, process, url, host_header, first_answer: started.elapsed() }),
        Err(e) => Err(
            e.context(format!("{host} at {url} never answered as the signer; its last output:\n{}", process.tail(30)))
        ),
    }
}

/// Polls `sign_url` with an unauthenticated request until the signer itself
/// answers (401 with its JSON `missing_token`), not the host's own router.
pub async fn wait_for_signer(
    sign_url: &str,
    host_header: Option<&str>,
    timeout: Duration,
    mut process: Option<&mut HostProcess>,
) -> Result<()> {
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build()?;
    let deadline = Instant::now() + timeout;
    let mut last;
    loop {
        if let Some(process) = process.as_deref_mut() {
            process.check_running()?;
        }
        let mut request = client.post(sign_url).body("{}");
        if let Some(host) = host_header {
            request = request.header("host", host);
        }
        match request.send().await {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                let code = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["code"].as_str().map(str::to_owned));
                if status == 401 && code.as_deref() == Some("missing_token") {
                    return Ok(());
                }
                last = format!("HTTP {status}: {}", text.chars().take(200).collect::<String>());
            }
            Err(e) => last = e.to_string(),
        }
        if Instant::now() >= deadline {
            bail!("no answer from the signer at {sign_url} within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `nats-server -a 127.0.0.1 -p -1` (an OS-chosen port). Returns its `nats://` URL.
pub async fn nats_server(tools: &Tools) -> Result<(HostProcess, String)> {
    let nats = tools.get(NATS_SERVER)?;
    let mut command = Command::new(&nats);
    command.env_clear().args(["-a", "127.0.0.1", "-p", "-1"]);
    let mut process = HostProcess::spawn("nats-server", command)?;
    let addr = process
        .wait_for_line("its client address", START_TIMEOUT, |line| {
            Some(line.split_once("Listening for client connections on ")?.1.trim().to_owned())
        })
        .await?;
    Ok((process, format!("nats://{addr}")))
}

/// The Debian `docker-registry` (distribution 2.8) on `127.0.0.1:0`, storing
/// under `dir`. Returns its `127.0.0.1:PORT`.
pub async fn oci_registry(tools: &Tools, dir: &Path) -> Result<(HostProcess, String)> {
    let registry = tools.get(DOCKER_REGISTRY)?;
    std::fs::create_dir_all(dir.join("data"))?;
    let config = dir.join("config.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:0\n",
            serde_json::Value::String(dir.join("data").display().to_string())
        ),
    )?;
    let mut command = Command::new(&registry);
    command.env_clear().arg("serve").arg(&config);
    let mut process = HostProcess::spawn("docker-registry", command)?;
    let addr = process
        .wait_for_line("its address", START_TIMEOUT, |line| {
            let rest = line.split_once("listening on ")?.1;
            Some(rest.split(|c: char| c == '"' || c.is_whitespace()).next()?.to_owned())
        })
        .await?;
    Ok((process, addr))
}

/// `wash host` joined to the lattice at `nats_url`, HTTP on `127.0.0.1:0`,
/// pulling from plain-HTTP registries. Returns the process and its HTTP URL.
pub async fn wash_host(tools: &Tools, name: &str, nats_url: &str, work: &Path) -> Result<(HostProcess, String)> {
    let wash = tools.get(WASH)?;
    let home = super::scratch_dir(work, name)?;
    let mut command = Command::new(&wash);
    command
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .args(["host", "--non-interactive", "--host-name", name])
        .args(["--scheduler-nats-url", nats_url, "--data-nats-url", nats_url])
        .args(["--http-addr", "127.0.0.1:0", "--allow-insecure-registries"]);
    let mut process = HostProcess::spawn(&format!("wash host {name}"), command)?;
    let url = process.wait_for_line("its HTTP address", START_TIMEOUT, listening_addr).await?;
    Ok((process, url))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wash_dev_config_quotes_values() {
        let env = vec![("SNAPSIGN_TOKEN_KEY".to_owned(), "a: b\"c\n".to_owned())];
        let yaml = wash_dev_config(Path::new("/x y/s.wasm"), &env);
        assert!(yaml.contains("component_path: \"/x y/s.wasm\""), "{yaml}");
        assert!(yaml.contains("\"SNAPSIGN_TOKEN_KEY\": \"a: b\\\"c\\n\""), "{yaml}");
    }

    #[test]
    fn wash_listening_line_gives_the_url() {
        let line = "2026-11-28T21:09:51Z  INFO HTTP server listening addr=127.0.0.1:45071 protocol=\"HTTP\"";
        assert_eq!(listening_addr(line).as_deref(), Some("http://127.0.0.1:45071"));
    }
}
