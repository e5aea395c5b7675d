//! The builder-metadata reader (`completion`) on arbitrary metadata.json,
//! with a signed uri or without. When a uri was signed, the completion names
//! exactly it, or fails naming the mismatch; a diff names its parent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};
use snapsign::image_build::complete;
use snapsign::wire::Prepared;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Ok(metadata) = serde_json::from_slice::<Value>(rest) else { return };
    let kind = if mode & 1 == 0 { "base" } else { "diff" };
    let mut spec = json!({"buildId": "b", "snapshotId": "s", "rootfsNodeKind": kind, "snapshotUri": "s3://bucket/prepared",
        "builder": {"image": "i", "command": "c", "cpus": 1, "memoryMb": 1, "diskMb": 1}});
    if mode & 2 != 0 {
        spec["parent"] = json!({"parentManifestUri": "s3://bucket/parent"});
    }
    let prepared = Prepared::parse(&spec).unwrap();
    let signed = (mode & 4 != 0).then_some("s3://bucket/signed");
    match complete::completion(&prepared, signed, &metadata, u64::from(mode)) {
        Ok(request) => {
            if let Some(signed) = signed {
                assert_eq!(request.snapshot_uri, signed);
            }
            assert!(!request.snapshot_uri.is_empty());
            if request.rootfs_node_kind == "diff" {
                assert!(request.parent_manifest_uri.is_some(), "{request:?}");
            }
        }
        Err(complete::CompleteError::UriMismatch { signed: s, .. }) => assert_eq!(Some(s.as_str()), signed),
        Err(_) => {}
    }
});
