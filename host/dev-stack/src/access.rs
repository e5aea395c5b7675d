//! Who may build on which template: a reference names the caller's own
//! template or, as `owner/name`, another namespace's, which must be public
//! (wit/protocol.md §11).

use http::StatusCode;

use super::http::ApiError;
use super::state::Template;

/// A template reference: `name` names the caller's own template, `owner/name`
/// namespace `owner`'s (wit/protocol.md §11).
pub(crate) fn split_reference<'a>(caller: &'a str, reference: &'a str) -> (&'a str, &'a str) {
    reference.split_once('/').unwrap_or((caller, reference))
}

/// Why `caller` may not build on `template`, if it may not.
pub(crate) fn refuse_private(caller: &str, template: &Template) -> Result<(), ApiError> {
    if template.namespace == caller || template.public {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "template_private",
        format!(
            "template '{}/{}' ({}) is private to namespace '{}'; namespace '{caller}' cannot build on it. \
             Ask its owner to publish it (build it with public: true), or build from a template of your own",
            template.namespace, template.name, template.id, template.namespace
        ),
    ))
}
