//! The build flow as a sans-IO step machine (wit/protocol.md §0): plan,
//! lookup, prepare, create the builder sandbox and wait for it, sign and
//! splice, upload the context, run the builder, complete; on failure abort
//! the multipart upload, diagnose, delete the sandbox and decorate the error.
//!
//! [`Flow::step`] takes the answer to the last call and `now` (monotonic
//! time since any fixed origin) and says the next call. The shell performs
//! calls and reports events; every decision is here.

use std::time::Duration;

use serde_json::{Map, Value};

use super::call::{Answer, BuildError, Call, Endpoint, Event, Exit, Process, Request, SandboxError};
use super::splice;
use super::{command, complete, decorate, diagnose, lookup, plan, sizing};
use crate::wire::{ClientFields, MultipartHint, PrepareRequest, Prepared, SignRequest, TemplateRef, UploadHead};

/// Pause between two polls of a starting sandbox (wit/protocol.md §5.2).
pub const POLL: Duration = Duration::from_millis(250);

/// Complete is sent at most this many times (see [`complete_backoff`]).
pub const COMPLETE_ATTEMPTS: u32 = 5;

/// The pause after complete attempt `attempt` (from 0) went unanswered:
/// 250 ms doubling, 3.75 s in all. No jitter: one client completes one build.
pub fn complete_backoff(attempt: u32) -> Duration {
    POLL * 2u32.saturating_pow(attempt.min(8))
}
/// Idempotent calls (template lookups, get_blob signing) are sent at most
/// this many times while the connection fails or the answer is 429 or
/// 502–504 (see [`retry_backoff`]). Calls that create something are not
/// retried on a lost answer; each says why where it is answered.
pub const RETRY_ATTEMPTS: u32 = 4;

/// The upper bound of the first pause before an idempotent call is sent again; each later one doubles.
pub const RETRY_BASE: Duration = Duration::from_millis(200);

/// The pause after attempt `attempt` (from 0) of an idempotent call failed:
/// half of [`RETRY_BASE`] × 2^attempt, plus a part of the other half drawn
/// from `entropy` ("equal jitter"), so clients that failed together do not
/// come back together. At most 0.2 + 0.4 + 0.8 s over the attempts.
pub fn retry_backoff(attempt: u32, entropy: u64) -> Duration {
    let cap = RETRY_BASE * 2u32.saturating_pow(attempt.min(8));
    let half = cap / 2;
    // splitmix64: the clock's low bits spread over the range.
    let mut x = entropy.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    half + Duration::from_nanos(x % (half.as_nanos() as u64).max(1))
}

/// Why an idempotent call's answer is worth asking for again: the
/// connection failed, or the server or a proxy on the way said it is busy or
/// away (429, 502, 503, 504). Any other answer stands.
fn worth_retrying(answer: &Result<(u16, Vec<u8>), String>) -> Option<String> {
    match answer {
        Err(e) => Some(e.clone()),
        Ok((status @ (429 | 502 | 503 | 504), body)) => Some(format!("HTTP {status}: {}", text(body))),
        Ok(_) => None,
    }
}

/// The builder is resumed with fresh part URLs at most this many times
/// (wit/protocol.md §5.12).
pub const MAX_REFRESHES: u32 = 3;

/// Lifetime asked for the builder sandbox at create, seconds.
pub const SANDBOX_TIMEOUT_SECS: i64 = 300;
/// Each diagnostics command is killed after this many seconds (§5.9).
pub const DIAGNOSE_TIMEOUT_SECS: u32 = 5;

/// What the flow wants next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Perform this call and feed its answer to [`Flow::step`].
    Call(Call),
    /// The flow is over: the registered template (complete's JSON answer) or why not.
    Finished(Result<String, BuildError>),
}

/// One step's output: events to report, then the next call.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    /// Events, in order, to report before performing `next`.
    pub events: Vec<Event>,
    /// The next call, or the outcome.
    pub next: Next,
}

/// Where the flow stands: which answer it waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    /// A template lookup (idempotent), its attempt (from 0).
    Lookup {
        index: usize,
        attempt: u32,
    },
    LookupPause {
        index: usize,
        attempt: u32,
    },
    Prepare,
    Create,
    Status,
    StatusPause,
    Probe,
    ProbePause,
    Proxy,
    SignUpload,
    /// refresh_upload after the builder's part URLs expired.
    RefreshUpload,
    /// get_blob of the parent (idempotent), its attempt.
    SignParent(u32),
    SignParentPause(u32),
    /// get_blob of an earlier stage's image (idempotent), its attempt.
    SignLocal(usize, u32),
    SignLocalPause(usize, u32),
    Setup(Setup),
    WriteSpec,
    Build,
    ReadMetadata,
    /// The complete request, its attempt (from 0).
    Complete(u32),
    CompletePause(u32),
    Abort,
    /// refresh_upload for a live abort URL, the first one having expired.
    AbortRefresh,
    Diagnose(usize),
    Delete,
    Finished,
}

/// The setup, between proxy readiness and spec.json (wit/protocol.md §5.5),
/// in order: the build directory, the context archive, its unpacking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// `mkdir -p BUILD` (as root).
    MakeBuildDir,
    /// `chmod 0777 BUILD` (as root), so the sandbox user writes there.
    OpenBuildDir,
    /// The context, packed by the host, to `BUILD/context.tar` (gzipped
    /// for a remote sandbox, plain for one on the host's machine).
    UploadContext,
    /// `mkdir -p BUILD/context`.
    MakeContextDir,
    /// `tar -xzf` (or `-xf`, plain) the archive into it.
    Unpack,
    /// `rm -f` the archive.
    RemoveArchive,
}

impl Setup {
    /// The step after this one; `None` after the last.
    fn next(self) -> Option<Setup> {
        match self {
            Setup::MakeBuildDir => Some(Setup::OpenBuildDir),
            Setup::OpenBuildDir => Some(Setup::UploadContext),
            Setup::UploadContext => Some(Setup::MakeContextDir),
            Setup::MakeContextDir => Some(Setup::Unpack),
            Setup::Unpack => Some(Setup::RemoveArchive),
            Setup::RemoveArchive => None,
        }
    }
}

/// One build, from request to outcome.
pub struct Flow {
    request: Request,
    /// The platform API prefix (`call::platform_base`): API-key or PAT mode.
    platform: String,
    auth: Vec<(String, String)>,
    state: State,
    started: Duration,
    base_image: String,
    lookups: Vec<String>,
    /// The first lookup is the final stage's FROM: its template is the parent.
    final_lookup: bool,
    parent_template: Option<TemplateRef>,
    /// Other lookups that found a template: the prepare request's `additionalLocalImages`.
    local_templates: Vec<TemplateRef>,
    prepared: Option<Prepared>,
    rootfs_bytes: u64,
    invocation: (String, Vec<String>),
    sandbox: Option<String>,
    deadline: Duration,
    endpoint: Option<Endpoint>,
    spec: Map<String, Value>,
    signed_uri: Option<String>,
    local_images: Vec<(splice::ReadSlot, String)>,
    /// Set by a multipart sign answer, cleared by a successful complete.
    abort_url: Option<String>,
    /// The multipart upload's id, for fresh URLs when the builder's expire.
    upload_id: Option<String>,
    /// Times the builder was resumed with fresh URLs.
    refreshes: u32,
    /// The abort URL had expired and a fresh one was asked for.
    abort_refreshed: bool,
    /// The complete request, kept to send again.
    complete_call: Option<Call>,
    /// The sandbox answered: failures from here on get diagnostics.
    ready: bool,
    /// The host gzipped the context it uploaded.
    context_gzipped: bool,
    diagnostics: Vec<Vec<String>>,
    /// The stage the flow is in (named by its last stage event).
    stage: String,
    /// What unwinding cleaned up and what it could not, for a cancelled build's message.
    cleaned: Vec<String>,
    left: Vec<String>,
    /// The delete was answered (a cancelled build aborts its upload after it).
    deleted: bool,
    outcome: Option<Result<String, BuildError>>,
    events: Vec<Event>,
}

impl std::fmt::Debug for Flow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Flow")
            .field("state", &self.state)
            .field("sandbox", &self.sandbox)
            .field("ready", &self.ready)
            .finish_non_exhaustive()
    }
}

fn failed(message: impl Into<String>) -> BuildError {
    BuildError::Failed(message.into())
}

fn unexpected(state: State, answer: &Answer) -> BuildError {
    failed(format!("build flow: a {} answer does not fit step {state:?} (a shell bug)", answer.kind()))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn is_2xx(status: u16) -> bool {
    (200..300).contains(&status)
}

/// `Ok` for exit code 0 without OOM kill, else the failure naming the command.
fn run_ok(name: &str, exit: Result<Exit, SandboxError>) -> Result<(), BuildError> {
    let exit = exit.map_err(|e| failed(format!("run '{name}': {e}")))?;
    if exit.code != 0 || exit.oom_killed {
        let oom = if exit.oom_killed { " (process was killed by the kernel OOM killer)" } else { "" };
        // The builder's own last word names the step and the reason; after a
        // kill (a signal, the OOM killer) its last line is older news.
        let said = match exit.last_error {
            Some(line) if exit.code > 0 && !exit.oom_killed => format!(": {}", line.trim()),
            _ => String::new(),
        };
        return Err(failed(format!("Command '{name}' failed with exit code {}{oom}{said}", exit.code)));
    }
    Ok(())
}

/// A sign answer's JSON (wit/protocol.md §4.7), or the failure.
fn signed(answer: Result<(u16, Vec<u8>), String>) -> Result<Value, BuildError> {
    let (status, body) = answer.map_err(failed)?;
    if !is_2xx(status) {
        return Err(failed(format!("dataplane sign request failed (HTTP {status}): {}", text(&body))));
    }
    serde_json::from_slice(&body).map_err(|e| failed(format!("dataplane sign answer is not JSON: {e}")))
}

impl Flow {
    /// A flow for `request`, started at `now`.
    pub fn new(request: Request, now: Duration) -> Self {
        Flow {
            platform: super::call::platform_base(&request.api_url, request.scope.as_ref()),
            // PAT mode sends its scope with every platform call (wit/protocol.md §2.1).
            auth: std::iter::once(("authorization".into(), format!("Bearer {}", request.token)))
                .chain(request.scope.iter().flat_map(|scope| scope.headers()))
                .collect(),
            request,
            state: State::Start,
            started: now,
            base_image: String::new(),
            lookups: Vec::new(),
            final_lookup: false,
            parent_template: None,
            local_templates: Vec::new(),
            prepared: None,
            rootfs_bytes: 0,
            invocation: (String::new(), Vec::new()),
            sandbox: None,
            deadline: now,
            endpoint: None,
            spec: Map::new(),
            signed_uri: None,
            local_images: Vec::new(),
            abort_url: None,
            upload_id: None,
            refreshes: 0,
            abort_refreshed: false,
            complete_call: None,
            ready: false,
            context_gzipped: true,
            diagnostics: Vec::new(),
            stage: String::new(),
            cleaned: Vec::new(),
            left: Vec::new(),
            deleted: false,
            outcome: None,
            events: Vec::new(),
        }
    }

    /// Takes the answer to the last call ([`Answer::Start`] first) and the
    /// time, and says what to do next.
    pub fn step(&mut self, answer: Answer, now: Duration) -> Step {
        let next = match self.state {
            State::Abort | State::AbortRefresh | State::Diagnose(_) | State::Delete | State::Finished => {
                self.unwind(answer, now)
            }
            // The host stops a cancelled build's sandbox calls; whichever one
            // answers so, the flow unwinds (abort, delete) without diagnostics.
            _ => match answer.cancelled() {
                Some(why) => {
                    let mut message = format!("the build was cancelled during its {} stage ({why})", self.stage);
                    if matches!(self.state, State::CompletePause(_) | State::Complete(1..)) {
                        let build = &self.prepared().build_id;
                        message.push_str(&format!(
                            "; an earlier complete went unanswered, so the platform may have registered it: look \
                             for the template of build {build}"
                        ));
                    }
                    self.fail(BuildError::Cancelled(message))
                }
                None => self.advance(answer, now).unwrap_or_else(|e| self.fail(e)),
            },
        };
        Step { events: std::mem::take(&mut self.events), next }
    }

    fn stage(&mut self, name: &str) {
        self.stage = name.to_owned();
        self.events.push(Event::Stage(name.to_owned()));
    }

    fn warn(&mut self, message: String) {
        self.events.push(Event::Warning(message));
    }

    fn go(&mut self, state: State, call: Call) -> Result<Next, BuildError> {
        self.state = state;
        Ok(Next::Call(call))
    }

    fn prepared(&self) -> &Prepared {
        self.prepared.as_ref().expect("prepare precedes every sandbox step")
    }

    fn id(&self) -> String {
        self.sandbox.clone().expect("create precedes every sandbox step")
    }

    fn http(&self, method: &'static str, url: String, headers: &[(String, String)], body: Option<&Value>) -> Call {
        let mut headers = headers.to_vec();
        let body = match body {
            Some(json) => {
                headers.push(("content-type".into(), "application/json".into()));
                json.to_string().into_bytes()
            }
            None => Vec::new(),
        };
        Call::Http { method, url, headers, body }
    }

    fn lookup_call(&self, index: usize) -> Call {
        self.http("GET", lookup::url(&self.platform, &self.lookups[index]), &self.auth, None)
    }

    fn sign_call(&self, request: &SignRequest) -> Call {
        let endpoint = self.endpoint.as_ref().expect("the proxy endpoint precedes signing");
        let url = format!("{}{}", endpoint.base_url.trim_end_matches('/'), crate::signer::SIGN_PATH);
        let body = serde_json::to_value(request).expect("sign requests serialize");
        self.http("POST", url, &endpoint.headers, Some(&body))
    }

    fn get_blob(&self, uri: &str) -> Call {
        self.sign_call(&SignRequest::get_blob(uri))
    }

    /// When `answer` of an idempotent call is worth asking for again: a
    /// pause (then `pause` sends it again), or the failure once
    /// [`RETRY_ATTEMPTS`] were sent. `None` when the answer stands.
    fn again(
        &mut self,
        what: &str,
        answer: &Result<(u16, Vec<u8>), String>,
        attempt: u32,
        pause: State,
        now: Duration,
    ) -> Option<Result<Next, BuildError>> {
        let why = worth_retrying(answer)?;
        if attempt + 1 >= RETRY_ATTEMPTS {
            return Some(Err(failed(format!("{what} failed {RETRY_ATTEMPTS} times: {why}"))));
        }
        let pause_for = retry_backoff(attempt, now.as_nanos() as u64);
        self.warn(format!("{what} failed ({why}); asking again in {}ms", pause_for.as_millis()));
        Some(self.go(pause, Call::Sleep(pause_for)))
    }

    /// Polls again after [`POLL`] while the deadline allows, else fails with `late`.
    fn again_or_late(&mut self, pause: State, late: String, now: Duration) -> Result<Next, BuildError> {
        if now < self.deadline { self.go(pause, Call::Sleep(POLL)) } else { Err(failed(late)) }
    }

    fn wait_secs(&self) -> u64 {
        u64::from(self.request.sandbox_wait_secs.max(1))
    }

    fn status_call(&self) -> Call {
        Call::Status { id: self.id() }
    }

    fn probe_call(&self) -> Call {
        Call::Run { id: self.id(), process: Process::new("/bin/true", &[], false), log: false }
    }

    /// The main path: each arm reads the answer to the call its state made.
    fn advance(&mut self, answer: Answer, now: Duration) -> Result<Next, BuildError> {
        match (self.state, answer) {
            (State::Start, Answer::Start) => {
                self.stage("plan");
                // Build arguments become ARG values in the Dockerfile itself, so
                // the planner, prepare (both shapes) and any builder read them.
                let build_args = std::mem::take(&mut self.request.build_args);
                let (dockerfile, unused) = super::dockerfile::apply_build_args(&self.request.dockerfile, &build_args)
                    .map_err(|e| BuildError::Usage(e.to_string()))?;
                self.request.dockerfile = dockerfile;
                if !unused.is_empty() {
                    self.warn(format!("build arguments not declared by any ARG, so not used: {}", unused.join(", ")));
                }
                let plan = plan::plan(&self.request.dockerfile).map_err(|e| BuildError::Usage(e.to_string()))?;
                for warning in plan.warnings {
                    self.warn(warning);
                }
                self.final_lookup = plan.final_lookup.is_some();
                self.lookups = plan.final_lookup.into_iter().chain(plan.other_lookups).collect();
                self.base_image = plan.base_image;
                if self.lookups.is_empty() {
                    return self.prepare();
                }
                let call = self.lookup_call(0);
                self.go(State::Lookup { index: 0, attempt: 0 }, call)
            }
            (State::Lookup { index, attempt }, Answer::Http(answer)) => {
                let reference = self.lookups[index].clone();
                // A lookup is idempotent: asked again while it fails in passing.
                let what = format!("template lookup for '{reference}'");
                if let Some(next) = self.again(&what, &answer, attempt, State::LookupPause { index, attempt }, now) {
                    return next;
                }
                let (status, body) = answer.map_err(failed)?;
                let template = lookup::classify(&reference, status, &text(&body))?;
                if index == 0 && self.final_lookup {
                    self.parent_template = template.map(|t| t.as_parent(&reference));
                } else if let Some(template) = template {
                    // An earlier stage's FROM or a COPY --from that names a template.
                    self.local_templates.push(template.as_parent(&reference));
                }
                if index + 1 < self.lookups.len() {
                    let call = self.lookup_call(index + 1);
                    return self.go(State::Lookup { index: index + 1, attempt: 0 }, call);
                }
                self.prepare()
            }
            (State::LookupPause { index, attempt }, Answer::Slept) => {
                let call = self.lookup_call(index);
                self.go(State::Lookup { index, attempt: attempt + 1 }, call)
            }
            (State::Prepare, Answer::Http(answer)) => {
                let (status, body) = answer.map_err(failed)?;
                let what = format!("failed to prepare sandbox image build (HTTP {status}): {}", text(&body));
                match status {
                    401 | 403 => return Err(BuildError::Auth(what)),
                    s if !is_2xx(s) => return Err(failed(what)),
                    _ => {}
                }
                let raw: Value =
                    serde_json::from_slice(&body).map_err(|e| failed(format!("prepare answer is not JSON: {e}")))?;
                let prepared = Prepared::parse(&raw).map_err(|e| failed(e.to_string()))?;
                let Value::Object(raw) = raw else { unreachable!("Prepared::parse admits only objects") };
                let parent_bytes = prepared.parent.as_ref().and_then(|p| p.rootfs_disk_bytes);
                let r = &self.request;
                self.rootfs_bytes = sizing::rootfs_disk_bytes(r.disk_mb, prepared.parent.is_some(), parent_bytes)
                    .map_err(|e| BuildError::Usage(e.to_string()))?;
                let b = &prepared.builder;
                let resources = sizing::resources(
                    self.rootfs_bytes,
                    (b.cpus, b.memory_mb, b.disk_mb),
                    r.builder_cpus,
                    r.builder_memory_mb,
                    r.builder_disk_mb,
                );
                self.invocation = command::builder_invocation(&b.command).map_err(|e| failed(e.to_string()))?;
                let image = b.image.clone();
                self.spec = raw;
                self.prepared = Some(prepared);
                self.stage("sandbox");
                self.go(State::Create, Call::Create { image, resources, timeout_secs: SANDBOX_TIMEOUT_SECS })
            }
            (State::Create, Answer::Created(created)) => {
                let id = created.map_err(|e| failed(format!("create the builder sandbox: {e}")))?;
                self.sandbox = Some(id);
                self.deadline = now + Duration::from_secs(self.wait_secs());
                let call = self.status_call();
                self.go(State::Status, call)
            }
            // Waiting for `running` (§5.2): transient errors and other statuses are retried until the deadline.
            (State::Status, Answer::Status(status)) => {
                let id = self.id();
                let late = format!("Sandbox {id} did not reach 'running' within {}s", self.wait_secs());
                match status.as_deref() {
                    Ok("running") => {
                        let call = self.probe_call();
                        self.go(State::Probe, call)
                    }
                    Ok("terminated") => Err(failed(
                        SandboxError::Gone(format!("Sandbox {id} terminated before reaching 'running'")).to_string(),
                    )),
                    Ok(_) | Err(SandboxError::Transient(_)) => self.again_or_late(State::StatusPause, late, now),
                    Err(e) => Err(failed(e.to_string())),
                }
            }
            (State::StatusPause, Answer::Slept) => {
                let call = self.status_call();
                self.go(State::Status, call)
            }
            // Proxy readiness (§5.3): the same deadline covers both waits.
            (State::Probe, Answer::Exit(exit)) => {
                let late = format!(
                    "Sandbox {} is running but its proxy did not answer within {}s",
                    self.id(),
                    self.wait_secs()
                );
                match exit {
                    Ok(exit) if exit.code == 0 => {
                        self.ready = true;
                        if self.prepared().snapshot_rel_path.is_some() {
                            self.stage("sign");
                            let id = self.id();
                            return self.go(State::Proxy, Call::Proxy { id });
                        }
                        self.setup()
                    }
                    Ok(_) | Err(SandboxError::Transient(_)) => self.again_or_late(State::ProbePause, late, now),
                    Err(e) => Err(failed(e.to_string())),
                }
            }
            (State::ProbePause, Answer::Slept) => {
                let call = self.probe_call();
                self.go(State::Probe, call)
            }
            (State::Proxy, Answer::Proxy(endpoint)) => {
                self.endpoint = Some(endpoint.map_err(|e| failed(format!("sandbox proxy endpoint: {e}")))?);
                let rel_path = self.prepared().snapshot_rel_path.as_deref().expect("only the new shape signs");
                let hint = sizing::multipart_hint(self.rootfs_bytes);
                let call = self.sign_call(&SignRequest::put_artifact(rel_path, Some(hint)));
                self.go(State::SignUpload, call)
            }
            // The splice (§5.6): the signed uri and upload replace whatever prepare said.
            // Not retried: put_artifact creates a multipart upload at the
            // store, and after a lost answer a second one would leave the
            // first open with no abort URL known to anyone.
            (State::SignUpload, Answer::Http(answer)) => {
                let answer = signed(answer)?;
                let head = UploadHead::read(&answer);
                (self.abort_url, self.upload_id) = (head.abort_url, head.upload_id);
                let uri = splice::splice_upload(&mut self.spec, answer).map_err(|e| failed(e.to_string()))?;
                self.signed_uri = Some(uri);
                if let Some(parent) = &self.prepared().parent {
                    let call = self.get_blob(&parent.parent_manifest_uri);
                    return self.go(State::SignParent(0), call);
                }
                self.sign_local_images()
            }
            // get_blob only presigns a read: idempotent, asked again while it fails in passing.
            (State::SignParent(attempt), Answer::Http(answer)) => {
                let what = "signing the parent snapshot's read (get_blob)";
                if let Some(next) = self.again(what, &answer, attempt, State::SignParentPause(attempt), now) {
                    return next;
                }
                splice::splice_parent_download(&mut self.spec, signed(answer)?).map_err(|e| failed(e.to_string()))?;
                self.sign_local_images()
            }
            (State::SignParentPause(attempt), Answer::Slept) => {
                let uri = self.prepared().parent.as_ref().expect("only a diff build signs its parent");
                let call = self.get_blob(&uri.parent_manifest_uri);
                self.go(State::SignParent(attempt + 1), call)
            }
            (State::SignLocal(i, attempt), Answer::Http(answer)) => {
                let what = format!("signing the read of {} (get_blob)", self.local_images[i].1);
                if let Some(next) = self.again(&what, &answer, attempt, State::SignLocalPause(i, attempt), now) {
                    return next;
                }
                splice::splice_read(&mut self.spec, self.local_images[i].0, signed(answer)?);
                if i + 1 < self.local_images.len() {
                    let call = self.get_blob(&self.local_images[i + 1].1);
                    return self.go(State::SignLocal(i + 1, 0), call);
                }
                self.setup()
            }
            (State::SignLocalPause(i, attempt), Answer::Slept) => {
                let call = self.get_blob(&self.local_images[i].1);
                self.go(State::SignLocal(i, attempt + 1), call)
            }
            (State::Setup(step), Answer::Uploaded(done)) if step == Setup::UploadContext => {
                self.context_gzipped = done.map_err(|e| failed(format!("upload the context: {e}")))?;
                self.setup_next(step.next())
            }
            (State::Setup(step), Answer::Exit(exit)) if step != Setup::UploadContext => {
                let Call::Run { process, .. } = self.setup_call(step) else {
                    unreachable!("every setup step but the upload runs a process")
                };
                run_ok(&process.command, exit)?;
                self.setup_next(step.next())
            }
            (State::WriteSpec, Answer::Done(done)) => {
                done.map_err(|e| failed(format!("write spec.json: {e}")))?;
                self.stage("build");
                let (program, args) = self.invocation.clone();
                let mut env = vec![
                    ("PATH".into(), command::BUILDER_PATH_ENV.into()),
                    (command::BUILDER_RESUMABLE_ENV.into(), "1".into()),
                ];
                if self.refreshes > 0 {
                    env.push((command::BUILDER_RESUME_ENV.into(), "1".into()));
                }
                let process = Process {
                    command: program,
                    args,
                    env,
                    working_dir: Some(command::BUILD_DIR.into()),
                    as_root: true,
                };
                let id = self.id();
                self.go(State::Build, Call::Run { id, process, log: true })
            }
            // The builder's part URLs expired (§5.12): the upload is open and
            // its archive kept; fresh URLs for the same upload, then it resumes.
            (State::Build, Answer::Exit(Ok(exit)))
                if exit.code == command::BUILDER_EXIT_INTERRUPTED
                    && !exit.oom_killed
                    && self.refreshes < MAX_REFRESHES
                    && self.upload_id.is_some() =>
            {
                self.refreshes += 1;
                let said = exit.last_error.as_deref().map(str::trim).unwrap_or("part URLs expired");
                self.events.push(Event::Warning(format!(
                    "{said}: asking the signer for fresh URLs of the same upload (refresh {} of {MAX_REFRESHES})",
                    self.refreshes
                )));
                let uri = self.signed_uri.clone().expect("a multipart upload was signed");
                let upload_id = self.upload_id.clone().expect("checked above");
                let hint = sizing::multipart_hint(self.rootfs_bytes);
                let call = self.sign_call(&SignRequest::refresh_upload(&uri, &upload_id, hint));
                self.go(State::RefreshUpload, call)
            }
            // Not retried blindly: a refresh that fails leaves the upload to the abort.
            (State::RefreshUpload, Answer::Http(answer)) => {
                let answer = signed(answer).map_err(|e| failed(format!("fresh URLs for the upload: {e}")))?;
                let head = UploadHead::read(&answer);
                if head.upload_id != self.upload_id || head.uri != self.signed_uri {
                    return Err(failed(format!(
                        "the refresh_upload answer is for upload {:?} of {:?}, not {:?} of {:?}",
                        head.upload_id, head.uri, self.upload_id, self.signed_uri
                    )));
                }
                self.abort_url = head.abort_url;
                splice::splice_upload(&mut self.spec, answer).map_err(|e| failed(e.to_string()))?;
                let contents = serde_json::to_vec_pretty(&self.spec).expect("a JSON map always serializes");
                let (id, path) = (self.id(), format!("{}/spec.json", command::BUILD_DIR));
                self.go(State::WriteSpec, Call::WriteFile { id, path, contents })
            }
            (State::Build, Answer::Exit(exit)) => {
                let interrupted = matches!(&exit, Ok(e) if e.code == command::BUILDER_EXIT_INTERRUPTED);
                run_ok(&self.invocation.0, exit).map_err(|e| match e {
                    BuildError::Failed(message) if interrupted => failed(format!(
                        "{message}; gave up after {} refreshes of the upload's URLs (a longer URL lifetime at the \
                         signer, SNAPSIGN_URL_TTL_SECS, helps)",
                        self.refreshes
                    )),
                    other => other,
                })?;
                self.stage("complete");
                let (id, path) = (self.id(), format!("{}/metadata.json", command::BUILD_DIR));
                self.go(State::ReadMetadata, Call::ReadFile { id, path })
            }
            // Completion (§5.8): the signed uri wins and metadata must agree with it.
            (State::ReadMetadata, Answer::File(file)) => {
                let bytes = file.map_err(|e| failed(format!("read metadata.json: {e}")))?;
                let metadata: Value =
                    serde_json::from_slice(&bytes).map_err(|e| failed(format!("metadata.json is not JSON: {e}")))?;
                self.events.push(Event::Metadata(metadata.to_string()));
                let prepared = self.prepared();
                let request = complete::completion(prepared, self.signed_uri.as_deref(), &metadata, self.rootfs_bytes)
                    .map_err(|e| failed(e.to_string()))?;
                let body = serde_json::to_value(request).expect("completions serialize");
                let url = super::call::complete_url(&self.platform, &prepared.build_id);
                let call = self.http("POST", url, &self.auth, Some(&body));
                self.complete_call = Some(call.clone());
                self.go(State::Complete(0), call)
            }
            // Complete is retried: the platform answers a repeated complete of
            // the same body with the same template, so an answer lost on the
            // way (a transport error, 502/503/504) is safe to ask for again.
            (State::Complete(attempt), Answer::Http(answer)) => {
                let lost = match &answer {
                    Err(e) => Some(e.clone()),
                    Ok((status, body)) if matches!(status, 502..=504) => {
                        Some(format!("HTTP {status}: {}", crate::wire::excerpt(&text(body))))
                    }
                    Ok(_) => None,
                };
                if let Some(why) = lost {
                    if attempt + 1 >= COMPLETE_ATTEMPTS {
                        return Err(failed(format!(
                            "failed to complete sandbox image build after {COMPLETE_ATTEMPTS} attempts: {why}"
                        )));
                    }
                    self.events.push(Event::Warning(format!(
                        "complete did not answer ({why}); asking again in {:?}",
                        complete_backoff(attempt)
                    )));
                    return self.go(State::CompletePause(attempt), Call::Sleep(complete_backoff(attempt)));
                }
                let (status, body) = answer.map_err(failed)?;
                let body = text(&body);
                if !is_2xx(status) {
                    return Err(failed(format!("failed to complete sandbox image build (HTTP {status}): {body}")));
                }
                self.abort_url = None; // completed: nothing left to abort
                serde_json::from_str::<Value>(&body)
                    .map_err(|e| failed(format!("complete answer is not JSON: {e}")))?;
                self.outcome = Some(Ok(body));
                Ok(self.cleanup())
            }
            (State::CompletePause(attempt), Answer::Slept) => {
                let call = self.complete_call.clone().expect("the complete call precedes its retries");
                self.go(State::Complete(attempt + 1), call)
            }
            (state, answer) => Err(unexpected(state, &answer)),
        }
    }

    fn prepare(&mut self) -> Result<Next, BuildError> {
        self.stage("prepare");
        let r = &self.request;
        let body = serde_json::to_value(PrepareRequest {
            name: r.name.clone(),
            dockerfile: r.dockerfile.clone(),
            base_image: self.base_image.clone(),
            public: r.public,
            rootfs_node_kind: if self.parent_template.is_some() { "diff" } else { "base" }.into(),
            parent_template: self.parent_template.clone(),
            additional_local_images: self.local_templates.clone(),
        })
        .expect("a prepare request serializes");
        let call = self.http("POST", super::call::builds_url(&self.platform), &self.auth, Some(&body));
        self.go(State::Prepare, call)
    }

    /// The parent's ancestors (snapsign's `parent.ancestors`) and durable
    /// `additionalLocalImages` get a signed read each (§5.6).
    fn sign_local_images(&mut self) -> Result<Next, BuildError> {
        self.local_images = splice::reads_to_sign(&self.spec);
        match self.local_images.first() {
            Some((_, uri)) => {
                let call = self.get_blob(uri);
                self.go(State::SignLocal(0, 0), call)
            }
            None => self.setup(),
        }
    }

    fn setup(&mut self) -> Result<Next, BuildError> {
        self.stage("upload");
        self.setup_next(Some(Setup::MakeBuildDir))
    }

    fn setup_call(&self, step: Setup) -> Call {
        let (id, dir) = (self.id(), command::BUILD_DIR);
        let archive = format!("{dir}/context.tar");
        let context = format!("{dir}/context");
        let process = match step {
            Setup::MakeBuildDir => Process::new("mkdir", &["-p", dir], true),
            Setup::OpenBuildDir => Process::new("chmod", &["0777", dir], true),
            // Only what COPY and ADD read, when that is known (an image import reads its archive).
            Setup::UploadContext => {
                let only = match self.request.import_reference {
                    Some(_) => None,
                    None => super::context::referenced_paths(&self.request.dockerfile),
                };
                return Call::UploadContext { id, path: archive, only };
            }
            Setup::MakeContextDir => Process::new("mkdir", &["-p", &context], false),
            Setup::Unpack => {
                let flags = if self.context_gzipped { "-xzf" } else { "-xf" };
                Process::new("tar", &[flags, &archive, "-C", &context], false)
            }
            Setup::RemoveArchive => Process::new("rm", &["-f", &archive], false),
        };
        Call::Run { id, process, log: false }
    }

    /// Performs setup step `step`, or, after the last, writes spec.json.
    fn setup_next(&mut self, step: Option<Setup>) -> Result<Next, BuildError> {
        if let Some(step) = step {
            let call = self.setup_call(step);
            return self.go(State::Setup(step), call);
        }
        let context = format!("{}/context", command::BUILD_DIR);
        ClientFields {
            dockerfile: &self.request.dockerfile,
            context_dir: &context,
            base_image: &self.base_image,
            rootfs_disk_bytes: self.rootfs_bytes,
            import_image_reference: self.request.import_reference.as_deref(),
        }
        .write_into(&mut self.spec);
        let contents = serde_json::to_vec_pretty(&self.spec).expect("a JSON map always serializes");
        let (id, path) = (self.id(), format!("{}/spec.json", command::BUILD_DIR));
        self.go(State::WriteSpec, Call::WriteFile { id, path, contents })
    }

    /// A failure: before the sandbox exists it is the outcome; after, the
    /// upload is aborted, the sandbox diagnosed and deleted first.
    fn fail(&mut self, error: BuildError) -> Next {
        let cancelled = matches!(error, BuildError::Cancelled(_));
        self.outcome = Some(Err(error));
        if self.sandbox.is_none() {
            return self.finish(Duration::ZERO);
        }
        // A cancelled builder may still be writing parts: the sandbox goes
        // first (ending it), then the upload is aborted.
        if cancelled {
            return self.cleanup();
        }
        match self.abort_url.take() {
            Some(url) => {
                self.state = State::Abort;
                Next::Call(self.http("DELETE", url, &[], None))
            }
            None => self.diagnose_or_cleanup(),
        }
    }

    fn diagnose_or_cleanup(&mut self) -> Next {
        let failed_build = matches!(self.outcome, Some(Err(BuildError::Failed(_))));
        if self.ready && failed_build { self.diagnose(0) } else { self.cleanup() }
    }

    fn diagnose(&mut self, i: usize) -> Next {
        self.state = State::Diagnose(i);
        let process = Process::new("/bin/sh", &["-lc", diagnose::COMMANDS[i]], true);
        Next::Call(Call::RunCaptured { id: self.id(), process, timeout_secs: DIAGNOSE_TIMEOUT_SECS })
    }

    fn cleanup(&mut self) -> Next {
        self.stage("cleanup");
        self.state = State::Delete;
        Next::Call(Call::Delete { id: self.id() })
    }

    /// The unwinding steps: none of them can fail the build further.
    fn unwind(&mut self, answer: Answer, now: Duration) -> Next {
        match (self.state, answer) {
            // The abort URL is signed with the part URLs and expires with
            // them: while the sandbox (and its proxy) lives, a fresh one is
            // asked for once (§5.12).
            (State::Abort, Answer::Http(Ok((403, body))))
                if text(&body).contains("expired")
                    && !self.deleted
                    && !self.abort_refreshed
                    && self.upload_id.is_some()
                    && self.signed_uri.is_some() =>
            {
                self.abort_refreshed = true;
                self.warn("the abort URL of the multipart upload expired; asking the signer for a fresh one".into());
                let (uri, upload_id) = (self.signed_uri.clone().unwrap_or_default(), self.upload_id.clone());
                let hint = MultipartHint { max_parts: 1, ..sizing::multipart_hint(self.rootfs_bytes) };
                let call = self.sign_call(&SignRequest::refresh_upload(&uri, &upload_id.unwrap_or_default(), hint));
                self.state = State::AbortRefresh;
                Next::Call(call)
            }
            (State::AbortRefresh, Answer::Http(answer)) => {
                let fresh = signed(answer).ok().and_then(|answer| UploadHead::read(&answer).abort_url);
                match fresh {
                    Some(url) => {
                        self.state = State::Abort;
                        Next::Call(self.http("DELETE", url, &[], None))
                    }
                    None => {
                        self.left.push("the snapshot's multipart upload (its abort URL expired)".into());
                        self.warn(
                            "cannot abort the multipart upload: its abort URL expired and no fresh one was signed; \
                             the store's rule for incomplete uploads removes it"
                                .into(),
                        );
                        self.diagnose_or_cleanup()
                    }
                }
            }
            (State::Abort, Answer::Http(answer)) => {
                let warning = match answer {
                    Ok((status, _)) if is_2xx(status) => {
                        self.cleaned.push("aborted the snapshot's multipart upload".into());
                        format!("aborted the multipart upload of build {}", self.prepared().build_id)
                    }
                    Ok((status, body)) => {
                        self.left.push(format!("the snapshot's multipart upload (its abort answered HTTP {status})"));
                        format!("abort of the multipart upload answered HTTP {status}: {}", text(&body))
                    }
                    Err(e) => {
                        self.left.push(format!("the snapshot's multipart upload (its abort failed: {e})"));
                        format!("cannot abort the multipart upload: {e}")
                    }
                };
                self.warn(warning);
                if self.deleted { self.finish(now) } else { self.diagnose_or_cleanup() }
            }
            (State::Diagnose(i), Answer::Captured(lines)) => {
                self.diagnostics.push(lines.unwrap_or_default());
                if i + 1 < diagnose::COMMANDS.len() {
                    return self.diagnose(i + 1);
                }
                if let Some(Err(BuildError::Failed(message))) = &mut self.outcome {
                    let advice = diagnose::advice(message, &self.diagnostics[0], &self.diagnostics[1]);
                    *message = diagnose::with_advice(message, &advice);
                }
                self.cleanup()
            }
            (State::Delete, Answer::Done(deleted)) => {
                let id = self.id();
                match deleted {
                    Ok(()) => self.cleaned.push(format!("deleted builder sandbox {id}")),
                    Err(e) => {
                        self.left.push(format!("builder sandbox {id} (its delete failed: {e})"));
                        self.warn(format!("Failed to terminate rootfs builder sandbox {id} during cleanup: {e}"));
                    }
                }
                self.deleted = true;
                // A cancelled build aborts its upload once its builder is gone.
                match self.abort_url.take() {
                    Some(url) => {
                        self.state = State::Abort;
                        Next::Call(self.http("DELETE", url, &[], None))
                    }
                    None => self.finish(now),
                }
            }
            (State::Finished, _) => Next::Finished(Err(failed("build flow: stepped after it finished (a shell bug)"))),
            (state, answer) => {
                // A shell bug while unwinding: keep the first failure, still delete the sandbox.
                let bug = unexpected(state, &answer);
                self.warn(bug.to_string());
                if state == State::Delete { self.finish(now) } else { self.cleanup() }
            }
        }
    }

    fn finish(&mut self, now: Duration) -> Next {
        self.state = State::Finished;
        let outcome = self.outcome.take().unwrap_or_else(|| Err(failed("build flow: finished without an outcome")));
        match (outcome, self.sandbox.clone()) {
            (Ok(registered), _) => {
                self.stage(&format!("done in {:.1} s", now.saturating_sub(self.started).as_secs_f64()));
                Next::Finished(Ok(registered))
            }
            (Err(BuildError::Cancelled(message)), sandbox) => {
                // A cancelled build says what it cleaned and what it could not.
                let mut said = message;
                if self.cleaned.is_empty() && self.left.is_empty() {
                    said.push_str("; nothing was left to clean up");
                }
                if !self.cleaned.is_empty() {
                    said.push_str(&format!("; cleaned up: {}", self.cleaned.join(", ")));
                }
                if !self.left.is_empty() {
                    said.push_str(&format!("; left behind: {}", self.left.join(", ")));
                }
                if let Some(id) = sandbox {
                    said = decorate(&said, &id, &self.prepared().build_id);
                }
                Next::Finished(Err(BuildError::Cancelled(said)))
            }
            (Err(e), Some(id)) => {
                let build_id = &self.prepared().build_id;
                Next::Finished(Err(e.map(|m| decorate(m, &id, build_id))))
            }
            (Err(e), None) => Next::Finished(Err(e)),
        }
    }
}

#[cfg(test)]
mod tests;
