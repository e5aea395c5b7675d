//! `snapsign demo`: the dev stack in this process, then three builds by the
//! builder component — a base image and a diff image on top of it through
//! the new (dataplane-signed) shape, and one through the legacy shape —
//! each printed and checked against the object in the store.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::image_build::BuildEvent;
use snapsign_dev_stack::{DevConfig, DevStack, PrepareShape};

/// The example images shipped in the repository.
fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Runs the demo; `builder` is the executable installed as tl-rootfs-build.
pub async fn run(builder: PathBuf, allow_unconfined: bool) -> Result<()> {
    let started = Instant::now();
    let data_dir = std::env::temp_dir().join(format!("snapsign-demo-{}", std::process::id()));
    let mut config = DevConfig::new(data_dir.clone(), builder);
    config.pending = Duration::from_millis(500);
    config.allow_unconfined = allow_unconfined;
    println!("Starting the dev stack (store, signer component, platform emulator, local sandboxes) on 127.0.0.1 ...");
    let stack = DevStack::start(&config).await?;
    println!("  platform {}   store {}   signer {}", stack.api_url(), stack.store.url(), stack.signer.url());
    println!("  local sandboxes: {}", stack.sandbox_mode);
    let result = builds(&stack).await;
    stack.shutdown().await;
    let _ = std::fs::remove_dir_all(&data_dir);
    result?;
    println!("\nDemo finished in {:.1} s: 3 images built, registered and verified.", started.elapsed().as_secs_f64());
    Ok(())
}

type Runtime = crate::image_build::BuilderRuntime;

async fn builds(stack: &DevStack) -> Result<()> {
    let examples = examples_dir();
    // The builder component is loaded and pre-instantiated once for the three builds.
    let runtime = Runtime::new(128 << 20, &crate::engine::default_cache_dir())?;
    let runtime = &runtime;
    let base =
        build(runtime, stack, "demo-base", &examples.join("base"), "new (dataplane-signed multipart upload)").await?;
    let app = build(runtime, stack, "demo-app", &examples.join("app"), "new, diff build on demo-base").await?;
    if app["parentManifestUri"] != base["snapshotUri"] {
        bail!("demo-app's parent is {} but demo-base's snapshot is {}", app["parentManifestUri"], base["snapshotUri"]);
    }
    stack.platform.set_shape(PrepareShape::Legacy);
    build(runtime, stack, "demo-legacy", &examples.join("base"), "legacy (platform-presigned single PUT)").await?;
    Ok(())
}

async fn build(runtime: &Runtime, stack: &DevStack, name: &str, context: &Path, shape: &str) -> Result<Value> {
    println!("\n=== {name}: {shape}");
    let dockerfile = std::fs::read_to_string(context.join("Dockerfile"))
        .with_context(|| format!("read {}/Dockerfile", context.display()))?;
    let options = stack.build_options(name, &dockerfile, context);
    let declared = Arc::new(Mutex::new(None::<String>));
    let seen = declared.clone();
    let printer = crate::progress::progress_printer();
    let events: crate::image_build::EventFn = Arc::new(move |event: BuildEvent| {
        // The builder's metadata.json, as the build flow read it.
        if let BuildEvent::Metadata(json) = &event
            && let Ok(value) = serde_json::from_str::<Value>(json)
            && let Ok(metadata) = snapsign::wire::Metadata::read(&value)
        {
            *seen.lock().unwrap_or_else(|p| p.into_inner()) = metadata.sha256;
        }
        printer(event);
    });
    let (backend, outbound) = crate::image_build::proxy_backend(&options);
    let (outcome, timings) = runtime.run(&options, backend, outbound, events).await?;
    let template = outcome.map_err(|failure| anyhow::anyhow!("{name} failed: {failure}"))?;
    println!("registered: {}", serde_json::to_string_pretty(&template)?);
    let uri = template["snapshotUri"].as_str().context("template has a snapshotUri")?;
    let (size, sha256) =
        stack.platform.platform_api().object_digest(uri).await.map_err(|e| anyhow::anyhow!("{}", e.message))?;
    let declared_size = template["snapshotSizeBytes"].as_u64().unwrap_or_default();
    let declared_sha = declared.lock().unwrap_or_else(|p| p.into_inner()).clone().unwrap_or_default();
    if size != declared_size || sha256 != declared_sha {
        bail!(
            "{uri} in the store has {size} bytes, sha256 {sha256}; metadata declared {declared_size} bytes, sha256 {declared_sha}"
        );
    }
    println!(
        "verified: {uri} in the store is {size} bytes with sha256 {sha256}, as metadata.json declared (build {:.2} s, component instantiate {} µs)",
        timings.run.as_secs_f64(),
        timings.instantiate.as_micros()
    );
    Ok(template)
}
