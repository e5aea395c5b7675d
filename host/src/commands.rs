//! One function per `snapsign` command.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use snapsign_dev_stack::store;
use snapsign_host::engine::{self, EngineLimits};
use snapsign_host::image_build::{self, BuildFailure, BuildOptions};
use snapsign_host::sandbox_exec::Cancel;
use snapsign_host::signer;

use crate::cli::{
    Backend, BenchWhat, BuildArgs, Command, DevArgs, ImportArgs, PlatformArgs, ServeSignerArgs, StoreArgs,
    TemplatesWhat, TokenArgs,
};

/// Runs `command`; the exit code tells the outcome.
pub async fn run(command: Command) -> Result<ExitCode> {
    match command {
        Command::Build(args) => return build(args, None).await,
        Command::Import(args) => return import(args).await,
        Command::ServeSigner(args) => serve_signer(args).await?,
        Command::Demo { allow_unconfined } => demo(allow_unconfined).await?,
        Command::Templates { what } => templates(what).await?,
        Command::Dev(args) => dev(args).await?,
        Command::Token(args) => token(args)?,
        Command::Deploy { target } => snapsign_foreign_hosts::cli::deploy(target).await?,
        Command::Bench { what } => bench(what).await?,
        Command::Store(args) => serve_store(args).await?,
    }
    Ok(ExitCode::SUCCESS)
}

fn this_executable_as_builder() -> Result<PathBuf> {
    std::env::current_exe().context("find this executable (installed as the sandbox builder)")
}

fn default_data_dir() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("snapsign").join("dev")
}

/// Ctrl-C or SIGTERM, with the handlers installed now: a server calls this
/// before it prints its address, so a signal sent once the address is read
/// cannot arrive before the handler (and kill the process uncleanly).
fn stop_signal() -> Result<impl std::future::Future<Output = ()>> {
    let mut signals = StopSignals::install()?;
    Ok(async move { signals.next().await })
}

/// Ctrl-C and SIGTERM, each time they come.
struct StopSignals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn install() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignals {
                term: signal(SignalKind::terminate()).context("install the SIGTERM handler")?,
                interrupt: signal(SignalKind::interrupt()).context("install the SIGINT handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The next Ctrl-C or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! { _ = self.term.recv() => {}, _ = self.interrupt.recv() => {} }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The exit code of a build stopped by Ctrl-C or SIGTERM (128 + SIGINT, as shells report it).
const CANCELLED_EXIT: u8 = 130;

/// During a build, the first Ctrl-C or SIGTERM cancels it: its sandbox calls
/// stop and it cleans up (wit/protocol.md §5.10). A second exits at once,
/// after saying what is left behind.
fn cancel_on_signals(cancel: Cancel) -> Result<tokio::task::JoinHandle<()>> {
    let mut signals = StopSignals::install()?;
    Ok(tokio::spawn(async move {
        signals.next().await;
        eprintln!("cancelling the build: stopping it and cleaning up (press Ctrl-C again to exit at once)");
        cancel.cancel();
        signals.next().await;
        eprintln!("{}", left_behind(&cancel.held_sandboxes()));
        std::process::exit(i32::from(CANCELLED_EXIT));
    }))
}

/// What a second Ctrl-C leaves behind, said before exiting.
fn left_behind(sandboxes: &[String]) -> String {
    let held = match sandboxes {
        [] => "no builder sandbox the build knew of (one being created at this moment may remain)".to_owned(),
        [one] => format!("builder sandbox {one}"),
        many => format!("builder sandboxes {}", many.join(", ")),
    };
    let ends = if sandboxes.is_empty() {
        String::new()
    } else {
        format!(
            " (the platform ends it about {} s after the build's last request to it; or delete it with the \
             lifecycle API)",
            snapsign::image_build::flow::SANDBOX_TIMEOUT_SECS
        )
    };
    format!(
        "exiting without cleaning up; left behind: {held}{ends}, and the snapshot's multipart upload if one was \
         signed and not yet aborted (the store's rule for incomplete uploads removes it)"
    )
}

/// `snapsign build`: exit 0 registered, 1 build failed, 2 usage error, 3 credentials refused.
/// `snapsign import`: a build of a synthetic Dockerfile. A registry
/// reference is `FROM <ref>` (the platform imports it at prepare); a local
/// image is sent as the build context and named in spec.json's
/// `importImageReference` (`context:<name>`), which the builder lays out.
async fn import(args: ImportArgs) -> Result<ExitCode> {
    let ImportArgs { image, name, disk_mb, public, platform, timeout_secs, json } = args;
    let path = PathBuf::from(&image);
    let local = path.exists();
    let looks_like_a_path = image.starts_with(['/', '.', '~'])
        || [".tar", ".tar.gz", ".tgz", ".tar.zst"].iter().any(|ext| image.ends_with(ext));
    if !local && looks_like_a_path {
        eprintln!(
            "error: {image} does not exist; pass a docker save archive, an OCI layout (directory or tar), a rootfs \
             tarball, or a registry reference such as 127.0.0.1:5000/team/base:1.2"
        );
        return Ok(ExitCode::from(2));
    }
    let name = match name {
        Some(name) => name,
        None => match default_import_name(&image, local) {
            Some(name) => name,
            None => {
                eprintln!("error: cannot make a template name from {image}; pass --name");
                return Ok(ExitCode::from(2));
            }
        },
    };
    let scratch = std::env::temp_dir().join(format!("snapsign-import-{}", std::process::id()));
    let _cleanup = RemoveOnDrop(scratch.clone());
    let context = scratch.join("context");
    std::fs::create_dir_all(&context).with_context(|| format!("create {}", context.display()))?;
    let (dockerfile_text, context, reference) = if !local {
        (
            format!(
                "FROM {image}
"
            ),
            context,
            None,
        )
    } else if path.is_dir() {
        // An OCI layout directory is the context itself.
        (
            "FROM scratch
"
            .to_owned(),
            path.clone(),
            Some("context:.".to_owned()),
        )
    } else {
        let file = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
        let target = context.join(&file);
        if std::fs::hard_link(&path, &target).is_err() {
            std::fs::copy(&path, &target).with_context(|| format!("copy {} into the import's context", image))?;
        }
        (
            "FROM scratch
"
            .to_owned(),
            context,
            Some(format!("context:{file}")),
        )
    };
    let dockerfile = scratch.join("Dockerfile");
    std::fs::write(&dockerfile, dockerfile_text).with_context(|| format!("write {}", dockerfile.display()))?;
    let args = BuildArgs {
        dockerfile,
        context,
        name,
        build_args: Vec::new(),
        disk_mb,
        builder_cpus: None,
        builder_memory_mb: None,
        builder_disk_mb: None,
        public,
        platform,
        allow_hosts: Vec::new(),
        sandbox_wait_secs: 120,
        compress_context: Default::default(),
        max_memory_mb: 256,
        timeout_secs,
        json,
        backend: Backend::Proxy,
        signer_url: None,
        signer_token: None,
        sandboxes_dir: None,
        allow_unconfined: false,
    };
    build(args, reference).await
}

/// `team/base:1.2` → `base`, `x@sha256:…` → `x`, `/tmp/app.tar.gz` → `app`.
fn default_import_name(image: &str, local: bool) -> Option<String> {
    let name = if local {
        let file = Path::new(image).file_name()?.to_string_lossy().into_owned();
        file.split('.').next().unwrap_or_default().to_owned()
    } else {
        let last = image.rsplit('/').next()?;
        let last = last.split('@').next()?;
        last.split(':').next()?.to_owned()
    };
    (!name.is_empty()).then_some(name)
}

/// Removes a scratch directory when dropped.
struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn build(args: BuildArgs, import_reference: Option<String>) -> Result<ExitCode> {
    let BuildArgs {
        dockerfile,
        context,
        name,
        build_args,
        disk_mb,
        builder_cpus,
        builder_memory_mb,
        builder_disk_mb,
        public,
        platform,
        allow_hosts,
        sandbox_wait_secs,
        compress_context,
        max_memory_mb,
        timeout_secs,
        json,
        backend,
        signer_url,
        signer_token,
        sandboxes_dir,
        allow_unconfined,
    } = args;
    let ended = |failure: BuildFailure| ended(json, failure);
    let scope = match platform.scope() {
        Ok(scope) => scope,
        Err(e) => return Ok(ended(BuildFailure::Usage(e.to_string()))),
    };
    let PlatformArgs { api_url, token, namespace, .. } = platform;
    let (build_args, unset) = resolve_build_args(&build_args, |name| std::env::var(name).ok());
    for name in unset {
        eprintln!("warning: build argument {name} is not set: it has no value here and is not in the environment");
    }
    let text = match std::fs::read_to_string(&dockerfile) {
        Ok(text) => text,
        Err(e) => {
            let message = format!("cannot read the Dockerfile {}: {e}; pass --dockerfile", dockerfile.display());
            return Ok(ended(BuildFailure::Usage(message)));
        }
    };
    if !context.is_dir() {
        let message = format!("the build context {} is not a directory; pass --context", context.display());
        return Ok(ended(BuildFailure::Usage(message)));
    }
    let request = snapsign::image_build::call::Request {
        api_url,
        token,
        name: name.clone(),
        dockerfile: text,
        disk_mb,
        builder_cpus,
        builder_memory_mb,
        builder_disk_mb,
        public,
        sandbox_wait_secs: sandbox_wait_secs.clamp(1, u64::from(u32::MAX)) as u32,
        import_reference,
        scope,
        build_args,
    };
    let options = BuildOptions {
        request,
        namespace,
        context_dir: context,
        compression: compress_context,
        allow_hosts,
        max_memory_bytes: max_memory_mb << 20,
        timeout: Duration::from_secs(timeout_secs),
        cache_dir: engine::default_cache_dir(),
        cancel: Cancel::new(),
    };
    let cancelling = cancel_on_signals(options.cancel.clone())?;
    let printer =
        if json { snapsign_host::progress::json_printer() } else { snapsign_host::progress::progress_printer() };
    let ran = match backend {
        Backend::Proxy => image_build::run(&options, printer).await,
        Backend::Local => {
            let (Some(url), Some(token)) = (signer_url, signer_token) else {
                let message = "--backend local needs --signer-url and --signer-token (or SNAPSIGN_SIGNER_URL/TOKEN)";
                return Ok(ended(BuildFailure::Usage(message.into())));
            };
            let dir = sandboxes_dir
                .unwrap_or_else(|| std::env::temp_dir().join(format!("snapsign-sandboxes-{}", std::process::id())));
            let builder = this_executable_as_builder()?;
            let result = image_build::run_local(&options, &dir, builder, allow_unconfined, &url, &token, printer).await;
            let _ = std::fs::remove_dir(&dir);
            result
        }
    };
    cancelling.abort();
    // The host itself failed (the engine, a trap, the time limit): a failed build, said the same way.
    let outcome = match ran {
        Ok((outcome, _)) => outcome,
        Err(e) => Err(BuildFailure::Failed(format!("{e:#}"))),
    };
    Ok(match outcome {
        Ok(template) => {
            if options.cancel.is_cancelled() {
                eprintln!("the build was registered before the cancel took effect");
            }
            if json {
                snapsign_host::progress::print_json_line(&serde_json::json!({"event": "result", "template": template}));
            } else {
                println!("Image '{name}' registered ({})", template["id"].as_str().unwrap_or("-"));
            }
            ExitCode::SUCCESS
        }
        Err(failure) => ended(failure),
    })
}

/// `--build-arg` values: `NAME=VALUE` as given, `NAME` alone from `env`;
/// the names `env` has no value for are left out and returned, as Docker
/// leaves them unset.
fn resolve_build_args(given: &[String], env: impl Fn(&str) -> Option<String>) -> (Vec<(String, String)>, Vec<String>) {
    let (mut args, mut unset) = (Vec::new(), Vec::new());
    for arg in given {
        match arg.split_once('=') {
            Some((name, value)) => args.push((name.to_owned(), value.to_owned())),
            None => match env(arg) {
                Some(value) => args.push((arg.clone(), value)),
                None => unset.push(arg.clone()),
            },
        }
    }
    (args, unset)
}

/// A build that did not register: the error on stderr (and with `--json`
/// the last NDJSON line, `{"event":"error",…}`), and its exit code: 1
/// failed, 2 usage, 3 credentials refused, 130 cancelled.
fn ended(json: bool, failure: BuildFailure) -> ExitCode {
    eprintln!("error: {failure}");
    let (kind, code) = match failure {
        BuildFailure::Usage(_) => ("usage", 2),
        BuildFailure::Auth(_) => ("auth", 3),
        BuildFailure::Failed(_) => ("failed", 1),
        BuildFailure::Cancelled(_) => ("cancelled", CANCELLED_EXIT),
    };
    if json {
        let line =
            serde_json::json!({"event": "error", "kind": kind, "message": failure.to_string(), "exitCode": code});
        snapsign_host::progress::print_json_line(&line);
    }
    ExitCode::from(code)
}

/// `snapsign serve-signer`.
async fn serve_signer(args: ServeSignerArgs) -> Result<()> {
    let ServeSignerArgs {
        listen,
        env,
        max_memory_mb,
        timeout_secs,
        max_concurrency,
        cache_dir,
        max_instance_reuse,
        no_preinit,
        serve,
    } = args;
    let config = signer::SignerServerConfig {
        listen,
        env: signer::guest_env(&env)?,
        limits: EngineLimits { max_concurrency, max_memory_bytes: max_memory_mb << 20 },
        request_timeout: Duration::from_secs(timeout_secs),
        cache_dir: cache_dir.unwrap_or_else(engine::default_cache_dir),
        max_instance_reuse,
        preinit: !no_preinit,
    };
    let stop = stop_signal()?;
    let (server, host) = signer::start_with(&config, serve.limits()).await?;
    println!("signer listening on {}", server.url());
    // Until the snapshot is in place fresh instances run the component's own
    // start-up; say when that ends (benchmarks wait for this line).
    tokio::spawn(async move {
        let state = host.preinit_settled().await;
        println!("signer pre-initialization: {}", preinit_report(&state));
    });
    stop.await;
    tracing::info!("stopping the signer");
    server.shutdown().await;
    Ok(())
}

/// How pre-initialization ended, in words.
fn preinit_report(state: &signer::PreinitState) -> String {
    match state {
        signer::PreinitState::Off => "off (--no-preinit)".into(),
        signer::PreinitState::Pending => "still running".into(),
        signer::PreinitState::Ready { took, memory_bytes } => {
            format!(
                "ready in {:.2} s; fresh instances start from a {} KiB snapshot",
                took.as_secs_f64(),
                memory_bytes >> 10
            )
        }
        signer::PreinitState::Unavailable(why) => {
            format!("unavailable ({why}); fresh instances run the component's start-up")
        }
    }
}

/// `snapsign demo`.
async fn demo(allow_unconfined: bool) -> Result<()> {
    snapsign_host::demo::run(this_executable_as_builder()?, allow_unconfined).await
}

/// `snapsign dev`: runs the stack until Ctrl-C or SIGTERM.
async fn dev(args: DevArgs) -> Result<()> {
    use snapsign_dev_stack::{DevConfig, DevStack, Faults};
    let DevArgs {
        data_dir,
        listen,
        store_listen,
        signer_listen,
        namespace,
        prepare_shape,
        pending_ms,
        faults,
        allow_unconfined,
        abort_incomplete_uploads_after_secs,
        insecure_registries,
        docker_config,
        registry_mirror,
        url_ttl_secs,
    } = args;
    let data_dir = data_dir.unwrap_or_else(default_data_dir);
    let mut config = DevConfig::new(data_dir, this_executable_as_builder()?);
    config.listen = listen;
    config.store_listen = store_listen;
    config.signer_listen = signer_listen;
    config.namespace = namespace;
    config.shape = prepare_shape.into();
    config.pending = Duration::from_millis(pending_ms);
    config.allow_unconfined = allow_unconfined;
    config.abort_incomplete_uploads_after = Duration::from_secs(abort_incomplete_uploads_after_secs);
    config.insecure_registries = insecure_registries;
    config.docker_config = docker_config;
    config.registry_mirror = registry_mirror;
    config.url_ttl_secs = url_ttl_secs;
    if let Some(json) = faults {
        config.faults = serde_json::from_str::<Faults>(&json).context("parse --faults")?;
    }
    let stop = stop_signal()?;
    let stack = DevStack::start(&config).await?;
    println!("snapsign dev stack (data in {})", config.data_dir.display());
    println!("  platform api  {}   (lifecycle and sandbox proxy on the same address)", stack.api_url());
    println!("  store         {}   (bucket snapshots)", stack.store.url());
    println!("  signer        {}/api/v1/blob/sign", stack.signer.url());
    println!("  namespace     {}", stack.namespace);
    println!("  token         {}", stack.token);
    println!("  admin token   {}   (operator only: PUT /_snapsign/faults)", stack.admin_token);
    println!(
        "  more tokens   snapsign token --namespace NS --data-dir {}   (another namespace's)",
        config.data_dir.display()
    );
    println!();
    println!(
        "  export SNAPSIGN_API_URL={} SNAPSIGN_NAMESPACE={} SNAPSIGN_API_TOKEN={}",
        stack.api_url(),
        stack.namespace,
        stack.token
    );
    for build in &stack.recovered.builds {
        println!("  recovered     {build} was left prepared by a stack that died: marked failed, its upload aborted");
    }
    println!("Ctrl-C stops the stack and deletes its sandboxes.");
    stop.await;
    stack.shutdown().await;
    Ok(())
}

/// `snapsign token`.
fn token(args: TokenArgs) -> Result<()> {
    let TokenArgs { namespace, ttl_secs, key, data_dir } = args;
    let key = match (key, data_dir) {
        (_, Some(dir)) => snapsign_dev_stack::stack::token_key(&dir)?,
        (Some(key), None) => key,
        (None, None) => {
            bail!("no signing key: pass --key (or set SNAPSIGN_TOKEN_KEY), or --data-dir DIR of a snapsign dev stack")
        }
    };
    if key.len() < snapsign::token::MIN_KEY_LEN {
        bail!("the token key is {} bytes; use at least {}", key.len(), snapsign::token::MIN_KEY_LEN);
    }
    if !(1..=366 * 24 * 3600).contains(&ttl_secs) {
        bail!("--ttl-secs {ttl_secs} is out of range; use 1..={}", 366 * 24 * 3600);
    }
    if ttl_secs > snapsign::token::DEFAULT_MAX_TTL_SECS {
        eprintln!(
            "warning: a signer refuses tokens that live longer than SNAPSIGN_TOKEN_MAX_TTL_SECS ({} s unless set)",
            snapsign::token::DEFAULT_MAX_TTL_SECS
        );
    }
    let expires = jiff::Timestamp::now().as_second() + ttl_secs;
    let token = snapsign::token::mint(key.as_bytes(), &namespace, expires).context("mint the token")?;
    println!("{token}");
    Ok(())
}

/// `snapsign bench …`.
async fn bench(what: BenchWhat) -> Result<()> {
    match what {
        BenchWhat::Sign { rounds, requests, concurrency } => {
            snapsign_host::bench::sign(rounds, requests, concurrency).await
        }
        BenchWhat::Hosts(args) => snapsign_foreign_hosts::cli::bench_hosts(args).await,
        BenchWhat::Serve { baseline, rounds, requests, concurrency, max_instance_reuse } => {
            let this = std::env::current_exe().context("find this executable")?;
            snapsign_host::bench::serve(this, baseline, rounds, requests, concurrency, max_instance_reuse).await
        }
        BenchWhat::Soak { minutes, callers, concurrency, rate, slow_clients } => {
            let this = std::env::current_exe().context("find this executable")?;
            let options = snapsign_host::bench::soak::SoakOptions { minutes, callers, concurrency, rate, slow_clients };
            snapsign_host::bench::soak::run(this, options).await
        }
        BenchWhat::Import { mb, rounds, tools_dir } => snapsign_host::bench::import::run(mb, rounds, tools_dir).await,
        BenchWhat::RunSteps { steps, buildah, buildah_steps } => {
            snapsign_host::bench::run_steps::run(steps, buildah, buildah_steps).await
        }
        BenchWhat::Data { context_mb, rounds, buildah, no_peer, compress_context } => {
            let builder = this_executable_as_builder()?;
            let options = snapsign_host::bench::data::DataOptions {
                context_mb,
                rounds,
                buildah,
                no_peer,
                builder,
                compression: compress_context,
            };
            snapsign_host::bench::data::run(options).await
        }
        BenchWhat::Build { rounds, instantiations } => {
            snapsign_host::bench::build(rounds, instantiations, this_executable_as_builder()?).await
        }
    }
}

/// `snapsign store`: serves until Ctrl-C or SIGTERM.
async fn serve_store(args: StoreArgs) -> Result<()> {
    let StoreArgs { dir, listen, access_key_id, secret_access_key, buckets, abort_incomplete_uploads_after_secs } =
        args;
    let config = store::StoreConfig {
        root: dir,
        listen,
        access_key_id,
        secret_access_key,
        buckets,
        faults: Default::default(),
        abort_incomplete_after: Duration::from_secs(abort_incomplete_uploads_after_secs),
    };
    let stop = stop_signal()?;
    let server = store::start(&config).await?;
    println!("store listening on {}", server.url());
    stop.await;
    server.shutdown().await;
    Ok(())
}

/// `snapsign templates ls | describe | rm`.
async fn templates(what: TemplatesWhat) -> Result<()> {
    use snapsign_host::templates::Templates;
    let client = |platform: &PlatformArgs| {
        Templates::new(&platform.api_url, &platform.token, platform.scope().map_err(anyhow::Error::msg)?)
    };
    let print_json = |value: &serde_json::Value| println!("{}", serde_json::to_string_pretty(value).expect("JSON"));
    match what {
        TemplatesWhat::Ls { platform, json } => {
            let templates = client(&platform)?.list().await?;
            if json {
                print_json(&serde_json::Value::Array(templates));
                return Ok(());
            }
            if templates.is_empty() {
                eprintln!("no templates in this namespace");
                return Ok(());
            }
            println!("{:<32} {:<14} {:<5} {:>12} {:<7}", "NAME", "ID", "KIND", "SIZE", "PUBLIC");
            for t in &templates {
                println!(
                    "{:<32} {:<14} {:<5} {:>12} {:<7}",
                    t["name"].as_str().unwrap_or("?"),
                    t["id"].as_str().unwrap_or("?"),
                    t["rootfsNodeKind"].as_str().unwrap_or("?"),
                    t["snapshotSizeBytes"].as_u64().map(|b| b.to_string()).unwrap_or_else(|| "?".into()),
                    t["public"].as_bool().unwrap_or(false),
                );
            }
        }
        TemplatesWhat::Describe { name, platform, json } => {
            let template = client(&platform)?.describe(&name).await?;
            if json {
                print_json(&template);
            } else {
                for (key, value) in template.as_object().into_iter().flatten() {
                    println!("{key}: {}", value.as_str().map(str::to_owned).unwrap_or_else(|| value.to_string()));
                }
            }
        }
        TemplatesWhat::Rm { name, platform, json } => {
            let removed = client(&platform)?.remove(&name).await?;
            if json {
                print_json(&removed);
            } else {
                println!("removed template '{name}' ({})", removed["id"].as_str().unwrap_or("?"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{left_behind, resolve_build_args};

    #[test]
    fn build_args_take_their_value_or_the_environments_and_unset_ones_are_named() {
        let given = ["A=1".to_owned(), "B".to_owned(), "C".to_owned(), "D=x=y".to_owned(), "E=".to_owned()];
        let env = |name: &str| (name == "B").then(|| "from-env".to_owned());
        let (args, unset) = resolve_build_args(&given, env);
        let pairs: Vec<(&str, &str)> = args.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(pairs, [("A", "1"), ("B", "from-env"), ("D", "x=y"), ("E", "")]);
        assert_eq!(unset, ["C"]);
    }

    #[test]
    fn a_second_ctrl_c_names_what_it_leaves_behind() {
        let one = left_behind(&["sbx-7".into()]);
        assert!(one.contains("left behind: builder sandbox sbx-7 (the platform ends it about 300 s after"), "{one}");
        assert!(one.contains("multipart upload"), "{one}");
        let none = left_behind(&[]);
        assert!(none.contains("left behind: no builder sandbox the build knew of"), "{none}");
        let two = left_behind(&["a".into(), "b".into()]);
        assert!(two.contains("builder sandboxes a, b ("), "{two}");
    }
}
