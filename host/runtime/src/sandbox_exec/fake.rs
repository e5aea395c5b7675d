//! A fake sandbox backend for tests: sandboxes, files and scripted
//! processes in memory, so the capability's checks can be driven without a
//! platform, a sandbox or wasm. Not for builds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use futures_util::StreamExt;

use super::backend::{
    Created, Endpoint, Exit, FileSink, LineSink, Process, Resources, SandboxBackend, SandboxError, too_large,
};

/// What a scripted command prints and how it ends.
#[derive(Debug, Clone, Default)]
pub struct FakeProgram {
    /// Output lines: (stream, line).
    pub output: Vec<(String, String)>,
    /// Exit code.
    pub code: i64,
    /// Ended by the OOM killer.
    pub oom_killed: bool,
    /// Never ends (for timeouts).
    pub hangs: bool,
}

#[derive(Debug, Default)]
struct State {
    next: u64,
    sandboxes: BTreeMap<String, BTreeMap<String, Vec<u8>>>,
    deleted: Vec<String>,
    programs: HashMap<String, FakeProgram>,
    faults: VecDeque<(&'static str, SandboxError)>,
    runs: Vec<(String, Process)>,
}

/// The in-memory fake. `cat PATH` prints a file's lines; other commands
/// run as scripted with [`FakeBackend::program`], or exit 127.
#[derive(Debug, Clone)]
pub struct FakeBackend {
    state: Arc<Mutex<State>>,
    proxy_url: String,
}

impl FakeBackend {
    /// A fake whose sandboxes' proxy answers at `proxy_url`.
    pub fn new(proxy_url: &str) -> Self {
        FakeBackend { state: Arc::default(), proxy_url: proxy_url.to_owned() }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Scripts `command`.
    pub fn program(&self, command: &str, program: FakeProgram) {
        self.state().programs.insert(command.to_owned(), program);
    }

    /// Makes the next `operation` ("create", "status", "run", "write_file",
    /// "open_file", "read_file", "delete") fail with `error`.
    pub fn fail_next(&self, operation: &'static str, error: SandboxError) {
        self.state().faults.push_back((operation, error));
    }

    /// Sandboxes that exist.
    pub fn live(&self) -> Vec<String> {
        self.state().sandboxes.keys().cloned().collect()
    }

    /// Sandboxes deleted so far.
    pub fn deleted(&self) -> Vec<String> {
        self.state().deleted.clone()
    }

    /// A file's contents, if it exists.
    pub fn file(&self, id: &str, path: &str) -> Option<Vec<u8>> {
        self.state().sandboxes.get(id)?.get(path).cloned()
    }

    /// Processes run so far: (sandbox, spec).
    pub fn runs(&self) -> Vec<(String, Process)> {
        self.state().runs.clone()
    }

    fn check(&self, operation: &'static str, id: Option<&str>) -> Result<(), SandboxError> {
        let mut state = self.state();
        if let Some(at) = state.faults.iter().position(|(op, _)| *op == operation) {
            let (_, error) = state.faults.remove(at).expect("position is in range");
            return Err(error);
        }
        match id {
            Some(id) if !state.sandboxes.contains_key(id) => Err(SandboxError::Gone(format!("no fake sandbox {id}"))),
            _ => Ok(()),
        }
    }
}

#[async_trait::async_trait]
impl SandboxBackend for FakeBackend {
    async fn create(&self, _image: &str, _resources: Resources, _timeout_secs: i64) -> Result<Created, SandboxError> {
        self.check("create", None)?;
        let mut state = self.state();
        state.next += 1;
        let id = format!("fake-{}", state.next);
        state.sandboxes.insert(id.clone(), BTreeMap::new());
        Ok(Created { id, status: "running".into() })
    }

    async fn status(&self, id: &str) -> Result<String, SandboxError> {
        self.check("status", Some(id)).map(|()| "running".into())
    }

    /// By its proxy URL, without the fault checks `proxy` makes (a fault
    /// queued for a later `proxy` call stays queued).
    fn on_this_machine(&self, _id: &str) -> bool {
        super::backend::is_loopback_url(&self.proxy_url)
    }

    fn proxy(&self, id: &str) -> Result<Endpoint, SandboxError> {
        self.check("proxy", Some(id))?;
        Ok(Endpoint {
            base_url: self.proxy_url.clone(),
            headers: vec![("x-tensorlake-sandbox-id".into(), id.to_owned())],
        })
    }

    async fn run(&self, id: &str, spec: Process, sink: &mut LineSink<'_>) -> Result<Exit, SandboxError> {
        self.check("run", Some(id))?;
        let program = {
            let mut state = self.state();
            state.runs.push((id.to_owned(), spec.clone()));
            if spec.command == "cat" || spec.command == "/bin/cat" {
                let file = spec.args.first().and_then(|path| state.sandboxes[id].get(path));
                match file {
                    Some(bytes) => FakeProgram {
                        output: String::from_utf8_lossy(bytes).lines().map(|l| ("stdout".into(), l.into())).collect(),
                        ..FakeProgram::default()
                    },
                    None => FakeProgram {
                        output: vec![("stderr".into(), format!("cat: {:?}: no such file", spec.args.first()))],
                        code: 1,
                        ..FakeProgram::default()
                    },
                }
            } else {
                state.programs.get(&spec.command).cloned().unwrap_or_else(|| FakeProgram {
                    output: vec![("stderr".into(), format!("{}: command not found", spec.command))],
                    code: 127,
                    ..FakeProgram::default()
                })
            }
        };
        for (stream, line) in &program.output {
            sink(stream, line);
        }
        if program.hangs {
            std::future::pending::<()>().await;
        }
        Ok(Exit { code: program.code, oom_killed: program.oom_killed, last_error: None })
    }

    async fn write_file(&self, id: &str, path: &str, contents: Vec<u8>) -> Result<(), SandboxError> {
        self.check("write_file", Some(id))?;
        self.state().sandboxes.get_mut(id).map(|files| files.insert(path.to_owned(), contents));
        Ok(())
    }

    async fn open_file(&self, id: &str, path: &str) -> Result<FileSink, SandboxError> {
        self.check("open_file", Some(id))?;
        let (tx, stream) = FileSink::channel();
        let mut stream = Box::pin(stream);
        let (state, id, path) = (self.state.clone(), id.to_owned(), path.to_owned());
        let done = tokio::spawn(async move {
            let mut bytes = Vec::new();
            while let Some(chunk) = stream.next().await {
                bytes.extend_from_slice(&chunk.map_err(|e| SandboxError::Failed(e.to_string()))?);
            }
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            let files =
                state.sandboxes.get_mut(&id).ok_or_else(|| SandboxError::Gone(format!("no fake sandbox {id}")))?;
            files.insert(path, bytes);
            Ok(())
        });
        Ok(FileSink::new(tx, done))
    }

    async fn read_file(&self, id: &str, path: &str, max_bytes: u64) -> Result<Vec<u8>, SandboxError> {
        self.check("read_file", Some(id))?;
        let bytes = self
            .file(id, path)
            .ok_or_else(|| SandboxError::Failed(format!("read {path} failed (HTTP 404): no such file")))?;
        if bytes.len() as u64 > max_bytes {
            return Err(too_large(id, path, max_bytes));
        }
        Ok(bytes)
    }

    async fn delete(&self, id: &str) -> Result<(), SandboxError> {
        self.check("delete", Some(id))?;
        let mut state = self.state();
        state.sandboxes.remove(id);
        state.deleted.push(id.to_owned());
        Ok(())
    }
}
