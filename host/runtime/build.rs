//! Builds the guest components (wasm32-wasip2, profile `component`) with a
//! nested cargo in its own target directory, and tells the host where they
//! are (`SNAPSIGN_SIGNER_WASM`). No .wasm file is ever checked in.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "component";
/// (binary name in the root package, env var the host reads it from)
const COMPONENTS: &[(&str, &str)] = &[
    ("snapsign-signer", "SNAPSIGN_SIGNER_WASM"),
    ("snapsign-builder", "SNAPSIGN_BUILDER_WASM"),
    // Only the runtime's unit tests embed it (serve-signer's instance reuse tests).
    ("snapsign-reuse-probe", "SNAPSIGN_REUSE_PROBE_WASM"),
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir
        .parent()
        .and_then(Path::parent)
        .expect("host/runtime/ lives two levels below the workspace root")
        .to_path_buf();
    for watched in ["src", "wit", "build.rs", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    // A separate target dir: the outer cargo holds the lock on its own.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("components");
    ensure_target(&root);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&root)
        .args(["build", "--package", "snapsign", "--features", "component", "--target", TARGET, "--profile", PROFILE])
        .arg("--target-dir")
        .arg(&target_dir);
    for (bin, _) in COMPONENTS {
        cmd.args(["--bin", bin]);
    }
    if let Ok(jobs) = std::env::var("NUM_JOBS") {
        cmd.args(["--jobs", &jobs]);
    }
    // What the outer build set for the host target must not leak into the guest build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_TARGET_DIR",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("run cargo to build the guest components");
    if !status.success() {
        panic!(
            "building the guest components failed (see above). If the error is \"can't find crate for `core`\", \
             install the target: rustup target add {TARGET}"
        );
    }
    for (bin, var) in COMPONENTS {
        let wasm = target_dir.join(TARGET).join(PROFILE).join(format!("{bin}.wasm"));
        assert!(Path::new(&wasm).exists(), "guest build did not produce {}", wasm.display());
        println!("cargo:rustc-env={var}={}", wasm.display());
    }
}

/// rust-toolchain.toml names the wasm target, but rustup only installs it
/// with a toolchain it installs; on a machine that already had the toolchain,
/// add the target here so a fresh clone needs no manual step.
fn ensure_target(root: &Path) {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output();
    let installed = sysroot
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .is_some_and(|s| Path::new(&s).join("lib/rustlib").join(TARGET).join("lib").exists());
    if installed {
        return;
    }
    println!("cargo:warning=installing the {TARGET} target with rustup (once)");
    let status = Command::new("rustup").current_dir(root).args(["target", "add", TARGET]).status();
    if !matches!(status, Ok(s) if s.success()) {
        panic!("the {TARGET} target is missing and `rustup target add {TARGET}` failed; run it by hand");
    }
}
