//! The sandbox backend trait behind `sandbox-exec`: sandbox mechanics, no
//! policy. The `proxy` backend speaks to a remote platform.

use std::future::Future;

pub use super::bindings::snapsign::components::types::{
    ExitStatus, ProcessSpec, ProxyEndpoint, Resources, SandboxError,
};

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

/// Sandbox mechanics one backend provides.
pub trait SandboxBackend: Send + Sync + 'static {
    /// Creates a sandbox; returns its id and status.
    fn create(
        &self,
        image: &str,
        resources: Resources,
        timeout_secs: i64,
    ) -> impl Future<Output = Result<(String, String), SandboxError>> + Send;
    /// Lifecycle status.
    fn status(&self, id: &str) -> impl Future<Output = Result<String, SandboxError>> + Send;
    /// Proxy endpoint for the component's own calls.
    fn proxy(&self, id: &str) -> Result<ProxyEndpoint, SandboxError>;
    /// Runs a process to completion, feeding its output to `sink`.
    fn run(
        &self,
        id: &str,
        spec: ProcessSpec,
        sink: &mut LineSink<'_>,
    ) -> impl Future<Output = Result<ExitStatus, SandboxError>> + Send;
    /// Writes a whole file.
    fn write_file(
        &self,
        id: &str,
        path: &str,
        contents: Vec<u8>,
    ) -> impl Future<Output = Result<(), SandboxError>> + Send;
    /// Starts streaming a file.
    fn open_file(&self, id: &str, path: &str) -> impl Future<Output = Result<FileSink, SandboxError>> + Send;
    /// Reads a file.
    fn read_file(&self, id: &str, path: &str) -> impl Future<Output = Result<Vec<u8>, SandboxError>> + Send;
    /// Deletes a sandbox.
    fn delete(&self, id: &str) -> impl Future<Output = Result<(), SandboxError>> + Send;
}
