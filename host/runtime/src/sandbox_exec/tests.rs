//! The capability called through its view, as the guest's calls arrive,
//! with the in-memory fake backend: no wasm, no platform, no sandbox.

use std::sync::{Arc, Mutex};

use wasmtime::component::{Resource, ResourceTable};

use super::bindings::snapsign::components::sandbox_exec::{Host, HostFileWriter};
use super::bindings::snapsign::components::types::{self, SandboxError as WitError};
use super::fake::{FakeBackend, FakeProgram};
use super::{Compression, SandboxBackend, SandboxError, SandboxExecCtx, SandboxExecLimits, SandboxExecView};
use crate::outbound::AllowList;

const PROXY: &str = "http://127.0.0.1:4000";

struct Guest {
    ctx: SandboxExecCtx,
    table: ResourceTable,
    fake: FakeBackend,
    logged: Arc<Mutex<Vec<(String, String)>>>,
}

impl Guest {
    fn new(limits: SandboxExecLimits) -> Self {
        Guest::with(FakeBackend::new(PROXY), AllowList::new(["127.0.0.1:4000"]), limits)
    }

    fn with(fake: FakeBackend, outbound: AllowList, limits: SandboxExecLimits) -> Self {
        let logged = Arc::new(Mutex::new(Vec::new()));
        let sink = logged.clone();
        let ctx = SandboxExecCtx::new(Arc::new(fake.clone()), outbound)
            .with_limits(limits)
            .with_output(Arc::new(move |stream, line| sink.lock().unwrap().push((stream.into(), line.into()))));
        Guest { ctx, table: ResourceTable::new(), fake, logged }
    }

    fn view(&mut self) -> SandboxExecView<'_> {
        SandboxExecView { ctx: &mut self.ctx, table: &mut self.table }
    }

    async fn create(&mut self) -> String {
        let resources = types::Resources { cpus: 1.0, memory_mb: 512, disk_mb: 1024 };
        Host::create(&mut self.view(), "img".into(), resources, 60).await.expect("create").id
    }
}

fn process(command: &str, args: &[&str]) -> types::ProcessSpec {
    types::ProcessSpec {
        command: command.into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: vec![("PATH".into(), "/bin".into())],
        working_dir: Some("/work".into()),
        as_root: true,
    }
}

fn lines(output: &[(&str, &str)]) -> Vec<(String, String)> {
    output.iter().map(|(s, l)| (s.to_string(), l.to_string())).collect()
}

#[tokio::test]
async fn runs_a_process_and_reports_its_output_and_exit() {
    let mut guest = Guest::new(SandboxExecLimits::default());
    let id = guest.create().await;
    assert_eq!(Host::status(&mut guest.view(), id.clone()).await.unwrap(), "running");
    guest.fake.program(
        "/usr/local/bin/tl-rootfs-build",
        FakeProgram { output: lines(&[("stdout", "Step 1/2"), ("stderr", "warn")]), code: 3, ..Default::default() },
    );
    let exit = Host::run(&mut guest.view(), id.clone(), process("/usr/local/bin/tl-rootfs-build", &["--spec"]), true)
        .await
        .unwrap();
    assert_eq!((exit.code, exit.oom_killed), (3, false));
    assert_eq!(exit.last_error.as_deref(), Some("warn"), "the last stderr line of a logged run");
    assert_eq!(*guest.logged.lock().unwrap(), lines(&[("stdout", "Step 1/2"), ("stderr", "warn")]));
    let (ran_in, spec) = guest.fake.runs().pop().unwrap();
    assert_eq!((ran_in.as_str(), spec.working_dir.as_deref(), spec.as_root), (id.as_str(), Some("/work"), true));
    assert_eq!(spec.env, [("PATH".to_owned(), "/bin".to_owned())]);

    // Without log-output nothing reaches the embedder's log.
    guest
        .fake
        .program("oom", FakeProgram { output: lines(&[("stderr", "x")]), code: -9, oom_killed: true, hangs: false });
    let exit = Host::run(&mut guest.view(), id.clone(), process("oom", &[]), false).await.unwrap();
    assert_eq!((exit.code, exit.oom_killed, exit.last_error), (-9, true, None), "an unlogged run keeps no line");
    assert_eq!(guest.logged.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn writes_streams_and_reads_files() {
    let mut guest = Guest::new(SandboxExecLimits::default());
    let id = guest.create().await;
    Host::write_file(&mut guest.view(), id.clone(), "/b/spec.json".into(), b"{\"a\":1}\n".to_vec()).await.unwrap();
    assert_eq!(Host::read_file(&mut guest.view(), id.clone(), "/b/spec.json".into()).await.unwrap(), b"{\"a\":1}\n");

    let writer = Host::open_file_writer(&mut guest.view(), id.clone(), "/b/context.tar.gz".into()).await.unwrap();
    let rep = writer.rep();
    for chunk in [&b"hello "[..], b"world"] {
        HostFileWriter::write(&mut guest.view(), Resource::new_borrow(rep), chunk.to_vec()).await.unwrap();
    }
    assert_eq!(HostFileWriter::finish(&mut guest.view(), Resource::new_borrow(rep)).await.unwrap(), 11);
    assert_eq!(guest.fake.file(&id, "/b/context.tar.gz").as_deref(), Some(&b"hello world"[..]));
    let again = HostFileWriter::write(&mut guest.view(), Resource::new_borrow(rep), b"late".to_vec()).await;
    assert!(matches!(again, Err(WitError::Failed(m)) if m.contains("already finished")));

    // Dropping the writer removes it from the guest's table.
    HostFileWriter::drop(&mut guest.view(), writer).await.unwrap();
    assert!(guest.table.get(&Resource::<super::FileSink>::new_own(rep)).is_err(), "writer resource deleted");
    assert_eq!(guest.ctx.open_writers, 0);

    let cat = Host::run_captured(&mut guest.view(), id.clone(), process("cat", &["/b/spec.json"]), 5).await.unwrap();
    assert_eq!((cat.0.code, cat.1), (0, vec!["{\"a\":1}".to_owned()]));
    let missing = Host::read_file(&mut guest.view(), id, "/nope".into()).await;
    assert!(matches!(missing, Err(WitError::Failed(m)) if m.contains("/nope")));
}

#[tokio::test]
async fn backend_errors_reach_the_guest_as_the_wit_variants() {
    let mut guest = Guest::new(SandboxExecLimits::default());
    let id = guest.create().await;
    let cases = [
        (SandboxError::Transient("502 PROXY_ERROR".into()), "transient"),
        (SandboxError::Gone("terminated".into()), "gone"),
        (SandboxError::Denied("401".into()), "denied"),
        (SandboxError::Failed("boom".into()), "failed"),
        (SandboxError::Cancelled("stopped".into()), "cancelled"),
    ];
    for (error, variant) in cases {
        let message = match &error {
            SandboxError::Transient(m)
            | SandboxError::Gone(m)
            | SandboxError::Denied(m)
            | SandboxError::Failed(m)
            | SandboxError::Cancelled(m) => m.clone(),
        };
        guest.fake.fail_next("status", error);
        let got = Host::status(&mut guest.view(), id.clone()).await.unwrap_err();
        let (name, text) = match got {
            WitError::Transient(m) => ("transient", m),
            WitError::Gone(m) => ("gone", m),
            WitError::Denied(m) => ("denied", m),
            WitError::Failed(m) => ("failed", m),
            WitError::Cancelled(m) => ("cancelled", m),
        };
        assert_eq!((name, text), (variant, message));
    }
    guest.fake.fail_next("create", SandboxError::Denied("403 forbidden".into()));
    let resources = types::Resources { cpus: 1.0, memory_mb: 1, disk_mb: 1 };
    let refused = Host::create(&mut guest.view(), "img".into(), resources, 1).await;
    assert!(matches!(refused, Err(WitError::Denied(m)) if m == "403 forbidden"));
    assert_eq!(guest.ctx.live_sandboxes(), [id], "a refused create leaves nothing to delete");
}

#[tokio::test]
async fn only_sandboxes_the_guest_created_are_reachable() {
    let fake = FakeBackend::new(PROXY);
    // Another build (same token) created fake-1; this guest creates fake-2.
    let foreign = fake.create("img", super::Resources { cpus: 1.0, memory_mb: 1, disk_mb: 1 }, 1).await.unwrap().id;
    let mut guest = Guest::with(fake, AllowList::new([PROXY]), SandboxExecLimits::default());
    let own = guest.create().await;
    assert_ne!(own, foreign);
    let view = &mut guest.view();
    let refusals = [
        Host::status(view, foreign.clone()).await.unwrap_err(),
        Host::proxy(view, foreign.clone()).await.map(drop).unwrap_err(),
        Host::run(view, foreign.clone(), process("/bin/true", &[]), false).await.map(drop).unwrap_err(),
        Host::write_file(view, foreign.clone(), "/x".into(), vec![1]).await.unwrap_err(),
        Host::read_file(view, foreign.clone(), "/x".into()).await.map(drop).unwrap_err(),
        Host::open_file_writer(view, foreign.clone(), "/x".into()).await.map(drop).unwrap_err(),
        Host::delete(view, foreign.clone()).await.unwrap_err(),
    ];
    for refusal in refusals {
        assert!(
            matches!(&refusal, WitError::Failed(m) if m.contains(&foreign) && m.contains("not created")),
            "{refusal:?}"
        );
    }
    assert!(guest.fake.live().contains(&foreign), "the foreign sandbox is untouched");
    assert!(guest.fake.runs().is_empty());
}

#[tokio::test]
async fn enforces_its_limits() {
    let limits = SandboxExecLimits {
        max_sandboxes: 1,
        max_open_writers: 1,
        max_read_bytes: 8,
        max_write_bytes: 8,
        max_captured_bytes: 10,
    };
    let mut guest = Guest::new(limits);
    let id = guest.create().await;
    let resources = types::Resources { cpus: 1.0, memory_mb: 1, disk_mb: 1 };
    let second = Host::create(&mut guest.view(), "img".into(), resources, 1).await;
    assert!(matches!(second, Err(WitError::Failed(m)) if m.contains("1 live sandboxes") && m.contains(&id)));
    assert_eq!(guest.fake.live(), std::slice::from_ref(&id), "the refused create never reached the backend");

    let big = Host::write_file(&mut guest.view(), id.clone(), "/big".into(), vec![0; 9]).await;
    assert!(matches!(big, Err(WitError::Failed(m)) if m.contains("9 bytes") && m.contains("8-byte limit")));
    Host::write_file(&mut guest.view(), id.clone(), "/ok".into(), vec![0; 8]).await.unwrap();
    assert_eq!(Host::read_file(&mut guest.view(), id.clone(), "/ok".into()).await.unwrap().len(), 8);
    guest.fake.write_file(&id, "/large", vec![0; 9]).await.unwrap();
    let large = Host::read_file(&mut guest.view(), id.clone(), "/large".into()).await;
    assert!(matches!(large, Err(WitError::Failed(m)) if m.contains("/large") && m.contains("8-byte read limit")));

    let first = Host::open_file_writer(&mut guest.view(), id.clone(), "/a".into()).await.unwrap();
    let refused = Host::open_file_writer(&mut guest.view(), id.clone(), "/b".into()).await;
    assert!(matches!(refused, Err(WitError::Failed(m)) if m.contains("1 open file writers")));
    HostFileWriter::drop(&mut guest.view(), first).await.unwrap();
    let reopened = Host::open_file_writer(&mut guest.view(), id.clone(), "/b".into()).await.unwrap();
    HostFileWriter::drop(&mut guest.view(), reopened).await.unwrap();

    guest.fake.program(
        "df",
        FakeProgram {
            output: lines(&[("stdout", "12345"), ("stdout", "67890"), ("stdout", "more")]),
            ..Default::default()
        },
    );
    let (_, captured) = Host::run_captured(&mut guest.view(), id.clone(), process("df", &[]), 5).await.unwrap();
    assert_eq!(captured, ["12345", "67890", "[output cut at 10 bytes by sandbox-exec]"]);

    guest.fake.program("hang", FakeProgram { hangs: true, ..Default::default() });
    let hung = Host::run_captured(&mut guest.view(), id, process("hang", &[]), 1).await;
    assert!(matches!(hung, Err(WitError::Failed(m)) if m.contains("did not finish within 1s")));
}

#[tokio::test]
async fn deleting_frees_the_sandbox_and_its_slot() {
    let mut guest = Guest::new(SandboxExecLimits { max_sandboxes: 1, ..SandboxExecLimits::default() });
    let id = guest.create().await;
    guest.fake.fail_next("delete", SandboxError::Transient("503".into()));
    assert!(matches!(Host::delete(&mut guest.view(), id.clone()).await, Err(WitError::Transient(_))));
    assert_eq!(guest.ctx.live_sandboxes(), std::slice::from_ref(&id), "a failed delete may be retried");
    Host::delete(&mut guest.view(), id.clone()).await.unwrap();
    assert!(guest.ctx.live_sandboxes().is_empty() && guest.fake.live().is_empty());
    assert_eq!(guest.fake.deleted(), std::slice::from_ref(&id));
    assert!(Host::status(&mut guest.view(), id).await.is_err(), "a deleted sandbox is no longer reachable");
    guest.create().await; // the slot is free again
}

#[tokio::test]
async fn a_proxy_outside_the_outbound_policy_is_refused_and_the_policy_stays_as_set() {
    let policy = AllowList::new(["127.0.0.1:8080"]);
    let mut guest =
        Guest::with(FakeBackend::new("https://sbx.elsewhere.example"), policy.clone(), SandboxExecLimits::default());
    let id = guest.create().await;
    let refused = Host::proxy(&mut guest.view(), id.clone()).await;
    assert!(
        matches!(&refused, Err(WitError::Failed(m)) if m.contains("sbx.elsewhere.example") && m.contains("--allow-host")),
        "{refused:?}"
    );
    assert!(!policy.permits("sbx.elsewhere.example", true), "the backend did not widen the policy");

    let mut guest = Guest::new(SandboxExecLimits::default());
    let id = guest.create().await;
    let endpoint = Host::proxy(&mut guest.view(), id.clone()).await.unwrap();
    assert_eq!(endpoint.base_url, PROXY);
    assert_eq!(endpoint.headers, [("x-tensorlake-sandbox-id".to_owned(), id)]);
}

/// upload-directory packs only the directory the embedder lent, into a
/// sandbox this guest created; every other path is refused by name.
#[tokio::test]
async fn upload_directory_packs_only_the_lent_directory_into_an_own_sandbox() {
    let context = tempfile::tempdir().unwrap();
    std::fs::create_dir(context.path().join("app")).unwrap();
    std::fs::write(context.path().join("app/main.py"), "print('hi')\n").unwrap();
    std::fs::write(context.path().join("secret.env"), "TOKEN=x\n").unwrap();
    let progress = Arc::new(Mutex::new(Vec::new()));
    let seen = progress.clone();
    let fake = FakeBackend::new(PROXY);
    let ctx = SandboxExecCtx::new(Arc::new(fake.clone()), AllowList::new(["127.0.0.1:4000"]))
        .with_directory("/context", context.path().to_owned())
        .with_progress(Arc::new(move |sent, total| seen.lock().unwrap().push((sent, total))));
    let mut guest = Guest { ctx, table: ResourceTable::new(), fake, logged: Arc::default() };
    let id = guest.create().await;

    for asked in ["/", "/etc", "/context/app", "/context/../etc", "context", ""] {
        let error = Host::upload_directory(&mut guest.view(), id.clone(), asked.into(), vec![], "/tmp/c.tgz".into())
            .await
            .unwrap_err();
        let WitError::Failed(message) = error else { panic!("{asked}: {error:?}") };
        assert!(message.contains("only a directory the host lent") && message.contains("/context"), "{message}");
    }
    let error = Host::upload_directory(&mut guest.view(), "sbx-other".into(), "/context".into(), vec![], "/x".into())
        .await
        .unwrap_err();
    assert!(matches!(&error, WitError::Failed(m) if m.contains("not created through this sandbox-exec")), "{error:?}");
    let error = Host::upload_directory(&mut guest.view(), id.clone(), "/context".into(), vec!["!".into()], "/x".into())
        .await
        .unwrap_err();
    assert!(matches!(&error, WitError::Failed(m) if m.contains("exclusions")), "{error:?}");

    let uploaded = Host::upload_directory(
        &mut guest.view(),
        id.clone(),
        "/context/".into(),
        vec!["*.env".into()],
        "/tmp/c.tar".into(),
    )
    .await
    .unwrap();
    let bytes = guest.fake.file(&id, "/tmp/c.tar").expect("the archive is in the sandbox");
    assert_eq!(uploaded.bytes, bytes.len() as u64);
    // Its proxy is on loopback: the plain tar.
    assert!(!uploaded.gzip);
    let mut archive = tar::Archive::new(bytes.as_slice());
    let names: Vec<String> =
        archive.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, ["app/", "app/main.py"]);
    assert_eq!(progress.lock().unwrap().last(), Some(&(uploaded.bytes, uploaded.bytes)));
}

/// The context goes gzipped to a sandbox on another machine and plain to
/// one on this machine, unless the embedder says otherwise; the answer
/// says which, and the bytes are what it says.
#[tokio::test]
async fn upload_directory_gzips_for_a_remote_sandbox_only_unless_told() {
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("a.txt"), "a".repeat(10_000)).unwrap();
    for (proxy, compression, gzip) in [
        ("http://127.0.0.1:4000", Compression::Auto, false),
        ("https://sandbox.example.com", Compression::Auto, true),
        ("http://127.0.0.1:4000", Compression::Always, true),
        ("https://sandbox.example.com", Compression::Never, false),
    ] {
        let fake = FakeBackend::new(proxy);
        let ctx = SandboxExecCtx::new(Arc::new(fake.clone()), AllowList::new(["127.0.0.1:4000"]))
            .with_directory("/context", context.path().to_owned())
            .with_compression(compression);
        let mut guest = Guest { ctx, table: ResourceTable::new(), fake, logged: Arc::default() };
        let id = guest.create().await;
        let uploaded = Host::upload_directory(&mut guest.view(), id.clone(), "/context".into(), vec![], "/c".into())
            .await
            .unwrap();
        let case = format!("{proxy} {compression:?}");
        assert_eq!(uploaded.gzip, gzip, "{case}");
        let bytes = guest.fake.file(&id, "/c").unwrap();
        assert_eq!(bytes.starts_with(&[0x1f, 0x8b]), gzip, "{case}");
        let tar: Box<dyn std::io::Read> =
            if gzip { Box::new(flate2::read::GzDecoder::new(bytes.as_slice())) } else { Box::new(bytes.as_slice()) };
        let mut archive = tar::Archive::new(tar);
        let mut entry = archive.entries().unwrap().next().unwrap().unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(&mut entry, &mut text).unwrap();
        assert_eq!((entry.path().unwrap().to_str().unwrap(), text.len()), ("a.txt", 10_000), "{case}");
    }
}

#[tokio::test]
async fn a_cancelled_build_stops_its_pending_call_refuses_later_ones_and_still_deletes() {
    let mut guest = Guest::new(SandboxExecLimits::default());
    let cancel = super::Cancel::new();
    guest.ctx = SandboxExecCtx::new(Arc::new(guest.fake.clone()), AllowList::new(["127.0.0.1:4000"]))
        .with_cancel(cancel.clone());
    let id = guest.create().await;
    let kept = guest.create().await;
    assert_eq!(cancel.held_sandboxes(), {
        let mut both = vec![id.clone(), kept.clone()];
        both.sort();
        both
    });
    guest.fake.program("/bin/sleep", FakeProgram { hangs: true, ..Default::default() });

    // The builder hangs; Ctrl-C arrives while the host waits for it.
    let canceller = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        canceller.cancel();
    });
    let stopped = Host::run(&mut guest.view(), id.clone(), process("/bin/sleep", &["600"]), true).await;
    match stopped {
        Err(WitError::Cancelled(m)) => assert_eq!(m, format!("/bin/sleep in sandbox {id} was stopped")),
        other => panic!("expected cancelled, got {other:?}"),
    }

    // Every later call answers at once, without reaching the backend...
    let runs = guest.fake.runs().len();
    let refused = Host::run(&mut guest.view(), id.clone(), process("/bin/true", &[]), false).await;
    assert!(matches!(&refused, Err(WitError::Cancelled(m)) if m.ends_with("was not started")), "{refused:?}");
    assert_eq!(guest.fake.runs().len(), runs, "a refused run never reached the backend");
    let status = Host::status(&mut guest.view(), id.clone()).await;
    assert!(matches!(status, Err(WitError::Cancelled(_))), "{status:?}");
    let write = Host::write_file(&mut guest.view(), id.clone(), "/x".into(), b"x".to_vec()).await;
    assert!(matches!(write, Err(WitError::Cancelled(_))), "{write:?}");
    let read = Host::read_file(&mut guest.view(), id.clone(), "/x".into()).await;
    assert!(matches!(read, Err(WitError::Cancelled(_))), "{read:?}");
    let resources = types::Resources { cpus: 1.0, memory_mb: 512, disk_mb: 1024 };
    let create = Host::create(&mut guest.view(), "img".into(), resources, 60).await;
    assert!(matches!(create, Err(WitError::Cancelled(_))), "{create:?}");

    // ...but delete, the cleanup, goes through, and what is still held is known.
    Host::delete(&mut guest.view(), id.clone()).await.expect("delete after cancel");
    assert!(guest.fake.deleted().contains(&id), "{:?}", guest.fake.deleted());
    assert_eq!(cancel.held_sandboxes(), std::slice::from_ref(&kept));
    assert_eq!(guest.ctx.live_sandboxes(), [kept]);
}
