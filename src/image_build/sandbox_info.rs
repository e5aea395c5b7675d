//! The lifecycle API's sandbox answer (`GET /sandboxes/{id}`), read as
//! leniently as the platform's public client reads it (wit/protocol.md
//! §3.4, §12): the id as `id` or `sandbox_id`, the disk as `disk_mb` or
//! `ephemeral_disk_mb`. Only `status` is required for the flow.

use serde::Deserialize;
use serde_json::Value;

/// What the flow reads of a sandbox answer.
#[derive(Debug, Clone, PartialEq)]
pub struct SandboxInfo {
    /// `pending`, `running`, `terminated`, …
    pub status: String,
    /// The sandbox's proxy URL, when the platform gives it.
    pub sandbox_url: Option<String>,
    /// Routing hint for the proxy, when given.
    pub routing_hint: Option<String>,
    /// Disk in MiB (`disk_mb`, else `ephemeral_disk_mb`), when given.
    pub disk_mb: Option<u64>,
}

#[derive(Deserialize)]
struct Wire {
    id: Option<String>,
    sandbox_id: Option<String>,
    status: Option<String>,
    sandbox_url: Option<String>,
    routing_hint: Option<String>,
    #[serde(default)]
    resources: Option<Value>,
}

/// Reads the answer about sandbox `id`; refuses one that is about another
/// sandbox, or lacks `status`.
pub fn parse(id: &str, text: &str) -> Result<SandboxInfo, String> {
    let wire: Wire =
        serde_json::from_str(text).map_err(|e| format!("sandbox {id} answer is not a sandbox object ({e}): {text}"))?;
    for named in [&wire.id, &wire.sandbox_id].into_iter().flatten() {
        if named != id {
            return Err(format!("asked for sandbox {id}, the lifecycle API answered about sandbox {named}"));
        }
    }
    let status = wire.status.filter(|s| !s.is_empty()).ok_or_else(|| format!("sandbox {id} answer has no status"))?;
    let resources = wire.resources.unwrap_or(Value::Null);
    let disk_mb = resources.get("disk_mb").and_then(Value::as_u64).or(resources["ephemeral_disk_mb"].as_u64());
    Ok(SandboxInfo { status, sandbox_url: wire.sandbox_url, routing_hint: wire.routing_hint, disk_mb })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_either_id_alias_and_either_disk_field() {
        let now = r#"{"id":"sbx-1","namespace":"default","status":"pending",
                      "resources":{"cpus":1.0,"memory_mb":512,"disk_mb":2048,"ephemeral_disk_mb":2048}}"#;
        let seed = r#"{"id":"sbx-1","sandbox_id":"sbx-1","namespace":"default","status":"running",
                       "resources":{"cpus":1.0,"memory_mb":512,"ephemeral_disk_mb":1024},"sandbox_url":"http://127.0.0.1:1"}"#;
        let only_alias = r#"{"sandbox_id":"sbx-1","status":"running","resources":{"cpus":1,"memory_mb":1}}"#;
        assert_eq!(parse("sbx-1", now).unwrap().disk_mb, Some(2048));
        let seed = parse("sbx-1", seed).unwrap();
        assert_eq!((seed.status.as_str(), seed.disk_mb), ("running", Some(1024)));
        assert_eq!(seed.sandbox_url.as_deref(), Some("http://127.0.0.1:1"));
        assert_eq!(
            parse("sbx-1", only_alias).unwrap(),
            SandboxInfo { status: "running".into(), sandbox_url: None, routing_hint: None, disk_mb: None }
        );
    }

    #[test]
    fn refuses_an_answer_about_another_sandbox_or_without_status() {
        let other = parse("sbx-1", r#"{"id":"sbx-2","status":"running"}"#).unwrap_err();
        assert!(other.contains("sbx-1") && other.contains("sbx-2"), "{other}");
        assert!(parse("sbx-1", r#"{"id":"sbx-1","sandbox_id":"sbx-9","status":"running"}"#).is_err());
        assert!(parse("sbx-1", r#"{"id":"sbx-1"}"#).unwrap_err().contains("no status"));
        assert!(parse("sbx-1", "<html>").unwrap_err().contains("not a sandbox object"));
    }
}
