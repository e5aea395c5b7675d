//! The sandbox backend trait behind `sandbox-exec`: sandbox mechanics, no
//! policy, in this crate's own types (the generated WIT types stay inside
//! the capability). Backends: [`super::proxy`] (a remote platform),
//! [`super::local`] (sandboxes on this machine), `fake` (unit tests only).

use async_trait::async_trait;

/// The build flow's own types, the same ones it reads on the guest side
/// (one vocabulary from the flow to the backends): why a sandbox operation
/// failed (the component decides about retries, wit/protocol.md §5.1), how
/// a process ended, what to run, the resources asked for, and where a
/// sandbox's proxy answers (its `Debug` keeps the header values out).
pub use snapsign::image_build::call::{Endpoint, Exit, Process, SandboxError};
pub use snapsign::image_build::sizing::Resources;

/// A created sandbox: its id and lifecycle status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// The id the platform gave it.
    pub id: String,
    /// Lifecycle status ("pending", "running", ...).
    pub status: String,
}

/// Receives a process's output lines: (stream, line).
pub type LineSink<'a> = dyn FnMut(&str, &str) + Send + 'a;

/// A file being streamed into a sandbox.
pub struct FileSink {
    tx: Option<tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>>,
    done: tokio::task::JoinHandle<Result<(), SandboxError>>,
    written: u64,
}

impl FileSink {
    /// A sink feeding `tx`; `done` resolves with the upload's outcome.
    pub fn new(
        tx: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        done: tokio::task::JoinHandle<Result<(), SandboxError>>,
    ) -> Self {
        FileSink { tx: Some(tx), done, written: 0 }
    }

    /// A channel and the byte stream it feeds, for a backend's upload task.
    pub fn channel() -> (
        tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
        impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static,
    ) {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
        (tx, stream)
    }

    /// Appends a chunk.
    pub async fn write(&mut self, chunk: Vec<u8>) -> Result<(), SandboxError> {
        let len = chunk.len() as u64;
        let tx = self.tx.as_ref().ok_or_else(|| SandboxError::Failed("file already finished".into()))?;
        if tx.send(Ok(chunk.into())).await.is_err() {
            return Err(SandboxError::Failed("the upload ended early (the sandbox refused the file)".into()));
        }
        self.written += len;
        Ok(())
    }

    /// Ends the file and waits for the sandbox to accept it.
    pub async fn finish(&mut self) -> Result<u64, SandboxError> {
        self.tx.take();
        (&mut self.done).await.map_err(|e| SandboxError::Failed(format!("upload task: {e}")))??;
        Ok(self.written)
    }
}

impl Drop for FileSink {
    fn drop(&mut self) {
        // A writer the guest dropped unfinished: stop its upload.
        if self.tx.is_some() {
            self.done.abort();
        }
    }
}

/// Sandbox mechanics one backend provides.
#[async_trait]
pub trait SandboxBackend: Send + Sync + 'static {
    /// Creates a sandbox.
    async fn create(&self, image: &str, resources: Resources, timeout_secs: i64) -> Result<Created, SandboxError>;
    /// Lifecycle status.
    async fn status(&self, id: &str) -> Result<String, SandboxError>;
    /// Proxy endpoint for the component's own calls.
    fn proxy(&self, id: &str) -> Result<Endpoint, SandboxError>;
    /// Whether the sandbox runs on this machine, so that what is sent to it
    /// crosses no network (`upload-directory` then skips compression). By
    /// default: its proxy, where files go, answers on a loopback address (a
    /// tunnel to another machine on a loopback port looks local: the
    /// embedder says `Compression::Always` there). Only a speed choice: a
    /// wrong answer sends the same files, gzipped or not.
    fn on_this_machine(&self, id: &str) -> bool {
        match self.proxy(id) {
            Ok(endpoint) => is_loopback_url(&endpoint.base_url),
            Err(e) => {
                tracing::debug!(sandbox = id, error = %e, "no proxy endpoint to tell where the sandbox runs: gzip");
                false
            }
        }
    }
    /// Runs a process to completion, feeding its output to `sink`.
    async fn run(&self, id: &str, spec: Process, sink: &mut LineSink<'_>) -> Result<Exit, SandboxError>;
    /// Writes a whole file.
    async fn write_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError>;
    /// Starts streaming a file.
    async fn open_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError>;
    /// Reads a file of at most `max_bytes` (a larger one is an error naming the limit).
    async fn read_file(&self, id: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SandboxError>;
    /// Deletes a sandbox.
    async fn delete(&self, id: &str) -> Result<(), SandboxError>;
}

/// Whether `url`'s host is `localhost` or a loopback address (IPv4-mapped
/// IPv6 included); anything unparsable is not.
pub fn is_loopback_url(url: &str) -> bool {
    let Ok(url) = url::Url::parse(url) else { return false };
    match url.host() {
        Some(url::Host::Domain(name)) => name.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|ip| ip.is_loopback()),
        None => false,
    }
}

/// The error for a file larger than the read limit.
pub fn too_large(id: &str, path: &str, max_bytes: u64) -> SandboxError {
    SandboxError::Failed(format!(
        "file {path} in sandbox {id} is larger than the {max_bytes}-byte read limit of sandbox-exec"
    ))
}

#[cfg(test)]
mod tests {
    use super::is_loopback_url;

    #[test]
    fn loopback_urls_are_told_from_remote_ones() {
        for near in [
            "http://127.0.0.1:9443",
            "http://127.8.0.1/x",
            "http://localhost:1",
            "http://LOCALHOST",
            "http://localhost./",
            "http://[::1]:80/",
            "http://[::ffff:127.0.0.1]:9443",
            "http://user@localhost:1",
        ] {
            assert!(is_loopback_url(near), "{near}");
        }
        for far in [
            "https://sandbox.tensorlake.ai",
            "http://10.0.0.1:9443",
            "http://localhost.evil.example",
            "http://127.0.0.1@evil.example/",
            "http://[::2]/",
            "http://[::ffff:10.0.0.1]/",
            "not a url",
            "",
        ] {
            assert!(!is_loopback_url(far), "{far}");
        }
    }
}
