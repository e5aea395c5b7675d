//! The sandbox lifecycle API (wit/protocol.md §3, §12): create, get (200
//! `pending` until the sandbox runs, as the platform answers now; 502
//! PROXY_ERROR while pending only under a fault switch), delete.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Method, Response, StatusCode};
use serde_json::{Value, json};
use snapsign_sandbox::Sandboxes;

use super::http::{ApiError, Body, parse_json};
use super::shared::Shared;

/// Lifecycle bookkeeping of one sandbox.
#[derive(Debug, Clone)]
pub(crate) struct SandboxRecord {
    pub namespace: String,
    pub ready_at: Instant,
    pub pending_502s_left: u32,
    pub resources: Value,
    pub image: String,
}

/// The lifecycle API's handler: the local sandboxes and their records.
pub struct LifecycleApi {
    shared: Arc<Shared>,
    pub(crate) sandboxes: Sandboxes,
    records: Mutex<HashMap<String, SandboxRecord>>,
    /// How long a new sandbox stays pending.
    pending: Duration,
}

/// What the gateway answers while a sandbox is not running yet.
pub(crate) fn pending_error(id: &str) -> ApiError {
    ApiError::new(StatusCode::BAD_GATEWAY, "PROXY_ERROR", format!("Failed to proxy request: sandbox {id} is pending"))
}

impl LifecycleApi {
    pub(crate) fn new(shared: Arc<Shared>, sandboxes: Sandboxes, pending: Duration) -> Self {
        LifecycleApi { shared, sandboxes, records: Mutex::new(HashMap::new()), pending }
    }

    /// Serves `method` on `…/sandboxes/{rest}` for `namespace`.
    pub(crate) async fn handle(
        &self,
        namespace: &str,
        method: &Method,
        body: &[u8],
        rest: &[&str],
    ) -> Result<Response<Body>, ApiError> {
        match (method, rest) {
            (&Method::POST, []) => {
                let body = parse_json(body)?;
                Ok(super::http::json(StatusCode::OK, &self.create_sandbox(namespace, &body).await?))
            }
            (&Method::GET, [id]) => Ok(super::http::json(StatusCode::OK, &self.sandbox_info(namespace, id)?)),
            (&Method::DELETE, [id]) => {
                self.delete_sandbox(namespace, id).await?;
                Ok(super::http::json(StatusCode::OK, &json!({"sandbox_id": id, "status": "terminated"})))
            }
            _ => Err(ApiError::not_found("no_route", format!("no lifecycle route {method} {}", rest.join("/")))),
        }
    }

    async fn create_sandbox(&self, namespace: &str, body: &Value) -> Result<Value, ApiError> {
        let image = body.get("image").and_then(Value::as_str).unwrap_or("snapsign/rootfs-builder").to_owned();
        let resources = body.get("resources").cloned().unwrap_or_else(|| json!({"cpus": 1.0, "memory_mb": 1024}));
        if resources.get("cpus").and_then(Value::as_f64).is_none()
            || resources.get("memory_mb").and_then(Value::as_i64).is_none()
        {
            return Err(ApiError::bad_request(
                "invalid_field",
                "resources needs cpus (number) and memory_mb (integer)",
            ));
        }
        // resources, timeout_secs and network become the local sandbox's limits, timeout and network.
        let request = serde_json::from_value::<snapsign_sandbox::CreateRequest>(json!({
            "resources": resources, "timeout_secs": body.get("timeout_secs"), "network": body.get("network")}))
        .map_err(|e| ApiError::bad_request("invalid_field", format!("create request: {e}")))?;
        let spec =
            self.sandboxes.spec_for(&request).map_err(|e| ApiError::bad_request("invalid_field", format!("{e:#}")))?;
        let id = format!("sbx-{}", self.shared.state.next_id("sandbox")?);
        let sandbox = self
            .sandboxes
            .create_with(&id, spec)
            .map_err(|e| ApiError::internal(e.context(format!("create sandbox {id}"))))?;
        // Which mechanism holds each limit here (cgroups, rlimits, tmpfs), and which asked limit none holds.
        let limits = serde_json::to_value(sandbox.enforcement()).unwrap_or_default();
        self.shared.state.put_sandbox(&id, namespace, &image, "pending")?;
        let record = SandboxRecord {
            namespace: namespace.to_owned(),
            ready_at: Instant::now() + self.pending,
            pending_502s_left: self.shared.faults().pending_502s,
            resources,
            image,
        };
        self.records.lock().unwrap_or_else(|p| p.into_inner()).insert(id.clone(), record);
        tracing::info!(sandbox = %id, %namespace, "sandbox created (pending)");
        Ok(
            json!({"sandbox_id": id, "status": "pending", "routing_hint": format!("local-{id}"), "sandbox_url": self.shared.base_url(), "limits": limits}),
        )
    }

    pub(crate) fn record(&self, namespace: &str, id: &str) -> Result<SandboxRecord, ApiError> {
        self.records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .filter(|r| r.namespace == namespace)
            .cloned()
            .ok_or_else(|| {
                ApiError::not_found("sandbox_not_found", format!("no sandbox '{id}' in namespace '{namespace}'"))
            })
    }

    /// The record of sandbox `id`, whatever its namespace.
    pub(crate) fn record_by_id(&self, id: &str) -> Option<SandboxRecord> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Whether the sandbox answers yet; counts down injected 502s.
    pub(crate) fn running(&self, id: &str, consume_fault: bool) -> bool {
        let mut records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let Some(record) = records.get_mut(id) else { return false };
        if Instant::now() < record.ready_at {
            return false;
        }
        if record.pending_502s_left > 0 {
            if consume_fault {
                record.pending_502s_left -= 1;
            }
            return false;
        }
        true
    }

    fn sandbox_info(&self, namespace: &str, id: &str) -> Result<Value, ApiError> {
        let record = self.record(namespace, id)?;
        let faults = self.shared.faults();
        let status = if faults.terminate_sandbox || self.sandboxes.get(id).is_none() {
            // The local sandbox is gone: it timed out (see timeout_secs).
            "terminated"
        } else if Instant::now() < record.ready_at {
            if faults.lifecycle_502_while_pending {
                return Err(pending_error(id));
            }
            "pending"
        } else if self.running(id, true) {
            "running"
        } else {
            // `pending_502s`: the gateway's 502s after the sandbox started.
            return Err(pending_error(id));
        };
        let disk_mb = record.resources.get("disk_mb").cloned().unwrap_or(json!(0));
        let resources = json!({
            "cpus": record.resources["cpus"],
            "memory_mb": record.resources["memory_mb"],
            "disk_mb": disk_mb,
            "ephemeral_disk_mb": disk_mb,
        });
        // One id field: the public client reads `id` and `sandbox_id` as
        // aliases and refuses an answer that has both (wit/protocol.md §12).
        Ok(json!({"id": id, "namespace": namespace, "status": status, "image": record.image,
                  "resources": resources, "routing_hint": format!("local-{id}"), "sandbox_url": self.shared.base_url()}))
    }

    async fn delete_sandbox(&self, namespace: &str, id: &str) -> Result<(), ApiError> {
        self.record(namespace, id)?;
        self.sandboxes.delete(id).await.map_err(|e| ApiError::internal(e.context(format!("delete sandbox {id}"))))?;
        self.records.lock().unwrap_or_else(|p| p.into_inner()).remove(id);
        self.shared.state.put_sandbox(id, namespace, "", "deleted")?;
        tracing::info!(sandbox = %id, "sandbox deleted");
        Ok(())
    }

    /// Ids of the sandboxes that exist now.
    pub fn live_sandboxes(&self) -> Vec<String> {
        self.records.lock().unwrap_or_else(|p| p.into_inner()).keys().cloned().collect()
    }

    /// Deletes every sandbox (stack shutdown).
    pub async fn delete_all_sandboxes(&self) {
        let ids: Vec<(String, String)> = self
            .records
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, r)| (id.clone(), r.namespace.clone()))
            .collect();
        for (id, namespace) in ids {
            if let Err(e) = self.delete_sandbox(&namespace, &id).await {
                tracing::warn!(sandbox = %id, "cannot delete sandbox at shutdown: {}", e.message);
            }
        }
    }
}
