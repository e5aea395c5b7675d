//! Template lookup by name (wit/protocol.md §2.2, §11): the URL and what
//! each answer means for the build.

use super::call::BuildError;
use crate::wire::TemplateFound;

/// `GET {platform}/sandbox-templates/by-name/{reference}` (`platform`:
/// [`super::routes::platform_base`]), the reference percent-encoded as one path segment.
pub fn url(platform: &str, reference: &str) -> String {
    super::routes::lookup_url(platform, reference)
}

/// The template (200), none (404), or why the build stops. Another
/// namespace's private template (403 `template_private`) refuses the
/// reference, not the credentials: a build failure, not an auth failure.
pub fn classify(reference: &str, status: u16, text: &str) -> Result<Option<TemplateFound>, BuildError> {
    match status {
        200 => serde_json::from_str(text).map(Some).map_err(|e| {
            BuildError::Failed(format!(
                "template lookup for '{reference}' answered 200 without a template ({e}): {}",
                crate::wire::excerpt(text)
            ))
        }),
        404 => Ok(None),
        403 if text.contains("template_private") => {
            Err(BuildError::Failed(format!("FROM {reference}: the platform refused it (HTTP 403): {text}")))
        }
        401 | 403 => {
            Err(BuildError::Auth(format!("template lookup for '{reference}' refused (HTTP {status}): {text}")))
        }
        _ => Err(BuildError::Failed(format!("template lookup for '{reference}' failed (HTTP {status}): {text}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_reference_as_one_segment() {
        assert_eq!(
            url("http://p/platform/v1", "other/base"),
            "http://p/platform/v1/sandbox-templates/by-name/other%2Fbase"
        );
        assert_eq!(url("http://p/platform/v1", "a b?#"), "http://p/platform/v1/sandbox-templates/by-name/a%20b%3F%23");
        assert_eq!(
            url("http://p/platform/v1", "ok-1_2.3~"),
            "http://p/platform/v1/sandbox-templates/by-name/ok-1_2.3~"
        );
    }

    #[test]
    fn private_templates_fail_the_build_other_refusals_are_auth() {
        let private = classify("o/b", 403, r#"{"code":"template_private"}"#).unwrap_err();
        assert!(matches!(&private, BuildError::Failed(m) if m.starts_with("FROM o/b: the platform refused it")));
        assert!(matches!(classify("b", 403, "forbidden"), Err(BuildError::Auth(_))));
        assert!(matches!(classify("b", 401, ""), Err(BuildError::Auth(_))));
        assert!(matches!(classify("b", 500, "boom"), Err(BuildError::Failed(m)) if m.contains("HTTP 500")));
        assert_eq!(classify("b", 404, ""), Ok(None));
        assert!(classify("b", 200, "not json").is_err());
        let found = classify("b", 200, r#"{"id":"t","name":"b","snapshotId":"s","namespace":"n"}"#).unwrap().unwrap();
        assert_eq!((found.id.as_str(), found.snapshot_id.as_str(), found.public), ("t", "s", false));
        // §2.2: id, name and snapshotId are required; an answer without them is named, not passed on.
        let partial = classify("b", 200, r#"{"id":"t"}"#).unwrap_err();
        assert!(
            matches!(&partial, BuildError::Failed(m) if m.contains("answered 200 without a template (missing field `name`")),
            "{partial:?}"
        );
    }
}
