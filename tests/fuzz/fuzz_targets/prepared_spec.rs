//! The prepared-spec parser (`Prepared::parse`), the local-image scan and
//! the builder command split on arbitrary JSON. A parsed spec keeps every
//! field verbatim and its typed view agrees with the raw JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use snapsign::image_build::{command, splice};

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else { return };
    let Ok(prepared) = splice::Prepared::parse(value.clone()) else { return };
    assert_eq!(Value::Object(prepared.raw.clone()), value);
    assert_eq!(prepared.raw["buildId"].as_str(), Some(prepared.build_id.as_str()));
    assert_eq!(prepared.raw["builder"]["image"].as_str(), Some(prepared.builder.image.as_str()));
    for (index, uri) in splice::local_images_to_sign(&prepared.raw) {
        assert_eq!(prepared.raw["additionalLocalImages"][index]["snapshotUri"].as_str(), Some(uri.as_str()));
        assert!(!uri.starts_with("file://"));
    }
    let _ = command::builder_invocation(&prepared.builder.command);
});
