//! A client of the dev stack that speaks wit/protocol.md over plain HTTP, as
//! any client of the real platform would.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use snapsign_dev_stack::{DevConfig, DevStack};

pub async fn start_stack(data_dir: &std::path::Path, edit: impl FnOnce(&mut DevConfig)) -> DevStack {
    let mut config = DevConfig::new(data_dir.to_owned(), env!("CARGO_BIN_EXE_snapsign").into());
    config.pending = Duration::from_millis(300);
    config.cache_dir = super::cache_dir();
    edit(&mut config);
    DevStack::start(&config).await.expect("start the dev stack")
}

/// What a wait for `running` saw.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Waited {
    /// 200 answers with `"status":"pending"`.
    pub pending: u32,
    /// 502 PROXY_ERROR answers.
    pub transient: u32,
}

pub struct Api {
    pub http: reqwest::Client,
    pub base: String,
    pub token: String,
    pub namespace: String,
}

impl Api {
    pub fn new(stack: &DevStack) -> Api {
        Api {
            http: reqwest::Client::new(),
            base: stack.api_url(),
            token: stack.token.clone(),
            namespace: stack.namespace.clone(),
        }
    }

    pub async fn send(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        self.send_as(&self.token, request).await
    }

    /// Sends with another bearer token (the operator's, another namespace's).
    pub async fn send_as(&self, token: &str, request: reqwest::RequestBuilder) -> (u16, Value) {
        let response = request.bearer_auth(token).send().await.expect("reach the emulator");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(format!("{}{path}", self.base))).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.send(self.http.post(format!("{}{path}", self.base)).json(&body)).await
    }

    pub async fn prepare(
        &self,
        name: &str,
        dockerfile: &str,
        parent: Option<&str>,
        shape: Option<&str>,
    ) -> (u16, Value) {
        let body = json!({
            "name": name, "dockerfile": dockerfile, "baseImage": parent.unwrap_or("scratch"), "public": false,
            "rootfsNodeKind": if parent.is_some() { "diff" } else { "base" },
            "parentTemplate": parent.map(|p| json!({"name": p, "reference": p})),
            "additionalLocalImages": [],
        });
        let mut request = self.http.post(format!("{}/platform/v1/sandbox-template-builds", self.base)).json(&body);
        if let Some(shape) = shape {
            request = request.header("x-snapsign-prepare-shape", shape);
        }
        self.send(request).await
    }

    pub fn lifecycle(&self, rest: &str) -> String {
        format!("{}/v1/namespaces/{}/sandboxes{rest}", self.base, self.namespace)
    }

    pub async fn create_sandbox(&self) -> String {
        let body = json!({"image": "snapsign/rootfs-builder", "resources": {"cpus": 1.0, "memory_mb": 1024, "disk_mb": 2048}, "timeout_secs": 300});
        let (status, created) = self.send(self.http.post(self.lifecycle("")).json(&body)).await;
        assert_eq!(status, 200, "{created}");
        assert_eq!(created["status"], "pending");
        assert_eq!(created["sandbox_url"], self.base.as_str());
        created["sandbox_id"].as_str().unwrap().to_owned()
    }

    /// Polls the lifecycle GET until `running`; counts the 200 `pending`
    /// answers and the 502 PROXY_ERROR answers seen on the way.
    pub async fn wait_running(&self, id: &str) -> Waited {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut waited = Waited::default();
        loop {
            assert!(Instant::now() < deadline, "sandbox {id} never ran");
            let (status, info) = self.send(self.http.get(self.lifecycle(&format!("/{id}")))).await;
            match status {
                200 if info["status"] == "running" => return waited,
                200 if info["status"] == "pending" => {
                    assert_eq!(info["id"].as_str(), Some(id), "{info}");
                    assert!(info.get("sandbox_id").is_none(), "one id field only: {info}");
                    waited.pending += 1;
                }
                502 => {
                    assert!(info.to_string().contains("PROXY_ERROR"), "{info}");
                    waited.transient += 1;
                }
                _ => panic!("GET sandbox {id}: {status} {info}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn proxy(&self, method: reqwest::Method, id: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).header("x-tensorlake-sandbox-id", id)
    }

    /// Runs a process to its end through start + follow + get (wit/protocol.md §4.3).
    pub async fn run(&self, id: &str, command: &str, args: &[&str], root: bool) -> (Vec<Value>, Value) {
        let mut spec = json!({"command": command, "args": args});
        if root {
            spec["user"] = json!("root");
        }
        let (status, started) = self.send(self.proxy(reqwest::Method::POST, id, "/api/v1/processes").json(&spec)).await;
        assert_eq!(status, 200, "{started}");
        let pid = started["pid"].as_i64().unwrap();
        let events = self.follow(id, pid).await;
        let (status, info) = self.send(self.proxy(reqwest::Method::GET, id, &format!("/api/v1/processes/{pid}"))).await;
        assert_eq!(status, 200);
        (events, info)
    }

    pub async fn follow(&self, id: &str, pid: i64) -> Vec<Value> {
        let response = self
            .proxy(reqwest::Method::GET, id, &format!("/api/v1/processes/{pid}/output/follow"))
            .header("accept", "text/event-stream")
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        assert!(response.headers()["content-type"].to_str().unwrap().contains("text/event-stream"));
        let text = tokio::time::timeout(Duration::from_secs(120), response.text()).await.expect("follow ends").unwrap();
        text.lines().filter_map(|l| l.strip_prefix("data: ")).map(|d| serde_json::from_str(d).unwrap()).collect()
    }
}

pub const BUILD_DIR: &str = "/var/lib/tensorlake/rootfs-builder/build";

/// What a test build produced.
pub struct Built {
    pub prepared: Value,
    pub spec: Value,
    pub metadata: Value,
    pub builder_lines: Vec<String>,
    pub builder_exit: Value,
    pub complete: (u16, Value),
    pub sandbox: String,
}

impl Api {
    /// A whole build as wit/protocol.md §0 runs it, in plain HTTP calls: prepare,
    /// sandbox, sign (new shape), context files, spec.json, the reference
    /// builder, metadata.json, complete, delete.
    pub async fn build(
        &self,
        name: &str,
        dockerfile: &str,
        context: &[(&str, &[u8])],
        parent: Option<&str>,
        shape: &str,
        disk_mb: u64,
    ) -> Built {
        let (status, prepared) = self.prepare(name, dockerfile, parent, Some(shape)).await;
        assert_eq!(status, 200, "prepare: {prepared}");
        let sandbox = self.create_sandbox().await;
        self.wait_running(&sandbox).await;
        let mut spec = prepared.clone();
        if let Some(rel) = prepared["snapshotRelPath"].as_str() {
            let parts = disk_mb.div_ceil(64).clamp(1, 10_000);
            let request = json!({"target": {"kind": "artifact", "rel_path": rel},
                                 "op": {"kind": "put_artifact", "multipart_hint": {"max_parts": parts, "part_size_bytes": 67108864u64}}});
            let (status, signed) =
                self.send(self.proxy(reqwest::Method::POST, &sandbox, "/api/v1/blob/sign").json(&request)).await;
            assert_eq!(status, 200, "sign: {signed}");
            spec["snapshotUri"] = signed["uri"].clone();
            spec["upload"] = signed;
            if let Some(parent_uri) = prepared["parent"]["parentManifestUri"].as_str() {
                let request = json!({"target": {"kind": "blob", "uri": parent_uri}, "op": {"kind": "get_blob"}});
                let (status, read) =
                    self.send(self.proxy(reqwest::Method::POST, &sandbox, "/api/v1/blob/sign").json(&request)).await;
                assert_eq!(status, 200, "sign parent: {read}");
                spec["parent"]["download"] = read;
            }
        }
        let (_, made) = self.run(&sandbox, "mkdir", &["-p", BUILD_DIR], true).await;
        assert_eq!(made["exit_code"], 0);
        self.run(&sandbox, "chmod", &["0777", BUILD_DIR], true).await;
        for (path, bytes) in context {
            self.put_file(&sandbox, &format!("{BUILD_DIR}/context/{path}"), bytes.to_vec()).await;
        }
        spec["dockerfile"] = json!(dockerfile);
        spec["contextDir"] = json!(format!("{BUILD_DIR}/context"));
        spec["baseImage"] = json!(parent.unwrap_or("scratch"));
        spec["rootfsDiskBytes"] = json!(disk_mb * 1024 * 1024);
        self.put_file(&sandbox, &format!("{BUILD_DIR}/spec.json"), serde_json::to_vec_pretty(&spec).unwrap()).await;
        let spec_path = format!("{BUILD_DIR}/spec.json");
        let metadata_path = format!("{BUILD_DIR}/metadata.json");
        let (events, builder_exit) = self
            .run(
                &sandbox,
                "/usr/local/bin/tl-rootfs-build",
                &["--spec", &spec_path, "--metadata-out", &metadata_path],
                true,
            )
            .await;
        let builder_lines = events.iter().map(|e| e["line"].as_str().unwrap_or_default().to_owned()).collect();
        let metadata = match self.get_file(&sandbox, &metadata_path).await {
            Some(bytes) => serde_json::from_slice(&bytes).expect("metadata.json is JSON"),
            None => Value::Null,
        };
        let complete = if builder_exit["exit_code"] == 0 && !metadata.is_null() {
            let mut body = json!({
                "snapshotId": metadata["snapshot_id"], "snapshotUri": metadata["snapshot_uri"],
                "snapshotFormatVersion": metadata["snapshot_format_version"], "snapshotSizeBytes": metadata["snapshot_size_bytes"],
                "rootfsDiskBytes": metadata["rootfs_disk_bytes"], "rootfsNodeKind": metadata["rootfs_node_kind"],
            });
            if let Some(parent) = metadata.get("parent_manifest_uri").filter(|p| p.is_string()) {
                body["parentManifestUri"] = parent.clone();
            }
            let path =
                format!("/platform/v1/sandbox-template-builds/{}/complete", prepared["buildId"].as_str().unwrap());
            self.post(&path, body).await
        } else {
            (0, Value::Null)
        };
        let (status, _) = self.send(self.http.delete(self.lifecycle(&format!("/{sandbox}")))).await;
        assert_eq!(status, 200);
        Built { prepared, spec, metadata, builder_lines, builder_exit, complete, sandbox }
    }

    pub async fn put_file(&self, sandbox: &str, path: &str, bytes: Vec<u8>) {
        let response = self
            .proxy(reqwest::Method::PUT, sandbox, "/api/v1/files")
            .query(&[("path", path)])
            .bearer_auth(&self.token)
            .body(bytes)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "PUT {path}: {}", response.status());
    }

    pub async fn get_file(&self, sandbox: &str, path: &str) -> Option<Vec<u8>> {
        let response = self
            .proxy(reqwest::Method::GET, sandbox, "/api/v1/files")
            .query(&[("path", path)])
            .bearer_auth(&self.token)
            .send()
            .await
            .unwrap();
        response.status().is_success().then_some(response.bytes().await.unwrap().to_vec())
    }
}
