//! The Dockerfile planner (`snapsign::image_build::plan`) on arbitrary text. A plan
//! names a non-empty base image, looks up nothing twice, nothing empty, never
//! `scratch` and nothing with a `$` left in it. Without substitution, quotes or
//! escapes in the text, the base image and every lookup appear in it as written.
#![no_main]

use libfuzzer_sys::fuzz_target;
use snapsign::image_build::plan::plan;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(plan) = plan(text) {
        let literal = !text.contains(['$', '\\', '"', '\'']);
        assert!(!plan.base_image.is_empty());
        assert!(!literal || text.contains(plan.base_image.as_str()), "{plan:?}");
        let mut seen = std::collections::HashSet::new();
        for lookup in plan.final_lookup.iter().chain(&plan.other_lookups) {
            assert!(!lookup.is_empty() && !lookup.eq_ignore_ascii_case("scratch"), "{plan:?}");
            assert!(!lookup.contains('$'), "{plan:?}");
            assert!(!literal || text.contains(lookup.as_str()), "{plan:?}");
            assert!(seen.insert(lookup.as_str()), "{plan:?}");
        }
    }
});
