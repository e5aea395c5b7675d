//! The public Tensorlake client against `snapsign dev`: PyPI
//! `tensorlake==0.5.163` (its image builder is the SDK's compiled Rust core),
//! installed into a venv, driving the `snapsign dev` process over loopback
//! exactly as its users call it. Nobody here wrote that client: when it
//! builds, the dev stack speaks the protocol.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::process::DevProcess as Dev;
use serde_json::Value;
use sha2::{Digest, Sha256};
use snapsign::presign::{Addressing, Credentials, Endpoint, Method, Presigner};

/// The client, pinned.
const CLIENT: &str = "tensorlake==0.5.163";

/// A venv with the pinned client, made once under target/ (a second run downloads nothing).
fn client_python() -> PathBuf {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("official-client").join(CLIENT.replace("==", "-"));
    let python = venv.join("bin").join("python");
    let installed = venv.join(".installed");
    if installed.exists() {
        return python;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let made = Command::new("python3").args(["-m", "venv"]).arg(&venv).output();
    match made {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`python3 -m venv {}` failed: {}\nInstall Python's venv module (Debian: apt-get install python3-venv; .ci/run does).",
            venv.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => panic!("cannot run python3 ({e}); this test needs Python 3 with venv to install {CLIENT}"),
    }
    let pip = Command::new(venv.join("bin").join("pip"))
        .args(["install", "--disable-pip-version-check", "--quiet", "--timeout", "60", CLIENT])
        .output()
        .expect("run pip");
    assert!(
        pip.status.success(),
        "installing {CLIENT} from PyPI failed: is the registry reachable? This test needs the public client \
         and does not pass without it.\npip said:\n{}{}",
        String::from_utf8_lossy(&pip.stdout),
        String::from_utf8_lossy(&pip.stderr)
    );
    std::fs::write(&installed, CLIENT).unwrap();
    python
}

struct Built {
    ok: bool,
    result: Value,
    error: String,
    events: Vec<Value>,
}

/// One build by the public client, in a context holding `files` and `dockerfile`.
fn client_build(
    python: &Path,
    dev: &Dev,
    token: &str,
    namespace: &str,
    name: &str,
    dockerfile: &str,
    public: bool,
) -> Built {
    let context = tempfile::tempdir().unwrap();
    std::fs::write(context.path().join("Dockerfile"), dockerfile).unwrap();
    std::fs::write(context.path().join("hello.txt"), format!("{namespace}/{name}\n")).unwrap();
    if dockerfile.contains("rootfs/") {
        common::rootfs::write(&context.path().join("rootfs"));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/official_client/build.py");
    let out = Command::new(python)
        .arg(script)
        .args([&dev.api, token, namespace])
        .arg(context.path())
        .args([name, if public { "1" } else { "0" }])
        .stderr(Stdio::inherit())
        .output()
        .expect("run the client");
    let line = String::from_utf8_lossy(&out.stdout);
    let outcome: Value = serde_json::from_str(line.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the client driver printed no outcome ({e}): {line}"));
    Built {
        ok: outcome["ok"] == true,
        result: outcome["result"].clone(),
        error: outcome["error"].as_str().unwrap_or_default().to_owned(),
        events: outcome["events"].as_array().cloned().unwrap_or_default(),
    }
}

/// Checks the registered template (through the lookup, as its namespace sees
/// it) and the stored object (size, and the sha256 the builder declared).
async fn check_registered(dev: &Dev, token: &str, built: &Built, name: &str) -> Value {
    assert!(built.ok, "build {name} failed: {}\nevents: {:#?}", built.error, built.events);
    let http = reqwest::Client::new();
    let url = format!("{}/platform/v1/sandbox-templates/by-name/{name}", dev.api);
    let template: Value = http.get(url).bearer_auth(token).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        template["id"], built.result["id"],
        "the client's answer is the registered template: {template}\nclient: {}",
        built.result
    );
    assert_eq!(template["snapshotUri"], built.result["snapshotUri"]);

    let uri = template["snapshotUri"].as_str().unwrap();
    let bytes = stored(dev, uri).await;
    let declared = built
        .events
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find_map(|m| m.contains(uri).then(|| m.rsplit_once("sha256 ").map(|(_, h)| h.trim().to_owned())).flatten())
        .unwrap_or_else(|| panic!("the builder's log never declared the sha256 of {uri}: {:#?}", built.events));

    assert_eq!(Some(bytes.len() as u64), template["snapshotSizeBytes"].as_u64(), "{uri}: size");
    let sha256 = hex::encode(Sha256::digest(&bytes));
    assert_eq!(sha256, declared, "{uri}: the stored bytes are what the builder wrote");
    assert_eq!(template["snapshotSha256"].as_str(), Some(sha256.as_str()));
    template
}

/// A stored object's bytes, read with the store's credentials.
async fn stored(dev: &Dev, uri: &str) -> Vec<u8> {
    let secrets = dev.secrets();
    let key = uri.strip_prefix("s3://snapshots/").unwrap();
    let endpoint = Endpoint::parse(&dev.store, Addressing::Path).unwrap();
    let credentials = Credentials {
        access_key_id: secrets["access_key_id"].as_str().unwrap().into(),
        secret_access_key: secrets["secret_access_key"].as_str().unwrap().into(),
        session_token: None,
    };
    let presigner = Presigner::new(&credentials, "us-east-1", jiff::Timestamp::now(), 300);
    let get = presigner.presign(Method::Get, &endpoint.object("snapshots", key), &[]);
    let response = reqwest::Client::new().get(get).send().await.unwrap().error_for_status().unwrap();
    response.bytes().await.unwrap().to_vec()
}

/// A snapshot's entry names and, unpacked, its tree.
fn unpack(bytes: &[u8]) -> (Vec<String>, tempfile::TempDir) {
    let mut raw = tar::Archive::new(zstd::Decoder::new(bytes).unwrap());
    let names = raw.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_str().unwrap().to_owned()).collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("s.tar.zst"), bytes).unwrap();
    let mut tree = snapsign_rootfs_builder::tree::Tree::create(dir.path().join("tree")).unwrap();
    snapsign_rootfs_builder::archive::read_archive(&dir.path().join("s.tar.zst"), Some(&mut tree)).unwrap();
    (names, dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_public_tensorlake_client_builds_base_diff_and_a_diff_on_another_namespaces_public_template() {
    let python = tokio::task::spawn_blocking(client_python).await.unwrap();
    let data = tempfile::tempdir().unwrap();
    let dev = Dev::start(data.path(), &[]);
    let default = dev.token.clone();
    let other = dev.token_for("other");

    let run = |token: String, namespace: &'static str, name: &'static str, dockerfile: &'static str, public: bool| {
        let (python, dev) = (python.clone(), &dev);
        async move {
            tokio::task::block_in_place(|| client_build(&python, dev, &token, namespace, name, dockerfile, public))
        }
    };
    const BASE: &str = "FROM scratch\nCOPY hello.txt /etc/hello.txt\nCMD [\"/bin/sh\"]\n";

    // A base image FROM scratch.
    let base = run(default.clone(), "default", "hello", BASE, false).await;
    let base = check_registered(&dev, &default, &base, "hello").await;
    assert_eq!(base["rootfsNodeKind"], "base");
    assert!(base["snapshotUri"].as_str().unwrap().starts_with("s3://snapshots/builds/default/"), "{base}");

    // A diff image FROM it.
    let diff =
        run(default.clone(), "default", "hello-diff", "FROM hello\nCOPY hello.txt /etc/again.txt\n", false).await;
    let diff = check_registered(&dev, &default, &diff, "hello-diff").await;
    assert_eq!((diff["rootfsNodeKind"].as_str(), &diff["parentManifestUri"]), (Some("diff"), &base["snapshotUri"]));

    // A diff image FROM another namespace's public template.
    let shared = run(other.clone(), "other", "shared", BASE, true).await;
    let shared = check_registered(&dev, &other, &shared, "shared").await;
    assert_eq!(shared["public"], true);
    let child =
        run(default.clone(), "default", "on-shared", "FROM other/shared\nCOPY hello.txt /etc/mine.txt\n", false).await;
    let child = check_registered(&dev, &default, &child, "on-shared").await;
    assert_eq!(child["parentManifestUri"], shared["snapshotUri"]);
    assert_eq!(child["namespace"], "default");
    assert!(child["snapshotUri"].as_str().unwrap().starts_with("s3://snapshots/builds/default/"), "{child}");

    // RUN, a diff build deleting a base file, two stages and COPY --from a template.
    let with_run =
        "FROM scratch\nCOPY --chmod=755 rootfs/ /\nRUN echo built by RUN > /etc/run.txt && echo gone > /etc/gone\n";
    let built = run(default.clone(), "default", "with-run", with_run, false).await;
    let with_run = check_registered(&dev, &default, &built, "with-run").await;
    let (_, tree) = unpack(&stored(&dev, with_run["snapshotUri"].as_str().unwrap()).await);
    assert_eq!(std::fs::read_to_string(tree.path().join("tree/etc/run.txt")).unwrap(), "built by RUN\n");
    let built = run(default.clone(), "default", "run-diff", "FROM with-run\nRUN rm /etc/gone\n", false).await;
    let run_diff = check_registered(&dev, &default, &built, "run-diff").await;
    let (names, _) = unpack(&stored(&dev, run_diff["snapshotUri"].as_str().unwrap()).await);
    assert_eq!(names, ["snapshot.json", "rootfs/etc/.wh.gone"], "the diff holds only the deletion");
    // A diff of that diff: the layers below the parent reach the builder through the client unread.
    let built =
        run(default.clone(), "default", "run-diff2", "FROM run-diff\nRUN cat /etc/run.txt > /again.txt\n", false).await;
    let run_diff2 = check_registered(&dev, &default, &built, "run-diff2").await;
    let (names, _) = unpack(&stored(&dev, run_diff2["snapshotUri"].as_str().unwrap()).await);
    assert_eq!(names, ["snapshot.json", "rootfs/again.txt"]);
    let staged = "FROM with-run AS build\nRUN echo staged > /out.txt\n\
                  FROM scratch\nCOPY --from=build /out.txt /out.txt\nCOPY --from=with-run /etc/run.txt /run.txt\n";
    let built = run(default.clone(), "default", "staged", staged, false).await;
    let staged = check_registered(&dev, &default, &built, "staged").await;
    let (names, tree) = unpack(&stored(&dev, staged["snapshotUri"].as_str().unwrap()).await);
    assert_eq!(names, ["snapshot.json", "rootfs/out.txt", "rootfs/run.txt"]);
    assert_eq!(std::fs::read_to_string(tree.path().join("tree/out.txt")).unwrap(), "staged\n");

    // A failing COPY and a failing RUN: the client raises with the builder's exit code (its own
    // words), and its build log, which `verbose` prints, carries the builder's last line: the
    // Dockerfile line, the step and the reason. Nothing is registered.
    for (name, dockerfile, reasons) in [
        (
            "fails-copy",
            "FROM scratch\nCOPY hello.txt /a\nCOPY missing.txt /b\n",
            ["spec.dockerfile line 3: COPY missing.txt /b:", "source missing.txt does not exist in the build context"],
        ),
        (
            "fails-run",
            "FROM with-run\nRUN echo before\nRUN exit 7\n",
            ["spec.dockerfile line 3: RUN exit 7:", "exited with code 7"],
        ),
    ] {
        let built = run(default.clone(), "default", name, dockerfile, false).await;
        assert!(!built.ok && built.error.contains("failed with exit code 1"), "{name}: {}", built.error);
        let stderr: Vec<&str> = built
            .events
            .iter()
            .filter(|e| e["type"] == "build_log" && e["stream"] == "stderr")
            .filter_map(|e| e["message"].as_str())
            .collect();
        assert!(
            stderr.iter().any(|line| reasons.iter().all(|r| line.contains(r))),
            "{name}: no stderr line names {reasons:?}: {stderr:#?}"
        );
        let url = format!("{}/platform/v1/sandbox-templates/by-name/{name}", dev.api);
        let status = reqwest::Client::new().get(url).bearer_auth(&default).send().await.unwrap().status();
        assert_eq!(status, 404, "{name} was registered");
    }

    // FROM a registry image: the platform imports it, the builder starts from it.
    let tools = snapsign_foreign_hosts::Tools::new(
        Path::new(env!("CARGO_TARGET_TMPDIR")).parent().unwrap().join("hosts-cache"),
    );
    let registry_dir = tempfile::tempdir().unwrap();
    let (_registry_process, registry) =
        snapsign_foreign_hosts::launch::oci_registry(&tools, &registry_dir.path().join("registry")).await.unwrap();
    let image = common::registry::test_image(&registry_dir.path().join("image"));
    common::registry::push(&registry, &image).await;
    let dockerfile: &'static str = Box::leak(
        format!("FROM {registry}/team/base:1.2\nUSER root\nRUN rm /etc/hello && echo \"$GREETING\" > /ok\n")
            .into_boxed_str(),
    );
    let built = run(default.clone(), "default", "from-registry", dockerfile, false).await;
    let imported = check_registered(&dev, &default, &built, "from-registry").await;
    assert_eq!(imported["rootfsNodeKind"], "base");
    let (names, tree) = unpack(&stored(&dev, imported["snapshotUri"].as_str().unwrap()).await);
    assert_eq!(std::fs::read_to_string(tree.path().join("tree/ok")).unwrap(), "hello\n");
    assert!(
        names.contains(&"rootfs/bin/sh".to_owned()) && !names.contains(&"rootfs/etc/hello".to_owned()),
        "{names:?}"
    );
}
