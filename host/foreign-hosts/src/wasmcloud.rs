//! `snapsign deploy wasmcloud`: the signer on N hosts of a wasmCloud (v2)
//! lattice, placed through the hosts' NATS workload API the way the
//! Kubernetes runtime-operator does it, without Kubernetes:
//!
//! 1. push the component to an OCI registry (`wash oci push --insecure`);
//! 2. learn host ids from their heartbeats (`runtime.operator.heartbeat.<id>`,
//!    every 15 s, the first when a host starts), or ask the hosts named with
//!    `--host-id` (`runtime.host.<id>.heartbeat`);
//! 3. on each chosen host, stop any earlier copy and send a workload-start
//!    request (`runtime.host.<id>.workload.start`) with the configuration as
//!    `localResources.environment` and the store as its only `allowedHosts`;
//! 4. report each placement (host, HTTP port, state).
//!
//! Requests reach the workload on any of those hosts by its `Host` header.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use serde_json::{Value, json};

use super::nats::Nats;

/// How long a host gets to pull, compile and start the workload.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Heartbeats come every 15 s: waiting a little longer sees every live host once.
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(17);

/// What to deploy where.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// `nats://127.0.0.1:4222`
    pub nats_url: String,
    /// The registry hosts pull from, `host:port` (plain HTTP).
    pub registry: String,
    /// Repository name in the registry.
    pub repository: String,
    /// How many hosts to place the signer on.
    pub hosts: usize,
    /// Hosts to use, by id, instead of waiting for heartbeats.
    pub host_ids: Vec<String>,
    /// The signer's environment (`SNAPSIGN_*`).
    pub env: Vec<(String, String)>,
    /// Extra `host:port`s the signer may call besides the store.
    pub extra_allowed_hosts: Vec<String>,
    /// The `Host` header that routes to the signer.
    pub http_host: String,
    /// Workload ids are `{workload_prefix}-{n}`.
    pub workload_prefix: String,
    /// How long to wait for heartbeats.
    pub discover_timeout: Duration,
}

impl DeployOptions {
    /// Defaults for everything but where the lattice is and the configuration.
    pub fn new(nats_url: &str, registry: &str, hosts: usize, env: Vec<(String, String)>) -> DeployOptions {
        DeployOptions {
            nats_url: nats_url.to_owned(),
            registry: registry.to_owned(),
            repository: "snapsign-signer".into(),
            hosts,
            host_ids: Vec::new(),
            env,
            extra_allowed_hosts: Vec::new(),
            http_host: "signer.local".into(),
            workload_prefix: "snapsign-signer".into(),
            discover_timeout: DISCOVER_TIMEOUT,
        }
    }
}

/// A host as its heartbeat describes it.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub id: String,
    pub hostname: String,
    pub version: String,
    /// Port of the host's HTTP server (`--http-addr`).
    pub http_port: Option<u16>,
}

impl HostInfo {
    fn from_heartbeat(value: &Value) -> Option<HostInfo> {
        Some(HostInfo {
            id: value["id"].as_str()?.to_owned(),
            hostname: value["hostname"].as_str().unwrap_or_default().to_owned(),
            version: value["version"].as_str().unwrap_or_default().to_owned(),
            http_port: value["httpPort"].as_u64().and_then(|p| u16::try_from(p).ok()),
        })
    }
}

/// The signer placed on one host.
#[derive(Debug, Clone, Serialize)]
pub struct Placement {
    pub host: HostInfo,
    pub workload_id: String,
    pub state: String,
    pub message: String,
}

/// Where the signer runs.
#[derive(Debug, Clone, Serialize)]
pub struct Deployment {
    /// `registry/repository:tag`
    pub image: String,
    /// The `Host` header that routes to it.
    pub http_host: String,
    pub allowed_hosts: Vec<String>,
    pub placements: Vec<Placement>,
}

/// Pushes `wasm` to `registry/repository:tag` with `wash oci push --insecure`.
pub fn push(wash: &Path, wasm: &Path, reference: &str, home: &Path) -> Result<()> {
    let output = std::process::Command::new(wash)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home)
        .args(["oci", "push", "--insecure", "--non-interactive", reference])
        .arg(wasm)
        .output()
        .context("run wash oci push")?;
    if !output.status.success() {
        bail!(
            "wash oci push {reference} failed ({}): {}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Waits for heartbeats until `want` distinct hosts were seen or `timeout` passes.
pub async fn discover(nats: &mut Nats, want: usize, timeout: Duration) -> Result<Vec<HostInfo>> {
    let sid = nats.subscribe("runtime.operator.heartbeat.>").await?;
    let deadline = Instant::now() + timeout;
    let mut seen: BTreeMap<String, HostInfo> = BTreeMap::new();
    while seen.len() < want {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let Some(message) = nats.next_message(remaining).await? else { break };
        if message.sid != sid {
            continue;
        }
        match serde_json::from_slice::<Value>(&message.payload).ok().as_ref().and_then(HostInfo::from_heartbeat) {
            Some(host) => {
                seen.entry(host.id.clone()).or_insert(host);
            }
            None => tracing::warn!(subject = %message.subject, "ignoring a heartbeat that is not a host's JSON"),
        }
    }
    nats.unsubscribe(sid).await?;
    Ok(seen.into_values().collect())
}

/// Asks host `id` for its heartbeat (`runtime.host.<id>.heartbeat`).
pub async fn host_info(nats: &mut Nats, id: &str) -> Result<HostInfo> {
    let answer = nats
        .request(&format!("runtime.host.{id}.heartbeat"), b"", Duration::from_secs(10))
        .await
        .with_context(|| format!("ask host {id} for its heartbeat"))?;
    let value: Value = serde_json::from_slice(&answer).context("parse the host's heartbeat")?;
    HostInfo::from_heartbeat(&value).with_context(|| format!("host {id} answered without an id: {value}"))
}

/// The workload-start request for one placement.
pub fn start_request(
    workload_id: &str,
    image: &str,
    env: &[(String, String)],
    allowed_hosts: &[String],
    http_host: &str,
) -> Value {
    let environment: serde_json::Map<String, Value> =
        env.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect();
    json!({
        "workloadId": workload_id,
        "workload": {
            "namespace": "snapsign",
            "name": "signer",
            "annotations": {"app.kubernetes.io/managed-by": "snapsign-deploy"},
            "witWorld": {
                "components": [{
                    "name": "signer",
                    "image": image,
                    "localResources": {"environment": environment, "allowedHosts": allowed_hosts},
                }],
                "hostInterfaces": [{
                    "namespace": "wasi",
                    "package": "http",
                    "version": "0.2.0",
                    "interfaces": ["incoming-handler"],
                    "config": {"host": http_host},
                }],
            },
            "volumes": [],
        }
    })
}

/// `(state, message)` of a workload API answer.
fn workload_status(answer: &[u8]) -> Result<(String, String)> {
    let value: Value = serde_json::from_slice(answer)
        .with_context(|| format!("the host's answer is not JSON: {}", String::from_utf8_lossy(answer)))?;
    let status = &value["workloadStatus"];
    let state = status["workloadState"].as_str().with_context(|| format!("no workloadState in {value}"))?;
    Ok((state.to_owned(), status["message"].as_str().unwrap_or_default().to_owned()))
}

/// Pushes the signer and places it on `options.hosts` hosts of the lattice.
pub async fn deploy(options: &DeployOptions, wash: &Path, wasm: &Path, home: &Path) -> Result<Deployment> {
    let config = snapsign::signer::SignerConfig::from_vars(options.env.iter().cloned())
        .context("check the signer configuration before deploying it")?;
    let mut allowed_hosts = vec![config.store_authority()];
    allowed_hosts.extend(options.extra_allowed_hosts.iter().cloned());
    if options.hosts == 0 {
        bail!("--hosts must be at least 1");
    }

    // A tag per content: hosts that cached an older build pull the new one.
    let bytes = std::fs::read(wasm).with_context(|| format!("read {}", wasm.display()))?;
    let tag = {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(&bytes)[..8])
    };
    let image = format!("{}/{}:{tag}", options.registry, options.repository);
    push(wash, wasm, &image, home)?;

    let mut nats = Nats::connect(&options.nats_url).await?;
    let hosts = if options.host_ids.is_empty() {
        let found = discover(&mut nats, options.hosts, options.discover_timeout).await?;
        if found.len() < options.hosts {
            bail!(
                "{} of {} wanted hosts sent a heartbeat on {} within {:?} ({}); start more `wash host`s on that NATS \
                 or lower --hosts",
                found.len(),
                options.hosts,
                options.nats_url,
                options.discover_timeout,
                found.iter().map(|h| format!("{} {}", h.hostname, h.id)).collect::<Vec<_>>().join(", ")
            );
        }
        found
    } else {
        let mut hosts = Vec::new();
        for id in &options.host_ids {
            hosts.push(host_info(&mut nats, id).await?);
        }
        hosts
    };

    // Replace earlier copies (the API refuses a live workload id), then start
    // every copy at once: each host pulls and compiles in parallel.
    let hosts: Vec<HostInfo> = hosts.into_iter().take(options.hosts).collect();
    let workload_ids: Vec<String> = (1..=hosts.len()).map(|n| format!("{}-{n}", options.workload_prefix)).collect();
    let api = |host: &HostInfo, verb: &str| format!("runtime.host.{}.workload.{verb}", host.id);
    let stops: Vec<(String, Vec<u8>)> = hosts
        .iter()
        .zip(&workload_ids)
        .map(|(host, id)| (api(host, "stop"), json!({"workloadId": id}).to_string().into_bytes()))
        .collect();
    for (answer, (host, id)) in
        nats.request_all(&stops, Duration::from_secs(30)).await?.iter().zip(hosts.iter().zip(&workload_ids))
    {
        let (state, message) = workload_status(answer)?;
        tracing::info!(host = %host.id, workload_id = %id, %state, %message, "stopped any earlier copy");
    }
    let starts: Vec<(String, Vec<u8>)> = hosts
        .iter()
        .zip(&workload_ids)
        .map(|(host, id)| {
            let request = start_request(id, &image, &options.env, &allowed_hosts, &options.http_host);
            (api(host, "start"), request.to_string().into_bytes())
        })
        .collect();
    let answers = nats.request_all(&starts, START_TIMEOUT).await.context("start the signer on the hosts")?;
    let mut placements = Vec::new();
    for (answer, (host, workload_id)) in answers.iter().zip(hosts.into_iter().zip(workload_ids)) {
        let (state, message) = workload_status(answer)?;
        if state != "WORKLOAD_STATE_RUNNING" {
            bail!("host {} ({}) did not start {workload_id}: {state}: {message}", host.hostname, host.id);
        }
        placements.push(Placement { host, workload_id, state, message });
    }
    Ok(Deployment { image, http_host: options.http_host.clone(), allowed_hosts, placements })
}

impl std::fmt::Display for Deployment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "signer {} placed on {} host(s)", self.image, self.placements.len())?;
        writeln!(f, "  route: Host: {}   outbound allowed to: {}", self.http_host, self.allowed_hosts.join(", "))?;
        for p in &self.placements {
            let port = p.host.http_port.map_or("-".to_owned(), |p| p.to_string());
            writeln!(
                f,
                "  {:<20} host {:<12} {} (wash {})  http port {port}  {}",
                p.workload_id, p.host.hostname, p.host.id, p.host.version, p.state
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_request_carries_config_allowed_hosts_and_route() {
        let env = vec![("SNAPSIGN_BUCKET".to_owned(), "snaps".to_owned())];
        let request = start_request("w-1", "127.0.0.1:5000/s:abc", &env, &["127.0.0.1:9000".into()], "signer.local");
        let component = &request["workload"]["witWorld"]["components"][0];
        assert_eq!(component["image"], "127.0.0.1:5000/s:abc");
        assert_eq!(component["localResources"]["environment"]["SNAPSIGN_BUCKET"], "snaps");
        assert_eq!(component["localResources"]["allowedHosts"], json!(["127.0.0.1:9000"]));
        let http = &request["workload"]["witWorld"]["hostInterfaces"][0];
        assert_eq!((http["package"].as_str(), http["config"]["host"].as_str()), (Some("http"), Some("signer.local")));
    }

    #[test]
    fn workload_status_reads_state_and_message() {
        let answer =
            br#"{"workloadStatus":{"workloadId":"w","workloadState":"WORKLOAD_STATE_ERROR","message":"boom"}}"#;
        assert_eq!(workload_status(answer).unwrap(), ("WORKLOAD_STATE_ERROR".into(), "boom".into()));
        assert!(workload_status(b"nope").is_err());
    }
}
