//! The generated `Host` traits, implemented on [`SandboxExecView`]: checks
//! and limits here, mechanics in the backend.

use std::future::Future;
use std::time::{Duration, Instant};

use wasmtime::component::Resource;

use super::backend::{self, FileSink};
use super::bindings::snapsign::components::{sandbox_exec, types};
use super::ctx::{Cancel, SandboxExecView};

impl From<backend::SandboxError> for types::SandboxError {
    fn from(e: backend::SandboxError) -> Self {
        match e {
            backend::SandboxError::Transient(m) => types::SandboxError::Transient(m),
            backend::SandboxError::Gone(m) => types::SandboxError::Gone(m),
            backend::SandboxError::Denied(m) => types::SandboxError::Denied(m),
            backend::SandboxError::Failed(m) => types::SandboxError::Failed(m),
            backend::SandboxError::Cancelled(m) => types::SandboxError::Cancelled(m),
        }
    }
}

fn spec(spec: types::ProcessSpec) -> backend::Process {
    backend::Process {
        command: spec.command,
        args: spec.args,
        env: spec.env,
        working_dir: spec.working_dir,
        as_root: spec.as_root,
    }
}

fn exit(status: backend::Exit) -> types::ExitStatus {
    types::ExitStatus { code: status.code, oom_killed: status.oom_killed, last_error: status.last_error }
}

/// The longest stderr line kept as an exit's `last-error`.
const MAX_LAST_ERROR: usize = 4 << 10;

/// `line` cut to [`MAX_LAST_ERROR`] bytes, on a character boundary.
fn cut(line: &str) -> String {
    let mut end = line.len().min(MAX_LAST_ERROR);
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    line[..end].to_owned()
}

fn failed(message: String) -> types::SandboxError {
    types::SandboxError::Failed(message)
}

/// `work`, unless the build is cancelled before or while it runs: then
/// `cancelled` naming `what` (wit/protocol.md §5.10). The work is dropped
/// where it stands; deleting the sandbox ends whatever it started there.
async fn stoppable<T, E: Into<types::SandboxError>>(
    cancel: &Cancel,
    what: impl FnOnce() -> String,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, types::SandboxError> {
    if cancel.is_cancelled() {
        return Err(types::SandboxError::Cancelled(format!("{} was not started", what())));
    }
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(types::SandboxError::Cancelled(format!("{} was stopped", what()))),
        done = work => done.map_err(Into::into),
    }
}

impl SandboxExecView<'_> {
    /// Only sandboxes this guest created are reachable (the token may reach more).
    fn own(&self, id: &str) -> Result<(), types::SandboxError> {
        if self.ctx.sandboxes.contains(id) {
            Ok(())
        } else {
            Err(failed(format!(
                "sandbox {id} was not created through this sandbox-exec; only sandboxes the build created are reachable"
            )))
        }
    }
}

impl types::Host for SandboxExecView<'_> {}

impl sandbox_exec::Host for SandboxExecView<'_> {
    async fn create(
        &mut self,
        image: String,
        resources: types::Resources,
        timeout_secs: i64,
    ) -> Result<types::Sandbox, types::SandboxError> {
        let max = self.ctx.limits.max_sandboxes;
        if self.ctx.sandboxes.len() >= max {
            return Err(failed(format!(
                "sandbox-exec allows {max} live sandboxes per guest; delete one ({}) before creating another",
                self.ctx.live_sandboxes().join(", ")
            )));
        }
        if self.ctx.cancel.is_cancelled() {
            return Err(types::SandboxError::Cancelled(format!("creating a sandbox from {image} was not started")));
        }
        let resources =
            backend::Resources { cpus: resources.cpus, memory_mb: resources.memory_mb, disk_mb: resources.disk_mb };
        // Not stopped once under way: a sandbox it makes must be known, to be deleted.
        let created = self.ctx.backend.create(&image, resources, timeout_secs).await?;
        tracing::info!(sandbox = %created.id, "builder sandbox created");
        self.ctx.sandboxes.insert(created.id.clone());
        self.ctx.cancel.hold(&created.id, true);
        Ok(types::Sandbox { id: created.id, status: created.status })
    }

    async fn status(&mut self, id: String) -> Result<String, types::SandboxError> {
        self.own(&id)?;
        stoppable(&self.ctx.cancel, || format!("the status of sandbox {id}"), self.ctx.backend.status(&id)).await
    }

    async fn proxy(&mut self, id: String) -> Result<types::ProxyEndpoint, types::SandboxError> {
        self.own(&id)?;
        let endpoint =
            stoppable(&self.ctx.cancel, || format!("the proxy of sandbox {id}"), async { self.ctx.backend.proxy(&id) })
                .await?;
        // The guest calls this endpoint over wasi:http: it must already be
        // admitted by the policy the embedder set; nothing here widens it.
        let url = url::Url::parse(&endpoint.base_url)
            .map_err(|e| failed(format!("the proxy URL of sandbox {id} ({}) is not a URL: {e}", endpoint.base_url)))?;
        let authority = match (url.host_str(), url.port()) {
            (Some(host), Some(port)) => format!("{host}:{port}"),
            (Some(host), None) => host.to_owned(),
            (None, _) => return Err(failed(format!("the proxy URL of sandbox {id} ({url}) names no host"))),
        };
        if !self.ctx.outbound.permits(&authority, url.scheme() == "https") {
            return Err(failed(format!(
                "the proxy of sandbox {id} is at {authority}, which this build's outbound allow-list does not \
                 admit; add it when the build starts (`--allow-host {authority}`) if you trust it"
            )));
        }
        // Sign answers from there may admit their upload's abort URL (crate::outbound).
        self.ctx.outbound.note_sign_endpoint(&endpoint.base_url);
        Ok(types::ProxyEndpoint { base_url: endpoint.base_url, headers: endpoint.headers })
    }

    async fn run(
        &mut self,
        id: String,
        process: types::ProcessSpec,
        log_output: bool,
    ) -> Result<types::ExitStatus, types::SandboxError> {
        self.own(&id)?;
        let on_output = if log_output { self.ctx.on_output.clone() } else { None };
        let mut last_error = None;
        let mut sink = |stream: &str, line: &str| {
            if let Some(on_output) = &on_output {
                on_output(stream, line);
                if stream == "stderr" && !line.trim().is_empty() {
                    last_error = Some(cut(line));
                }
            }
        };
        let started = Instant::now();
        let what = || format!("{} in sandbox {id}", process.command);
        let work = self.ctx.backend.run(&id, spec(process.clone()), &mut sink);
        let result = stoppable(&self.ctx.cancel, what, work).await;
        if log_output {
            self.ctx.logged_run_time += started.elapsed();
        }
        Ok(exit(backend::Exit { last_error, ..result? }))
    }

    async fn run_captured(
        &mut self,
        id: String,
        process: types::ProcessSpec,
        timeout_secs: u32,
    ) -> Result<(types::ExitStatus, Vec<String>), types::SandboxError> {
        self.own(&id)?;
        let max = self.ctx.limits.max_captured_bytes;
        let (mut lines, mut kept, mut cut) = (Vec::new(), 0usize, false);
        let mut sink = |stream: &str, line: &str| {
            if stream == "stderr" || cut {
                return;
            }
            if kept + line.len() > max {
                cut = true;
                lines.push(format!("[output cut at {max} bytes by sandbox-exec]"));
                return;
            }
            kept += line.len();
            lines.push(line.to_owned());
        };
        let limit = Duration::from_secs(u64::from(timeout_secs.max(1)));
        let what = || format!("{} in sandbox {id}", process.command);
        let work = tokio::time::timeout(limit, self.ctx.backend.run(&id, spec(process.clone()), &mut sink));
        let status = stoppable(&self.ctx.cancel, what, async {
            let ran = work.await.map_err(|_| failed(format!("diagnostic process did not finish within {limit:?}")))?;
            ran.map_err(types::SandboxError::from)
        })
        .await?;
        Ok((exit(status), lines))
    }

    async fn write_file(&mut self, id: String, path: String, contents: Vec<u8>) -> Result<(), types::SandboxError> {
        self.own(&id)?;
        let max = self.ctx.limits.max_write_bytes;
        if contents.len() > max {
            return Err(failed(format!(
                "write-file of {path} is {} bytes, over sandbox-exec's {max}-byte limit; stream it with open-file-writer",
                contents.len()
            )));
        }
        let work = self.ctx.backend.write_file(&id, &path, contents);
        stoppable(&self.ctx.cancel, || format!("writing {path} in sandbox {id}"), work).await
    }

    async fn open_file_writer(&mut self, id: String, path: String) -> Result<Resource<FileSink>, types::SandboxError> {
        self.own(&id)?;
        let max = self.ctx.limits.max_open_writers;
        if self.ctx.open_writers >= max {
            return Err(failed(format!(
                "sandbox-exec allows {max} open file writers; finish and drop one before opening {path}"
            )));
        }
        let opening = self.ctx.backend.open_file(&id, &path);
        let sink = stoppable(&self.ctx.cancel, || format!("opening {path} in sandbox {id}"), opening).await?;
        let writer = self.table.push(sink).map_err(|e| failed(format!("file writer for {path}: {e}")))?;
        self.ctx.open_writers += 1;
        Ok(writer)
    }

    async fn upload_directory(
        &mut self,
        id: String,
        dir: String,
        exclude: Vec<String>,
        path: String,
    ) -> Result<sandbox_exec::UploadedArchive, types::SandboxError> {
        self.own(&id)?;
        let wanted = dir.trim_end_matches('/');
        let Some((_, host_dir)) = self.ctx.directories.iter().find(|(guest, _)| guest == wanted) else {
            let lent: Vec<&str> = self.ctx.directories.iter().map(|(guest, _)| guest.as_str()).collect();
            return Err(failed(format!(
                "upload-directory of {dir}: only a directory the host lent this component can be packed ({})",
                if lent.is_empty() { "none was".to_owned() } else { lent.join(", ") }
            )));
        };
        let exclude = crate::pack::Patterns::new(&exclude)
            .map_err(|e| failed(format!("upload-directory of {dir}: the exclusions: {e}")))?;
        let (cancel, progress) = (self.ctx.cancel.clone(), self.ctx.on_progress.clone());
        let host_dir = host_dir.clone();
        let backend = self.ctx.backend.clone();
        let encoding = self.ctx.compression.encoding(backend.on_this_machine(&id));
        let work = async {
            let sink = backend.open_file(&id, &path).await?;
            super::upload::directory(host_dir, exclude, encoding, sink, progress).await.map_err(|e| match e {
                super::upload::Failed::Pack(e) => failed(format!("pack {dir} for sandbox {id}: {e}")),
                super::upload::Failed::Sandbox(e) => e.into(),
            })
        };
        let bytes = stoppable(&cancel, || format!("the upload of {dir} to sandbox {id}"), work).await?;
        Ok(sandbox_exec::UploadedArchive { bytes, gzip: encoding == crate::pack::Encoding::Gzip })
    }

    async fn read_file(&mut self, id: String, path: String) -> Result<Vec<u8>, types::SandboxError> {
        self.own(&id)?;
        let work = self.ctx.backend.read_file(&id, &path, self.ctx.limits.max_read_bytes);
        stoppable(&self.ctx.cancel, || format!("reading {path} in sandbox {id}"), work).await
    }

    async fn delete(&mut self, id: String) -> Result<(), types::SandboxError> {
        self.own(&id)?;
        // Never stopped: a cancelled build's cleanup is this call.
        match self.ctx.backend.delete(&id).await {
            Ok(()) => {
                self.ctx.sandboxes.remove(&id);
                self.ctx.cancel.hold(&id, false);
                Ok(())
            }
            Err(backend::SandboxError::Gone(m)) => {
                self.ctx.sandboxes.remove(&id);
                self.ctx.cancel.hold(&id, false);
                Err(types::SandboxError::Gone(m))
            }
            Err(e) => Err(e.into()),
        }
    }
}

impl sandbox_exec::HostFileWriter for SandboxExecView<'_> {
    async fn write(&mut self, writer: Resource<FileSink>, chunk: Vec<u8>) -> Result<(), types::SandboxError> {
        let sink = self.table.get_mut(&writer).map_err(|e| failed(format!("file writer: {e}")))?;
        stoppable(&self.ctx.cancel, || "a file writer's write".to_owned(), sink.write(chunk)).await
    }

    async fn finish(&mut self, writer: Resource<FileSink>) -> Result<u64, types::SandboxError> {
        let sink = self.table.get_mut(&writer).map_err(|e| failed(format!("file writer: {e}")))?;
        stoppable(&self.ctx.cancel, || "a file writer's finish".to_owned(), sink.finish()).await
    }

    async fn drop(&mut self, writer: Resource<FileSink>) -> wasmtime::Result<()> {
        self.table.delete(writer)?;
        self.ctx.open_writers = self.ctx.open_writers.saturating_sub(1);
        Ok(())
    }
}
