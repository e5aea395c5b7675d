//! `snapsign bench data`: one build of a large context on the dev stack,
//! stage by stage, beside the native floor and buildah measured in the
//! same run. Figures, not tests.
//!
//! The context is made deterministically: two thirds random bytes in 2 MB
//! files (incompressible, as media and compressed assets are), one third
//! text in 1 MB files; the Dockerfile is `FROM scratch` + `COPY data/ /data/`.
//! The floor is what the same bytes need at the least: `tar | zstd -3` of
//! the tree (one compressing worker beside the reading thread, as the zstd
//! CLI runs) and one PUT of the result to the same store.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::image_build::{BuildEvent, BuilderRuntime, proxy_backend};
use snapsign_dev_stack::{DevConfig, DevStack};

/// What the run measures.
pub struct DataOptions {
    /// Context size, MB (10^6 bytes).
    pub context_mb: usize,
    /// Builds (each beside a floor run).
    pub rounds: usize,
    /// buildah to compare with; `None` looks on PATH, and without one the bench stops before it starts.
    pub buildah: Option<PathBuf>,
    /// Skip buildah (no peer figure).
    pub no_peer: bool,
    /// The reference builder (this executable).
    pub builder: PathBuf,
    /// How the context goes to the builder sandbox (`--compress-context`).
    pub compression: crate::sandbox_exec::Compression,
}

/// Runs the benchmark.
pub async fn run(options: DataOptions) -> Result<()> {
    if options.context_mb < 3 {
        bail!("--context-mb must be at least 3 (one random file of 2 MB and one text file of 1 MB)");
    }
    if options.rounds == 0 {
        bail!("--rounds must be at least 1");
    }
    let buildah = if options.no_peer {
        None
    } else {
        let found = options.buildah.clone().or_else(|| super::which("buildah")).ok_or_else(|| {
            anyhow::anyhow!(
                "buildah is not on PATH: install it (Debian: apt-get install buildah), pass --buildah PATH, or pass \
                 --no-peer for the figures without it"
            )
        })?;
        if !found.is_file() {
            bail!("--buildah {} is not a file; pass the path of a buildah executable", found.display());
        }
        Some(found)
    };
    let dir = super::Scratch::new("data")?;
    let context = dir.0.join("context");
    let made = tokio::task::spawn_blocking({
        let context = context.clone();
        move || make_context(&context, options.context_mb)
    })
    .await??;
    println!(
        "context: {} random files of 2 MB and {} text files of 1 MB ({:.0} MB); FROM scratch, COPY data/ /data/",
        made.random_files,
        made.text_files,
        made.bytes as f64 / 1e6
    );

    let mut config = DevConfig::new(dir.0.join("dev"), options.builder.clone());
    config.pending = Duration::ZERO;
    config.cache_dir = dir.0.join("cache");
    let stack = DevStack::start(&config).await?;

    let dockerfile = "FROM scratch\nCOPY data/ /data/\n";
    // The builder sandbox holds the archive, the unpacked context, the tree and the snapshot.
    let context_mib = made.bytes.div_ceil(1 << 20);
    let runtime = BuilderRuntime::new(128 << 20, &config.cache_dir)?;
    let (mut builds, mut floors) = (Vec::new(), Vec::new());
    let mut peaks = (0usize, None);
    let mut snapshot_bytes = 0;
    let mut build_rss = 0u64;
    for round in 0..options.rounds {
        // Alternating, so both see the same machine; each starts with the
        // page cache written back, so that neither pays for the writes of
        // the one before (the disk's writeback throttles a writer).
        write_back().await?;
        floors.push(floor(&stack, &context, &dir.0, round).await?);
        write_back().await?;
        let mut build = stack.build_options(&format!("bench-data-{round}"), dockerfile, &context);
        build.cache_dir = config.cache_dir.clone();
        build.request.disk_mb = Some(context_mib + 256);
        build.request.builder_disk_mb = Some(4 * context_mib + 1024);
        build.request.builder_memory_mb = Some(4 * context_mib as i64 + 2048);
        build.timeout = Duration::from_secs(3600);
        build.compression = options.compression;
        let marks: Arc<Mutex<Vec<(Instant, BuildEvent)>>> = Arc::default();
        let record = marks.clone();
        let (backend, outbound) = proxy_backend(&build);
        let started = Instant::now();
        let events = Arc::new(move |e| record.lock().expect("no panics").push((Instant::now(), e)));
        let sampler = RssSampler::start();
        let ran = runtime.run(&build, backend, outbound, events).await;
        build_rss = build_rss.max(sampler.stop().await);
        let (outcome, timings) = ran?;
        let total = started.elapsed();
        let template = outcome.map_err(|e| anyhow::anyhow!("the benchmark's build failed: {e}"))?;
        snapshot_bytes = template["snapshotSizeBytes"].as_u64().unwrap_or(0);
        let marks = marks.lock().expect("no panics").clone();
        let stages = Stages::read(started, total, &marks)?;
        peaks.0 = peaks.0.max(timings.guest_memory_peak);
        if stages.builder_peak.is_some() {
            peaks.1.clone_from(&stages.builder_peak);
        }
        builds.push(stages);
    }
    stack.shutdown().await;

    println!(
        "snapsign ({} build of the host), {} rounds, context sent {}, snapshot {:.0} MB; min, median, max",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        options.rounds,
        match options.compression.encoding(true) {
            crate::pack::Encoding::Gzip => "gzipped",
            crate::pack::Encoding::Tar => "as a plain tar",
        },
        snapshot_bytes as f64 / 1e6
    );
    let rows: [(&str, Pick); 7] = [
        ("pack the context and send it to the sandbox", |s| s.upload),
        ("unpack it in the sandbox (tar), spec.json", |s| s.unpack),
        ("builder: plan and COPY", |s| s.copy),
        ("builder: snapshot tar+zstd, parts going up as written", |s| s.archive),
        ("store: CompleteMultipartUpload", |s| s.store_complete),
        ("platform complete, cleanup", |s| s.complete),
        ("whole build (prepare to registered)", |s| s.total),
    ];
    for (name, pick) in rows {
        row(name, builds.iter().map(pick).collect());
    }
    println!("native floor, same tree, same rounds:");
    row("tar | zstd -3 in-process (zstd's default: one worker)", floors.iter().map(|f| f.compress).collect());
    if floors.iter().all(|f| f.tools.is_some()) {
        row("tar c | zstd -3 with the system's tools", floors.iter().filter_map(|f| f.tools).collect());
    }
    let put = format!("one PUT of its {:.0} MB to the store", floors[0].bytes as f64 / 1e6);
    row(&put, floors.iter().map(|f| f.put).collect());
    row("floor (the faster compression, then the PUT)", floors.iter().map(Floor::total).collect());
    let ratio = |pick: fn(&[Duration]) -> Duration| {
        let builds: Vec<Duration> = builds.iter().map(|s| s.total).collect();
        let floors: Vec<Duration> = floors.iter().map(Floor::total).collect();
        pick(&builds).as_secs_f64() / pick(&floors).as_secs_f64()
    };
    println!("  the build takes {:.1}x the floor (medians)", ratio(median));
    println!("peak memory:");
    println!("  host process (CLI, wasmtime, dev stack, store), RSS during the builds  {}", mib(Some(build_rss)));
    println!(
        "  host process, VmHWM of the whole benchmark (the floor's in-process zstd included)  {}",
        mib(snapsign_rootfs_builder::peak_rss_bytes())
    );
    println!("  builder component linear memory                      {}", mib(Some(peaks.0 as u64)));
    println!(
        "  reference builder (tl-rootfs-build) VmHWM             {}",
        peaks.1.as_deref().unwrap_or("(not printed)")
    );
    if let Some(buildah) = buildah {
        peer(&buildah, &context, &dir.0, dockerfile)?;
    }
    Ok(())
}

struct Made {
    random_files: usize,
    text_files: usize,
    bytes: u64,
}

/// `mb` MB under `context/data`: two thirds random in 2 MB files, the rest text in 1 MB files.
fn make_context(context: &Path, mb: usize) -> Result<Made> {
    let data = context.join("data");
    std::fs::create_dir_all(&data).with_context(|| format!("create {}", data.display()))?;
    let random_files = (mb / 3).max(1);
    let text_files = (mb - 2 * random_files).max(1);
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut bytes = 0u64;
    let mut buffer = vec![0u8; 2_000_000];
    for i in 0..random_files {
        for chunk in buffer.chunks_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
        }
        std::fs::write(data.join(format!("r{i:05}.bin")), &buffer)?;
        bytes += buffer.len() as u64;
    }
    let words = ["sandbox", "image", "build", "snapshot", "upload", "signer", "tenant", "namespace", "layer", "the"];
    for i in 0..text_files {
        let mut text = Vec::with_capacity(1_000_100);
        let mut n = 0u64;
        while text.len() < 1_000_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let word = words[(state % words.len() as u64) as usize];
            write!(text, "{word} {}", state >> 44)?;
            n += 1;
            text.push(if n.is_multiple_of(12) { b'\n' } else { b' ' });
        }
        text.truncate(1_000_000);
        std::fs::write(data.join(format!("t{i:05}.txt")), &text)?;
        bytes += text.len() as u64;
    }
    Ok(Made { random_files, text_files, bytes })
}

struct Floor {
    /// In this process (tar and zstd crates).
    compress: Duration,
    /// The system's `tar c | zstd -3`, when both are installed.
    tools: Option<Duration>,
    put: Duration,
    bytes: u64,
}

impl Floor {
    /// The faster way to compress, and the PUT.
    fn total(&self) -> Duration {
        self.tools.map_or(self.compress, |tools| tools.min(self.compress)) + self.put
    }
}

/// `tar c data | zstd -3` with the system's tools (`None` without zstd).
fn tools_floor(context: &Path, out: &Path) -> Result<Option<Duration>> {
    if super::which("zstd").is_none() || super::which("tar").is_none() {
        return Ok(None);
    }
    let started = Instant::now();
    let status = Command::new("sh")
        .arg("-c")
        .arg("tar c -C \"$1\" data | zstd -3 -q -f -o \"$2\"")
        .arg("floor")
        .arg(context)
        .arg(out)
        .status()
        .context("run tar | zstd")?;
    if !status.success() {
        bail!("tar c | zstd -3 failed: {status}");
    }
    Ok(Some(started.elapsed()))
}

/// The largest resident set of this process, read from /proc every 10 ms
/// until stopped.
struct RssSampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<u64>,
}

impl RssSampler {
    fn start() -> RssSampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut peak = 0;
            loop {
                peak = peak.max(snapsign_rootfs_builder::rss_bytes().unwrap_or(0));
                tokio::select! {
                    _ = &mut stopped => return peak.max(snapsign_rootfs_builder::rss_bytes().unwrap_or(0)),
                    () = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
            }
        });
        RssSampler { stop, task }
    }

    async fn stop(self) -> u64 {
        let _ = self.stop.send(());
        self.task.await.unwrap_or(0)
    }
}

/// Writes every dirty page back to disk (sync(2)).
async fn write_back() -> Result<()> {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await?;
    Ok(())
}

/// `tar | zstd -3` of the context into a file, then one presigned PUT of it to the stack's store.
async fn floor(stack: &DevStack, context: &Path, dir: &Path, round: usize) -> Result<Floor> {
    let out = dir.join("floor.tar.zst");
    let (source, target) = (context.to_owned(), out.clone());
    let compress = tokio::task::spawn_blocking(move || -> Result<Duration> {
        let started = Instant::now();
        let file = std::fs::File::create(&target)?;
        let mut zstd = zstd::Encoder::new(std::io::BufWriter::with_capacity(1 << 20, file), 3)?;
        // As the zstd CLI runs by default (-T1): one compressing worker beside the thread that reads.
        zstd.multithread(1)?;
        // tar hands over 8 KiB at a time; zstd is fed 1 MiB.
        let mut tar = tar::Builder::new(std::io::BufWriter::with_capacity(1 << 20, zstd));
        tar.append_dir_all("data", source.join("data"))?;
        let zstd = tar.into_inner()?.into_inner().map_err(|e| e.into_error())?;
        zstd.finish()?.flush()?;
        Ok(started.elapsed())
    })
    .await??;
    let bytes = std::fs::metadata(&out)?.len();
    let platform = &stack.platform;
    let signer = platform.signer();
    let object = signer.endpoint.object(&signer.bucket, &format!("bench/floor-{round}.tar.zst"));
    let url = signer.presigner(jiff::Timestamp::now()).presign(snapsign::presign::Method::Put, &object, &[]);
    let started = Instant::now();
    let file = tokio::fs::File::open(&out).await?;
    let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 20));
    let response = reqwest::Client::new().put(url).header("content-length", bytes).body(body).send().await?;
    if !response.status().is_success() {
        bail!("the floor's PUT to the store answered {}", response.status());
    }
    let put = started.elapsed();
    let (source, target) = (context.to_owned(), dir.join("floor-tools.tar.zst"));
    let tools = tokio::task::spawn_blocking(move || tools_floor(&source, &target)).await??;
    Ok(Floor { compress, tools, put, bytes })
}

/// Picks one stage's time.
type Pick = fn(&Stages) -> Duration;

/// Stage times read from the build's events and the builder's log.
struct Stages {
    total: Duration,
    upload: Duration,
    unpack: Duration,
    copy: Duration,
    archive: Duration,
    store_complete: Duration,
    complete: Duration,
    builder_peak: Option<String>,
}

impl Stages {
    fn read(started: Instant, total: Duration, marks: &[(Instant, BuildEvent)]) -> Result<Stages> {
        let at = |what: &str, pick: &dyn Fn(&BuildEvent) -> bool| {
            marks
                .iter()
                .find(|(_, e)| pick(e))
                .map(|(t, _)| *t)
                .with_context(|| format!("the build reported no {what}"))
        };
        let stage = |name: &'static str| move |e: &BuildEvent| matches!(e, BuildEvent::Stage(s) if s == name);
        let line = |text: &'static str| move |e: &BuildEvent| matches!(e, BuildEvent::Log(_, l) if l.contains(text));
        let upload = at("upload stage", &stage("upload"))?;
        let sent = at("end of the context upload", &|e| matches!(e, BuildEvent::Upload(s, t) if s == t && *t > 0))?;
        let build = at("build stage", &stage("build"))?;
        let archive = at("archive start", &line("Writing the snapshot archive"))?;
        let completing = at("CompleteMultipartUpload", &line("Completing multipart upload"))?;
        let complete = at("complete stage", &stage("complete"))?;
        let end = marks.last().map_or(started, |(t, _)| *t).max(complete);
        let written =
            marks.iter().find(|(_, e)| line("Peak memory of the builder")(e)).map(|(t, _)| *t).unwrap_or(complete);
        let builder_peak = marks.iter().find_map(|(_, e)| match e {
            BuildEvent::Log(_, l) => l.split_once("Peak memory of the builder: ").map(|(_, v)| v.to_owned()),
            _ => None,
        });
        Ok(Stages {
            total,
            upload: sent - upload,
            unpack: build - sent,
            copy: archive - build,
            archive: completing - archive,
            store_complete: written - completing,
            complete: end - written,
            builder_peak,
        })
    }
}

/// buildah bud of the same context (vfs storage, chroot isolation, a storage root of its own) and a push to an OCI layout.
fn peer(buildah: &Path, context: &Path, dir: &Path, dockerfile: &str) -> Result<()> {
    let version = Command::new(buildah).arg("--version").output().context("run buildah --version")?;
    let storage = super::buildah_storage(dir);
    let file = dir.join("Dockerfile.buildah");
    std::fs::write(&file, dockerfile)?;
    let run = |args: &[&str]| -> Result<Duration> {
        let started = Instant::now();
        let out = Command::new(buildah).args(&storage).args(args).output().context("run buildah")?;
        if !out.status.success() {
            bail!("buildah {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(started.elapsed())
    };
    let bud = run(&[
        "bud",
        "--isolation",
        "chroot",
        "--quiet",
        "-f",
        &file.display().to_string(),
        "-t",
        "snapsign-bench-data",
        &context.display().to_string(),
    ])?;
    let push = run(&["push", "--quiet", "snapsign-bench-data", &format!("oci:{}", dir.join("buildah-oci").display())])?;
    println!(
        "peer, same context, same run: {} (--isolation chroot, vfs storage)",
        String::from_utf8_lossy(&version.stdout).trim()
    );
    println!("  {:<56} {:>8.2} s", "buildah bud", bud.as_secs_f64());
    println!("  {:<56} {:>8.2} s", "buildah push to an OCI layout", push.as_secs_f64());
    println!("  {:<56} {:>8.2} s", "buildah, both", (bud + push).as_secs_f64());
    Ok(())
}

/// One row: min, median, max.
fn row(name: &str, times: Vec<Duration>) {
    let mut sorted = times;
    sorted.sort();
    let secs = |d: &Duration| d.as_secs_f64();
    println!(
        "  {name:<56} {:>7.2} {:>7.2} {:>7.2} s",
        secs(&sorted[0]),
        secs(&sorted[sorted.len() / 2]),
        secs(&sorted[sorted.len() - 1])
    );
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn mib(bytes: Option<u64>) -> String {
    bytes.map_or_else(|| "(unknown)".into(), |b| format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64))
}
