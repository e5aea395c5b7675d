//! The prepare-answer reader (`wire::Prepared::parse`), the local-image scan
//! and the builder command split on arbitrary JSON. The typed view agrees
//! with the raw JSON and reads back what it writes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use snapsign::image_build::{command, splice};
use snapsign::wire::Prepared;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let Ok(prepared) = Prepared::parse(&value) else { return };
    let Value::Object(raw) = &value else { panic!("parsed a prepared build from a non-object") };
    assert_eq!(raw["buildId"].as_str(), Some(prepared.build_id.as_str()));
    assert_eq!(raw["builder"]["image"].as_str(), Some(prepared.builder.image.as_str()));
    let written = serde_json::to_value(&prepared).expect("a prepared build serializes");
    assert_eq!(Prepared::parse(&written).as_ref(), Ok(&prepared), "reads back what it writes");
    for (index, uri) in splice::local_images_to_sign(raw) {
        assert_eq!(raw["additionalLocalImages"][index]["snapshotUri"].as_str(), Some(uri.as_str()));
        assert!(!uri.starts_with("file://"));
    }
    let _ = command::builder_invocation(&prepared.builder.command);
});
