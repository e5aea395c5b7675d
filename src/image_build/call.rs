//! The vocabulary between the build flow and its shell: the calls the flow
//! asks for, the answers the shell feeds back, and the flow's outcome. Plain
//! values mirroring `wit/snapsign.wit`'s builder world, so the flow runs
//! natively with literal answers and the component maps them one to one.

use std::time::Duration;

use super::sizing::Resources;

/// What to build (the WIT `build-request`).
#[derive(Clone, PartialEq)]
pub struct Request {
    /// Platform API base URL.
    pub api_url: String,
    /// Bearer token for platform, lifecycle and proxy.
    pub token: String,
    /// Template name.
    pub name: String,
    /// Dockerfile text.
    pub dockerfile: String,
    /// Rootfs size override, MiB.
    pub disk_mb: Option<u64>,
    /// Builder sandbox CPU override.
    pub builder_cpus: Option<f64>,
    /// Builder sandbox memory override, MiB.
    pub builder_memory_mb: Option<i64>,
    /// Builder sandbox disk override, MiB.
    pub builder_disk_mb: Option<u64>,
    /// Register the template as public.
    pub public: bool,
    /// Deadline for the sandbox to run and answer, seconds.
    pub sandbox_wait_secs: u32,
    /// An image import: spec.json's `importImageReference` (`context:<path>`).
    pub import_reference: Option<String>,
    /// PAT mode's organization and project; `None` is API-key mode.
    pub scope: Option<Scope>,
    /// Build arguments (`--build-arg`), applied to the Dockerfile's `ARG`s
    /// before anything reads it ([`super::dockerfile::apply_build_args`]).
    pub build_args: Vec<(String, String)>,
}

/// The scope a personal access token acts in (wit/protocol.md §2.1): PAT
/// mode puts it in the platform's paths and sends it as headers to the
/// platform, the lifecycle API and the sandbox proxy. API-key mode has none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    /// `X-Forwarded-Organization-Id`.
    pub organization: String,
    /// `X-Forwarded-Project-Id`.
    pub project: String,
}

/// The header that carries [`Scope::organization`].
pub const ORGANIZATION_HEADER: &str = "x-forwarded-organization-id";
/// The header that carries [`Scope::project`].
pub const PROJECT_HEADER: &str = "x-forwarded-project-id";

impl Scope {
    /// The scope headers, as (name, value).
    pub fn headers(&self) -> [(String, String); 2] {
        [(ORGANIZATION_HEADER.to_owned(), self.organization.clone()), (PROJECT_HEADER.to_owned(), self.project.clone())]
    }
}

pub use super::routes::{builds_url, complete_url, platform_base, templates_url};

impl Request {
    /// A request with no overrides, a 60 s sandbox wait, no build
    /// arguments, and API-key mode.
    pub fn new(api_url: &str, token: &str, name: &str, dockerfile: &str) -> Self {
        Request {
            api_url: api_url.into(),
            token: token.into(),
            name: name.into(),
            dockerfile: dockerfile.into(),
            disk_mb: None,
            builder_cpus: None,
            builder_memory_mb: None,
            builder_disk_mb: None,
            public: false,
            sandbox_wait_secs: 60,
            import_reference: None,
            scope: None,
            build_args: Vec::new(),
        }
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("api_url", &self.api_url)
            .field("token", &"<redacted>")
            .field("name", &self.name)
            .field("dockerfile", &self.dockerfile)
            .field("disk_mb", &self.disk_mb)
            .field("builder_cpus", &self.builder_cpus)
            .field("builder_memory_mb", &self.builder_memory_mb)
            .field("builder_disk_mb", &self.builder_disk_mb)
            .field("public", &self.public)
            .field("sandbox_wait_secs", &self.sandbox_wait_secs)
            .field("import_reference", &self.import_reference)
            .field("scope", &self.scope)
            .field("build_args", &self.build_args.iter().map(|(name, _)| name).collect::<Vec<_>>())
            .finish()
    }
}

/// A process to run in the sandbox (wit/protocol.md §4.2). The host's
/// `sandbox-exec` backends take the same type.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Process {
    /// Executable.
    pub command: String,
    /// Arguments.
    pub args: Vec<String>,
    /// Environment.
    pub env: Vec<(String, String)>,
    /// Working directory.
    pub working_dir: Option<String>,
    /// Run as root instead of the sandbox user.
    pub as_root: bool,
}

impl Process {
    /// `command args…` with no environment and no working directory.
    pub fn new(command: &str, args: &[&str], as_root: bool) -> Self {
        Process {
            command: command.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: Vec::new(),
            working_dir: None,
            as_root,
        }
    }
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, or the negated signal number.
    pub code: i64,
    /// The kernel OOM killer ended it.
    pub oom_killed: bool,
    /// The last line it wrote to stderr, when the host followed its output
    /// (a logged `run`): the reason a builder gives when it fails.
    pub last_error: Option<String>,
}

/// A `sandbox-exec` failure, classified by the host (wit/protocol.md §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxError {
    /// Worth retrying until the flow's deadline.
    Transient(String),
    /// The sandbox is gone.
    Gone(String),
    /// The caller was refused.
    Denied(String),
    /// Anything else.
    Failed(String),
    /// The host's user cancelled the build (Ctrl-C): the call was stopped,
    /// or refused because the build is being cancelled. Only `delete` (and
    /// the flow's own HTTP, the abort among it) still goes through, so the
    /// flow unwinds and ends with [`BuildError::Cancelled`].
    Cancelled(String),
}

impl std::fmt::Display for SandboxError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SandboxError::Transient(m) => write!(f, "transient sandbox error: {m}"),
            SandboxError::Gone(m) => write!(f, "sandbox gone: {m}"),
            SandboxError::Denied(m) => write!(f, "sandbox access denied: {m}"),
            SandboxError::Failed(m) => f.write_str(m),
            SandboxError::Cancelled(m) => write!(f, "cancelled: {m}"),
        }
    }
}

impl std::error::Error for SandboxError {}

/// What the host says when it stops or refuses a build's HTTP request
/// because the build is being cancelled (it is in the request's error, as
/// the shell reports it): the flow reads such an answer as cancellation.
pub const CANCELLED_BY_HOST: &str = "stopped by the host: the build is being cancelled";

/// Where the sandbox proxy answers, for the sign calls.
#[derive(Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Base URL.
    pub base_url: String,
    /// Headers every request must carry (routing, auth).
    pub headers: Vec<(String, String)>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.headers.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Endpoint").field("base_url", &self.base_url).field("header_names", &names).finish()
    }
}

/// One call the shell performs for the flow.
#[derive(Clone, PartialEq)]
pub enum Call {
    /// An HTTP exchange over wasi:http (platform API, sandbox proxy sign, abort URL).
    Http { method: &'static str, url: String, headers: Vec<(String, String)>, body: Vec<u8> },
    /// `sandbox-exec.create`.
    Create { image: String, resources: Resources, timeout_secs: i64 },
    /// `sandbox-exec.status`.
    Status { id: String },
    /// Wait this long, then answer [`Answer::Slept`].
    Sleep(Duration),
    /// `sandbox-exec.proxy`.
    Proxy { id: String },
    /// `sandbox-exec.run`.
    Run { id: String, process: Process, log: bool },
    /// `sandbox-exec.run-captured`; the shell answers the stdout lines.
    RunCaptured { id: String, process: Process, timeout_secs: u32 },
    /// Streams the tar of the preopened build context to `path` (gzipped or
    /// not, as the host chooses for the link; the answer says which).
    UploadContext { id: String, path: String, only: Option<Vec<String>> },
    /// `sandbox-exec.write-file`.
    WriteFile { id: String, path: String, contents: Vec<u8> },
    /// `sandbox-exec.read-file`.
    ReadFile { id: String, path: String },
    /// `sandbox-exec.delete`.
    Delete { id: String },
}

impl std::fmt::Debug for Call {
    /// Header values (bearer tokens) and bodies stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Call::Http { method, url, body, .. } => {
                let path = url.split('?').next().unwrap_or(url);
                write!(f, "Http({method} {path}, {} body bytes)", body.len())
            }
            Call::Create { image, resources, .. } => write!(f, "Create({image}, {resources:?})"),
            Call::Status { id } => write!(f, "Status({id})"),
            Call::Sleep(d) => write!(f, "Sleep({d:?})"),
            Call::Proxy { id } => write!(f, "Proxy({id})"),
            Call::Run { id, process, log } => write!(f, "Run({id}, {} {:?}, log {log})", process.command, process.args),
            Call::RunCaptured { id, process, .. } => write!(f, "RunCaptured({id}, {})", process.command),
            Call::UploadContext { id, path, only } => write!(f, "UploadContext({id}, {path}, only {only:?})"),
            Call::WriteFile { id, path, contents } => write!(f, "WriteFile({id}, {path}, {} bytes)", contents.len()),
            Call::ReadFile { id, path } => write!(f, "ReadFile({id}, {path})"),
            Call::Delete { id } => write!(f, "Delete({id})"),
        }
    }
}

/// Whether an uploaded archive is a gzip tar (`tar -xzf`) or a plain one (`tar -xf`).
pub type Gzipped = bool;

/// The shell's answer to the last [`Call`] ([`Answer::Start`] first).
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// No call yet: the flow's first step.
    Start,
    /// An HTTP exchange: status and body, or why no answer came.
    Http(Result<(u16, Vec<u8>), String>),
    /// The created sandbox's id.
    Created(Result<String, SandboxError>),
    /// A lifecycle status.
    Status(Result<String, SandboxError>),
    /// The sleep is over.
    Slept,
    /// The proxy endpoint.
    Proxy(Result<Endpoint, SandboxError>),
    /// A process ended.
    Exit(Result<Exit, SandboxError>),
    /// A captured process's stdout lines.
    Captured(Result<Vec<String>, SandboxError>),
    /// The context upload (whether the host gzipped the tar), or why it failed.
    Uploaded(Result<Gzipped, SandboxError>),
    /// A file write or a delete.
    Done(Result<(), SandboxError>),
    /// A file's contents.
    File(Result<Vec<u8>, SandboxError>),
}

impl Answer {
    /// The variant's name, without its contents (which may hold presigned URLs).
    pub fn kind(&self) -> &'static str {
        match self {
            Answer::Start => "Start",
            Answer::Http(_) => "Http",
            Answer::Created(_) => "Created",
            Answer::Status(_) => "Status",
            Answer::Slept => "Slept",
            Answer::Proxy(_) => "Proxy",
            Answer::Exit(_) => "Exit",
            Answer::Captured(_) => "Captured",
            Answer::Uploaded(_) => "Uploaded",
            Answer::Done(_) => "Done",
            Answer::File(_) => "File",
        }
    }

    /// Why the call was cancelled, when the host cancelled it
    /// ([`SandboxError::Cancelled`]).
    pub fn cancelled(&self) -> Option<&str> {
        let error = match self {
            Answer::Http(Err(e)) if e.contains(CANCELLED_BY_HOST) => return Some(CANCELLED_BY_HOST),
            Answer::Created(Err(e)) | Answer::Status(Err(e)) | Answer::Captured(Err(e)) => e,
            Answer::Proxy(Err(e)) => e,
            Answer::Exit(Err(e)) => e,
            Answer::Uploaded(Err(e)) | Answer::Done(Err(e)) => e,
            Answer::File(Err(e)) => e,
            _ => return None,
        };
        match error {
            SandboxError::Cancelled(why) => Some(why),
            _ => None,
        }
    }
}

/// Progress the flow reports (the WIT `events` it owns; the shell reports
/// upload progress and builder log lines itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A stage started.
    Stage(String),
    /// Something went wrong that does not fail the build.
    Warning(String),
    /// The builder's metadata.json, as JSON text, read and about to be completed.
    Metadata(String),
}

/// Why a build failed (the WIT `build-error`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BuildError {
    /// The request itself is wrong.
    Usage(String),
    /// The platform refused the credentials.
    Auth(String),
    /// The build failed; past sandbox creation the message names the sandbox and build ids.
    Failed(String),
    /// The host's user cancelled the build; the message says at which
    /// stage and what the flow cleaned up.
    Cancelled(String),
}

impl BuildError {
    /// The message, whatever the kind.
    pub fn message(&self) -> &str {
        match self {
            BuildError::Usage(m) | BuildError::Auth(m) | BuildError::Failed(m) | BuildError::Cancelled(m) => m,
        }
    }

    pub(crate) fn map(self, f: impl FnOnce(&str) -> String) -> Self {
        match self {
            BuildError::Usage(m) => BuildError::Usage(f(&m)),
            BuildError::Auth(m) => BuildError::Auth(f(&m)),
            BuildError::Failed(m) => BuildError::Failed(f(&m)),
            BuildError::Cancelled(m) => BuildError::Cancelled(f(&m)),
        }
    }
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

impl std::error::Error for BuildError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn platform_urls_are_built_in_one_place_and_ids_stay_one_segment() {
        let scope = Scope { organization: "org 1".into(), project: "p/2".into() };
        let base = platform_base("http://api/", Some(&scope));
        assert_eq!(base, "http://api/platform/v1/organizations/org%201/projects/p%2F2");
        assert_eq!(templates_url("http://api/platform/v1"), "http://api/platform/v1/sandbox-templates");
        assert_eq!(builds_url("http://api/platform/v1"), "http://api/platform/v1/sandbox-template-builds");
        assert_eq!(
            complete_url("http://api/platform/v1", "../../x?y"),
            "http://api/platform/v1/sandbox-template-builds/..%2F..%2Fx%3Fy/complete",
            "a hostile build id cannot reach another path"
        );
    }
}
