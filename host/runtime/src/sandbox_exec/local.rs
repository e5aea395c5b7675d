//! The `local` sandbox backend: sandboxes on this machine (namespaces,
//! limits from the create call), the same code the dev stack's proxy serves.
//! Sandboxes are running as soon as they exist; the sign call goes straight
//! to a signer. Every call renews a sandbox's timeout, and so does a running
//! `run` every [`RENEW_INTERVAL`] (the proxy backend's health pings).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::StreamExt;
use snapsign_sandbox::Sandboxes;

use super::backend::{
    Created, Endpoint, Exit, FileSink, LineSink, Process, Resources, SandboxBackend, SandboxError, too_large,
};

/// How often a `run` in progress renews its sandbox's timeout.
pub const RENEW_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);

/// Local sandboxes plus the signer the component's sign calls go to.
pub struct LocalBackend {
    sandboxes: Arc<Sandboxes>,
    signer_url: String,
    signer_token: String,
    next: AtomicU64,
}

impl LocalBackend {
    /// Sandboxes from `sandboxes`; sign calls to `signer_url` with `signer_token`.
    pub fn new(sandboxes: Arc<Sandboxes>, signer_url: &str, signer_token: &str) -> Self {
        LocalBackend {
            sandboxes,
            signer_url: signer_url.trim_end_matches('/').to_owned(),
            signer_token: signer_token.to_owned(),
            next: AtomicU64::new(1),
        }
    }

    fn sandbox(&self, id: &str) -> Result<Arc<snapsign_sandbox::Sandbox>, SandboxError> {
        let sandbox = self.sandboxes.get(id).ok_or_else(|| SandboxError::Gone(format!("no local sandbox {id}")))?;
        sandbox.renew();
        Ok(sandbox)
    }
}

fn failed(e: anyhow::Error) -> SandboxError {
    SandboxError::Failed(format!("{e:#}"))
}

#[async_trait::async_trait]
impl SandboxBackend for LocalBackend {
    async fn create(&self, _image: &str, resources: Resources, timeout_secs: i64) -> Result<Created, SandboxError> {
        let id = format!("local-{}-{}", std::process::id(), self.next.fetch_add(1, Ordering::SeqCst));
        let request = snapsign_sandbox::CreateRequest {
            resources: Some(snapsign_sandbox::Resources {
                cpus: Some(resources.cpus),
                memory_mb: Some(resources.memory_mb),
                disk_mb: Some(resources.disk_mb),
            }),
            timeout_secs: (timeout_secs > 0).then_some(timeout_secs),
            network: None,
        };
        let spec = self.sandboxes.spec_for(&request).map_err(failed)?;
        self.sandboxes.create_with(&id, spec).map_err(failed)?;
        Ok(Created { id, status: "running".into() })
    }

    async fn status(&self, id: &str) -> Result<String, SandboxError> {
        self.sandbox(id).map(|_| "running".into())
    }

    fn on_this_machine(&self, _id: &str) -> bool {
        true
    }

    fn proxy(&self, id: &str) -> Result<Endpoint, SandboxError> {
        self.sandbox(id)?;
        Ok(Endpoint {
            base_url: self.signer_url.clone(),
            headers: vec![("authorization".into(), format!("Bearer {}", self.signer_token))],
        })
    }

    async fn run(&self, id: &str, spec: Process, sink: &mut LineSink<'_>) -> Result<Exit, SandboxError> {
        let sandbox = self.sandbox(id)?;
        let process = snapsign_sandbox::ProcessSpec {
            command: spec.command,
            args: spec.args,
            env: spec.env.into_iter().collect::<BTreeMap<_, _>>(),
            working_dir: spec.working_dir,
            user: spec.as_root.then(|| "root".to_owned()),
        };
        let info = sandbox.start(process).map_err(failed)?;
        if let Some(mut output) = sandbox.follow(info.pid) {
            let mut renew = tokio::time::interval(RENEW_INTERVAL);
            loop {
                tokio::select! {
                    event = output.next() => match event {
                        Some(event) => sink(&event.stream, &event.line),
                        None => break,
                    },
                    _ = renew.tick() => sandbox.renew(),
                }
            }
        }
        let done =
            sandbox.wait(info.pid).await.ok_or_else(|| SandboxError::Gone(format!("process {} vanished", info.pid)))?;
        let code = done.exit_code.or(done.signal.map(|s| -s)).unwrap_or(-9);
        Ok(Exit { code, oom_killed: done.oom_killed, last_error: None })
    }

    async fn write_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError> {
        self.sandbox(id)?.write_file(path, &contents[..]).await.map(drop).map_err(failed)
    }

    async fn open_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError> {
        let sandbox = self.sandbox(id)?;
        let (tx, stream) = FileSink::channel();
        let reader = tokio_util::io::StreamReader::new(Box::pin(stream));
        let path = path.to_owned();
        let done = tokio::spawn(async move { sandbox.write_file(&path, reader).await.map(drop).map_err(failed) });
        Ok(FileSink::new(tx, done))
    }

    async fn read_file(&self, id: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SandboxError> {
        let file = self.sandbox(id)?.read_file(path).await.map_err(failed)?;
        let mut bytes = Vec::new();
        // One byte past the limit tells a file at the limit from a larger one.
        let mut limited = tokio::io::AsyncReadExt::take(file, max_bytes.saturating_add(1));
        tokio::io::AsyncReadExt::read_to_end(&mut limited, &mut bytes)
            .await
            .map_err(|e| SandboxError::Failed(format!("read {path} in sandbox {id}: {e}")))?;
        if bytes.len() as u64 > max_bytes {
            return Err(too_large(id, path, max_bytes));
        }
        Ok(bytes)
    }

    async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        self.sandboxes.delete(id).await.map(drop).map_err(failed)
    }
}
