//! Fault switches: make one step of the flow fail on purpose, so tests can
//! show each failure is reported and cleaned up. Set them at start-up
//! (`DevConfig::faults`) or at run time with `PUT /_snapsign/faults`.

use serde::{Deserialize, Serialize};

/// Every fault the dev stack can inject. The default injects none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Extra 502 PROXY_ERROR answers from `GET /sandboxes/{id}` after the
    /// pending time, before it reports running.
    pub pending_502s: u32,
    /// `GET /sandboxes/{id}` answers 502 PROXY_ERROR while the sandbox is
    /// pending, as the platform's gateway once did, instead of 200 `pending`.
    pub lifecycle_502_while_pending: bool,
    /// `GET /sandboxes/{id}` reports `terminated` (the sandbox died while starting).
    pub terminate_sandbox: bool,
    /// The proxy's `POST /api/v1/blob/sign` answers 502 instead of forwarding.
    pub sign_fail: bool,
    /// The proxy forwards to the signer but drops `uri` from its answer.
    pub sign_without_uri: bool,
    /// The store answers 500 to UploadPart for this part number.
    pub store_fail_part: Option<u32>,
    /// The reference builder uploads, then exits 3 without metadata.
    pub builder_exit_nonzero: bool,
    /// The builder process is OOM-killed: where sandboxes have a memory
    /// controller, the builder uses memory until the kernel kills it at the
    /// sandbox's limit (a real kill); elsewhere it is simulated (SIGKILL,
    /// reported as `oom_killed`).
    pub builder_oom: bool,
    /// metadata.json lacks this field.
    pub metadata_missing_field: Option<String>,
    /// metadata.json carries this snapshot_uri instead of the signed one.
    pub metadata_uri: Option<String>,
    /// `POST …/complete` answers 500 and registers nothing.
    pub complete_fail: bool,
    /// The reference builder waits this long before each part after the
    /// first: with a short URL lifetime (`snapsign dev --url-ttl-secs`) the
    /// part URLs expire during the upload.
    pub builder_delay_parts_ms: Option<u64>,
}

impl Faults {
    /// The `SNAPSIGN_BUILDER_FAULT` value the reference builder reads, if any.
    pub fn builder_env(&self) -> Option<String> {
        let mut entries = Vec::new();
        if self.builder_exit_nonzero {
            entries.push("exit_nonzero".to_owned());
        }
        if let Some(field) = &self.metadata_missing_field {
            entries.push(format!("metadata_missing:{field}"));
        }
        if let Some(uri) = &self.metadata_uri {
            entries.push(format!("metadata_uri:{uri}"));
        }
        if let Some(ms) = self.builder_delay_parts_ms {
            entries.push(format!("delay_parts_ms:{ms}"));
        }
        (!entries.is_empty()).then(|| entries.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_faults_become_one_env_value_and_unknown_switches_are_refused() {
        let faults: Faults =
            serde_json::from_str(r#"{"builder_exit_nonzero":true,"metadata_missing_field":"rootfs_disk_bytes","builder_delay_parts_ms":6000}"#)
                .unwrap();
        assert_eq!(
            faults.builder_env().as_deref(),
            Some("exit_nonzero,metadata_missing:rootfs_disk_bytes,delay_parts_ms:6000")
        );
        assert_eq!(Faults::default().builder_env(), None);
        assert!(serde_json::from_str::<Faults>(r#"{"no_such_fault":true}"#).is_err());
    }
}
