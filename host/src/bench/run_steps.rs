//! `snapsign bench run-steps`: what a RUN step costs beyond its command
//! (entering and leaving the confined rootfs), beside the floor (the same
//! command started directly) and buildah doing the same, in the same run.
//! Figures, not tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use snapsign_rootfs_builder::host_rootfs;
use snapsign_rootfs_builder::step::{self, Confined, Ended};

/// Runs the benchmark: `steps` RUN steps of `true`, each beside a direct
/// start of the same `true`; then buildah (`buildah` on PATH or `buildah`
/// given; without one the bench stops before it starts) building `buildah_steps` `RUN true` lines against none.
pub async fn run(steps: usize, buildah: Option<PathBuf>, buildah_steps: usize) -> Result<()> {
    tokio::task::spawn_blocking(move || run_blocking(steps, buildah, buildah_steps)).await?
}

fn run_blocking(steps: usize, buildah: Option<PathBuf>, buildah_steps: usize) -> Result<()> {
    if steps == 0 {
        bail!("--steps must be at least 1");
    }
    let Some(buildah) = buildah.or_else(|| super::which("buildah")) else {
        bail!(
            "buildah is not on PATH, and the figure is a comparison with it: install it (Debian: apt-get install \
             buildah) or pass --buildah PATH"
        );
    };
    let dir = super::Scratch::new("run-steps")?;
    let root = dir.0.join("rootfs");
    host_rootfs::write(&root, &["sh", "true"]).context("make the benchmark's rootfs")?;
    let confined = Confined {
        root: root.clone(),
        argv: vec!["/bin/true".into()],
        env: vec!["PATH=/bin".into()],
        workdir: "/".into(),
        uid: 0,
        gid: 0,
        groups: vec![0],
    };
    // SAFETY: geteuid cannot fail.
    let who = if unsafe { libc::geteuid() } == 0 { "root" } else { "an ordinary user (a user namespace per step)" };
    println!("RUN true, {steps} steps after 3 to warm up, as {who}; the floor starts the same /bin/true directly");
    let mut step_times = Vec::with_capacity(steps);
    let mut floor_times = Vec::with_capacity(steps);
    for round in 0..steps + 3 {
        let started = Instant::now();
        match step::run(&confined).context("run a RUN step")? {
            Ended::Code(0) => {}
            other => bail!("RUN true ended with {other:?}"),
        }
        let step_time = started.elapsed();
        let started = Instant::now();
        let status = Command::new(root.join("bin/true")).status().context("start /bin/true directly")?;
        let floor_time = started.elapsed();
        if !status.success() {
            bail!("/bin/true failed: {status}");
        }
        if round >= 3 {
            step_times.push(step_time);
            floor_times.push(floor_time);
        }
    }
    let overhead: Vec<Duration> = step_times.iter().zip(&floor_times).map(|(s, f)| s.saturating_sub(*f)).collect();
    println!("{:<34} {:>9} {:>9} {:>9}", "", "min", "median", "max");
    for (name, times) in [
        ("RUN step (confined)", &step_times),
        ("floor (direct start)", &floor_times),
        ("cost beyond the command", &overhead),
    ] {
        let (min, median, max) = spread(times);
        println!("{name:<34} {:>9} {:>9} {:>9}", ms(min), ms(median), ms(max));
    }
    peer(&buildah, &dir.0, buildah_steps)
}

/// buildah 1.28 as the issue measured it: `--isolation chroot`, vfs
/// storage, in a storage root of its own; `n` `RUN true` lines against
/// none, three alternating rounds each, median per step.
fn peer(buildah: &Path, dir: &Path, n: usize) -> Result<()> {
    let version = Command::new(buildah).arg("--version").output().context("run buildah --version")?;
    println!("{} (--isolation chroot, vfs storage)", String::from_utf8_lossy(&version.stdout).trim());
    let context = dir.join("buildah-context");
    host_rootfs::write(&context.join("rootfs"), &["sh", "true"])?;
    let storage = super::buildah_storage(dir);
    let bud = |dockerfile: &str, tag: &str| -> Result<Duration> {
        let file = context.join(format!("Dockerfile.{tag}"));
        std::fs::write(&file, dockerfile)?;
        let started = Instant::now();
        let out = Command::new(buildah)
            .args(&storage)
            .args(["bud", "--isolation", "chroot", "--quiet", "-f"])
            .arg(&file)
            .args(["-t", tag])
            .arg(&context)
            .output()
            .context("run buildah bud")?;
        if !out.status.success() {
            bail!("buildah bud {tag} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(started.elapsed())
    };
    bud("FROM scratch\nCOPY rootfs/ /\n", "bench-base")?;
    let none = "FROM bench-base\nLABEL steps=0\n".to_owned();
    let some = format!("FROM bench-base\nLABEL steps={n}\n{}", "RUN true\n".repeat(n));
    let (mut t0, mut tn) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        t0.push(bud(&none, "bench-none")?);
        tn.push(bud(&some, "bench-some")?);
    }
    let (_, m0, _) = spread(&t0);
    let (_, mn, _) = spread(&tn);
    println!(
        "buildah bud: {n} RUN steps {} (median of 3), none {}: {} a step",
        ms(mn),
        ms(m0),
        ms(mn.saturating_sub(m0) / n.max(1) as u32)
    );
    Ok(())
}

fn spread(times: &[Duration]) -> (Duration, Duration, Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    (sorted[0], sorted[sorted.len() / 2], sorted[sorted.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
