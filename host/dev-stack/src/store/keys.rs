//! Which keys this store can hold, checked before s3s-fs touches the disk.
//!
//! S3 allows 1,024 bytes of key (KeyTooLongError beyond). s3s-fs names one
//! file after the base64 of bucket and key together (an upload's attributes,
//! see [`layout::UPLOAD_ATTRS_NAME_OVERHEAD`]); a file name holds 255 bytes, so
//! the store's limit is lower and depends on the bucket name. Without this
//! check s3s-fs wrote the object and then failed with 500 on that file.

use s3s::{S3Error, s3_error};

use super::layout::{UPLOAD_ATTRS_NAME_OVERHEAD, base64_len};

/// S3's own key limit (bytes).
pub const S3_MAX_KEY_BYTES: usize = 1024;
/// Longest file name on the store's filesystem (ext4, tmpfs, xfs, btrfs).
pub const NAME_MAX: usize = 255;

/// The longest key (bytes) this store can hold in `bucket`.
pub fn max_key_bytes(bucket: &str) -> usize {
    let room = NAME_MAX.saturating_sub(UPLOAD_ATTRS_NAME_OVERHEAD + base64_len(bucket.len()));
    // base64_len(n) <= room  <=>  4n <= 3 * room
    (room * 3 / 4).min(S3_MAX_KEY_BYTES)
}

/// Refuses a key this store cannot hold or would map outside its bucket:
/// KeyTooLongError (400) past [`max_key_bytes`], as S3 does past 1,024 bytes;
/// InvalidArgument (400) for `.`/`..`/empty segments or a NUL byte, which a
/// file-backed store cannot keep apart from other keys (S3 itself treats
/// keys as opaque strings; MinIO refuses these too).
pub fn check(bucket: &str, key: &str) -> Result<(), S3Error> {
    let limit = max_key_bytes(bucket);
    if key.len() > limit {
        return Err(s3_error!(
            KeyTooLongError,
            "Your key is too long: {} bytes; this store holds keys of up to {limit} bytes in bucket '{bucket}' \
             (S3 allows {S3_MAX_KEY_BYTES}; s3s-fs names a {NAME_MAX}-byte file after bucket and key)",
            key.len()
        ));
    }
    if key.contains('\0') {
        return Err(s3_error!(InvalidArgument, "key contains a NUL byte; this store cannot hold it"));
    }
    let body = key.strip_suffix('/').unwrap_or(key);
    for segment in body.split('/') {
        if matches!(segment, "" | "." | "..") {
            return Err(s3_error!(
                InvalidArgument,
                "key {key:?} has a {segment:?} segment; this store maps keys to file paths and refuses \
                 empty, '.' and '..' segments"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3s::S3ErrorCode;

    #[test]
    fn limit_follows_the_bucket_name() {
        // 255 - 74 - base64("snapshots") 12 = 169 base64 chars = 126 bytes.
        assert_eq!(max_key_bytes("snapshots"), 126);
        assert_eq!(max_key_bytes("snaps"), 130);
        let bucket = "b".repeat(63);
        assert_eq!(max_key_bytes(&bucket), 72);
        for bucket in ["snapshots", "snaps", bucket.as_str()] {
            let limit = max_key_bytes(bucket);
            assert!(UPLOAD_ATTRS_NAME_OVERHEAD + base64_len(bucket.len()) + base64_len(limit) <= NAME_MAX);
            assert!(UPLOAD_ATTRS_NAME_OVERHEAD + base64_len(bucket.len()) + base64_len(limit + 1) > NAME_MAX);
        }
    }

    #[test]
    fn refuses_long_keys_and_path_tricks() {
        assert!(check("snaps", &"k".repeat(130)).is_ok());
        let long = check("snaps", &"k".repeat(131)).unwrap_err();
        assert_eq!(*long.code(), S3ErrorCode::KeyTooLongError);
        assert!(long.message().unwrap().contains("up to 130 bytes"), "{:?}", long.message());
        for ok in ["a", "a/b", "dir/", "..a/b..", "a b/ü"] {
            assert!(check("snaps", ok).is_ok(), "{ok}");
        }
        for bad in ["../.upload-x.json", "a/../b", "./a", "a//b", "/a", "a/.", "a\0b", "//"] {
            let err = check("snaps", bad).unwrap_err();
            assert_eq!(*err.code(), S3ErrorCode::InvalidArgument, "{bad:?}");
        }
    }
}
