//! Benchmark (not a test): what the forwarded-port relay costs an upload.
//!
//! `cargo run --release -p snapsign-sandbox --example relay_bench [-- MiB]`
//!
//! The same client (`head -c N /dev/zero > /dev/tcp/127.0.0.1/PORT` in
//! bash) sends N MiB (default 1024) to a sink on this host's 127.0.0.1,
//! once from the host directly and once from inside a sandbox whose private
//! network forwards that port (in-namespace listener → relay → host). Each
//! way runs 3 times; the best run is reported, in MiB/s at the sink.

use std::io::Read;
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use snapsign_sandbox::{Confinement, Network, ProcessSpec, SandboxSpec, Sandboxes, SandboxesConfig};

/// Counts what each connection sends; reports (bytes, seconds from accept to EOF).
fn sink() -> (u16, mpsc::Receiver<(u64, f64)>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the sink");
    let port = listener.local_addr().expect("sink address").port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(6).flatten() {
            let mut stream = stream;
            let started = Instant::now();
            let mut buffer = vec![0u8; 1 << 20];
            let mut total = 0u64;
            while let Ok(n) = stream.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            let _ = tx.send((total, started.elapsed().as_secs_f64()));
        }
    });
    (port, rx)
}

fn upload(port: u16, mib: u64) -> String {
    format!("head -c {}M /dev/zero > /dev/tcp/127.0.0.1/{port}", mib)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = std::env::args().nth(1).map(|n| n.parse()).transpose()?.unwrap_or(1024);
    let (port, results) = sink();
    let rate = |what: &str| -> anyhow::Result<f64> {
        let (bytes, secs) = results.recv_timeout(Duration::from_secs(120))?;
        anyhow::ensure!(bytes == mib << 20, "{what}: the sink got {bytes} bytes, not {}", mib << 20);
        Ok(mib as f64 / secs)
    };

    let mut direct = Vec::new();
    for _ in 0..3 {
        let status = std::process::Command::new("/bin/bash").args(["-c", &upload(port, mib)]).status()?;
        anyhow::ensure!(status.success(), "direct upload: {status}");
        direct.push(rate("direct")?);
    }

    let dir = tempfile::tempdir()?;
    let boxes = Sandboxes::new(SandboxesConfig {
        root_dir: dir.path().join("boxes"),
        confinement: Confinement::detect(false)?,
        builder_binary: None,
    })?;
    let sandbox = boxes.create_with(
        "relay",
        SandboxSpec { network: Network::Private { ports: vec![port] }, ..SandboxSpec::default() },
    )?;
    let mut relayed = Vec::new();
    for _ in 0..3 {
        let spec = ProcessSpec {
            command: "/bin/bash".into(),
            args: vec!["-c".into(), upload(port, mib)],
            ..Default::default()
        };
        let info = sandbox.start(spec)?;
        let lines: Vec<String> = sandbox.follow(info.pid).expect("process").map(|e| e.line).collect().await;
        let done = sandbox.wait(info.pid).await.expect("process");
        anyhow::ensure!(done.exit_code == Some(0), "relayed upload: {done:?} {lines:?}");
        relayed.push(rate("relayed")?);
    }
    boxes.delete("relay").await?;

    let best = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    println!("upload of {mib} MiB to 127.0.0.1 (best of 3, MiB/s at the receiver)");
    println!("{:<44} {:>10.0}", "direct (host to host)", best(&direct));
    println!("{:<44} {:>10.0}", "from a sandbox through the forwarded port", best(&relayed));
    println!("{:<44} {:>9.0}%", "relay cost", 100.0 * (1.0 - best(&relayed) / best(&direct)));
    Ok(())
}
