//! Fault injection for the dev stack's tests, read from the environment
//! variable `SNAPSIGN_BUILDER_FAULT`: comma-separated entries
//!
//! - `exit_nonzero`: after the upload succeeded, print
//!   `injected fault: exit_nonzero` to stderr and exit 3 without writing metadata;
//! - `metadata_missing:<field>`: write metadata.json without `<field>`
//!   (one of the snake_case fields of [`crate::metadata`]);
//! - `metadata_uri:<uri>`: write metadata.json with `snapshot_uri` = `<uri>`;
//! - `delay_parts_ms:<n>`: wait `n` ms before each part upload after the
//!   first (not when resuming), so that short-lived part URLs expire;
//! - `allocate`: before anything else, use memory without bound (touching
//!   every page, up to [`ALLOCATE_LIMIT`]) so that the sandbox's memory limit
//!   makes the kernel OOM-kill the builder; a builder still alive past the
//!   bound says so and exits 4.
//!
//! An entry that is none of these is a usage error (exit 2), so a typo in a
//! test cannot pass silently.

use serde_json::{Value, json};

use crate::metadata::{Built, FIELDS};

/// The environment variable read by [`crate::run_cli`].
pub const ENV: &str = "SNAPSIGN_BUILDER_FAULT";

/// Most the `allocate` fault uses before giving up (the machine's sake).
pub const ALLOCATE_LIMIT: usize = 16 << 30;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Faults {
    pub exit_nonzero: bool,
    pub allocate: bool,
    pub metadata_missing: Vec<String>,
    pub metadata_uri: Option<String>,
    pub delay_parts: std::time::Duration,
}

impl Faults {
    pub fn parse(value: &str) -> Result<Faults, String> {
        let mut faults = Faults::default();
        for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "exit_nonzero" {
                faults.exit_nonzero = true;
            } else if entry == "allocate" {
                faults.allocate = true;
            } else if let Some(field) = entry.strip_prefix("metadata_missing:") {
                if !FIELDS.contains(&field) {
                    return Err(format!(
                        "{ENV}: metadata_missing:{field} names no metadata field ({})",
                        FIELDS.join(", ")
                    ));
                }
                faults.metadata_missing.push(field.to_owned());
            } else if let Some(uri) = entry.strip_prefix("metadata_uri:") {
                faults.metadata_uri = Some(uri.to_owned());
            } else if let Some(ms) = entry.strip_prefix("delay_parts_ms:") {
                let ms = ms.parse::<u64>().ok().filter(|ms| *ms <= 600_000).ok_or_else(|| {
                    format!("{ENV}: delay_parts_ms:{ms} is not a number of milliseconds up to 600000")
                })?;
                faults.delay_parts = std::time::Duration::from_millis(ms);
            } else {
                return Err(format!(
                    "{ENV}: unknown entry '{entry}' (known: exit_nonzero, allocate, metadata_missing:<field>, metadata_uri:<uri>, \
                     delay_parts_ms:<n>)"
                ));
            }
        }
        Ok(faults)
    }

    pub fn is_empty(&self) -> bool {
        *self == Faults::default()
    }
}

/// The `allocate` fault: touches 16 MiB chunks until killed or at
/// [`ALLOCATE_LIMIT`]; returns the bytes held when it stopped.
pub fn allocate() -> usize {
    const CHUNK: usize = 16 << 20;
    let mut held: Vec<Vec<u8>> = Vec::new();
    while held.len() * CHUNK < ALLOCATE_LIMIT {
        // Non-zero bytes: every page is really backed by memory.
        held.push(vec![1u8; CHUNK]);
    }
    std::hint::black_box(&held);
    held.len() * CHUNK
}

impl Faults {
    /// `built`'s metadata JSON object, with the injected faults applied.
    pub fn metadata_json(&self, built: &Built) -> Value {
        let mut value = built.json();
        let object = value.as_object_mut().expect("metadata is an object");
        if let Some(uri) = &self.metadata_uri {
            object.insert("snapshot_uri".into(), json!(uri));
        }
        for field in &self.metadata_missing {
            object.remove(field);
        }
        value
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_entries_the_dev_stack_sends() {
        let faults =
            Faults::parse("exit_nonzero,metadata_missing:rootfs_disk_bytes, metadata_uri:s3://b/other").unwrap();
        assert!(faults.exit_nonzero && !faults.allocate);
        assert!(Faults::parse("allocate").unwrap().allocate);
        assert_eq!(faults.metadata_missing, ["rootfs_disk_bytes"]);
        assert_eq!(faults.metadata_uri.as_deref(), Some("s3://b/other"));
        assert!(Faults::parse("").unwrap().is_empty());
        let delay = Faults::parse("delay_parts_ms:6000").unwrap().delay_parts;
        assert_eq!(delay, std::time::Duration::from_secs(6));
    }

    #[test]
    fn unknown_entries_and_fields_are_refused() {
        assert!(Faults::parse("exit_zero").unwrap_err().contains("unknown entry 'exit_zero'"));
        assert!(Faults::parse("metadata_missing:size").unwrap_err().contains("names no metadata field"));
        for bad in ["delay_parts_ms:", "delay_parts_ms:x", "delay_parts_ms:600001"] {
            assert!(Faults::parse(bad).unwrap_err().contains("not a number of milliseconds"), "{bad}");
        }
    }

    #[test]
    fn faults_drop_a_field_or_replace_the_uri() {
        let faults = Faults {
            metadata_missing: vec!["rootfs_disk_bytes".into()],
            metadata_uri: Some("s3://b/elsewhere".into()),
            ..Faults::default()
        };
        let value = faults.metadata_json(&crate::metadata::tests::diff());
        assert!(value.get("rootfs_disk_bytes").is_none());
        assert_eq!(value["snapshot_uri"], "s3://b/elsewhere");
        assert_eq!(value["snapshot_size_bytes"], 1234);
        assert_eq!(
            Faults::default().metadata_json(&crate::metadata::tests::diff()),
            crate::metadata::tests::diff().json()
        );
    }
}
