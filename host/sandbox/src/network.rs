//! A sandbox's network: a network namespace of its own with only `lo`, into
//! which the host forwards the loopback ports the policy allows. For each
//! allowed port the host opens a listener on `127.0.0.1:port` *inside* the
//! sandbox's namespace (from a short-lived thread that entered it with
//! setns) and relays each connection to `127.0.0.1:port` of the host. So a
//! sandbox reaches exactly those host ports and nothing else: not another
//! sandbox (each has its own `lo`), not the host's other ports, not any
//! other address (there is no route).
//!
//! The policy is the create request's `network` (wit/protocol.md §3.3):
//! `allow_out` entries `127.0.0.1:PORT` or `localhost:PORT` add a forwarded
//! port, `deny_out` entries of the same form remove one (deny wins), and
//! `allow_internet_access: true` puts the sandbox in the host's network
//! namespace instead (no isolation; the operator asked for it).

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use serde::Deserialize;

/// The create request's `network` object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct NetworkPolicy {
    /// Full outbound access: the host's network namespace.
    #[serde(default)]
    pub allow_internet_access: bool,
    /// Destinations allowed: here only `127.0.0.1:PORT` / `localhost:PORT`.
    #[serde(default)]
    pub allow_out: Vec<String>,
    /// Destinations denied: removes allowed loopback ports.
    #[serde(default)]
    pub deny_out: Vec<String>,
}

/// What a sandbox's network is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Network {
    /// Its own namespace with `lo`, and these host loopback ports forwarded in.
    Private {
        /// Sorted, without duplicates.
        ports: Vec<u16>,
    },
    /// The host's network namespace (`allow_internet_access: true`).
    Host,
}

impl Default for Network {
    fn default() -> Self {
        Network::Private { ports: Vec::new() }
    }
}

/// The port of `127.0.0.1:PORT` or `localhost:PORT`; `None` for anything else.
pub fn loopback_port(entry: &str) -> Option<u16> {
    let (host, port) = entry.trim().rsplit_once(':')?;
    matches!(host, "127.0.0.1" | "localhost").then(|| port.parse().ok()).flatten().filter(|p| *p != 0)
}

impl Network {
    /// The network of a sandbox whose create request said `policy`, on a
    /// host that grants `granted` ports to every sandbox (the store, the
    /// sandbox proxy). Refuses what cannot be honoured locally.
    pub fn from_policy(policy: &NetworkPolicy, granted: &[u16]) -> Result<Network> {
        if policy.allow_internet_access {
            if !policy.deny_out.is_empty() {
                bail!(
                    "network.deny_out {:?} cannot be enforced with allow_internet_access: local sandboxes with \
                     internet access share the host's network; drop deny_out or allow_internet_access",
                    policy.deny_out
                );
            }
            return Ok(Network::Host);
        }
        let mut ports: Vec<u16> = granted.to_vec();
        for entry in &policy.allow_out {
            match loopback_port(entry) {
                Some(port) => ports.push(port),
                None => bail!(
                    "network.allow_out entry '{entry}' is not 127.0.0.1:PORT or localhost:PORT; local sandboxes \
                     reach only forwarded loopback ports (or set allow_internet_access)"
                ),
            }
        }
        for entry in &policy.deny_out {
            // Nothing but the forwarded ports is reachable: any other destination is denied already.
            if let Some(port) = loopback_port(entry) {
                ports.retain(|p| *p != port);
            }
        }
        ports.sort_unstable();
        ports.dedup();
        Ok(Network::Private { ports })
    }
}

/// The forwarders of one sandbox; stopped when dropped.
pub(crate) struct Forwarders {
    stop: tokio::sync::watch::Sender<bool>,
}

impl Drop for Forwarders {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Opens `127.0.0.1:port` in the network namespace `netns` for each port
/// and relays connections to the host's `127.0.0.1:port`. Needs a Tokio runtime.
/// Rootless, `outer` is the sandbox's outer user namespace: a helper process
/// joins it to open the listeners.
pub(crate) fn forward(id: &str, netns: &Arc<OwnedFd>, outer: Option<&OwnedFd>, ports: &[u16]) -> Result<Forwarders> {
    let (stop, _) = tokio::sync::watch::channel(false);
    let forwarders = Forwarders { stop };
    if ports.is_empty() {
        return Ok(forwarders);
    }
    let runtime = tokio::runtime::Handle::try_current().with_context(|| {
        format!("sandbox {id}: forwarding ports needs a Tokio runtime; create sandboxes inside one")
    })?;
    let listeners = match outer {
        Some(outer) => crate::namespaces::listen_in(outer, netns, ports),
        None => listen_inside(netns.clone(), ports.to_vec()),
    }
    .with_context(|| format!("sandbox {id}: open the forwarded ports {ports:?} inside its network namespace"))?;
    for (port, listener) in ports.iter().copied().zip(listeners) {
        let _guard = runtime.enter();
        let listener = tokio::net::TcpListener::from_std(listener)
            .with_context(|| format!("sandbox {id}: register forwarded port {port}"))?;
        let mut stopped = forwarders.stop.subscribe();
        let id = id.to_owned();
        runtime.spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    _ = stopped.changed() => return,
                };
                match accepted {
                    Ok((inside, _)) => {
                        let stopped = stopped.clone();
                        tokio::spawn(relay(inside, port, stopped));
                    }
                    Err(e) => {
                        tracing::warn!(sandbox = %id, port, "accepting on a forwarded port failed: {e}");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    }
                }
            }
        });
    }
    Ok(forwarders)
}

/// Bytes each direction of a relayed connection moves per read (the default 8 KiB halves an upload's speed).
const RELAY_BUFFER: usize = 256 << 10;

async fn relay(mut inside: tokio::net::TcpStream, port: u16, mut stopped: tokio::sync::watch::Receiver<bool>) {
    // Connected from this (host) thread's network namespace: the host's 127.0.0.1.
    let Ok(mut host) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return };
    let _ = inside.set_nodelay(true);
    let _ = host.set_nodelay(true);
    tokio::select! {
        _ = tokio::io::copy_bidirectional_with_sizes(&mut inside, &mut host, RELAY_BUFFER, RELAY_BUFFER) => {}
        _ = stopped.changed() => {}
    }
}

/// Binds the listeners from a thread that entered `netns` (setns changes
/// only the calling thread, and a socket keeps the namespace it was made in).
fn listen_inside(netns: Arc<OwnedFd>, ports: Vec<u16>) -> Result<Vec<std::net::TcpListener>> {
    std::thread::spawn(move || -> Result<Vec<std::net::TcpListener>> {
        // SAFETY: setns on a namespace descriptor we hold, for this thread only.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("enter the network namespace");
        }
        ports
            .iter()
            .map(|port| {
                let listener = std::net::TcpListener::bind(("127.0.0.1", *port))
                    .with_context(|| format!("listen on 127.0.0.1:{port}"))?;
                listener.set_nonblocking(true).context("make the listener non-blocking")?;
                Ok(listener)
            })
            .collect()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread opening forwarded ports panicked"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        NetworkPolicy {
            allow_internet_access: false,
            allow_out: allow.iter().map(|s| s.to_string()).collect(),
            deny_out: deny.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn loopback_ports_are_forwarded_and_deny_wins() {
        let net =
            Network::from_policy(&policy(&["127.0.0.1:8080", "localhost:9000"], &["127.0.0.1:5000"]), &[5000, 80]);
        assert_eq!(net.unwrap(), Network::Private { ports: vec![80, 8080, 9000] });
        assert_eq!(Network::from_policy(&NetworkPolicy::default(), &[]).unwrap(), Network::default());
        let denied = Network::from_policy(&policy(&[], &["10.0.0.0/8", "localhost:80"]), &[80, 81]).unwrap();
        assert_eq!(denied, Network::Private { ports: vec![81] });
    }

    #[test]
    fn refuses_what_a_local_sandbox_cannot_honour() {
        for bad in ["10.0.0.1:80", "example.com:443", "127.0.0.1", "127.0.0.1:0", "0.0.0.0/0"] {
            let err = Network::from_policy(&policy(&[bad], &[]), &[]).unwrap_err().to_string();
            assert!(err.contains(bad) && err.contains("allow_out"), "{bad}: {err}");
        }
        let internet = NetworkPolicy { allow_internet_access: true, ..policy(&[], &["10.0.0.1"]) };
        assert!(Network::from_policy(&internet, &[]).unwrap_err().to_string().contains("deny_out"));
        let internet = NetworkPolicy { allow_internet_access: true, ..NetworkPolicy::default() };
        assert_eq!(Network::from_policy(&internet, &[1]).unwrap(), Network::Host);
    }

    #[test]
    fn reads_the_protocol_object() {
        let policy: NetworkPolicy =
            serde_json::from_str(r#"{"allow_internet_access":false,"allow_out":["127.0.0.1:9"]}"#).unwrap();
        assert_eq!(policy.allow_out, ["127.0.0.1:9"]);
        assert!(policy.deny_out.is_empty());
    }
}
