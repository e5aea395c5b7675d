//! The builder component: the shell of `snapsign::image_build::Flow` (wit/protocol.md
//! §0). It makes no decisions: it performs the call the flow asks for
//! (wasi:http to the platform and the sandbox proxy, `sandbox-exec`, a
//! sleep), feeds the answer and the monotonic clock back, and reports the
//! flow's events.

use std::time::{Duration, Instant};

use snapsign::image_build::call::{Answer, BuildError, Call, Endpoint, Event, Exit, Process, Request, SandboxError};
use snapsign::image_build::{Flow, Next, context};

mod bindings {
    wit_bindgen::generate!({ world: "builder", path: "wit", pub_export_macro: true });
}

#[path = "shell/wasi_http.rs"]
mod wasi_http;

use bindings::exports::snapsign::components::build as wit;
use bindings::snapsign::components::events::{self, emit};
use bindings::snapsign::components::sandbox_exec as sx;
use bindings::snapsign::components::types;

struct Component;

/// The build context, preopened read-only by the host.
const CONTEXT_DIR: &str = "/context";

impl wit::Guest for Component {
    fn run(request: wit::BuildRequest) -> Result<String, wit::BuildError> {
        let started = Instant::now();
        let mut flow = Flow::new(request_of(request), Duration::ZERO);
        let mut answer = Answer::Start;
        loop {
            let step = flow.step(answer, started.elapsed());
            for event in step.events {
                emit(&match event {
                    Event::Stage(name) => events::Event::Stage(name),
                    Event::Warning(message) => events::Event::Warning(message),
                    Event::Metadata(json) => events::Event::Metadata(json),
                });
            }
            match step.next {
                Next::Call(call) => answer = perform(call),
                Next::Finished(outcome) => {
                    return outcome.map_err(|e| match e {
                        BuildError::Usage(m) => wit::BuildError::Usage(m),
                        BuildError::Auth(m) => wit::BuildError::Auth(m),
                        BuildError::Failed(m) => wit::BuildError::Failed(m),
                        BuildError::Cancelled(m) => wit::BuildError::Cancelled(m),
                    });
                }
            }
        }
    }
}

bindings::export!(Component with_types_in bindings);

fn main() {}

/// Performs one call; the answer goes back to the flow unjudged.
fn perform(call: Call) -> Answer {
    match call {
        Call::Http { method, url, headers, body } => Answer::Http(wasi_http::send(method, &url, &headers, &body)),
        Call::Create { image, resources: r, timeout_secs } => {
            let resources = types::Resources { cpus: r.cpus, memory_mb: r.memory_mb, disk_mb: r.disk_mb };
            Answer::Created(sx::create(&image, resources, timeout_secs).map(|s| s.id).map_err(error))
        }
        Call::Status { id } => Answer::Status(sx::status(&id).map_err(error)),
        Call::Sleep(pause) => {
            let nanos = u64::try_from(pause.as_nanos()).unwrap_or(u64::MAX);
            wasip2::clocks::monotonic_clock::subscribe_duration(nanos).block();
            Answer::Slept
        }
        Call::Proxy { id } => {
            Answer::Proxy(sx::proxy(&id).map(|e| Endpoint { base_url: e.base_url, headers: e.headers }).map_err(error))
        }
        Call::Run { id, process, log } => Answer::Exit(
            sx::run(&id, &spec(process), log)
                .map(|e| Exit { code: e.code, oom_killed: e.oom_killed, last_error: e.last_error })
                .map_err(error),
        ),
        Call::RunCaptured { id, process, timeout_secs } => {
            Answer::Captured(sx::run_captured(&id, &spec(process), timeout_secs).map(|(_, lines)| lines).map_err(error))
        }
        // The host packs the preopened context natively (wit/protocol.md §5.6) and reports the progress.
        Call::UploadContext { id, path, only } => Answer::Uploaded(upload_context(&id, &path, only)),
        Call::WriteFile { id, path, contents } => Answer::Done(sx::write_file(&id, &path, &contents).map_err(error)),
        Call::ReadFile { id, path } => Answer::File(sx::read_file(&id, &path).map_err(error)),
        Call::Delete { id } => Answer::Done(sx::delete(&id).map_err(error)),
    }
}

/// Sends the context (`only` those paths, when they reach no symlink),
/// leaving out what its `.dockerignore` names.
fn upload_context(id: &str, path: &str, only: Option<Vec<String>>) -> Result<bool, SandboxError> {
    let ignore_file = format!("{CONTEXT_DIR}/{}", context::DOCKERIGNORE);
    let ignore = match std::fs::read_to_string(&ignore_file) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(SandboxError::Failed(format!("read the context's {}: {e}", context::DOCKERIGNORE))),
    };
    let is_symlink =
        |rel: &str| std::fs::symlink_metadata(format!("{CONTEXT_DIR}/{rel}")).is_ok_and(|m| m.file_type().is_symlink());
    let only = only.filter(|paths| context::through_no_symlink(paths, is_symlink));
    let exclude = context::exclusions(ignore.as_deref(), only.as_deref());
    sx::upload_directory(id, CONTEXT_DIR, &exclude, path).map(|archive| archive.gzip).map_err(error)
}

fn request_of(r: wit::BuildRequest) -> Request {
    Request {
        api_url: r.api_url,
        token: r.token,
        name: r.name,
        dockerfile: r.dockerfile,
        disk_mb: r.disk_mb,
        builder_cpus: r.builder_cpus,
        builder_memory_mb: r.builder_memory_mb,
        builder_disk_mb: r.builder_disk_mb,
        public: r.public,
        sandbox_wait_secs: r.sandbox_wait_secs,
        import_reference: r.import_reference,
        scope: r.scope.map(|s| snapsign::image_build::call::Scope { organization: s.organization, project: s.project }),
        build_args: r.build_args,
    }
}

fn spec(p: Process) -> types::ProcessSpec {
    types::ProcessSpec { command: p.command, args: p.args, env: p.env, working_dir: p.working_dir, as_root: p.as_root }
}

fn error(e: types::SandboxError) -> SandboxError {
    match e {
        types::SandboxError::Transient(m) => SandboxError::Transient(m),
        types::SandboxError::Gone(m) => SandboxError::Gone(m),
        types::SandboxError::Denied(m) => SandboxError::Denied(m),
        types::SandboxError::Failed(m) => SandboxError::Failed(m),
        types::SandboxError::Cancelled(m) => SandboxError::Cancelled(m),
    }
}
