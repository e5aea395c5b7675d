//! Builds the guest components (wasm32-wasip2, profile `component`) with a
//! nested cargo in its own target directory, and tells the host where they
//! are (`SNAPSIGN_SIGNER_WASM`). No .wasm file is ever checked in.

use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";
const PROFILE: &str = "component";
/// (binary name in the root package, env var the host reads it from)
const COMPONENTS: &[(&str, &str)] = &[("snapsign-signer", "SNAPSIGN_SIGNER_WASM")];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = manifest_dir.parent().expect("host/ lives in the workspace root").to_path_buf();
    for watched in ["src", "wit", "Cargo.toml", "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(watched).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    // A separate target dir: the outer cargo holds the lock on its own.
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"))
        .join("components");
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
