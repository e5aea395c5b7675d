//! Validation of what callers name: artifact paths and blob URIs.

/// Longest S3 key (bytes).
pub const MAX_KEY_LEN: usize = 1024;
/// Longest `rel_path` accepted (bytes).
pub const MAX_REL_PATH_LEN: usize = 512;
/// Longest `/`-separated key segment (bytes). File-backed S3 stores (s3s-fs,
/// MinIO) keep each segment as a file name, and file systems cap those at
/// 255 bytes: a longer segment is refused at sign time rather than failing
/// at the store after the URL was handed out.
pub const MAX_SEGMENT_LEN: usize = 255;

/// Checks that `key` is made of clean `/`-separated segments: none empty,
/// `.` or `..`, none over [`MAX_SEGMENT_LEN`] bytes; no backslash or control
/// character; no percent-encoded dot, slash or backslash (which some clients
/// decode before routing).
pub fn key_segments(key: &str) -> Result<(), String> {
    if key.starts_with('/') {
        return Err("must be relative (starts with '/')".into());
    }
    // Printable ASCII without a backslash or '%' (nearly every key) holds
    // nothing the character checks look for.
    if !key.bytes().all(|b| matches!(b, b' '..=b'~') && b != b'\\' && b != b'%') {
        characters(key)?;
    }
    for segment in key.split('/') {
        match segment {
            "" => return Err("has an empty segment ('//' or a trailing '/')".into()),
            "." | ".." => return Err(format!("has a '{segment}' segment")),
            long if long.len() > MAX_SEGMENT_LEN => {
                let start: String = long.chars().take(16).collect();
                return Err(format!(
                    "has a {}-byte segment ('{start}...'); the limit is {MAX_SEGMENT_LEN} bytes per '/'-separated \
                     segment, a file name on file-backed stores: split it with '/'",
                    long.len()
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The character checks of [`key_segments`]: no control character, no
/// backslash, no percent-encoded dot, slash, backslash or NUL.
fn characters(key: &str) -> Result<(), String> {
    if let Some(c) = key.chars().find(|c| c.is_control()) {
        return Err(format!("contains control character U+{:04X}", c as u32));
    }
    if key.contains('\\') {
        return Err("contains a backslash".into());
    }
    let lower = key.to_ascii_lowercase();
    for encoded in ["%2e", "%2f", "%5c", "%00"] {
        if lower.contains(encoded) {
            return Err(format!("contains percent-encoded '{encoded}'"));
        }
    }
    Ok(())
}

/// Validates an artifact `rel_path`.
pub fn rel_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("is empty".into());
    }
    if path.len() > MAX_REL_PATH_LEN {
        return Err(format!("is {} bytes; the limit is {MAX_REL_PATH_LEN}", path.len()));
    }
    key_segments(path)
}

/// An `s3://bucket/key` URI split in its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Uri<'a> {
    /// The bucket.
    pub bucket: &'a str,
    /// The object key.
    pub key: &'a str,
}

/// Parses `s3://bucket/key` with a clean key.
pub fn s3_uri(uri: &str) -> Result<S3Uri<'_>, String> {
    let Some(rest) = uri.strip_prefix("s3://") else {
        let scheme = uri.split_once("://").map(|(s, _)| s).unwrap_or("(none)");
        return Err(format!("has scheme '{scheme}'; this signer only signs s3:// URIs"));
    };
    let (bucket, key) = rest.split_once('/').ok_or("has no object key after the bucket")?;
    if bucket.is_empty() {
        return Err("has no bucket".into());
    }
    if key.len() > MAX_KEY_LEN {
        return Err(format!("key is {} bytes; S3's limit is {MAX_KEY_LEN}", key.len()));
    }
    key_segments(key).map_err(|why| format!("key {why}"))?;
    Ok(S3Uri { bucket, key })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_protocol_example_paths() {
        for ok in ["snapshots/abc.tlsnap", "projects/p/sandbox-template-builds/b/s.tlsnap", "a", "a b/ü.x", "..x/y.."]
        {
            assert_eq!(rel_path(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_every_traversal_form() {
        let long = "a".repeat(MAX_REL_PATH_LEN + 1);
        for bad in [
            "",
            "/abs",
            "../x",
            "a/../b",
            "a/..",
            "./a",
            "a/./b",
            "a//b",
            "a/",
            "a\\b",
            "..\\x",
            "a\u{0}b",
            "a\nb",
            "a\u{7f}b",
            "%2e%2e/x",
            "%2E%2E/x",
            "a%2fb",
            "a%2Fb",
            "a%5cb",
            long.as_str(),
        ] {
            assert!(rel_path(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn segments_are_limited_to_a_file_name() {
        let at_limit = format!("a/{}/b", "s".repeat(MAX_SEGMENT_LEN));
        assert_eq!(rel_path(&at_limit), Ok(()));
        let over = format!("a/{}/b", "s".repeat(MAX_SEGMENT_LEN + 1));
        let why = rel_path(&over).unwrap_err();
        assert!(why.contains("256-byte segment") && why.contains("limit is 255"), "{why}");
        let uri = format!("s3://b/p/ns/{}", "s".repeat(MAX_SEGMENT_LEN + 1));
        assert!(s3_uri(&uri).unwrap_err().contains("limit is 255"));
        let key_over = format!("s3://b/{}", "a/".repeat(MAX_KEY_LEN / 2 + 1));
        assert!(s3_uri(&key_over).unwrap_err().contains("S3's limit is 1024"));
    }

    #[test]
    fn parses_s3_uris_and_refuses_others() {
        assert_eq!(s3_uri("s3://b/p/ns/x.tlsnap"), Ok(S3Uri { bucket: "b", key: "p/ns/x.tlsnap" }));
        assert!(s3_uri("gs://b/x").unwrap_err().contains("'gs'"));
        assert!(s3_uri("file:///var/x").is_err());
        assert!(s3_uri("s3://b").is_err());
        assert!(s3_uri("s3:///x").is_err());
        assert!(s3_uri("s3://b/p/ns/../other/x").is_err());
    }
}
