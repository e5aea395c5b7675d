//! The sign-answer splices (`splice_upload`, `splice_parent_download`,
//! `splice_local_image`) on arbitrary answers and specs. The spliced uri is
//! the answer's `uri`, and the answer lands in the spec verbatim.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};
use snapsign::image_build::splice;

fuzz_target!(|data: &[u8]| {
    let Ok(Value::Array(mut pair)) = serde_json::from_slice::<Value>(data) else { return };
    if pair.len() != 2 {
        return;
    }
    let answer = pair.pop().unwrap();
    let Value::Object(spec) = pair.pop().unwrap() else { return };

    let mut upload: Map<String, Value> = spec.clone();
    match splice::splice_upload(&mut upload, answer.clone()) {
        Ok(uri) => {
            assert_eq!(answer["uri"].as_str(), Some(uri.as_str()));
            assert_eq!(upload["snapshotUri"].as_str(), Some(uri.as_str()));
            assert_eq!(upload["upload"], answer);
        }
        Err(_) => assert!(answer.get("uri").and_then(Value::as_str).is_none()),
    }
    let mut parent = spec.clone();
    if splice::splice_parent_download(&mut parent, answer.clone()).is_ok() {
        assert_eq!(parent["parent"]["download"], answer);
    }
    let mut images = spec.clone();
    for (index, _) in splice::local_images_to_sign(&spec) {
        splice::splice_local_image(&mut images, index, answer.clone());
        assert_eq!(images["additionalLocalImages"][index]["download"], answer);
    }
    splice::splice_local_image(&mut images, usize::MAX, answer);
});
