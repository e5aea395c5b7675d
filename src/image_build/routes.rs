//! The platform API's routes (wit/protocol.md §2.1, §2.7): the one place
//! their segments are written. The flow, the lookup and `snapsign
//! templates` build URLs from them; the dev stack's emulator matches
//! requests against the same constants.

use super::call::Scope;

/// `/platform/v1`: the API's prefix.
pub const PLATFORM: &str = "platform";
pub const V1: &str = "v1";
/// PAT mode: `/organizations/{org}/projects/{project}` after the prefix.
pub const ORGANIZATIONS: &str = "organizations";
pub const PROJECTS: &str = "projects";
/// Templates: list, get and delete by id, lookup by name.
pub const TEMPLATES: &str = "sandbox-templates";
pub const BY_NAME: &str = "by-name";
/// Builds: prepare, and `{build}/complete`.
pub const BUILDS: &str = "sandbox-template-builds";
pub const COMPLETE: &str = "complete";

/// The platform API's prefix: `{api}/platform/v1`, and in PAT mode
/// `/organizations/{org}/projects/{project}` after it (each one segment).
pub fn platform_base(api: &str, scope: Option<&Scope>) -> String {
    let mut base = format!("{}/{PLATFORM}/{V1}", api.trim_end_matches('/'));
    if let Some(scope) = scope {
        base.push_str(&format!("/{ORGANIZATIONS}/"));
        crate::presign::uri_encode(&scope.organization, false, &mut base);
        base.push_str(&format!("/{PROJECTS}/"));
        crate::presign::uri_encode(&scope.project, false, &mut base);
    }
    base
}

/// `{platform}/sandbox-templates`: list, get and delete (wit/protocol.md §2.7);
/// `platform` is [`platform_base`].
pub fn templates_url(platform: &str) -> String {
    format!("{platform}/{TEMPLATES}")
}

/// `{platform}/sandbox-templates/{id}`, the id as one segment: get and delete.
pub fn template_url(platform: &str, id: &str) -> String {
    let mut url = templates_url(platform);
    url.push('/');
    crate::presign::uri_encode(id, false, &mut url);
    url
}

/// `{platform}/sandbox-templates/by-name/{reference}`, the reference
/// percent-encoded as one path segment (wit/protocol.md §2.2).
pub fn lookup_url(platform: &str, reference: &str) -> String {
    let mut url = templates_url(platform);
    url.push_str(&format!("/{BY_NAME}/"));
    crate::presign::uri_encode(reference, false, &mut url);
    url
}

/// `{platform}/sandbox-template-builds`: prepare (wit/protocol.md §2.4).
pub fn builds_url(platform: &str) -> String {
    format!("{platform}/{BUILDS}")
}

/// `{platform}/sandbox-template-builds/{build}/complete` (wit/protocol.md
/// §2.6), the build id as one segment whatever the platform answered.
pub fn complete_url(platform: &str, build_id: &str) -> String {
    let mut url = builds_url(platform);
    url.push('/');
    crate::presign::uri_encode(build_id, false, &mut url);
    url.push_str(&format!("/{COMPLETE}"));
    url
}
