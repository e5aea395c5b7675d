//! Benchmark (not a test): sandbox create → first process start → delete,
//! over 100 sandboxes, with the confinement `Confinement::detect` picks.
//!
//! `cargo run --release -p snapsign-sandbox --example lifecycle_bench [-- N [limits|none] [--one-uid] [--rootless-as USER]]`
//!
//! With `--rootless-as USER` (run as root), the same rounds then run again
//! as that ordinary user (rootless: unprivileged user namespaces, rlimits),
//! in a child process of this one, so both modes are measured in one run
//! on one machine and printed one after the other.
//!
//! Rootless, sandboxes use the user's subordinate ids where it has them;
//! with `--one-uid` they map its one uid instead (`SubordinateIds::Never`).
//!
//! With `limits`, each sandbox asks for what a build's builder sandbox gets
//! from the dev stack (1 CPU, 1024 MiB memory, 2048 MiB disk): memory and cpu
//! cgroups and a tmpfs disk are then made and removed too.
//!
//! Prints, for each phase, the median and p99 in milliseconds:
//! - create: `Sandboxes::create` returned;
//! - start: `Sandbox::start` returned (the launcher entered the namespaces);
//! - first output: the first process (`echo ready`) printed its line, i.e. it
//!   runs inside the confined sandbox (measured from the start of create);
//! - delete: `Sandboxes::delete` returned (processes gone, directory removed).

use std::time::{Duration, Instant};

use std::os::unix::process::CommandExt;

use futures_util::StreamExt;
use snapsign_sandbox::{Confinement, Limits, ProcessSpec, SandboxSpec, Sandboxes, SandboxesConfig, SubordinateIds};

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

/// Runs this benchmark again as `user` (its uid and gid from `id`), with the same rounds and limits.
fn run_as(user: &str) -> anyhow::Result<()> {
    let id = |flag: &str| -> anyhow::Result<u32> {
        let out = std::process::Command::new("id").args([flag, user]).output()?;
        anyhow::ensure!(out.status.success(), "no user {user}: create it (useradd -m {user})");
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    let args: Vec<String> = std::env::args().skip(1).take_while(|a| a != "--rootless-as").collect();
    println!();
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(&args)
        .uid(id("-u")?)
        .gid(id("-g")?)
        .env("TMPDIR", "/tmp")
        .status()?;
    anyhow::ensure!(status.success(), "the rootless run as {user} failed: {status}");
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rootless_as = std::env::args().skip_while(|a| a != "--rootless-as").nth(1);
    bench().await?;
    if let Some(user) = rootless_as {
        run_as(&user)?;
    }
    Ok(())
}

async fn bench() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(100);
    let limits = if std::env::args().nth(2).as_deref() == Some("limits") {
        Limits { cpus: Some(1.0), memory_mb: Some(1024), disk_mb: Some(2048), ..Limits::default() }
    } else {
        Limits::default()
    };
    let dir = tempfile::tempdir()?;
    let confinement = Confinement::detect(false)?;
    let subordinate =
        if std::env::args().any(|a| a == "--one-uid") { SubordinateIds::Never } else { SubordinateIds::WhereAvailable };
    let config =
        SandboxesConfig { root_dir: dir.path().join("boxes"), confinement: confinement.clone(), builder_binary: None };
    let boxes = Sandboxes::new_with(config, subordinate)?;
    let spec = ProcessSpec { command: "/bin/echo".into(), args: vec!["ready".into()], ..Default::default() };
    let (mut create, mut start, mut first, mut delete) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // One warm-up round, not counted.
    for round in 0..=rounds {
        let id = format!("bench-{round}");
        let t0 = Instant::now();
        let sandbox = boxes.create_with(&id, SandboxSpec { limits, ..SandboxSpec::default() })?;
        let created = t0.elapsed();
        let info = sandbox.start(spec.clone())?;
        let spawned = t0.elapsed();
        let line = sandbox.follow(info.pid).expect("process exists").next().await;
        let started = t0.elapsed();
        anyhow::ensure!(line.as_ref().map(|e| e.line.as_str()) == Some("ready"), "round {round}: got {line:?}");
        sandbox.wait(info.pid).await;
        let t1 = Instant::now();
        anyhow::ensure!(boxes.delete(&id).await?, "round {round}: sandbox {id} vanished");
        let deleted = t1.elapsed();
        if round > 0 {
            create.push(created);
            start.push(spawned);
            first.push(started);
            delete.push(deleted);
        }
    }
    println!("confinement: {confinement:?}, {rounds} sandboxes, {limits:?}, {}", boxes.cgroups().describe());
    if let Some(ids) = boxes.rootless_ids() {
        println!("identities: {}", ids.describe());
    }
    println!("{:<40} {:>10} {:>10}", "phase", "median ms", "p99 ms");
    for (name, samples) in [
        ("create", &mut create),
        ("create to start returned", &mut start),
        ("create to first process output", &mut first),
        ("delete", &mut delete),
    ] {
        samples.sort();
        println!("{:<40} {:>10.2} {:>10.2}", name, percentile(samples, 0.5), percentile(samples, 0.99));
    }
    Ok(())
}
