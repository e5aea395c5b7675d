//! Which failures of the lifecycle and proxy APIs are worth retrying
//! while a sandbox starts (wit/protocol.md §5.1).

/// True for 502/503/504, 400 with "not running", and any body carrying
/// `PROXY_ERROR` or `Failed to proxy request`. 401/403 and the rest are not.
pub fn is_transient(status: u16, body: &str) -> bool {
    matches!(status, 502..=504)
        || (status == 400 && body.contains("not running"))
        || body.contains("PROXY_ERROR")
        || body.contains("Failed to proxy request")
}

#[cfg(test)]
mod tests {
    use super::is_transient;

    #[test]
    fn classifies_gateway_answers_while_pending() {
        assert!(is_transient(502, ""));
        assert!(is_transient(503, "busy"));
        assert!(is_transient(504, ""));
        assert!(is_transient(400, "sandbox is not running yet"));
        assert!(is_transient(500, r#"{"code":"PROXY_ERROR"}"#));
        assert!(is_transient(500, "Failed to proxy request: upstream"));
        assert!(!is_transient(400, "bad request"));
        assert!(!is_transient(401, "Failed"));
        assert!(!is_transient(403, "forbidden"));
        assert!(!is_transient(404, "no sandbox"));
        assert!(!is_transient(500, "internal"));
    }
}
